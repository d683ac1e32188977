//! The README's scenario walk-through ("The scenario" → "Walk-through"), command by command in the
//! README's order, against `scripts/demo.sh` started as "Run it" says (with `DEMO_BIN` pointing at
//! the built binaries and free ports): every `curl`, `kill` and `eventbus` line of the section's
//! `sh` blocks runs through `sh` with the demo's ports and paths put in, and what the README says
//! it shows is checked. A command the README adds, drops or changes fails the test until a check
//! for it is written here, so the walk-through cannot drift from what the demo does.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use scenario_tests::{bin_dir, free_port};

const WAIT: Duration = Duration::from_secs(60);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// One command of the walk-through, continuation lines joined, with the comment after it.
#[derive(Debug)]
struct Step {
    command: String,
    shows: String,
}

fn steps(readme: &str) -> Vec<Step> {
    let start = readme
        .find("### Walk-through")
        .expect("README has a Walk-through");
    let section = &readme[start..];
    let section = &section[..section[4..]
        .find("\n### ")
        .map_or(section.len(), |end| end + 4)];
    let mut steps = Vec::new();
    let mut in_block = false;
    for line in section.replace("\\\n", " ").lines() {
        let line = line.trim();
        if line.starts_with("```") {
            in_block = line == "```sh";
            continue;
        }
        if !in_block || line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            // A comment on its own line says what the command above it shows.
            if let Some(step) = steps
                .last_mut()
                .filter(|step: &&mut Step| step.shows.is_empty())
            {
                step.shows = comment.trim().to_owned();
            }
            continue;
        }
        let (command, shows) = match line.find("   #") {
            Some(at) => (
                line[..at].trim(),
                line[at..].trim().trim_start_matches('#').trim(),
            ),
            None => (line, ""),
        };
        steps.push(Step {
            command: command.to_owned(),
            shows: shows.to_owned(),
        });
    }
    steps
}

/// `scripts/demo.sh` running; stopped (with its services) when dropped.
struct Demo {
    child: Child,
    output: Arc<Mutex<String>>,
    dir: tempfile::TempDir,
    bus: u16,
    rr: u16,
    projection: u16,
}

impl Demo {
    fn start() -> Demo {
        let dir = tempfile::tempdir().unwrap();
        let (bus, rr, projection) = (free_port(), free_port(), free_port());
        let mut child = Command::new("bash")
            .arg("scripts/demo.sh")
            .current_dir(repo())
            .env("DEMO_BIN", bin_dir())
            .env("DEMO_DIR", dir.path())
            .env("BUS_PORT", bus.to_string())
            .env("RR_PORT", rr.to_string())
            .env("PROJECTION_PORT", projection.to_string())
            .env_remove("EVENTBUS_SERVER")
            .env_remove("EVENTBUS_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run scripts/demo.sh");
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let mut output = output.lock().unwrap();
                    output.push_str(&line);
                    output.push('\n');
                }
            });
        }
        let demo = Demo {
            child,
            output,
            dir,
            bus,
            rr,
            projection,
        };
        let deadline = Instant::now() + WAIT;
        while !demo.output().contains("eventbus demo is up") {
            assert!(
                Instant::now() < deadline,
                "the demo did not come up within {WAIT:?}:\n{}",
                demo.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        demo
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// `command` as the README writes it, with this demo's ports and paths.
    fn localize(&self, command: &str) -> String {
        command
            .replace("localhost:8080", &format!("127.0.0.1:{}", self.rr))
            .replace("localhost:8081", &format!("127.0.0.1:{}", self.projection))
            .replace("$DEMO_DIR", &self.dir.path().display().to_string())
            .replace(
                "target/release/eventbus",
                &bin_dir().join("eventbus").display().to_string(),
            )
    }

    /// Runs `command` through `sh`: (exit status, stdout).
    fn run(&self, command: &str) -> (bool, String) {
        let output = Command::new("sh")
            .args(["-c", &self.localize(command)])
            .env("EVENTBUS_SERVER", format!("http://127.0.0.1:{}", self.bus))
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    }

    /// Runs `command` (a shell line ending in `&`) in the background, its output into the demo's
    /// directory and its pid into `restarted.pid`, for [`Drop`] to stop: the demo's own trap
    /// knows only the processes it started.
    fn start_in_background(&self, command: &str) {
        let command = self.localize(command.trim().trim_end_matches('&'));
        let dir = self.dir.path().display().to_string();
        let line = format!("{command} > {dir}/restarted.log 2>&1 & echo $! > {dir}/restarted.pid");
        let started = Command::new("sh")
            .args(["-c", &line])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(started.success(), "{line}");
    }

    /// Runs `command` until `check` accepts its output, failing after [`WAIT`].
    fn run_until(&self, command: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let (ok, output) = self.run(command);
            if ok && check(&output) {
                return output;
            }
            assert!(
                Instant::now() < deadline,
                "`{command}`: {what}, not within {WAIT:?}; last output:\n{output}\ndemo:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("restarted.pid")) {
            let _ = Command::new("kill").args(["-TERM", pid.trim()]).status();
        }
        // The demo's trap stops its services, then itself.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
    }
}

fn status_line(response: &str) -> &str {
    response.lines().next().unwrap_or("")
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

fn body(response: &str) -> &str {
    response
        .split_once("\r\n\r\n")
        .map_or(response, |(_, body)| body)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|error| panic!("not JSON ({error}): {text}"))
}

#[test]
fn the_readme_walk_through_runs_as_written_against_the_demo() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let steps = steps(&readme);
    let demo = Demo::start();
    let mut last_applied = 0;
    let mut before_order = String::new();
    let mut done = Vec::new();
    for (index, step) in steps.iter().enumerate() {
        let command = step.command.as_str();
        let rr = command.contains("localhost:8080");
        let projection = command.contains("localhost:8081");
        match command {
            c if c.starts_with("curl -si ") && rr && c.ends_with("/users/7/products") => {
                if step.shows.contains("503") {
                    // The user service was stopped: request-reply fails at once, naming it
                    // (polled: the bus notices the subscription's end within moments).
                    let started = Instant::now();
                    let answer =
                        demo.run_until(command, "a 503", |out| status_line(out).contains(" 503 "));
                    let error = &json(body(&answer))["error"];
                    assert_eq!(error["service"], "user-service", "{answer}");
                    assert!(
                        error["message"]
                            .as_str()
                            .unwrap()
                            .contains("no responders for topic user.query"),
                        "{answer}"
                    );
                    assert!(started.elapsed() < WAIT);
                } else {
                    let answer =
                        demo.run_until(command, "a 200", |out| status_line(out).contains(" 200 "));
                    let timing = header(&answer, "server-timing").expect("Server-Timing");
                    for call in ["user;", "orders;", "products;"] {
                        assert!(timing.contains(call), "{timing}");
                    }
                }
            }
            c if c.starts_with("curl -si ") && projection && c.ends_with("/users/7/products") => {
                let answer =
                    demo.run_until(command, "a 200", |out| status_line(out).contains(" 200 "));
                assert!(
                    header(&answer, "x-projection-sequence").is_some(),
                    "{answer}"
                );
                if before_order.is_empty() {
                    before_order = body(&answer).to_owned();
                }
            }
            c if c.starts_with("curl -s ") && projection && c.ends_with("/status") => {
                // Caught up with the bus, and (after the order) further on than before.
                let previous = last_applied;
                let status = demo.run_until(command, "caught up, and moved", |out| {
                    let status = json(out);
                    status["lag"] == 0
                        && status["last_applied_sequence"].as_u64().unwrap_or(0) > previous
                });
                let status = json(&status);
                assert_eq!(status["last_applied_sequence"], status["bus_head"]);
                last_applied = status["last_applied_sequence"].as_u64().unwrap();
            }
            c if c.starts_with("kill $(cat $DEMO_DIR/user-service.pid)") => {
                assert!(demo.run(command).0, "{command}");
            }
            c if c.starts_with("curl -si -X POST ") && rr && c.contains("/users/7/orders") => {
                // The README says: start the user service again first, as the demo printed.
                let start = demo
                    .output()
                    .lines()
                    .find_map(|line| {
                        line.trim()
                            .strip_prefix("start it again: ")
                            .map(str::to_owned)
                    })
                    .expect("the demo prints how to start the user service again");
                demo.start_in_background(&start);
                let answer =
                    demo.run_until(command, "a 201", |out| status_line(out).contains(" 201 "));
                assert_eq!(json(body(&answer))["order"]["user_id"], 7, "{answer}");
            }
            c if c.starts_with("curl -s ")
                && projection
                && c.contains("/users/7/products | grep") =>
            {
                // The projection shows the new order: product 3's line changed.
                let product = |body: &str| {
                    json(body)["products"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|p| p["product"]["id"] == 3)
                        .map(|p| p["quantity"].as_i64().unwrap())
                        .unwrap_or(0)
                };
                let was = product(&before_order);
                let unfiltered = c.split(" | ").next().unwrap();
                demo.run_until(unfiltered, "product 3's quantity grew by 2", |out| {
                    product(out) == was + 2
                });
                let (ok, shown) = demo.run(command);
                assert!(ok && shown.contains("\"id\":3,"), "{shown}");
            }
            c if c.starts_with("target/release/eventbus topology") => {
                let (ok, graph) = demo.run(command);
                assert!(ok, "{command}: {graph}");
                for edge in ["query-service", "user.query", "user-service", "replies"] {
                    assert!(graph.contains(edge), "{edge} in:\n{graph}");
                }
            }
            other => panic!(
                "walk-through step {index} `{other}` has no check in {}: write one",
                file!()
            ),
        }
        done.push(command);
    }
    assert!(done.len() >= 9, "the walk-through's commands: {done:?}");
}
