//! Delivery guarantees: idempotent publish, MANUAL-ack groups (ack, redelivery after the ack
//! deadline, nack with a delay, dead letters, flow control, cursors kept across restarts).

mod common;
mod support;

use std::time::Duration;

use common::{event, eventually, TestBus};
use eventbus::config::{ServerConfig, StorageConfig};
use eventbus::pb;
use eventbus::pb::event_bus_service_client::EventBusServiceClient;
use eventbus::pb::subscribe_response::Message;
use eventbus::store::FsyncPolicy;
use support::{manual, millis};
use tonic::transport::Channel;
use tonic::{Code, Streaming};

type Client = EventBusServiceClient<Channel>;

const WAIT: Duration = Duration::from_secs(30);

async fn open(
    client: &mut Client,
    request: pb::SubscribeRequest,
) -> (pb::Subscribed, Streaming<pb::SubscribeResponse>) {
    let mut stream = client.subscribe(request).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let Some(Message::Subscribed(subscribed)) = first.message else {
        panic!("expected subscribed, got {first:?}");
    };
    (subscribed, stream)
}

/// The next event and its delivery attempt.
async fn next(stream: &mut Streaming<pb::SubscribeResponse>) -> (pb::Event, u32) {
    loop {
        let message = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("no delivery in time")
            .unwrap()
            .expect("stream ended");
        if let Some(Message::Event(event)) = message.message {
            return (event, message.delivery_attempt);
        }
    }
}

/// Asserts nothing is delivered for `quiet` (only for "must not happen before" checks, where the
/// bus is required to wait at least that long).
async fn nothing_for(stream: &mut Streaming<pb::SubscribeResponse>, quiet: Duration) {
    if let Ok(message) = tokio::time::timeout(quiet, stream.message()).await {
        panic!("expected no delivery yet, got {message:?}");
    }
}

async fn publish(client: &mut Client, topic: &str, data: &str) -> u64 {
    client
        .publish(pb::PublishRequest {
            events: vec![event(topic, data.as_bytes())],
        })
        .await
        .unwrap()
        .into_inner()
        .sequences[0]
}

async fn ack(client: &mut Client, group: &str, sequences: Vec<u64>) -> pb::AckResponse {
    client
        .ack(pb::AckRequest {
            group: group.into(),
            sequences,
        })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test]
async fn a_retried_publish_is_stored_once() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let (_, mut stream) = open(
        &mut client,
        pb::SubscribeRequest {
            topic: "orders.>".into(),
            ..Default::default()
        },
    )
    .await;
    let with_id = |id: &str, source: &str| pb::Event {
        id: id.into(),
        source: source.into(),
        ..event("orders.created", id.as_bytes())
    };
    let first = client
        .publish(pb::PublishRequest {
            events: vec![with_id("o-1", "shop"), with_id("o-2", "shop")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.duplicates, vec![false, false]);
    // The retry of the same batch, plus a twin within the batch and the same id from another
    // source (a different event).
    let retry = client
        .publish(pb::PublishRequest {
            events: vec![
                with_id("o-1", "shop"),
                with_id("o-2", "shop"),
                with_id("o-3", "shop"),
                with_id("o-3", "shop"),
                with_id("o-1", "warehouse"),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(retry.duplicates, vec![true, true, false, true, false]);
    assert_eq!(&retry.sequences[..2], &first.sequences[..]);
    assert_eq!(retry.sequences[2], retry.sequences[3]);
    let mut received = Vec::new();
    for _ in 0..4 {
        let (event, _) = next(&mut stream).await;
        received.push((event.source, event.id));
    }
    let expected: Vec<(String, String)> = [
        ("shop", "o-1"),
        ("shop", "o-2"),
        ("shop", "o-3"),
        ("warehouse", "o-1"),
    ]
    .iter()
    .map(|(s, i)| (s.to_string(), i.to_string()))
    .collect();
    assert_eq!(received, expected);
    nothing_for(&mut stream, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_retried_publish_stream_batch_is_marked_duplicate() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let batch = || pb::PublishStreamRequest {
        request_id: 1,
        events: vec![pb::Event {
            id: "fixed".into(),
            ..event("a", b"x")
        }],
    };
    let requests = tokio_stream::iter(vec![
        batch(),
        pb::PublishStreamRequest {
            request_id: 2,
            ..batch()
        },
    ]);
    let mut responses = client.publish_stream(requests).await.unwrap().into_inner();
    let mut flags = Vec::new();
    while let Some(response) = responses.message().await.unwrap() {
        let Some(pb::publish_stream_response::Result::Published(published)) = response.result
        else {
            panic!("refused: {response:?}");
        };
        flags.push((response.request_id, published.duplicates[0]));
    }
    assert_eq!(flags, vec![(1, false), (2, true)]);
}

#[tokio::test]
async fn manual_ack_redelivers_what_is_not_acked_in_time() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let (subscribed, mut stream) = open(
        &mut client,
        pb::SubscribeRequest {
            ack_deadline: millis(300),
            ..manual("jobs.*", "workers")
        },
    )
    .await;
    assert_eq!(subscribed.group, "workers");
    let s1 = publish(&mut client, "jobs.a", "1").await;
    let s2 = publish(&mut client, "jobs.b", "2").await;
    let s3 = publish(&mut client, "jobs.c", "3").await;
    for expected in [s1, s2, s3] {
        let (event, attempt) = next(&mut stream).await;
        assert_eq!((event.sequence, attempt), (expected, 1));
    }
    let acked = ack(&mut client, "workers", vec![s1, s3, 999_999]).await;
    assert_eq!(acked.acknowledged, 2);
    assert_eq!(
        acked.group_cursor, s1,
        "s2 is still out, so the cursor stops before it"
    );
    // s2 was not acked: after the deadline it comes again, as the second attempt.
    let (event, attempt) = next(&mut stream).await;
    assert_eq!((event.sequence, attempt), (s2, 2));
    let acked = ack(&mut client, "workers", vec![s2]).await;
    assert_eq!((acked.acknowledged, acked.group_cursor), (1, s3));
}

#[tokio::test]
async fn nack_with_a_delay_redelivers_after_it() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let (_, mut stream) = open(&mut client, manual("mail.send", "mailer")).await;
    let sequence = publish(&mut client, "mail.send", "hello").await;
    let (event, attempt) = next(&mut stream).await;
    assert_eq!((event.sequence, attempt), (sequence, 1));
    let nacked = client
        .nack(pb::NackRequest {
            group: "mailer".into(),
            sequences: vec![sequence],
            redeliver_after: millis(1000),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nacked.requeued, 1);
    nothing_for(&mut stream, Duration::from_millis(400)).await;
    let (event, attempt) = next(&mut stream).await;
    assert_eq!((event.sequence, attempt), (sequence, 2));
}

#[tokio::test]
async fn an_event_moves_to_the_dead_letter_topic_after_its_last_delivery() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let (_, mut letters) = open(
        &mut client,
        pb::SubscribeRequest {
            topic: "_bus.dlq.>".into(),
            ..Default::default()
        },
    )
    .await;
    let (_, mut stream) = open(
        &mut client,
        pb::SubscribeRequest {
            ack_deadline: millis(100),
            max_deliveries: 2,
            ..manual("payments.charge", "payments")
        },
    )
    .await;
    let sequence = publish(&mut client, "payments.charge", "42").await;
    assert_eq!(next(&mut stream).await.1, 1);
    assert_eq!(next(&mut stream).await.1, 2);
    let (letter, _) = next(&mut letters).await;
    assert_eq!(letter.topic, "_bus.dlq.payments");
    assert_eq!(&letter.data[..], b"42");
    assert_eq!(letter.attributes["dlq_original_topic"], "payments.charge");
    assert_eq!(
        letter.attributes["dlq_original_sequence"],
        sequence.to_string()
    );
    assert_eq!(letter.attributes["dlq_attempts"], "2");
    assert_eq!(letter.attributes["dlq_group"], "payments");
    // Dead-lettered counts as done: the cursor passes it.
    let acked = eventually("the cursor to pass the dead letter", WAIT, || {
        let mut client = client.clone();
        async move {
            let acked = ack(&mut client, "payments", vec![sequence]).await;
            (acked.group_cursor >= sequence).then_some(acked)
        }
    })
    .await;
    assert_eq!(acked.acknowledged, 0);
}

#[tokio::test]
async fn max_in_flight_holds_back_deliveries_until_acks() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let (_, mut stream) = open(
        &mut client,
        pb::SubscribeRequest {
            max_in_flight: 2,
            ..manual("tasks", "runners")
        },
    )
    .await;
    let mut sequences = Vec::new();
    for i in 0..5 {
        sequences.push(publish(&mut client, "tasks", &i.to_string()).await);
    }
    assert_eq!(next(&mut stream).await.0.sequence, sequences[0]);
    assert_eq!(next(&mut stream).await.0.sequence, sequences[1]);
    nothing_for(&mut stream, Duration::from_millis(300)).await;
    ack(&mut client, "runners", vec![sequences[0]]).await;
    assert_eq!(next(&mut stream).await.0.sequence, sequences[2]);
}

#[tokio::test]
async fn a_leaving_member_hands_its_unacked_events_to_the_others() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let (_, mut first) = open(&mut client, manual("work", "crew")).await;
    let sequence = publish(&mut client, "work", "x").await;
    assert_eq!(next(&mut first).await.0.sequence, sequence);
    let (_, mut second) = open(&mut client, manual("work", "crew")).await;
    drop(first);
    let (event, attempt) = next(&mut second).await;
    assert_eq!((event.sequence, attempt), (sequence, 2));
}

#[tokio::test]
async fn a_new_group_starts_where_asked_and_an_existing_one_resumes_from_its_cursor() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let old = publish(&mut client, "log", "before").await;
    let (_, mut from_start) = open(
        &mut client,
        pb::SubscribeRequest {
            start: Some(pb::subscribe_request::Start::Earliest(())),
            ..manual("log", "replayers")
        },
    )
    .await;
    assert_eq!(next(&mut from_start).await.0.sequence, old);
    ack(&mut client, "replayers", vec![old]).await;
    drop(from_start);
    // The group exists: its start position is its cursor, whatever the new member asks.
    let newer = publish(&mut client, "log", "after").await;
    let (subscribed, mut again) = open(
        &mut client,
        pb::SubscribeRequest {
            start: Some(pb::subscribe_request::Start::Earliest(())),
            ..manual("log", "replayers")
        },
    )
    .await;
    assert_eq!(subscribed.group_cursor, old);
    assert_eq!(next(&mut again).await.0.sequence, newer);
    // A latest group does not see the past.
    let (_, mut live) = open(&mut client, manual("log", "live-only")).await;
    nothing_for(&mut live, Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_group_cursor_survives_a_restart_of_the_bus() {
    let data_dir = tempfile::tempdir().unwrap();
    let config = || ServerConfig {
        storage: StorageConfig::File {
            data_dir: data_dir.path().to_owned(),
            fsync: FsyncPolicy::Always,
            segment_bytes: 1024 * 1024,
        },
        ..ServerConfig::default()
    };
    let (acked, unacked) = {
        let bus = TestBus::start_server(config()).await;
        let mut client = bus.client().await;
        let (_, mut stream) = open(
            &mut client,
            pb::SubscribeRequest {
                start: Some(pb::subscribe_request::Start::Earliest(())),
                ..manual("billing.>", "invoicer")
            },
        )
        .await;
        let acked = publish(&mut client, "billing.a", "1").await;
        let unacked = publish(&mut client, "billing.b", "2").await;
        assert_eq!(next(&mut stream).await.0.sequence, acked);
        assert_eq!(next(&mut stream).await.0.sequence, unacked);
        ack(&mut client, "invoicer", vec![acked]).await;
        drop(stream);
        bus.stop(WAIT).await;
        (acked, unacked)
    };
    let bus = TestBus::start_server(config()).await;
    let mut client = bus.client().await;
    let (subscribed, mut stream) = open(&mut client, manual("billing.>", "invoicer")).await;
    assert_eq!(subscribed.group_cursor, acked);
    let (event, _) = next(&mut stream).await;
    assert_eq!(
        event.sequence, unacked,
        "the unacked event comes again; the acked one does not"
    );
    assert!(!subscribed.log_id.is_empty());
}

#[tokio::test]
async fn manual_ack_mistakes_get_clear_errors() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let base = client.clone();
    let refused = |request: pb::SubscribeRequest| {
        let mut client = base.clone();
        async move { client.subscribe(request).await.unwrap_err() }
    };
    let no_group = refused(manual("a", "")).await;
    assert_eq!(no_group.code(), Code::InvalidArgument);
    assert!(
        no_group
            .message()
            .starts_with("group: ack_mode MANUAL needs a consumer group"),
        "{}",
        no_group.message()
    );

    let bad_deadline = refused(pb::SubscribeRequest {
        ack_deadline: Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        }),
        ..manual("a", "g")
    })
    .await;
    assert!(bad_deadline
        .message()
        .starts_with("ack_deadline: must be positive"));

    let bad_mode = refused(pb::SubscribeRequest {
        ack_mode: 7,
        ..manual("a", "g")
    })
    .await;
    assert!(bad_mode
        .message()
        .starts_with("ack_mode: 7 is not an AckMode"));

    let bad_dlq = refused(pb::SubscribeRequest {
        dead_letter_topic: "not valid".into(),
        ..manual("a", "g")
    })
    .await;
    assert!(bad_dlq.message().starts_with("dead_letter_topic:"));

    let _kept = open(&mut client, manual("orders.*", "shipping")).await;
    let other_pattern = refused(manual("orders.>", "shipping")).await;
    assert_eq!(other_pattern.code(), Code::InvalidArgument);
    assert!(other_pattern
        .message()
        .starts_with("topic: MANUAL-ack group \"shipping\" reads pattern orders.*"));

    let unknown = client
        .ack(pb::AckRequest {
            group: "nobody".into(),
            sequences: vec![1],
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(
        unknown.metadata().get("eventbus-error").unwrap(),
        "unknown-group"
    );

    let empty = client
        .ack(pb::AckRequest {
            group: "shipping".into(),
            sequences: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert!(empty.message().starts_with("sequences:"));

    let unnamed = client
        .nack(pb::NackRequest {
            group: String::new(),
            sequences: vec![1],
            redeliver_after: None,
        })
        .await
        .unwrap_err();
    assert!(unnamed.message().starts_with("group:"));

    let negative = client
        .nack(pb::NackRequest {
            group: "shipping".into(),
            sequences: vec![1],
            redeliver_after: Some(prost_types::Duration {
                seconds: -5,
                nanos: 0,
            }),
        })
        .await
        .unwrap_err();
    assert!(negative
        .message()
        .starts_with("redeliver_after: must not be negative"));
}

#[tokio::test]
async fn a_query_finds_a_manual_ack_responder() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let (_, mut stream) = open(&mut client, manual("price.query", "pricing")).await;
    let mut asker = client.clone();
    let asking = tokio::spawn(async move {
        asker
            .query(pb::QueryRequest {
                event: Some(event("price.query", b"sku-1")),
                timeout: millis(20_000),
            })
            .await
    });
    let (query, _) = next(&mut stream).await;
    client
        .publish(pb::PublishRequest {
            events: vec![pb::Event {
                correlation_id: query.correlation_id.clone(),
                ..event(&query.reply_to, b"9.99")
            }],
        })
        .await
        .unwrap();
    ack(&mut client, "pricing", vec![query.sequence]).await;
    let reply = asking.await.unwrap().unwrap().into_inner().reply.unwrap();
    assert_eq!(&reply.data[..], b"9.99");
}

#[tokio::test]
async fn topics_list_what_is_subscribed_by_name_and_counts_manual_members() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let _first = open(&mut client, manual("stock.query", "stock")).await;
    let _second = open(&mut client, manual("stock.query", "stock")).await;
    let _wildcard = open(
        &mut client,
        pb::SubscribeRequest {
            topic: "stock.*".into(),
            ..Default::default()
        },
    )
    .await;
    let topics = bus
        .admin()
        .await
        .list_topics(pb::ListTopicsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .topics;
    // Nothing was published; the topic is listed because services wait on it by name. The
    // wildcard subscription names no topic of its own but counts where it matches.
    assert_eq!(topics.len(), 1, "{topics:?}");
    let stock = &topics[0];
    assert_eq!(stock.name, "stock.query");
    assert_eq!((stock.events_published, stock.last_sequence), (0, 0));
    assert!(stock.last_publish_time.is_none());
    assert_eq!(stock.subscriber_count, 3);
    assert_eq!(stock.groups, vec!["stock".to_string()]);
}
