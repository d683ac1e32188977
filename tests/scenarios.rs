//! The Rust SDK's runner of the shared client scenarios (`scenarios/*.json`, format in
//! `scenarios/README.md`): the same behaviours the Python and TypeScript clients are held to, run
//! against a real bus process, or, for a scenario with `cluster`, several bus processes over one
//! JetStream stream on a nats-server of the test's own.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventbus::pb;
use eventbus::sdk::{code_name, Client, Reply, ServeOptions, SubscribeOptions, SubscriptionItem};
use futures_util::StreamExt as _;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// What one subscription collected: (n from the JSON data, sequence), and how often it resumed.
#[derive(Default)]
struct Collected {
    events: Vec<(i64, u64)>,
    resumed: usize,
}

struct BusProcess(Child);

impl Drop for BusProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scenario_files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no scenarios in {}", dir.display());
    files
}

/// The flags of a scenario's `bus` settings (snake_case keys to `--kebab-case`).
fn bus_flags(settings: Option<&Value>) -> Vec<String> {
    let mut flags = Vec::new();
    if let Some(Value::Object(settings)) = settings {
        for (key, value) in settings {
            let value = match value {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            };
            flags.push(format!("--{}", key.replace('_', "-")));
            flags.push(value);
        }
    }
    flags
}

/// The buses a scenario runs against, and the nats-server under them if it has a `cluster`.
struct Buses {
    nodes: Vec<Option<BusProcess>>,
    _nats: Option<common::nats::NatsServer>,
}

/// Starts the scenario's bus (or its `cluster.nodes` bus nodes on one JetStream stream) and a
/// client that knows every node, node 0 first.
async fn start_buses(scenario: &Value) -> (Buses, Client) {
    let settings = bus_flags(scenario.get("bus"));
    let cluster = scenario.get("cluster");
    known_keys(cluster.unwrap_or(&Value::Null), &["nodes"], "cluster");
    let nodes = cluster
        .map(|c| field(c, "nodes").as_u64().unwrap() as usize)
        .unwrap_or(1);
    let nats = cluster.map(|_| common::nats::NatsServer::start());
    let mut buses = Buses {
        nodes: Vec::new(),
        _nats: None,
    };
    let mut urls = Vec::new();
    for _ in 0..nodes {
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_eventbus"));
        command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--log-level", "warn"])
            .args(&settings)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match &nats {
            Some(nats) => command.args(["--storage", "jetstream", "--nats-url", &nats.url]),
            None => command.args(["--storage", "memory"]),
        };
        buses
            .nodes
            .push(Some(BusProcess(command.spawn().expect("start the bus"))));
        urls.push(format!("http://127.0.0.1:{port}"));
    }
    buses._nats = nats;
    let deadline = Instant::now() + Duration::from_secs(30);
    for url in &urls {
        loop {
            if let Ok(client) = Client::builder(url.as_str()).connect().await {
                if client.list_topics(None).await.is_ok() {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the bus at {url} did not come up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let client = Client::builder(urls)
        .source("scenario-runner")
        .connect()
        .await
        .unwrap();
    (buses, client)
}

/// How long a step may keep asking again after errors the client calls retryable (the node it
/// was on went away): as long as a client moving to another node may take.
const RETRY_WITHIN: Duration = Duration::from_secs(30);

fn field<'a>(step: &'a Value, name: &str) -> &'a Value {
    step.get(name)
        .unwrap_or_else(|| panic!("step {step} has no {name:?}"))
}

fn known_keys(object: &Value, known: &[&str], what: &str) {
    if let Value::Object(map) = object {
        for key in map.keys() {
            assert!(
                known.contains(&key.as_str()),
                "unknown {what} key {key:?}: this runner must learn it"
            );
        }
    }
}

/// Runs one scenario; panics with the step that failed.
async fn run(scenario: &Value) {
    known_keys(
        scenario,
        &["name", "description", "bus", "cluster", "steps"],
        "scenario",
    );
    let (mut buses, client) = start_buses(scenario).await;
    let collected: HashMap<String, Arc<Mutex<Collected>>> = HashMap::new();
    let mut collected = collected;
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for step in field(scenario, "steps").as_array().unwrap() {
        match field(step, "op").as_str().unwrap() {
            "subscribe" => {
                let id = field(step, "id").as_str().unwrap().to_owned();
                let mut options = SubscribeOptions::new();
                if let Some(group) = step.get("group").and_then(Value::as_str) {
                    options = options.group(group);
                }
                let mut subscription = client
                    .subscribe_with(field(step, "pattern").as_str().unwrap(), options)
                    .await
                    .unwrap();
                let sink = Arc::new(Mutex::new(Collected::default()));
                collected.insert(id, sink.clone());
                let stop = stop.clone();
                tasks.push(tokio::spawn(async move {
                    loop {
                        let item = tokio::select! {
                            _ = stop.cancelled() => return,
                            item = subscription.next() => item,
                        };
                        match item {
                            Some(Ok(SubscriptionItem::Event(event))) => {
                                let data: Value =
                                    serde_json::from_slice(&event.data).unwrap_or(Value::Null);
                                let n = data.get("n").and_then(Value::as_i64).unwrap_or(-1);
                                sink.lock().unwrap().events.push((n, event.sequence));
                            }
                            Some(Ok(SubscriptionItem::Resumed { .. })) => {
                                sink.lock().unwrap().resumed += 1
                            }
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => return,
                        }
                    }
                }));
            }
            "publish" => {
                let topic = field(step, "topic").as_str().unwrap();
                let count = field(step, "count").as_i64().unwrap();
                let first = field(step, "first").as_i64().unwrap();
                let events: Vec<pb::Event> = (0..count)
                    .map(|i| {
                        client
                            .event(topic)
                            .json(&json!({"n": first + i}))
                            .unwrap()
                            .build()
                    })
                    .collect();
                let batches = if field(step, "batch").as_bool().unwrap() {
                    vec![events]
                } else {
                    events.into_iter().map(|event| vec![event]).collect()
                };
                for batch in batches {
                    // Asked again with the same ids while the client moves to another node:
                    // the bus stores each event once.
                    let deadline = Instant::now() + RETRY_WITHIN;
                    loop {
                        match client.publish_batch(batch.clone()).await {
                            Ok(_) => break,
                            Err(error) if error.is_retryable() && Instant::now() < deadline => {
                                tokio::time::sleep(Duration::from_millis(50)).await
                            }
                            Err(error) => panic!("publish failed: {error}"),
                        }
                    }
                }
            }
            "serve" => {
                let mut options = ServeOptions::default();
                if let Some(group) = step.get("group").and_then(Value::as_str) {
                    options = options.group(group);
                }
                let responder = client
                    .responder(field(step, "topic").as_str().unwrap(), options)
                    .await
                    .unwrap();
                let stop = stop.clone();
                tasks.push(tokio::spawn(async move {
                    let _ = responder
                        .run(
                            |query: pb::Event| async move {
                                let data: Value =
                                    serde_json::from_slice(&query.data).unwrap_or(Value::Null);
                                Reply::json(&json!({"echo": data}))
                            },
                            stop.cancelled_owned(),
                        )
                        .await;
                }));
            }
            "kill_node" => {
                let node = field(step, "node").as_u64().unwrap() as usize;
                let mut bus = buses.nodes[node].take().expect("a running node");
                bus.0.kill().unwrap();
                bus.0.wait().unwrap();
            }
            "query" => check_query(&client, step).await,
            "receive" => check_receive(&collected, step).await,
            other => panic!("unknown op {other:?}: this runner must learn it"),
        }
    }
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
}

async fn check_query(client: &Client, step: &Value) {
    let expect = field(step, "expect");
    known_keys(
        expect,
        &[
            "reply",
            "reply_type",
            "error",
            "status",
            "within_ms",
            "after_ms",
        ],
        "query expect",
    );
    known_keys(
        step,
        &[
            "op",
            "topic",
            "data",
            "timeout_ms",
            "retry_within_ms",
            "expect",
        ],
        "query",
    );
    let data = serde_json::to_vec(field(step, "data")).unwrap();
    let timeout = Duration::from_millis(field(step, "timeout_ms").as_u64().unwrap());
    let retry_until = step
        .get("retry_within_ms")
        .and_then(Value::as_u64)
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let (outcome, elapsed) = loop {
        let started = Instant::now();
        let outcome = client
            .query(
                field(step, "topic").as_str().unwrap(),
                data.clone(),
                timeout,
            )
            .await;
        let elapsed = started.elapsed();
        match (&outcome, retry_until) {
            (Err(error), Some(until))
                if (error.is_retryable() || error.is_no_responders()) && Instant::now() < until =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            _ => break (outcome, elapsed),
        }
    };
    if let Some(within) = expect.get("within_ms").and_then(Value::as_u64) {
        assert!(
            elapsed <= Duration::from_millis(within),
            "took {elapsed:?}, limit {within} ms"
        );
    }
    if let Some(after) = expect.get("after_ms").and_then(Value::as_u64) {
        assert!(
            elapsed >= Duration::from_millis(after),
            "returned after only {elapsed:?}"
        );
    }
    match (outcome, expect.get("error")) {
        (Ok(reply), None) => {
            if let Some(expected) = expect.get("reply") {
                let got: Value = serde_json::from_slice(&reply.data).unwrap();
                assert_eq!(&got, expected, "reply data");
            }
            if let Some(expected) = expect.get("reply_type").and_then(Value::as_str) {
                assert_eq!(reply.r#type, expected, "reply type");
            }
        }
        (Err(error), Some(reason)) => {
            assert_eq!(error.reason(), reason.as_str(), "error reason of {error}");
            match reason.as_str() {
                Some("no-responders") => assert!(error.is_no_responders(), "{error}"),
                Some("query-timeout") => assert!(error.is_timeout(), "{error}"),
                _ => {}
            }
            if let Some(status) = expect.get("status").and_then(Value::as_str) {
                assert_eq!(code_name(error.code()), status, "status of {error}");
            }
        }
        (Ok(reply), Some(reason)) => panic!("expected error {reason}, got reply {reply:?}"),
        (Err(error), None) => panic!("expected a reply, got {error}"),
    }
}

async fn check_receive(collected: &HashMap<String, Arc<Mutex<Collected>>>, step: &Value) {
    let expect = field(step, "expect");
    known_keys(
        expect,
        &["n_range", "in_order", "each_at_least", "resumed"],
        "receive expect",
    );
    let from: Vec<&Arc<Mutex<Collected>>> = field(step, "from")
        .as_array()
        .unwrap()
        .iter()
        .map(|id| &collected[id.as_str().unwrap()])
        .collect();
    let count = field(step, "count").as_u64().unwrap() as usize;
    let within = Duration::from_millis(field(step, "within_ms").as_u64().unwrap());
    let deadline = Instant::now() + within;
    loop {
        let total: usize = from.iter().map(|c| c.lock().unwrap().events.len()).sum();
        if total >= count {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "collected {total} of {count} events within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Some(range) = expect.get("n_range").and_then(Value::as_array) {
        let (start, end) = (range[0].as_i64().unwrap(), range[1].as_i64().unwrap());
        let mut all: Vec<i64> = from
            .iter()
            .flat_map(|c| {
                c.lock()
                    .unwrap()
                    .events
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
            })
            .collect();
        all.sort_unstable();
        assert_eq!(all, (start..end).collect::<Vec<_>>(), "n values");
    }
    if expect.get("in_order").and_then(Value::as_bool) == Some(true) {
        for sink in &from {
            let events = &sink.lock().unwrap().events;
            assert!(
                events
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1),
                "events out of order: {events:?}"
            );
        }
    }
    if let Some(least) = expect.get("each_at_least").and_then(Value::as_u64) {
        for sink in &from {
            assert!(sink.lock().unwrap().events.len() as u64 >= least);
        }
    }
    if expect.get("resumed").and_then(Value::as_bool) == Some(true) {
        for sink in &from {
            assert!(sink.lock().unwrap().resumed > 0, "the stream never dropped");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shared_scenario_holds_for_the_rust_sdk() {
    let mut failed = Vec::new();
    for file in scenario_files() {
        let scenario: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let name = scenario["name"].as_str().unwrap_or("?").to_owned();
        let outcome = tokio::spawn(async move { run(&scenario).await }).await;
        match outcome {
            Ok(()) => eprintln!("scenario {name}: ok"),
            Err(error) => {
                eprintln!("scenario {name}: FAILED");
                failed.push((name, error));
            }
        }
    }
    assert!(failed.is_empty(), "failed scenarios: {failed:?}");
}
