//! Server configuration: one struct per concern, filled from flags, `EVENTBUS_*` environment
//! variables and an optional TOML file, in that order of precedence, then checked as a whole so
//! a bad combination is refused at start rather than discovered under load.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::broker::settings::{BusConfig, InvalidSetting, MESSAGE_OVERHEAD_BYTES};
use crate::store::FsyncPolicy;

/// A configuration that cannot work, named by its setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{setting}: {rule}")]
    Invalid { setting: &'static str, rule: String },
    /// A value one of the layers (flags, environment, file) gives that is not of the
    /// setting's kind, or a key no setting has; the message names the key and the layer.
    #[error("{0}")]
    Layer(String),
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

impl From<InvalidSetting> for ConfigError {
    fn from(invalid: InvalidSetting) -> Self {
        ConfigError::Invalid {
            setting: invalid.setting,
            rule: invalid.rule,
        }
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
    /// Where each setting's value came from ([`ServeArgs::resolve`]); empty for a
    /// configuration built in code. Reported by `GetServerInfo`.
    pub settings: Vec<SettingSource>,
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
            settings: Vec::new(),
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `eventbus serve` flags. Every setting can also come from the environment
/// (`EVENTBUS_<KEY>`, e.g. `EVENTBUS_RETENTION_MAX_BYTES`) and from the `--config` TOML file
/// (`<key>`, e.g. `retention_max_bytes`); a flag wins over the environment, which wins over the
/// file, which wins over the default ([`ServeArgs::resolve`], layered by figment). Sizes take
/// units (`256MiB`, see [`parse_size`]), durations as [`crate::timefmt`] reads them (`500ms`, `1h30m`, `7d`).
///
/// Serialized, it is the flags layer: only the flags given.
#[derive(Debug, Clone, Default, clap::Args, Serialize)]
#[command(
    after_help = "Every flag also reads EVENTBUS_<FLAG> (e.g. EVENTBUS_RETENTION_MAX_BYTES \
                        for --retention-max-bytes) and the --config file's key <flag> with \
                        underscores (retention_max_bytes). A flag wins over the environment, \
                        which wins over the file. `eventbus server info` shows where each value \
                        of a running bus came from."
)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (keys as the flags, with underscores), and
    /// `[[principals]]` and `[limits]` (SECURITY.md).
    #[arg(long, env = "EVENTBUS_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Address to listen on: `IP:PORT`, or `HOST:PORT` resolved once at start-up
    /// (`localhost:50051`) [default: 127.0.0.1:50051].
    #[arg(long, value_parser = parse_listen)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Events kept for replay [default: 1000000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_max_events: Option<u64>,
    /// Bytes of events kept for replay, e.g. `256MiB` [default: 256MiB].
    #[arg(long, value_parser = parse_size)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_max_bytes: Option<u64>,
    /// Oldest events kept for replay, e.g. `7d` [default: no limit].
    #[arg(long, value_parser = parse_duration)]
    #[serde(skip_serializing_if = "Option::is_none", with = "duration_serde_opt")]
    pub retention_max_age: Option<Duration>,
    /// Where the log lives: `file` (durable segment files), `memory`, or `jetstream` (a NATS
    /// JetStream stream several bus nodes share) [default: file].
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageKind>,
    /// NATS servers for `--storage jetstream`, comma-separated (`nats://h1:4222,nats://h2:4222`;
    /// also `EVENTBUS_NATS_URL`) [default: nats://127.0.0.1:4222].
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<Vec<String>>,
    /// The JetStream stream that holds the log; its subjects are `<NAME>.>` [default: EVENTBUS].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jetstream_stream: Option<String>,
    /// Replicas of the stream: 1 on one NATS server, 3 in a NATS cluster [default: 1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jetstream_replicas: Option<usize>,
    /// Directory of the file store [default: ./eventbus-data].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// When the file store syncs: `always` (before acknowledging), `interval:<duration>`
    /// (`interval:500ms`) or `never` [default: always].
    #[arg(long)]
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "serialize_display_opt"
    )]
    pub fsync: Option<FsyncPolicy>,
    /// Size at which the file store starts a new segment file [default: 64MiB].
    #[arg(long, value_parser = parse_size)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segment_bytes: Option<u64>,
    /// Events queued per live subscriber; a subscriber with a full queue catches up from the
    /// log [default: 8192].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscriber_queue_size: Option<usize>,
    /// Bytes of events queued per live subscriber (and read per replay step) [default: 8MiB].
    #[arg(long, value_parser = parse_size_usize)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscriber_queue_bytes: Option<usize>,
    /// Bytes of events queued for all live subscribers together; past it subscribers catch up
    /// from the log [default: 256MiB].
    #[arg(long, value_parser = parse_size_usize)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery_buffer_bytes: Option<usize>,
    /// Sequences a subscriber catching up from the log may be behind the head before it is
    /// ended [default: no limit].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_subscriber_lag: Option<u64>,
    /// Largest event data [default: 1MiB].
    #[arg(long, value_parser = parse_size_usize)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_event_data_bytes: Option<usize>,
    /// Most events in one publish batch [default: 10000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_batch_events: Option<usize>,
    /// Largest gRPC message [default: 16MiB].
    #[arg(long, value_parser = parse_size_usize)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_bytes: Option<usize>,
    /// Query timeout when a query names none, e.g. `5s` [default: 5s].
    #[arg(long, value_parser = parse_duration)]
    #[serde(skip_serializing_if = "Option::is_none", with = "duration_serde_opt")]
    pub default_query_timeout: Option<Duration>,
    /// Longest a query may wait [default: 60s].
    #[arg(long, value_parser = parse_duration)]
    #[serde(skip_serializing_if = "Option::is_none", with = "duration_serde_opt")]
    pub max_query_timeout: Option<Duration>,
    /// Idempotent publish window: a (source, id) seen within it is not stored again; `0s` turns
    /// it off [default: 2m].
    #[arg(long, value_parser = parse_duration)]
    #[serde(skip_serializing_if = "Option::is_none", with = "duration_serde_opt")]
    pub dedupe_window: Option<Duration>,
    /// Most (source, id) pairs remembered for idempotent publish [default: 1000000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedupe_max_entries: Option<usize>,
    /// Forget a topic's counters, a topology edge, an ended subscription or a member-less
    /// MANUAL-ack group unused this long [default: 1h].
    #[arg(long, value_parser = parse_duration)]
    #[serde(skip_serializing_if = "Option::is_none", with = "duration_serde_opt")]
    pub names_idle_after: Option<Duration>,
    /// Most topics, and most topology edges, tracked at once [default: 100000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_names: Option<usize>,
    /// Grace period for in-flight calls at shutdown [default: 10s].
    #[arg(long, value_parser = parse_duration)]
    #[serde(skip_serializing_if = "Option::is_none", with = "duration_serde_opt")]
    pub shutdown_grace: Option<Duration>,
    /// HTTP/2 keepalive ping interval [default: 30s].
    #[arg(long, value_parser = parse_duration)]
    #[serde(skip_serializing_if = "Option::is_none", with = "duration_serde_opt")]
    pub keepalive_interval: Option<Duration>,
    /// How long a keepalive ping may go unanswered [default: 10s].
    #[arg(long, value_parser = parse_duration)]
    #[serde(skip_serializing_if = "Option::is_none", with = "duration_serde_opt")]
    pub keepalive_timeout: Option<Duration>,
    /// Longest a unary request, or one message of a stream, may take to arrive once started
    /// [default: 30s].
    #[arg(long, value_parser = parse_duration)]
    #[serde(skip_serializing_if = "Option::is_none", with = "duration_serde_opt")]
    pub receive_timeout: Option<Duration>,
    /// Bytes of partly received requests held at once, across all connections
    /// [default: 256MiB].
    #[arg(long, value_parser = parse_size_usize)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub receive_budget_bytes: Option<usize>,
    /// HTTP/2 streams one connection may have open at once [default: 4096].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent_streams: Option<u32>,
    /// Open connections at most [default: the open-file limit less a quarter of it, at most
    /// 1024, kept for files].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// How long a new connection may send nothing before it is closed [default: 10s].
    #[arg(long, value_parser = parse_duration)]
    #[serde(skip_serializing_if = "Option::is_none", with = "duration_serde_opt")]
    pub handshake_timeout: Option<Duration>,
    /// Address of the admin HTTP listener serving `/metrics` (Prometheus), `/healthz`, `/readyz`
    /// and the dashboard (`/`), e.g. `127.0.0.1:9090`; empty turns it off [default: off].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<String>,
    /// PEM certificate chain (leaf first) for TLS on the gRPC and admin listeners; needs
    /// `--tls-key`. Reloaded on SIGHUP or when the file changes [default: plaintext].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `--tls-cert`.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates for mutual TLS: a client certificate must chain to one of them
    /// (a client without one may still connect; authentication decides) [default: no client
    /// certificates asked for].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca: Option<PathBuf>,
    /// Log level or filter (as RUST_LOG), e.g. `info` or `eventbus=debug` [default: info].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    /// Log format [default: text].
    #[arg(long, value_enum)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,
    /// OTLP/gRPC endpoint to export traces to (an OpenTelemetry Collector, Jaeger, Tempo), e.g.
    /// `http://127.0.0.1:4317`: one span per published event that carries trace context
    /// [default: off].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
}

/// Every setting of `eventbus serve` as the layers give it, before it is checked: one field per
/// setting, named by its config key (the flag is the key in kebab-case, the variable
/// `EVENTBUS_` and the key in upper case). Its [`Default`] is the defaults layer. Principals
/// and limits are not here: they come from the file alone ([`FileParts`]).
///
/// Adding a setting is a field here, a flag in [`ServeArgs`], and its use in
/// [`ServeArgs::resolve`]; the layering, the environment variable and the source report come
/// with the field.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Settings {
    listen: String,
    retention_max_events: u64,
    #[serde(with = "size_serde")]
    retention_max_bytes: u64,
    #[serde(default, with = "duration_serde_opt")]
    retention_max_age: Option<Duration>,
    storage: StorageKind,
    nats_url: NatsUrls,
    jetstream_stream: String,
    jetstream_replicas: usize,
    data_dir: PathBuf,
    fsync: String,
    #[serde(with = "size_serde")]
    segment_bytes: u64,
    subscriber_queue_size: usize,
    #[serde(with = "size_serde")]
    subscriber_queue_bytes: usize,
    #[serde(with = "size_serde")]
    delivery_buffer_bytes: usize,
    #[serde(default)]
    max_subscriber_lag: Option<u64>,
    #[serde(with = "size_serde")]
    max_event_data_bytes: usize,
    max_batch_events: usize,
    #[serde(with = "size_serde")]
    max_message_bytes: usize,
    #[serde(with = "duration_serde")]
    default_query_timeout: Duration,
    #[serde(with = "duration_serde")]
    max_query_timeout: Duration,
    #[serde(with = "duration_serde")]
    dedupe_window: Duration,
    dedupe_max_entries: usize,
    #[serde(with = "duration_serde")]
    names_idle_after: Duration,
    max_names: usize,
    #[serde(with = "duration_serde")]
    shutdown_grace: Duration,
    #[serde(with = "duration_serde")]
    keepalive_interval: Duration,
    #[serde(with = "duration_serde")]
    keepalive_timeout: Duration,
    #[serde(with = "duration_serde")]
    receive_timeout: Duration,
    #[serde(with = "size_serde")]
    receive_budget_bytes: usize,
    max_concurrent_streams: u32,
    #[serde(default)]
    max_connections: Option<usize>,
    #[serde(with = "duration_serde")]
    handshake_timeout: Duration,
    #[serde(default)]
    admin_listen: Option<String>,
    #[serde(default)]
    tls_cert: Option<PathBuf>,
    #[serde(default)]
    tls_key: Option<PathBuf>,
    #[serde(default)]
    tls_client_ca: Option<PathBuf>,
    log_level: String,
    log_format: LogFormat,
    #[serde(default)]
    otlp_endpoint: Option<String>,
    /// `[[principals]]`: only the file gives them (no flag or variable), so they are not a
    /// layered setting and never serialized.
    #[serde(skip_serializing)]
    principals: Vec<crate::auth::PrincipalConfig>,
    /// `[limits.connection]`, `[limits.principal]`: as `principals`.
    #[serde(skip_serializing)]
    limits: crate::limits::LimitsConfig,
}

impl Default for Settings {
    fn default() -> Self {
        let server = ServerConfig::default();
        let bus = server.bus;
        Settings {
            listen: server.listen.to_string(),
            retention_max_events: bus.retention_max_events,
            retention_max_bytes: bus.retention_max_bytes,
            retention_max_age: bus.retention_max_age,
            storage: StorageKind::File,
            nats_url: NatsUrls::One("nats://127.0.0.1:4222".to_owned()),
            jetstream_stream: DEFAULT_JETSTREAM_STREAM.to_owned(),
            jetstream_replicas: 1,
            data_dir: PathBuf::from("eventbus-data"),
            fsync: FsyncPolicy::Always.to_string(),
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            subscriber_queue_size: bus.subscriber_queue_size,
            subscriber_queue_bytes: bus.subscriber_queue_bytes,
            delivery_buffer_bytes: bus.delivery_buffer_bytes,
            max_subscriber_lag: bus.max_subscriber_lag,
            max_event_data_bytes: bus.max_event_data_bytes,
            max_batch_events: bus.max_batch_events,
            max_message_bytes: bus.max_message_bytes,
            default_query_timeout: bus.default_query_timeout,
            max_query_timeout: bus.max_query_timeout,
            dedupe_window: bus.dedupe_window,
            dedupe_max_entries: bus.dedupe_max_entries,
            names_idle_after: bus.names_idle_after,
            max_names: bus.max_names,
            shutdown_grace: server.shutdown_grace,
            keepalive_interval: server.keepalive_interval,
            keepalive_timeout: server.keepalive_timeout,
            receive_timeout: server.receive_timeout,
            receive_budget_bytes: server.receive_budget_bytes,
            max_concurrent_streams: server.max_concurrent_streams,
            max_connections: server.max_connections,
            handshake_timeout: server.handshake_timeout,
            admin_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            log_level: "info".to_owned(),
            log_format: LogFormat::default(),
            otlp_endpoint: None,
            principals: Vec::new(),
            limits: crate::limits::LimitsConfig::default(),
        }
    }
}

/// `nats_url`: one string with commas (as the flag and the variable give it), or a list (as
/// TOML may).
#[derive(Debug, Clone, Serialize, Deserialize)]
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

/// The keys of [`Settings`], in alphabetical order: what the environment layer reads and
/// what [`SettingSource`]s are reported for.
fn setting_keys() -> Vec<String> {
    match figment::value::Value::serialize(Settings::default()) {
        Ok(figment::value::Value::Dict(_, dict)) => dict.into_keys().collect(),
        _ => unreachable!("Settings serializes to a dict"),
    }
}

/// Where one setting's value came from, for `GetServerInfo` and `eventbus server info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingSource {
    /// The config key, e.g. `retention_max_bytes`.
    pub name: String,
    /// The value as the winning layer gave it (`256MiB`, `268435456`, `5s`); empty when unset.
    pub value: String,
    /// `default`, `flag --retention-max-bytes`, `env EVENTBUS_RETENTION_MAX_BYTES` or
    /// `file /etc/eventbus.toml`.
    pub source: String,
}

/// One layer of settings for figment: a dict and how its values are reported.
struct Layer {
    metadata: figment::Metadata,
    dict: figment::value::Dict,
}

impl Layer {
    /// A layer of `value`'s fields (a struct or a map), named `name`.
    fn of(name: &'static str, value: impl Serialize) -> Result<Layer, ConfigError> {
        let dict = match figment::value::Value::serialize(value) {
            Ok(figment::value::Value::Dict(_, dict)) => dict,
            Ok(_) => figment::value::Dict::new(),
            Err(error) => return Err(ConfigError::Layer(error.to_string())),
        };
        Ok(Layer {
            metadata: figment::Metadata::named(name),
            dict,
        })
    }
}

impl figment::Provider for Layer {
    fn metadata(&self) -> figment::Metadata {
        self.metadata.clone()
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Ok(figment::Profile::Default.collect(self.dict.clone()))
    }
}

/// The metadata names of the layers, as [`SettingSource::source`] reports them.
const DEFAULTS: &str = "default";
const FLAGS: &str = "flag";
const ENV: &str = "env";
const FILE: &str = "file";

/// The prefix of the settings' environment variables.
pub const ENV_PREFIX: &str = "EVENTBUS_";

/// What the `--config` file holds: the settings (a TOML table, checked against [`Settings`] when
/// layered) and the principals and limits, which only the file gives.
struct FileParts {
    settings: toml::Table,
    auth: crate::auth::AuthConfig,
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
    /// Layers the defaults, the `--config` file, the `EVENTBUS_*` environment and the flags
    /// (each over the one before), and checks the result as a whole.
    ///
    /// # Errors
    /// [`ConfigError::Read`] / [`ConfigError::Parse`] for a file that cannot be read or is not
    /// TOML (with the line and a caret); [`ConfigError::Layer`] for a value of the wrong kind
    /// or an unknown key, naming the key and the layer; [`ConfigError::Invalid`] for values
    /// that cannot work together, naming the setting.
    pub fn resolve(&self) -> Result<(ServerConfig, LogConfig), ConfigError> {
        let file = match &self.config {
            Some(path) => Some((path.clone(), read_config_file(path)?)),
            None => None,
        };
        let env = figment::providers::Env::prefixed(ENV_PREFIX).filter({
            let keys = setting_keys();
            move |key| keys.iter().any(|k| key == k.as_str())
        });
        self.resolve_with(file, Some(env))
    }

    /// [`ServeArgs::resolve`] with the file already parsed, and the environment layer given
    /// (none for [`parse_config_text`]).
    fn resolve_with(
        &self,
        file: Option<(PathBuf, FileParts)>,
        env: Option<figment::providers::Env>,
    ) -> Result<(ServerConfig, LogConfig), ConfigError> {
        let mut figment = figment::Figment::new().merge(Layer::of(DEFAULTS, Settings::default())?);
        let mut auth = crate::auth::AuthConfig::default();
        if let Some((path, parts)) = file {
            let mut layer = Layer::of(FILE, parts.settings)?;
            layer.metadata = layer.metadata.source(figment::Source::File(path));
            figment = figment.merge(layer);
            auth = parts.auth;
        }
        if let Some(env) = env {
            figment = figment.merge(env);
        }
        figment = figment.merge(Layer::of(FLAGS, self)?);
        let settings: Settings = figment.extract().map_err(layer_error)?;
        let sources = setting_sources(&figment);
        let log = LogConfig {
            level: settings.log_level.clone(),
            format: settings.log_format,
            otlp_endpoint: parse_otlp_endpoint(settings.otlp_endpoint.clone())?,
        };
        let mut server = settings.into_server(auth)?;
        server.config_file = self.config.clone();
        server.settings = sources;
        // Compiled once here so a bad principal stops the start with the entry named.
        crate::auth::Auth::new(&server.auth, crate::metrics::Metrics::new())?;
        server.validate_receiving()?;
        Ok((server, log))
    }
}

/// A figment error as one line naming the key and the layer it came from.
fn layer_error(error: figment::Error) -> ConfigError {
    let errors: Vec<String> = error
        .into_iter()
        .map(|error| {
            let key = error.path.join(".");
            let layer = error.metadata.as_ref().map(|m| describe_layer(m, &key));
            match (key.is_empty(), layer) {
                (false, Some(layer)) => format!("{key} ({layer}): {}", error.kind),
                (false, None) => format!("{key}: {}", error.kind),
                (true, _) => error.kind.to_string(),
            }
        })
        .collect();
    ConfigError::Layer(errors.join("; "))
}

/// How a layer is reported for `key`: `default`, `flag --key`, `env EVENTBUS_KEY`,
/// `file PATH`.
fn describe_layer(metadata: &figment::Metadata, key: &str) -> String {
    match &*metadata.name {
        DEFAULTS => DEFAULTS.to_owned(),
        FLAGS => format!("flag --{}", key.replace('_', "-")),
        FILE => match &metadata.source {
            Some(figment::Source::File(path)) => format!("file {}", path.display()),
            _ => FILE.to_owned(),
        },
        // figment's Env provider names itself "`EVENTBUS_` environment variable(s)".
        _ => format!("{ENV} {ENV_PREFIX}{}", key.to_ascii_uppercase()),
    }
}

/// Where each setting's value came from, and the value as that layer gave it.
fn setting_sources(figment: &figment::Figment) -> Vec<SettingSource> {
    setting_keys()
        .into_iter()
        .map(|key| {
            let value = figment.find_value(&key).ok();
            let source = value
                .as_ref()
                .and_then(|value| figment.get_metadata(value.tag()))
                .map_or_else(|| DEFAULTS.to_owned(), |m| describe_layer(m, &key));
            SettingSource {
                value: value.map(|value| render_value(&value)).unwrap_or_default(),
                name: key,
                source,
            }
        })
        .collect()
}

/// A layered value as text: strings as they are, lists comma-separated, unset as empty.
fn render_value(value: &figment::value::Value) -> String {
    use figment::value::Value;
    match value {
        Value::String(_, text) => text.clone(),
        Value::Char(_, c) => c.to_string(),
        Value::Bool(_, b) => b.to_string(),
        Value::Num(_, n) => match (n.to_u128(), n.to_i128()) {
            (Some(n), _) => n.to_string(),
            (None, Some(n)) => n.to_string(),
            (None, None) => n.to_f64().map(|n| n.to_string()).unwrap_or_default(),
        },
        Value::Empty(..) => String::new(),
        Value::Array(_, items) => items.iter().map(render_value).collect::<Vec<_>>().join(","),
        Value::Dict(_, dict) => dict
            .iter()
            .map(|(k, v)| format!("{k}={}", render_value(v)))
            .collect::<Vec<_>>()
            .join(","),
    }
}

impl Settings {
    /// The server's configuration from the layered settings, each checked by name.
    fn into_server(self, auth: crate::auth::AuthConfig) -> Result<ServerConfig, ConfigError> {
        let bus = BusConfig {
            retention_max_events: self.retention_max_events,
            retention_max_bytes: self.retention_max_bytes,
            retention_max_age: self.retention_max_age,
            subscriber_queue_size: self.subscriber_queue_size,
            subscriber_queue_bytes: self.subscriber_queue_bytes,
            delivery_buffer_bytes: self.delivery_buffer_bytes,
            max_subscriber_lag: self.max_subscriber_lag,
            max_event_data_bytes: self.max_event_data_bytes,
            max_batch_events: self.max_batch_events,
            max_message_bytes: self.max_message_bytes,
            default_query_timeout: self.default_query_timeout,
            max_query_timeout: self.max_query_timeout,
            dedupe_window: self.dedupe_window,
            dedupe_max_entries: self.dedupe_max_entries,
            names_idle_after: self.names_idle_after,
            max_names: self.max_names,
        };
        bus.validate()?;
        let storage = match self.storage {
            StorageKind::Memory => StorageConfig::Memory,
            StorageKind::JetStream => {
                let urls: Vec<String> = self
                    .nats_url
                    .into_list()
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
                let stream = self.jetstream_stream;
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
                let replicas = self.jetstream_replicas;
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
            StorageKind::File => {
                if self.segment_bytes < 4096 {
                    return Err(ConfigError::Invalid {
                        setting: "segment_bytes",
                        rule: "must be at least 4096".into(),
                    });
                }
                StorageConfig::File {
                    data_dir: self.data_dir,
                    fsync: self.fsync.parse().map_err(|rule| ConfigError::Invalid {
                        setting: "fsync",
                        rule,
                    })?,
                    segment_bytes: self.segment_bytes,
                }
            }
        };
        Ok(ServerConfig {
            listen: parse_listen(&self.listen).map_err(|rule| ConfigError::Invalid {
                setting: "listen",
                rule,
            })?,
            bus,
            storage,
            shutdown_grace: self.shutdown_grace,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
            receive_timeout: self.receive_timeout,
            receive_budget_bytes: self.receive_budget_bytes,
            max_concurrent_streams: self.max_concurrent_streams,
            max_connections: self.max_connections,
            handshake_timeout: self.handshake_timeout,
            admin_listen: parse_admin_listen(self.admin_listen)?,
            auth,
            config_file: None,
            tls: tls_config(self.tls_cert, self.tls_key, self.tls_client_ca)?,
            settings: Vec::new(),
        })
    }
}

/// Serializes an optional value by its `Display` form (the flags layer's `fsync`).
fn serialize_display_opt<T: std::fmt::Display, S: serde::Serializer>(
    value: &Option<T>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(value) => serializer.collect_str(value),
        None => serializer.serialize_none(),
    }
}

/// A size in bytes, with or without a unit: `268435456`, `256MiB`, `1.5 GB`, `64k`. IEC units
/// (`KiB`, `MiB`, `GiB`, ...) are powers of 1024, SI units (`KB`/`k`, `MB`/`m`, ...) powers of
/// 1000; read by the `bytesize` crate.
///
/// # Errors
/// Text that is neither a number of bytes nor a number and a unit it knows.
pub fn parse_size(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|error| {
            format!("{error} (a size is bytes, or a number and a unit: 256MiB, 1.5GB, 64k)")
        })
}

/// [`parse_size`] for a size held in memory, which must fit a `usize`.
///
/// # Errors
/// As [`parse_size`], and a size past `usize` on this machine.
pub fn parse_size_usize(text: &str) -> Result<usize, String> {
    let bytes = parse_size(text)?;
    usize::try_from(bytes).map_err(|_| format!("{bytes} bytes does not fit this machine"))
}

/// A duration flag or setting: [`crate::timefmt::parse_duration`] (`500ms`, `5s`, `7d`).
///
/// # Errors
/// As [`crate::timefmt::parse_duration`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    crate::timefmt::parse_duration(text)
}

/// A size setting: written as an integer of bytes; read from an integer or from a string
/// [`parse_size`] reads (`256MiB`).
mod size_serde {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }

    pub fn serialize<S: Serializer, T: Copy + TryInto<u64>>(
        value: &T,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let bytes: u64 = (*value).try_into().unwrap_or(u64::MAX);
        serializer.serialize_u64(bytes)
    }

    pub fn deserialize<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<u64>,
    {
        let bytes = match Size::deserialize(d)? {
            Size::Bytes(bytes) => bytes,
            Size::Text(text) => super::parse_size(&text).map_err(D::Error::custom)?,
        };
        T::try_from(bytes)
            .map_err(|_| D::Error::custom(format!("{bytes} bytes does not fit this machine")))
    }
}

/// A duration setting: written and read as text [`crate::timefmt`] reads (`5s`, `7d`). A bare
/// number is refused with the unit asked for.
mod duration_serde {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    #[derive(Deserialize)]
    #[serde(untagged)]
    pub(super) enum Text {
        Text(String),
        Number(f64),
    }

    impl Text {
        pub(super) fn parse<E: serde::de::Error>(self) -> Result<Duration, E> {
            match self {
                Text::Text(text) => crate::timefmt::parse_duration(&text).map_err(E::custom),
                Text::Number(n) => Err(E::custom(format!(
                    "{n} needs a unit: {n}s, {n}ms, {n}m (a duration is a number and a unit)"
                ))),
            }
        }
    }

    pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&crate::timefmt::format_duration(*value))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Text::deserialize(d)?.parse()
    }
}

/// [`duration_serde`] for an optional duration (unset: no limit).
mod duration_serde_opt {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(
        value: &Option<Duration>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => super::duration_serde::serialize(value, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<super::duration_serde::Text>::deserialize(d)?
            .map(super::duration_serde::Text::parse)
            .transpose()
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

/// The principals and limits of the config file at `path`, as a reload applies them (the rest
/// of the file needs a restart).
///
/// # Errors
/// The file cannot be read or parsed ([`ConfigError::Read`], [`ConfigError::Parse`]), or has a
/// key no setting has ([`ConfigError::Layer`]).
pub fn read_auth_config(path: &Path) -> Result<crate::auth::AuthConfig, ConfigError> {
    Ok(read_config_file(path)?.auth)
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

/// The settings of the config file at `path` (its keys but `principals` and `limits`), as
/// written: what a reload compares with what the bus started with ([`changed_keys`]).
///
/// # Errors
/// As [`read_auth_config`].
pub fn read_file_settings(path: &Path) -> Result<toml::Table, ConfigError> {
    Ok(read_config_file(path)?.settings)
}

/// The keys whose values differ between two [`read_file_settings`] tables (added, removed or
/// changed), sorted.
pub fn changed_keys(before: &toml::Table, after: &toml::Table) -> Vec<String> {
    let mut keys: Vec<String> = before
        .keys()
        .chain(after.keys())
        .filter(|key| before.get(*key) != after.get(*key))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Parses and checks the text of a config file as `--config` would, with no flags or environment
/// over it: the same TOML parsing and the same checks, on a string. The path only names the
/// file in errors. It exists so the parser can be fuzzed and property-tested without files
/// (`fuzz/fuzz_targets/config_file.rs`); whatever the text, it returns a value, never panics.
///
/// # Errors
/// As [`ServeArgs::resolve`].
pub fn parse_config_text(
    text: &str,
    path: &Path,
) -> Result<(ServerConfig, LogConfig), ConfigError> {
    let parts = parse_config_file(text, path)?;
    ServeArgs::default().resolve_with(Some((path.to_owned(), parts)), None)
}

fn read_config_file(path: &Path) -> Result<FileParts, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_config_file(&text, path)
}

/// The file's TOML, split into its settings (checked by name here, by kind when layered) and
/// its principals and limits.
fn parse_config_file(text: &str, path: &Path) -> Result<FileParts, ConfigError> {
    let parse_error = |source| ConfigError::Parse {
        path: path.to_owned(),
        source: Box::new(source),
    };
    // Checked whole first, from the text, so a wrong key or a value of the wrong kind points
    // at its line with a caret; the table is then layered under the environment and flags.
    let file: Settings = toml::from_str(text).map_err(parse_error)?;
    let mut settings: toml::Table = toml::from_str(text).map_err(parse_error)?;
    settings.remove("principals");
    settings.remove("limits");
    Ok(FileParts {
        settings,
        auth: crate::auth::AuthConfig {
            principals: file.principals,
            limits: file.limits,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let (server, log) = ServeArgs::default().resolve_with(None, None).unwrap();
        assert_eq!(
            ServerConfig {
                settings: Vec::new(),
                ..server.clone()
            },
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
        assert_eq!(server.settings.len(), setting_keys().len());
        assert!(server.settings.iter().all(|s| s.source == "default"));
    }

    #[test]
    fn each_setting_reports_the_layer_it_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.toml");
        let text = "retention_max_bytes = \"64MiB\"\nmax_names = 50\nmax_query_timeout = \"90s\"\n";
        let parts = parse_config_file(text, &path).unwrap();
        let args = ServeArgs {
            max_names: Some(70),
            ..ServeArgs::default()
        };
        let (server, _) = args
            .resolve_with(Some((path.clone(), parts)), None)
            .unwrap();
        assert_eq!(server.bus.max_names, 70);
        assert_eq!(server.bus.retention_max_bytes, 64 * 1024 * 1024);
        let source = |name: &str| {
            server
                .settings
                .iter()
                .find(|s| s.name == name)
                .map(|s| (s.value.clone(), s.source.clone()))
                .unwrap()
        };
        let file = format!("file {}", path.display());
        assert_eq!(
            source("max_names"),
            ("70".into(), "flag --max-names".into())
        );
        assert_eq!(
            source("retention_max_bytes"),
            ("64MiB".into(), file.clone())
        );
        assert_eq!(source("max_query_timeout"), ("90s".into(), file));
        assert_eq!(source("dedupe_window"), ("2m".into(), "default".into()));
        assert_eq!(source("retention_max_age"), ("".into(), "default".into()));
    }

    #[test]
    fn a_value_of_the_wrong_kind_names_its_key_and_layer() {
        // In the file: TOML's message, with the line and a caret.
        let path = PathBuf::from("/etc/eventbus.toml");
        let error = parse_config_file("max_names = \"many\"\n", &path)
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.contains("max_names") && error.contains('^'),
            "{error}"
        );
        let error = parse_config_file("shutdown_grace = 10\n", &path)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("needs a unit"), "{error}");
        // In the environment (a prefix of this test's own, so no other test sees it): the key
        // and the layer.
        std::env::set_var("EVENTBUS_CONFIG_TEST_MAX_NAMES", "many");
        let env = figment::providers::Env::prefixed("EVENTBUS_CONFIG_TEST_");
        let error = ServeArgs::default()
            .resolve_with(None, Some(env))
            .unwrap_err()
            .to_string();
        std::env::remove_var("EVENTBUS_CONFIG_TEST_MAX_NAMES");
        assert!(
            error.contains("max_names (env EVENTBUS_MAX_NAMES)"),
            "{error}"
        );
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
