//! The broker: topics, subscriptions, consumer groups, routing, queries and the topology. It
//! works on domain types only and never sees gRPC, so it can be embedded, tested in-process and
//! fronted by any transport.
//!
//! # How an event flows
//! [`Broker::publish`] checks the batch against the limits, then, under the routing lock, appends
//! it to the [`Store`] (which assigns sequences) and pushes each stored event (an `Arc`, never a
//! copy) into the bounded queue of every matching subscriber, found through the subject tree. A
//! group gets the event once, in the queue of one live member. A subscriber whose queue is full
//! (in events or bytes, or all queues together are at their budget) is not waited for and not
//! ended: it leaves the live path and catches up from the log (`broker/delivery.rs`).
//!
//! # Why one routing lock
//! Appending and routing under one lock makes delivery order equal sequence order for every
//! subscriber, and makes registration atomic with respect to publishing: once a subscription is
//! confirmed, no publish can slip past it. The lock is a std `Mutex` held only for memory work
//! (no `.await` inside), so contention costs a few hundred nanoseconds, and batches amortize it.
//! Lock order: the routing lock, then the store's own lock.
//!
//! # Durable stores
//! A store that makes appends durable later (the file store's group commit) exposes a durable
//! head. Then a publish appends under the lock but parks its events in `pending`; once the
//! durable head passes them, whoever notices first routes everything durable, in order, under the
//! lock. A publish is acknowledged only after that, and readers (replays) never read past the last
//! routed sequence: nobody ever sees an event that a crash could take back.
//!
//! One exception, on purpose: a reply to a query that waits on this node is handed to that
//! query as soon as it is appended (`Routing::hand_reply`). A query and its reply are
//! request/response traffic whose asker waits in memory, so the round trip pays the disk once
//! (for the query event, which responders get in order like any event), not twice. The reply
//! is still stored and routed to everyone else once durable, and its publisher is acknowledged
//! only then; a crash before its fsync takes the reply from the log, not from the asker, whose
//! call already returned.

mod dedupe;
mod delivery;
pub mod durable;
pub mod groups;
mod names;
pub mod peers;
mod relay;
mod route_wait;
pub mod settings;
mod subscription;
pub mod topology;

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use hashbrown::HashMap;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use durable::{Acked, DurableStats, ManualAck};
pub use subscription::{
    AckMode, Delivery, StartPosition, SubscribeOptions, Subscription, SubscriptionInfo,
};
pub use topology::TopologySnapshot;

use crate::error::BusError;
use crate::event::{Event, SharedEvent};
use crate::metrics::{FamilyCache, Metrics, QueryOutcome, Scraped};
use crate::store::{Appended, SharedLog, Store, StoreError};
use crate::sublist::SubjectTree;
use crate::topic::{Pattern, Topic, INBOX_FAMILY};
use dedupe::DedupeWindow;
use delivery::{DeliveryBudget, Lane};
use names::{TopicCounters, TopicTable};
pub use settings::BusConfig;
use topology::Topology;

/// The bus. Cheap to clone: a handle to shared state.
#[derive(Clone)]
pub struct Broker {
    shared: Arc<Shared>,
}

struct Shared {
    config: BusConfig,
    store: Arc<dyn Store>,
    routing: Mutex<Routing>,
    /// Cancelled when the bus shuts down: ends every open subscription and refuses new work.
    shutdown: CancellationToken,
    next_subscription_id: AtomicU64,
    /// The store's durable head, for stores that make appends durable later (group commit).
    durable_head: Option<watch::Receiver<u64>>,
    /// The last sequence routed to subscribers. Replays read no further, so an event is seen by
    /// readers only once it is durable, and never both replayed and routed to one subscriber.
    routed_through: AtomicU64,
    /// The same, as a channel: durable group dispatchers wake on it.
    routed: watch::Sender<u64>,
    /// Publishes on a shared log waiting for this node to route their events, by sequence.
    route_waiters: route_wait::RouteWaiters,
    /// MANUAL-ack consumer groups, each with its dispatcher.
    durable: durable::DurableGroups,
    /// Bytes queued for all live subscribers, against `delivery_buffer_bytes`.
    delivery: Arc<DeliveryBudget>,
    /// The broker's own tasks (group dispatchers), so shutdown can wait for their last writes.
    tasks: TaskTracker,
    /// A log shared with other bus nodes (JetStream): publishes append to it, and this node
    /// routes what it reads back from the log's tail (see [`Broker::on_shared_log`]).
    log: Option<Arc<dyn SharedLog>>,
    /// On a shared log: open subscriptions per consumer group on this node (see
    /// [`Broker::place_group`]).
    placed_groups: Mutex<HashMap<Arc<str>, usize>>,
    /// On a shared log: members relayed between this node and groups' home nodes.
    relays: relay::Relays,
    /// Counters the broker updates; the admin listener encodes them.
    metrics: Metrics,
    /// When the broker was made, for `GetServerInfo`'s uptime.
    started: SystemTime,
}

/// Everything the publish path touches, behind the routing lock.
struct Routing {
    subscriptions: SubjectTree<Interest>,
    topology: Topology,
    /// Counters of the topics in use, bounded and aged out (see `names.rs`).
    topics: TopicTable,
    /// Reply inbox -> the service that asked, so a reply can be drawn as an edge between the
    /// two services in the topology, and the query's topic, which permissions check a reply
    /// against ([`Broker::waiting_query`]).
    inbox_owners: HashMap<Topic, (Arc<str>, Topic)>,
    /// Appended events waiting to be durable before they are routed, in sequence order.
    pending: VecDeque<SharedEvent>,
    /// Recently published (source, id) pairs, for idempotent publish.
    dedupe: DedupeWindow,
}

/// The subscribers of one pattern.
#[derive(Default)]
struct Interest {
    /// Each gets every event.
    individual: Vec<Subscriber>,
    /// Each group gets every event once, in one member's queue.
    groups: Vec<Group>,
}

impl Interest {
    fn is_empty(&self) -> bool {
        self.individual.is_empty() && self.groups.is_empty()
    }

    fn responder_count(&self) -> usize {
        self.individual.len() + self.groups.len()
    }
}

struct Group {
    name: Arc<str>,
    members: Vec<Subscriber>,
    /// Round-robin position of the next member to try.
    next: usize,
    /// The member catching up from the log for the whole group: set when every member was
    /// full. Until it is live again, every event of the group is its own (it reads them from
    /// the log), so no other member gets one. See [`Group::deliver`].
    catcher: Option<Arc<Lane>>,
    /// `max_subscriber_lag`: a catcher further behind is dropped from the group.
    max_lag: Option<u64>,
}

/// The publish side of one subscription: its queue's sender. Dropping it (on unsubscribe)
/// closes the queue, which the subscription's stream sees after draining it.
struct Subscriber {
    id: u64,
    queue: mpsc::Sender<SharedEvent>,
    /// Shared with the stream: live or catching up, and the bytes queued.
    lane: Arc<Lane>,
    /// A query's inbox: only events with this correlation id are queued, and a full queue
    /// drops the event instead of ending the inbox, so strays published into an inbox can
    /// neither crowd out the reply nor end the query early.
    only_correlation: Option<Arc<str>>,
}

/// Outcome of offering an event to one subscriber.
enum Offer {
    Queued,
    /// The queue (or all queues together) has no room for it.
    Full,
    /// The subscriber reads the log for now; routing passes it by.
    CatchingUp,
    Gone,
}

impl Subscriber {
    /// Offers an event weighing `size` bytes ([`delivery::weight`]).
    fn offer(&self, event: &SharedEvent, size: usize) -> Offer {
        if let Some(correlation) = &self.only_correlation {
            if event.event.correlation_id != **correlation {
                return Offer::Queued;
            }
            return match self.queue.try_send(event.clone()) {
                Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Offer::Queued,
                Err(mpsc::error::TrySendError::Closed(_)) => Offer::Gone,
            };
        }
        if self.lane.is_catching_up() {
            return Offer::CatchingUp;
        }
        let queue_empty = self.queue.capacity() == self.queue.max_capacity();
        if !self.lane.reserve(size, queue_empty) {
            return Offer::Full;
        }
        match self.queue.try_send(event.clone()) {
            Ok(()) => Offer::Queued,
            Err(error) => {
                self.lane.release(size);
                match error {
                    mpsc::error::TrySendError::Full(_) => Offer::Full,
                    mpsc::error::TrySendError::Closed(_) => Offer::Gone,
                }
            }
        }
    }
}

/// See [`Broker::name_counts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameCounts {
    /// Topics whose counters are kept.
    pub topics: usize,
    /// Topology edges and subscriptions kept.
    pub topology_entries: usize,
    /// Reply inboxes of queries waiting now.
    pub inbox_owners: usize,
}

/// One page of [`Broker::list_topics`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPage {
    /// The topics, sorted by name.
    pub topics: Vec<TopicSummary>,
    /// The name to list after for the next page; `None` on the last page.
    pub next_after: Option<String>,
    /// Events published to topics the bus did not track because `max_names` topics were
    /// tracked already.
    pub untracked_events: u64,
}

/// One topic as [`Broker::list_topics`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSummary {
    /// The topic, or [`INBOX_FAMILY`] for all reply inboxes together.
    pub name: String,
    pub last_sequence: u64,
    pub events_held: u64,
    pub events_published: u64,
    pub subscriber_count: u32,
    pub groups: Vec<String>,
    /// `None` for a topic that has subscribers but no event yet.
    pub last_publish_time: Option<SystemTime>,
}

/// Whether a publish must find a subscriber before it is stored (a query: no responder means
/// no reply can ever come, so it fails fast instead of waiting out its timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Responders {
    Optional,
    Required,
}

impl Broker {
    /// A bus on a log of its own: it assigns sequences under its routing lock and routes its
    /// own appends (once durable), with metrics of its own (see [`Broker::with_metrics`]).
    pub fn new(config: BusConfig, store: Arc<dyn Store>) -> Broker {
        Broker::with_metrics(config, store, Metrics::new())
    }

    /// A bus on a log of its own that counts into `metrics` (made before the store, when the
    /// store reports into it too, as the file store's fsync times do).
    pub fn with_metrics(config: BusConfig, store: Arc<dyn Store>, metrics: Metrics) -> Broker {
        Broker::build(config, store, None, metrics)
    }

    /// A bus node on a log it shares with other nodes (`store` and `log` are the same
    /// JetStream stream): a publish appends to the log and is acknowledged once this node has
    /// read it back from the tail; every node routes every event of the tail, whichever node
    /// it was published on, in sequence order. Idempotent publish is the log's (its dedupe
    /// window spans all nodes), not this node's. Must be called on a Tokio runtime.
    pub async fn on_shared_log(
        config: BusConfig,
        store: Arc<dyn Store>,
        log: Arc<dyn SharedLog>,
        metrics: Metrics,
    ) -> Broker {
        let head = store.bounds().head;
        let broker = Broker::build(config, store, Some(log.clone()), metrics);
        let tail = log.tail(head);
        broker.shared.tasks.spawn(route_tail(broker.clone(), tail));
        broker.answer_peers();
        broker.serve_relays().await;
        broker
    }

    fn build(
        config: BusConfig,
        store: Arc<dyn Store>,
        log: Option<Arc<dyn SharedLog>>,
        metrics: Metrics,
    ) -> Broker {
        let durable_head = store.durable_head();
        let head = store.bounds().head;
        let routed_through = AtomicU64::new(head);
        let (routed, _) = watch::channel(head);
        let dedupe = match log {
            // The shared log dedupes; locally only ids are given.
            Some(_) => DedupeWindow::new(Duration::ZERO, 0),
            None => recent_publishes(&config, &*store),
        };
        let max_names = config.max_names;
        let delivery = Arc::new(DeliveryBudget::new(config.delivery_buffer_bytes));
        let broker = Broker {
            shared: Arc::new(Shared {
                config,
                store,
                routing: Mutex::new(Routing {
                    subscriptions: SubjectTree::new(),
                    topology: Topology::new(max_names),
                    topics: TopicTable::new(max_names),
                    inbox_owners: HashMap::new(),
                    pending: VecDeque::new(),
                    dedupe,
                }),
                shutdown: CancellationToken::new(),
                next_subscription_id: AtomicU64::new(1),
                durable_head,
                routed_through,
                routed,
                route_waiters: route_wait::RouteWaiters::default(),
                durable: durable::DurableGroups::default(),
                delivery,
                tasks: TaskTracker::new(),
                log,
                placed_groups: Mutex::new(HashMap::new()),
                relays: relay::Relays::default(),
                started: SystemTime::now(),
                metrics,
            }),
        };
        // Outside a runtime (a broker built for a synchronous test) there is no housekeeping:
        // reads still judge expiry by the clock, only memory and disk wait for the next write.
        if tokio::runtime::Handle::try_current().is_ok() {
            broker
                .shared
                .tasks
                .spawn(housekeeping(broker.clone(), HOUSEKEEPING_INTERVAL));
        }
        broker
    }

    /// Why the store is not taking writes, if it is not: it failed
    /// ([`Store::durability_error`]: the bus refuses publishes until a restart, or until a
    /// JetStream node's NATS is back) or a passing cause refuses them now
    /// ([`Store::write_blocked`]: a full disk). Either way the node is reported NOT_SERVING.
    pub fn store_failure(&self) -> Option<String> {
        let store = &self.shared.store;
        store.durability_error().or_else(|| store.write_blocked())
    }

    pub fn config(&self) -> &BusConfig {
        &self.shared.config
    }

    /// The counters this bus updates.
    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// The metrics in the text exposition format, with the values read at scrape time (the
    /// store's usage, the bytes queued for delivery) read now. Takes no routing lock.
    pub fn render_metrics(&self) -> String {
        let usage = self.shared.store.usage();
        self.shared.metrics.set_scraped(Scraped {
            delivery_queued_bytes: self.shared.delivery.used() as u64,
            store_bytes: usage.bytes,
            store_segments: usage.segments,
            store_events: usage.events,
        });
        self.shared.metrics.encode()
    }

    /// The identity of the log behind this bus (see [`Store::log_id`]).
    pub fn log_id(&self) -> &str {
        self.shared.store.log_id()
    }

    /// Stops the bus: open subscriptions end with [`BusError::ShuttingDown`] and new publishes,
    /// subscriptions and queries are refused.
    pub fn shutdown(&self) {
        self.shared.shutdown.cancel();
    }

    /// Shuts down and waits for the broker's own tasks to finish their last writes (group
    /// cursors), so the store can be reopened right after.
    pub async fn finish(&self) {
        self.shutdown();
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }

    /// Resolves once [`Broker::shutdown`] has been called.
    pub async fn stopped(&self) {
        self.shared.shutdown.cancelled().await
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutdown.is_cancelled()
    }

    /// Stores and routes a batch, all or none, and returns each event's sequence once the
    /// store has made it durable.
    pub async fn publish(&self, events: Vec<Event>) -> Result<Published, BusError> {
        self.begin_publish(events)?.finish().await
    }

    /// The synchronous half of a publish: checks the batch and appends it, in publish order.
    /// The returned [`PendingPublish`] resolves once the batch is durable and routed; callers
    /// with many batches in flight (PublishStream) begin them in order and finish them
    /// concurrently, so one fsync covers many batches.
    pub fn begin_publish(&self, events: Vec<Event>) -> Result<PendingPublish, BusError> {
        self.append(events, Responders::Optional)
    }

    fn append(
        &self,
        events: Vec<Event>,
        responders: Responders,
    ) -> Result<PendingPublish, BusError> {
        if self.is_shutting_down() {
            return Err(BusError::ShuttingDown);
        }
        self.check_batch(&events)?;
        let started = std::time::Instant::now();
        if let Some(log) = &self.shared.log {
            // Responders were looked for across the nodes by `query`, before this.
            if let Some(failure) = self.shared.store.durability_error() {
                return Err(BusError::Storage(StoreError::Failed(failure)));
            }
            let batch = self.lock_routing().dedupe.split(events);
            return Ok(PendingPublish {
                broker: self.clone(),
                published: Published::default(),
                wait: Wait::Shared {
                    topics: batch
                        .fresh
                        .iter()
                        .map(|event| event.topic.clone())
                        .collect(),
                    appended: log.begin_append(batch.fresh),
                },
                started,
            });
        }
        let now = SystemTime::now();
        let mut routing = self.lock_routing();
        if responders == Responders::Required {
            for event in &events {
                if !self.responders_locked(&mut routing, &event.topic) {
                    return Err(BusError::NoResponders {
                        topic: event.topic.to_string(),
                    });
                }
            }
        }
        // Judged by the clock now, not only when an insert last swept: a window that has passed
        // is passed even if nothing was published since.
        routing.dedupe.expire(now);
        let mut batch = routing.dedupe.split(events);
        let fresh = std::mem::take(&mut batch.fresh);
        let stored = if fresh.is_empty() {
            Vec::new()
        } else {
            self.shared.store.append(fresh, now)?
        };
        let published = batch.resolve(&stored);
        let mut families = FamilyCache::default();
        for event in &stored {
            routing.record(event, now);
            families
                .get(&self.shared.metrics, event.event.topic.as_str())
                .published
                .inc();
        }
        self.shared
            .metrics
            .dedupe_hits((published.sequences.len() - stored.len()) as u64);
        routing.dedupe.remember(&batch, &stored);
        // Logged after the lock is released; the copies (of `Arc`s) only at debug level.
        let logged = tracing::enabled!(tracing::Level::DEBUG).then(|| stored.clone());
        let pending = match (&self.shared.durable_head, stored.last()) {
            // Appends are final on return: route at once, under the same lock.
            (None, last) => {
                for event in &stored {
                    routing.route(event);
                }
                if let Some(last) = last {
                    self.advance_routed(last.sequence);
                }
                Ok(PendingPublish {
                    broker: self.clone(),
                    published,
                    wait: Wait::Done,
                    started,
                })
            }
            // Routed once durable, so no subscriber sees what a crash could take back. A batch
            // of duplicates only waits for its originals.
            (Some(durable_head), _) => {
                for event in &stored {
                    if event.event.topic.is_inbox() {
                        routing.hand_reply(event);
                    }
                }
                routing.pending.extend(stored);
                Ok(PendingPublish {
                    broker: self.clone(),
                    published,
                    wait: Wait::Durable(durable_head.clone()),
                    started,
                })
            }
        };
        drop(routing);
        for event in logged.iter().flatten() {
            log_published(event);
        }
        pending
    }

    /// On a shared log, decides where a consumer group's member is served: here when no other
    /// node has the group (this node then tells the others it is the group's home until the
    /// returned placement is dropped), or at the node that has it, through a relay
    /// ([`relay`]): each node routes every event, so a group served by two nodes would get
    /// each event once per node. [`GroupPlace::Here`] with `None` on a log of its own, or for a
    /// subscription outside any group.
    ///
    /// Two nodes placing the first members of one group at the same instant can both pass
    /// the check (a window of one NATS round trip).
    ///
    /// # Errors
    /// None today; the signature leaves room for a refusal.
    pub async fn place_group(&self, group: Option<&str>) -> Result<GroupPlace, BusError> {
        let (Some(log), Some(group)) = (&self.shared.log, group) else {
            return Ok(GroupPlace::Here(None));
        };
        let name: Arc<str> = Arc::from(group);
        let first = {
            let mut placed = lock_placed(&self.shared.placed_groups);
            let count = placed.entry(name.clone()).or_insert(0);
            *count += 1;
            *count == 1
        };
        let placement = GroupPlacement {
            broker: self.clone(),
            name,
        };
        if !first {
            return Ok(GroupPlace::Here(Some(placement)));
        }
        if let Some(home) = log.group_elsewhere(group).await {
            return Ok(GroupPlace::Elsewhere(home));
        }
        log.announce_group(group, true).await;
        Ok(GroupPlace::Here(Some(placement)))
    }

    /// Whether this node has a subscriber (or a MANUAL-ack group member) for `topic`.
    fn local_responders(&self, topic: &Topic) -> bool {
        let mut routing = self.lock_routing();
        self.responders_locked(&mut routing, topic)
    }

    fn responders_locked(&self, routing: &mut Routing, topic: &Topic) -> bool {
        let mut count = 0;
        routing
            .subscriptions
            .for_each_match(topic, |interest| count += interest.responder_count());
        count > 0 || self.durable_responders(topic)
    }

    /// On a shared log, waits until this node has routed every event the log held when asked
    /// (its leader's last sequence): then a replay started here holds every event any node had
    /// acknowledged before, and its `caught_up` comes after them (read-your-writes across
    /// nodes). Best effort, bounded by [`REPLAY_HEAD_DEADLINE`]: when the log does not answer
    /// or this node lags past the deadline, the replay starts from what this node has, and the
    /// rest arrives live, in order, as it is routed. At once on one node's own store.
    pub async fn route_log_head(&self) {
        let Some(log) = &self.shared.log else {
            return;
        };
        if let Some(last) = log.last_sequence().await {
            let _ = self.routed_past_within(last, REPLAY_HEAD_DEADLINE).await;
        }
    }

    /// Waits until this node has routed `sequence` (read it back from the shared log's tail),
    /// so what a publish was acknowledged for is visible to replays on this node too.
    ///
    /// Not once the node is shutting down: it stops routing then (its tail task ends, so the
    /// wait would last the whole grace period and leave the publisher without an answer), and
    /// its subscriptions are ending anyway. The log has acknowledged the events, so the
    /// publish is answered with their sequences at once.
    async fn routed_past(&self, sequence: u64) -> Result<(), BusError> {
        self.routed_past_within(sequence, ROUTE_DEADLINE).await
    }

    /// [`Broker::routed_past`], failing after `within`.
    async fn routed_past_within(&self, sequence: u64, within: Duration) -> Result<(), BusError> {
        if self.is_shutting_down() {
            return Ok(());
        }
        let Some(mut wait) = self
            .shared
            .route_waiters
            .wait(sequence, &self.shared.routed_through)
        else {
            return Ok(());
        };
        tokio::select! {
            _ = self.stopped() => Ok(()),
            () = wait.passed() => Ok(()),
            _ = tokio::time::sleep(within) => Err(BusError::Storage(StoreError::Failed(format!(
                "the log acknowledged sequence {sequence} but this node has not read it back \
                 within {within:?}"
            )))),
        }
    }

    fn advance_routed(&self, sequence: u64) {
        self.shared
            .routed_through
            .store(sequence, Ordering::Release);
        self.shared.routed.send_replace(sequence);
        // After the store above: a waiter checks `routed_through` under the lock this takes.
        self.shared.route_waiters.pass(sequence);
    }

    /// Routes, in sequence order, every pending event the store has made durable.
    fn route_durable(&self, durable: u64) {
        let mut routing = self.lock_routing();
        let mut routed = None;
        while routing
            .pending
            .front()
            .is_some_and(|event| event.sequence <= durable)
        {
            let event = routing.pending.pop_front().expect("checked");
            routing.route(&event);
            routed = Some(event.sequence);
        }
        if let Some(routed) = routed {
            self.advance_routed(routed);
        }
    }

    /// The store's bounds as readers may see them: the head is the last routed sequence.
    fn visible_bounds(&self) -> crate::store::LogBounds {
        let bounds = self.shared.store.bounds();
        let head = self.visible_head();
        crate::store::LogBounds {
            oldest: bounds.oldest.filter(|oldest| *oldest <= head),
            head,
            newest_dropped_time: bounds.newest_dropped_time,
        }
    }

    /// The last sequence routed to subscribers: the head of the log as readers may see it.
    pub fn visible_head(&self) -> u64 {
        self.shared.routed_through.load(Ordering::Acquire)
    }

    /// A watch of [`Broker::visible_head`]: changes each time newly routed events become
    /// readable. For readers beside the routing path (the dashboard's live tail), which read
    /// the log after each change instead of holding a subscription.
    pub fn watch_head(&self) -> watch::Receiver<u64> {
        self.shared.routed.subscribe()
    }

    /// Up to `max` events after sequence `after`, oldest first, no further than
    /// [`Broker::visible_head`] and stopping before `max_bytes` of held events (the first always
    /// comes). A blocking store read: call it off the async workers.
    ///
    /// # Errors
    /// [`BusError::Storage`] when the store cannot read.
    pub fn read_visible(
        &self,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<SharedEvent>, BusError> {
        let head = self.visible_head();
        if after >= head {
            return Ok(Vec::new());
        }
        let mut events = self.shared.store.read_after_within(after, max, max_bytes)?;
        events.retain(|event| event.sequence <= head);
        Ok(events)
    }

    /// The oldest sequence the store holds, if any.
    pub fn oldest_held(&self) -> Option<u64> {
        self.visible_bounds().oldest
    }

    fn check_batch(&self, events: &[Event]) -> Result<(), BusError> {
        let config = &self.shared.config;
        if events.is_empty() {
            return Err(BusError::invalid("events", "must hold at least one event"));
        }
        if events.len() > config.max_batch_events {
            return Err(BusError::invalid(
                "events",
                format!(
                    "{} events is over the limit of {} per batch",
                    events.len(),
                    config.max_batch_events
                ),
            ));
        }
        for (index, event) in events.iter().enumerate() {
            self.check_data_size(event, || format!("events[{index}].data"))?;
        }
        Ok(())
    }

    /// Refuses data over the limit; `field` names it as the request does.
    fn check_data_size(
        &self,
        event: &Event,
        field: impl FnOnce() -> String,
    ) -> Result<(), BusError> {
        let limit = self.shared.config.max_event_data_bytes;
        if event.data.len() > limit {
            return Err(BusError::EventTooLarge {
                field: field(),
                size: event.data.len(),
                limit,
            });
        }
        Ok(())
    }

    /// Opens a subscription. The returned info is the `subscribed` confirmation: every matching
    /// event published after this call returns is delivered by the stream.
    pub fn subscribe(&self, options: SubscribeOptions) -> Result<Subscription, BusError> {
        if self.is_shutting_down() {
            return Err(BusError::ShuttingDown);
        }
        Subscription::open(self.clone(), options)
    }

    /// Request/response over events: publishes `event` with a fresh inbox as `reply_to` and
    /// waits for the first event on that inbox with the same correlation id.
    /// The topic of the query waiting for a reply on `inbox` on this node, if one is.
    pub fn waiting_query(&self, inbox: &Topic) -> Option<Topic> {
        self.lock_routing()
            .inbox_owners
            .get(inbox)
            .map(|(_, topic)| topic.clone())
    }

    /// The topic of the query waiting for a reply on `inbox` on this node or, on a shared log,
    /// on another node (asked over NATS, within a second), if one is.
    pub async fn waiting_query_anywhere(&self, inbox: &Topic) -> Option<Topic> {
        if let Some(topic) = self.waiting_query(inbox) {
            return Some(topic);
        }
        match &self.shared.log {
            Some(log) => log.inbox_query(inbox).await,
            None => None,
        }
    }

    pub async fn query(&self, event: Event, timeout: Duration) -> Result<SharedEvent, BusError> {
        let started = std::time::Instant::now();
        let outcome = self.query_inner(event, timeout).await;
        let counted = match &outcome {
            Ok(_) => QueryOutcome::Answered,
            Err(BusError::NoResponders { .. }) => QueryOutcome::NoResponders,
            Err(BusError::QueryTimeout { .. }) => QueryOutcome::Timeout,
            Err(_) => QueryOutcome::Error,
        };
        self.shared
            .metrics
            .observe_query(counted, started.elapsed());
        outcome
    }

    async fn query_inner(
        &self,
        mut event: Event,
        timeout: Duration,
    ) -> Result<SharedEvent, BusError> {
        // Checked here so the error names the query's field, not a batch index.
        self.check_data_size(&event, || "event.data".to_owned())?;
        if event.correlation_id.is_empty() {
            event.correlation_id = crate::event::new_id();
        }
        let inbox = Topic::new_inbox();
        event.reply_to = Some(inbox.clone());
        let correlation_id = event.correlation_id.clone();
        let topic = event.topic.to_string();
        let mut reply_queue = self.register_inbox(
            &inbox,
            (event.source.clone(), event.topic.clone()),
            Arc::from(&*correlation_id),
        )?;
        if let Some(log) = &self.shared.log {
            if !self.local_responders(&event.topic) && !log.remote_responders(&event.topic).await {
                return Err(BusError::NoResponders { topic });
            }
        }
        let published = self
            .append(vec![event], Responders::Required)?
            .finish()
            .await?;
        if published.duplicates[0] {
            // The same (source, id) was asked within the dedupe window: this query was not
            // published again, so no new reply will come to this inbox.
            return Err(BusError::invalid(
                "event.id",
                "a query with this source and id was already published; use a new id per query",
            ));
        }
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => {
                    return Err(BusError::QueryTimeout { topic, timeout });
                }
                _ = self.shared.shutdown.cancelled() => return Err(BusError::ShuttingDown),
                reply = reply_queue.receiver.recv() => match reply {
                    Some(reply) if reply.event.correlation_id == correlation_id => return Ok(reply),
                    // The inbox queues only this correlation id; kept as a guard.
                    Some(_) => continue,
                    // The inbox is never ended by the bus but at shutdown.
                    None => return Err(BusError::ShuttingDown),
                },
            }
        }
    }

    fn register_inbox(
        &self,
        inbox: &Topic,
        asker: (Arc<str>, Topic),
        correlation_id: Arc<str>,
    ) -> Result<Registration, BusError> {
        let pattern = Pattern::parse(inbox.as_str()).expect("an inbox is a valid pattern");
        let registration = self.register(RegistrationRequest {
            pattern: &pattern,
            group: None,
            subscriber: None,
            queue_size: INBOX_QUEUE_SIZE,
            only_correlation: Some(correlation_id),
        });
        if let Some(log) = &self.shared.log {
            log.announce_inbox(inbox, Some(&asker.1));
        }
        self.lock_routing()
            .inbox_owners
            .insert(inbox.clone(), asker);
        Ok(registration)
    }

    /// Puts a subscriber in the subject tree. Called under no lock; takes the routing lock.
    fn register(&self, request: RegistrationRequest<'_>) -> Registration {
        let mut routing = self.lock_routing();
        self.register_locked(&mut routing, request)
    }

    fn register_locked(
        &self,
        routing: &mut Routing,
        request: RegistrationRequest<'_>,
    ) -> Registration {
        let id = self
            .shared
            .next_subscription_id
            .fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = mpsc::channel(request.queue_size);
        let is_inbox = request.only_correlation.is_some();
        let lane = match request.only_correlation {
            Some(_) => Lane::uncounted(),
            None => Lane::counted(
                self.shared.config.subscriber_queue_bytes,
                self.shared.delivery.clone(),
            ),
        };
        let subscriber = Subscriber {
            id,
            queue: sender,
            lane: lane.clone(),
            only_correlation: request.only_correlation,
        };
        if let Some(log) = &self.shared.log {
            if !is_inbox && routing.subscriptions.get_mut(request.pattern).is_none() {
                log.announce_interest(request.pattern, true);
            }
        }
        let interest = routing.subscriptions.entry(request.pattern);
        match request.group {
            None => interest.individual.push(subscriber),
            Some(name) => match interest.groups.iter_mut().find(|g| g.name == *name) {
                Some(group) => group.members.push(subscriber),
                None => interest.groups.push(Group {
                    name: name.clone(),
                    members: vec![subscriber],
                    next: 0,
                    catcher: None,
                    max_lag: self.shared.config.max_subscriber_lag,
                }),
            },
        }
        if let Some(subscriber) = request.subscriber {
            routing.topology.subscription_started(
                request.pattern,
                subscriber,
                request.group.map_or("", |g| g),
                SystemTime::now(),
            );
        }
        Registration {
            broker: self.clone(),
            id,
            pattern: request.pattern.clone(),
            group: request.group.cloned(),
            subscriber: request.subscriber.map(Arc::from),
            receiver,
            lane,
        }
    }

    fn unregister(&self, registration: &Registration) {
        let mut routing = self.lock_routing();
        if let Some(interest) = routing.subscriptions.get_mut(&registration.pattern) {
            match &registration.group {
                None => interest.individual.retain(|s| s.id != registration.id),
                Some(name) => {
                    for group in interest.groups.iter_mut().filter(|g| g.name == *name) {
                        group.members.retain(|s| s.id != registration.id);
                    }
                    interest.groups.retain(|g| !g.members.is_empty());
                }
            }
        }
        routing
            .subscriptions
            .remove_if(&registration.pattern, Interest::is_empty);
        if let Some(log) = &self.shared.log {
            if registration.subscriber.is_some()
                && routing
                    .subscriptions
                    .get_mut(&registration.pattern)
                    .is_none()
            {
                log.announce_interest(&registration.pattern, false);
            }
        }
        if let Some(subscriber) = &registration.subscriber {
            routing.topology.subscription_ended(
                &registration.pattern,
                subscriber,
                registration.group.as_deref().unwrap_or(""),
            );
        }
        if registration.pattern.is_literal() {
            if let Ok(topic) = Topic::parse(registration.pattern.as_str()) {
                if topic.is_inbox() {
                    routing.inbox_owners.remove(&topic);
                    if let Some(log) = &self.shared.log {
                        log.announce_inbox(&topic, None);
                    }
                }
            }
        }
    }

    /// One page of the topics in use, with what is held and who listens now, sorted by name:
    /// those after `after` (a name from an earlier page's [`TopicPage::next_after`]) that match
    /// `filter`, at most `limit` (at least 1). Reply inboxes are folded into one entry,
    /// [`INBOX_FAMILY`].
    ///
    /// Under the routing lock it only copies the tables (pointers and counts: the topic
    /// counters, the subscription patterns with their counts); sorting, filtering and matching
    /// topics against subscriptions happen outside it, so a listing of many names never stalls
    /// publishers for long. `peers` are the other nodes' views on a cluster
    /// ([`Broker::peer_views`]; empty otherwise): their subscribers count as this node's.
    pub fn list_topics(
        &self,
        filter: Option<&Pattern>,
        after: Option<&str>,
        limit: usize,
        peers: &[peers::NodeView],
    ) -> TopicPage {
        let held = self.shared.store.held_counts();
        let (counters, mut live_literals, mut subscriptions, untracked_events) = {
            let routing = self.lock_routing();
            let mut subscriptions = Vec::new();
            routing.subscriptions.for_each(|pattern, interest| {
                let groups: Vec<(Arc<str>, u32)> = interest
                    .groups
                    .iter()
                    .map(|g| (g.name.clone(), g.members.len() as u32))
                    .collect();
                subscriptions.push((pattern.to_owned(), interest.individual.len() as u32, groups));
            });
            (
                routing.topics.snapshot(),
                routing.topology.live_literal_patterns(),
                subscriptions,
                routing.topics.untracked_events(),
            )
        };
        let mut durable = self.durable_member_counts();
        // Other nodes' clients (a cluster): their subscriptions count as this node's do.
        for view in peers {
            for interest in &view.interests {
                subscriptions.push((
                    interest.pattern.clone(),
                    interest.individual,
                    interest
                        .groups
                        .iter()
                        .map(|(name, members)| (Arc::from(name.as_str()), *members))
                        .collect(),
                ));
            }
            for member in &view.durable {
                if let Ok(pattern) = Pattern::parse(&member.pattern) {
                    durable.push((member.group.as_str().into(), pattern, member.members));
                }
            }
            live_literals.extend(
                view.subscriptions
                    .iter()
                    .filter(|s| {
                        s.active > 0
                            && !s.pattern.contains(['*', '>'])
                            && !s.pattern.starts_with("_bus.inbox.")
                    })
                    .map(|s| Arc::from(s.pattern.as_str())),
            );
        }

        let after = after.unwrap_or("");
        let admits = |name: &str| {
            if *name <= *after {
                return false;
            }
            match filter {
                None => true,
                // The family stands for every inbox: it is listed when the pattern matches
                // inboxes (`>`, `_bus.>`, `_bus.inbox.*`); any one inbox tells, ids are random.
                Some(pattern) if name == INBOX_FAMILY => pattern.matches(&Topic::new_inbox()),
                Some(pattern) => Topic::parse(name).is_ok_and(|topic| pattern.matches(&topic)),
            }
        };
        let mut names: hashbrown::HashMap<Arc<str>, Option<TopicCounters>> = counters
            .into_iter()
            .filter(|(name, _)| admits(name))
            .map(|(name, counters)| (name, Some(counters)))
            .collect();
        // Topics someone listens to by name but nobody has published to yet (a service's query
        // topic before the first query) are listed too: who waits for what is half the story.
        for name in live_literals {
            if admits(&name) {
                names.entry(name).or_insert(None);
            }
        }
        let mut names: Vec<(Arc<str>, Option<TopicCounters>)> = names.into_iter().collect();
        let total = names.len();
        let limit = limit.max(1);
        let more = names.len() > limit;
        if more {
            names.select_nth_unstable_by(limit, |a, b| a.0.cmp(&b.0));
            names.truncate(limit);
        }
        names.sort_unstable_by(|a, b| a.0.cmp(&b.0));

        let mut tree = SubjectTree::<(u32, Vec<Arc<str>>)>::new();
        for (pattern, individual, groups) in subscriptions {
            let Ok(pattern) = Pattern::parse(&pattern) else {
                continue;
            };
            let entry = tree.entry(&pattern);
            entry.0 += individual + groups.iter().map(|(_, members)| members).sum::<u32>();
            entry.1.extend(groups.into_iter().map(|(name, _)| name));
        }
        let mut topics = Vec::with_capacity(names.len());
        for (name, counters) in names {
            let mut subscriber_count = 0u32;
            let mut groups = BTreeSet::new();
            if let Ok(topic) = Topic::parse(&name) {
                tree.for_each_match(&topic, |(count, names)| {
                    subscriber_count += *count;
                    groups.extend(names.iter().map(|g| g.to_string()));
                });
                for (group, pattern, members) in &durable {
                    if pattern.matches(&topic) {
                        subscriber_count += members;
                        groups.insert(group.to_string());
                    }
                }
            }
            topics.push(TopicSummary {
                events_held: held.get(&*name).copied().unwrap_or(0),
                name: name.to_string(),
                last_sequence: counters.map_or(0, |c| c.last_sequence),
                events_published: counters.map_or(0, |c| c.published),
                subscriber_count,
                groups: groups.into_iter().collect(),
                last_publish_time: counters.map(|c| c.last_publish_time),
            });
        }
        if total >= FORGOTTEN_BEFORE_TRIM {
            // The copies were per name: hand their memory back.
            names::release_freed_memory();
        }
        let next_after = if more {
            topics.last().map(|t| t.name.clone())
        } else {
            None
        };
        TopicPage {
            topics,
            next_after,
            untracked_events,
        }
    }

    /// The dependency graph as the bus has seen it, at most `max_edges` edges and about
    /// `max_bytes` of names (see [`topology::RawTopology::build`]). Under the routing lock it
    /// only copies the graph's entries; the graph is built outside it. `peers` are the other
    /// nodes' views on a cluster ([`Broker::peer_views`]; empty otherwise): their subscriptions
    /// join this node's as SUBSCRIBES edges.
    pub fn topology(
        &self,
        max_edges: usize,
        max_bytes: usize,
        peers: &[peers::NodeView],
    ) -> TopologySnapshot {
        let (mut raw, entries) = {
            let routing = self.lock_routing();
            (routing.topology.raw(), routing.topology.entries())
        };
        raw.add_subscriptions(
            peers
                .iter()
                .flat_map(|view| view.subscriptions.iter().map(|s| s.entry())),
        );
        let snapshot = raw.build(max_edges, max_bytes);
        if entries >= FORGOTTEN_BEFORE_TRIM {
            // Building allocated per name, and most of it was cut: hand it back.
            names::release_freed_memory();
        }
        snapshot
    }

    /// How much state keyed by client-chosen names the bus holds now, for tests and
    /// diagnostics: each count is bounded by `max_names` and falls as names go idle.
    pub fn name_counts(&self) -> NameCounts {
        let routing = self.lock_routing();
        NameCounts {
            topics: routing.topics.len(),
            topology_entries: routing.topology.entries(),
            inbox_owners: routing.inbox_owners.len(),
        }
    }

    fn lock_routing(&self) -> MutexGuard<'_, Routing> {
        // Every critical section leaves the routing state consistent between statements that
        // can panic, so a poisoned lock is still safe to use.
        self.shared
            .routing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// How long a publish on a shared log waits for this node to read its batch back from the
/// tail, once the log acknowledged it.
const ROUTE_DEADLINE: Duration = Duration::from_secs(30);

/// How long a Subscribe with a start position waits for this node to route the shared log's
/// head before it starts its replay ([`Broker::route_log_head`]).
const REPLAY_HEAD_DEADLINE: Duration = Duration::from_secs(5);

/// Routes what the shared log's tail brings, in order, a run of ready events per lock: the
/// same bookkeeping and routing a local append does under the lock, for events from every node.
async fn route_tail(broker: Broker, mut tail: mpsc::Receiver<SharedEvent>) {
    let mut ready = Vec::with_capacity(TAIL_RUN);
    loop {
        let received = tokio::select! {
            received = tail.recv_many(&mut ready, TAIL_RUN) => received,
            _ = broker.stopped() => return,
        };
        if received == 0 {
            if !broker.is_shutting_down() {
                tracing::error!("the shared log's tail ended: this node no longer routes");
            }
            return;
        }
        let now = SystemTime::now();
        // Logged after the lock is released; the copies (of `Arc`s) only at debug level.
        let logged = tracing::enabled!(tracing::Level::DEBUG).then(|| ready.clone());
        let mut routing = broker.lock_routing();
        let mut last = None;
        for event in ready.drain(..) {
            routing.record(&event, now);
            routing.route(&event);
            last = Some(event.sequence);
        }
        if let Some(last) = last {
            broker.advance_routed(last);
        }
        drop(routing);
        for event in logged.iter().flatten() {
            log_published(event);
        }
    }
}

/// Events of the tail routed under one taking of the routing lock, at most.
const TAIL_RUN: usize = 256;

/// The debug line of one stored event: a reply (an event on a query's inbox), a query (an event
/// with a `reply_to`) or any other publish, so a request can be followed through the log by
/// its correlation id.
fn log_published(stored: &SharedEvent) {
    let event = &stored.event;
    let what = if event.topic.is_inbox() {
        "reply published"
    } else if event.reply_to.is_some() {
        "query published"
    } else {
        "published"
    };
    tracing::debug!(
        topic = %event.topic,
        sequence = stored.sequence,
        correlation_id = %event.correlation_id,
        source = %event.source,
        id = %event.id,
        "{what}"
    );
}

/// How often [`housekeeping`] runs.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);

/// Frees what has a time-to-live while nothing is written: events past the retention age (the
/// store's [`Store::expire`]), dedupe entries past the window, and state keyed by names that
/// went idle ([`forget_idle_names`]). Correctness never waits for it (reads and lookups judge
/// by the clock); it bounds memory and disk on a quiet bus. Ends when the bus shuts down.
async fn housekeeping(broker: Broker, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A sweep of the names goes round every table; twice per idle time is often enough.
    let sweep_every = (broker.shared.config.names_idle_after / 2).min(Duration::from_secs(30));
    let mut last_sweep = tokio::time::Instant::now();
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = broker.stopped() => return,
        }
        let now = SystemTime::now();
        broker.lock_routing().dedupe.expire(now);
        let store = broker.shared.store.clone();
        // Expiry may delete segment files: keep it off the async workers.
        match tokio::task::spawn_blocking(move || store.expire(now)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::error!(%error, "applying retention by age failed"),
            Err(error) => tracing::error!(%error, "applying retention by age panicked"),
        }
        if last_sweep.elapsed() >= sweep_every {
            last_sweep = tokio::time::Instant::now();
            forget_idle_names(&broker, SystemTime::now()).await;
        }
    }
}

/// Forgets the topic counters, topology edges and ended subscriptions unused for
/// `names_idle_after` (a topic is kept while the store holds events of it or someone
/// subscribes to it by name). Works a slice at a time, taking the routing lock for each slice
/// and yielding between them, so publishers never wait for a time that grows with the names.
async fn forget_idle_names(broker: &Broker, now: SystemTime) {
    let Some(idle_before) = now.checked_sub(broker.shared.config.names_idle_after) else {
        return;
    };
    let held = broker.shared.store.held_counts();
    let mut forgotten = 0;
    loop {
        let done = {
            let mut routing = broker.lock_routing();
            let Routing {
                topics,
                subscriptions,
                ..
            } = &mut *routing;
            topics.sweep_slice(idle_before, &mut forgotten, |name| {
                held.contains_key(name)
                    || Pattern::parse(name)
                        .is_ok_and(|pattern| subscriptions.get_mut(&pattern).is_some())
            })
        };
        if done {
            break;
        }
        tokio::task::yield_now().await;
    }
    while !broker
        .lock_routing()
        .topology
        .sweep_slice(idle_before, &mut forgotten)
    {
        tokio::task::yield_now().await;
    }
    if forgotten >= FORGOTTEN_BEFORE_TRIM {
        tracing::debug!(forgotten, "forgot idle names");
        names::release_freed_memory();
    }
}

/// Names forgotten in one sweep, or copied for one listing, before freed memory is handed back
/// to the system ([`names::release_freed_memory`]).
const FORGOTTEN_BEFORE_TRIM: usize = 10_000;

/// The dedupe window as the log left it: a durable store that restarts still knows what was
/// published within the window, so a producer retrying across a bus restart is deduplicated too.
fn recent_publishes(config: &BusConfig, store: &dyn Store) -> DedupeWindow {
    let mut window = DedupeWindow::new(config.dedupe_window, config.dedupe_max_entries);
    if !window.is_enabled() {
        return window;
    }
    let Some(since) = SystemTime::now().checked_sub(config.dedupe_window) else {
        return window;
    };
    let Ok(Some(first)) = store.first_sequence_at_or_after(since) else {
        return window;
    };
    let mut after = first - 1;
    loop {
        let chunk = match store.read_after(after, 4096) {
            Ok(chunk) if !chunk.is_empty() => chunk,
            _ => return window,
        };
        for event in &chunk {
            window.insert(
                &event.event.source,
                &event.event.id,
                event.sequence,
                event.publish_time,
            );
        }
        after = chunk.last().expect("not empty").sequence;
    }
}

/// Where [`Broker::place_group`] put a member.
pub enum GroupPlace {
    /// Served by this node (`None`: no placement to keep, outside a shared log or a group).
    Here(Option<GroupPlacement>),
    /// Served by the group's home, another node: join it there ([`Broker::join_elsewhere`]).
    Elsewhere(crate::store::PeerNode),
}

/// A consumer group's member placed on this node ([`Broker::place_group`]); dropping the last
/// one of a group tells the other nodes this node no longer has it.
pub struct GroupPlacement {
    broker: Broker,
    name: Arc<str>,
}

fn lock_placed(
    placed: &Mutex<HashMap<Arc<str>, usize>>,
) -> MutexGuard<'_, HashMap<Arc<str>, usize>> {
    placed
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Drop for GroupPlacement {
    fn drop(&mut self) {
        let shared = &self.broker.shared;
        let mut placed = lock_placed(&shared.placed_groups);
        let Some(count) = placed.get_mut(&self.name) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            placed.remove(&self.name);
            if let Some(log) = &shared.log {
                // Sent now; nothing waits for NATS to take it.
                drop(log.announce_group(&self.name, false));
            }
        }
    }
}

/// A batch that is stored and waits to be durable. See [`Broker::begin_publish`].
#[must_use = "a publish is acknowledged only once finished"]
pub struct PendingPublish {
    broker: Broker,
    published: Published,
    wait: Wait,
    /// When the broker took the batch, for the publish latency metric.
    started: std::time::Instant,
}

/// What a [`PendingPublish`] waits for.
enum Wait {
    /// Nothing: routed when appended.
    Done,
    /// The store's durable head to pass the batch.
    Durable(watch::Receiver<u64>),
    /// The shared log's acknowledgement, then this node's tail to pass the batch.
    Shared {
        /// The batch's topics, in order, for the published-events metric.
        topics: Vec<Topic>,
        appended: futures_util::future::BoxFuture<'static, Result<Vec<Appended>, StoreError>>,
    },
}

/// What a publish did with each event of its batch, in batch order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Published {
    /// The sequence of each event; for a duplicate, the original's.
    pub sequences: Vec<u64>,
    /// Whether each event was a duplicate within the dedupe window (and so not stored again).
    pub duplicates: Vec<bool>,
}

impl PendingPublish {
    /// Waits until the batch (and the originals of its duplicates) is durable and routed.
    pub async fn finish(self) -> Result<Published, BusError> {
        let mut durable_head = match self.wait {
            Wait::Done => {
                self.broker
                    .metrics()
                    .observe_publish(self.started.elapsed());
                return Ok(self.published);
            }
            Wait::Durable(durable_head) => durable_head,
            Wait::Shared { topics, appended } => {
                let appended = appended.await?;
                // Counted where the log acknowledged them, as a local append counts its own.
                let metrics = self.broker.metrics();
                let mut families = FamilyCache::default();
                let mut duplicates = 0;
                for (topic, appended) in topics.iter().zip(&appended) {
                    if appended.duplicate {
                        duplicates += 1;
                    } else {
                        families.get(metrics, topic.as_str()).published.inc();
                    }
                }
                metrics.dedupe_hits(duplicates);
                let published = Published {
                    sequences: appended.iter().map(|a| a.sequence).collect(),
                    duplicates: appended.iter().map(|a| a.duplicate).collect(),
                };
                let last = published.sequences.iter().copied().max().unwrap_or(0);
                self.broker.routed_past(last).await?;
                self.broker
                    .metrics()
                    .observe_publish(self.started.elapsed());
                return Ok(published);
            }
        };
        let last = self
            .published
            .sequences
            .iter()
            .copied()
            .max()
            .expect("a batch is never empty");
        loop {
            let durable = *durable_head.borrow_and_update();
            if durable >= last {
                self.broker.route_durable(durable);
                self.broker
                    .metrics()
                    .observe_publish(self.started.elapsed());
                return Ok(self.published);
            }
            if let Some(failure) = self.broker.shared.store.durability_error() {
                return Err(BusError::Storage(StoreError::Failed(failure)));
            }
            if durable_head.changed().await.is_err() {
                return Err(BusError::Storage(StoreError::Failed(
                    "the store closed before the batch was durable".into(),
                )));
            }
        }
    }
}

/// Queue of a query's inbox: one reply is expected; a few strays are tolerated.
const INBOX_QUEUE_SIZE: usize = 16;

struct RegistrationRequest<'a> {
    pattern: &'a Pattern,
    group: Option<&'a Arc<str>>,
    /// The subscribing service, for the topology; `None` for the bus's own inboxes.
    subscriber: Option<&'a str>,
    queue_size: usize,
    /// Set for a query's inbox: see [`Subscriber::only_correlation`].
    only_correlation: Option<Arc<str>>,
}

/// The receiving side of a subscriber in the tree. Dropping it removes the subscriber.
struct Registration {
    broker: Broker,
    id: u64,
    pattern: Pattern,
    group: Option<Arc<str>>,
    subscriber: Option<Arc<str>>,
    receiver: mpsc::Receiver<SharedEvent>,
    /// Shared with the subscriber's entry in the tree (see [`delivery`]).
    lane: Arc<Lane>,
}

impl Registration {
    /// Takes an event out of the queue's accounting once the stream has received it.
    fn received(&self, event: &crate::event::StoredEvent) {
        if self.lane.is_counted() {
            self.lane.release(delivery::weight(event));
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.lane.close();
        self.broker.unregister(self);
        // Unregistered, nobody sends any more: give back the room of what is still queued.
        self.receiver.close();
        while let Ok(event) = self.receiver.try_recv() {
            self.received(&event);
        }
    }
}

impl Routing {
    /// Offers a stored event to every matching subscriber. One whose queue has no room for it
    /// leaves the live path and will read it from the log ([`delivery`]); one whose stream is
    /// gone is dropped.
    fn route(&mut self, event: &SharedEvent) {
        // Weighed once, and only if someone listens.
        let mut weight = None;
        self.subscriptions.for_each_match_and_prune(
            &event.event.topic,
            |interest| {
                let size = *weight.get_or_insert_with(|| delivery::weight(event));
                interest
                    .individual
                    .retain(|subscriber| match subscriber.offer(event, size) {
                        Offer::Queued | Offer::CatchingUp => true,
                        Offer::Full => {
                            subscriber.lane.catch_up_after(event.sequence - 1);
                            true
                        }
                        Offer::Gone => false,
                    });
                for group in &mut interest.groups {
                    group.deliver(event, size);
                }
                interest.groups.retain(|g| !g.members.is_empty());
            },
            Interest::is_empty,
        );
    }

    /// Hands a reply to the query waiting for it on this node at once, before the store has
    /// made it durable: the asker waits in memory, so the reply need not wait for the disk
    /// (see "Durable stores" in the module docs). Everyone else (a subscriber of `>`, say)
    /// gets it routed, in order, once durable; the waiting query takes whichever copy comes
    /// first, and its inbox is gone by the time the other would come.
    fn hand_reply(&mut self, event: &SharedEvent) {
        if !self.inbox_owners.contains_key(&event.event.topic) {
            return;
        }
        let Ok(pattern) = Pattern::parse(event.event.topic.as_str()) else {
            return;
        };
        if let Some(interest) = self.subscriptions.get_mut(&pattern) {
            for inbox in interest
                .individual
                .iter()
                .filter(|subscriber| subscriber.only_correlation.is_some())
            {
                // An inbox's queue takes the reply or drops it when full; never ends.
                let _ = inbox.offer(event, 0);
            }
        }
    }

    /// Bookkeeping for lists and the topology.
    fn record(&mut self, stored: &SharedEvent, now: SystemTime) {
        let event = &stored.event;
        self.topics
            .record(event.topic.family(), stored.sequence, stored.publish_time);
        match self.inbox_owners.get(&event.topic) {
            Some((asker, _)) => self.topology.record_reply(&event.source, asker, now),
            None => self
                .topology
                .record_publish(&event.source, &event.topic, now),
        }
    }
}

impl Group {
    /// Queues the event with one member, round robin, skipping full members. If every member
    /// is full, the group's event is not dropped: the member whose turn it was becomes the
    /// group's catcher. It leaves the live path and reads the log from this event on, and every
    /// later event of the group is its own (no other member gets one) until it is live again,
    /// so each event of the group still goes to exactly one member, in order.
    ///
    /// A catcher that has not started reading the log (its client is not reading either)
    /// hands the role to the first member whose queue is empty, so one stalled member cannot
    /// hold up a group whose other members read. With `max_subscriber_lag`, a catcher further
    /// behind than that is dropped from the group and its stream ended (`SlowGroupMember`);
    /// the events it had taken on and not delivered are lost to the group (at most once, as
    /// AUTO promises, and as when any member leaves with events queued).
    fn deliver(&mut self, event: &SharedEvent, size: usize) {
        if let Some(catcher) = self.catcher.clone() {
            if !catcher.is_catching_up() {
                self.catcher = None;
            } else if self.max_lag.is_some_and(|max| {
                (event.sequence - 1).saturating_sub(catcher.resume_after()) > max
            }) {
                catcher.evict();
                self.members.retain(|m| !Arc::ptr_eq(&m.lane, &catcher));
                self.catcher = None;
                self.next = match self.members.len() {
                    0 => 0,
                    count => self.next % count,
                };
            } else {
                if catcher.is_marked() {
                    self.hand_over(&catcher);
                }
                return;
            }
        }
        let count = self.members.len();
        let mut gone = Vec::new();
        let mut delivered = false;
        for attempt in 0..count {
            let index = (self.next + attempt) % count;
            match self.members[index].offer(event, size) {
                Offer::Queued => {
                    self.next = index + 1;
                    delivered = true;
                    break;
                }
                Offer::Full | Offer::CatchingUp => {}
                Offer::Gone => gone.push(index),
            }
        }
        if !delivered && gone.len() < count {
            let turn = (0..count)
                .map(|attempt| (self.next + attempt) % count)
                .find(|index| !gone.contains(index))
                .expect("some member is not gone");
            let lane = &self.members[turn].lane;
            lane.catch_up_after(event.sequence - 1);
            self.catcher = Some(lane.clone());
            self.next = turn + 1;
        }
        if !gone.is_empty() {
            let mut index = 0;
            self.members.retain(|_| {
                let keep = !gone.contains(&index);
                index += 1;
                keep
            });
        }
        if self.members.is_empty() {
            self.next = 0;
        } else {
            self.next %= self.members.len();
        }
    }

    /// Gives the catching up of a catcher that has not started on it to a live member whose
    /// queue is empty (it reads: it drained everything), from the same event.
    fn hand_over(&mut self, catcher: &Arc<Lane>) {
        let Some(idle) = self.members.iter().find(|member| {
            !Arc::ptr_eq(&member.lane, catcher)
                && member.lane.is_live()
                && member.queue.capacity() == member.queue.max_capacity()
        }) else {
            return;
        };
        if catcher.cancel_catch_up() {
            idle.lane.catch_up_after(catcher.resume_after());
            self.catcher = Some(idle.lane.clone());
        }
    }
}

#[cfg(test)]
mod reply_tests {
    use std::time::Duration;

    use futures_util::{FutureExt as _, StreamExt as _};

    use super::*;
    use crate::store::test_store::TestStore;

    fn subscribe(broker: &Broker, pattern: &str) -> Subscription {
        broker
            .subscribe(SubscribeOptions::for_test(pattern))
            .unwrap()
    }

    async fn next_event(subscription: &mut Subscription) -> SharedEvent {
        loop {
            let item = tokio::time::timeout(Duration::from_secs(10), subscription.next())
                .await
                .expect("a delivery in time")
                .expect("the stream goes on")
                .expect("no error");
            if let Delivery::Event { event, .. } = item {
                return event;
            }
        }
    }

    /// The query's reply pays no fsync on the asker's path: the waiting query gets it while
    /// the store still holds it back, and every other reader (here a subscriber of `>`) gets
    /// it only once durable, after the query, in order. Its publisher is answered only then.
    #[tokio::test]
    async fn a_reply_reaches_the_waiting_query_before_it_is_durable_and_the_rest_after() {
        let (store, durable) = TestStore::held_durable();
        let store = Arc::new(store);
        let broker = Broker::new(BusConfig::default(), store.clone());
        let mut responder = subscribe(&broker, "q.ask");
        let mut everything = subscribe(&broker, ">");
        let asker = tokio::spawn({
            let broker = broker.clone();
            let ask = Event::for_test("q.ask");
            async move { broker.query(ask, Duration::from_secs(30)).await }
        });
        // The query is appended, and routed once durable.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while store.inner.bounds().head < 1 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the query was not appended"
            );
            tokio::task::yield_now().await;
        }
        durable.send_replace(1);
        let query = next_event(&mut responder).await;
        let inbox = query.event.reply_to.clone().expect("an inbox");
        assert_eq!(next_event(&mut everything).await.sequence, 1);

        let mut reply = Event::for_test(inbox.as_str());
        reply.correlation_id = query.event.correlation_id.clone();
        let publishing = broker.begin_publish(vec![reply]).unwrap();
        let answered = tokio::time::timeout(Duration::from_secs(10), asker)
            .await
            .expect("the query answered while its reply was not durable")
            .unwrap()
            .unwrap();
        assert_eq!(answered.sequence, 2);
        assert!(
            everything.next().now_or_never().is_none(),
            "a subscriber got the reply before it was durable"
        );

        durable.send_replace(2);
        let published = publishing.finish().await.unwrap();
        assert_eq!(published.sequences, [2]);
        assert_eq!(next_event(&mut everything).await.sequence, 2);
    }
}
