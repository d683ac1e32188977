//! Idempotent publish: remembers which (source, id) pairs were published recently, so a producer
//! that retries a publish whose answer it never got (a timeout, a broken stream) does not store
//! the event twice. The window is bounded in time and in entries, so memory stays bounded under
//! any publish rate; a retry older than the window is stored again, which the docs say.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// (source, id) of an event.
type Key = (Arc<str>, Box<str>);

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
    pub fn get(&self, source: &Arc<str>, id: &str) -> Option<u64> {
        if !self.is_enabled() {
            return None;
        }
        // The map is keyed by owned pairs; a borrowed lookup would need a custom key type, and
        // this clone is one refcount increment plus a short string copy.
        self.sequences
            .get(&(source.clone(), Box::from(id)))
            .copied()
    }

    /// Remembers a published event, and forgets what has fallen out of the window.
    pub fn insert(&mut self, source: &Arc<str>, id: &str, sequence: u64, published: SystemTime) {
        if !self.is_enabled() {
            return;
        }
        let key: Key = (source.clone(), Box::from(id));
        self.sequences.insert(key.clone(), sequence);
        self.order.push_back((published, key));
        self.expire(published);
    }

    fn expire(&mut self, now: SystemTime) {
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
    pub fresh: Vec<crate::event::Event>,
    slots: Vec<Slot>,
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
    /// to store.
    pub fn split(&self, events: Vec<crate::event::Event>) -> SplitBatch {
        if !self.is_enabled() {
            return SplitBatch {
                slots: (0..events.len()).map(Slot::Fresh).collect(),
                fresh: events,
            };
        }
        let mut fresh = Vec::with_capacity(events.len());
        let mut slots = Vec::with_capacity(events.len());
        let mut in_batch: HashMap<(Arc<str>, String), usize> = HashMap::new();
        for event in events {
            if let Some(sequence) = self.get(&event.source, &event.id) {
                slots.push(Slot::Earlier(sequence));
                continue;
            }
            let key = (event.source.clone(), event.id.clone());
            if let Some(index) = in_batch.get(&key) {
                slots.push(Slot::InBatch(*index));
                continue;
            }
            in_batch.insert(key, fresh.len());
            slots.push(Slot::Fresh(fresh.len()));
            fresh.push(event);
        }
        SplitBatch { fresh, slots }
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

    #[test]
    fn a_zero_window_is_off() {
        let source: Arc<str> = Arc::from("svc");
        let mut window = DedupeWindow::new(Duration::ZERO, 100);
        window.insert(&source, "a", 1, SystemTime::now());
        assert_eq!(window.get(&source, "a"), None);
        assert!(window.is_empty());
    }
}
