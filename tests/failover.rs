//! No single point of failure, proven with real process faults (issue #13): a 3-server NATS
//! cluster with JetStream (stream replicas 3), three `eventbus serve` processes on it, and SDK
//! clients that know all three bus nodes, under a steady publish load with known ids. Each case
//! injects one fault, keeps the load going, then checks what clients were told against the
//! stream itself:
//!
//! - every acknowledged event is in the stream exactly once, in acknowledgement order;
//! - the live subscriber delivered every event of its topic, gap-free and duplicate-free;
//! - the MANUAL-ack group member got every event at least once;
//! - a query after the fault is answered.
//!
//! The cases start their own NATS cluster whatever `EVENTBUS_TEST_STORAGE` says, so they run in
//! the first (memory) pass of `scripts/test.sh` only, against the machine's nats-server.
//!
//! Each case prints one `fault-report` line (time to recover as the publisher and the
//! subscriber saw it: the longest pause between consecutive acknowledgements and deliveries),
//! which README "Failover" tabulates. Every wait is bounded.

mod bus_process;
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_process::BusProcess;
use common::nats::{free_port, NatsCluster};
use eventbus::pb;
use eventbus::sdk::{
    Client, ManualAck, PublisherOptions, Start, SubscribeOptions, SubscriptionItem,
};
use futures_util::StreamExt;

/// The longest any wait may take.
const WAIT: Duration = Duration::from_secs(60);
/// Events published before the fault, and at least this many after it.
const BEFORE: usize = 300;
const AFTER: usize = 300;

struct Cluster {
    nats: NatsCluster,
    buses: Vec<Option<BusProcess>>,
    ports: Vec<u16>,
    setup: Setup,
    /// The logs of bus processes stopped by the fault, by node, for a failure's report.
    retired: Vec<(usize, Vec<serde_json::Value>)>,
}

/// Which NATS servers the bus nodes are told of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// Every node: all three.
    AllServers,
    /// Node 0 (the publisher's): the first server only, so that it is connected there (it
    /// learns of the others from it, for reconnects); the others: all three.
    PublisherNodeOnFirstServer,
}

impl Cluster {
    async fn start(setup: Setup) -> Cluster {
        let nats = NatsCluster::start(3).await;
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut cluster = Cluster {
            nats,
            buses: Vec::new(),
            ports,
            setup,
            retired: Vec::new(),
        };
        for i in 0..3 {
            let bus = cluster.start_bus(i);
            cluster.buses.push(Some(bus));
        }
        cluster
    }

    fn start_bus(&self, i: usize) -> BusProcess {
        let listen = format!("127.0.0.1:{}", self.ports[i]);
        let urls = match self.setup {
            Setup::PublisherNodeOnFirstServer if i == 0 => self.nats.nodes[0].url.clone(),
            _ => self.nats.urls(),
        };
        BusProcess::start(
            &[
                "--storage",
                "jetstream",
                "--nats-url",
                &urls,
                "--jetstream-replicas",
                "3",
                "--listen",
                &listen,
            ],
            None,
        )
    }

    /// Stops node `i` (SIGTERM with a grace period when `grace` is given, else SIGKILL) and
    /// keeps its logs for [`Cluster::report`].
    fn stop_bus(&mut self, i: usize, grace: Option<Duration>) {
        let mut bus = self.buses[i].take().expect("a running node");
        match grace {
            Some(grace) => bus.terminate(grace),
            None => bus.kill(),
        }
        self.retired.push((i, bus.logs()));
    }

    /// Every node's warnings and errors (stopped ones first), one line each: what a failing
    /// case prints next to its own message.
    fn report(&self) -> String {
        let running = self
            .buses
            .iter()
            .enumerate()
            .filter_map(|(i, bus)| bus.as_ref().map(|bus| (i, bus.logs())));
        let mut out = String::new();
        for (i, logs) in self.retired.iter().cloned().chain(running) {
            for line in logs
                .iter()
                .filter(|l| l["level"] == "WARN" || l["level"] == "ERROR")
                .take(40)
            {
                out.push_str(&format!("\n  node {i}: {line}"));
            }
        }
        out
    }

    /// How many times the nodes replaced their append connection to NATS after it dropped
    /// (`store::jetstream::append`): the fault reached the path that keeps order across it.
    fn append_reconnects(&self) -> usize {
        let running = self
            .buses
            .iter()
            .filter_map(|bus| bus.as_ref().map(|bus| bus.logs()));
        self.retired
            .iter()
            .map(|(_, logs)| logs.clone())
            .chain(running)
            .flatten()
            .filter(|line| {
                line["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("the append connection to NATS dropped"))
            })
            .count()
    }

    /// The bus nodes' URLs, starting with node `first`.
    fn urls_from(&self, first: usize) -> Vec<String> {
        (0..3)
            .map(|k| format!("http://127.0.0.1:{}", self.ports[(first + k) % 3]))
            .collect()
    }
}

/// What the load's clients saw.
#[derive(Default)]
struct Seen {
    /// Publisher: (index, sequence, when acknowledged), in acknowledgement order.
    acked: Vec<(usize, u64, Instant)>,
    /// Publisher: events whose publish failed for good.
    failed: Vec<usize>,
    /// Subscriber: delivered sequences and when.
    delivered: Vec<(u64, Instant)>,
    /// MANUAL member: every sequence delivered (with repeats).
    group: Vec<u64>,
    /// Subscriber and member: how many times they resumed.
    resumed: usize,
}

struct Load {
    seen: Arc<Mutex<Seen>>,
    stop: tokio_util::sync::CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    publisher_done: tokio::task::JoinHandle<usize>,
}

async fn client(urls: Vec<String>, source: &str) -> Client {
    Client::builder(urls)
        .source(source)
        .connect_timeout(Duration::from_secs(1))
        .keepalive(Duration::from_secs(1))
        .connect()
        .await
        .expect("connect to the cluster")
}

/// Starts a subscriber (on node 1 first), a MANUAL group member (node 2 first), a query
/// responder (node 2 first) and a publisher (node 0 first), and waits until the subscriber and
/// member are confirmed.
async fn start_load(cluster: &Cluster) -> Load {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();

    let subscriber = client(cluster.urls_from(1), "watcher").await;
    let mut subscription = subscriber.subscribe("load.>").await.unwrap();
    {
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(item) = subscription.next().await {
                match item {
                    Ok(SubscriptionItem::Event(event)) => seen
                        .lock()
                        .unwrap()
                        .delivered
                        .push((event.sequence, Instant::now())),
                    Ok(SubscriptionItem::Resumed { .. }) => seen.lock().unwrap().resumed += 1,
                    Ok(_) => {}
                    Err(error) => panic!("the subscription ended: {error}"),
                }
            }
        }));
    }

    let worker = client(cluster.urls_from(2), "worker").await;
    let mut member = worker
        .subscribe_with(
            "load.>",
            SubscribeOptions::new()
                .group("workers")
                .start(Start::Earliest)
                .manual_ack(ManualAck {
                    ack_deadline: Duration::from_secs(2),
                    max_deliveries: 1000,
                    ..ManualAck::default()
                }),
        )
        .await
        .unwrap();
    {
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(item) = member.next().await {
                match item {
                    Ok(SubscriptionItem::Delivery(delivery)) => {
                        seen.lock().unwrap().group.push(delivery.event.sequence);
                        // An ack lost with a node is redelivered: at least once.
                        let _ = delivery.ack().await;
                    }
                    Ok(SubscriptionItem::Resumed { .. }) => seen.lock().unwrap().resumed += 1,
                    Ok(_) => {}
                    Err(error) => panic!("the group member ended: {error}"),
                }
            }
        }));
    }

    let responder = client(cluster.urls_from(2), "pong-service").await;
    tasks.push(tokio::spawn(async move {
        let ended = responder
            .serve(
                "ping.query",
                "",
                |event: pb::Event| async move {
                    Ok::<_, std::convert::Infallible>(eventbus::sdk::Reply::new(event.data))
                },
                // Answers until the case ends (the task is aborted then).
                std::future::pending::<()>(),
            )
            .await;
        panic!("the responder ended: {ended:?}");
    }));

    let publishing = client(cluster.urls_from(0), "loader").await;
    let publisher = publishing.publisher_with(PublisherOptions {
        retries: 1000,
        max_in_flight: 4,
        ..PublisherOptions::default()
    });
    let publisher_done = {
        let seen = seen.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut pending = futures_util::stream::FuturesOrdered::new();
            let mut index = 0;
            loop {
                if stop.is_cancelled() {
                    break;
                }
                let event = pb::Event {
                    topic: "load.tick".into(),
                    id: format!("tick-{index}"),
                    data: index.to_string().into_bytes().into(),
                    ..Default::default()
                };
                let ack = publisher.submit(event).await.unwrap();
                let i = index;
                pending.push_back(async move { (i, ack.await) });
                index += 1;
                // A steady load of about 500 events/s; answers are collected as they come.
                let pause = tokio::time::sleep(Duration::from_millis(2));
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        _ = &mut pause => break,
                        Some((i, answer)) = pending.next() => record(&seen, i, answer),
                    }
                }
            }
            while let Some((i, answer)) = pending.next().await {
                record(&seen, i, answer);
            }
            let _ = publisher.close().await;
            index
        })
    };
    Load {
        seen,
        stop,
        tasks,
        publisher_done,
    }
}

fn record(seen: &Mutex<Seen>, index: usize, answer: eventbus::sdk::Result<u64>) {
    let mut seen = seen.lock().unwrap();
    match answer {
        Ok(sequence) => seen.acked.push((index, sequence, Instant::now())),
        Err(_) => seen.failed.push(index),
    }
}

impl Load {
    fn acked(&self) -> usize {
        self.seen.lock().unwrap().acked.len()
    }

    async fn wait_acked(&self, count: usize, cluster: &Cluster) {
        let deadline = Instant::now() + WAIT;
        while self.acked() < count {
            assert!(
                Instant::now() < deadline,
                "only {} of {count} publishes acknowledged; bus warnings:{}",
                self.acked(),
                cluster.report()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The longest pause between consecutive instants, in ms.
fn longest_pause(times: &[Instant]) -> u128 {
    times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .max()
        .unwrap_or(0)
}

/// Runs the load, applies `fault` once `BEFORE` events are acknowledged, keeps the load going
/// for `AFTER` more, and checks every criterion.
async fn survive<F, Fut>(name: &str, setup: Setup, fault: F)
where
    F: FnOnce(Cluster) -> Fut,
    Fut: std::future::Future<Output = Cluster>,
{
    if std::env::var("EVENTBUS_TEST_STORAGE").is_ok_and(|storage| storage != "memory") {
        eprintln!("{name}: runs in the memory pass of scripts/test.sh only");
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "eventbus=info".into()),
        )
        // Through the test harness's capture: shown for a failing case only.
        .with_test_writer()
        .try_init();
    let cluster = Cluster::start(setup).await;
    let load = start_load(&cluster).await;
    load.wait_acked(BEFORE, &cluster).await;
    let fault_at = Instant::now();
    let cluster = fault(cluster).await;
    let fault_took = fault_at.elapsed();
    load.wait_acked(BEFORE + AFTER, &cluster).await;
    load.stop.cancel();
    let published = tokio::time::timeout(WAIT, load.publisher_done)
        .await
        .expect("the publisher finishes")
        .unwrap();

    // A surviving node answers a query, possibly after the client moves on.
    let survivor = cluster
        .buses
        .iter()
        .position(Option::is_some)
        .expect("a bus node runs");
    let asker = client(cluster.urls_from(survivor), "asker").await;
    let deadline = Instant::now() + WAIT;
    loop {
        match asker
            .query("ping.query", "hello", Duration::from_secs(5))
            .await
        {
            Ok(reply) => {
                assert_eq!(&reply.data[..], b"hello");
                break;
            }
            Err(error) => {
                if Instant::now() >= deadline {
                    let mut counts = Vec::new();
                    for i in 0..3 {
                        if cluster.buses[i].is_some() {
                            let c = client(vec![cluster.urls_from(i)[0].clone()], "debug").await;
                            let topics = c.list_topics(Some("ping.>")).await.unwrap();
                            counts.push((
                                i,
                                topics
                                    .iter()
                                    .map(|t| (t.name.clone(), t.subscriber_count))
                                    .collect::<Vec<_>>(),
                            ));
                        }
                    }
                    panic!("{name}: no query answered after the fault: {error}; asker on {:?}; subscribers {counts:?}", asker.current_url());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    // The stream as it is: every `load.tick` event, from the earliest.
    let reader = client(cluster.urls_from(survivor), "auditor").await;
    let mut replay = reader
        .subscribe_with("load.>", SubscribeOptions::new().start(Start::Earliest))
        .await
        .unwrap();
    // Read on past the reader's caught-up point until the last acknowledged sequence: the node
    // it reads from may not have routed yet what another node acknowledged (a node's caught-up
    // point is what it has routed; its NATS connection may have been the one cut).
    let last_acked = {
        let seen = load.seen.lock().unwrap();
        seen.acked
            .iter()
            .map(|(_, sequence, _)| *sequence)
            .max()
            .unwrap_or(0)
    };
    let mut stored: Vec<(u64, String)> = Vec::new();
    let mut head = None;
    while head.is_none()
        || stored
            .last()
            .is_none_or(|(sequence, _)| *sequence < last_acked)
    {
        match tokio::time::timeout(WAIT, replay.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{name}: the replay stopped at {:?}, caught up at {head:?}, short of the last \
                     acknowledged sequence {last_acked}",
                    stored.last()
                )
            }) {
            Some(Ok(SubscriptionItem::Event(event))) => stored.push((event.sequence, event.id)),
            Some(Ok(SubscriptionItem::CaughtUp { sequence })) => head = Some(sequence),
            Some(Ok(_)) => {}
            other => panic!("{name}: replay ended: {other:?}"),
        }
    }
    let head = head.expect("caught up");
    let stored_sequences: Vec<u64> = stored.iter().map(|(s, _)| *s).collect();
    let mut by_id: HashMap<&str, Vec<u64>> = HashMap::new();
    for (sequence, id) in &stored {
        by_id.entry(id.as_str()).or_default().push(*sequence);
    }
    let duplicates = by_id.values().filter(|s| s.len() > 1).count();

    // Let the subscriber and the group catch up with the stream.
    let last = *stored_sequences.last().unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let caught_up = {
            let seen = load.seen.lock().unwrap();
            let delivered_last = seen.delivered.last().map_or(0, |d| d.0);
            let group_has_all = {
                let group: std::collections::HashSet<u64> = seen.group.iter().copied().collect();
                stored_sequences.iter().all(|s| group.contains(s))
            };
            if delivered_last >= last && group_has_all {
                true
            } else {
                if Instant::now() >= deadline {
                    let group: std::collections::HashSet<u64> =
                        seen.group.iter().copied().collect();
                    let missing: Vec<u64> = stored_sequences
                        .iter()
                        .copied()
                        .filter(|s| !group.contains(s))
                        .take(20)
                        .collect();
                    panic!(
                        "{name}: subscriber at {delivered_last}, group complete: {group_has_all} \
                 (missing {missing:?}), stream at {last}; bus warnings:{}",
                        cluster.report()
                    );
                }
                false
            }
        };
        if caught_up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for task in &load.tasks {
        task.abort();
    }

    let seen = load.seen.lock().unwrap();
    // Every acknowledged event is stored exactly once, at the sequence it was acknowledged with.
    assert_eq!(duplicates, 0, "{name}: events stored twice");
    for (index, sequence, _) in &seen.acked {
        let id = format!("tick-{index}");
        if by_id.get(id.as_str()).map(Vec::as_slice) != Some(&[*sequence][..]) {
            let gaps: Vec<(u64, u64)> = stored_sequences
                .windows(2)
                .filter(|w| w[1] != w[0] + 1)
                .map(|w| (w[0], w[1]))
                .take(10)
                .collect();
            let at_sequence: Vec<&(u64, String)> =
                stored.iter().filter(|(s, _)| s == sequence).collect();
            let delivered = seen.delivered.iter().any(|(s, _)| s == sequence);
            panic!(
                "{name}: acknowledged {id} at {sequence}, stored at {:?}; the replay (on node \
                 {survivor}) held {} events, {:?}..={:?}, caught up at {head}, gaps {gaps:?}, \
                 at {sequence}: {at_sequence:?}; the live subscriber delivered {sequence}: \
                 {delivered}; bus warnings:{}",
                by_id.get(id.as_str()),
                stored.len(),
                stored_sequences.first(),
                stored_sequences.last(),
                cluster.report()
            );
        }
    }
    // In publish order: a later event of the one publisher has a later sequence, also for
    // events JetStream lost with its stream leader or a node's connection, and the bus sent
    // again (see README "Failover").
    let mut in_order: Vec<(usize, u64)> = seen.acked.iter().map(|(i, s, _)| (*i, *s)).collect();
    in_order.sort_unstable();
    let inversions: Vec<_> = in_order.windows(2).filter(|w| w[0].1 > w[1].1).collect();
    let reordered = inversions.len();
    assert!(
        reordered == 0,
        "{name}: sequences follow the publish order ({reordered} inversions, (index, sequence) \
         pairs: {:?}); bus warnings:{}",
        &inversions[..reordered.min(10)],
        cluster.report()
    );
    assert!(
        seen.failed.is_empty(),
        "{name}: publishes failed for good: {:?}",
        seen.failed.len()
    );
    // The live subscriber: every event of its topic from its first on, in order, once.
    let delivered: Vec<u64> = seen.delivered.iter().map(|d| d.0).collect();
    let first = delivered[0];
    let expected: Vec<u64> = stored_sequences
        .iter()
        .copied()
        .filter(|s| *s >= first)
        .collect();
    assert_eq!(delivered, expected, "{name}: the subscriber's deliveries");
    assert!(last >= last_acked);

    let publisher_pause = longest_pause(&seen.acked.iter().map(|a| a.2).collect::<Vec<_>>());
    let subscriber_pause = longest_pause(&seen.delivered.iter().map(|d| d.1).collect::<Vec<_>>());
    eprintln!(
        "fault-report {{\"fault\":\"{name}\",\"published\":{published},\"acknowledged\":{},\"stored\":{},\"duplicates_stored\":{duplicates},\"lost\":0,\"reordered\":{reordered},\"publisher_pause_ms\":{publisher_pause},\"subscriber_pause_ms\":{subscriber_pause},\"group_redeliveries\":{},\"resumes\":{},\"fault_took_ms\":{},\"append_reconnects\":{}}}",
        seen.acked.len(),
        stored.len(),
        seen.group.len() - stored.len(),
        seen.resumed,
        fault_took.as_millis(),
        cluster.append_reconnects()
    );
    drop(seen);
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_nats_server_that_leads_the_stream() {
    survive(
        "kill -9 the stream's NATS leader",
        Setup::AllServers,
        |mut cluster| async move {
            let leader = cluster.nats.leader_of("EVENTBUS").await;
            cluster.nats.nodes[leader].kill();
            cluster
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_bus_node_with_clients_on_it() {
    // Node 2 has the group member and the responder; node 1 the subscriber; node 0 the
    // publisher. Kill the member's node.
    survive(
        "kill -9 a bus node",
        Setup::AllServers,
        |mut cluster| async move {
            cluster.stop_bus(2, None);
            cluster
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_bus_node() {
    survive(
        "SIGTERM rolling restart",
        Setup::AllServers,
        |mut cluster| async move {
            for i in 0..3 {
                cluster.stop_bus(i, Some(Duration::from_secs(30)));
                let restarted = cluster.start_bus(i);
                cluster.buses[i] = Some(restarted);
            }
            cluster
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_and_restarting_the_nats_server_a_publishing_node_is_connected_to() {
    // What the publishing node's NATS client held unsent when its connection dropped must
    // never reach the stream after the resends (`store::jetstream::append`).
    survive(
        "kill -9 the publishing node's NATS server, restart it 1 s later",
        Setup::PublisherNodeOnFirstServer,
        |mut cluster| async move {
            cluster.nats.nodes[0].kill();
            tokio::time::sleep(Duration::from_secs(1)).await;
            cluster.nats.nodes[0].start();
            cluster
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_server_cut_off_and_back() {
    survive(
        "SIGSTOP the leader 3 s, SIGCONT",
        Setup::AllServers,
        |cluster| async move {
            let leader = cluster.nats.leader_of("EVENTBUS").await;
            cluster.nats.nodes[leader].signal(libc::SIGSTOP);
            tokio::time::sleep(Duration::from_secs(3)).await;
            cluster.nats.nodes[leader].signal(libc::SIGCONT);
            cluster
        },
    )
    .await;
}
