//! Principals, permissions and limits (`[[principals]]`, `[limits]`), against a real bus: who
//! may call, what each may publish and receive, inbox ownership, sources, groups, the admin
//! right, limits, and a reload of the config file while the bus runs.

mod common;
mod support;

use std::path::Path;
use std::time::Duration;

use common::{event, eventually, TestBus};
use eventbus::auth::{hash_token, AuthConfig, PrincipalConfig};
use eventbus::config::ServerConfig;
use eventbus::limits::{Limits, LimitsConfig};
use eventbus::pb;
use eventbus::pb::admin_service_client::AdminServiceClient;
use eventbus::pb::event_bus_service_client::EventBusServiceClient;
use eventbus::pb::subscribe_request::Start;
use eventbus::pb::subscribe_response::Message;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

const WAIT: Duration = Duration::from_secs(20);

type Authed = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
struct Bearer(Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        Ok(request)
    }
}

fn principal(name: &str, token: &str) -> PrincipalConfig {
    PrincipalConfig {
        name: name.to_owned(),
        token_hash: Some(hash_token(token)),
        cert_subject: None,
        cert_san: None,
        publish: vec![],
        publish_deny: vec![],
        subscribe: vec![],
        subscribe_deny: vec![],
        groups: None,
        admin: false,
        sources: None,
        limits: None,
    }
}

fn patterns(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The principals most tests use: a user service that answers `user.query`, a query service
/// that asks it, a spy that may read everything but `secret.>`, and an operator.
fn principals() -> Vec<PrincipalConfig> {
    vec![
        PrincipalConfig {
            publish: patterns(&["user.>"]),
            subscribe: patterns(&["user.query"]),
            groups: Some(patterns(&["user-service"])),
            ..principal("user-service", "user-token")
        },
        PrincipalConfig {
            publish: patterns(&["user.query", "secret.x"]),
            subscribe: patterns(&["order.>"]),
            ..principal("query-service", "query-token")
        },
        PrincipalConfig {
            publish: patterns(&[">"]),
            subscribe: patterns(&[">"]),
            subscribe_deny: patterns(&["secret.>"]),
            sources: Some(patterns(&["*"])),
            ..principal("spy", "spy-token")
        },
        PrincipalConfig {
            subscribe: patterns(&[">", "_bus.dlq.>"]),
            admin: true,
            ..principal("operator", "operator-token")
        },
    ]
}

async fn start(principals: Vec<PrincipalConfig>, limits: LimitsConfig) -> TestBus {
    TestBus::start_server(ServerConfig {
        auth: AuthConfig { principals, limits },
        shutdown_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    })
    .await
}

async fn client(bus: &TestBus, token: Option<&str>) -> EventBusServiceClient<Authed> {
    EventBusServiceClient::with_interceptor(bus.channel().await, Bearer(token.map(str::to_owned)))
}

async fn admin(bus: &TestBus, token: &str) -> AdminServiceClient<Authed> {
    AdminServiceClient::with_interceptor(bus.channel().await, Bearer(Some(token.to_owned())))
}

fn from(source: &str, topic: &str) -> pb::Event {
    pb::Event {
        source: source.to_owned(),
        ..event(topic, b"x")
    }
}

async fn publish(
    client: &mut EventBusServiceClient<Authed>,
    events: Vec<pb::Event>,
) -> Result<pb::PublishResponse, Status> {
    client
        .publish(pb::PublishRequest { events })
        .await
        .map(|r| r.into_inner())
}

fn reason(status: &Status) -> &str {
    status
        .metadata()
        .get("eventbus-error")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn assert_denied(status: &Status, action: &str, target: &str) {
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason(status), "permission-denied", "{status:?}");
    let message = status.message();
    assert!(
        message.contains(&format!("may not {action} \"{target}\"")),
        "{message}"
    );
}

async fn subscribe(
    client: &mut EventBusServiceClient<Authed>,
    topic: &str,
    group: &str,
) -> Result<Streaming<pb::SubscribeResponse>, Status> {
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            topic: topic.to_owned(),
            group: group.to_owned(),
            // A live group starts at the latest event.
            start: Some(if group.is_empty() {
                Start::Earliest(())
            } else {
                Start::Latest(())
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    // The confirmation, or the refusal.
    match stream.message().await? {
        Some(pb::SubscribeResponse {
            message: Some(Message::Subscribed(_)),
            ..
        }) => Ok(stream),
        other => panic!("expected the confirmation, got {other:?}"),
    }
}

/// The topics delivered up to the caught-up marker.
async fn replayed_topics(stream: &mut Streaming<pb::SubscribeResponse>) -> Vec<String> {
    let mut topics = vec![];
    loop {
        let next = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("a delivery in time")
            .unwrap()
            .expect("the stream goes on");
        match next.message {
            Some(Message::Event(event)) => topics.push(event.topic),
            Some(Message::CaughtUp(_)) => return topics,
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn calls_without_or_with_wrong_credentials_are_unauthenticated_and_health_stays_open() {
    let bus = start(principals(), LimitsConfig::default()).await;
    for token in [None, Some("wrong")] {
        let status = publish(&mut client(&bus, token).await, vec![event("user.x", b"")])
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert_eq!(reason(&status), "unauthenticated");
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(bus.channel().await);
    let served = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(served.status, 1, "SERVING without credentials");
}

#[tokio::test]
async fn a_batch_with_one_denied_event_stores_none_of_it() {
    let bus = start(principals(), LimitsConfig::default()).await;
    let mut user = client(&bus, Some("user-token")).await;
    publish(&mut user, vec![from("user-service", "user.created")])
        .await
        .unwrap();
    let status = publish(
        &mut user,
        vec![
            from("user-service", "user.updated"),
            from("user-service", "order.created"),
        ],
    )
    .await
    .unwrap_err();
    assert_denied(&status, "publish", "order.created");
    assert!(status.message().contains("events[1].topic"), "{status:?}");

    let mut operator = client(&bus, Some("operator-token")).await;
    let mut all = subscribe(&mut operator, ">", "").await.unwrap();
    assert_eq!(replayed_topics(&mut all).await, ["user.created"]);
}

#[tokio::test]
async fn a_service_cannot_publish_as_another_and_an_empty_source_is_its_own() {
    let bus = start(principals(), LimitsConfig::default()).await;
    let mut user = client(&bus, Some("user-token")).await;
    let status = publish(&mut user, vec![from("order-service", "user.created")])
        .await
        .unwrap_err();
    assert_denied(&status, "source", "order-service");

    publish(&mut user, vec![from("", "user.created")])
        .await
        .unwrap();
    let mut operator = client(&bus, Some("operator-token")).await;
    let mut all = operator
        .subscribe(pb::SubscribeRequest {
            topic: "user.created".into(),
            start: Some(Start::Earliest(())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let source = loop {
        match all.message().await.unwrap().unwrap().message {
            Some(Message::Event(event)) => break event.source,
            _ => continue,
        }
    };
    assert_eq!(source, "user-service");
}

#[tokio::test]
async fn subscriptions_stay_inside_their_permissions_and_never_see_inboxes() {
    let bus = start(principals(), LimitsConfig::default()).await;
    let mut user = client(&bus, Some("user-token")).await;
    let status = subscribe(&mut user, "order.>", "").await.unwrap_err();
    assert_denied(&status, "subscribe", "order.>");
    let status = subscribe(&mut user, "user.query", "other-group")
        .await
        .unwrap_err();
    assert_denied(&status, "join", "other-group");
    let mut spy = client(&bus, Some("spy-token")).await;
    let status = subscribe(&mut spy, "_bus.inbox.*", "").await.unwrap_err();
    assert_denied(&status, "subscribe", "_bus.inbox.*");

    // The user service answers one query; the spy, allowed `>` but not `secret.>`, replays
    // everything after it.
    let mut queries = subscribe(&mut user, "user.query", "user-service")
        .await
        .unwrap();
    let responder = {
        let mut user = user.clone();
        tokio::spawn(async move {
            loop {
                let Some(Message::Event(query)) = queries.message().await.unwrap().unwrap().message
                else {
                    continue;
                };
                let reply = pb::Event {
                    topic: query.reply_to.clone(),
                    correlation_id: query.correlation_id.clone(),
                    ..from("user-service", "ignored")
                };
                publish(&mut user, vec![reply]).await.unwrap();
                return;
            }
        })
    };
    let mut asker = client(&bus, Some("query-token")).await;
    let reply = asker
        .query(pb::QueryRequest {
            event: Some(from("query-service", "user.query")),
            timeout: None,
        })
        .await
        .unwrap()
        .into_inner()
        .reply
        .unwrap();
    assert!(reply.topic.starts_with("_bus.inbox."), "{reply:?}");
    responder.await.unwrap();
    publish(&mut asker, vec![from("query-service", "secret.x")])
        .await
        .unwrap();
    publish(&mut spy, vec![from("spy", "spy.done")])
        .await
        .unwrap();

    let mut everything = subscribe(&mut spy, ">", "").await.unwrap();
    assert_eq!(
        replayed_topics(&mut everything).await,
        ["user.query", "spy.done"],
        "no inbox reply, no secret"
    );
}

#[tokio::test]
async fn only_principals_that_may_read_the_query_may_reply_to_it() {
    let bus = start(principals(), LimitsConfig::default()).await;
    let mut user = client(&bus, Some("user-token")).await;
    let mut queries = subscribe(&mut user, "user.query", "").await.unwrap();
    let mut asker = client(&bus, Some("query-token")).await;
    let query = tokio::spawn(async move {
        asker
            .query(pb::QueryRequest {
                event: Some(from("query-service", "user.query")),
                timeout: Some(prost_types::Duration {
                    seconds: 15,
                    nanos: 0,
                }),
            })
            .await
    });
    let inbox = loop {
        if let Some(Message::Event(query)) = queries.message().await.unwrap().unwrap().message {
            break query;
        }
    };
    // The query service knows the inbox here, but may not read `user.query`: its forged
    // reply is refused, and the user service's real one answers the query.
    let mut intruder = client(&bus, Some("query-token")).await;
    let forged = pb::Event {
        topic: inbox.reply_to.clone(),
        correlation_id: inbox.correlation_id.clone(),
        ..from("query-service", "ignored")
    };
    let status = publish(&mut intruder, vec![forged]).await.unwrap_err();
    assert_denied(&status, "reply", &inbox.reply_to);

    let reply = pb::Event {
        topic: inbox.reply_to.clone(),
        correlation_id: inbox.correlation_id.clone(),
        ..from("user-service", "ignored")
    };
    publish(&mut user, vec![reply.clone()]).await.unwrap();
    let answered = query.await.unwrap().unwrap().into_inner().reply.unwrap();
    assert_eq!(answered.source, "user-service");

    // Once answered, the inbox takes no more replies; nor does one nobody asked on, whatever
    // the publisher may do (a made-up inbox would let it write anywhere).
    let status = publish(&mut user, vec![reply]).await.unwrap_err();
    assert_denied(&status, "reply", &inbox.reply_to);
    assert!(status.message().contains("no query waits"), "{status:?}");
    let made_up = pb::Event {
        topic: "_bus.inbox.made-up".into(),
        ..from("user-service", "ignored")
    };
    let status = publish(&mut user, vec![made_up]).await.unwrap_err();
    assert_denied(&status, "reply", "_bus.inbox.made-up");
}

#[tokio::test]
async fn admin_service_needs_the_admin_right_and_groups_their_listing() {
    let bus = start(principals(), LimitsConfig::default()).await;
    let status = admin(&bus, "user-token")
        .await
        .list_topics(pb::ListTopicsRequest::default())
        .await
        .unwrap_err();
    assert_denied(&status, "admin", "ListTopics");
    admin(&bus, "operator-token")
        .await
        .get_topology(pb::GetTopologyRequest::default())
        .await
        .unwrap();
    let status = admin(&bus, "user-token")
        .await
        .list_groups(pb::ListGroupsRequest::default())
        .await
        .unwrap_err();
    assert_denied(&status, "admin", "ListGroups");
    let status = admin(&bus, "user-token")
        .await
        .get_server_info(pb::GetServerInfoRequest {})
        .await
        .unwrap_err();
    assert_denied(&status, "admin", "GetServerInfo");
    let info = admin(&bus, "operator-token")
        .await
        .get_server_info(pb::GetServerInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(info.auth_enabled);
    assert!(info.principals >= 2, "{info:?}");

    let mut user = client(&bus, Some("user-token")).await;
    let status = user
        .ack(pb::AckRequest {
            group: "not-mine".into(),
            sequences: vec![1],
        })
        .await
        .unwrap_err();
    assert_denied(&status, "join", "not-mine");
}

#[tokio::test]
async fn limits_answer_resource_exhausted_naming_the_limit() {
    let mut config = principals();
    config[0].limits = Some(Limits {
        publish_events_per_second: std::num::NonZeroU32::new(5),
        ..Limits::default()
    });
    let limits = LimitsConfig {
        connection: Limits {
            subscriptions: Some(2),
            ..Limits::default()
        },
        principal: Limits::default(),
    };
    let bus = start(config, limits).await;
    let mut user = client(&bus, Some("user-token")).await;
    let burst: Vec<_> = (0..5).map(|_| from("user-service", "user.x")).collect();
    publish(&mut user, burst).await.unwrap();
    let status = publish(&mut user, vec![from("user-service", "user.x")])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason(&status), "limit-exceeded");
    assert!(
        status
            .message()
            .contains("publish_events_per_second of principal \"user-service\""),
        "{status:?}"
    );

    // Two subscriptions on one connection, a third refused; another connection has its own.
    let mut spy = client(&bus, Some("spy-token")).await;
    let _a = subscribe(&mut spy, "a", "").await.unwrap();
    let _b = subscribe(&mut spy, "b", "").await.unwrap();
    let status = subscribe(&mut spy, "c", "").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("subscriptions of this connection"),
        "{status:?}"
    );
    let mut other = client(&bus, Some("spy-token")).await;
    subscribe(&mut other, "c", "").await.unwrap();
    drop(_a);
    eventually("a freed subscription slot", WAIT, || {
        let mut spy = spy.clone();
        async move { subscribe(&mut spy, "d", "").await.ok() }
    })
    .await;
}

#[tokio::test]
async fn queries_in_flight_and_byte_rates_are_limited_end_to_end_and_counted() {
    let mut config = principals();
    // The user service may publish 300 bytes a second (its own limit); the query service may
    // have one query waiting at a time, on each connection.
    config[0].limits = Some(Limits {
        publish_bytes_per_second: std::num::NonZeroU32::new(300),
        ..Limits::default()
    });
    let limits = LimitsConfig {
        connection: Limits {
            queries_in_flight: Some(1),
            ..Limits::default()
        },
        principal: Limits::default(),
    };
    let bus = TestBus::start_with_admin(ServerConfig {
        auth: AuthConfig {
            principals: config,
            limits,
        },
        shutdown_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    })
    .await;

    // A responder that reads the queries and never answers, so a query stays in flight.
    let mut user = client(&bus, Some("user-token")).await;
    let mut responder = subscribe(&mut user, "user.query", "").await.unwrap();
    let asker = client(&bus, Some("query-token")).await;
    let ask = |mut asker: EventBusServiceClient<Authed>| async move {
        asker
            .query(pb::QueryRequest {
                event: Some(from("query-service", "user.query")),
                timeout: Some(prost_types::Duration {
                    seconds: 10,
                    nanos: 0,
                }),
            })
            .await
    };
    let waiting = tokio::spawn(ask(asker.clone()));
    loop {
        let next = tokio::time::timeout(WAIT, responder.message())
            .await
            .unwrap();
        if let Some(Message::Event(_)) = next.unwrap().unwrap().message {
            break;
        }
    }
    let status = ask(asker.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("queries_in_flight"), "{status:?}");
    waiting.abort();

    // 300 bytes a second: a burst of about that passes, the next byte-heavy batch does not.
    let heavy = |n: usize| -> Vec<pb::Event> {
        (0..n)
            .map(|_| pb::Event {
                data: vec![b'x'; 100].into(),
                ..from("user-service", "user.x")
            })
            .collect()
    };
    publish(&mut user, heavy(2)).await.unwrap();
    let status = publish(&mut user, heavy(2)).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("publish_bytes_per_second of principal \"user-service\""),
        "{status:?}"
    );

    let (_, metrics) = support::http_get(bus.admin_addr.unwrap(), "/metrics").await;
    for limit in ["queries_in_flight", "publish_bytes_per_second"] {
        assert!(
            metrics.lines().any(|line| line.starts_with(&format!(
                "eventbus_limit_exceeded_total{{limit=\"{limit}\"}}"
            )) && !line.ends_with(" 0")),
            "no count of {limit} in:\n{metrics}"
        );
    }
}

fn write_config(path: &Path, text: &str) {
    // Written whole then renamed, as config tools do, so the bus never reads half a file.
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).unwrap();
    std::fs::rename(&partial, path).unwrap();
}

fn principal_toml(name: &str, token: &str, publish: &str, subscribe: &str) -> String {
    principal_toml_hashed(name, &hash_token(token), publish, subscribe)
}

/// A principal entry with a given `token_hash` (a reload that keeps a principal's token keeps
/// its hash text: a new hash of the same token is salted anew, and counts as a rotation).
fn principal_toml_hashed(name: &str, hash: &str, publish: &str, subscribe: &str) -> String {
    format!(
        "[[principals]]\nname = \"{name}\"\ntoken_hash = \"{hash}\"\npublish = [{publish}]\n\
         subscribe = [{subscribe}]\n"
    )
}

#[tokio::test]
async fn a_changed_config_file_applies_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eventbus.toml");
    let t1 = hash_token("t1");
    write_config(
        &path,
        &principal_toml_hashed("svc", &t1, "\"a.>\"", "\"a.>\""),
    );
    let bus = TestBus::start_server(ServerConfig {
        auth: eventbus::config::read_auth_config(&path).unwrap(),
        config_file: Some(path.clone()),
        shutdown_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    })
    .await;
    let mut svc = client(&bus, Some("t1")).await;
    publish(&mut svc, vec![from("svc", "a.1")]).await.unwrap();
    let mut open = subscribe(&mut svc, "a.>", "").await.unwrap();
    assert_eq!(replayed_topics(&mut open).await, ["a.1"]);

    publish(&mut svc, vec![from("svc", "a.2")]).await.unwrap();

    // The same principal, now allowed only `b.>`: publishing to `a.` is refused, and the open
    // subscription ends at its next delivery.
    write_config(
        &path,
        &principal_toml_hashed("svc", &t1, "\"a.>\", \"b.>\"", "\"b.>\""),
    );
    let mut other = client(&bus, Some("t1")).await;
    eventually("the reloaded permissions", WAIT, || {
        let mut other = other.clone();
        async move { subscribe(&mut other, "a.>", "").await.err() }
    })
    .await;
    publish(&mut svc, vec![from("svc", "a.3")]).await.unwrap();
    let ended = loop {
        match tokio::time::timeout(WAIT, open.message()).await.unwrap() {
            Ok(Some(pb::SubscribeResponse {
                message: Some(Message::Event(e)),
                ..
            })) if e.topic == "a.2" => continue,
            Ok(other) => panic!("expected the stream to end, got {other:?}"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::PermissionDenied, "{ended:?}");
    assert!(
        ended.message().contains("after a configuration reload"),
        "{ended:?}"
    );

    // A removed principal's token no longer authenticates.
    write_config(&path, &principal_toml("other", "t2", "\"b.>\"", "\"b.>\""));
    eventually("the removed principal", WAIT, || {
        let mut other = other.clone();
        async move {
            let status = publish(&mut other, vec![from("svc", "b.1")]).await.err()?;
            (status.code() == Code::Unauthenticated).then_some(())
        }
    })
    .await;
    other = client(&bus, Some("t2")).await;
    publish(&mut other, vec![from("other", "b.1")])
        .await
        .unwrap();
}

/// Sends one batch on an open PublishStream and returns its answer.
async fn stream_batch(
    requests: &tokio::sync::mpsc::Sender<pb::PublishStreamRequest>,
    answers: &mut Streaming<pb::PublishStreamResponse>,
    request_id: u64,
    events: Vec<pb::Event>,
) -> pb::publish_stream_response::Result {
    requests
        .send(pb::PublishStreamRequest { request_id, events })
        .await
        .unwrap();
    let answer = tokio::time::timeout(WAIT, answers.message())
        .await
        .expect("an answer in time")
        .expect("the stream goes on")
        .expect("an answer");
    assert_eq!(answer.request_id, request_id);
    answer.result.expect("a result")
}

/// Opens a PublishStream; returns its request sender and its answers.
async fn publish_stream(
    client: &mut EventBusServiceClient<Authed>,
) -> (
    tokio::sync::mpsc::Sender<pb::PublishStreamRequest>,
    Streaming<pb::PublishStreamResponse>,
) {
    let (requests, outbound) = tokio::sync::mpsc::channel(4);
    let answers = client
        .publish_stream(tokio_stream::wrappers::ReceiverStream::new(outbound))
        .await
        .unwrap()
        .into_inner();
    (requests, answers)
}

/// Waits until an open subscription ends, skipping events; returns the status it ended with.
async fn ended_with(stream: &mut Streaming<pb::SubscribeResponse>) -> Status {
    loop {
        match tokio::time::timeout(WAIT, stream.message()).await.unwrap() {
            Ok(Some(pb::SubscribeResponse {
                message: Some(Message::Event(_) | Message::CaughtUp(_)),
                ..
            })) => continue,
            Ok(other) => panic!("expected the stream to end, got {other:?}"),
            Err(status) => return status,
        }
    }
}

#[tokio::test]
async fn a_rotated_token_ends_the_rights_of_streams_opened_with_the_old_one() {
    use pb::publish_stream_response::Result as Answer;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eventbus.toml");
    write_config(&path, &principal_toml("svc", "old", "\"a.>\"", "\"a.>\""));
    let bus = TestBus::start_server(ServerConfig {
        auth: eventbus::config::read_auth_config(&path).unwrap(),
        config_file: Some(path.clone()),
        shutdown_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    })
    .await;
    let mut svc = client(&bus, Some("old")).await;
    let (requests, mut answers) = publish_stream(&mut svc).await;
    let first = stream_batch(&requests, &mut answers, 1, vec![from("svc", "a.1")]).await;
    assert!(matches!(first, Answer::Published(_)), "{first:?}");
    let mut open = subscribe(&mut svc, "a.>", "").await.unwrap();
    assert_eq!(replayed_topics(&mut open).await, ["a.1"]);

    // The same principal name, with a new token: the leaked one must stop working everywhere,
    // on the streams it already opened too.
    write_config(&path, &principal_toml("svc", "new", "\"a.>\"", "\"a.>\""));
    let old = client(&bus, Some("old")).await;
    eventually("the rotated token refused", WAIT, || {
        let mut old = old.clone();
        async move {
            let status = publish(&mut old, vec![from("svc", "a.0")]).await.err()?;
            (status.code() == Code::Unauthenticated).then_some(())
        }
    })
    .await;
    match stream_batch(&requests, &mut answers, 2, vec![from("svc", "a.2")]).await {
        Answer::Error(error) => {
            assert_eq!(error.code, Code::Unauthenticated as i32, "{error:?}");
            assert!(
                error.message.contains("no longer any principal's"),
                "{error:?}"
            );
        }
        other => panic!("the old token's stream published after the rotation: {other:?}"),
    }
    let mut renewed = client(&bus, Some("new")).await;
    publish(&mut renewed, vec![from("svc", "a.3")])
        .await
        .unwrap();
    let ended = ended_with(&mut open).await;
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    // Nothing the old stream sent after the rotation was stored (the probes before it were).
    let mut check = subscribe(&mut renewed, "a.>", "").await.unwrap();
    let stored = replayed_topics(&mut check).await;
    assert!(!stored.contains(&"a.2".to_owned()), "{stored:?}");
    assert_eq!(stored.last().map(String::as_str), Some("a.3"), "{stored:?}");
}

#[tokio::test]
async fn turning_authentication_on_ends_the_open_streams_of_the_open_bus() {
    use pb::publish_stream_response::Result as Answer;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eventbus.toml");
    write_config(&path, "# open: no principals yet\n");
    let bus = TestBus::start_server(ServerConfig {
        config_file: Some(path.clone()),
        shutdown_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    })
    .await;
    let mut anyone = client(&bus, None).await;
    let (requests, mut answers) = publish_stream(&mut anyone).await;
    let first = stream_batch(&requests, &mut answers, 1, vec![from("x", "a.1")]).await;
    assert!(matches!(first, Answer::Published(_)), "{first:?}");
    let mut open = subscribe(&mut anyone, "a.>", "").await.unwrap();
    assert_eq!(replayed_topics(&mut open).await, ["a.1"]);

    write_config(&path, &principal_toml("svc", "t1", "\"a.>\"", "\"a.>\""));
    eventually("authentication turned on", WAIT, || {
        let mut anyone = anyone.clone();
        async move {
            let status = publish(&mut anyone, vec![from("x", "a.0")]).await.err()?;
            (status.code() == Code::Unauthenticated).then_some(())
        }
    })
    .await;
    match stream_batch(&requests, &mut answers, 2, vec![from("x", "a.2")]).await {
        Answer::Error(error) => assert_eq!(error.code, Code::Unauthenticated as i32, "{error:?}"),
        other => panic!("an open-bus stream published after auth was turned on: {other:?}"),
    }
    let mut svc = client(&bus, Some("t1")).await;
    publish(&mut svc, vec![from("svc", "a.3")]).await.unwrap();
    let ended = ended_with(&mut open).await;
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert!(ended.message().contains("now authenticates"), "{ended:?}");
}

#[tokio::test]
async fn a_flood_of_wrong_tokens_is_cut_off_per_address_and_known_tokens_keep_working() {
    let svc = PrincipalConfig {
        publish: patterns(&["a.>"]),
        ..principal("svc", "good")
    };
    let bus = start(vec![svc], LimitsConfig::default()).await;
    let channel = bus.channel().await;
    let with = |token: String| {
        EventBusServiceClient::with_interceptor(channel.clone(), Bearer(Some(token)))
    };
    // Known before the flood: remembered, never verified again.
    publish(&mut with("good".into()), vec![from("svc", "a.1")])
        .await
        .unwrap();
    let flood = eventbus::auth::NEW_TOKENS_PER_ADDRESS_BURST as usize * 3;
    // All at once, as a flood comes: the limiter counts each guess before it waits for a
    // verifier, so what passes is the burst and what the rate refills meanwhile.
    let guesses = (0..flood).map(|n| {
        let mut guesser = with(format!("guess-{n}"));
        async move { publish(&mut guesser, vec![from("svc", "a.x")]).await }
    });
    let mut cut_off = 0;
    for outcome in futures_util::future::join_all(guesses).await {
        let status = outcome.unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        if status.message().contains("too many new tokens") {
            cut_off += 1;
        }
    }
    assert!(
        cut_off >= flood / 3,
        "only {cut_off} of {flood} guesses were cut off without a verification"
    );
    publish(&mut with("good".into()), vec![from("svc", "a.2")])
        .await
        .unwrap();
}

/// The `[[principals]]` shape issue #14 fixed as a contract (outside checks write it), with
/// every key, parsed from text as an operator writes it.
#[test]
fn the_principals_file_shape_is_read_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eventbus.toml");
    let hash = hash_token("user-token");
    std::fs::write(
        &path,
        format!(
            r#"
[[principals]]
name = "user-service"
token_hash = "{hash}"
publish = ["user.>"]
publish_deny = ["user.secret"]
subscribe = ["user.query"]
subscribe_deny = ["user.query.internal"]
groups = ["user-service"]
admin = false
sources = ["user-service"]
limits = {{ publish_events_per_second = 500 }}

[[principals]]
name = "order-service"
cert_subject = "CN=order-service,O=Acme"
publish = ["order.>"]
subscribe = ["order.query"]
admin = true

[limits.connection]
subscriptions = 64
queries_in_flight = 32
publish_events_per_second = 1000
publish_bytes_per_second = 1048576

[limits.principal]
publish_events_per_second = 2000
"#
        ),
    )
    .unwrap();
    let config = eventbus::config::read_auth_config(&path).unwrap();
    let [user, order] = &config.principals[..] else {
        panic!("two principals: {config:?}")
    };
    assert_eq!(user.name, "user-service");
    assert_eq!(user.token_hash.as_deref(), Some(hash.as_str()));
    assert_eq!(user.publish, ["user.>"]);
    assert_eq!(user.publish_deny, ["user.secret"]);
    assert_eq!(user.subscribe, ["user.query"]);
    assert_eq!(user.subscribe_deny, ["user.query.internal"]);
    assert_eq!(
        user.groups.as_deref(),
        Some(&["user-service".to_owned()][..])
    );
    assert!(!user.admin);
    assert_eq!(
        user.limits
            .unwrap()
            .publish_events_per_second
            .map(|n| n.get()),
        Some(500)
    );
    assert_eq!(
        order.cert_subject.as_deref(),
        Some("CN=order-service,O=Acme")
    );
    assert!(order.admin && order.token_hash.is_none());
    let limits = config.limits;
    assert_eq!(limits.connection.subscriptions, Some(64));
    assert_eq!(limits.connection.queries_in_flight, Some(32));
    assert_eq!(
        limits.connection.publish_bytes_per_second.map(|n| n.get()),
        Some(1_048_576)
    );
    assert_eq!(
        limits.principal.publish_events_per_second.map(|n| n.get()),
        Some(2000)
    );
}

#[tokio::test]
async fn hash_token_prints_a_hash_the_bus_accepts() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_eventbus"))
        .args(["hash-token", "--generate"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    let mut lines = text.lines();
    let (token, hash) = (lines.next().unwrap(), lines.next().unwrap());
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(!hash.contains(token));
    let bus = start(
        vec![PrincipalConfig {
            token_hash: Some(hash.to_owned()),
            publish: patterns(&["a"]),
            ..principal("svc", "unused")
        }],
        LimitsConfig::default(),
    )
    .await;
    publish(&mut client(&bus, Some(token)).await, vec![from("svc", "a")])
        .await
        .unwrap();
}

/// Principals named by their client certificate: by subject, or by a subject alternative name;
/// a certificate of the client CA that names no principal is UNAUTHENTICATED.
#[tokio::test]
async fn a_client_certificate_subject_names_its_principal() {
    let servers = common::tls::Pki::new("server-ca");
    let clients = common::tls::Pki::new("client-ca");
    let files = common::tls::TlsFiles::new(&servers, Some(&clients));
    let bus = TestBus::start_tls(ServerConfig {
        tls: Some(files.config()),
        auth: AuthConfig {
            principals: vec![
                PrincipalConfig {
                    token_hash: None,
                    cert_subject: Some("CN=order-service, O=Acme".into()),
                    publish: patterns(&["order.>"]),
                    ..principal("order-service", "unused")
                },
                PrincipalConfig {
                    token_hash: None,
                    cert_san: Some("billing.example".into()),
                    sources: Some(patterns(&["*"])),
                    ..principal("billing", "unused")
                },
            ],
            limits: LimitsConfig::default(),
        },
        shutdown_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    })
    .await;
    let connect = |cn: &str| {
        let pair = clients.client(cn, "Acme");
        eventbus::sdk::Client::builder(bus.https_url())
            .tls_ca_pem(servers.ca_pem())
            .tls_client_cert_pem(pair.cert, pair.key)
            .source("order-service")
            .connect()
    };
    let order = connect("order-service").await.unwrap();
    order
        .event("order.created")
        .data("x")
        .publish()
        .await
        .unwrap();
    let error = order
        .event("user.created")
        .data("x")
        .publish()
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::PermissionDenied, "{error}");

    // Named by a subject alternative name instead (as SPIFFE identities are): the test CA's
    // client certificates carry the DNS name `<cn>.example`.
    let billing = connect("billing").await.unwrap();
    let error = billing
        .event("order.created")
        .data("x")
        .publish()
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("principal \"billing\""),
        "{error}"
    );

    let stranger = connect("someone-else").await.unwrap();
    let error = stranger
        .event("order.created")
        .data("x")
        .publish()
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::Unauthenticated, "{error}");
    assert!(error.to_string().contains("CN=someone-else"), "{error}");
}

/// The CLI's admin verbs carry `--token`: the operator sees the server, a user without the
/// admin right is refused (and `server check` calls that CRITICAL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_admin_verbs_use_the_token_and_need_the_admin_right() {
    let bus = start(principals(), LimitsConfig::default()).await;
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_eventbus"))
                .args(args)
                .env_remove("EVENTBUS_SERVER")
                .env_remove("EVENTBUS_TOKEN")
                .output()
                .unwrap()
        })
    };
    let args = |verb: &[&str], token: &str| {
        verb.iter()
            .map(|s| s.to_string())
            .chain(["--server".into(), bus.url(), "--token".into(), token.into()])
            .collect::<Vec<String>>()
    };
    let info = run(args(&["server", "info", "--json"], "operator-token"))
        .await
        .unwrap();
    assert!(info.status.success(), "{info:?}");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["auth_enabled"], true);

    let groups = run(args(&["groups"], "user-token")).await.unwrap();
    assert_eq!(groups.status.code(), Some(1));
    let message = String::from_utf8_lossy(&groups.stderr);
    assert!(message.contains("PERMISSION_DENIED"), "{message}");

    let check = run(args(&["server", "check"], "user-token")).await.unwrap();
    assert_eq!(check.status.code(), Some(2));
    let line = String::from_utf8_lossy(&check.stdout);
    assert!(line.starts_with("CRITICAL: cannot ask the bus"), "{line}");
    let check = run(args(&["server", "check"], "operator-token"))
        .await
        .unwrap();
    assert_eq!(check.status.code(), Some(0), "{check:?}");
}
