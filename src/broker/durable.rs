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
//! Lock order: the broker's routing lock, then the group map, then one group's state.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use super::{Broker, Responders, StartPosition};
use crate::error::BusError;
use crate::event::{Event, SharedEvent};
use crate::store::GroupCursor;
use crate::topic::{Pattern, Topic, MAX_TOPIC_BYTES};

/// How often, at most, a moving cursor is saved.
pub const SAVE_INTERVAL: Duration = Duration::from_millis(50);
/// Events read from the log ahead of delivery.
const READ_AHEAD: usize = 512;

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
}

struct DurableGroup {
    name: Arc<str>,
    pattern: Pattern,
    max_deliveries: u32,
    dead_letter_topic: Topic,
    state: Mutex<GroupState>,
    wake: Notify,
}

#[derive(Default)]
struct GroupState {
    /// The highest sequence read from the log (matching or not).
    read_through: u64,
    /// Events to deliver, with the deliveries they had so far.
    ready: VecDeque<(SharedEvent, u32)>,
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
            self.ready.iter().map(|(e, _)| e.sequence).min(),
            self.in_flight.keys().next().copied(),
            self.delayed.values().map(|(e, _)| e.sequence).min(),
            self.dead_lettering.iter().next().copied(),
        ];
        match outstanding.into_iter().flatten().min() {
            Some(smallest) => smallest - 1,
            None => self.read_through,
        }
    }

    fn member_mut(&mut self, id: u64) -> Option<&mut Member> {
        self.members.iter_mut().find(|m| m.id == id)
    }

    /// Hands an event back for another delivery, or to the dead-letter list once it had all
    /// its deliveries.
    fn requeue(&mut self, event: SharedEvent, deliveries: u32, max: u32) {
        if deliveries >= max {
            self.dead_lettering.insert(event.sequence);
            self.to_dead_letter.push((event, deliveries));
        } else {
            self.ready.push_front((event, deliveries));
        }
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
        for sequence in orphaned {
            let flight = state.in_flight.remove(&sequence).expect("listed");
            state.requeue(flight.event, flight.deliveries, self.group.max_deliveries);
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
                let saved = self.shared.store.load_group_cursors()?.remove(&**group);
                let (cursor, truncated) = match saved {
                    Some(saved) => {
                        check_pattern(
                            group,
                            &Pattern::parse(&saved.pattern).map_err(|_| {
                                BusError::invalid("group", "its saved pattern is unreadable")
                            })?,
                            pattern,
                        )?;
                        self.clamp_to_held(saved.cursor)
                    }
                    None => self.start_cursor(start)?,
                };
                let durable = Arc::new(DurableGroup {
                    name: group.clone(),
                    pattern: pattern.clone(),
                    max_deliveries: settings.max_deliveries.max(1),
                    dead_letter_topic: settings
                        .dead_letter_topic
                        .clone()
                        .unwrap_or_else(|| default_dead_letter_topic(group)),
                    state: Mutex::new(GroupState {
                        read_through: cursor,
                        saved_cursor: cursor,
                        ..GroupState::default()
                    }),
                    wake: Notify::new(),
                });
                info!(group = %group, pattern = %pattern, cursor, "durable group started");
                groups.insert(group.clone(), durable.clone());
                self.shared
                    .tasks
                    .spawn(dispatch(self.clone(), durable.clone()));
                (durable, truncated)
            }
        };
        drop(groups);
        let id = self
            .shared
            .next_subscription_id
            .fetch_add(1, Ordering::Relaxed);
        let max_in_flight = settings.max_in_flight.max(1) as usize;
        let (sender, receiver) = mpsc::channel(max_in_flight);
        let cursor = {
            let mut state = lock(&durable.state);
            state.members.push(Member {
                id,
                queue: sender,
                in_flight: 0,
                max_in_flight,
                ack_deadline: settings.ack_deadline,
            });
            state.cursor()
        };
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
        for sequence in sequences {
            if let Some(flight) = state.in_flight.remove(sequence) {
                if let Some(member) = state.member_mut(flight.member) {
                    member.in_flight -= 1;
                }
                acknowledged += 1;
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

    /// Hands events of a MANUAL-ack group back, to be delivered again after `delay`.
    pub fn nack(&self, group: &str, sequences: &[u64], delay: Duration) -> Result<u32, BusError> {
        let durable = self.durable_group(group)?;
        let mut state = lock(&durable.state);
        let due = Instant::now() + delay;
        let mut requeued = 0;
        for sequence in sequences {
            let Some(flight) = state.in_flight.remove(sequence) else {
                continue;
            };
            if let Some(member) = state.member_mut(flight.member) {
                member.in_flight -= 1;
            }
            requeued += 1;
            if delay.is_zero() {
                state.ready.push_front((flight.event, flight.deliveries));
            } else {
                state
                    .delayed
                    .insert((due, *sequence), (flight.event, flight.deliveries));
            }
        }
        drop(state);
        durable.wake.notify_one();
        Ok(requeued)
    }

    /// The MANUAL-ack groups whose pattern matches `topic`, with their live member counts.
    pub(super) fn durable_members(&self, topic: &Topic) -> Vec<(String, u32)> {
        lock(&self.shared.durable.groups)
            .values()
            .filter(|group| group.pattern.matches(topic))
            .map(|group| {
                let members = lock(&group.state).members.len() as u32;
                (group.name.to_string(), members)
            })
            .filter(|(_, members)| *members > 0)
            .collect()
    }

    /// Whether a live member of a MANUAL-ack group would receive an event on `topic` (queries
    /// count such groups as responders).
    pub(super) fn durable_responders(&self, topic: &Topic) -> bool {
        lock(&self.shared.durable.groups)
            .values()
            .any(|group| group.pattern.matches(topic) && !lock(&group.state).members.is_empty())
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

/// The dispatcher task of one group. Ends when the bus shuts down, after a last cursor save.
async fn dispatch(broker: Broker, group: Arc<DurableGroup>) {
    let mut routed = broker.shared.routed.subscribe();
    loop {
        let (dead, next_deadline) = step(&broker, &group);
        for (event, deliveries) in dead {
            dead_letter(&broker, &group, event, deliveries).await;
        }
        save_cursor(&broker, &group, false).await;
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
        let flight = state.in_flight.remove(&sequence).expect("listed");
        if let Some(member) = state.member_mut(flight.member) {
            member.in_flight -= 1;
        }
        debug!(group = %group.name, sequence, deliveries = flight.deliveries, "ack deadline passed");
        state.requeue(flight.event, flight.deliveries, group.max_deliveries);
    }
    while let Some(entry) = state.delayed.first_entry() {
        if entry.key().0 > now {
            break;
        }
        let (event, deliveries) = entry.remove();
        state.requeue(event, deliveries, group.max_deliveries);
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
            let (event, deliveries) = state.ready.front().cloned().expect("not empty");
            match member.queue.try_send((event.clone(), deliveries + 1)) {
                Ok(()) => {
                    state.ready.pop_front();
                    let member = &mut state.members[index];
                    member.in_flight += 1;
                    let (id, deadline) = (member.id, now + member.ack_deadline);
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
    ]
    .into_iter()
    .flatten()
    .min();
    (std::mem::take(&mut state.to_dead_letter), next_deadline)
}

/// Reads matching events from the log after the group's read position, up to the visible head,
/// until enough are ready.
fn read_ahead(broker: &Broker, group: &DurableGroup, state: &mut GroupState) {
    let visible = broker.visible_head();
    while state.ready.len() < READ_AHEAD && state.read_through < visible {
        let chunk = match broker
            .shared
            .store
            .read_after(state.read_through, READ_AHEAD)
        {
            Ok(chunk) => chunk,
            Err(error) => {
                warn!(group = %group.name, %error, "reading the log failed; retrying on the next wake");
                return;
            }
        };
        let Some(first) = chunk.first() else {
            return;
        };
        if first.sequence > state.read_through + 1 {
            warn!(
                group = %group.name,
                from = state.read_through + 1,
                to = first.sequence - 1,
                "retention dropped events this group had not read"
            );
        }
        for event in chunk {
            if event.sequence > visible {
                break;
            }
            state.read_through = event.sequence;
            if group.pattern.matches(&event.event.topic) {
                state.ready.push_back((event, 0));
            }
        }
    }
}

/// Publishes an event that had all its deliveries to the group's dead-letter topic, with where it
/// came from as attributes, then lets the cursor pass it.
async fn dead_letter(broker: &Broker, group: &DurableGroup, event: SharedEvent, deliveries: u32) {
    let original = &event.event;
    let mut attributes = original.attributes.clone();
    attributes.insert("dlq_original_topic".into(), original.topic.to_string());
    attributes.insert("dlq_original_sequence".into(), event.sequence.to_string());
    attributes.insert("dlq_attempts".into(), deliveries.to_string());
    attributes.insert("dlq_group".into(), group.name.to_string());
    let letter = Event {
        id: format!("{}.dlq.{}", original.id, event.sequence),
        topic: group.dead_letter_topic.clone(),
        attributes,
        ..original.clone()
    };
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
            state.dead_lettering.remove(&event.sequence);
        }
        Err(error) => {
            // Keep it outstanding (the cursor stays before it) so a restart tries again.
            warn!(group = %group.name, sequence = event.sequence, %error, "dead-lettering failed");
        }
    }
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
