//! The one boundary between wire types (`pb`) and domain types. Incoming messages are checked
//! here field by field, so an error names the field (`events[2].topic`) and the rule it breaks;
//! nothing past this point sees an unchecked value.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::broker::topology::{Edge, EdgeKind, Node, NodeKind, TopologySnapshot};
use crate::broker::{
    AckMode, ManualAck, StartPosition, SubscribeOptions, SubscriptionInfo, TopicSummary,
};
use crate::error::BusError;
use crate::event::{Event, StoredEvent};
use crate::pb;
use crate::topic::{Pattern, Topic};

/// The longest `id`, `source`, `type`, `data_content_type`, `correlation_id`, `causation_id`,
/// group or subscriber name.
pub const MAX_NAME_BYTES: usize = 256;
/// The most attributes on one event.
pub const MAX_ATTRIBUTES: usize = 64;
/// The longest attribute key.
pub const MAX_ATTRIBUTE_KEY_BYTES: usize = 128;
/// The longest attribute value.
pub const MAX_ATTRIBUTE_VALUE_BYTES: usize = 4096;

/// Subscriber name used when a subscription names none.
pub const UNNAMED_SUBSCRIBER: &str = "unnamed";

/// Where an event sits in a request (`event`, `events[3]`), for error messages. The field path
/// is spelled out only when a check fails: formatting it for every field of every event was a
/// measurable share of the publish path.
#[derive(Debug, Clone, Copy)]
pub enum EventPath<'a> {
    Named(&'a str),
    Indexed(&'a str, usize),
}

impl std::fmt::Display for EventPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventPath::Named(name) => f.write_str(name),
            EventPath::Indexed(name, index) => write!(f, "{name}[{index}]"),
        }
    }
}

/// The most bytes the bus adds to an event's encoding on its way out, in any form it sends it:
/// an id and a type when the producer left them empty, `time`, `sequence` and `publish_time`, a
/// query's inbox and correlation id, a dead letter's topic, id suffix and four `dlq_*`
/// attributes, and the `SubscribeResponse` / `QueryResponse` wrapping. The sum of those maxima
/// is 1,351 bytes (a test builds the worst case); this leaves room.
pub const DELIVERY_OVERHEAD_BYTES: usize = 2048;

/// Whatever the bus accepts it must be able to deliver: an event whose encoding plus
/// [`DELIVERY_OVERHEAD_BYTES`] does not fit in `max_message_bytes` (the largest message the
/// server sends) is refused at publish, instead of ending every subscriber of its topic later.
pub fn check_deliverable(
    event: &pb::Event,
    path: EventPath<'_>,
    max_message_bytes: usize,
) -> Result<(), BusError> {
    use prost::Message as _;
    let size = event.encoded_len();
    if size.saturating_add(DELIVERY_OVERHEAD_BYTES) > max_message_bytes {
        return Err(BusError::UndeliverableSize {
            field: path.to_string(),
            size,
            limit: max_message_bytes.saturating_sub(DELIVERY_OVERHEAD_BYTES),
            max_message_bytes,
        });
    }
    Ok(())
}

/// Checks and converts a published event. `path` is how the error names it, e.g. `events[3]`;
/// `max_message_bytes` is the server's message limit (see [`check_deliverable`]).
pub fn event_from_pb(
    event: pb::Event,
    path: EventPath<'_>,
    max_message_bytes: usize,
) -> Result<Event, BusError> {
    check_deliverable(&event, path, max_message_bytes)?;
    let field = |name: &str| format!("{path}.{name}");
    let topic = Topic::parse_client_publishable(&event.topic)
        .map_err(|rule| BusError::invalid(field("topic"), rule.to_string()))?;
    if event.source.is_empty() {
        return Err(BusError::invalid(
            field("source"),
            "must not be empty: it names the producing service (CloudEvents source)",
        ));
    }
    for (name, value) in [
        ("id", &event.id),
        ("source", &event.source),
        ("type", &event.r#type),
        ("data_content_type", &event.data_content_type),
        ("correlation_id", &event.correlation_id),
        ("causation_id", &event.causation_id),
    ] {
        check_name(value).map_err(|rule| BusError::invalid(field(name), rule))?;
    }
    let reply_to = if event.reply_to.is_empty() {
        None
    } else {
        Some(
            Topic::parse_client_publishable(&event.reply_to)
                .map_err(|rule| BusError::invalid(field("reply_to"), rule.to_string()))?,
        )
    };
    check_attributes(&event.attributes).map_err(|(key, rule)| {
        let field = match key {
            Some(key) => format!("{}[{key:?}]", field("attributes")),
            None => field("attributes"),
        };
        BusError::invalid(field, rule)
    })?;
    let time = event
        .time
        .map(|t| system_time_from_pb(&t).map_err(|rule| BusError::invalid(field("time"), rule)))
        .transpose()?;
    Ok(Event {
        // An empty id is given one by the broker, which knows such an event cannot be a retry.
        id: event.id,
        source: Arc::from(event.source),
        event_type: if event.r#type.is_empty() {
            topic.as_str().to_owned()
        } else {
            event.r#type
        },
        topic,
        time,
        data_content_type: event.data_content_type,
        data: event.data,
        attributes: event.attributes,
        correlation_id: event.correlation_id,
        causation_id: event.causation_id,
        reply_to,
    })
}

/// Checks and converts a publish batch, naming each event by its index.
pub fn events_from_pb(
    events: Vec<pb::Event>,
    max_message_bytes: usize,
) -> Result<Vec<Event>, BusError> {
    events
        .into_iter()
        .enumerate()
        .map(|(index, event)| {
            event_from_pb(
                event,
                EventPath::Indexed("events", index),
                max_message_bytes,
            )
        })
        .collect()
}

/// A name-like value (ids, source, type, group, subscriber): the rule it breaks, if any.
fn check_name(value: &str) -> Result<(), String> {
    if value.len() > MAX_NAME_BYTES {
        return Err(format!(
            "is {} bytes, the limit is {MAX_NAME_BYTES}",
            value.len()
        ));
    }
    if value.chars().any(char::is_control) {
        return Err("must not hold control characters".to_owned());
    }
    Ok(())
}

/// The attribute map: the rule it breaks and the key that breaks it (none when the map as a
/// whole does), if any.
fn check_attributes(
    attributes: &std::collections::HashMap<String, String>,
) -> Result<(), (Option<String>, String)> {
    if attributes.len() > MAX_ATTRIBUTES {
        return Err((
            None,
            format!(
                "{} attributes is over the limit of {MAX_ATTRIBUTES}",
                attributes.len()
            ),
        ));
    }
    for (key, value) in attributes {
        let valid_key = !key.is_empty()
            && key.len() <= MAX_ATTRIBUTE_KEY_BYTES
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !valid_key {
            return Err((
                Some(key.clone()),
                format!("keys are 1 to {MAX_ATTRIBUTE_KEY_BYTES} bytes of [A-Za-z0-9._-]"),
            ));
        }
        if value.len() > MAX_ATTRIBUTE_VALUE_BYTES {
            return Err((
                Some(key.clone()),
                format!(
                    "value is {} bytes, the limit is {MAX_ATTRIBUTE_VALUE_BYTES}",
                    value.len()
                ),
            ));
        }
    }
    Ok(())
}

/// Converts a stored event for the wire.
pub fn event_to_pb(stored: &StoredEvent) -> pb::Event {
    let event = &stored.event;
    pb::Event {
        id: event.id.clone(),
        // `as_str().to_owned()` rather than `to_string()`, which goes through `fmt`.
        source: String::from(&*event.source),
        r#type: event.event_type.clone(),
        topic: event.topic.as_str().to_owned(),
        time: event.time.map(timestamp),
        data_content_type: event.data_content_type.clone(),
        data: event.data.clone(),
        attributes: event.attributes.clone(),
        correlation_id: event.correlation_id.clone(),
        causation_id: event.causation_id.clone(),
        reply_to: event
            .reply_to
            .as_ref()
            .map(|topic| topic.as_str().to_owned())
            .unwrap_or_default(),
        sequence: stored.sequence,
        publish_time: Some(timestamp(stored.publish_time)),
    }
}

/// The `eventbus.v1.Event` encoding of a stored event, written straight from the domain type:
/// the same bytes as `event_to_pb(stored).encode_to_vec()` (a test checks) without building the
/// message's ten owned strings first. Subscribe caches it per event
/// ([`crate::event::EncodedOnce`]).
pub fn encode_event(stored: &StoredEvent) -> Vec<u8> {
    use prost::encoding::{hash_map, message, string, uint64};
    let event = &stored.event;
    let publish_time = timestamp(stored.publish_time);
    let time = event.time.map(timestamp);
    let mut buf = Vec::with_capacity(event.size_bytes());
    put_str(1, &event.id, &mut buf);
    put_str(2, &event.source, &mut buf);
    put_str(3, &event.event_type, &mut buf);
    put_str(4, event.topic.as_str(), &mut buf);
    if let Some(time) = &time {
        message::encode(5, time, &mut buf);
    }
    put_str(6, &event.data_content_type, &mut buf);
    put_str_bytes(7, &event.data, &mut buf);
    hash_map::encode(
        string::encode,
        string::encoded_len,
        string::encode,
        string::encoded_len,
        8,
        &event.attributes,
        &mut buf,
    );
    put_str(9, &event.correlation_id, &mut buf);
    put_str(10, &event.causation_id, &mut buf);
    put_str(
        11,
        event.reply_to.as_ref().map_or("", Topic::as_str),
        &mut buf,
    );
    if stored.sequence != 0 {
        uint64::encode(12, &stored.sequence, &mut buf);
    }
    message::encode(13, &publish_time, &mut buf);
    buf
}

/// A proto3 `string` field: omitted when empty, as prost does.
fn put_str(tag: u32, value: &str, buf: &mut Vec<u8>) {
    put_str_bytes(tag, value.as_bytes(), buf);
}

/// A proto3 `string` or `bytes` field: omitted when empty.
fn put_str_bytes(tag: u32, value: &[u8], buf: &mut Vec<u8>) {
    use prost::encoding::{encode_key, encode_varint, WireType};
    if value.is_empty() {
        return;
    }
    encode_key(tag, WireType::LengthDelimited, buf);
    encode_varint(value.len() as u64, buf);
    buf.extend_from_slice(value);
}

/// Checks and converts a subscription request.
pub fn subscribe_options_from_pb(
    request: pb::SubscribeRequest,
) -> Result<SubscribeOptions, BusError> {
    use pb::subscribe_request::Start;
    let pattern = Pattern::parse(&request.topic)
        .map_err(|rule| BusError::invalid("topic", rule.to_string()))?;
    check_name(&request.group).map_err(|rule| BusError::invalid("group", rule))?;
    check_name(&request.subscriber).map_err(|rule| BusError::invalid("subscriber", rule))?;
    let start = match request.start {
        None | Some(Start::Latest(())) => StartPosition::Latest,
        Some(Start::Earliest(())) => StartPosition::Earliest,
        Some(Start::AfterSequence(sequence)) => StartPosition::AfterSequence(sequence),
        Some(Start::FromTime(time)) => StartPosition::FromTime(
            system_time_from_pb(&time).map_err(|rule| BusError::invalid("from_time", rule))?,
        ),
    };
    let ack = match pb::AckMode::try_from(request.ack_mode) {
        Ok(pb::AckMode::Unspecified | pb::AckMode::Auto) => AckMode::Auto,
        Ok(pb::AckMode::Manual) => AckMode::Manual(manual_ack_from_pb(
            request.ack_deadline,
            request.max_deliveries,
            request.max_in_flight,
            &request.dead_letter_topic,
        )?),
        Err(_) => {
            return Err(BusError::invalid(
                "ack_mode",
                format!("{} is not an AckMode", request.ack_mode),
            ))
        }
    };
    Ok(SubscribeOptions {
        ack,
        pattern,
        group: (!request.group.is_empty()).then(|| Arc::from(request.group)),
        subscriber: Arc::from(if request.subscriber.is_empty() {
            UNNAMED_SUBSCRIBER.to_owned()
        } else {
            request.subscriber
        }),
        start,
        log_id: (!request.log_id.is_empty()).then_some(request.log_id),
    })
}

/// The most unacked events one MANUAL-ack member may ask to hold.
pub const MAX_IN_FLIGHT_LIMIT: u32 = 65_536;

fn manual_ack_from_pb(
    ack_deadline: Option<prost_types::Duration>,
    max_deliveries: u32,
    max_in_flight: u32,
    dead_letter_topic: &str,
) -> Result<ManualAck, BusError> {
    let defaults = ManualAck::default();
    let ack_deadline = match ack_deadline {
        None => defaults.ack_deadline,
        Some(d) => positive_duration(&d, "ack_deadline")?,
    };
    if max_in_flight > MAX_IN_FLIGHT_LIMIT {
        return Err(BusError::invalid(
            "max_in_flight",
            format!("{max_in_flight} is over the limit of {MAX_IN_FLIGHT_LIMIT}"),
        ));
    }
    let dead_letter_topic = if dead_letter_topic.is_empty() {
        None
    } else {
        // The bus publishes dead letters on the group's behalf: the topic must be one its
        // members could publish to themselves, and not a reply inbox (another service's). The
        // default, `_bus.dlq.<group>`, is the bus's own choice and is not named here.
        let topic = Topic::parse(dead_letter_topic)
            .map_err(|rule| BusError::invalid("dead_letter_topic", rule.to_string()))?;
        if topic.as_str().starts_with(crate::topic::RESERVED_PREFIX) {
            return Err(BusError::invalid(
                "dead_letter_topic",
                "topics under '_bus.' belong to the bus (reply inboxes to the services that \
                 asked): name a topic outside it, or leave it empty for the bus's default \
                 _bus.dlq.<group>",
            ));
        }
        Some(topic)
    };
    Ok(ManualAck {
        ack_deadline,
        max_deliveries: if max_deliveries == 0 {
            defaults.max_deliveries
        } else {
            max_deliveries
        },
        max_in_flight: if max_in_flight == 0 {
            defaults.max_in_flight
        } else {
            max_in_flight
        },
        dead_letter_topic,
    })
}

/// A non-negative duration from the wire, or zero when unset.
pub fn delay_from_pb(
    delay: Option<prost_types::Duration>,
    field: &str,
) -> Result<Duration, BusError> {
    match delay {
        None => Ok(Duration::ZERO),
        Some(d) => non_negative_duration(&d, field),
    }
}

/// The largest `google.protobuf.Duration`, in seconds either way: 10,000 years, as
/// `google/protobuf/duration.proto` documents.
pub const MAX_DURATION_SECONDS: i64 = 315_576_000_000;
/// The range of `google.protobuf.Timestamp` seconds (`google/protobuf/timestamp.proto`):
/// 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z. The bus takes only times from 1970 on.
pub const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;

/// Refuses a wire Duration outside protobuf's documented range; `field` names it.
fn check_duration_range(d: &prost_types::Duration, field: &str) -> Result<(), BusError> {
    let in_range = (-MAX_DURATION_SECONDS..=MAX_DURATION_SECONDS).contains(&d.seconds)
        && (-999_999_999..=999_999_999).contains(&d.nanos)
        && !(d.seconds > 0 && d.nanos < 0 || d.seconds < 0 && d.nanos > 0);
    if in_range {
        return Ok(());
    }
    Err(BusError::invalid(
        field,
        format!(
            "{}s {}ns is not a valid google.protobuf.Duration: seconds within \
             ±{MAX_DURATION_SECONDS} (10,000 years), nanos within ±999999999 with the sign of \
             seconds",
            d.seconds, d.nanos
        ),
    ))
}

/// A wire Duration within protobuf's documented range and not negative (no field of the bus
/// takes a negative one), as a std `Duration`; `field` names it in the error.
pub fn non_negative_duration(d: &prost_types::Duration, field: &str) -> Result<Duration, BusError> {
    check_duration_range(d, field)?;
    if d.seconds < 0 || d.nanos < 0 {
        return Err(BusError::invalid(field, "must not be negative"));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

/// A wire Duration within protobuf's documented range and greater than zero.
pub fn positive_duration(d: &prost_types::Duration, field: &str) -> Result<Duration, BusError> {
    check_duration_range(d, field)?;
    if d.seconds < 0 || d.nanos < 0 || (d.seconds == 0 && d.nanos == 0) {
        return Err(BusError::invalid(field, "must be positive"));
    }
    Ok(Duration::new(d.seconds as u64, d.nanos as u32))
}

pub fn subscribed_to_pb(info: &SubscriptionInfo) -> pb::Subscribed {
    pb::Subscribed {
        subscription_id: info.id.to_string(),
        topic: info.pattern.to_string(),
        group: info.group.as_deref().unwrap_or_default().to_owned(),
        head_sequence: info.head_sequence,
        oldest_sequence: info.oldest_sequence.unwrap_or(0),
        start_truncated: info.start_truncated,
        log_id: info.log_id.clone(),
        group_cursor: info.group_cursor.unwrap_or(0),
        log_changed: info.log_changed,
        group_dropped_events: info.group_dropped,
    }
}

/// A query's timeout: the request's, or the default; never more than the maximum or the call's
/// own gRPC deadline.
pub fn query_timeout(
    requested: Option<prost_types::Duration>,
    grpc_deadline: Option<Duration>,
    default: Duration,
    maximum: Duration,
) -> Result<Duration, BusError> {
    let requested = match requested {
        None => default,
        Some(d) => positive_duration(&d, "timeout")?,
    };
    let mut timeout = requested.min(maximum);
    if let Some(deadline) = grpc_deadline {
        timeout = timeout.min(deadline);
    }
    Ok(timeout)
}

pub fn topic_to_pb(summary: TopicSummary) -> pb::TopicInfo {
    pb::TopicInfo {
        name: summary.name,
        last_sequence: summary.last_sequence,
        events_held: summary.events_held,
        events_published: summary.events_published,
        subscriber_count: summary.subscriber_count,
        groups: summary.groups,
        last_publish_time: summary.last_publish_time.map(timestamp),
    }
}

/// A requested page size: `0` is `default`, anything over `max` is `max`.
pub fn page_size(asked: u32, default: usize, max: usize) -> usize {
    match asked {
        0 => default,
        asked => (asked as usize).min(max),
    }
}

pub fn topology_to_pb(snapshot: TopologySnapshot) -> pb::GetTopologyResponse {
    pb::GetTopologyResponse {
        truncated: snapshot.truncated,
        untracked_events: snapshot.untracked_events,
        nodes: snapshot
            .nodes
            .into_iter()
            .map(|Node { id, kind, name }| pb::TopologyNode {
                id,
                kind: match kind {
                    NodeKind::Service => pb::NodeKind::Service,
                    NodeKind::Topic => pb::NodeKind::Topic,
                } as i32,
                name,
            })
            .collect(),
        edges: snapshot
            .edges
            .into_iter()
            .map(|edge: Edge| pb::TopologyEdge {
                from: edge.from,
                to: edge.to,
                kind: match edge.kind {
                    EdgeKind::Publishes => pb::EdgeKind::Publishes,
                    EdgeKind::Subscribes => pb::EdgeKind::Subscribes,
                    EdgeKind::Replies => pb::EdgeKind::Replies,
                    EdgeKind::Matches => pb::EdgeKind::Matches,
                } as i32,
                events: edge.events,
                group: edge.group,
                active_subscriptions: edge.active_subscriptions,
                last_seen: (edge.last_seen > UNIX_EPOCH).then(|| timestamp(edge.last_seen)),
            })
            .collect(),
    }
}

pub fn timestamp(time: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}

/// A wire timestamp as a `SystemTime`, or the rule it breaks: protobuf's Timestamp range
/// (nanos in 0..1e9, up to 9999-12-31), and from 1970-01-01 on.
fn system_time_from_pb(time: &prost_types::Timestamp) -> Result<SystemTime, &'static str> {
    let invalid = || {
        "must be a valid timestamp (google.protobuf.Timestamp) from 1970-01-01 to \
         9999-12-31T23:59:59Z, nanos in 0..1e9"
    };
    if !(0..1_000_000_000).contains(&time.nanos)
        || !(0..=MAX_TIMESTAMP_SECONDS).contains(&time.seconds)
    {
        return Err(invalid());
    }
    UNIX_EPOCH
        .checked_add(Duration::new(time.seconds as u64, time.nanos as u32))
        .ok_or_else(invalid)
}

/// A group snapshot as `GroupInfo`.
pub fn group_to_pb(group: crate::broker::groups::GroupSnapshot) -> pb::GroupInfo {
    use crate::broker::groups::GroupAckMode;
    let ack_mode = match group.ack_mode {
        GroupAckMode::Auto => pb::AckMode::Auto,
        GroupAckMode::Manual => pb::AckMode::Manual,
    };
    pb::GroupInfo {
        name: group.name,
        pattern: group.pattern,
        ack_mode: ack_mode as i32,
        members: group.members,
        cursor: group.cursor,
        pending: group.pending,
        ready: group.ready,
        in_flight: group.in_flight,
        redelivered: group.redelivered,
        dead_lettered: group.dead_lettered,
        dropped: group.dropped,
        parked: group.parked,
        max_deliveries: group.max_deliveries,
        dead_letter_topic: group.dead_letter_topic,
    }
}

/// A std duration as a protobuf one (durations here are far within its range).
fn duration_to_pb(duration: Duration) -> Option<prost_types::Duration> {
    prost_types::Duration::try_from(duration).ok()
}

/// The broker's snapshot of itself as `GetServerInfoResponse`, with what the service layer
/// adds: the build and whether callers are checked.
pub fn server_info_to_pb(
    snapshot: crate::broker::groups::ServerSnapshot,
    principals: usize,
    settings: &[crate::config::SettingSource],
) -> pb::GetServerInfoResponse {
    let config = &snapshot.config;
    pb::GetServerInfoResponse {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        git_commit: env!("EVENTBUS_GIT_COMMIT").to_owned(),
        start_time: Some(timestamp(snapshot.started)),
        uptime: duration_to_pb(snapshot.uptime),
        storage: snapshot.storage.to_owned(),
        oldest_sequence: snapshot.oldest_sequence.unwrap_or(0),
        head_sequence: snapshot.head_sequence,
        log_id: snapshot.log_id,
        connections: snapshot.connections,
        subscriptions: snapshot.subscriptions,
        durable_groups: snapshot.durable_groups,
        auth_enabled: principals > 0,
        principals: u32::try_from(principals).unwrap_or(u32::MAX),
        limits: Some(pb::ServerLimits {
            retention_max_events: config.retention_max_events,
            retention_max_bytes: config.retention_max_bytes,
            retention_max_age: config.retention_max_age.and_then(duration_to_pb),
            max_event_data_bytes: config.max_event_data_bytes as u64,
            max_batch_events: config.max_batch_events as u64,
            max_message_bytes: config.max_message_bytes as u64,
            subscriber_queue_size: config.subscriber_queue_size as u64,
            max_subscriber_lag: config.max_subscriber_lag.unwrap_or(0),
            default_query_timeout: duration_to_pb(config.default_query_timeout),
            max_query_timeout: duration_to_pb(config.max_query_timeout),
            dedupe_window: duration_to_pb(config.dedupe_window),
            max_names: config.max_names as u64,
        }),
        settings: settings
            .iter()
            .map(|setting| pb::ConfigSetting {
                name: setting.name.clone(),
                value: setting.value.clone(),
                source: setting.source.clone(),
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> pb::Event {
        pb::Event {
            topic: "user.query".into(),
            source: "test".into(),
            ..Default::default()
        }
    }

    fn error_of(event: pb::Event) -> String {
        event_from_pb(event, EventPath::Indexed("events", 0), usize::MAX)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn fills_defaults() {
        let event = event_from_pb(valid(), EventPath::Indexed("events", 0), usize::MAX).unwrap();
        assert_eq!(event.event_type, "user.query");
        assert_eq!(event.id, "", "the broker gives the id");
        assert_eq!(event.reply_to, None);
    }

    #[test]
    fn names_the_field_and_rule() {
        let cases: Vec<(pb::Event, &str)> = vec![
            (
                pb::Event {
                    topic: "".into(),
                    ..valid()
                },
                "events[0].topic: must not be empty",
            ),
            (
                pb::Event {
                    topic: "a..b".into(),
                    ..valid()
                },
                "events[0].topic: has an empty token",
            ),
            (
                pb::Event {
                    topic: "a.*".into(),
                    ..valid()
                },
                "events[0].topic: wildcard",
            ),
            (
                pb::Event {
                    topic: "_bus.x".into(),
                    ..valid()
                },
                "events[0].topic: topics under '_bus.'",
            ),
            (
                pb::Event {
                    source: "".into(),
                    ..valid()
                },
                "events[0].source: must not be empty",
            ),
            (
                pb::Event {
                    id: "x".repeat(300),
                    ..valid()
                },
                "events[0].id: is 300 bytes",
            ),
            (
                pb::Event {
                    r#type: "a\nb".into(),
                    ..valid()
                },
                "events[0].type: must not hold control",
            ),
            (
                pb::Event {
                    reply_to: "a b".into(),
                    ..valid()
                },
                "events[0].reply_to: token",
            ),
            (
                pb::Event {
                    attributes: [("bad key".to_owned(), "v".to_owned())].into(),
                    ..valid()
                },
                "events[0].attributes[\"bad key\"]: keys are",
            ),
            (
                pb::Event {
                    time: Some(prost_types::Timestamp {
                        seconds: 1,
                        nanos: -1,
                    }),
                    ..valid()
                },
                "events[0].time: must be a valid timestamp",
            ),
        ];
        for (event, expected) in cases {
            let error = error_of(event);
            assert!(
                error.starts_with(expected),
                "{error:?} should start with {expected:?}"
            );
        }
    }

    /// The largest growth from what a client sends to what the bus sends, in every form: the
    /// bus fills id, type, time, sequence and publish time, a query adds its inbox and
    /// correlation id, a dead letter changes topic and id and adds its attributes, and frames
    /// wrap it. Issue: an event accepted just under the message limit could not be delivered.
    #[test]
    fn what_the_bus_adds_on_delivery_fits_the_overhead() {
        use prost::Message as _;
        let long = |n: usize| "x".repeat(n);
        let long_topic = vec!["t"; 128].join(".");
        assert_eq!(long_topic.len(), crate::topic::MAX_TOPIC_BYTES);
        let latest = UNIX_EPOCH + Duration::new(MAX_TIMESTAMP_SECONDS as u64, 999_999_999);
        let inputs = [
            // Everything the bus may fill left empty, the longest topic.
            pb::Event {
                topic: long_topic.clone(),
                source: long(MAX_NAME_BYTES),
                ..Default::default()
            },
            // The shortest topic (the dead-letter topic replaces it) and an id that already
            // carries a dead-letter suffix.
            pb::Event {
                topic: "a".into(),
                source: long(MAX_NAME_BYTES),
                id: format!("{}.dlq.1", long(MAX_NAME_BYTES - 6)),
                ..Default::default()
            },
        ];
        for input in inputs {
            let size_in = input.encoded_len();
            let mut event =
                event_from_pb(input, EventPath::Named("event"), usize::MAX).expect("valid");
            if event.id.is_empty() {
                event.id = crate::event::new_id();
            }
            event.time = Some(latest);
            event.correlation_id = crate::event::new_id();
            event.reply_to = Some(Topic::new_inbox());
            let stored = StoredEvent::new(u64::MAX, latest, event);
            let letter = crate::broker::durable::dead_letter_event(
                &stored,
                &long(MAX_NAME_BYTES),
                &Topic::parse(&long_topic).unwrap(),
                u32::MAX,
            );
            let letter = StoredEvent::new(u64::MAX, latest, letter);
            let frame = |stored: &StoredEvent| {
                pb::SubscribeResponse {
                    message: Some(pb::subscribe_response::Message::Event(event_to_pb(stored))),
                    delivery_attempt: u32::MAX,
                }
                .encoded_len()
            };
            let reply = pb::QueryResponse {
                reply: Some(event_to_pb(&stored)),
            }
            .encoded_len();
            for size_out in [frame(&stored), frame(&letter), reply] {
                assert!(
                    size_out <= size_in + DELIVERY_OVERHEAD_BYTES,
                    "{size_in} bytes in became {size_out} out"
                );
            }
        }
    }

    #[test]
    fn round_trips_a_stored_event() {
        let mut event = event_from_pb(
            pb::Event {
                data: bytes::Bytes::from_static(b"hi"),
                attributes: [("traceparent".to_owned(), "00-x".to_owned())].into(),
                reply_to: "_bus.inbox.abc".into(),
                ..valid()
            },
            EventPath::Named("event"),
            usize::MAX,
        )
        .unwrap();
        let now = SystemTime::now();
        event.time = Some(now);
        let wire = event_to_pb(&StoredEvent::new(7, now, event.clone()));
        assert_eq!(wire.sequence, 7);
        assert_eq!(wire.reply_to, "_bus.inbox.abc");
        let back = event_from_pb(wire, EventPath::Named("event"), usize::MAX).unwrap();
        assert_eq!(back, event);
    }

    #[test]
    fn encodes_a_stored_event_as_prost_encodes_its_message() {
        use prost::Message as _;
        let full = event_from_pb(
            pb::Event {
                id: "id-1".into(),
                r#type: "user.created".into(),
                data_content_type: "application/json".into(),
                data: bytes::Bytes::from(vec![1u8; 300]),
                attributes: [("traceparent".to_owned(), "00-x".to_owned())].into(),
                correlation_id: "c".into(),
                causation_id: "cause".into(),
                reply_to: "_bus.inbox.abc".into(),
                time: Some(prost_types::Timestamp {
                    seconds: 1_700_000_000,
                    nanos: 5,
                }),
                ..valid()
            },
            EventPath::Named("event"),
            usize::MAX,
        )
        .unwrap();
        let bare = event_from_pb(valid(), EventPath::Named("event"), usize::MAX).unwrap();
        let epoch = std::time::UNIX_EPOCH;
        for (sequence, publish_time, event) in [
            (7, SystemTime::now(), full),
            (0, epoch, bare.clone()),
            (u64::MAX, epoch + Duration::new(1, 999_999_999), bare),
        ] {
            let stored = StoredEvent::new(sequence, publish_time, event);
            assert_eq!(encode_event(&stored), event_to_pb(&stored).encode_to_vec());
        }
    }

    #[test]
    fn query_timeout_takes_the_smallest_limit() {
        let second = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        let requested = Some(prost_types::Duration {
            seconds: 10,
            nanos: 0,
        });
        assert_eq!(
            query_timeout(None, None, 5 * second, max).unwrap(),
            5 * second
        );
        assert_eq!(
            query_timeout(requested, None, 5 * second, max).unwrap(),
            10 * second
        );
        assert_eq!(
            query_timeout(requested, Some(2 * second), 5 * second, max).unwrap(),
            2 * second
        );
        let huge = Some(prost_types::Duration {
            seconds: 1000,
            nanos: 0,
        });
        assert_eq!(query_timeout(huge, None, 5 * second, max).unwrap(), max);
        let negative = Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        });
        assert!(query_timeout(negative, None, second, max)
            .unwrap_err()
            .to_string()
            .starts_with("timeout: must be positive"));
    }
}
