//! Shared test helpers: a real bus on 127.0.0.1:0, in-process, with a shutdown the test drives,
//! and polling with a deadline instead of sleeping.
#![allow(dead_code)]

pub mod nats;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use eventbus::config::{BusConfig, ServerConfig, StorageConfig};
use eventbus::pb::admin_service_client::AdminServiceClient;
use eventbus::pb::event_bus_service_client::EventBusServiceClient;
use eventbus::store::FsyncPolicy;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A bus running in this process on an ephemeral port.
pub struct TestBus {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<()>>,
    /// The file store's directory, removed when the bus is dropped.
    _data_dir: Option<tempfile::TempDir>,
    /// The nats-server of a bus on JetStream, stopped when the bus is dropped.
    pub nats: Option<nats::NatsServer>,
    /// The admin HTTP listener's address, for a bus started with one ([`TestBus::start_tls`]).
    pub admin_addr: Option<SocketAddr>,
}

/// What `EVENTBUS_TEST_STORAGE` asks every in-process test bus to run on instead of the memory
/// store: the same suite checks every store.
enum UnderTest {
    Memory,
    /// `file`: the file store, in a temporary directory.
    File(tempfile::TempDir),
    /// `jetstream`: a JetStream stream on a nats-server of the test's own.
    JetStream(nats::NatsServer),
}

fn storage_under_test() -> UnderTest {
    match std::env::var("EVENTBUS_TEST_STORAGE").as_deref() {
        Ok("file") => UnderTest::File(tempfile::tempdir().expect("temporary data dir")),
        Ok("jetstream") => UnderTest::JetStream(nats::NatsServer::start()),
        Ok("memory") | Err(_) => UnderTest::Memory,
        Ok(other) => {
            panic!("EVENTBUS_TEST_STORAGE must be file, memory or jetstream, not {other:?}")
        }
    }
}

/// Whether the suite runs on JetStream (`EVENTBUS_TEST_STORAGE=jetstream`), for the few tests
/// whose expectations differ there (each says why).
pub fn on_jetstream() -> bool {
    std::env::var("EVENTBUS_TEST_STORAGE").as_deref() == Ok("jetstream")
}

/// The storage of a bus node on the JetStream stream of `nats`.
pub fn jetstream_storage(nats: &nats::NatsServer) -> StorageConfig {
    StorageConfig::JetStream {
        urls: vec![nats.url.clone()],
        stream: "EVENTBUS".to_owned(),
        replicas: 1,
    }
}

impl TestBus {
    /// Starts a bus with the default configuration.
    pub async fn start() -> TestBus {
        TestBus::start_with(BusConfig::default()).await
    }

    /// Starts a bus with the given broker limits.
    pub async fn start_with(bus: BusConfig) -> TestBus {
        let config = ServerConfig {
            bus,
            shutdown_grace: Duration::from_secs(5),
            ..ServerConfig::default()
        };
        TestBus::start_server(config).await
    }

    /// Starts a bus on the memory store whatever `EVENTBUS_TEST_STORAGE` says: for tests whose
    /// expectations depend on its exact retention (the file store retains whole segments, so it
    /// may hold more than the limits; its retention has tests of its own).
    pub async fn start_in_memory(bus: BusConfig) -> TestBus {
        let config = ServerConfig {
            bus,
            shutdown_grace: Duration::from_secs(5),
            ..ServerConfig::default()
        };
        TestBus::spawn(config, None, None).await
    }

    /// Starts a bus; a memory store is swapped for a file store under
    /// `EVENTBUS_TEST_STORAGE=file`, and for a JetStream stream on a nats-server of its own
    /// under `EVENTBUS_TEST_STORAGE=jetstream`.
    pub async fn start_server(config: ServerConfig) -> TestBus {
        TestBus::start_under_test(config, false).await
    }

    /// As [`TestBus::start_server`], with the admin HTTP listener (metrics, the dashboard) on
    /// an ephemeral port ([`TestBus::admin_addr`]).
    pub async fn start_with_admin(config: ServerConfig) -> TestBus {
        TestBus::start_under_test(config, true).await
    }

    async fn start_under_test(mut config: ServerConfig, admin: bool) -> TestBus {
        let under_test = match config.storage {
            StorageConfig::Memory => storage_under_test(),
            _ => UnderTest::Memory,
        };
        match under_test {
            UnderTest::Memory => TestBus::spawn_with(config, None, None, admin).await,
            UnderTest::File(dir) => {
                config.storage = StorageConfig::File {
                    data_dir: dir.path().to_owned(),
                    fsync: FsyncPolicy::Always,
                    segment_bytes: 1024 * 1024,
                };
                TestBus::spawn_with(config, Some(dir), None, admin).await
            }
            UnderTest::JetStream(nats) => {
                config.storage = jetstream_storage(&nats);
                TestBus::spawn_with(config, None, Some(nats), admin).await
            }
        }
    }

    /// Starts a bus exactly as `config` says, whatever `EVENTBUS_TEST_STORAGE` is.
    pub async fn start_exactly(config: ServerConfig) -> TestBus {
        TestBus::spawn(config, None, None).await
    }

    /// Starts a bus node on `storage` as given (another node's JetStream stream, say).
    pub async fn start_on(bus: BusConfig, storage: StorageConfig) -> TestBus {
        let config = ServerConfig {
            bus,
            storage,
            shutdown_grace: Duration::from_secs(5),
            ..ServerConfig::default()
        };
        TestBus::spawn(config, None, None).await
    }

    async fn spawn(
        config: ServerConfig,
        data_dir: Option<tempfile::TempDir>,
        nats: Option<nats::NatsServer>,
    ) -> TestBus {
        TestBus::spawn_with(config, data_dir, nats, false).await
    }

    async fn spawn_with(
        config: ServerConfig,
        data_dir: Option<tempfile::TempDir>,
        nats: Option<nats::NatsServer>,
        admin: bool,
    ) -> TestBus {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone().cancelled_owned();
        let (handle, admin_addr) = if admin {
            let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let admin_addr = admin.local_addr().unwrap();
            let broker = eventbus::server::open_broker(&config.bus, &config.storage)
                .await
                .unwrap();
            let handle = tokio::spawn(async move {
                eventbus::server::serve_with_admin(listener, Some(admin), config, broker, signal)
                    .await
                    .expect("server failed");
            });
            (handle, Some(admin_addr))
        } else {
            let handle = tokio::spawn(async move {
                eventbus::server::run(listener, config, signal)
                    .await
                    .expect("server failed");
            });
            (handle, None)
        };
        TestBus {
            addr,
            shutdown,
            handle: Some(handle),
            _data_dir: data_dir,
            nats,
            admin_addr,
        }
    }

    /// Starts a bus on the memory store with TLS on `config.tls` (which must be set) and an
    /// admin listener on an ephemeral port ([`TestBus::admin_addr`]).
    pub async fn start_tls(config: ServerConfig) -> TestBus {
        assert!(config.tls.is_some(), "start_tls needs config.tls");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin_addr = admin.local_addr().unwrap();
        let broker = eventbus::server::open_broker(&config.bus, &config.storage)
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone().cancelled_owned();
        let handle = tokio::spawn(async move {
            eventbus::server::serve_with_admin(listener, Some(admin), config, broker, signal)
                .await
                .expect("server failed");
        });
        TestBus {
            addr,
            shutdown,
            handle: Some(handle),
            _data_dir: None,
            nats: None,
            admin_addr: Some(admin_addr),
        }
    }

    /// `https://127.0.0.1:PORT`, for a bus started with TLS.
    pub fn https_url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .expect("connect to test bus")
    }

    pub async fn client(&self) -> EventBusServiceClient<Channel> {
        EventBusServiceClient::new(self.channel().await)
    }

    pub async fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel().await)
    }

    /// Signals shutdown and waits for the server to stop; fails the test if it takes more than
    /// `within`.
    pub async fn stop(mut self, within: Duration) {
        self.shutdown.cancel();
        let handle = self.handle.take().unwrap();
        tokio::time::timeout(within, handle)
            .await
            .expect("server did not stop in time")
            .expect("server task panicked");
    }

    /// Signals shutdown without waiting.
    pub fn begin_stop(&self) {
        self.shutdown.cancel();
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A minimal valid event.
pub fn event(topic: &str, data: &[u8]) -> eventbus::pb::Event {
    eventbus::pb::Event {
        topic: topic.to_owned(),
        source: "test".to_owned(),
        data: bytes::Bytes::copy_from_slice(data),
        ..Default::default()
    }
}
