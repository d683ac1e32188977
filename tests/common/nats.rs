//! A real `nats-server` with JetStream for tests: started on a free loopback port with a
//! temporary store directory (never the machine's shared server on 4222), killed when dropped.
//!
//! The binary is `$EVENTBUS_TEST_NATS_SERVER` if set, else `nats-server` on the `PATH`
//! (`scripts/test.sh` runs the suite against Debian's 2.9.10 and the current 2.15.x release).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running nats-server.
pub struct NatsServer {
    child: Child,
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    pub port: u16,
    store: tempfile::TempDir,
    extra: Vec<String>,
}

/// The nats-server binary the tests use.
pub fn binary() -> PathBuf {
    std::env::var_os("EVENTBUS_TEST_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

impl NatsServer {
    /// Starts a single server with JetStream on a random port, and waits until it listens.
    pub fn start() -> NatsServer {
        NatsServer::start_with(&[])
    }

    /// Starts a server with extra command-line arguments (a cluster block, say).
    pub fn start_with(extra: &[&str]) -> NatsServer {
        let store = tempfile::tempdir().expect("temporary JetStream store");
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let (child, port) = spawn(&store, "-1", &extra);
        NatsServer {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            port,
            store,
            extra,
        }
    }

    /// Starts the server again after [`NatsServer::kill`], on the same port with the same
    /// JetStream store, as an operator restarting it would.
    pub fn restart(&mut self) {
        self.kill();
        let (child, _) = spawn(&self.store, &self.port.to_string(), &self.extra);
        self.child = child;
    }
}

fn spawn(store: &tempfile::TempDir, port: &str, extra: &[String]) -> (Child, u16) {
    {
        // The bus's default 1 MiB event data needs more than NATS's default 1 MB payload.
        let config = store.path().join("nats.conf");
        std::fs::write(&config, "max_payload: 8MB\n").expect("write nats.conf");
        let mut child = Command::new(binary())
            .args(["-a", "127.0.0.1", "-p", port, "-js", "-c"])
            .arg(&config)
            .arg("-sd")
            .arg(store.path().join("jetstream"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| {
                panic!(
                    "cannot start {} ({error}): install nats-server or set EVENTBUS_TEST_NATS_SERVER",
                    binary().display()
                )
            });
        let stderr = child.stderr.take().expect("piped");
        let (found, port) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            let mut ready = false;
            let mut port_seen = None;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("Listening for client connections on ").nth(1) {
                    port_seen = rest
                        .trim()
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse::<u16>().ok());
                }
                if line.contains("Server is ready") {
                    ready = true;
                }
                if !sent && ready {
                    if let Some(port) = port_seen {
                        let _ = found.send(port);
                        sent = true;
                    }
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let port = loop {
            match port.recv_timeout(Duration::from_millis(100)) {
                Ok(port) => break port,
                Err(_) if Instant::now() < deadline => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("nats-server exited at start: {status}");
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!("nats-server did not become ready within 20 s");
                }
            }
        };
        (child, port)
    }
}

impl NatsServer {
    /// Stops the server at once (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The process id, for signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
