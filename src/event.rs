//! The bus's own event types. Wire messages are converted to these once, at the service edge
//! ([`crate::service::convert`]); the broker and the stores never see protobuf.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use bytes::Bytes;

use crate::topic::Topic;

/// An event as a producer publishes it, already checked for syntax. CloudEvents 1.0 fields plus
/// the correlation extension and the bus's routing fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Unique per source. Empty until published when the producer sent none: the broker then
    /// gives a UUIDv7 (see `broker::dedupe`).
    pub id: String,
    pub source: Arc<str>,
    pub event_type: String,
    pub topic: Topic,
    /// Producer time; set to the publish time when the producer sent none.
    pub time: Option<SystemTime>,
    pub data_content_type: String,
    /// Shared, never copied per subscriber.
    pub data: Bytes,
    pub attributes: HashMap<String, String>,
    pub correlation_id: String,
    pub causation_id: String,
    pub reply_to: Option<Topic>,
}

/// Bytes an event's metadata is charged on top of its data in retention accounting, to cover
/// the struct and the allocations behind it.
const METADATA_OVERHEAD_BYTES: usize = 128;

impl Event {
    /// An estimate of the memory the event holds, for retention limits.
    pub fn size_bytes(&self) -> usize {
        let attributes: usize = self
            .attributes
            .iter()
            .map(|(k, v)| k.len() + v.len() + 16)
            .sum();
        METADATA_OVERHEAD_BYTES
            + self.data.len()
            + self.id.len()
            + self.source.len()
            + self.event_type.len()
            + self.topic.as_str().len()
            + self.data_content_type.len()
            + self.correlation_id.len()
            + self.causation_id.len()
            + self.reply_to.as_ref().map_or(0, |t| t.as_str().len())
            + attributes
    }

    /// For unit tests: an event on `topic` from source `test`, type `t`, every other field
    /// empty. Tests change what they need with struct update syntax.
    #[cfg(test)]
    pub(crate) fn for_test(topic: &str) -> Event {
        Event {
            id: String::new(),
            source: std::sync::Arc::from("test"),
            event_type: "t".to_owned(),
            topic: Topic::parse(topic).expect("a valid test topic"),
            time: None,
            data_content_type: String::new(),
            data: bytes::Bytes::new(),
            attributes: Default::default(),
            correlation_id: String::new(),
            causation_id: String::new(),
            reply_to: None,
        }
    }
}

/// An event the bus has stored: its place in the log and when it was stored. Shared by `Arc`
/// between the store and every subscriber it is delivered to.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Position in the bus log, strictly increasing across the whole bus.
    pub sequence: u64,
    pub publish_time: SystemTime,
    pub event: Event,
    /// The event's encoded wire form, once a transport has made it. See [`EncodedOnce`].
    pub encoded: EncodedOnce,
}

impl StoredEvent {
    pub fn new(sequence: u64, publish_time: SystemTime, event: Event) -> StoredEvent {
        StoredEvent {
            sequence,
            publish_time,
            event,
            encoded: EncodedOnce::default(),
        }
    }

    /// Memory the event holds while stored, for retention limits: the event, and room for its
    /// wire form (about the event again, less the struct overhead).
    pub fn held_bytes(&self) -> usize {
        let size = self.event.size_bytes();
        size + (size - METADATA_OVERHEAD_BYTES)
    }
}

/// A slot for an event's encoded form, filled by a transport the first time it sends the event
/// and reused for every later send: a fan-out to eight subscribers encodes once, not eight
/// times. The broker and the stores only carry it; what the bytes mean is the transport's
/// business ([`crate::service`] keeps the protobuf `eventbus.v1.Event` there). A cached copy
/// never makes two events unequal.
#[derive(Debug, Clone, Default)]
pub struct EncodedOnce(OnceLock<Bytes>);

impl EncodedOnce {
    /// The encoded form, made by `encode` if no one has made it yet.
    pub fn get_or_init(&self, encode: impl FnOnce() -> Bytes) -> &Bytes {
        self.0.get_or_init(encode)
    }
}

impl PartialEq for EncodedOnce {
    fn eq(&self, _other: &EncodedOnce) -> bool {
        true
    }
}

/// A fresh UUIDv7 as text, for an event id or a correlation id the producer left empty. It runs
/// for every such event, so it skips `fmt` and takes its random bits from a thread-local CSPRNG
/// (uuid's `fast-rng`) rather than a `getrandom` system call each time.
pub fn new_id() -> String {
    let mut buffer = uuid::Uuid::encode_buffer();
    uuid::Uuid::now_v7()
        .hyphenated()
        .encode_lower(&mut buffer)
        .to_owned()
}

/// How events are shared once stored.
pub type SharedEvent = Arc<StoredEvent>;
