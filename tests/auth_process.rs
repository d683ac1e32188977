//! Authentication as an operator sees it, on a real `eventbus serve` process: the start-up line
//! of an open bus, audit lines for refusals (rate-limited, with the count left out), the
//! refusal metrics, a reload on SIGHUP, and a broken file refused.

mod bus_process;
mod common;
mod support;

use std::time::Duration;

use bus_process::BusProcess;
use common::nats::free_port;
use common::{event, eventually};
use eventbus::pb;
use eventbus::pb::event_bus_service_client::EventBusServiceClient;
use support::http_get;
use tonic::metadata::MetadataValue;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

fn config(token_hash: &str, publish: &str) -> String {
    format!(
        "[[principals]]\nname = \"svc\"\ntoken_hash = \"{token_hash}\"\npublish = [\"{publish}\"]\n\
         subscribe = [\">\"]\n\n[limits.principal]\npublish_events_per_second = 1000\n"
    )
}

async fn publish_as(
    client: &mut EventBusServiceClient<tonic::transport::Channel>,
    token: &str,
    topic: &str,
) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(pb::PublishRequest {
        events: vec![pb::Event {
            source: "svc".into(),
            ..event(topic, b"")
        }],
    });
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
    );
    client.publish(request).await.map(|_| ())
}

fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

#[tokio::test]
async fn an_open_bus_says_so_at_start() {
    let bus = BusProcess::start(&[], None);
    // Logged just after "eventbus listening", which is what `start` waits for: read with a
    // deadline (a loaded machine once read the logs in between).
    eventually("the open-bus warning", WAIT, || {
        let warnings = bus.logged("the bus is open");
        async move { (!warnings.is_empty()).then_some(()) }
    })
    .await;
    assert_eq!(bus.logged("the bus is open").len(), 1, "{:?}", bus.logs());
}

#[tokio::test]
async fn refusals_are_audited_rate_limited_counted_and_a_sighup_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("eventbus.toml");
    let hash = eventbus::auth::hash_token("secret-token");
    std::fs::write(&path, config(&hash, "a.>")).unwrap();
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let bus = BusProcess::start(
        &[
            "--config",
            path.to_str().unwrap(),
            "--admin-listen",
            &admin.to_string(),
        ],
        None,
    );
    assert!(bus.logged("the bus is open").is_empty());
    let mut client = EventBusServiceClient::connect(bus.url()).await.unwrap();

    publish_as(&mut client, "secret-token", "a.1")
        .await
        .unwrap();
    let status = publish_as(&mut client, "wrong", "a.1").await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // 200 refusals at once: at most a burst of audit lines, then the rest counted.
    for _ in 0..200 {
        let status = publish_as(&mut client, "secret-token", "b.1")
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
    }
    let audit = |bus: &BusProcess| -> Vec<serde_json::Value> {
        bus.logs()
            .into_iter()
            .filter(|l| l["target"] == "eventbus::audit")
            .collect()
    };
    let lines = eventually("the audit lines", WAIT, || {
        let lines = audit(&bus);
        async move { (lines.len() >= 2).then_some(lines) }
    })
    .await;
    assert_eq!(lines[0]["fields"]["action"], "authenticate", "{lines:?}");
    let denial = &lines[1]["fields"];
    assert_eq!(denial["principal"], "svc", "{denial}");
    assert_eq!(denial["action"], "publish", "{denial}");
    assert_eq!(denial["target_name"], "b.1", "{denial}");
    assert!(
        lines.len() <= 2 * eventbus::auth::AUDIT_LINES_PER_SECOND as usize,
        "{} lines for 201 refusals",
        lines.len()
    );
    // The next line, a second later, says how many were left out.
    eventually("an audit line counting those left out", WAIT, || {
        let mut client = client.clone();
        let bus = &bus;
        async move {
            let _ = publish_as(&mut client, "secret-token", "b.2").await;
            audit(bus)
                .iter()
                .any(|l| l["fields"]["suppressed"].as_u64().unwrap_or(0) > 0)
                .then_some(())
        }
    })
    .await;

    let (_, metrics) = http_get(admin, "/metrics").await;
    assert!(
        sample(&metrics, "eventbus_auth_denied_total{action=\"publish\"}") >= 200.0,
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "eventbus_auth_denied_total{action=\"authenticate\"}"
        ),
        1.0
    );

    // SIGHUP rereads the file. Rewritten with the same size and modification time, so the
    // bus's watch of the file cannot see the change: the signal is what tells.
    let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
    std::fs::write(&path, config(&hash, "b.>")).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    // SAFETY: kill(2) on the child's pid.
    unsafe { libc::kill(bus.pid() as i32, libc::SIGHUP) };
    eventually("the reload", WAIT, || {
        let mut client = client.clone();
        async move { publish_as(&mut client, "secret-token", "b.1").await.ok() }
    })
    .await;
    // The log line comes just after the policy is swapped: read it with a deadline too.
    let reloads = eventually("the reload's log line", WAIT, || {
        let reloads = bus.logged("principals and limits reloaded");
        async move { (!reloads.is_empty()).then_some(reloads) }
    })
    .await;
    assert_eq!(reloads.len(), 1, "{:?}", bus.logs());
    assert_eq!(reloads[0]["fields"]["why"], "SIGHUP", "{reloads:?}");

    assert!(
        bus.logged("a reload does not apply").is_empty(),
        "only principals changed: {:?}",
        bus.logs()
    );

    // A setting other than principals and limits changed: applied at the next restart, and the
    // reload says so, naming it.
    std::fs::write(&path, format!("max_names = 5\n{}", config(&hash, "b.>"))).unwrap();
    eventually("the notice of a setting that needs a restart", WAIT, || {
        let notices = bus.logged("a reload does not apply");
        async move { notices.first().cloned() }
    })
    .await;
    let notice = &bus.logged("a reload does not apply")[0];
    assert_eq!(notice["fields"]["changed"], "max_names", "{notice}");

    // A file that does not parse is refused whole, and the principals in force stay.
    std::fs::write(&path, "[[principals]]\nname = ").unwrap();
    eventually("the refusal of a broken file", WAIT, || {
        let refused = bus.logged("config reload refused");
        async move { (!refused.is_empty()).then_some(()) }
    })
    .await;
    publish_as(&mut client, "secret-token", "b.2")
        .await
        .unwrap();
}
