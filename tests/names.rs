//! State keyed by names that clients choose (topics, sources, subscribers): bounded, forgotten
//! once idle, and listed in pages of bounded size. That listings are never computed under the
//! lock publishers need is `tests/names_lock.rs`, a binary of its own.

mod common;
mod support;

use std::time::Duration;

use common::TestBus;
use eventbus::config::BusConfig;
use eventbus::pb;
use eventbus::pb::admin_service_client::AdminServiceClient;
use prost::Message as _;
use support::*;
use tonic::transport::Channel;

/// Every topic, following the pages; checks each page is within `page_size` and that names
/// come sorted and never twice.
async fn all_topics(admin: &mut AdminServiceClient<Channel>, page_size: u32) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = admin
            .list_topics(pb::ListTopicsRequest {
                page_size,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.topics.len() <= page_size as usize);
        for topic in page.topics {
            assert!(
                names.last().is_none_or(|last| *last < topic.name),
                "{} after {:?}",
                topic.name,
                names.last()
            );
            names.push(topic.name);
        }
        if page.next_page_token.is_empty() {
            return names;
        }
        page_token = page.next_page_token;
    }
}

/// Listings stay within their page bounds however many names there are, and the pages together
/// list every topic once, in order.
#[tokio::test]
async fn listings_stay_within_their_page_bounds() {
    const NAMES: usize = 25_000;
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let mut admin = bus.admin().await;
    publish_names(&mut client, "p", NAMES).await;

    let first = admin
        .list_topics(pb::ListTopicsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.topics.len(), 1_000, "the default page size");
    assert!(!first.next_page_token.is_empty());
    let largest = admin
        .list_topics(pb::ListTopicsRequest {
            page_size: 1_000_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(largest.topics.len(), 10_000, "the maximum page size");
    assert_eq!(all_topics(&mut admin, 7_777).await.len(), NAMES);
    // The SDK (and so `eventbus topics`) follows the pages to the last.
    let sdk = eventbus::sdk::Client::connect(&bus.url()).await.unwrap();
    assert_eq!(sdk.list_topics(None).await.unwrap().len(), NAMES);

    let graph = topology(&mut admin, 0).await;
    assert_eq!(graph.edges.len(), 10_000, "the default edge bound");
    assert!(graph.truncated);
    assert!(graph.encoded_len() < 4 * 1024 * 1024);
    let small = topology(&mut admin, 5).await;
    assert_eq!(small.edges.len(), 5);
    assert!(small.truncated);
    for end in small.edges.iter().flat_map(|e| [&e.from, &e.to]) {
        assert!(small.nodes.iter().any(|n| &n.id == end), "{end} is a node");
    }
    assert!(small.nodes.len() <= 10);
    // Asked for more than the bytes allow, the graph is cut by size.
    let most = topology(&mut admin, 100_000).await;
    assert!(most.truncated);
    assert!(most.edges.len() > 10_000 && most.edges.len() < NAMES);
    assert!(most.encoded_len() < 4 * 1024 * 1024);
}

/// Past `max_names`, names are counted, not tracked.
#[tokio::test]
async fn names_past_the_cap_are_counted_not_tracked() {
    let bus = TestBus::start_with(BusConfig {
        max_names: 100,
        ..BusConfig::default()
    })
    .await;
    let mut client = bus.client().await;
    let mut admin = bus.admin().await;
    publish_names(&mut client, "c", 150).await;
    let page = admin
        .list_topics(pb::ListTopicsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.topics.len(), 100);
    assert_eq!(page.untracked_events, 50);
    let graph = topology(&mut admin, 0).await;
    assert_eq!(graph.edges.len(), 100);
    assert!(!graph.truncated);
    assert_eq!(graph.untracked_events, 50);
    // Known topics still count.
    publish_one(&mut client, common::event("c.0", b"")).await;
    let page = admin
        .list_topics(pb::ListTopicsRequest {
            pattern: "c.0".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.topics[0].events_published, 2);
}

/// The next event of a MANUAL-ack stream: its sequence and delivery attempt.
async fn next_attempt(stream: &mut Stream) -> (u64, u32) {
    loop {
        let message = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("a delivery in time")
            .unwrap()
            .expect("open");
        if let Some(pb::subscribe_response::Message::Event(event)) = message.message {
            return (event.sequence, message.delivery_attempt);
        }
    }
}

/// A MANUAL-ack group whose members left parks and, after `names_idle_after`, is unloaded; the
/// next member resumes it from the cursor the store saved (on either store), and what was
/// delivered and not acked comes again.
#[tokio::test]
async fn an_abandoned_manual_group_resumes_from_its_saved_cursor() {
    let idle = Duration::from_millis(300);
    let bus = TestBus::start_with(BusConfig {
        names_idle_after: idle,
        ..BusConfig::default()
    })
    .await;
    let mut client = bus.client().await;
    let member = pb::SubscribeRequest {
        group: "workers".into(),
        subscriber: "worker".into(),
        ack_mode: pb::AckMode::Manual as i32,
        ..request("jobs.>")
    };
    let (_, mut stream) = subscribe(&mut client, member.clone()).await;
    let sequences = publish(
        &mut client,
        (0..3).map(|i| common::event("jobs.run", &[i])).collect(),
    )
    .await;
    assert_eq!(next_attempt(&mut stream).await, (sequences[0], 1));
    assert_eq!(next_attempt(&mut stream).await, (sequences[1], 1));
    client
        .ack(pb::AckRequest {
            group: "workers".into(),
            sequences: vec![sequences[0]],
        })
        .await
        .unwrap();
    drop(stream);
    // Parked, saved, then unloaded after the idle time: an Ack then names no group. An Ack also
    // wakes a parked group (restarting its idle time), so polls come less often than that.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        tokio::time::sleep(idle * 3).await;
        let answer = client
            .ack(pb::AckRequest {
                group: "workers".into(),
                sequences: vec![u64::MAX],
            })
            .await;
        if matches!(answer, Err(status) if status.code() == tonic::Code::NotFound) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the idle group was never unloaded"
        );
    }
    let (subscribed, mut stream) = subscribe(&mut client, member).await;
    assert_eq!(subscribed.group_cursor, sequences[0]);
    // Unloaded, the group forgot the delivery counts (as a restart does); parked alone, it keeps
    // them (the broker's unit tests check that).
    assert_eq!(next_attempt(&mut stream).await, (sequences[1], 1));
    assert_eq!(next_attempt(&mut stream).await, (sequences[2], 1));
}
