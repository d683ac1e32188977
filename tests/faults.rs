//! Faults found by replaying other brokers' bug reports (NATS, JetStream, Pulsar, EventStore,
//! tonic and protobuf users) against the bus. Each test is one member of a class of fault; the
//! siblings sit next to it. The suite runs on both stores (`EVENTBUS_TEST_STORAGE=file`).
//!
//! 1. a start position is honoured on every path (live, replay, groups, log changes);
//! 2. anything with a time-to-live is judged by the clock when it is read;
//! 3. and 4. every put-back path applies the delivery limit and keeps sequence order;
//! 5. what the bus accepts it can deliver in every form it sends it;
//! 6. out-of-range protobuf Durations and Timestamps never reach arithmetic;
//! 7. a destination the client chooses for the bus's own publishes is validated as a publish.
//!
//! And, from the reliability campaign, stray events in a query's inbox.

mod common;
mod support;

use std::time::{Duration, Instant, SystemTime};

use common::{event, eventually, TestBus};
use eventbus::config::BusConfig;
use eventbus::pb;
use eventbus::pb::subscribe_request::Start;
use eventbus::pb::subscribe_response::Message;
use support::*;
use tonic::Code;

/// The next event of a MANUAL-ack stream and its delivery attempt (skipping markers).
async fn delivery(stream: &mut Stream) -> (pb::Event, u32) {
    loop {
        let message = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("no delivery in time")
            .expect("stream failed")
            .expect("stream ended");
        if let Some(Message::Event(event)) = message.message {
            return (event, message.delivery_attempt);
        }
    }
}

/// Asserts nothing but markers arrives on `stream` for `window` (a bounded negative check,
/// used only where a positive event follows to prove the stream was live).
async fn no_event_within(stream: &mut Stream, window: Duration) {
    let deadline = tokio::time::Instant::now() + window;
    loop {
        match tokio::time::timeout_at(deadline, stream.message()).await {
            Err(_) => return,
            Ok(Ok(Some(pb::SubscribeResponse {
                message: Some(Message::Event(event)),
                ..
            }))) => panic!("unexpected event {event:?}"),
            Ok(Ok(Some(_))) => continue,
            Ok(other) => panic!("stream ended: {other:?}"),
        }
    }
}

fn ack(group: &str, sequences: Vec<u64>) -> pb::AckRequest {
    pb::AckRequest {
        group: group.into(),
        sequences,
    }
}

fn nack(group: &str, sequences: Vec<u64>, after: Option<prost_types::Duration>) -> pb::NackRequest {
    pb::NackRequest {
        group: group.into(),
        sequences,
        redeliver_after: after,
    }
}

// ---- 1. start positions -------------------------------------------------------------------

#[tokio::test]
async fn after_sequence_ahead_of_the_head_waits_for_the_log_on_the_live_path() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    publish(&mut client, vec![event("r.a", b"1"), event("r.a", b"2")]).await;
    let (subscribed, mut stream) =
        subscribe(&mut client, request_from("r.>", Start::AfterSequence(4))).await;
    assert_eq!(subscribed.head_sequence, 2);
    assert!(!subscribed.start_truncated);
    assert_eq!(caught_up(&mut stream).await, 2);
    for i in 3..=6u8 {
        publish_one(&mut client, event("r.a", &[i])).await;
    }
    // Only events with a sequence greater than 4: the proto's rule, the same as a group's.
    assert_eq!(sequences(&events(&mut stream, 2).await), vec![5, 6]);
    publish_one(&mut client, event("r.a", b"7")).await;
    assert_eq!(next_event(&mut stream).await.sequence, 7);
}

#[tokio::test]
async fn after_sequence_ahead_of_the_head_is_the_same_for_a_manual_group() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    publish(&mut client, vec![event("r.a", b"1"), event("r.a", b"2")]).await;
    let (subscribed, mut stream) = subscribe(
        &mut client,
        pb::SubscribeRequest {
            start: Some(Start::AfterSequence(4)),
            ..manual("r.>", "ahead")
        },
    )
    .await;
    assert_eq!(subscribed.group_cursor, 4);
    for i in 3..=6u8 {
        publish_one(&mut client, event("r.a", &[i])).await;
    }
    assert_eq!(delivery(&mut stream).await.0.sequence, 5);
    assert_eq!(delivery(&mut stream).await.0.sequence, 6);
}

/// Publishes `r.a` events until one is published at or after `time`; returns the sequences
/// published before it and its own.
async fn publish_until(client: &mut Client, time: SystemTime) -> (Vec<u64>, u64) {
    let mut before = vec![publish_one(client, event("r.a", b"early")).await];
    loop {
        let sent_at = SystemTime::now();
        let sequence = publish_one(client, event("r.a", b"tick")).await;
        // The bus stamps the publish time after receiving the request.
        if sent_at >= time {
            return (before, sequence);
        }
        before.push(sequence);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn from_time_in_the_future_delivers_nothing_published_before_it() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let from = SystemTime::now() + Duration::from_millis(800);
    let (_, mut live) = subscribe(
        &mut client,
        request_from("r.>", Start::FromTime(timestamp(from))),
    )
    .await;
    let (_, mut group) = subscribe(
        &mut client,
        pb::SubscribeRequest {
            start: Some(Start::FromTime(timestamp(from))),
            ..manual("r.>", "from-time")
        },
    )
    .await;
    let (before, _) = publish_until(&mut client, from).await;
    assert!(!before.is_empty());
    // Which event is the first published at or after `from`, by the bus's own stamps.
    let (_, mut all) = subscribe(&mut client, request_from("r.>", Start::Earliest(()))).await;
    let mut first = None;
    while first.is_none() {
        let event = next_event(&mut all).await;
        let at = SystemTime::try_from(event.publish_time.unwrap()).unwrap();
        if at >= from {
            first = Some(event.sequence);
        }
    }
    let first = first.unwrap();
    assert!(first > 1, "the first event was published before from_time");
    let mut delivered = None;
    while delivered.is_none() {
        match next(&mut live).await {
            Message::Event(event) => delivered = Some(event.sequence),
            Message::CaughtUp(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(delivered, Some(first));
    assert_eq!(delivery(&mut group).await.0.sequence, first);
}

#[tokio::test]
async fn a_position_in_another_log_starts_at_the_oldest_event_of_this_one() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    publish(&mut client, vec![event("r.a", b"1"), event("r.a", b"2")]).await;
    let (subscribed, mut stream) = subscribe(
        &mut client,
        pb::SubscribeRequest {
            log_id: "a-log-that-is-gone".into(),
            ..request_from("r.>", Start::AfterSequence(1000))
        },
    )
    .await;
    assert!(subscribed.log_changed);
    assert_eq!(sequences(&events(&mut stream, 2).await), vec![1, 2]);
    assert_eq!(caught_up(&mut stream).await, 2);

    // Naming this bus's own log keeps the position as asked.
    let (subscribed, mut same) = subscribe(
        &mut client,
        pb::SubscribeRequest {
            log_id: subscribed.log_id.clone(),
            ..request_from("r.>", Start::AfterSequence(2))
        },
    )
    .await;
    assert!(!subscribed.log_changed);
    assert_eq!(caught_up(&mut same).await, 2);
    publish_one(&mut client, event("r.a", b"3")).await;
    assert_eq!(next_event(&mut same).await.sequence, 3);
}

// ---- 2. expiry judged by the clock ----------------------------------------------------------

#[tokio::test]
async fn a_dedupe_window_that_passed_has_passed_without_any_other_write() {
    let window = Duration::from_millis(400);
    let bus = TestBus::start_with(BusConfig {
        dedupe_window: window,
        ..BusConfig::default()
    })
    .await;
    let mut client = bus.client().await;
    let order = || pb::Event {
        id: "order-1".into(),
        source: "shop".into(),
        ..event("orders.placed", b"1")
    };
    let started = Instant::now();
    let first = publish_one(&mut client, order()).await;
    // Retries of the same id (duplicates store nothing) until the window lets one through.
    let (second, elapsed) = eventually("the dedupe window to pass", WAIT, || {
        let mut client = client.clone();
        async move {
            let response = client
                .publish(pb::PublishRequest {
                    events: vec![order()],
                })
                .await
                .unwrap()
                .into_inner();
            (!response.duplicates[0]).then(|| (response.sequences[0], started.elapsed()))
        }
    })
    .await;
    assert!(second > first);
    assert!(elapsed >= window, "stored again after {elapsed:?}");
}

/// The events a bus says it holds, over all topics.
async fn events_held(bus: &TestBus) -> u64 {
    bus.admin()
        .await
        .list_topics(pb::ListTopicsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .topics
        .iter()
        .map(|t| t.events_held)
        .sum()
}

#[tokio::test]
async fn retention_by_age_holds_nothing_past_its_age_and_frees_disk_without_writes() {
    use eventbus::config::{ServerConfig, StorageConfig};
    let age = Duration::from_millis(300);
    let dir = tempfile::tempdir().unwrap();
    let file_bus = TestBus::start_server(ServerConfig {
        bus: BusConfig {
            retention_max_age: Some(age),
            ..BusConfig::default()
        },
        storage: StorageConfig::File {
            data_dir: dir.path().to_owned(),
            fsync: eventbus::store::FsyncPolicy::Never,
            segment_bytes: 4096,
        },
        shutdown_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    })
    .await;
    let memory_bus = TestBus::start_in_memory(BusConfig {
        retention_max_age: Some(age),
        ..BusConfig::default()
    })
    .await;
    let segments = || {
        std::fs::read_dir(dir.path().join("log"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension() == Some("log".as_ref()))
            .count()
    };
    for bus in [&file_bus, &memory_bus] {
        let mut client = bus.client().await;
        for _ in 0..10 {
            let batch = (0..4).map(|_| event("aged.a", &[1u8; 1000])).collect();
            publish(&mut client, batch).await;
        }
        assert_eq!(events_held(bus).await, 40);
    }
    assert!(segments() > 3, "{} segments", segments());
    // Nothing is written from here on.
    for bus in [&file_bus, &memory_bus] {
        eventually("aged events to be gone", WAIT, || async {
            (events_held(bus).await == 0).then_some(())
        })
        .await;
        let mut client = bus.client().await;
        let (subscribed, mut replay) =
            subscribe(&mut client, request_from("aged.>", Start::Earliest(()))).await;
        assert_eq!(subscribed.oldest_sequence, 0);
        assert_eq!(caught_up(&mut replay).await, 40);
    }
    eventually("expired segments to be deleted", WAIT, || async {
        (segments() == 1).then_some(())
    })
    .await;
}

// ---- 3. and 4. put-back paths ---------------------------------------------------------------

#[tokio::test]
async fn an_immediate_nack_counts_against_max_deliveries() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let (_, mut letters) = subscribe(&mut client, request("_bus.dlq.>")).await;
    let (_, mut stream) = subscribe(
        &mut client,
        pb::SubscribeRequest {
            max_deliveries: 3,
            ..manual("pay.>", "nacker")
        },
    )
    .await;
    let sequence = publish_one(&mut client, event("pay.charge", b"poison")).await;
    for attempt in 1..=3 {
        let (event, got) = delivery(&mut stream).await;
        assert_eq!((event.sequence, got), (sequence, attempt));
        client
            .nack(nack("nacker", vec![sequence], None))
            .await
            .unwrap();
    }
    let letter = next_event(&mut letters).await;
    assert_eq!(letter.attributes["dlq_attempts"], "3");
    assert_eq!(letter.attributes["dlq_group"], "nacker");
    // No fourth delivery: the next one is a new event.
    let after = publish_one(&mut client, event("pay.charge", b"ok")).await;
    assert_eq!(delivery(&mut stream).await.0.sequence, after);
}

/// Delivers 1, 2, 3 to a member and returns their sequences.
async fn three_in_flight(client: &mut Client, stream: &mut Stream) -> Vec<u64> {
    let sent = publish(
        client,
        vec![event("o.a", b"1"), event("o.a", b"2"), event("o.a", b"3")],
    )
    .await;
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(delivery(stream).await.0.sequence);
    }
    assert_eq!(got, sent);
    sent
}

async fn three_again(stream: &mut Stream) -> Vec<(u64, u32)> {
    let mut got = Vec::new();
    for _ in 0..3 {
        let (event, attempt) = delivery(stream).await;
        got.push((event.sequence, attempt));
    }
    got
}

#[tokio::test]
async fn redeliveries_keep_sequence_order_on_every_path() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let again = |sent: &[u64]| sent.iter().map(|s| (*s, 2)).collect::<Vec<_>>();

    // After the ack deadline.
    let (_, mut stream) = subscribe(
        &mut client,
        pb::SubscribeRequest {
            ack_deadline: millis(200),
            ..manual("o.a", "deadline")
        },
    )
    .await;
    let sent = three_in_flight(&mut client, &mut stream).await;
    assert_eq!(three_again(&mut stream).await, again(&sent));
    drop(stream);

    // After an immediate nack, and a delayed one.
    for (group, delay) in [("nack-now", None), ("nack-later", millis(100))] {
        let (_, mut stream) = subscribe(&mut client, manual("o.a", group)).await;
        let sent = three_in_flight(&mut client, &mut stream).await;
        client.nack(nack(group, sent.clone(), delay)).await.unwrap();
        assert_eq!(three_again(&mut stream).await, again(&sent), "{group}");
    }

    // When the member holding them leaves.
    let (_, leaving) = subscribe(&mut client, manual("o.a", "leave")).await;
    let mut leaving = leaving;
    let sent = three_in_flight(&mut client, &mut leaving).await;
    let (_, mut stays) = subscribe(&mut client, manual("o.a", "leave")).await;
    drop(leaving);
    assert_eq!(three_again(&mut stays).await, again(&sent));
}

// ---- 5. size limits on what goes out ---------------------------------------------------------

/// An event whose encoding is exactly `size` bytes (around 1 MiB), with `id`, `type` and
/// `time` left empty: attributes of 4 KiB fill what 1 MiB of data cannot, then the data is cut to
/// the exact length (its length prefix stays 3 bytes from 16 KiB to 2 MiB).
fn event_of_encoded_size(topic: &str, size: usize) -> pb::Event {
    use prost::Message as _;
    const DATA_LIMIT: usize = 1024 * 1024;
    let mut event = event(topic, b"");
    let mut index = 0;
    while event.encoded_len() + DATA_LIMIT + 4 < size {
        event
            .attributes
            .insert(format!("k{index:02}"), "v".repeat(4096));
        index += 1;
    }
    let data_len = size - event.encoded_len() - 4;
    assert!((16 * 1024..=DATA_LIMIT).contains(&data_len));
    event.data = vec![7u8; data_len].into();
    assert_eq!(event.encoded_len(), size);
    event
}

#[tokio::test]
async fn what_the_bus_accepts_it_can_deliver_at_the_exact_limits() {
    let max_message_bytes = 1_114_112; // the smallest the README allows for 1 MiB of data
    let bus = TestBus::start_with(BusConfig {
        max_message_bytes,
        ..BusConfig::default()
    })
    .await;
    let mut client = bus.client().await;
    let limit = max_message_bytes - eventbus::service::convert::DELIVERY_OVERHEAD_BYTES;

    // One byte over: refused at publish, naming the event and both limits.
    let status = client
        .publish(pb::PublishRequest {
            events: vec![event_of_encoded_size("big.one", limit + 1)],
        })
        .await
        .unwrap_err();
    assert_status(
        &status,
        Code::InvalidArgument,
        &["events[0]", &format!("{}", limit + 1), "1114112"],
    );
    assert_eq!(reason(&status).as_deref(), Some("event-too-large"));

    // At the limit: accepted, and delivered live, on replay, as a dead letter and as a reply.
    let (_, mut live) = subscribe(&mut client, request("big.>")).await;
    let (_, mut letters) = subscribe(&mut client, request("_bus.dlq.>")).await;
    let (_, mut group) = subscribe(
        &mut client,
        pb::SubscribeRequest {
            max_deliveries: 1,
            ..manual("big.>", "big")
        },
    )
    .await;
    let sequence = publish_one(&mut client, event_of_encoded_size("big.one", limit)).await;
    assert_eq!(next_event(&mut live).await.sequence, sequence);
    let (_, mut replay) = subscribe(&mut client, request_from("big.>", Start::Earliest(()))).await;
    assert_eq!(next_event(&mut replay).await.sequence, sequence);
    let (delivered, _) = delivery(&mut group).await;
    client
        .nack(nack("big", vec![delivered.sequence], None))
        .await
        .unwrap();
    let letter = next_event(&mut letters).await;
    assert_eq!(
        letter.attributes["dlq_original_sequence"],
        sequence.to_string()
    );

    // A reply at the limit, through Query.
    let (_, mut queries) = subscribe(&mut client, request("ask.big")).await;
    let mut responder = client.clone();
    let answer = tokio::spawn(async move {
        let query = next_event(&mut queries).await;
        // The correlation id takes its share of the limit.
        let mut reply =
            event_of_encoded_size(&query.reply_to, limit - 2 - query.correlation_id.len());
        reply.correlation_id = query.correlation_id.clone();
        use prost::Message as _;
        assert_eq!(reply.encoded_len(), limit);
        publish_one(&mut responder, reply).await;
    });
    let reply = client
        .query(pb::QueryRequest {
            event: Some(event("ask.big", b"?")),
            timeout: millis(20_000),
        })
        .await
        .expect("the query gets its full-size reply")
        .into_inner();
    use prost::Message as _;
    assert!(reply.reply.unwrap().encoded_len() >= limit);
    answer.await.unwrap();
}

// ---- 6. out-of-range protobuf values ---------------------------------------------------------

const MAX_DURATION_SECONDS: i64 = 315_576_000_000;

#[tokio::test]
async fn out_of_range_durations_and_timestamps_are_refused_naming_the_field() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let huge = Some(prost_types::Duration {
        seconds: i64::MAX,
        nanos: 0,
    });
    let status = client
        .subscribe(pb::SubscribeRequest {
            ack_deadline: huge,
            ..manual("x.>", "huge")
        })
        .await
        .map(|_| ())
        .unwrap_err();
    assert_status(
        &status,
        Code::InvalidArgument,
        &["ack_deadline", "google.protobuf.Duration"],
    );
    let mixed_signs = Some(prost_types::Duration {
        seconds: 1,
        nanos: -1,
    });
    let status = client
        .query(pb::QueryRequest {
            event: Some(event("x.q", b"")),
            timeout: mixed_signs,
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["timeout"]);
    let past_9999 = prost_types::Timestamp {
        seconds: 253_402_300_800,
        nanos: 0,
    };
    let status = client
        .subscribe(request_from("x.>", Start::FromTime(past_9999)))
        .await
        .map(|_| ())
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["from_time"]);
    let status = client
        .publish(pb::PublishRequest {
            events: vec![pb::Event {
                time: Some(past_9999),
                ..event("x.a", b"")
            }],
        })
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["events[0].time"]);
    let (_, mut stream) = subscribe(&mut client, manual("x.>", "nacks")).await;
    let sequence = publish_one(&mut client, event("x.a", b"")).await;
    delivery(&mut stream).await;
    let status = client
        .nack(nack("nacks", vec![sequence], huge))
        .await
        .unwrap_err();
    assert_status(&status, Code::InvalidArgument, &["redeliver_after"]);
    assert_eq!(reason(&status).as_deref(), Some("invalid-argument"));
}

#[tokio::test]
async fn the_largest_valid_durations_never_stop_a_group() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let largest = Some(prost_types::Duration {
        seconds: MAX_DURATION_SECONDS,
        nanos: 999_999_999,
    });
    // Two members of one group: one with a 10,000-year ack deadline, one ordinary.
    let (_, mut patient) = subscribe(
        &mut client,
        pb::SubscribeRequest {
            ack_deadline: largest,
            max_in_flight: 1,
            ..manual("y.>", "shared")
        },
    )
    .await;
    let first = publish_one(&mut client, event("y.a", b"1")).await;
    assert_eq!(delivery(&mut patient).await.0.sequence, first);
    let (_, mut ordinary) = subscribe(&mut client, manual("y.>", "shared")).await;
    // A 10,000-year nack delay on another event, then the group goes on.
    let second = publish_one(&mut client, event("y.a", b"2")).await;
    assert_eq!(delivery(&mut ordinary).await.0.sequence, second);
    let requeued = client
        .nack(nack("shared", vec![second], largest))
        .await
        .unwrap()
        .into_inner()
        .requeued;
    assert_eq!(requeued, 1);
    let third = publish_one(&mut client, event("y.a", b"3")).await;
    assert_eq!(delivery(&mut ordinary).await.0.sequence, third);
    client.ack(ack("shared", vec![first, third])).await.unwrap();
}

// ---- 7. destinations the client chooses ------------------------------------------------------

#[tokio::test]
async fn dead_letter_topics_are_validated_as_a_publish_and_never_loop() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    for (topic, parts) in [
        (
            "pay.retry",
            &["dead_letter_topic", "pay.retry", "pay.>"][..],
        ),
        ("_bus.anything", &["dead_letter_topic", "_bus."][..]),
        ("_bus.inbox.someone", &["dead_letter_topic", "inbox"][..]),
    ] {
        let status = client
            .subscribe(pb::SubscribeRequest {
                dead_letter_topic: topic.into(),
                ..manual("pay.>", "payments")
            })
            .await
            .map(|_| ())
            .unwrap_err();
        assert_status(&status, Code::InvalidArgument, parts);
    }

    // A group on `>` with the default dead-letter topic, which its pattern matches: the
    // dead letter is published once and never read back by the group.
    let (_, mut letters) = subscribe(&mut client, request("_bus.dlq.>")).await;
    let (_, mut everything) = subscribe(
        &mut client,
        pb::SubscribeRequest {
            max_deliveries: 1,
            ..manual(">", "audit")
        },
    )
    .await;
    let poison = publish_one(&mut client, event("pay.charge", b"poison")).await;
    assert_eq!(delivery(&mut everything).await.0.sequence, poison);
    client
        .nack(nack("audit", vec![poison], None))
        .await
        .unwrap();
    let letter = next_event(&mut letters).await;
    assert_eq!(letter.id.matches(".dlq.").count(), 1);
    let next = publish_one(&mut client, event("pay.charge", b"fine")).await;
    assert_eq!(delivery(&mut everything).await.0.sequence, next);
    no_event_within(&mut letters, Duration::from_millis(300)).await;
}

// ---- strays in a query's inbox -----------------------------------------------------------------

#[tokio::test]
async fn stray_events_in_an_inbox_neither_crowd_out_the_reply_nor_end_the_query() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let (_, mut queries) = subscribe(&mut client, request("ask.strays")).await;
    let mut responder = client.clone();
    let answer = tokio::spawn(async move {
        let query = next_event(&mut queries).await;
        let strays: Vec<pb::Event> = (0..40)
            .map(|i| pb::Event {
                correlation_id: format!("not-yours-{i}"),
                ..event(&query.reply_to, b"stray")
            })
            .collect();
        publish(&mut responder, strays).await;
        publish_one(
            &mut responder,
            pb::Event {
                correlation_id: query.correlation_id.clone(),
                ..event(&query.reply_to, b"the answer")
            },
        )
        .await;
    });
    let reply = client
        .query(pb::QueryRequest {
            event: Some(event("ask.strays", b"?")),
            timeout: millis(10_000),
        })
        .await
        .expect("the query gets its reply")
        .into_inner()
        .reply
        .unwrap();
    assert_eq!(&reply.data[..], b"the answer");
    answer.await.unwrap();
}
