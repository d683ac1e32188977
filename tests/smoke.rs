//! The shortest path through the bus: publish, subscribe, query, over real gRPC.

mod common;

use std::time::Duration;

use common::{event, TestBus};
use eventbus::pb;
use eventbus::pb::subscribe_response::Message;

#[tokio::test]
async fn a_subscriber_receives_what_is_published_after_its_confirmation() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            topic: "greeting.*".into(),
            subscriber: "smoke".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.message, Some(Message::Subscribed(_))));

    let published = client
        .publish(pb::PublishRequest {
            events: vec![event("greeting.hello", b"hi"), event("other", b"no")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(published.sequences, vec![1, 2]);

    let next = stream.message().await.unwrap().unwrap();
    let Some(Message::Event(received)) = next.message else {
        panic!("expected an event, got {next:?}");
    };
    assert_eq!(received.topic, "greeting.hello");
    assert_eq!(received.sequence, 1);
    assert_eq!(&received.data[..], b"hi");
    bus.stop(Duration::from_secs(10)).await;
}
