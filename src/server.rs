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
use crate::config::{BusConfig, ServerConfig};
use crate::pb::admin_service_server::AdminServiceServer;
use crate::pb::event_bus_service_server::EventBusServiceServer;
use crate::service::{AdminApi, EventBusApi};
use crate::store::MemoryStore;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("grpc transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("building reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// A broker on the default (in-memory) store, sized by `config`.
pub fn memory_broker(config: &BusConfig) -> Broker {
    let store = MemoryStore::new(config.retention_max_events, config.retention_max_bytes);
    Broker::new(config.clone(), Arc::new(store))
}

/// Serves a new in-memory bus on `listener` until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let broker = memory_broker(&config.bus);
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
    let bus_service = EventBusServiceServer::new(EventBusApi::new(broker.clone()))
        .max_decoding_message_size(message_limit)
        .max_encoding_message_size(message_limit);
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
        result = server => {
            result?;
            info!("stopped");
        }
        _ = grace_elapsed => {
            warn!(grace = ?grace, "grace period over: dropping the calls still in flight");
        }
    }
    Ok(())
}
