//! One SQLite database per service, used from async code.
//!
//! rusqlite is blocking, so every use runs on tokio's blocking pool ([`Db::call`]) rather than
//! on a runtime thread. One connection behind a std `Mutex` is enough here: the services' work
//! is a handful of small statements per event, and WAL mode lets other processes (a replica,
//! `sqlite3` in a terminal) read while it writes.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use rusqlite::Connection;

/// A cheap-to-clone handle to a service's database.
#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db").finish_non_exhaustive()
    }
}

impl Db {
    /// Opens (creating if needed) the database at `path` and applies `schema` (idempotent SQL:
    /// `CREATE TABLE IF NOT EXISTS ...`).
    pub fn open(path: &Path, schema: &str) -> anyhow::Result<Db> {
        if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the directory of {}", path.display()))?;
        }
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        // Replicas of a service may share its database: wait for their write locks instead of
        // failing at once.
        conn.busy_timeout(Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.execute_batch(schema)
            .with_context(|| format!("creating the schema of {}", path.display()))?;
        Ok(Db {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on the blocking pool.
    pub async fn call<F, R>(&self, f: F) -> anyhow::Result<R>
    where
        F: FnOnce(&mut Connection) -> anyhow::Result<R> + Send + 'static,
        R: Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A panic in another call poisons the lock; the connection itself is still sound
            // (SQLite rolls back an unfinished transaction when the next one begins).
            let mut conn = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            f(&mut conn)
        })
        .await
        .context("a database task panicked")?
    }
}

/// Runs `seed` once in the life of the database: inside one write transaction that also records
/// that it ran, so a restart (or a replica sharing the file) does not seed again. Returns what
/// `seed` returned, or `None` when the database was seeded before.
pub fn seed_once<T>(
    conn: &mut Connection,
    seed: impl FnOnce(&rusqlite::Transaction<'_>) -> anyhow::Result<T>,
) -> anyhow::Result<Option<T>> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    )?;
    // IMMEDIATE takes the write lock before the check, so two processes cannot both seed.
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let seeded: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM meta WHERE key = 'seeded')",
        [],
        |row| row.get(0),
    )?;
    if seeded {
        return Ok(None);
    }
    let out = seed(&tx)?;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('seeded', datetime('now'))",
        [],
    )?;
    tx.commit()?;
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.db");
        let schema = "CREATE TABLE IF NOT EXISTS t (x INTEGER)";
        for expected in [Some(1), None] {
            let db = Db::open(&path, schema).unwrap();
            let mut conn = db.conn.lock().unwrap();
            let seeded = seed_once(&mut conn, |tx| {
                tx.execute("INSERT INTO t VALUES (1)", [])?;
                Ok(1)
            })
            .unwrap();
            assert_eq!(seeded, expected);
        }
    }
}
