//! The scenario's latency benchmark (not a timed test): `GET /users/{id}/products` in both
//! modes next to a single bus query round trip, p50/p99, on this machine.
//!
//! ```sh
//! cargo build --release --workspace && target/release/scenario-bench
//! ```
//!
//! Starts its own bus and services (binaries beside this one, or `SCENARIO_BIN_DIR`), waits
//! for the projection to catch up, then runs each measurement sequentially over one kept-alive
//! connection, cycling through the 50 seeded users.

use std::time::{Duration, Instant};

use clap::Parser;
use scenario_tests::{eventually, HttpConnection, Scenario, STARTUP};

/// Measures the scenario's request latency in both modes.
#[derive(Debug, Parser)]
struct Args {
    /// Measured requests per case.
    #[arg(long, default_value_t = 2000)]
    requests: usize,
    /// Unmeasured requests per case first.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Start product-service with this `--reply-delay` (e.g. `5ms`): one slow service.
    #[arg(long, value_parser = humantime::parse_duration)]
    slow_products: Option<Duration>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scenario = Scenario::start().await;
    let delay = args
        .slow_products
        .map(|d| humantime::format_duration(d).to_string());
    let product_args: Vec<&str> = match &delay {
        Some(delay) => vec!["--reply-delay", delay],
        None => vec![],
    };
    let _services = tokio::join!(
        scenario.service("user-service", "user-service", &[]),
        scenario.service("product-service", "product-service", &product_args),
        scenario.service("order-service", "order-service", &[]),
    );
    let rr = scenario
        .query_service("request-reply", "query-rr", &[])
        .await;
    let pr = scenario
        .query_service("projection", "query-projection", &[])
        .await;
    eventually(STARTUP, "the projection to catch up", || async {
        let status = scenario_tests::http(pr.port, "GET", "/status", None, &[])
            .await
            .ok()?
            .json();
        (status["orders"] == 1000 && status["lag"] == 0).then_some(())
    })
    .await;

    let total = args.warmup + args.requests;
    let mut rows = Vec::new();

    let mut samples = Vec::with_capacity(total);
    for i in 0..total {
        let data = format!(r#"{{"user_id": {}}}"#, i % 50 + 1);
        let started = Instant::now();
        scenario
            .client
            .query("user.query", data, Duration::from_secs(5))
            .await?;
        samples.push(started.elapsed());
    }
    rows.push(("one bus query round trip (`user.query`)", samples));

    for (label, port) in [
        ("`GET /users/{id}/products`, request-reply", rr.port),
        ("`GET /users/{id}/products`, projection", pr.port),
    ] {
        let mut connection = HttpConnection::open(port).await?;
        let mut samples = Vec::with_capacity(total);
        for i in 0..total {
            let path = format!("/users/{}/products", i % 50 + 1);
            let started = Instant::now();
            let response = connection.request("GET", &path, None, &[]).await?;
            samples.push(started.elapsed());
            anyhow::ensure!(response.status == 200, "{path}: {}", response.status);
        }
        rows.push((label, samples));
    }

    println!(
        "{} requests per case after {} warm-up, sequential, one connection{}\n",
        args.requests,
        args.warmup,
        match &delay {
            Some(delay) => format!("; product-service answers {delay} late"),
            None => String::new(),
        }
    );
    println!("| case | p50 | p99 | mean |");
    println!("|---|---:|---:|---:|");
    for (label, samples) in rows {
        let mut measured: Vec<Duration> = samples[args.warmup..].to_vec();
        measured.sort();
        let pick = |q: f64| measured[((measured.len() - 1) as f64 * q).round() as usize];
        let mean = measured.iter().sum::<Duration>() / measured.len() as u32;
        println!(
            "| {label} | {} | {} | {} |",
            ms(pick(0.50)),
            ms(pick(0.99)),
            ms(mean)
        );
    }
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}
