//! The on-disk record format of the file store: a pure codec with no I/O, so it can be tested
//! and fuzzed on its own.
//!
//! A record is a frame `[payload length: u32 LE][CRC32C of payload: u32 LE][payload]`. The
//! payload is a version byte, then the stored event's fields in a fixed order: integers little
//! endian, strings and bytes as `[length: u32 LE][bytes]`. The CRC lets recovery tell a complete
//! record from a torn or corrupted one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::event::{Event, StoredEvent};
use crate::topic::Topic;

/// Bytes of the frame header: length and CRC.
pub const FRAME_HEADER_BYTES: usize = 8;
/// Payload format version written by this build.
const VERSION: u8 = 1;
/// The largest payload a frame may declare: far above any event the bus accepts, low enough that
/// a corrupted length cannot make the reader allocate gigabytes.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024 * 1024;

/// The smallest payload a record can have: version, sequence, publish time, time flag, eight
/// empty strings, the attribute count and empty data.
pub const MIN_PAYLOAD_BYTES: usize = 1 + 8 + 8 + 1 + 8 * 4 + 4 + 4;

/// Why bytes are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes end before the record does: a torn write at the end of a log.
    #[error("incomplete record: need {needed} bytes, have {available}")]
    Incomplete { needed: usize, available: usize },
    #[error("record length {0} is over the limit of {MAX_PAYLOAD_BYTES}")]
    TooLong(usize),
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("unknown record version {0}")]
    Version(u8),
    #[error("malformed record: {0}")]
    Malformed(&'static str),
}

/// Appends the frame of `event` to `out`.
pub fn encode(event: &StoredEvent, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    let payload_start = out.len();
    out.push(VERSION);
    out.extend_from_slice(&event.sequence.to_le_bytes());
    out.extend_from_slice(&nanos(event.publish_time).to_le_bytes());
    let e = &event.event;
    match e.time {
        Some(time) => {
            out.push(1);
            out.extend_from_slice(&nanos(time).to_le_bytes());
        }
        None => out.push(0),
    }
    for text in [
        e.id.as_str(),
        &e.source,
        &e.event_type,
        e.topic.as_str(),
        &e.data_content_type,
        &e.correlation_id,
        &e.causation_id,
        e.reply_to.as_ref().map_or("", |t| t.as_str()),
    ] {
        put_bytes(out, text.as_bytes());
    }
    let mut attributes: Vec<_> = e.attributes.iter().collect();
    attributes.sort();
    out.extend_from_slice(&(attributes.len() as u32).to_le_bytes());
    for (key, value) in attributes {
        put_bytes(out, key.as_bytes());
        put_bytes(out, value.as_bytes());
    }
    put_bytes(out, &e.data);
    let payload_len = (out.len() - payload_start) as u32;
    let crc = crc32c::crc32c(&out[payload_start..]);
    out[start..start + 4].copy_from_slice(&payload_len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes the record at the start of `bytes`; returns it and the frame's length.
pub fn decode(bytes: &[u8]) -> Result<(StoredEvent, usize), DecodeError> {
    let (payload, frame_len) = frame(bytes)?;
    Ok((decode_payload(payload)?, frame_len))
}

/// The offset of the first complete, valid record that starts at or after `from` in `bytes`, if
/// any: how a reader finds where intact records resume after a damaged one. Every offset is
/// tried (a cheap look at the length, version byte and time flag first, then the checksum and
/// the whole payload), so a match inside damaged bytes would need a CRC32C collision on a
/// well-formed payload.
pub fn next_record(bytes: &[u8], from: usize) -> Option<usize> {
    let last_start = bytes
        .len()
        .checked_sub(FRAME_HEADER_BYTES + MIN_PAYLOAD_BYTES)?;
    (from..=last_start).find(|&at| {
        let rest = &bytes[at..];
        let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        // The version byte and the event-time flag (0 or 1) rule out all but ~1 offset in
        // 30,000 of random bytes before any checksum is computed.
        rest[FRAME_HEADER_BYTES] == VERSION
            && rest[FRAME_HEADER_BYTES + 17] <= 1
            && (MIN_PAYLOAD_BYTES..=rest.len() - FRAME_HEADER_BYTES).contains(&len)
            && decode(rest).is_ok()
    })
}

/// Checks the frame at the start of `bytes` (length and checksum) and returns its payload and
/// the frame's length, without decoding the payload.
pub fn frame(bytes: &[u8]) -> Result<(&[u8], usize), DecodeError> {
    if bytes.len() < FRAME_HEADER_BYTES {
        return Err(DecodeError::Incomplete {
            needed: FRAME_HEADER_BYTES,
            available: bytes.len(),
        });
    }
    let len = u32::from_le_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
    let stored = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
    if len > MAX_PAYLOAD_BYTES {
        return Err(DecodeError::TooLong(len));
    }
    let frame_len = FRAME_HEADER_BYTES + len;
    if bytes.len() < frame_len {
        return Err(DecodeError::Incomplete {
            needed: frame_len,
            available: bytes.len(),
        });
    }
    let payload = &bytes[FRAME_HEADER_BYTES..frame_len];
    let computed = crc32c::crc32c(payload);
    if computed != stored {
        return Err(DecodeError::Checksum { stored, computed });
    }
    Ok((payload, frame_len))
}

fn decode_payload(payload: &[u8]) -> Result<StoredEvent, DecodeError> {
    let mut reader = Reader { bytes: payload };
    let version = reader.u8()?;
    if version != VERSION {
        return Err(DecodeError::Version(version));
    }
    let sequence = reader.u64()?;
    let publish_time = time(reader.u64()?);
    let event_time = match reader.u8()? {
        0 => None,
        1 => Some(time(reader.u64()?)),
        _ => return Err(DecodeError::Malformed("time flag")),
    };
    let id = reader.string()?;
    let source = reader.string()?;
    let event_type = reader.string()?;
    let topic = Topic::parse(&reader.string()?).map_err(|_| DecodeError::Malformed("topic"))?;
    let data_content_type = reader.string()?;
    let correlation_id = reader.string()?;
    let causation_id = reader.string()?;
    let reply_to = reader.string()?;
    let reply_to = if reply_to.is_empty() {
        None
    } else {
        Some(Topic::parse(&reply_to).map_err(|_| DecodeError::Malformed("reply_to"))?)
    };
    let attribute_count = reader.u32()? as usize;
    // Each attribute takes at least 8 bytes: a count beyond what is left is corruption.
    if attribute_count > reader.bytes.len() / 8 {
        return Err(DecodeError::Malformed("attribute count"));
    }
    let mut attributes = HashMap::with_capacity(attribute_count);
    for _ in 0..attribute_count {
        let key = reader.string()?;
        let value = reader.string()?;
        attributes.insert(key, value);
    }
    let data = Bytes::copy_from_slice(reader.bytes_field()?);
    if !reader.bytes.is_empty() {
        return Err(DecodeError::Malformed("trailing bytes"));
    }
    Ok(StoredEvent::new(
        sequence,
        publish_time,
        Event {
            id,
            source: Arc::from(source),
            event_type,
            topic,
            time: event_time,
            data_content_type,
            data,
            attributes,
            correlation_id,
            causation_id,
            reply_to,
        },
    ))
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u64::MAX as u128) as u64)
}

fn time(nanos: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(nanos)
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Malformed("field runs past the record"));
        }
        let (taken, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(taken)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn bytes_field(&mut self) -> Result<&'a [u8], DecodeError> {
        let len = self.u32()? as usize;
        self.take(len)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let bytes = self.bytes_field()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Malformed("invalid UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stored(sequence: u64, data: Vec<u8>, attributes: HashMap<String, String>) -> StoredEvent {
        StoredEvent::new(
            sequence,
            time(1_700_000_000_123_456_789),
            Event {
                id: format!("id-{sequence}"),
                source: Arc::from("svc"),
                event_type: "user.created".into(),
                topic: Topic::parse("user.created").unwrap(),
                time: Some(time(1_700_000_000_000_000_001)),
                data_content_type: "application/json".into(),
                data: Bytes::from(data),
                attributes,
                correlation_id: "c".into(),
                causation_id: String::new(),
                reply_to: Some(Topic::parse("_bus.inbox.x").unwrap()),
            },
        )
    }

    #[test]
    fn a_torn_record_is_incomplete_and_a_flipped_bit_fails_the_checksum() {
        let mut out = Vec::new();
        encode(&stored(1, b"hello".to_vec(), HashMap::new()), &mut out);
        for cut in 0..out.len() {
            assert!(
                matches!(decode(&out[..cut]), Err(DecodeError::Incomplete { .. })),
                "cut at {cut}"
            );
        }
        for byte in FRAME_HEADER_BYTES..out.len() {
            let mut corrupted = out.clone();
            corrupted[byte] ^= 0x40;
            assert!(
                matches!(decode(&corrupted), Err(DecodeError::Checksum { .. })),
                "flip at {byte}"
            );
        }
    }

    #[test]
    fn next_record_finds_where_intact_records_resume() {
        let mut log = Vec::new();
        let mut starts = Vec::new();
        for sequence in 1..=4 {
            starts.push(log.len());
            encode(&stored(sequence, vec![7; 40], HashMap::new()), &mut log);
        }
        assert_eq!(next_record(&log, 0), Some(0));
        assert_eq!(next_record(&log, 1), Some(starts[1]));
        // Damage inside the second record: the search lands on the third.
        log[starts[1] + 20] ^= 0x10;
        assert_eq!(next_record(&log, starts[1]), Some(starts[2]));
        assert_eq!(next_record(&log, starts[3] + 1), None);
        assert_eq!(next_record(&log[..starts[3] + 10], starts[3]), None);
        assert_eq!(next_record(&[0; 200], 0), None);
        let mut empty = Vec::new();
        encode(&stored(1, Vec::new(), HashMap::new()), &mut empty);
        assert!(empty.len() >= FRAME_HEADER_BYTES + MIN_PAYLOAD_BYTES);
    }

    #[test]
    fn an_absurd_length_is_refused_before_allocating() {
        let mut bytes = vec![0xff, 0xff, 0xff, 0x7f, 0, 0, 0, 0];
        bytes.extend_from_slice(&[0; 16]);
        assert!(matches!(decode(&bytes), Err(DecodeError::TooLong(_))));
    }

    proptest! {
        #[test]
        fn round_trips(
            sequence in 1u64..u64::MAX,
            data in prop::collection::vec(any::<u8>(), 0..2048),
            attributes in prop::collection::hash_map("[a-z]{1,8}", "[ -~]{0,16}", 0..6),
        ) {
            let event = stored(sequence, data, attributes);
            let mut out = Vec::new();
            encode(&event, &mut out);
            let (decoded, len) = decode(&out).unwrap();
            prop_assert_eq!(len, out.len());
            prop_assert_eq!(decoded, event);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
            // With a valid frame around them, arbitrary payloads must still decode or fail
            // cleanly.
            let mut framed = Vec::new();
            framed.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            framed.extend_from_slice(&crc32c::crc32c(&bytes).to_le_bytes());
            framed.extend_from_slice(&bytes);
            let _ = decode(&framed);
        }
    }
}
