//! W3C trace context through the bus: from request metadata (or the event's own attributes)
//! into the stored event, out to subscribers, and through a query's responder back to the asker.

mod common;
mod support;

use std::time::Duration;

use common::{event, TestBus};
use eventbus::pb;
use eventbus::sdk::{self, Reply, ServeOptions};
use support::*;
use tokio_util::sync::CancellationToken;

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const OWN: &str = "00-11111111111111111111111111111111-2222222222222222-01";

fn with_trace<T>(message: T, traceparent: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse().unwrap());
    request
        .metadata_mut()
        .insert("tracestate", "vendor=abc".parse().unwrap());
    request
}

#[tokio::test]
async fn metadata_context_reaches_subscribers_unless_the_event_has_its_own() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let (_, mut stream) = subscribe(&mut client, request("orders.>")).await;
    let mut own = event("orders.paid", b"");
    own.attributes.insert("traceparent".into(), OWN.into());
    client
        .publish(with_trace(
            pb::PublishRequest {
                events: vec![event("orders.created", b""), own],
            },
            PARENT,
        ))
        .await
        .unwrap();
    // A malformed context is ignored, not stored.
    client
        .publish(with_trace(
            pb::PublishRequest {
                events: vec![event("orders.cancelled", b"")],
            },
            "00-not-a-trace",
        ))
        .await
        .unwrap();

    let received = events(&mut stream, 3).await;
    assert_eq!(received[0].attributes["traceparent"], PARENT);
    assert_eq!(received[0].attributes["tracestate"], "vendor=abc");
    assert_eq!(received[1].attributes["traceparent"], OWN);
    assert!(!received[1].attributes.contains_key("tracestate"));
    assert!(!received[2].attributes.contains_key("traceparent"));
    assert_eq!(sdk::traceparent(&received[0]), Some(PARENT));
}

/// asker → bus → responder → bus → asker: the query carries the asker's context, the SDK's
/// responder carries it into the reply, and the answer has it as metadata too.
#[tokio::test]
async fn a_query_carries_the_context_to_the_responder_and_back() {
    let bus = TestBus::start().await;
    let responder_client = sdk::Client::builder(bus.url())
        .source("prices")
        .connect()
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let responder = responder_client
        .responder("prices.query", ServeOptions::default().group("prices"))
        .await
        .unwrap();
    let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let serving = tokio::spawn(responder.run(
        move |query: pb::Event| {
            let seen_tx = seen_tx.clone();
            async move {
                seen_tx
                    .send(sdk::traceparent(&query).map(str::to_owned))
                    .unwrap();
                Ok::<_, String>(Reply::new("42"))
            }
        },
        stop.clone().cancelled_owned(),
    ));

    let mut client = bus.client().await;
    let answer = client
        .query(with_trace(
            pb::QueryRequest {
                event: Some(event("prices.query", b"?")),
                timeout: millis(5000),
            },
            PARENT,
        ))
        .await
        .unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, seen.recv()).await.unwrap(),
        Some(Some(PARENT.to_owned()))
    );
    assert_eq!(answer.metadata().get("traceparent").unwrap(), PARENT);
    let reply = answer.into_inner().reply.unwrap();
    assert_eq!(reply.attributes["traceparent"], PARENT);
    assert_eq!(reply.attributes["tracestate"], "vendor=abc");

    // Through the SDK alone: a context set on the query comes back on the reply.
    let asker = sdk::Client::connect(bus.url()).await.unwrap();
    let reply = asker
        .event("prices.query")
        .trace_context(OWN, None)
        .query(Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(sdk::traceparent(&reply), Some(OWN));

    stop.cancel();
    tokio::time::timeout(WAIT, serving)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
