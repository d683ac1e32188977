//! Projection mode's read model: the query service's own copy of users, products and orders,
//! built from the services' change events, so answering needs nobody else.
//!
//! One subscription to `*.created` (`user.created`, `product.created`, `order.created`; other
//! `*.created` topics only move the position) from `earliest`, or after the last sequence
//! applied. Every batch of events is applied in one SQLite transaction that also stores the last
//! applied sequence, so after a crash or a restart the projection resumes exactly there: nothing
//! applied twice, nothing skipped. Events are also deduplicated by `id`, since the services'
//! outboxes may publish a change twice (never zero times).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eventbus_client::pb;
use eventbus_client::{Backoff, Client, Start, SubscribeOptions, SubscriptionItem};
use futures_util::{FutureExt as _, StreamExt as _};
use rusqlite::{params, Connection, OptionalExtension as _};
use scenario_common::db::Db;
use scenario_common::model::{topics, Order, Product, User};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::view::{OrderedProduct, UserProducts};

/// The pattern the projection follows.
pub const PATTERN: &str = "*.created";

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL, created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS products (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL, price_cents INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
    id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL, created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_by_user ON orders (user_id);
CREATE TABLE IF NOT EXISTS order_items (
    order_id INTEGER NOT NULL, product_id INTEGER NOT NULL, quantity INTEGER NOT NULL,
    PRIMARY KEY (order_id, product_id)
);
-- ids of the events applied, to skip a change published twice
CREATE TABLE IF NOT EXISTS applied_events (event_id TEXT PRIMARY KEY, sequence INTEGER NOT NULL);
-- one row: where the projection is
CREATE TABLE IF NOT EXISTS position (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_sequence INTEGER NOT NULL,
    events_applied INTEGER NOT NULL
);
INSERT OR IGNORE INTO position (id, last_sequence, events_applied) VALUES (1, 0, 0);
";

/// Most events applied in one transaction.
const BATCH: usize = 512;

/// The read model and what is known about its progress.
#[derive(Debug, Clone)]
pub struct Projection {
    db: Db,
    progress: Arc<Progress>,
}

/// Progress, readable without the database (for every response's header).
#[derive(Debug, Default)]
struct Progress {
    last_sequence: AtomicU64,
    /// The position this process started (or last resubscribed) from.
    resumed_after: AtomicU64,
    /// Events applied by this process.
    applied_since_start: AtomicU64,
    caught_up: AtomicBool,
}

/// `GET /status` in projection mode.
#[derive(Debug, Serialize)]
pub struct Status {
    pub mode: &'static str,
    /// The last bus sequence applied (0: none yet).
    pub last_applied_sequence: u64,
    /// The latest sequence on the followed topics, as the bus reports it (`null` when the bus
    /// cannot be asked).
    pub bus_head: Option<u64>,
    /// `bus_head - last_applied_sequence`: how far behind the bus the projection is, in bus
    /// sequence numbers (0: up to date).
    pub lag: Option<u64>,
    /// Whether the replay from the start position has reached the live head.
    pub caught_up: bool,
    /// The position this process resumed from.
    pub resumed_after: u64,
    /// Events applied by this process, and in the life of the database.
    pub applied_since_start: u64,
    pub events_applied: u64,
    pub users: i64,
    pub products: i64,
    pub orders: i64,
}

/// What one batch of events did.
#[derive(Debug, Default, PartialEq, Eq)]
struct Applied {
    applied: u64,
    duplicates: u64,
    last_sequence: u64,
}

impl Projection {
    /// Opens (or creates) the read model in `db`.
    pub async fn open(db: Db) -> anyhow::Result<Projection> {
        db.call(|conn| Ok(conn.execute_batch(SCHEMA)?)).await?;
        let last = db.call(last_sequence).await?;
        let progress = Progress::default();
        progress.last_sequence.store(last, Ordering::Relaxed);
        Ok(Projection {
            db,
            progress: Arc::new(progress),
        })
    }

    /// The last applied sequence.
    pub fn last_sequence(&self) -> u64 {
        self.progress.last_sequence.load(Ordering::Relaxed)
    }

    /// Follows the bus until `shutdown`: subscribes after the last applied sequence (from
    /// `earliest` the first time), applies batches, and subscribes again with backoff when the
    /// bus is unreachable or the subscription ends.
    pub async fn run(self, client: Client, shutdown: CancellationToken) {
        let backoff = Backoff::default();
        let mut failures = 0;
        while !shutdown.is_cancelled() {
            match self.follow(&client, &shutdown).await {
                Ok(()) => return,
                Err(error) => {
                    let delay = backoff.delay(failures);
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = format!("{error:#}"), retry_in = ?delay, "projection subscription ended; resubscribing");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }

    /// One subscription, until shutdown (`Ok`) or it ends (`Err`).
    async fn follow(&self, client: &Client, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut after = self.db.call(last_sequence).await?;
        let start = |after| match after {
            0 => Start::Earliest,
            n => Start::AfterSequence(n),
        };
        let mut subscription = client
            .subscribe_with(PATTERN, SubscribeOptions::new().start(start(after)))
            .await?;
        let head = subscription.subscribed().head_sequence;
        if head < after {
            // The bus holds fewer events than were applied: it lost its log (it keeps it in
            // memory). Its numbering starts again, so follow it from the start; ids keep the
            // replay from applying anything twice.
            tracing::warn!(
                head,
                after,
                "the bus is behind this projection (restarted with an empty log?); following it from earliest"
            );
            drop(subscription);
            self.db.call(reset_position).await?;
            after = 0;
            subscription = client
                .subscribe_with(PATTERN, SubscribeOptions::new().start(Start::Earliest))
                .await?;
        }
        self.progress.resumed_after.store(after, Ordering::Relaxed);
        self.progress.last_sequence.store(after, Ordering::Relaxed);
        self.progress.caught_up.store(false, Ordering::Relaxed);
        tracing::info!(
            after,
            head = subscription.subscribed().head_sequence,
            "projection following the bus"
        );

        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                item = subscription.next() => item,
            };
            let mut events = Vec::new();
            let mut next = first;
            loop {
                match next {
                    None => anyhow::bail!("the subscription ended"),
                    Some(Err(error)) => return Err(error.into()),
                    Some(Ok(SubscriptionItem::Event(event))) => events.push(event),
                    Some(Ok(SubscriptionItem::CaughtUp { sequence })) => {
                        self.apply(std::mem::take(&mut events)).await?;
                        self.progress.caught_up.store(true, Ordering::Relaxed);
                        tracing::info!(
                            sequence,
                            last_applied = self.last_sequence(),
                            "projection caught up"
                        );
                    }
                    Some(Ok(SubscriptionItem::Resumed { .. })) => {
                        // The SDK resubscribed after a broken stream. Go through `follow`
                        // again, which checks the bus did not lose its log meanwhile.
                        self.apply(events).await?;
                        anyhow::bail!("the subscription stream broke");
                    }
                    Some(Ok(SubscriptionItem::BusReset { last_seen, head })) => {
                        // The bus came back without its log and numbers from 1 again: what
                        // was applied stays (ids keep a replay from applying it twice), the
                        // position starts over with the new log.
                        self.apply(std::mem::take(&mut events)).await?;
                        tracing::warn!(
                            last_seen,
                            head,
                            "the bus restarted without its log; following it from earliest"
                        );
                        self.db.call(reset_position).await?;
                        anyhow::bail!("the bus restarted without its log");
                    }
                    Some(Ok(SubscriptionItem::Gap { from, to })) => {
                        tracing::warn!(
                            from,
                            to,
                            "events were gone from the bus before the projection read them"
                        );
                    }
                    Some(Ok(_)) => {}
                }
                if events.len() >= BATCH {
                    break;
                }
                match subscription.next().now_or_never() {
                    Some(item) => next = item,
                    None => break,
                }
            }
            self.apply(events).await?;
        }
    }

    /// Applies a batch in one transaction with the position.
    async fn apply(&self, events: Vec<pb::Event>) -> anyhow::Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let applied = self.db.call(move |conn| apply_batch(conn, &events)).await?;
        if applied.last_sequence > 0 {
            self.progress
                .last_sequence
                .store(applied.last_sequence, Ordering::Relaxed);
        }
        self.progress
            .applied_since_start
            .fetch_add(applied.applied, Ordering::Relaxed);
        tracing::debug!(?applied, "projection applied a batch");
        Ok(())
    }

    /// The answer of `GET /users/{id}/products` from the read model alone; `None` for an
    /// unknown user.
    pub async fn user_products(&self, user_id: i64) -> anyhow::Result<Option<UserProducts>> {
        self.db.call(move |conn| user_products(conn, user_id)).await
    }

    /// Where the projection is; asks the bus for its head (briefly).
    pub async fn status(&self, client: &Client) -> anyhow::Result<Status> {
        let counts = self
            .db
            .call(|conn| {
                let count = |table: &str| -> rusqlite::Result<i64> {
                    conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
                };
                let events: i64 = conn.query_row(
                    "SELECT events_applied FROM position WHERE id = 1",
                    [],
                    |r| r.get(0),
                )?;
                Ok((
                    count("users")?,
                    count("products")?,
                    count("orders")?,
                    events,
                ))
            })
            .await?;
        let head = tokio::time::timeout(Duration::from_secs(1), client.list_topics(None))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|topics| {
                topics
                    .iter()
                    .filter(|t| is_followed(&t.name))
                    .map(|t| t.last_sequence)
                    .max()
                    .unwrap_or(0)
            });
        let last = self.last_sequence();
        Ok(Status {
            mode: "projection",
            last_applied_sequence: last,
            bus_head: head,
            lag: head.map(|head| head.saturating_sub(last)),
            caught_up: self.progress.caught_up.load(Ordering::Relaxed),
            resumed_after: self.progress.resumed_after.load(Ordering::Relaxed),
            applied_since_start: self.progress.applied_since_start.load(Ordering::Relaxed),
            events_applied: counts.3 as u64,
            users: counts.0,
            products: counts.1,
            orders: counts.2,
        })
    }
}

/// The projection's schema.
pub fn schema() -> &'static str {
    SCHEMA
}

fn is_followed(topic: &str) -> bool {
    [
        topics::USER_CREATED,
        topics::PRODUCT_CREATED,
        topics::ORDER_CREATED,
    ]
    .contains(&topic)
}

fn last_sequence(conn: &mut Connection) -> anyhow::Result<u64> {
    let last: i64 = conn.query_row("SELECT last_sequence FROM position WHERE id = 1", [], |r| {
        r.get(0)
    })?;
    Ok(last as u64)
}

fn reset_position(conn: &mut Connection) -> anyhow::Result<()> {
    conn.execute("UPDATE position SET last_sequence = 0 WHERE id = 1", [])?;
    Ok(())
}

/// Applies events in one transaction: skips those at or below the stored position (already
/// applied) and those whose id was applied before (a change published twice); moves the
/// position to the last one.
fn apply_batch(conn: &mut Connection, events: &[pb::Event]) -> anyhow::Result<Applied> {
    let tx = conn.transaction()?;
    let mut last: u64 =
        tx.query_row("SELECT last_sequence FROM position WHERE id = 1", [], |r| {
            r.get::<_, i64>(0)
        })? as u64;
    let mut outcome = Applied::default();
    for event in events {
        if event.sequence <= last {
            outcome.duplicates += 1;
            continue;
        }
        last = event.sequence;
        let new = tx.execute(
            "INSERT OR IGNORE INTO applied_events (event_id, sequence) VALUES (?1, ?2)",
            params![event.id, event.sequence as i64],
        )? == 1;
        if !new {
            outcome.duplicates += 1;
            continue;
        }
        if let Err(error) = apply_one(&tx, event) {
            // A malformed event must not stop the projection for good: log it and go on.
            tracing::warn!(
                topic = %event.topic, id = %event.id, sequence = event.sequence,
                correlation_id = %event.correlation_id,
                error = format!("{error:#}"), "skipping an event that cannot be applied"
            );
        }
        outcome.applied += 1;
    }
    tx.execute(
        "UPDATE position SET last_sequence = ?1, events_applied = events_applied + ?2 WHERE id = 1",
        params![last as i64, outcome.applied as i64],
    )?;
    tx.commit()?;
    outcome.last_sequence = last;
    Ok(outcome)
}

fn apply_one(conn: &Connection, event: &pb::Event) -> anyhow::Result<()> {
    match event.topic.as_str() {
        topics::USER_CREATED => {
            let user: User = serde_json::from_slice(&event.data)?;
            conn.execute(
                "INSERT OR REPLACE INTO users (id, name, email, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![user.id, user.name, user.email, user.created_at],
            )?;
        }
        topics::PRODUCT_CREATED => {
            let product: Product = serde_json::from_slice(&event.data)?;
            conn.execute(
                "INSERT OR REPLACE INTO products (id, name, price_cents, created_at)
                 VALUES (?1, ?2, ?3, ?4)",
                params![
                    product.id,
                    product.name,
                    product.price_cents,
                    product.created_at
                ],
            )?;
        }
        topics::ORDER_CREATED => {
            let order: Order = serde_json::from_slice(&event.data)?;
            conn.execute(
                "INSERT OR REPLACE INTO orders (id, user_id, created_at) VALUES (?1, ?2, ?3)",
                params![order.id, order.user_id, order.created_at],
            )?;
            conn.execute("DELETE FROM order_items WHERE order_id = ?1", [order.id])?;
            for item in &order.items {
                conn.execute(
                    "INSERT INTO order_items (order_id, product_id, quantity) VALUES (?1, ?2, ?3)",
                    params![order.id, item.product_id, item.quantity],
                )?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn user_products(conn: &mut Connection, user_id: i64) -> anyhow::Result<Option<UserProducts>> {
    let user = conn
        .query_row(
            "SELECT id, name, email, created_at FROM users WHERE id = ?1",
            [user_id],
            |row| {
                Ok(User {
                    id: row.get(0)?,
                    name: row.get(1)?,
                    email: row.get(2)?,
                    created_at: row.get(3)?,
                })
            },
        )
        .optional()?;
    let Some(user) = user else {
        return Ok(None);
    };
    let mut statement = conn.prepare_cached(
        "SELECT i.product_id, SUM(i.quantity), COUNT(*), MAX(o.created_at),
                p.name, p.price_cents, p.created_at
         FROM orders o
         JOIN order_items i ON i.order_id = o.id
         LEFT JOIN products p ON p.id = i.product_id
         WHERE o.user_id = ?1
         GROUP BY i.product_id
         ORDER BY i.product_id",
    )?;
    let mut products = Vec::new();
    let mut missing = Vec::new();
    let mut rows = statement.query([user_id])?;
    while let Some(row) = rows.next()? {
        let id: i64 = row.get(0)?;
        match row.get::<_, Option<String>>(4)? {
            Some(name) => products.push(OrderedProduct {
                product: Product {
                    id,
                    name,
                    price_cents: row.get(5)?,
                    created_at: row.get(6)?,
                },
                quantity: row.get(1)?,
                orders: row.get(2)?,
                last_ordered_at: row.get(3)?,
            }),
            None => missing.push(id),
        }
    }
    Ok(Some(UserProducts {
        mode: "projection".into(),
        user,
        products,
        missing_product_ids: missing,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sequence: u64, id: &str, topic: &str, data: serde_json::Value) -> pb::Event {
        pb::Event {
            sequence,
            id: id.into(),
            topic: topic.into(),
            data: serde_json::to_vec(&data).unwrap().into(),
            ..Default::default()
        }
    }

    #[test]
    fn applies_once_by_sequence_and_by_id() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let user = serde_json::json!({"id": 7, "name": "Ada", "email": "a@x", "created_at": "2025-01-01T00:00:00Z"});
        let order = serde_json::json!({"id": 1, "user_id": 7, "created_at": "2025-02-01T00:00:00Z",
            "items": [{"product_id": 3, "quantity": 2}]});
        let batch = vec![
            event(5, "user-7-created", "user.created", user.clone()),
            event(9, "order-1-created", "order.created", order),
        ];
        let first = apply_batch(&mut conn, &batch).unwrap();
        assert_eq!((first.applied, first.last_sequence), (2, 9));
        // The same events again (a replay) change nothing.
        let again = apply_batch(&mut conn, &batch).unwrap();
        assert_eq!(
            (again.applied, again.duplicates, again.last_sequence),
            (0, 2, 9)
        );
        // The same change under a new sequence (republished by an outbox): skipped by id.
        let republished = apply_batch(
            &mut conn,
            &[event(12, "user-7-created", "user.created", user)],
        )
        .unwrap();
        assert_eq!((republished.applied, republished.last_sequence), (0, 12));

        let view = user_products(&mut conn, 7).unwrap().unwrap();
        assert_eq!(view.missing_product_ids, vec![3]);
        assert!(user_products(&mut conn, 8).unwrap().is_none());
        assert_eq!(last_sequence(&mut conn).unwrap(), 12);
    }
}
