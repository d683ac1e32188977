//! Requests that stop arriving: a client that declares large messages and never sends their last
//! byte holds no more than the receive budget, for no longer than the receive timeout, while
//! other clients, and long-lived streams that are idle between messages, are served.
//!
//! The stalling client speaks raw HTTP/2 (the `h2` crate), since gRPC clients send whole
//! messages; the bus runs as its own process so its resident memory is its own.

mod bus_process;
mod common;
mod support;

use std::time::{Duration, Instant};

use bus_process::BusProcess;
use bytes::{BufMut, Bytes, BytesMut};
use common::{event, TestBus};
use eventbus::config::ServerConfig;
use eventbus::pb;
use eventbus::pb::event_bus_service_client::EventBusServiceClient;
use futures_util::StreamExt;
use support::*;
use tokio::sync::mpsc;
use tonic::codegen::http;
use tonic::transport::Channel;
use tonic::Code;

const MIB: usize = 1024 * 1024;
/// Streams on the stalling connection, and the message each declares.
const STALLED_STREAMS: usize = 40;
const DECLARED_BYTES: usize = 15 * MIB;
/// The bus's limits in this test.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(2);
const RECEIVE_BUDGET: usize = 64 * MIB;

/// A raw HTTP/2 connection to the bus.
async fn h2_connect(addr: std::net::SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client.ready().await.unwrap()
}

fn grpc_request(addr: std::net::SocketAddr, method: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{addr}/eventbus.v1.EventBusService/{method}"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// A gRPC message prefix: not compressed, `len` bytes.
fn prefix(len: usize) -> Bytes {
    let mut prefix = BytesMut::with_capacity(5);
    prefix.put_u8(0);
    prefix.put_u32(len as u32);
    prefix.freeze()
}

/// The status a gRPC response ended with: from its headers (trailers-only) or its trailers.
async fn grpc_status(
    response: h2::client::ResponseFuture,
) -> Result<(Code, Option<String>), h2::Error> {
    let response = response.await?;
    let read = |headers: &http::HeaderMap| {
        let code = headers
            .get("grpc-status")?
            .to_str()
            .ok()?
            .parse::<i32>()
            .ok()?;
        let reason = headers
            .get("eventbus-error")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Some((Code::from(code), reason))
    };
    if let Some(status) = read(response.headers()) {
        return Ok(status);
    }
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        data?;
    }
    let trailers = body.trailers().await?.unwrap_or_default();
    Ok(read(&trailers).unwrap_or((Code::Unknown, None)))
}

async fn publish(channel: Channel, topic: &str) -> Result<(), tonic::Status> {
    let mut client = EventBusServiceClient::new(channel);
    let request = pb::PublishRequest {
        events: vec![event(topic, b"x")],
    };
    tokio::time::timeout(Duration::from_secs(5), client.publish(request))
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no answer in 5 s"))?
        .map(|_| ())
}

#[tokio::test]
async fn stalled_requests_are_bounded_in_memory_and_time() {
    let bus = BusProcess::start(
        &[
            "--receive-timeout",
            "2s",
            "--receive-budget-bytes",
            &RECEIVE_BUDGET.to_string(),
        ],
        None,
    );
    let channel = Channel::from_shared(bus.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = EventBusServiceClient::new(channel.clone());

    // Long-lived streams, idle for longer than the receive timeout below: they must live on.
    let (_, mut subscription) = subscribe(&mut client, request("stall.>")).await;
    let (batches, inbound) = mpsc::channel::<pb::PublishStreamRequest>(4);
    let mut answers = client
        .publish_stream(tokio_stream::wrappers::ReceiverStream::new(inbound))
        .await
        .unwrap()
        .into_inner();

    publish(channel.clone(), "stall.warmup").await.unwrap();
    let baseline = bus.rss_bytes();

    // Forty streams on one connection, each declaring a 15 MiB Publish and sending all of it but
    // its last byte. The data is one shared buffer, so the client holds 15 MiB, not 600.
    let mut h2 = h2_connect(bus.addr).await;
    let body = Bytes::from(vec![0u8; DECLARED_BYTES]);
    let started = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..STALLED_STREAMS {
        h2 = h2.ready().await.unwrap();
        let (response, mut send) = h2
            .send_request(grpc_request(bus.addr, "Publish"), false)
            .unwrap();
        send.send_data(prefix(DECLARED_BYTES), false).unwrap();
        send.send_data(body.slice(..DECLARED_BYTES - 1), false)
            .unwrap();
        stalled.push((send, tokio::spawn(grpc_status(response))));
    }

    // Meanwhile: the bus's memory stays bounded, and a normal client is served.
    let mut peak = baseline;
    let mut served = false;
    let deadline = started + RECEIVE_TIMEOUT + Duration::from_secs(15);
    while !stalled.iter().all(|(_, status)| status.is_finished()) {
        assert!(
            Instant::now() < deadline,
            "stalled streams still open {:?} after they started",
            started.elapsed()
        );
        peak = peak.max(bus.rss_bytes());
        if !served {
            publish(channel.clone(), "stall.meanwhile")
                .await
                .expect("a normal client is served while others stall");
            served = true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ended_after = started.elapsed();
    let growth = peak.saturating_sub(baseline);
    println!(
        "RSS baseline {} MiB, peak {} MiB (+{} MiB); all {STALLED_STREAMS} stalled streams ended \
         after {ended_after:?}",
        baseline / MIB as u64,
        peak / MIB as u64,
        growth / MIB as u64
    );
    assert!(served);
    // The budget, plus flow-control windows and allocator slack: far under the 600 MiB the
    // streams declared.
    assert!(
        growth < (RECEIVE_BUDGET + 96 * MIB) as u64,
        "the bus grew by {} MiB",
        growth / MIB as u64
    );
    assert!(
        ended_after < RECEIVE_TIMEOUT + Duration::from_secs(10),
        "stalled streams ended after {ended_after:?}"
    );
    let mut timed_out = 0;
    for (_send, status) in stalled {
        match status.await.unwrap() {
            Ok((Code::DeadlineExceeded, Some(reason))) if reason == "receive-timeout" => {
                timed_out += 1
            }
            Ok((Code::ResourceExhausted, Some(reason))) if reason == "receive-budget" => {}
            other => panic!("a stalled stream ended with {other:?}"),
        }
    }
    assert!(timed_out > 0, "some stalled streams end by the timeout");

    // The idle long-lived streams still work, past the receive timeout.
    publish(channel.clone(), "stall.after").await.unwrap();
    loop {
        let event = next_event(&mut subscription).await;
        if event.topic == "stall.after" {
            break;
        }
    }
    batches
        .send(pb::PublishStreamRequest {
            request_id: 1,
            events: vec![event("stall.stream", b"x")],
        })
        .await
        .unwrap();
    let answer = tokio::time::timeout(WAIT, answers.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(answer.request_id, 1);
    assert!(matches!(
        answer.result,
        Some(pb::publish_stream_response::Result::Published(_))
    ));
}

/// A bus in this process with a short receive timeout and a small budget, for the framing rules.
async fn framing_bus() -> TestBus {
    TestBus::start_server(ServerConfig {
        receive_timeout: Duration::from_millis(500),
        receive_budget_bytes: 32 * MIB,
        ..ServerConfig::default()
    })
    .await
}

#[tokio::test]
async fn a_stream_message_must_arrive_in_time_but_the_stream_may_idle() {
    let bus = framing_bus().await;
    let mut h2 = h2_connect(bus.addr).await;
    let (response, mut send) = h2
        .send_request(grpc_request(bus.addr, "PublishStream"), false)
        .unwrap();
    // Idle between messages for longer than the timeout: nothing happens.
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Then half a message, and nothing more.
    send.send_data(prefix(100), false).unwrap();
    send.send_data(Bytes::from(vec![0u8; 50]), false).unwrap();
    let started = Instant::now();
    let status = tokio::time::timeout(WAIT, grpc_status(response))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        status,
        (Code::DeadlineExceeded, Some("receive-timeout".to_owned()))
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    h2 = h2.ready().await.unwrap();
    drop(h2);
}

#[tokio::test]
async fn a_unary_body_that_never_ends_times_out() {
    let bus = framing_bus().await;
    let mut h2 = h2_connect(bus.addr).await;
    // A whole, valid message, but the stream is never closed: the handler would wait forever.
    let message = prost::Message::encode_to_vec(&pb::PublishRequest {
        events: vec![event("valid.topic", b"x")],
    });
    let (response, mut send) = h2
        .send_request(grpc_request(bus.addr, "Publish"), false)
        .unwrap();
    send.send_data(prefix(message.len()), false).unwrap();
    send.send_data(Bytes::from(message), false).unwrap();
    let status = tokio::time::timeout(WAIT, grpc_status(response))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        status,
        (Code::DeadlineExceeded, Some("receive-timeout".to_owned()))
    );
    h2 = h2.ready().await.unwrap();
    drop(h2);
}

#[tokio::test]
async fn framing_errors_carry_the_bus_reasons() {
    let bus = framing_bus().await;
    let mut h2 = h2_connect(bus.addr).await;

    // A message declared over max_message_bytes fails as its prefix arrives.
    let (response, mut send) = h2
        .send_request(grpc_request(bus.addr, "Publish"), false)
        .unwrap();
    send.send_data(prefix(64 * MIB), false).unwrap();
    let status = tokio::time::timeout(WAIT, grpc_status(response))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        status,
        (Code::OutOfRange, Some("message-too-large".to_owned()))
    );

    // A body that ends inside a message is malformed.
    h2 = h2.ready().await.unwrap();
    let (response, mut send) = h2
        .send_request(grpc_request(bus.addr, "Ack"), false)
        .unwrap();
    send.send_data(prefix(100), false).unwrap();
    send.send_data(Bytes::from(vec![0u8; 10]), true).unwrap();
    let status = tokio::time::timeout(WAIT, grpc_status(response))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        status,
        (Code::InvalidArgument, Some("malformed-request".to_owned()))
    );

    // A request over the shared budget fails; the budget is whole again afterwards. On a bus
    // whose receive timeout is long enough that 32 MiB arrive in time on a loaded machine.
    let bus = TestBus::start_server(ServerConfig {
        receive_timeout: Duration::from_secs(10),
        receive_budget_bytes: 32 * MIB,
        ..ServerConfig::default()
    })
    .await;
    let mut h2 = h2_connect(bus.addr).await;
    for attempt in 0..2 {
        h2 = h2.ready().await.unwrap();
        let (response, mut send) = h2
            .send_request(grpc_request(bus.addr, "PublishStream"), false)
            .unwrap();
        send.send_data(prefix(16 * MIB), false).unwrap();
        let (second, mut second_send) = {
            h2 = h2.ready().await.unwrap();
            h2.send_request(grpc_request(bus.addr, "PublishStream"), false)
                .unwrap()
        };
        second_send.send_data(prefix(16 * MIB), false).unwrap();
        let chunk = Bytes::from(vec![0u8; 16 * MIB - 1]);
        send.send_data(chunk.clone(), false).unwrap();
        second_send.send_data(chunk, false).unwrap();
        // Together 32 MiB of partial messages would be held: at least one fails on the budget
        // (or both end by the timeout, if the budget were not counted: then this test fails).
        let first = tokio::time::timeout(WAIT, grpc_status(response))
            .await
            .unwrap()
            .unwrap();
        let second = tokio::time::timeout(WAIT, grpc_status(second))
            .await
            .unwrap()
            .unwrap();
        let budget = (Code::ResourceExhausted, Some("receive-budget".to_owned()));
        assert!(
            first == budget || second == budget,
            "attempt {attempt}: {first:?}, {second:?}"
        );
    }
}
