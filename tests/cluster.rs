//! Several bus nodes on one JetStream stream behave as one bus: a publish on one node reaches
//! subscribers on every node in sequence order, replays and topic counts on any node cover
//! every node's events, topics and the topology on any node show every node's subscribers, a query on one node is answered by a responder on another, and
//! idempotent publish holds across nodes. Also what a node does when NATS is away: it refuses
//! to start, or goes NOT_SERVING and refuses publishes until NATS is back.
//!
//! Each test starts its own nats-server (`$EVENTBUS_TEST_NATS_SERVER` or `nats-server`).

mod bus_process;
mod common;
mod support;

use std::time::{Duration, Instant};

use common::nats::NatsServer;
use common::{event, eventually, jetstream_storage, TestBus};
use eventbus::config::BusConfig;
use eventbus::pb;
use eventbus::pb::subscribe_request::Start;
use eventbus::pb::subscribe_response::Message;
use support::*;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

type Stream = tonic::Streaming<pb::SubscribeResponse>;

async fn two_nodes(nats: &NatsServer) -> (TestBus, TestBus) {
    let a = TestBus::start_on(BusConfig::default(), jetstream_storage(nats)).await;
    let b = TestBus::start_on(BusConfig::default(), jetstream_storage(nats)).await;
    (a, b)
}

fn numbered(topic: &str, source: &str, n: usize) -> pb::Event {
    pb::Event {
        source: source.to_owned(),
        id: format!("{source}-{n}"),
        ..event(topic, n.to_string().as_bytes())
    }
}

#[tokio::test]
async fn publishes_on_every_node_reach_subscribers_on_every_node_in_one_order() {
    let nats = NatsServer::start();
    let (a, b) = two_nodes(&nats).await;
    let mut on_a = a.client().await;
    let mut on_b = b.client().await;
    // Registered just before the first publish, on each node.
    let (_, mut watch_a) = subscribe(&mut on_a, request("orders.>")).await;
    let (_, mut watch_b) = subscribe(&mut on_b, request("orders.>")).await;

    let mut published = Vec::new();
    for round in 0..20 {
        let batch = |source: &str| {
            (0..10)
                .map(|i| numbered("orders.created", source, round * 10 + i))
                .collect()
        };
        published.extend(publish(&mut on_a, batch("node-a-publisher")).await);
        published.extend(publish(&mut on_b, batch("node-b-publisher")).await);
    }
    published.sort_unstable();
    assert_eq!(
        published,
        (1..=400).collect::<Vec<_>>(),
        "one total order across the nodes, no gap"
    );
    for (node, stream) in [("a", &mut watch_a), ("b", &mut watch_b)] {
        let got = sequences(&events(stream, published.len()).await);
        assert_eq!(
            got, published,
            "node {node}: every event once, in sequence order"
        );
    }
    // Both nodes saw the same events with the same content.
    let (_, mut replay_b) =
        subscribe(&mut on_b, request_from("orders.>", Start::Earliest(()))).await;
    let replayed = events(&mut replay_b, 400).await;
    assert_eq!(sequences(&replayed), published);
    assert_eq!(replayed[0].source, "node-a-publisher");
    assert_eq!(replayed[10].source, "node-b-publisher");
    assert_eq!(caught_up(&mut replay_b).await, 400);
}

#[tokio::test]
async fn a_retried_publish_on_another_node_is_stored_once() {
    let nats = NatsServer::start();
    let (a, b) = two_nodes(&nats).await;
    let mut on_a = a.client().await;
    let mut on_b = b.client().await;
    let first = on_a
        .publish(pb::PublishRequest {
            events: vec![numbered("pay.done", "payments", 7)],
        })
        .await
        .unwrap()
        .into_inner();
    let again = on_b
        .publish(pb::PublishRequest {
            events: vec![
                numbered("pay.done", "payments", 7),
                numbered("pay.done", "payments", 8),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.duplicates, [false]);
    assert_eq!(again.duplicates, [true, false]);
    assert_eq!(
        again.sequences[0], first.sequences[0],
        "the original's sequence"
    );
    let (_, mut replay) = subscribe(&mut on_a, request_from("pay.>", Start::Earliest(()))).await;
    let stored = events(&mut replay, 2).await;
    assert_eq!(sequences(&stored), [1, 2]);
    assert_eq!(
        caught_up(&mut replay).await,
        2,
        "the retry was not stored again"
    );
}

#[tokio::test]
async fn a_query_on_one_node_is_answered_by_a_responder_on_another() {
    let nats = NatsServer::start();
    let (a, b) = two_nodes(&nats).await;
    let mut responder_client = b.client().await;
    let (_, mut queries) = subscribe(
        &mut responder_client,
        pb::SubscribeRequest {
            subscriber: "user-service".into(),
            ..request("user.query")
        },
    )
    .await;
    let responder = tokio::spawn(async move {
        while let Ok(Some(response)) = queries.message().await {
            let Some(Message::Event(query)) = response.message else {
                continue;
            };
            let answer = pb::Event {
                source: "user-service".into(),
                correlation_id: query.correlation_id.clone(),
                ..event(&query.reply_to, &[b"re:", &query.data[..]].concat())
            };
            publish(&mut responder_client, vec![answer]).await;
        }
    });
    let mut asker = a.client().await;
    // The responder counts once node b has announced it: poll until the query is answered.
    let reply = eventually("a query answered across nodes", WAIT, || {
        let mut asker = asker.clone();
        async move {
            asker
                .query(pb::QueryRequest {
                    event: Some(pb::Event {
                        source: "query-service".into(),
                        ..event("user.query", b"42")
                    }),
                    timeout: Some(prost_types::Duration {
                        seconds: 5,
                        nanos: 0,
                    }),
                })
                .await
                .ok()
        }
    })
    .await
    .into_inner();
    assert_eq!(&reply.reply.unwrap().data[..], b"re:42");

    // Nobody on any node listens to this topic: no responders, at once.
    let started = Instant::now();
    let status = asker
        .query(pb::QueryRequest {
            event: Some(pb::Event {
                source: "query-service".into(),
                ..event("nobody.query", b"?")
            }),
            timeout: Some(prost_types::Duration {
                seconds: 10,
                nanos: 0,
            }),
        })
        .await
        .expect_err("no responders");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(reason(&status).as_deref(), Some("no-responders"));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered at once, not at the timeout"
    );
    responder.abort();
}

/// With principals, a reply published on another node than the asker's reaches it: that node
/// cannot see the waiting query, and admits the reply by the inbox (SECURITY.md, "Replies
/// across nodes").
#[tokio::test]
async fn with_principals_a_reply_through_another_node_reaches_the_asker() {
    use eventbus::auth::{hash_token, AuthConfig, PrincipalConfig};
    let nats = NatsServer::start();
    let entry = |name: &str, publish: &[&str], subscribe: &[&str]| PrincipalConfig {
        name: name.into(),
        token_hash: Some(hash_token(name)),
        cert_subject: None,
        cert_san: None,
        publish: publish.iter().map(|s| s.to_string()).collect(),
        publish_deny: vec![],
        subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
        subscribe_deny: vec![],
        groups: None,
        admin: false,
        sources: None,
        limits: None,
    };
    let auth = AuthConfig {
        principals: vec![
            entry("user-service", &[], &["user.query"]),
            entry("query-service", &["user.query"], &[]),
        ],
        ..AuthConfig::default()
    };
    let node = || {
        TestBus::start_exactly(eventbus::config::ServerConfig {
            storage: jetstream_storage(&nats),
            auth: auth.clone(),
            shutdown_grace: Duration::from_secs(5),
            ..Default::default()
        })
    };
    let (a, b) = (node().await, node().await);
    let with_token = |token: &'static str| {
        move |mut request: tonic::Request<()>| {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            Ok(request)
        }
    };
    let mut responder =
        eventbus::pb::event_bus_service_client::EventBusServiceClient::with_interceptor(
            b.channel().await,
            with_token("user-service"),
        );
    let mut queries = responder
        .subscribe(request("user.query"))
        .await
        .unwrap()
        .into_inner();
    tokio::spawn(async move {
        while let Ok(Some(response)) = queries.message().await {
            let Some(Message::Event(query)) = response.message else {
                continue;
            };
            let answer = pb::Event {
                source: "user-service".into(),
                correlation_id: query.correlation_id.clone(),
                ..event(&query.reply_to, b"answer")
            };
            responder
                .publish(pb::PublishRequest {
                    events: vec![answer],
                })
                .await
                .unwrap();
        }
    });
    let asker = eventbus::pb::event_bus_service_client::EventBusServiceClient::with_interceptor(
        a.channel().await,
        with_token("query-service"),
    );
    let reply = eventually("a query answered across nodes", WAIT, || {
        let mut asker = asker.clone();
        async move {
            asker
                .query(pb::QueryRequest {
                    event: Some(pb::Event {
                        source: "query-service".into(),
                        ..event("user.query", b"?")
                    }),
                    timeout: Some(prost_types::Duration {
                        seconds: 5,
                        nanos: 0,
                    }),
                })
                .await
                .ok()
        }
    })
    .await
    .into_inner();
    assert_eq!(&reply.reply.unwrap().data[..], b"answer");
}

#[tokio::test]
async fn topic_counts_on_every_node_cover_every_node() {
    let nats = NatsServer::start();
    let (a, b) = two_nodes(&nats).await;
    publish(
        &mut a.client().await,
        vec![event("stock.moved", b"1"), event("stock.moved", b"2")],
    )
    .await;
    publish(&mut b.client().await, vec![event("stock.moved", b"3")]).await;
    for node in [&a, &b] {
        let topic = listed_topic(node, "stock.moved", 3).await;
        assert_eq!(topic.events_held, 3);
        assert_eq!(topic.last_sequence, 3);
    }
}

/// Topic `name` as `node` lists it, once it counts `published` events (its tail routed them).
async fn listed_topic(node: &TestBus, name: &str, published: u64) -> pb::TopicInfo {
    let admin = node.admin().await;
    eventually("the node's tail to count the events", WAIT, || {
        let mut admin = admin.clone();
        async move {
            let topics = topics(&mut admin).await;
            topics
                .into_iter()
                .find(|t| t.name == name && t.events_published == published)
        }
    })
    .await
}

#[tokio::test]
async fn topics_and_topology_on_every_node_show_every_nodes_subscribers() {
    let nats = NatsServer::start();
    let (a, b) = two_nodes(&nats).await;
    // A wildcard subscriber on node a; a named one and an AUTO group's two members on node b.
    let mut on_a = a.client().await;
    let mut on_b = b.client().await;
    let named = |pattern: &str, subscriber: &str, group: &str| pb::SubscribeRequest {
        subscriber: subscriber.into(),
        group: group.into(),
        ..request(pattern)
    };
    let _watch = subscribe(&mut on_a, named("stock.*", "auditor", "")).await;
    let _listen = subscribe(&mut on_b, named("stock.moved", "warehouse", "")).await;
    let _member_b = subscribe(&mut on_b, named("stock.>", "pickers", "pickers")).await;
    let _member_b2 = subscribe(&mut on_b, named("stock.>", "pickers", "pickers")).await;
    publish(&mut on_a, vec![event("stock.moved", b"1")]).await;

    for node in [&a, &b] {
        let mut admin = node.admin().await;
        // Each node has routed the event (its tail), and sees the others' clients.
        let topic = listed_topic(node, "stock.moved", 1).await;
        // auditor, warehouse, and the two pickers.
        assert_eq!(topic.subscriber_count, 4, "{topic:?}");
        assert_eq!(topic.groups, vec!["pickers".to_string()]);

        let topology = topology(&mut admin, 0).await;
        let subscribes: Vec<(String, String, String, u32)> = topology
            .edges
            .iter()
            .filter(|e| e.kind == pb::EdgeKind::Subscribes as i32)
            .map(|e| {
                (
                    e.from.clone(),
                    e.to.clone(),
                    e.group.clone(),
                    e.active_subscriptions,
                )
            })
            .collect();
        for expected in [
            ("topic:stock.*", "service:auditor", "", 1),
            ("topic:stock.moved", "service:warehouse", "", 1),
            // One edge for the group, its two members counted together.
            ("topic:stock.>", "service:pickers", "pickers", 2),
        ] {
            let expected = (
                expected.0.to_string(),
                expected.1.to_string(),
                expected.2.to_string(),
                expected.3,
            );
            assert!(
                subscribes.contains(&expected),
                "{expected:?} not in {subscribes:?}"
            );
        }
        assert_eq!(subscribes.len(), 3, "{subscribes:?}");
    }
}

/// A node that cannot reach NATS at start says so in one line naming the URL and exits non-zero.
#[test]
fn a_node_that_cannot_reach_nats_at_start_exits_naming_the_url() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("nats://127.0.0.1:{}", dead.local_addr().unwrap().port());
    drop(dead);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_eventbus"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--storage",
            "jetstream",
            "--nats-url",
            &url,
        ])
        .env_remove("EVENTBUS_CONFIG")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains(&url)).collect();
    assert_eq!(errors.len(), 1, "one line names the URL: {stderr}");
    assert!(errors[0].contains("cannot reach NATS"), "{stderr}");
}

#[tokio::test]
async fn a_replay_of_what_the_node_just_routed_needs_no_answer_from_jetstream() {
    let nats = NatsServer::start();
    let bus = TestBus::start_on(BusConfig::default(), jetstream_storage(&nats)).await;
    let mut client = bus.client().await;
    let published = publish(
        &mut client,
        (0..5)
            .map(|i| numbered("orders.created", "recent", i))
            .collect(),
    )
    .await;
    assert_eq!(published, vec![1, 2, 3, 4, 5]);

    // JetStream stops answering (as while a stream leader is elected). The replay's reads,
    // one of them made under the routing lock, are of events this node's tail has just read:
    // they come from its record of the tail, not from a round trip that would wait for
    // JetStream (and hold up the node's routing meanwhile).
    // SAFETY: kill(2) on the test's own child process.
    unsafe { libc::kill(nats.pid() as i32, libc::SIGSTOP) };
    let started = Instant::now();
    let (_, mut replay) = subscribe(
        &mut client,
        request_from("orders.>", Start::AfterSequence(2)),
    )
    .await;
    assert_eq!(sequences(&events(&mut replay, 3).await), vec![3, 4, 5]);
    assert_eq!(caught_up(&mut replay).await, 5);
    // The Subscribe first asks JetStream for its last sequence, for at most 5 s; the reads
    // then wait for nothing (a read of the stream would have waited 10 s and failed).
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the replay took {:?}",
        started.elapsed()
    );
    unsafe { libc::kill(nats.pid() as i32, libc::SIGCONT) };
}

/// The JetStream API requests that change a stream (`$JS.API.STREAM.CREATE.<name>`,
/// `UPDATE.<name>`) seen so far by `watcher`, as `(verb, stream)`.
async fn stream_writes(
    client: &async_nats::Client,
    watcher: &mut async_nats::Subscriber,
) -> Vec<(String, String)> {
    // Every request a finished start sent was routed to the watcher before this flush's PONG.
    client.flush().await.unwrap();
    let mut writes = Vec::new();
    while let Some(Some(request)) =
        futures_util::FutureExt::now_or_never(futures_util::StreamExt::next(watcher))
    {
        let parts: Vec<&str> = request.subject.split('.').collect();
        if let [_, _, _, verb @ ("CREATE" | "UPDATE"), stream] = parts[..] {
            writes.push((verb.to_owned(), stream.to_owned()));
        }
    }
    writes
}

#[tokio::test]
async fn a_node_starting_beside_running_ones_changes_a_stream_only_when_its_limits_differ() {
    let nats = NatsServer::start();
    let first = eventbus::server::open_broker(&BusConfig::default(), &jetstream_storage(&nats))
        .await
        .unwrap();
    let client = async_nats::connect(&nats.url).await.unwrap();
    let mut watcher = client.subscribe("$JS.API.STREAM.>").await.unwrap();
    client.flush().await.unwrap();

    // Same limits: the second node only looks (on NATS 2.9 parallel writes to one stream could
    // wedge its API for seconds, nats-server #3677).
    let second = eventbus::server::open_broker(&BusConfig::default(), &jetstream_storage(&nats))
        .await
        .unwrap();
    assert_eq!(stream_writes(&client, &mut watcher).await, vec![]);

    // Other retention: the log's stream is updated, once; the cursors' stream stays.
    let smaller = BusConfig {
        retention_max_events: 1_000,
        ..BusConfig::default()
    };
    let third = eventbus::server::open_broker(&smaller, &jetstream_storage(&nats))
        .await
        .unwrap();
    assert_eq!(
        stream_writes(&client, &mut watcher).await,
        vec![("UPDATE".to_owned(), "EVENTBUS".to_owned())]
    );
    drop((first, second, third));
}

#[tokio::test]
async fn a_node_that_loses_nats_is_not_serving_and_refuses_publishes_until_it_is_back() {
    let mut nats = NatsServer::start();
    let bus = TestBus::start_on(BusConfig::default(), jetstream_storage(&nats)).await;
    let mut client = bus.client().await;
    let mut health = HealthClient::new(bus.channel().await);
    publish_one(&mut client, event("before.outage", b"1")).await;

    nats.kill();
    eventually("NOT_SERVING once NATS is gone", WAIT, || {
        let health = health.clone();
        async move {
            (support::server_health(&health).await == ServingStatus::NotServing as i32)
                .then_some(())
        }
    })
    .await;
    let refused = client
        .publish(pb::PublishRequest {
            events: vec![event("during.outage", b"2")],
        })
        .await
        .expect_err("refused while NATS is away");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("NATS"), "{refused:?}");

    nats.restart();
    eventually("SERVING once NATS is back", WAIT, || {
        let health = health.clone();
        async move {
            (support::server_health(&health).await == ServingStatus::Serving as i32).then_some(())
        }
    })
    .await;
    let sequence = eventually("a publish accepted again", WAIT, || {
        let mut client = client.clone();
        async move {
            client
                .publish(pb::PublishRequest {
                    events: vec![event("after.outage", b"3")],
                })
                .await
                .ok()
                .map(|r| r.into_inner().sequences[0])
        }
    })
    .await;
    assert_eq!(sequence, 2, "the log kept its events across the outage");
    let _ = &mut health;
}

/// Reads events from several streams at once until `done` says the tally is complete; each
/// event as (stream index, sequence, delivery attempt). Fails after [`WAIT`] without progress.
async fn gather(
    streams: &mut [&mut Stream],
    done: impl Fn(&[(usize, u64, u32)]) -> bool,
) -> Vec<(usize, u64, u32)> {
    let mut got = Vec::new();
    while !done(&got) {
        let reads = streams
            .iter_mut()
            .enumerate()
            .map(|(index, stream)| Box::pin(async move { (index, stream.message().await) }));
        let (index, read) = tokio::time::timeout(WAIT, futures_util::future::select_all(reads))
            .await
            .unwrap_or_else(|_| panic!("no event within {WAIT:?}; so far {got:?}"))
            .0;
        match read {
            Ok(Some(pb::SubscribeResponse {
                message: Some(Message::Event(event)),
                delivery_attempt,
                ..
            })) => got.push((index, event.sequence, delivery_attempt)),
            Ok(Some(_)) => {}
            other => panic!("stream {index} ended: {other:?}; so far {got:?}"),
        }
    }
    got
}

fn member(group: &str, subscriber: &str) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        group: group.into(),
        subscriber: subscriber.into(),
        ..request("invoices.>")
    }
}

/// An AUTO group with members on two nodes gets each event once: the node its first member
/// joined is its home, and a member on the other node is relayed there (each node routes
/// every event, so two nodes serving one group would deliver each event twice). The relayed
/// member gets its share, in sequence order, whichever node the events were published on.
#[tokio::test]
async fn an_auto_group_with_members_on_two_nodes_gets_each_event_once() {
    let nats = NatsServer::start();
    let (a, b) = two_nodes(&nats).await;
    let mut on_a = a.client().await;
    let mut on_b = b.client().await;
    let (_, mut home_1) = subscribe(&mut on_a, member("billing", "billing-a")).await;
    let (_, mut home_2) = subscribe(&mut on_a, member("billing", "billing-a")).await;
    let (_, mut relayed) = subscribe(&mut on_b, member("billing", "billing-b")).await;

    let mut published = publish(
        &mut on_b,
        (0..30).map(|i| event("invoices.sent", &[i])).collect(),
    )
    .await;
    published.extend(
        publish(
            &mut on_a,
            (30..60).map(|i| event("invoices.sent", &[i])).collect(),
        )
        .await,
    );
    let got = gather(&mut [&mut home_1, &mut home_2, &mut relayed], |got| {
        got.len() >= published.len()
    })
    .await;
    let mut sequences: Vec<u64> = got.iter().map(|(_, sequence, _)| *sequence).collect();
    sequences.sort_unstable();
    assert_eq!(sequences, published, "each event once to the group");
    let on_b_node: Vec<u64> = got
        .iter()
        .filter(|(i, ..)| *i == 2)
        .map(|(_, s, _)| *s)
        .collect();
    assert_eq!(
        on_b_node.len(),
        20,
        "round robin over three members: {got:?}"
    );
    assert!(
        on_b_node.windows(2).all(|w| w[0] < w[1]),
        "in order: {on_b_node:?}"
    );

    // One picture: the group's three members, on every node.
    for node in [&a, &b] {
        let view = topology(&mut node.admin().await, 0).await;
        let members: u32 = view
            .edges
            .iter()
            .filter(|e| e.kind == pb::EdgeKind::Subscribes as i32 && e.group == "billing")
            .map(|e| e.active_subscriptions)
            .sum();
        assert_eq!(members, 3, "{view:?}");
    }

    // Once the home's members left, a member on b makes b the home.
    drop((home_1, home_2, relayed));
    let (_, mut moved) = subscribe(&mut on_b, member("billing", "billing-b")).await;
    let (_, mut relayed_to_b) = subscribe(&mut on_a, member("billing", "billing-a")).await;
    let published = publish(
        &mut on_a,
        (0..10).map(|i| event("invoices.sent", &[i])).collect(),
    )
    .await;
    let got = gather(&mut [&mut moved, &mut relayed_to_b], |got| {
        got.len() >= published.len()
    })
    .await;
    let mut sequences: Vec<u64> = got.iter().map(|(_, sequence, _)| *sequence).collect();
    sequences.sort_unstable();
    assert_eq!(
        sequences, published,
        "each event once to the group on its new home"
    );
    assert!(
        got.iter().any(|(i, ..)| *i == 1),
        "the member on a has its share: {got:?}"
    );
}

/// A MANUAL-ack group with members on two nodes: acks sent to the relaying node settle at the
/// group's home, and what a member held when it left is delivered again to a member on the
/// other node, in both directions.
#[tokio::test]
async fn a_manual_group_redelivers_to_a_member_on_another_node_when_one_leaves() {
    let nats = NatsServer::start();
    let (a, b) = two_nodes(&nats).await;
    let mut on_a = a.client().await;
    let mut on_b = b.client().await;
    let (_, mut home) = subscribe(&mut on_a, manual("invoices.>", "payments")).await;
    let (_, mut relayed) = subscribe(&mut on_b, manual("invoices.>", "payments")).await;
    let published = publish(
        &mut on_a,
        (0..20).map(|i| event("invoices.sent", &[i])).collect(),
    )
    .await;
    let got = gather(&mut [&mut home, &mut relayed], |got| got.len() >= 20).await;
    let held_by = |index: usize| -> Vec<u64> {
        got.iter()
            .filter(|(i, ..)| *i == index)
            .map(|(_, s, _)| *s)
            .collect()
    };
    let (held_at_home, held_relayed) = (held_by(0), held_by(1));
    assert_eq!(held_relayed.len(), 10, "round robin: {got:?}");

    // Acks through b settle at a: those events never come again.
    let acked = on_b
        .ack(pb::AckRequest {
            group: "payments".into(),
            sequences: held_relayed.clone(),
        })
        .await
        .expect("an ack through the relaying node")
        .into_inner();
    assert_eq!(acked.acknowledged, 10);

    // The home's own member leaves holding its events: the member on b gets them again.
    drop(home);
    let again = gather(&mut [&mut relayed], |got| got.len() >= held_at_home.len()).await;
    let mut redelivered: Vec<u64> = again.iter().map(|(_, s, _)| *s).collect();
    redelivered.sort_unstable();
    assert_eq!(
        redelivered, held_at_home,
        "what the leaving member held, and only that"
    );
    assert!(
        again.iter().all(|(_, _, attempt)| *attempt == 2),
        "{again:?}"
    );
    let acked = on_b
        .ack(pb::AckRequest {
            group: "payments".into(),
            sequences: redelivered,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        acked.group_cursor,
        *published.last().unwrap(),
        "every event acknowledged"
    );

    // The other way: a relayed member leaves holding events; a member on the home gets them.
    drop(relayed);
    let (_, mut home) = subscribe(&mut on_a, manual("invoices.>", "payments")).await;
    let (_, mut relayed) = subscribe(
        &mut on_b,
        pb::SubscribeRequest {
            max_in_flight: 1,
            ..manual("invoices.>", "payments")
        },
    )
    .await;
    let more = publish(
        &mut on_a,
        (0..6).map(|i| event("invoices.sent", &[i])).collect(),
    )
    .await;
    let got = gather(&mut [&mut home, &mut relayed], |got| {
        got.iter().any(|(i, ..)| *i == 1)
    })
    .await;
    let taken = got.iter().find(|(i, ..)| *i == 1).unwrap().1;
    drop(relayed);
    let rest = gather(&mut [&mut home], |seen| {
        seen.iter()
            .any(|(_, s, attempt)| *s == taken && *attempt == 2)
            && got.len() + seen.len() > more.len()
    })
    .await;
    let mut all: Vec<u64> = got.iter().chain(&rest).map(|(_, s, _)| *s).collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all, more, "every event reached the group");
}

/// When a group's home stops, a member relayed to it from another node ends with UNAVAILABLE
/// `group-home-lost` (clients rejoin on it); rejoining makes the member's node the home, and a
/// MANUAL group delivers again what was not acknowledged.
#[tokio::test]
async fn a_member_whose_group_home_stops_is_told_and_its_rejoin_makes_a_new_home() {
    let nats = NatsServer::start();
    let (a, b) = two_nodes(&nats).await;
    let mut on_a = a.client().await;
    let mut on_b = b.client().await;
    let (_, _home) = subscribe(&mut on_a, manual("invoices.>", "payments")).await;
    let (_, mut relayed) = subscribe(&mut on_b, manual("invoices.>", "payments")).await;
    let published = publish(
        &mut on_b,
        (0..4).map(|i| event("invoices.sent", &[i])).collect(),
    )
    .await;
    let first = sequences(&events(&mut relayed, 2).await);
    assert_eq!(first.len(), 2);

    a.stop(WAIT).await;
    let (_, ended) = read_to_error(&mut relayed).await;
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert_eq!(
        reason(&ended).as_deref(),
        Some("group-home-lost"),
        "{ended:?}"
    );

    let (_, mut rejoined) = subscribe(&mut on_b, manual("invoices.>", "payments")).await;
    let again = gather(&mut [&mut rejoined], |got| got.len() >= published.len()).await;
    let mut sequences: Vec<u64> = again.iter().map(|(_, s, _)| *s).collect();
    sequences.sort_unstable();
    assert_eq!(
        sequences, published,
        "nothing acknowledged, so everything again"
    );
}

/// A client that moves on from a node that is going away passes over a node that answers
/// health NOT_SERVING (it lost NATS) for one that serves: a subscription resumed there would
/// wait for events that never come.
#[tokio::test]
async fn a_moving_client_passes_over_a_node_that_is_not_serving() {
    let nats_a = NatsServer::start();
    let mut nats_b = NatsServer::start();
    let nats_c = NatsServer::start();
    let a = TestBus::start_on(BusConfig::default(), jetstream_storage(&nats_a)).await;
    let b = TestBus::start_on(BusConfig::default(), jetstream_storage(&nats_b)).await;
    let c = TestBus::start_on(BusConfig::default(), jetstream_storage(&nats_c)).await;
    let client = eventbus::sdk::Client::connect([a.url(), b.url(), c.url()])
        .await
        .unwrap();
    let mut subscription = client.subscribe("news.>").await.unwrap();
    assert_eq!(client.current_url(), Some(a.url()));
    // Node b is up (its stream set up) before its NATS goes.
    publish_one(&mut b.client().await, event("news.warm-up", b"")).await;

    nats_b.kill();
    let mut health = HealthClient::new(b.channel().await);
    eventually("node b NOT_SERVING", WAIT, || {
        let mut health = health.clone();
        async move {
            let status = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .ok()?
                .into_inner()
                .status;
            (status == ServingStatus::NotServing as i32).then_some(())
        }
    })
    .await;
    a.stop(Duration::from_secs(10)).await;
    // The subscription says when it is registered again; events published after that reach it.
    loop {
        match tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut subscription))
            .await
            .expect("the subscription resumes")
        {
            Some(Ok(eventbus::sdk::SubscriptionItem::Resumed { .. })) => break,
            Some(Ok(_)) => continue,
            other => panic!("the subscription ended: {other:?}"),
        }
    }
    assert_eq!(client.current_url(), Some(c.url()), "passed over node b");
    let sequence = eventually("a publish on node c", WAIT, || {
        let on_c = eventbus::sdk::Client::connect(c.url());
        async move { on_c.await.ok()?.publish("news.flash", "x").await.ok() }
    })
    .await;
    let event = tokio::time::timeout(WAIT, subscription.next_event())
        .await
        .expect("the resumed subscription delivers")
        .unwrap()
        .unwrap();
    assert_eq!(event.sequence, sequence);
    let _ = &mut health;
}

/// A query whose node dies mid-query (kill -9 of a real process) fails with a retryable
/// error, and `query_retrying` asks again on another node of the cluster and gets the answer.
#[tokio::test]
async fn a_query_whose_node_goes_away_is_asked_again_when_the_caller_allows() {
    let nats = NatsServer::start();
    let mut a =
        bus_process::BusProcess::start(&["--storage", "jetstream", "--nats-url", &nats.url], None);
    let b = TestBus::start_on(BusConfig::default(), jetstream_storage(&nats)).await;
    let (asked, mut questions) = tokio::sync::mpsc::unbounded_channel::<()>();
    let responder = eventbus::sdk::Client::connect(b.url()).await.unwrap();
    tokio::spawn(async move {
        let _ = responder
            .serve(
                "slow.query",
                "",
                move |event: pb::Event| {
                    let asked = asked.clone();
                    async move {
                        let _ = asked.send(());
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        Ok::<_, std::convert::Infallible>(eventbus::sdk::Reply::new(event.data))
                    }
                },
                std::future::pending::<()>(),
            )
            .await;
    });
    let asker = eventbus::sdk::Client::connect([a.url(), b.url()])
        .await
        .unwrap();
    assert_eq!(asker.current_url(), Some(a.url()));
    // Node b's responder counts on node a once announced.
    eventually("the responder to answer through node a", WAIT, || {
        let asker = asker.clone();
        async move {
            asker
                .query("slow.query", "warm-up", Duration::from_secs(5))
                .await
                .ok()
        }
    })
    .await;
    while questions.try_recv().is_ok() {}

    let asking = {
        let asker = asker.clone();
        tokio::spawn(async move {
            asker
                .event("slow.query")
                .data("question")
                .query_retrying(Duration::from_secs(20))
                .await
        })
    };
    tokio::time::timeout(WAIT, questions.recv())
        .await
        .expect("the query reaches the responder");
    // The query is in flight on node a: kill it.
    a.kill();
    let answer = tokio::time::timeout(WAIT, asking)
        .await
        .expect("answered in time")
        .unwrap()
        .expect("asked again on node b");
    assert_eq!(&answer.data[..], b"question");
    assert_eq!(asker.current_url(), Some(b.url()));
}

/// A MANUAL-ack group across real processes killed with SIGKILL. Its home dies: the member
/// relayed to it from another node ends with UNAVAILABLE `group-home-lost`, rejoins, makes its
/// own node the home and gets every unacknowledged event again. Then a relaying node dies: the
/// home finds it gone (its next frame or heartbeat has no one to go to) and hands what that
/// node's member held to the member left.
#[tokio::test]
async fn a_manual_group_survives_kill_9_of_its_home_and_of_a_relaying_node() {
    let nats = NatsServer::start();
    let storage = ["--storage", "jetstream", "--nats-url", nats.url.as_str()];
    let mut home = bus_process::BusProcess::start(&storage, None);
    let b = TestBus::start_on(BusConfig::default(), jetstream_storage(&nats)).await;
    let mut on_home = connect(&home.url()).await;
    let mut on_b = b.client().await;
    let (_, mut at_home) = subscribe(&mut on_home, manual("invoices.>", "payments")).await;
    let (_, mut relayed) = subscribe(&mut on_b, manual("invoices.>", "payments")).await;
    let published = publish(
        &mut on_b,
        (0..10).map(|i| event("invoices.sent", &[i])).collect(),
    )
    .await;
    let got = gather(&mut [&mut at_home, &mut relayed], |got| got.len() >= 10).await;
    assert!(
        got.iter().any(|(i, ..)| *i == 1),
        "the relayed member had its share: {got:?}"
    );

    home.kill();
    let (_, ended) = read_to_error(&mut relayed).await;
    assert_eq!(
        reason(&ended).as_deref(),
        Some("group-home-lost"),
        "{ended:?}"
    );
    let (_, mut new_home) = subscribe(&mut on_b, manual("invoices.>", "payments")).await;
    let again = gather(&mut [&mut new_home], |got| got.len() >= published.len()).await;
    let mut sequences: Vec<u64> = again.iter().map(|(_, s, _)| *s).collect();
    sequences.sort_unstable();
    assert_eq!(
        sequences, published,
        "nothing was acknowledged, so everything again"
    );
    on_b.ack(pb::AckRequest {
        group: "payments".into(),
        sequences,
    })
    .await
    .unwrap();

    let mut relaying = bus_process::BusProcess::start(&storage, None);
    let mut on_relaying = connect(&relaying.url()).await;
    let (_, mut relayed) = subscribe(&mut on_relaying, manual("invoices.>", "payments")).await;
    let more = publish(
        &mut on_b,
        (0..10).map(|i| event("invoices.sent", &[i])).collect(),
    )
    .await;
    let got = gather(&mut [&mut new_home, &mut relayed], |got| got.len() >= 10).await;
    let held: Vec<u64> = got
        .iter()
        .filter(|(i, ..)| *i == 1)
        .map(|(_, s, _)| *s)
        .collect();
    assert!(
        !held.is_empty(),
        "the member on the relaying node had its share: {got:?}"
    );
    relaying.kill();
    let handed_on = gather(&mut [&mut new_home], |seen| {
        held.iter()
            .all(|h| seen.iter().any(|(_, s, attempt)| s == h && *attempt == 2))
    })
    .await;
    assert!(
        handed_on.iter().all(|(_, s, _)| more.contains(s)),
        "{handed_on:?}"
    );
}

async fn connect(url: &str) -> Client {
    eventbus::pb::event_bus_service_client::EventBusServiceClient::connect(url.to_owned())
        .await
        .unwrap()
}

/// On a NATS server with atomic batch publish (2.12.1+), a multi-event Publish is stored whole
/// or not at all, at consecutive sequences, as on one bus: batches published at once through
/// two nodes never interleave, and a batch JetStream refuses one event of (here: the stream's
/// message size limit, lowered behind the bus's back) leaves nothing of itself in the stream.
/// On older servers a batch is separate messages (README, "Not yet on a cluster").
#[tokio::test]
async fn a_batch_is_stored_whole_or_not_at_all_at_consecutive_sequences() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url.as_str()).await.unwrap();
    let version = client.server_info().version;
    let (major, minor, patch) = {
        let mut parts = version
            .split(['.', '-'])
            .map(|p| p.parse::<u64>().unwrap_or(0));
        (
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
            parts.next().unwrap_or(0),
        )
    };
    if (major, minor, patch) < (2, 12, 1) {
        eprintln!("nats-server {version} has no atomic batch publish: nothing to check");
        return;
    }
    let (a, b) = two_nodes(&nats).await;
    let mut publishers = Vec::new();
    for (node, name) in [(&a, "a"), (&b, "b")] {
        let mut client = node.client().await;
        publishers.push(tokio::spawn(async move {
            let mut batches = Vec::new();
            for batch in 0..40 {
                let events = (0..10)
                    .map(|i| numbered("orders.placed", name, batch * 10 + i))
                    .collect();
                batches.push(publish(&mut client, events).await);
            }
            batches
        }));
    }
    for publisher in publishers {
        for batch in publisher.await.unwrap() {
            assert!(
                batch.windows(2).all(|w| w[1] == w[0] + 1),
                "a batch at consecutive sequences: {batch:?}"
            );
        }
    }

    let context = async_nats::jetstream::new(client);
    let mut stream = context.get_stream("EVENTBUS").await.unwrap();
    let mut config = stream.info().await.unwrap().config.clone();
    let held = stream.info().await.unwrap().state.last_sequence;
    config.max_message_size = 2_000;
    context.update_stream(&config).await.unwrap();
    let refused = a
        .client()
        .await
        .publish(pb::PublishRequest {
            events: vec![
                event("orders.placed", b"small"),
                event("orders.placed", &[7; 5_000]),
                event("orders.placed", b"small too"),
            ],
        })
        .await
        .expect_err("JetStream refuses the large event");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    let now = stream.info().await.unwrap().state.last_sequence;
    assert_eq!(now, held, "nothing of the refused batch is stored");
}
