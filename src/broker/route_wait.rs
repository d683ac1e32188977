//! Publishes waiting until this node has routed their events, woken by sequence.
//!
//! On a shared log (JetStream) a publish is answered once this node has read its last event
//! back from the log's tail and routed it ([`super::Broker::routed_past`]), so a replay on this
//! node holds what it acknowledged. Every publish in flight waits for its own sequence. Woken
//! through a `watch` channel, every routed run of the tail woke every waiting publish to
//! compare its sequence: at 256 publishes in flight, 256 wake-ups per run, most of them for
//! nothing. Here each waiter is kept under its sequence, and a routed run wakes exactly those
//! it passed, each once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::oneshot;

/// The waiting publishes, by the sequence each waits for.
#[derive(Default)]
pub(super) struct RouteWaiters {
    /// Tells apart waiters of the same sequence.
    next_id: AtomicU64,
    /// `(sequence, id)` → the waiter's wake-up.
    waiting: Mutex<BTreeMap<(u64, u64), oneshot::Sender<()>>>,
}

impl RouteWaiters {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<(u64, u64), oneshot::Sender<()>>> {
        // A panic elsewhere while holding it leaves the map whole (insert and split only).
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A wait until `routed` reaches `sequence`, or `None` when it already has. `routed` is
    /// read under the lock that [`RouteWaiters::pass`] takes after it is raised, so no wake-up
    /// is lost between the check and the registration.
    pub(super) fn wait(&self, sequence: u64, routed: &AtomicU64) -> Option<RouteWait<'_>> {
        let mut waiting = self.lock();
        if routed.load(Ordering::Acquire) >= sequence {
            return None;
        }
        let key = (sequence, self.next_id.fetch_add(1, Ordering::Relaxed));
        let (wake, passed) = oneshot::channel();
        waiting.insert(key, wake);
        Some(RouteWait {
            waiters: self,
            key,
            passed,
            done: false,
        })
    }

    /// Wakes every waiter of a sequence up to `routed`. Call after raising the routed
    /// sequence the waiters compare with.
    pub(super) fn pass(&self, routed: u64) {
        let passed = {
            let mut waiting = self.lock();
            let later = match routed.checked_add(1) {
                Some(next) => waiting.split_off(&(next, 0)),
                None => BTreeMap::new(),
            };
            std::mem::replace(&mut *waiting, later)
        };
        for wake in passed.into_values() {
            // The waiter may have given up meanwhile.
            let _ = wake.send(());
        }
    }

    /// How many publishes wait (for tests and gauges).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// One publish's wait; it leaves the registry when dropped (given up, timed out, cancelled).
pub(super) struct RouteWait<'a> {
    waiters: &'a RouteWaiters,
    key: (u64, u64),
    passed: oneshot::Receiver<()>,
    done: bool,
}

impl RouteWait<'_> {
    /// Resolves once the sequence is routed. (Only [`RouteWaiters::pass`] takes a waiter out
    /// of the registry, and it wakes each one it takes; the registry outlives its waits.)
    pub(super) async fn passed(&mut self) {
        let _ = (&mut self.passed).await;
        self.done = true;
    }
}

impl Drop for RouteWait<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.waiters.lock().remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[test]
    fn a_pass_wakes_exactly_the_waiters_it_reached() {
        let routed = AtomicU64::new(3);
        let waiters = RouteWaiters::default();
        assert!(waiters.wait(3, &routed).is_none(), "already routed");
        let mut four = waiters.wait(4, &routed).expect("waits");
        let mut also_four = waiters.wait(4, &routed).expect("waits");
        let mut six = waiters.wait(6, &routed).expect("waits");
        assert_eq!(waiters.len(), 3);

        routed.store(5, Ordering::Release);
        waiters.pass(5);
        assert_eq!(four.passed().now_or_never(), Some(()));
        assert_eq!(also_four.passed().now_or_never(), Some(()));
        assert_eq!(six.passed().now_or_never(), None, "6 is not routed yet");
        assert_eq!(waiters.len(), 1);

        routed.store(6, Ordering::Release);
        waiters.pass(6);
        assert_eq!(six.passed().now_or_never(), Some(()));
        assert_eq!(waiters.len(), 0);
    }

    #[test]
    fn a_waiter_that_gives_up_leaves_nothing_behind() {
        let routed = AtomicU64::new(0);
        let waiters = RouteWaiters::default();
        let given_up = waiters.wait(10, &routed).expect("waits");
        let kept = waiters.wait(10, &routed).expect("waits");
        drop(given_up);
        assert_eq!(waiters.len(), 1);
        drop(kept);
        assert_eq!(waiters.len(), 0);
    }

    #[test]
    fn the_last_sequence_passes_everyone() {
        let routed = AtomicU64::new(0);
        let waiters = RouteWaiters::default();
        let mut last = waiters.wait(u64::MAX, &routed).expect("waits");
        routed.store(u64::MAX, Ordering::Release);
        waiters.pass(u64::MAX);
        assert_eq!(last.passed().now_or_never(), Some(()));
    }
}
