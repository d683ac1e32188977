//! Graceful shutdown: health goes NOT_SERVING, open streams end with UNAVAILABLE, in-flight
//! queries are answered, new calls are refused, and the server stops well within its grace.

mod common;
mod support;

use std::time::Duration;

use common::{event, eventually, TestBus};
use eventbus::config::ServerConfig;
use eventbus::pb;
use eventbus::pb::subscribe_request::Start;
use support::*;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Long, so finishing within a fraction of it shows streams were ended on purpose rather than
/// dropped when the grace ran out.
const GRACE: Duration = Duration::from_secs(30);

async fn bus() -> TestBus {
    TestBus::start_server(ServerConfig {
        shutdown_grace: GRACE,
        ..ServerConfig::default()
    })
    .await
}

#[tokio::test]
async fn shutdown_ends_open_streams_with_unavailable_and_health_goes_not_serving() {
    let bus = bus().await;
    let mut client = bus.client().await;
    let mut health = HealthClient::new(bus.channel().await);

    let mut watches = Vec::new();
    for service in ["", "eventbus.v1.EventBusService"] {
        let mut watch = health
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = watch.message().await.unwrap().unwrap();
        assert_eq!(first.status, ServingStatus::Serving as i32, "{service:?}");
        watches.push(watch);
    }

    let (_, mut live) = subscribe(&mut client, request("orders.>")).await;
    let (_, mut replaying) = subscribe(&mut client, request_from(">", Start::Earliest(()))).await;
    assert_eq!(caught_up(&mut replaying).await, 0);

    let (requests, outbound) = tokio::sync::mpsc::channel(4);
    let mut publish_stream = client
        .publish_stream(ReceiverStream::new(outbound))
        .await
        .unwrap()
        .into_inner();
    requests
        .send(pb::PublishStreamRequest {
            request_id: 1,
            events: vec![event("orders.created", b"before")],
        })
        .await
        .unwrap();
    let answer = publish_stream.message().await.unwrap().unwrap();
    assert_eq!(answer.request_id, 1);
    assert_eq!(next_event(&mut live).await.sequence, 1);
    assert_eq!(next_event(&mut replaying).await.sequence, 1);

    bus.begin_stop();

    for (watch, service) in watches.iter_mut().zip(["", "eventbus.v1.EventBusService"]) {
        let update = tokio::time::timeout(WAIT, watch.message())
            .await
            .expect("a health update")
            .expect("the watch is still open")
            .expect("an update");
        assert_eq!(
            update.status,
            ServingStatus::NotServing as i32,
            "{service:?} goes NOT_SERVING"
        );
    }
    // A health watch is an open stream too; the client is done with it.
    drop(watches);

    for stream in [&mut live, &mut replaying] {
        let (rest, status) = read_to_error(stream).await;
        assert!(rest.is_empty());
        assert_status(&status, Code::Unavailable, &["shutting down"]);
        assert_eq!(reason(&status).as_deref(), Some("shutting-down"));
    }
    let status = tokio::time::timeout(WAIT, publish_stream.message())
        .await
        .expect("the publish stream ends")
        .expect_err("with a status");
    assert_status(&status, Code::Unavailable, &["shutting down"]);

    bus.stop(GRACE / 3).await;
}

#[tokio::test]
async fn an_in_flight_query_is_answered_unavailable() {
    let bus = bus().await;
    let mut client = bus.client().await;
    let (_, mut silent) = subscribe(&mut client, request("never.answered")).await;
    let query = {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .query(pb::QueryRequest {
                    event: Some(event("never.answered", b"?")),
                    timeout: Some(prost_types::Duration {
                        seconds: 60,
                        nanos: 0,
                    }),
                })
                .await
        })
    };
    // Shut down while the query waits for its reply.
    let asked = next_event(&mut silent).await;
    assert_eq!(asked.topic, "never.answered");
    bus.begin_stop();
    let status = tokio::time::timeout(WAIT, query)
        .await
        .expect("the query is answered")
        .unwrap()
        .unwrap_err();
    assert_status(&status, Code::Unavailable, &["shutting down"]);
    bus.stop(GRACE / 3).await;
}

#[tokio::test]
async fn new_calls_are_refused_once_shutting_down() {
    let bus = bus().await;
    let mut client = bus.client().await;
    publish_one(&mut client, event("before", b"")).await;
    let addr = bus.addr;
    bus.begin_stop();
    // Until the signal is handled a publish may still go through; after, every call fails
    // with UNAVAILABLE, whether the bus or the closed connection refuses it.
    let status = eventually("a publish to be refused", WAIT, || {
        let mut client = client.clone();
        async move {
            client
                .publish(pb::PublishRequest {
                    events: vec![event("after", b"")],
                })
                .await
                .err()
        }
    })
    .await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let status = client
        .subscribe(request("after"))
        .await
        .expect_err("no new subscription while shutting down");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    bus.stop(GRACE / 3).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed once stopped"
    );
}
