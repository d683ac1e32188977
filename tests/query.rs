//! Query: request/response over events, answered by a plain Subscribe + Publish responder.

mod common;
mod support;

use std::time::{Duration, Instant};

use common::{event, TestBus};
use eventbus::config::BusConfig;
use eventbus::pb;
use support::*;
use tonic::Code;

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration::try_from(d).unwrap()
}

fn query(topic: &str, data: &[u8], timeout: Duration) -> pb::QueryRequest {
    pb::QueryRequest {
        event: Some(pb::Event {
            source: "asker".into(),
            ..event(topic, data)
        }),
        timeout: Some(duration(timeout)),
    }
}

/// A responder as a service would write one: subscribes to `topic` in a group and answers each
/// query on its `reply_to` with the same correlation id, after first sending a stray reply with
/// another correlation id, which the asker must ignore.
async fn responder(bus: &TestBus, topic: &str) -> tokio::task::JoinHandle<()> {
    let mut client = bus.client().await;
    let (_, mut stream) = subscribe(
        &mut client,
        pb::SubscribeRequest {
            group: "responders".into(),
            subscriber: "responder-service".into(),
            ..request(topic)
        },
    )
    .await;
    tokio::spawn(async move {
        while let Ok(Some(response)) = stream.message().await {
            let Some(pb::subscribe_response::Message::Event(query)) = response.message else {
                continue;
            };
            let reply = |correlation_id: &str, data: Vec<u8>| pb::Event {
                source: "responder-service".into(),
                correlation_id: correlation_id.to_owned(),
                causation_id: query.id.clone(),
                ..event(&query.reply_to, &data)
            };
            let stray = reply("someone-else", b"stray".to_vec());
            let answer = reply(&query.correlation_id, [b"re:", &query.data[..]].concat());
            publish(&mut client, vec![stray, answer]).await;
        }
    })
}

#[tokio::test]
async fn a_query_gets_the_reply_with_its_correlation_id() {
    let bus = TestBus::start().await;
    let _responder = responder(&bus, "user.query").await;
    let mut client = bus.client().await;

    let mut request = query("user.query", b"alice", Duration::from_secs(20));
    request.event.as_mut().unwrap().correlation_id = "c-1".into();
    let reply = client
        .query(request)
        .await
        .unwrap()
        .into_inner()
        .reply
        .unwrap();
    assert_eq!(reply.correlation_id, "c-1");
    assert_eq!(&reply.data[..], b"re:alice");
    assert_eq!(reply.source, "responder-service");
    assert!(reply.topic.starts_with("_bus.inbox."), "{}", reply.topic);
    assert!(reply.sequence > 0);

    // Without a correlation id the bus makes one, and still matches the reply to it.
    for name in ["bob", "carol"] {
        let reply = client
            .query(query(
                "user.query",
                name.as_bytes(),
                Duration::from_secs(20),
            ))
            .await
            .unwrap()
            .into_inner()
            .reply
            .unwrap();
        assert!(!reply.correlation_id.is_empty());
        assert_ne!(reply.correlation_id, "someone-else");
        assert_eq!(reply.data, [b"re:", name.as_bytes()].concat());
    }
}

#[tokio::test]
async fn concurrent_queries_each_get_their_own_reply() {
    let bus = TestBus::start().await;
    let _responder = responder(&bus, "echo").await;
    let client = bus.client().await;
    let asks: Vec<_> = (0..20)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let data = format!("q{i}");
                let reply = client
                    .query(query("echo", data.as_bytes(), Duration::from_secs(20)))
                    .await
                    .unwrap()
                    .into_inner()
                    .reply
                    .unwrap();
                assert_eq!(reply.data, format!("re:{data}").into_bytes());
            })
        })
        .collect();
    for ask in asks {
        ask.await.unwrap();
    }
}

#[tokio::test]
async fn no_responders_fails_at_once_with_unavailable() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    // A subscriber elsewhere is no responder for this topic.
    let (_, _elsewhere) = subscribe(&mut client, request("other.topic")).await;

    let timeout = Duration::from_secs(30);
    let started = Instant::now();
    let status = client
        .query(query("nobody.home", b"?", timeout))
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert_status(
        &status,
        Code::Unavailable,
        &["no responders", "nobody.home"],
    );
    assert_eq!(reason(&status).as_deref(), Some("no-responders"));
    assert!(
        elapsed < timeout / 10,
        "failed after {elapsed:?}, not well before the {timeout:?} timeout"
    );
}

#[tokio::test]
async fn a_query_nobody_answers_times_out_naming_the_topic() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    // Subscribed, so the query is published, but never answers.
    let (_, mut silent) = subscribe(&mut client, request("slow.query")).await;

    let status = client
        .query(query("slow.query", b"?", Duration::from_millis(300)))
        .await
        .unwrap_err();
    assert_status(&status, Code::DeadlineExceeded, &["slow.query"]);
    assert_eq!(reason(&status).as_deref(), Some("query-timeout"));
    // The query did go out, with a reply inbox and a correlation id.
    let asked = next_event(&mut silent).await;
    assert!(asked.reply_to.starts_with("_bus.inbox."));
    assert!(!asked.correlation_id.is_empty());
}

#[tokio::test]
async fn the_server_maximum_caps_the_query_timeout() {
    let bus = TestBus::start_with(BusConfig {
        default_query_timeout: Duration::from_millis(200),
        max_query_timeout: Duration::from_millis(300),
        ..BusConfig::default()
    })
    .await;
    let mut client = bus.client().await;
    let (_, _silent) = subscribe(&mut client, request("capped")).await;
    let asked = Duration::from_secs(60);
    let started = Instant::now();
    let status = client
        .query(query("capped", b"?", asked))
        .await
        .unwrap_err();
    assert_status(&status, Code::DeadlineExceeded, &["capped"]);
    assert!(
        started.elapsed() < asked / 6,
        "took {:?}",
        started.elapsed()
    );

    // No timeout in the request: the default applies.
    let started = Instant::now();
    let status = client
        .query(pb::QueryRequest {
            timeout: None,
            ..query("capped", b"?", asked)
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::DeadlineExceeded, &["capped"]);
    assert!(
        started.elapsed() < asked / 6,
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_grpc_deadline_caps_the_query_timeout() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let (_, _silent) = subscribe(&mut client, request("deadline")).await;
    let asked = Duration::from_secs(60);
    let mut request = tonic::Request::new(query("deadline", b"?", asked));
    request.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let status = client.query(request).await.unwrap_err();
    // tonic enforces the deadline on both ends too: whichever side gives up first answers,
    // with DEADLINE_EXCEEDED from the bus or CANCELLED ("Timeout expired") from tonic.
    assert!(
        matches!(status.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{status:?}"
    );
    assert!(
        started.elapsed() < asked / 6,
        "took {:?}",
        started.elapsed()
    );
}
