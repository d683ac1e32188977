//! Replay from each start position, the `caught_up` marker, retention, and the critical switch
//! from replay to live while publishers keep publishing.

mod common;
mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::{event, eventually, TestBus};
use eventbus::config::BusConfig;
use eventbus::pb;
use eventbus::pb::subscribe_request::Start;
use eventbus::pb::subscribe_response::Message;
use support::*;

/// Publishes one event at a time, alternating `r.a` and `other`; returns (sequence, topic).
async fn publish_alternating(client: &mut Client, count: usize) -> Vec<(u64, &'static str)> {
    let mut published = Vec::new();
    for i in 0..count {
        let topic = if i % 2 == 0 { "r.a" } else { "other" };
        published.push((publish_one(client, event(topic, &[i as u8])).await, topic));
    }
    published
}

/// Reads the replay of a subscription: events up to the `caught_up` marker, and the marker.
async fn replay(stream: &mut Stream) -> (Vec<pb::Event>, u64) {
    let mut replayed = Vec::new();
    loop {
        match next(stream).await {
            Message::Event(event) => replayed.push(event),
            Message::CaughtUp(marker) => return (replayed, marker.sequence),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn each_start_position_replays_what_it_should_then_goes_live() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let published = publish_alternating(&mut client, 10).await;
    let matching: Vec<u64> = published
        .iter()
        .filter(|(_, topic)| *topic == "r.a")
        .map(|(sequence, _)| *sequence)
        .collect();
    assert_eq!(matching, vec![1, 3, 5, 7, 9]);

    let (subscribed, mut earliest) =
        subscribe(&mut client, request_from("r.*", Start::Earliest(()))).await;
    assert_eq!(subscribed.head_sequence, 10);
    assert_eq!(subscribed.oldest_sequence, 1);
    assert!(!subscribed.start_truncated);
    let (replayed, head) = replay(&mut earliest).await;
    assert_eq!(sequences(&replayed), matching);
    assert_eq!(head, 10);

    let (_, mut after) = subscribe(&mut client, request_from("r.*", Start::AfterSequence(4))).await;
    let (replayed, head) = replay(&mut after).await;
    assert_eq!(sequences(&replayed), vec![5, 7, 9]);
    assert_eq!(head, 10);

    // from_time: every event published at or after a given event's publish time.
    let all = replay(
        &mut subscribe(&mut client, request_from(">", Start::Earliest(())))
            .await
            .1,
    )
    .await
    .0;
    let since = all[5].publish_time.unwrap();
    let since_time = SystemTime::try_from(since).unwrap();
    let expected: Vec<u64> = all
        .iter()
        .filter(|e| e.topic == "r.a")
        .filter(|e| SystemTime::try_from(e.publish_time.unwrap()).unwrap() >= since_time)
        .map(|e| e.sequence)
        .collect();
    assert!(
        expected.contains(&7) && !expected.contains(&1),
        "{expected:?}"
    );
    let (_, mut from_time) =
        subscribe(&mut client, request_from("r.*", Start::FromTime(since))).await;
    let (replayed, head) = replay(&mut from_time).await;
    assert_eq!(sequences(&replayed), expected);
    assert_eq!(head, 10);

    // A time after everything: nothing to replay, and nothing published before that time
    // either (tests/faults.rs follows such a stream until its time comes).
    let future = SystemTime::now() + Duration::from_secs(3600);
    let (_, mut from_future) = subscribe(
        &mut client,
        request_from("r.*", Start::FromTime(timestamp(future))),
    )
    .await;
    let (replayed, head) = replay(&mut from_future).await;
    assert!(replayed.is_empty());
    assert_eq!(head, 10);

    // Latest (explicit and by default): no replay and no marker, only what comes next.
    let (subscribed, mut latest) =
        subscribe(&mut client, request_from("r.*", Start::Latest(()))).await;
    assert_eq!(subscribed.head_sequence, 10);
    let (_, mut default) = subscribe(&mut client, request("r.*")).await;

    // Live events follow on every stream that admits them, and no second marker ever comes.
    let live = publish(
        &mut client,
        vec![
            event("r.a", b"live"),
            event("other", b""),
            event("r.b", b"live"),
        ],
    )
    .await;
    let live_matching = vec![live[0], live[2]];
    for stream in [
        &mut earliest,
        &mut after,
        &mut from_time,
        &mut latest,
        &mut default,
    ] {
        let received = events(stream, 2).await;
        assert_eq!(sequences(&received), live_matching);
    }
}

#[tokio::test]
async fn replay_on_an_empty_bus_is_just_the_marker() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let (subscribed, mut stream) =
        subscribe(&mut client, request_from(">", Start::Earliest(()))).await;
    assert_eq!(subscribed.head_sequence, 0);
    assert_eq!(subscribed.oldest_sequence, 0);
    assert_eq!(caught_up(&mut stream).await, 0);
    let sequence = publish_one(&mut client, event("a", b"")).await;
    assert_eq!(next_event(&mut stream).await.sequence, sequence);
}

#[tokio::test]
async fn no_gaps_or_duplicates_across_the_switch_from_replay_to_live() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    // Enough history for a replay of several store reads before the switch.
    let mut published_matching = Vec::new();
    for batch in 0..30 {
        let events = (0..100)
            .map(|i| event(if i % 3 == 0 { "noise" } else { "live.a" }, &[batch]))
            .collect::<Vec<_>>();
        let topics: Vec<_> = events.iter().map(|e| e.topic.clone()).collect();
        let sequences = publish(&mut client, events).await;
        for (sequence, topic) in sequences.into_iter().zip(topics) {
            if topic == "live.a" {
                published_matching.push(sequence);
            }
        }
    }

    // A publisher keeps publishing on its own connection while subscriptions replay and switch.
    let progress = Arc::new(AtomicU64::new(0));
    let publisher = {
        let mut client = bus.client().await;
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut matching = Vec::new();
            for round in 0..1500u64 {
                let size = (round % 4 + 1) as usize;
                let events: Vec<_> = (0..size)
                    .map(|i| event(if i == 1 { "noise" } else { "live.b" }, b"x"))
                    .collect();
                let topics: Vec<_> = events.iter().map(|e| e.topic.clone()).collect();
                for (sequence, topic) in publish(&mut client, events).await.into_iter().zip(topics)
                {
                    if topic == "live.b" {
                        matching.push(sequence);
                    }
                }
                progress.store(round + 1, Ordering::Release);
            }
            let end = publish_one(&mut client, event("live.end", b"end")).await;
            matching.push(end);
            matching
        })
    };

    // Subscriptions open at staggered points of the concurrent publishing, each from a start
    // in the past, and read until the publisher's final event.
    let starts = [
        Start::Earliest(()),
        Start::AfterSequence(1234),
        Start::Earliest(()),
        Start::AfterSequence(2999),
        Start::Earliest(()),
    ];
    let mut readers = Vec::new();
    for (index, start) in starts.into_iter().enumerate() {
        let wanted = index as u64 * 250;
        let progress = progress.clone();
        eventually("publisher progress", WAIT, || {
            let progress = progress.clone();
            async move { (progress.load(Ordering::Acquire) >= wanted).then_some(()) }
        })
        .await;
        let mut client = bus.client().await;
        let (subscribed, mut stream) = subscribe(&mut client, request_from("live.*", start)).await;
        readers.push(tokio::spawn(async move {
            let mut received = Vec::new();
            let mut marker = None;
            loop {
                match next(&mut stream).await {
                    Message::Event(event) => {
                        let end = event.topic == "live.end";
                        received.push(event.sequence);
                        if end {
                            break;
                        }
                    }
                    Message::CaughtUp(caught_up) => {
                        assert!(marker.is_none(), "a second caught_up marker");
                        marker = Some((received.len(), caught_up.sequence));
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            (start, subscribed, received, marker)
        }));
    }

    let mut expected_all = published_matching;
    expected_all.extend(publisher.await.unwrap());
    for reader in readers {
        let (start, subscribed, received, marker) = reader.await.unwrap();
        let after = match start {
            Start::AfterSequence(sequence) => sequence,
            _ => 0,
        };
        let expected: Vec<u64> = expected_all
            .iter()
            .copied()
            .filter(|s| *s > after)
            .collect();
        assert_eq!(
            received.len(),
            expected.len(),
            "start {start:?}: count of events received"
        );
        assert_eq!(
            received, expected,
            "start {start:?}: exactly the matching events"
        );
        let (position, head) = marker.expect("one caught_up marker");
        assert!(
            head >= subscribed.head_sequence,
            "the marker is at or past the confirmation's head"
        );
        assert!(
            received[..position].iter().all(|s| *s <= head),
            "replayed events are up to the marker"
        );
        assert!(
            received[position..].iter().all(|s| *s > head),
            "live events are after it"
        );
        assert!(
            position < received.len() - 1,
            "start {start:?}: the switch happened while the publisher was still publishing"
        );
    }
}

#[tokio::test]
async fn a_start_older_than_retention_begins_at_the_oldest_held_event() {
    let bus = TestBus::start_in_memory(BusConfig {
        retention_max_events: 5,
        ..BusConfig::default()
    })
    .await;
    let mut client = bus.client().await;
    for i in 0..12u8 {
        publish_one(&mut client, event("kept", &[i])).await;
    }

    let (subscribed, mut stream) =
        subscribe(&mut client, request_from("kept", Start::AfterSequence(2))).await;
    assert!(subscribed.start_truncated);
    assert_eq!(subscribed.oldest_sequence, 8);
    assert_eq!(subscribed.head_sequence, 12);
    let (replayed, head) = replay(&mut stream).await;
    assert_eq!(sequences(&replayed), vec![8, 9, 10, 11, 12]);
    assert_eq!(head, 12);

    // Within retention: not truncated.
    let (subscribed, mut stream) =
        subscribe(&mut client, request_from("kept", Start::AfterSequence(9))).await;
    assert!(!subscribed.start_truncated);
    assert_eq!(sequences(&replay(&mut stream).await.0), vec![10, 11, 12]);
    // Right at the edge: after 7 is exactly the oldest held, nothing lost.
    let (subscribed, _) =
        subscribe(&mut client, request_from("kept", Start::AfterSequence(7))).await;
    assert!(!subscribed.start_truncated);

    // Earliest starts at the oldest held and is not a truncation: it asked for what is held.
    let (subscribed, mut stream) =
        subscribe(&mut client, request_from("kept", Start::Earliest(()))).await;
    assert!(!subscribed.start_truncated);
    assert_eq!(
        sequences(&replay(&mut stream).await.0),
        vec![8, 9, 10, 11, 12]
    );

    let mut admin = bus.admin().await;
    let topics = topics(&mut admin).await;
    assert_eq!(topics[0].events_held, 5);
    assert_eq!(topics[0].events_published, 12);
}

#[tokio::test]
async fn a_from_time_older_than_retention_says_the_start_was_truncated() {
    let bus = TestBus::start_in_memory(BusConfig {
        retention_max_events: 5,
        ..BusConfig::default()
    })
    .await;
    let mut client = bus.client().await;
    let long_ago = SystemTime::now() - Duration::from_secs(3600);
    for i in 0..12u8 {
        publish_one(&mut client, event("kept", &[i])).await;
    }

    // Events published after `long_ago` were dropped: the replay cannot start where asked.
    let (subscribed, mut stream) = subscribe(
        &mut client,
        request_from("kept", Start::FromTime(timestamp(long_ago))),
    )
    .await;
    assert!(subscribed.start_truncated, "{subscribed:?}");
    assert_eq!(subscribed.oldest_sequence, 8);
    assert_eq!(
        sequences(&replay(&mut stream).await.0),
        vec![8, 9, 10, 11, 12]
    );

    // A time no dropped event reaches is not a truncation.
    let held = replay(&mut stream_from(&mut client, Start::Earliest(())).await)
        .await
        .0;
    let since = held[2].publish_time.unwrap();
    let (subscribed, mut stream) =
        subscribe(&mut client, request_from("kept", Start::FromTime(since))).await;
    assert!(!subscribed.start_truncated, "{subscribed:?}");
    let replayed = sequences(&replay(&mut stream).await.0);
    assert_eq!(replayed.last(), Some(&12));
    assert!(replayed[0] > 8, "{replayed:?}");
}

async fn stream_from(client: &mut Client, start: Start) -> Stream {
    subscribe(client, request_from(">", start)).await.1
}

#[tokio::test]
async fn earliest_on_a_busy_bus_at_its_retention_limit_replays_what_is_held() {
    let bus = TestBus::start_with(BusConfig {
        retention_max_events: 50,
        ..BusConfig::default()
    })
    .await;
    // Every publish now drops the oldest event, as on any long-running bus at its limit.
    let mut client = bus.client().await;
    for i in 0..100u8 {
        publish_one(&mut client, event("busy", &[i])).await;
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let mut publishers = Vec::new();
    for _ in 0..4 {
        let mut client = bus.client().await;
        let stop = stop.clone();
        publishers.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let batch = (0..20).map(|_| event("busy", b"more")).collect();
                publish(&mut client, batch).await;
            }
        }));
    }
    for start in [Start::Earliest(()), Start::AfterSequence(1)] {
        for round in 0..20 {
            let (subscribed, mut stream) =
                subscribe(&mut client, request_from("busy", start)).await;
            let mut last = 0;
            loop {
                match tokio::time::timeout(WAIT, stream.message()).await.unwrap() {
                    Ok(Some(response)) => match response.message.unwrap() {
                        Message::Event(event) => {
                            assert!(last == 0 || event.sequence == last + 1, "a gap");
                            last = event.sequence;
                        }
                        Message::CaughtUp(_) => break,
                        other => panic!("unexpected {other:?}"),
                    },
                    Ok(None) => panic!("ended"),
                    Err(status) => panic!(
                        "{start:?} round {round}: the replay of what is held failed: {status:?} \
                         ({subscribed:?})"
                    ),
                }
            }
        }
    }
    stop.cancel();
    for publisher in publishers {
        publisher.await.unwrap();
    }
}

#[tokio::test]
async fn events_past_their_age_are_not_replayed_though_nothing_was_published_since() {
    // On either store (`EVENTBUS_TEST_STORAGE`): age is judged when read, not on append.
    let bus = TestBus::start_with(BusConfig {
        retention_max_age: Some(Duration::from_millis(400)),
        ..BusConfig::default()
    })
    .await;
    let mut client = bus.client().await;
    for i in 0..3u8 {
        publish_one(&mut client, event("aged", &[i])).await;
    }
    let mut admin = bus.admin().await;
    // Nothing is published while the events age out.
    eventually("the events to age out", WAIT, || {
        let mut client = client.clone();
        async move {
            let (subscribed, _) =
                subscribe(&mut client, request_from("aged", Start::AfterSequence(0))).await;
            (subscribed.oldest_sequence == 0).then_some(())
        }
    })
    .await;
    let (subscribed, mut stream) =
        subscribe(&mut client, request_from("aged", Start::AfterSequence(0))).await;
    assert!(subscribed.start_truncated, "the lost events are reported");
    assert_eq!(subscribed.head_sequence, 3);
    let (replayed, head) = replay(&mut stream).await;
    assert!(replayed.is_empty(), "{replayed:?}");
    assert_eq!(head, 3);
    let (subscribed, _) = subscribe(
        &mut client,
        request_from("aged", Start::FromTime(timestamp(SystemTime::UNIX_EPOCH))),
    )
    .await;
    assert!(subscribed.start_truncated);
    let topics = topics(&mut admin).await;
    assert!(
        topics.iter().all(|t| t.events_held == 0),
        "nothing is counted as held: {topics:?}"
    );
    // A new event is held and replayed as usual.
    let sequence = publish_one(&mut client, event("aged", b"new")).await;
    let (_, mut stream) = subscribe(&mut client, request_from("aged", Start::Earliest(()))).await;
    assert_eq!(sequences(&replay(&mut stream).await.0), vec![sequence]);
}
