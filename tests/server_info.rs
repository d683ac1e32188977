//! `AdminService.ListGroups` and `GetServerInfo` against a real bus: what a MANUAL-ack group's
//! cursor, in-flight, redelivered and dead-lettered counts say after acks and nacks, and what
//! the server says about itself.

mod bus_process;
mod common;

use std::time::Duration;

use common::{event, eventually, TestBus};
use eventbus::pb;
use futures_util::StreamExt as _;

const WAIT: Duration = Duration::from_secs(10);

/// The next event of a subscription stream, with its delivery attempt.
async fn next_event(stream: &mut tonic::Streaming<pb::SubscribeResponse>) -> (pb::Event, u32) {
    loop {
        let message = tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("an event in time")
            .expect("the stream goes on")
            .expect("no error");
        if let Some(pb::subscribe_response::Message::Event(event)) = message.message {
            return (event, message.delivery_attempt);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_groups_shows_cursor_in_flight_redeliveries_and_dead_letters() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let mut admin = bus.admin().await;

    let mut manual = client
        .subscribe(pb::SubscribeRequest {
            topic: "orders.>".into(),
            group: "billing".into(),
            subscriber: "billing-service".into(),
            ack_mode: pb::AckMode::Manual as i32,
            max_deliveries: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let _auto = client
        .subscribe(pb::SubscribeRequest {
            topic: "orders.*".into(),
            group: "mail".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Both confirmed: the AUTO group is in the tree once its stream has started.
    eventually("both groups listed", WAIT, || {
        let mut admin = admin.clone();
        async move {
            let groups = admin
                .list_groups(pb::ListGroupsRequest::default())
                .await
                .unwrap()
                .into_inner()
                .groups;
            (groups.len() == 2).then_some(())
        }
    })
    .await;

    let events = (1..=3)
        .map(|n| event("orders.created", format!("order {n}").as_bytes()))
        .collect();
    client.publish(pb::PublishRequest { events }).await.unwrap();
    let mut delivered = Vec::new();
    for _ in 0..3 {
        delivered.push(next_event(&mut manual).await.0.sequence);
    }
    delivered.sort_unstable();
    assert_eq!(delivered, [1, 2, 3]);

    client
        .ack(pb::AckRequest {
            group: "billing".into(),
            sequences: vec![1],
        })
        .await
        .unwrap();
    // Sequence 2 back once (redelivered), then again: its second delivery was its last.
    client
        .nack(pb::NackRequest {
            group: "billing".into(),
            sequences: vec![2],
            redeliver_after: None,
        })
        .await
        .unwrap();
    let (again, attempt) = next_event(&mut manual).await;
    assert_eq!((again.sequence, attempt), (2, 2));
    client
        .nack(pb::NackRequest {
            group: "billing".into(),
            sequences: vec![2],
            redeliver_after: None,
        })
        .await
        .unwrap();

    let billing = eventually("the dead letter counted", WAIT, || {
        let mut admin = admin.clone();
        async move {
            let groups = admin
                .list_groups(pb::ListGroupsRequest {
                    group: "billing".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .groups;
            assert_eq!(groups.len(), 1, "{groups:?}");
            let group = groups.into_iter().next().unwrap();
            (group.dead_lettered == 1).then_some(group)
        }
    })
    .await;
    assert_eq!(billing.name, "billing");
    assert_eq!(billing.pattern, "orders.>");
    assert_eq!(billing.ack_mode, pb::AckMode::Manual as i32);
    assert_eq!(billing.members, 1);
    assert_eq!(billing.redelivered, 1, "{billing:?}");
    // 1 acked, 2 dead-lettered, 3 in flight: the cursor is at 2.
    assert_eq!(billing.in_flight, 1, "{billing:?}");
    assert_eq!(billing.cursor, 2, "{billing:?}");
    assert_eq!(billing.max_deliveries, 2);
    assert_eq!(billing.dead_letter_topic, "_bus.dlq.billing");
    assert!(!billing.parked);

    let groups = admin
        .list_groups(pb::ListGroupsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .groups;
    let names: Vec<_> = groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, ["billing", "mail"]);
    let mail = &groups[1];
    assert_eq!(mail.ack_mode, pb::AckMode::Auto as i32);
    assert_eq!((mail.pattern.as_str(), mail.members), ("orders.*", 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_info_tells_version_storage_log_limits_and_load() {
    let bus = TestBus::start().await;
    let mut client = bus.client().await;
    let admin = bus.admin().await;
    let _subscription = client
        .subscribe(pb::SubscribeRequest {
            topic: "a.>".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    client
        .publish(pb::PublishRequest {
            events: vec![event("a.b", b"1"), event("a.b", b"2")],
        })
        .await
        .unwrap();

    let info = eventually("one subscription counted", WAIT, || {
        let mut admin = admin.clone();
        async move {
            let info = admin
                .get_server_info(pb::GetServerInfoRequest {})
                .await
                .unwrap()
                .into_inner();
            (info.subscriptions == 1).then_some(info)
        }
    })
    .await;
    assert_eq!(info.version, env!("CARGO_PKG_VERSION"));
    assert!(!info.git_commit.is_empty());
    assert!(
        info.git_commit == "unknown"
            || (info.git_commit.len() == 40
                && info.git_commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "{}",
        info.git_commit
    );
    let storage = std::env::var("EVENTBUS_TEST_STORAGE").unwrap_or_else(|_| "memory".into());
    assert_eq!(info.storage, storage);
    assert_eq!(info.head_sequence, 2);
    assert_eq!(info.oldest_sequence, 1);
    assert!(!info.log_id.is_empty());
    assert!(info.connections >= 1, "{info:?}");
    assert!(!info.auth_enabled);
    assert_eq!(info.principals, 0);
    let limits = info.limits.unwrap();
    let defaults = eventbus::config::BusConfig::default();
    assert_eq!(limits.retention_max_events, defaults.retention_max_events);
    assert_eq!(
        limits.max_event_data_bytes,
        defaults.max_event_data_bytes as u64
    );
    assert!(info.start_time.is_some());
    let uptime = info.uptime.unwrap();
    assert!(uptime.seconds >= 0 && uptime.seconds < 600, "{uptime:?}");
}

/// Each setting of a bus process reports the layer that won: a flag over the environment over
/// the config file over the default; `server info` shows the ones set, `--json` all of them.
#[test]
fn server_info_says_where_each_setting_came_from() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("eventbus.toml");
    std::fs::write(
        &config,
        "retention_max_bytes = \"64MiB\"\nmax_names = 50\ndedupe_window = \"1m\"\n",
    )
    .unwrap();
    let config_arg = config.display().to_string();
    let bus = bus_process::BusProcess::start_with_env(
        &["--config", &config_arg, "--max-names", "70"],
        None,
        &[
            ("EVENTBUS_MAX_NAMES", "60"),
            ("EVENTBUS_DEDUPE_WINDOW", "30s"),
        ],
    );
    let info = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_eventbus"))
            .args(["server", "info", "--server", &bus.url()])
            .args(args)
            .env_remove("EVENTBUS_URL")
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let json: serde_json::Value = serde_json::from_str(&info(&["--json"])).unwrap();
    let setting = |name: &str| {
        let found = json["settings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {json}"));
        (
            found["value"].as_str().unwrap().to_owned(),
            found["source"].as_str().unwrap().to_owned(),
        )
    };
    assert_eq!(
        setting("max_names"),
        ("70".into(), "flag --max-names".into())
    );
    assert_eq!(
        setting("dedupe_window"),
        ("30s".into(), "env EVENTBUS_DEDUPE_WINDOW".into())
    );
    assert_eq!(
        setting("retention_max_bytes"),
        ("64MiB".into(), format!("file {config_arg}"))
    );
    assert_eq!(
        setting("max_query_timeout"),
        ("1m".into(), "default".into())
    );
    // The values the bus runs with are the winners'.
    assert_eq!(json["limits"]["max_names"], 70);
    assert_eq!(json["limits"]["dedupe_window_seconds"], 30.0);
    assert_eq!(json["limits"]["retention_max_bytes"], 64 * 1024 * 1024);

    let text = info(&[]);
    assert!(
        text.lines()
            .any(|line| line.contains("dedupe_window")
                && line.contains("(env EVENTBUS_DEDUPE_WINDOW)")),
        "{text}"
    );
    assert!(
        !text.contains("max_query_timeout"),
        "defaults are counted, not listed:\n{text}"
    );
}
