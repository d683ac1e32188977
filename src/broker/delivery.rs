//! What live delivery may hold in memory, and where a subscriber reads from.
//!
//! # Why a subscriber that falls behind reads the log instead of being cut off
//! Every event a live subscriber has not read yet sits in its queue, and the log holds it too.
//! Queues bounded only in events let a few stalled subscribers pin gigabytes (8,192 events of
//! 1 MiB each), and ending a subscriber at a full queue made it lose its place whenever a burst
//! outran it. Here a queue is bounded in events and in bytes ([`Lane`]), and all queues together
//! by one budget ([`DeliveryBudget`]). When an event does not fit, the subscriber is not ended:
//! it is marked as catching up (it stays registered, and routing skips it), its stream drains
//! what was queued, then reads the log from the event that did not fit, exactly as a replay
//! does, and rejoins live under the routing lock with no gap and no duplicate. The log already
//! holds every event; a subscriber reading it holds at most one bounded chunk.
//!
//! In a live group, a full member is skipped; when every member is full, one member catches up
//! for the whole group (see `Group::deliver`): the group's events from then on are its own until
//! it is live again, handed to another member that reads if it has not started, and, past
//! `max_subscriber_lag`, dropped from the group ([`Lane::evict`]).
//!
//! A [`Lane`] is shared by the publish side (the subscriber's entry in the subject tree, under
//! the routing lock) and the subscription's stream (no lock): the mode says which path feeds
//! the stream, the counter what its queue holds, and the waker lets routing wake a stream that
//! waits on an empty queue when it marks it.

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Waker;

use futures_util::task::AtomicWaker;

use crate::event::StoredEvent;

/// Bytes of queued events for all live subscribers together, against one limit.
#[derive(Debug)]
pub(super) struct DeliveryBudget {
    used: AtomicUsize,
    limit: usize,
}

impl DeliveryBudget {
    pub(super) fn new(limit: usize) -> DeliveryBudget {
        DeliveryBudget {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    /// Bytes queued for all live subscribers now.
    pub(super) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

/// The stream reads its queue.
const LIVE: u8 = 0;
/// Routing skips the subscriber; its stream drains its queue, then takes over
/// ([`Lane::start_catch_up`]) and reads the log after [`Lane::resume_after`].
const MARKED: u8 = 1;
/// The stream is reading the log; routing skips the subscriber until it rejoins.
const REPLAYING: u8 = 2;
/// The subscription is gone (its stream dropped).
const GONE: u8 = 3;
/// A group's catcher that fell more than `max_subscriber_lag` behind: routing dropped it from
/// its group, and its stream ends (see `Group::deliver`).
const EVICTED: u8 = 4;

/// One subscriber's queue accounting and mode, shared by its entry in the subject tree and its
/// stream. See the module docs.
#[derive(Debug)]
pub(super) struct Lane {
    mode: AtomicU8,
    /// While catching up: the sequence before the first event that did not fit. Everything up
    /// to it was queued (or, in a group, went to another member); the log has the rest.
    resume_after: AtomicU64,
    /// Bytes of the events in the queue now.
    queued_bytes: AtomicUsize,
    /// The most bytes the queue holds (it always takes one event when empty).
    limit: usize,
    /// `None` for queues outside the accounting (a query's inbox, which holds a few events and
    /// drops the rest).
    budget: Option<Arc<DeliveryBudget>>,
    /// The stream's task while it waits on its queue, so marking it wakes it.
    waker: AtomicWaker,
}

/// What an event weighs in the queues: what retention counts for it (data, metadata and room
/// for its encoding, which is cached with the event once delivered).
pub(super) fn weight(event: &StoredEvent) -> usize {
    event.held_bytes()
}

impl Lane {
    /// A counted lane of at most `limit` bytes, under `budget`.
    pub(super) fn counted(limit: usize, budget: Arc<DeliveryBudget>) -> Arc<Lane> {
        Arc::new(Lane {
            mode: AtomicU8::new(LIVE),
            resume_after: AtomicU64::new(0),
            queued_bytes: AtomicUsize::new(0),
            limit,
            budget: Some(budget),
            waker: AtomicWaker::new(),
        })
    }

    /// A lane outside the byte accounting (query inboxes).
    pub(super) fn uncounted() -> Arc<Lane> {
        Arc::new(Lane {
            mode: AtomicU8::new(LIVE),
            resume_after: AtomicU64::new(0),
            queued_bytes: AtomicUsize::new(0),
            limit: usize::MAX,
            budget: None,
            waker: AtomicWaker::new(),
        })
    }

    /// Reserves room for an event of `size` bytes in a queue that holds something already:
    /// false if this queue or all queues together would pass their limit. An empty queue always
    /// takes the event (`queue_empty`): a subscriber that keeps up is never moved off the live
    /// path by one large event, and the budget is passed by at most one event per such queue.
    /// A reservation is undone with [`Lane::release`] if the event is not queued after all.
    pub(super) fn reserve(&self, size: usize, queue_empty: bool) -> bool {
        let Some(budget) = &self.budget else {
            return true;
        };
        if !queue_empty {
            let queued = self.queued_bytes.load(Ordering::Relaxed);
            if queued.saturating_add(size) > self.limit
                || budget.used().saturating_add(size) > budget.limit
            {
                return false;
            }
        }
        self.queued_bytes.fetch_add(size, Ordering::Relaxed);
        budget.used.fetch_add(size, Ordering::Relaxed);
        true
    }

    /// Gives back the room of an event of `size` bytes taken out of the queue.
    pub(super) fn release(&self, size: usize) {
        if let Some(budget) = &self.budget {
            self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            budget.used.fetch_sub(size, Ordering::Relaxed);
        }
    }

    /// Whether the bus accounts this lane's bytes (see [`Lane::uncounted`]).
    pub(super) fn is_counted(&self) -> bool {
        self.budget.is_some()
    }

    /// Moves the subscriber off the live path: routing skips it from now on, and its stream
    /// reads the log after `after` once its queue is drained (it is woken if it waits). Called
    /// under the routing lock.
    pub(super) fn catch_up_after(&self, after: u64) {
        self.resume_after.store(after, Ordering::Relaxed);
        self.mode.store(MARKED, Ordering::Release);
        self.waker.wake();
    }

    /// Whether routing passes the subscriber by: it is marked, or reading the log.
    pub(super) fn is_catching_up(&self) -> bool {
        matches!(self.mode.load(Ordering::Acquire), MARKED | REPLAYING)
    }

    /// Marked, and its stream has not started reading the log yet.
    pub(super) fn is_marked(&self) -> bool {
        self.mode.load(Ordering::Acquire) == MARKED
    }

    pub(super) fn is_live(&self) -> bool {
        self.mode.load(Ordering::Acquire) == LIVE
    }

    /// Called by the stream when its queue is empty: `Some(after)` if it was marked, and from
    /// now on it reads the log after `after`; `None` if it stays live. Registers `waker` first,
    /// so a marking that comes later wakes it.
    pub(super) fn start_catch_up(&self, waker: &Waker) -> Option<u64> {
        self.waker.register(waker);
        self.mode
            .compare_exchange(MARKED, REPLAYING, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| self.resume_after.load(Ordering::Relaxed))
    }

    /// Takes a marking back before the stream started on it (a group handing its catching up
    /// to another member): true if it was still only marked, and the subscriber is live again.
    /// Called under the routing lock.
    pub(super) fn cancel_catch_up(&self) -> bool {
        self.mode
            .compare_exchange(MARKED, LIVE, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Where the log read starts (see [`Lane::catch_up_after`]), or, once the stream reads
    /// the log, how far it has read.
    pub(super) fn resume_after(&self) -> u64 {
        self.resume_after.load(Ordering::Relaxed)
    }

    /// While the stream reads the log: everything up to `sequence` is read, so a group can
    /// tell how far behind its catcher is.
    pub(super) fn replayed_through(&self, sequence: u64) {
        self.resume_after.store(sequence, Ordering::Relaxed);
    }

    /// Back on the live path. Called under the routing lock, right after the stream read the
    /// log up to the head.
    pub(super) fn rejoin(&self) {
        self.mode.store(LIVE, Ordering::Release);
    }

    /// Dropped from its group for lagging (see [`EVICTED`]); its stream is woken to end.
    /// Called under the routing lock.
    pub(super) fn evict(&self) {
        self.mode.store(EVICTED, Ordering::Release);
        self.waker.wake();
    }

    pub(super) fn is_evicted(&self) -> bool {
        self.mode.load(Ordering::Acquire) == EVICTED
    }

    /// The subscription is gone: a group stops waiting for it to catch up.
    pub(super) fn close(&self) {
        self.mode.store(GONE, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_is_bounded_by_its_own_limit_and_the_shared_budget() {
        let budget = Arc::new(DeliveryBudget::new(250));
        let a = Lane::counted(100, budget.clone());
        let b = Lane::counted(200, budget.clone());
        // An empty queue takes one event of any size.
        assert!(a.reserve(150, true));
        assert!(!a.reserve(1, false), "over its own limit");
        a.release(150);
        assert!(a.reserve(60, true));
        assert!(a.reserve(40, false));
        assert!(!a.reserve(1, false));
        assert!(b.reserve(120, true));
        assert!(!b.reserve(40, false), "over the shared budget");
        assert_eq!(budget.used(), 220);
        a.release(60);
        a.release(40);
        b.release(120);
        assert_eq!(budget.used(), 0);
        let inbox = Lane::uncounted();
        assert!(inbox.reserve(usize::MAX, false));
        assert_eq!(budget.used(), 0);
    }
}
