//! `eventbus bench pub|sub|query`: load against any running bus, as `nats bench` does for NATS,
//! through the same Rust SDK services use. The repository's `bench/` harness compares the bus
//! with NATS and Redis on one machine; this verb answers "how fast is *my* bus, from here".
//!
//! - `pub`: publishers send events through the SDK's batching publisher (as many in flight as
//!   it allows); latency is from handing an event to the publisher to its acknowledgement.
//! - `sub`: subscribers (one connection each) subscribe, then one publisher sends the events;
//!   each event carries its send time, so latency is publish → receive on this host's clock.
//!   Events that do not arrive within [`QUIET_FOR`] of the last one are reported as missing
//!   and the command exits non-zero.
//! - `query`: a responder (echo) serves the topic from this process; askers send queries one
//!   after another each; latency is the round trip.
//!
//! Each run uses a topic of its own (`bench.<verb>.<random>`) unless `--topic` is given, so
//! runs never see each other's events. Results print as text, or as one JSON object
//! (`--json`), or as CSV with a header (`--csv`); a progress bar is drawn on stderr only when
//! it is a terminal. Latencies are kept in an HDR histogram (microseconds, 3 significant
//! digits).

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Args, Subcommand};
use futures_util::StreamExt as _;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use tokio::sync::Mutex;

use super::client::connect;
use super::ServerArg;
use crate::pb;
use crate::sdk::{Client, PendingPublish, PublisherOptions, Reply, ServeOptions, SubscriptionItem};

/// How long `sub` waits after the last event for the missing ones.
pub const QUIET_FOR: Duration = Duration::from_secs(10);

/// The largest event `--size` allows: the bus's default `max_event_data_bytes`.
const MAX_SIZE: u64 = 1024 * 1024;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Publish throughput and acknowledgement latency.
    Pub(PubArgs),
    /// Delivery throughput and publish-to-receive latency to one or more subscribers.
    Sub(SubArgs),
    /// Query round trips against a responder this command runs.
    Query(QueryArgs),
}

impl BenchCommand {
    /// Where the verb finds the bus.
    pub fn server_arg_mut(&mut self) -> &mut ServerArg {
        match self {
            BenchCommand::Pub(args) => &mut args.common.server,
            BenchCommand::Sub(args) => &mut args.common.server,
            BenchCommand::Query(args) => &mut args.common.server,
        }
    }
}

/// What every bench verb takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    #[command(flatten)]
    pub server: ServerArg,
    /// The topic to use [default: bench.<verb>.<random>, new for each run].
    #[arg(long)]
    pub topic: Option<String>,
    /// Bytes of data per event (and per query).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(8..=MAX_SIZE))]
    pub size: u64,
    /// The source (service name) to publish as.
    #[arg(long, default_value = "eventbus-bench")]
    pub source: String,
    /// Print the result as one JSON object.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// Print the result as CSV: a header line, then one row.
    #[arg(long)]
    pub csv: bool,
}

#[derive(Debug, Clone, Args)]
pub struct PubArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Events to publish, in all.
    #[arg(long, default_value_t = 100_000, value_parser = at_least_one)]
    pub events: u64,
    /// Publishers, each with a connection of its own; the events are split between them.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub publishers: u64,
    /// Batches each publisher has sent and not yet had acknowledged, at most.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=4096))]
    pub max_in_flight: u64,
    /// Events per batch, at most.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub max_batch: u64,
}

#[derive(Debug, Clone, Args)]
pub struct SubArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Events to publish; each subscriber should receive all of them.
    #[arg(long, default_value_t = 100_000, value_parser = at_least_one)]
    pub events: u64,
    /// Subscribers, each with a connection of its own.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub subscribers: u64,
}

#[derive(Debug, Clone, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Queries to ask, in all.
    #[arg(long, default_value_t = 10_000, value_parser = at_least_one)]
    pub queries: u64,
    /// Askers, each asking one query at a time on a connection of its own.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub concurrency: u64,
    /// How long one query may wait for its reply.
    #[arg(long, default_value = "5s", value_parser = crate::timefmt::parse_duration)]
    pub timeout: Duration,
}

/// A count of at least 1 (clap's range parser would print `1..18446744073709551615`).
fn at_least_one(text: &str) -> Result<u64, String> {
    match text.parse::<u64>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(count) => Ok(count),
        Err(error) => Err(format!("{error}: a whole number, at least 1")),
    }
}

/// Latency percentiles, microseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Latency {
    fn of(histogram: &Histogram<u64>) -> Latency {
        Latency {
            p50: histogram.value_at_quantile(0.50),
            p90: histogram.value_at_quantile(0.90),
            p99: histogram.value_at_quantile(0.99),
            p999: histogram.value_at_quantile(0.999),
            max: histogram.max(),
        }
    }
}

/// One run's result, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// `pub`, `sub` or `query`.
    pub verb: &'static str,
    pub server: String,
    pub topic: String,
    /// Events published (`pub`, `sub`) or queries asked (`query`).
    pub count: u64,
    pub size_bytes: u64,
    /// Publishers, subscribers or askers.
    pub clients: u64,
    /// From the first send to the last acknowledgement, delivery or reply.
    pub seconds: f64,
    /// Events (or queries) per second; for `sub`, events received per second summed over the
    /// subscribers.
    pub per_second: f64,
    /// Data bytes per second on the same basis.
    pub bytes_per_second: f64,
    /// `pub`: acknowledgement; `sub`: publish to receive; `query`: round trip.
    pub latency_us: Latency,
    /// `sub`: deliveries that did not arrive (summed over the subscribers); 0 otherwise.
    pub missing: u64,
}

/// Runs a bench verb.
pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    let (report, common) = match command {
        BenchCommand::Pub(args) => (bench_pub(&args).await?, args.common),
        BenchCommand::Sub(args) => (bench_sub(&args).await?, args.common),
        BenchCommand::Query(args) => (bench_query(&args).await?, args.common),
    };
    if common.json {
        println!("{}", serde_json::to_string(&report)?);
    } else if common.csv {
        print!("{}", csv(&report));
    } else {
        print!("{}", text(&report));
    }
    if report.missing > 0 {
        anyhow::bail!(
            "{} deliveries did not arrive within {} of the last one",
            report.missing,
            crate::timefmt::format_duration(QUIET_FOR)
        );
    }
    Ok(())
}

fn topic_for(common: &CommonArgs, verb: &str) -> String {
    common.topic.clone().unwrap_or_else(|| {
        format!(
            "bench.{verb}.{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )
    })
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn record(histogram: &mut Histogram<u64>, took: Duration) {
    let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
    histogram.saturating_record(micros);
}

/// A bar on stderr when it is a terminal; hidden otherwise (a log file or a pipe gets none).
fn progress(total: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let template = format!("{{bar:40}} {{pos}}/{{len}} {what} ({{per_sec}}, {{eta}} left)");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style);
    }
    bar
}

async fn clients(common: &CommonArgs, count: u64) -> anyhow::Result<Vec<Client>> {
    let mut clients = Vec::new();
    for _ in 0..count {
        clients.push(connect(&common.server, &common.source).await?);
    }
    Ok(clients)
}

/// `size` bytes whose first 8 are `at` (nanoseconds since `base`, little-endian).
fn payload(size: u64, base: Instant, at: Instant) -> Vec<u8> {
    let mut data = vec![b'x'; size as usize];
    let nanos = u64::try_from(at.duration_since(base).as_nanos()).unwrap_or(u64::MAX);
    data[..8].copy_from_slice(&nanos.to_le_bytes());
    data
}

/// The send time in a [`payload`].
fn sent_at(data: &[u8], base: Instant) -> Option<Instant> {
    let nanos = u64::from_le_bytes(data.get(..8)?.try_into().ok()?);
    base.checked_add(Duration::from_nanos(nanos))
}

/// What one run did, before it is turned into a [`BenchReport`].
struct Run {
    verb: &'static str,
    topic: String,
    /// Events published or queries asked.
    count: u64,
    clients: u64,
    took: Duration,
    /// What the rate counts: acknowledgements, deliveries or answers.
    done: u64,
    missing: u64,
}

fn report(common: &CommonArgs, run: Run, histogram: &Histogram<u64>) -> BenchReport {
    let seconds = run.took.as_secs_f64().max(f64::EPSILON);
    BenchReport {
        verb: run.verb,
        server: common.server.server.clone(),
        topic: run.topic,
        count: run.count,
        size_bytes: common.size,
        clients: run.clients,
        seconds,
        per_second: run.done as f64 / seconds,
        bytes_per_second: (run.done * common.size) as f64 / seconds,
        latency_us: Latency::of(histogram),
        missing: run.missing,
    }
}

async fn bench_pub(args: &PubArgs) -> anyhow::Result<BenchReport> {
    let common = &args.common;
    let topic = topic_for(common, "pub");
    let clients = clients(common, args.publishers).await?;
    let bar = progress(args.events, "events acknowledged");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (index, client) in clients.into_iter().enumerate() {
        let share = args.events / args.publishers
            + u64::from((index as u64) < args.events % args.publishers);
        let publisher = client.publisher_with(PublisherOptions {
            max_in_flight: args.max_in_flight as usize,
            max_batch: args.max_batch as usize,
            ..PublisherOptions::default()
        });
        let topic = topic.clone();
        let size = common.size as usize;
        let bar = bar.clone();
        tasks.push(tokio::spawn(async move {
            // Acknowledgements come in order: a second task awaits them while this one sends.
            let (pending, mut acks) =
                tokio::sync::mpsc::channel::<(Instant, PendingPublish)>(65_536);
            let waiter = tokio::spawn(async move {
                let mut histogram = histogram();
                while let Some((sent, ack)) = acks.recv().await {
                    ack.await?;
                    record(&mut histogram, sent.elapsed());
                    bar.inc(1);
                }
                Ok::<_, crate::sdk::Error>(histogram)
            });
            let data = bytes::Bytes::from(vec![b'x'; size]);
            for _ in 0..share {
                let event = pb::Event {
                    topic: topic.clone(),
                    data: data.clone(),
                    ..Default::default()
                };
                let sent = Instant::now();
                let ack = publisher.submit(event).await?;
                if pending.send((sent, ack)).await.is_err() {
                    break;
                }
            }
            drop(pending);
            publisher.flush().await?;
            waiter
                .await
                .context("the acknowledgement task")?
                .map_err(Into::into)
        }));
    }
    let mut histogram = histogram();
    for task in tasks {
        let part: anyhow::Result<Histogram<u64>> = task.await.context("a publisher task")?;
        histogram.add(part?).context("merging latencies")?;
    }
    let took = started.elapsed();
    bar.finish_and_clear();
    Ok(report(
        common,
        Run {
            verb: "pub",
            topic,
            count: args.events,
            clients: args.publishers,
            took,
            done: args.events,
            missing: 0,
        },
        &histogram,
    ))
}

async fn bench_sub(args: &SubArgs) -> anyhow::Result<BenchReport> {
    let common = &args.common;
    let topic = topic_for(common, "sub");
    let subscribers = clients(common, args.subscribers).await?;
    let publisher_client = connect(&common.server, &common.source).await?;
    let bar = progress(args.events * args.subscribers, "deliveries");
    let base = Instant::now();
    let last_receive = Arc::new(Mutex::new(base));
    let mut readers = Vec::new();
    for client in subscribers {
        // Subscribed before the first publish: every event is due to every subscriber.
        let mut subscription = client.subscribe(topic.clone()).await?;
        let events = args.events;
        let bar = bar.clone();
        let last_receive = last_receive.clone();
        readers.push(tokio::spawn(async move {
            let mut histogram = histogram();
            let mut received = 0u64;
            while received < events {
                let item = match tokio::time::timeout(QUIET_FOR, subscription.next()).await {
                    Ok(Some(item)) => item?,
                    Ok(None) | Err(_) => break,
                };
                if let SubscriptionItem::Event(event) = item {
                    let now = Instant::now();
                    if let Some(sent) = sent_at(&event.data, base) {
                        record(&mut histogram, now.saturating_duration_since(sent));
                    }
                    received += 1;
                    bar.inc(1);
                    let mut last = last_receive.lock().await;
                    *last = (*last).max(now);
                }
            }
            Ok::<_, crate::sdk::Error>((histogram, received))
        }));
    }
    let publisher = publisher_client.publisher();
    let started = Instant::now();
    let (pending, mut acks) = tokio::sync::mpsc::channel::<PendingPublish>(65_536);
    let waiter = tokio::spawn(async move {
        while let Some(ack) = acks.recv().await {
            ack.await?;
        }
        Ok::<_, crate::sdk::Error>(())
    });
    for _ in 0..args.events {
        let event = pb::Event {
            topic: topic.clone(),
            data: payload(common.size, base, Instant::now()).into(),
            ..Default::default()
        };
        let ack = publisher.submit(event).await?;
        if pending.send(ack).await.is_err() {
            break;
        }
    }
    drop(pending);
    publisher.flush().await?;
    waiter.await.context("the acknowledgement task")??;
    let mut histogram = histogram();
    let mut received = 0;
    for reader in readers {
        let (part, count) = reader.await.context("a subscriber task")??;
        histogram.add(part).context("merging latencies")?;
        received += count;
    }
    let took = last_receive.lock().await.saturating_duration_since(started);
    bar.finish_and_clear();
    Ok(report(
        common,
        Run {
            verb: "sub",
            topic,
            count: args.events,
            clients: args.subscribers,
            took,
            done: received,
            missing: args.events * args.subscribers - received,
        },
        &histogram,
    ))
}

async fn bench_query(args: &QueryArgs) -> anyhow::Result<BenchReport> {
    let common = &args.common;
    let topic = topic_for(common, "query");
    let responder_client = connect(&common.server, &format!("{}-responder", common.source)).await?;
    let responder = responder_client
        .responder(topic.clone(), ServeOptions::default())
        .await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let serving = tokio::spawn(responder.run(
        |query: pb::Event| async move { Ok::<_, String>(Reply::new(query.data)) },
        stop.clone().cancelled_owned(),
    ));
    let askers = clients(common, args.concurrency).await?;
    let bar = progress(args.queries, "queries");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (index, client) in askers.into_iter().enumerate() {
        let share = args.queries / args.concurrency
            + u64::from((index as u64) < args.queries % args.concurrency);
        let topic = topic.clone();
        let data = bytes::Bytes::from(vec![b'q'; common.size as usize]);
        let timeout = args.timeout;
        let bar = bar.clone();
        tasks.push(tokio::spawn(async move {
            let mut histogram = histogram();
            for _ in 0..share {
                let asked = Instant::now();
                client.query(topic.clone(), data.clone(), timeout).await?;
                record(&mut histogram, asked.elapsed());
                bar.inc(1);
            }
            Ok::<_, crate::sdk::Error>(histogram)
        }));
    }
    let mut histogram = histogram();
    let mut failed = None;
    for task in tasks {
        match task.await.context("an asker task")? {
            Ok(part) => histogram.add(part).context("merging latencies")?,
            Err(error) => failed = failed.or(Some(error)),
        }
    }
    let took = started.elapsed();
    stop.cancel();
    serving.await.context("the responder task")??;
    bar.finish_and_clear();
    if let Some(error) = failed {
        return Err(error).context("a query failed");
    }
    Ok(report(
        common,
        Run {
            verb: "query",
            topic,
            count: args.queries,
            clients: args.concurrency,
            took,
            done: args.queries,
            missing: 0,
        },
        &histogram,
    ))
}

fn text(report: &BenchReport) -> String {
    let (unit, latency) = match report.verb {
        "pub" => ("events", "acknowledgement"),
        "sub" => ("deliveries", "publish to receive"),
        _ => ("queries", "round trip"),
    };
    let client = match report.verb {
        "pub" => "publisher",
        "sub" => "subscriber",
        _ => "asker",
    };
    let clients = if report.clients == 1 {
        client.to_owned()
    } else {
        format!("{client}s")
    };
    let l = &report.latency_us;
    format!(
        "bench {verb}: {count} x {size} B on {topic}, {n} {clients}, against {server}\n\
         {seconds:.2} s: {rate:.0} {unit}/s, {mb:.2} MB/s\n\
         {latency} latency (µs): p50 {p50}  p90 {p90}  p99 {p99}  p99.9 {p999}  max {max}\n",
        verb = report.verb,
        count = report.count,
        size = report.size_bytes,
        topic = report.topic,
        n = report.clients,
        server = report.server,
        seconds = report.seconds,
        rate = report.per_second,
        mb = report.bytes_per_second / 1e6,
        p50 = l.p50,
        p90 = l.p90,
        p99 = l.p99,
        p999 = l.p999,
        max = l.max,
    ) + &if report.missing > 0 {
        format!("missing: {} deliveries never arrived\n", report.missing)
    } else {
        String::new()
    }
}

/// The header and one row; fields in [`BenchReport`]'s order, latencies flattened.
fn csv(report: &BenchReport) -> String {
    let l = &report.latency_us;
    let quote = |text: &str| format!("\"{}\"", text.replace('"', "\"\""));
    format!(
        "verb,server,topic,count,size_bytes,clients,seconds,per_second,bytes_per_second,\
         latency_p50_us,latency_p90_us,latency_p99_us,latency_p999_us,latency_max_us,missing\n\
         {},{},{},{},{},{},{:.6},{:.1},{:.1},{},{},{},{},{},{}\n",
        report.verb,
        quote(&report.server),
        quote(&report.topic),
        report.count,
        report.size_bytes,
        report.clients,
        report.seconds,
        report.per_second,
        report.bytes_per_second,
        l.p50,
        l.p90,
        l.p99,
        l.p999,
        l.max,
        report.missing
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_send_time_travels_in_the_payload() {
        let base = Instant::now();
        let at = base + Duration::from_millis(1234);
        let data = payload(64, base, at);
        assert_eq!(data.len(), 64);
        assert_eq!(sent_at(&data, base), Some(at));
        assert_eq!(sent_at(&data[..4], base), None);
    }

    #[test]
    fn csv_has_a_header_and_one_row_of_as_many_fields() {
        let mut histogram = histogram();
        record(&mut histogram, Duration::from_micros(250));
        let common = CommonArgs {
            server: ServerArg {
                server: "http://h:1,http://h:2".into(),
                tls_ca: None,
                tls_cert: None,
                tls_key: None,
                token: None,
            },
            topic: None,
            size: 128,
            source: "s".into(),
            json: false,
            csv: true,
        };
        let report = report(
            &common,
            Run {
                verb: "pub",
                topic: "bench.pub.x".into(),
                count: 10,
                clients: 1,
                took: Duration::from_secs(2),
                done: 10,
                missing: 0,
            },
            &histogram,
        );
        let text = csv(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].split(',').count(), 15);
        assert!(lines[1].starts_with("pub,\"http://h:1,http://h:2\",\"bench.pub.x\",10,128,1,"));
        assert_eq!(report.per_second, 5.0);
        assert_eq!(report.latency_us.p50, 250);
    }
}
