//! The events a node's tail read last, kept for reads just behind the head.
//!
//! Every read of the log is a round trip to JetStream (a reader consumer made and fetched), and
//! one of them is made under the broker's routing lock: a replay's last step reads what was
//! routed between its previous read and taking the lock, then registers the subscriber live,
//! so that no event falls between the two. While that read waits for JetStream (seconds, while
//! a stream leader is being elected) nothing on the node is routed. Those few events passed
//! through this node's tail moments before; served from here, that step never waits on the
//! network. Replays near the head and catching-up subscribers read from here too.
//!
//! Bounded by [`RECENT_EVENTS`] and [`RECENT_BYTES`]: a node keeps no copy of the stream.

use std::collections::VecDeque;

use crate::event::SharedEvent;
use crate::store::WithinBytes;

/// Events kept at most.
pub const RECENT_EVENTS: usize = 1024;
/// Bytes of kept events at most (as [`crate::event::StoredEvent::held_bytes`] counts them).
pub const RECENT_BYTES: usize = 4 * 1024 * 1024;

/// The tail's last events: every stream message with a sequence in `(after, through]` was
/// read by the tail, and the bus's events among them are in `events`, in order (the others
/// were not the bus's, and a read skips them too).
#[derive(Debug, Default)]
pub struct RecentTail {
    after: u64,
    through: u64,
    events: VecDeque<SharedEvent>,
    bytes: usize,
}

impl RecentTail {
    /// Empty, for a tail that starts reading after `after`.
    pub fn starting_after(after: u64) -> RecentTail {
        RecentTail {
            after,
            through: after,
            ..RecentTail::default()
        }
    }

    /// Records that the tail read stream message `sequence`, the bus's `event` or (`None`)
    /// another. A message that does not follow the last one read (a tail followed anew from
    /// elsewhere, a stream made anew) starts the record over from it; one read again is
    /// ignored.
    pub fn read(&mut self, sequence: u64, event: Option<&SharedEvent>) {
        if sequence <= self.through && sequence > self.after {
            return;
        }
        if sequence != self.through + 1 {
            *self = RecentTail::starting_after(sequence.saturating_sub(1));
        }
        self.through = sequence;
        if let Some(event) = event {
            self.bytes += weight(event);
            self.events.push_back(event.clone());
        }
        while self.events.len() > RECENT_EVENTS || self.bytes > RECENT_BYTES {
            let Some(oldest) = self.events.pop_front() else {
                break;
            };
            self.bytes -= weight(&oldest);
            self.after = oldest.sequence;
        }
    }

    /// The events after `after`, at most `max` and within `max_bytes` (as a read of the
    /// stream gives them), or `None` when this record does not reach back to `after` (or
    /// holds nothing after it): then the stream must be read.
    pub fn after(&self, after: u64, max: usize, max_bytes: usize) -> Option<Vec<SharedEvent>> {
        if after < self.after || after >= self.through {
            return None;
        }
        let start = self.events.partition_point(|event| event.sequence <= after);
        let mut within = WithinBytes::new(max_bytes);
        let read: Vec<SharedEvent> = self
            .events
            .range(start..)
            .take(max)
            .take_while(|event| within.admits(event))
            .cloned()
            .collect();
        Some(read)
    }
}

/// What an event counts for against [`RECENT_BYTES`]: what it holds in memory.
fn weight(event: &SharedEvent) -> usize {
    event.held_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, StoredEvent};
    use std::sync::Arc;
    use std::time::SystemTime;

    fn stored(sequence: u64, data: usize) -> SharedEvent {
        let mut event = Event::for_test("orders.created");
        event.data = bytes::Bytes::from(vec![0u8; data]);
        Arc::new(StoredEvent::new(sequence, SystemTime::UNIX_EPOCH, event))
    }

    fn sequences(read: Option<Vec<SharedEvent>>) -> Option<Vec<u64>> {
        read.map(|events| events.iter().map(|e| e.sequence).collect())
    }

    #[test]
    fn reads_just_behind_the_head_come_from_the_record_and_older_ones_do_not() {
        let mut recent = RecentTail::starting_after(10);
        for sequence in 11..=15 {
            // 13 is a message the bus did not write.
            let event = (sequence != 13).then(|| stored(sequence, 10));
            recent.read(sequence, event.as_ref());
        }
        assert_eq!(
            sequences(recent.after(10, 100, usize::MAX)),
            Some(vec![11, 12, 14, 15])
        );
        assert_eq!(
            sequences(recent.after(12, 100, usize::MAX)),
            Some(vec![14, 15])
        );
        assert_eq!(sequences(recent.after(12, 1, usize::MAX)), Some(vec![14]));
        assert_eq!(
            sequences(recent.after(9, 100, usize::MAX)),
            None,
            "before the record"
        );
        assert_eq!(
            sequences(recent.after(15, 100, usize::MAX)),
            None,
            "nothing after it"
        );
    }

    #[test]
    fn the_record_keeps_its_bounds_and_says_where_it_starts() {
        let mut recent = RecentTail::starting_after(0);
        for sequence in 1..=(RECENT_EVENTS as u64 + 10) {
            recent.read(sequence, Some(&stored(sequence, 1)));
        }
        assert_eq!(recent.events.len(), RECENT_EVENTS);
        assert_eq!(recent.after(5, 1, usize::MAX).map(|r| r.len()), None);
        assert_eq!(sequences(recent.after(10, 1, usize::MAX)), Some(vec![11]));

        let mut big = RecentTail::starting_after(0);
        for sequence in 1..=8 {
            big.read(sequence, Some(&stored(sequence, 1024 * 1024)));
        }
        assert!(big.bytes <= RECENT_BYTES);
        assert!(big.events.len() < 8);
        let first_kept = big.events.front().map(|e| e.sequence).unwrap();
        assert_eq!(sequences(big.after(first_kept - 2, 10, usize::MAX)), None);
        assert_eq!(
            sequences(big.after(first_kept - 1, 1, usize::MAX)),
            Some(vec![first_kept])
        );
    }

    #[test]
    fn a_tail_followed_anew_elsewhere_starts_the_record_over_and_repeats_are_ignored() {
        let mut recent = RecentTail::starting_after(0);
        for sequence in 1..=5 {
            recent.read(sequence, Some(&stored(sequence, 1)));
        }
        // Read again after a follow-anew from 3: ignored.
        recent.read(4, Some(&stored(4, 1)));
        assert_eq!(
            sequences(recent.after(0, 100, usize::MAX)),
            Some(vec![1, 2, 3, 4, 5])
        );
        // A jump (a stream made anew, say): the record starts over there.
        recent.read(9, Some(&stored(9, 1)));
        assert_eq!(sequences(recent.after(4, 100, usize::MAX)), None);
        assert_eq!(sequences(recent.after(8, 100, usize::MAX)), Some(vec![9]));
    }

    #[test]
    fn a_read_stops_at_its_byte_budget_with_at_least_one_event() {
        let mut recent = RecentTail::starting_after(0);
        for sequence in 1..=3 {
            recent.read(sequence, Some(&stored(sequence, 1000)));
        }
        assert_eq!(sequences(recent.after(0, 100, 1)), Some(vec![1]));
    }
}
