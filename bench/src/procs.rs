//! The servers under test, each started by the harness on a free loopback port with its own
//! temporary directory, so results never depend on a shared server's state. Dropping a
//! [`Server`] kills its process and removes its directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

/// Where the harness finds the programs it starts.
#[derive(Debug, Clone)]
pub struct Programs {
    pub eventbus: PathBuf,
    pub nats: PathBuf,
    /// The current nats-server release (2.15.x), beside the machine's `nats`; `None` skips
    /// its rows.
    pub nats_current: Option<PathBuf>,
    pub redis: PathBuf,
    /// Where the scenario's service binaries are (`user-service`, ...).
    pub services_dir: PathBuf,
    /// The buses' `--log-level`.
    pub log_level: String,
}

impl Programs {
    pub fn has_nats(&self) -> bool {
        self.nats.is_file()
    }

    pub fn has_redis(&self) -> bool {
        self.redis.is_file()
    }
}

/// How the bus under test stores its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusStorage {
    Memory,
    /// The file store with `--fsync always`.
    FileFsyncAlways,
    /// The file store acknowledging once written and syncing every second (`--fsync
    /// interval:1000`), as JetStream does by default (every two minutes).
    FileFsyncInterval,
    /// The file store with the bus's default settings (`eventbus serve` as the README starts
    /// it, only the data directory given).
    FileDefault,
    /// The clustered backend: the log in the JetStream stream `BENCH<n>` (one replica) on the
    /// nats-server at this address; nodes given the same `n` share the stream.
    JetStream(SocketAddr, u16),
}

/// One running server process.
pub struct Server {
    pub addr: SocketAddr,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Server {
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The process's resident memory now (VmRSS), in bytes.
    pub fn rss_bytes(&self) -> Result<u64> {
        let pid = self.pid().context("the server has exited")?;
        rss_bytes(pid)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// CPU time (user + system) process `pid` has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    // Clock ticks; 100 per second on Linux.
    Ok((utime + stime) / 100.0)
}

/// VmRSS of process `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("VmRSS without a number")?
        .parse()?;
    Ok(kib * 1024)
}

/// A loopback port nobody listens on right now.
pub async fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    Ok(listener.local_addr()?.port())
}

async fn wait_for_port(addr: SocketAddr, child: &mut Child, name: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("{name} exited before listening on {addr}: {status}");
        }
        if Instant::now() > deadline {
            bail!("{name} did not listen on {addr} within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start(
    name: &'static str,
    mut command: Command,
    addr: SocketAddr,
    dir: tempfile::TempDir,
) -> Result<Server> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    wait_for_port(addr, &mut child, name).await?;
    Ok(Server {
        addr,
        child,
        _dir: dir,
    })
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `eventbus serve` on a free port. Subscriber queues are large enough for the harness's
/// flow-control window, so no subscriber is ended as slow.
pub async fn start_eventbus(
    programs: &Programs,
    storage: BusStorage,
    queue: usize,
) -> Result<Server> {
    if !programs.eventbus.is_file() {
        bail!(
            "{} not found: build it first with `cargo build --release`",
            programs.eventbus.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let port = free_port().await?;
    let mut command = Command::new(&programs.eventbus);
    command
        .arg("serve")
        .arg("--listen")
        .arg(loopback(port).to_string())
        .arg("--log-level")
        .arg(&programs.log_level)
        .arg("--subscriber-queue-size")
        .arg(queue.to_string())
        .env_remove("RUST_LOG");
    match storage {
        BusStorage::Memory => {
            command.args(["--storage", "memory"]);
        }
        BusStorage::JetStream(nats, stream) => {
            command
                .args(["--storage", "jetstream", "--nats-url"])
                .arg(format!("nats://{nats}"))
                .args(["--jetstream-stream", &format!("BENCH{stream}")]);
        }
        BusStorage::FileFsyncAlways => {
            command
                .args(["--storage", "file", "--fsync", "always", "--data-dir"])
                .arg(dir.path().join("data"));
        }
        BusStorage::FileDefault => {
            command
                .args(["--storage", "file", "--data-dir"])
                .arg(dir.path().join("data"));
        }
        BusStorage::FileFsyncInterval => {
            command
                .args([
                    "--storage",
                    "file",
                    "--fsync",
                    "interval:1000",
                    "--data-dir",
                ])
                .arg(dir.path().join("data"));
        }
    }
    start("eventbus", command, loopback(port), dir).await
}

/// `nats-server` with JetStream, its store in a temporary directory.
pub async fn start_nats(programs: &Programs) -> Result<Server> {
    start_nats_binary(&programs.nats, NatsSync::Default).await
}

/// When a nats-server's JetStream syncs its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsSync {
    /// Its default: written at once, synced every two minutes.
    Default,
    /// `sync_interval: always`: synced before each acknowledgement (like `--fsync always`).
    Always,
}

/// `nats-server` at `binary` with JetStream, its store in a temporary directory.
pub async fn start_nats_binary(binary: &Path, sync: NatsSync) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let port = free_port().await?;
    // max_payload 8MB (NATS's advice for large messages): the bus on JetStream refuses a
    // server that cannot take its largest events; it costs nothing for small ones.
    let sync_line = match sync {
        NatsSync::Default => "",
        NatsSync::Always => "  sync_interval: always\n",
    };
    let config = dir.path().join("nats.conf");
    std::fs::write(
        &config,
        format!(
            "max_payload: 8MB\njetstream {{\n  store_dir: {:?}\n{sync_line}}}\n",
            dir.path().join("js")
        ),
    )?;
    let mut command = Command::new(binary);
    command
        .args(["-a", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .arg("-c")
        .arg(config);
    start("nats-server", command, loopback(port), dir).await
}

/// `redis-server` that keeps nothing on disk.
pub async fn start_redis(programs: &Programs) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let port = free_port().await?;
    let mut command = Command::new(&programs.redis);
    command
        .args(["--bind", "127.0.0.1", "--port"])
        .arg(port.to_string())
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
        ])
        .arg(dir.path());
    start("redis-server", command, loopback(port), dir).await
}

/// One of the scenario's services (`user-service`, ...), with its database in `dir`.
pub async fn start_service(
    programs: &Programs,
    name: &'static str,
    bus: &str,
    listen: Option<SocketAddr>,
    extra: &[&str],
) -> Result<Server> {
    let dir = tempfile::tempdir()?;
    let mut command = Command::new(programs.services_dir.join(name));
    command
        .arg("--bus")
        .arg(bus)
        .arg("--db")
        .arg(dir.path().join(format!("{name}.db")))
        .args(["--log-level", "warn"])
        .args(extra)
        .env_remove("RUST_LOG");
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if let Some(addr) = listen {
        command.arg("--listen").arg(addr.to_string());
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let addr = match listen {
        Some(addr) => {
            wait_for_port(addr, &mut child, name).await?;
            addr
        }
        None => loopback(0),
    };
    Ok(Server {
        addr,
        child,
        _dir: dir,
    })
}

/// The scenario binaries, if all are built.
pub fn scenario_binaries(dir: &Path) -> Result<(), String> {
    let missing: Vec<&str> = [
        "user-service",
        "product-service",
        "order-service",
        "query-service",
    ]
    .into_iter()
    .filter(|name| !dir.join(name).is_file())
    .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} not built in {} (the scenario services live under clients/; build them with \
             `cargo build --release --workspace`)",
            missing.join(", "),
            dir.display()
        ))
    }
}
