//! product-service: owns the products. Answers `product.query` (all the ids of one request in
//! one query) in the `product-service` group and publishes `product.created` for every product,
//! the seed included, once (see `scenario_common::outbox`).

use std::path::PathBuf;

use clap::Parser;
use eventbus_client::pb;
use eventbus_client::Reply;
use scenario_common::bus::{self, serve_until};
use scenario_common::db::{seed_once, Db};
use scenario_common::fixtures;
use scenario_common::model::{
    change_event_id, services, topics, ErrorCode, Product, ProductQuery, ProductsReply,
};
use scenario_common::outbox::{self, Outbox, OutboxEvent};
use scenario_common::runtime::{init_tracing, shutdown_on_signals, BusArgs, ResponderArgs};

/// Owns the products of the scenario and answers `product.query`.
#[derive(Debug, Parser)]
#[command(name = "product-service", version)]
struct Args {
    #[command(flatten)]
    bus: BusArgs,
    #[command(flatten)]
    responder: ResponderArgs,
    /// The service's SQLite database, seeded on first start. Replicas may share it.
    #[arg(long, env = "PRODUCT_SERVICE_DB", default_value = "product-service.db")]
    db: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS products (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    price_cents INTEGER NOT NULL,
    created_at TEXT NOT NULL
);";

/// Most ids in one `product.query`: one SQL statement answers it.
const MAX_IDS: usize = 1000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(&args.bus);
    let db = Db::open(&args.db, &format!("{SCHEMA}{}", outbox::SCHEMA))?;
    let seeded = db.call(|conn| seed_once(conn, seed)).await?;
    tracing::info!(db = %args.db.display(), ?seeded, "database ready");

    let shutdown = shutdown_on_signals();
    let client = bus::connect(&args.bus.bus, services::PRODUCT)?;
    let outbox = tokio::spawn(
        Outbox::new(db.clone(), services::PRODUCT).run(client.clone(), shutdown.clone()),
    );
    serve_until(
        client,
        topics::PRODUCT_QUERY,
        services::PRODUCT,
        args.responder.reply_delay,
        move |query| product_query(db.clone(), query),
        shutdown,
    )
    .await;
    outbox.await?;
    tracing::info!("stopped");
    Ok(())
}

/// Inserts the fixture's products and their `product.created` events.
fn seed(tx: &rusqlite::Transaction<'_>) -> anyhow::Result<usize> {
    let products = fixtures::products();
    for product in &products {
        tx.execute(
            "INSERT INTO products (id, name, price_cents, created_at) VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![
                product.id,
                product.name,
                product.price_cents,
                product.created_at
            ],
        )?;
        let id = change_event_id("product", product.id);
        outbox::add(tx, &OutboxEvent::json(id, topics::PRODUCT_CREATED, product))?;
    }
    Ok(products.len())
}

/// `product.query` {product_ids} → {products, missing}, with one SQL query for all the ids.
async fn product_query(db: Db, query: pb::Event) -> Reply {
    let topic = topics::PRODUCT_QUERY;
    let request: ProductQuery = match bus::parse(&query) {
        Ok(request) => request,
        Err(reply) => return reply,
    };
    if request.product_ids.len() > MAX_IDS {
        return bus::error(
            topic,
            ErrorCode::Invalid,
            format!("at most {MAX_IDS} product_ids in one query"),
        );
    }
    let mut ids = request.product_ids;
    ids.sort_unstable();
    ids.dedup();
    let wanted = ids.clone();
    let found = db
        .call(move |conn| {
            // `json_each` takes the whole id list as one parameter: one statement, any count.
            let mut statement = conn.prepare_cached(
                "SELECT id, name, price_cents, created_at FROM products
                 WHERE id IN (SELECT value FROM json_each(?1)) ORDER BY id",
            )?;
            let rows = statement.query_map([serde_json::to_string(&wanted)?], |row| {
                Ok(Product {
                    id: row.get(0)?,
                    name: row.get(1)?,
                    price_cents: row.get(2)?,
                    created_at: row.get(3)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await;
    match found {
        Ok(products) => {
            let missing = ids
                .into_iter()
                .filter(|id| products.binary_search_by_key(id, |p| p.id).is_err())
                .collect();
            bus::ok(topic, &ProductsReply { products, missing })
        }
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "product lookup failed");
            bus::error(topic, ErrorCode::Internal, "product lookup failed")
        }
    }
}
