//! `subscriptions`: many idle subscriptions over a few connections, and how much the server's
//! resident memory (VmRSS) grows for them. Each server is fresh for this measurement.

use std::time::Duration;

use anyhow::Result;
use eventbus::sdk::{Client, SubscribeOptions};
use futures_util::future::try_join_all;

use crate::procs::Server;

/// Settles allocations before reading the memory.
const SETTLE: Duration = Duration::from_millis(500);

/// The handles that keep subscriptions open until dropped.
pub struct Held(#[allow(dead_code)] Vec<Box<dyn Send>>);

fn topic(connection: usize, index: usize) -> String {
    format!("bench.idle.c{connection}.s{index}")
}

/// Opens `per_connection` subscriptions on each of `connections` connections and returns the
/// server's memory growth in bytes, with the handles (drop them to close).
pub async fn measure(
    server: &Server,
    system: crate::pubsub::System,
    connections: usize,
    per_connection: usize,
) -> Result<(u64, Held)> {
    tokio::time::sleep(SETTLE).await;
    let before = server.rss_bytes()?;
    let url = match system {
        crate::pubsub::System::Eventbus => server.url(),
        crate::pubsub::System::Nats => format!("nats://{}", server.addr),
        crate::pubsub::System::Redis => format!("redis://{}/", server.addr),
    };
    let opened = try_join_all((0..connections).map(|connection| {
        let url = url.clone();
        async move {
            let mut held: Vec<Box<dyn Send>> = Vec::new();
            match system {
                crate::pubsub::System::Eventbus => {
                    let client = Client::builder(url).source("bench-idle").connect().await?;
                    for index in 0..per_connection {
                        // A small read-ahead: idle subscriptions hold nothing anyway.
                        let subscription = client
                            .subscribe_with(
                                topic(connection, index),
                                SubscribeOptions::new().buffer(1),
                            )
                            .await?;
                        held.push(Box::new(subscription));
                    }
                    held.push(Box::new(client));
                }
                crate::pubsub::System::Nats => {
                    let client = async_nats::connect(url).await?;
                    for index in 0..per_connection {
                        held.push(Box::new(client.subscribe(topic(connection, index)).await?));
                    }
                    client.flush().await?;
                    held.push(Box::new(client));
                }
                crate::pubsub::System::Redis => {
                    let client = redis::Client::open(url)?;
                    let mut pubsub = client.get_async_pubsub().await?;
                    for index in 0..per_connection {
                        pubsub.subscribe(topic(connection, index)).await?;
                    }
                    held.push(Box::new(pubsub));
                }
            }
            anyhow::Ok(held)
        }
    }))
    .await?;
    tokio::time::sleep(SETTLE).await;
    let after = server.rss_bytes()?;
    Ok((
        after.saturating_sub(before),
        Held(opened.into_iter().flatten().collect()),
    ))
}
