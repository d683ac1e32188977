//! The broker's own settings: a plain struct of limits and sizes, with no notion of where the
//! values came from. Flags, `EVENTBUS_*` variables and the config file are read and layered at
//! the edge ([`crate::config`]), which fills this struct; the broker and its tests only see it.

use std::time::Duration;

/// A setting whose value cannot work: its name (the config key) and the rule it breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}: {rule}")]
pub struct InvalidSetting {
    /// The config key, e.g. `max_message_bytes`.
    pub setting: &'static str,
    /// What it must be, with the numbers that decide it.
    pub rule: String,
}

/// Limits and sizes the broker works within. Every field has a default that suits one machine.
#[derive(Debug, Clone, PartialEq)]
pub struct BusConfig {
    /// Events kept for replay (`earliest`, `after_sequence`, `from_time`), at most this many...
    pub retention_max_events: u64,
    /// ...and at most this many bytes of them (data plus metadata in memory; on disk, the
    /// segment files)...
    pub retention_max_bytes: u64,
    /// ...and none older than this, if set.
    pub retention_max_age: Option<Duration>,
    /// Events queued for one live subscriber at most. A subscriber whose queue is full leaves
    /// the live path and catches up from the log (see `broker::subscription`); it is not ended.
    pub subscriber_queue_size: usize,
    /// Bytes of events (as retention counts them) queued for one live subscriber at most, with
    /// the same effect as a full queue; an empty queue takes one event of any size. Also bounds
    /// what one replay, or one MANUAL-ack group's read-ahead, reads from the log at a time.
    pub subscriber_queue_bytes: usize,
    /// Bytes of events queued for all live subscribers together at most: past it, a subscriber
    /// whose queue would grow catches up from the log instead. Bounds the bus's memory for
    /// delivery whatever the number of subscribers.
    pub delivery_buffer_bytes: usize,
    /// A subscriber catching up from the log that is more than this many sequences behind the
    /// head is ended (RESOURCE_EXHAUSTED `slow-consumer`, or `slow-group-member`). `None`: never;
    /// it is ended only when retention drops events it has not read (`replay-overrun`).
    pub max_subscriber_lag: Option<u64>,
    /// The largest `data` of one event.
    pub max_event_data_bytes: usize,
    /// The most events in one publish batch.
    pub max_batch_events: usize,
    /// The largest gRPC message the server accepts or sends; sized to fit a full batch.
    pub max_message_bytes: usize,
    /// Query timeout when the request names none.
    pub default_query_timeout: Duration,
    /// The longest a query may wait, whatever it asks for.
    pub max_query_timeout: Duration,
    /// Idempotent publish: an event whose (source, id) was published within this window is not
    /// stored again. Zero turns it off.
    pub dedupe_window: Duration,
    /// The most (source, id) pairs remembered, whatever the window: bounds memory.
    pub dedupe_max_entries: usize,
    /// State keyed by names clients choose (a topic's counters, a topology edge, an ended
    /// subscription, a MANUAL-ack group with no member) is forgotten once unused this long, so
    /// memory follows the names in use, not every name ever seen. A group's cursor stays saved.
    pub names_idle_after: Duration,
    /// The most topics, and separately the most topology edges and subscriptions, tracked at
    /// once; events of names past it are counted as untracked instead.
    pub max_names: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            retention_max_events: 1_000_000,
            retention_max_bytes: 256 * 1024 * 1024,
            retention_max_age: None,
            subscriber_queue_size: 8192,
            subscriber_queue_bytes: 8 * 1024 * 1024,
            delivery_buffer_bytes: 256 * 1024 * 1024,
            max_subscriber_lag: None,
            max_event_data_bytes: 1024 * 1024,
            max_batch_events: 10_000,
            max_message_bytes: 16 * 1024 * 1024,
            default_query_timeout: Duration::from_secs(5),
            max_query_timeout: Duration::from_secs(60),
            dedupe_window: Duration::from_secs(120),
            dedupe_max_entries: 1_000_000,
            names_idle_after: Duration::from_secs(3600),
            max_names: 100_000,
        }
    }
}

/// Room in a gRPC message for an event's metadata and framing beyond its data.
pub const MESSAGE_OVERHEAD_BYTES: usize = 64 * 1024;

impl BusConfig {
    /// Refuses settings that contradict each other.
    ///
    /// # Errors
    /// [`InvalidSetting`] naming the first setting at fault and the rule it breaks.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        let invalid = |setting, rule: String| Err(InvalidSetting { setting, rule });
        if self.subscriber_queue_size == 0 {
            return invalid("subscriber_queue_size", "must be at least 1".into());
        }
        if self.subscriber_queue_bytes == 0 {
            return invalid("subscriber_queue_bytes", "must be at least 1".into());
        }
        if self.delivery_buffer_bytes < self.subscriber_queue_bytes {
            return invalid(
                "delivery_buffer_bytes",
                format!(
                    "must be at least subscriber_queue_bytes ({}) so one subscriber's queue fits",
                    self.subscriber_queue_bytes
                ),
            );
        }
        if self.max_subscriber_lag == Some(0) {
            return invalid("max_subscriber_lag", "must be at least 1".into());
        }
        if self.max_batch_events == 0 {
            return invalid("max_batch_events", "must be at least 1".into());
        }
        if self.retention_max_events == 0 {
            return invalid("retention_max_events", "must be at least 1".into());
        }
        let smallest_message = self.max_event_data_bytes + MESSAGE_OVERHEAD_BYTES;
        if self.max_message_bytes < smallest_message {
            return invalid(
                "max_message_bytes",
                format!(
                    "must be at least max_event_data_bytes + {MESSAGE_OVERHEAD_BYTES} \
                     ({smallest_message}) so one full-size event fits"
                ),
            );
        }
        if self.retention_max_bytes < smallest_message as u64 {
            return invalid(
                "retention_max_bytes",
                format!("must hold at least one full-size event ({smallest_message} bytes)"),
            );
        }
        if self.max_names == 0 {
            return invalid("max_names", "must be at least 1".into());
        }
        if self.names_idle_after.is_zero() {
            return invalid("names_idle_after", "must be more than 0s".into());
        }
        if self.default_query_timeout > self.max_query_timeout {
            return invalid(
                "default_query_timeout",
                "must not exceed max_query_timeout".into(),
            );
        }
        Ok(())
    }
}
