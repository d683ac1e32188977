//! Raw HTTP/2 abuse: requests no gRPC client would send, and connections that attack the
//! transport itself. Each case gets the answer the protocol prescribes (a gRPC status, or an
//! HTTP/2 stream reset or GOAWAY where the request never reaches gRPC), the bus's memory stays
//! flat, and a normal client keeps being served, with its latency measured while the attack
//! runs.
//!
//! The bus runs as its own process (`eventbus serve`) so its resident memory is its own. Abuse
//! goes out through the `h2` crate where it can express it, and as hand-written frames where it
//! cannot (it would not let a client exceed the server's stream limit, or reset a stream before
//! its HEADERS are on the wire).

mod bus_process;
mod common;
mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_process::BusProcess;
use bytes::{BufMut, Bytes, BytesMut};
use common::event;
use eventbus::pb;
use eventbus::pb::event_bus_service_client::EventBusServiceClient;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::codegen::http;
use tonic::transport::Channel;
use tonic::Code;

const MIB: u64 = 1024 * 1024;
/// How much the bus's resident memory may grow under an attack: generous, since allocators keep
/// freed memory, yet far below what an unbounded queue of streams or headers would take.
const MEMORY_BOUND: u64 = 64 * MIB;
/// The slowest a normal client's publish-and-receive may be while an attack runs.
const SERVED_WITHIN: Duration = Duration::from_secs(2);
/// Every await on the network is bounded by this.
const STEP: Duration = Duration::from_secs(10);

// ---- A normal client, to show the bus still serves ----

/// A normal gRPC client subscribed to `probe.>`: each [`Probe::round_trip`] publishes one event
/// and waits for it to arrive, timing both.
struct Probe {
    client: EventBusServiceClient<Channel>,
    subscription: Stream,
    sent: u64,
}

impl Probe {
    async fn start(bus: &BusProcess) -> Probe {
        let channel =
            tokio::time::timeout(STEP, Channel::from_shared(bus.url()).unwrap().connect())
                .await
                .expect("connect in time")
                .expect("a normal client connects");
        let mut client = EventBusServiceClient::new(channel);
        let (_, subscription) = subscribe(&mut client, request("probe.>")).await;
        Probe {
            client,
            subscription,
            sent: 0,
        }
    }

    /// Publishes an event and receives it on the subscription: how long that took.
    async fn round_trip(&mut self) -> Duration {
        self.sent += 1;
        let started = Instant::now();
        let data = self.sent.to_be_bytes();
        let request = pb::PublishRequest {
            events: vec![event("probe.x", &data)],
        };
        tokio::time::timeout(STEP, self.client.publish(request))
            .await
            .expect("a publish answered in time")
            .expect("a normal client's publish is served");
        let received = next_event(&mut self.subscription).await;
        assert_eq!(&received.data[..], &data[..]);
        started.elapsed()
    }
}

// ---- Requests through the h2 crate ----

/// An HTTP/2 connection to the bus through the `h2` crate.
async fn h2_connect(bus: &BusProcess) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(bus.addr).await.unwrap();
    let (client, connection) = tokio::time::timeout(STEP, h2::client::handshake(tcp))
        .await
        .expect("handshake in time")
        .unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client.ready().await.unwrap()
}

/// A Publish request with the given content-type and extra headers.
fn publish_request(content_type: &str, extra: &[(&str, String)]) -> http::Request<()> {
    let mut request = http::Request::builder()
        .method("POST")
        .uri("http://localhost/eventbus.v1.EventBusService/Publish")
        .header("content-type", content_type)
        .header("te", "trailers");
    for (name, value) in extra {
        request = request.header(*name, value);
    }
    request.body(()).unwrap()
}

/// A gRPC message prefix: the compressed flag and the declared length.
fn prefix(compressed: bool, len: u32) -> Bytes {
    let mut prefix = BytesMut::with_capacity(5);
    prefix.put_u8(u8::from(compressed));
    prefix.put_u32(len);
    prefix.freeze()
}

/// How the bus answered one request.
#[derive(Debug, PartialEq)]
enum Answer {
    /// A gRPC status (from trailers-only headers or the trailers), with the HTTP status and
    /// the bus's reason (`eventbus-error`), if any.
    Grpc {
        http: u16,
        code: Code,
        reason: Option<String>,
    },
    /// An HTTP response with no gRPC status.
    Http(u16),
    /// The stream was reset with this reason before a response.
    Reset(h2::Reason),
}

/// The gRPC answer with this HTTP status, code and reason.
fn grpc(http: u16, code: Code, reason: Option<&str>) -> Answer {
    Answer::Grpc {
        http,
        code,
        reason: reason.map(str::to_owned),
    }
}

/// Sends `request` with `body` (then ends the stream) and reads the answer.
async fn answer(bus: &BusProcess, request: http::Request<()>, body: Bytes) -> Answer {
    let mut client = h2_connect(bus).await;
    let (response, mut send) = client.send_request(request, body.is_empty()).unwrap();
    if !body.is_empty() {
        send.send_data(body, true).unwrap();
    }
    let read = async {
        let response = match response.await {
            Ok(response) => response,
            Err(error) => return Answer::Reset(error.reason().expect("a stream reset")),
        };
        let http = response.status().as_u16();
        let code_in = |headers: &http::HeaderMap| {
            let code = headers
                .get("grpc-status")?
                .to_str()
                .ok()?
                .parse::<i32>()
                .ok()?;
            let reason = headers
                .get("eventbus-error")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            Some((Code::from(code), reason))
        };
        if let Some((code, reason)) = code_in(response.headers()) {
            return Answer::Grpc { http, code, reason };
        }
        let mut body = response.into_body();
        while let Some(data) = body.data().await {
            if data.is_err() {
                break;
            }
        }
        match body.trailers().await {
            Ok(Some(trailers)) => match code_in(&trailers) {
                Some((code, reason)) => Answer::Grpc { http, code, reason },
                None => Answer::Http(http),
            },
            _ => Answer::Http(http),
        }
    };
    tokio::time::timeout(STEP, read)
        .await
        .expect("the bus answers in time")
}

/// Malformed gRPC requests, each answered as the protocol says, and the bus serving on.
#[tokio::test]
async fn malformed_requests_are_answered_and_the_bus_serves_on() {
    let bus = BusProcess::start(&[], None);
    let mut probe = Probe::start(&bus).await;
    probe.round_trip().await;
    let baseline = bus.rss_bytes();
    let valid = {
        use prost::Message;
        pb::PublishRequest {
            events: vec![event("abuse.x", b"x")],
        }
        .encode_to_vec()
    };
    let framed = |compressed: bool, declared: u32, message: &[u8]| {
        let mut body = BytesMut::from(&prefix(compressed, declared)[..]);
        body.extend_from_slice(message);
        body.freeze()
    };

    // Not gRPC at all: HTTP 415, as the gRPC spec says, so a non-gRPC client does not read
    // HTTP 200 as success; and a gRPC status for clients that read only that.
    let wrong_type = answer(
        &bus,
        publish_request("application/json", &[]),
        framed(false, valid.len() as u32, &valid),
    )
    .await;
    println!("wrong content-type: {wrong_type:?}");
    let no_type = answer(
        &bus,
        publish_request("", &[]),
        framed(false, valid.len() as u32, &valid),
    )
    .await;
    println!("empty content-type: {no_type:?}");

    // A length prefix longer than the body: the body ends inside the message, which the receive
    // limits (`src/receive.rs`) report as the caller's malformed request.
    let short = answer(
        &bus,
        publish_request("application/grpc", &[]),
        framed(false, valid.len() as u32 + 100, &valid),
    )
    .await;
    println!("length prefix longer than the body: {short:?}");
    assert_eq!(
        short,
        grpc(200, Code::InvalidArgument, Some("malformed-request"))
    );

    // The compressed flag with no grpc-encoding: the caller's malformed request, refused by the
    // receive limits on the prefix (tonic alone answered INTERNAL, which reads as the bus's
    // fault).
    let compressed = answer(
        &bus,
        publish_request("application/grpc", &[]),
        framed(true, valid.len() as u32, &valid),
    )
    .await;
    println!("compressed flag, no grpc-encoding: {compressed:?}");
    assert_eq!(
        compressed,
        grpc(200, Code::InvalidArgument, Some("malformed-request"))
    );

    // A declared length of 4 GiB (the most the prefix can say): refused on the prefix alone,
    // before any of it is buffered, by the receive limits (`src/receive.rs`).
    let huge = answer(
        &bus,
        publish_request("application/grpc", &[]),
        framed(false, u32::MAX, b"x"),
    )
    .await;
    println!("4 GiB declared length: {huge:?}");
    assert_eq!(huge, grpc(200, Code::OutOfRange, Some("message-too-large")));

    // 1 MiB of metadata, 64 times MAX_HEADER_LIST_BYTES: h2 stops decoding it past its abuse
    // limit (a multiple of the bound, in bytes or CONTINUATION frames) and closes the
    // connection with GOAWAY ENHANCE_YOUR_CALM, having held no more than that.
    let headers: Vec<(&str, String)> = (0..16)
        .map(|i| (["x-big-0", "x-big-1"][i % 2], "v".repeat(64 * 1024)))
        .collect();
    let big_metadata = answer(
        &bus,
        publish_request("application/grpc", &headers),
        framed(false, valid.len() as u32, &valid),
    )
    .await;
    println!("1 MiB of metadata: {big_metadata:?}");
    assert_eq!(big_metadata, Answer::Reset(h2::Reason::ENHANCE_YOUR_CALM));
    // Just over the bound: this request is refused, HTTP 431 and its stream reset (RFC 9113
    // §10.5.1), before it reaches gRPC; the connection lives on.
    let over = eventbus::server::MAX_HEADER_LIST_BYTES as usize + 1024;
    let over_bound = answer(
        &bus,
        publish_request("application/grpc", &[("x-over", "v".repeat(over))]),
        framed(false, valid.len() as u32, &valid),
    )
    .await;
    println!("{over} bytes of metadata: {over_bound:?}");
    assert_eq!(over_bound, Answer::Http(431));
    // Just under the bound is served as usual.
    let fits = answer(
        &bus,
        publish_request("application/grpc", &[("x-fits", "v".repeat(8 * 1024))]),
        framed(false, valid.len() as u32, &valid),
    )
    .await;
    assert_eq!(fits, grpc(200, Code::Ok, None));

    for answer in [wrong_type, no_type] {
        assert_eq!(
            answer,
            grpc(415, Code::InvalidArgument, Some("malformed-request"))
        );
    }

    let latency = probe.round_trip().await;
    let growth = bus.rss_bytes().saturating_sub(baseline);
    println!(
        "after the malformed requests: a normal round trip took {latency:?}; RSS +{} KiB",
        growth / 1024
    );
    assert!(latency < SERVED_WITHIN);
    assert!(growth < MEMORY_BOUND);
}

// ---- Hand-written frames ----

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const REFUSED_STREAM: u32 = 0x7;
const CANCEL: u32 = 0x8;
const ENHANCE_YOUR_CALM: u32 = 0xb;

fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// An HPACK literal header field without indexing, new name, no Huffman (RFC 7541 §6.2.2);
/// every string here is shorter than 127 bytes.
fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0);
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
}

/// The header block of a Subscribe call.
fn subscribe_header_block() -> Vec<u8> {
    let mut block = Vec::new();
    literal(&mut block, ":method", "POST");
    literal(&mut block, ":scheme", "http");
    literal(
        &mut block,
        ":path",
        "/eventbus.v1.EventBusService/Subscribe",
    );
    literal(&mut block, ":authority", "localhost");
    literal(&mut block, "content-type", "application/grpc");
    literal(&mut block, "te", "trailers");
    block
}

/// What a raw connection has heard from the bus.
#[derive(Debug, Default)]
struct Heard {
    /// Streams the bus reset, with the error code.
    resets: Vec<(u32, u32)>,
    /// The GOAWAY's last stream id and error code, if one came.
    goaway: Option<(u32, u32)>,
    /// Whether the bus closed the connection (EOF or an error reading).
    closed: bool,
}

/// A connection that speaks HTTP/2 frame by frame: it has sent the preface and its SETTINGS and
/// acknowledged the bus's; a task reads (and never answers) whatever else the bus sends.
struct RawConnection {
    write: tokio::net::tcp::OwnedWriteHalf,
    heard: Arc<Mutex<Heard>>,
}

impl RawConnection {
    async fn open(addr: std::net::SocketAddr) -> RawConnection {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut read, mut write) = tcp.into_split();
        let mut start = PREFACE.to_vec();
        frame(&mut start, SETTINGS, 0, 0, &[]);
        write.write_all(&start).await.unwrap();
        // The bus's SETTINGS come first; acknowledge them so the connection is in good standing.
        let mut header = [0u8; 9];
        tokio::time::timeout(STEP, read.read_exact(&mut header))
            .await
            .expect("the bus's SETTINGS in time")
            .unwrap();
        assert_eq!(header[3], SETTINGS);
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; len];
        read.read_exact(&mut payload).await.unwrap();
        let mut ack = Vec::new();
        frame(&mut ack, SETTINGS, ACK, 0, &[]);
        write.write_all(&ack).await.unwrap();
        let heard = Arc::new(Mutex::new(Heard::default()));
        tokio::spawn(read_frames(read, heard.clone()));
        RawConnection { write, heard }
    }

    fn heard<T>(&self, look: impl FnOnce(&Heard) -> T) -> T {
        look(&self.heard.lock().unwrap())
    }
}

/// Reads frames until the connection ends, noting resets and GOAWAY.
async fn read_frames(mut read: tokio::net::tcp::OwnedReadHalf, heard: Arc<Mutex<Heard>>) {
    let mut header = [0u8; 9];
    loop {
        if read.read_exact(&mut header).await.is_err() {
            break;
        }
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        if read.read_exact(&mut payload).await.is_err() {
            break;
        }
        let word = |at: usize| u32::from_be_bytes(payload[at..at + 4].try_into().unwrap());
        match header[3] {
            RST_STREAM => heard.lock().unwrap().resets.push((stream, word(0))),
            GOAWAY => heard.lock().unwrap().goaway = Some((word(0) & 0x7fff_ffff, word(4))),
            _ => {}
        }
    }
    heard.lock().unwrap().closed = true;
}

/// HTTP/2 rapid reset (CVE-2023-44487): connections open streams and reset them at once, in
/// bursts, until the bus has taken in 20,000 HEADERS+RST_STREAM pairs (and for at least 3 s).
/// The bus cuts each such connection off with GOAWAY ENHANCE_YOUR_CALM once more than
/// `MAX_PENDING_ACCEPT_RESET_STREAMS` resets are pending, so the attacker must reconnect every
/// few dozen streams; a normal client keeps being served within [`SERVED_WITHIN`] all along,
/// and the bus's memory stays flat.
#[tokio::test]
async fn rapid_reset_is_cut_off_and_others_are_served() {
    let (connections, calmed) = rapid_reset(50, Duration::ZERO, 20_000).await;
    // The last connection may stop on its own (the attack reached its count) before the bus
    // cuts it off.
    assert!(
        calmed + 1 >= connections,
        "every attacking connection is cut off: {calmed} of {connections}"
    );
}

/// Rapid reset paced to one HEADERS+RST_STREAM a millisecond, so the bus may accept each
/// stream before its reset arrives and few resets are ever pending: the connection need not be
/// cut off, but each stream's work ends with its reset, so 2,000 of them still leave a normal
/// client served within [`SERVED_WITHIN`] and the bus's memory flat.
#[tokio::test]
async fn paced_rapid_reset_leaves_others_served_and_memory_flat() {
    let (connections, calmed) = rapid_reset(1, Duration::from_millis(1), 2_000).await;
    println!("paced: {calmed} of {connections} connections cut off");
}

/// Runs the rapid-reset attack, `per_write` HEADERS+RST_STREAM pairs per write with `pause`
/// between writes, until the bus has taken in `resets` pairs (and for at least 3 s), measuring a normal client and the
/// bus's memory throughout; asserts those, and returns how many connections the attack used
/// and how many the bus cut off with ENHANCE_YOUR_CALM.
async fn rapid_reset(per_write: u32, pause: Duration, resets: u32) -> (u32, u32) {
    let bus = BusProcess::start(&[], None);
    let mut probe = Probe::start(&bus).await;
    probe.round_trip().await;
    let baseline = bus.rss_bytes();

    let attack = {
        let addr = bus.addr;
        tokio::spawn(async move {
            let block = subscribe_header_block();
            // Pairs the bus took in: up to each GOAWAY's last stream id, or all sent.
            let mut taken = 0u32;
            let mut connections = 0u32;
            let mut calmed = 0u32;
            let started = Instant::now();
            while (taken < resets || started.elapsed() < Duration::from_secs(3))
                && started.elapsed() < Duration::from_secs(40)
            {
                let mut connection = RawConnection::open(addr).await;
                connections += 1;
                let mut stream = 1u32;
                let attacking = |connection: &RawConnection, stream: u32| {
                    !connection.heard(|h| h.goaway.is_some() || h.closed)
                        && taken + stream / 2 < resets
                        && started.elapsed() < Duration::from_secs(40)
                };
                while attacking(&connection, stream) {
                    let mut burst = Vec::new();
                    for _ in 0..per_write {
                        frame(&mut burst, HEADERS, END_HEADERS, stream, &block);
                        frame(&mut burst, RST_STREAM, 0, stream, &CANCEL.to_be_bytes());
                        stream += 2;
                    }
                    if connection.write.write_all(&burst).await.is_err() {
                        break;
                    }
                    if pause.is_zero() {
                        tokio::task::yield_now().await;
                    } else {
                        tokio::time::sleep(pause).await;
                    }
                }
                if stream == 1 {
                    // Nothing sent (the count was reached while the 3 s minimum runs): not an
                    // attacking connection.
                    connections -= 1;
                    continue;
                }
                // The bus's verdict on this connection, waited for boundedly: briefly when the
                // attack stopped on its own, longer when the bus is closing it.
                let verdict_within =
                    if attacking(&connection, stream) || taken + stream / 2 >= resets {
                        Duration::from_millis(100)
                    } else {
                        Duration::from_secs(5)
                    };
                let deadline = Instant::now() + verdict_within;
                while Instant::now() < deadline && !connection.heard(|h| h.goaway.is_some()) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                match connection.heard(|h| h.goaway) {
                    Some((last, code)) => {
                        taken += last.div_ceil(2);
                        calmed += u32::from(code == ENHANCE_YOUR_CALM);
                    }
                    None => {
                        taken += stream / 2;
                        // Closed by the bus before its GOAWAY was read (seen under load): cut
                        // off all the same.
                        calmed += u32::from(connection.heard(|h| h.closed));
                    }
                }
            }
            (taken, connections, calmed, started.elapsed())
        })
    };

    let mut latencies = Vec::new();
    let mut peak = baseline;
    while !attack.is_finished() {
        latencies.push(probe.round_trip().await);
        peak = peak.max(bus.rss_bytes());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (taken, connections, calmed, took) = tokio::time::timeout(STEP, attack)
        .await
        .expect("the attack ends")
        .unwrap();
    latencies.push(probe.round_trip().await);
    peak = peak.max(bus.rss_bytes());
    let worst = latencies.iter().max().copied().unwrap();
    let growth = peak.saturating_sub(baseline);
    println!(
        "rapid reset, {per_write} per write: the bus took in {taken} HEADERS+RST_STREAM on {connections} connections \
         in {took:?}, {calmed} cut off with ENHANCE_YOUR_CALM; {} normal round trips \
         meanwhile, worst {worst:?}; RSS {} MiB -> peak {} MiB (+{} KiB)",
        latencies.len(),
        baseline / MIB,
        peak / MIB,
        growth / 1024
    );
    assert!(
        taken >= resets,
        "the attack got only {taken} resets in {took:?}"
    );
    assert!(worst < SERVED_WITHIN, "a normal round trip took {worst:?}");
    assert!(
        growth < MEMORY_BOUND,
        "the bus grew by {} KiB",
        growth / 1024
    );
    (connections, calmed)
}

/// Thousands of streams at once over `--max-concurrent-streams`: the bus refuses each one over
/// the limit at once with REFUSED_STREAM (RFC 9113 §5.1.2) rather than queueing it, and after
/// `MAX_LOCAL_ERROR_RESET_STREAMS` refusals cuts the connection off with GOAWAY
/// ENHANCE_YOUR_CALM. Other clients are served and memory stays flat.
#[tokio::test]
async fn streams_over_the_limit_are_refused_not_queued() {
    const LIMIT: u32 = 10;
    const STREAMS: u32 = 3_000;
    let bus = BusProcess::start(&["--max-concurrent-streams", &LIMIT.to_string()], None);
    let mut probe = Probe::start(&bus).await;
    probe.round_trip().await;
    let baseline = bus.rss_bytes();

    let mut connection = RawConnection::open(bus.addr).await;
    let block = subscribe_header_block();
    let mut frames = Vec::new();
    for i in 0..STREAMS {
        // HEADERS without END_STREAM: each stream stays open, waiting for its request message.
        frame(&mut frames, HEADERS, END_HEADERS, 1 + 2 * i, &block);
    }
    let started = Instant::now();
    // The bus may close the connection before it has read all of it.
    let _ = connection.write.write_all(&frames).await;
    let done =
        |h: &Heard| h.closed || h.goaway.is_some() || h.resets.len() as u32 >= STREAMS - LIMIT;
    common::eventually(
        "the bus to refuse the streams over its limit",
        STEP,
        || async { connection.heard(done).then_some(()) },
    )
    .await;
    let latency = probe.round_trip().await;
    let (refused, other_resets, goaway, accepted) = connection.heard(|h| {
        let refused: Vec<u32> = h
            .resets
            .iter()
            .filter(|(_, code)| *code == REFUSED_STREAM)
            .map(|(id, _)| *id)
            .collect();
        let last = h.goaway.map_or(u32::MAX, |(last, _)| last);
        // Streams the bus took in (at or below a GOAWAY's last stream id) and did not refuse.
        let accepted = (0..STREAMS)
            .map(|i| 1 + 2 * i)
            .filter(|id| *id <= last && !refused.contains(id))
            .count();
        (
            refused.len(),
            h.resets.len() - refused.len(),
            h.goaway,
            accepted,
        )
    });
    let growth = bus.rss_bytes().saturating_sub(baseline);
    println!(
        "{STREAMS} streams at once over a limit of {LIMIT}: {refused} REFUSED_STREAM, \
         {other_resets} other resets, GOAWAY {goaway:?}, {accepted} accepted, in {:?}; a normal \
         round trip meanwhile {latency:?}; RSS +{} KiB",
        started.elapsed(),
        growth / 1024
    );
    assert_eq!(other_resets, 0);
    assert!(
        accepted as u32 <= LIMIT,
        "{accepted} streams accepted over the limit"
    );
    let limit = eventbus::server::MAX_LOCAL_ERROR_RESET_STREAMS;
    assert!(
        refused >= (STREAMS - LIMIT).min(limit as u32) as usize,
        "only {refused} streams refused"
    );
    if refused as u32 >= limit as u32 {
        assert_eq!(
            goaway.map(|(_, code)| code),
            Some(ENHANCE_YOUR_CALM),
            "a connection that keeps opening streams over the limit is cut off"
        );
    }
    assert!(latency < SERVED_WITHIN);
    assert!(
        growth < MEMORY_BOUND,
        "the bus grew by {} KiB",
        growth / 1024
    );
}

/// How a slow connection stops.
#[derive(Debug, Clone, Copy)]
enum Stall {
    /// Half the client preface, then nothing.
    HalfPreface,
    /// The preface and an empty SETTINGS, then nothing; PINGs go unanswered.
    AfterSettings,
    /// A HEADERS frame without END_HEADERS: a header block that never ends.
    OpenHeaderBlock,
}

/// Opens a connection that stalls as `stall` says, and reads (never answering) until the bus
/// closes it: how long after opening that was, or `None` if not within `within`.
async fn stalled_connection(
    addr: std::net::SocketAddr,
    stall: Stall,
    within: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut tcp = TcpStream::connect(addr).await.ok()?;
    let mut bytes = Vec::new();
    match stall {
        Stall::HalfPreface => bytes.extend_from_slice(&PREFACE[..PREFACE.len() / 2]),
        Stall::AfterSettings | Stall::OpenHeaderBlock => {
            bytes.extend_from_slice(PREFACE);
            frame(&mut bytes, SETTINGS, 0, 0, &[]);
            if let Stall::OpenHeaderBlock = stall {
                let block = subscribe_header_block();
                frame(&mut bytes, HEADERS, 0, 1, &block[..block.len() / 2]);
            }
        }
    }
    tcp.write_all(&bytes).await.ok()?;
    let mut buf = [0u8; 4096];
    let read_to_end = async { while let Ok(1..) = tcp.read(&mut buf).await {} };
    tokio::time::timeout(within, read_to_end).await.ok()?;
    Some(started.elapsed())
}

/// Slowloris: `connections` connections that stall as `stalls` say, against a bus with a 1 s
/// handshake timeout and 1 s keepalive; all must be closed within the deadlines while a normal
/// client is served and memory stays flat.
async fn slowloris(connections: usize, stalls: &[Stall]) {
    let bus = BusProcess::start(
        &[
            "--handshake-timeout",
            "1s",
            "--keepalive-interval",
            "1s",
            "--keepalive-timeout",
            "1s",
        ],
        None,
    );
    let mut probe = Probe::start(&bus).await;
    probe.round_trip().await;
    let baseline = bus.rss_bytes();
    // Handshake 1 s, or a keepalive ping after 1 s idle plus 1 s for its answer: closed in
    // about 2 s. The rest is slack for a loaded machine.
    let within = Duration::from_secs(20);
    let slow: Vec<_> = (0..connections)
        .map(|i| {
            let stall = stalls[i % stalls.len()];
            (
                stall,
                tokio::spawn(stalled_connection(bus.addr, stall, within)),
            )
        })
        .collect();
    let mut latencies = Vec::new();
    let mut peak = baseline;
    while !slow.iter().all(|(_, task)| task.is_finished()) {
        latencies.push(probe.round_trip().await);
        peak = peak.max(bus.rss_bytes());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut slowest = std::collections::BTreeMap::new();
    let mut open = 0;
    for (stall, task) in slow {
        match task.await.unwrap() {
            Some(closed_after) => {
                let entry = slowest
                    .entry(format!("{stall:?}"))
                    .or_insert(Duration::ZERO);
                *entry = (*entry).max(closed_after);
            }
            None => open += 1,
        }
    }
    latencies.push(probe.round_trip().await);
    let worst = latencies.iter().max().copied().unwrap();
    let growth = peak.saturating_sub(baseline);
    println!(
        "slowloris: {connections} connections stalled as {stalls:?}; closed after at most \
         {slowest:?}; still open after {within:?}: {open}; {} normal round trips meanwhile, \
         worst {worst:?}; RSS {} MiB -> peak {} MiB (+{} KiB)",
        latencies.len(),
        baseline / MIB,
        peak / MIB,
        growth / 1024
    );
    assert_eq!(open, 0, "connections left open after {within:?}");
    assert!(worst < SERVED_WITHIN, "a normal round trip took {worst:?}");
    assert!(
        growth < MEMORY_BOUND,
        "the bus grew by {} KiB",
        growth / 1024
    );
}

/// 200 connections that send the preface and SETTINGS, or open a header block they never end,
/// then go silent without answering PINGs: the keepalive closes each about 2 s in.
#[tokio::test]
async fn slow_connections_are_closed_within_the_keepalive_deadline() {
    slowloris(200, &[Stall::AfterSettings, Stall::OpenHeaderBlock]).await;
}

/// 200 connections that send half the client preface and stop: hyper has no deadline of its
/// own for the preface, and keepalive starts only after it, so the handshake deadline
/// (`src/accept.rs`) runs until the whole 24-byte preface has arrived and closes them. (Before
/// it did, they stayed open, bounded only by `--max-connections`.)
#[tokio::test]
async fn half_sent_prefaces_are_closed_within_the_handshake_deadline() {
    slowloris(200, &[Stall::HalfPreface]).await;
}
