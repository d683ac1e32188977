//! What operators and tools see: health, reflection (v1 and v1alpha), the admin service's topic
//! list and topology, and subscriptions of dead clients being freed.

mod common;
mod support;

use std::time::Duration;

use common::{event, eventually, TestBus};
use eventbus::config::ServerConfig;
use eventbus::pb;
use eventbus::pb::admin_service_client::AdminServiceClient;
use prost::Message as _;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[tokio::test]
async fn health_reports_the_bus_serving() {
    let bus = TestBus::start().await;
    let mut health = HealthClient::new(bus.channel().await);
    for service in ["", "eventbus.v1.EventBusService"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            response.status,
            ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    let status = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

/// A tmpfs of this test's own (the machine's disk is never filled); `None`, after saying why,
/// where this process may not mount one.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(options: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let output = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir.path())
            .output()
            .ok()?;
        if !output.status.success() {
            eprintln!(
                "skipping: cannot mount a tmpfs: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
            return None;
        }
        Some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.path())
            .status();
    }
}

#[tokio::test]
async fn a_full_disk_is_not_serving_until_space_is_freed() {
    let Some(tmpfs) = Tmpfs::mount("size=512k,nr_inodes=1000") else {
        return;
    };
    // Space to give back later, as an operator freeing the disk would.
    let spare = tmpfs.0.path().join("spare");
    std::fs::write(&spare, vec![0u8; 128 * 1024]).unwrap();
    let bus = TestBus::start_server(ServerConfig {
        storage: eventbus::config::StorageConfig::File {
            data_dir: tmpfs.0.path().join("data"),
            fsync: eventbus::store::FsyncPolicy::Always,
            segment_bytes: 64 * 1024 * 1024,
        },
        shutdown_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    })
    .await;
    let mut client = bus.client().await;
    let health = HealthClient::new(bus.channel().await);
    let data = vec![b'x'; 16 * 1024];
    let refused = loop {
        let outcome = client
            .publish(pb::PublishRequest {
                events: vec![pb::Event {
                    data: data.clone().into(),
                    ..event("disk.fill", b"")
                }],
            })
            .await;
        if let Err(status) = outcome {
            break status;
        }
    };
    assert!(refused.message().contains("No space left"), "{refused:?}");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert_eq!(reason(&refused).as_deref(), Some("disk-full"));
    eventually("health NOT_SERVING on a full disk", WAIT, || {
        let health = health.clone();
        async move { (server_health(&health).await == ServingStatus::NotServing as i32).then_some(()) }
    })
    .await;
    std::fs::remove_file(&spare).unwrap();
    eventually("health SERVING once space is freed", WAIT, || {
        let health = health.clone();
        async move { (server_health(&health).await == ServingStatus::Serving as i32).then_some(()) }
    })
    .await;
    client
        .publish(pb::PublishRequest {
            events: vec![event("disk.fill", b"after")],
        })
        .await
        .unwrap();
    assert_eq!(server_health(&health).await, ServingStatus::Serving as i32);
    drop(client);
    bus.stop(WAIT).await;
}

const SERVICES: [&str; 3] = [
    "eventbus.v1.EventBusService",
    "eventbus.v1.AdminService",
    "grpc.health.v1.Health",
];

/// Asserts the descriptor answer holds the eventbus proto file with its two services.
fn assert_holds_eventbus_file(files: &[Vec<u8>]) {
    let files: Vec<_> = files
        .iter()
        .map(|bytes| prost_types::FileDescriptorProto::decode(&bytes[..]).unwrap())
        .collect();
    let file = files
        .iter()
        .find(|f| f.package() == "eventbus.v1")
        .unwrap_or_else(|| {
            panic!(
                "no eventbus.v1 file in {:?}",
                files.iter().map(|f| f.name()).collect::<Vec<_>>()
            )
        });
    assert_eq!(file.name(), "eventbus/v1/eventbus.proto");
    let services: Vec<_> = file.service.iter().map(|s| s.name()).collect();
    assert_eq!(services, ["EventBusService", "AdminService"]);
}

async fn next_response<T: std::fmt::Debug>(responses: &mut tonic::Streaming<T>) -> T {
    tokio::time::timeout(WAIT, responses.next())
        .await
        .expect("a reflection answer in time")
        .expect("the stream is open")
        .expect("an answer")
}

#[tokio::test]
async fn reflection_v1_lists_services_and_serves_descriptors() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let bus = TestBus::start().await;
    let mut reflection = ServerReflectionClient::new(bus.channel().await);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("eventbus.v1.EventBusService".into()),
        MessageRequest::FileContainingSymbol("grpc.health.v1.Health".into()),
    ]
    .map(|message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    });
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();

    let MessageResponse::ListServicesResponse(list) = next_response(&mut responses)
        .await
        .message_response
        .unwrap()
    else {
        panic!("expected a service list");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for service in SERVICES
        .iter()
        .chain(&["grpc.reflection.v1.ServerReflection"])
    {
        assert!(names.contains(service), "{service} not in {names:?}");
    }
    let MessageResponse::FileDescriptorResponse(files) = next_response(&mut responses)
        .await
        .message_response
        .unwrap()
    else {
        panic!("expected descriptors");
    };
    assert_holds_eventbus_file(&files.file_descriptor_proto);
    let MessageResponse::FileDescriptorResponse(files) = next_response(&mut responses)
        .await
        .message_response
        .unwrap()
    else {
        panic!("expected the health descriptors");
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

#[tokio::test]
async fn reflection_v1alpha_lists_services_and_serves_descriptors() {
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;

    let bus = TestBus::start().await;
    let mut reflection = ServerReflectionClient::new(bus.channel().await);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol("eventbus.v1.EventBusService".into()),
    ]
    .map(|message| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(message),
    });
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .unwrap()
        .into_inner();
    let first = next_response(&mut responses).await.message_response;
    let Some(MessageResponse::ListServicesResponse(list)) = first else {
        panic!("expected a service list, got {first:?}");
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for service in SERVICES
        .iter()
        .chain(&["grpc.reflection.v1alpha.ServerReflection"])
    {
        assert!(names.contains(service), "{service} not in {names:?}");
    }
    let second = next_response(&mut responses).await.message_response;
    let Some(MessageResponse::FileDescriptorResponse(files)) = second else {
        panic!("expected descriptors, got {second:?}");
    };
    assert_holds_eventbus_file(&files.file_descriptor_proto);
}

async fn topics(admin: &mut AdminServiceClient<Channel>, pattern: &str) -> Vec<pb::TopicInfo> {
    admin
        .list_topics(pb::ListTopicsRequest {
            pattern: pattern.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .topics
}

fn from(source: &str, topic: &str) -> pb::Event {
    pb::Event {
        source: source.into(),
        ..event(topic, b"")
    }
}

fn named(pattern: &str, subscriber: &str, group: &str) -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        subscriber: subscriber.into(),
        group: group.into(),
        ..request(pattern)
    }
}

/// Answers one query on `topic` as service `replier`.
async fn answer_one(
    bus: &TestBus,
    topic: &str,
    replier: &'static str,
) -> tokio::task::JoinHandle<()> {
    let mut client = bus.client().await;
    let (_, mut stream) = subscribe(&mut client, named(topic, replier, replier)).await;
    tokio::spawn(async move {
        let query = next_event(&mut stream).await;
        let reply = pb::Event {
            correlation_id: query.correlation_id.clone(),
            ..from(replier, &query.reply_to)
        };
        publish(&mut client, vec![reply]).await;
    })
}

#[tokio::test]
async fn list_topics_reports_sequences_counts_subscribers_and_groups() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let mut admin = bus.admin().await;
    assert!(topics(&mut admin, "").await.is_empty());

    let (_, _audit) = subscribe(&mut client, named("orders.*", "audit", "")).await;
    let (_, _billing_1) = subscribe(&mut client, named("orders.>", "billing", "billing")).await;
    let (_, _billing_2) = subscribe(&mut client, named("orders.>", "billing", "billing")).await;
    let (_, _shipping) = subscribe(&mut client, named("orders.created", "shipping", "ship")).await;

    publish(
        &mut client,
        vec![
            from("shop", "orders.created"),
            from("shop", "orders.created"),
            from("shop", "users.signup"),
            from("shop", "orders.created"),
        ],
    )
    .await;
    let _answered = answer_one(&bus, "user.query", "users").await;
    client
        .query(pb::QueryRequest {
            event: Some(from("asker", "user.query")),
            timeout: None,
        })
        .await
        .unwrap();

    let all = topics(&mut admin, "").await;
    let names: Vec<_> = all.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "_bus.inbox.*",
            "orders.created",
            "user.query",
            "users.signup"
        ],
        "sorted, with inboxes folded into one entry"
    );
    let orders = &all[1];
    assert_eq!(orders.last_sequence, 4);
    assert_eq!(orders.events_held, 3);
    assert_eq!(orders.events_published, 3);
    assert_eq!(
        orders.subscriber_count, 4,
        "audit, two billing members, shipping"
    );
    assert_eq!(orders.groups, ["billing", "ship"]);
    assert!(orders.last_publish_time.is_some());
    let signup = &all[3];
    assert_eq!(
        (
            signup.last_sequence,
            signup.events_published,
            signup.subscriber_count
        ),
        (3, 1, 0)
    );
    assert!(signup.groups.is_empty());
    let inboxes = &all[0];
    assert_eq!(inboxes.events_published, 1);
    assert_eq!(inboxes.events_held, 1);

    let filtered = topics(&mut admin, "orders.*").await;
    assert_eq!(filtered.len(), 1);
    assert_eq!(filtered[0].name, "orders.created");
    let users: Vec<_> = topics(&mut admin, "*.*")
        .await
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(users, ["orders.created", "user.query", "users.signup"]);
    // `>` matches every topic, the inboxes included, so it lists what no pattern lists.
    let everything: Vec<_> = topics(&mut admin, ">")
        .await
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(everything, names);
    let inboxes: Vec<_> = topics(&mut admin, "_bus.>")
        .await
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(inboxes, ["_bus.inbox.*"]);
}

fn edge<'a>(
    topology: &'a pb::GetTopologyResponse,
    kind: pb::EdgeKind,
    from: &str,
    to: &str,
) -> Option<&'a pb::TopologyEdge> {
    topology
        .edges
        .iter()
        .find(|e| e.kind == kind as i32 && e.from == from && e.to == to)
}

#[tokio::test]
async fn topology_shows_who_publishes_subscribes_answers_and_matches() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let mut admin = bus.admin().await;

    let (_, audit) = subscribe(&mut client, named("orders.*", "audit", "")).await;
    publish(
        &mut client,
        vec![
            from("shop", "orders.created"),
            from("shop", "orders.created"),
        ],
    )
    .await;
    let answered = answer_one(&bus, "user.query", "users").await;
    client
        .query(pb::QueryRequest {
            event: Some(from("asker", "user.query")),
            timeout: None,
        })
        .await
        .unwrap();
    answered.await.unwrap();

    let topology = admin
        .get_topology(pb::GetTopologyRequest::default())
        .await
        .unwrap()
        .into_inner();
    use pb::EdgeKind::*;
    let publishes = edge(&topology, Publishes, "service:shop", "topic:orders.created")
        .expect("shop publishes orders.created");
    assert_eq!(publishes.events, 2);
    assert!(publishes.last_seen.is_some());
    let subscribes = edge(&topology, Subscribes, "topic:orders.*", "service:audit")
        .expect("audit subscribes to orders.*");
    assert_eq!(subscribes.active_subscriptions, 1);
    assert_eq!(subscribes.group, "");
    let group = edge(&topology, Subscribes, "topic:user.query", "service:users")
        .expect("users subscribes to user.query");
    assert_eq!(group.group, "users");
    edge(&topology, Publishes, "service:asker", "topic:user.query").expect("asker asks");
    let replies =
        edge(&topology, Replies, "service:users", "service:asker").expect("users answers asker");
    assert_eq!(replies.events, 1);
    edge(&topology, Matches, "topic:orders.created", "topic:orders.*")
        .expect("orders.created matches orders.*");
    for node in &topology.nodes {
        let kind = if node.id.starts_with("service:") {
            pb::NodeKind::Service
        } else {
            pb::NodeKind::Topic
        };
        assert_eq!(node.kind, kind as i32, "{node:?}");
        assert!(node.id.ends_with(&node.name), "{node:?}");
    }
    for end in topology.edges.iter().flat_map(|e| [&e.from, &e.to]) {
        assert!(
            topology.nodes.iter().any(|n| &n.id == end),
            "edge end {end} is a node"
        );
    }

    // When the subscription ends the edge stays, with no active subscription.
    drop(audit);
    eventually("the ended subscription to show 0 active", WAIT, || {
        let mut admin = admin.clone();
        async move {
            let topology = admin
                .get_topology(pb::GetTopologyRequest::default())
                .await
                .ok()?
                .into_inner();
            let subscribes = edge(&topology, Subscribes, "topic:orders.*", "service:audit")?;
            (subscribes.active_subscriptions == 0).then_some(())
        }
    })
    .await;
}

async fn subscriber_count(admin: &mut AdminServiceClient<Channel>, topic: &str) -> u32 {
    topics(admin, topic)
        .await
        .first()
        .map_or(0, |t| t.subscriber_count)
}

#[tokio::test]
async fn a_subscription_of_a_client_that_hangs_up_is_freed() {
    let bus = TestBus::start().await;
    let mut admin = bus.admin().await;
    let mut publisher = bus.client().await;
    publish_one(&mut publisher, event("watched", b"")).await;

    let mut client = bus.client().await;
    let (_, stream) = subscribe(&mut client, request("watched")).await;
    assert_eq!(subscriber_count(&mut admin, "watched").await, 1);
    // The whole client goes away: its connection closes.
    drop(stream);
    drop(client);
    eventually("the subscription to be freed", WAIT, || {
        let mut admin = admin.clone();
        async move { (subscriber_count(&mut admin, "watched").await == 0).then_some(()) }
    })
    .await;
}

/// A TCP proxy that can freeze: it stops passing bytes but keeps both sockets open, like a
/// client host that vanished without closing its connections.
async fn freezable_proxy(
    to: std::net::SocketAddr,
    freeze: CancellationToken,
) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let server = TcpStream::connect(to).await.unwrap();
            let freeze = freeze.clone();
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                let pipe = async {
                    let mut up = [0u8; 16 * 1024];
                    let mut down = [0u8; 16 * 1024];
                    loop {
                        tokio::select! {
                            n = client_read.read(&mut up) => match n {
                                Ok(0) | Err(_) => return,
                                Ok(n) => if server_write.write_all(&up[..n]).await.is_err() { return },
                            },
                            n = server_read.read(&mut down) => match n {
                                Ok(0) | Err(_) => return,
                                Ok(n) => if client_write.write_all(&down[..n]).await.is_err() { return },
                            },
                        }
                    }
                };
                tokio::select! {
                    _ = pipe => {}
                    _ = freeze.cancelled() => {}
                }
                // Frozen: hold the sockets open and silent until the test ends.
                std::future::pending::<()>().await;
                drop((client_read, client_write, server_read, server_write));
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_subscription_of_a_client_that_went_silent_is_freed_by_keepalive() {
    let bus = TestBus::start_server(ServerConfig {
        keepalive_interval: Duration::from_millis(200),
        keepalive_timeout: Duration::from_millis(500),
        shutdown_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    })
    .await;
    let mut admin = bus.admin().await;
    let mut publisher = bus.client().await;
    publish_one(&mut publisher, event("watched", b"")).await;

    let freeze = CancellationToken::new();
    let proxy = freezable_proxy(bus.addr, freeze.clone()).await;
    let channel = Channel::from_shared(format!("http://{proxy}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = eventbus::pb::event_bus_service_client::EventBusServiceClient::new(channel);
    let (_, _stream) = subscribe(&mut client, request("watched")).await;
    assert_eq!(subscriber_count(&mut admin, "watched").await, 1);

    freeze.cancel();
    eventually(
        "keepalive to free the silent client's subscription",
        WAIT,
        || {
            let mut admin = admin.clone();
            async move { (subscriber_count(&mut admin, "watched").await == 0).then_some(()) }
        },
    )
    .await;
}
