//! Helpers for the black-box suite on top of `common`: subscribing and reading a stream with a
//! deadline, publishing, and reading a stream to its final status. Every wait is bounded by
//! [`WAIT`], which is generous so a loaded machine does not make tests flaky; a passing test
//! never waits it out.
#![allow(dead_code)]

use std::time::Duration;

use eventbus::pb;
use eventbus::pb::event_bus_service_client::EventBusServiceClient;
use eventbus::pb::subscribe_response::Message;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

pub type Client = EventBusServiceClient<Channel>;
pub type Stream = Streaming<pb::SubscribeResponse>;

/// The longest any single wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(30);

/// A subscription request for `pattern` from service `test`, starting at latest.
pub fn request(pattern: &str) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        topic: pattern.to_owned(),
        subscriber: "test".to_owned(),
        ..Default::default()
    }
}

/// A subscription request starting at `start`.
pub fn request_from(pattern: &str, start: pb::subscribe_request::Start) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        start: Some(start),
        ..request(pattern)
    }
}

/// Subscribes and waits for the `subscribed` confirmation.
pub async fn subscribe(
    client: &mut Client,
    request: pb::SubscribeRequest,
) -> (pb::Subscribed, Stream) {
    let mut stream = client
        .subscribe(request)
        .await
        .expect("subscribe refused")
        .into_inner();
    match next(&mut stream).await {
        Message::Subscribed(subscribed) => (subscribed, stream),
        other => panic!("expected the subscribed confirmation first, got {other:?}"),
    }
}

/// The next message of a stream; fails the test if the stream ends or errs first.
pub async fn next(stream: &mut Stream) -> Message {
    match tokio::time::timeout(WAIT, stream.message()).await {
        Err(_) => panic!("no message within {WAIT:?}"),
        Ok(Err(status)) => panic!("stream failed: {status:?}"),
        Ok(Ok(None)) => panic!("stream ended"),
        Ok(Ok(Some(response))) => response.message.expect("a message"),
    }
}

/// The next message, which must be an event.
pub async fn next_event(stream: &mut Stream) -> pb::Event {
    match next(stream).await {
        Message::Event(event) => event,
        other => panic!("expected an event, got {other:?}"),
    }
}

/// The next `count` messages, which must all be events.
pub async fn events(stream: &mut Stream, count: usize) -> Vec<pb::Event> {
    let mut received = Vec::with_capacity(count);
    for _ in 0..count {
        received.push(next_event(stream).await);
    }
    received
}

/// The next message, which must be the `caught_up` marker; returns its sequence.
pub async fn caught_up(stream: &mut Stream) -> u64 {
    match next(stream).await {
        Message::CaughtUp(marker) => marker.sequence,
        other => panic!("expected caught_up, got {other:?}"),
    }
}

/// Reads a stream until it ends with an error status; returns the events before it and the
/// status. Fails if the stream ends cleanly or sends anything but events.
pub async fn read_to_error(stream: &mut Stream) -> (Vec<pb::Event>, Status) {
    let mut received = Vec::new();
    loop {
        match tokio::time::timeout(WAIT, stream.message()).await {
            Err(_) => panic!("stream did not end within {WAIT:?}"),
            Ok(Err(status)) => return (received, status),
            Ok(Ok(None)) => panic!("stream ended without an error status"),
            Ok(Ok(Some(response))) => match response.message.expect("a message") {
                Message::Event(event) => received.push(event),
                other => panic!("expected events, got {other:?}"),
            },
        }
    }
}

/// Publishes a batch and returns its sequences; fails the test on error.
pub async fn publish(client: &mut Client, events: Vec<pb::Event>) -> Vec<u64> {
    client
        .publish(pb::PublishRequest { events })
        .await
        .expect("publish failed")
        .into_inner()
        .sequences
}

/// Publishes one event and returns its sequence.
pub async fn publish_one(client: &mut Client, event: pb::Event) -> u64 {
    publish(client, vec![event]).await[0]
}

/// The stable reason a status carries in its `eventbus-error` metadata.
pub fn reason(status: &Status) -> Option<String> {
    status
        .metadata()
        .get("eventbus-error")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
}

/// Asserts a status's code and that its message contains every one of `parts`.
#[track_caller]
pub fn assert_status(status: &Status, code: Code, parts: &[&str]) {
    assert_eq!(status.code(), code, "unexpected status {status:?}");
    for part in parts {
        assert!(
            status.message().contains(part),
            "message {:?} should contain {part:?}",
            status.message()
        );
    }
}

/// The sequences of some events.
pub fn sequences(events: &[pb::Event]) -> Vec<u64> {
    events.iter().map(|e| e.sequence).collect()
}

/// A protobuf timestamp from a system time.
pub fn timestamp(time: std::time::SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(time)
}

/// `count` events, each to its own topic `<prefix>.<i>` from its own source, published in
/// batches of 5,000.
pub async fn publish_names(client: &mut Client, prefix: &str, count: usize) {
    let mut next = 0;
    while next < count {
        let end = (next + 5_000).min(count);
        let events = (next..end)
            .map(|i| pb::Event {
                topic: format!("{prefix}.{i}"),
                source: format!("{prefix}-source-{i}"),
                ..Default::default()
            })
            .collect();
        publish(client, events).await;
        next = end;
    }
}

/// Every topic the bus lists (its first page, as many as the default page size).
pub async fn topics(
    admin: &mut eventbus::pb::admin_service_client::AdminServiceClient<tonic::transport::Channel>,
) -> Vec<pb::TopicInfo> {
    admin
        .list_topics(pb::ListTopicsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .topics
}

/// The topology, bounded to `max_edges` edges.
pub async fn topology(
    admin: &mut eventbus::pb::admin_service_client::AdminServiceClient<tonic::transport::Channel>,
    max_edges: u32,
) -> pb::GetTopologyResponse {
    admin
        .get_topology(pb::GetTopologyRequest { max_edges })
        .await
        .unwrap()
        .into_inner()
}

/// A MANUAL-ack subscription request for `topic` in `group`, from service `worker`.
pub fn manual(topic: &str, group: &str) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        topic: topic.into(),
        group: group.into(),
        subscriber: "worker".into(),
        ack_mode: pb::AckMode::Manual as i32,
        ..Default::default()
    }
}

/// A protobuf Duration of `ms` milliseconds, as an optional field wants it.
pub fn millis(ms: u64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration::try_from(Duration::from_millis(ms)).unwrap())
}

/// `GET path` over plain HTTP/1.1 (one connection, closed after): the status code and the body.
/// For the admin listener; small on purpose, so the tests need no HTTP client crate.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap();
        String::from_utf8(response).unwrap()
    };
    let response = tokio::time::timeout(WAIT, exchange)
        .await
        .expect("the admin listener answers in time");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("an HTTP response with a head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line");
    (status, body.to_owned())
}

/// The gRPC health status of the whole server (service `""`), as its enum number
/// (`ServingStatus::Serving as i32`, ...).
pub async fn server_health(
    health: &tonic_health::pb::health_client::HealthClient<tonic::transport::Channel>,
) -> i32 {
    health
        .clone()
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}
