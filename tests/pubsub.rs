//! Publish and subscribe end to end: order, exact delivery, wildcards, PublishStream, global
//! sequences, and the promise of the `subscribed` confirmation.

mod common;
mod support;

use std::collections::{BTreeMap, HashSet};

use common::{event, TestBus};
use eventbus::pb;
use eventbus::pb::publish_stream_response::Result as StreamResult;
use support::*;
use tokio_stream::wrappers::ReceiverStream;

#[tokio::test]
async fn every_subscriber_gets_exactly_its_matching_events_in_sequence_order() {
    let bus = TestBus::start().await;
    let patterns = ["orders.*", "orders.created", ">"];
    let mut streams = Vec::new();
    for pattern in patterns {
        let mut client = bus.client().await;
        let (_, stream) = subscribe(&mut client, request(pattern)).await;
        streams.push(stream);
    }

    // Several publishers, each on its own connection, racing with batches of mixed topics.
    let topics = [
        "orders.created",
        "orders.shipped",
        "users.signup",
        "orders.created.eu",
    ];
    let mut publishers = Vec::new();
    for publisher in 0..4 {
        let mut client = bus.client().await;
        publishers.push(tokio::spawn(async move {
            let mut published = Vec::new();
            for batch in 0..40 {
                let events: Vec<_> = (0..5)
                    .map(|i| {
                        let topic = topics[(publisher + batch + i) % topics.len()];
                        event(topic, format!("{publisher}/{batch}/{i}").as_bytes())
                    })
                    .collect();
                let names: Vec<_> = events.iter().map(|e| e.topic.clone()).collect();
                let sequences = publish(&mut client, events).await;
                assert_eq!(sequences.len(), names.len());
                published.extend(sequences.into_iter().zip(names));
            }
            published
        }));
    }
    let mut published = BTreeMap::new();
    for publisher in publishers {
        for (sequence, topic) in publisher.await.unwrap() {
            assert!(
                published.insert(sequence, topic).is_none(),
                "duplicate sequence"
            );
        }
    }
    assert_eq!(published.len(), 4 * 40 * 5);
    assert_eq!(
        published.keys().copied().collect::<Vec<_>>(),
        (1..=800).collect::<Vec<u64>>(),
        "sequences are consecutive across publishers"
    );

    let matches = |pattern: &str, topic: &str| match pattern {
        "orders.*" => topic.starts_with("orders.") && topic.split('.').count() == 2,
        "orders.created" => topic == "orders.created",
        ">" => true,
        _ => unreachable!(),
    };
    for (pattern, stream) in patterns.iter().zip(&mut streams) {
        let expected: Vec<u64> = published
            .iter()
            .filter(|(_, topic)| matches(pattern, topic))
            .map(|(sequence, _)| *sequence)
            .collect();
        let received = events(stream, expected.len()).await;
        assert_eq!(sequences(&received), expected, "subscriber to {pattern}");
        for event in &received {
            assert_eq!(event.topic, published[&event.sequence]);
        }
    }

    // Nothing extra is queued behind them: the next event each sees is a fresh one.
    let mut client = bus.client().await;
    let sentinel = publish_one(&mut client, event("orders.created", b"sentinel")).await;
    for stream in &mut streams {
        assert_eq!(next_event(stream).await.sequence, sentinel);
    }
}

#[tokio::test]
async fn wildcards_route_end_to_end() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    // The last two events close every case: each pattern matches at least one of them, so
    // reading exactly the expected list shows nothing else was delivered before them.
    let cases: [(&str, &[&str]); 6] = [
        ("a.*", &["a.b", "a.c", "a.b"]),
        ("a.>", &["a.b", "a.c", "a.b.c", "a.b"]),
        ("a.b", &["a.b", "a.b"]),
        ("*.b", &["a.b", "x.b", "a.b"]),
        ("*.*.*", &["a.b.c", "x.y.z", "end.of.test"]),
        (
            ">",
            &[
                "a",
                "a.b",
                "a.c",
                "a.b.c",
                "x.b",
                "x.y.z",
                "a.b",
                "end.of.test",
            ],
        ),
    ];
    let mut streams = Vec::new();
    for (pattern, _) in &cases {
        streams.push(subscribe(&mut client, request(pattern)).await.1);
    }
    for topic in [
        "a",
        "a.b",
        "a.c",
        "a.b.c",
        "x.b",
        "x.y.z",
        "a.b",
        "end.of.test",
    ] {
        publish_one(&mut client, event(topic, topic.as_bytes())).await;
    }
    for ((pattern, expected), stream) in cases.iter().zip(&mut streams) {
        let received = events(stream, expected.len()).await;
        let topics: Vec<_> = received.iter().map(|e| e.topic.as_str()).collect();
        assert_eq!(topics, *expected, "subscriber to {pattern}");
    }
}

#[tokio::test]
async fn sequences_are_global_across_topics() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let (_, mut all) = subscribe(&mut client, request(">")).await;
    let mut published = Vec::new();
    for topic in ["one", "two", "one", "three.x"] {
        published.push(publish_one(&mut client, event(topic, b"")).await);
    }
    assert_eq!(published, vec![1, 2, 3, 4]);
    assert_eq!(sequences(&events(&mut all, 4).await), vec![1, 2, 3, 4]);
}

#[tokio::test]
async fn the_bus_fills_in_id_type_time_and_sequence() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let (_, mut stream) = subscribe(&mut client, request("user.created")).await;
    let given = pb::Event {
        id: "given-id".into(),
        r#type: "user.created.v2".into(),
        data_content_type: "application/json".into(),
        attributes: [("traceparent".to_owned(), "00-abc-def-01".to_owned())].into(),
        correlation_id: "corr".into(),
        causation_id: "cause".into(),
        sequence: 999,
        ..event("user.created", b"{}")
    };
    publish(
        &mut client,
        vec![event("user.created", b"bare"), given.clone()],
    )
    .await;
    let bare = next_event(&mut stream).await;
    assert!(uuid_like(&bare.id), "generated id {:?}", bare.id);
    assert_eq!(bare.r#type, "user.created", "type defaults to the topic");
    assert_eq!(bare.sequence, 1);
    assert!(bare.publish_time.is_some());
    assert_eq!(
        bare.time, bare.publish_time,
        "time defaults to the publish time"
    );

    let full = next_event(&mut stream).await;
    assert_eq!(full.sequence, 2, "the published sequence is ignored");
    assert_eq!(full.id, given.id);
    assert_eq!(full.r#type, given.r#type);
    assert_eq!(full.data_content_type, given.data_content_type);
    assert_eq!(full.attributes, given.attributes);
    assert_eq!(full.correlation_id, given.correlation_id);
    assert_eq!(full.causation_id, given.causation_id);
    assert_eq!(full.data, given.data);
    assert_eq!(full.source, "test");
}

fn uuid_like(id: &str) -> bool {
    id.len() == 36 && id.chars().filter(|c| *c == '-').count() == 4
}

#[tokio::test]
async fn publish_stream_answers_many_batches_in_flight_by_request_id() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let (_, mut subscriber) = subscribe(&mut client, request("stream.>")).await;

    let (requests, outbound) = tokio::sync::mpsc::channel(256);
    let mut responses = client
        .publish_stream(ReceiverStream::new(outbound))
        .await
        .unwrap()
        .into_inner();
    const BATCHES: u64 = 100;
    const BAD: u64 = 42;
    // Send every batch before reading any answer: they are all in flight at once.
    for request_id in 1..=BATCHES {
        let mut events = vec![
            event("stream.a", &request_id.to_be_bytes()),
            event("stream.b", &request_id.to_be_bytes()),
        ];
        if request_id == BAD {
            events[1].topic = "not a topic".into();
        }
        requests
            .send(pb::PublishStreamRequest { request_id, events })
            .await
            .unwrap();
    }
    let mut answered = HashSet::new();
    let mut published = Vec::new();
    for _ in 1..=BATCHES {
        let response = tokio::time::timeout(WAIT, responses.message())
            .await
            .expect("an answer in time")
            .expect("the stream goes on")
            .expect("an answer per batch");
        assert!(answered.insert(response.request_id), "answered twice");
        match response.result.expect("a result") {
            StreamResult::Published(batch) => {
                assert_ne!(response.request_id, BAD);
                assert_eq!(batch.sequences.len(), 2);
                published.extend(batch.sequences);
            }
            StreamResult::Error(error) => {
                assert_eq!(
                    response.request_id, BAD,
                    "only the bad batch fails: {error:?}"
                );
                assert_eq!(error.code, tonic::Code::InvalidArgument as i32);
                assert!(error.message.contains("events[1].topic"), "{error:?}");
            }
        }
    }
    assert_eq!(answered, (1..=BATCHES).collect());

    // The stream is still open after the bad batch.
    requests
        .send(pb::PublishStreamRequest {
            request_id: 1000,
            events: vec![event("stream.last", b"")],
        })
        .await
        .unwrap();
    let last = responses.message().await.unwrap().unwrap();
    assert_eq!(last.request_id, 1000);
    let Some(StreamResult::Published(batch)) = last.result else {
        panic!("expected the last batch published, got {last:?}");
    };
    published.extend(batch.sequences);

    // Nothing of the bad batch reached the subscriber; everything else did, once.
    let expected = (1..=(BATCHES - 1) * 2 + 1).collect::<Vec<u64>>();
    published.sort_unstable();
    assert_eq!(published, expected);
    let received = events(&mut subscriber, expected.len()).await;
    assert_eq!(sequences(&received), expected);
    assert!(received.iter().all(|e| e.data[..] != BAD.to_be_bytes()[..]));
    drop(requests);
    assert!(
        responses.message().await.unwrap().is_none(),
        "ends when the client does"
    );
}

#[tokio::test]
async fn a_publish_right_after_the_confirmation_is_never_missed() {
    let bus = TestBus::start().await;
    // Subscribing and publishing on different connections, so nothing orders them but the bus.
    let mut subscriber = bus.client().await;
    let mut publisher = bus.client().await;
    for round in 0..200 {
        let topic = format!("race.r{round}");
        let pattern = if round % 2 == 0 {
            topic.clone()
        } else {
            "race.*".to_owned()
        };
        let (_, mut stream) = subscribe(&mut subscriber, request(&pattern)).await;
        let sequence = publish_one(&mut publisher, event(&topic, b"now")).await;
        let received = next_event(&mut stream).await;
        assert_eq!(received.sequence, sequence, "round {round}");
    }
}
