//! The gRPC server: the bus's services plus standard health and reflection, with a shutdown that
//! ends open streams on purpose instead of waiting on them forever.
//!
//! The shutdown signal is a parameter so tests (and embedders) can drive it. On shutdown:
//! health goes NOT_SERVING, the broker ends every open subscription with UNAVAILABLE, tonic stops
//! accepting and finishes in-flight calls, and after a bounded grace period whatever is left is
//! dropped.
//!
//! A panic while serving a call is contained to that call ([`crate::panics`]): it is logged
//! through `tracing`, and the call answers INTERNAL (reason `internal`) while other calls, on the
//! same connection too, go on.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::accept::{AcceptLimits, Incoming};
use crate::auth::{Auth, AuthLayer};
use crate::broker::Broker;
use crate::config::{BusConfig, ServerConfig, StorageConfig};
use crate::content_type::GrpcOnlyLayer;
use crate::panics::{self, PanicSafeBodyLayer};
use crate::pb::admin_service_server::AdminServiceServer;
use crate::pb::event_bus_service_server::EventBusServiceServer;
use crate::receive::{ReceiveLayer, ReceiveLimits};
use crate::service::subscribe::EventBusServer;
use crate::service::{AdminApi, EventBusApi};
use crate::store::{
    FileStore, FileStoreConfig, JetStreamConfig, JetStreamStore, MemoryStore, Store, StoreError,
};

/// HTTP/2 flow control: how much a client may send on one stream, and on one connection, before
/// the bus has read it. Data the bus has not read yet waits in these windows, so they bound what a
/// connection can make the bus buffer beneath the receive limits ([`crate::receive`]). The
/// connection's is larger so one stream the bus reads slowly (a PublishStream at its in-flight
/// limit) does not stall the others. hyper's default is 1 MiB for both.
const STREAM_WINDOW_BYTES: u32 = 1024 * 1024;
const CONNECTION_WINDOW_BYTES: u32 = 2 * 1024 * 1024;

/// The largest header block (HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE: names plus values plus 32
/// bytes per field, decoded) a request may carry. Metadata is for tokens, ids and trace context,
/// a few KiB at most; a bound keeps a client from making the bus decode and hold megabytes of
/// headers per stream. A larger request is answered HTTP 431 and its stream reset
/// (REFUSED_STREAM) before any handler runs (`tests/h2_abuse.rs`). Set explicitly, at hyper's
/// current default, so the bound is the bus's and not a dependency's.
pub const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// HTTP/2 rapid reset (CVE-2023-44487): streams a client opened and reset before the bus
/// accepted them. Past this many pending at once the connection is closed with GOAWAY
/// ENHANCE_YOUR_CALM, so a client cannot make the bus start work for thousands of streams it has
/// already cancelled. Set explicitly (it is h2's default) so the bound is part of the bus.
pub const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;

/// Streams the bus itself reset on one connection (a stream over `max_concurrent_streams`
/// refused with REFUSED_STREAM, a malformed frame) before it closes the connection with GOAWAY
/// ENHANCE_YOUR_CALM: a client that keeps provoking resets is cut off rather than served
/// forever. Set explicitly (it is h2's default).
pub const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("building reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("opening the store: {0}")]
    Storage(#[from] StoreError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("loading TLS certificates: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("binding the admin listener {addr}: {source}")]
    AdminBind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// A broker on the store `storage` describes, bounded by `config`'s retention. Opening a file
/// store recovers its log first; opening a JetStream store connects to NATS and creates or
/// updates the stream (its limits are `config`'s retention).
///
/// # Errors
/// What the store's opening fails with: for JetStream, one line naming the NATS URLs.
pub async fn open_broker(
    config: &BusConfig,
    storage: &StorageConfig,
) -> Result<Broker, StoreError> {
    let metrics = crate::metrics::Metrics::new();
    let store: Arc<dyn Store> = match storage {
        StorageConfig::JetStream {
            urls,
            stream,
            replicas,
        } => {
            let store = Arc::new(
                JetStreamStore::open(JetStreamConfig {
                    urls: urls.clone(),
                    stream: stream.clone(),
                    replicas: *replicas,
                    max_events: config.retention_max_events,
                    max_bytes: config.retention_max_bytes,
                    max_age: config.retention_max_age,
                    dedupe_window: config.dedupe_window,
                    max_message_bytes: config.max_message_bytes,
                    max_event_data_bytes: config.max_event_data_bytes,
                })
                .await?,
            );
            info!(
                nats = %urls.join(","),
                %stream,
                replicas,
                head = store.head_at_open(),
                "storage: JetStream stream"
            );
            return Ok(Broker::on_shared_log(config.clone(), store.clone(), store, metrics).await);
        }
        StorageConfig::Memory => Arc::new(MemoryStore::with_max_age(
            config.retention_max_events,
            config.retention_max_bytes,
            config.retention_max_age,
        )),
        StorageConfig::File {
            data_dir,
            fsync,
            segment_bytes,
        } => Arc::new(FileStore::open(FileStoreConfig {
            fsync: *fsync,
            segment_bytes: *segment_bytes,
            retention_max_events: config.retention_max_events,
            retention_max_bytes: config.retention_max_bytes,
            retention_max_age: config.retention_max_age,
            fsync_timer: Some(metrics.fsync_timer()),
            ..FileStoreConfig::new(data_dir)
        })?),
    };
    Ok(Broker::with_metrics(config.clone(), store, metrics))
}

/// Opens the configured store and serves a bus on it on `listener` until `shutdown` resolves.
/// Installs [`crate::panics::install_panic_hook`] first.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    crate::panics::install_panic_hook();
    let broker = open_broker(&config.bus, &config.storage).await?;
    serve(listener, config, broker, shutdown).await
}

/// How often the store's health is looked at for the gRPC health service.
const STORE_HEALTH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// Turns a failed store (it refuses writes, see [`crate::store::Store::durability_error`])
/// into NOT_SERVING on gRPC health, with one ERROR line, so load balancers and clients move
/// away from this node, and back to SERVING if the store recovers (a JetStream node whose NATS
/// connection is back; a failed file store stays failed until a restart). Ends at shutdown.
async fn report_store_failure(broker: Broker, health: tonic_health::server::HealthReporter) {
    let mut ticks = tokio::time::interval(STORE_HEALTH_INTERVAL);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = broker.stopped() => return,
        }
        match (broker.store_failure(), failing) {
            (Some(failure), false) => {
                failing = true;
                tracing::error!(%failure, "the store refuses writes: health NOT_SERVING");
                health
                    .set_not_serving::<EventBusServiceServer<EventBusApi>>()
                    .await;
                health
                    .set_service_status("", ServingStatus::NotServing)
                    .await;
            }
            (None, true) if !broker.is_shutting_down() => {
                failing = false;
                tracing::info!("the store takes writes again: health SERVING");
                health
                    .set_serving::<EventBusServiceServer<EventBusApi>>()
                    .await;
                health.set_service_status("", ServingStatus::Serving).await;
            }
            _ => {}
        }
    }
}

/// How often the config file's modification time is looked at for a reload of principals and
/// limits. A poll, not file-system notifications: editors and config-management tools replace
/// files by rename, which inotify watches of the old file miss, and one `stat` a second costs
/// nothing.
const CONFIG_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Reloads principals and limits from `path` on SIGHUP and whenever its modification time or
/// size changes, until the broker stops. A file that fails to read or check is logged (ERROR,
/// naming the setting) and the policy in force kept.
async fn reload_auth(auth: Auth, path: std::path::PathBuf, broker: Broker) {
    let stamp = |path: &std::path::Path| {
        std::fs::metadata(path)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut seen = stamp(&path);
    // The file's other settings as the bus runs them: a reload applies only principals and
    // limits, and says which other settings changed and wait for a restart.
    let running = crate::config::read_file_settings(&path).ok();
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut ticks = tokio::time::interval(CONFIG_POLL_INTERVAL);
    loop {
        let why = tokio::select! {
            _ = broker.stopped() => return,
            Some(()) = async { match &mut hangups { Some(h) => h.recv().await, None => None } } => "SIGHUP",
            _ = ticks.tick() => {
                let now = stamp(&path);
                if now == seen {
                    continue;
                }
                seen = now;
                "the config file changed"
            }
        };
        match crate::config::read_auth_config(&path).and_then(|config| auth.reload(&config)) {
            Ok(()) => {
                info!(
                    path = %path.display(),
                    why,
                    principals = auth.principal_count(),
                    "principals and limits reloaded"
                );
                let changed = match (&running, crate::config::read_file_settings(&path)) {
                    (Some(running), Ok(now)) => crate::config::changed_keys(running, &now),
                    _ => Vec::new(),
                };
                if !changed.is_empty() {
                    warn!(
                        path = %path.display(),
                        changed = %changed.join(", "),
                        "the config file changes settings a reload does not apply: they take \
                         effect at the next restart"
                    );
                }
            }
            Err(error) => tracing::error!(
                path = %path.display(),
                why,
                %error,
                "config reload refused: keeping the principals and limits in force"
            ),
        }
    }
}

/// Serves the admin HTTP listener until the broker shuts down, over TLS when `tls` is set
/// (HTTPS, handshakes under `limits`). Its failure is logged; the bus goes on serving gRPC.
fn spawn_admin(
    listener: TcpListener,
    broker: Broker,
    health: tonic_health::server::HealthReporter,
    auth: Auth,
    tls: Option<crate::tls::ReloadableTls>,
    limits: AcceptLimits,
) {
    let addr = listener
        .local_addr()
        .map_or_else(|_| "an unknown address".to_owned(), |a| a.to_string());
    let tls_on = tls.is_some();
    info!(%addr, tls = tls_on, "admin listening (/metrics, /healthz, /readyz, dashboard at /)");
    let beyond_loopback = listener.local_addr().is_ok_and(|a| !a.ip().is_loopback());
    if beyond_loopback && auth.is_open() {
        warn!(
            %addr,
            "the admin listener is reachable beyond this machine on an open bus: its dashboard \
             shows event contents (the live tail, conversations) to anyone who reaches {addr}, \
             with no authentication; bind it to 127.0.0.1 or a private network (SECURITY.md)"
        );
    }
    let stopped = {
        let broker = broker.clone();
        async move { broker.stopped().await }
    };
    tokio::spawn(async move {
        let served = match tls {
            None => crate::admin::serve(listener, broker, health, auth, stopped).await,
            Some(tls) => {
                let incoming =
                    Incoming::new(listener, limits).with_tls(tls, crate::tls::Alpn::Http1);
                crate::admin::serve(
                    crate::admin::IncomingListener(incoming),
                    broker,
                    health,
                    auth,
                    stopped,
                )
                .await
            }
        };
        if let Err(error) = served {
            tracing::error!(%error, "the admin listener failed");
        }
    });
}

/// Serves `broker` on `listener` until `shutdown` resolves, and the admin HTTP listener
/// ([`crate::admin`]) on `config.admin_listen` if set.
pub async fn serve(
    listener: TcpListener,
    config: ServerConfig,
    broker: Broker,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let admin = match config.admin_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::AdminBind { addr, source })?,
        ),
        None => None,
    };
    serve_with_admin(listener, admin, config, broker, shutdown).await
}

/// As [`serve`], with the admin HTTP listener on `admin` (already bound, so a test can bind
/// port 0 and know the address) instead of `config.admin_listen`.
pub async fn serve_with_admin(
    listener: TcpListener,
    admin: Option<TcpListener>,
    config: ServerConfig,
    broker: Broker,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let local_addr = listener.local_addr().ok();
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<EventBusServiceServer<EventBusApi>>()
        .await;
    health.set_service_status("", ServingStatus::Serving).await;

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let auth = Auth::new(&config.auth, broker.metrics().clone()).map_err(ServerError::Config)?;
    let message_limit = config.bus.max_message_bytes;
    let bus_service = EventBusServer::new(
        EventBusApi::with_auth(broker.clone(), auth.clone()),
        message_limit,
    );
    let admin_service = AdminServiceServer::new(
        AdminApi::with_auth(broker.clone(), auth.clone()).with_settings(&config.settings),
    )
    .max_encoding_message_size(message_limit);
    if let Some(path) = config.config_file.clone() {
        tokio::spawn(reload_auth(auth.clone(), path, broker.clone()));
    }

    let tls = match &config.tls {
        Some(files) => {
            let tls = crate::tls::ReloadableTls::open(files)?;
            let stopped = {
                let broker = broker.clone();
                async move { broker.stopped().await }
            };
            tls.spawn_watcher(stopped);
            match &files.client_ca {
                Some(ca) => info!(
                    cert = %files.cert.display(),
                    client_ca = %ca.display(),
                    "TLS on, mutual TLS on (client certificates verified, not required); \
                     reloaded on SIGHUP or file change"
                ),
                None => info!(
                    cert = %files.cert.display(),
                    "TLS on, mutual TLS off; reloaded on SIGHUP or file change"
                ),
            }
            Some(tls)
        }
        None => {
            info!("TLS off: plaintext gRPC and admin HTTP (--tls-cert, --tls-key to turn it on)");
            None
        }
    };
    let max_connections = config
        .max_connections
        .unwrap_or_else(crate::accept::default_max_connections);
    let limits = AcceptLimits {
        max_connections,
        handshake_timeout: config.handshake_timeout,
    };

    tokio::spawn(report_store_failure(broker.clone(), health.clone()));
    if let Some(admin) = admin {
        spawn_admin(
            admin,
            broker.clone(),
            health.clone(),
            auth.clone(),
            tls.clone(),
            limits,
        );
    }

    let stopping = Arc::new(Notify::new());
    let signal = {
        let stopping = stopping.clone();
        let broker = broker.clone();
        async move {
            shutdown.await;
            info!("shutting down: health NOT_SERVING, ending open streams");
            health
                .set_not_serving::<EventBusServiceServer<EventBusApi>>()
                .await;
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            broker.shutdown();
            stopping.notify_one();
        }
    };

    info!(max_connections, "connection limit");
    let mut incoming = Incoming::new(listener, limits).counted_in(broker.metrics().clone());
    if let Some(tls) = tls {
        incoming = incoming.with_tls(tls, crate::tls::Alpn::Grpc);
    }
    let addr = local_addr.map_or_else(|| "an unknown address".to_owned(), |a| a.to_string());
    info!(
        %addr,
        version = env!("CARGO_PKG_VERSION"),
        storage = config.storage.name(),
        open = auth.is_open(),
        "eventbus listening"
    );
    if auth.is_open() && local_addr.is_some_and(|a| !a.ip().is_loopback()) {
        warn!(
            %addr,
            "no [[principals]] configured and listening beyond this machine: the bus is open, \
             anyone on the network who can reach {addr} may publish, subscribe to anything \
             and administer the bus; configure [[principals]] and TLS, or listen on \
             127.0.0.1 (see SECURITY.md)"
        );
    } else if auth.is_open() {
        warn!(
            %addr,
            "no [[principals]] configured: the bus is open, anyone who can reach {addr} may \
             publish and subscribe to anything (see SECURITY.md)"
        );
    } else {
        info!(principals = auth.principal_count(), "authentication on");
        if config.tls.is_none() && local_addr.is_some_and(|a| !a.ip().is_loopback()) {
            warn!(
                %addr,
                "authentication on without TLS, listening beyond this machine: bearer tokens \
                 and events cross the network in clear text; give --tls-cert and --tls-key \
                 (SECURITY.md)"
            );
        }
    }
    let receive = ReceiveLayer::new(ReceiveLimits {
        timeout: config.receive_timeout,
        budget_bytes: config.receive_budget_bytes,
        max_message_bytes: message_limit,
    });
    let server = Server::builder()
        .layer(panics::catch_panics())
        .layer(PanicSafeBodyLayer)
        .layer(receive)
        .layer(GrpcOnlyLayer)
        .layer(AuthLayer::new(auth))
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .max_concurrent_streams(config.max_concurrent_streams)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESET_STREAMS))
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(bus_service)
        .add_service(admin_service)
        .serve_with_incoming_shutdown(incoming, signal);
    let grace = config.shutdown_grace;
    let grace_elapsed = async move {
        stopping.notified().await;
        tokio::time::sleep(grace).await;
    };
    tokio::select! {
        result = server => result?,
        _ = grace_elapsed => {
            warn!(grace = ?grace, "grace period over: dropping the calls still in flight");
        }
    }
    // Group dispatchers save their cursors last; the store closes when the broker is dropped.
    if tokio::time::timeout(grace, broker.finish()).await.is_err() {
        warn!("the broker's tasks did not finish within the grace period");
    }
    info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;
    use tonic::Code;
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;
    use crate::pb;
    use crate::pb::event_bus_service_client::EventBusServiceClient;
    use crate::service::status::ERROR_REASON_KEY;
    use crate::service::test_hooks::PANIC;

    const WAIT: Duration = Duration::from_secs(20);

    /// Log output, collected for the test to read.
    #[derive(Clone, Default)]
    struct Logs(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl MakeWriter<'_> for Logs {
        type Writer = Logs;

        fn make_writer(&self) -> Logs {
            self.clone()
        }
    }

    fn assert_internal(status: &tonic::Status, what: &str) {
        assert_eq!(status.code(), Code::Internal, "{what}: {status:?}");
        assert_eq!(
            status
                .metadata()
                .get(ERROR_REASON_KEY)
                .and_then(|v| v.to_str().ok()),
            Some("internal"),
            "{what}: {status:?}"
        );
    }

    fn event(topic: &str) -> pb::Event {
        pb::Event {
            topic: topic.to_owned(),
            source: "test".to_owned(),
            ..Default::default()
        }
    }

    /// The default test runtime runs every task on this thread, so the scoped log subscriber
    /// sees what the server's tasks (and the panic hook, on the panicking task) log.
    #[tokio::test]
    async fn a_panicking_call_answers_internal_is_logged_and_its_connection_goes_on() {
        let logs = Logs::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .finish();
        let _logging = tracing::subscriber::set_default(subscriber);

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(run(
            listener,
            ServerConfig {
                shutdown_grace: Duration::from_secs(2),
                ..ServerConfig::default()
            },
            shutdown.clone().cancelled_owned(),
        ));
        // One channel is one HTTP/2 connection: every call below shares it.
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = EventBusServiceClient::new(channel);

        tokio::time::timeout(WAIT, async {
            let mut watcher = client
                .subscribe(pb::SubscribeRequest {
                    topic: "orders.>".into(),
                    subscriber: "watcher".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            watcher.message().await.unwrap().expect("subscribed");

            // A panic in a unary handler.
            let status = client
                .ack(pb::AckRequest {
                    group: PANIC.into(),
                    sequences: vec![1],
                })
                .await
                .expect_err("the panicking Ack fails");
            assert_internal(&status, "Ack");

            // A panic in a response stream, after its headers went out.
            let status = match client
                .subscribe(pb::SubscribeRequest {
                    topic: "orders.>".into(),
                    subscriber: PANIC.into(),
                    ..Default::default()
                })
                .await
            {
                Ok(response) => response
                    .into_inner()
                    .message()
                    .await
                    .expect_err("the panicking stream ends with an error"),
                Err(status) => status,
            };
            assert_internal(&status, "Subscribe");

            // The connection, and the stream already open on it, go on.
            client
                .publish(pb::PublishRequest {
                    events: vec![event("orders.created")],
                })
                .await
                .expect("a publish after the panics");
            let delivered = watcher.message().await.unwrap().expect("an event");
            assert!(matches!(
                delivered.message,
                Some(pb::subscribe_response::Message::Event(_))
            ));
        })
        .await
        .expect("the calls finish in time");

        let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        for expected in [
            "test-only panic in the Ack handler",
            "test-only panic in a Subscribe stream",
            "src/service/mod.rs:",
        ] {
            assert!(
                logs.lines()
                    .any(|line| line.contains("ERROR") && line.contains(expected)),
                "an ERROR log naming {expected:?} in:\n{logs}"
            );
        }

        shutdown.cancel();
        tokio::time::timeout(WAIT, server)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }
}

#[cfg(test)]
mod store_health_tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;
    use tonic_health::pb::health_check_response::ServingStatus as Wire;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    use super::*;
    use crate::pb;
    use crate::pb::event_bus_service_client::EventBusServiceClient;

    pub(super) use crate::store::test_store::TestStore as Failing;

    #[tokio::test]
    async fn a_failed_store_makes_the_node_not_serving_and_publishes_unavailable() {
        let store = Arc::new(Failing::new());
        let broker = Broker::new(BusConfig::default(), store.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            ServerConfig::default(),
            broker,
            shutdown.clone().cancelled_owned(),
        ));
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = HealthClient::new(channel.clone());
        let mut bus = EventBusServiceClient::new(channel);
        let status = |health: &mut HealthClient<_>| {
            let mut health = health.clone();
            async move {
                health
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .status
            }
        };
        assert_eq!(status(&mut health).await, Wire::Serving as i32);
        let event = pb::Event {
            topic: "a.b".into(),
            source: "test".into(),
            ..Default::default()
        };
        bus.publish(pb::PublishRequest {
            events: vec![event.clone()],
        })
        .await
        .unwrap();

        store.failed.store(true, Ordering::Release);
        let refused = bus
            .publish(pb::PublishRequest {
                events: vec![event],
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        assert_eq!(
            refused.metadata().get("eventbus-error").unwrap(),
            "store-failed"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while status(&mut health).await != Wire::NotServing as i32 {
            assert!(
                std::time::Instant::now() < deadline,
                "health stayed SERVING"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // On a publish stream the refusal ends the stream, so the batches sent after the
        // refused one are not begun here (the client sends them all again, in order).
        let requests = (1..=3).map(|request_id| pb::PublishStreamRequest {
            request_id,
            events: vec![pb::Event {
                topic: "a.b".into(),
                source: "test".into(),
                ..Default::default()
            }],
        });
        let mut answers = bus
            .publish_stream(futures_util::stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        let ended = answers.message().await.unwrap_err();
        assert_eq!(ended.code(), tonic::Code::Unavailable);
        assert_eq!(
            ended.metadata().get("eventbus-error").unwrap(),
            "store-failed"
        );
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}

#[cfg(test)]
mod admin_tests {
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::sync::CancellationToken;

    use super::store_health_tests::Failing;
    use super::*;

    async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: bus\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").unwrap();
        let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        (status, body.to_owned())
    }

    /// Readiness is the gRPC health status: a failed store turns both off; liveness stays.
    #[tokio::test]
    async fn a_failed_store_makes_readyz_fail_and_healthz_stay() {
        let store = Arc::new(Failing::new());
        let broker = Broker::new(BusConfig::default(), store.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve_with_admin(
            listener,
            Some(admin),
            ServerConfig::default(),
            broker,
            shutdown.clone().cancelled_owned(),
        ));
        assert_eq!(
            get(admin_addr, "/readyz").await,
            (200, "ready\n".to_owned())
        );
        store.failed.store(true, Ordering::Release);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let body = loop {
            let (status, body) = get(admin_addr, "/readyz").await;
            if status == 503 {
                break body;
            }
            assert!(std::time::Instant::now() < deadline, "readyz stayed 200");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            body.contains("NOT_SERVING") && body.contains("fsync failed: injected"),
            "{body}"
        );
        assert_eq!(get(admin_addr, "/healthz").await, (200, "ok\n".to_owned()));
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }
}
