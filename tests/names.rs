//! State keyed by names that clients choose (topics, sources, subscribers): bounded, forgotten
//! once idle, listed in pages of bounded size, and never computed under the lock publishers
//! need.

mod bus_process;
mod common;
mod support;

use std::time::{Duration, Instant};

use bus_process::BusProcess;
use common::{eventually, TestBus};
use eventbus::config::BusConfig;
use eventbus::pb;
use eventbus::pb::admin_service_client::AdminServiceClient;
use eventbus::pb::event_bus_service_client::EventBusServiceClient;
use prost::Message as _;
use support::*;
use tonic::transport::Channel;

const MIB: f64 = 1024.0 * 1024.0;

/// `count` events, each to its own topic `<prefix>.<i>` from its own source, published in
/// batches of 5,000.
async fn publish_names(client: &mut EventBusServiceClient<Channel>, prefix: &str, count: usize) {
    let mut next = 0;
    while next < count {
        let end = (next + 5_000).min(count);
        let events = (next..end)
            .map(|i| pb::Event {
                topic: format!("{prefix}.{i}"),
                source: format!("{prefix}-source-{i}"),
                ..Default::default()
            })
            .collect();
        publish(client, events).await;
        next = end;
    }
}

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

async fn topology(
    admin: &mut AdminServiceClient<Channel>,
    max_edges: u32,
) -> pb::GetTopologyResponse {
    admin
        .get_topology(pb::GetTopologyRequest { max_edges })
        .await
        .unwrap()
        .into_inner()
}

/// 200,000 topics, each from its own source, on a real `eventbus serve`: once they are idle
/// (and retention has dropped their events) the bus forgets them, and its resident memory comes
/// back near where it was before them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_names_age_out_and_memory_returns_near_its_baseline() {
    const NAMES: usize = 200_000;
    const RETAINED: usize = 1_000;
    let bus = BusProcess::start(
        &[
            "--retention-max-events",
            "1000",
            "--names-idle-after",
            "2s",
            "--max-names",
            "1000000",
        ],
        None,
    );
    let channel = Channel::from_shared(bus.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = EventBusServiceClient::new(channel.clone());
    let admin = AdminServiceClient::new(channel);
    let forgotten = |admin: &AdminServiceClient<Channel>| {
        let mut admin = admin.clone();
        async move {
            let names = all_topics(&mut admin, 10_000).await;
            let graph = topology(&mut admin, 0).await;
            // What retention still holds is kept: its topics and their edges.
            (names.len() <= RETAINED && graph.edges.len() <= RETAINED).then_some(())
        }
    };

    // Warm up the paths (buffers, pools) with names of their own, and let them go.
    publish_names(&mut client, "warm", 20_000).await;
    eventually("the warm-up names to be forgotten", WAIT, || {
        forgotten(&admin)
    })
    .await;
    let baseline = bus.rss_bytes();

    let mut rounds = Vec::new();
    for round in 0..3 {
        let mut peak = 0;
        for batch in 0..NAMES / 20_000 {
            publish_names(&mut client, &format!("n{round}-{batch}"), 20_000).await;
            peak = peak.max(bus.rss_bytes());
        }
        eventually("the idle names to be forgotten", WAIT, || forgotten(&admin)).await;
        rounds.push((peak, bus.rss_bytes()));
    }
    let mib = |bytes: u64| bytes.saturating_sub(baseline) as f64 / MIB;
    println!(
        "RSS over a baseline of {:.1} MiB: {}",
        baseline as f64 / MIB,
        rounds
            .iter()
            .map(|(peak, after)| format!(
                "+{:.1} MiB with {NAMES} names, +{:.1} MiB after they aged out",
                mib(*peak),
                mib(*after)
            ))
            .collect::<Vec<_>>()
            .join("; then ")
    );
    // Names are forgotten while later ones are still published (2 s idle), so the highest
    // peak is the best measure of what 200,000 names cost.
    let cost = rounds
        .iter()
        .map(|(peak, _)| mib(*peak))
        .fold(0.0, f64::max);
    assert!(
        cost > 20.0,
        "200,000 names should cost memory while known: +{cost:.1} MiB"
    );
    for (index, (_, after)) in rounds.iter().enumerate() {
        assert!(
            mib(*after) < 0.5 * cost,
            "round {index}: memory should come back towards its baseline: +{:.1} MiB of \
             +{cost:.1} MiB remain",
            mib(*after),
        );
    }
    let (first, last) = (rounds[0].1, rounds[rounds.len() - 1].1);
    assert!(
        mib(last) < mib(first) + 0.25 * cost,
        "memory should not accumulate round after round: +{:.1} MiB, then +{:.1} MiB",
        mib(first),
        mib(last)
    );
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

/// A publisher's worst latency while GetTopology and ListTopics run over a large graph (1,000
/// wildcard patterns, 200,000 topics and sources) stays far below the time those calls take:
/// the matching and sorting happen outside the routing lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_do_not_wait_for_listings_of_many_names() {
    const PATTERNS: usize = 1_000;
    const NAMES: usize = 200_000;
    let bus = TestBus::start_with(BusConfig {
        max_names: 1_000_000,
        ..BusConfig::default()
    })
    .await;
    let mut client = bus.client().await;
    let mut admin = bus.admin().await;
    // Subscriptions that ended stay in the graph (until idle), so each pattern draws MATCHES
    // edges to the topics it catches.
    for index in 0..PATTERNS {
        let (_, stream) = subscribe(
            &mut client,
            pb::SubscribeRequest {
                subscriber: format!("watcher-{index}"),
                ..request(&format!("*.{index}"))
            },
        )
        .await;
        drop(stream);
    }
    publish_names(&mut client, "n", NAMES).await;

    let (done_tx, mut done) = tokio::sync::oneshot::channel::<()>();
    let mut publisher = bus.client().await;
    let latencies = tokio::spawn(async move {
        let mut worst = Duration::ZERO;
        let mut count = 0u32;
        while done.try_recv().is_err() {
            let started = Instant::now();
            publish_one(&mut publisher, common::event("probe", b"")).await;
            worst = worst.max(started.elapsed());
            count += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (worst, count)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let graph = topology(&mut admin, 100_000).await;
    let topology_took = started.elapsed();
    let started = Instant::now();
    let page = admin
        .list_topics(pb::ListTopicsRequest {
            page_size: 10_000,
            page_token: "n.5".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let list_took = started.elapsed();
    done_tx.send(()).unwrap();
    let (worst, count) = latencies.await.unwrap();
    println!(
        "GetTopology ({} edges, truncated {}) took {topology_took:?}, ListTopics (a page of {}) \
         took {list_took:?}; {count} publishes meanwhile, the slowest took {worst:?}",
        graph.edges.len(),
        graph.truncated,
        page.topics.len(),
    );
    assert_eq!(page.topics.len(), 10_000);
    assert!(count > 10, "the publisher kept going: {count}");
    let calls = topology_took + list_took;
    assert!(
        worst < calls / 4,
        "a publish waited {worst:?} while the listings took {calls:?}"
    );
}
