//! README "A five-minute tour with the CLI", run as written, command by command in the
//! README's order (issue #17): every ```sh line that starts with `eventbus` runs through `sh`
//! with `eventbus` on the PATH. `serve`, and `subscribe` and `reply` without `--count`, keep
//! running in the background as the tour's extra terminals do; every other command must finish
//! within a bound and succeed, unless the line after it shows an `# error: ...`, which it must
//! print instead. A `# ...` line after a command is what it prints. The bus listens on a free
//! port given through `EVENTBUS_LISTEN`/`EVENTBUS_SERVER`, in a temporary directory.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_eventbus");
/// The longest any one command, or any wait for a background command's output, may take.
const WAIT: Duration = Duration::from_secs(30);

/// One command of the tour and what the README says it prints.
#[derive(Debug)]
struct Step {
    line: String,
    shows: Option<String>,
}

/// The tour's commands, in order: the section's ```sh blocks, lines starting with `eventbus`
/// (a trailing `# comment` cut off), each with the `# ...` line under it, if any.
fn tour() -> Vec<Step> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let start = readme
        .find("## A five-minute tour with the CLI")
        .expect("the tour section");
    let section = &readme[start..];
    let section = &section[..section[3..]
        .find("\n## ")
        .map_or(section.len(), |end| end + 3)];
    let mut steps: Vec<Step> = Vec::new();
    let mut in_block = false;
    // A command continued on the next line (`\`) is one line.
    let joined = section.replace("\\\n", " ");
    for line in joined.lines() {
        if line.starts_with("```") {
            in_block = line == "```sh";
            continue;
        }
        if !in_block {
            continue;
        }
        if line.starts_with("eventbus ") {
            let command = line.split("  #").next().unwrap().trim_end();
            steps.push(Step {
                line: command.to_owned(),
                shows: None,
            });
        } else if let Some(shown) = line.strip_prefix("# ") {
            if let Some(step) = steps.last_mut().filter(|step| step.shows.is_none()) {
                if !shown.starts_with("terminal") {
                    step.shows = Some(shown.to_owned());
                }
            }
        }
    }
    steps
}

/// Whether a command keeps running (the tour leaves it in a terminal of its own).
fn runs_on(line: &str) -> bool {
    let verb = line.split_whitespace().nth(1).unwrap_or("");
    verb == "serve" || (matches!(verb, "subscribe" | "reply") && !line.contains("--count"))
}

struct Tour {
    dir: tempfile::TempDir,
    bin_dir: PathBuf,
    server: String,
    listen: String,
    background: Vec<(String, Child, PathBuf)>,
}

impl Tour {
    fn new() -> Tour {
        let dir = tempfile::tempdir().unwrap();
        let bin_dir = dir.path().join("bin");
        std::fs::create_dir(&bin_dir).unwrap();
        std::os::unix::fs::symlink(BIN, bin_dir.join("eventbus")).unwrap();
        let port = common::nats::free_port();
        Tour {
            server: format!("http://127.0.0.1:{port}"),
            listen: format!("127.0.0.1:{port}"),
            dir,
            bin_dir,
            background: Vec::new(),
        }
    }

    fn command(&self, line: &str) -> Command {
        let mut command = Command::new("sh");
        command.arg("-c").arg(format!("exec {line}"));
        for (key, _) in std::env::vars() {
            if key.starts_with("EVENTBUS_") {
                command.env_remove(key);
            }
        }
        let path = format!(
            "{}:{}",
            self.bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        command
            .current_dir(self.dir.path())
            .env("PATH", path)
            .env("EVENTBUS_LISTEN", &self.listen)
            .env("EVENTBUS_SERVER", &self.server)
            .stdin(Stdio::null());
        command
    }

    /// Starts `line` in the background, its output going to a file to read from.
    fn start(&mut self, line: &str) {
        let out = self
            .dir
            .path()
            .join(format!("background-{}.log", self.background.len()));
        let file = std::fs::File::create(&out).unwrap();
        let child = self
            .command(line)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        self.background.push((line.to_owned(), child, out));
        // A bus is ready once it listens; a subscriber or responder once it says so.
        let ready = if line.contains(" serve") {
            "eventbus listening"
        } else if line.contains(" subscribe") {
            "subscribed to"
        } else {
            "answering"
        };
        self.wait_for_output(self.background.len() - 1, ready);
    }

    fn output_of(&self, index: usize) -> String {
        let mut text = String::new();
        std::fs::File::open(&self.background[index].2)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        text
    }

    fn wait_for_output(&self, index: usize, text: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let output = self.output_of(index);
            if output.contains(text) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "`{}` did not print {text:?} within {WAIT:?}; it printed:\n{output}",
                self.background[index].0
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `step` to completion and checks it did what the README shows.
    fn run(&self, step: &Step) -> String {
        let mut child = self
            .command(&step.line)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("`{}` did not finish within {WAIT:?}", step.line);
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut stdout = String::new();
        let mut stderr = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut stdout)
            .unwrap();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        let printed = format!("{stdout}{stderr}");
        match step.shows.as_deref() {
            Some(error) if error.starts_with("error:") => {
                assert!(!status.success(), "`{}` should fail: {printed}", step.line);
                assert!(
                    stderr.contains(error),
                    "`{}` printed {stderr:?}, not {error:?}",
                    step.line
                );
            }
            shows => {
                assert!(status.success(), "`{}` failed: {printed}", step.line);
                if let Some(shows) = shows {
                    // `...` marks an illustration (a long-running bus's numbers): its text up
                    // to the first number is what must be there.
                    let shows = if shows.contains("...") {
                        shows.split(|c: char| c.is_ascii_digit()).next().unwrap()
                    } else {
                        shows
                    };
                    assert!(
                        printed.contains(shows),
                        "`{}` printed {printed:?}, not {shows:?}",
                        step.line
                    );
                }
            }
        }
        printed
    }
}

impl Drop for Tour {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.background {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn the_readme_tour_runs_as_written() {
    let steps = tour();
    assert!(steps.len() >= 10, "the tour has its commands: {steps:#?}");
    let mut tour = Tour::new();
    for step in &steps {
        if runs_on(&step.line) {
            tour.start(&step.line);
            continue;
        }
        tour.run(step);
        if step.line.starts_with("eventbus publish user.created") {
            // Terminal 2 prints the event with its sequence.
            tour.wait_for_output(1, "user.created");
        }
    }
}
