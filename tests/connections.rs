//! Connections at the file limit. A bus process holds at most its connection limit (by default
//! the open-file limit less a reserve for files), closes connections that never speak, and if it
//! runs out of file descriptors anyway it pauses its accepts (instead of spinning a core on
//! EMFILE), logs it at a bounded rate, keeps serving the connections it has, and serves new
//! clients once descriptors free up.

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
    publish_data(channel, b"x").await
}

async fn publish_data(channel: Channel, data: &[u8]) -> Result<(), tonic::Status> {
    let mut client = EventBusServiceClient::new(channel);
    let request = pb::PublishRequest {
        events: vec![event("fd.test", data)],
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
    // A connection limit above the open-file limit, so accepting runs into EMFILE.
    let bus = BusProcess::start(&["--max-connections", "100000"], Some(NOFILE));
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

#[tokio::test]
async fn the_connection_limit_keeps_descriptors_for_files_and_silent_connections_are_closed() {
    let data_dir = tempfile::tempdir().unwrap();
    let data_dir = data_dir.path().to_str().unwrap();
    let bus = BusProcess::start(
        &[
            "--storage",
            "file",
            "--data-dir",
            data_dir,
            "--segment-bytes",
            "4096",
            "--handshake-timeout",
            "1s",
        ],
        Some(NOFILE),
    );
    let established = connect(&bus).await.expect("a first client connects");
    publish(established.clone())
        .await
        .expect("a first client is served");

    let mut idle = Vec::new();
    for _ in 0..IDLE_CONNECTIONS {
        idle.push(tokio::net::TcpStream::connect(bus.addr).await.unwrap());
    }
    eventually(
        "the bus to reach its connection limit",
        Duration::from_secs(20),
        || async { (!bus.logged("at the connection limit").is_empty()).then_some(()) },
    )
    .await;

    // At the limit the store still opens files: these publishes start new segments.
    let cpu_before = bus.cpu_time();
    let started = Instant::now();
    for _ in 0..12 {
        publish_data(established.clone(), &[7u8; 1000])
            .await
            .expect("the store opens new segments at the connection limit");
    }
    let cpu = bus.cpu_time() - cpu_before;
    assert!(
        cpu < started.elapsed() / 2 + Duration::from_millis(200),
        "the bus used {cpu:?} of CPU in {:?}",
        started.elapsed()
    );
    assert!(
        bus.logged("out of file descriptors").is_empty(),
        "the limit keeps the bus from running out of descriptors"
    );

    // The silent connections are closed after the handshake timeout, so a new client is served
    // while they are still open on this side.
    eventually(
        "a new client to be served",
        Duration::from_secs(30),
        || async {
            let channel = connect(&bus).await?;
            publish(channel).await.ok()
        },
    )
    .await;
    // What the bus sent (its HTTP/2 settings), then the end of the connection.
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 1024];
        while let Ok(1..) = tokio::io::AsyncReadExt::read(&mut idle[0], &mut buf).await {}
    })
    .await
    .expect("the bus closes a silent connection");
}
