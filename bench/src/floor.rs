//! The floor: what plain TCP on this machine does, so every figure is also a ratio to the
//! physical limit. A bus round trip is at least two network round trips (asker → bus →
//! responder, and back), so the round-trip floor is a two-hop relay; a bus's pub/sub is at
//! least a relay of a byte stream from publisher through the bus to the subscriber.

use std::time::{Duration, Instant};

use anyhow::Result;
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::results::record;

/// A server task that echoes fixed-size messages on each connection.
async fn echo_server(size: usize) -> Result<(std::net::SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let _ = socket.set_nodelay(true);
            tokio::spawn(async move {
                let mut buffer = vec![0u8; size];
                while socket.read_exact(&mut buffer).await.is_ok() {
                    if socket.write_all(&buffer).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    Ok((addr, task))
}

/// A relay: each accepted connection is joined to a new connection to `upstream`, both ways.
async fn relay(upstream: std::net::SocketAddr) -> Result<(std::net::SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let _ = inbound.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(mut outbound) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = outbound.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    Ok((addr, task))
}

/// Sequential round trips of `size`-byte messages: direct (`hops` 1) or through a relay
/// (`hops` 2). Stops after `count` round trips or `limit`, whichever comes first.
pub async fn ping_pong(
    hops: u8,
    size: usize,
    count: u64,
    limit: Duration,
    histogram: &mut Histogram<u64>,
) -> Result<()> {
    let (echo, echo_task) = echo_server(size).await?;
    let (target, relay_task) = if hops >= 2 {
        let (addr, task) = relay(echo).await?;
        (addr, Some(task))
    } else {
        (echo, None)
    };
    let mut socket = TcpStream::connect(target).await?;
    socket.set_nodelay(true)?;
    let message = vec![7u8; size];
    let mut answer = vec![0u8; size];
    let deadline = Instant::now() + limit;
    for _ in 0..count {
        let start = Instant::now();
        socket.write_all(&message).await?;
        socket.read_exact(&mut answer).await?;
        record(histogram, start.elapsed());
        if Instant::now() > deadline {
            break;
        }
    }
    drop(socket);
    echo_task.abort();
    if let Some(task) = relay_task {
        task.abort();
    }
    Ok(())
}

/// Streams `count` messages of `size` bytes from a writer through a relay to a reader, buffered
/// as a bus client would, and returns messages per second received.
pub async fn stream_relay(size: usize, count: u64, limit: Duration) -> Result<f64> {
    let sink = TcpListener::bind("127.0.0.1:0").await?;
    let sink_addr = sink.local_addr()?;
    let (relay_addr, relay_task) = relay(sink_addr).await?;
    let writer = TcpStream::connect(relay_addr).await?;
    let (reader, _) = sink.accept().await?;
    let start = Instant::now();
    let deadline = start + limit;
    let write = tokio::spawn(async move {
        let mut writer = BufWriter::with_capacity(64 * 1024, writer);
        let message = vec![7u8; size];
        for _ in 0..count {
            if writer.write_all(&message).await.is_err() || Instant::now() > deadline {
                break;
            }
        }
        let _ = writer.flush().await;
    });
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let mut message = vec![0u8; size];
    let mut received = 0u64;
    while received < count && Instant::now() <= deadline {
        match tokio::time::timeout_at(deadline.into(), reader.read_exact(&mut message)).await {
            Ok(Ok(_)) => received += 1,
            _ => break,
        }
    }
    let elapsed = start.elapsed();
    write.abort();
    relay_task.abort();
    Ok(received as f64 / elapsed.as_secs_f64())
}
