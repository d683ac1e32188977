//! The report: markdown tables with ratios, and an SVG chart.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

use crate::results::{Measure, Report, Row};

/// The row every other row of its case is compared with: the bus itself.
fn is_bus(row: &Row) -> bool {
    row.system == "eventbus" || row.system == "eventbus Query RPC"
}

fn is_floor(row: &Row) -> bool {
    row.system.contains("(floor")
}

/// The reference rows of a case: the bus, and the floor (the two-hop relay for round trips).
fn references<'a>(rows: &'a [Row], row: &Row) -> (Option<&'a Row>, Option<&'a Row>) {
    let same = |other: &&Row| other.scenario == row.scenario && other.case == row.case;
    let bus = rows.iter().filter(same).find(|other| is_bus(other));
    let floor = rows
        .iter()
        .filter(same)
        .filter(|other| is_floor(other))
        .find(|other| !other.system.contains("1 hop"));
    (bus, floor)
}

fn ratio(numerator: Option<f64>, denominator: Option<f64>) -> String {
    match (numerator, denominator) {
        (Some(n), Some(d)) if d > 0.0 => format!("{:.2}", n / d),
        _ => "–".into(),
    }
}

fn rate(value: f64) -> String {
    if value >= 1e6 {
        format!("{:.2} M/s", value / 1e6)
    } else if value >= 1e3 {
        format!("{:.1} k/s", value / 1e3)
    } else {
        format!("{value:.0}/s")
    }
}

fn micros(value: f64) -> String {
    if value >= 1000.0 {
        format!("{:.2} ms", value / 1000.0)
    } else {
        format!("{value:.1} µs")
    }
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

pub fn markdown(report: &Report) -> String {
    let mut out = String::new();
    let m = &report.machine;
    let _ = writeln!(out, "Command: `{}`\n", report.command);
    let _ = writeln!(
        out,
        "Machine: {} × {}, {} memory, Linux {}; {}; {}.\n",
        m.cpus, m.cpu_model, m.memory, m.kernel, m.nats_server, m.redis_server
    );
    let rows = &report.rows;
    let scenarios = ["reqrep", "pubsub", "durable", "subscriptions", "scenario"];
    for scenario in scenarios {
        let these: Vec<&Row> = rows.iter().filter(|r| r.scenario == scenario).collect();
        if these.is_empty() {
            continue;
        }
        match scenario {
            "reqrep" | "scenario" => {
                let title = if scenario == "reqrep" {
                    "reqrep: sequential round trips, 64-byte payload"
                } else {
                    "scenario: GET /users/{id}/products, sequential"
                };
                let _ = writeln!(out, "### {title}\n");
                let _ = writeln!(out, "| path | p50 | p90 | p99 | max | n | server CPU per round trip | p50 ÷ two-hop floor | eventbus p50 ÷ this | eventbus p99 ÷ this |");
                let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
                for row in these {
                    let (bus, floor) = references(rows, row);
                    match &row.measure {
                        Measure::Latency(l) => {
                            let bus_p99 = bus.and_then(|b| match &b.measure {
                                Measure::Latency(l) => Some(l.p99_us),
                                _ => None,
                            });
                            let _ = writeln!(
                                out,
                                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                                row.system,
                                micros(l.p50_us),
                                micros(l.p90_us),
                                micros(l.p99_us),
                                micros(l.max_us),
                                l.count,
                                l.server_cpu_us.map_or("–".into(), micros),
                                ratio(Some(l.p50_us), floor.and_then(Row::headline)),
                                ratio(bus.and_then(Row::headline), Some(l.p50_us)),
                                ratio(bus_p99, Some(l.p99_us)),
                            );
                        }
                        Measure::Skipped { reason } => {
                            let _ = writeln!(
                                out,
                                "| {} | skipped: {reason} | | | | | | | | |",
                                row.system
                            );
                        }
                        _ => {}
                    }
                }
            }
            "pubsub" | "durable" => {
                let title = if scenario == "pubsub" {
                    "pubsub: 128-byte events, events/s received (summed over subscribers), median of rounds"
                } else {
                    "durable: publish with acknowledgement, one 128-byte event per publish, acknowledged events/s, median of rounds"
                };
                let _ = writeln!(out, "### {title}\n");
                let _ = writeln!(
                    out,
                    "| case | system | events/s | rounds | server CPU per event | eventbus ÷ this | this ÷ floor |"
                );
                let _ = writeln!(out, "|---|---|---:|---|---:|---:|---:|");
                for row in these {
                    let (bus, floor) = references(rows, row);
                    match &row.measure {
                        Measure::Rate {
                            median,
                            rounds,
                            server_cpu_us,
                        } => {
                            let rounds: Vec<String> = rounds.iter().map(|r| rate(*r)).collect();
                            let _ = writeln!(
                                out,
                                "| {} | {} | {} | {} | {} | {} | {} |",
                                row.case,
                                row.system,
                                rate(*median),
                                rounds.join(", "),
                                server_cpu_us.map_or("–".into(), |us| format!("{us:.2} µs")),
                                ratio(bus.and_then(Row::headline), Some(*median)),
                                ratio(Some(*median), floor.and_then(Row::headline)),
                            );
                        }
                        Measure::Skipped { reason } => {
                            let _ = writeln!(
                                out,
                                "| {} | {} | skipped: {reason} | | | | |",
                                row.case, row.system
                            );
                        }
                        _ => {}
                    }
                }
            }
            _ => {
                let _ = writeln!(out, "### subscriptions: idle subscriptions, growth of the server's resident memory (VmRSS)\n");
                let _ = writeln!(
                    out,
                    "| case | system | RSS growth | per subscription | eventbus ÷ this |"
                );
                let _ = writeln!(out, "|---|---|---:|---:|---:|");
                for row in these {
                    let (bus, _) = references(rows, row);
                    if let Measure::Memory {
                        bytes,
                        per_item_bytes,
                    } = &row.measure
                    {
                        let _ = writeln!(
                            out,
                            "| {} | {} | {} | {:.0} B | {} |",
                            row.case,
                            row.system,
                            megabytes(*bytes),
                            per_item_bytes,
                            ratio(bus.and_then(Row::headline), Some(*bytes as f64)),
                        );
                    }
                }
            }
        }
        out.push('\n');
    }
    out
}

/// One bar of a panel.
struct Bar {
    label: String,
    value: f64,
    color: RGBColor,
}

fn color_of(system: &str) -> RGBColor {
    if system.contains("baseline") {
        RGBColor(160, 160, 200)
    } else if system.starts_with("eventbus") {
        RGBColor(40, 90, 200)
    } else if system.contains("NATS") {
        RGBColor(60, 160, 90)
    } else if system.contains("Redis") {
        RGBColor(200, 60, 50)
    } else {
        RGBColor(150, 150, 150)
    }
}

/// An SVG with one panel per measured scenario: horizontal bars, labelled with their value.
pub fn chart(report: &Report, path: &Path) -> Result<()> {
    let mut panels: Vec<(String, Vec<Bar>)> = Vec::new();
    let latency_bars = |scenario: &str| -> Vec<Bar> {
        report
            .rows
            .iter()
            .filter(|r| r.scenario == scenario)
            .filter_map(|r| match &r.measure {
                Measure::Latency(l) => Some(Bar {
                    label: format!(
                        "{}: p50 {} · p99 {}",
                        r.system,
                        micros(l.p50_us),
                        micros(l.p99_us)
                    ),
                    value: l.p50_us,
                    color: color_of(&r.system),
                }),
                _ => None,
            })
            .collect()
    };
    let rate_bars = |scenario: &str| -> Vec<Bar> {
        report
            .rows
            .iter()
            .filter(|r| r.scenario == scenario)
            .filter_map(|r| match &r.measure {
                Measure::Rate { median, .. } => Some(Bar {
                    label: format!("{} · {}: {}", r.case, r.system, rate(*median)),
                    value: *median,
                    color: color_of(&r.system),
                }),
                _ => None,
            })
            .collect()
    };
    let memory_bars = report
        .rows
        .iter()
        .filter_map(|r| match &r.measure {
            Measure::Memory { bytes, .. } => Some(Bar {
                label: format!("{}: {}", r.system, megabytes(*bytes)),
                value: *bytes as f64 / 1e6,
                color: color_of(&r.system),
            }),
            _ => None,
        })
        .collect::<Vec<_>>();
    for (title, bars) in [
        (
            "reqrep: round-trip p50, µs (shorter is better)",
            latency_bars("reqrep"),
        ),
        (
            "pubsub: events/s received (longer is better)",
            rate_bars("pubsub"),
        ),
        (
            "durable: acknowledged events/s (longer is better)",
            rate_bars("durable"),
        ),
        (
            "subscriptions: server memory growth, MB (shorter is better)",
            memory_bars,
        ),
        (
            "scenario: GET /users/{id}/products p50, µs",
            latency_bars("scenario"),
        ),
    ] {
        if !bars.is_empty() {
            panels.push((title.to_string(), bars));
        }
    }
    if panels.is_empty() {
        return Ok(());
    }
    let bar_height = 22u32;
    let heights: Vec<u32> = panels
        .iter()
        .map(|(_, bars)| 70 + bar_height * bars.len() as u32)
        .collect();
    let total: u32 = heights.iter().sum();
    let root = SVGBackend::new(path, (1100, total)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut rest = root;
    for ((title, bars), height) in panels.iter().zip(&heights) {
        let (area, below) = rest.split_vertically(*height);
        rest = below;
        let max = bars.iter().map(|b| b.value).fold(0.0, f64::max).max(1e-9);
        let n = bars.len() as f64;
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(24)
            .y_label_area_size(8)
            .build_cartesian_2d(0.0..max * 1.02, 0.0..n)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .disable_y_axis()
            .x_labels(8)
            .x_label_formatter(&|v| {
                if max >= 1e6 {
                    format!("{:.1}M", v / 1e6)
                } else if max >= 1e4 {
                    format!("{:.0}k", v / 1e3)
                } else {
                    format!("{v:.0}")
                }
            })
            .draw()?;
        for (i, bar) in bars.iter().enumerate() {
            let top = n - i as f64 - 0.1;
            let bottom = top - 0.8;
            chart.draw_series(std::iter::once(Rectangle::new(
                [(0.0, bottom), (bar.value, top)],
                bar.color.mix(0.35).filled(),
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                bar.label.clone(),
                (max * 0.005, top - 0.15),
                ("sans-serif", 13).into_font().color(&BLACK),
            )))?;
        }
    }
    Ok(())
}
