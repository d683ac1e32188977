//! MANUAL-ack consumer groups: at-least-once delivery with acknowledgements, redelivery and dead
//! letters, and a cursor the store keeps across restarts.
//!
//! # How it differs from live groups
//! A live (AUTO) group is an entry in the subject tree: the publish path pushes each event into
//! one member's queue and forgets it. A MANUAL group instead reads the log itself, from its
//! cursor, like a replaying subscriber; the bus remembers every event it handed out until the
//! member acks it. So nothing is lost when a member is slow, crashes, or all members are gone for
//! a while: the group waits in the log.
//!
//! # One dispatcher per group
//! A task per group does all the moving: it reads matching events from the log into `ready`, hands
//! them to members with room (each member holds at most `max_in_flight` unacked events), takes
//! back what passed its ack deadline or was nacked, and moves an event that was delivered
//! `max_deliveries` times to the dead-letter topic. Acks and nacks only edit the group's state and
//! wake the dispatcher. It wakes on those, on new events in the log, and on the next deadline.
//!
//! # The cursor
//! Every event up to the cursor is acked or dead-lettered: the cursor is one less than the
//! smallest sequence still outstanding (ready, in flight, waiting out a nack delay, or being
//! dead-lettered), or the read position when nothing is. It is saved through the store (at most
//! every [`SAVE_INTERVAL`], and when the dispatcher stops); after a restart the group rereads
//! from it, so an event acked after the last save may be delivered again, never lost.
//!
//! # Putting events back
//! Every way an event goes back to the group (a Nack, with or without a delay; a passed ack
//! deadline; its member leaving) goes through [`GroupState::put_back`], which applies the
//! delivery limit (the `max_deliveries`-th delivery's return sends it to the dead-letter topic)
//! and the redelivery backoff ([`redelivery_backoff`]). Events waiting for delivery are kept by
//! sequence, so redeliveries come back in log order, never reversed.
//!
//! # Retention does not wait for groups
//! As with JetStream's limits retention, the log's limits apply whatever groups have not
//! acknowledged yet. What a group loses that way is logged, counted, and reported to every member
//! that joins (`Subscribed.group_dropped_events`). A group never reads its own dead-letter topic,
//! so a group on `>` cannot feed its dead letters back to itself.
//!
//! # Parking and unloading
//! Group names are chosen by clients, and a group outlives its members. A group with no member
//! **parks**: its dispatcher drops its read-ahead (keeping the delivery counts of events that
//! were delivered before, so the delivery limit still holds), rewinds its read position to the
//! cursor (which is saved), and stops waking on new events; it wakes when a member joins and
//! reads again from the cursor. Nothing is lost: events in flight with a member that left were
//! handed back before, and everything after the cursor is read again (at least once: as after a
//! restart, events acked out of order after the cursor may come again, and a nack's delay is not
//! kept). A group
//! parked for `names_idle_after` is unloaded: its dispatcher ends and the group leaves the
//! map; a member that joins later resumes it from the saved cursor, as after a restart.
//!
//! # Containment
//! The dispatcher runs under a supervisor: a panic in one group's dispatcher is logged at ERROR
//! and the dispatcher restarts on the same state, so one bad event or field cannot stop a group
//! (or the bus) for everyone.
//!
//! Lock order: the broker's routing lock, then the group map, then one group's state.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt as _;
use tokio::sync::{mpsc, Notify};
use tracing::{debug, error, info, warn};

use super::subscription::StartFloor;
use super::{Broker, Responders, StartPosition};
use crate::error::BusError;
use crate::event::{Event, SharedEvent};
use crate::store::GroupCursor;
use crate::topic::{Pattern, Topic, MAX_TOPIC_BYTES};

/// How often, at most, a moving cursor is saved.
pub const SAVE_INTERVAL: Duration = Duration::from_millis(50);
/// Events read from the log ahead of delivery, at most; also at most `subscriber_queue_bytes`
/// of them (the first event is read whatever its size), so a group of large events does not
/// hold 512 of them.
const READ_AHEAD: usize = 512;
/// The first step of the redelivery backoff, and its ceiling.
pub const REDELIVERY_BACKOFF_BASE: Duration = Duration::from_millis(50);
pub const REDELIVERY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// The furthest ahead a deadline is kept: 30 years, as Tokio's own "far future". Durations
/// from the wire are within protobuf's range (10,000 years), which `Instant` arithmetic may not
/// hold; deadlines past this are the same as never.
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// `now + after`, saturating at [`FAR_FUTURE`] instead of overflowing.
pub(super) fn deadline_after(now: Instant, after: Duration) -> Instant {
    now + after.min(FAR_FUTURE)
}

/// How long an event waits before its next delivery when it comes back after `deliveries`
/// deliveries: none after the first (a fluke gets one quick retry), then
/// [`REDELIVERY_BACKOFF_BASE`] doubling per delivery, at most [`REDELIVERY_BACKOFF_MAX`]. A
/// member that nacks everything at once cannot spin the group.
pub fn redelivery_backoff(deliveries: u32) -> Duration {
    match deliveries {
        0 | 1 => Duration::ZERO,
        n => REDELIVERY_BACKOFF_BASE
            .saturating_mul(1u32 << (n - 2).min(16))
            .min(REDELIVERY_BACKOFF_MAX),
    }
}

/// Settings of a MANUAL-ack subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManualAck {
    /// Unacked longer than this, an event is delivered again (per subscription).
    pub ack_deadline: Duration,
    /// Deliveries before an event moves to the dead-letter topic (per group, from the member that
    /// created it).
    pub max_deliveries: u32,
    /// Unacked events one member holds at most (per subscription).
    pub max_in_flight: u32,
    /// Where dead letters go; `_bus.dlq.<group>` when `None` (per group).
    pub dead_letter_topic: Option<Topic>,
}

impl Default for ManualAck {
    fn default() -> Self {
        ManualAck {
            ack_deadline: Duration::from_secs(30),
            max_deliveries: 5,
            max_in_flight: 256,
            dead_letter_topic: None,
        }
    }
}

/// The default dead-letter topic of a group: `_bus.dlq.<group>`, with characters a topic token
/// cannot hold replaced by `_`.
pub fn default_dead_letter_topic(group: &str) -> Topic {
    let token: String = group
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(MAX_TOPIC_BYTES - "_bus.dlq.".len())
        .collect();
    Topic::parse(&format!("_bus.dlq.{token}")).expect("sanitised to a valid topic")
}

/// The durable groups of one broker, by name.
#[derive(Default)]
pub(super) struct DurableGroups {
    groups: Mutex<HashMap<Arc<str>, Arc<DurableGroup>>>,
    /// Rounds of work of all dispatchers: each wake-up counts one.
    wakes: AtomicU64,
}

/// Counts of the MANUAL-ack groups, for tests and diagnostics ([`Broker::durable_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurableStats {
    /// Groups loaded (with a dispatcher task), parked ones included.
    pub groups: usize,
    /// Loaded groups that are parked: no member, no read-ahead, not woken by new events.
    pub parked: usize,
    /// Events held in the groups' read-ahead, ready to deliver.
    pub ready_events: usize,
    /// Rounds of work of all dispatchers since start: each wake-up counts one.
    pub dispatcher_wakes: u64,
}

struct DurableGroup {
    name: Arc<str>,
    pattern: Pattern,
    /// What the group's start position holds back ([`StartFloor`]), applied as it reads.
    floor: StartFloor,
    max_deliveries: u32,
    dead_letter_topic: Topic,
    state: Mutex<GroupState>,
    wake: Notify,
}

#[derive(Default)]
struct GroupState {
    /// The highest sequence read from the log (matching or not).
    read_through: u64,
    /// When to read the log again after a read failed (a store over the network may fail a
    /// read for a moment): without it, a group with nothing in flight would wait for the next
    /// publish.
    read_retry: Option<std::time::Instant>,
    /// Events to deliver, by sequence (so redeliveries keep log order), with the deliveries
    /// they had so far.
    ready: BTreeMap<u64, (SharedEvent, u32)>,
    /// What the events in `ready` weigh ([`crate::event::StoredEvent::held_bytes`]).
    ready_bytes: usize,
    in_flight: BTreeMap<u64, InFlight>,
    /// Nacked with a delay: (due, sequence) -> (event, deliveries so far).
    delayed: BTreeMap<(Instant, u64), (SharedEvent, u32)>,
    /// Being published to the dead-letter topic.
    dead_lettering: BTreeSet<u64>,
    /// Had all their deliveries; the dispatcher publishes them to the dead-letter topic next.
    to_dead_letter: Vec<(SharedEvent, u32)>,
    members: Vec<Member>,
    next_member: usize,
    saved_cursor: u64,
    last_save: Option<Instant>,
    /// Events retention dropped before the group could deliver them, since it started here.
    dropped: u64,
    /// Parked (see the module docs): no member, nothing read ahead, not woken by new events.
    parked: bool,
    /// Deliveries after an event's first (nack, passed deadline, member gone), since the group
    /// was loaded on this process: for `ListGroups`.
    redelivered: u64,
    /// Events moved to the dead-letter topic since the group was loaded: for `ListGroups`.
    dead_lettered: u64,
    /// Deliveries so far of events after the cursor that parking dropped from memory, so the
    /// delivery limit holds when they are read again. At most what was outstanding then.
    redeliveries: BTreeMap<u64, u32>,
}

struct InFlight {
    event: SharedEvent,
    deliveries: u32,
    member: u64,
    deadline: Instant,
}

struct Member {
    id: u64,
    queue: mpsc::Sender<(SharedEvent, u32)>,
    in_flight: usize,
    max_in_flight: usize,
    ack_deadline: Duration,
}

impl GroupState {
    fn cursor(&self) -> u64 {
        let outstanding = [
            self.ready.keys().next().copied(),
            self.in_flight.keys().next().copied(),
            self.delayed.values().map(|(e, _)| e.sequence).min(),
            self.dead_lettering.iter().next().copied(),
        ];
        match outstanding.into_iter().flatten().min() {
            Some(smallest) => smallest - 1,
            None => self.read_through,
        }
    }

    /// Parks a group without members (see the module docs): drops the read-ahead and rewinds
    /// the read position to the cursor. Returns whether it is parked; a group with events being
    /// dead-lettered is not, since reading them again would deliver them once more.
    fn park(&mut self) -> bool {
        if self.parked {
            return true;
        }
        if !self.members.is_empty()
            || !self.in_flight.is_empty()
            || !self.dead_lettering.is_empty()
            || !self.to_dead_letter.is_empty()
        {
            return false;
        }
        let cursor = self.cursor();
        let ready = std::mem::take(&mut self.ready);
        self.ready_bytes = 0;
        let delayed = std::mem::take(&mut self.delayed);
        let returned = ready.into_values().chain(delayed.into_values());
        for (event, deliveries) in returned {
            if deliveries > 0 {
                self.redeliveries.insert(event.sequence, deliveries);
            }
        }
        self.read_through = cursor;
        self.parked = true;
        true
    }

    /// Puts an event in `ready`, counting its bytes.
    fn make_ready(&mut self, event: SharedEvent, deliveries: u32) {
        self.ready_bytes += event.held_bytes();
        if let Some((replaced, _)) = self.ready.insert(event.sequence, (event, deliveries)) {
            self.ready_bytes -= replaced.held_bytes();
        }
    }

    /// Takes the first event out of `ready`.
    fn take_first_ready(&mut self) {
        if let Some((_, (event, _))) = self.ready.pop_first() {
            self.ready_bytes -= event.held_bytes();
        }
    }

    fn member_mut(&mut self, id: u64) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.id == id)
    }

    /// The one way an event goes back to the group (see the module docs): to the dead-letter
    /// list once it had `max` deliveries; otherwise ready again after the longer of `delay` and
    /// the [`redelivery_backoff`], in sequence order.
    fn put_back(
        &mut self,
        event: SharedEvent,
        deliveries: u32,
        max: u32,
        delay: Duration,
        now: Instant,
    ) {
        if deliveries >= max {
            self.dead_lettering.insert(event.sequence);
            self.to_dead_letter.push((event, deliveries));
            return;
        }
        let wait = delay.max(redelivery_backoff(deliveries));
        if wait.is_zero() {
            self.make_ready(event, deliveries);
        } else {
            let due = deadline_after(now, wait);
            self.delayed
                .insert((due, event.sequence), (event, deliveries));
        }
    }

    /// Takes an event out of flight (acked, nacked, expired, or its member left).
    fn land(&mut self, sequence: u64) -> Option<InFlight> {
        let flight = self.in_flight.remove(&sequence)?;
        if let Some(member) = self.member_mut(flight.member) {
            member.in_flight -= 1;
        }
        Some(flight)
    }
}

/// A member's place in a durable group; dropping it leaves the group, handing its unacked
/// events to the other members.
pub(super) struct Membership {
    broker: Broker,
    group: Arc<DurableGroup>,
    id: u64,
    subscriber: Arc<str>,
    pub(super) receiver: mpsc::Receiver<(SharedEvent, u32)>,
}

impl Membership {
    pub(super) fn id(&self) -> u64 {
        self.id
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut state = lock(&self.group.state);
        if let Some(position) = state.members.iter().position(|m| m.id == self.id) {
            state.members.remove(position);
        }
        let orphaned: Vec<u64> = state
            .in_flight
            .iter()
            .filter(|(_, f)| f.member == self.id)
            .map(|(sequence, _)| *sequence)
            .collect();
        let now = Instant::now();
        for sequence in orphaned {
            let flight = state.in_flight.remove(&sequence).expect("listed");
            state.put_back(
                flight.event,
                flight.deliveries,
                self.group.max_deliveries,
                Duration::ZERO,
                now,
            );
        }
        drop(state);
        self.group.wake.notify_one();
        self.broker.lock_routing().topology.subscription_ended(
            &self.group.pattern,
            &self.subscriber,
            &self.group.name,
        );
    }
}

/// What joining a group tells the subscriber.
pub(super) struct Joined {
    pub membership: Membership,
    pub cursor: u64,
    pub start_truncated: bool,
    /// Events the group lost to retention so far (see the module docs).
    pub dropped: u64,
}

/// Outcome of an ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    /// Sequences that were in flight and are now done.
    pub acknowledged: u32,
    /// The group's cursor afterwards.
    pub cursor: u64,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Group state stays consistent between statements that can panic.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Broker {
    /// Joins (creating or resuming) the MANUAL-ack group `group` on `pattern`.
    pub(super) fn join_durable(
        &self,
        group: &Arc<str>,
        pattern: &Pattern,
        subscriber: &Arc<str>,
        start: StartPosition,
        settings: &ManualAck,
    ) -> Result<Joined, BusError> {
        let mut groups = lock(&self.shared.durable.groups);
        let (durable, start_truncated) = match groups.get(group) {
            Some(existing) => {
                check_pattern(group, &existing.pattern, pattern)?;
                (existing.clone(), false)
            }
            None => {
                if let Some(topic) = &settings.dead_letter_topic {
                    if pattern.matches(topic) {
                        return Err(BusError::invalid(
                            "dead_letter_topic",
                            format!(
                                "{topic} matches the group's own pattern {pattern}: its dead \
                                 letters would come back to the group; choose a topic outside it"
                            ),
                        ));
                    }
                }
                let saved = self.shared.store.load_group_cursors()?.remove(&**group);
                let (cursor, truncated, floor, dropped) = match saved {
                    Some(saved) => {
                        check_pattern(
                            group,
                            &Pattern::parse(&saved.pattern).map_err(|_| {
                                BusError::invalid("group", "its saved pattern is unreadable")
                            })?,
                            pattern,
                        )?;
                        let (cursor, truncated) = self.clamp_to_held(saved.cursor);
                        // A saved cursor behind the oldest held event: retention dropped what
                        // the group had not acknowledged (while the bus was down, or before).
                        let dropped = cursor - saved.cursor;
                        if dropped > 0 {
                            warn!(
                                group = %group,
                                from = saved.cursor + 1,
                                to = cursor,
                                dropped,
                                "retention dropped events this group had not acknowledged"
                            );
                        }
                        let floor = StartFloor {
                            after_sequence: 0,
                            not_before: saved.not_before,
                        };
                        (cursor, truncated, floor, dropped)
                    }
                    None => {
                        let (cursor, truncated) = self.start_cursor(start)?;
                        // The cursor covers `after_sequence`; a `from_time` the log has not
                        // reached yet is held back as the group reads.
                        let floor = StartFloor {
                            after_sequence: 0,
                            not_before: StartFloor::of(start).not_before,
                        };
                        // A new group exists once its start is saved, before anything is
                        // delivered: a crash before its cursor first moves must not forget it,
                        // or a member rejoining at `latest` would never get the events it was
                        // handed and did not ack (at least once). One save per group created.
                        self.shared.store.save_group_cursor(
                            group,
                            &GroupCursor {
                                pattern: pattern.to_string(),
                                cursor,
                                not_before: floor.not_before,
                            },
                        )?;
                        (cursor, truncated, floor, 0)
                    }
                };
                let durable = Arc::new(DurableGroup {
                    name: group.clone(),
                    pattern: pattern.clone(),
                    floor,
                    max_deliveries: settings.max_deliveries.max(1),
                    dead_letter_topic: settings
                        .dead_letter_topic
                        .clone()
                        .unwrap_or_else(|| default_dead_letter_topic(group)),
                    state: Mutex::new(GroupState {
                        read_through: cursor,
                        saved_cursor: cursor,
                        dropped,
                        ..GroupState::default()
                    }),
                    wake: Notify::new(),
                });
                info!(group = %group, pattern = %pattern, cursor, "durable group started");
                groups.insert(group.clone(), durable.clone());
                self.shared
                    .tasks
                    .spawn(supervise(self.clone(), durable.clone()));
                (durable, truncated)
            }
        };
        let id = self
            .shared
            .next_subscription_id
            .fetch_add(1, Ordering::Relaxed);
        let max_in_flight = settings.max_in_flight.max(1) as usize;
        let (sender, receiver) = mpsc::channel(max_in_flight);
        let (cursor, dropped) = {
            let mut state = lock(&durable.state);
            state.members.push(Member {
                id,
                queue: sender,
                in_flight: 0,
                max_in_flight,
                ack_deadline: settings.ack_deadline,
            });
            state.parked = false;
            (state.cursor(), state.dropped)
        };
        // Held until the member is in: an unloading dispatcher takes the map's lock first, so it
        // either went before (and the group was created anew above) or sees the member.
        drop(groups);
        durable.wake.notify_one();
        self.lock_routing().topology.subscription_started(
            pattern,
            subscriber,
            group,
            SystemTime::now(),
        );
        Ok(Joined {
            membership: Membership {
                broker: self.clone(),
                group: durable,
                id,
                subscriber: subscriber.clone(),
                receiver,
            },
            cursor,
            start_truncated,
            dropped,
        })
    }

    /// The cursor a new group starts from.
    fn start_cursor(&self, start: StartPosition) -> Result<(u64, bool), BusError> {
        let bounds = self.visible_bounds();
        Ok(match start {
            StartPosition::Latest => (bounds.head, false),
            StartPosition::Earliest => (bounds.first_available() - 1, false),
            StartPosition::AfterSequence(sequence) => self.clamp_to_held(sequence),
            StartPosition::FromTime(time) => {
                match self.shared.store.first_sequence_at_or_after(time)? {
                    Some(sequence) => (sequence - 1, false),
                    None => (bounds.head, false),
                }
            }
        })
    }

    /// A cursor older than what the log holds moves up to the oldest held event.
    fn clamp_to_held(&self, cursor: u64) -> (u64, bool) {
        let first = self.visible_bounds().first_available();
        if cursor.saturating_add(1) < first {
            (first - 1, true)
        } else {
            (cursor, false)
        }
    }

    fn durable_group(&self, group: &str) -> Result<Arc<DurableGroup>, BusError> {
        lock(&self.shared.durable.groups)
            .get(group)
            .cloned()
            .ok_or_else(|| BusError::UnknownGroup {
                group: group.to_owned(),
            })
    }

    /// Marks events of a MANUAL-ack group as processed.
    pub fn ack(&self, group: &str, sequences: &[u64]) -> Result<Acked, BusError> {
        let durable = self.durable_group(group)?;
        let mut state = lock(&durable.state);
        let mut acknowledged = 0;
        let mut families = crate::metrics::FamilyCache::default();
        for sequence in sequences {
            if let Some(flight) = state.land(*sequence) {
                acknowledged += 1;
                families
                    .get(self.metrics(), flight.event.event.topic.as_str())
                    .acked
                    .inc();
            }
        }
        let cursor = state.cursor();
        drop(state);
        durable.wake.notify_one();
        Ok(Acked {
            acknowledged,
            cursor,
        })
    }

    /// Hands events of a MANUAL-ack group back, to be delivered again after at least `delay`
    /// (see [`GroupState::put_back`]: the delivery limit and the backoff apply). Returns how many
    /// were in flight.
    pub fn nack(&self, group: &str, sequences: &[u64], delay: Duration) -> Result<u32, BusError> {
        let durable = self.durable_group(group)?;
        let mut state = lock(&durable.state);
        let now = Instant::now();
        let mut requeued = 0;
        let mut families = crate::metrics::FamilyCache::default();
        for sequence in sequences {
            let Some(flight) = state.land(*sequence) else {
                continue;
            };
            requeued += 1;
            families
                .get(self.metrics(), flight.event.event.topic.as_str())
                .nacked
                .inc();
            state.put_back(
                flight.event,
                flight.deliveries,
                durable.max_deliveries,
                delay,
                now,
            );
        }
        drop(state);
        durable.wake.notify_one();
        Ok(requeued)
    }

    /// The MANUAL-ack groups with a live member: name, pattern and member count. Copied under
    /// the group map's lock, so matching them against topics happens outside it.
    pub(super) fn durable_member_counts(&self) -> Vec<(Arc<str>, Pattern, u32)> {
        lock(&self.shared.durable.groups)
            .values()
            .filter_map(|group| {
                let members = lock(&group.state).members.len() as u32;
                (members > 0).then(|| (group.name.clone(), group.pattern.clone(), members))
            })
            .collect()
    }

    /// What each loaded MANUAL-ack group holds now, copied group by group under its own lock
    /// (see [`super::groups`]), unsorted.
    pub(super) fn durable_snapshots(&self, head: u64) -> Vec<super::groups::GroupSnapshot> {
        let groups: Vec<Arc<DurableGroup>> = lock(&self.shared.durable.groups)
            .values()
            .cloned()
            .collect();
        groups
            .iter()
            .map(|group| {
                let state = lock(&group.state);
                let cursor = state.cursor();
                let in_flight = state.in_flight.len() as u64;
                super::groups::GroupSnapshot {
                    name: group.name.to_string(),
                    pattern: group.pattern.to_string(),
                    ack_mode: super::groups::GroupAckMode::Manual,
                    members: state.members.len() as u32,
                    cursor,
                    pending: head.saturating_sub(cursor).saturating_sub(in_flight),
                    ready: (state.ready.len() + state.delayed.len()) as u64,
                    in_flight,
                    redelivered: state.redelivered,
                    dead_lettered: state.dead_lettered,
                    dropped: state.dropped,
                    parked: state.parked,
                    max_deliveries: group.max_deliveries,
                    dead_letter_topic: group.dead_letter_topic.to_string(),
                }
            })
            .collect()
    }

    /// Counts of the loaded groups (see [`DurableStats`]).
    pub fn durable_stats(&self) -> DurableStats {
        let groups = lock(&self.shared.durable.groups);
        let mut stats = DurableStats {
            groups: groups.len(),
            parked: 0,
            ready_events: 0,
            dispatcher_wakes: self.shared.durable.wakes.load(Ordering::Relaxed),
        };
        for group in groups.values() {
            let state = lock(&group.state);
            stats.parked += usize::from(state.parked);
            stats.ready_events += state.ready.len();
        }
        stats
    }

    /// Whether a live member of a MANUAL-ack group would receive an event on `topic` (queries
    /// count such groups as responders).
    pub(super) fn durable_responders(&self, topic: &Topic) -> bool {
        lock(&self.shared.durable.groups)
            .values()
            .any(|group| group.pattern.matches(topic) && !lock(&group.state).members.is_empty())
    }
}

impl DurableGroup {
    /// Whether the group delivers this event: its pattern matches, its start position admits
    /// it, and it is not one of the group's own dead letters.
    fn reads(&self, event: &crate::event::StoredEvent) -> bool {
        self.pattern.matches(&event.event.topic)
            && event.event.topic != self.dead_letter_topic
            && self.floor.admits(event)
    }
}

fn check_pattern(group: &str, bound: &Pattern, asked: &Pattern) -> Result<(), BusError> {
    if bound == asked {
        Ok(())
    } else {
        Err(BusError::invalid(
            "topic",
            format!(
                "MANUAL-ack group {group:?} reads pattern {bound}, not {asked}: a durable group \
                 keeps one pattern (use another group name)"
            ),
        ))
    }
}

/// Runs a group's dispatcher, restarting it on the same state if it panics: the panic is
/// logged at ERROR with the group's name, and the group goes on for its other members.
async fn supervise(broker: Broker, group: Arc<DurableGroup>) {
    let mut restarts = 0u32;
    loop {
        let run = std::panic::AssertUnwindSafe(dispatch(broker.clone(), group.clone()));
        match run.catch_unwind().await {
            Ok(()) => return,
            Err(panic) => {
                restarts += 1;
                let message = crate::panics::panic_message(&*panic);
                error!(
                    group = %group.name,
                    restarts,
                    panic = %message,
                    "the group's dispatcher panicked; restarting it"
                );
                // Back off so a panic on every round cannot spin a core.
                let pause = redelivery_backoff(restarts.saturating_add(1));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = broker.stopped() => {
                        save_cursor(&broker, &group, true).await;
                        return;
                    }
                }
            }
        }
    }
}

/// The dispatcher task of one group. Ends when the bus shuts down, after a last cursor save.
async fn dispatch(broker: Broker, group: Arc<DurableGroup>) {
    let mut routed = broker.shared.routed.subscribe();
    loop {
        broker.shared.durable.wakes.fetch_add(1, Ordering::Relaxed);
        let (dead, next_deadline) = step(&broker, &group);
        for (event, deliveries) in dead {
            dead_letter(&broker, &group, event, deliveries).await;
        }
        save_cursor(&broker, &group, false).await;
        let parked = lock(&group.state).park();
        if parked {
            save_cursor(&broker, &group, true).await;
            let idle = tokio::time::sleep(broker.shared.config.names_idle_after);
            tokio::select! {
                // A member joined (or a stray ack or nack came): look again.
                _ = group.wake.notified() => {}
                _ = idle => {
                    if unload(&broker, &group) {
                        return;
                    }
                }
                _ = broker.stopped() => {
                    save_cursor(&broker, &group, true).await;
                    return;
                }
            }
            // What was published while parked is read from the cursor, not from this signal.
            routed.borrow_and_update();
            continue;
        }
        let sleep = async {
            match next_deadline {
                Some(deadline) => tokio::time::sleep_until(deadline.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = group.wake.notified() => {}
            _ = routed.changed() => {}
            _ = sleep => {}
            _ = broker.stopped() => {
                save_cursor(&broker, &group, true).await;
                return;
            }
        }
    }
}

/// Takes a group that stayed parked out of the map, once its cursor is saved. Returns whether
/// it did (the dispatcher then ends).
fn unload(broker: &Broker, group: &Arc<DurableGroup>) -> bool {
    let mut groups = lock(&broker.shared.durable.groups);
    let state = lock(&group.state);
    if !state.parked || !state.members.is_empty() || state.cursor() != state.saved_cursor {
        return false;
    }
    drop(state);
    if groups
        .get(&group.name)
        .is_some_and(|loaded| Arc::ptr_eq(loaded, group))
    {
        groups.remove(&group.name);
    }
    info!(group = %group.name, "durable group unloaded after idling without members");
    true
}

/// One round of the dispatcher's work under the group lock. Returns events to dead-letter and
/// when to wake next.
fn step(broker: &Broker, group: &DurableGroup) -> (Vec<(SharedEvent, u32)>, Option<Instant>) {
    let mut state = lock(&group.state);
    let now = Instant::now();

    let expired: Vec<u64> = state
        .in_flight
        .iter()
        .filter(|(_, flight)| flight.deadline <= now)
        .map(|(sequence, _)| *sequence)
        .collect();
    for sequence in expired {
        let flight = state.land(sequence).expect("listed");
        debug!(group = %group.name, sequence, deliveries = flight.deliveries, "ack deadline passed");
        state.put_back(
            flight.event,
            flight.deliveries,
            group.max_deliveries,
            Duration::ZERO,
            now,
        );
    }
    // Due redeliveries: the limit was applied when they were put back.
    while let Some(entry) = state.delayed.first_entry() {
        if entry.key().0 > now {
            break;
        }
        let (event, deliveries) = entry.remove();
        state.make_ready(event, deliveries);
    }

    read_ahead(broker, group, &mut state);

    // Hand out ready events, round robin over members with room.
    'deliver: while !state.ready.is_empty() {
        let count = state.members.len();
        for attempt in 0..count {
            let index = (state.next_member + attempt) % count;
            let member = &state.members[index];
            if member.in_flight >= member.max_in_flight {
                continue;
            }
            let (event, deliveries) = state
                .ready
                .first_key_value()
                .map(|(_, ready)| ready.clone())
                .expect("not empty");
            match member.queue.try_send((event.clone(), deliveries + 1)) {
                Ok(()) => {
                    state.take_first_ready();
                    if deliveries > 0 {
                        state.redelivered += 1;
                    }
                    let member = &mut state.members[index];
                    member.in_flight += 1;
                    let (id, deadline) = (member.id, deadline_after(now, member.ack_deadline));
                    state.in_flight.insert(
                        event.sequence,
                        InFlight {
                            event,
                            deliveries: deliveries + 1,
                            member: id,
                            deadline,
                        },
                    );
                    state.next_member = index + 1;
                    continue 'deliver;
                }
                // A member whose stream is gone leaves when its membership drops; skip it.
                Err(_) => continue,
            }
        }
        break;
    }

    let next_deadline = [
        state.in_flight.values().map(|f| f.deadline).min(),
        state.delayed.keys().next().map(|(due, _)| *due),
        state.read_retry,
    ]
    .into_iter()
    .flatten()
    .min();
    (std::mem::take(&mut state.to_dead_letter), next_deadline)
}

/// How soon a failed read of the log is tried again.
const READ_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// Reads matching events from the log after the group's read position, up to the visible head,
/// until enough are ready.
fn read_ahead(broker: &Broker, group: &DurableGroup, state: &mut GroupState) {
    if state.members.is_empty() {
        // Nobody to deliver to: reading ahead would only hold events in memory.
        return;
    }
    let visible = broker.visible_head();
    let max_bytes = broker.config().subscriber_queue_bytes;
    while state.ready.len() < READ_AHEAD
        && state.ready_bytes < max_bytes
        && state.read_through < visible
    {
        let bytes = max_bytes - state.ready_bytes;
        let chunk =
            match broker
                .shared
                .store
                .read_after_within(state.read_through, READ_AHEAD, bytes)
            {
                Ok(chunk) => chunk,
                Err(error) => {
                    warn!(group = %group.name, %error, "reading the log failed; retrying shortly");
                    state.read_retry = Some(std::time::Instant::now() + READ_RETRY);
                    return;
                }
            };
        state.read_retry = None;
        let Some(first) = chunk.first() else {
            return;
        };
        if first.sequence > state.read_through + 1 {
            let lost = first.sequence - 1 - state.read_through;
            state.dropped += lost;
            warn!(
                group = %group.name,
                from = state.read_through + 1,
                to = first.sequence - 1,
                lost,
                "retention dropped events this group had not read"
            );
        }
        for event in chunk {
            if event.sequence > visible {
                break;
            }
            state.read_through = event.sequence;
            let deliveries = state.redeliveries.remove(&event.sequence).unwrap_or(0);
            if group.reads(&event) {
                state.make_ready(event, deliveries);
            }
        }
    }
}

/// Publishes an event that had all its deliveries to the group's dead-letter topic, with where it
/// came from as attributes, then lets the cursor pass it.
async fn dead_letter(broker: &Broker, group: &DurableGroup, event: SharedEvent, deliveries: u32) {
    let letter = dead_letter_event(&event, &group.name, &group.dead_letter_topic, deliveries);
    warn!(
        group = %group.name,
        sequence = event.sequence,
        deliveries,
        dead_letter_topic = %group.dead_letter_topic,
        "moving an event to the dead-letter topic"
    );
    let published = match broker.append(vec![letter], Responders::Optional) {
        Ok(pending) => pending.finish().await.map(|_| ()),
        Err(error) => Err(error),
    };
    let mut state = lock(&group.state);
    match published {
        Ok(()) => {
            broker
                .metrics()
                .family(crate::metrics::topic_family(event.event.topic.as_str()))
                .dead_lettered
                .inc();
            state.dead_lettered += 1;
            state.dead_lettering.remove(&event.sequence);
        }
        Err(error) => {
            // Keep it outstanding (the cursor stays before it) so a restart tries again.
            warn!(group = %group.name, sequence = event.sequence, %error, "dead-lettering failed");
        }
    }
}

/// The event published to a dead-letter topic for `event`, after `deliveries` deliveries to
/// `group`: the original with the dead-letter topic, a [`dead_letter_id`], and the attributes
/// `dlq_original_topic`, `dlq_original_sequence`, `dlq_attempts` and `dlq_group`.
pub fn dead_letter_event(
    event: &crate::event::StoredEvent,
    group: &str,
    dead_letter_topic: &Topic,
    deliveries: u32,
) -> Event {
    let original = &event.event;
    let mut attributes = original.attributes.clone();
    attributes.insert("dlq_original_topic".into(), original.topic.to_string());
    attributes.insert("dlq_original_sequence".into(), event.sequence.to_string());
    attributes.insert("dlq_attempts".into(), deliveries.to_string());
    attributes.insert("dlq_group".into(), group.to_owned());
    Event {
        id: dead_letter_id(&original.id, event.sequence),
        topic: dead_letter_topic.clone(),
        attributes,
        ..original.clone()
    }
}

/// The id of a dead letter: the original's id with `.dlq.<sequence>` (unique per source, so a
/// retry of the dead-lettering after a crash is deduplicated). A dead letter of a dead letter
/// (groups that feed each other) replaces the earlier suffix instead of growing the id by one
/// suffix per round, so the event stays deliverable within the size rule of
/// [`crate::service::convert`].
pub fn dead_letter_id(id: &str, sequence: u64) -> String {
    let root = match id.rsplit_once(".dlq.") {
        Some((root, digits))
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) =>
        {
            root
        }
        _ => id,
    };
    format!("{root}.dlq.{sequence}")
}

/// Saves the cursor if it moved (at most every [`SAVE_INTERVAL`], unless `now`).
async fn save_cursor(broker: &Broker, group: &DurableGroup, now: bool) {
    let cursor = {
        let state = lock(&group.state);
        let cursor = state.cursor();
        let due = now
            || state
                .last_save
                .is_none_or(|at| at.elapsed() >= SAVE_INTERVAL);
        if cursor == state.saved_cursor || !due {
            return;
        }
        cursor
    };
    let store = broker.shared.store.clone();
    let name = group.name.to_string();
    let saved = GroupCursor {
        pattern: group.pattern.to_string(),
        cursor,
        not_before: group.floor.not_before,
    };
    // A save may fsync: keep it off the async workers.
    let result = tokio::task::spawn_blocking(move || store.save_group_cursor(&name, &saved)).await;
    let mut state = lock(&group.state);
    state.last_save = Some(Instant::now());
    match result {
        Ok(Ok(())) => state.saved_cursor = cursor,
        Ok(Err(error)) => warn!(group = %group.name, %error, "saving the group cursor failed"),
        Err(error) => warn!(group = %group.name, %error, "saving the group cursor panicked"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::StoredEvent;
    use proptest::prelude::*;

    fn stored(sequence: u64) -> SharedEvent {
        Arc::new(StoredEvent::new(
            sequence,
            SystemTime::UNIX_EPOCH,
            Event {
                id: format!("e{sequence}"),
                ..Event::for_test("a.b")
            },
        ))
    }

    mod parking {
        use std::time::Instant;

        use futures_util::StreamExt as _;

        use super::super::super::{AckMode, Delivery, SubscribeOptions, Subscription};
        use super::*;
        use crate::broker::BusConfig;
        use crate::store::MemoryStore;

        const WITHIN: Duration = Duration::from_secs(60);

        fn bus(config: BusConfig) -> Broker {
            Broker::new(config, Arc::new(MemoryStore::new(100_000, 1 << 30)))
        }

        fn event(topic: &str) -> Event {
            Event {
                topic: Topic::parse(topic).unwrap(),
                ..stored(0).event.clone()
            }
        }

        fn join(broker: &Broker, group: &str, start: StartPosition) -> Subscription {
            broker
                .subscribe(SubscribeOptions {
                    pattern: Pattern::parse("jobs.>").unwrap(),
                    group: Some(Arc::from(group)),
                    subscriber: Arc::from("worker"),
                    start,
                    ack: AckMode::Manual(ManualAck::default()),
                    log_id: None,
                })
                .unwrap()
        }

        async fn publish_each(broker: &Broker, count: usize) -> Duration {
            let started = Instant::now();
            for i in 0..count {
                let mut event = event("jobs.run");
                event.id = format!("e{i}-{}", crate::event::new_id());
                broker.publish(vec![event]).await.unwrap();
            }
            started.elapsed()
        }

        async fn until(what: &str, mut check: impl FnMut() -> bool) {
            let deadline = Instant::now() + WITHIN;
            while !check() {
                assert!(Instant::now() < deadline, "timed out waiting for {what}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }

        async fn next_event(subscription: &mut Subscription) -> (u64, u32) {
            loop {
                let delivery = tokio::time::timeout(WITHIN, subscription.next())
                    .await
                    .expect("a delivery in time")
                    .expect("open")
                    .expect("no error");
                if let Delivery::Event { event, attempt } = delivery {
                    return (event.sequence, attempt);
                }
            }
        }

        /// 2,000 groups that joined and left are parked: publishing does not wake their
        /// dispatchers, they hold no read-ahead, and the publish rate stays near the rate
        /// without them.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn groups_without_members_are_not_woken_by_publishes() {
            const GROUPS: usize = 2_000;
            const EVENTS: usize = 10_000;
            let broker = bus(BusConfig::default());
            let alone = publish_each(&broker, EVENTS).await;

            for index in 0..GROUPS {
                // Half from earliest: those would hold a full read-ahead if they did not park.
                let start = if index % 2 == 0 {
                    StartPosition::Earliest
                } else {
                    StartPosition::Latest
                };
                drop(join(&broker, &format!("g{index}"), start));
            }
            // Settled: no dispatcher wakes for 200 ms.
            let mut last = broker.durable_stats().dispatcher_wakes;
            let deadline = Instant::now() + WITHIN;
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let now = broker.durable_stats().dispatcher_wakes;
                if now == last {
                    break;
                }
                assert!(Instant::now() < deadline, "dispatchers never settled");
                last = now;
            }
            let before = broker.durable_stats();
            assert_eq!(before.ready_events, 0, "parked groups hold no read-ahead");

            let with_groups = publish_each(&broker, EVENTS).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            let after = broker.durable_stats();
            let ratio = alone.as_secs_f64() / with_groups.as_secs_f64();
            println!(
                "publish rate with {GROUPS} parked groups / without: {ratio:.2} \
                 ({EVENTS} events in {with_groups:?} vs {alone:?}); dispatcher wake-ups \
                 during the publishes: {}",
                after.dispatcher_wakes - before.dispatcher_wakes
            );
            // Unparked, each publish would wake every group: GROUPS x EVENTS wake-ups.
            assert!(
                after.dispatcher_wakes - before.dispatcher_wakes < 100,
                "parked dispatchers were woken: {before:?} -> {after:?}"
            );
            assert_eq!(after.ready_events, 0);
            assert_eq!(after.parked, GROUPS);
            assert!(ratio > 0.2, "publishing slowed to {ratio:.2} of its rate");
            broker.finish().await;
        }

        /// A parked group resumes from its cursor when a member joins: what was delivered and
        /// not acked comes again (with its delivery count), then what was published meanwhile.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_parked_group_resumes_from_its_cursor_at_least_once() {
            let broker = bus(BusConfig::default());
            let mut member = join(&broker, "workers", StartPosition::Latest);
            publish_each(&broker, 4).await;
            let mut delivered = Vec::new();
            for _ in 0..4 {
                delivered.push(next_event(&mut member).await);
            }
            assert!(delivered.iter().all(|(_, attempt)| *attempt == 1));
            let sequences: Vec<u64> = delivered.iter().map(|(s, _)| *s).collect();
            broker.ack("workers", &sequences[..2]).unwrap();
            drop(member);
            until("the group to park", || broker.durable_stats().parked == 1).await;
            publish_each(&broker, 2).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(broker.durable_stats().ready_events, 0);

            let mut member = join(&broker, "workers", StartPosition::Latest);
            let mut again = Vec::new();
            for _ in 0..4 {
                again.push(next_event(&mut member).await);
            }
            let last = sequences[3];
            assert_eq!(
                again,
                [
                    (sequences[2], 2),
                    (sequences[3], 2),
                    (last + 1, 1),
                    (last + 2, 1)
                ],
                "unacked events come again with their count, then the new ones"
            );
            broker.finish().await;
        }

        /// A group parked for `names_idle_after` leaves the map; joining again resumes it from
        /// the saved cursor.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn an_idle_group_is_unloaded_and_resumes_from_its_saved_cursor() {
            let broker = bus(BusConfig {
                names_idle_after: Duration::from_millis(300),
                ..BusConfig::default()
            });
            let mut member = join(&broker, "workers", StartPosition::Latest);
            publish_each(&broker, 3).await;
            let (first, _) = next_event(&mut member).await;
            broker.ack("workers", &[first]).unwrap();
            drop(member);
            until("the group to be unloaded", || {
                broker.durable_stats().groups == 0
            })
            .await;
            let mut member = join(&broker, "workers", StartPosition::Latest);
            assert_eq!(member.info().group_cursor, Some(first));
            assert_eq!(next_event(&mut member).await, (first + 1, 1));
            broker.finish().await;
        }
    }

    #[test]
    fn the_backoff_starts_after_the_first_redelivery_and_is_bounded() {
        assert_eq!(redelivery_backoff(1), Duration::ZERO);
        assert_eq!(redelivery_backoff(2), REDELIVERY_BACKOFF_BASE);
        assert_eq!(redelivery_backoff(3), REDELIVERY_BACKOFF_BASE * 2);
        assert_eq!(redelivery_backoff(u32::MAX), REDELIVERY_BACKOFF_MAX);
    }

    #[test]
    fn dead_letter_ids_carry_one_suffix() {
        assert_eq!(dead_letter_id("order-1", 7), "order-1.dlq.7");
        assert_eq!(dead_letter_id("order-1.dlq.7", 9), "order-1.dlq.9");
        assert_eq!(dead_letter_id("a.dlq.b", 9), "a.dlq.b.dlq.9");
        assert_eq!(dead_letter_id("a.dlq.", 9), "a.dlq..dlq.9");
    }

    proptest! {
        /// Whatever order events come back in, and however (nack now or later, deadline,
        /// leave), they wait in sequence order, and none is delivered past the limit.
        #[test]
        fn put_back_keeps_order_and_the_limit(
            returns in proptest::collection::vec((1u64..50, 1u32..8, 0u64..3), 1..60),
            max in 1u32..6,
        ) {
            let mut state = GroupState::default();
            let now = Instant::now();
            for (sequence, deliveries, delay_ms) in returns {
                if state.ready.contains_key(&sequence)
                    || state.delayed.values().any(|(e, _)| e.sequence == sequence)
                    || state.dead_lettering.contains(&sequence)
                {
                    continue;
                }
                state.put_back(stored(sequence), deliveries, max, Duration::from_millis(delay_ms), now);
                if deliveries >= max {
                    prop_assert!(state.dead_lettering.contains(&sequence));
                } else if delay_ms == 0 && deliveries <= 1 {
                    prop_assert!(state.ready.contains_key(&sequence));
                } else {
                    let due = state.delayed.iter().find(|(_, (e, _))| e.sequence == sequence);
                    let ((due, _), _) = due.expect("delayed");
                    let wanted = Duration::from_millis(delay_ms).max(redelivery_backoff(deliveries));
                    prop_assert!(*due >= now + wanted);
                }
            }
            let order: Vec<u64> = state.ready.keys().copied().collect();
            let mut sorted = order.clone();
            sorted.sort_unstable();
            prop_assert_eq!(order, sorted);
            prop_assert!(state.to_dead_letter.iter().all(|(_, d)| *d >= max));
        }

        /// Any Duration the wire can carry either is refused at the edge or makes a deadline
        /// without overflow.
        #[test]
        fn wire_durations_never_overflow_a_deadline(seconds in any::<i64>(), nanos in any::<i32>()) {
            let wire = prost_types::Duration { seconds, nanos };
            if let Ok(duration) = crate::service::convert::non_negative_duration(&wire, "d") {
                let deadline = deadline_after(Instant::now(), duration);
                prop_assert!(deadline >= Instant::now());
                let _ = deadline_after(Instant::now(), redelivery_backoff(nanos as u32).max(duration));
            }
        }
    }
}
