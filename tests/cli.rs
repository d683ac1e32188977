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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_json_prints_every_field() {
    let bus = TestBus::start().await;
    let mut subscriber = Background::start(
        &bus,
        &[
            "subscribe",
            "json.>",
            "--json",
            "--count",
            "1",
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

    let output = subscriber.finish().await;
    let line = stdout(&output);
    let event: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(event["topic"], "json.order");
    assert_eq!(event["type"], "order.created");
    assert_eq!(event["source"], "shop");
    assert_eq!(event["data"], serde_json::json!({"id": 1}));
    assert_eq!(event["attributes"]["k"], "v");
    assert_eq!(event["correlation_id"], "c-1");
    assert_eq!(event["sequence"], 1);
    assert!(!event["id"].as_str().unwrap().is_empty());
    assert!(!event["publish_time"].as_str().unwrap().is_empty());
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
}
