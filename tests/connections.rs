//! Connections at the file limit: a bus process that runs out of file descriptors pauses its
//! accepts (instead of spinning a core on EMFILE), logs it at a bounded rate, keeps serving the
//! connections it has, and serves new clients once descriptors free up.

mod bus_process;
mod common;

use std::time::{Duration, Instant};

use bus_process::BusProcess;
use common::{event, eventually};
use eventbus::pb;
use eventbus::pb::event_bus_service_client::EventBusServiceClient;
use tonic::transport::Channel;

/// The open-file limit the bus runs under (soft and hard): a few dozen past what it opens itself.
const NOFILE: u64 = 64;
/// Idle connections opened against it: well past the limit.
const IDLE_CONNECTIONS: usize = 160;
/// The window over which the bus's CPU time is measured while it is out of descriptors.
const WINDOW: Duration = Duration::from_secs(2);

async fn publish(channel: Channel) -> Result<(), tonic::Status> {
    let mut client = EventBusServiceClient::new(channel);
    let request = pb::PublishRequest {
        events: vec![event("fd.test", b"x")],
    };
    tokio::time::timeout(Duration::from_secs(5), client.publish(request))
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no answer in 5 s"))?
        .map(|_| ())
}

async fn connect(bus: &BusProcess) -> Option<Channel> {
    let endpoint = Channel::from_shared(bus.url())
        .unwrap()
        .connect_timeout(Duration::from_secs(2));
    endpoint.connect().await.ok()
}

#[tokio::test]
async fn out_of_descriptors_the_bus_pauses_accepts_and_serves_again() {
    let bus = BusProcess::start(&[], Some(NOFILE));
    let limit_logs = bus.logged("open-file limit");
    assert_eq!(
        limit_logs.first().map(|l| l["fields"]["limit"].clone()),
        Some(serde_json::json!(NOFILE)),
        "the bus logs the limit it got: {limit_logs:?}"
    );
    let established = connect(&bus).await.expect("a first client connects");
    publish(established.clone())
        .await
        .expect("a first client is served");

    let mut idle = Vec::new();
    for _ in 0..IDLE_CONNECTIONS {
        // The kernel completes the handshakes into the listen queue whether or not the bus
        // accepts them.
        idle.push(tokio::net::TcpStream::connect(bus.addr).await.unwrap());
    }
    eventually(
        "the bus to report it is out of file descriptors",
        Duration::from_secs(20),
        || async { (!bus.logged("out of file descriptors").is_empty()).then_some(()) },
    )
    .await;

    let cpu_before = bus.cpu_time();
    let started = Instant::now();
    // A connection it already has is still served while it cannot accept.
    publish(established.clone())
        .await
        .expect("an established client is served while accepts fail");
    tokio::time::sleep(WINDOW.saturating_sub(started.elapsed())).await;
    let cpu = bus.cpu_time() - cpu_before;
    let elapsed = started.elapsed();
    println!("bus CPU while out of descriptors: {cpu:?} over {elapsed:?}");
    // A spinning accept loop burns the whole window; waiting it out costs next to nothing.
    assert!(
        cpu < elapsed / 5,
        "the bus used {cpu:?} of CPU in {elapsed:?} while out of descriptors"
    );
    let error_lines = bus.logged("out of file descriptors").len();
    assert!(
        error_lines <= 3,
        "accept errors are logged at a bounded rate, not {error_lines} lines"
    );

    // Once the idle clients go, a new client is served.
    drop(idle);
    eventually(
        "a new client to be served",
        Duration::from_secs(20),
        || async {
            let channel = connect(&bus).await?;
            publish(channel).await.ok()
        },
    )
    .await;
    assert!(
        !bus.logged("accepting connections again").is_empty(),
        "the bus logs that it accepts again"
    );
}
