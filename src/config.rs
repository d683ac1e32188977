//! Server configuration: one struct per concern, filled from flags, `EVENTBUS_*` environment
//! variables and an optional TOML file, in that order of precedence, then checked as a whole so
//! a bad combination is refused at start rather than discovered under load.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::store::FsyncPolicy;

/// Limits and sizes the broker works within. Every field has a default that suits one machine.
#[derive(Debug, Clone, PartialEq)]
pub struct BusConfig {
    /// Events kept for replay (`earliest`, `after_sequence`, `from_time`), at most this many...
    pub retention_max_events: u64,
    /// ...and at most this many bytes of them (data plus metadata in memory; on disk, the
    /// segment files)...
    pub retention_max_bytes: u64,
    /// ...and none older than this, if set.
    pub retention_max_age: Option<Duration>,
    /// Events queued for one live subscriber at most. A subscriber whose queue is full leaves
    /// the live path and catches up from the log (see `broker::subscription`); it is not ended.
    pub subscriber_queue_size: usize,
    /// Bytes of events (as retention counts them) queued for one live subscriber at most, with
    /// the same effect as a full queue; an empty queue takes one event of any size. Also bounds
    /// what one replay, or one MANUAL-ack group's read-ahead, reads from the log at a time.
    pub subscriber_queue_bytes: usize,
    /// Bytes of events queued for all live subscribers together at most: past it, a subscriber
    /// whose queue would grow catches up from the log instead. Bounds the bus's memory for
    /// delivery whatever the number of subscribers.
    pub delivery_buffer_bytes: usize,
    /// A subscriber catching up from the log that is more than this many sequences behind the
    /// head is ended (RESOURCE_EXHAUSTED `slow-consumer`, or `slow-group-member`). `None`: never;
    /// it is ended only when retention drops events it has not read (`replay-overrun`).
    pub max_subscriber_lag: Option<u64>,
    /// The largest `data` of one event.
    pub max_event_data_bytes: usize,
    /// The most events in one publish batch.
    pub max_batch_events: usize,
    /// The largest gRPC message the server accepts or sends; sized to fit a full batch.
    pub max_message_bytes: usize,
    /// Query timeout when the request names none.
    pub default_query_timeout: Duration,
    /// The longest a query may wait, whatever it asks for.
    pub max_query_timeout: Duration,
    /// Idempotent publish: an event whose (source, id) was published within this window is not
    /// stored again. Zero turns it off.
    pub dedupe_window: Duration,
    /// The most (source, id) pairs remembered, whatever the window: bounds memory.
    pub dedupe_max_entries: usize,
    /// State keyed by names clients choose (a topic's counters, a topology edge, an ended
    /// subscription, a MANUAL-ack group with no member) is forgotten once unused this long, so
    /// memory follows the names in use, not every name ever seen. A group's cursor stays saved.
    pub names_idle_after: Duration,
    /// The most topics, and separately the most topology edges and subscriptions, tracked at
    /// once; events of names past it are counted as untracked instead.
    pub max_names: usize,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            retention_max_events: 1_000_000,
            retention_max_bytes: 256 * 1024 * 1024,
            retention_max_age: None,
            subscriber_queue_size: 8192,
            subscriber_queue_bytes: 8 * 1024 * 1024,
            delivery_buffer_bytes: 256 * 1024 * 1024,
            max_subscriber_lag: None,
            max_event_data_bytes: 1024 * 1024,
            max_batch_events: 10_000,
            max_message_bytes: 16 * 1024 * 1024,
            default_query_timeout: Duration::from_secs(5),
            max_query_timeout: Duration::from_secs(60),
            dedupe_window: Duration::from_secs(120),
            dedupe_max_entries: 1_000_000,
            names_idle_after: Duration::from_secs(3600),
            max_names: 100_000,
        }
    }
}

/// Room in a gRPC message for an event's metadata and framing beyond its data.
pub const MESSAGE_OVERHEAD_BYTES: usize = 64 * 1024;

/// A configuration that cannot work, named by its setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{setting}: {rule}")]
    Invalid { setting: &'static str, rule: String },
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
}

impl BusConfig {
    /// Refuses settings that contradict each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |setting, rule: String| Err(ConfigError::Invalid { setting, rule });
        if self.subscriber_queue_size == 0 {
            return invalid("subscriber_queue_size", "must be at least 1".into());
        }
        if self.subscriber_queue_bytes == 0 {
            return invalid("subscriber_queue_bytes", "must be at least 1".into());
        }
        if self.delivery_buffer_bytes < self.subscriber_queue_bytes {
            return invalid(
                "delivery_buffer_bytes",
                format!(
                    "must be at least subscriber_queue_bytes ({}) so one subscriber's queue fits",
                    self.subscriber_queue_bytes
                ),
            );
        }
        if self.max_subscriber_lag == Some(0) {
            return invalid("max_subscriber_lag", "must be at least 1".into());
        }
        if self.max_batch_events == 0 {
            return invalid("max_batch_events", "must be at least 1".into());
        }
        if self.retention_max_events == 0 {
            return invalid("retention_max_events", "must be at least 1".into());
        }
        let smallest_message = self.max_event_data_bytes + MESSAGE_OVERHEAD_BYTES;
        if self.max_message_bytes < smallest_message {
            return invalid(
                "max_message_bytes",
                format!(
                    "must be at least max_event_data_bytes + {MESSAGE_OVERHEAD_BYTES} \
                     ({smallest_message}) so one full-size event fits"
                ),
            );
        }
        if self.retention_max_bytes < smallest_message as u64 {
            return invalid(
                "retention_max_bytes",
                format!("must hold at least one full-size event ({smallest_message} bytes)"),
            );
        }
        if self.max_names == 0 {
            return invalid("max_names", "must be at least 1".into());
        }
        if self.names_idle_after.is_zero() {
            return invalid("names_idle_after", "must be more than 0s".into());
        }
        if self.default_query_timeout > self.max_query_timeout {
            return invalid(
                "default_query_timeout",
                "must not exceed max_query_timeout".into(),
            );
        }
        Ok(())
    }
}

/// How the server runs: where it listens and how it treats connections and shutdown.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub bus: BusConfig,
    pub storage: StorageConfig,
    /// How long shutdown waits for in-flight calls after ending open streams.
    pub shutdown_grace: Duration,
    /// HTTP/2 keepalive ping interval: how dead clients are noticed and their subscriptions freed.
    pub keepalive_interval: Duration,
    /// How long a keepalive ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// The longest a unary request's body, or one message of a streaming request, may take to
    /// arrive once started; a request that takes longer fails (DEADLINE_EXCEEDED
    /// `receive-timeout`). Bounds how long a stalled client holds the bytes it sent.
    pub receive_timeout: Duration,
    /// Bytes of partly received requests the bus holds at once, across all connections; a
    /// request that would pass it fails (RESOURCE_EXHAUSTED `receive-budget`).
    pub receive_budget_bytes: usize,
    /// HTTP/2 streams (calls, subscriptions included) one connection may have open at once;
    /// a client that opens more waits for one to end.
    pub max_concurrent_streams: u32,
    /// Open connections at most; `None`: the open-file limit less a reserve for files
    /// ([`crate::accept::default_max_connections`]). At the limit new connections wait.
    pub max_connections: Option<usize>,
    /// How long a new connection may send nothing before it is closed.
    pub handshake_timeout: Duration,
    /// Where the admin HTTP listener (`/metrics`, `/healthz`, `/readyz` and the dashboard, see
    /// [`crate::admin`]) listens; `None`: it is off.
    pub admin_listen: Option<SocketAddr>,
    /// Principals and limits (the file's `[[principals]]` and `[limits]`, see [`crate::auth`]);
    /// no principals: the bus is open.
    pub auth: crate::auth::AuthConfig,
    /// The `--config` file, read again for principals and limits on SIGHUP or when it
    /// changes; `None`: nothing to reload.
    pub config_file: Option<PathBuf>,
    /// TLS on the gRPC and admin listeners ([`crate::tls`]); `None`: plaintext.
    pub tls: Option<TlsConfig>,
}

/// The PEM files of the server's TLS (`--tls-cert`, `--tls-key`, `--tls-client-ca`). They are
/// read at start and again on SIGHUP or when they change ([`crate::tls`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The server's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that client certificates must chain to (mutual TLS); `None`: client
    /// certificates are not asked for. With it, a client without a certificate may still
    /// connect, one with a certificate that does not verify may not.
    pub client_ca: Option<PathBuf>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            bus: BusConfig::default(),
            storage: StorageConfig::Memory,
            shutdown_grace: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            receive_timeout: Duration::from_secs(30),
            receive_budget_bytes: 256 * 1024 * 1024,
            max_concurrent_streams: 4096,
            max_connections: None,
            handshake_timeout: Duration::from_secs(10),
            admin_listen: None,
            auth: crate::auth::AuthConfig::default(),
            config_file: None,
            tls: None,
        }
    }
}

/// Where the bus keeps its log.
///
/// `eventbus serve` defaults to [`StorageConfig::File`] in `./eventbus-data`; the library's
/// [`ServerConfig::default`] keeps [`StorageConfig::Memory`], so embedding and tests leave no
/// files behind unless they ask for them.
#[derive(Debug, Clone, PartialEq)]
pub enum StorageConfig {
    /// A bounded ring in memory: fast, and gone when the bus stops.
    Memory,
    /// Segment files on disk that survive a crash.
    File {
        data_dir: PathBuf,
        fsync: FsyncPolicy,
        segment_bytes: u64,
    },
    /// A NATS JetStream stream shared by every bus node pointed at it
    /// (see [`crate::store::jetstream`]).
    JetStream {
        /// NATS servers, any of which the node may connect to (`nats://host:4222`).
        urls: Vec<String>,
        /// The stream's name; its subjects are `<name>.>`.
        stream: String,
        /// Stream replicas (3 in a NATS cluster).
        replicas: usize,
    },
}

impl StorageConfig {
    /// The `--storage` name of this kind of store: `memory`, `file` or `jetstream`.
    pub fn name(&self) -> &'static str {
        match self {
            StorageConfig::Memory => "memory",
            StorageConfig::File { .. } => "file",
            StorageConfig::JetStream { .. } => "jetstream",
        }
    }
}

/// The default `--jetstream-stream`.
pub const DEFAULT_JETSTREAM_STREAM: &str = "EVENTBUS";

/// The `--storage` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageKind {
    Memory,
    File,
    /// NATS JetStream: `--storage jetstream`.
    #[value(name = "jetstream")]
    #[serde(rename = "jetstream")]
    JetStream,
}

/// The default segment size of the file store.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `eventbus serve` flags. Each has an `EVENTBUS_*` variable; unset ones fall back to the
/// `--config` file, then to the defaults of [`ServerConfig`]. Sizes take units (`256MiB`, see
/// [`parse_size`]), durations humantime's forms (`500ms`, `7d`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys as the flags, with underscores).
    #[arg(long, env = "EVENTBUS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on: `IP:PORT`, or `HOST:PORT` resolved once at start-up
    /// (`localhost:50051`) [default: 127.0.0.1:50051].
    #[arg(long, env = "EVENTBUS_LISTEN", value_parser = parse_listen)]
    pub listen: Option<SocketAddr>,
    /// Events kept for replay [default: 1000000].
    #[arg(long, env = "EVENTBUS_RETENTION_MAX_EVENTS")]
    pub retention_max_events: Option<u64>,
    /// Bytes of events kept for replay, e.g. `256MiB` [default: 256MiB].
    #[arg(long, env = "EVENTBUS_RETENTION_MAX_BYTES", value_parser = parse_size)]
    pub retention_max_bytes: Option<u64>,
    /// Oldest events kept for replay, e.g. `7d` [default: no limit].
    #[arg(long, env = "EVENTBUS_RETENTION_MAX_AGE", value_parser = humantime::parse_duration)]
    pub retention_max_age: Option<Duration>,
    /// Where the log lives: `file` (durable segment files), `memory`, or `jetstream` (a NATS
    /// JetStream stream several bus nodes share) [default: file].
    #[arg(long, env = "EVENTBUS_STORAGE", value_enum)]
    pub storage: Option<StorageKind>,
    /// NATS servers for `--storage jetstream`, comma-separated (`nats://h1:4222,nats://h2:4222`)
    /// [default: nats://127.0.0.1:4222].
    #[arg(long, env = "EVENTBUS_NATS_URL", value_delimiter = ',')]
    pub nats_url: Option<Vec<String>>,
    /// The JetStream stream that holds the log; its subjects are `<NAME>.>` [default: EVENTBUS].
    #[arg(long, env = "EVENTBUS_JETSTREAM_STREAM")]
    pub jetstream_stream: Option<String>,
    /// Replicas of the stream: 1 on one NATS server, 3 in a NATS cluster [default: 1].
    #[arg(long, env = "EVENTBUS_JETSTREAM_REPLICAS")]
    pub jetstream_replicas: Option<usize>,
    /// Directory of the file store [default: ./eventbus-data].
    #[arg(long, env = "EVENTBUS_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// When the file store syncs: `always` (before acknowledging), `interval:<ms>` or `never`
    /// [default: always].
    #[arg(long, env = "EVENTBUS_FSYNC")]
    pub fsync: Option<FsyncPolicy>,
    /// Size at which the file store starts a new segment file [default: 64MiB].
    #[arg(long, env = "EVENTBUS_SEGMENT_BYTES", value_parser = parse_size)]
    pub segment_bytes: Option<u64>,
    /// Events queued per live subscriber; a subscriber with a full queue catches up from the
    /// log [default: 8192].
    #[arg(long, env = "EVENTBUS_SUBSCRIBER_QUEUE_SIZE")]
    pub subscriber_queue_size: Option<usize>,
    /// Bytes of events queued per live subscriber (and read per replay step) [default: 8MiB].
    #[arg(long, env = "EVENTBUS_SUBSCRIBER_QUEUE_BYTES", value_parser = parse_size_usize)]
    pub subscriber_queue_bytes: Option<usize>,
    /// Bytes of events queued for all live subscribers together; past it subscribers catch up
    /// from the log [default: 256MiB].
    #[arg(long, env = "EVENTBUS_DELIVERY_BUFFER_BYTES", value_parser = parse_size_usize)]
    pub delivery_buffer_bytes: Option<usize>,
    /// Sequences a subscriber catching up from the log may be behind the head before it is
    /// ended [default: no limit].
    #[arg(long, env = "EVENTBUS_MAX_SUBSCRIBER_LAG")]
    pub max_subscriber_lag: Option<u64>,
    /// Largest event data [default: 1MiB].
    #[arg(long, env = "EVENTBUS_MAX_EVENT_DATA_BYTES", value_parser = parse_size_usize)]
    pub max_event_data_bytes: Option<usize>,
    /// Most events in one publish batch [default: 10000].
    #[arg(long, env = "EVENTBUS_MAX_BATCH_EVENTS")]
    pub max_batch_events: Option<usize>,
    /// Largest gRPC message [default: 16MiB].
    #[arg(long, env = "EVENTBUS_MAX_MESSAGE_BYTES", value_parser = parse_size_usize)]
    pub max_message_bytes: Option<usize>,
    /// Query timeout when a query names none, e.g. `5s` [default: 5s].
    #[arg(long, env = "EVENTBUS_DEFAULT_QUERY_TIMEOUT", value_parser = humantime::parse_duration)]
    pub default_query_timeout: Option<Duration>,
    /// Longest a query may wait [default: 60s].
    #[arg(long, env = "EVENTBUS_MAX_QUERY_TIMEOUT", value_parser = humantime::parse_duration)]
    pub max_query_timeout: Option<Duration>,
    /// Idempotent publish window: a (source, id) seen within it is not stored again; `0s` turns
    /// it off [default: 2m].
    #[arg(long, env = "EVENTBUS_DEDUPE_WINDOW", value_parser = humantime::parse_duration)]
    pub dedupe_window: Option<Duration>,
    /// Most (source, id) pairs remembered for idempotent publish [default: 1000000].
    #[arg(long, env = "EVENTBUS_DEDUPE_MAX_ENTRIES")]
    pub dedupe_max_entries: Option<usize>,
    /// Forget a topic's counters, a topology edge, an ended subscription or a member-less
    /// MANUAL-ack group unused this long [default: 1h].
    #[arg(long, env = "EVENTBUS_NAMES_IDLE_AFTER", value_parser = humantime::parse_duration)]
    pub names_idle_after: Option<Duration>,
    /// Most topics, and most topology edges, tracked at once [default: 100000].
    #[arg(long, env = "EVENTBUS_MAX_NAMES")]
    pub max_names: Option<usize>,
    /// Grace period for in-flight calls at shutdown [default: 10s].
    #[arg(long, env = "EVENTBUS_SHUTDOWN_GRACE", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Option<Duration>,
    /// HTTP/2 keepalive ping interval [default: 30s].
    #[arg(long, env = "EVENTBUS_KEEPALIVE_INTERVAL", value_parser = humantime::parse_duration)]
    pub keepalive_interval: Option<Duration>,
    /// How long a keepalive ping may go unanswered [default: 10s].
    #[arg(long, env = "EVENTBUS_KEEPALIVE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: Option<Duration>,
    /// Longest a unary request, or one message of a stream, may take to arrive once started
    /// [default: 30s].
    #[arg(long, env = "EVENTBUS_RECEIVE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub receive_timeout: Option<Duration>,
    /// Bytes of partly received requests held at once, across all connections
    /// [default: 256MiB].
    #[arg(long, env = "EVENTBUS_RECEIVE_BUDGET_BYTES", value_parser = parse_size_usize)]
    pub receive_budget_bytes: Option<usize>,
    /// HTTP/2 streams one connection may have open at once [default: 4096].
    #[arg(long, env = "EVENTBUS_MAX_CONCURRENT_STREAMS")]
    pub max_concurrent_streams: Option<u32>,
    /// Open connections at most [default: the open-file limit less a quarter of it, at most
    /// 1024, kept for files].
    #[arg(long, env = "EVENTBUS_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// How long a new connection may send nothing before it is closed [default: 10s].
    #[arg(long, env = "EVENTBUS_HANDSHAKE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Option<Duration>,
    /// Address of the admin HTTP listener serving `/metrics` (Prometheus), `/healthz`, `/readyz`
    /// and the dashboard (`/`), e.g. `127.0.0.1:9090`; empty turns it off [default: off].
    #[arg(long, env = "EVENTBUS_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// PEM certificate chain (leaf first) for TLS on the gRPC and admin listeners; needs
    /// `--tls-key`. Reloaded on SIGHUP or when the file changes [default: plaintext].
    #[arg(long, env = "EVENTBUS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "EVENTBUS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates for mutual TLS: a client certificate must chain to one of them
    /// (a client without one may still connect; authentication decides) [default: no client
    /// certificates asked for].
    #[arg(long, env = "EVENTBUS_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Log level or filter (as RUST_LOG), e.g. `info` or `eventbus=debug` [default: info].
    #[arg(long, env = "EVENTBUS_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log format [default: text].
    #[arg(long, env = "EVENTBUS_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// OTLP/gRPC endpoint to export traces to (an OpenTelemetry Collector, Jaeger, Tempo), e.g.
    /// `http://127.0.0.1:4317`: one span per published event that carries trace context
    /// [default: off].
    #[arg(long, env = "EVENTBUS_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// `nats_url` in the config file: one string with commas, or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum NatsUrls {
    One(String),
    Many(Vec<String>),
}

impl NatsUrls {
    fn into_list(self) -> Vec<String> {
        match self {
            NatsUrls::One(text) => text.split(',').map(str::to_owned).collect(),
            NatsUrls::Many(list) => list,
        }
    }
}

/// The `--config` file: the same settings as the flags, all optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(default, deserialize_with = "listen_serde_opt")]
    listen: Option<SocketAddr>,
    retention_max_events: Option<u64>,
    #[serde(default, with = "size_serde_opt")]
    retention_max_bytes: Option<u64>,
    #[serde(default, with = "humantime_serde_opt")]
    retention_max_age: Option<Duration>,
    storage: Option<StorageKind>,
    nats_url: Option<NatsUrls>,
    jetstream_stream: Option<String>,
    jetstream_replicas: Option<usize>,
    data_dir: Option<PathBuf>,
    fsync: Option<String>,
    #[serde(default, with = "size_serde_opt")]
    segment_bytes: Option<u64>,
    subscriber_queue_size: Option<usize>,
    #[serde(default, with = "size_serde_opt")]
    subscriber_queue_bytes: Option<usize>,
    #[serde(default, with = "size_serde_opt")]
    delivery_buffer_bytes: Option<usize>,
    max_subscriber_lag: Option<u64>,
    #[serde(default, with = "size_serde_opt")]
    max_event_data_bytes: Option<usize>,
    max_batch_events: Option<usize>,
    #[serde(default, with = "size_serde_opt")]
    max_message_bytes: Option<usize>,
    #[serde(default, with = "humantime_serde_opt")]
    default_query_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    max_query_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    dedupe_window: Option<Duration>,
    dedupe_max_entries: Option<usize>,
    #[serde(default, with = "humantime_serde_opt")]
    names_idle_after: Option<Duration>,
    max_names: Option<usize>,
    #[serde(default, with = "humantime_serde_opt")]
    shutdown_grace: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    keepalive_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    keepalive_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    receive_timeout: Option<Duration>,
    #[serde(default, with = "size_serde_opt")]
    receive_budget_bytes: Option<usize>,
    max_concurrent_streams: Option<u32>,
    max_connections: Option<usize>,
    #[serde(default, with = "humantime_serde_opt")]
    handshake_timeout: Option<Duration>,
    admin_listen: Option<String>,
    #[serde(default)]
    principals: Vec<crate::auth::PrincipalConfig>,
    #[serde(default)]
    limits: crate::limits::LimitsConfig,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    otlp_endpoint: Option<String>,
}

/// Durations in the TOML file are written as humans write them: `"5s"`, `"250ms"`.
/// A size in bytes, with or without a unit: `268435456`, `256MiB`, `1.5 GB`, `64k`. IEC units
/// (`KiB`, `MiB`, `GiB`, ...) are powers of 1024, SI units (`KB`/`k`, `MB`/`m`, ...) powers of
/// 1000; read by the `bytesize` crate.
///
/// Errors: text that is neither a number of bytes nor a number and a unit it knows.
pub fn parse_size(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|error| {
            format!("{error} (a size is bytes, or a number and a unit: 256MiB, 1.5GB, 64k)")
        })
}

/// [`parse_size`] for a size held in memory, which must fit a `usize`.
pub fn parse_size_usize(text: &str) -> Result<usize, String> {
    let bytes = parse_size(text)?;
    usize::try_from(bytes).map_err(|_| format!("{bytes} bytes does not fit this machine"))
}

/// A size in the config file: an integer of bytes, or a string [`parse_size`] reads.
mod size_serde_opt {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }

    pub fn deserialize<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<u64>,
    {
        let Some(size) = Option::<Size>::deserialize(d)? else {
            return Ok(None);
        };
        let bytes = match size {
            Size::Bytes(bytes) => bytes,
            Size::Text(text) => super::parse_size(&text).map_err(D::Error::custom)?,
        };
        T::try_from(bytes)
            .map(Some)
            .map_err(|_| D::Error::custom(format!("{bytes} bytes does not fit this machine")))
    }
}

mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text: Option<String> = Option::deserialize(d)?;
        text.map(|t| humantime::parse_duration(&t).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// The log settings, which the binary applies before anything else runs.
#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
    /// Where traces are exported over OTLP/gRPC ([`crate::telemetry`]); `None`: off.
    pub otlp_endpoint: Option<String>,
}

impl ServeArgs {
    /// Merges flags and environment (already in `self`) over the config file over defaults, and
    /// checks the result.
    pub fn resolve(&self) -> Result<(ServerConfig, LogConfig), ConfigError> {
        let file = match &self.config {
            Some(path) => read_config_file(path)?,
            None => ConfigFile::default(),
        };
        self.resolve_with(file)
    }

    /// [`ServeArgs::resolve`] with the file already parsed.
    fn resolve_with(&self, file: ConfigFile) -> Result<(ServerConfig, LogConfig), ConfigError> {
        let defaults = ServerConfig::default();
        let bus_defaults = &defaults.bus;
        let bus = BusConfig {
            retention_max_events: self
                .retention_max_events
                .or(file.retention_max_events)
                .unwrap_or(bus_defaults.retention_max_events),
            retention_max_bytes: self
                .retention_max_bytes
                .or(file.retention_max_bytes)
                .unwrap_or(bus_defaults.retention_max_bytes),
            retention_max_age: self.retention_max_age.or(file.retention_max_age),
            subscriber_queue_size: self
                .subscriber_queue_size
                .or(file.subscriber_queue_size)
                .unwrap_or(bus_defaults.subscriber_queue_size),
            subscriber_queue_bytes: self
                .subscriber_queue_bytes
                .or(file.subscriber_queue_bytes)
                .unwrap_or(bus_defaults.subscriber_queue_bytes),
            delivery_buffer_bytes: self
                .delivery_buffer_bytes
                .or(file.delivery_buffer_bytes)
                .unwrap_or(bus_defaults.delivery_buffer_bytes),
            max_subscriber_lag: self.max_subscriber_lag.or(file.max_subscriber_lag),
            max_event_data_bytes: self
                .max_event_data_bytes
                .or(file.max_event_data_bytes)
                .unwrap_or(bus_defaults.max_event_data_bytes),
            max_batch_events: self
                .max_batch_events
                .or(file.max_batch_events)
                .unwrap_or(bus_defaults.max_batch_events),
            max_message_bytes: self
                .max_message_bytes
                .or(file.max_message_bytes)
                .unwrap_or(bus_defaults.max_message_bytes),
            default_query_timeout: self
                .default_query_timeout
                .or(file.default_query_timeout)
                .unwrap_or(bus_defaults.default_query_timeout),
            max_query_timeout: self
                .max_query_timeout
                .or(file.max_query_timeout)
                .unwrap_or(bus_defaults.max_query_timeout),
            dedupe_window: self
                .dedupe_window
                .or(file.dedupe_window)
                .unwrap_or(bus_defaults.dedupe_window),
            dedupe_max_entries: self
                .dedupe_max_entries
                .or(file.dedupe_max_entries)
                .unwrap_or(bus_defaults.dedupe_max_entries),
            names_idle_after: self
                .names_idle_after
                .or(file.names_idle_after)
                .unwrap_or(bus_defaults.names_idle_after),
            max_names: self
                .max_names
                .or(file.max_names)
                .unwrap_or(bus_defaults.max_names),
        };
        bus.validate()?;
        let file_fsync = file
            .fsync
            .as_deref()
            .map(|text| {
                text.parse::<FsyncPolicy>()
                    .map_err(|rule| ConfigError::Invalid {
                        setting: "fsync",
                        rule,
                    })
            })
            .transpose()?;
        let storage = match self.storage.or(file.storage).unwrap_or(StorageKind::File) {
            StorageKind::Memory => StorageConfig::Memory,
            StorageKind::JetStream => {
                let urls = self
                    .nats_url
                    .clone()
                    .or(file.nats_url.map(NatsUrls::into_list))
                    .unwrap_or_else(|| vec!["nats://127.0.0.1:4222".to_owned()]);
                let urls: Vec<String> = urls
                    .iter()
                    .map(|url| url.trim().to_owned())
                    .filter(|url| !url.is_empty())
                    .collect();
                if urls.is_empty() {
                    return Err(ConfigError::Invalid {
                        setting: "nats_url",
                        rule: "must name at least one NATS server".into(),
                    });
                }
                let stream = self
                    .jetstream_stream
                    .clone()
                    .or(file.jetstream_stream)
                    .unwrap_or_else(|| DEFAULT_JETSTREAM_STREAM.to_owned());
                if stream.is_empty()
                    || !stream
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                {
                    return Err(ConfigError::Invalid {
                        setting: "jetstream_stream",
                        rule: format!(
                            "{stream:?} must be letters, digits, `_` or `-` (it is also the \
                             subject prefix)"
                        ),
                    });
                }
                let replicas = self
                    .jetstream_replicas
                    .or(file.jetstream_replicas)
                    .unwrap_or(1);
                if !(1..=5).contains(&replicas) {
                    return Err(ConfigError::Invalid {
                        setting: "jetstream_replicas",
                        rule: format!("{replicas} must be from 1 to 5 (JetStream's limit)"),
                    });
                }
                StorageConfig::JetStream {
                    urls,
                    stream,
                    replicas,
                }
            }
            StorageKind::File => StorageConfig::File {
                data_dir: self
                    .data_dir
                    .clone()
                    .or(file.data_dir)
                    .unwrap_or_else(|| PathBuf::from("eventbus-data")),
                fsync: self.fsync.or(file_fsync).unwrap_or(FsyncPolicy::Always),
                segment_bytes: self
                    .segment_bytes
                    .or(file.segment_bytes)
                    .unwrap_or(DEFAULT_SEGMENT_BYTES),
            },
        };
        if let StorageConfig::File { segment_bytes, .. } = &storage {
            if *segment_bytes < 4096 {
                return Err(ConfigError::Invalid {
                    setting: "segment_bytes",
                    rule: "must be at least 4096".into(),
                });
            }
        }
        let server = ServerConfig {
            listen: self.listen.or(file.listen).unwrap_or(defaults.listen),
            bus,
            storage,
            shutdown_grace: self
                .shutdown_grace
                .or(file.shutdown_grace)
                .unwrap_or(defaults.shutdown_grace),
            keepalive_interval: self
                .keepalive_interval
                .or(file.keepalive_interval)
                .unwrap_or(defaults.keepalive_interval),
            keepalive_timeout: self
                .keepalive_timeout
                .or(file.keepalive_timeout)
                .unwrap_or(defaults.keepalive_timeout),
            receive_timeout: self
                .receive_timeout
                .or(file.receive_timeout)
                .unwrap_or(defaults.receive_timeout),
            receive_budget_bytes: self
                .receive_budget_bytes
                .or(file.receive_budget_bytes)
                .unwrap_or(defaults.receive_budget_bytes),
            max_concurrent_streams: self
                .max_concurrent_streams
                .or(file.max_concurrent_streams)
                .unwrap_or(defaults.max_concurrent_streams),
            max_connections: self.max_connections.or(file.max_connections),
            handshake_timeout: self
                .handshake_timeout
                .or(file.handshake_timeout)
                .unwrap_or(defaults.handshake_timeout),
            admin_listen: parse_admin_listen(self.admin_listen.clone().or(file.admin_listen))?,
            auth: crate::auth::AuthConfig {
                principals: file.principals,
                limits: file.limits,
            },
            config_file: self.config.clone(),
            tls: tls_config(
                self.tls_cert.clone().or(file.tls_cert),
                self.tls_key.clone().or(file.tls_key),
                self.tls_client_ca.clone().or(file.tls_client_ca),
            )?,
        };
        // Compiled once here so a bad principal stops the start with the entry named.
        crate::auth::Auth::new(&server.auth, crate::metrics::Metrics::new())?;
        server.validate_receiving()?;
        let log = LogConfig {
            level: self
                .log_level
                .clone()
                .or(file.log_level)
                .unwrap_or_else(|| "info".to_owned()),
            format: self.log_format.or(file.log_format).unwrap_or_default(),
            otlp_endpoint: parse_otlp_endpoint(self.otlp_endpoint.clone().or(file.otlp_endpoint))?,
        };
        Ok((server, log))
    }
}

impl ServerConfig {
    /// Refuses receive limits that no full-size message could pass.
    fn validate_receiving(&self) -> Result<(), ConfigError> {
        let invalid = |setting, rule: String| Err(ConfigError::Invalid { setting, rule });
        if self.receive_timeout.is_zero() {
            return invalid("receive_timeout", "must be more than 0s".into());
        }
        if self.receive_budget_bytes < self.bus.max_message_bytes {
            return invalid(
                "receive_budget_bytes",
                format!(
                    "must be at least max_message_bytes ({}) so one full-size message fits",
                    self.bus.max_message_bytes
                ),
            );
        }
        if self.max_concurrent_streams == 0 {
            return invalid("max_concurrent_streams", "must be at least 1".into());
        }
        if self.max_connections == Some(0) {
            return invalid("max_connections", "must be at least 1".into());
        }
        if self.handshake_timeout.is_zero() {
            return invalid("handshake_timeout", "must be more than 0s".into());
        }
        Ok(())
    }
}

/// `admin_listen`: an address as [`parse_listen`] takes it, or empty (or unset) for off.
fn parse_admin_listen(text: Option<String>) -> Result<Option<SocketAddr>, ConfigError> {
    match text.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => parse_listen(text)
            .map(Some)
            .map_err(|rule| ConfigError::Invalid {
                setting: "admin_listen",
                rule: format!("{rule} (empty: off)"),
            }),
    }
}

/// `otlp_endpoint`: an `http://` or `https://` URL with a host (`http://collector:4317`), or
/// empty (or unset) for off.
fn parse_otlp_endpoint(text: Option<String>) -> Result<Option<String>, ConfigError> {
    let text = match text.as_deref().map(str::trim) {
        None | Some("") => return Ok(None),
        Some(text) => text,
    };
    let invalid = |rule: &str| ConfigError::Invalid {
        setting: "otlp_endpoint",
        rule: format!("{rule}, e.g. http://127.0.0.1:4317 (empty: off); got {text:?}"),
    };
    let uri: tonic::transport::Uri = text.parse().map_err(|_| invalid("must be a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(invalid("must start with http:// or https://"));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(invalid("must name a host"));
    }
    Ok(Some(text.to_owned()))
}

/// A listen address: `IP:PORT` (`0.0.0.0:50051`, `[::]:50051`), or `HOST:PORT` resolved now
/// (`localhost:50051`), taking the first IPv4 address the name has, else its first address
/// (a listener binds one address).
///
/// Errors: no port, or a name that does not resolve.
pub fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let example = "an address such as 127.0.0.1:50051 or localhost:50051";
    if text
        .rsplit_once(':')
        .is_none_or(|(_, port)| port.parse::<u16>().is_err())
    {
        return Err(format!("{text:?} is not {example} (a port is needed)"));
    }
    let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(text)
        .map_err(|error| format!("{text:?} is not {example}: {error}"))?
        .collect();
    addrs
        .iter()
        .find(|addr| addr.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| format!("{text:?} resolves to no address"))
}

/// `listen` in the config file: a string [`parse_listen`] reads.
fn listen_serde_opt<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    text.map(|text| parse_listen(&text).map_err(serde::de::Error::custom))
        .transpose()
}

/// The principals and limits of the config file at `path`, as a reload applies them (the rest
/// of the file needs a restart).
///
/// # Errors
/// The file cannot be read or parsed ([`ConfigError::Read`], [`ConfigError::Parse`]).
pub fn read_auth_config(path: &Path) -> Result<crate::auth::AuthConfig, ConfigError> {
    let file = read_config_file(path)?;
    Ok(crate::auth::AuthConfig {
        principals: file.principals,
        limits: file.limits,
    })
}

/// The TLS files: a certificate and its key together or neither; a client CA only with them.
fn tls_config(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
) -> Result<Option<TlsConfig>, ConfigError> {
    let invalid = |setting, rule: &str| {
        Err(ConfigError::Invalid {
            setting,
            rule: rule.to_owned(),
        })
    };
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsConfig {
            cert,
            key,
            client_ca,
        })),
        (Some(_), None) => invalid("tls_key", "--tls-key is required with --tls-cert"),
        (None, Some(_)) => invalid("tls_cert", "--tls-cert is required with --tls-key"),
        (None, None) if client_ca.is_some() => invalid(
            "tls_client_ca",
            "--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS first)",
        ),
        (None, None) => Ok(None),
    }
}

/// Parses and checks the text of a config file as `--config` would, with no flags or environment
/// over it: the same TOML parsing and the same checks, on a string. The path only names the
/// file in errors. It exists so the parser can be fuzzed and property-tested without files
/// (`fuzz/fuzz_targets/config_file.rs`); whatever the text, it returns a value, never panics.
pub fn parse_config_text(
    text: &str,
    path: &Path,
) -> Result<(ServerConfig, LogConfig), ConfigError> {
    ServeArgs::default().resolve_with(parse_config_file(text, path)?)
}

fn read_config_file(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_config_file(&text, path)
}

fn parse_config_file(text: &str, path: &Path) -> Result<ConfigFile, ConfigError> {
    toml::from_str(text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let (server, log) = ServeArgs::default().resolve().unwrap();
        assert_eq!(
            server,
            ServerConfig {
                storage: StorageConfig::File {
                    data_dir: PathBuf::from("eventbus-data"),
                    fsync: FsyncPolicy::Always,
                    segment_bytes: DEFAULT_SEGMENT_BYTES,
                },
                ..ServerConfig::default()
            }
        );
        assert_eq!(log.level, "info");
    }

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:6000\"\nsubscriber_queue_size = 10\nmax_query_timeout = \"2m\"\n\
             fsync = \"interval:50\"\nstorage = \"file\"\nnames_idle_after = \"10m\"\n\
             max_names = 500\nmax_subscriber_lag = 5000\nsubscriber_queue_bytes = 1048576\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            subscriber_queue_size: Some(20),
            ..ServeArgs::default()
        };
        let (server, _) = args.resolve().unwrap();
        assert_eq!(server.listen, "127.0.0.1:6000".parse().unwrap());
        assert_eq!(server.bus.subscriber_queue_size, 20);
        assert_eq!(server.bus.max_subscriber_lag, Some(5000));
        assert_eq!(server.bus.subscriber_queue_bytes, 1024 * 1024);
        assert_eq!(server.bus.max_query_timeout, Duration::from_secs(120));
        assert_eq!(server.bus.names_idle_after, Duration::from_secs(600));
        assert_eq!(server.bus.max_names, 500);
        let StorageConfig::File { fsync, .. } = server.storage else {
            panic!("file storage expected");
        };
        assert_eq!(fsync, FsyncPolicy::Interval(Duration::from_millis(50)));
    }

    #[test]
    fn listen_takes_a_host_name() {
        assert_eq!(
            parse_listen("0.0.0.0:50051"),
            Ok("0.0.0.0:50051".parse().unwrap())
        );
        assert_eq!(parse_listen("[::1]:7"), Ok("[::1]:7".parse().unwrap()));
        assert_eq!(
            parse_listen("localhost:50051"),
            Ok("127.0.0.1:50051".parse().unwrap())
        );
        assert!(parse_listen("localhost").unwrap_err().contains("port"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.toml");
        std::fs::write(&path, "listen = \"localhost:6001\"\n").unwrap();
        let (server, _) = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(server.listen, "127.0.0.1:6001".parse().unwrap());
    }

    #[test]
    fn sizes_take_units_in_flags_and_in_the_file() {
        assert_eq!(parse_size("268435456"), Ok(256 * 1024 * 1024));
        assert_eq!(parse_size("256MiB"), Ok(256 * 1024 * 1024));
        assert_eq!(parse_size("256 MiB"), Ok(256 * 1024 * 1024));
        assert_eq!(parse_size("1.5GB"), Ok(1_500_000_000));
        assert_eq!(parse_size("64k"), Ok(64_000));
        let error = parse_size("lots").unwrap_err();
        assert!(error.contains("256MiB"), "{error}");
        assert!(parse_size("12 parsecs").is_err());

        let parsed = <crate::cli::Cli as clap::Parser>::try_parse_from([
            "eventbus",
            "serve",
            "--retention-max-bytes",
            "1GiB",
            "--subscriber-queue-bytes",
            "4MiB",
        ])
        .unwrap();
        let crate::cli::Command::Serve(cli) = parsed.command else {
            panic!("not serve")
        };
        assert_eq!(cli.retention_max_bytes, Some(1 << 30));
        assert_eq!(cli.subscriber_queue_bytes, Some(4 << 20));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.toml");
        std::fs::write(
            &path,
            "retention_max_bytes = \"512MiB\"\nsegment_bytes = 1048576\n\
             delivery_buffer_bytes = \"300 MiB\"\n",
        )
        .unwrap();
        let (server, _) = ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(server.bus.retention_max_bytes, 512 << 20);
        assert_eq!(server.bus.delivery_buffer_bytes, 300 << 20);
        let StorageConfig::File { segment_bytes, .. } = server.storage else {
            panic!("file storage expected");
        };
        assert_eq!(segment_bytes, 1 << 20);
        std::fs::write(&path, "segment_bytes = \"big\"\n").unwrap();
        let error = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(error.contains("segment_bytes"), "{error}");
    }

    #[test]
    fn the_otlp_endpoint_is_an_http_url_from_flag_or_file_and_off_when_empty() {
        assert_eq!(
            ServeArgs::default().resolve().unwrap().1.otlp_endpoint,
            None
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.toml");
        std::fs::write(&path, "otlp_endpoint = \"http://collector:4317\"\n").unwrap();
        let from_file = ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        };
        assert_eq!(
            from_file.resolve().unwrap().1.otlp_endpoint.as_deref(),
            Some("http://collector:4317")
        );
        let off = ServeArgs {
            config: Some(path),
            otlp_endpoint: Some(" ".into()),
            ..ServeArgs::default()
        };
        assert_eq!(off.resolve().unwrap().1.otlp_endpoint, None);
        for (bad, rule) in [
            ("collector:4317", "http://"),
            ("grpc://collector:4317", "http://"),
            ("http://", "URL"),
        ] {
            let args = ServeArgs {
                otlp_endpoint: Some(bad.into()),
                ..ServeArgs::default()
            };
            let error = args.resolve().unwrap_err().to_string();
            assert!(error.starts_with("otlp_endpoint:"), "{bad}: {error}");
            assert!(error.contains(rule), "{bad}: {error}");
        }
    }

    #[test]
    fn the_admin_listener_is_off_unless_given_and_empty_turns_it_off() {
        assert_eq!(ServeArgs::default().resolve().unwrap().0.admin_listen, None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.toml");
        std::fs::write(&path, "admin_listen = \"127.0.0.1:9191\"\n").unwrap();
        let from_file = ServeArgs {
            config: Some(path.clone()),
            ..ServeArgs::default()
        };
        assert_eq!(
            from_file.resolve().unwrap().0.admin_listen,
            Some("127.0.0.1:9191".parse().unwrap())
        );
        let off = ServeArgs {
            config: Some(path),
            admin_listen: Some(String::new()),
            ..ServeArgs::default()
        };
        assert_eq!(off.resolve().unwrap().0.admin_listen, None);
        let bad = ServeArgs {
            admin_listen: Some("localhost".into()),
            ..ServeArgs::default()
        };
        let error = bad.resolve().unwrap_err().to_string();
        assert!(error.starts_with("admin_listen:"), "{error}");
        assert!(error.contains("port"), "{error}");
        let named = ServeArgs {
            admin_listen: Some("localhost:9191".into()),
            ..ServeArgs::default()
        };
        assert_eq!(
            named.resolve().unwrap().0.admin_listen,
            Some("127.0.0.1:9191".parse().unwrap())
        );
    }

    #[test]
    fn tls_files_come_from_flags_or_the_file_and_go_together() {
        assert_eq!(ServeArgs::default().resolve().unwrap().0.tls, None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.toml");
        std::fs::write(
            &path,
            "tls_cert = \"/etc/bus/cert.pem\"\ntls_key = \"/etc/bus/key.pem\"\n\
             tls_client_ca = \"/etc/bus/ca.pem\"\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            tls_cert: Some("/run/cert.pem".into()),
            ..ServeArgs::default()
        };
        assert_eq!(
            args.resolve().unwrap().0.tls,
            Some(TlsConfig {
                cert: "/run/cert.pem".into(),
                key: "/etc/bus/key.pem".into(),
                client_ca: Some("/etc/bus/ca.pem".into()),
            })
        );
        for (args, flag) in [
            (
                ServeArgs {
                    tls_cert: Some("c".into()),
                    ..ServeArgs::default()
                },
                "tls_key:",
            ),
            (
                ServeArgs {
                    tls_key: Some("k".into()),
                    ..ServeArgs::default()
                },
                "tls_cert:",
            ),
            (
                ServeArgs {
                    tls_client_ca: Some("ca".into()),
                    ..ServeArgs::default()
                },
                "tls_client_ca:",
            ),
        ] {
            let error = args.resolve().unwrap_err().to_string();
            assert!(error.starts_with(flag), "{error}");
        }
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.toml");
        std::fs::write(&path, "lisen = \"127.0.0.1:6000\"\n").unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        };
        let error = args.resolve().unwrap_err().to_string();
        assert!(error.contains("lisen"), "{error}");
    }

    #[test]
    fn contradictory_limits_are_refused_by_name() {
        let args = ServeArgs {
            max_message_bytes: Some(1024),
            ..ServeArgs::default()
        };
        let error = args.resolve().unwrap_err().to_string();
        assert!(error.starts_with("max_message_bytes:"), "{error}");
        let args = ServeArgs {
            subscriber_queue_size: Some(0),
            ..ServeArgs::default()
        };
        assert!(args
            .resolve()
            .unwrap_err()
            .to_string()
            .starts_with("subscriber_queue_size:"));
        let args = ServeArgs {
            max_names: Some(0),
            ..ServeArgs::default()
        };
        let error = args.resolve().unwrap_err().to_string();
        assert!(error.starts_with("max_names:"), "{error}");
        let args = ServeArgs {
            names_idle_after: Some(Duration::ZERO),
            ..ServeArgs::default()
        };
        let error = args.resolve().unwrap_err().to_string();
        assert!(error.starts_with("names_idle_after:"), "{error}");
        let args = ServeArgs {
            delivery_buffer_bytes: Some(1024),
            ..ServeArgs::default()
        };
        let error = args.resolve().unwrap_err().to_string();
        assert!(error.starts_with("delivery_buffer_bytes:"), "{error}");
        let args = ServeArgs {
            max_subscriber_lag: Some(0),
            ..ServeArgs::default()
        };
        let error = args.resolve().unwrap_err().to_string();
        assert!(error.starts_with("max_subscriber_lag:"), "{error}");
        let args = ServeArgs {
            receive_budget_bytes: Some(1024 * 1024),
            ..ServeArgs::default()
        };
        let error = args.resolve().unwrap_err().to_string();
        assert!(error.starts_with("receive_budget_bytes:"), "{error}");
    }
}
