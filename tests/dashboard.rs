//! The dashboard's API on the admin listener (`/api/v1/...`) and its embedded page, against a
//! real bus on every storage backend: the overview, the live tail (server-sent events), and
//! conversations found in the log. The page itself is driven in Chromium by
//! `scripts/test-dashboard.sh`.

mod common;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use common::{eventually, TestBus};
use eventbus::auth::{hash_token, AuthConfig, PrincipalConfig};
use eventbus::config::ServerConfig;
use eventbus::sdk::{Client, Reply, ServeOptions, SubscribeOptions};
use serde_json::Value;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

async fn start() -> (TestBus, SocketAddr) {
    let bus = TestBus::start_with_admin(ServerConfig {
        shutdown_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    })
    .await;
    let admin = bus.admin_addr.expect("an admin listener");
    (bus, admin)
}

async fn get_json(admin: SocketAddr, path: &str) -> (u16, Value) {
    let (status, body) = http_get(admin, path).await;
    let json = serde_json::from_str(&body)
        .unwrap_or_else(|error| panic!("{path}: not JSON ({error}): {body}"));
    (status, json)
}

async fn sdk(bus: &TestBus, source: &str) -> Client {
    Client::builder(bus.url())
        .source(source)
        .connect()
        .await
        .unwrap()
}

/// A server-sent-event stream, read line by line (hyper sends each item as one chunk of the
/// chunked body, so chunk-size lines are skipped as noise).
struct SseReader {
    lines: tokio::io::Lines<BufReader<tokio::net::TcpStream>>,
    status: u16,
}

impl SseReader {
    async fn open(admin: SocketAddr, path: &str) -> SseReader {
        SseReader::open_with(admin, path, "").await
    }

    /// As [`SseReader::open`], with `headers` (`Name: value\r\n` lines) added.
    async fn open_with(admin: SocketAddr, path: &str, headers: &str) -> SseReader {
        let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {admin}\r\nAccept: text/event-stream\r\n{headers}\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut lines = BufReader::new(stream).lines();
        let status_line = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .expect("a status line in time")
            .unwrap()
            .expect("a status line");
        let status = status_line
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        SseReader { lines, status }
    }

    /// The next item: its `event:` name and its `data:` parsed as JSON.
    async fn next(&mut self) -> (String, Value) {
        let (kind, _, data) = self.next_with_id().await;
        (kind, data)
    }

    /// The next item with its `id:` (empty when it has none).
    async fn next_with_id(&mut self) -> (String, String, Value) {
        let read = async {
            let mut kind = None;
            let mut id = String::new();
            loop {
                let line = self
                    .lines
                    .next_line()
                    .await
                    .unwrap()
                    .expect("the stream ended");
                if let Some(name) = line.strip_prefix("event: ") {
                    kind = Some(name.to_owned());
                } else if let Some(value) = line.strip_prefix("id: ") {
                    id = value.to_owned();
                } else if let Some(data) = line.strip_prefix("data: ") {
                    if let Some(kind) = kind.take() {
                        let data = serde_json::from_str(data).unwrap();
                        return (kind, std::mem::take(&mut id), data);
                    }
                }
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("a tail item in time")
    }
}

#[tokio::test]
async fn the_page_and_its_bundle_are_served_from_the_binary() {
    let (bus, admin) = start().await;
    for path in ["/", "/dashboard/"] {
        let (status, body) = http_get(admin, path).await;
        assert_eq!(status, 200, "{path}");
        assert!(
            body.contains("/dashboard/app.js"),
            "{path} loads the bundle"
        );
    }
    let (status, body) = http_get(admin, "/dashboard/app.js").await;
    assert_eq!(status, 200);
    assert!(body.len() > 10_000, "the bundle holds the graph library");
    let (status, _) = http_get(admin, "/dashboard/no-such-file.js").await;
    assert_eq!(status, 404);
    bus.stop(WAIT).await;
}

#[tokio::test]
async fn the_overview_shows_topics_groups_queries_and_the_event_web() {
    let (bus, admin) = start().await;
    let publisher = sdk(&bus, "order-service").await;
    let watcher = sdk(&bus, "billing").await;
    let _subscription = watcher
        .subscribe_with("order.*", SubscribeOptions::new().group("billing"))
        .await
        .unwrap();
    for _ in 0..3 {
        publisher.publish("order.created", "{}").await.unwrap();
    }
    let no_responders = publisher
        .query("nobody.query", "x", Duration::from_secs(1))
        .await;
    assert!(no_responders.is_err());

    let (status, overview) = get_json(admin, "/api/v1/overview").await;
    assert_eq!(status, 200, "{overview}");
    assert_eq!(overview["node"]["head_sequence"], 3);
    assert_eq!(overview["node"]["event_data"], true);
    let topic = overview["topics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "order.created")
        .unwrap_or_else(|| panic!("order.created listed: {overview}"));
    assert_eq!(topic["events_published"], 3);
    assert_eq!(topic["subscribers"], 1);
    assert_eq!(topic["groups"], serde_json::json!(["billing"]));
    let group = &overview["groups"][0];
    assert_eq!(
        (group["name"].as_str(), group["members"].as_u64()),
        (Some("billing"), Some(1))
    );
    assert_eq!(overview["queries"]["no_responders"], 1);

    let edges = overview["graph"]["edges"].as_array().unwrap();
    let has = |kind: &str, from: &str, to: &str| {
        edges
            .iter()
            .any(|e| e["kind"] == kind && e["from"] == from && e["to"] == to)
    };
    assert!(
        has("publishes", "service:order-service", "topic:order.created"),
        "{edges:?}"
    );
    assert!(
        has("subscribes", "topic:order.*", "service:billing"),
        "{edges:?}"
    );
    let publishes = edges
        .iter()
        .find(|e| e["kind"] == "publishes" && e["from"] == "service:order-service")
        .unwrap();
    assert_eq!(publishes["events"], 3);
    bus.stop(WAIT).await;
}

#[tokio::test]
async fn the_tail_streams_matching_events_and_is_no_responder() {
    let (bus, admin) = start().await;
    let client = sdk(&bus, "shop").await;
    client.publish("orders.created", "before").await.unwrap();

    let mut tail = SseReader::open(admin, "/api/v1/tail?pattern=orders.*").await;
    assert_eq!(tail.status, 200);
    let (kind, ready) = tail.next().await;
    assert_eq!(kind, "ready");
    assert_eq!(ready["pattern"], "orders.*");
    assert_eq!(ready["head_sequence"], 1);

    client
        .publish("users.created", "not matched")
        .await
        .unwrap();
    let sequence = client.publish("orders.created", "after").await.unwrap();
    let (kind, event) = tail.next().await;
    assert_eq!(kind, "event");
    assert_eq!(event["topic"], "orders.created");
    assert_eq!(event["data"], "after");
    assert_eq!(event["sequence"], sequence.to_string());
    assert_eq!(event["specversion"], "1.0");

    // The tail reads the log: a query on a tailed topic still finds no responder at once.
    let started = std::time::Instant::now();
    let error = client
        .query("orders.created", "anyone?", Duration::from_secs(10))
        .await
        .unwrap_err();
    assert!(error.to_string().contains("no responders"), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "fail-fast, not a timeout"
    );
    // Nor is it a subscription anyone sees.
    let (_, overview) = get_json(admin, "/api/v1/overview").await;
    assert_eq!(overview["node"]["subscriptions"], 0, "{overview}");
    bus.stop(WAIT).await;
}

#[tokio::test]
async fn a_tail_resumes_after_its_last_event_id_with_no_gap() {
    let (bus, admin) = start().await;
    let client = sdk(&bus, "shop").await;
    let first = client.publish("orders.created", "one").await.unwrap();
    client
        .publish("users.created", "not matched")
        .await
        .unwrap();
    let third = client.publish("orders.created", "three").await.unwrap();
    let fourth = client.publish("orders.created", "four").await.unwrap();

    // As a browser's EventSource reconnects: with the id of the last event it saw.
    let mut tail = SseReader::open_with(
        admin,
        "/api/v1/tail?pattern=orders.*",
        &format!("Last-Event-ID: {first}\r\n"),
    )
    .await;
    assert_eq!(tail.status, 200);
    let (kind, ready) = tail.next().await;
    assert_eq!(kind, "ready");
    assert_eq!(ready["resumed_after"], first);
    for (sequence, data) in [(third, "three"), (fourth, "four")] {
        let (kind, id, event) = tail.next_with_id().await;
        assert_eq!(
            (kind.as_str(), event["data"].as_str()),
            ("event", Some(data))
        );
        assert_eq!(id, sequence.to_string());
    }
    // Then live, as any tail.
    let fifth = client.publish("orders.created", "five").await.unwrap();
    let (_, id, _) = tail.next_with_id().await;
    assert_eq!(id, fifth.to_string());

    // An id past the head (another log) starts at the head; one that is no number is refused.
    let mut fresh = SseReader::open_with(admin, "/api/v1/tail", "Last-Event-ID: 999999\r\n").await;
    let (_, ready) = fresh.next().await;
    assert_eq!(ready["resumed_after"], Value::Null);
    assert_eq!(ready["head_sequence"], fifth);
    let refused = SseReader::open_with(admin, "/api/v1/tail", "Last-Event-ID: abc\r\n").await;
    assert_eq!(refused.status, 400);
    bus.stop(WAIT).await;
}

#[tokio::test]
async fn bad_requests_are_refused_naming_the_parameter() {
    let (bus, admin) = start().await;
    let (status, body) = get_json(admin, "/api/v1/tail?pattern=orders..created").await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().starts_with("pattern: "),
        "{body}"
    );
    let (status, body) = get_json(admin, "/api/v1/conversations?limit=0").await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().starts_with("limit: "),
        "{body}"
    );
    // A query string that does not parse gets the same JSON shape.
    let (status, body) = get_json(admin, "/api/v1/conversations?limit=abc").await;
    assert_eq!(status, 400);
    let error = body["error"].as_str().unwrap();
    assert!(
        error.starts_with("query string: ") && error.contains("limit"),
        "{body}"
    );
    let long = "x".repeat(300);
    let (status, body) = get_json(admin, &format!("/api/v1/conversations/{long}")).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("correlation_id: "),
        "{body}"
    );
    bus.stop(WAIT).await;
}

#[tokio::test]
async fn a_conversation_pairs_each_query_with_its_reply_and_names_the_slowest() {
    let (bus, admin) = start().await;
    let stop = CancellationToken::new();
    let mut serving = Vec::new();
    for (topic, service, delay) in [
        ("user.query", "user-service", 0),
        ("order.query", "order-service", 150),
    ] {
        let client = sdk(&bus, service).await;
        let responder = client
            .responder(topic, ServeOptions::default())
            .await
            .unwrap();
        serving.push(tokio::spawn(responder.run(
            move |_query: eventbus::pb::Event| async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                Ok::<_, String>(Reply::new("{}"))
            },
            stop.clone().cancelled_owned(),
        )));
    }
    let asker = sdk(&bus, "query-service").await;
    for topic in ["user.query", "order.query"] {
        asker
            .event(topic)
            .data("{}")
            .correlation_id("get-7")
            .query(Duration::from_secs(10))
            .await
            .unwrap();
    }
    asker
        .event("audit.logged")
        .data("{}")
        .correlation_id("other")
        .publish()
        .await
        .unwrap();

    let (status, conversation) = get_json(admin, "/api/v1/conversations/get-7").await;
    assert_eq!(status, 200, "{conversation}");
    let exchanges = conversation["exchanges"].as_array().unwrap();
    let got: Vec<_> = exchanges
        .iter()
        .map(|x| {
            (
                x["topic"].as_str().unwrap(),
                x["asker"].as_str().unwrap(),
                x["responder"].as_str(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("user.query", "query-service", Some("user-service")),
            ("order.query", "query-service", Some("order-service")),
        ]
    );
    assert_eq!(conversation["events"].as_array().unwrap().len(), 4);
    assert_eq!(
        conversation["slowest"], 1,
        "order-service waits 150 ms before answering"
    );
    assert!(exchanges[1]["took_ms"].as_f64().unwrap() >= 150.0);

    let (status, recent) = get_json(admin, "/api/v1/conversations").await;
    assert_eq!(status, 200);
    let ids: Vec<_> = recent
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["correlation_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["other", "get-7"], "newest first");
    assert_eq!(recent[1]["queries"], 2);
    assert_eq!(
        recent[1]["topics"],
        serde_json::json!(["user.query", "order.query"])
    );

    let (status, none) = get_json(admin, "/api/v1/conversations/never-used").await;
    assert_eq!(status, 200);
    assert_eq!(none["events"], serde_json::json!([]));

    stop.cancel();
    for server in serving {
        tokio::time::timeout(WAIT, server)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
    bus.stop(WAIT).await;
}

#[tokio::test]
async fn event_contents_stay_closed_on_a_bus_with_authentication() {
    let bus = TestBus::start_with_admin(ServerConfig {
        auth: AuthConfig {
            principals: vec![PrincipalConfig {
                name: "svc".to_owned(),
                token_hash: Some(hash_token("svc-token")),
                cert_subject: None,
                cert_san: None,
                publish: vec![">".to_owned()],
                publish_deny: vec![],
                subscribe: vec![">".to_owned()],
                subscribe_deny: vec![],
                groups: None,
                admin: false,
                sources: None,
                limits: None,
            }],
            ..AuthConfig::default()
        },
        shutdown_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    })
    .await;
    let admin = bus.admin_addr.unwrap();
    for path in [
        "/api/v1/tail?pattern=%3E",
        "/api/v1/conversations",
        "/api/v1/conversations/x",
    ] {
        let (status, body) = get_json(admin, path).await;
        assert_eq!(status, 403, "{path}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("without authentication"),
            "{body}"
        );
    }
    let (status, overview) = get_json(admin, "/api/v1/overview").await;
    assert_eq!(status, 200);
    assert_eq!(overview["node"]["event_data"], false);
    bus.stop(WAIT).await;
}

#[tokio::test]
async fn a_tail_ends_when_a_reload_turns_authentication_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eventbus.toml");
    std::fs::write(&path, "# open: no principals yet\n").unwrap();
    let bus = TestBus::start_with_admin(ServerConfig {
        config_file: Some(path.clone()),
        shutdown_grace: Duration::from_secs(5),
        ..ServerConfig::default()
    })
    .await;
    let admin = bus.admin_addr.unwrap();
    let mut tail = SseReader::open(admin, "/api/v1/tail?pattern=%3E").await;
    assert_eq!(tail.status, 200);
    assert_eq!(tail.next().await.0, "ready");

    let partial = path.with_extension("partial");
    std::fs::write(
        &partial,
        format!(
            "[[principals]]\nname = \"svc\"\ntoken_hash = \"{}\"\npublish = [\">\"]\n",
            hash_token("svc-token")
        ),
    )
    .unwrap();
    std::fs::rename(&partial, &path).unwrap();
    eventually("authentication turned on", WAIT, || async {
        let (status, _) = get_json(admin, "/api/v1/conversations").await;
        (status == 403).then_some(())
    })
    .await;
    let client = Client::builder(bus.url())
        .source("svc")
        .token("svc-token")
        .connect()
        .await
        .unwrap();
    client
        .publish("secret.created", "not for the tail")
        .await
        .unwrap();
    let (kind, error) = tail.next().await;
    assert_eq!(kind, "error", "{error}");
    assert!(
        error["error"]
            .as_str()
            .unwrap()
            .contains("now authenticates"),
        "{error}"
    );
    bus.stop(WAIT).await;
}

#[tokio::test]
async fn an_open_tail_does_not_hold_up_shutdown() {
    let (bus, admin) = start().await;
    let mut tail = SseReader::open(admin, "/api/v1/tail").await;
    assert_eq!(tail.next().await.0, "ready");
    // stop() waits (bounded) for the server task, admin listener included, to end: an open
    // tail must not hold the listener's graceful shutdown.
    bus.stop(WAIT).await;
    let drained = async { while let Ok(Some(_)) = tail.lines.next_line().await {} };
    tokio::time::timeout(WAIT, drained)
        .await
        .expect("the tail's connection ends with the bus");
}
