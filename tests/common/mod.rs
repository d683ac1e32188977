//! Shared test helpers: a real bus on 127.0.0.1:0, in-process, with a shutdown the test drives,
//! and polling with a deadline instead of sleeping.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use eventbus::config::{BusConfig, ServerConfig};
use eventbus::pb::admin_service_client::AdminServiceClient;
use eventbus::pb::event_bus_service_client::EventBusServiceClient;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A bus running in this process on an ephemeral port.
pub struct TestBus {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    handle: Option<JoinHandle<()>>,
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

    pub async fn start_server(config: ServerConfig) -> TestBus {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone().cancelled_owned();
        let handle = tokio::spawn(async move {
            eventbus::server::run(listener, config, signal)
                .await
                .expect("server failed");
        });
        TestBus {
            addr,
            shutdown,
            handle: Some(handle),
        }
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
