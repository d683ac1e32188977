//! A harness that runs the scenario as real processes, for the end-to-end tests
//! (`tests/scenario.rs`) and the benchmark (`scenario-bench`): the bus (`eventbus serve`) and the
//! services, each on a free port with its own SQLite file in a temporary directory, logs captured
//! to files, readiness polled with deadlines, every process killed on drop.
//!
//! The binaries come from the target directory this crate was built into (`target/debug` for
//! tests, or `SCENARIO_BIN_DIR`). `cargo test --workspace --all-targets` (scripts/test.sh) builds
//! every binary of the workspace before it runs any test, so they are there and current.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use eventbus::sdk::Client;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// How long anything may take to come up.
pub const STARTUP: Duration = Duration::from_secs(30);

/// The directory holding the workspace's binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SCENARIO_BIN_DIR") {
        return dir.into();
    }
    // Tests run from target/<profile>/deps/, binaries from target/<profile>/.
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The path of a workspace binary; panics with what to do when it is not built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.exists(),
        "{} is missing: build the workspace first (`cargo build --workspace`, or run the tests \
         with `cargo test --workspace --all-targets` as scripts/test.sh does), or point \
         SCENARIO_BIN_DIR at the binaries",
        path.display()
    );
    path
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Polls `check` until it returns `Some`, failing after `within` with `what`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A child process, killed when dropped.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `bin` with `args`, stdout and stderr to `<dir>/<name>.log`.
    pub fn spawn(name: &str, bin: &Path, args: &[String], dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("create log file");
        let child = Command::new(bin)
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("EVENTBUS_SERVER")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        Proc {
            name: name.to_string(),
            child,
            log,
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// What the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` at least `times` times.
    pub async fn wait_for_log(&self, needle: &str, times: usize) {
        let what = format!("{} to log {needle:?} {times} time(s)", self.name);
        eventually(STARTUP, &what, || async {
            (self.log().matches(needle).count() >= times).then_some(())
        })
        .await
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit (SIGKILL after 10 s).
    pub fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                return self.child.wait().expect("wait");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The bus and the services of one test, in one temporary directory.
pub struct Scenario {
    pub dir: tempfile::TempDir,
    /// The bus as the services are told it: one URL, or on a cluster both nodes' URLs
    /// separated by a comma (the first node first).
    pub bus_url: String,
    /// The bus, or on a cluster its first node.
    pub bus: Proc,
    /// On a cluster ([`Scenario::start_cluster`]): the second bus node and the nats-server.
    pub second: Option<Proc>,
    pub nats: Option<Proc>,
    /// A client of the bus, as the source `scenario-test`.
    pub client: Client,
}

/// A query service started by [`Scenario::query_service`].
pub struct QueryService {
    pub proc: Proc,
    pub port: u16,
}

impl Scenario {
    /// Starts a bus and waits until it answers.
    pub async fn start() -> Scenario {
        let dir = tempfile::Builder::new()
            .prefix("eventbus-scenario-")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let bus = Proc::spawn(
            "eventbus",
            &bin("eventbus"),
            &[
                "serve".into(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                // The durable file store, in this scenario's own directory.
                "--data-dir".into(),
                dir.path().join("eventbus-data").display().to_string(),
            ],
            dir.path(),
        );
        let bus_url = format!("http://127.0.0.1:{port}");
        let client = answering(&bus_url).await;
        Scenario {
            dir,
            bus_url,
            bus,
            second: None,
            nats: None,
            client,
        }
    }

    /// Starts the scenario's bus as a cluster: a nats-server with JetStream
    /// (`$EVENTBUS_TEST_NATS_SERVER`, or `nats-server` on the PATH) and two bus nodes on its
    /// stream. The services are told both nodes ([`Scenario::bus_url`]), the user service the
    /// second first ([`Scenario::service`]), so that killing the first node moves the others.
    pub async fn start_cluster() -> Scenario {
        let dir = tempfile::Builder::new()
            .prefix("eventbus-scenario-")
            .tempdir()
            .expect("temp dir");
        let nats_port = free_port();
        let config = dir.path().join("nats.conf");
        // The bus's 1 MiB events need more than NATS's default 1 MB payload.
        std::fs::write(&config, "max_payload: 8MB\n").expect("write nats.conf");
        let nats_bin = std::env::var_os("EVENTBUS_TEST_NATS_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("nats-server"));
        let nats = Proc::spawn(
            "nats-server",
            &nats_bin,
            &[
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                nats_port.to_string(),
                "-js".into(),
                "-sd".into(),
                dir.path().join("jetstream").display().to_string(),
                "-c".into(),
                config.display().to_string(),
            ],
            dir.path(),
        );
        eventually(STARTUP, "nats-server to listen", || async {
            TcpStream::connect(("127.0.0.1", nats_port)).await.ok()
        })
        .await;
        let nats_url = format!("nats://127.0.0.1:{nats_port}");
        let node = |name: &str, port: u16| {
            Proc::spawn(
                name,
                &bin("eventbus"),
                &[
                    "serve".into(),
                    "--listen".into(),
                    format!("127.0.0.1:{port}"),
                    "--storage".into(),
                    "jetstream".into(),
                    "--nats-url".into(),
                    nats_url.clone(),
                ],
                dir.path(),
            )
        };
        let (first_port, second_port) = (free_port(), free_port());
        let bus = node("eventbus", first_port);
        let first_url = format!("http://127.0.0.1:{first_port}");
        answering(&first_url).await;
        let second = node("eventbus-2", second_port);
        let second_url = format!("http://127.0.0.1:{second_port}");
        answering(&second_url).await;
        let bus_url = format!("{first_url},{second_url}");
        let client = answering(&bus_url).await;
        Scenario {
            dir,
            bus_url,
            bus,
            second: Some(second),
            nats: Some(nats),
            client,
        }
    }

    /// The bus URL a service is given: on a cluster, the user service gets the second node
    /// first, so the services do not all use one node.
    fn bus_url_for(&self, service: &str) -> String {
        match (self.bus_url.split_once(','), service) {
            (Some((first, second)), "user-service") => format!("{second},{first}"),
            _ => self.bus_url.clone(),
        }
    }

    /// The SQLite file of `label`.
    pub fn db(&self, label: &str) -> String {
        self.dir
            .path()
            .join(format!("{label}.db"))
            .display()
            .to_string()
    }

    /// Starts `service` (`user-service`, ...) as `label` (its log and, unless `--db` is in
    /// `extra`, its database are named after it), and waits until it has published its outbox
    /// and subscribes to every query topic it answers.
    pub async fn service(&self, service: &str, label: &str, extra: &[&str]) -> Proc {
        let mut args = vec!["--bus".to_string(), self.bus_url_for(service)];
        if !extra.contains(&"--db") {
            args.extend(["--db".to_string(), self.db(label)]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = Proc::spawn(label, &bin(service), &args, self.dir.path());
        proc.wait_for_log("outbox drained", 1).await;
        let topics: &[&str] = match service {
            "user-service" => &["user.query"],
            "product-service" => &["product.query"],
            "order-service" => &["order.query", "order.create"],
            _ => &[],
        };
        proc.wait_for_log("serving queries", topics.len()).await;
        proc
    }

    /// Starts user-, product- and order-service.
    pub async fn services(&self) -> [Proc; 3] {
        let (user, product, order) = tokio::join!(
            self.service("user-service", "user-service", &[]),
            self.service("product-service", "product-service", &[]),
            self.service("order-service", "order-service", &[]),
        );
        [user, product, order]
    }

    /// Live subscriptions to the pattern `topic`, as the bus's topology counts them (the
    /// topic list shows only topics that have been published to).
    pub async fn subscribers(&self, topic: &str) -> u32 {
        let topology = self.client.topology().await.expect("topology");
        let Some(node) = topology
            .nodes
            .iter()
            .find(|n| n.name == topic && n.kind == eventbus::pb::NodeKind::Topic as i32)
        else {
            return 0;
        };
        topology
            .edges
            .iter()
            .filter(|e| e.from == node.id && e.kind == eventbus::pb::EdgeKind::Subscribes as i32)
            .map(|e| e.active_subscriptions)
            .sum()
    }

    /// Events ever published to `topic`.
    pub async fn published(&self, topic: &str) -> u64 {
        self.client
            .list_topics(Some(topic))
            .await
            .expect("list topics")
            .iter()
            .find(|t| t.name == topic)
            .map_or(0, |t| t.events_published)
    }

    /// Starts a query service in `mode` as `label`, and waits until it answers HTTP.
    pub async fn query_service(&self, mode: &str, label: &str, extra: &[&str]) -> QueryService {
        let port = free_port();
        let mut args: Vec<String> = [
            "--bus",
            &self.bus_url,
            "--mode",
            mode,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if !extra.contains(&"--db") {
            args.extend(["--db".to_string(), self.db(label)]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc = Proc::spawn(label, &bin("query-service"), &args, self.dir.path());
        eventually(STARTUP, "the query service to answer", || async {
            http(port, "GET", "/health", None, &[])
                .await
                .ok()
                .filter(|r| r.status == 200)
        })
        .await;
        QueryService { proc, port }
    }
}

/// A client of the bus at `urls`, once it answers.
async fn answering(urls: &str) -> Client {
    eventually(STARTUP, "the bus to answer", || async {
        let client = Client::builder(urls)
            .source("scenario-test")
            .connect()
            .await
            .ok()?;
        client.list_topics(None).await.ok().map(|_| client)
    })
    .await
}

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// One HTTP/1.1 connection that is kept alive between requests: small, so the tests and the
/// benchmark need no HTTP client crate. Understands `Content-Length` bodies, which is what
/// query-service sends.
pub struct HttpConnection {
    stream: TcpStream,
    port: u16,
    buffer: Vec<u8>,
}

impl HttpConnection {
    pub async fn open(port: u16) -> std::io::Result<HttpConnection> {
        let stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        Ok(HttpConnection {
            stream,
            port,
            buffer: Vec::new(),
        })
    }

    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> std::io::Result<HttpResponse> {
        let body = body.unwrap_or("");
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{}\r\ncontent-length: {}\r\n",
            self.port,
            body.len()
        );
        if !body.is_empty() {
            head.push_str("content-type: application/json\r\n");
        }
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        head.push_str(body);
        self.stream.write_all(head.as_bytes()).await?;

        let header_end = loop {
            if let Some(i) = self.buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            self.fill().await?;
        };
        let text = String::from_utf8_lossy(&self.buffer[..header_end]).into_owned();
        let mut lines = text.split("\r\n");
        let status = lines
            .next()
            .and_then(|line| line.split(' ').nth(1))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line in {text:?}")))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let length: usize = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| std::io::Error::other("a response without content-length"))?;
        let start = header_end + 4;
        while self.buffer.len() < start + length {
            self.fill().await?;
        }
        let body = self.buffer[start..start + length].to_vec();
        self.buffer.drain(..start + length);
        Ok(HttpResponse {
            status,
            headers,
            body,
        })
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.buffer.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// One request on a new connection.
pub async fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse> {
    HttpConnection::open(port)
        .await?
        .request(method, path, body, headers)
        .await
}
