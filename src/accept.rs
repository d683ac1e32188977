//! Accepting connections without spinning: the stream of accepted TCP connections the server
//! hands to tonic, and the open-file limit raised at start.
//!
//! Every connection holds a file descriptor, and so do the store's segment files. Three rules keep
//! connections from exhausting them, or the bus's CPU:
//!
//! - **A connection limit** ([`AcceptLimits::max_connections`], by default the open-file limit
//!   less a reserve for files, see [`default_max_connections`]): at the limit [`Incoming`] stops
//!   accepting until a connection closes, so the store can still open files.
//! - **A handshake deadline** ([`AcceptLimits::handshake_timeout`]): a connection that has not
//!   sent the whole HTTP/2 preface ([`PREFACE_BYTES`]) within it is closed, so idle sockets
//!   that never speak HTTP/2, or stop halfway through its preface, cannot hold the limit.
//!   (Once a client has spoken, HTTP/2 keepalive pings watch it.)
//! - **Backoff on accept errors.** tonic's own `TcpIncoming` yields every accept error and its
//!   server loop retries at once: out of file descriptors (EMFILE, or ENFILE for the whole
//!   system), the pending connection stays queued, the listener stays readable, and the loop
//!   spins a whole core while every other task starves. [`Incoming`] sleeps after such an error,
//!   10 ms and doubling up to 1 s until an accept succeeds, and logs at most once per
//!   [`LOG_EVERY`] with a count of the errors it left out.
//!
//! With TLS ([`Incoming::with_tls`]) each accepted socket's handshake runs as its own future
//! inside [`Incoming`], polled alongside the accepts, so a client that stalls its handshake
//! holds only its own permit, never the accept loop. The handshake must finish within the
//! handshake deadline, and the same deadline then still runs until the first decrypted byte.
//! A client whose first byte is not a TLS handshake record is told in its own protocol that the
//! port requires TLS (its first gRPC call answered FAILED_PRECONDITION `tls-required`, or an
//! HTTP/1.1 `400`) and closed, so its error says why instead of "connection reset".

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_util::sync::PollSemaphore;
use tonic::transport::server::Connected;
use tracing::{debug, error, info, warn};

/// The first pause after an accept error.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// The longest pause between accept attempts while they keep failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At most one accept-error log line per this long.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

/// File descriptors kept for anything but connections (store segments, `groups.json`, the
/// runtime's own), at most: a quarter of the open-file limit, up to this many.
pub const RESERVED_DESCRIPTORS: u64 = 1024;

/// How many connections [`Incoming`] holds at once, and how soon each must speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcceptLimits {
    /// Open connections at most; at the limit, accepting waits for one to close.
    pub max_connections: usize,
    /// How long a new connection may stay silent before it is closed.
    pub handshake_timeout: Duration,
}

/// The connection limit when none is configured: the soft open-file limit less a quarter of it,
/// at most [`RESERVED_DESCRIPTORS`], kept for files. 10,000 where the limit cannot be read.
pub fn default_max_connections() -> usize {
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, _hard)) => {
            let reserve = (soft / 4).min(RESERVED_DESCRIPTORS);
            usize::try_from(soft - reserve).unwrap_or(usize::MAX).max(1)
        }
        Err(_) => 10_000,
    }
}

/// A TLS handshake in progress: the connection once it is done, `None` if it failed.
type Handshake = Pin<Box<dyn Future<Output = Option<Connection>> + Send>>;

/// Accepted connections (with TCP_NODELAY set), for `serve_with_incoming_shutdown`. Never yields
/// an error: errors are logged and waited out (see the module docs).
pub struct Incoming {
    listener: TcpListener,
    limits: AcceptLimits,
    /// One permit per open connection; each [`Connection`] returns its own when it closes.
    permits: PollSemaphore,
    /// The permit for the next connection, taken before accepting it.
    permit: Option<OwnedSemaphorePermit>,
    /// When reaching the connection limit was last logged.
    full_logged: Option<Instant>,
    /// Where open connections are counted, if anywhere ([`Incoming::counted_in`]).
    metrics: Option<crate::metrics::Metrics>,
    /// Armed after an accept error; no accept is tried until it fires.
    pause: Option<Pin<Box<Sleep>>>,
    /// The next pause, doubled after each error in a row.
    backoff: Duration,
    /// When an accept error was last logged, and how many have failed since without a log.
    last_logged: Option<Instant>,
    unlogged: u64,
    /// The TLS settings handshakes take, and the protocol they announce; `None`: plaintext.
    tls: Option<(crate::tls::ReloadableTls, crate::tls::Alpn)>,
    /// TLS handshakes in progress, each holding its connection's permit.
    handshakes: FuturesUnordered<Handshake>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("listener", &self.listener)
            .field("limits", &self.limits)
            .field("tls", &self.tls.is_some())
            .field("handshakes", &self.handshakes.len())
            .finish_non_exhaustive()
    }
}

impl Incoming {
    /// Accepts connections on `listener`, within `limits`.
    pub fn new(listener: TcpListener, limits: AcceptLimits) -> Incoming {
        Incoming {
            listener,
            limits,
            permits: PollSemaphore::new(Arc::new(Semaphore::new(limits.max_connections))),
            permit: None,
            metrics: None,
            full_logged: None,
            pause: None,
            backoff: FIRST_BACKOFF,
            last_logged: None,
            unlogged: 0,
            tls: None,
            handshakes: FuturesUnordered::new(),
        }
    }

    /// Makes every connection a TLS one: the handshake, with the settings `tls` holds at that
    /// moment, announcing `alpn`, must finish within the handshake timeout. A client
    /// certificate it verified is in the connection's [`ConnectionInfo::peer_certificate`].
    pub fn with_tls(mut self, tls: crate::tls::ReloadableTls, alpn: crate::tls::Alpn) -> Incoming {
        self.tls = Some((tls, alpn));
        self
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Counts open connections in `metrics` (`eventbus_connections_active`).
    pub fn counted_in(mut self, metrics: crate::metrics::Metrics) -> Incoming {
        self.metrics = Some(metrics);
        self
    }

    fn on_error(&mut self, error: &io::Error) {
        let now = Instant::now();
        let due = self
            .last_logged
            .is_none_or(|last| now.duration_since(last) >= LOG_EVERY);
        if due {
            let left_out = self.unlogged;
            if is_out_of_descriptors(error) {
                error!(
                    %error,
                    left_out,
                    retry_in = ?self.backoff,
                    "cannot accept connections: out of file descriptors (raise the open-file \
                     limit, ulimit -n, or close idle clients); pausing accepts"
                );
            } else {
                warn!(%error, left_out, retry_in = ?self.backoff, "accepting a connection failed; pausing accepts");
            }
            self.last_logged = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        self.pause = Some(Box::pin(tokio::time::sleep(self.backoff)));
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
    }
}

/// Whether the process or the system ran out of file descriptors (EMFILE, ENFILE).
fn is_out_of_descriptors(error: &io::Error) -> bool {
    // Linux's numbers; Rust's ErrorKind has no variant for these.
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    matches!(error.raw_os_error(), Some(ENFILE | EMFILE))
}

/// Errors that concern only the connection being accepted (it was reset or aborted while
/// queued): the next one may be fine, so they are retried at once, as hyper always did.
fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}

impl Stream for Incoming {
    type Item = io::Result<Connection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            // Finished handshakes first: their clients are waiting, and their permits are held.
            while let Poll::Ready(Some(done)) = Pin::new(&mut self.handshakes).poll_next(cx) {
                if let Some(connection) = done {
                    return Poll::Ready(Some(Ok(connection)));
                }
            }
            if let Some(pause) = self.pause.as_mut() {
                ready!(pause.as_mut().poll(cx));
                self.pause = None;
            }
            if self.permit.is_none() {
                match self.permits.poll_acquire(cx) {
                    Poll::Ready(Some(permit)) => self.permit = Some(permit),
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Pending => {
                        let now = Instant::now();
                        if self
                            .full_logged
                            .is_none_or(|last| now.duration_since(last) >= LOG_EVERY)
                        {
                            warn!(
                                max_connections = self.limits.max_connections,
                                "at the connection limit: new connections wait until one closes \
                                 (--max-connections)"
                            );
                            self.full_logged = Some(now);
                        }
                        return Poll::Pending;
                    }
                }
            }
            match ready!(self.listener.poll_accept(cx)) {
                Ok((stream, peer)) => {
                    if self.backoff != FIRST_BACKOFF {
                        info!(left_out = self.unlogged, "accepting connections again");
                        self.backoff = FIRST_BACKOFF;
                        self.last_logged = None;
                        self.unlogged = 0;
                    }
                    if let Err(error) = stream.set_nodelay(true) {
                        debug!(%error, "cannot set TCP_NODELAY on an accepted connection");
                    }
                    let permit = self.permit.take().expect("a permit was taken above");
                    let deadline = Box::pin(tokio::time::sleep(self.limits.handshake_timeout));
                    let info = ConnectionInfo {
                        id: NEXT_CONNECTION_ID.fetch_add(1, Ordering::Relaxed),
                        remote_addr: Some(peer),
                        peer_certificate: None,
                        usage: Arc::default(),
                    };
                    let connection = Connection {
                        stream: Transport::Plain(stream),
                        info,
                        handshake: Some(deadline),
                        preface_left: PREFACE_BYTES,
                        _permit: permit,
                        _open: self.metrics.as_ref().map(|m| m.connection_opened()),
                    };
                    match &self.tls {
                        None => return Poll::Ready(Some(Ok(connection))),
                        Some((tls, alpn)) => {
                            let handshake = tls_handshake(connection, tls.acceptor(*alpn));
                            self.handshakes.push(Box::pin(handshake));
                        }
                    }
                }
                Err(error) if is_per_connection(&error) => {
                    debug!(%error, "an accepted connection was already gone");
                }
                Err(error) => self.on_error(&error),
            }
        }
    }
}

/// Runs the TLS handshake on a plaintext `connection` until its handshake deadline; the TLS
/// connection, with the client's verified certificate if any, or `None` (logged at debug).
async fn tls_handshake(
    mut connection: Connection,
    acceptor: tokio_rustls::TlsAcceptor,
) -> Option<Connection> {
    let Transport::Plain(stream) = connection.stream else {
        unreachable!("a handshake starts on a plaintext connection");
    };
    let mut deadline = connection
        .handshake
        .take()
        .expect("a new connection has its handshake deadline");
    let remote = connection.info.remote_addr;
    let mut stream = stream;
    let plaintext = tokio::select! {
        plaintext = speaks_plaintext(&stream) => plaintext,
        _ = deadline.as_mut() => {
            debug!(?remote, "TLS handshake not started within the handshake timeout; closing");
            return None;
        }
    };
    if let Some(first) = plaintext {
        debug!(
            ?remote,
            "a plaintext client on the TLS port; telling it so and closing"
        );
        tokio::select! {
            _ = refuse_plaintext(&mut stream, first) => {}
            _ = deadline.as_mut() => {}
        }
        return None;
    }
    let tls = tokio::select! {
        accepted = acceptor.accept(stream) => match accepted {
            Ok(tls) => tls,
            Err(error) => {
                debug!(%error, ?remote, "TLS handshake failed");
                return None;
            }
        },
        _ = deadline.as_mut() => {
            debug!(?remote, "TLS handshake not finished within the handshake timeout; closing");
            return None;
        }
    };
    connection.info.peer_certificate = crate::tls::peer_certificate(tls.get_ref().1).map(Arc::new);
    if let Some(certificate) = &connection.info.peer_certificate {
        debug!(?remote, subject = %certificate.subject, "client certificate verified");
    }
    Some(Connection {
        stream: Transport::Tls(Box::new(tls)),
        handshake: Some(deadline),
        ..connection
    })
}

/// The first byte the client sent, if it is not the start of a TLS handshake record (0x16): a
/// plaintext client. `None` also when the client closed or the peek failed (the handshake then
/// fails on its own).
async fn speaks_plaintext(stream: &TcpStream) -> Option<u8> {
    const TLS_HANDSHAKE_RECORD: u8 = 0x16;
    let mut first = [0u8; 1];
    match stream.peek(&mut first).await {
        Ok(1) if first[0] != TLS_HANDSHAKE_RECORD => Some(first[0]),
        _ => None,
    }
}

/// What a plaintext client on a TLS port is told, so its error says why rather than "connection
/// reset".
const PLAINTEXT_REFUSAL: &str = "this eventbus port requires TLS: use an https:// URL";

/// Answers a plaintext client in its own protocol. A gRPC client (an HTTP/2 preface, which
/// starts with `P`) gets its first call answered FAILED_PRECONDITION with [`PLAINTEXT_REFUSAL`]
/// (reason `tls-required`) and a GOAWAY naming that call as the last: a GOAWAY alone, before any
/// call is answered, makes grpc-core retry the call on a new connection forever. Anything else
/// (HTTP/1.1 to the admin port) gets a `400` with the message. The socket is drained after, so
/// closing does not turn into a reset that loses the answer.
async fn refuse_plaintext(stream: &mut TcpStream, first: u8) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let answered = if first == b'P' {
        refuse_plaintext_grpc(stream).await
    } else {
        let mut sink = [0u8; 4096];
        let _ = stream.read(&mut sink).await;
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\nconnection: close\r\n\
             content-length: {}\r\n\r\n{PLAINTEXT_REFUSAL}\n",
            PLAINTEXT_REFUSAL.len() + 1
        );
        stream.write_all(answer.as_bytes()).await
    };
    if answered.is_ok() && stream.shutdown().await.is_ok() {
        let mut sink = [0u8; 4096];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    }
}

/// The HTTP/2 frames of [`refuse_plaintext`]: the server's SETTINGS, then, once the client's
/// first HEADERS arrives, a trailers-only gRPC answer on its stream and a GOAWAY.
async fn refuse_plaintext_grpc(stream: &mut TcpStream) -> io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const PREFACE_BYTES: usize = 24;
    const HEADERS: u8 = 0x1;
    const GOAWAY: u8 = 0x7;
    const SETTINGS: u8 = 0x4;
    const END_STREAM_AND_HEADERS: u8 = 0x1 | 0x4;
    /// What is read while looking for the first HEADERS at most.
    const MAX_READ: usize = 64 * 1024;

    fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
        let length = u32::try_from(payload.len()).expect("a small frame");
        out.extend_from_slice(&length.to_be_bytes()[1..]);
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream_id.to_be_bytes());
        out.extend_from_slice(payload);
    }
    /// An HPACK literal header field without indexing, lengths under 127, no Huffman coding.
    fn literal(block: &mut Vec<u8>, name: &str, value: &str) {
        block.push(0);
        for text in [name, value] {
            let length = u8::try_from(text.len())
                .ok()
                .filter(|length| *length < 127)
                .expect("a short header");
            block.push(length);
            block.extend_from_slice(text.as_bytes());
        }
    }
    /// The stream id of the first HEADERS frame in `received` (preface, then frames).
    fn first_headers(received: &[u8]) -> Option<u32> {
        let frames = received.get(PREFACE_BYTES..)?;
        let mut at = 0;
        while let Some(header) = frames.get(at..at + 9) {
            let length = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
            if header[3] == HEADERS {
                let id = u32::from_be_bytes([header[5], header[6], header[7], header[8]]);
                return Some(id & 0x7fff_ffff);
            }
            at += 9 + length;
        }
        None
    }

    let mut out = Vec::new();
    frame(&mut out, SETTINGS, 0, 0, &[]);
    stream.write_all(&out).await?;
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    let stream_id = loop {
        if let Some(id) = first_headers(&received) {
            break id;
        }
        let read = stream.read(&mut chunk).await?;
        if read == 0 || received.len() > MAX_READ {
            return Ok(());
        }
        received.extend_from_slice(&chunk[..read]);
    };
    let mut block = vec![0x88]; // `:status: 200`, HPACK static table entry 8
    literal(&mut block, "content-type", "application/grpc");
    literal(&mut block, "grpc-status", "9"); // FAILED_PRECONDITION
    literal(&mut block, "grpc-message", PLAINTEXT_REFUSAL);
    literal(&mut block, "eventbus-error", "tls-required");
    let mut out = Vec::new();
    frame(&mut out, HEADERS, END_STREAM_AND_HEADERS, stream_id, &block);
    let mut goaway = stream_id.to_be_bytes().to_vec();
    goaway.extend_from_slice(&0u32.to_be_bytes()); // NO_ERROR
    frame(&mut out, GOAWAY, 0, 0, &goaway);
    stream.write_all(&out).await
}

/// The socket under a connection: as accepted, or with TLS on it.
#[derive(Debug)]
enum Transport {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Transport {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(stream) => stream.is_write_vectored(),
            Transport::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Transport::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The HTTP/2 client connection preface (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, RFC 9113
/// section 3.4): the handshake deadline runs until this many bytes have arrived, so a client
/// that sends part of it and stops is closed (hyper has no deadline of its own for the
/// preface, and HTTP/2 keepalive pings start only after it). An HTTP/1 request to the admin
/// listener is longer than this.
pub const PREFACE_BYTES: usize = 24;

/// An accepted connection: the socket (with TLS on it if the listener has TLS), its place
/// under the connection limit, and, until its first [`PREFACE_BYTES`] have arrived, its
/// handshake deadline.
#[derive(Debug)]
pub struct Connection {
    stream: Transport,
    /// What requests on this connection learn of it ([`connection_info`]).
    info: ConnectionInfo,
    /// Running until the first [`PREFACE_BYTES`] (decrypted) bytes have arrived; a read after
    /// it passes fails with TimedOut.
    handshake: Option<Pin<Box<Sleep>>>,
    /// Bytes still to arrive before the handshake deadline stops.
    preface_left: usize,
    /// Returned to [`Incoming`]'s limit when the connection is dropped.
    _permit: OwnedSemaphorePermit,
    /// Counts the connection as open while it lives.
    _open: Option<crate::metrics::GaugeGuard>,
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if self.handshake.is_some() {
            match &polled {
                Poll::Ready(Ok(())) if buf.filled().len() > before => {
                    let read = buf.filled().len() - before;
                    self.preface_left = self.preface_left.saturating_sub(read);
                    if self.preface_left == 0 {
                        self.handshake = None;
                    }
                }
                Poll::Pending => {
                    let deadline = self.handshake.as_mut().expect("checked above");
                    if deadline.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the connection sent nothing within the handshake timeout",
                        )));
                    }
                }
                _ => {}
            }
        }
        polled
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl Connected for Connection {
    type ConnectInfo = ConnectionInfo;

    fn connect_info(&self) -> ConnectionInfo {
        self.info.clone()
    }
}

/// Numbers connections for [`ConnectionInfo::id`]; never reused within a process.
static NEXT_CONNECTION_ID: AtomicU64 = AtomicU64::new(1);

/// What a request knows of the connection it came on: tonic puts it in every request's
/// extensions ([`connection_info`] reads it). Per-connection limits key on `id`; authentication
/// reads `peer_certificate`.
#[derive(Debug, Clone)]
pub struct ConnectionInfo {
    /// Unique among this process's connections, from 1.
    pub id: u64,
    /// The client's address, as accepted.
    pub remote_addr: Option<std::net::SocketAddr>,
    /// The certificate the client presented in a mutual-TLS handshake; `None` on plaintext
    /// connections and TLS ones without a client certificate.
    pub peer_certificate: Option<Arc<PeerCertificate>>,
    /// What the connection's calls used of its limits ([`crate::limits`]).
    pub usage: Arc<crate::limits::ConnectionUsage>,
}

/// A verified client certificate, as much of it as identifies a principal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    /// The subject's distinguished name in RFC 4514 form, most significant attribute last as
    /// the RFC writes it, e.g. `CN=order-service,O=Acme`; compared with a principal's
    /// `cert_subject`.
    pub subject: String,
    /// The DNS names and URIs of the subject alternative name extension.
    pub subject_alt_names: Vec<String>,
}

/// The connection `request` came on, if the bus accepted it (absent for requests built in
/// process, as unit tests do).
pub fn connection_info<T>(request: &tonic::Request<T>) -> Option<&ConnectionInfo> {
    request.extensions().get::<ConnectionInfo>()
}

/// Raises the soft limit on open files (RLIMIT_NOFILE) to the hard limit, since every client
/// connection holds a descriptor, and logs what it got. Returns
/// the soft limit now in force. Where the limit cannot be read or raised, logs why and goes on.
pub fn raise_open_file_limit() -> Option<u64> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => {
            info!(limit, "open-file limit (RLIMIT_NOFILE soft limit)");
            Some(limit)
        }
        Err(error) => {
            warn!(%error, "cannot raise the open-file limit; keeping it as it is");
            None
        }
    }
}

#[cfg(test)]
mod tls_tests {
    use std::time::Duration;

    use futures_util::StreamExt as _;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa,
        KeyPair,
    };
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    use super::*;
    use crate::config::TlsConfig;
    use crate::tls::{Alpn, ReloadableTls};

    fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
    }

    /// A certificate for `names` signed by `ca`, with subject `CN=<cn>,O=Acme`: (cert, key) PEM.
    fn leaf(ca: &CertifiedIssuer<'static, KeyPair>, cn: &str, names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Acme");
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        (
            params.signed_by(&key, ca).unwrap().pem(),
            key.serialize_pem(),
        )
    }

    /// The connection info of a TLS connection made with a client certificate: its subject and
    /// DNS/URI names, as authentication will read them; and a silent socket ahead of it in the
    /// accept queue does not hold it up, and is dropped at the deadline.
    #[tokio::test]
    async fn a_verified_client_certificate_is_in_the_connection_info() {
        let dir = tempfile::tempdir().unwrap();
        let server_ca = ca("server CA");
        let client_ca = ca("client CA");
        let (cert, key) = leaf(&server_ca, "bus", &["127.0.0.1"]);
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let files = TlsConfig {
            cert: write("cert.pem", &cert),
            key: write("key.pem", &key),
            client_ca: Some(write("ca.pem", &client_ca.pem())),
        };
        let tls = ReloadableTls::open(&files).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Incoming::new(
            listener,
            AcceptLimits {
                max_connections: 10,
                handshake_timeout: Duration::from_millis(300),
            },
        )
        .with_tls(tls, Alpn::Grpc);

        let _silent = TcpStream::connect(addr).await.unwrap();
        let (client_cert, client_key) = leaf(
            &client_ca,
            "order-service",
            &["order.example", "spiffe://acme/order"],
        );
        let mut roots = rustls::RootCertStore::empty();
        roots.add(server_ca.der().clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from_pem_slice(client_cert.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(client_key.as_bytes()).unwrap(),
        )
        .unwrap();
        let client = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
                .await
                .unwrap()
        });
        let connection = tokio::time::timeout(Duration::from_secs(10), incoming.next())
            .await
            .expect("the TLS connection is accepted while the silent one waits")
            .unwrap()
            .unwrap();
        let info = connection.connect_info();
        let certificate = info.peer_certificate.expect("the client certificate");
        assert_eq!(certificate.subject, "CN=order-service,O=Acme");
        assert_eq!(
            certificate.subject_alt_names,
            ["order.example", "spiffe://acme/order"]
        );
        let _client = client.await.unwrap();
        // The silent socket never becomes a connection: its handshake is dropped at the deadline.
        let next = tokio::time::timeout(Duration::from_secs(1), incoming.next()).await;
        assert!(next.is_err(), "the silent socket was yielded");
        assert!(incoming.handshakes.is_empty(), "its handshake is gone");
    }
}
