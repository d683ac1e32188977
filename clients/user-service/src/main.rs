//! user-service: owns the users. Answers `user.query` in the `user-service` group and publishes
//! `user.created` for every user, the seed included, once (see `scenario_common::outbox`).

use std::path::PathBuf;

use clap::Parser;
use eventbus_client::pb;
use eventbus_client::Reply;
use rusqlite::OptionalExtension as _;
use scenario_common::bus::{self, serve_until};
use scenario_common::db::{seed_once, Db};
use scenario_common::fixtures;
use scenario_common::model::UserReply;
use scenario_common::model::{change_event_id, services, topics, ByUser, ErrorCode, User};
use scenario_common::outbox::{self, Outbox, OutboxEvent};
use scenario_common::runtime::{init_tracing, shutdown_on_signals, BusArgs, ResponderArgs};

/// Owns the users of the scenario and answers `user.query`.
#[derive(Debug, Parser)]
#[command(name = "user-service", version)]
struct Args {
    #[command(flatten)]
    bus: BusArgs,
    #[command(flatten)]
    responder: ResponderArgs,
    /// The service's SQLite database, seeded on first start.
    #[arg(long, env = "USER_SERVICE_DB", default_value = "user-service.db")]
    db: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    email TEXT NOT NULL,
    created_at TEXT NOT NULL
);";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(&args.bus);
    let db = Db::open(&args.db, &format!("{SCHEMA}{}", outbox::SCHEMA))?;
    let seeded = db.call(|conn| seed_once(conn, seed)).await?;
    tracing::info!(db = %args.db.display(), ?seeded, "database ready");

    let shutdown = shutdown_on_signals();
    let client = bus::connect(&args.bus.bus, services::USER)?;
    let outbox =
        tokio::spawn(Outbox::new(db.clone(), services::USER).run(client.clone(), shutdown.clone()));
    serve_until(
        client,
        topics::USER_QUERY,
        services::USER,
        args.responder.reply_delay,
        move |query| user_query(db.clone(), query),
        shutdown,
    )
    .await;
    outbox.await?;
    tracing::info!("stopped");
    Ok(())
}

/// Inserts the fixture's users and their `user.created` events.
fn seed(tx: &rusqlite::Transaction<'_>) -> anyhow::Result<usize> {
    let users = fixtures::users();
    for user in &users {
        insert(tx, user)?;
    }
    Ok(users.len())
}

/// Stores a user and, in the same transaction, its change event.
fn insert(conn: &rusqlite::Connection, user: &User) -> anyhow::Result<()> {
    conn.execute(
        "INSERT INTO users (id, name, email, created_at) VALUES (?1, ?2, ?3, ?4)",
        rusqlite::params![user.id, user.name, user.email, user.created_at],
    )?;
    let event = OutboxEvent::json(change_event_id("user", user.id), topics::USER_CREATED, user);
    outbox::add(conn, &event)?;
    Ok(())
}

/// `user.query` {user_id} → {user}, or `not_found`.
async fn user_query(db: Db, query: pb::Event) -> Reply {
    let topic = topics::USER_QUERY;
    let request: ByUser = match bus::parse(&query) {
        Ok(request) => request,
        Err(reply) => return reply,
    };
    let id = request.user_id;
    let found = db
        .call(move |conn| {
            Ok(conn
                .query_row(
                    "SELECT id, name, email, created_at FROM users WHERE id = ?1",
                    [id],
                    |row| {
                        Ok(User {
                            id: row.get(0)?,
                            name: row.get(1)?,
                            email: row.get(2)?,
                            created_at: row.get(3)?,
                        })
                    },
                )
                .optional()?)
        })
        .await;
    match found {
        Ok(Some(user)) => bus::ok(topic, &UserReply { user }),
        Ok(None) => bus::error(topic, ErrorCode::NotFound, format!("unknown user {id}")),
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "user lookup failed");
            bus::error(topic, ErrorCode::Internal, "user lookup failed")
        }
    }
}
