//! A real `eventbus serve` process on 127.0.0.1:0, for tests that measure the bus from outside:
//! its CPU time and resident memory from /proc, its logs (JSON lines on stderr), and limits set
//! on it before it starts (the open-file limit).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_eventbus");

/// How long the process may take to start listening.
const START_WITHIN: Duration = Duration::from_secs(30);

/// A running bus process; killed when dropped.
pub struct BusProcess {
    child: Child,
    pub addr: SocketAddr,
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl BusProcess {
    /// Starts `eventbus serve` with `args` added (on the memory store unless they name a
    /// `--storage`, at log level info unless they name a `--log-level`), under an open-file limit of `nofile` (soft and hard, so the bus cannot raise
    /// it) when given. Waits until it listens.
    pub fn start(args: &[&str], nofile: Option<u64>) -> BusProcess {
        BusProcess::start_with_env(args, nofile, &[])
    }

    /// As [`BusProcess::start`], with `env` set for the process.
    pub fn start_with_env(args: &[&str], nofile: Option<u64>, env: &[(&str, &str)]) -> BusProcess {
        let mut command = Command::new(BIN);
        command.envs(env.iter().copied());
        for (key, _) in std::env::vars() {
            if key.starts_with("EVENTBUS_") || key == "RUST_LOG" {
                command.env_remove(key);
            }
        }
        command.arg("serve");
        if !args.contains(&"--storage") {
            command.args(["--storage", "memory"]);
        }
        if !args.contains(&"--log-level") {
            command.args(["--log-level", "info"]);
        }
        if !args.contains(&"--listen") {
            command.args(["--listen", "127.0.0.1:0"]);
        }
        command
            .args(["--log-format", "json"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(limit) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: runs in the forked child before exec; setrlimit is a plain system call
            // (async-signal-safe) and the closure allocates nothing.
            unsafe {
                command.pre_exec(move || rlimit::setrlimit(rlimit::Resource::NOFILE, limit, limit));
            }
        }
        let mut child = command.spawn().expect("start eventbus serve");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        {
            let logs = logs.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let value = serde_json::from_str(&line)
                        .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                    logs.lock().unwrap().push(value);
                }
            });
        }
        let mut bus = BusProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            logs,
        };
        let deadline = Instant::now() + START_WITHIN;
        loop {
            if let Some(addr) = bus.listening_addr() {
                bus.addr = addr;
                return bus;
            }
            if let Some(status) = bus.child.try_wait().unwrap() {
                panic!("eventbus serve exited with {status}: {:?}", bus.logs());
            }
            assert!(
                Instant::now() < deadline,
                "eventbus serve did not listen within {START_WITHIN:?}: {:?}",
                bus.logs()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn listening_addr(&self) -> Option<SocketAddr> {
        let logs = self.logs.lock().unwrap();
        let line = logs
            .iter()
            .find(|l| l["fields"]["message"] == "eventbus listening")?;
        let text = line["fields"]["addr"].as_str()?;
        text.trim_start_matches("Some(")
            .trim_end_matches(')')
            .parse()
            .ok()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log lines so far, parsed.
    pub fn logs(&self) -> Vec<serde_json::Value> {
        self.logs.lock().unwrap().clone()
    }

    /// Log lines whose message contains `text`.
    pub fn logged(&self, text: &str) -> Vec<serde_json::Value> {
        self.logs()
            .into_iter()
            .filter(|l| {
                l["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(text))
            })
            .collect()
    }

    /// User plus system CPU time the process has used (/proc/PID/stat).
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        // Fields after the command name (which may hold spaces) start at state, field 3.
        let after_name = &stat[stat.rfind(')').unwrap() + 2..];
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        Duration::from_secs_f64(ticks as f64 / clock_ticks_per_second() as f64)
    }

    /// Resident memory (VmRSS from /proc/PID/status), in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .expect("VmRSS in /proc/PID/status");
        let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        kib * 1024
    }

    /// Sends SIGTERM and waits (up to `within`) for the process to exit, as an orchestrator
    /// stopping it would; panics if it does not.
    pub fn terminate(&mut self, within: Duration) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + within;
        while self.child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "eventbus did not stop within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for BusProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kernel's clock ticks per second (USER_HZ), in which /proc reports CPU time.
fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100)
}
