//! The bus's domain errors. Each says what was wrong in words a client can act on; the service
//! adapter maps each variant to a gRPC status in exactly one place
//! ([`crate::service::status`]).

use std::time::Duration;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A request field breaks a rule. `field` is a path such as `events[2].topic`.
    #[error("{field}: {rule}")]
    InvalidArgument { field: String, rule: String },

    /// An event's data is over the configured limit. `field` is e.g. `events[2].data`.
    #[error("{field}: {size} bytes is over the limit of {limit} bytes")]
    EventTooLarge {
        field: String,
        size: usize,
        limit: usize,
    },

    /// An event the bus could store but not deliver: its encoding, with what the bus adds on
    /// the way out, would not fit the server's message limit. `field` is e.g. `events[2]`.
    #[error(
        "{field}: the encoded event is {size} bytes, over the limit of {limit} bytes for a \
         published event: with up to {} bytes the bus adds on delivery it must fit the server's \
         message limit of {max_message_bytes} bytes (max_message_bytes)",
        crate::service::convert::DELIVERY_OVERHEAD_BYTES
    )]
    UndeliverableSize {
        field: String,
        size: usize,
        limit: usize,
        max_message_bytes: usize,
    },

    /// A query's topic had no subscriber when it was published, so no reply can come.
    #[error("no responders for topic {topic}")]
    NoResponders { topic: String },

    /// No reply came in time.
    #[error("no reply to the query on topic {topic} within {}", crate::timefmt::format_duration(*.timeout))]
    QueryTimeout { topic: String, timeout: Duration },

    /// A subscriber catching up from the log fell further behind the head than
    /// `max_subscriber_lag` allows.
    #[error(
        "subscriber too slow: catching up from the log it was {behind} sequences behind the head, \
         over the limit of {max_lag} (max_subscriber_lag); last delivered sequence \
         {last_delivered}; resubscribe with after_sequence={last_delivered} to go on"
    )]
    SlowConsumer {
        behind: u64,
        max_lag: u64,
        last_delivered: u64,
    },

    /// A member of a live group, catching up from the log for its group, fell further behind the
    /// head than `max_subscriber_lag` allows. The group's events it had taken on and not
    /// delivered are lost to the group.
    #[error(
        "group member too slow: catching up from the log for its group it was {behind} sequences \
         behind the head, over the limit of {max_lag} (max_subscriber_lag), so the group's events \
         after sequence {last_delivered} that it had taken on were dropped and this member was \
         ended; last delivered sequence {last_delivered}. Resubscribe to rejoin; for \
         at-least-once delivery use ack_mode MANUAL"
    )]
    SlowGroupMember {
        behind: u64,
        max_lag: u64,
        last_delivered: u64,
    },

    /// A replay read slower than retention dropped events, so the next one is gone.
    #[error(
        "replay fell behind retention: events after sequence {last_delivered} were dropped \
         before they could be delivered; resubscribe with after_sequence={last_delivered} to go \
         on from the oldest held event"
    )]
    ReplayOverrun { last_delivered: u64 },

    /// A request's bytes are not a valid protobuf encoding of its message type (a string field
    /// that is not UTF-8, a truncated field, a bad wire type, a body that ends mid-message).
    /// `message` is the full protobuf name (`eventbus.v1.PublishRequest`), or `message` where
    /// the framing failed before the type mattered; `detail` says what failed, with the field
    /// path.
    #[error("request {message} failed to decode: {detail}")]
    MalformedRequest { message: String, detail: String },

    /// The bus failed while serving the call: a panic in its handler or response stream, logged
    /// by the bus with where it happened. Other calls, on the same connection too, go on.
    #[error("internal error: the bus failed while serving this call (it logged the cause)")]
    Internal,

    /// A request message declares more bytes than the bus takes in one message.
    #[error("a request message of {declared} bytes is over the limit of {limit} bytes")]
    MessageTooLarge { declared: usize, limit: usize },

    /// A unary request's body, or one message of a streaming request, did not arrive whole
    /// within the receive timeout after it started.
    #[error(
        "the request did not arrive within {}: a unary request, or each message of a stream, \
         must arrive whole within it once started",
        crate::timefmt::format_duration(*.timeout)
    )]
    ReceiveTimeout { timeout: Duration },

    /// Partly received requests, across all connections, would pass the receive budget.
    #[error(
        "the bus is receiving too much at once: partly received requests would pass the budget \
         of {budget} bytes; retry later"
    )]
    ReceiveBudgetExhausted { budget: usize },

    /// An Ack or Nack names a group that has no MANUAL-ack subscription on this bus.
    #[error(
        "no MANUAL-ack group named {group:?} on this bus (subscribe with ack_mode MANUAL first)"
    )]
    UnknownGroup { group: String },

    /// The bus is stopping and takes no new work.
    #[error("the bus is shutting down")]
    ShuttingDown,

    /// On a JetStream-backed cluster, the node a member joined through asked the group's home
    /// node (see `crate::broker::relay`), and that node no longer has the group: it moved to
    /// `node` meanwhile. Retrying joins it there.
    #[error(
        "group {group:?} moved to another bus node ({node}) while this member joined; retry \
         to join it there"
    )]
    GroupOnAnotherNode { group: String, node: String },

    /// On a JetStream-backed cluster, a member connected to this node belongs to a group homed
    /// on another node (`node`), which stopped answering or ended the member for a reason it
    /// did not pass on (`detail`): the member ends, and rejoining makes a live node the group's
    /// home (see `crate::broker::relay`).
    #[error(
        "lost group {group:?}'s home node ({node}): {detail}; rejoin the group (a MANUAL-ack \
         group delivers what was not acknowledged again)"
    )]
    GroupHomeLost {
        group: String,
        node: String,
        detail: String,
    },

    /// The call carries no credentials, or ones the bus does not know, while `[[principals]]`
    /// are configured (see [`crate::auth`]). `detail` says which and what to send.
    #[error("not authenticated: {detail}")]
    Unauthenticated { detail: String },

    /// The caller's principal may not do this: `action` is `publish`, `subscribe`, `join`
    /// (a group), `admin` or `source`, `target` the topic, pattern, group or source concerned,
    /// `rule` why. Nothing of the call was applied.
    #[error("permission denied: principal {principal:?} may not {action} {target:?}: {rule}")]
    PermissionDenied {
        principal: String,
        action: &'static str,
        target: String,
        rule: String,
    },

    /// A limit of [`crate::limits`] was reached: `limit` is its config key
    /// (`publish_events_per_second`, ...), `scope` whose it is.
    #[error("limit {limit} of {scope} reached: {rule}")]
    LimitExceeded {
        limit: &'static str,
        scope: String,
        rule: String,
    },

    /// The store failed.
    #[error(transparent)]
    Storage(#[from] StoreError),
}

impl BusError {
    /// A bad field, with the rule it breaks.
    pub fn invalid(field: impl Into<String>, rule: impl Into<String>) -> BusError {
        BusError::InvalidArgument {
            field: field.into(),
            rule: rule.into(),
        }
    }
}
