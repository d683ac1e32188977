//! Batched delivery (`SubscribeRequest.max_batch_events`, issue #18): a subscriber that asks
//! for it gets runs of ready events in `event_batch` responses, with the same events in the
//! same order as one per response, batches within the limit and never across `caught_up`; a
//! MANUAL-ack member gets each event's delivery attempt beside it; a limit past the rule is
//! refused naming the field.

mod common;
mod support;

use common::{event, TestBus};
use eventbus::pb;
use eventbus::pb::subscribe_response::Message;
use support::*;
use tonic::Code;

/// One read of a subscription: an event or a batch of them, with their attempts (from
/// `delivery_attempt` or `delivery_attempts`), or the caught-up marker.
#[derive(Debug)]
enum Read {
    Events {
        events: Vec<pb::Event>,
        attempts: Vec<u32>,
        batch: bool,
    },
    CaughtUp(u64),
}

async fn read(stream: &mut Stream) -> Read {
    let response = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("no message in time")
        .expect("stream failed")
        .expect("stream ended");
    match response.message.expect("a message") {
        Message::Event(event) => Read::Events {
            events: vec![event],
            attempts: vec![response.delivery_attempt],
            batch: false,
        },
        Message::EventBatch(batch) => Read::Events {
            attempts: batch.delivery_attempts,
            events: batch.events,
            batch: true,
        },
        Message::CaughtUp(marker) => Read::CaughtUp(marker.sequence),
        other => panic!("unexpected {other:?}"),
    }
}

fn batched(request: pb::SubscribeRequest, max: u32) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        max_batch_events: max,
        ..request
    }
}

#[tokio::test]
async fn a_batched_subscriber_gets_every_event_once_in_order_in_batches_within_the_limit() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let (_, mut stream) = subscribe(&mut client, batched(request("load.>"), 64)).await;
    // Everything is published before the subscriber reads: its queue holds runs of events.
    let mut published = Vec::new();
    for batch in 0..50 {
        let events = (0..40)
            .map(|i| event("load.tick", format!("{batch}/{i}").as_bytes()))
            .collect();
        published.extend(publish(&mut client, events).await);
    }
    let mut delivered = Vec::new();
    let mut largest = 0;
    while delivered.len() < published.len() {
        match read(&mut stream).await {
            Read::Events { events, batch, .. } => {
                assert!(events.len() <= 64, "a batch of {}", events.len());
                assert!(!batch || events.len() > 1, "a batch of one event");
                largest = largest.max(events.len());
                delivered.extend(events.iter().map(|e| e.sequence));
            }
            Read::CaughtUp(sequence) => panic!("caught_up {sequence} on a live subscription"),
        }
    }
    assert_eq!(delivered, published);
    assert!(largest > 1, "every event came alone: nothing was batched");
}

#[tokio::test]
async fn a_batched_replay_keeps_caught_up_between_the_stored_and_the_live_events() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let stored = publish(
        &mut client,
        (0..30).map(|i| event("replay.a", &[i])).collect(),
    )
    .await;
    let start = pb::subscribe_request::Start::Earliest(());
    let (_, mut stream) =
        subscribe(&mut client, batched(request_from("replay.>", start), 16)).await;
    let live = publish(
        &mut client,
        (0..30).map(|i| event("replay.b", &[i])).collect(),
    )
    .await;
    let mut before = Vec::new();
    let mut after = Vec::new();
    let mut marker = None;
    while before.len() + after.len() < stored.len() + live.len() {
        match read(&mut stream).await {
            Read::Events { events, .. } => {
                assert!(events.len() <= 16);
                let into = if marker.is_some() {
                    &mut after
                } else {
                    &mut before
                };
                into.extend(events.iter().map(|e| e.sequence));
            }
            Read::CaughtUp(sequence) => {
                assert!(marker.is_none(), "a second caught_up");
                marker = Some(sequence);
            }
        }
    }
    let marker = marker.expect("no caught_up");
    assert_eq!(
        before.last(),
        Some(&marker),
        "caught_up after the last replayed event"
    );
    let all: Vec<u64> = before.iter().chain(&after).copied().collect();
    let expected: Vec<u64> = stored.iter().chain(&live).copied().collect();
    assert_eq!(all, expected);
}

#[tokio::test]
async fn a_batched_manual_member_gets_each_events_attempt() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let (_, mut stream) = subscribe(
        &mut client,
        batched(manual("jobs.>", "batched-workers"), 32),
    )
    .await;
    let published = publish(
        &mut client,
        (0..20).map(|i| event("jobs.run", &[i])).collect(),
    )
    .await;
    let mut first = Vec::new();
    while first.len() < published.len() {
        match read(&mut stream).await {
            Read::Events {
                events, attempts, ..
            } => {
                assert_eq!(attempts.len(), events.len(), "one attempt per event");
                first.extend(events.iter().map(|e| e.sequence).zip(attempts));
            }
            Read::CaughtUp(_) => {}
        }
    }
    assert!(first.iter().all(|(_, attempt)| *attempt == 1), "{first:?}");
    assert_eq!(first.iter().map(|(s, _)| *s).collect::<Vec<_>>(), published);
    // Nack one, ack the rest: the nacked one comes again as the second attempt.
    let again = published[7];
    client
        .nack(pb::NackRequest {
            group: "batched-workers".into(),
            sequences: vec![again],
            redeliver_after: None,
        })
        .await
        .unwrap();
    let rest: Vec<u64> = published.iter().copied().filter(|s| *s != again).collect();
    client
        .ack(pb::AckRequest {
            group: "batched-workers".into(),
            sequences: rest,
        })
        .await
        .unwrap();
    match read(&mut stream).await {
        Read::Events {
            events, attempts, ..
        } => {
            assert_eq!(events.len(), 1);
            assert_eq!((events[0].sequence, attempts[0]), (again, 2));
        }
        Read::CaughtUp(_) => panic!("caught_up instead of the redelivery"),
    }
}

#[tokio::test]
async fn a_batch_limit_past_the_rule_is_refused_naming_the_field() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let status = client
        .subscribe(batched(request("any.>"), 1025))
        .await
        .expect_err("a batch limit of 1025 was taken");
    assert_status(
        &status,
        Code::InvalidArgument,
        &["max_batch_events", "at most 1024"],
    );
    // The limit itself is fine.
    subscribe(&mut client, batched(request("any.>"), 1024)).await;
}
