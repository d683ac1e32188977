//! A memory store for unit tests that need what only the file store does: appends that become
//! durable when the test says so (as at a file store's next fsync), and the failed state a file
//! store enters when a write can neither be made durable nor undone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use tokio::sync::watch;

use super::{GroupCursor, HeldCounts, LogBounds, MemoryStore, Store, StoreError};
use crate::event::{Event, SharedEvent};

/// A [`MemoryStore`] with a durable head the test moves (`None`: every append is final) and a
/// switch into the failed state.
pub struct TestStore {
    pub inner: MemoryStore,
    /// Set: `durability_error` reports an injected fsync failure and appends are refused.
    pub failed: AtomicBool,
    /// The durable head the broker waits for, sent by the test.
    pub durable: Option<watch::Receiver<u64>>,
}

impl TestStore {
    /// A store of up to 1,000 events and 1 MiB whose appends are final at once.
    pub fn new() -> TestStore {
        TestStore {
            inner: MemoryStore::new(1000, 1 << 20),
            failed: AtomicBool::new(false),
            durable: None,
        }
    }

    /// The same, whose appends are durable only up to what the returned sender says.
    pub fn held_durable() -> (TestStore, watch::Sender<u64>) {
        let (sender, durable) = watch::channel(0);
        let store = TestStore {
            durable: Some(durable),
            ..TestStore::new()
        };
        (store, sender)
    }
}

impl Store for TestStore {
    fn append(&self, events: Vec<Event>, now: SystemTime) -> Result<Vec<SharedEvent>, StoreError> {
        match self.durability_error() {
            Some(why) => Err(StoreError::Failed(why)),
            None => self.inner.append(events, now),
        }
    }
    fn read_after(&self, after: u64, max: usize) -> Result<Vec<SharedEvent>, StoreError> {
        self.inner.read_after(after, max)
    }
    fn first_sequence_at_or_after(&self, time: SystemTime) -> Result<Option<u64>, StoreError> {
        self.inner.first_sequence_at_or_after(time)
    }
    fn bounds(&self) -> LogBounds {
        self.inner.bounds()
    }
    fn held_counts(&self) -> HeldCounts {
        self.inner.held_counts()
    }
    fn durable_head(&self) -> Option<watch::Receiver<u64>> {
        self.durable.clone()
    }
    fn durability_error(&self) -> Option<String> {
        self.failed
            .load(Ordering::Acquire)
            .then(|| "fsync failed: injected".to_owned())
    }
    fn log_id(&self) -> &str {
        self.inner.log_id()
    }
    fn load_group_cursors(&self) -> Result<HashMap<String, GroupCursor>, StoreError> {
        self.inner.load_group_cursors()
    }
    fn save_group_cursor(&self, group: &str, cursor: &GroupCursor) -> Result<(), StoreError> {
        self.inner.save_group_cursor(group, cursor)
    }
}
