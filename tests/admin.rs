//! The admin HTTP listener: liveness and readiness, and metrics that move as traffic flows, with
//! labels a client cannot multiply.

mod common;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use common::{event, eventually};
use eventbus::config::ServerConfig;
use eventbus::pb;
use support::*;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A bus on the memory store with the admin listener, both on 127.0.0.1:0.
struct AdminBus {
    grpc: SocketAddr,
    admin: SocketAddr,
    shutdown: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl AdminBus {
    async fn start() -> AdminBus {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (grpc, admin_addr) = (listener.local_addr().unwrap(), admin.local_addr().unwrap());
        let config = ServerConfig {
            shutdown_grace: Duration::from_secs(5),
            ..ServerConfig::default()
        };
        let broker = eventbus::server::open_broker(&config.bus, &config.storage)
            .await
            .unwrap();
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone().cancelled_owned();
        let server = tokio::spawn(async move {
            eventbus::server::serve_with_admin(listener, Some(admin), config, broker, signal)
                .await
                .expect("server failed");
        });
        AdminBus {
            grpc,
            admin: admin_addr,
            shutdown,
            server,
        }
    }

    async fn client(&self) -> Client {
        Client::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
    }

    async fn metrics(&self) -> String {
        let (status, body) = http_get(self.admin, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.server)
            .await
            .expect("the server stops")
            .unwrap();
    }
}

/// The value of the sample `series` (name and labels exactly as exposed), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (name, value) = line.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

#[tokio::test]
async fn healthz_and_readyz_answer_while_the_bus_serves() {
    let bus = AdminBus::start().await;
    assert_eq!(http_get(bus.admin, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(
        http_get(bus.admin, "/readyz").await,
        (200, "ready\n".into())
    );
    let (status, _) = http_get(bus.admin, "/nothing-here").await;
    assert_eq!(status, 404);
    bus.stop().await;
}

#[tokio::test]
async fn metrics_move_as_events_flow() {
    let bus = AdminBus::start().await;
    let mut client = bus.client().await;
    let before = bus.metrics().await;
    assert!(
        before.contains("eventbus_build_info{version=\""),
        "{before}"
    );
    assert!(before.ends_with("# EOF\n"), "{before}");

    let (_, mut stream) = subscribe(&mut client, request("orders.>")).await;
    publish(
        &mut client,
        vec![
            event("orders.created", b"1"),
            event("orders.paid", b"2"),
            event("users.created", b"3"),
        ],
    )
    .await;
    events(&mut stream, 2).await;
    let refused = client
        .query(pb::QueryRequest {
            event: Some(event("nobody.listens", b"?")),
            timeout: millis(1000),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);

    let text = eventually("the delivery counted", WAIT, || async {
        let text = bus.metrics().await;
        (sample(&text, "eventbus_events_delivered_total{family=\"orders\"}") == Some(2.0))
            .then_some(text)
    })
    .await;
    for (series, expected) in [
        ("eventbus_events_published_total{family=\"orders\"}", 2.0),
        ("eventbus_events_published_total{family=\"users\"}", 1.0),
        ("eventbus_queries_total{outcome=\"no_responders\"}", 1.0),
        ("eventbus_queries_total{outcome=\"answered\"}", 0.0),
        ("eventbus_subscriptions_active", 1.0),
        ("eventbus_store_events", 3.0),
        ("eventbus_publish_duration_seconds_count", 1.0),
    ] {
        assert_eq!(
            sample(&text, series),
            Some(expected),
            "{series} in:\n{text}"
        );
    }
    assert!(sample(&text, "eventbus_connections_active").unwrap() >= 1.0);
    assert!(sample(&text, "eventbus_store_bytes").unwrap() > 0.0);

    drop(stream);
    eventually("the subscription counted as closed", WAIT, || async {
        let text = bus.metrics().await;
        (sample(&text, "eventbus_subscriptions_active") == Some(0.0)).then_some(())
    })
    .await;
    bus.stop().await;
}

/// A client publishing to ever new topic families adds at most the limit's worth of label
/// values; the rest is counted under `_overflow`, so nothing is lost and memory stays bounded.
#[tokio::test]
async fn invented_topics_cannot_grow_the_label_set() {
    let bus = AdminBus::start().await;
    let mut client = bus.client().await;
    let invented = eventbus::metrics::MAX_TOPIC_FAMILIES + 100;
    for chunk in (0..invented).collect::<Vec<_>>().chunks(100) {
        let batch = chunk
            .iter()
            .map(|i| event(&format!("invented{i}.thing"), b""))
            .collect();
        publish(&mut client, batch).await;
    }
    let text = bus.metrics().await;
    let labelled = text
        .lines()
        .filter(|line| line.starts_with("eventbus_events_published_total{"))
        .count();
    assert_eq!(
        labelled,
        eventbus::metrics::MAX_TOPIC_FAMILIES + 1,
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "eventbus_events_published_total{family=\"_overflow\"}"
        ),
        Some(100.0)
    );
    bus.stop().await;
}
