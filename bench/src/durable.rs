//! `durable`: publishes acknowledged by a durable store, with a fixed number in flight.
//!
//! The bus runs the file store with `--fsync always`: an acknowledgement means the event is on
//! disk. JetStream (file storage) acknowledges once the message is written to its store file,
//! and fsyncs on a timer (every two minutes by default), so it promises less. Each publish is
//! one event: one PublishStream batch on the bus, one JetStream publish.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use eventbus::pb;
use eventbus::sdk::Client;
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Acknowledged events per second through the bus's PublishStream, `in_flight` batches of
/// `batch` events unanswered at most.
pub async fn eventbus(
    url: &str,
    in_flight: usize,
    batch: usize,
    payload: usize,
    count: u64,
    limit: Duration,
) -> Result<(f64, u64)> {
    let client = Client::builder(url)
        .source("bench-durable")
        .connect()
        .await?;
    let event = pb::Event {
        topic: "bench.durable".into(),
        source: "bench-durable".into(),
        data: Bytes::from(vec![7u8; payload]),
        ..Default::default()
    };
    let (requests, receiver) = mpsc::channel::<pb::PublishStreamRequest>(in_flight + 1);
    let mut responses = client
        .bus()
        .publish_stream(ReceiverStream::new(receiver))
        .await?
        .into_inner();
    let start = Instant::now();
    let deadline = start + limit;
    let mut sent = 0u64;
    let mut acked = 0u64;
    let mut outstanding = 0usize;
    let mut request_id = 0u64;
    loop {
        while outstanding < in_flight && sent < count && Instant::now() < deadline {
            request_id += 1;
            let events = vec![event.clone(); batch];
            requests
                .send(pb::PublishStreamRequest { request_id, events })
                .await
                .context("the publish stream closed")?;
            outstanding += 1;
            sent += batch as u64;
        }
        if outstanding == 0 {
            break;
        }
        let response = responses
            .message()
            .await?
            .context("the bus ended the publish stream")?;
        if let Some(pb::publish_stream_response::Result::Error(error)) = response.result {
            anyhow::bail!("batch refused: {}", error.message);
        }
        outstanding -= 1;
        acked += batch as u64;
    }
    Ok((acked as f64 / start.elapsed().as_secs_f64(), acked))
}

/// Acknowledged messages per second into a JetStream file-storage stream, `in_flight`
/// publishes unanswered at most. With `ids`, each message carries a `Nats-Msg-Id` of its own,
/// as the bus's appends do (JetStream then checks and keeps each id for its duplicate window).
pub async fn jetstream(
    url: &str,
    tag: &str,
    in_flight: usize,
    payload: usize,
    count: u64,
    limit: Duration,
    ids: bool,
) -> Result<(f64, u64)> {
    let client = async_nats::connect(url).await?;
    let jetstream = async_nats::jetstream::new(client);
    let subject = format!("bench.durable.{tag}");
    let name = format!("BENCH_{}", tag.replace(['.', '-'], "_"));
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            storage: async_nats::jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|error| anyhow::anyhow!("creating stream {name}: {error}"))?;
    let data = Bytes::from(vec![7u8; payload]);
    let start = Instant::now();
    let deadline = start + limit;
    let mut pending = FuturesUnordered::new();
    let mut sent = 0u64;
    let mut acked = 0u64;
    loop {
        while pending.len() < in_flight && sent < count && Instant::now() < deadline {
            let mut message =
                async_nats::jetstream::message::PublishMessage::build().payload(data.clone());
            if ids {
                message = message.message_id(format!("{tag}-{sent}"));
            }
            let ack = jetstream
                .send_publish(subject.clone(), message)
                .await
                .map_err(|error| anyhow::anyhow!("publish: {error}"))?;
            pending.push(std::future::IntoFuture::into_future(ack));
            sent += 1;
        }
        match pending.next().await {
            Some(ack) => {
                ack.map_err(|error| anyhow::anyhow!("publish ack: {error}"))?;
                acked += 1;
            }
            None => break,
        }
    }
    let rate = acked as f64 / start.elapsed().as_secs_f64();
    let _ = jetstream.delete_stream(&name).await;
    Ok((rate, acked))
}
