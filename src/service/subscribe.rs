//! Subscribe, served with each event encoded once.
//!
//! On a fan-out the same event goes to many subscription streams. The generated server would
//! convert it to `pb::Event` and encode it once per subscriber (cloning ten strings and a map each
//! time), and move a large response value through every stream adapter; profiles of the 1 → 8
//! pub/sub benchmark put a fifth of the bus's time in those copies alone. Here a stream carries
//! small frames ([`SubscribeFrame`]: an `Arc` of the stored event) and a codec of its own writes
//! the event's protobuf encoding, made on first delivery and kept with the event
//! ([`crate::event::EncodedOnce`]). The bytes on the wire are exactly what prost writes for the
//! same `SubscribeResponse` (a test checks), so clients cannot tell.
//!
//! [`EventBusServer`] serves `eventbus.v1.EventBusService`: Subscribe here, every other method
//! through the generated server, with the same message size limits.

use std::convert::Infallible;

use bytes::{BufMut, Bytes};
use futures_util::stream::BoxStream;
use prost::Message as _;
use tonic::body::Body;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic::codegen::{http, Body as HttpBody, BoxFuture, Context, Poll, Service, StdError};
use tonic::server::{Grpc, NamedService, ServerStreamingService};
use tonic::{Request, Response, Status};

use super::{convert, EventBusApi};
use crate::event::{SharedEvent, StoredEvent};
use crate::pb;
use crate::pb::event_bus_service_server::{self, EventBusServiceServer};

/// The gRPC path this module serves.
const SUBSCRIBE_PATH: &str = "/eventbus.v1.EventBusService/Subscribe";

/// `SubscribeResponse` field numbers (see `proto/eventbus/v1/eventbus.proto`).
const EVENT_FIELD: u32 = 2;
const DELIVERY_ATTEMPT_FIELD: u32 = 4;
const EVENT_BATCH_FIELD: u32 = 5;
/// `EventBatch` field numbers.
const BATCH_EVENTS_FIELD: u32 = 1;
const BATCH_ATTEMPTS_FIELD: u32 = 2;

/// The largest `SubscribeRequest.max_batch_events` the bus takes (the proto's rule).
pub const MAX_BATCH_EVENTS: u32 = 1024;
/// The encoded events one `EventBatch` holds at most, in bytes: far below any message size
/// limit a client sets (gRPC's default is 4 MiB), and large enough that a batch is never cut
/// short by it for events of a few KiB. An event larger than this goes in a batch of its own.
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// One `SubscribeResponse` of a subscription stream, before encoding.
#[derive(Debug, Clone)]
pub enum SubscribeFrame {
    /// A response that is not an event (the confirmation, caught-up), as a message. Boxed:
    /// these are rare, and frames stay small for the events.
    Message(Box<pb::SubscribeResponse>),
    /// An event and which delivery of it this is (0 outside MANUAL-ack groups).
    Event { event: SharedEvent, attempt: u32 },
    /// Consecutive events as one `EventBatch`, each with its delivery attempt (all 0 outside
    /// MANUAL-ack groups), for a subscription that asked for `max_batch_events`.
    Batch(Vec<(SharedEvent, u32)>),
}

impl SubscribeFrame {
    /// The same response as a generated message.
    pub fn into_pb(self) -> pb::SubscribeResponse {
        match self {
            SubscribeFrame::Message(message) => *message,
            SubscribeFrame::Event { event, attempt } => pb::SubscribeResponse {
                message: Some(pb::subscribe_response::Message::Event(
                    convert::event_to_pb(&event),
                )),
                delivery_attempt: attempt,
            },
            SubscribeFrame::Batch(events) => {
                let manual = events.iter().any(|(_, attempt)| *attempt != 0);
                pb::SubscribeResponse {
                    message: Some(pb::subscribe_response::Message::EventBatch(
                        pb::EventBatch {
                            delivery_attempts: if manual {
                                events.iter().map(|(_, attempt)| *attempt).collect()
                            } else {
                                Vec::new()
                            },
                            events: events
                                .iter()
                                .map(|(event, _)| convert::event_to_pb(event))
                                .collect(),
                        },
                    )),
                    delivery_attempt: 0,
                }
            }
        }
    }

    /// Writes the frame as the protobuf `SubscribeResponse` it stands for.
    fn encode(&self, buf: &mut impl BufMut) {
        match self {
            SubscribeFrame::Message(message) => message.encode_raw(buf),
            SubscribeFrame::Event { event, attempt } => {
                use prost::encoding::{encode_key, encode_varint, uint32, WireType};
                let body = encoded_event(event);
                encode_key(EVENT_FIELD, WireType::LengthDelimited, buf);
                encode_varint(body.len() as u64, buf);
                buf.put_slice(body);
                if *attempt != 0 {
                    uint32::encode(DELIVERY_ATTEMPT_FIELD, attempt, buf);
                }
            }
            SubscribeFrame::Batch(events) => {
                use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
                let manual = events.iter().any(|(_, attempt)| *attempt != 0);
                let bodies = events.iter().map(|(event, _)| encoded_event(event).len());
                let events_len: usize = bodies
                    .map(|len| 1 + encoded_len_varint(len as u64) + len)
                    .sum();
                let attempts_len: usize = events
                    .iter()
                    .map(|(_, attempt)| encoded_len_varint(u64::from(*attempt)))
                    .sum();
                let batch_len = events_len
                    + if manual {
                        1 + encoded_len_varint(attempts_len as u64) + attempts_len
                    } else {
                        0
                    };
                encode_key(EVENT_BATCH_FIELD, WireType::LengthDelimited, buf);
                encode_varint(batch_len as u64, buf);
                for (event, _) in events {
                    let body = encoded_event(event);
                    encode_key(BATCH_EVENTS_FIELD, WireType::LengthDelimited, buf);
                    encode_varint(body.len() as u64, buf);
                    buf.put_slice(body);
                }
                if manual {
                    // Packed, as proto3 writes repeated scalars.
                    encode_key(BATCH_ATTEMPTS_FIELD, WireType::LengthDelimited, buf);
                    encode_varint(attempts_len as u64, buf);
                    for (_, attempt) in events {
                        encode_varint(u64::from(*attempt), buf);
                    }
                }
            }
        }
    }
}

/// A subscription's frames with runs of ready events batched ([`batch_ready`]): when polled,
/// takes whatever `frames` has ready, up to `max` frames, never waiting for more. Unlike
/// `StreamExt::ready_chunks`, it reserves nothing ahead (that would be `max` slots of a
/// result holding a `Status`, tens of KiB, for every lone event of a quiet subscription).
pub struct ReadyBatches<S> {
    frames: S,
    max: usize,
    /// Made from one poll's ready frames, not sent yet.
    out: std::collections::VecDeque<Result<SubscribeFrame, Status>>,
    ended: bool,
}

impl<S> ReadyBatches<S> {
    /// Batches `frames`, `max` (at least 1) at most per poll.
    pub fn new(frames: S, max: usize) -> Self {
        ReadyBatches {
            frames,
            max: max.max(1),
            out: std::collections::VecDeque::new(),
            ended: false,
        }
    }
}

impl<S> futures_util::Stream for ReadyBatches<S>
where
    S: futures_util::Stream<Item = Result<SubscribeFrame, Status>> + Unpin,
{
    type Item = Result<SubscribeFrame, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(frame) = this.out.pop_front() {
            return Poll::Ready(Some(frame));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        let mut ready = Vec::new();
        while ready.len() < this.max {
            match std::pin::Pin::new(&mut this.frames).poll_next(cx) {
                Poll::Ready(Some(frame)) => ready.push(frame),
                Poll::Ready(None) => {
                    this.ended = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        if ready.is_empty() {
            return if this.ended {
                Poll::Ready(None)
            } else {
                Poll::Pending
            };
        }
        this.out.extend(batch_ready(ready));
        Poll::Ready(this.out.pop_front())
    }
}

/// Turns frames that were ready together into the frames to send: runs of consecutive events
/// become [`SubscribeFrame::Batch`]es of at most [`MAX_BATCH_BYTES`] of encoded events (an
/// event alone stays an `event`); anything else (the caught-up marker, the stream's end)
/// stays where it is, so a batch never spans it.
pub fn batch_ready(
    frames: Vec<Result<SubscribeFrame, Status>>,
) -> Vec<Result<SubscribeFrame, Status>> {
    let mut out = Vec::with_capacity(2);
    let mut run: Vec<(SharedEvent, u32)> = Vec::new();
    let mut run_bytes = 0;
    let flush = |run: &mut Vec<(SharedEvent, u32)>, out: &mut Vec<_>| match run.len() {
        0 => {}
        1 => {
            let (event, attempt) = run.pop().expect("one event");
            out.push(Ok(SubscribeFrame::Event { event, attempt }));
        }
        _ => out.push(Ok(SubscribeFrame::Batch(std::mem::take(run)))),
    };
    for frame in frames {
        match frame {
            Ok(SubscribeFrame::Event { event, attempt }) => {
                let bytes = encoded_event(&event).len();
                if !run.is_empty() && run_bytes + bytes > MAX_BATCH_BYTES {
                    flush(&mut run, &mut out);
                    run_bytes = 0;
                }
                run_bytes += bytes;
                run.push((event, attempt));
            }
            other => {
                flush(&mut run, &mut out);
                run_bytes = 0;
                out.push(other);
            }
        }
    }
    flush(&mut run, &mut out);
    out
}

/// The event's `eventbus.v1.Event` encoding, made once per stored event.
fn encoded_event(event: &StoredEvent) -> &Bytes {
    event
        .encoded
        .get_or_init(|| Bytes::from(convert::encode_event(event)))
}

/// Decodes `SubscribeRequest`s as every other request ([`pb::codec::BusDecoder`]); encodes [`SubscribeFrame`]s.
#[derive(Debug, Default)]
struct SubscribeCodec;

impl Codec for SubscribeCodec {
    type Encode = SubscribeFrame;
    type Decode = pb::SubscribeRequest;
    type Encoder = FrameEncoder;
    type Decoder = pb::codec::BusDecoder<pb::SubscribeRequest>;

    fn encoder(&mut self) -> FrameEncoder {
        FrameEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        pb::codec::BusDecoder::default()
    }
}

#[derive(Debug)]
struct FrameEncoder;

impl Encoder for FrameEncoder {
    type Item = SubscribeFrame;
    type Error = Status;

    fn encode(&mut self, frame: SubscribeFrame, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        frame.encode(dst);
        Ok(())
    }

    fn buffer_settings(&self) -> BufferSettings {
        pb::codec::settings()
    }
}

/// The Subscribe method, for tonic's server-streaming plumbing.
struct SubscribeMethod(EventBusApi);

impl ServerStreamingService<pb::SubscribeRequest> for SubscribeMethod {
    type Response = SubscribeFrame;
    type ResponseStream = BoxStream<'static, Result<SubscribeFrame, Status>>;
    type Future = BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<pb::SubscribeRequest>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move { api.subscribe_frames(request).await.map(Response::new) })
    }
}

/// `eventbus.v1.EventBusService` as the bus serves it. See the module docs.
#[derive(Clone)]
pub struct EventBusServer {
    api: EventBusApi,
    generated: EventBusServiceServer<EventBusApi>,
    max_message_bytes: usize,
}

impl EventBusServer {
    /// The service, taking and sending messages of at most `max_message_bytes`.
    pub fn new(api: EventBusApi, max_message_bytes: usize) -> EventBusServer {
        EventBusServer {
            generated: EventBusServiceServer::new(api.clone())
                .max_decoding_message_size(max_message_bytes)
                .max_encoding_message_size(max_message_bytes),
            api,
            max_message_bytes,
        }
    }
}

impl NamedService for EventBusServer {
    const NAME: &'static str = event_bus_service_server::SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for EventBusServer
where
    B: HttpBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != SUBSCRIBE_PATH {
            return self.generated.call(request);
        }
        let method = SubscribeMethod(self.api.clone());
        let limit = self.max_message_bytes;
        Box::pin(async move {
            let mut grpc =
                Grpc::new(SubscribeCodec).apply_max_message_size_config(Some(limit), Some(limit));
            Ok(grpc.server_streaming(method, request).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::event::Event;
    use crate::topic::Topic;

    fn stored(attributes: HashMap<String, String>, reply_to: Option<&str>) -> SharedEvent {
        Arc::new(StoredEvent::new(
            300,
            SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
            Event {
                id: "id-1".into(),
                source: Arc::from("svc"),
                event_type: "user.created".into(),
                topic: Topic::parse("user.created").unwrap(),
                time: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
                data_content_type: "application/json".into(),
                data: Bytes::from(vec![7u8; 200]),
                attributes,
                correlation_id: "c".into(),
                causation_id: "cause".into(),
                reply_to: reply_to.map(|t| Topic::parse(t).unwrap()),
            },
        ))
    }

    fn frame_bytes(frame: &SubscribeFrame) -> Vec<u8> {
        let mut out = Vec::new();
        frame.encode(&mut out);
        out
    }

    #[test]
    fn event_frames_encode_as_prost_encodes_the_response() {
        for attempt in [0, 1, 300] {
            for (attributes, reply_to) in [
                (HashMap::new(), None),
                (
                    [("traceparent".to_owned(), "00-x".to_owned())].into(),
                    Some("_bus.inbox.abc"),
                ),
            ] {
                let frame = SubscribeFrame::Event {
                    event: stored(attributes, reply_to),
                    attempt,
                };
                let ours = frame_bytes(&frame);
                let prost = frame.clone().into_pb().encode_to_vec();
                assert_eq!(ours, prost, "attempt {attempt}");
                assert_eq!(
                    pb::SubscribeResponse::decode(&ours[..]).unwrap(),
                    frame.into_pb()
                );
            }
        }
    }

    #[test]
    fn an_event_is_encoded_once_and_shared() {
        let event = stored(HashMap::new(), None);
        let first = frame_bytes(&SubscribeFrame::Event {
            event: event.clone(),
            attempt: 0,
        });
        let cached = encoded_event(&event).clone();
        let second = frame_bytes(&SubscribeFrame::Event {
            event: event.clone(),
            attempt: 0,
        });
        assert_eq!(first, second);
        assert_eq!(encoded_event(&event).as_ptr(), cached.as_ptr());
    }

    /// An event at `sequence` with `data_bytes` of data.
    fn stored_at(sequence: u64, data_bytes: usize) -> SharedEvent {
        let mut event = stored(HashMap::new(), None).event.clone();
        event.data = Bytes::from(vec![1u8; data_bytes]);
        Arc::new(StoredEvent::new(sequence, SystemTime::UNIX_EPOCH, event))
    }

    #[test]
    fn batch_frames_encode_as_prost_encodes_the_response() {
        for attempts in [vec![0, 0, 0], vec![1, 2, 300]] {
            let frame = SubscribeFrame::Batch(
                attempts
                    .iter()
                    .enumerate()
                    .map(|(i, attempt)| (stored_at(i as u64 + 1, 100 * i), *attempt))
                    .collect(),
            );
            let ours = frame_bytes(&frame);
            let decoded = pb::SubscribeResponse::decode(&ours[..]).unwrap();
            assert_eq!(decoded, frame.clone().into_pb());
            assert_eq!(ours, frame.into_pb().encode_to_vec(), "{attempts:?}");
            let Some(pb::subscribe_response::Message::EventBatch(batch)) = decoded.message else {
                panic!("not a batch: {decoded:?}");
            };
            let sequences: Vec<u64> = batch.events.iter().map(|e| e.sequence).collect();
            assert_eq!(sequences, [1, 2, 3]);
            let expected = if attempts[0] == 0 { vec![] } else { attempts };
            assert_eq!(batch.delivery_attempts, expected);
        }
    }

    fn event_frame(sequence: u64, data_bytes: usize) -> Result<SubscribeFrame, Status> {
        Ok(SubscribeFrame::Event {
            event: stored_at(sequence, data_bytes),
            attempt: 0,
        })
    }

    /// What `batch_ready` made of the frames: sequences per event frame or batch, 0 for a
    /// caught-up marker, `u64::MAX` for an error.
    fn shapes(frames: Vec<Result<SubscribeFrame, Status>>) -> Vec<Vec<u64>> {
        batch_ready(frames)
            .into_iter()
            .map(|frame| match frame {
                Ok(SubscribeFrame::Event { event, .. }) => vec![event.sequence],
                Ok(SubscribeFrame::Batch(events)) => {
                    events.iter().map(|(event, _)| event.sequence).collect()
                }
                Ok(SubscribeFrame::Message(_)) => vec![0],
                Err(_) => vec![u64::MAX],
            })
            .collect()
    }

    #[test]
    fn ready_events_are_batched_up_to_a_marker_or_the_byte_limit() {
        let caught_up = || {
            Ok(SubscribeFrame::Message(Box::new(
                crate::service::subscribe_message(pb::subscribe_response::Message::CaughtUp(
                    pb::CaughtUp { sequence: 2 },
                )),
            )))
        };
        // A run, the marker, a lone event, the end of the stream.
        let frames = vec![
            event_frame(1, 10),
            event_frame(2, 10),
            caught_up(),
            event_frame(3, 10),
            Err(Status::resource_exhausted("slow")),
        ];
        assert_eq!(
            shapes(frames),
            [vec![1, 2], vec![0], vec![3], vec![u64::MAX]]
        );
        // Events of 400 KiB: two fit under MAX_BATCH_BYTES, the third starts the next batch; a
        // larger one than the limit goes alone.
        let big = 400 * 1024;
        let frames = vec![
            event_frame(1, big),
            event_frame(2, big),
            event_frame(3, big),
            event_frame(4, MAX_BATCH_BYTES + 1),
            event_frame(5, 10),
        ];
        assert_eq!(shapes(frames), [vec![1, 2], vec![3], vec![4], vec![5]]);
    }

    #[tokio::test]
    async fn ready_batches_take_what_is_ready_up_to_the_limit_and_end_with_the_stream() {
        use futures_util::StreamExt as _;
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let mut batches = ReadyBatches::new(
            tokio_stream::wrappers::UnboundedReceiverStream::new(receiver),
            3,
        );
        for sequence in 1..=5 {
            sender.send(event_frame(sequence, 10)).unwrap();
        }
        let sequences = |frame: Option<Result<SubscribeFrame, Status>>| match frame {
            Some(Ok(SubscribeFrame::Batch(events))) => {
                events.iter().map(|(e, _)| e.sequence).collect::<Vec<_>>()
            }
            Some(Ok(SubscribeFrame::Event { event, .. })) => vec![event.sequence],
            other => panic!("unexpected {other:?}"),
        };
        // Five ready: a batch of three (the limit), then the two left.
        assert_eq!(sequences(batches.next().await), [1, 2, 3]);
        assert_eq!(sequences(batches.next().await), [4, 5]);
        // Nothing ready: it waits rather than sending an empty batch.
        assert!(futures_util::FutureExt::now_or_never(batches.next()).is_none());
        sender.send(event_frame(6, 10)).unwrap();
        assert_eq!(sequences(batches.next().await), [6]);
        drop(sender);
        assert!(batches.next().await.is_none());
    }

    #[test]
    fn message_frames_encode_as_the_message() {
        let message = pb::SubscribeResponse {
            message: Some(pb::subscribe_response::Message::CaughtUp(pb::CaughtUp {
                sequence: 9,
            })),
            delivery_attempt: 0,
        };
        assert_eq!(
            frame_bytes(&SubscribeFrame::Message(Box::new(message.clone()))),
            message.encode_to_vec()
        );
    }
}
