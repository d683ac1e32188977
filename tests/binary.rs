//! The built `eventbus` binary: `serve` comes up, ends streams and exits 0 on SIGTERM, and a bad
//! setting is one clear error and a non-zero exit.

mod support;

use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use eventbus::pb::event_bus_service_client::EventBusServiceClient;
use support::*;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_eventbus");

fn eventbus() -> Command {
    let mut command = Command::new(BIN);
    // Settings come from the flags of each test only.
    for (key, _) in std::env::vars() {
        if key.starts_with("EVENTBUS_") || key == "RUST_LOG" {
            command.env_remove(key);
        }
    }
    command
}

/// Kills the child if the test fails before it exits.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_for_exit(child: &mut Child, within: Duration) -> ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not exit within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts `eventbus serve` on `data_dir` with its stderr going to `log`, on a port the kernel
/// picks (`127.0.0.1:0`), and connects to it. The port is read back from the server's own
/// "eventbus listening" log line, so the client can only reach this server (a port found free
/// beforehand could meanwhile be taken by another test's server).
async fn serve_on_a_free_port(
    data_dir: &std::path::Path,
    log: &tempfile::NamedTempFile,
) -> (Server, EventBusServiceClient<tonic::transport::Channel>) {
    let child = eventbus()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--shutdown-grace", "30s", "--log-level", "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap())
        .spawn()
        .unwrap();
    let mut child = Server(child);
    let deadline = Instant::now() + WAIT;
    let port = loop {
        let logs = std::fs::read_to_string(log.path()).unwrap_or_default();
        let port = logs
            .lines()
            .find(|line| line.contains("eventbus listening"))
            .and_then(|line| line.split("127.0.0.1:").nth(1))
            .and_then(|rest| {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse::<u16>().ok()
            });
        if let Some(port) = port {
            break port;
        }
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("the server exited with {status} before listening; logs:\n{logs}");
        }
        assert!(
            Instant::now() < deadline,
            "the server did not come up; logs:\n{logs}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let client = EventBusServiceClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .expect("connect to the server that said it listens");
    (child, client)
}

#[tokio::test]
async fn serve_ends_streams_and_exits_cleanly_on_sigterm() {
    let grace = Duration::from_secs(30);
    let log = tempfile::NamedTempFile::new().unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let (mut child, mut client) = serve_on_a_free_port(data_dir.path(), &log).await;

    let (_, mut stream) = subscribe(&mut client, request("events.>")).await;
    let sequence = publish_one(&mut client, common_event("events.one")).await;
    assert_eq!(next_event(&mut stream).await.sequence, sequence);

    let started = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let (_, status) = read_to_error(&mut stream).await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let exit = wait_for_exit(&mut child.0, grace).await;
    let logs = std::fs::read_to_string(log.path()).unwrap();
    assert!(exit.success(), "exit {exit:?}; logs:\n{logs}");
    assert!(
        started.elapsed() < grace / 3,
        "took {:?}: the open stream was not ended on purpose",
        started.elapsed()
    );
    assert!(logs.contains("shutting down"), "logs:\n{logs}");
}

fn common_event(topic: &str) -> eventbus::pb::Event {
    eventbus::pb::Event {
        topic: topic.into(),
        source: "binary-test".into(),
        ..Default::default()
    }
}

fn run(args: &[&str]) -> Output {
    eventbus().args(args).stdin(Stdio::null()).output().unwrap()
}

#[track_caller]
fn assert_one_clear_error(output: &Output, parts: &[&str]) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "should fail; stderr:\n{stderr}");
    for part in parts {
        assert!(stderr.contains(part), "{part:?} not in stderr:\n{stderr}");
    }
    // One error line (clap's `error:`, or the binary's), not a log dump or a panic.
    let errors = stderr
        .lines()
        .filter(|l| l.to_lowercase().starts_with("error"))
        .count();
    assert_eq!(errors, 1, "one error, not:\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_bad_setting_is_one_clear_error_and_a_non_zero_exit() {
    let output = run(&["serve", "--subscriber-queue-size", "0"]);
    assert_one_clear_error(&output, &["subscriber_queue_size", "at least 1"]);

    let output = run(&["serve", "--max-message-bytes", "1024"]);
    assert_one_clear_error(&output, &["max_message_bytes"]);

    let output = run(&["serve", "--no-such-flag"]);
    assert_one_clear_error(&output, &["--no-such-flag"]);

    let output = run(&["serve", "--listen", "not-an-address"]);
    assert_one_clear_error(&output, &["--listen", "not-an-address"]);

    let output = run(&["serve", "--config", "/nonexistent/eventbus.toml"]);
    assert_one_clear_error(&output, &["/nonexistent/eventbus.toml"]);

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bus.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nretention = 5\n").unwrap();
    let output = run(&["serve", "--config", config.to_str().unwrap()]);
    assert_one_clear_error(&output, &["retention"]);
    // TOML's message keeps its lines: the caret under the offending key.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.lines().any(|line| line.trim_end().ends_with('^')),
        "{stderr}"
    );
}

#[test]
fn a_taken_address_is_one_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = run(&["serve", "--listen", &addr, "--storage", "memory"]);
    assert_one_clear_error(&output, &[&addr]);
}

#[tokio::test]
async fn a_second_bus_on_the_same_data_dir_is_refused_naming_the_holder() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let (first, _client) = serve_on_a_free_port(data_dir.path(), &log).await;
    let holder = format!("pid {}", first.0.id());
    let dir = data_dir.path().display().to_string();

    // Another port, the same directory: refused before it touches the log.
    let second = eventbus()
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data_dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut second = Server(second);
    let status = wait_for_exit(&mut second.0, WAIT).await;
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.0.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "the second bus must not start: {stderr}");
    let error_line = stderr
        .lines()
        .find(|line| line.starts_with("error"))
        .unwrap_or_else(|| panic!("no error line in:\n{stderr}"));
    assert!(
        error_line.contains(&dir) && error_line.contains(&holder),
        "the error names the directory and the holder ({holder}): {error_line}"
    );

    // Repair writes the directory too: refused while the bus runs.
    let output = eventbus()
        .arg("repair")
        .arg("--data-dir")
        .arg(data_dir.path())
        .output()
        .unwrap();
    assert_one_clear_error(&output, &[&dir, &holder]);
}

/// A data directory with `count` events and one consumer group cursor, written by the store.
fn a_log_with_events(dir: &std::path::Path, count: u64) {
    use eventbus::store::{FileStore, FileStoreConfig, GroupCursor, Store};
    let store = FileStore::open(FileStoreConfig::new(dir)).unwrap();
    for i in 0..count {
        let event = eventbus::event::Event {
            id: format!("e{i}"),
            source: "test".into(),
            event_type: "t".into(),
            topic: eventbus::topic::Topic::parse("meta.test").unwrap(),
            time: None,
            data_content_type: String::new(),
            data: vec![b'x'; 16].into(),
            attributes: Default::default(),
            correlation_id: String::new(),
            causation_id: String::new(),
            reply_to: None,
        };
        store
            .append(vec![event], std::time::SystemTime::now())
            .unwrap();
    }
    let cursor = GroupCursor {
        pattern: "meta.>".into(),
        cursor: 2,
        not_before: None,
    };
    store.save_group_cursor("workers", &cursor).unwrap();
}

#[tokio::test]
async fn a_missing_log_id_or_a_cut_groups_file_refuses_start_until_repair() {
    for damage in ["log-id", "groups.json"] {
        let data_dir = tempfile::tempdir().unwrap();
        a_log_with_events(data_dir.path(), 5);
        let file = data_dir.path().join(damage);
        match damage {
            "log-id" => std::fs::remove_file(&file).unwrap(),
            _ => {
                let bytes = std::fs::read(&file).unwrap();
                std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
            }
        }
        let output = eventbus()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_one_clear_error(&output, &[&file.display().to_string(), "eventbus repair"]);

        let output = eventbus()
            .arg("repair")
            .arg("--data-dir")
            .arg(data_dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{output:?}");
        let said = match damage {
            "log-id" => "new identity",
            _ => "groups.json was unreadable",
        };
        assert!(stdout.contains(said), "{stdout}");
        assert!(
            stdout.contains("moved aside") || damage == "log-id",
            "{stdout}"
        );

        let log = tempfile::NamedTempFile::new().unwrap();
        let (_server, mut client) = serve_on_a_free_port(data_dir.path(), &log).await;
        let (subscribed, _) = subscribe(
            &mut client,
            request_from(
                "meta.>",
                eventbus::pb::subscribe_request::Start::Earliest(()),
            ),
        )
        .await;
        assert_eq!(subscribed.head_sequence, 5, "the log itself is untouched");
    }
}
