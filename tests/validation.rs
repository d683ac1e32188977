//! Every class of invalid input gets INVALID_ARGUMENT naming the field and the rule, and
//! nothing of a refused request is applied.

mod common;
mod support;

use std::collections::HashMap;

use common::{event, TestBus};
use eventbus::config::BusConfig;
use eventbus::pb;
use eventbus::pb::subscribe_request::Start;
use support::*;
use tonic::Code;

const MAX_DATA: usize = 1024;
const MAX_BATCH: usize = 3;

async fn bus() -> TestBus {
    TestBus::start_with(BusConfig {
        max_event_data_bytes: MAX_DATA,
        max_batch_events: MAX_BATCH,
        ..BusConfig::default()
    })
    .await
}

fn with(change: impl FnOnce(&mut pb::Event)) -> pb::Event {
    let mut event = event("valid.topic", b"data");
    change(&mut event);
    event
}

async fn refused(client: &mut Client, events: Vec<pb::Event>) -> tonic::Status {
    client
        .publish(pb::PublishRequest { events })
        .await
        .expect_err("the batch should be refused")
}

#[tokio::test]
async fn invalid_publishes_are_refused_by_field_and_nothing_is_stored() {
    let bus = bus().await;
    let mut client = bus.client().await;
    let (_, mut watcher) = subscribe(&mut client, request(">")).await;

    let too_many_attributes: HashMap<String, String> =
        (0..65).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let cases: Vec<(&str, Vec<pb::Event>, &[&str])> = vec![
        ("empty batch", vec![], &["events", "at least one event"]),
        (
            "too many events",
            (0..MAX_BATCH + 1).map(|_| with(|_| {})).collect(),
            &["events", "4 events", "limit of 3"],
        ),
        (
            "empty topic",
            vec![with(|e| e.topic.clear())],
            &["events[0].topic", "must not be empty"],
        ),
        (
            "bad character in topic",
            vec![with(|e| e.topic = "orders.new order".into())],
            &["events[0].topic", "[A-Za-z0-9_-]"],
        ),
        (
            "empty token",
            vec![with(|e| e.topic = "orders..created".into())],
            &["events[0].topic", "empty token"],
        ),
        (
            "topic too long",
            vec![with(|e| e.topic = "a".repeat(256))],
            &["events[0].topic", "255"],
        ),
        (
            "wildcard topic",
            vec![with(|e| e.topic = "orders.*".into())],
            &["events[0].topic", "wildcard"],
        ),
        (
            "full wildcard topic",
            vec![with(|e| e.topic = "orders.>".into())],
            &["events[0].topic", "wildcard"],
        ),
        (
            "reserved topic",
            vec![with(|e| e.topic = "_bus.internal".into())],
            &["events[0].topic", "_bus."],
        ),
        (
            "empty source",
            vec![with(|e| e.source.clear())],
            &["events[0].source", "must not be empty"],
        ),
        (
            "control character in type",
            vec![with(|e| e.r#type = "a\u{7}b".into())],
            &["events[0].type", "control"],
        ),
        (
            "overlong id",
            vec![with(|e| e.id = "i".repeat(257))],
            &["events[0].id", "257 bytes"],
        ),
        (
            "bad reply_to",
            vec![with(|e| e.reply_to = "replies.*".into())],
            &["events[0].reply_to", "wildcard"],
        ),
        (
            "reserved reply_to",
            vec![with(|e| e.reply_to = "_bus.secret".into())],
            &["events[0].reply_to", "_bus."],
        ),
        (
            "bad attribute key",
            vec![with(|e| {
                e.attributes.insert("bad key".into(), "v".into());
            })],
            &["events[0].attributes[\"bad key\"]", "keys are"],
        ),
        (
            "empty attribute key",
            vec![with(|e| {
                e.attributes.insert(String::new(), "v".into());
            })],
            &["events[0].attributes", "keys are"],
        ),
        (
            "too many attributes",
            vec![with(|e| e.attributes = too_many_attributes.clone())],
            &["events[0].attributes", "65 attributes", "limit of 64"],
        ),
        (
            "attribute value too long",
            vec![with(|e| {
                e.attributes.insert("k".into(), "v".repeat(4097));
            })],
            &["events[0].attributes[\"k\"]", "4097 bytes"],
        ),
        (
            "bad timestamp nanos",
            vec![with(|e| {
                e.time = Some(prost_types::Timestamp {
                    seconds: 1,
                    nanos: 1_000_000_000,
                })
            })],
            &["events[0].time", "valid timestamp"],
        ),
        (
            "timestamp before 1970",
            vec![with(|e| {
                e.time = Some(prost_types::Timestamp {
                    seconds: -5,
                    nanos: 0,
                })
            })],
            &["events[0].time", "valid timestamp"],
        ),
        (
            "one bad event in a batch",
            vec![
                with(|_| {}),
                with(|_| {}),
                with(|e| e.topic = "bad topic".into()),
            ],
            &["events[2].topic"],
        ),
    ];
    for (what, events, parts) in cases {
        let status = refused(&mut client, events).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        for part in parts {
            assert!(
                status.message().contains(part),
                "{what}: {:?} should contain {part:?}",
                status.message()
            );
        }
        assert_eq!(
            reason(&status).as_deref(),
            Some("invalid-argument"),
            "{what}"
        );
    }

    // Data over the limit names the limit, even when the other events are fine.
    let status = refused(
        &mut client,
        vec![
            with(|_| {}),
            with(|e| e.data = vec![0; MAX_DATA + 1].into()),
        ],
    )
    .await;
    assert_status(
        &status,
        Code::InvalidArgument,
        &["events[1].data", "1025 bytes", "limit of 1024 bytes"],
    );
    assert_eq!(reason(&status).as_deref(), Some("event-too-large"));
    // Exactly at the limit is fine.
    let at_limit = with(|e| e.data = vec![0; MAX_DATA].into());

    // Nothing of any refused batch was stored or delivered: the next sequence is the first.
    let sequences = publish(&mut client, vec![at_limit]).await;
    assert_eq!(sequences, vec![1]);
    assert_eq!(next_event(&mut watcher).await.sequence, 1);

    // Reply inboxes are the one reserved family clients may publish to.
    let inbox = publish_one(&mut client, event("_bus.inbox.x", b"reply")).await;
    assert_eq!(inbox, 2);
    let reply_to_inbox =
        publish_one(&mut client, with(|e| e.reply_to = "_bus.inbox.abc".into())).await;
    assert_eq!(reply_to_inbox, 3);
}

#[tokio::test]
async fn invalid_subscriptions_are_refused_by_field() {
    let bus = bus().await;
    let mut client = bus.client().await;
    let cases: Vec<(pb::SubscribeRequest, &[&str])> = vec![
        (request(""), &["topic", "must not be empty"]),
        (
            request("a.>.b"),
            &["topic", "'>' may only be the last token"],
        ),
        (request("a..b"), &["topic", "empty token"]),
        (request("a.b c"), &["topic", "[A-Za-z0-9_-]"]),
        (request("a.*x"), &["topic"]),
        (
            pb::SubscribeRequest {
                group: "g\n".into(),
                ..request("a")
            },
            &["group", "control"],
        ),
        (
            pb::SubscribeRequest {
                subscriber: "s".repeat(300),
                ..request("a")
            },
            &["subscriber", "300 bytes"],
        ),
        (
            request_from(
                "a",
                Start::FromTime(prost_types::Timestamp {
                    seconds: 0,
                    nanos: -1,
                }),
            ),
            &["from_time", "valid timestamp"],
        ),
    ];
    for (request, parts) in cases {
        let status = client
            .subscribe(request)
            .await
            .expect_err("should be refused");
        assert_status(&status, Code::InvalidArgument, parts);
    }
    // Subscribing to the bus's own topics is allowed (e.g. watching inboxes).
    subscribe(&mut client, request("_bus.>")).await;
}

#[tokio::test]
async fn invalid_queries_are_refused_by_field() {
    let bus = bus().await;
    let mut client = bus.client().await;
    let status = client
        .query(pb::QueryRequest {
            event: None,
            timeout: None,
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["event", "required"]);

    let status = client
        .query(pb::QueryRequest {
            event: Some(with(|e| e.topic = "q.*".into())),
            timeout: None,
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["event.topic", "wildcard"]);

    let status = client
        .query(pb::QueryRequest {
            event: Some(with(|e| e.source.clear())),
            timeout: None,
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["event.source"]);

    for (seconds, nanos) in [(0, 0), (-1, 0), (0, -5)] {
        let status = client
            .query(pb::QueryRequest {
                event: Some(with(|_| {})),
                timeout: Some(prost_types::Duration { seconds, nanos }),
            })
            .await
            .unwrap_err();
        assert_status(
            &status,
            Code::InvalidArgument,
            &["timeout", "must be positive"],
        );
    }
    let status = client
        .query(pb::QueryRequest {
            event: Some(with(|e| e.data = vec![0; MAX_DATA + 1].into())),
            timeout: None,
        })
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::InvalidArgument,
        &["event.data", "limit of 1024 bytes"],
    );
}

#[tokio::test]
async fn an_invalid_topic_list_pattern_is_refused() {
    let bus = bus().await;
    let mut admin = bus.admin().await;
    for pattern in ["a..b", "a.>.c", "a b"] {
        let status = admin
            .list_topics(pb::ListTopicsRequest {
                pattern: pattern.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_status(&status, Code::InvalidArgument, &["pattern"]);
    }
}
