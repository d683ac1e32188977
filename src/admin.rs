//! The admin HTTP listener (`--admin-listen`): plain HTTP/1.1 for operators' tools, apart from
//! the gRPC port.
//!
//! - `GET /metrics`: the bus's metrics ([`crate::metrics`]) in the text exposition format
//!   (OpenMetrics 1.0, which Prometheus scrapes and its text parsers read).
//! - `GET /healthz`: 200 while the process serves HTTP at all (liveness).
//! - `GET /readyz`: 200 while the node should get traffic, 503 otherwise (readiness). It answers
//!   from the same status the gRPC health service reports for the whole server (service `""`),
//!   so whatever turns that NOT_SERVING (a failed store, see `server::report_store_failure`;
//!   shutdown; a storage backend whose engine is unreachable) turns readiness off too, with no
//!   second source of truth.
//!
//! - `GET /` and `/dashboard/`: the dashboard, with its API under `/api/v1/`
//!   ([`crate::dashboard`]).
//!
//! The listener works on the [`Broker`] handle only: it reads metrics, health, the bus's tables
//! and the log, and never takes part in publishing.

use std::future::Future;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::server::{HealthReporter, HealthService};

use futures_util::StreamExt as _;
use tonic::transport::server::Connected as _;

use crate::accept::{Connection, Incoming};
use crate::auth::Auth;
use crate::broker::Broker;
use crate::dashboard::DashboardState;

/// The content type of `/metrics`: OpenMetrics text, as `prometheus-client` writes it.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the admin handlers read.
#[derive(Clone)]
struct AdminState {
    broker: Broker,
    health: std::sync::Arc<HealthService>,
}

/// The admin routes over `broker`, with readiness read from `health` (the reporter behind the
/// gRPC health service), and the dashboard, which shows event contents only while `auth` is
/// open.
pub fn router(broker: Broker, health: HealthReporter, auth: Auth) -> Router {
    let dashboard = crate::dashboard::router(DashboardState::new(broker.clone(), auth));
    let state = AdminState {
        broker,
        health: std::sync::Arc::new(HealthService::from_health_reporter(health)),
    };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
        .merge(dashboard)
}

/// Serves [`router`] on `listener` (a [`tokio::net::TcpListener`], or an [`IncomingListener`] for HTTPS)
/// until `shutdown` resolves.
///
/// # Errors
/// An I/O error of the listener that axum does not retry.
pub async fn serve<L>(
    listener: L,
    broker: Broker,
    health: HealthReporter,
    auth: Auth,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    axum::serve(listener, router(broker, health, auth))
        .with_graceful_shutdown(shutdown)
        .await
}

/// An [`Incoming`] as an axum listener: the admin listener with TLS, its handshakes run by
/// [`Incoming`] (each in its own future, under the handshake deadline).
pub struct IncomingListener(pub Incoming);

impl axum::serve::Listener for IncomingListener {
    type Io = Connection;
    type Addr = Option<std::net::SocketAddr>;

    async fn accept(&mut self) -> (Connection, Option<std::net::SocketAddr>) {
        loop {
            match self.0.next().await {
                Some(Ok(connection)) => {
                    let addr = connection.connect_info().remote_addr;
                    return (connection, addr);
                }
                // Incoming logs and waits out its errors itself; it never ends on its own.
                Some(Err(_)) => continue,
                None => std::future::pending().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Option<std::net::SocketAddr>> {
        self.0.local_addr().map(Some)
    }
}

/// Runs `work` on tokio's blocking pool and returns its result: for handlers that read the
/// store or build a large answer, so the async workers stay free. A panic in `work` is resumed
/// here, where the handler's panic layer answers for it as for any handler.
pub(crate) async fn off_workers<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|error| std::panic::resume_unwind(error.into_panic()))
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    // Reading the store's usage may take its lock briefly; off the async workers.
    let broker = state.broker.clone();
    let text = off_workers(move || broker.render_metrics()).await;
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], text)
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    let status = state
        .health
        .check(tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        }))
        .await
        .map(|response| response.into_inner().status);
    match status {
        Ok(status) if status == ServingStatus::Serving as i32 => {
            (StatusCode::OK, "ready\n".to_owned())
        }
        Ok(status) => {
            let name =
                ServingStatus::try_from(status).map_or("UNKNOWN", |status| status.as_str_name());
            let why = match state.broker.store_failure() {
                Some(failure) => format!("not ready: {name}: {failure}\n"),
                None => format!("not ready: {name}\n"),
            };
            (StatusCode::SERVICE_UNAVAILABLE, why)
        }
        Err(status) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", status.message()),
        ),
    }
}
