//! The gRPC server: the bus's services plus standard health and reflection, with a shutdown that
//! ends open streams on purpose instead of waiting on them forever.
//!
//! The shutdown signal is a parameter so tests (and embedders) can drive it. On shutdown:
//! health goes NOT_SERVING, the broker ends every open subscription with UNAVAILABLE, tonic stops
//! accepting and finishes in-flight calls, and after a bounded grace period whatever is left is
//! dropped.

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::Notify;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tracing::{info, warn};

use crate::broker::Broker;
use crate::config::{BusConfig, ServerConfig, StorageConfig};
use crate::pb::admin_service_server::AdminServiceServer;
use crate::pb::event_bus_service_server::EventBusServiceServer;
use crate::service::subscribe::EventBusServer;
use crate::service::{AdminApi, EventBusApi};
use crate::store::{FileStore, FileStoreConfig, MemoryStore, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("building reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("opening the store: {0}")]
    Storage(#[from] StoreError),
}

/// A broker on the store `storage` describes, bounded by `config`'s retention. Opening a file
/// store recovers its log first.
pub fn open_broker(config: &BusConfig, storage: &StorageConfig) -> Result<Broker, StoreError> {
    let store: Arc<dyn Store> = match storage {
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
            ..FileStoreConfig::new(data_dir)
        })?),
    };
    Ok(Broker::new(config.clone(), store))
}

/// Opens the configured store and serves a bus on it on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let broker = open_broker(&config.bus, &config.storage)?;
    serve(listener, config, broker, shutdown).await
}

/// Serves `broker` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
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

    let message_limit = config.bus.max_message_bytes;
    let bus_service = EventBusServer::new(EventBusApi::new(broker.clone()), message_limit);
    let admin_service = AdminServiceServer::new(AdminApi::new(broker.clone()))
        .max_encoding_message_size(message_limit);

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

    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    info!(addr = ?local_addr, "eventbus listening");
    let server = Server::builder()
        .http2_keepalive_interval(Some(config.keepalive_interval))
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
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
