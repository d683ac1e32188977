//! Per-topic counters, bounded and aged out.
//!
//! # Why bounded
//! Topic names are chosen by clients: a producer that puts an id in its topic makes a new name per
//! event. Counters kept for every name ever seen would grow without end (200,000 topics held
//! ~100 MiB that was never freed). So the table holds at most `max_names` topics (events to a
//! topic past the cap are counted as untracked), and forgets a topic that has been idle for
//! `names_idle_after`, holds no event and has no subscriber by name.
//!
//! # Why an `IndexMap`
//! The sweep that forgets idle topics must not hold the routing lock for a time that grows with
//! the number of names. Entries in an `IndexMap` have positions, so the sweep works through them
//! a slice at a time ([`SWEEP_SLICE`] entries per lock hold), and removes with `swap_remove` in
//! O(1). Names are `Arc<str>`, so a listing copies pointers, not strings, under the lock.

use std::sync::Arc;
use std::time::SystemTime;

use indexmap::IndexMap;

/// Entries looked at per hold of the routing lock when sweeping.
pub(super) const SWEEP_SLICE: usize = 4096;

/// Hands memory freed by a sweep back to the system. Names are many small allocations that
/// glibc's malloc keeps in its arenas once freed; `malloc_trim` returns the pages that hold no
/// live allocation (pages pinned by a survivor stay: tests/names_memory.rs measures what is
/// left). Called only after a sweep that forgot many names, or a listing of many, outside every
/// lock.
pub(super) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks; it takes no pointer.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What the bus counts for one topic.
#[derive(Debug, Clone, Copy)]
pub(super) struct TopicCounters {
    pub published: u64,
    pub last_sequence: u64,
    pub last_publish_time: SystemTime,
}

/// The counters of the topics in use, at most `max` of them.
pub(super) struct TopicTable {
    topics: IndexMap<Arc<str>, TopicCounters, hashbrown::DefaultHashBuilder>,
    max: usize,
    /// Events published to topics that were not tracked because the table was full.
    untracked_events: u64,
    /// Where the next sweep slice starts.
    sweep_at: usize,
}

impl TopicTable {
    pub fn new(max: usize) -> TopicTable {
        TopicTable {
            topics: IndexMap::default(),
            max,
            untracked_events: 0,
            sweep_at: 0,
        }
    }

    /// Counts an event published to `family`.
    pub fn record(&mut self, family: &str, sequence: u64, time: SystemTime) {
        let full = self.topics.len() >= self.max;
        match self.topics.get_mut(family) {
            Some(counters) => {
                counters.published += 1;
                counters.last_sequence = sequence;
                counters.last_publish_time = time;
            }
            None if full => self.untracked_events += 1,
            None => {
                self.topics.insert(
                    Arc::from(family),
                    TopicCounters {
                        published: 1,
                        last_sequence: sequence,
                        last_publish_time: time,
                    },
                );
            }
        }
    }

    /// Topics tracked.
    pub fn len(&self) -> usize {
        self.topics.len()
    }

    pub fn untracked_events(&self) -> u64 {
        self.untracked_events
    }

    /// Every tracked topic: pointers and numbers, O(topics) copying and no string copied.
    pub fn snapshot(&self) -> Vec<(Arc<str>, TopicCounters)> {
        self.topics
            .iter()
            .map(|(name, counters)| (name.clone(), *counters))
            .collect()
    }

    /// Looks at up to [`SWEEP_SLICE`] entries from where the last slice stopped and forgets
    /// those last published before `idle_before` for which `keep` says no, counting them in
    /// `forgotten`. Returns whether the sweep went round the whole table (the next call starts
    /// a new round).
    pub fn sweep_slice(
        &mut self,
        idle_before: SystemTime,
        forgotten: &mut usize,
        mut keep: impl FnMut(&str) -> bool,
    ) -> bool {
        let mut looked = 0;
        while looked < SWEEP_SLICE && self.sweep_at < self.topics.len() {
            looked += 1;
            let (name, counters) = self.topics.get_index(self.sweep_at).expect("within bounds");
            if counters.last_publish_time < idle_before && !keep(name) {
                // The last entry moves here: look at this position again.
                self.topics.swap_remove_index(self.sweep_at);
                *forgotten += 1;
            } else {
                self.sweep_at += 1;
            }
        }
        if self.sweep_at >= self.topics.len() {
            self.sweep_at = 0;
            if self.topics.capacity() > 2 * self.topics.len() + 1024 {
                self.topics.shrink_to_fit();
            }
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_table_is_capped_and_idle_topics_go() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut table = TopicTable::new(3);
        for (sequence, name) in ["a", "b", "c", "d", "a"].into_iter().enumerate() {
            table.record(name, sequence as u64 + 1, start);
        }
        assert_eq!(table.len(), 3);
        assert_eq!(table.untracked_events(), 1, "d did not fit");
        table.record("b", 9, start + Duration::from_secs(10));
        // a and c are idle; c is kept (say it holds events).
        while !table.sweep_slice(start + Duration::from_secs(5), &mut 0, |name| name == "c") {}
        let mut names: Vec<_> = table.snapshot().into_iter().map(|(n, _)| n).collect();
        names.sort();
        assert_eq!(names, [Arc::from("b"), Arc::from("c")]);
    }

    #[test]
    fn a_sweep_goes_round_in_slices() {
        let old = SystemTime::UNIX_EPOCH;
        let mut table = TopicTable::new(usize::MAX);
        for i in 0..(SWEEP_SLICE * 2 + 10) {
            table.record(&format!("t{i}"), i as u64, old);
        }
        let mut slices = 1;
        while !table.sweep_slice(old + Duration::from_secs(1), &mut 0, |_| false) {
            slices += 1;
        }
        assert_eq!(table.len(), 0);
        assert!(slices >= 3, "{slices} slices");
    }
}
