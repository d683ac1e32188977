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

/// One `SubscribeResponse` of a subscription stream, before encoding.
#[derive(Debug, Clone)]
pub enum SubscribeFrame {
    /// A response that is not an event (the confirmation, caught-up), as a message. Boxed:
    /// these are rare, and frames stay small for the events.
    Message(Box<pb::SubscribeResponse>),
    /// An event and which delivery of it this is (0 outside MANUAL-ack groups).
    Event { event: SharedEvent, attempt: u32 },
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
        }
    }
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
