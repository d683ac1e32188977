//! The operator's verbs: `eventbus groups`, `eventbus server info` and `eventbus server check`
//! (a monitoring probe in the Nagios plugin style, as `nats server check`: one status line,
//! `STATUS: summary|perfdata`, and the exit code 0 OK, 1 WARNING, 2 CRITICAL). What they print
//! is made by pure functions here, tested below; the commands only fetch and print.

use std::fmt::Write as _;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::format::time_text;
use super::{ServerArg, CLI_SOURCE};
use crate::pb;
use crate::sdk::Client;

/// `eventbus groups`.
#[derive(Debug, Clone, Args)]
pub struct GroupsArgs {
    /// Only this group.
    pub group: Option<String>,
    /// One JSON array of groups (proto field names, `ack_mode` as `auto`/`manual`).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerArg,
}

/// `eventbus server ...`.
#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// What the bus is: version, uptime, storage, log, limits, load, auth.
    Info(InfoArgs),
    /// A monitoring probe: one `OK:`/`WARNING:`/`CRITICAL:` line with perfdata; exit code 0,
    /// 1 or 2 (a bus that cannot be reached is CRITICAL).
    Check(CheckArgs),
}

/// `eventbus server info`.
#[derive(Debug, Clone, Args)]
pub struct InfoArgs {
    /// One JSON object (proto field names; durations in seconds, with a `_seconds` suffix).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub server: ServerArg,
}

/// `eventbus server check`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub thresholds: Thresholds,
    /// How long to wait for the bus before calling it CRITICAL.
    #[arg(long, default_value = "5s", value_parser = crate::timefmt::parse_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub server: ServerArg,
}

/// What `server check` checks; a check without its flag is not made.
#[derive(Debug, Clone, Default, Args)]
pub struct Thresholds {
    /// WARNING at this many open connections or more (the probe's own connection counts).
    #[arg(long, value_name = "N")]
    pub max_connections_warn: Option<u64>,
    /// CRITICAL at this many open connections or more (the probe's own connection counts).
    #[arg(long, value_name = "N")]
    pub max_connections_crit: Option<u64>,
    /// WARNING when the bus has run for less than this (it restarted), e.g. `5m`.
    #[arg(long, value_name = "DURATION", value_parser = crate::timefmt::parse_duration)]
    pub min_uptime: Option<Duration>,
    /// WARNING when a MANUAL-ack group has this many events pending or more (log events after
    /// its cursor, not in flight).
    #[arg(long, value_name = "N")]
    pub max_group_pending_warn: Option<u64>,
    /// CRITICAL when a MANUAL-ack group has this many events pending or more.
    #[arg(long, value_name = "N")]
    pub max_group_pending_crit: Option<u64>,
    /// Check only this group's pending count (every MANUAL-ack group when absent); CRITICAL
    /// when the bus has no such MANUAL-ack group.
    #[arg(long)]
    pub group: Option<String>,
}

fn ack_mode(mode: i32) -> &'static str {
    match pb::AckMode::try_from(mode) {
        Ok(pb::AckMode::Manual) => "manual",
        Ok(pb::AckMode::Auto) | Ok(pb::AckMode::Unspecified) | Err(_) => "auto",
    }
}

fn is_manual(group: &pb::GroupInfo) -> bool {
    group.ack_mode == pb::AckMode::Manual as i32
}

/// `eventbus groups`: a table, one row per group; the cursor columns are `-` for AUTO groups.
pub fn groups_table(groups: &[pb::GroupInfo]) -> String {
    if groups.is_empty() {
        return "no groups\n".to_owned();
    }
    let header = [
        "GROUP",
        "PATTERN",
        "ACK",
        "MEMBERS",
        "CURSOR",
        "PENDING",
        "IN FLIGHT",
        "REDELIVERED",
        "DEAD-LETTERED",
    ];
    let rows: Vec<[String; 9]> = groups
        .iter()
        .map(|group| {
            let manual = |value: u64| {
                if is_manual(group) {
                    value.to_string()
                } else {
                    "-".to_owned()
                }
            };
            [
                group.name.clone(),
                group.pattern.clone(),
                ack_mode(group.ack_mode).to_owned(),
                group.members.to_string(),
                manual(group.cursor),
                manual(group.pending),
                manual(group.in_flight),
                manual(group.redelivered),
                manual(group.dead_lettered),
            ]
        })
        .collect();
    super::format::aligned_table(header, &rows, |i| i >= 3)
}

/// `eventbus groups --json`.
pub fn groups_json(groups: &[pb::GroupInfo]) -> Value {
    Value::Array(
        groups
            .iter()
            .map(|group| {
                let mut value = json!({
                    "name": group.name,
                    "pattern": group.pattern,
                    "ack_mode": ack_mode(group.ack_mode),
                    "members": group.members,
                });
                if is_manual(group) {
                    let object = value.as_object_mut().expect("an object");
                    for (key, field) in [
                        ("cursor", json!(group.cursor)),
                        ("pending", json!(group.pending)),
                        ("ready", json!(group.ready)),
                        ("in_flight", json!(group.in_flight)),
                        ("redelivered", json!(group.redelivered)),
                        ("dead_lettered", json!(group.dead_lettered)),
                        ("dropped", json!(group.dropped)),
                        ("parked", json!(group.parked)),
                        ("max_deliveries", json!(group.max_deliveries)),
                        ("dead_letter_topic", json!(group.dead_letter_topic)),
                    ] {
                        object.insert(key.to_owned(), field);
                    }
                }
                value
            })
            .collect(),
    )
}

fn seconds(duration: Option<&prost_types::Duration>) -> Option<f64> {
    let duration = duration?;
    Some(duration.seconds as f64 + f64::from(duration.nanos) / 1e9)
}

fn duration_text(duration: Option<&prost_types::Duration>) -> String {
    match duration {
        Some(d) if d.seconds >= 0 => {
            crate::timefmt::format_duration(Duration::from_secs(d.seconds as u64))
        }
        _ => "-".to_owned(),
    }
}

/// `eventbus server info --json`.
pub fn info_json(info: &pb::GetServerInfoResponse) -> Value {
    let limits = info.limits.unwrap_or_default();
    json!({
        "version": info.version,
        "git_commit": info.git_commit,
        "start_time": time_text(info.start_time.as_ref()),
        "uptime_seconds": seconds(info.uptime.as_ref()),
        "storage": info.storage,
        "oldest_sequence": info.oldest_sequence,
        "head_sequence": info.head_sequence,
        "log_id": info.log_id,
        "connections": info.connections,
        "subscriptions": info.subscriptions,
        "durable_groups": info.durable_groups,
        "auth_enabled": info.auth_enabled,
        "principals": info.principals,
        "limits": {
            "retention_max_events": limits.retention_max_events,
            "retention_max_bytes": limits.retention_max_bytes,
            "retention_max_age_seconds": seconds(limits.retention_max_age.as_ref()),
            "max_event_data_bytes": limits.max_event_data_bytes,
            "max_batch_events": limits.max_batch_events,
            "max_message_bytes": limits.max_message_bytes,
            "subscriber_queue_size": limits.subscriber_queue_size,
            "max_subscriber_lag": limits.max_subscriber_lag,
            "default_query_timeout_seconds": seconds(limits.default_query_timeout.as_ref()),
            "max_query_timeout_seconds": seconds(limits.max_query_timeout.as_ref()),
            "dedupe_window_seconds": seconds(limits.dedupe_window.as_ref()),
            "max_names": limits.max_names,
        },
        "settings": info.settings.iter().map(|setting| json!({
            "name": setting.name,
            "value": setting.value,
            "source": setting.source,
        })).collect::<Vec<_>>(),
    })
}

/// `eventbus server info`: `key: value` lines.
pub fn info_text(info: &pb::GetServerInfoResponse) -> String {
    let limits = info.limits.unwrap_or_default();
    let auth = if info.auth_enabled {
        format!("on ({} principals)", info.principals)
    } else {
        "off (open bus: anyone may publish, subscribe and administer)".to_owned()
    };
    let oldest = if info.oldest_sequence == 0 {
        "none held".to_owned()
    } else {
        info.oldest_sequence.to_string()
    };
    let rows = [
        ("version", format!("{} ({})", info.version, info.git_commit)),
        (
            "started",
            format!(
                "{} (up {})",
                time_text(info.start_time.as_ref()),
                duration_text(info.uptime.as_ref())
            ),
        ),
        ("storage", info.storage.clone()),
        (
            "log",
            format!(
                "{} (oldest {oldest}, head {})",
                info.log_id, info.head_sequence
            ),
        ),
        ("connections", info.connections.to_string()),
        ("subscriptions", info.subscriptions.to_string()),
        ("manual groups", info.durable_groups.to_string()),
        ("auth", auth),
        (
            "retention",
            format!(
                "{} events, {} bytes, max age {}",
                limits.retention_max_events,
                limits.retention_max_bytes,
                match limits.retention_max_age.as_ref() {
                    Some(age) => duration_text(Some(age)),
                    None => "none".to_owned(),
                }
            ),
        ),
        (
            "limits",
            format!(
                "event data {} bytes, batch {} events, message {} bytes, subscriber queue {}, \
                 max lag {}",
                limits.max_event_data_bytes,
                limits.max_batch_events,
                limits.max_message_bytes,
                limits.subscriber_queue_size,
                if limits.max_subscriber_lag == 0 {
                    "none".to_owned()
                } else {
                    limits.max_subscriber_lag.to_string()
                }
            ),
        ),
        (
            "queries",
            format!(
                "timeout {} by default, at most {}",
                duration_text(limits.default_query_timeout.as_ref()),
                duration_text(limits.max_query_timeout.as_ref())
            ),
        ),
        (
            "dedupe window",
            duration_text(limits.dedupe_window.as_ref()),
        ),
        ("max names", limits.max_names.to_string()),
    ];
    let width = rows.iter().map(|(key, _)| key.len()).max().unwrap_or(0) + 1;
    let mut out = String::new();
    for (key, value) in rows {
        let _ = writeln!(out, "{:<width$} {value}", format!("{key}:"));
    }
    out.push_str(&settings_text(&info.settings));
    out
}

/// The settings a flag, a variable or the file gave, each with its layer, and how many come
/// from the defaults: what an operator asks first ("did my flag, variable or file take?").
/// `--json` lists all.
fn settings_text(settings: &[pb::ConfigSetting]) -> String {
    if settings.is_empty() {
        return String::new();
    }
    let set: Vec<&pb::ConfigSetting> = settings.iter().filter(|s| s.source != "default").collect();
    let mut out = format!(
        "settings: {} given, {} from the defaults (--json lists all)\n",
        set.len(),
        settings.len() - set.len()
    );
    let width = set.iter().map(|s| s.name.len()).max().unwrap_or(0);
    for setting in set {
        let _ = writeln!(
            out,
            "  {:<width$} = {}  ({})",
            setting.name, setting.value, setting.source
        );
    }
    out
}

/// A check's outcome, ordered by severity; the exit code is its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// Exit 0.
    Ok = 0,
    /// Exit 1.
    Warning = 1,
    /// Exit 2.
    Critical = 2,
}

impl Status {
    /// The word the status line starts with.
    pub fn word(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Warning => "WARNING",
            Status::Critical => "CRITICAL",
        }
    }
}

/// The status line of `server check` for a bus that could not be asked.
pub fn unreachable_line(server: &str, why: &str) -> String {
    format!("CRITICAL: cannot ask the bus at {server}: {why}")
}

/// One perfdata item, `'label'=value;warn;crit`.
fn perf(
    out: &mut Vec<String>,
    label: &str,
    value: impl std::fmt::Display,
    warn: Option<u64>,
    crit: Option<u64>,
) {
    let show = |limit: Option<u64>| limit.map(|l| l.to_string()).unwrap_or_default();
    let mut item = format!("'{}'={value}", label.replace('\'', "_"));
    if warn.is_some() || crit.is_some() {
        let _ = write!(item, ";{};{}", show(warn), show(crit));
    }
    out.push(item);
}

/// `server check`: the status and its line, `STATUS: what|perfdata`. The problems found are
/// listed worst first; with none, a summary.
pub fn check(
    info: &pb::GetServerInfoResponse,
    groups: &[pb::GroupInfo],
    args: &Thresholds,
) -> (Status, String) {
    let mut problems: Vec<(Status, String)> = Vec::new();
    let mut perfdata = Vec::new();
    let over = |value: u64, warn: Option<u64>, crit: Option<u64>| {
        if crit.is_some_and(|crit| value >= crit) {
            Some((Status::Critical, crit.unwrap_or_default()))
        } else if warn.is_some_and(|warn| value >= warn) {
            Some((Status::Warning, warn.unwrap_or_default()))
        } else {
            None
        }
    };

    if let Some((status, limit)) = over(
        info.connections,
        args.max_connections_warn,
        args.max_connections_crit,
    ) {
        problems.push((
            status,
            format!("{} connections (limit {limit})", info.connections),
        ));
    }
    perf(
        &mut perfdata,
        "connections",
        info.connections,
        args.max_connections_warn,
        args.max_connections_crit,
    );
    perf(
        &mut perfdata,
        "subscriptions",
        info.subscriptions,
        None,
        None,
    );

    let uptime = info
        .uptime
        .as_ref()
        .map_or(0, |uptime| uptime.seconds.max(0) as u64);
    if let Some(min) = args.min_uptime {
        if uptime < min.as_secs() {
            problems.push((
                Status::Warning,
                format!(
                    "up {} only (less than {}): restarted?",
                    crate::timefmt::format_duration(Duration::from_secs(uptime)),
                    crate::timefmt::format_duration(min)
                ),
            ));
        }
    }
    perfdata.push(format!("'uptime'={uptime}s"));
    perf(
        &mut perfdata,
        "head_sequence",
        info.head_sequence,
        None,
        None,
    );

    let mut checked = 0;
    for group in groups.iter().filter(|group| is_manual(group)) {
        if args.group.as_ref().is_some_and(|only| *only != group.name) {
            continue;
        }
        checked += 1;
        if let Some((status, limit)) = over(
            group.pending,
            args.max_group_pending_warn,
            args.max_group_pending_crit,
        ) {
            problems.push((
                status,
                format!(
                    "group {} has {} pending (limit {limit})",
                    group.name, group.pending
                ),
            ));
        }
        perf(
            &mut perfdata,
            &format!("group_{}_pending", group.name),
            group.pending,
            args.max_group_pending_warn,
            args.max_group_pending_crit,
        );
    }
    if let Some(only) = &args.group {
        if checked == 0 {
            problems.push((
                Status::Critical,
                format!("no MANUAL-ack group {only} on the bus"),
            ));
        }
    }

    problems.sort_by_key(|(status, _)| std::cmp::Reverse(*status));
    let status = problems.first().map_or(Status::Ok, |(status, _)| *status);
    let what = if problems.is_empty() {
        format!(
            "eventbus {} up {}, {} connections, {} subscriptions, {} manual groups",
            info.version,
            crate::timefmt::format_duration(Duration::from_secs(uptime)),
            info.connections,
            info.subscriptions,
            info.durable_groups
        )
    } else {
        problems
            .into_iter()
            .map(|(_, problem)| problem)
            .collect::<Vec<_>>()
            .join("; ")
    };
    (
        status,
        format!("{}: {what}|{}", status.word(), perfdata.join(" ")),
    )
}

/// A client with the command's server, TLS and token settings (the admin verbs need the
/// `admin` right on a bus with principals).
async fn connect(server: &ServerArg) -> anyhow::Result<Client> {
    super::client::connect(server, CLI_SOURCE).await
}

/// Runs `eventbus groups`.
pub async fn groups(args: GroupsArgs) -> anyhow::Result<()> {
    let client = connect(&args.server).await?;
    let groups = client.list_groups(args.group.as_deref()).await?;
    if args.json {
        println!("{}", groups_json(&groups));
    } else {
        print!("{}", groups_table(&groups));
    }
    Ok(())
}

/// Runs `eventbus server info` or `eventbus server check`; the latter exits the process with
/// its status code.
pub async fn server(command: ServerCommand) -> anyhow::Result<()> {
    match command {
        ServerCommand::Info(args) => {
            let info = connect(&args.server).await?.server_info().await?;
            if args.json {
                println!("{}", info_json(&info));
            } else {
                print!("{}", info_text(&info));
            }
            Ok(())
        }
        ServerCommand::Check(args) => {
            let asked = tokio::time::timeout(args.timeout, async {
                let client = connect(&args.server).await?;
                let info = client.server_info().await?;
                let groups = client.list_groups(None).await?;
                anyhow::Ok((info, groups))
            })
            .await;
            let (status, line) = match asked {
                Ok(Ok((info, groups))) => check(&info, &groups, &args.thresholds),
                Ok(Err(error)) => (
                    Status::Critical,
                    unreachable_line(&args.server.server, &format!("{error:#}")),
                ),
                Err(_) => (
                    Status::Critical,
                    unreachable_line(
                        &args.server.server,
                        &format!(
                            "no answer within {}",
                            crate::timefmt::format_duration(args.timeout)
                        ),
                    ),
                ),
            };
            println!("{line}");
            std::process::exit(status as i32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> pb::GetServerInfoResponse {
        pb::GetServerInfoResponse {
            version: "0.1.0".into(),
            git_commit: "abc".into(),
            uptime: Some(prost_types::Duration {
                seconds: 300,
                nanos: 0,
            }),
            storage: "memory".into(),
            head_sequence: 42,
            connections: 3,
            subscriptions: 2,
            durable_groups: 1,
            ..Default::default()
        }
    }

    fn groups() -> Vec<pb::GroupInfo> {
        vec![
            pb::GroupInfo {
                name: "billing".into(),
                pattern: "orders.>".into(),
                ack_mode: pb::AckMode::Manual as i32,
                members: 1,
                cursor: 30,
                pending: 12,
                in_flight: 2,
                redelivered: 1,
                dead_lettered: 0,
                max_deliveries: 5,
                dead_letter_topic: "_bus.dlq.billing".into(),
                ..Default::default()
            },
            pb::GroupInfo {
                name: "mail".into(),
                pattern: "orders.*".into(),
                ack_mode: pb::AckMode::Auto as i32,
                members: 2,
                ..Default::default()
            },
        ]
    }

    #[test]
    fn groups_table_shows_dashes_for_auto_groups() {
        let table = groups_table(&groups());
        let lines: Vec<_> = table.lines().collect();
        let expected = [
            "GROUP    PATTERN   ACK     MEMBERS  CURSOR  PENDING  IN FLIGHT  REDELIVERED  DEAD-LETTERED",
            "billing  orders.>  manual        1      30       12          2            1              0",
            "mail     orders.*  auto          2       -        -          -            -              -",
        ];
        assert_eq!(lines, expected);
        assert_eq!(groups_table(&[]), "no groups\n");
    }

    #[test]
    fn groups_json_has_cursor_fields_for_manual_groups_only() {
        let value = groups_json(&groups());
        assert_eq!(value[0]["ack_mode"], "manual");
        assert_eq!(value[0]["pending"], 12);
        assert_eq!(value[0]["dead_letter_topic"], "_bus.dlq.billing");
        assert_eq!(
            value[1],
            json!({"name": "mail", "pattern": "orders.*", "ack_mode": "auto", "members": 2})
        );
    }

    #[test]
    fn info_json_gives_durations_in_seconds() {
        let value = info_json(&info());
        assert_eq!(value["uptime_seconds"], 300.0);
        assert_eq!(value["storage"], "memory");
        assert_eq!(value["head_sequence"], 42);
        assert!(value["limits"]["retention_max_age_seconds"].is_null());
        let text = info_text(&info());
        assert!(text.contains("auth:          off (open bus"), "{text}");
        assert!(text.contains("max age none"), "{text}");
    }

    #[test]
    fn check_is_ok_without_thresholds_and_says_why_otherwise() {
        let (status, line) = check(&info(), &groups(), &Thresholds::default());
        assert_eq!(status, Status::Ok);
        assert_eq!(
            line,
            "OK: eventbus 0.1.0 up 5m, 3 connections, 2 subscriptions, 1 manual groups\
             |'connections'=3 'subscriptions'=2 'uptime'=300s 'head_sequence'=42 \
             'group_billing_pending'=12"
        );

        let args = Thresholds {
            max_connections_warn: Some(3),
            max_group_pending_warn: Some(5),
            max_group_pending_crit: Some(10),
            ..Thresholds::default()
        };
        let (status, line) = check(&info(), &groups(), &args);
        assert_eq!(status, Status::Critical);
        assert_eq!(
            line,
            "CRITICAL: group billing has 12 pending (limit 10); 3 connections (limit 3)\
             |'connections'=3;3; 'subscriptions'=2 'uptime'=300s 'head_sequence'=42 \
             'group_billing_pending'=12;5;10"
        );

        let args = Thresholds {
            min_uptime: Some(Duration::from_secs(600)),
            ..Thresholds::default()
        };
        let (status, line) = check(&info(), &groups(), &args);
        assert_eq!(status, Status::Warning);
        assert!(
            line.starts_with("WARNING: up 5m only (less than 10m): restarted?|"),
            "{line}"
        );

        let args = Thresholds {
            group: Some("nope".into()),
            ..Thresholds::default()
        };
        let (status, line) = check(&info(), &groups(), &args);
        assert_eq!(status, Status::Critical);
        assert!(
            line.starts_with("CRITICAL: no MANUAL-ack group nope"),
            "{line}"
        );
    }
}
