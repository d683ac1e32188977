//! The transactional outbox: how a service publishes an event for every change to its data
//! exactly once, its seed data included.
//!
//! A change and its event are written in one SQLite transaction ([`add`]): the event row cannot
//! exist without the change, nor the change without the event. A background task
//! ([`Outbox::run`]) publishes pending rows in order and marks them published with the bus's
//! sequence. So:
//! - a restart publishes nothing again (the rows are marked), which is why the seed data is
//!   published once across restarts;
//! - a crash (or a broken connection) after the bus stored a batch but before the rows were
//!   marked publishes those rows again on the next drain, **with the same event ids**: an event
//!   may reach the bus twice, never zero times, and consumers deduplicate by `id`.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use eventbus_client::pb;
use eventbus_client::{Backoff, Client, JSON_CONTENT_TYPE};
use rusqlite::{params, Connection};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::db::Db;

/// The outbox table; part of every publishing service's schema.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS outbox (
    position INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL UNIQUE,
    topic TEXT NOT NULL,
    data BLOB NOT NULL,
    correlation_id TEXT NOT NULL DEFAULT '',
    causation_id TEXT NOT NULL DEFAULT '',
    -- the bus's sequence once published; NULL while pending
    published_sequence INTEGER
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (position) WHERE published_sequence IS NULL;
";

/// Most events published in one batch.
const BATCH: usize = 500;

/// A change event waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEvent {
    /// Stable id of the change (e.g. `user-7-created`), so consumers can deduplicate.
    pub id: String,
    pub topic: String,
    /// JSON.
    pub data: Vec<u8>,
    /// The request that caused the change, if any.
    pub correlation_id: String,
    pub causation_id: String,
}

impl OutboxEvent {
    /// A change event with `value` as JSON data and no causing request.
    pub fn json<T: serde::Serialize>(id: String, topic: &str, value: &T) -> OutboxEvent {
        OutboxEvent {
            id,
            topic: topic.to_string(),
            data: serde_json::to_vec(value).expect("payloads serialize"),
            correlation_id: String::new(),
            causation_id: String::new(),
        }
    }

    /// The event as published by `source`: `type` = topic, JSON content.
    pub fn to_pb(&self, source: &str) -> pb::Event {
        pb::Event {
            id: self.id.clone(),
            source: source.to_string(),
            r#type: self.topic.clone(),
            topic: self.topic.clone(),
            data_content_type: JSON_CONTENT_TYPE.to_string(),
            data: self.data.clone().into(),
            correlation_id: self.correlation_id.clone(),
            causation_id: self.causation_id.clone(),
            ..Default::default()
        }
    }
}

/// Adds an event to the outbox; call it inside the transaction that makes the change. An id
/// already there is left alone (the change was recorded before).
pub fn add(conn: &Connection, event: &OutboxEvent) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT OR IGNORE INTO outbox (event_id, topic, data, correlation_id, causation_id)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            event.id,
            event.topic,
            event.data,
            event.correlation_id,
            event.causation_id
        ],
    )?;
    Ok(())
}

/// The oldest pending events, with their positions.
pub fn pending(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<(i64, OutboxEvent)>> {
    let mut statement = conn.prepare_cached(
        "SELECT position, event_id, topic, data, correlation_id, causation_id FROM outbox
         WHERE published_sequence IS NULL ORDER BY position LIMIT ?1",
    )?;
    let rows = statement.query_map([limit as i64], |row| {
        Ok((
            row.get(0)?,
            OutboxEvent {
                id: row.get(1)?,
                topic: row.get(2)?,
                data: row.get(3)?,
                correlation_id: row.get(4)?,
                causation_id: row.get(5)?,
            },
        ))
    })?;
    rows.collect()
}

/// How many events are still to be published.
pub fn pending_count(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT COUNT(*) FROM outbox WHERE published_sequence IS NULL",
        [],
        |row| row.get(0),
    )
}

/// Publishes a service's outbox; one per service process.
#[derive(Debug, Clone)]
pub struct Outbox {
    db: Db,
    source: String,
    wake: Arc<Notify>,
}

impl Outbox {
    /// The outbox of the service `source` in `db` (whose schema includes [`SCHEMA`]).
    pub fn new(db: Db, source: impl Into<String>) -> Outbox {
        Outbox {
            db,
            source: source.into(),
            wake: Arc::new(Notify::new()),
        }
    }

    /// Tells the running outbox that a transaction added events.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Publishes every pending event, in order, in batches, marking each batch published with
    /// its sequences; returns how many were published. On an error the unmarked rows stay
    /// pending (and are published again, with the same ids, by the next drain).
    pub async fn drain<P, F, E>(&self, mut publish: P) -> anyhow::Result<usize>
    where
        P: FnMut(Vec<pb::Event>) -> F,
        F: Future<Output = Result<Vec<u64>, E>>,
        E: std::error::Error + Send + Sync + 'static,
    {
        let mut published = 0;
        loop {
            let batch = self.db.call(|conn| Ok(pending(conn, BATCH)?)).await?;
            if batch.is_empty() {
                return Ok(published);
            }
            let events = batch.iter().map(|(_, e)| e.to_pb(&self.source)).collect();
            let sequences = publish(events).await.context("publishing outbox events")?;
            let marks: Vec<(i64, u64)> = batch.iter().map(|(p, _)| *p).zip(sequences).collect();
            published += marks.len();
            self.db
                .call(move |conn| {
                    let tx = conn.transaction()?;
                    {
                        let mut mark = tx.prepare_cached(
                            "UPDATE outbox SET published_sequence = ?2 WHERE position = ?1",
                        )?;
                        for (position, sequence) in &marks {
                            mark.execute(params![position, *sequence as i64])?;
                        }
                    }
                    tx.commit()?;
                    Ok(())
                })
                .await?;
        }
    }

    /// Publishes pending events through `client` until `shutdown`: at start (whatever an earlier
    /// run left), whenever [`Outbox::wake`] is called, and again with backoff while the bus is
    /// unreachable.
    pub async fn run(self, client: Client, shutdown: CancellationToken) {
        let backoff = Backoff::default();
        let mut failures = 0;
        loop {
            match self
                .drain(|events| {
                    let client = client.clone();
                    async move { client.publish_batch(events).await }
                })
                .await
            {
                Ok(published) => {
                    failures = 0;
                    tracing::info!(published, "outbox drained");
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
                Err(error) => {
                    let delay = backoff.delay(failures);
                    failures = failures.saturating_add(1);
                    tracing::warn!(error = format!("{error:#}"), retry_in = ?delay, "outbox not drained");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.cancelled() => return,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("connection lost")]
    struct Lost;

    async fn outbox_with(events: &[&str]) -> (Outbox, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("svc.db"), SCHEMA).unwrap();
        let ids: Vec<String> = events.iter().map(|s| s.to_string()).collect();
        db.call(move |conn| {
            let tx = conn.transaction()?;
            for id in &ids {
                add(&tx, &OutboxEvent::json(id.clone(), "user.created", &id))?;
            }
            tx.commit()?;
            Ok(())
        })
        .await
        .unwrap();
        (Outbox::new(db, "svc"), dir)
    }

    #[tokio::test]
    async fn a_drained_outbox_publishes_nothing_again() {
        let (outbox, _dir) = outbox_with(&["user-1-created", "user-2-created"]).await;
        let seen = Mutex::new(Vec::new());
        let publish = |events: Vec<pb::Event>| {
            let n = events.len() as u64;
            seen.lock()
                .unwrap()
                .extend(events.into_iter().map(|e| e.id));
            async move { Ok::<_, Lost>((1..=n).collect()) }
        };
        assert_eq!(outbox.drain(publish).await.unwrap(), 2);
        assert_eq!(outbox.drain(publish).await.unwrap(), 0);
        assert_eq!(
            *seen.lock().unwrap(),
            vec!["user-1-created", "user-2-created"]
        );
        // Adding the same change again (e.g. seeding twice) does not queue it again.
        outbox
            .db
            .call(|conn| {
                add(
                    conn,
                    &OutboxEvent::json("user-1-created".into(), "user.created", &1),
                )?;
                Ok(pending_count(conn)?)
            })
            .await
            .map(|pending| assert_eq!(pending, 0))
            .unwrap();
    }

    #[tokio::test]
    async fn a_failure_after_the_bus_stored_republishes_with_the_same_ids() {
        let (outbox, _dir) = outbox_with(&["order-1-created", "order-2-created"]).await;
        let seen = Mutex::new(Vec::new());
        // The bus stores the batch but the answer is lost: the rows stay pending.
        let lost = |events: Vec<pb::Event>| {
            seen.lock()
                .unwrap()
                .extend(events.into_iter().map(|e| e.id));
            async { Err::<Vec<u64>, _>(Lost) }
        };
        assert!(outbox.drain(lost).await.is_err());
        let ok = |events: Vec<pb::Event>| {
            let n = events.len() as u64;
            seen.lock()
                .unwrap()
                .extend(events.into_iter().map(|e| e.id));
            async move { Ok::<_, Lost>((10..10 + n).collect()) }
        };
        assert_eq!(outbox.drain(ok).await.unwrap(), 2);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                "order-1-created",
                "order-2-created",
                "order-1-created",
                "order-2-created"
            ]
        );
    }

    #[test]
    fn events_carry_the_protocol_fields() {
        let event = OutboxEvent::json("user-7-created".into(), "user.created", &7).to_pb("users");
        assert_eq!(event.id, "user-7-created");
        assert_eq!(event.r#type, "user.created");
        assert_eq!(event.topic, "user.created");
        assert_eq!(event.source, "users");
        assert_eq!(event.data_content_type, JSON_CONTENT_TYPE);
    }
}
