//! The Rust SDK against a real bus on 127.0.0.1:0, in-process.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestBus;
use eventbus::config::BusConfig;
use eventbus::pb;
use eventbus::sdk::{
    Client, Error, ManualAck, PublisherOptions, Reply, ServeOptions, Start, SubscribeOptions,
    Subscription, SubscriptionItem,
};
use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

async fn client(bus: &TestBus, source: &str) -> Client {
    Client::builder(bus.url())
        .source(source)
        .connect()
        .await
        .unwrap()
}

/// The next item, failing the test after a deadline instead of hanging.
async fn next_item(subscription: &mut Subscription) -> SubscriptionItem {
    tokio::time::timeout(WAIT, subscription.next())
        .await
        .expect("timed out waiting for a subscription item")
        .expect("subscription ended")
        .expect("subscription failed")
}

async fn next_event(subscription: &mut Subscription) -> pb::Event {
    tokio::time::timeout(WAIT, subscription.next_event())
        .await
        .expect("timed out waiting for an event")
        .expect("subscription ended")
        .expect("subscription failed")
}

#[tokio::test]
async fn publish_and_subscribe_keep_order_and_fields() {
    let bus = TestBus::start().await;
    let client = client(&bus, "orders").await;
    let mut subscription = client.subscribe("orders.*").await.unwrap();
    assert_eq!(subscription.subscribed().topic, "orders.*");

    let first = client.publish("orders.created", "one").await.unwrap();
    let second = client
        .event("orders.paid")
        .json(&serde_json::json!({"id": 2}))
        .unwrap()
        .event_type("order.paid")
        .attr("traceparent", "00-1")
        .correlation_id("c2")
        .publish()
        .await
        .unwrap();
    let batch = client
        .publish_batch(vec![
            client.event("orders.shipped").data("three").build(),
            client.event("other.topic").data("not for us").build(),
            client.event("orders.closed").data("four").build(),
        ])
        .await
        .unwrap();
    assert!(first < second && second < batch[0] && batch[0] < batch[1] && batch[1] < batch[2]);

    let got: Vec<pb::Event> = vec![
        next_event(&mut subscription).await,
        next_event(&mut subscription).await,
        next_event(&mut subscription).await,
        next_event(&mut subscription).await,
    ];
    let sequences: Vec<u64> = got.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, vec![first, second, batch[0], batch[2]]);
    assert_eq!(&got[0].data[..], b"one");
    assert_eq!(got[0].source, "orders");
    assert_eq!(got[1].r#type, "order.paid");
    assert_eq!(got[1].data_content_type, "application/json");
    assert_eq!(got[1].attributes["traceparent"], "00-1");
    assert_eq!(got[1].correlation_id, "c2");
    assert!(!got[1].id.is_empty(), "the bus assigns an id");
}

#[tokio::test]
async fn invalid_input_is_an_invalid_argument_error() {
    let bus = TestBus::start().await;
    let client = client(&bus, "test").await;
    let err = client.publish("bad topic", "x").await.unwrap_err();
    assert!(err.is_invalid_argument(), "{err}");
    let err = client.subscribe("a.>.b").await.unwrap_err();
    assert!(err.is_invalid_argument(), "{err}");
    // Groups are live-only: a replay start with a group is refused, not retried.
    let err = client
        .subscribe_with(
            "a.b",
            SubscribeOptions::new().group("g").start(Start::Earliest),
        )
        .await
        .unwrap_err();
    assert!(err.is_invalid_argument(), "{err}");
}

#[tokio::test]
async fn batching_publisher_keeps_order_and_assigns_sequences() {
    let bus = TestBus::start().await;
    let client = client(&bus, "batcher").await;
    let mut subscription = client.subscribe("load.>").await.unwrap();
    let publisher = client.publisher_with(PublisherOptions {
        max_batch: 7,
        max_in_flight: 3,
        linger: Duration::from_millis(1),
        ..PublisherOptions::default()
    });
    let mut pending = Vec::new();
    for i in 0..200 {
        let event = client.event("load.test").data(format!("{i}")).build();
        pending.push(publisher.submit(event).await.unwrap());
    }
    let mut sequences = Vec::new();
    for ack in pending {
        sequences.push(ack.await.unwrap());
    }
    assert!(sequences.windows(2).all(|pair| pair[0] < pair[1]));

    for (i, sequence) in sequences.iter().enumerate() {
        let event = next_event(&mut subscription).await;
        assert_eq!(event.sequence, *sequence);
        assert_eq!(event.data, format!("{i}").into_bytes());
        assert_eq!(event.source, "batcher");
    }

    // A refused batch fails its own events; the stream goes on.
    let bad = pb::Event {
        topic: "not a topic".into(),
        ..Default::default()
    };
    let err = publisher.publish(bad).await.unwrap_err();
    assert!(err.is_invalid_argument(), "{err}");
    let after = publisher
        .publish(client.event("load.test").data("after").build())
        .await
        .unwrap();
    assert!(after > *sequences.last().unwrap());
    publisher.flush().await.unwrap();
    publisher.clone().close().await.unwrap();
    assert!(matches!(
        publisher.publish(client.event("load.test").build()).await,
        Err(Error::PublisherClosed)
    ));
}

#[tokio::test]
async fn batched_and_unbatched_subscriptions_deliver_the_same_events_one_by_one() {
    let bus = TestBus::start().await;
    let client = client(&bus, "burst").await;
    let mut batched = client.subscribe("burst.*").await.unwrap();
    let mut single = client
        .subscribe_with("burst.*", SubscribeOptions::new().max_batch_events(0))
        .await
        .unwrap();
    let mut sequences = Vec::new();
    for chunk in 0..20 {
        let events = (0..100)
            .map(|i| {
                client
                    .event("burst.tick")
                    .data(format!("{chunk}/{i}"))
                    .build()
            })
            .collect();
        sequences.extend(client.publish_batch(events).await.unwrap());
    }
    for subscription in [&mut batched, &mut single] {
        let mut got = Vec::with_capacity(sequences.len());
        while got.len() < sequences.len() {
            got.push(next_event(subscription).await.sequence);
        }
        assert_eq!(got, sequences);
    }
    let refused = client
        .subscribe_with("burst.*", SubscribeOptions::new().max_batch_events(5000))
        .await
        .expect_err("a batch limit of 5000 was taken");
    assert!(
        refused.to_string().contains("max_batch_events"),
        "{refused}"
    );
}

#[tokio::test]
async fn subscription_resumes_after_a_slow_consumer_cutoff_without_duplicates_or_gaps() {
    // A subscriber that falls behind catches up from the log; past the lag limit the bus cuts
    // it off, which is what this test needs.
    let bus = TestBus::start_with(BusConfig {
        subscriber_queue_size: 4,
        max_subscriber_lag: Some(100),
        ..BusConfig::default()
    })
    .await;
    let client = client(&bus, "resume").await;
    // A one-item read-ahead: while the test does not read, the SDK does not either, so the
    // bus's queue for this subscriber overflows, it falls more than the lag limit behind, and
    // the bus cuts it off.
    let mut subscription = client
        .subscribe_with("flood.*", SubscribeOptions::new().buffer(1))
        .await
        .unwrap();
    let payload = vec![b'x'; 4096];
    let total = 4000usize;
    let mut sequences = Vec::new();
    for chunk in 0..total / 200 {
        let events = (0..200)
            .map(|i| {
                let mut data = format!("{:06}:", chunk * 200 + i).into_bytes();
                data.extend_from_slice(&payload);
                client.event("flood.data").data(data).build()
            })
            .collect();
        sequences.extend(client.publish_batch(events).await.unwrap());
    }

    let mut received = Vec::new();
    let mut resumed = 0;
    while received.len() < total {
        match next_item(&mut subscription).await {
            SubscriptionItem::Event(event) => {
                received.push((event.sequence, event.data[..6].to_vec()));
            }
            SubscriptionItem::Resumed { after_sequence, .. } => {
                assert_eq!(after_sequence, received.last().map(|(s, _)| *s));
                resumed += 1;
            }
            SubscriptionItem::CaughtUp { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(resumed > 0, "the bus never cut the slow subscriber off");
    let got: Vec<u64> = received.iter().map(|(s, _)| *s).collect();
    assert_eq!(got, sequences, "every event once, in order");
    for (i, (_, prefix)) in received.iter().enumerate() {
        assert_eq!(prefix, format!("{i:06}").as_bytes());
    }
}

#[tokio::test]
async fn replay_from_start_positions_and_report_truncation() {
    let bus = TestBus::start_in_memory(BusConfig {
        retention_max_events: 5,
        ..BusConfig::default()
    })
    .await;
    let client = client(&bus, "replayer").await;
    let mut sequences = Vec::new();
    for i in 0..10 {
        sequences.push(client.publish("log.entry", format!("{i}")).await.unwrap());
    }

    let mut earliest = client
        .subscribe_with("log.*", SubscribeOptions::new().start(Start::Earliest))
        .await
        .unwrap();
    for expected in &sequences[5..] {
        assert_eq!(next_event(&mut earliest).await.sequence, *expected);
    }
    assert!(matches!(
        next_item(&mut earliest).await,
        SubscriptionItem::CaughtUp { .. }
    ));

    // Asking for events the bus no longer holds: the lost range is reported, then the rest.
    let mut resumed = client
        .subscribe_with(
            "log.*",
            SubscribeOptions::new().start(Start::AfterSequence(sequences[1])),
        )
        .await
        .unwrap();
    assert!(resumed.subscribed().start_truncated);
    assert_eq!(
        next_item(&mut resumed).await,
        SubscriptionItem::Gap {
            from: sequences[2],
            to: sequences[4]
        }
    );
    assert_eq!(next_event(&mut resumed).await.sequence, sequences[5]);

    let mut after = client
        .subscribe_with(
            "log.*",
            SubscribeOptions::new().start(Start::AfterSequence(sequences[8])),
        )
        .await
        .unwrap();
    assert_eq!(next_event(&mut after).await.sequence, sequences[9]);
}

#[tokio::test]
async fn query_gets_the_reply_from_serve() {
    let bus = TestBus::start().await;
    let asker = client(&bus, "web").await;
    let users = client(&bus, "users").await;
    let stop = CancellationToken::new();
    let responder = users
        .responder("user.query", ServeOptions::default().group("users"))
        .await
        .unwrap();
    let serving = tokio::spawn(responder.run(
        |query: pb::Event| async move {
            match &query.data[..] {
                b"boom" => Err("no such user"),
                data => Ok(Reply::new(data.to_ascii_uppercase()).attr("answered-by", "users")),
            }
        },
        stop.clone().cancelled_owned(),
    ));

    let reply = asker
        .event("user.query")
        .data("alice")
        .event_type("user.lookup")
        .correlation_id("corr-1")
        .query(Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(&reply.data[..], b"ALICE");
    assert_eq!(reply.correlation_id, "corr-1");
    assert_eq!(reply.source, "users");
    assert_eq!(reply.r#type, "user.lookup.result");
    assert_eq!(reply.attributes["answered-by"], "users");
    assert!(
        !reply.causation_id.is_empty(),
        "causation is the query's id"
    );

    let err = asker
        .query("user.query", "boom", Duration::from_secs(5))
        .await
        .unwrap_err();
    match &err {
        Error::Remote { message, .. } => assert_eq!(message, "no such user"),
        other => panic!("expected an error reply, got {other}"),
    }

    stop.cancel();
    tokio::time::timeout(WAIT, serving)
        .await
        .expect("serve did not stop")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn query_without_responders_fails_fast_and_a_silent_one_times_out() {
    let bus = TestBus::start().await;
    let client = client(&bus, "asker").await;
    let started = Instant::now();
    let err = client
        .query("nobody.home", "hi", Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(err.is_no_responders(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(
        err.to_string(),
        "no responders for topic nobody.home (UNAVAILABLE)"
    );

    // Someone listens but never answers.
    let _silent = client.subscribe("silent.query").await.unwrap();
    let started = Instant::now();
    let err = client
        .query("silent.query", "hi", Duration::from_millis(300))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn serve_replicas_in_a_group_split_the_queries() {
    let bus = TestBus::start().await;
    let stop = CancellationToken::new();
    let counts: Vec<Arc<AtomicUsize>> = (0..2).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let mut servers = Vec::new();
    for (replica, count) in counts.iter().enumerate() {
        let service = client(&bus, &format!("worker-{replica}")).await;
        let responder = service
            .responder("work.query", ServeOptions::default().group("workers"))
            .await
            .unwrap();
        let count = count.clone();
        servers.push(tokio::spawn(responder.run(
            move |query: pb::Event| {
                count.fetch_add(1, Ordering::SeqCst);
                async move {
                    Ok::<_, String>(
                        Reply::new(format!("{replica}"))
                            .attr("q", String::from_utf8_lossy(&query.data)),
                    )
                }
            },
            stop.clone().cancelled_owned(),
        )));
    }

    let asker = client(&bus, "asker").await;
    let mut answered_by: HashMap<String, usize> = HashMap::new();
    for i in 0..20 {
        let reply = asker
            .query("work.query", format!("{i}"), Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(reply.attributes["q"], format!("{i}"));
        *answered_by
            .entry(String::from_utf8(reply.data.to_vec()).unwrap())
            .or_default() += 1;
    }
    let handled: Vec<usize> = counts.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    assert_eq!(handled.iter().sum::<usize>(), 20, "each query handled once");
    assert!(
        handled.iter().all(|&n| n > 0),
        "spread over the group: {handled:?}"
    );
    assert_eq!(answered_by.len(), 2);

    stop.cancel();
    for server in servers {
        tokio::time::timeout(WAIT, server)
            .await
            .expect("serve did not stop")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test]
async fn admin_calls_list_topics_and_topology() {
    let bus = TestBus::start().await;
    let client = client(&bus, "billing").await;
    let _subscription = client.subscribe("invoices.*").await.unwrap();
    client.publish("invoices.sent", "x").await.unwrap();
    let topics = client.list_topics(None).await.unwrap();
    let topic = topics
        .iter()
        .find(|t| t.name == "invoices.sent")
        .expect("the topic is listed");
    assert_eq!(topic.subscriber_count, 1);
    let graph = client.topology().await.unwrap();
    assert!(graph
        .nodes
        .iter()
        .any(|n| n.name == "billing" && n.kind == pb::NodeKind::Service as i32));
    assert!(graph
        .edges
        .iter()
        .any(|e| e.kind == pb::EdgeKind::Publishes as i32 && e.from == "service:billing"));
}

/// A bus on a given address (to restart one where clients expect it), stopped by `stop`.
async fn bus_on(
    addr: std::net::SocketAddr,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    bus_with(addr, eventbus::config::ServerConfig::default(), stop).await
}

async fn bus_with(
    addr: std::net::SocketAddr,
    config: eventbus::config::ServerConfig,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        eventbus::server::run(listener, config, stop.cancelled_owned())
            .await
            .unwrap();
    })
}

/// An address for a bus restarted on it (see `common::nats::free_port`).
fn free_addr() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], common::nats::free_port()))
}

#[tokio::test]
async fn manual_ack_deliveries_are_redelivered_until_acked() {
    let bus = TestBus::start().await;
    let worker = client(&bus, "worker").await;
    let mut subscription = worker
        .subscribe_with(
            "jobs.*",
            SubscribeOptions::new()
                .group("workers")
                .manual_ack(ManualAck {
                    ack_deadline: Duration::from_millis(300),
                    ..ManualAck::default()
                }),
        )
        .await
        .unwrap();
    let acked = worker.publish("jobs.a", "a").await.unwrap();
    let forgotten = worker.publish("jobs.b", "b").await.unwrap();
    let mut first = Vec::new();
    for _ in 0..2 {
        match next_item(&mut subscription).await {
            SubscriptionItem::Delivery(delivery) => first.push(delivery),
            other => panic!("expected a delivery, got {other:?}"),
        }
    }
    assert_eq!(
        first
            .iter()
            .map(|d| (d.event.sequence, d.attempt))
            .collect::<Vec<_>>(),
        vec![(acked, 1), (forgotten, 1)]
    );
    first[0].ack().await.unwrap();
    match next_item(&mut subscription).await {
        SubscriptionItem::Delivery(again) => {
            assert_eq!((again.event.sequence, again.attempt), (forgotten, 2));
            again.ack().await.unwrap();
        }
        other => panic!("expected a redelivery, got {other:?}"),
    }
    let cursor = worker
        .ack("workers", &[forgotten])
        .await
        .unwrap()
        .group_cursor;
    assert_eq!(cursor, forgotten);
}

#[tokio::test]
async fn the_publisher_waits_out_its_backoff_between_resends() {
    // Nothing listens: every send fails to open a stream. Three retries after waits of 100,
    // 200 and 400 ms (no jitter), then the event fails; a queue that forgot to wait sent them
    // all within the first wait.
    let addr = free_addr();
    let client = Client::builder(format!("http://{addr}"))
        .connect_lazy()
        .unwrap();
    let publisher = client.publisher_with(PublisherOptions {
        retries: 3,
        retry_backoff: eventbus::sdk::Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            multiplier: 2.0,
            jitter: 0.0,
            max_attempts: None,
        },
        ..PublisherOptions::default()
    });
    let started = Instant::now();
    let ack = publisher
        .submit(pb::Event {
            topic: "backoff.test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let error = tokio::time::timeout(WAIT, ack)
        .await
        .expect("the event fails after its last retry")
        .unwrap_err();
    assert!(error.is_retryable(), "{error}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(700),
        "three resends took {took:?}, less than their backoff (700 ms)"
    );
}

#[tokio::test]
async fn the_publisher_resends_across_a_bus_restart_and_the_bus_stores_each_event_once() {
    const EVENTS: u32 = 20_000;
    let data_dir = tempfile::tempdir().unwrap();
    let config = || eventbus::config::ServerConfig {
        storage: eventbus::config::StorageConfig::File {
            data_dir: data_dir.path().to_owned(),
            fsync: eventbus::store::FsyncPolicy::Always,
            segment_bytes: 1024 * 1024,
        },
        ..eventbus::config::ServerConfig::default()
    };
    let addr = free_addr();
    let url = format!("http://{addr}");
    let first_stop = CancellationToken::new();
    let first = bus_with(addr, config(), first_stop.clone()).await;
    let client = Client::builder(&url)
        .source("producer")
        .connect()
        .await
        .unwrap();
    let publisher = client.publisher_with(PublisherOptions {
        max_batch: 20,
        retries: 50,
        retry_backoff: eventbus::sdk::Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
            ..eventbus::sdk::Backoff::default()
        },
        ..PublisherOptions::default()
    });
    let producing = {
        let publisher = publisher.clone();
        tokio::spawn(async move {
            let mut sequences = Vec::new();
            for i in 0..EVENTS {
                let event = pb::Event {
                    topic: "retry.test".into(),
                    data: i.to_string().into_bytes().into(),
                    ..Default::default()
                };
                sequences.push(publisher.submit(event).await.unwrap());
            }
            let mut acked = Vec::new();
            for pending in sequences {
                acked.push(
                    pending
                        .await
                        .expect("every event is acknowledged in the end"),
                );
            }
            acked
        })
    };
    // Restart the bus while the producer is busy.
    common::eventually("some events acknowledged", WAIT, || {
        let client = client.clone();
        async move {
            let topics = client.list_topics(Some("retry.test")).await.ok()?;
            topics
                .first()
                .filter(|t| t.events_published > 100)
                .map(|_| ())
        }
    })
    .await;
    first_stop.cancel();
    tokio::time::timeout(WAIT, first).await.unwrap().unwrap();
    assert!(
        !producing.is_finished(),
        "the producer must still be busy when the bus goes away, or nothing is retried"
    );
    let second_stop = CancellationToken::new();
    let second = bus_with(addr, config(), second_stop.clone()).await;
    let acked = tokio::time::timeout(Duration::from_secs(60), producing)
        .await
        .expect("the producer finished")
        .unwrap();
    publisher.close().await.unwrap();

    let reader = Client::connect(&url).await.unwrap();
    let mut log = reader
        .subscribe_with("retry.test", SubscribeOptions::new().start(Start::Earliest))
        .await
        .unwrap();
    let mut stored = Vec::new();
    while stored.len() < EVENTS as usize {
        stored.push(next_event(&mut log).await);
    }
    let payloads: std::collections::HashSet<_> = stored.iter().map(|e| e.data.clone()).collect();
    assert_eq!(
        payloads.len(),
        EVENTS as usize,
        "every event stored exactly once"
    );
    let mut by_payload = HashMap::new();
    for event in &stored {
        by_payload.insert(event.data.clone(), event.sequence);
    }
    for (i, sequence) in acked.iter().enumerate() {
        assert_eq!(by_payload[i.to_string().as_bytes()], *sequence);
    }
    second_stop.cancel();
    tokio::time::timeout(WAIT, second).await.unwrap().unwrap();
}

#[tokio::test]
async fn subscription_survives_a_bus_restart_and_notices_the_new_log() {
    let addr = free_addr();
    let url = format!("http://{addr}");
    let first_stop = CancellationToken::new();
    let first = bus_on(addr, first_stop.clone()).await;
    let client = Client::connect(&url).await.unwrap();
    let mut subscription = client.subscribe("restart.*").await.unwrap();
    client.publish("restart.a", "one").await.unwrap();
    client.publish("restart.a", "two").await.unwrap();
    assert_eq!(&next_event(&mut subscription).await.data[..], b"one");
    assert_eq!(next_event(&mut subscription).await.sequence, 2);

    // The bus goes away (its in-memory log with it) and comes back on the same address.
    first_stop.cancel();
    tokio::time::timeout(WAIT, first).await.unwrap().unwrap();
    let second_stop = CancellationToken::new();
    let second = bus_on(addr, second_stop.clone()).await;
    let publisher = Client::connect(&url).await.unwrap();
    publisher.publish("restart.a", "three").await.unwrap();

    // The SDK says it lost the bus first (once, or again while the bus was away).
    let mut item = next_item(&mut subscription).await;
    while let SubscriptionItem::Interrupted { .. } = item {
        item = next_item(&mut subscription).await;
    }
    match item {
        SubscriptionItem::BusReset { last_seen, head } => {
            assert_eq!(last_seen, 2);
            assert!(head < 2);
        }
        other => panic!("expected a bus reset, got {other:?}"),
    }
    // Sequences start again at 1 on the new log, and nothing of it is dropped.
    let three = next_event(&mut subscription).await;
    assert_eq!((&three.data[..], three.sequence), (&b"three"[..], 1));
    publisher.publish("restart.a", "four").await.unwrap();
    let four = next_event(&mut subscription).await;
    assert_eq!((&four.data[..], four.sequence), (&b"four"[..], 2));

    second_stop.cancel();
    tokio::time::timeout(WAIT, second).await.unwrap().unwrap();
}
