//! A subscriber that falls behind catches up from the log instead of being cut off: when its
//! queue is full (in events or bytes), it leaves the live path, reads the log from the first
//! event that did not fit, and rejoins live with no gap and no duplicate. It is ended only when
//! retention drops events it has not read (`replay-overrun`) or, if set, when it lags more than
//! `max_subscriber_lag` (see `slow_consumer.rs`). Publishers never wait, and the bus's memory
//! stays bounded by its budgets, not by how much a stalled subscriber has missed.

mod bus_process;
mod common;
mod support;

use std::collections::{BTreeSet, HashMap};

use bus_process::BusProcess;
use common::{event, on_jetstream, TestBus};
use eventbus::config::BusConfig;
use eventbus::pb;
use eventbus::pb::event_bus_service_client::EventBusServiceClient;
use eventbus::pb::subscribe_request::Start;
use support::*;
use tonic::Code;

/// A queue of a few events, so a stalled subscriber leaves the live path at once.
const QUEUE: usize = 16;
/// Large events, so HTTP/2 windows and transport buffers (a few MiB) fill up quickly and the
/// bus's own queue is what overflows.
const DATA: usize = 64 * 1024;
/// A burst 20 times the queue.
const BURST: usize = 20 * QUEUE;
const BATCH: usize = 8;

/// Small queues: 16 events, and 1 MiB (about 8 of these events), so the byte bound is hit
/// first.
fn small_queues() -> BusConfig {
    BusConfig {
        subscriber_queue_size: QUEUE,
        subscriber_queue_bytes: 1024 * 1024,
        ..BusConfig::default()
    }
}

/// Publishes `count` events of [`DATA`] bytes on `topic` in batches, never waiting for any
/// subscriber; returns their sequences.
async fn burst(publisher: &mut Client, topic: &str, count: usize) -> Vec<u64> {
    let data = vec![7u8; DATA];
    let mut published = Vec::with_capacity(count);
    for _ in 0..count / BATCH {
        let batch = (0..BATCH).map(|_| event(topic, &data)).collect();
        let sequences = tokio::time::timeout(WAIT, publish(publisher, batch))
            .await
            .expect("a publish is never held up by subscribers");
        published.extend(sequences);
    }
    published
}

#[tokio::test]
async fn a_stalled_subscriber_catches_up_from_the_log_with_no_gap_beside_a_healthy_one() {
    let bus = TestBus::start_with(small_queues()).await;
    let mut publisher = bus.client().await;
    let before = burst(&mut publisher, "feed", BATCH).await;

    // The stalled one replays what is held, gets its one caught_up, then stops reading. Each
    // subscriber has its own connection, so the stalled one's full windows hold up nobody.
    let mut stalled_client = bus.client().await;
    let (_, mut stalled) = subscribe(
        &mut stalled_client,
        request_from("feed", Start::Earliest(())),
    )
    .await;
    assert_eq!(sequences(&events(&mut stalled, BATCH).await), before);
    assert_eq!(caught_up(&mut stalled).await, *before.last().unwrap());

    // The healthy one reads as events come.
    let mut healthy_client = bus.client().await;
    let (_, mut healthy) = subscribe(&mut healthy_client, request("feed")).await;
    let reader = tokio::spawn(async move {
        let received = sequences(&events(&mut healthy, BURST).await);
        (received, healthy)
    });

    let published = burst(&mut publisher, "feed", BURST).await;
    let first = *before.last().unwrap() + 1;
    assert_eq!(published, (first..first + BURST as u64).collect::<Vec<_>>());

    let (received, mut healthy) = tokio::time::timeout(WAIT, reader)
        .await
        .expect("the healthy subscriber keeps up")
        .unwrap();
    assert_eq!(
        received, published,
        "the healthy subscriber gets everything"
    );

    // Read again, the stalled one gets every event of the burst, in order, with no gap and no
    // duplicate, and no second caught_up (`events` fails on anything but an event).
    let caught = sequences(&events(&mut stalled, BURST).await);
    assert_eq!(caught, published);

    // And it is live again: the next event reaches both, right after the burst.
    let next = publish_one(&mut publisher, event("feed", b"small")).await;
    assert_eq!(next_event(&mut stalled).await.sequence, next);
    assert_eq!(next_event(&mut healthy).await.sequence, next);
}

/// A 1 → 8 fan-out under a publisher that never waits for anyone, with queues of 16 events:
/// every subscriber, reading as fast as it can, gets every event in order. (Before, most of
/// them were cut off as slow consumers part way.)
#[tokio::test]
async fn a_fan_out_under_a_publisher_that_does_not_wait_reaches_every_subscriber() {
    const SUBSCRIBERS: usize = 8;
    const EVENTS: usize = 4000;
    let bus = TestBus::start_with(small_queues()).await;
    let mut readers = Vec::new();
    for _ in 0..SUBSCRIBERS {
        let mut client = bus.client().await;
        let (_, mut stream) = subscribe(&mut client, request("fan")).await;
        readers.push(tokio::spawn(async move {
            let _client = client;
            sequences(&events(&mut stream, EVENTS).await)
        }));
    }
    let mut publisher = bus.client().await;
    let mut published = Vec::new();
    for _ in 0..EVENTS / 200 {
        let batch = (0..200).map(|_| event("fan", b"128 bytes or so")).collect();
        published.extend(publish(&mut publisher, batch).await);
    }
    for reader in readers {
        let received = tokio::time::timeout(WAIT, reader)
            .await
            .expect("every subscriber gets everything in time")
            .unwrap();
        assert_eq!(received, published);
    }
}

#[tokio::test]
async fn a_stalled_subscriber_overtaken_by_retention_is_ended_naming_its_last_sequence() {
    // Retention keeps far less than the burst: by the time the stalled subscriber reads the
    // log, what it has not read is gone (the file store drops whole segments of 1 MiB).
    let bus = TestBus::start_with(BusConfig {
        retention_max_events: 32,
        retention_max_bytes: 2 * 1024 * 1024,
        ..small_queues()
    })
    .await;
    let mut stalled_client = bus.client().await;
    let (_, mut stalled) = subscribe(&mut stalled_client, request("feed")).await;
    let mut publisher = bus.client().await;
    let published = burst(&mut publisher, "feed", BURST).await;

    let (received, status) = read_to_error(&mut stalled).await;
    let last = received.last().map_or(0, |e| e.sequence);
    assert_eq!(
        sequences(&received),
        (1..=last).collect::<Vec<_>>(),
        "a gapless prefix before the error"
    );
    assert!(last < *published.last().unwrap(), "ended before the end");
    assert_status(
        &status,
        Code::ResourceExhausted,
        &[
            &format!("after sequence {last} were dropped"),
            &format!("after_sequence={last}"),
        ],
    );
    assert_eq!(reason(&status).as_deref(), Some("replay-overrun"));

    // Resuming from there says the start is gone and goes on from the oldest held event.
    let (subscribed, mut resumed) = subscribe(
        &mut stalled_client,
        request_from("feed", Start::AfterSequence(last)),
    )
    .await;
    assert!(subscribed.start_truncated);
    let oldest = subscribed.oldest_sequence;
    assert!(oldest > last + 1);
    // The replay starts at the oldest event held when it reads, which on JetStream may be
    // past the `oldest_sequence` confirmed (the stream's state is read every 500 ms, and
    // between reads only the count limit is known; the byte limit here drops more).
    let last_published = *published.last().unwrap();
    let mut rest = vec![next_event(&mut resumed).await];
    while rest.last().unwrap().sequence < last_published {
        rest.push(next_event(&mut resumed).await);
    }
    let first = rest[0].sequence;
    assert!(
        first >= oldest,
        "{first} is held, {oldest} was confirmed as oldest"
    );
    if !on_jetstream() {
        assert_eq!(
            first, oldest,
            "the confirmed oldest is exact on a local store"
        );
    }
    assert_eq!(
        sequences(&rest),
        (first..=last_published).collect::<Vec<_>>()
    );
}

fn member(group: &str) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        group: group.to_owned(),
        subscriber: format!("{group}-service"),
        ..request("work")
    }
}

#[tokio::test]
async fn a_live_group_whose_members_are_all_full_loses_no_event() {
    let bus = TestBus::start_with(small_queues()).await;
    let mut first_client = bus.client().await;
    let (_, mut first) = subscribe(&mut first_client, member("g")).await;
    let mut second_client = bus.client().await;
    let (_, mut second) = subscribe(&mut second_client, member("g")).await;

    // Neither member reads during the burst: both fill up, and the member whose turn it was
    // catches up from the log for the group.
    let mut publisher = bus.client().await;
    let published = burst(&mut publisher, "work", BURST).await;

    // Read both: every event of the burst reaches exactly one member, each member in order.
    let mut by_member: HashMap<usize, Vec<u64>> = HashMap::new();
    let mut seen = BTreeSet::new();
    while seen.len() < BURST {
        let (index, message) = tokio::time::timeout(WAIT, async {
            tokio::select! {
                message = first.message() => (0, message),
                message = second.message() => (1, message),
            }
        })
        .await
        .expect("a delivery in time");
        match message {
            Ok(Some(pb::SubscribeResponse {
                message: Some(pb::subscribe_response::Message::Event(event)),
                ..
            })) => {
                assert!(
                    seen.insert(event.sequence),
                    "sequence {} delivered twice",
                    event.sequence
                );
                by_member.entry(index).or_default().push(event.sequence);
            }
            other => panic!("member {index}: expected an event, got {other:?}"),
        }
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), published);
    for (index, sequences) in &by_member {
        assert!(
            sequences.windows(2).all(|w| w[0] < w[1]),
            "member {index} got its events in order"
        );
    }

    // The group is live again: the next event goes to one member.
    let next = publish_one(&mut publisher, event("work", b"small")).await;
    let (index, message) = tokio::time::timeout(WAIT, async {
        tokio::select! {
            message = first.message() => (0, message),
            message = second.message() => (1, message),
        }
    })
    .await
    .expect("the next event in time");
    match message {
        Ok(Some(pb::SubscribeResponse {
            message: Some(pb::subscribe_response::Message::Event(event)),
            ..
        })) => assert_eq!(event.sequence, next, "member {index}"),
        other => panic!("member {index}: expected an event, got {other:?}"),
    }
}

/// The bus measured from outside: two subscribers that never read while 150 MiB of 64 KiB
/// events are published. Before, each queue held up to 8,192 events (512 MiB each at this
/// size); now a stalled subscriber holds at most its queue's bytes, and the log its retention.
/// (A real `eventbus serve` on the memory store, whatever `EVENTBUS_TEST_STORAGE` says.)
#[tokio::test]
async fn the_bus_memory_stays_bounded_while_subscribers_stall() {
    const RETENTION: u64 = 16 * 1024 * 1024;
    const EVENTS: usize = 2400;
    let retention = RETENTION.to_string();
    let bus = BusProcess::start(
        &[
            "--retention-max-bytes",
            &retention,
            "--subscriber-queue-bytes",
            "4194304",
        ],
        None,
    );
    let connect = || async {
        EventBusServiceClient::new(
            tonic::transport::Channel::from_shared(bus.url())
                .unwrap()
                .connect()
                .await
                .unwrap(),
        )
        .max_decoding_message_size(64 * 1024 * 1024)
    };
    let mut publisher = connect().await;
    // Warm up the publish path, so the baseline includes its buffers.
    burst(&mut publisher, "warm", 64).await;
    let mut stalled_clients = Vec::new();
    let mut stalled = Vec::new();
    for _ in 0..2 {
        let mut client = connect().await;
        let (_, stream) = subscribe(&mut client, request("feed")).await;
        stalled_clients.push(client);
        stalled.push(stream);
    }
    let baseline = bus.rss_bytes();
    let published = burst(&mut publisher, "feed", EVENTS).await;
    assert_eq!(published.len(), EVENTS);
    let grown = bus.rss_bytes().saturating_sub(baseline);
    let published_bytes = (EVENTS * DATA) as u64;
    eprintln!(
        "published {} MiB with two stalled subscribers: resident memory grew {} MiB",
        published_bytes >> 20,
        grown >> 20
    );
    // Retention (16 MiB), two queues (4 MiB each, counting room for the encoding), HTTP/2
    // windows and allocator slack: far below what was published.
    assert!(
        grown < 80 * 1024 * 1024,
        "resident memory grew {} MiB while {} MiB were published",
        grown >> 20,
        published_bytes >> 20
    );
    drop(stalled);
    drop(stalled_clients);
}

/// Four replays from `earliest` of a file-store log larger than its tail cache, each read for
/// one event and then stalled: a replay reads the log in chunks bounded in bytes
/// (`subscriber_queue_bytes`), so each holds about one chunk, not 512 events of whatever size.
/// (A real `eventbus serve` on the file store, in a temporary directory.)
#[tokio::test]
async fn stalled_replays_hold_a_chunk_bounded_in_bytes() {
    const EVENT: usize = 256 * 1024;
    /// 96 MiB: more than the file store's tail cache (64 MiB as retention counts, about 32 MiB
    /// of data), so the replays' first chunks come from disk, fresh copies for each.
    const EVENTS: usize = 384;
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap().to_owned();
    let bus = BusProcess::start(
        &[
            "--storage",
            "file",
            "--data-dir",
            &data_dir,
            "--fsync",
            "never",
            "--subscriber-queue-bytes",
            "4194304",
        ],
        None,
    );
    let connect = || async {
        EventBusServiceClient::new(
            tonic::transport::Channel::from_shared(bus.url())
                .unwrap()
                .connect()
                .await
                .unwrap(),
        )
        .max_decoding_message_size(64 * 1024 * 1024)
    };
    let mut publisher = connect().await;
    let data = vec![3u8; EVENT];
    for _ in 0..EVENTS / BATCH {
        let batch = (0..BATCH).map(|_| event("log", &data)).collect();
        tokio::time::timeout(WAIT, publish(&mut publisher, batch))
            .await
            .expect("publish in time");
    }
    let baseline = bus.rss_bytes();
    let mut replays = Vec::new();
    for _ in 0..4 {
        let mut client = connect().await;
        let (_, mut stream) =
            subscribe(&mut client, request_from("log", Start::Earliest(()))).await;
        // One event read: the replay has read its first chunk.
        assert_eq!(next_event(&mut stream).await.sequence, 1);
        replays.push((client, stream));
    }
    let grown = bus.rss_bytes().saturating_sub(baseline);
    eprintln!(
        "four stalled replays of a {} MiB log: resident memory grew {} MiB",
        (EVENTS * EVENT) >> 20,
        grown >> 20
    );
    // Four chunks of at most 4 MiB (counting room for the encoding), the events the transport
    // holds (HTTP/2 windows of 1 MiB per stream), and allocator slack.
    assert!(
        grown < 64 * 1024 * 1024,
        "resident memory grew {} MiB for four stalled replays",
        grown >> 20
    );
    drop(replays);
}
