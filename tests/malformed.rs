//! Requests whose bytes are not valid protobuf (a string field that is not UTF-8, a field cut
//! short) are the caller's error: every RPC answers INVALID_ARGUMENT with the
//! `malformed-request` reason and a message naming the request type and the field, and the bus
//! goes on serving.
//!
//! The bytes go out through tonic's raw `Grpc` client with a codec that sends them as they are,
//! since the generated clients cannot encode an invalid message.

mod common;
mod support;

use bytes::{Buf, BufMut, Bytes};
use common::{event, TestBus};
use eventbus::pb;
use prost::Message;
use support::*;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// Sends bytes as the message and reads replies as bytes.
#[derive(Debug, Clone, Default)]
struct RawCodec;

#[derive(Debug)]
struct RawEncoder;

#[derive(Debug)]
struct RawDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// A marker put in a string field, then replaced by bytes that are not UTF-8.
const MARKER: &str = "MARKERMARKER";

/// `message` encoded, with the marker's bytes replaced by invalid UTF-8 of the same length.
fn with_invalid_utf8(message: &impl Message) -> Bytes {
    let mut bytes = message.encode_to_vec();
    let at = bytes
        .windows(MARKER.len())
        .position(|w| w == MARKER.as_bytes())
        .expect("the marker is in the encoding");
    bytes[at..at + MARKER.len()].fill(0xff);
    Bytes::from(bytes)
}

/// `message` encoded and cut short inside its last field.
fn truncated(message: &impl Message) -> Bytes {
    let bytes = message.encode_to_vec();
    Bytes::from(bytes[..bytes.len() - 3].to_vec())
}

fn path(method: &str) -> tonic::codegen::http::uri::PathAndQuery {
    format!("/eventbus.v1.EventBusService/{method}")
        .parse()
        .unwrap()
}

/// Calls `method` with `bytes` as its request and returns the call's error status, whatever the
/// shape of the method.
async fn raw_call(channel: &Channel, method: &str, bytes: Bytes) -> Status {
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready().await.unwrap();
    let call = async move {
        match method {
            "Subscribe" => match grpc
                .server_streaming(tonic::Request::new(bytes), path(method), RawCodec)
                .await
            {
                Ok(response) => response.into_inner().message().await.map(|_| ()),
                Err(status) => Err(status),
            },
            "PublishStream" => {
                let requests = tokio_stream::iter([bytes]);
                match grpc
                    .streaming(tonic::Request::new(requests), path(method), RawCodec)
                    .await
                {
                    Ok(response) => response.into_inner().message().await.map(|_| ()),
                    Err(status) => Err(status),
                }
            }
            _ => grpc
                .unary(tonic::Request::new(bytes), path(method), RawCodec)
                .await
                .map(|_| ()),
        }
    };
    tokio::time::timeout(WAIT, call)
        .await
        .unwrap_or_else(|_| panic!("{method}: no answer within {WAIT:?}"))
        .expect_err(&format!("{method}: a malformed request must fail"))
}

fn assert_malformed(status: &Status, method: &str, message: &str, field: &str) {
    assert_eq!(status.code(), Code::InvalidArgument, "{method}: {status:?}");
    assert_eq!(
        status
            .metadata()
            .get("eventbus-error")
            .and_then(|v| v.to_str().ok()),
        Some("malformed-request"),
        "{method}: {status:?}"
    );
    for part in [message, field] {
        assert!(
            status.message().contains(part),
            "{method}: {:?} should name {part:?}",
            status.message()
        );
    }
}

#[tokio::test]
async fn malformed_requests_are_invalid_argument_with_a_reason() {
    let bus = TestBus::start().await;
    let channel = bus.channel().await;
    let bad_event = event(MARKER, b"data");
    let cases: Vec<(&str, Bytes, &str, &str)> = vec![
        (
            "Publish",
            with_invalid_utf8(&pb::PublishRequest {
                events: vec![bad_event.clone()],
            }),
            "eventbus.v1.PublishRequest",
            "Event.topic",
        ),
        (
            "PublishStream",
            with_invalid_utf8(&pb::PublishStreamRequest {
                request_id: 7,
                events: vec![bad_event.clone()],
            }),
            "eventbus.v1.PublishStreamRequest",
            "Event.topic",
        ),
        (
            "Subscribe",
            with_invalid_utf8(&request(MARKER)),
            "eventbus.v1.SubscribeRequest",
            "SubscribeRequest.topic",
        ),
        (
            "Query",
            with_invalid_utf8(&pb::QueryRequest {
                event: Some(bad_event.clone()),
                ..Default::default()
            }),
            "eventbus.v1.QueryRequest",
            "Event.topic",
        ),
        (
            "Ack",
            with_invalid_utf8(&pb::AckRequest {
                group: MARKER.to_owned(),
                sequences: vec![1],
            }),
            "eventbus.v1.AckRequest",
            "AckRequest.group",
        ),
        (
            "Nack",
            with_invalid_utf8(&pb::NackRequest {
                group: MARKER.to_owned(),
                sequences: vec![1],
                ..Default::default()
            }),
            "eventbus.v1.NackRequest",
            "NackRequest.group",
        ),
        // A field cut short: its declared length runs past the end of the message.
        (
            "Publish",
            truncated(&pb::PublishRequest {
                events: vec![event("valid.topic", b"data")],
            }),
            "eventbus.v1.PublishRequest",
            "PublishRequest.events",
        ),
        (
            "Ack",
            truncated(&pb::AckRequest {
                group: "workers".to_owned(),
                sequences: vec![],
            }),
            "eventbus.v1.AckRequest",
            "AckRequest.group",
        ),
    ];
    for (method, bytes, message, field) in cases {
        let status = raw_call(&channel, method, bytes).await;
        assert_malformed(&status, method, message, field);
    }

    // The connection and the bus go on serving well-formed calls.
    let mut client = pb::event_bus_service_client::EventBusServiceClient::new(channel);
    client
        .publish(pb::PublishRequest {
            events: vec![event("valid.topic", b"after")],
        })
        .await
        .expect("a valid publish after malformed ones");
}
