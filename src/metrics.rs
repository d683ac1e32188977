//! The bus's metrics: registered once here, handed to the code that updates them, exposed in the
//! Prometheus text format by the admin listener ([`crate::admin`]).
//!
//! The broker holds a [`Metrics`] handle and never sees HTTP. Hot-path updates are atomic adds on
//! counters resolved ahead: a topic's [`FamilyCounters`] are looked up once per batch (or once per
//! run of one family on a subscription, through a [`FamilyCache`]), not once per event. Values
//! that are cheaper to read than to keep (bytes held by the store, bytes queued for delivery) are
//! set just before a scrape, by [`crate::broker::Broker::render_metrics`].
//!
//! # Bounded labels
//! No label takes a value a client chooses freely. Events are counted per **topic family**
//! ([`topic_family`]: the first token of the topic, `orders` for `orders.created.eu`; the first
//! two for the bus's own `_bus.` topics), and at most [`MAX_TOPIC_FAMILIES`] families get a label
//! of their own: events of any family past that are counted under [`OVERFLOW_FAMILY`]. A client
//! inventing topics can therefore add at most that many label sets per metric, ever.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Topic families with a label of their own, at most; see the module docs.
pub const MAX_TOPIC_FAMILIES: usize = 256;

/// The `family` label of events whose family came after [`MAX_TOPIC_FAMILIES`] others.
pub const OVERFLOW_FAMILY: &str = "_overflow";

/// The family a topic's events are counted under: its first token (`orders.created` →
/// `orders`), or its first two for the bus's reserved `_bus.` topics (`_bus.inbox.<id>` →
/// `_bus.inbox`, `_bus.dlq.<group>` → `_bus.dlq`).
pub fn topic_family(topic: &str) -> &str {
    let mut dots = topic.match_indices('.').map(|(at, _)| at);
    let end = if topic.starts_with("_bus.") {
        dots.nth(1)
    } else {
        dots.next()
    };
    &topic[..end.unwrap_or(topic.len())]
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabel {
    family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// How a query ended, for `eventbus_queries_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryOutcome {
    /// A reply came within the timeout.
    Answered,
    /// No subscriber matched the query's topic: it failed at once.
    NoResponders,
    /// No reply came within the timeout.
    Timeout,
    /// Refused or cut short otherwise (invalid, shutting down, the store failed).
    Error,
}

/// Why the bus ended a subscription that could not keep up, for
/// `eventbus_slow_consumers_ended_total{reason}` (the reasons clients see as `eventbus-error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowEnding {
    /// More than `max_subscriber_lag` behind as it read the log.
    SlowConsumer,
    /// A live group's catcher dropped for lagging.
    SlowGroupMember,
    /// Retention dropped events it had not read.
    ReplayOverrun,
}

/// The per-family counters of one topic family (or of the overflow), resolved once and then
/// updated with atomic adds. Cheap to clone (each counter is an `Arc`).
#[derive(Debug, Clone, Default)]
pub struct FamilyCounters {
    /// Events stored (duplicates excluded).
    pub published: Counter,
    /// Events handed to a subscriber's stream (every delivery, redeliveries included).
    pub delivered: Counter,
    /// MANUAL-ack events acknowledged.
    pub acked: Counter,
    /// MANUAL-ack events handed back with Nack.
    pub nacked: Counter,
    /// Deliveries after the first of a MANUAL-ack event.
    pub redelivered: Counter,
    /// Events moved to a dead-letter topic after their last delivery.
    pub dead_lettered: Counter,
}

/// Remembers the last family resolved, so a stream of events of one family resolves it once.
/// Allocates only when the family changes to one longer than any it held before.
#[derive(Debug, Default)]
pub struct FamilyCache {
    family: String,
    counters: Option<Arc<FamilyCounters>>,
}

impl FamilyCache {
    /// The counters of `topic`'s family.
    pub fn get(&mut self, metrics: &Metrics, topic: &str) -> &FamilyCounters {
        let family = topic_family(topic);
        if self.counters.is_none() || self.family != family {
            self.counters = Some(metrics.family(family));
            self.family.clear();
            self.family.push_str(family);
        }
        self.counters.as_deref().expect("set above")
    }
}

/// The bus's metrics. Cheap to clone: a handle to shared state. See the module docs.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

struct Inner {
    /// Written only while [`Metrics::with_family_limit`] builds it; encoding only reads.
    registry: Registry,
    family_limit: usize,
    /// Family name → its counters. Read-mostly: a new family takes the write lock once.
    families: RwLock<HashMap<Box<str>, Arc<FamilyCounters>>>,
    overflow: Arc<FamilyCounters>,
    by_family: ByFamily,
    publish_seconds: Histogram,
    query_seconds: Histogram,
    queries: [Counter; 4],
    slow_endings: [Counter; 3],
    /// `eventbus_auth_denied_total{action}`: a fixed set of actions, not client-chosen.
    denials: Family<ActionLabel, Counter>,
    /// `eventbus_limit_exceeded_total{limit}`: labels are the limits' config keys.
    limits_exceeded: Family<LimitLabel, Counter>,
    subscriptions: Gauge,
    connections: Gauge,
    subscriber_lag: Histogram,
    delivery_queued_bytes: Gauge,
    store_bytes: Gauge,
    store_segments: Gauge,
    store_events: Gauge,
    fsync_seconds: Histogram,
    dedupe_hits: Counter,
}

/// The labelled families behind [`FamilyCounters`].
struct ByFamily {
    published: Family<FamilyLabel, Counter>,
    delivered: Family<FamilyLabel, Counter>,
    acked: Family<FamilyLabel, Counter>,
    nacked: Family<FamilyLabel, Counter>,
    redelivered: Family<FamilyLabel, Counter>,
    dead_lettered: Family<FamilyLabel, Counter>,
}

impl ByFamily {
    fn counters(&self, family: &str) -> FamilyCounters {
        let label = FamilyLabel {
            family: family.to_owned(),
        };
        FamilyCounters {
            published: self.published.get_or_create_owned(&label),
            delivered: self.delivered.get_or_create_owned(&label),
            acked: self.acked.get_or_create_owned(&label),
            nacked: self.nacked.get_or_create_owned(&label),
            redelivered: self.redelivered.get_or_create_owned(&label),
            dead_lettered: self.dead_lettered.get_or_create_owned(&label),
        }
    }
}

/// Latency buckets in seconds: 50 µs doubling to about 26 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_05, 2.0, 20)
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// The bus's metrics, registered, with [`MAX_TOPIC_FAMILIES`] families labelled at most.
    pub fn new() -> Metrics {
        Metrics::with_family_limit(MAX_TOPIC_FAMILIES)
    }

    /// As [`Metrics::new`], labelling at most `family_limit` topic families (for tests).
    pub fn with_family_limit(family_limit: usize) -> Metrics {
        let mut registry = Registry::default();
        let by_family = ByFamily {
            published: Family::default(),
            delivered: Family::default(),
            acked: Family::default(),
            nacked: Family::default(),
            redelivered: Family::default(),
            dead_lettered: Family::default(),
        };
        // prometheus-client appends `_total` to counters.
        for (name, help, family) in [
            (
                "eventbus_events_published",
                "Events stored, by topic family (duplicates excluded)",
                &by_family.published,
            ),
            (
                "eventbus_events_delivered",
                "Events handed to subscription streams, by topic family",
                &by_family.delivered,
            ),
            (
                "eventbus_events_acked",
                "MANUAL-ack events acknowledged, by topic family",
                &by_family.acked,
            ),
            (
                "eventbus_events_nacked",
                "MANUAL-ack events handed back with Nack, by topic family",
                &by_family.nacked,
            ),
            (
                "eventbus_events_redelivered",
                "Deliveries after the first of MANUAL-ack events, by topic family",
                &by_family.redelivered,
            ),
            (
                "eventbus_events_dead_lettered",
                "Events moved to a dead-letter topic, by topic family",
                &by_family.dead_lettered,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        let publish_seconds = Histogram::new(latency_buckets());
        registry.register(
            "eventbus_publish_duration_seconds",
            "Time from a publish batch's arrival at the broker to its acknowledgement (durable and routed)",
            publish_seconds.clone(),
        );
        let query_seconds = Histogram::new(latency_buckets());
        registry.register(
            "eventbus_query_duration_seconds",
            "Time from a query's arrival at the broker to its reply (answered queries)",
            query_seconds.clone(),
        );
        let queries_family = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "eventbus_queries",
            "Queries by outcome: answered, no_responders, timeout, error",
            queries_family.clone(),
        );
        let queries = ["answered", "no_responders", "timeout", "error"]
            .map(|outcome| queries_family.get_or_create_owned(&OutcomeLabel { outcome }));
        let slow_family = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "eventbus_slow_consumers_ended",
            "Subscriptions the bus ended for not keeping up, by reason",
            slow_family.clone(),
        );
        let slow_endings = ["slow-consumer", "slow-group-member", "replay-overrun"]
            .map(|reason| slow_family.get_or_create_owned(&ReasonLabel { reason }));
        let denials = Family::<ActionLabel, Counter>::default();
        registry.register(
            "eventbus_auth_denied",
            "Calls refused by authentication or permissions, by action: authenticate, publish, \
             subscribe, join, admin, source",
            denials.clone(),
        );
        let limits_exceeded = Family::<LimitLabel, Counter>::default();
        registry.register(
            "eventbus_limit_exceeded",
            "Calls refused with RESOURCE_EXHAUSTED limit-exceeded, by the limit's config key",
            limits_exceeded.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let gauge = Gauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        let subscriptions = gauge(
            &mut registry,
            "eventbus_subscriptions_active",
            "Open subscriptions (group members included)",
        );
        let connections = gauge(
            &mut registry,
            "eventbus_connections_active",
            "Open client connections",
        );
        let delivery_queued_bytes = gauge(
            &mut registry,
            "eventbus_delivery_queued_bytes",
            "Bytes of events queued for live subscribers, all queues together",
        );
        let store_bytes = gauge(
            &mut registry,
            "eventbus_store_bytes",
            "Bytes the store holds (segment files on disk, or events in memory)",
        );
        let store_segments = gauge(
            &mut registry,
            "eventbus_store_segments",
            "Segment files of the file store (0 for the memory store)",
        );
        let store_events = gauge(
            &mut registry,
            "eventbus_store_events",
            "Events the store holds for replay",
        );
        let subscriber_lag = Histogram::new(exponential_buckets(1.0, 4.0, 12));
        registry.register(
            "eventbus_subscriber_lag_events",
            "How far behind the head (in events) a subscriber catching up from the log was, at each read",
            subscriber_lag.clone(),
        );
        let fsync_seconds = Histogram::new(latency_buckets());
        registry.register(
            "eventbus_store_fsync_duration_seconds",
            "Time of one file-store fsync round (all dirty segment files)",
            fsync_seconds.clone(),
        );
        let dedupe_hits = Counter::default();
        registry.register(
            "eventbus_dedupe_hits",
            "Published events dropped as duplicates within the dedupe window",
            dedupe_hits.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "eventbus_build_info",
            "The bus's build: always 1, with the version as a label",
            build,
        );
        let overflow = Arc::new(by_family.counters(OVERFLOW_FAMILY));
        Metrics {
            inner: Arc::new(Inner {
                registry,
                family_limit,
                families: RwLock::new(HashMap::new()),
                overflow,
                by_family,
                publish_seconds,
                query_seconds,
                queries,
                slow_endings,
                denials,
                limits_exceeded,
                subscriptions,
                connections,
                subscriber_lag,
                delivery_queued_bytes,
                store_bytes,
                store_segments,
                store_events,
                fsync_seconds,
                dedupe_hits,
            }),
        }
    }

    /// The counters of a topic family (a name from [`topic_family`]); the overflow's once
    /// [`MAX_TOPIC_FAMILIES`] (or the test limit) families have their own. Takes a read lock and
    /// a hash lookup: callers resolve once per batch or keep a [`FamilyCache`].
    pub fn family(&self, family: &str) -> Arc<FamilyCounters> {
        let inner = &self.inner;
        if let Some(counters) = inner
            .families
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(family)
        {
            return counters.clone();
        }
        let mut families = inner.families.write().unwrap_or_else(|e| e.into_inner());
        if let Some(counters) = families.get(family) {
            return counters.clone();
        }
        if families.len() >= inner.family_limit {
            return inner.overflow.clone();
        }
        let counters = Arc::new(inner.by_family.counters(family));
        families.insert(family.into(), counters.clone());
        counters
    }

    /// How many topic families have a label of their own (at most the limit).
    pub fn labelled_families(&self) -> usize {
        self.inner
            .families
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Records a publish batch's time from arrival to acknowledgement.
    pub fn observe_publish(&self, took: Duration) {
        self.inner.publish_seconds.observe(took.as_secs_f64());
    }

    /// Counts a query's outcome and, if answered, its time.
    pub fn observe_query(&self, outcome: QueryOutcome, took: Duration) {
        let index = match outcome {
            QueryOutcome::Answered => {
                self.inner.query_seconds.observe(took.as_secs_f64());
                0
            }
            QueryOutcome::NoResponders => 1,
            QueryOutcome::Timeout => 2,
            QueryOutcome::Error => 3,
        };
        self.inner.queries[index].inc();
    }

    /// Counts a subscription the bus ended for not keeping up.
    pub fn slow_consumer_ended(&self, why: SlowEnding) {
        let index = match why {
            SlowEnding::SlowConsumer => 0,
            SlowEnding::SlowGroupMember => 1,
            SlowEnding::ReplayOverrun => 2,
        };
        self.inner.slow_endings[index].inc();
    }

    /// Counts a call refused by authentication or permissions; `action` is a
    /// [`crate::error::BusError::PermissionDenied`] action, or `authenticate`.
    pub fn auth_denied(&self, action: &'static str) {
        self.inner
            .denials
            .get_or_create(&ActionLabel { action })
            .inc();
    }

    /// Counts a call refused by a limit of [`crate::limits`]; `limit` is its config key.
    pub fn limit_exceeded(&self, limit: &'static str) {
        self.inner
            .limits_exceeded
            .get_or_create(&LimitLabel { limit })
            .inc();
    }

    /// Records how many events behind the head a catching-up subscriber was when it read.
    pub fn observe_lag(&self, behind: u64) {
        self.inner.subscriber_lag.observe(behind as f64);
    }

    /// Counts events dropped as duplicates.
    pub fn dedupe_hits(&self, count: u64) {
        if count > 0 {
            self.inner.dedupe_hits.inc_by(count);
        }
    }

    /// One more open subscription until the guard is dropped.
    pub fn subscription_opened(&self) -> GaugeGuard {
        GaugeGuard::new(&self.inner.subscriptions)
    }

    /// One more open connection until the guard is dropped.
    pub fn connection_opened(&self) -> GaugeGuard {
        GaugeGuard::new(&self.inner.connections)
    }

    /// Open client connections now (`eventbus_connections_active`).
    pub fn connections_active(&self) -> u64 {
        self.inner.connections.get().max(0) as u64
    }

    /// Open subscriptions now, group members included (`eventbus_subscriptions_active`).
    pub fn subscriptions_open(&self) -> u64 {
        self.inner.subscriptions.get().max(0) as u64
    }

    /// Queries so far by outcome (`eventbus_queries_total`), in the order answered, no
    /// responders, timeout, error.
    pub fn query_outcomes(&self) -> [u64; 4] {
        std::array::from_fn(|index| self.inner.queries[index].get())
    }

    /// Subscriptions ended for not keeping up so far, all reasons
    /// (`eventbus_slow_consumers_ended_total`).
    pub fn slow_consumers_ended(&self) -> u64 {
        self.inner.slow_endings.iter().map(Counter::get).sum()
    }

    /// Observes fsync rounds: handed to the file store ([`FsyncTimer`]).
    pub fn fsync_timer(&self) -> FsyncTimer {
        FsyncTimer(self.inner.fsync_seconds.clone())
    }

    /// Sets the values read at scrape time. Sizes in bytes.
    pub fn set_scraped(&self, scraped: Scraped) {
        let inner = &self.inner;
        inner
            .delivery_queued_bytes
            .set(clamp(scraped.delivery_queued_bytes));
        inner.store_bytes.set(clamp(scraped.store_bytes));
        inner.store_segments.set(clamp(scraped.store_segments));
        inner.store_events.set(clamp(scraped.store_events));
    }

    /// The metrics in the text exposition format (OpenMetrics 1.0, which Prometheus scrapes and
    /// its text parsers read), ending in `# EOF`.
    pub fn encode(&self) -> String {
        let mut text = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)
            .expect("writing to a String does not fail");
        text
    }
}

fn clamp(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Values set at scrape time ([`Metrics::set_scraped`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scraped {
    /// Bytes queued for all live subscribers.
    pub delivery_queued_bytes: u64,
    /// Bytes the store holds.
    pub store_bytes: u64,
    /// Segment files (0 for a memory store).
    pub store_segments: u64,
    /// Events held.
    pub store_events: u64,
}

/// Holds one unit of a gauge (an open subscription, a connection) until dropped.
#[derive(Debug)]
pub struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn new(gauge: &Gauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Records fsync times for the file store, which knows nothing else of metrics.
#[derive(Debug, Clone)]
pub struct FsyncTimer(Histogram);

impl FsyncTimer {
    /// Records one fsync round that took `took`.
    pub fn observe(&self, took: Duration) {
        self.0.observe(took.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_the_first_token_or_two_for_bus_topics() {
        assert_eq!(topic_family("orders.created.eu"), "orders");
        assert_eq!(topic_family("orders"), "orders");
        assert_eq!(topic_family("_bus.inbox.0193abc"), "_bus.inbox");
        assert_eq!(topic_family("_bus.dlq.billing"), "_bus.dlq");
        assert_eq!(topic_family("_bus.x"), "_bus.x");
    }

    /// A client that invents topic families cannot grow the label set past the limit: the rest
    /// are counted, under the overflow label.
    #[test]
    fn invented_families_cannot_grow_the_label_set() {
        let metrics = Metrics::with_family_limit(8);
        let mut cache = FamilyCache::default();
        for i in 0..10_000 {
            cache
                .get(&metrics, &format!("invented{i}.topic"))
                .published
                .inc();
        }
        assert_eq!(metrics.labelled_families(), 8);
        let text = metrics.encode();
        let series = text
            .lines()
            .filter(|line| line.starts_with("eventbus_events_published_total{"))
            .count();
        assert_eq!(series, 8 + 1, "{text}");
        assert!(
            text.contains("eventbus_events_published_total{family=\"_overflow\"} 9992"),
            "{text}"
        );
        // A family labelled before the limit keeps its own counter.
        metrics.family("invented3").published.inc();
        let text = metrics.encode();
        assert!(text.contains("eventbus_events_published_total{family=\"invented3\"} 2"));
    }

    #[test]
    fn the_exposition_has_the_documented_names() {
        let metrics = Metrics::new();
        metrics.observe_query(QueryOutcome::NoResponders, Duration::ZERO);
        metrics.observe_publish(Duration::from_millis(2));
        let _open = metrics.subscription_opened();
        let text = metrics.encode();
        for expected in [
            "eventbus_build_info{version=\"",
            "eventbus_queries_total{outcome=\"no_responders\"} 1",
            "eventbus_publish_duration_seconds_count 1",
            "eventbus_subscriptions_active 1",
            "eventbus_dedupe_hits_total 0",
            "# EOF",
        ] {
            assert!(text.contains(expected), "{expected:?} in:\n{text}");
        }
    }
}
