//! Crash safety of the file store against the real binary: publishers stream batches over
//! PublishStream while the bus is killed with SIGKILL at varying moments, over many cycles. After
//! every restart, every acknowledged event must be there exactly once, in order, and nothing may
//! appear twice.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use eventbus::pb;
use eventbus::pb::event_bus_service_client::EventBusServiceClient;
use eventbus::pb::subscribe_response::Message;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

const CYCLES: usize = 20;
const PUBLISHERS: usize = 4;
const EVENTS_PER_BATCH: usize = 10;
const BATCHES_IN_FLIGHT: usize = 16;

struct Bus {
    child: Child,
}

impl Bus {
    fn start(port: u16, data_dir: &std::path::Path) -> Bus {
        let child = Command::new(env!("CARGO_BIN_EXE_eventbus"))
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--storage",
                "file",
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .args([
                "--fsync",
                "always",
                "--segment-bytes",
                "65536",
                "--log-level",
                "warn",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the bus");
        Bus { child }
    }

    fn kill(mut self) {
        self.child.kill().expect("SIGKILL the bus");
        self.child.wait().expect("reap the bus");
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn connect(port: u16) -> EventBusServiceClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(channel) = Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await
        {
            return EventBusServiceClient::new(channel);
        }
        assert!(Instant::now() < deadline, "the bus did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every event the bus holds, from a replay to `caught_up`.
async fn read_log(client: &mut EventBusServiceClient<Channel>) -> Vec<pb::Event> {
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            topic: ">".into(),
            subscriber: "crash-checker".into(),
            start: Some(pb::subscribe_request::Start::Earliest(())),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(message) = stream.next().await {
        match message.unwrap().message {
            Some(Message::Event(event)) => events.push(event),
            Some(Message::CaughtUp(_)) => return events,
            _ => {}
        }
    }
    panic!("the stream ended before caught_up");
}

/// The durable consumer group that reads everything the publishers write, across the kills.
const GROUP: &str = "crash-consumers";

fn group_request() -> pb::SubscribeRequest {
    pb::SubscribeRequest {
        topic: "crash.>".into(),
        group: GROUP.into(),
        subscriber: "crash-consumer".into(),
        start: Some(pb::subscribe_request::Start::Earliest(())),
        ack_mode: pb::AckMode::Manual as i32,
        max_in_flight: 512,
        ..Default::default()
    }
}

/// A MANUAL-ack group member: records every event delivered to it and acks it, until the
/// connection breaks.
async fn consume_until_killed(
    mut client: EventBusServiceClient<Channel>,
    consumed: Arc<Mutex<HashSet<Vec<u8>>>>,
) {
    let Ok(response) = client.subscribe(group_request()).await else {
        return;
    };
    let mut stream = response.into_inner();
    loop {
        // Ack in batches: whatever arrived, once the stream pauses or 256 are waiting.
        let mut sequences = Vec::new();
        while sequences.len() < 256 {
            let wait = if sequences.is_empty() {
                Duration::from_secs(3600)
            } else {
                Duration::from_millis(2)
            };
            match tokio::time::timeout(wait, stream.next()).await {
                Ok(Some(Ok(message))) => {
                    if let Some(Message::Event(event)) = message.message {
                        consumed.lock().unwrap().insert(event.data.to_vec());
                        sequences.push(event.sequence);
                    }
                }
                Ok(_) => return,
                Err(_) => break,
            }
        }
        if client
            .ack(pb::AckRequest {
                group: GROUP.into(),
                sequences,
            })
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Publishes until the connection breaks, recording each acknowledged event.
async fn publish_until_killed(
    mut client: EventBusServiceClient<Channel>,
    publisher: usize,
    cycle: usize,
    acknowledged: Arc<Mutex<HashMap<String, u64>>>,
) {
    let (requests, receiver) = tokio::sync::mpsc::channel(BATCHES_IN_FLIGHT);
    let Ok(response) = client
        .publish_stream(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
    else {
        return;
    };
    let mut responses = response.into_inner();
    let mut sent: HashMap<u64, Vec<String>> = HashMap::new();
    let mut next_request = 0u64;
    loop {
        while sent.len() < BATCHES_IN_FLIGHT {
            let payloads: Vec<String> = (0..EVENTS_PER_BATCH)
                .map(|i| format!("c{cycle}-p{publisher}-r{next_request}-e{i}"))
                .collect();
            let events = payloads
                .iter()
                .map(|payload| pb::Event {
                    topic: format!("crash.p{publisher}"),
                    source: "crash-test".into(),
                    data: payload.clone().into_bytes().into(),
                    ..Default::default()
                })
                .collect();
            if requests
                .send(pb::PublishStreamRequest {
                    request_id: next_request,
                    events,
                })
                .await
                .is_err()
            {
                return;
            }
            sent.insert(next_request, payloads);
            next_request += 1;
        }
        let Some(Ok(response)) = responses.next().await else {
            return;
        };
        let payloads = sent.remove(&response.request_id).expect("known request");
        let Some(pb::publish_stream_response::Result::Published(published)) = response.result
        else {
            panic!("batch refused: {:?}", response.result);
        };
        let mut acknowledged = acknowledged.lock().unwrap();
        for (payload, sequence) in payloads.into_iter().zip(published.sequences) {
            acknowledged.insert(payload, sequence);
        }
    }
}

fn check(log: &[pb::Event], acknowledged: &HashMap<String, u64>) {
    for pair in log.windows(2) {
        assert_eq!(
            pair[1].sequence,
            pair[0].sequence + 1,
            "the log has a gap or is out of order"
        );
    }
    let mut seen: HashMap<&[u8], u64> = HashMap::new();
    for event in log {
        if let Some(first) = seen.insert(&event.data, event.sequence) {
            panic!(
                "{:?} stored twice, at {first} and {}",
                String::from_utf8_lossy(&event.data),
                event.sequence
            );
        }
    }
    for (payload, sequence) in acknowledged {
        assert_eq!(
            seen.get(payload.as_bytes()),
            Some(sequence),
            "acknowledged event {payload} lost or moved"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_events_survive_sigkill_exactly_once_and_in_order() {
    let data_dir = tempfile::tempdir().unwrap();
    let acknowledged = Arc::new(Mutex::new(HashMap::new()));
    let consumed = Arc::new(Mutex::new(HashSet::new()));
    // Kill moments vary from cycle to cycle, from the same seed each run.
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        | 1;
    eprintln!("crash test seed {seed}");
    for cycle in 0..CYCLES {
        let port = free_port();
        let bus = Bus::start(port, data_dir.path());
        let mut client = connect(port).await;
        check(&read_log(&mut client).await, &acknowledged.lock().unwrap());

        let consumer = tokio::spawn(consume_until_killed(client.clone(), consumed.clone()));
        let publishers: Vec<_> = (0..PUBLISHERS)
            .map(|publisher| {
                tokio::spawn(publish_until_killed(
                    client.clone(),
                    publisher,
                    cycle,
                    acknowledged.clone(),
                ))
            })
            .collect();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let run_for = Duration::from_millis(50 + seed % 250);
        tokio::time::sleep(run_for).await;
        bus.kill();
        for publisher in publishers {
            publisher.await.unwrap();
        }
        consumer.await.unwrap();
    }
    let port = free_port();
    let _bus = Bus::start(port, data_dir.path());
    let mut client = connect(port).await;
    let log = read_log(&mut client).await;
    let acknowledged = std::mem::take(&mut *acknowledged.lock().unwrap());
    check(&log, &acknowledged);
    // The durable group resumes from its cursor and gets every event of the log, unacked ones
    // included: an event is lost to it only if it never arrives.
    let consumer = tokio::spawn(consume_until_killed(client.clone(), consumed.clone()));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let missing = log
            .iter()
            .filter(|event| !consumed.lock().unwrap().contains(&event.data[..]))
            .count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the durable group never received {missing} events of the log"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    consumer.abort();
    assert!(
        acknowledged.len() > CYCLES * EVENTS_PER_BATCH,
        "too few events acknowledged ({}) for the test to mean anything",
        acknowledged.len()
    );
    eprintln!(
        "{} acknowledged events checked over {CYCLES} kills; log holds {}",
        acknowledged.len(),
        log.len()
    );
}

/// Runs the binary to completion, returning (success, stdout, stderr).
fn run_eventbus(args: &[&str], data_dir: &std::path::Path) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_eventbus"))
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("run eventbus");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_corrupt_older_segment_stops_start_up_until_repair_moves_it_aside() {
    use eventbus::store::{FileStore, FileStoreConfig, Store};
    let data_dir = tempfile::tempdir().unwrap();
    {
        let store = FileStore::open(FileStoreConfig {
            segment_bytes: 4096,
            ..FileStoreConfig::new(data_dir.path())
        })
        .unwrap();
        for i in 0..200 {
            let event = eventbus::event::Event {
                id: format!("e{i}"),
                source: "test".into(),
                event_type: "t".into(),
                topic: eventbus::topic::Topic::parse("repair.test").unwrap(),
                time: None,
                data_content_type: String::new(),
                data: vec![b'x'; 64].into(),
                attributes: Default::default(),
                correlation_id: String::new(),
                causation_id: String::new(),
                reply_to: None,
            };
            store.append(vec![event], SystemTime::now()).unwrap();
        }
    }
    let mut segments: Vec<_> = std::fs::read_dir(data_dir.path().join("log"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    segments.sort();
    assert!(segments.len() >= 3, "{segments:?}");
    let damaged = &segments[1];
    let mut bytes = std::fs::read(damaged).unwrap();
    bytes[20] ^= 0xff;
    std::fs::write(damaged, &bytes).unwrap();

    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let (ok, _, stderr) = run_eventbus(&["serve", "--listen", &listen], data_dir.path());
    assert!(!ok, "serve must refuse a corrupt log");
    let name = damaged.file_name().unwrap().to_string_lossy();
    assert!(
        stderr.contains(&*name)
            && stderr.contains("offset 0")
            && stderr.contains("eventbus repair"),
        "the error names the file, the offset and the fix: {stderr}"
    );

    let (ok, stdout, stderr) = run_eventbus(&["repair"], data_dir.path());
    assert!(ok, "repair failed: {stderr}");
    assert!(stdout.contains("moved aside"), "{stdout}");
    // One directory per repair run, holding the damaged bytes and every later segment.
    let runs: Vec<_> = data_dir
        .path()
        .join("damaged")
        .read_dir()
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert!(runs[0].read_dir().unwrap().count() >= 2);

    let bus = Bus::start(port.parse().unwrap(), data_dir.path());
    let mut client = connect(port.parse().unwrap()).await;
    let log = read_log(&mut client).await;
    let first_damaged: u64 = name.trim_end_matches(".log").parse().unwrap();
    assert_eq!(
        log.len() as u64,
        first_damaged - 1,
        "everything before the damage is kept"
    );
    bus.kill();
}

/// A new MANUAL group at `latest` that was handed events and acked none, then a SIGKILL before
/// its cursor ever moved: after the restart a member rejoining at `latest` still gets them (the
/// group was saved when it was created, not first when its cursor moved).
#[tokio::test]
async fn a_new_group_survives_a_crash_before_its_cursor_first_moves() {
    let data_dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let bus = Bus::start(port, data_dir.path());
    let mut client = connect(port).await;
    let request = pb::SubscribeRequest {
        topic: "fresh.>".into(),
        group: "fresh".into(),
        subscriber: "worker".into(),
        ack_mode: pb::AckMode::Manual as i32,
        ..Default::default()
    };
    let mut stream = client
        .subscribe(request.clone())
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert!(matches!(first.message, Some(Message::Subscribed(_))));
    let sent: Vec<u64> = client
        .publish(pb::PublishRequest {
            events: (0..2)
                .map(|i| pb::Event {
                    topic: "fresh.a".into(),
                    source: "test".into(),
                    data: vec![i].into(),
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .unwrap()
        .into_inner()
        .sequences;
    for expected in &sent {
        let delivery = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("a delivery in time")
            .unwrap()
            .unwrap();
        let Some(Message::Event(event)) = delivery.message else {
            panic!("expected an event, got {delivery:?}");
        };
        assert_eq!(event.sequence, *expected);
    }
    bus.kill();

    let _bus = Bus::start(port, data_dir.path());
    let mut client = connect(port).await;
    let mut stream = client.subscribe(request).await.unwrap().into_inner();
    let mut again = Vec::new();
    while again.len() < sent.len() {
        let message = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("the unacked events again in time")
            .unwrap()
            .unwrap();
        if let Some(Message::Event(event)) = message.message {
            again.push(event.sequence);
        }
    }
    assert_eq!(again, sent);
}
