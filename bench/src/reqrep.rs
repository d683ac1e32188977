//! `reqrep`: sequential request/reply round trips with a 64-byte payload. The responder runs on
//! its own connection, as a separate service would; each measurement warms up first.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::Bytes;
use eventbus::sdk::{Client, Reply, ServeOptions};
use futures_util::StreamExt as _;
use hdrhistogram::Histogram;
use tokio::sync::oneshot;

use crate::results::record;

const WARM_UP: u64 = 200;
const TIMEOUT: Duration = Duration::from_secs(5);

/// A responder that echoes every query on `topic`, subscribed when this returns, until the
/// returned sender is dropped.
async fn eventbus_responder(
    url: &str,
    topic: &str,
) -> Result<(oneshot::Sender<()>, tokio::task::JoinHandle<()>)> {
    let client = Client::builder(url)
        .source("bench-responder")
        .connect()
        .await?;
    let responder = client
        .responder(topic, ServeOptions::default().group("bench"))
        .await?;
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = responder
            .run(
                |query| async move { Ok::<_, std::convert::Infallible>(Reply::new(query.data)) },
                async {
                    let _ = stopped.await;
                },
            )
            .await;
    });
    Ok((stop, task))
}

/// Round trips through the bus's Query RPC.
pub async fn eventbus_query(
    url: &str,
    round: usize,
    count: u64,
    limit: Duration,
    histogram: &mut Histogram<u64>,
) -> Result<()> {
    eventbus_query_across(url, url, round, count, limit, histogram).await
}

/// [`eventbus_query`] with the asker on `url` and the responder on `responder_url` (two nodes
/// of a clustered bus).
pub async fn eventbus_query_across(
    url: &str,
    responder_url: &str,
    round: usize,
    count: u64,
    limit: Duration,
    histogram: &mut Histogram<u64>,
) -> Result<()> {
    let topic = format!("bench.echo.q{round}");
    let (stop, responder) = eventbus_responder(responder_url, &topic).await?;
    let client = Client::builder(url).source("bench-asker").connect().await?;
    let payload = Bytes::from(vec![7u8; 64]);
    for _ in 0..WARM_UP {
        client
            .query(topic.clone(), payload.clone(), TIMEOUT)
            .await?;
    }
    let deadline = Instant::now() + limit;
    for _ in 0..count {
        let start = Instant::now();
        let reply = client
            .query(topic.clone(), payload.clone(), TIMEOUT)
            .await?;
        record(histogram, start.elapsed());
        anyhow::ensure!(reply.data.len() == 64, "a short reply");
        if Instant::now() > deadline {
            break;
        }
    }
    drop(stop);
    let _ = responder.await;
    Ok(())
}

/// Round trips through the SDK's own subscribe-and-publish path: the asker subscribes to its
/// reply topic once, then publishes each request (unary Publish) with `reply_to` set and waits
/// for the reply on its subscription.
pub async fn eventbus_pubsub_path(
    url: &str,
    round: usize,
    count: u64,
    limit: Duration,
    histogram: &mut Histogram<u64>,
) -> Result<()> {
    let topic = format!("bench.echo.s{round}");
    let reply_topic = format!("bench.replies.s{round}");
    let (stop, responder) = eventbus_responder(url, &topic).await?;
    let client = Client::builder(url).source("bench-asker").connect().await?;
    let mut replies = client.subscribe(reply_topic.clone()).await?;
    let payload = Bytes::from(vec![7u8; 64]);
    let deadline = Instant::now() + limit;
    for i in 0..WARM_UP + count {
        let correlation_id = i.to_string();
        let start = Instant::now();
        client
            .event(topic.clone())
            .data(payload.clone())
            .reply_to(reply_topic.clone())
            .correlation_id(correlation_id.clone())
            .publish()
            .await?;
        loop {
            let reply = tokio::time::timeout(TIMEOUT, replies.next_event())
                .await
                .context("no reply in time")?
                .context("the reply subscription ended")??;
            if reply.correlation_id == correlation_id {
                break;
            }
        }
        if i >= WARM_UP {
            record(histogram, start.elapsed());
            if Instant::now() > deadline {
                break;
            }
        }
    }
    drop(stop);
    let _ = responder.await;
    Ok(())
}

/// Round trips through NATS core request/reply (async-nats).
pub async fn nats_request(
    url: &str,
    round: usize,
    count: u64,
    limit: Duration,
    histogram: &mut Histogram<u64>,
) -> Result<()> {
    let subject = format!("bench.echo.{round}");
    let responder = async_nats::connect(url).await?;
    let mut requests = responder.subscribe(subject.clone()).await?;
    responder.flush().await?;
    let serve = tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            if let Some(reply) = request.reply {
                if responder.publish(reply, request.payload).await.is_err() {
                    break;
                }
            }
        }
    });
    let client = async_nats::connect(url).await?;
    let payload = Bytes::from(vec![7u8; 64]);
    for _ in 0..WARM_UP {
        client.request(subject.clone(), payload.clone()).await?;
    }
    let deadline = Instant::now() + limit;
    for _ in 0..count {
        let start = Instant::now();
        let reply = client.request(subject.clone(), payload.clone()).await?;
        record(histogram, start.elapsed());
        anyhow::ensure!(reply.payload.len() == 64, "a short reply");
        if Instant::now() > deadline {
            break;
        }
    }
    serve.abort();
    Ok(())
}
