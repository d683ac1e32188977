//! A subscriber that stops reading falls behind without slowing publishers or other
//! subscribers: it catches up from the log (`slow_subscribers.rs`) and, with
//! `max_subscriber_lag` set, is ended once it is further behind than that, with
//! RESOURCE_EXHAUSTED naming its last delivered sequence, and can resume from there.

mod common;
mod support;

use std::time::Duration;

use common::{event, TestBus};
use eventbus::config::BusConfig;
use eventbus::pb::subscribe_request::Start;
use support::*;
use tonic::Code;

const QUEUE: usize = 4;
/// Large events, so HTTP/2 windows and transport buffers (a few MiB) fill up quickly and the
/// bus's own queue is what overflows.
const DATA: usize = 64 * 1024;
const EVENTS: usize = 240;
const BATCH: usize = 4;
/// Far less than the burst, far more than the queue and the transport's buffers hold.
const MAX_LAG: u64 = 100;

fn lag_limited() -> BusConfig {
    BusConfig {
        subscriber_queue_size: QUEUE,
        max_subscriber_lag: Some(MAX_LAG),
        ..BusConfig::default()
    }
}

#[tokio::test]
async fn a_subscriber_past_the_lag_limit_is_ended_and_can_resume_without_a_gap() {
    let bus = TestBus::start_with(lag_limited()).await;
    // Each subscriber on its own connection, so the slow one's full windows hold up nobody.
    let mut slow_client = bus.client().await;
    let (_, mut slow) = subscribe(&mut slow_client, request("feed")).await;
    let mut fast_client = bus.client().await;
    let (_, mut fast) = subscribe(&mut fast_client, request("feed")).await;

    // The publisher publishes far more than the slow subscriber's queue and windows hold. The
    // fast subscriber reads each batch before the next is sent: it keeps up, the slow one does
    // not read at all.
    let mut publisher = bus.client().await;
    let data = vec![7u8; DATA];
    let mut published = Vec::new();
    for _ in 0..EVENTS / BATCH {
        let batch = (0..BATCH).map(|_| event("feed", &data)).collect();
        let batch_sequences = publish(&mut publisher, batch).await;
        let received = events(&mut fast, batch_sequences.len()).await;
        assert_eq!(
            sequences(&received),
            batch_sequences,
            "the fast subscriber gets everything"
        );
        published.extend(batch_sequences);
    }
    assert_eq!(published, (1..=EVENTS as u64).collect::<Vec<_>>());

    // Drained, the slow stream holds a prefix of the events, then the error naming where it
    // stopped.
    let (received, status) = read_to_error(&mut slow).await;
    let last = received.last().map_or(0, |e| e.sequence);
    assert_eq!(
        sequences(&received),
        (1..=last).collect::<Vec<_>>(),
        "a gapless prefix before the error"
    );
    assert!(
        last < EVENTS as u64,
        "the slow subscriber was ended before the end"
    );
    assert_status(
        &status,
        Code::ResourceExhausted,
        &[
            &format!("last delivered sequence {last}"),
            &format!("after_sequence={last}"),
            &format!("over the limit of {MAX_LAG} (max_subscriber_lag)"),
        ],
    );
    assert_eq!(reason(&status).as_deref(), Some("slow-consumer"));

    // Resuming from the named sequence gets the rest, with no gap and no duplicate.
    let (subscribed, mut resumed) = subscribe(
        &mut slow_client,
        request_from("feed", Start::AfterSequence(last)),
    )
    .await;
    assert!(!subscribed.start_truncated);
    let rest = events(&mut resumed, EVENTS - last as usize).await;
    assert_eq!(
        sequences(&rest),
        ((last + 1)..=EVENTS as u64).collect::<Vec<_>>()
    );
    assert_eq!(caught_up(&mut resumed).await, EVENTS as u64);

    // The fast subscriber is still live.
    let next = publish_one(&mut publisher, event("feed", b"small")).await;
    assert_eq!(next_event(&mut fast).await.sequence, next);
    assert_eq!(next_event(&mut resumed).await.sequence, next);
}

#[tokio::test]
async fn a_slow_subscriber_never_fails_or_stalls_publishers() {
    let bus = TestBus::start_with(lag_limited()).await;
    let mut slow_client = bus.client().await;
    let (_, mut slow) = subscribe(&mut slow_client, request(">")).await;

    // Publish flat out, nobody reading: every publish succeeds.
    let mut publisher = bus.client().await;
    let data = vec![1u8; DATA];
    let mut last = 0;
    for _ in 0..EVENTS / BATCH {
        let batch = (0..BATCH).map(|_| event("firehose", &data)).collect();
        let sequences =
            tokio::time::timeout(Duration::from_secs(10), publish(&mut publisher, batch))
                .await
                .expect("a publish is never held up by a slow subscriber");
        last = *sequences.last().unwrap();
    }
    assert_eq!(last, EVENTS as u64);
    let (_, status) = read_to_error(&mut slow).await;
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(reason(&status).as_deref(), Some("slow-consumer"));

    // Once ended, the slow subscription no longer counts as a subscriber.
    let mut admin = bus.admin().await;
    let topics = topics(&mut admin).await;
    assert_eq!(topics[0].name, "firehose");
    assert_eq!(topics[0].subscriber_count, 0);
}
