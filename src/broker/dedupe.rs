//! Idempotent publish: remembers which (source, id) pairs were published recently, so a producer
//! that retries a publish whose answer it never got (a timeout, a broken stream) does not store
//! the event twice. The window is bounded in time and in entries, so memory stays bounded under
//! any publish rate; a retry older than the window is stored again, which the docs say.

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hashbrown::{Equivalent, HashMap};

use crate::event::Event;

/// (source, id) of a remembered event. Both halves are shared, so the expiry queue's copy of a
/// key costs two reference counts, not a string copy. hashbrown's default hasher (foldhash,
/// seeded per process) replaces SipHash, which was the largest single cost of a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Key {
    source: Arc<str>,
    id: Arc<str>,
}

/// A (source, id) pair borrowed from an event, to look a key up without building one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KeyRef<'a> {
    source: &'a str,
    id: &'a str,
}

// `Key` and `KeyRef` must hash alike for borrowed lookups to find owned keys.
impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        KeyRef::from(self).hash(state);
    }
}

impl Hash for KeyRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.source.hash(state);
        self.id.hash(state);
    }
}

impl<'a> From<&'a Key> for KeyRef<'a> {
    fn from(key: &'a Key) -> KeyRef<'a> {
        KeyRef {
            source: &key.source,
            id: &key.id,
        }
    }
}

impl<'a> From<&'a Event> for KeyRef<'a> {
    fn from(event: &'a Event) -> KeyRef<'a> {
        KeyRef {
            source: &event.source,
            id: &event.id,
        }
    }
}

impl Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        *self == KeyRef::from(key)
    }
}

#[derive(Debug)]
pub struct DedupeWindow {
    window: Duration,
    max_entries: usize,
    sequences: HashMap<Key, u64>,
    /// Insertion order, for expiry: (publish time, key).
    order: VecDeque<(SystemTime, Key)>,
}

impl DedupeWindow {
    /// A window of `window` (zero turns deduplication off) holding at most `max_entries`.
    pub fn new(window: Duration, max_entries: usize) -> DedupeWindow {
        DedupeWindow {
            window,
            max_entries,
            sequences: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub fn is_enabled(&self) -> bool {
        !self.window.is_zero() && self.max_entries > 0
    }

    /// The sequence an event with this source and id was published at, if within the window.
    #[cfg(test)]
    fn get(&self, source: &str, id: &str) -> Option<u64> {
        if !self.is_enabled() {
            return None;
        }
        self.sequences.get(&KeyRef { source, id }).copied()
    }

    /// Remembers a published event, and forgets what has fallen out of the window.
    pub fn insert(&mut self, source: &Arc<str>, id: &str, sequence: u64, published: SystemTime) {
        if !self.is_enabled() {
            return;
        }
        let key = Key {
            source: source.clone(),
            id: Arc::from(id),
        };
        self.sequences.insert(key.clone(), sequence);
        self.order.push_back((published, key));
        self.expire(published);
    }

    /// Remembers the fresh events of `batch` that the producer gave an id (see
    /// [`DedupeWindow::split`]), now stored as `stored`.
    pub fn remember(&mut self, batch: &SplitBatch, stored: &[crate::event::SharedEvent]) {
        for (event, &remember) in stored.iter().zip(&batch.remember) {
            if remember {
                self.insert(
                    &event.event.source,
                    &event.event.id,
                    event.sequence,
                    event.publish_time,
                );
            }
        }
    }

    /// Forgets every pair published before `now - window`, and the oldest past `max_entries`.
    /// Called with the wall clock before every lookup, so expiry never waits for a write.
    pub fn expire(&mut self, now: SystemTime) {
        let cutoff = now.checked_sub(self.window);
        while let Some((published, _)) = self.order.front() {
            let expired = cutoff.is_some_and(|cutoff| *published < cutoff);
            if !expired && self.order.len() <= self.max_entries {
                break;
            }
            let (_, key) = self.order.pop_front().expect("checked");
            self.sequences.remove(&key);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.sequences.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }
}

/// A batch split into the events to store and the duplicates, so the answer can be put back
/// in batch order once the fresh events have sequences.
#[derive(Debug)]
pub struct SplitBatch {
    pub fresh: Vec<Event>,
    slots: Vec<Slot>,
    /// Per fresh event: whether the producer gave its id (so a retry can repeat it). An event
    /// the bus gave an id cannot be retried with that id, so it is not remembered.
    remember: Vec<bool>,
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    /// The n-th fresh event.
    Fresh(usize),
    /// A duplicate of an event published earlier, at this sequence.
    Earlier(u64),
    /// A duplicate of the n-th fresh event of this same batch.
    InBatch(usize),
}

impl SplitBatch {
    /// The published sequences and duplicate flags, in batch order.
    pub fn resolve(&self, stored: &[crate::event::SharedEvent]) -> super::Published {
        let mut published = super::Published {
            sequences: Vec::with_capacity(self.slots.len()),
            duplicates: Vec::with_capacity(self.slots.len()),
        };
        for slot in &self.slots {
            let (sequence, duplicate) = match *slot {
                Slot::Fresh(index) => (stored[index].sequence, false),
                Slot::Earlier(sequence) => (sequence, true),
                Slot::InBatch(index) => (stored[index].sequence, true),
            };
            published.sequences.push(sequence);
            published.duplicates.push(duplicate);
        }
        published
    }
}

impl DedupeWindow {
    /// Separates the events seen within the window (or earlier in the same batch) from those
    /// to store, and gives an id (a UUIDv7) to each event that has none. Events without a
    /// producer id are never duplicates: nothing the producer sends again can name them.
    pub fn split(&self, mut events: Vec<Event>) -> SplitBatch {
        let enabled = self.is_enabled();
        let mut slots = Vec::with_capacity(events.len());
        let mut remember = Vec::with_capacity(events.len());
        let mut keep = Vec::with_capacity(events.len());
        {
            // Fresh events with a producer id seen so far in this batch, by key.
            let mut in_batch: HashMap<KeyRef<'_>, usize> = HashMap::new();
            let mut fresh = 0;
            for event in &events {
                if !enabled || event.id.is_empty() {
                    slots.push(Slot::Fresh(fresh));
                    remember.push(false);
                    keep.push(true);
                    fresh += 1;
                    continue;
                }
                let key = KeyRef::from(event);
                if let Some(sequence) = self.sequences.get(&key) {
                    slots.push(Slot::Earlier(*sequence));
                    keep.push(false);
                } else if let Some(&index) = in_batch.get(&key) {
                    slots.push(Slot::InBatch(index));
                    keep.push(false);
                } else {
                    if events.len() > 1 {
                        in_batch.insert(key, fresh);
                    }
                    slots.push(Slot::Fresh(fresh));
                    remember.push(true);
                    keep.push(true);
                    fresh += 1;
                }
            }
        }
        for event in &mut events {
            if event.id.is_empty() {
                event.id = crate::event::new_id();
            }
        }
        let mut keep = keep.into_iter();
        events.retain(|_| keep.next().expect("one flag per event"));
        SplitBatch {
            fresh: events,
            slots,
            remember,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_within_the_window_and_forgets_after() {
        let source: Arc<str> = Arc::from("svc");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut window = DedupeWindow::new(Duration::from_secs(120), 100);
        window.insert(&source, "a", 1, t0);
        assert_eq!(window.get(&source, "a"), Some(1));
        assert_eq!(window.get(&Arc::from("other"), "a"), None);
        window.insert(&source, "b", 2, t0 + Duration::from_secs(121));
        assert_eq!(window.get(&source, "a"), None);
        assert_eq!(window.get(&source, "b"), Some(2));
    }

    #[test]
    fn a_passed_window_is_passed_without_any_write() {
        // Issue: expiry ran only when a new id arrived, so a retry after the window with
        // nothing published in between was still called a duplicate.
        let source: Arc<str> = Arc::from("shop");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut window = DedupeWindow::new(Duration::from_secs(2), 100);
        window.insert(&source, "order-1", 1, t0);
        window.expire(t0 + Duration::from_secs(1));
        assert_eq!(window.split(vec![event("shop", "order-1")]).fresh.len(), 0);
        window.expire(t0 + Duration::from_secs(3));
        assert_eq!(window.split(vec![event("shop", "order-1")]).fresh.len(), 1);
        assert!(window.is_empty());
    }

    #[test]
    fn stays_within_its_entry_bound() {
        let source: Arc<str> = Arc::from("svc");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut window = DedupeWindow::new(Duration::from_secs(120), 3);
        for i in 0..10u64 {
            window.insert(&source, &i.to_string(), i, t0);
        }
        assert_eq!(window.len(), 3);
        assert_eq!(window.get(&source, "9"), Some(9));
        assert_eq!(window.get(&source, "6"), None);
    }

    fn event(source: &str, id: &str) -> Event {
        Event {
            id: id.to_owned(),
            source: Arc::from(source),
            ..Event::for_test("a.b")
        }
    }

    #[test]
    fn splits_earlier_and_in_batch_duplicates_and_gives_missing_ids() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut window = DedupeWindow::new(Duration::from_secs(120), 100);
        window.insert(&Arc::from("svc"), "old", 41, t0);
        let batch = window.split(vec![
            event("svc", "old"),
            event("svc", "new"),
            event("other", "new"),
            event("svc", "new"),
            event("svc", ""),
            event("svc", ""),
        ]);
        let fresh: Vec<(&str, &str)> = batch
            .fresh
            .iter()
            .map(|e| (&*e.source, e.id.as_str()))
            .collect();
        assert_eq!(&fresh[..2], &[("svc", "new"), ("other", "new")]);
        assert_eq!(fresh.len(), 4, "events without ids are never duplicates");
        for (_, id) in &fresh[2..] {
            assert!(uuid::Uuid::parse_str(id).is_ok(), "{id} is a given UUID");
        }
        assert_ne!(fresh[2].1, fresh[3].1);
        assert_eq!(batch.remember, [true, true, false, false]);
        let stored: Vec<crate::event::SharedEvent> = batch
            .fresh
            .iter()
            .enumerate()
            .map(|(i, e)| Arc::new(crate::event::StoredEvent::new(50 + i as u64, t0, e.clone())))
            .collect();
        let published = batch.resolve(&stored);
        assert_eq!(published.sequences, [41, 50, 51, 50, 52, 53]);
        assert_eq!(
            published.duplicates,
            [true, false, false, true, false, false]
        );
        window.remember(&batch, &stored);
        assert_eq!(window.len(), 3, "only producer ids are remembered");
        assert_eq!(window.get("other", "new"), Some(51));
    }

    #[test]
    fn a_disabled_window_still_gives_ids() {
        let window = DedupeWindow::new(Duration::ZERO, 100);
        let batch = window.split(vec![event("svc", "a"), event("svc", "a"), event("svc", "")]);
        assert_eq!(batch.fresh.len(), 3);
        assert!(!batch.fresh[2].id.is_empty());
        assert_eq!(batch.remember, [false, false, false]);
    }

    #[test]
    fn a_zero_window_is_off() {
        let source: Arc<str> = Arc::from("svc");
        let mut window = DedupeWindow::new(Duration::ZERO, 100);
        window.insert(&source, "a", 1, SystemTime::now());
        assert_eq!(window.get(&source, "a"), None);
        assert!(window.is_empty());
    }
}
