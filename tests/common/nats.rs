//! A real `nats-server` with JetStream for tests: started on a free loopback port with a
//! temporary store directory (never the machine's shared server on 4222), killed when dropped.
//!
//! The binary is `$EVENTBUS_TEST_NATS_SERVER` if set, else `nats-server` on the `PATH`
//! (`scripts/test.sh` runs the suite against Debian's 2.9.10 and the current 2.15.x release).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// How many of a server's last log lines a failing test prints.
const LOG_TAIL_LINES: usize = 200;

/// The last [`LOG_TAIL_LINES`] lines a server wrote to stderr.
type LogTail = Arc<Mutex<VecDeque<String>>>;

/// A running nats-server.
pub struct NatsServer {
    child: Child,
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    pub port: u16,
    store: tempfile::TempDir,
    extra: Vec<String>,
    /// Its log, printed when a test panics while the server runs (a slow or stuck JetStream
    /// says why there, and the temporary store is gone by then).
    log: LogTail,
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
        let log = LogTail::default();
        let (child, port) = spawn(&store, "-1", &extra, &log);
        NatsServer {
            child,
            url: format!("nats://127.0.0.1:{port}"),
            port,
            store,
            extra,
            log,
        }
    }

    /// Starts the server again after [`NatsServer::kill`], on the same port with the same
    /// JetStream store, as an operator restarting it would.
    pub fn restart(&mut self) {
        self.kill();
        let (child, _) = spawn(&self.store, &self.port.to_string(), &self.extra, &self.log);
        self.child = child;
    }
}

fn spawn(store: &tempfile::TempDir, port: &str, extra: &[String], log: &LogTail) -> (Child, u16) {
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
        let log = Arc::clone(log);
        std::thread::spawn(move || {
            let mut sent = false;
            let mut ready = false;
            let mut port_seen = None;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                {
                    let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                    if log.len() == LOG_TAIL_LINES {
                        log.pop_front();
                    }
                    log.push_back(line.clone());
                }
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
        if std::thread::panicking() {
            let log = self.log.lock().unwrap_or_else(|e| e.into_inner());
            eprintln!(
                "--- the last {} lines of nats-server {} ({}) ---",
                log.len(),
                self.url,
                binary().display()
            );
            for line in log.iter() {
                eprintln!("{line}");
            }
            eprintln!("--- end of the nats-server log ---");
        }
    }
}

/// A NATS cluster on loopback: `size` servers with JetStream, joined by cluster routes, each
/// with its own store directory. Waits until JetStream has a meta leader.
pub struct NatsCluster {
    pub nodes: Vec<ClusterNode>,
}

/// One server of a [`NatsCluster`].
pub struct ClusterNode {
    child: Option<Child>,
    /// `n1`, `n2`, ...: the server name JetStream reports as a stream's leader.
    pub name: String,
    pub url: String,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

/// A free loopback port for a server started later (a cluster's client and route ports,
/// known before any server starts; a bus node restarted on the same address).
///
/// Picked below the kernel's ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`):
/// every outgoing connection on the machine takes its source port from that range, so a port
/// picked there (as binding to port 0 does) can be taken by some client's connection before
/// the server binds it; a nats-server failed to start in CI that way. Below the range only
/// another picker can take it, and picks are random over some 20 000 ports and checked free.
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    const FLOOR: u16 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > FLOOR + 1_000 {
        for attempt in 0..200u32 {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u32(attempt);
            let port = FLOOR + (hasher.finish() % u64::from(ephemeral_low - FLOOR)) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl NatsCluster {
    pub async fn start(size: usize) -> NatsCluster {
        let client_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let route_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let mut nodes = Vec::new();
        for i in 0..size {
            let dir = tempfile::tempdir().unwrap();
            let routes: Vec<String> = route_ports
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, port)| format!("nats://127.0.0.1:{port}"))
                .collect();
            let name = format!("n{}", i + 1);
            let config = dir.path().join("nats.conf");
            std::fs::write(
                &config,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{}\nmax_payload: 8MB\n\
                     jetstream {{ store_dir: \"{}\" }}\n\
                     cluster {{ name: eventbus-test, listen: 127.0.0.1:{}, routes: [{}] }}\n",
                    client_ports[i],
                    dir.path().join("js").display(),
                    route_ports[i],
                    routes.join(", ")
                ),
            )
            .unwrap();
            let mut node = ClusterNode {
                child: None,
                name,
                url: format!("nats://127.0.0.1:{}", client_ports[i]),
                config,
                _dir: dir,
            };
            node.start();
            nodes.push(node);
        }
        let cluster = NatsCluster { nodes };
        cluster.wait_for_jetstream().await;
        cluster
    }

    /// Every server's URL, comma-separated, for `--nats-url`.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.url.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Polls until JetStream answers account info (it has a meta leader), up to 30 s.
    pub async fn wait_for_jetstream(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let urls: Vec<async_nats::ServerAddr> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.url.parse().unwrap())
            .collect();
        loop {
            if let Ok(client) = async_nats::connect(urls.clone()).await {
                // The account info answer carries an `error` until JetStream has a meta
                // leader. (async-nats's own parser of it fails on NATS 2.9.10.)
                if let Ok(Ok(answer)) = tokio::time::timeout(
                    Duration::from_secs(2),
                    client.request("$JS.API.INFO", bytes::Bytes::new()),
                )
                .await
                {
                    if !String::from_utf8_lossy(&answer.payload).contains("\"error\"") {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "JetStream cluster not ready within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The index of the server leading `stream`, as JetStream reports it.
    pub async fn leader_of(&self, stream: &str) -> usize {
        let urls: Vec<async_nats::ServerAddr> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.url.parse().unwrap())
            .collect();
        let client = async_nats::connect(urls).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut stream) = js.get_stream(stream).await {
                if let Ok(info) = stream.info().await {
                    if let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone()) {
                        if let Some(index) = self.nodes.iter().position(|n| n.name == leader) {
                            return index;
                        }
                    }
                }
            }
            assert!(Instant::now() < deadline, "no leader for stream {stream}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl ClusterNode {
    /// Starts the server with its configuration and store (again, after [`ClusterNode::kill`])
    /// and waits until it listens.
    pub fn start(&mut self) {
        // Its log goes to a file beside its config, for the panic below.
        let log = self.config.with_file_name("nats.log");
        let mut child = Command::new(binary())
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create the nats-server log"))
            .spawn()
            .expect("start nats-server");
        // The client port answers once the server is up.
        let address = self.url.trim_start_matches("nats://").to_owned();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&address).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                panic!(
                    "nats-server {} exited at start: {status}; its log:\n{log}",
                    self.name
                );
            }
            assert!(
                Instant::now() < deadline,
                "nats-server {} did not listen",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (SIGSTOP, SIGCONT) to the server.
    pub fn signal(&self, signal: i32) {
        let child = self.child.as_ref().expect("running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, signal);
        }
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A stopped process must be continued to die promptly.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGCONT);
            }
        }
        self.kill();
        if std::thread::panicking() {
            let log =
                std::fs::read_to_string(self.config.with_file_name("nats.log")).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            eprintln!(
                "--- the last {} lines of nats-server {} ---",
                tail.len(),
                self.name
            );
            for line in tail {
                eprintln!("{line}");
            }
            eprintln!("--- end of the nats-server log ---");
        }
    }
}
