//! order-service: owns the orders. Answers `order.query` (a user's orders) and the command
//! `order.create` (validates the user and the products by asking user-service and
//! product-service over the bus, stores the order, replies, publishes `order.created`) in the
//! `order-service` group, and publishes `order.created` for every order, the seed included, once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use eventbus_client::pb;
use eventbus_client::{Client, Reply};
use scenario_common::bus::{self, serve_until, AskError};
use scenario_common::db::{seed_once, Db};
use scenario_common::fixtures;
use scenario_common::model::{
    change_event_id, now_rfc3339, services, topics, ByUser, CreateOrder, ErrorCode, Order,
    OrderItem, OrderReply, OrdersReply, ProductQuery, ProductsReply, UserReply,
};
use scenario_common::outbox::{self, Outbox, OutboxEvent};
use scenario_common::runtime::{init_tracing, shutdown_on_signals, BusArgs, ResponderArgs};

/// Owns the orders of the scenario; answers `order.query` and `order.create`.
#[derive(Debug, Parser)]
#[command(name = "order-service", version)]
struct Args {
    #[command(flatten)]
    bus: BusArgs,
    #[command(flatten)]
    responder: ResponderArgs,
    /// The service's SQLite database, seeded on first start.
    #[arg(long, env = "ORDER_SERVICE_DB", default_value = "order-service.db")]
    db: PathBuf,
    /// How long `order.create` waits for user-service and product-service.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    query_timeout: Duration,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS orders (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_by_user ON orders (user_id, id);
CREATE TABLE IF NOT EXISTS order_items (
    order_id INTEGER NOT NULL REFERENCES orders (id),
    product_id INTEGER NOT NULL,
    quantity INTEGER NOT NULL,
    PRIMARY KEY (order_id, product_id)
);";

/// What the handlers share.
#[derive(Clone)]
struct State {
    db: Db,
    client: Client,
    outbox: Outbox,
    query_timeout: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_tracing(&args.bus);
    let db = Db::open(&args.db, &format!("{SCHEMA}{}", outbox::SCHEMA))?;
    let seeded = db.call(|conn| seed_once(conn, seed)).await?;
    tracing::info!(db = %args.db.display(), ?seeded, "database ready");

    let shutdown = shutdown_on_signals();
    let client = bus::connect(&args.bus.bus, services::ORDER)?;
    let outbox = Outbox::new(db.clone(), services::ORDER);
    let publishing = tokio::spawn(outbox.clone().run(client.clone(), shutdown.clone()));
    let state = State {
        db,
        client: client.clone(),
        outbox,
        query_timeout: args.query_timeout,
    };
    let delay = args.responder.reply_delay;
    let queries = {
        let state = state.clone();
        serve_until(
            client.clone(),
            topics::ORDER_QUERY,
            services::ORDER,
            delay,
            move |query| order_query(state.clone(), query),
            shutdown.clone(),
        )
    };
    let creates = serve_until(
        client,
        topics::ORDER_CREATE,
        services::ORDER,
        delay,
        move |query| order_create(state.clone(), query),
        shutdown,
    );
    tokio::join!(queries, creates);
    publishing.await?;
    tracing::info!("stopped");
    Ok(())
}

/// Inserts the fixture's orders and their `order.created` events.
fn seed(tx: &rusqlite::Transaction<'_>) -> anyhow::Result<usize> {
    let orders = fixtures::orders();
    for order in &orders {
        insert(tx, order, "", "")?;
    }
    Ok(orders.len())
}

/// Stores an order and, in the same transaction, its change event.
fn insert(
    conn: &rusqlite::Connection,
    order: &Order,
    correlation_id: &str,
    causation_id: &str,
) -> anyhow::Result<()> {
    conn.execute(
        "INSERT INTO orders (id, user_id, created_at) VALUES (?1, ?2, ?3)",
        rusqlite::params![order.id, order.user_id, order.created_at],
    )?;
    let mut item = conn.prepare_cached(
        "INSERT INTO order_items (order_id, product_id, quantity) VALUES (?1, ?2, ?3)",
    )?;
    for line in &order.items {
        item.execute(rusqlite::params![order.id, line.product_id, line.quantity])?;
    }
    let mut event = OutboxEvent::json(
        change_event_id("order", order.id),
        topics::ORDER_CREATED,
        order,
    );
    event.correlation_id = correlation_id.to_string();
    event.causation_id = causation_id.to_string();
    outbox::add(conn, &event)?;
    Ok(())
}

/// A user's orders, oldest first.
fn orders_of(conn: &rusqlite::Connection, user_id: i64) -> anyhow::Result<Vec<Order>> {
    let mut statement = conn.prepare_cached(
        "SELECT o.id, o.created_at, i.product_id, i.quantity
         FROM orders o JOIN order_items i ON i.order_id = o.id
         WHERE o.user_id = ?1 ORDER BY o.id, i.product_id",
    )?;
    let mut orders: Vec<Order> = Vec::new();
    let mut rows = statement.query([user_id])?;
    while let Some(row) = rows.next()? {
        let id: i64 = row.get(0)?;
        let item = OrderItem {
            product_id: row.get(2)?,
            quantity: row.get(3)?,
        };
        match orders.last_mut() {
            Some(order) if order.id == id => order.items.push(item),
            _ => orders.push(Order {
                id,
                user_id,
                created_at: row.get(1)?,
                items: vec![item],
            }),
        }
    }
    Ok(orders)
}

/// `order.query` {user_id} → {orders}.
async fn order_query(state: State, query: pb::Event) -> Reply {
    let topic = topics::ORDER_QUERY;
    let request: ByUser = match bus::parse(&query) {
        Ok(request) => request,
        Err(reply) => return reply,
    };
    match state
        .db
        .call(move |conn| orders_of(conn, request.user_id))
        .await
    {
        Ok(orders) => bus::ok(topic, &OrdersReply { orders }),
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "order lookup failed");
            bus::error(topic, ErrorCode::Internal, "order lookup failed")
        }
    }
}

/// `order.create` {user_id, items} → {order}: asks user-service and product-service (in
/// parallel, with the command's correlation id), then stores the order and its `order.created`
/// event in one transaction.
async fn order_create(state: State, query: pb::Event) -> Reply {
    let topic = topics::ORDER_CREATE;
    let request: CreateOrder = match bus::parse(&query) {
        Ok(request) => request,
        Err(reply) => return reply,
    };
    let items = match merge_items(&request.items) {
        Ok(items) => items,
        Err(message) => return bus::error(topic, ErrorCode::Invalid, message),
    };
    let conversation = bus::Conversation::of(&query);
    let user_query = ByUser {
        user_id: request.user_id,
    };
    let product_query = ProductQuery {
        product_ids: items.iter().map(|item| item.product_id).collect(),
    };
    let (user, products) = tokio::join!(
        bus::ask_read::<_, UserReply>(
            &state.client,
            topics::USER_QUERY,
            &user_query,
            &conversation,
            state.query_timeout,
        ),
        bus::ask_read::<_, ProductsReply>(
            &state.client,
            topics::PRODUCT_QUERY,
            &product_query,
            &conversation,
            state.query_timeout,
        ),
    );
    if let Err(reply) = check(user.map(drop), services::USER) {
        return reply;
    }
    let products = match check(products, services::PRODUCT) {
        Ok(products) => products,
        Err(reply) => return reply,
    };
    if !products.missing.is_empty() {
        return bus::error(
            topic,
            ErrorCode::Invalid,
            format!("unknown products {:?}", products.missing),
        );
    }

    let user_id = request.user_id;
    let (correlation, causation) = (query.correlation_id.clone(), query.id.clone());
    let stored = state
        .db
        .call(move |conn| {
            let tx = conn.transaction()?;
            let id: i64 =
                tx.query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM orders", [], |row| {
                    row.get(0)
                })?;
            let order = Order {
                id,
                user_id,
                created_at: now_rfc3339(),
                items,
            };
            insert(&tx, &order, &correlation, &causation)?;
            tx.commit()?;
            Ok(order)
        })
        .await;
    match stored {
        Ok(order) => {
            tracing::info!(order_id = order.id, user_id, "order created");
            state.outbox.wake();
            bus::ok(topic, &OrderReply { order })
        }
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "storing the order failed");
            bus::error(topic, ErrorCode::Internal, "storing the order failed")
        }
    }
}

/// Turns a failed ask into the error reply to `order.create`.
#[allow(clippy::result_large_err)] // the error is the reply itself, sent at once
fn check<T>(outcome: Result<T, AskError>, service: &str) -> Result<T, Reply> {
    let topic = topics::ORDER_CREATE;
    outcome.map_err(|error| match error {
        AskError::Remote { code, message } => match code {
            ErrorCode::NotFound | ErrorCode::Invalid => bus::error(topic, code, message),
            ErrorCode::Unavailable | ErrorCode::Internal => bus::error(
                topic,
                ErrorCode::Unavailable,
                format!("{service} failed: {message}"),
            ),
        },
        other => bus::error(
            topic,
            ErrorCode::Unavailable,
            format!("{service} did not answer: {other}"),
        ),
    })
}

/// The items of a new order with one line per product (quantities of repeated products added
/// up), or why they are invalid.
fn merge_items(items: &[OrderItem]) -> Result<Vec<OrderItem>, String> {
    if items.is_empty() {
        return Err("an order needs at least one item".into());
    }
    let mut merged = BTreeMap::new();
    for item in items {
        if item.quantity < 1 {
            return Err(format!(
                "quantity of product {} must be at least 1",
                item.product_id
            ));
        }
        *merged.entry(item.product_id).or_insert(0) += item.quantity;
    }
    Ok(merged
        .into_iter()
        .map(|(product_id, quantity)| OrderItem {
            product_id,
            quantity,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_merged_and_checked() {
        let item = |product_id, quantity| OrderItem {
            product_id,
            quantity,
        };
        assert_eq!(
            merge_items(&[item(3, 1), item(1, 2), item(3, 2)]).unwrap(),
            vec![item(1, 2), item(3, 3)]
        );
        assert!(merge_items(&[]).is_err());
        assert!(merge_items(&[item(1, 0)]).is_err());
    }
}
