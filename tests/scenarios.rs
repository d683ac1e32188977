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
use eventbus::sdk::{
    code_name, Client, ClientBuilder, ManualAck, Reply, ServeOptions, SubscribeOptions,
    SubscriptionItem,
};
use futures_util::StreamExt as _;
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// One event a subscription collected.
struct Got {
    /// `n` from the JSON data (-1 when it has none).
    n: i64,
    sequence: u64,
    /// The delivery attempt (1 for a subscription without MANUAL ack).
    attempt: u32,
    /// When it reached the runner (monotonic).
    at: Instant,
    attributes: HashMap<String, String>,
}

/// What one subscription collected, and how often it resumed.
#[derive(Default)]
struct Collected {
    events: Vec<Got>,
    resumed: usize,
}

/// What the runner does with each delivery of a MANUAL-ack subscription (`settle`).
#[derive(Clone, Copy)]
enum Settle {
    Ack,
    Nack(Duration),
    NackFirst(Duration),
    IgnoreFirst,
}

struct BusProcess(Child);

impl Drop for BusProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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

/// One bus node of a scenario: how to start it (again, for `restart_node`) and its process.
struct Node {
    /// `eventbus serve` arguments, port and data directory included.
    args: Vec<String>,
    url: String,
    process: Option<BusProcess>,
    /// The node's own data directory with `"storage": "file"`, kept across restarts.
    _data: Option<tempfile::TempDir>,
}

impl Node {
    fn spawn(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_eventbus"))
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the bus");
        self.process = Some(BusProcess(child));
    }
}

/// The buses a scenario runs against, and the nats-server under them if it has a `cluster`.
struct Buses {
    nodes: Vec<Node>,
    /// A client of one node, with the run's TLS and token (for readiness probes).
    probe: Box<dyn Fn(String) -> ClientBuilder + Send + Sync>,
    _nats: Option<common::nats::NatsServer>,
    /// The certificates and config file of a secure run, removed with the buses.
    _secure: Option<common::tls::TlsFiles>,
}

impl Buses {
    /// Waits until node `node` answers (a ListTopics call), for up to 30 s.
    async fn wait_serving(&self, node: usize) {
        let url = &self.nodes[node].url;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(client) = (self.probe)(url.clone()).connect().await {
                if client.list_topics(None).await.is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the bus at {url} did not come up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The bearer token of a secure run's one principal.
const TOKEN: &str = "scenario-runner-token";

/// A secure run's bus: TLS with a CA made now, and one principal, by token, that may do
/// everything the scenarios do (admin for the runner's readiness probe). Returns the bus's
/// flags, the client's CA, and the files to keep until the bus stops.
fn secure_bus() -> (Vec<String>, String, common::tls::TlsFiles) {
    let pki = common::tls::Pki::new("scenario-ca");
    let files = common::tls::TlsFiles::new(&pki, None);
    let config = files.path("eventbus.toml");
    std::fs::write(
        &config,
        format!(
            "[[principals]]\nname = \"scenario-runner\"\ntoken_hash = \"{}\"\n\
             publish = [\">\"]\nsubscribe = [\">\"]\nsources = [\"*\"]\nadmin = true\n",
            eventbus::auth::hash_token(TOKEN)
        ),
    )
    .unwrap();
    let flags = [
        ("--tls-cert", files.path("cert.pem")),
        ("--tls-key", files.path("key.pem")),
        ("--config", config),
    ]
    .into_iter()
    .flat_map(|(flag, path)| [flag.to_owned(), path.display().to_string()])
    .collect();
    (flags, pki.ca_pem(), files)
}

/// Starts the scenario's bus (or its `cluster.nodes` bus nodes on one JetStream stream) and a
/// client that knows every node, node 0 first; with `secure`, over TLS with a bearer token.
async fn start_buses(scenario: &Value, secure: bool) -> (Buses, Client) {
    let bus = scenario.get("bus");
    let mut settings = bus_flags(bus);
    let (scheme, ca, secure_files) = if secure {
        let (flags, ca, files) = secure_bus();
        settings.extend(flags);
        ("https", Some(ca), Some(files))
    } else {
        ("http", None, None)
    };
    let builder = move |urls: Vec<String>| {
        let builder = Client::builder(urls);
        match &ca {
            Some(ca) => builder.tls_ca_pem(ca.clone()).token(TOKEN),
            None => builder,
        }
    };
    let cluster = scenario.get("cluster");
    known_keys(cluster.unwrap_or(&Value::Null), &["nodes"], "cluster");
    let count = cluster
        .map(|c| field(c, "nodes").as_u64().unwrap() as usize)
        .unwrap_or(1);
    let nats = cluster.map(|_| common::nats::NatsServer::start());
    let storage = bus
        .and_then(|bus| bus.get("storage"))
        .and_then(Value::as_str);
    let mut nodes = Vec::new();
    for _ in 0..count {
        let port = common::nats::free_port();
        let mut args: Vec<String> = ["serve", "--listen", &format!("127.0.0.1:{port}")]
            .into_iter()
            .chain(["--log-level", "warn"])
            .map(str::to_owned)
            .chain(settings.iter().cloned())
            .collect();
        let mut data = None;
        match (&nats, storage) {
            (Some(nats), _) => {
                args.extend(["--storage", "jetstream", "--nats-url", &nats.url].map(str::to_owned))
            }
            (None, None) => args.extend(["--storage", "memory"].map(str::to_owned)),
            (None, Some("file")) => {
                let dir = tempfile::tempdir().unwrap();
                args.extend(["--data-dir".to_owned(), dir.path().display().to_string()]);
                data = Some(dir);
            }
            (None, Some(_)) => {}
        }
        let mut node = Node {
            args,
            url: format!("{scheme}://127.0.0.1:{port}"),
            process: None,
            _data: data,
        };
        node.spawn();
        nodes.push(node);
    }
    let urls: Vec<String> = nodes.iter().map(|node| node.url.clone()).collect();
    let buses = Buses {
        nodes,
        probe: Box::new({
            let builder = builder.clone();
            move |url| builder(vec![url])
        }),
        _nats: nats,
        _secure: secure_files,
    };
    for node in 0..count {
        buses.wait_serving(node).await;
    }
    let client = builder(urls)
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
async fn run(scenario: &Value, secure: bool) {
    known_keys(
        scenario,
        &["name", "description", "bus", "cluster", "steps"],
        "scenario",
    );
    let (mut buses, client) = start_buses(scenario, secure).await;
    let mut collected: HashMap<String, Arc<Mutex<Collected>>> = HashMap::new();
    let mut background: HashMap<String, JoinHandle<Result<(), String>>> = HashMap::new();
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for step in field(scenario, "steps").as_array().unwrap() {
        match field(step, "op").as_str().unwrap() {
            "subscribe" => {
                let id = field(step, "id").as_str().unwrap().to_owned();
                let sink = Arc::new(Mutex::new(Collected::default()));
                collected.insert(id, sink.clone());
                tasks.push(subscribe(&client, step, sink, stop.clone()).await);
            }
            "publish" => {
                let publish = publish(client.clone(), step.clone());
                match step.get("background").and_then(Value::as_str) {
                    Some(id) => {
                        background.insert(id.to_owned(), tokio::spawn(publish));
                    }
                    None => publish.await.unwrap_or_else(|error| panic!("{error}")),
                }
            }
            "publish_wait" => {
                known_keys(step, &["op", "id", "within_ms"], "publish_wait");
                let id = field(step, "id").as_str().unwrap();
                let within = Duration::from_millis(field(step, "within_ms").as_u64().unwrap());
                let task = background
                    .remove(id)
                    .unwrap_or_else(|| panic!("no background publish {id:?}"));
                match tokio::time::timeout(within, task).await {
                    Ok(Ok(Ok(()))) => {}
                    Ok(Ok(Err(error))) => panic!("background publish {id}: {error}"),
                    Ok(Err(panic)) => std::panic::resume_unwind(panic.into_panic()),
                    Err(_) => panic!("background publish {id} not acknowledged within {within:?}"),
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
                let mut bus = buses.nodes[node].process.take().expect("a running node");
                bus.0.kill().unwrap();
                bus.0.wait().unwrap();
            }
            "restart_node" => {
                let node = field(step, "node").as_u64().unwrap() as usize;
                // Dropping the process kills it (SIGKILL) and reaps it.
                drop(buses.nodes[node].process.take());
                buses.nodes[node].spawn();
                buses.wait_serving(node).await;
            }
            "quiet" => check_quiet(&collected, step).await,
            "query" => check_query(&client, step).await,
            "receive" => check_receive(&collected, step).await,
            other => panic!("unknown op {other:?}: this runner must learn it"),
        }
    }
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
    for (_, task) in background {
        task.abort();
    }
}

/// The `subscribe` op: subscribes (a MANUAL-ack member with `ack: "manual"`), and returns the
/// task that collects into `sink` and settles MANUAL deliveries as `settle` says.
async fn subscribe(
    client: &Client,
    step: &Value,
    sink: Arc<Mutex<Collected>>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    known_keys(
        step,
        &[
            "op",
            "id",
            "pattern",
            "group",
            "ack",
            "ack_deadline_ms",
            "max_deliveries",
            "dead_letter_topic",
            "settle",
            "nack_delay_ms",
        ],
        "subscribe",
    );
    let mut options = SubscribeOptions::new();
    if let Some(group) = step.get("group").and_then(Value::as_str) {
        options = options.group(group);
    }
    let millis = |key: &str| {
        step.get(key)
            .and_then(Value::as_u64)
            .map(Duration::from_millis)
    };
    let nack_delay = millis("nack_delay_ms").unwrap_or(Duration::ZERO);
    let settle = match step.get("settle").and_then(Value::as_str).unwrap_or("ack") {
        "ack" => Settle::Ack,
        "nack" => Settle::Nack(nack_delay),
        "nack_first" => Settle::NackFirst(nack_delay),
        "ignore_first" => Settle::IgnoreFirst,
        other => panic!("unknown settle {other:?}: this runner must learn it"),
    };
    match step.get("ack").and_then(Value::as_str).unwrap_or("auto") {
        "auto" => {}
        "manual" => {
            let mut manual = ManualAck::default();
            if let Some(deadline) = millis("ack_deadline_ms") {
                manual.ack_deadline = deadline;
            }
            if let Some(max) = step.get("max_deliveries").and_then(Value::as_u64) {
                manual.max_deliveries = max as u32;
            }
            if let Some(topic) = step.get("dead_letter_topic").and_then(Value::as_str) {
                manual.dead_letter_topic = Some(topic.to_owned());
            }
            options = options.manual_ack(manual);
        }
        other => panic!("unknown ack {other:?}: this runner must learn it"),
    }
    let mut subscription = client
        .subscribe_with(field(step, "pattern").as_str().unwrap(), options)
        .await
        .unwrap();
    tokio::spawn(async move {
        let record = |event: &pb::Event, attempt: u32| {
            let data: Value = serde_json::from_slice(&event.data).unwrap_or(Value::Null);
            sink.lock().unwrap().events.push(Got {
                n: data.get("n").and_then(Value::as_i64).unwrap_or(-1),
                sequence: event.sequence,
                attempt,
                at: Instant::now(),
                attributes: event.attributes.clone(),
            });
        };
        loop {
            let item = tokio::select! {
                _ = stop.cancelled() => return,
                item = subscription.next() => item,
            };
            match item {
                Some(Ok(SubscriptionItem::Event(event))) => record(&event, 1),
                Some(Ok(SubscriptionItem::Delivery(delivery))) => {
                    record(&delivery.event, delivery.attempt);
                    let first = delivery.attempt == 1;
                    // A failed ack or nack shows as a redelivery the scenario did not expect.
                    let _ = match settle {
                        Settle::Ack => delivery.ack().await,
                        Settle::Nack(delay) => delivery.nack(delay).await,
                        Settle::NackFirst(delay) if first => delivery.nack(delay).await,
                        Settle::NackFirst(_) => delivery.ack().await,
                        Settle::IgnoreFirst if first => Ok(()),
                        Settle::IgnoreFirst => delivery.ack().await,
                    };
                }
                Some(Ok(SubscriptionItem::Resumed { .. })) => sink.lock().unwrap().resumed += 1,
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    })
}

/// The `publish` op, to run in place or in the background; `Err` says why it failed.
async fn publish(client: Client, step: Value) -> Result<(), String> {
    known_keys(
        &step,
        &[
            "op",
            "topic",
            "count",
            "first",
            "batch",
            "repeat",
            "via",
            "rate",
            "background",
            "expect",
        ],
        "publish",
    );
    let expect = step.get("expect").unwrap_or(&Value::Null);
    known_keys(expect, &["same_sequences"], "publish expect");
    let topic = field(&step, "topic").as_str().unwrap();
    let count = field(&step, "count").as_i64().unwrap();
    let first = field(&step, "first").as_i64().unwrap();
    let event = |n: i64| {
        client
            .event(topic)
            .json(&json!({ "n": n }))
            .unwrap()
            .build()
    };
    match step.get("via").and_then(Value::as_str).unwrap_or("call") {
        "call" => {
            // Fixed ids, so a call made again is the same events to the bus's dedupe window.
            let events: Vec<pb::Event> = (first..first + count)
                .map(|n| pb::Event {
                    id: format!("{topic}/{n}"),
                    ..event(n)
                })
                .collect();
            let batches = if field(&step, "batch").as_bool().unwrap() {
                vec![events]
            } else {
                events.into_iter().map(|event| vec![event]).collect()
            };
            let repeat = step.get("repeat").and_then(Value::as_u64).unwrap_or(1);
            let same = expect.get("same_sequences").and_then(Value::as_bool) == Some(true);
            for batch in batches {
                let mut answers = Vec::new();
                for _ in 0..repeat {
                    answers.push(publish_retrying(&client, &batch).await?);
                }
                if same && answers.iter().any(|answer| answer != &answers[0]) {
                    return Err(format!(
                        "repeats answered with other sequences: {answers:?}"
                    ));
                }
            }
            Ok(())
        }
        "publisher" => {
            let publisher = client.publisher();
            let rate = step.get("rate").and_then(Value::as_f64);
            let started = tokio::time::Instant::now();
            let mut pending = Vec::new();
            for (i, n) in (first..first + count).enumerate() {
                if let Some(rate) = rate {
                    tokio::time::sleep_until(started + Duration::from_secs_f64(i as f64 / rate))
                        .await;
                }
                let submitted = publisher.submit(event(n)).await;
                pending.push(submitted.map_err(|error| format!("submit n={n}: {error}"))?);
            }
            for (n, ack) in (first..).zip(pending) {
                ack.await
                    .map_err(|error| format!("n={n} not acknowledged: {error}"))?;
            }
            publisher.close().await.map_err(|error| error.to_string())
        }
        other => panic!("unknown via {other:?}: this runner must learn it"),
    }
}

/// Publishes `batch` with one call, asked again with the same events while the client moves to
/// another node (the bus stores each event once), for up to [`RETRY_WITHIN`].
async fn publish_retrying(client: &Client, batch: &[pb::Event]) -> Result<Vec<u64>, String> {
    let deadline = Instant::now() + RETRY_WITHIN;
    loop {
        match client.publish_batch(batch.to_vec()).await {
            Ok(sequences) => return Ok(sequences),
            Err(error) if error.is_retryable() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(error) => return Err(format!("publish failed: {error}")),
        }
    }
}

/// The `quiet` op: nothing new reaches the subscriptions in `from` for `for_ms`.
async fn check_quiet(collected: &HashMap<String, Arc<Mutex<Collected>>>, step: &Value) {
    known_keys(step, &["op", "from", "for_ms"], "quiet");
    let from = sinks(collected, step);
    let count = || -> usize { from.iter().map(|c| c.lock().unwrap().events.len()).sum() };
    let before = count();
    tokio::time::sleep(Duration::from_millis(
        field(step, "for_ms").as_u64().unwrap(),
    ))
    .await;
    let after = count();
    assert_eq!(
        after,
        before,
        "{} events arrived in a quiet period",
        after - before
    );
}

fn sinks<'a>(
    collected: &'a HashMap<String, Arc<Mutex<Collected>>>,
    step: &Value,
) -> Vec<&'a Arc<Mutex<Collected>>> {
    field(step, "from")
        .as_array()
        .unwrap()
        .iter()
        .map(|id| {
            let id = id.as_str().unwrap();
            collected
                .get(id)
                .unwrap_or_else(|| panic!("no subscription {id:?}"))
        })
        .collect()
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
    known_keys(
        step,
        &["op", "from", "count", "within_ms", "expect"],
        "receive",
    );
    let expect = field(step, "expect");
    known_keys(
        expect,
        &[
            "n_range",
            "n_set",
            "in_order",
            "each_at_least",
            "resumed",
            "attempts",
            "redelivered_after_ms",
            "attributes",
        ],
        "receive expect",
    );
    let from = sinks(collected, step);
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
    let guards: Vec<_> = from.iter().map(|c| c.lock().unwrap()).collect();
    let all = || guards.iter().flat_map(|c| c.events.iter());
    let range = |key: &str| {
        expect.get(key).and_then(Value::as_array).map(|range| {
            (range[0].as_i64().unwrap()..range[1].as_i64().unwrap()).collect::<Vec<_>>()
        })
    };
    if let Some(expected) = range("n_range") {
        let mut got: Vec<i64> = all().map(|got| got.n).collect();
        got.sort_unstable();
        assert_eq!(got, expected, "n values");
    }
    if let Some(expected) = range("n_set") {
        let mut got: Vec<i64> = all().map(|got| got.n).collect();
        got.sort_unstable();
        got.dedup();
        assert_eq!(got, expected, "distinct n values");
    }
    if expect.get("in_order").and_then(Value::as_bool) == Some(true) {
        for sink in &guards {
            let order: Vec<(i64, u64)> = sink.events.iter().map(|g| (g.n, g.sequence)).collect();
            assert!(
                order.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1),
                "events out of order: {order:?}"
            );
        }
    }
    if let Some(least) = expect.get("each_at_least").and_then(Value::as_u64) {
        for sink in &guards {
            assert!(sink.events.len() as u64 >= least);
        }
    }
    if expect.get("resumed").and_then(Value::as_bool) == Some(true) {
        for sink in &guards {
            assert!(sink.resumed > 0, "the stream never dropped");
        }
    }
    // Every n's deliveries, in the order they arrived.
    let mut by_n: HashMap<i64, Vec<&Got>> = HashMap::new();
    for got in all() {
        by_n.entry(got.n).or_default().push(got);
    }
    if let Some(expected) = expect.get("attempts").and_then(Value::as_array) {
        let expected: Vec<u32> = expected
            .iter()
            .map(|a| a.as_u64().unwrap() as u32)
            .collect();
        for (n, deliveries) in &by_n {
            let mut attempts: Vec<u32> = deliveries.iter().map(|got| got.attempt).collect();
            attempts.sort_unstable();
            assert_eq!(attempts, expected, "attempts of n={n}");
        }
    }
    if let Some(gap) = expect.get("redelivered_after_ms").and_then(Value::as_u64) {
        for (n, deliveries) in &by_n {
            for pair in deliveries.windows(2) {
                let apart = pair[1].at - pair[0].at;
                assert!(
                    apart >= Duration::from_millis(gap),
                    "n={n} delivered again after only {apart:?}"
                );
            }
        }
    }
    if let Some(Value::Object(attributes)) = expect.get("attributes") {
        for got in all() {
            for (key, value) in attributes {
                assert_eq!(
                    got.attributes.get(key).map(String::as_str),
                    value.as_str(),
                    "attribute {key} of n={}",
                    got.n
                );
            }
        }
    }
}

/// Every scenario, against a plain bus and then against one with TLS and a bearer token (the
/// same behaviours must hold when the bus authenticates).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shared_scenario_holds_for_the_rust_sdk() {
    let mut failed = Vec::new();
    for file in scenario_files() {
        for secure in [false, true] {
            let scenario: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            let name = format!(
                "{}{}",
                scenario["name"].as_str().unwrap_or("?"),
                if secure { " (TLS + token)" } else { "" }
            );
            let outcome = tokio::spawn(async move { run(&scenario, secure).await }).await;
            match outcome {
                Ok(()) => eprintln!("scenario {name}: ok"),
                Err(error) => {
                    eprintln!("scenario {name}: FAILED");
                    failed.push((name, error));
                }
            }
        }
    }
    assert!(failed.is_empty(), "failed scenarios: {failed:?}");
}
