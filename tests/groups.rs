//! Consumer groups: each event once per group, spread over the live members, while other
//! subscribers keep their own copy.

mod common;
mod support;

use std::collections::{BTreeSet, HashMap};

use common::{event, eventually, TestBus};
use eventbus::pb;
use support::*;
use tokio::sync::mpsc;
use tonic::Code;

fn member(pattern: &str, group: &str) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        group: group.to_owned(),
        subscriber: format!("{group}-service"),
        ..request(pattern)
    }
}

/// Forwards every event of `stream` as (member, sequence) until the stream ends.
fn forward(member: usize, mut stream: Stream, to: mpsc::UnboundedSender<(usize, u64)>) {
    tokio::spawn(async move {
        while let Ok(Some(response)) = stream.message().await {
            if let Some(pb::subscribe_response::Message::Event(event)) = response.message {
                if to.send((member, event.sequence)).is_err() {
                    return;
                }
            }
        }
    });
}

/// Collects `count` deliveries, failing on a duplicate sequence; returns sequences per member.
async fn collect(
    from: &mut mpsc::UnboundedReceiver<(usize, u64)>,
    count: usize,
) -> HashMap<usize, Vec<u64>> {
    let mut seen = BTreeSet::new();
    let mut by_member: HashMap<usize, Vec<u64>> = HashMap::new();
    for _ in 0..count {
        let (member, sequence) = tokio::time::timeout(WAIT, from.recv())
            .await
            .expect("a delivery in time")
            .expect("members still open");
        assert!(seen.insert(sequence), "sequence {sequence} delivered twice");
        by_member.entry(member).or_default().push(sequence);
    }
    by_member
}

#[tokio::test]
async fn each_event_goes_to_one_member_of_each_group_and_to_every_other_subscriber() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;

    let (workers_tx, mut workers) = mpsc::unbounded_channel();
    for index in 0..3 {
        let (subscribed, stream) = subscribe(&mut client, member("jobs.*", "workers")).await;
        assert_eq!(subscribed.group, "workers");
        forward(index, stream, workers_tx.clone());
    }
    let (audit_tx, mut audit) = mpsc::unbounded_channel();
    let (_, stream) = subscribe(&mut client, member("jobs.*", "audit")).await;
    forward(0, stream, audit_tx);
    let (_, mut everything) = subscribe(&mut client, request("jobs.*")).await;

    const EVENTS: usize = 300;
    let mut published = Vec::new();
    for batch in 0..EVENTS / 10 {
        let events = (0..10)
            .map(|i| event("jobs.run", format!("{batch}/{i}").as_bytes()))
            .collect();
        published.extend(publish(&mut client, events).await);
    }

    let workers_got = collect(&mut workers, EVENTS).await;
    assert_eq!(
        workers_got.len(),
        3,
        "every member gets some: {workers_got:?}"
    );
    let mut all: Vec<u64> = workers_got.values().flatten().copied().collect();
    all.sort_unstable();
    assert_eq!(
        all, published,
        "the workers group gets each event exactly once"
    );
    for sequences in workers_got.values() {
        assert!(
            sequences.windows(2).all(|w| w[0] < w[1]),
            "in order per member"
        );
    }

    let audit_got = collect(&mut audit, EVENTS).await;
    assert_eq!(audit_got[&0], published, "a second group gets its own copy");

    let received = events(&mut everything, EVENTS).await;
    assert_eq!(
        sequences(&received),
        published,
        "a non-group subscriber gets every event"
    );

    // No late duplicates: one more event is delivered once per group, and is the next thing
    // each of them sees.
    let last = publish_one(&mut client, event("jobs.run", b"last")).await;
    let (_, sequence) = workers.recv().await.unwrap();
    assert_eq!(sequence, last);
    assert_eq!(audit.recv().await.unwrap().1, last);
    assert_eq!(next_event(&mut everything).await.sequence, last);
}

#[tokio::test]
async fn a_member_that_leaves_stops_receiving_and_the_rest_get_everything() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let admin = bus.admin().await;
    let (_, mut stays) = subscribe(&mut client, member("tasks", "pool")).await;
    let (_, mut leaves) = subscribe(&mut client, member("tasks", "pool")).await;

    // Round robin: with two members, two events go one to each.
    let first = publish(
        &mut client,
        vec![event("tasks", b"1"), event("tasks", b"2")],
    )
    .await;
    let mut got = vec![
        next_event(&mut stays).await.sequence,
        next_event(&mut leaves).await.sequence,
    ];
    got.sort_unstable();
    assert_eq!(got, first);

    drop(leaves);
    eventually("the member that left to be removed", WAIT, || {
        let mut admin = admin.clone();
        async move {
            let topics = admin
                .list_topics(pb::ListTopicsRequest {
                    pattern: "tasks".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .topics;
            (topics[0].subscriber_count == 1).then_some(())
        }
    })
    .await;

    let events_after: Vec<_> = (0..20).map(|i| event("tasks", &[i])).collect();
    let rest = publish(&mut client, events_after).await;
    let received = events(&mut stays, rest.len()).await;
    assert_eq!(
        sequences(&received),
        rest,
        "the remaining member gets everything"
    );
}

#[tokio::test]
async fn a_group_subscription_must_start_at_latest() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    use pb::subscribe_request::Start;
    for start in [
        Start::Earliest(()),
        Start::AfterSequence(0),
        Start::FromTime(timestamp(std::time::SystemTime::now())),
    ] {
        let status = client
            .subscribe(pb::SubscribeRequest {
                start: Some(start),
                ..member("tasks", "pool")
            })
            .await
            .expect_err("a group cannot replay");
        assert_status(&status, Code::InvalidArgument, &["start"]);
    }
    // Explicitly latest is fine.
    let (subscribed, _) = subscribe(
        &mut client,
        pb::SubscribeRequest {
            start: Some(Start::Latest(())),
            ..member("tasks", "pool")
        },
    )
    .await;
    assert_eq!(subscribed.group, "pool");
}
