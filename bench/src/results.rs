//! What a run measured: one [`Row`] per scenario, case and system, with every round kept so a
//! reader can see the spread, plus how the rows become ratios.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// A latency distribution, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    /// The server's CPU time per round trip, when the server is a process of its own.
    pub server_cpu_us: Option<f64>,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// A new histogram for round-trip times in nanoseconds (1 ns to 60 s, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

pub fn record(histogram: &mut Histogram<u64>, elapsed: Duration) {
    histogram.saturating_record((elapsed.as_nanos() as u64).max(1));
}

impl Latency {
    pub fn from_histogram(histogram: &Histogram<u64>) -> Latency {
        let us = |nanos: u64| nanos as f64 / 1000.0;
        Latency {
            count: histogram.len(),
            server_cpu_us: None,
            p50_us: us(histogram.value_at_quantile(0.50)),
            p90_us: us(histogram.value_at_quantile(0.90)),
            p99_us: us(histogram.value_at_quantile(0.99)),
            max_us: us(histogram.max()),
        }
    }
}

/// What one row holds.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Measure {
    /// Round trips, every round's samples merged.
    Latency(Latency),
    /// Events per second: the median round, and every round; and the server's CPU time per
    /// event (median of rounds), which a busy shared machine disturbs far less than the rate.
    Rate {
        median: f64,
        rounds: Vec<f64>,
        server_cpu_us: Option<f64>,
    },
    /// Growth of the server's resident memory.
    Memory { bytes: u64, per_item_bytes: f64 },
    /// Not measured, and why.
    Skipped { reason: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: &'static str,
    /// e.g. `1→8`, `Query RPC`, `256 in flight`.
    pub case: String,
    pub system: String,
    pub measure: Measure,
}

impl Row {
    pub fn rate(
        scenario: &'static str,
        case: impl Into<String>,
        system: impl Into<String>,
        rounds: Vec<f64>,
        cpu_us: Vec<f64>,
    ) -> Row {
        let rate = median(&rounds);
        Row {
            scenario,
            case: case.into(),
            system: system.into(),
            measure: Measure::Rate {
                median: rate,
                rounds,
                server_cpu_us: (!cpu_us.is_empty()).then(|| median(&cpu_us)),
            },
        }
    }

    pub fn skipped(
        scenario: &'static str,
        case: impl Into<String>,
        system: impl Into<String>,
        reason: impl Into<String>,
    ) -> Row {
        Row {
            scenario,
            case: case.into(),
            system: system.into(),
            measure: Measure::Skipped {
                reason: reason.into(),
            },
        }
    }

    /// The number ratios are taken of: p50 for latency, the median for rates, bytes for memory.
    pub fn headline(&self) -> Option<f64> {
        match &self.measure {
            Measure::Latency(latency) => Some(latency.p50_us),
            Measure::Rate { median, .. } => Some(*median),
            Measure::Memory { bytes, .. } => Some(*bytes as f64),
            Measure::Skipped { .. } => None,
        }
    }
}

fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub command: String,
    pub machine: Machine,
    pub settings: serde_json::Value,
    pub rows: Vec<Row>,
}

/// The machine the run was on.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory: String,
    pub kernel: String,
    pub nats_server: String,
    pub redis_server: String,
}

impl Machine {
    pub fn read(nats: &std::path::Path, redis: &std::path::Path) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| line.strip_prefix("model name"))
            .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find_map(|line| line.strip_prefix("MemTotal:"))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| format!("{:.1} GiB", kib as f64 / (1024.0 * 1024.0)))
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        Machine {
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model,
            memory,
            kernel,
            nats_server: version_of(nats, "--version"),
            redis_server: version_of(redis, "--version"),
        }
    }
}

fn version_of(program: &std::path::Path, flag: &str) -> String {
    std::process::Command::new(program)
        .arg(flag)
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "not found".into())
}
