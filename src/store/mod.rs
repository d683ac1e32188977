//! Storage of the bus log behind one trait, so the broker does not care whether events live in
//! memory, in segment files on disk, or in a cluster.
//!
//! The log has one global sequence: the store assigns consecutive sequences on append. Appends
//! are serialized by the broker (it calls [`Store::append`] under its routing lock, which is what
//! makes delivery order equal log order); reads may run concurrently with them.

pub mod codec;
pub mod file;
pub mod jetstream;
mod memory;
#[cfg(test)]
pub(crate) mod test_store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use file::{FileStore, FileStoreConfig, FsyncPolicy};
pub use jetstream::{
    Appended, JetStreamConfig, JetStreamStore, PeerError, PeerNode, PeerRequest, SharedLog,
};
pub use memory::MemoryStore;

use crate::event::{Event, SharedEvent};

/// What a store can fail with. The in-memory store cannot fail; durable ones will.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A record that recovery cannot read, where it cannot be a torn final write.
    #[error(
        "corrupt log file {} at offset {offset}: {reason} (run `eventbus repair --data-dir DIR` \
         to move the damaged part aside)",
        path.display()
    )]
    Corrupt {
        path: std::path::PathBuf,
        offset: u64,
        reason: String,
    },
    /// A file recovery relies on besides the log (the log's identity, group cursors) that
    /// cannot be used as it is.
    #[error(
        "{}: {reason} (run `eventbus repair --data-dir DIR` with the bus stopped: it sets the \
         file aside and says what it did)",
        path.display()
    )]
    Metadata {
        path: std::path::PathBuf,
        reason: String,
    },
    /// The store can no longer guarantee durability and refuses writes.
    #[error("storage failed: {0}")]
    Failed(String),
    /// Another process (or another open store in this one) holds the data directory: two
    /// writers would corrupt each other's log.
    #[error(
        "data directory {} is in use by another eventbus process ({}): one process at a time \
         may use it; stop that one or give this one another --data-dir",
        dir.display(),
        file::describe_holder(holder)
    )]
    Locked {
        dir: std::path::PathBuf,
        /// The holder's pid as it wrote it into `<dir>/LOCK`, if readable.
        holder: Option<u32>,
    },
}

/// The sequences a store holds. Sequences start at 1; 0 means "none".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogBounds {
    /// The oldest sequence still held, or `None` when nothing is held.
    pub oldest: Option<u64>,
    /// The last sequence ever assigned (0 before the first append). Held or not.
    pub head: u64,
    /// When the newest event that retention dropped was published, `None` while nothing was
    /// dropped: a `from_time` at or before it asks for events that are gone.
    pub newest_dropped_time: Option<SystemTime>,
}

impl LogBounds {
    /// The oldest sequence a reader can still get: the oldest held, or the next to be assigned.
    pub fn first_available(&self) -> u64 {
        self.oldest.unwrap_or(self.head + 1)
    }
}

/// Per topic family (see [`crate::topic::Topic::family`]): how many events are held.
pub type HeldCounts = hashbrown::HashMap<String, u64>;

/// Counts one more event of `family` (allocating the key only the first time: this runs for
/// every appended event).
pub(crate) fn count_family(counts: &mut HeldCounts, family: &str) {
    *counts.entry_ref(family).or_insert(0) += 1;
}

/// Age retention as the clock judges it. Both stores hide an event from every read once it is
/// older than the max age by the clock *when read*, not only when something is appended (a
/// quiet log would otherwise keep serving events past their age); physically dropping them is
/// [`Store::expire`]'s job. The cutoff never moves back, so a wall clock stepping back does not
/// bring hidden events back.
#[derive(Debug)]
pub(crate) struct AgeCutoff {
    max_age: Option<Duration>,
    /// The highest cutoff used so far, in nanoseconds since the epoch.
    highest: AtomicU64,
}

impl AgeCutoff {
    pub(crate) fn new(max_age: Option<Duration>) -> AgeCutoff {
        AgeCutoff {
            max_age,
            highest: AtomicU64::new(0),
        }
    }

    /// Events published before the returned time are expired at `now`; `None` without age
    /// retention.
    pub(crate) fn at(&self, now: SystemTime) -> Option<SystemTime> {
        let max_age = self.max_age?;
        let cutoff = now
            .checked_sub(max_age)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos().min(u64::MAX as u128) as u64);
        let highest = self
            .highest
            .fetch_max(cutoff, Ordering::Relaxed)
            .max(cutoff);
        Some(UNIX_EPOCH + Duration::from_nanos(highest))
    }
}

/// The bus log.
///
/// Every read (`read_after`, `first_sequence_at_or_after`, `bounds`, `held_counts`) sees only
/// events retention still holds, age judged by the clock at the time of the read; events hidden
/// that way count as dropped in [`LogBounds::newest_dropped_time`], so a replay that loses them
/// sees the gap.
pub trait Store: Send + Sync + 'static {
    /// Appends the events in order, assigning each the next sequence and the publish time
    /// `now`, and applies retention. All or nothing.
    fn append(&self, events: Vec<Event>, now: SystemTime) -> Result<Vec<SharedEvent>, StoreError>;

    /// Up to `max` held events with a sequence greater than `after`, in order.
    fn read_after(&self, after: u64, max: usize) -> Result<Vec<SharedEvent>, StoreError>;

    /// As [`Store::read_after`], and also stops before the events read would hold more than
    /// `max_bytes` (as [`crate::event::StoredEvent::held_bytes`] counts them), though it always
    /// returns the first event, however large. Replays and group read-aheads read this way, so
    /// what one reader holds at a time is bounded in bytes, not only in events. The default reads
    /// `max` events and cuts the rest; stores that materialize events as they read (the file
    /// store) stop reading at the limit instead.
    fn read_after_within(
        &self,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<SharedEvent>, StoreError> {
        let mut events = self.read_after(after, max)?;
        let mut within = WithinBytes::new(max_bytes);
        let keep = events
            .iter()
            .take_while(|event| within.admits(event))
            .count();
        events.truncate(keep);
        Ok(events)
    }

    /// The first held sequence published at or after `time`, or `None` if there is none yet.
    fn first_sequence_at_or_after(&self, time: SystemTime) -> Result<Option<u64>, StoreError>;

    /// What is held now.
    fn bounds(&self) -> LogBounds;

    /// How many events of each topic family are held now.
    fn held_counts(&self) -> HeldCounts;

    /// Applies age retention physically as of `now`: the memory store drops expired events, the
    /// file store deletes whole segments whose newest event is older than the max age (never
    /// the active segment). Reads hide expired events whether or not this runs; it frees their
    /// memory or disk, and is meant to be called periodically. The default (stores without age
    /// retention) does nothing.
    ///
    /// # Errors
    /// [`StoreError::Io`] if a segment cannot be deleted (it stays, whole, and is tried again).
    fn expire(&self, now: SystemTime) -> Result<(), StoreError> {
        let _ = now;
        Ok(())
    }

    /// The last sequence that is durable, for stores whose appends become durable after
    /// [`Store::append`] returns (group commit). `None`: every append is final when it returns.
    fn durable_head(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// The store's health: `Some(reason)` once it has failed (an fsync failed, or a write could
    /// not be undone) and refuses every append with [`StoreError::Failed`] until the process
    /// restarts and recovery runs; `None` while it takes writes. It is what a server should
    /// report as NOT_SERVING. A write refused for a passing cause (a full disk, no free inode for
    /// the next segment) is returned as an error with nothing of its batch stored, and does
    /// not fail the store.
    fn durability_error(&self) -> Option<String> {
        None
    }

    /// `Some(reason)` while writes are being refused for a passing cause (a full disk, no free
    /// inode for the next segment): the store is not failed, and takes writes again once the
    /// cause is gone, which it notices by itself (the next successful append, or a look at the
    /// free space). A server reports it as NOT_SERVING, as it does a failure, so clients and
    /// load balancers move away until it clears.
    fn write_blocked(&self) -> Option<String> {
        None
    }

    /// Identifies this log: the same across restarts of a durable store, new whenever the log
    /// starts over (every start of a memory store), so a client can tell sequences began again.
    fn log_id(&self) -> &str;

    /// What kind of store this is, as `--storage` names it (`memory`, `file`, `jetstream`),
    /// for `GetServerInfo`.
    fn kind(&self) -> &'static str {
        "other"
    }

    /// The saved cursors of MANUAL-ack consumer groups, by group name.
    fn load_group_cursors(&self) -> Result<HashMap<String, GroupCursor>, StoreError>;

    /// Saves one group's cursor (durably, for a durable store).
    fn save_group_cursor(&self, group: &str, cursor: &GroupCursor) -> Result<(), StoreError>;

    /// What the store occupies now, for metrics. The default knows only the events held (from
    /// [`Store::bounds`]); stores that know their bytes and files report them.
    fn usage(&self) -> StoreUsage {
        let bounds = self.bounds();
        StoreUsage {
            events: bounds.oldest.map_or(0, |oldest| bounds.head + 1 - oldest),
            ..StoreUsage::default()
        }
    }
}

/// See [`Store::usage`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreUsage {
    /// Events held (expired ones not yet freed included).
    pub events: u64,
    /// Bytes held: the segment files on disk, or the events in memory as retention counts them.
    pub bytes: u64,
    /// Segment files (0 for a store without files).
    pub segments: u64,
}

/// Counts the bytes of a read against its limit: admits events while their
/// [`crate::event::StoredEvent::held_bytes`] sum stays within it, and always the first.
#[derive(Debug)]
pub(crate) struct WithinBytes {
    left: usize,
    first: bool,
}

impl WithinBytes {
    pub(crate) fn new(max_bytes: usize) -> WithinBytes {
        WithinBytes {
            left: max_bytes,
            first: true,
        }
    }

    /// Whether `event` still fits; counts it if so.
    pub(crate) fn admits(&mut self, event: &crate::event::StoredEvent) -> bool {
        let size = event.held_bytes();
        if std::mem::take(&mut self.first) || size <= self.left {
            self.left = self.left.saturating_sub(size);
            true
        } else {
            self.left = 0;
            false
        }
    }
}

/// Where a MANUAL-ack consumer group is in the log: every event up to `cursor` is acked or
/// dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupCursor {
    /// The pattern the group reads: a group keeps one.
    pub pattern: String,
    pub cursor: u64,
    /// A group created with a `from_time` start: events published before it are never
    /// delivered to the group, even after a restart (absent in files written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<SystemTime>,
}
