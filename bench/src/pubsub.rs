//! `pubsub`: streamed events from publishers to subscribers, 128-byte payloads, events per
//! second received (summed over subscribers).
//!
//! Every system here ends or drops a subscriber that falls too far behind (the bus with
//! RESOURCE_EXHAUSTED, NATS as a slow consumer, Redis at its output-buffer limit), so the harness
//! applies the same end-to-end flow control to all of them: a publisher never gets more than
//! `window` events ahead of the slowest subscriber. That measures sustained delivery, not how
//! much a server can buffer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use eventbus::pb;
use eventbus::sdk::{Client, SubscribeOptions};
use futures_util::StreamExt as _;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;

/// The systems that take part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Eventbus,
    Nats,
    Redis,
}

/// One pub/sub shape.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub publishers: usize,
    pub subscribers: usize,
}

impl Shape {
    pub fn label(&self) -> String {
        format!("{}→{}", self.publishers, self.subscribers)
    }
}

/// How a measurement is bounded and paced.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Events published in all (split over the publishers).
    pub events: u64,
    pub payload: usize,
    /// Events a publisher sends per batch (PublishStream batch, Redis pipeline).
    pub batch: usize,
    /// Most events published and not yet received by the slowest subscriber.
    pub window: u64,
    pub limit: Duration,
}

/// Received counts, shared by subscribers (who count) and publishers (who wait for room).
struct Flow {
    received: Vec<AtomicU64>,
    sent: AtomicU64,
    progress: Notify,
    window: u64,
    deadline: Instant,
}

impl Flow {
    fn slowest(&self) -> u64 {
        self.received
            .iter()
            .map(|count| count.load(Ordering::Acquire))
            .min()
            .unwrap_or(0)
    }

    /// Waits until `events` more may be sent, then counts them as sent. False once past the
    /// deadline.
    async fn reserve(&self, events: u64) -> bool {
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let sent = self.sent.load(Ordering::Acquire);
            if sent + events <= self.slowest() + self.window {
                self.sent.fetch_add(events, Ordering::AcqRel);
                return true;
            }
            if Instant::now() > self.deadline {
                return false;
            }
            // The timeout only guards against a subscriber that died without a word.
            let _ = tokio::time::timeout(Duration::from_millis(20), notified).await;
        }
    }

    fn count(&self, subscriber: usize) -> u64 {
        let now = self.received[subscriber].fetch_add(1, Ordering::AcqRel) + 1;
        if now.is_multiple_of(128) {
            self.progress.notify_waiters();
        }
        now
    }
}

/// Runs one measurement with the publishers on `pub_url` and the subscribers on `sub_url` (the
/// same URL but for two nodes of a clustered bus); returns events per second received, summed
/// over subscribers, and the events received.
pub async fn run(
    system: System,
    pub_url: &str,
    sub_url: &str,
    shape: Shape,
    load: Load,
    tag: &str,
) -> Result<(f64, u64)> {
    let url = sub_url;
    let topic = format!("bench.ps.{tag}");
    let per_subscriber = load.events;
    let flow = Arc::new(Flow {
        received: (0..shape.subscribers).map(|_| AtomicU64::new(0)).collect(),
        sent: AtomicU64::new(0),
        progress: Notify::new(),
        window: load.window,
        deadline: Instant::now() + load.limit,
    });

    // Subscribers first, each on its own connection, each confirmed before anything is sent.
    let mut subscribers = JoinSet::new();
    for index in 0..shape.subscribers {
        let flow = flow.clone();
        match system {
            System::Eventbus => {
                let client = Client::builder(url).source("bench-sub").connect().await?;
                let mut subscription = client
                    .subscribe_with(topic.clone(), SubscribeOptions::new().buffer(1024))
                    .await?;
                subscribers.spawn(async move {
                    while flow.received[index].load(Ordering::Relaxed) < per_subscriber {
                        let next = tokio::time::timeout_at(
                            flow.deadline.into(),
                            subscription.next_event(),
                        )
                        .await;
                        match next {
                            Ok(Some(Ok(_))) => {
                                flow.count(index);
                            }
                            Ok(Some(Err(error))) => return Err(anyhow::Error::from(error)),
                            _ => break,
                        }
                    }
                    flow.progress.notify_waiters();
                    Ok(Instant::now())
                });
            }
            System::Nats => {
                let client = async_nats::connect(url).await?;
                let mut subscription = client.subscribe(topic.clone()).await?;
                client.flush().await?;
                subscribers.spawn(async move {
                    let _keep = client;
                    while flow.received[index].load(Ordering::Relaxed) < per_subscriber {
                        match tokio::time::timeout_at(flow.deadline.into(), subscription.next())
                            .await
                        {
                            Ok(Some(_)) => {
                                flow.count(index);
                            }
                            _ => break,
                        }
                    }
                    flow.progress.notify_waiters();
                    Ok(Instant::now())
                });
            }
            System::Redis => {
                let client = redis::Client::open(format!(
                    "redis://{}/",
                    url.trim_start_matches("redis://")
                ))?;
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(&topic).await?;
                subscribers.spawn(async move {
                    let mut messages = pubsub.into_on_message();
                    while flow.received[index].load(Ordering::Relaxed) < per_subscriber {
                        match tokio::time::timeout_at(flow.deadline.into(), messages.next()).await {
                            Ok(Some(_)) => {
                                flow.count(index);
                            }
                            _ => break,
                        }
                    }
                    flow.progress.notify_waiters();
                    Ok(Instant::now())
                });
            }
        }
    }

    let start = Instant::now();
    let mut publishers = JoinSet::new();
    let share = load.events / shape.publishers as u64;
    for index in 0..shape.publishers {
        let count = if index == 0 {
            load.events - share * (shape.publishers as u64 - 1)
        } else {
            share
        };
        let flow = flow.clone();
        let topic = topic.clone();
        let url = pub_url.to_string();
        publishers.spawn(async move {
            match system {
                System::Eventbus => publish_eventbus(&url, &topic, count, load, &flow).await,
                System::Nats => publish_nats(&url, &topic, count, load, &flow).await,
                System::Redis => publish_redis(&url, &topic, count, load, &flow).await,
            }
        });
    }
    while let Some(published) = publishers.join_next().await {
        published.context("a publisher panicked")??;
    }
    let mut last = start;
    while let Some(done) = subscribers.join_next().await {
        last = last.max(done.context("a subscriber panicked")??);
    }
    let received: u64 = flow
        .received
        .iter()
        .map(|count| count.load(Ordering::Acquire))
        .sum();
    let elapsed = last.duration_since(start).as_secs_f64().max(1e-9);
    Ok((received as f64 / elapsed, received))
}

fn eventbus_batch(topic: &str, load: &Load) -> Vec<pb::Event> {
    let data = Bytes::from(vec![7u8; load.payload]);
    (0..load.batch)
        .map(|_| pb::Event {
            topic: topic.to_string(),
            source: "bench-pub".to_string(),
            data: data.clone(),
            ..Default::default()
        })
        .collect()
}

/// Batches over one PublishStream, answers read by a second task.
async fn publish_eventbus(
    url: &str,
    topic: &str,
    count: u64,
    load: Load,
    flow: &Flow,
) -> Result<()> {
    let client = Client::builder(url).source("bench-pub").connect().await?;
    let template = eventbus_batch(topic, &load);
    let (requests, receiver) = mpsc::channel::<pb::PublishStreamRequest>(16);
    let mut bus = client.bus();
    let responses = tokio::spawn(async move {
        let mut responses = bus
            .publish_stream(ReceiverStream::new(receiver))
            .await?
            .into_inner();
        while let Some(response) = responses.message().await? {
            if let Some(pb::publish_stream_response::Result::Error(error)) = response.result {
                anyhow::bail!("batch {} refused: {}", response.request_id, error.message);
            }
        }
        Ok(())
    });
    let mut sent = 0u64;
    let mut request_id = 0;
    while sent < count {
        let take = (count - sent).min(load.batch as u64);
        if !flow.reserve(take).await {
            break;
        }
        request_id += 1;
        let events = template[..take as usize].to_vec();
        if requests
            .send(pb::PublishStreamRequest { request_id, events })
            .await
            .is_err()
        {
            break;
        }
        sent += take;
    }
    drop(requests);
    responses.await.context("the answer reader panicked")?
}

async fn publish_nats(url: &str, topic: &str, count: u64, load: Load, flow: &Flow) -> Result<()> {
    let client = async_nats::connect(url).await?;
    let payload = Bytes::from(vec![7u8; load.payload]);
    let subject = async_nats::Subject::from(topic);
    let mut sent = 0u64;
    while sent < count {
        let take = (count - sent).min(load.batch as u64);
        if !flow.reserve(take).await {
            break;
        }
        for _ in 0..take {
            client.publish(subject.clone(), payload.clone()).await?;
        }
        sent += take;
    }
    client.flush().await?;
    Ok(())
}

async fn publish_redis(url: &str, topic: &str, count: u64, load: Load, flow: &Flow) -> Result<()> {
    let client = redis::Client::open(format!("redis://{}/", url.trim_start_matches("redis://")))?;
    let mut connection = client.get_multiplexed_async_connection().await?;
    let payload = vec![7u8; load.payload];
    let mut sent = 0u64;
    while sent < count {
        let take = (count - sent).min(load.batch as u64);
        if !flow.reserve(take).await {
            break;
        }
        let mut pipe = redis::pipe();
        for _ in 0..take {
            pipe.cmd("PUBLISH").arg(topic).arg(&payload[..]).ignore();
        }
        pipe.query_async::<()>(&mut connection).await?;
        sent += take;
    }
    Ok(())
}
