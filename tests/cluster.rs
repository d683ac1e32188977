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
    // A wildcard subscriber on node a; a named one and an AUTO group's two members on node b
    // (a group is served by one node at a time).
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

/// A consumer group's members connect to one node at a time: each node routes every event, so a
/// group spread over two nodes would get each event twice. A member on a second node is refused
/// while the first has members, and accepted once they left (as after a node failure).
#[tokio::test]
async fn a_group_lives_on_one_node_at_a_time_and_moves_when_its_members_leave() {
    let nats = NatsServer::start();
    let (a, b) = two_nodes(&nats).await;
    let member = || pb::SubscribeRequest {
        group: "billing".into(),
        subscriber: "billing-service".into(),
        ..request("invoices.>")
    };
    let mut on_a = a.client().await;
    let mut on_b = b.client().await;
    let (_, mut first) = subscribe(&mut on_a, member()).await;
    let (_, mut second) = subscribe(&mut on_a, member()).await;

    let refused = eventually("node b to see the group on node a", WAIT, || {
        let mut on_b = on_b.clone();
        async move {
            match on_b.subscribe(member()).await {
                Err(status) => Some(status),
                Ok(response) => {
                    drop(response);
                    None
                }
            }
        }
    })
    .await;
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert_eq!(reason(&refused).as_deref(), Some("group-on-another-node"));
    assert!(refused.message().contains("billing"), "{refused:?}");

    // Published on b, delivered once to the group on a.
    let published = publish(
        &mut on_b,
        (0..10).map(|i| event("invoices.sent", &[i])).collect(),
    )
    .await;
    let mut got = Vec::new();
    while got.len() < published.len() {
        tokio::select! {
            Ok(Some(r)) = first.message() => if let Some(Message::Event(e)) = r.message { got.push(e.sequence) },
            Ok(Some(r)) = second.message() => if let Some(Message::Event(e)) = r.message { got.push(e.sequence) },
            _ = tokio::time::sleep(WAIT) => panic!("the group did not get every event: {got:?}"),
        }
    }
    got.sort_unstable();
    assert_eq!(got, published, "each event once to the group");

    drop((first, second));
    let (_, mut moved) = eventually("the group to move to node b", WAIT, || {
        let mut on_b = on_b.clone();
        async move {
            let mut stream = on_b.subscribe(member()).await.ok()?.into_inner();
            let first = tokio::time::timeout(WAIT, stream.message())
                .await
                .ok()?
                .ok()??;
            Some((first, stream))
        }
    })
    .await;
    let sequence = publish_one(&mut on_a, event("invoices.sent", b"after")).await;
    assert_eq!(sequences(&events(&mut moved, 1).await), [sequence]);
    let _ = &mut on_b;
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
