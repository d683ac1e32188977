//! query-service: the scenario's query service. An HTTP API that shows the products a user has
//! ordered, answered in one of two styles chosen at start:
//!
//! - `request-reply`: asks user-service and order-service over the bus (in parallel), then
//!   product-service for all the products in one query. Calls nobody directly, but needs every
//!   service up, and is as slow as the slowest answer; `Server-Timing` shows each call.
//! - `projection`: keeps its own SQLite copy of the services' data, built from their change
//!   events, and answers from it alone, even while the other services are down.
//!
//! `POST /users/{id}/orders` creates an order through the bus (`order.create`) in both modes.
//!
//! # Layout
//! - `api`: the HTTP routes, errors, headers and correlation ids.
//! - `view`: the answer's shape, and how request-reply mode computes it.
//! - `projection`: projection mode's read model and the subscription that feeds it.

mod api;
mod projection;
mod view;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use scenario_common::bus;
use scenario_common::db::Db;
use scenario_common::model::services;
use scenario_common::runtime::{init_tracing, shutdown_on_signals, BusArgs};

/// How the query service answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Ask the services over the bus for every request.
    RequestReply,
    /// Answer from its own copy, built from the services' change events.
    Projection,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::RequestReply => "request-reply",
            Mode::Projection => "projection",
        }
    }
}

/// The scenario's query service: `GET /users/{id}/products`, `POST /users/{id}/orders`,
/// `GET /status`.
#[derive(Debug, Parser)]
#[command(name = "query-service", version)]
struct Args {
    #[command(flatten)]
    bus: BusArgs,
    /// How to answer.
    #[arg(long, value_enum, default_value = "request-reply")]
    mode: Mode,
    /// The HTTP address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The projection's SQLite database (projection mode).
    #[arg(long, env = "QUERY_SERVICE_DB", default_value = "query-service.db")]
    db: PathBuf,
    /// Request-reply mode: how long to wait for user-service.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    user_timeout: Duration,
    /// Request-reply mode: how long to wait for order-service's `order.query`.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    orders_timeout: Duration,
    /// Request-reply mode: how long to wait for product-service.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    products_timeout: Duration,
    /// Both modes: how long to wait for `order.create` (which itself asks two services).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    create_timeout: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(&args.bus);
    let shutdown = shutdown_on_signals();
    let client = bus::connect(&args.bus.bus, services::QUERY)?;

    let mut follower = None;
    let projection = match args.mode {
        Mode::RequestReply => None,
        Mode::Projection => {
            let db = Db::open(&args.db, projection::schema())?;
            let projection = projection::Projection::open(db).await?;
            tracing::info!(db = %args.db.display(), last_applied = projection.last_sequence(), "projection opened");
            follower = Some(tokio::spawn(
                projection.clone().run(client.clone(), shutdown.clone()),
            ));
            Some(projection)
        }
    };

    let state = api::AppState {
        mode: args.mode,
        client,
        timeouts: api::Timeouts {
            user: args.user_timeout,
            orders: args.orders_timeout,
            products: args.products_timeout,
            create: args.create_timeout,
        },
        projection,
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, mode = args.mode.as_str(), "listening");
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await?;
    shutdown.cancel();
    if let Some(follower) = follower {
        follower.await?;
    }
    tracing::info!("stopped");
    Ok(())
}
