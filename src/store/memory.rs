//! The in-memory store: a ring of the most recent events, bounded by count, bytes and age. Age
//! is judged by the clock when read (see [`super::AgeCutoff`]): an expired event is hidden from
//! reads at once and dropped on the next append or [`Store::expire`].

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use super::{AgeCutoff, GroupCursor, HeldCounts, LogBounds, Store, StoreError, WithinBytes};
use crate::event::{Event, SharedEvent, StoredEvent};

/// Keeps the newest events up to `max_events` and `max_bytes`, dropping the oldest first.
#[derive(Debug)]
pub struct MemoryStore {
    max_events: u64,
    max_bytes: u64,
    age: AgeCutoff,
    /// A std lock: it is held only for memory operations, never across an `.await`.
    inner: RwLock<Inner>,
    log_id: String,
    group_cursors: std::sync::Mutex<HashMap<String, GroupCursor>>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Consecutive sequences: `events[i].sequence == events[0].sequence + i`.
    events: VecDeque<SharedEvent>,
    bytes: u64,
    head: u64,
    last_publish_time: Option<SystemTime>,
    newest_dropped_time: Option<SystemTime>,
    held_by_family: HeldCounts,
}

impl MemoryStore {
    pub fn new(max_events: u64, max_bytes: u64) -> MemoryStore {
        MemoryStore::with_max_age(max_events, max_bytes, None)
    }

    /// Also drops events published more than `max_age` ago: hidden from reads as soon as they
    /// are that old, dropped on the next append or [`Store::expire`].
    pub fn with_max_age(max_events: u64, max_bytes: u64, max_age: Option<Duration>) -> MemoryStore {
        MemoryStore {
            max_events,
            max_bytes,
            age: AgeCutoff::new(max_age),
            inner: RwLock::new(Inner::default()),
            log_id: uuid::Uuid::now_v7().to_string(),
            group_cursors: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the ring half-updated in a way readers
        // could misread (every mutation is a push or pop), so poisoning is ignored.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The position in the ring of the first event not expired at `now`.
    fn first_live(&self, inner: &Inner, now: SystemTime) -> usize {
        match self.age.at(now) {
            Some(cutoff) => inner.events.partition_point(|e| e.publish_time < cutoff),
            None => 0,
        }
    }

    /// [`Store::read_after`] as of `now`.
    fn read_after_at(&self, after: u64, max: usize, now: SystemTime) -> Vec<SharedEvent> {
        self.read_within_at(after, max, usize::MAX, now)
    }

    /// [`Store::read_after_within`] as of `now`.
    fn read_within_at(
        &self,
        after: u64,
        max: usize,
        max_bytes: usize,
        now: SystemTime,
    ) -> Vec<SharedEvent> {
        let inner = self.read();
        let live = self.first_live(&inner, now);
        let Some(first) = inner.events.get(live).map(|e| e.sequence) else {
            return Vec::new();
        };
        let start = after.saturating_add(1).max(first);
        let skip = (start - inner.events[0].sequence) as usize;
        let mut within = WithinBytes::new(max_bytes);
        inner
            .events
            .iter()
            .skip(skip)
            .take(max)
            .take_while(|event| within.admits(event))
            .cloned()
            .collect()
    }

    /// [`Store::first_sequence_at_or_after`] as of `now`.
    fn first_sequence_at_or_after_at(&self, time: SystemTime, now: SystemTime) -> Option<u64> {
        let inner = self.read();
        let live = self.first_live(&inner, now);
        let index = inner
            .events
            .partition_point(|e| e.publish_time < time)
            .max(live);
        inner.events.get(index).map(|e| e.sequence)
    }

    /// [`Store::bounds`] as of `now`.
    fn bounds_at(&self, now: SystemTime) -> LogBounds {
        let inner = self.read();
        let live = self.first_live(&inner, now);
        LogBounds {
            oldest: inner.events.get(live).map(|e| e.sequence),
            head: inner.head,
            newest_dropped_time: match live {
                0 => inner.newest_dropped_time,
                _ => Some(inner.events[live - 1].publish_time),
            },
        }
    }

    /// [`Store::held_counts`] as of `now`.
    fn held_counts_at(&self, now: SystemTime) -> HeldCounts {
        let inner = self.read();
        let live = self.first_live(&inner, now);
        let mut counts = inner.held_by_family.clone();
        for expired in inner.events.range(..live) {
            forget_family(&mut counts, expired.event.topic.family());
        }
        counts
    }

    /// Drops the oldest events while `drop` says so.
    fn evict(inner: &mut Inner, mut drop: impl FnMut(&Inner, &SharedEvent) -> bool) {
        while let Some(oldest) = inner.events.front() {
            if !drop(inner, oldest) {
                break;
            }
            let evicted = inner.events.pop_front().expect("checked");
            inner.bytes -= evicted.held_bytes() as u64;
            inner.newest_dropped_time = Some(evicted.publish_time);
            forget_family(&mut inner.held_by_family, evicted.event.topic.family());
        }
    }
}

/// Counts one event of `family` less.
fn forget_family(counts: &mut HeldCounts, family: &str) {
    if let Some(count) = counts.get_mut(family) {
        *count -= 1;
        if *count == 0 {
            counts.remove(family);
        }
    }
}

impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn append(&self, events: Vec<Event>, now: SystemTime) -> Result<Vec<SharedEvent>, StoreError> {
        let mut inner = self.write();
        // Publish times never go backwards, even if the wall clock does, so `from_time` can
        // binary-search the log.
        let publish_time = match inner.last_publish_time {
            Some(last) if last > now => last,
            _ => now,
        };
        inner.last_publish_time = Some(publish_time);
        let mut stored = Vec::with_capacity(events.len());
        for mut event in events {
            inner.head += 1;
            event.time.get_or_insert(publish_time);
            let shared = Arc::new(StoredEvent::new(inner.head, publish_time, event));
            inner.bytes += shared.held_bytes() as u64;
            super::count_family(&mut inner.held_by_family, shared.event.topic.family());
            inner.events.push_back(shared.clone());
            stored.push(shared);
        }
        let expired_before = self.age.at(publish_time);
        let (max_events, max_bytes) = (self.max_events, self.max_bytes);
        Self::evict(&mut inner, |inner, oldest| {
            inner.events.len() as u64 > max_events
                || inner.bytes > max_bytes
                || expired_before.is_some_and(|cutoff| oldest.publish_time < cutoff)
        });
        Ok(stored)
    }

    fn read_after(&self, after: u64, max: usize) -> Result<Vec<SharedEvent>, StoreError> {
        Ok(self.read_after_at(after, max, SystemTime::now()))
    }

    fn read_after_within(
        &self,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<SharedEvent>, StoreError> {
        Ok(self.read_within_at(after, max, max_bytes, SystemTime::now()))
    }

    fn first_sequence_at_or_after(&self, time: SystemTime) -> Result<Option<u64>, StoreError> {
        Ok(self.first_sequence_at_or_after_at(time, SystemTime::now()))
    }

    fn bounds(&self) -> LogBounds {
        self.bounds_at(SystemTime::now())
    }

    fn held_counts(&self) -> HeldCounts {
        self.held_counts_at(SystemTime::now())
    }

    fn usage(&self) -> super::StoreUsage {
        let inner = self.read();
        super::StoreUsage {
            events: inner.events.len() as u64,
            bytes: inner.bytes,
            segments: 0,
        }
    }

    fn expire(&self, now: SystemTime) -> Result<(), StoreError> {
        if let Some(cutoff) = self.age.at(now) {
            Self::evict(&mut self.write(), |_, oldest| oldest.publish_time < cutoff);
        }
        Ok(())
    }

    fn log_id(&self) -> &str {
        &self.log_id
    }

    fn load_group_cursors(&self) -> Result<HashMap<String, GroupCursor>, StoreError> {
        Ok(self
            .group_cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone())
    }

    fn save_group_cursor(&self, group: &str, cursor: &GroupCursor) -> Result<(), StoreError> {
        self.group_cursors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(group.to_owned(), cursor.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::Topic;

    fn event(topic: &str, data: &[u8]) -> Event {
        Event {
            id: "id".into(),
            source: Arc::from("test"),
            event_type: topic.into(),
            topic: Topic::parse(topic).unwrap(),
            time: None,
            data_content_type: String::new(),
            data: bytes::Bytes::copy_from_slice(data),
            attributes: HashMap::new(),
            correlation_id: String::new(),
            causation_id: String::new(),
            reply_to: None,
        }
    }

    fn sequences(events: &[SharedEvent]) -> Vec<u64> {
        events.iter().map(|e| e.sequence).collect()
    }

    #[test]
    fn reads_within_a_byte_limit_and_always_the_first_event() {
        let store = MemoryStore::new(100, 1 << 30);
        for _ in 0..10 {
            store
                .append(vec![event("a.b", &[1u8; 1000])], SystemTime::now())
                .unwrap();
        }
        let one = store.read_after(0, 1).unwrap()[0].held_bytes();
        let read = store.read_after_within(2, 100, 3 * one + one / 2).unwrap();
        assert_eq!(sequences(&read), vec![3, 4, 5]);
        assert_eq!(
            sequences(&store.read_after_within(0, 100, 1).unwrap()),
            vec![1]
        );
        assert_eq!(
            sequences(&store.read_after_within(0, 2, usize::MAX).unwrap()),
            vec![1, 2]
        );
    }

    #[test]
    fn assigns_consecutive_sequences_and_reads_after() {
        let store = MemoryStore::new(100, 1 << 20);
        let t = SystemTime::now();
        let first = store
            .append(vec![event("a", b"1"), event("b", b"2")], t)
            .unwrap();
        assert_eq!(sequences(&first), vec![1, 2]);
        assert_eq!(first[0].event.time, Some(t));
        store.append(vec![event("a", b"3")], t).unwrap();
        assert_eq!(sequences(&store.read_after(0, 10).unwrap()), vec![1, 2, 3]);
        assert_eq!(sequences(&store.read_after(1, 1).unwrap()), vec![2]);
        assert!(store.read_after(3, 10).unwrap().is_empty());
        assert_eq!(
            store.bounds(),
            LogBounds {
                oldest: Some(1),
                head: 3,
                newest_dropped_time: None,
            }
        );
        assert_eq!(store.held_counts()["a"], 2);
    }

    #[test]
    fn retention_drops_the_oldest_by_count_and_bytes() {
        let store = MemoryStore::new(3, 1 << 20);
        let t = SystemTime::now();
        for _ in 0..5 {
            store.append(vec![event("a", b"x")], t).unwrap();
        }
        assert_eq!(
            store.bounds(),
            LogBounds {
                oldest: Some(3),
                head: 5,
                newest_dropped_time: Some(t),
            }
        );
        assert_eq!(sequences(&store.read_after(0, 10).unwrap()), vec![3, 4, 5]);
        assert_eq!(store.held_counts()["a"], 3);

        let one = StoredEvent::new(0, t, event("b", &[0; 100])).held_bytes() as u64;
        let store = MemoryStore::new(100, one * 2);
        for _ in 0..3 {
            store.append(vec![event("b", &[0; 100])], t).unwrap();
        }
        assert_eq!(store.bounds().oldest, Some(2));
    }

    #[test]
    fn finds_sequences_by_time_even_if_the_clock_goes_back() {
        let store = MemoryStore::new(100, 1 << 20);
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        store.append(vec![event("a", b"")], t0).unwrap();
        store
            .append(vec![event("a", b"")], t0 + Duration::from_secs(10))
            .unwrap();
        // The clock steps back: the stored publish time stays at the latest seen.
        let back = store.append(vec![event("a", b"")], t0).unwrap();
        assert_eq!(back[0].publish_time, t0 + Duration::from_secs(10));
        assert_eq!(store.first_sequence_at_or_after(t0).unwrap(), Some(1));
        assert_eq!(
            store
                .first_sequence_at_or_after(t0 + Duration::from_secs(5))
                .unwrap(),
            Some(2)
        );
        assert_eq!(
            store
                .first_sequence_at_or_after(t0 + Duration::from_secs(11))
                .unwrap(),
            None
        );
    }

    #[test]
    fn retention_drops_events_older_than_the_max_age() {
        let store = MemoryStore::with_max_age(100, 1 << 20, Some(Duration::from_secs(60)));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        store.append(vec![event("a", b"")], t0).unwrap();
        store
            .append(vec![event("a", b"")], t0 + Duration::from_secs(30))
            .unwrap();
        store
            .append(vec![event("a", b"")], t0 + Duration::from_secs(61))
            .unwrap();
        assert_eq!(
            store.bounds_at(t0 + Duration::from_secs(61)).oldest,
            Some(2)
        );
    }

    #[test]
    fn age_is_judged_by_the_clock_when_read_not_only_when_appended() {
        let store = MemoryStore::with_max_age(100, 1 << 20, Some(Duration::from_secs(60)));
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        store.append(vec![event("a", b"")], at(0)).unwrap();
        store.append(vec![event("a", b"")], at(10)).unwrap();
        store.append(vec![event("b", b"")], at(20)).unwrap();
        // Nothing is appended; the clock moves past the first event's age.
        let now = at(65);
        assert_eq!(sequences(&store.read_after_at(0, 10, now)), vec![2, 3]);
        assert_eq!(
            store.bounds_at(now),
            LogBounds {
                oldest: Some(2),
                head: 3,
                newest_dropped_time: Some(at(0)),
            }
        );
        assert_eq!(store.held_counts_at(now)["a"], 1);
        assert_eq!(store.first_sequence_at_or_after_at(at(0), now), Some(2));
        assert_eq!(store.first_sequence_at_or_after_at(at(15), now), Some(3));
        // Past every event's age: nothing held, and a replay sees what it lost.
        let later = at(100);
        assert!(store.read_after_at(0, 10, later).is_empty());
        assert_eq!(
            store.bounds_at(later),
            LogBounds {
                oldest: None,
                head: 3,
                newest_dropped_time: Some(at(20)),
            }
        );
        assert!(store.held_counts_at(later).is_empty());
        assert_eq!(store.first_sequence_at_or_after_at(at(0), later), None);
        // The clock stepping back brings nothing back.
        assert!(store.read_after_at(0, 10, now).is_empty());
        // Nothing was dropped yet; `expire` does it.
        assert_eq!(store.read().events.len(), 3);
        store.expire(later).unwrap();
        assert_eq!(store.read().events.len(), 0);
        assert_eq!(store.read().bytes, 0);
        assert_eq!(store.bounds_at(later).newest_dropped_time, Some(at(20)));
        let next = store.append(vec![event("a", b"")], later).unwrap();
        assert_eq!(next[0].sequence, 4);
        assert_eq!(store.bounds_at(later).oldest, Some(4));
    }

    #[test]
    fn an_event_past_its_age_is_hidden_on_the_real_clock_with_no_append() {
        let store = MemoryStore::with_max_age(100, 1 << 20, Some(Duration::from_millis(300)));
        store
            .append(vec![event("a", b"")], SystemTime::now())
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while store.bounds().oldest.is_some() {
            assert!(std::time::Instant::now() < deadline, "never expired");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(store.read_after(0, 10).unwrap().is_empty());
        assert!(store.held_counts().is_empty());
        assert!(store.bounds().newest_dropped_time.is_some());
    }

    #[test]
    fn an_empty_store_reports_what_comes_next() {
        let store = MemoryStore::new(1, 1 << 20);
        assert_eq!(store.bounds().first_available(), 1);
        store
            .append(vec![event("a", b"")], SystemTime::now())
            .unwrap();
        store
            .append(vec![event("a", b"")], SystemTime::now())
            .unwrap();
        assert_eq!(store.bounds().first_available(), 2);
    }
}
