//! The `eventbus` client commands, run as the built binary against a real bus in this process.

mod common;

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::TestBus;

const BIN: &str = env!("CARGO_BIN_EXE_eventbus");
const WAIT: Duration = Duration::from_secs(20);

/// Runs `eventbus ARGS --server URL` to completion, with `stdin` fed in.
async fn eventbus(bus: &TestBus, args: &[&str], stdin: Option<&str>) -> Output {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .args(["--server", &bus.url()])
        .env_remove("EVENTBUS_SERVER")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let stdin = stdin.unwrap_or_default().to_string();
    let run = tokio::task::spawn_blocking(move || {
        let mut child = command.spawn().expect("run eventbus");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    });
    tokio::time::timeout(WAIT, run)
        .await
        .expect("eventbus did not finish in time")
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

/// A long-running command (subscribe, reply) whose stderr is read line by line, so the test
/// can wait until it is ready.
struct Background {
    child: Option<Child>,
    stderr: mpsc::Receiver<String>,
}

impl Background {
    fn start(bus: &TestBus, args: &[&str]) -> Background {
        let mut child = Command::new(BIN)
            .args(args)
            .args(["--server", &bus.url()])
            .env_remove("EVENTBUS_SERVER")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run eventbus");
        let (lines, stderr) = mpsc::channel();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        Background {
            child: Some(child),
            stderr,
        }
    }

    /// Waits for a stderr line containing `text`.
    async fn wait_for(&mut self, text: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.stderr.try_recv() {
                Ok(line) if line.contains(text) => return,
                Ok(_) => continue,
                Err(mpsc::TryRecvError::Empty) => {}
                Err(mpsc::TryRecvError::Disconnected) => panic!("exited before printing {text:?}"),
            }
            assert!(Instant::now() < deadline, "timed out waiting for {text:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits for the process to exit by itself and returns its output.
    async fn finish(mut self) -> Output {
        let child = self.child.take().unwrap();
        let wait = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap());
        tokio::time::timeout(WAIT, wait)
            .await
            .expect("eventbus did not exit in time")
            .unwrap()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_prints_sequences_and_subscribe_prints_one_line_per_event() {
    let bus = TestBus::start().await;
    let mut subscriber = Background::start(&bus, &["subscribe", "cli.*", "--count", "3"]);
    subscriber.wait_for("subscribed to cli.*").await;

    let one = eventbus(&bus, &["publish", "cli.a", "hello"], None).await;
    assert!(one.status.success(), "{}", stderr(&one));
    assert_eq!(stdout(&one), "1\n");
    let more = eventbus(
        &bus,
        &["publish", "cli.b", "-", "--count", "2"],
        Some("from\nstdin"),
    )
    .await;
    assert!(more.status.success(), "{}", stderr(&more));
    assert_eq!(stdout(&more), "2\n3\n");

    let output = subscriber.finish().await;
    assert!(output.status.success());
    assert_eq!(
        stdout(&output),
        "#1 cli.a: hello\n#2 cli.b: from\\nstdin\n#3 cli.b: from\\nstdin\n"
    );
}

/// The CloudEvents 1.0 JSON schema (vendored from
/// <https://github.com/cloudevents/spec/blob/v1.0.2/cloudevents/formats/cloudevents.json>, see
/// `tests/data/README.md`), with its `format`s checked (`date-time`, `uri-reference`).
fn cloudevents_schema() -> jsonschema::Validator {
    let text = include_str!("data/cloudevents-1.0.2.schema.json");
    let schema: serde_json::Value = serde_json::from_str(text).unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("the CloudEvents schema compiles")
}

/// Asserts that `event` is a valid CloudEvents 1.0 JSON document.
fn assert_cloudevent(schema: &jsonschema::Validator, event: &serde_json::Value) {
    let errors: Vec<String> = schema.iter_errors(event).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{event} is not a CloudEvent: {errors:?}");
    assert_eq!(event["specversion"], "1.0", "{event}");
    // Attribute names: lower-case letters and digits (the spec's rule), besides the payload.
    for name in event.as_object().unwrap().keys() {
        assert!(
            name == "data_base64"
                || name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "attribute {name:?} of {event}"
        );
    }
}

#[test]
fn the_schema_check_can_fail() {
    let schema = cloudevents_schema();
    // The pre-CloudEvents JSON of earlier versions: no specversion.
    let old = serde_json::json!({"id": "1", "source": "s", "type": "t", "data_content_type": ""});
    assert!(!schema.is_valid(&old));
    let bad_time = serde_json::json!(
        {"specversion": "1.0", "id": "1", "source": "s", "type": "t", "time": "noon"}
    );
    assert!(!schema.is_valid(&bad_time));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_json_prints_cloudevents() {
    let bus = TestBus::start().await;
    let schema = cloudevents_schema();
    let mut subscriber = Background::start(
        &bus,
        &[
            "subscribe",
            "json.>",
            "--json",
            "--count",
            "2",
            "--from",
            "latest",
        ],
    );
    subscriber.wait_for("subscribed to").await;
    let published = eventbus(
        &bus,
        &[
            "publish",
            "json.order",
            r#"{"id":1}"#,
            "--type",
            "order.created",
            "--attr",
            "k=v",
            "--attr",
            "not_valid=x",
            "--content-type",
            "application/json",
            "--correlation-id",
            "c-1",
            "--source",
            "shop",
        ],
        None,
    )
    .await;
    assert!(published.status.success(), "{}", stderr(&published));
    let published = eventbus(&bus, &["publish", "json.text", "plain words"], None).await;
    assert!(published.status.success(), "{}", stderr(&published));
    // The attribute CloudEvents cannot name is noted on stderr.
    subscriber.wait_for("attribute \"not_valid\"").await;

    let output = subscriber.finish().await;
    assert!(output.status.success(), "{}", stderr(&output));
    let lines: Vec<serde_json::Value> = stdout(&output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{}", stdout(&output));
    for event in &lines {
        assert_cloudevent(&schema, event);
    }
    let event = &lines[0];
    assert_eq!(event["topic"], "json.order");
    assert_eq!(event["type"], "order.created");
    assert_eq!(event["source"], "shop");
    assert_eq!(event["datacontenttype"], "application/json");
    assert_eq!(event["data"], serde_json::json!({"id": 1}));
    assert_eq!(event["k"], "v");
    assert_eq!(event["correlationid"], "c-1");
    assert_eq!(event["sequence"], "1");
    assert!(!event["id"].as_str().unwrap().is_empty());
    assert!(!event["time"].as_str().unwrap().is_empty());
    assert!(!event["publishtime"].as_str().unwrap().is_empty());
    // Unset fields are left out, not written empty; so is the attribute CloudEvents cannot name.
    for absent in [
        "causationid",
        "replyto",
        "subject",
        "not_valid",
        "attributes",
    ] {
        assert!(event.get(absent).is_none(), "{absent} in {event}");
    }
    assert_eq!(lines[1]["data"], "plain words");
    assert!(lines[1].get("datacontenttype").is_none(), "{}", lines[1]);
}

/// What `subscribe --json` prints, `publish --cloudevent` publishes again unchanged (but for
/// the bus's own `sequence` and `publishtime`); `query --json` prints a CloudEvent too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_round_trip_through_publish_and_subscribe() {
    let bus = TestBus::start().await;
    let schema = cloudevents_schema();
    let mut subscriber = Background::start(&bus, &["subscribe", "ce.>", "--json", "--count", "2"]);
    subscriber.wait_for("subscribed to").await;

    let order = serde_json::json!({
        "specversion": "1.0",
        "id": "ord-1",
        "source": "/shop/orders",
        "type": "com.example.order.created",
        "subject": "order-1",
        "time": "2024-05-01T12:00:00.250Z",
        "datacontenttype": "application/json",
        "topic": "ce.order",
        "correlationid": "c-9",
        "causationid": "cause-1",
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "data": {"n": 1, "items": ["a", "b"]},
    });
    let published = eventbus(
        &bus,
        &["publish", "--cloudevent", "-"],
        Some(&order.to_string()),
    )
    .await;
    assert!(published.status.success(), "{}", stderr(&published));
    assert_eq!(stdout(&published), "1\n");

    // From a file, binary data, the topic given by --topic.
    let binary = serde_json::json!({
        "specversion": "1.0",
        "id": "bin-1",
        "source": "urn:example:camera",
        "type": "image.taken",
        "datacontenttype": "image/png",
        "data_base64": "iVBORw0KGgo=",
    });
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("event.json");
    std::fs::write(&path, binary.to_string()).unwrap();
    let published = eventbus(
        &bus,
        &[
            "publish",
            "--cloudevent",
            path.to_str().unwrap(),
            "--topic",
            "ce.image",
        ],
        None,
    )
    .await;
    assert!(published.status.success(), "{}", stderr(&published));

    let output = subscriber.finish().await;
    assert!(output.status.success(), "{}", stderr(&output));
    let mut lines: Vec<serde_json::Value> = stdout(&output)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{}", stdout(&output));
    for (event, sequence) in lines.iter_mut().zip(["1", "2"]) {
        assert_cloudevent(&schema, event);
        let object = event.as_object_mut().unwrap();
        assert_eq!(object.remove("sequence").unwrap(), sequence);
        assert!(object.remove("publishtime").is_some());
    }
    assert_eq!(lines[0], order);
    let mut expected = binary;
    expected["topic"] = "ce.image".into();
    // The bus sets an unset time to the publish time.
    expected["time"] = lines[1]["time"].clone();
    assert!(lines[1]["time"].is_string(), "{}", lines[1]);
    assert_eq!(lines[1], expected);

    // A document the bus cannot take is refused with the member and the rule.
    let refused = eventbus(
        &bus,
        &["publish", "--cloudevent", "-"],
        Some(r#"{"specversion":"1.0","type":"t"}"#),
    )
    .await;
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("--topic"), "{}", stderr(&refused));

    let mut echo = Background::start(&bus, &["reply", "ce.ask", "--count", "1"]);
    echo.wait_for("answering queries on ce.ask").await;
    let answer = eventbus(
        &bus,
        &[
            "query",
            "ce.ask",
            r#"{"q":1}"#,
            "--content-type",
            "application/json",
            "--json",
        ],
        None,
    )
    .await;
    assert!(answer.status.success(), "{}", stderr(&answer));
    let reply: serde_json::Value = serde_json::from_str(stdout(&answer).trim()).unwrap();
    assert_cloudevent(&schema, &reply);
    assert_eq!(reply["data"], serde_json::json!({"q": 1}));
    assert!(!reply["correlationid"].as_str().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_gets_answers_from_reply() {
    let bus = TestBus::start().await;
    let mut echo = Background::start(&bus, &["reply", "svc.echo", "--count", "1"]);
    echo.wait_for("answering queries on svc.echo").await;
    let mut fixed = Background::start(
        &bus,
        &["reply", "svc.fixed", "--data", "pong", "--count", "1"],
    );
    fixed.wait_for("answering queries on svc.fixed").await;

    let answer = eventbus(&bus, &["query", "svc.echo", "hello"], None).await;
    assert!(answer.status.success(), "{}", stderr(&answer));
    assert_eq!(stdout(&answer), "hello\n");
    let answer = eventbus(
        &bus,
        &["query", "svc.fixed", "ping", "--timeout", "3s"],
        None,
    )
    .await;
    assert!(answer.status.success(), "{}", stderr(&answer));
    assert_eq!(stdout(&answer), "pong\n");

    // Each responder logs the query it answered, then exits after --count.
    let log = echo.finish().await;
    assert!(log.status.success());
    assert!(stdout(&log).contains("svc.echo: hello"), "{}", stdout(&log));
    let log = fixed.finish().await;
    assert!(stdout(&log).contains("svc.fixed: ping"), "{}", stdout(&log));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_one_line_and_exit_non_zero() {
    let bus = TestBus::start().await;
    let output = eventbus(&bus, &["query", "nobody.home", "x"], None).await;
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        stderr(&output),
        "error: no responders for topic nobody.home (UNAVAILABLE)\n"
    );

    let output = eventbus(&bus, &["publish", "bad topic", "x"], None).await;
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.starts_with("error: ") && message.contains("(INVALID_ARGUMENT)"));

    let output = eventbus(&bus, &["subscribe", "a.>.b"], None).await;
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("(INVALID_ARGUMENT)"));

    // No bus at that address.
    let output = Command::new(BIN)
        .args(["topics", "--server", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let message = stderr(&output);
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(message.starts_with("error: cannot connect to http://127.0.0.1:1"));
    assert!(
        message.contains("is `eventbus serve` running at http://127.0.0.1:1?"),
        "{message}"
    );
    // `--server` goes before the verb as well.
    let output = Command::new(BIN)
        .args(["--server", "http://127.0.0.1:1", "topics"])
        .output()
        .unwrap();
    assert!(
        stderr(&output).contains("running at http://127.0.0.1:1?"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_says_it_waits_while_the_bus_is_down() {
    let bus = TestBus::start().await;
    let mut subscriber = Background::start(&bus, &["subscribe", "down.*"]);
    subscriber.wait_for("subscribed to").await;
    bus.stop(WAIT).await;
    subscriber.wait_for("waiting for it at").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_and_topology_show_what_the_bus_has_seen() {
    let bus = TestBus::start().await;
    let mut subscriber =
        Background::start(&bus, &["subscribe", "topo.*", "--subscriber", "watcher"]);
    subscriber.wait_for("subscribed to").await;
    let published = eventbus(
        &bus,
        &["publish", "topo.x", "data", "--source", "maker"],
        None,
    )
    .await;
    assert!(published.status.success(), "{}", stderr(&published));

    let topics = eventbus(&bus, &["topics"], None).await;
    assert!(topics.status.success(), "{}", stderr(&topics));
    let table = stdout(&topics);
    assert!(table.starts_with("TOPIC"), "{table}");
    let row = table
        .lines()
        .find(|line| line.starts_with("topo.x"))
        .unwrap_or_else(|| panic!("no topo.x row in {table}"));
    assert!(
        row.split_whitespace().nth(4) == Some("1"),
        "one subscriber: {row}"
    );

    let text = stdout(&eventbus(&bus, &["topology"], None).await);
    assert!(text.contains("maker -> topo.x  publishes"), "{text}");
    assert!(text.contains("watcher"), "{text}");
    let dot = stdout(&eventbus(&bus, &["topology", "--format", "dot"], None).await);
    assert!(dot.starts_with("digraph eventbus {"), "{dot}");
    assert!(
        dot.contains("\"service:maker\" -> \"topic:topo.x\""),
        "{dot}"
    );
    let mermaid = stdout(&eventbus(&bus, &["topology", "--format", "mermaid"], None).await);
    assert!(mermaid.starts_with("flowchart LR\n"), "{mermaid}");
    assert!(mermaid.contains("[\"maker\"]"), "{mermaid}");

    let topics = eventbus(&bus, &["topics", "--json"], None).await;
    assert!(topics.status.success(), "{}", stderr(&topics));
    let topics: serde_json::Value = serde_json::from_str(&stdout(&topics)).unwrap();
    let topic = topics
        .as_array()
        .unwrap()
        .iter()
        .find(|topic| topic["name"] == "topo.x")
        .unwrap_or_else(|| panic!("no topo.x in {topics}"));
    assert_eq!(topic["subscriber_count"], 1, "{topic}");
    assert_eq!(topic["last_sequence"], 1, "{topic}");
    assert!(topic["last_publish_time"].is_string(), "{topic}");

    for args in [
        &["topology", "--json"][..],
        &["topology", "--format", "json"],
    ] {
        let graph = eventbus(&bus, args, None).await;
        assert!(graph.status.success(), "{}", stderr(&graph));
        let graph: serde_json::Value = serde_json::from_str(&stdout(&graph)).unwrap();
        let edges = graph["edges"].as_array().unwrap();
        assert!(
            edges.iter().any(|edge| edge["from"] == "service:maker"
                && edge["to"] == "topic:topo.x"
                && edge["kind"] == "publishes"
                && edge["events"] == 1),
            "{graph}"
        );
        assert_eq!(graph["truncated"], false);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_server_info_and_check_show_a_group_falling_behind() {
    let bus = TestBus::start().await;
    // A MANUAL-ack member that takes one event and leaves: the group parks at its cursor.
    let mut member = Background::start(
        &bus,
        &[
            "subscribe",
            "ops.>",
            "--group",
            "billing",
            "--ack",
            "--count",
            "1",
        ],
    );
    member.wait_for("subscribed to").await;
    let published = eventbus(&bus, &["publish", "ops.a", "first"], None).await;
    assert!(published.status.success(), "{}", stderr(&published));
    assert!(member.finish().await.status.success());
    let published = eventbus(&bus, &["publish", "ops.a", "more", "--count", "3"], None).await;
    assert!(published.status.success(), "{}", stderr(&published));

    let deadline = Instant::now() + WAIT;
    let billing = loop {
        let output = eventbus(&bus, &["groups", "--json"], None).await;
        assert!(output.status.success(), "{}", stderr(&output));
        let groups: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
        let billing = groups
            .as_array()
            .unwrap()
            .iter()
            .find(|group| group["name"] == "billing")
            .cloned();
        if let Some(billing) = billing.filter(|g| g["cursor"] == 1 && g["pending"] == 3) {
            break billing;
        }
        assert!(
            Instant::now() < deadline,
            "billing never showed 3 pending: {groups}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(billing["ack_mode"], "manual");
    assert_eq!(billing["pattern"], "ops.>");
    assert_eq!(billing["members"], 0);
    assert_eq!(billing["in_flight"], 0);

    let table = stdout(&eventbus(&bus, &["groups"], None).await);
    assert!(table.starts_with("GROUP"), "{table}");
    let row = table
        .lines()
        .find(|line| line.starts_with("billing"))
        .unwrap_or_else(|| panic!("no billing row in {table}"));
    let cells: Vec<_> = row.split_whitespace().collect();
    assert_eq!(
        cells[..6],
        ["billing", "ops.>", "manual", "0", "1", "3"],
        "{row}"
    );

    let info = eventbus(&bus, &["server", "info", "--json"], None).await;
    assert!(info.status.success(), "{}", stderr(&info));
    let info: serde_json::Value = serde_json::from_str(&stdout(&info)).unwrap();
    assert_eq!(info["head_sequence"], 4);
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(info["auth_enabled"], false);
    assert!(info["uptime_seconds"].as_f64().unwrap() >= 0.0, "{info}");
    assert!(info["limits"]["max_event_data_bytes"].as_u64().unwrap() > 0);
    let text = stdout(&eventbus(&bus, &["server", "info"], None).await);
    assert!(text.contains("log:") && text.contains("head 4"), "{text}");

    let ok = eventbus(&bus, &["server", "check"], None).await;
    assert_eq!(ok.status.code(), Some(0), "{}", stdout(&ok));
    let line = stdout(&ok);
    assert!(line.starts_with("OK: eventbus "), "{line}");
    assert!(
        line.contains("|") && line.contains("'group_billing_pending'=3"),
        "{line}"
    );
    assert_eq!(line.lines().count(), 1, "{line}");

    let warning = eventbus(
        &bus,
        &["server", "check", "--max-group-pending-warn", "2"],
        None,
    )
    .await;
    assert_eq!(warning.status.code(), Some(1), "{}", stdout(&warning));
    assert!(
        stdout(&warning).starts_with("WARNING: group billing has 3 pending (limit 2)|"),
        "{}",
        stdout(&warning)
    );
    let critical = eventbus(
        &bus,
        &[
            "server",
            "check",
            "--max-group-pending-warn",
            "2",
            "--max-group-pending-crit",
            "3",
            "--min-uptime",
            "1h",
        ],
        None,
    )
    .await;
    assert_eq!(critical.status.code(), Some(2), "{}", stdout(&critical));
    let line = stdout(&critical);
    assert!(
        line.starts_with("CRITICAL: group billing has 3 pending (limit 3); up "),
        "{line}"
    );
    assert!(line.contains("'group_billing_pending'=3;2;3"), "{line}");

    let unreachable = Command::new(BIN)
        .args(["server", "check", "--server", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(2));
    assert!(
        stdout(&unreachable).starts_with("CRITICAL: cannot ask the bus at http://127.0.0.1:1"),
        "{}",
        stdout(&unreachable)
    );
}

#[tokio::test]
async fn bench_measures_publishing_delivery_and_queries_against_a_running_bus() {
    let bus = TestBus::start().await;
    let published = eventbus(
        &bus,
        &[
            "bench",
            "pub",
            "--events",
            "3000",
            "--publishers",
            "2",
            "--json",
        ],
        None,
    )
    .await;
    assert!(published.status.success(), "{}", stderr(&published));
    let report: serde_json::Value = serde_json::from_str(stdout(&published).trim()).unwrap();
    assert_eq!(report["verb"], "pub");
    assert_eq!(report["count"], 3000);
    assert_eq!(report["clients"], 2);
    assert!(report["per_second"].as_f64().unwrap() > 0.0, "{report}");
    assert!(
        report["latency_us"]["p50"].as_u64().unwrap() > 0,
        "{report}"
    );
    let topic = report["topic"].as_str().unwrap();
    assert!(topic.starts_with("bench.pub."), "{topic}");
    // Every event is in the log, on the run's own topic.
    let mut admin = bus.admin().await;
    let topics = admin
        .list_topics(eventbus::pb::ListTopicsRequest {
            pattern: topic.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .topics;
    assert_eq!(topics[0].events_published, 3000);

    let delivered = eventbus(
        &bus,
        &[
            "bench",
            "sub",
            "--events",
            "2000",
            "--subscribers",
            "3",
            "--csv",
        ],
        None,
    )
    .await;
    assert!(delivered.status.success(), "{}", stderr(&delivered));
    let csv = stdout(&delivered);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 2, "{csv}");
    let header: Vec<&str> = lines[0].split(',').collect();
    let row: Vec<&str> = lines[1].split(',').collect();
    let field = |name: &str| row[header.iter().position(|h| *h == name).unwrap()];
    assert_eq!(field("verb"), "sub");
    assert_eq!(
        field("missing"),
        "0",
        "every subscriber got every event: {csv}"
    );
    assert_eq!(field("clients"), "3");

    let asked = eventbus(
        &bus,
        &[
            "bench",
            "query",
            "--queries",
            "200",
            "--concurrency",
            "4",
            "--size",
            "64",
        ],
        None,
    )
    .await;
    assert!(asked.status.success(), "{}", stderr(&asked));
    let text = stdout(&asked);
    assert!(
        text.starts_with("bench query: 200 x 64 B on bench.query."),
        "{text}"
    );
    assert!(text.contains("round trip latency (µs): p50 "), "{text}");

    let refused = eventbus(&bus, &["bench", "pub", "--events", "0"], None).await;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("must be at least 1"),
        "{}",
        stderr(&refused)
    );
}
