//! One subscription's stream: a replay from storage (when it starts in the past), then live
//! events from its queue.
//!
//! # Replay without gaps or duplicates
//! A subscription that starts in the past is not put in the subject tree at once. It reads the
//! store in chunks from its start; when a read comes back short (it is near the head), it takes
//! the routing lock, reads what was appended since, and registers, all while no publish can run.
//! Everything up to the head at that moment comes from the store, everything after from the
//! queue. The `caught_up` marker sits between the two. Since the store holds every event
//! published after the `subscribed` confirmation, the confirmation's promise holds during the
//! replay too.
//!
//! # Falling behind
//! A live subscriber whose queue has no room for an event (see [`super::delivery`]) goes back
//! to the same replay, from that event, keeping its registration, and switches to live the
//! same way, so falling behind costs it no event and no duplicate. It gets no second
//! `caught_up`: the marker ends the replay the client asked for. While catching up it is ended
//! only when retention dropped events it has not read (`ReplayOverrun`) or when it is more than
//! `max_subscriber_lag` sequences behind the head (checked as it reads the log). A replay reads
//! in chunks bounded in events and bytes, so a stalled one holds at most about two chunks.

use std::collections::VecDeque;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use futures_util::stream::{self, BoxStream, Stream};
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::durable::{ManualAck, Membership};
use super::{Broker, Registration, RegistrationRequest};
use crate::error::BusError;
use crate::event::{SharedEvent, StoredEvent};
use crate::metrics::{FamilyCache, GaugeGuard, Metrics, SlowEnding};
use crate::topic::Pattern;

/// Events read from the store per step of a replay.
const REPLAY_CHUNK: usize = 512;

/// The one rule for what a start position admits, applied on every path that delivers events
/// (replay, the switch to live, live queues, MANUAL-ack groups, and so the SDK's resumes, which
/// ask for `after_sequence`): an event is delivered only if its sequence is greater than
/// `after_sequence` and it was published at or after `from_time`. The proto promises exactly
/// that ("every held event with a sequence greater than this one"), so a start ahead of the
/// head, or a `from_time` in the future, waits for the log to get there rather than delivering
/// what comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StartFloor {
    /// Events up to and including this sequence are not delivered (0: none are held back).
    pub after_sequence: u64,
    /// Events published before this time are not delivered.
    pub not_before: Option<SystemTime>,
}

impl StartFloor {
    /// The floor a start position sets. `Latest` and `Earliest` hold nothing back: latest is
    /// enforced by where the subscription registers, earliest takes everything held.
    pub fn of(start: StartPosition) -> StartFloor {
        match start {
            StartPosition::Latest | StartPosition::Earliest => StartFloor::default(),
            StartPosition::AfterSequence(sequence) => StartFloor {
                after_sequence: sequence,
                not_before: None,
            },
            StartPosition::FromTime(time) => StartFloor {
                after_sequence: 0,
                not_before: Some(time),
            },
        }
    }

    /// Whether `event` may be delivered under this floor.
    pub fn admits(&self, event: &StoredEvent) -> bool {
        event.sequence > self.after_sequence
            && self
                .not_before
                .is_none_or(|time| event.publish_time >= time)
    }

    /// Whether the floor can still hold anything back. Sequences and publish times only grow,
    /// so once an event passed, every later one passes too and the check can be dropped.
    pub fn is_open(&self) -> bool {
        self.after_sequence == 0 && self.not_before.is_none()
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartPosition {
    /// Only events published after the confirmation.
    #[default]
    Latest,
    /// Everything still held.
    Earliest,
    /// Every held event with a greater sequence.
    AfterSequence(u64),
    /// Every held event published at or after this time.
    FromTime(SystemTime),
}

/// What a subscriber asks for.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    pub pattern: Pattern,
    /// Members of one group on one pattern share its events.
    pub group: Option<Arc<str>>,
    /// The subscribing service, for the topology and logs.
    pub subscriber: Arc<str>,
    pub start: StartPosition,
    pub ack: AckMode,
    /// The log `start` was taken from (a `log_id` the client saw before). When the bus's log is
    /// another one, a position in the old log means nothing here: the subscription starts at the
    /// oldest held event instead and [`SubscriptionInfo::log_changed`] says so.
    pub log_id: Option<String>,
}

impl SubscribeOptions {
    /// For unit tests: a live AUTO subscription to `pattern` by subscriber `test`, in no
    /// group. Tests change what they need with struct update syntax.
    #[cfg(test)]
    pub(crate) fn for_test(pattern: &str) -> SubscribeOptions {
        SubscribeOptions {
            pattern: Pattern::parse(pattern).expect("a valid test pattern"),
            group: None,
            subscriber: Arc::from("test"),
            start: StartPosition::Latest,
            ack: AckMode::Auto,
            log_id: None,
        }
    }
}

/// How deliveries are confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AckMode {
    /// Delivered means done (at most once).
    #[default]
    Auto,
    /// At least once, for a consumer group: see [`super::durable`].
    Manual(ManualAck),
}

/// The confirmation of a subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionInfo {
    pub id: u64,
    pub pattern: Pattern,
    pub group: Option<Arc<str>>,
    /// The last sequence assigned when the subscription was confirmed.
    pub head_sequence: u64,
    /// The oldest sequence held then, if any.
    pub oldest_sequence: Option<u64>,
    /// The requested start was older than anything held: the replay starts at the oldest.
    pub start_truncated: bool,
    /// The identity of the log (see [`crate::store::Store::log_id`]).
    pub log_id: String,
    /// MANUAL-ack groups: the group's cursor when this member joined.
    pub group_cursor: Option<u64>,
    /// The request named a log other than this bus's: its start position was dropped and the
    /// subscription starts at the oldest held event.
    pub log_changed: bool,
    /// MANUAL-ack groups: events the group had not acknowledged that retention dropped before
    /// they could be delivered (since the group started on this bus). See [`super::durable`].
    pub group_dropped: u64,
}

/// One item of a subscription stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// An event; `attempt` counts its deliveries to a MANUAL-ack group (from 1), 0 otherwise.
    Event { event: SharedEvent, attempt: u32 },
    /// The replay reached the live head; this is the last replayed sequence (the head then).
    CaughtUp { sequence: u64 },
}

/// An open subscription: its confirmation and its stream of deliveries. Dropping it
/// unsubscribes.
pub struct Subscription {
    info: SubscriptionInfo,
    deliveries: BoxStream<'static, Result<Delivery, BusError>>,
    /// Deliveries and slow endings are counted as they leave the stream.
    metrics: Metrics,
    families: FamilyCache,
    /// Counts this subscription as open while it lives.
    _open: GaugeGuard,
}

impl Subscription {
    pub fn info(&self) -> &SubscriptionInfo {
        &self.info
    }

    pub(super) fn open(
        broker: Broker,
        options: SubscribeOptions,
    ) -> Result<Subscription, BusError> {
        let mut options = options;
        // A position in another log means nothing in this one: start from what this log holds.
        let log_changed = options
            .log_id
            .as_deref()
            .is_some_and(|asked| !asked.is_empty() && asked != broker.log_id());
        if log_changed && options.start != StartPosition::Latest {
            options.start = StartPosition::Earliest;
        }
        if let AckMode::Manual(settings) = &options.ack {
            let settings = settings.clone();
            return Subscription::join_durable(broker, options, &settings, log_changed);
        }
        if options.group.is_some() && options.start != StartPosition::Latest {
            return Err(BusError::invalid(
                "start",
                "a live (AUTO-ack) group starts at latest: its members share live events; \
                 for a group that starts in the past and keeps a cursor, use ack_mode MANUAL",
            ));
        }
        let queue_size = broker.config().subscriber_queue_size;
        let store = broker.shared.store.clone();
        let request = RegistrationRequest {
            pattern: &options.pattern,
            group: options.group.as_ref(),
            subscriber: Some(&*options.subscriber),
            queue_size,
            only_correlation: None,
        };
        // Whether the replay starts at whatever is oldest when it first reads: then events
        // dropped between this confirmation and that read are no loss to the subscriber.
        let from_oldest_held = options.start == StartPosition::Earliest;
        let (phase, bounds, start_truncated) = match options.start {
            StartPosition::Latest => {
                let mut routing = broker.lock_routing();
                let registration = broker.register_locked(&mut routing, request);
                let bounds = broker.visible_bounds();
                drop(routing);
                (Phase::Live(registration), bounds, false)
            }
            start => {
                let bounds = broker.visible_bounds();
                let (after, truncated) = match start {
                    StartPosition::Earliest => (bounds.first_available() - 1, false),
                    StartPosition::AfterSequence(sequence) => {
                        let oldest_wanted = sequence.saturating_add(1);
                        let first = bounds.first_available();
                        if oldest_wanted < first {
                            (first - 1, true)
                        } else {
                            (sequence, false)
                        }
                    }
                    StartPosition::FromTime(time) => {
                        // Publish times never go backwards, so if the newest dropped event is
                        // not before `time`, events the subscriber asked for are gone.
                        let truncated = bounds.newest_dropped_time.is_some_and(|t| t >= time);
                        match store.first_sequence_at_or_after(time)? {
                            Some(sequence) => (sequence - 1, truncated),
                            None => (bounds.head, truncated),
                        }
                    }
                    StartPosition::Latest => unreachable!("handled above"),
                };
                (
                    Phase::Replay {
                        after,
                        rejoin: None,
                    },
                    bounds,
                    truncated,
                )
            }
        };
        let id = match &phase {
            Phase::Live(registration) => registration.id,
            _ => broker
                .shared
                .next_subscription_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        };
        let info = SubscriptionInfo {
            id,
            pattern: options.pattern.clone(),
            group: options.group.clone(),
            head_sequence: bounds.head,
            oldest_sequence: bounds.oldest,
            start_truncated,
            log_id: broker.log_id().to_owned(),
            group_cursor: None,
            log_changed,
            group_dropped: 0,
        };
        Ok(Subscription::from_cursor(
            info,
            Cursor {
                floor: StartFloor::of(options.start),
                broker,
                options,
                queue_size,
                been_live: matches!(phase, Phase::Live(_)),
                phase,
                pending: VecDeque::new(),
                caught_up: None,
                last_delivered: 0,
                from_oldest_held: from_oldest_held || start_truncated,
                ending: None,
                shutdown: None,
            },
        ))
    }

    fn from_cursor(info: SubscriptionInfo, cursor: Cursor) -> Subscription {
        // Polled in place: an `unfold` would move the whole cursor in and out of a new future
        // for every event (`memmove` led the bus's pub/sub profile).
        let mut cursor = cursor;
        let metrics = cursor.broker.metrics().clone();
        let deliveries = stream::poll_fn(move |cx| cursor.poll_next(cx));
        Subscription {
            info,
            deliveries: Box::pin(deliveries),
            _open: metrics.subscription_opened(),
            metrics,
            families: FamilyCache::default(),
        }
    }

    /// A member whose group's home is another node: `deliveries` come from there (see
    /// [`super::relay`]), and are counted here as any subscription's are.
    pub(super) fn relayed(
        broker: &Broker,
        info: SubscriptionInfo,
        deliveries: BoxStream<'static, Result<Delivery, BusError>>,
    ) -> Subscription {
        let metrics = broker.metrics().clone();
        Subscription {
            info,
            deliveries,
            _open: metrics.subscription_opened(),
            metrics,
            families: FamilyCache::default(),
        }
    }

    /// The deliveries without the counting: a group's home relays them to the member's node,
    /// which counts them as its client takes them (and counts the subscription as open), so a
    /// relayed member is counted once across the cluster.
    pub(super) fn into_uncounted(self) -> BoxStream<'static, Result<Delivery, BusError>> {
        self.deliveries
    }

    /// Joins a MANUAL-ack group: the group's dispatcher feeds this member.
    fn join_durable(
        broker: Broker,
        options: SubscribeOptions,
        settings: &ManualAck,
        log_changed: bool,
    ) -> Result<Subscription, BusError> {
        let Some(group) = options.group.clone() else {
            return Err(BusError::invalid(
                "group",
                "ack_mode MANUAL needs a consumer group: the bus keeps the group's cursor",
            ));
        };
        let joined = broker.join_durable(
            &group,
            &options.pattern,
            &options.subscriber,
            options.start,
            settings,
        )?;
        let bounds = broker.visible_bounds();
        let info = SubscriptionInfo {
            id: joined.membership.id(),
            pattern: options.pattern.clone(),
            group: Some(group),
            head_sequence: bounds.head,
            oldest_sequence: bounds.oldest,
            start_truncated: joined.start_truncated,
            log_id: broker.log_id().to_owned(),
            group_cursor: Some(joined.cursor),
            log_changed,
            group_dropped: joined.dropped,
        };
        let queue_size = settings.max_in_flight as usize;
        Ok(Subscription::from_cursor(
            info,
            Cursor {
                // The group's dispatcher applies the floor when it reads the log.
                floor: StartFloor::default(),
                broker,
                options,
                queue_size,
                phase: Phase::Durable(joined.membership),
                been_live: true,
                pending: VecDeque::new(),
                caught_up: None,
                last_delivered: 0,
                from_oldest_held: false,
                ending: None,
                shutdown: None,
            },
        ))
    }
}

impl Stream for Subscription {
    type Item = Result<Delivery, BusError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let polled = this.deliveries.as_mut().poll_next(cx);
        match &polled {
            Poll::Ready(Some(Ok(Delivery::Event { event, attempt }))) => {
                let counters = this.families.get(&this.metrics, event.event.topic.as_str());
                counters.delivered.inc();
                if *attempt > 1 {
                    counters.redelivered.inc();
                }
            }
            Poll::Ready(Some(Err(error))) => {
                let ending = match error {
                    BusError::SlowConsumer { .. } => Some(SlowEnding::SlowConsumer),
                    BusError::SlowGroupMember { .. } => Some(SlowEnding::SlowGroupMember),
                    BusError::ReplayOverrun { .. } => Some(SlowEnding::ReplayOverrun),
                    _ => None,
                };
                if let Some(ending) = ending {
                    this.metrics.slow_consumer_ended(ending);
                }
            }
            _ => {}
        }
        polled
    }
}

enum Phase {
    /// Reading the store; everything up to `after` is done. `rejoin` is the registration of a
    /// subscriber that left the live path (its queue was full, see [`super::delivery`]): it
    /// goes back live with it instead of registering anew.
    Replay {
        after: u64,
        rejoin: Option<Registration>,
    },
    /// In the subject tree, reading the queue.
    Live(Registration),
    /// A member of a MANUAL-ack group, reading what its dispatcher hands it.
    Durable(Membership),
    /// Ended; the stream yields nothing more.
    Done,
}

/// The state behind a subscription stream.
struct Cursor {
    /// What the start position holds back, on the replay and on the live queue alike.
    floor: StartFloor,
    broker: Broker,
    options: SubscribeOptions,
    queue_size: usize,
    phase: Phase,
    /// Replayed events not yet yielded.
    pending: VecDeque<SharedEvent>,
    /// The `caught_up` marker to yield once `pending` is empty.
    caught_up: Option<u64>,
    /// Whether the subscription has been live: a `caught_up` marker is sent (or was never due,
    /// for a start at latest), so switching back to live after catching up sends none.
    been_live: bool,
    /// An error to end with once `pending` is delivered (what was read before it is held).
    ending: Option<BusError>,
    /// The replay asked for the oldest held event, not a given one: its first read takes
    /// whatever is oldest then, even if retention dropped more since the confirmation.
    from_oldest_held: bool,
    last_delivered: u64,
    /// Made on the first wait for the queue, then reused.
    shutdown: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl Cursor {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Delivery, BusError>>> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                self.last_delivered = event.sequence;
                return Poll::Ready(Some(Ok(Delivery::Event { event, attempt: 0 })));
            }
            if let Some(sequence) = self.caught_up.take() {
                return Poll::Ready(Some(Ok(Delivery::CaughtUp { sequence })));
            }
            match &mut self.phase {
                Phase::Done => return Poll::Ready(self.ending.take().map(Err)),
                Phase::Replay { after, .. } => {
                    let after = *after;
                    if self.broker.is_shutting_down() {
                        return Poll::Ready(self.end(BusError::ShuttingDown));
                    }
                    if let Err(error) = self.replay_step(after) {
                        // What was read before the error is delivered first: the error names
                        // the last sequence delivered, so a resume misses nothing held.
                        self.phase = Phase::Done;
                        self.ending = Some(error);
                        continue;
                    }
                    if self.pending.is_empty() && matches!(self.phase, Phase::Replay { .. }) {
                        // A replay of a busy log through a narrow pattern may find nothing
                        // for many chunks: let other tasks run between them.
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                }
                Phase::Live(registration) => {
                    if self.broker.is_shutting_down() {
                        return Poll::Ready(self.end(BusError::ShuttingDown));
                    }
                    let event = match registration.receiver.poll_recv(cx) {
                        Poll::Ready(Some(event)) => {
                            registration.received(&event);
                            event
                        }
                        // The queue is closed when the group dropped this member for lagging,
                        // or by unregistering, which only shutdown does to a stream still read.
                        Poll::Ready(None) => {
                            let error = match registration.lane.is_evicted() {
                                true => self.lagging(self.broker.visible_head()),
                                false => BusError::ShuttingDown,
                            };
                            return Poll::Ready(self.end(error));
                        }
                        // Tokio's cooperative budget answers Pending with events still queued
                        // (and wakes the task): only an empty queue may switch to the log.
                        Poll::Pending if !registration.receiver.is_empty() => {
                            return Poll::Pending;
                        }
                        // The queue is empty, and routing queues nothing once it marks the
                        // subscriber: if it is marked, everything routed to it was received.
                        // (`start_catch_up` registers the waker, so a later marking wakes us.)
                        Poll::Pending => {
                            let Some(after) = registration.lane.start_catch_up(cx.waker()) else {
                                return self.poll_shutdown(cx);
                            };
                            let Phase::Live(registration) =
                                std::mem::replace(&mut self.phase, Phase::Done)
                            else {
                                unreachable!("matched above");
                            };
                            self.phase = Phase::Replay {
                                after,
                                rejoin: Some(registration),
                            };
                            continue;
                        }
                    };
                    if !self.passes_floor(&event) {
                        continue;
                    }
                    self.last_delivered = event.sequence;
                    return Poll::Ready(Some(Ok(Delivery::Event { event, attempt: 0 })));
                }
                Phase::Durable(membership) => {
                    if self.broker.is_shutting_down() {
                        return Poll::Ready(self.end(BusError::ShuttingDown));
                    }
                    let received = match membership.receiver.poll_recv(cx) {
                        Poll::Ready(received) => received,
                        Poll::Pending => return self.poll_shutdown(cx),
                    };
                    match received {
                        Some((event, attempt)) => {
                            self.last_delivered = event.sequence;
                            return Poll::Ready(Some(Ok(Delivery::Event { event, attempt })));
                        }
                        None => return Poll::Ready(self.end(BusError::ShuttingDown)),
                    }
                }
            }
        }
    }

    /// Waiting for the queue: also wake on the bus's shutdown, and end then.
    fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Delivery, BusError>>> {
        let shutdown = self
            .shutdown
            .get_or_insert_with(|| Box::pin(self.broker.shared.shutdown.clone().cancelled_owned()));
        match shutdown.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(self.end(BusError::ShuttingDown)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Reads the next chunk of the replay; near the head, switches to live. A chunk is bounded
    /// in events ([`REPLAY_CHUNK`]) and bytes (`subscriber_queue_bytes`), and the events are the
    /// store's own `Arc`s where it keeps them (the memory store, the file store's tail cache),
    /// so a stalled replay holds at most about two chunks.
    fn replay_step(&mut self, after: u64) -> Result<(), BusError> {
        let store = self.broker.shared.store.clone();
        let config = self.broker.config();
        let chunk_bytes = config.subscriber_queue_bytes;
        let visible = self.broker.visible_head();
        if let Phase::Replay {
            rejoin: Some(registration),
            ..
        } = &self.phase
        {
            registration.lane.replayed_through(after);
            if registration.lane.is_evicted() {
                return Err(self.lagging(visible));
            }
            self.broker
                .metrics()
                .observe_lag(visible.saturating_sub(after));
            self.check_lag(after, visible)?;
        }
        let mut chunk = store.read_after_within(after, REPLAY_CHUNK, chunk_bytes)?;
        chunk.retain(|event| event.sequence <= visible);
        if !std::mem::take(&mut self.from_oldest_held) {
            self.check_no_gap(after, &chunk)?;
        }
        if let Some(last) = chunk
            .last()
            .map(|e| e.sequence)
            .filter(|last| *last < visible)
        {
            self.take_matching(chunk);
            self.set_replayed_through(last);
            return Ok(());
        }
        let caught_up_after = chunk.last().map_or(after, |e| e.sequence);
        self.take_matching(chunk);
        // Near the head: finish under the routing lock so no publish falls between the last
        // read and the registration.
        let mut routing = self.broker.lock_routing();
        // Under the lock the visible head cannot move: read up to it, no further (later events
        // are pending durability and will be routed to the registration below).
        let head = self.broker.visible_head();
        if let Phase::Replay {
            rejoin: Some(registration),
            ..
        } = &self.phase
        {
            // Under the lock routing cannot drop it from its group meanwhile.
            if registration.lane.is_evicted() {
                return Err(self.lagging(head));
            }
            // The head may have moved on since the step began (a batch routed meanwhile).
            self.check_lag(caught_up_after, head)?;
        }
        let mut rest = store.read_after_within(caught_up_after, REPLAY_CHUNK, chunk_bytes)?;
        rest.retain(|event| event.sequence <= head);
        self.check_no_gap(caught_up_after, &rest)?;
        if let Some(last) = rest.last().map(|e| e.sequence).filter(|last| *last < head) {
            // The head moved on by more than one read meanwhile: go on reading, off the lock.
            drop(routing);
            self.take_matching(rest);
            self.set_replayed_through(last);
            return Ok(());
        }
        let registration = match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Replay {
                rejoin: Some(registration),
                ..
            } => {
                registration.lane.rejoin();
                registration
            }
            _ => self.broker.register_locked(
                &mut routing,
                RegistrationRequest {
                    pattern: &self.options.pattern,
                    group: self.options.group.as_ref(),
                    subscriber: Some(&*self.options.subscriber),
                    queue_size: self.queue_size,
                    only_correlation: None,
                },
            ),
        };
        drop(routing);
        self.take_matching(rest);
        if !std::mem::replace(&mut self.been_live, true) {
            self.caught_up = Some(head);
        }
        self.phase = Phase::Live(registration);
        Ok(())
    }

    /// Moves the replay's position on to `sequence`.
    fn set_replayed_through(&mut self, sequence: u64) {
        if let Phase::Replay { after, .. } = &mut self.phase {
            *after = sequence;
        }
    }

    /// Ends a subscriber catching up from the log that is further behind the visible head
    /// than `max_subscriber_lag`. `after` is where it has read to.
    fn check_lag(&self, after: u64, visible: u64) -> Result<(), BusError> {
        let Some(max_lag) = self.broker.config().max_subscriber_lag else {
            return Ok(());
        };
        let behind = visible.saturating_sub(after);
        if behind <= max_lag {
            return Ok(());
        }
        Err(self.too_slow(behind, max_lag, self.last_delivered.max(after)))
    }

    /// The ending of a group member that its group dropped for lagging (see
    /// `Group::deliver`), as the bus saw it at `visible`.
    fn lagging(&self, visible: u64) -> BusError {
        let max_lag = self.broker.config().max_subscriber_lag.unwrap_or(0);
        let after = match &self.phase {
            Phase::Replay {
                rejoin: Some(registration),
                ..
            }
            | Phase::Live(registration) => registration.lane.resume_after(),
            _ => self.last_delivered,
        };
        let behind = visible.saturating_sub(after);
        self.too_slow(behind, max_lag, self.last_delivered.max(after))
    }

    /// Too far behind: [`BusError::SlowConsumer`], or for a live group's member
    /// [`BusError::SlowGroupMember`].
    fn too_slow(&self, behind: u64, max_lag: u64, last_delivered: u64) -> BusError {
        match self.options.group {
            None => BusError::SlowConsumer {
                behind,
                max_lag,
                last_delivered,
            },
            Some(_) => BusError::SlowGroupMember {
                behind,
                max_lag,
                last_delivered,
            },
        }
    }

    /// A chunk that does not start right after `after` means retention dropped events this
    /// replay had not delivered yet.
    fn check_no_gap(&self, after: u64, chunk: &[SharedEvent]) -> Result<(), BusError> {
        match chunk.first() {
            Some(first) if first.sequence > after + 1 => Err(BusError::ReplayOverrun {
                last_delivered: self.last_delivered.max(after),
            }),
            _ => Ok(()),
        }
    }

    fn take_matching(&mut self, chunk: Vec<SharedEvent>) {
        for event in chunk {
            if self.options.pattern.matches(&event.event.topic) && self.passes_floor(&event) {
                self.pending.push_back(event);
            }
        }
    }

    /// Applies [`StartFloor`]; once an event passes, the floor is opened for good.
    fn passes_floor(&mut self, event: &StoredEvent) -> bool {
        if self.floor.is_open() {
            return true;
        }
        if self.floor.admits(event) {
            self.floor = StartFloor::default();
            true
        } else {
            false
        }
    }

    fn end(&mut self, error: BusError) -> Option<Result<Delivery, BusError>> {
        // Dropping a live registration here unsubscribes at once rather than when the stream
        // itself is dropped.
        self.phase = Phase::Done;
        Some(Err(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::BusConfig;
    use crate::event::Event;
    use crate::store::MemoryStore;
    use futures_util::StreamExt as _;
    use proptest::prelude::*;
    use std::time::Duration;

    fn event() -> Event {
        Event::for_test("r.a")
    }

    /// The sequences a subscription delivers until `count` events, skipping markers.
    async fn delivered(subscription: &mut Subscription, count: usize) -> Vec<u64> {
        let mut sequences = Vec::new();
        while sequences.len() < count {
            let item = tokio::time::timeout(Duration::from_secs(10), subscription.next())
                .await
                .expect("a delivery in time")
                .expect("the stream goes on")
                .expect("no error");
            if let Delivery::Event { event, .. } = item {
                sequences.push(event.sequence);
            }
        }
        sequences
    }

    /// Subscribers that do not read while far more is published than their queues and the
    /// shared budget hold: the queues together stay within the budget (passed by at most one
    /// event per queue, which an empty queue always takes), and each subscriber, once it reads,
    /// gets every event in order from the log, then is live again with nothing left queued.
    #[tokio::test]
    async fn stalled_subscribers_stay_within_the_budget_and_catch_up_from_the_log() {
        const SUBSCRIBERS: usize = 6;
        const EVENTS: u64 = 400;
        let data = bytes::Bytes::from(vec![1u8; 1000]);
        let config = BusConfig {
            subscriber_queue_size: 64,
            subscriber_queue_bytes: 32 * 1024,
            delivery_buffer_bytes: 64 * 1024,
            ..BusConfig::default()
        };
        let broker = Broker::new(config.clone(), Arc::new(MemoryStore::new(10_000, 1 << 30)));
        let mut subscriptions: Vec<Subscription> = (0..SUBSCRIBERS)
            .map(|_| broker.subscribe(SubscribeOptions::for_test("r.>")).unwrap())
            .collect();
        let mut largest = 0;
        for _ in 0..EVENTS {
            let published = broker
                .publish(vec![Event {
                    data: data.clone(),
                    ..event()
                }])
                .await
                .unwrap();
            assert!(!published.duplicates[0]);
            largest = largest.max(broker.shared.delivery.used());
        }
        let one = broker.shared.store.read_after(0, 1).unwrap()[0].held_bytes();
        assert!(
            largest <= config.delivery_buffer_bytes + SUBSCRIBERS * one,
            "{largest} bytes queued"
        );
        for subscription in &mut subscriptions {
            assert_eq!(
                delivered(subscription, EVENTS as usize).await,
                (1..=EVENTS).collect::<Vec<_>>()
            );
        }
        let next = broker.publish(vec![event()]).await.unwrap().sequences[0];
        for subscription in &mut subscriptions {
            assert_eq!(delivered(subscription, 1).await, vec![next]);
        }
        assert_eq!(broker.shared.delivery.used(), 0, "nothing left queued");
        drop(subscriptions);
    }

    /// A marked subscriber whose queue holds more events than Tokio's cooperative budget lets
    /// one poll take (128): `poll_recv` then answers `Pending` with events still queued, which
    /// must not be taken for an empty queue, or the queued events would be skipped.
    #[tokio::test]
    async fn a_queue_longer_than_the_coop_budget_is_drained_before_catching_up() {
        let broker = Broker::new(
            BusConfig {
                subscriber_queue_size: 1000,
                ..BusConfig::default()
            },
            Arc::new(MemoryStore::new(10_000, 1 << 30)),
        );
        let mut subscription = broker.subscribe(SubscribeOptions::for_test("r.>")).unwrap();
        let events = (0..1500).map(|_| event()).collect();
        broker.publish(events).await.unwrap();
        assert_eq!(
            delivered(&mut subscription, 1500).await,
            (1..=1500).collect::<Vec<_>>()
        );
    }

    fn group_member(broker: &Broker) -> Subscription {
        broker
            .subscribe(SubscribeOptions {
                group: Some(Arc::from("g")),
                ..SubscribeOptions::for_test("r.>")
            })
            .unwrap()
    }

    async fn publish(broker: &Broker, count: usize) {
        for _ in 0..count {
            broker.publish(vec![event()]).await.unwrap();
        }
    }

    /// Both members of a live group full: the one whose turn it was (A) catches up for the
    /// group, but nobody reads it. Once B has drained its queue, the next event hands the
    /// catching up to B, which reads the group's events from the log; A keeps what it had.
    #[tokio::test]
    async fn a_group_hands_its_catching_up_to_a_member_that_reads() {
        let broker = Broker::new(
            BusConfig {
                subscriber_queue_size: 2,
                ..BusConfig::default()
            },
            Arc::new(MemoryStore::new(1_000, 1 << 30)),
        );
        let mut a = group_member(&broker);
        let mut b = group_member(&broker);
        // 1 and 3 to A, 2 and 4 to B; 5 finds both full: A, whose turn it was, takes on 5..
        publish(&broker, 10).await;
        assert_eq!(delivered(&mut b, 2).await, vec![2, 4]);
        publish(&broker, 1).await;
        assert_eq!(delivered(&mut b, 7).await, (5..=11).collect::<Vec<_>>());
        assert_eq!(delivered(&mut a, 2).await, vec![1, 3]);
        // Live again, round robin from the member after A.
        publish(&broker, 2).await;
        assert_eq!(delivered(&mut b, 1).await, vec![12]);
        assert_eq!(delivered(&mut a, 1).await, vec![13]);
    }

    /// With `max_subscriber_lag`, a catcher nobody reads is dropped from its group once it is
    /// further behind than that: its stream ends (`SlowGroupMember`) after what it had
    /// queued, the events it had taken on are lost to the group, and the group goes on.
    #[tokio::test]
    async fn a_group_drops_a_catcher_past_the_lag_limit() {
        let broker = Broker::new(
            BusConfig {
                subscriber_queue_size: 2,
                max_subscriber_lag: Some(5),
                ..BusConfig::default()
            },
            Arc::new(MemoryStore::new(1_000, 1 << 30)),
        );
        let mut a = group_member(&broker);
        let mut b = group_member(&broker);
        // A takes on 5.. ; at 11 it is 6 behind: dropped. B, full too, takes on 11..
        publish(&broker, 12).await;
        assert_eq!(delivered(&mut a, 2).await, vec![1, 3]);
        let ended = tokio::time::timeout(Duration::from_secs(10), a.next())
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(
                ended,
                Err(BusError::SlowGroupMember {
                    max_lag: 5,
                    last_delivered: 4,
                    ..
                })
            ),
            "{ended:?}"
        );
        assert_eq!(delivered(&mut b, 4).await, vec![2, 4, 11, 12]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// The start-position rule on every path at once: whatever is held when a subscription
        /// starts (replay), and whatever comes after (live), a subscriber gets exactly the
        /// events with a sequence greater than `after_sequence`, for a plain subscription and a
        /// MANUAL-ack group alike.
        #[test]
        fn a_start_position_admits_the_same_events_on_every_path(
            before in 0u64..12,
            after in 1u64..12,
            start in 0u64..30,
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                let broker = Broker::new(
                    BusConfig::default(),
                    Arc::new(MemoryStore::new(1_000, 1 << 30)),
                );
                for _ in 0..before {
                    broker.publish(vec![event()]).await.unwrap();
                }
                let options = |group: Option<&str>, ack| SubscribeOptions {
                    group: group.map(Arc::from),
                    start: StartPosition::AfterSequence(start),
                    ack,
                    ..SubscribeOptions::for_test("r.>")
                };
                let mut plain = broker.subscribe(options(None, AckMode::Auto)).unwrap();
                let mut group = broker
                    .subscribe(options(Some("g"), AckMode::Manual(ManualAck::default())))
                    .unwrap();
                for _ in 0..after {
                    broker.publish(vec![event()]).await.unwrap();
                }
                let expected: Vec<u64> = (1..=before + after).filter(|s| *s > start).collect();
                assert_eq!(delivered(&mut plain, expected.len()).await, expected);
                assert_eq!(delivered(&mut group, expected.len()).await, expected);
            });
        }
    }
}
