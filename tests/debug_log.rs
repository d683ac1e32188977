//! The bus's log at debug level, read from a real process's stderr: every publish and delivery
//! is one line with its topic, sequence, correlation id and subscriber, and the transport crates
//! stay quiet.

mod bus_process;
mod support;

use std::time::{Duration, Instant};

use bus_process::BusProcess;
use eventbus::pb;
use support::*;

/// The first log line whose message is `message` and whose fields hold `fields`, polled until
/// [`WAIT`].
fn wait_for_line(bus: &BusProcess, message: &str, fields: &[(&str, &str)]) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let found = bus.logs().into_iter().find(|line| {
            line["fields"]["message"] == message
                && fields.iter().all(|(key, value)| {
                    let field = &line["fields"][key];
                    field.as_str() == Some(value)
                        || field.as_u64().is_some_and(|n| n.to_string() == *value)
                })
        });
        if let Some(line) = found {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no {message:?} line with {fields:?} in {:#?}",
            bus.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn a_publish_and_its_delivery_are_visible_at_debug() {
    let bus = BusProcess::start(&["--log-level", "debug"], None);
    let mut client = Client::connect(bus.url()).await.unwrap();
    let (_, mut stream) = subscribe(
        &mut client,
        pb::SubscribeRequest {
            subscriber: "watcher".into(),
            ..request("orders.>")
        },
    )
    .await;
    let sequence = publish_one(
        &mut client,
        pb::Event {
            topic: "orders.created".into(),
            source: "shop".into(),
            correlation_id: "corr-42".into(),
            ..Default::default()
        },
    )
    .await;
    next_event(&mut stream).await;

    let sequence = sequence.to_string();
    let published = wait_for_line(
        &bus,
        "published",
        &[
            ("topic", "orders.created"),
            ("correlation_id", "corr-42"),
            ("source", "shop"),
            ("sequence", &sequence),
        ],
    );
    assert_eq!(published["level"], "DEBUG", "{published}");
    wait_for_line(
        &bus,
        "delivered",
        &[
            ("topic", "orders.created"),
            ("correlation_id", "corr-42"),
            ("subscriber", "watcher"),
            ("sequence", &sequence),
        ],
    );

    // HTTP/2 and connection plumbing stay at warn: the debug log is the bus's own.
    let noisy: Vec<_> = bus
        .logs()
        .into_iter()
        .filter(|line| {
            let target = line["target"].as_str().unwrap_or("");
            ["h2", "hyper", "tower", "tonic"]
                .iter()
                .any(|name| target.starts_with(name))
                && matches!(line["level"].as_str(), Some("DEBUG" | "TRACE" | "INFO"))
        })
        .collect();
    assert!(noisy.is_empty(), "transport lines at debug: {noisy:#?}");
}
