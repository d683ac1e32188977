//! Bounds on request bodies while they arrive: how long a request may take to arrive, and how
//! many bytes of partly received requests the bus holds at once.
//!
//! tonic buffers a gRPC message until its last byte is in (the 5-byte prefix declares its
//! length), and a unary call's handler runs only once the request body has ended. Without
//! bounds, a client that declares large messages and never sends their last byte holds that
//! memory as long as it likes: forty 15 MiB messages on one connection held ~609 MiB.
//! [`ReceiveLayer`] wraps every request body and watches the gRPC framing as it passes (no copy):
//!
//! - **Deadline.** A unary request (everything but a client-streaming method) must arrive whole,
//!   prefix to end of stream, within [`ReceiveLimits::timeout`] of its headers; on a streaming
//!   request (PublishStream, reflection) each message must, from its first byte. An idle stream
//!   between messages has no deadline, so long-lived streams live on.
//! - **Budget.** Bytes of requests not yet whole (a unary body until it ends, a streaming
//!   request's current message) count against one budget shared by every connection,
//!   [`ReceiveLimits::budget_bytes`]. A request whose next bytes would pass it fails.
//! - **Framing.** A message declared larger than [`ReceiveLimits::max_message_bytes`] fails when
//!   its prefix arrives, and a body that ends inside a message is malformed, as is a message
//!   whose compressed flag is set when the request declares no `grpc-encoding` (or a flag other
//!   than 0 or 1); all with the bus's reasons, where tonic would answer without one (INTERNAL,
//!   which reads as the bus's fault, for the flag).
//!
//! A failed request ends with its status (DEADLINE_EXCEEDED `receive-timeout`,
//! RESOURCE_EXHAUSTED `receive-budget`, OUT_OF_RANGE `message-too-large`, INVALID_ARGUMENT
//! `malformed-request`), its stream is reset, and its bytes are freed. HTTP/2 flow control
//! (`server.rs`) bounds what each connection may have in flight beneath this.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::Service;
use tonic::Status;

use crate::error::BusError;

/// gRPC paths whose request is a stream of messages; every other method takes one message.
const CLIENT_STREAMING_PATHS: &[&str] = &[
    "/eventbus.v1.EventBusService/PublishStream",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The 5-byte gRPC message prefix: a compression flag and a big-endian length.
const PREFIX_BYTES: usize = 5;

/// The limits [`ReceiveLayer`] enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiveLimits {
    /// The longest a unary request, or one message of a streaming request, may take to arrive
    /// once started.
    pub timeout: Duration,
    /// Bytes of requests not yet whole the bus holds at once, across all connections.
    pub budget_bytes: usize,
    /// The largest message a request may declare, in bytes (the bus's `max_message_bytes`).
    pub max_message_bytes: usize,
}

/// Wraps every request body of a server in the limits (see the module docs). Clones share one
/// budget.
#[derive(Debug, Clone)]
pub struct ReceiveLayer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    limits: ReceiveLimits,
    /// Bytes counted against `limits.budget_bytes` now.
    held: AtomicUsize,
}

impl ReceiveLayer {
    /// A layer with its own budget.
    pub fn new(limits: ReceiveLimits) -> ReceiveLayer {
        ReceiveLayer {
            shared: Arc::new(Shared {
                limits,
                held: AtomicUsize::new(0),
            }),
        }
    }

    /// Bytes of partly received requests held now, across all connections.
    pub fn held_bytes(&self) -> usize {
        self.shared.held.load(Ordering::Relaxed)
    }
}

impl<S> tower_layer::Layer<S> for ReceiveLayer {
    type Service = Receive<S>;

    fn layer(&self, inner: S) -> Receive<S> {
        Receive {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service [`ReceiveLayer`] makes: the inner service, with request bodies bounded.
#[derive(Debug, Clone)]
pub struct Receive<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Service<http::Request<Body>> for Receive<S>
where
    S: Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> S::Future {
        let whole = !CLIENT_STREAMING_PATHS.contains(&request.uri().path());
        let encoding_declared = request.headers().contains_key("grpc-encoding");
        let shared = self.shared.clone();
        self.inner.call(request.map(|body| {
            let mut body = BoundedBody::new(body, shared, whole);
            body.encoding_declared = encoding_declared;
            Body::new(body)
        }))
    }
}

/// A request body under the limits.
struct BoundedBody {
    inner: Body,
    shared: Arc<Shared>,
    /// A unary request: the deadline and the budget cover the whole body, not each message.
    whole: bool,
    /// The request named a `grpc-encoding`, so its messages may have the compressed flag set.
    encoding_declared: bool,
    /// The current message's prefix bytes seen so far (0 between messages).
    prefix: [u8; PREFIX_BYTES],
    prefix_seen: usize,
    /// Body bytes of the current message still to come, once its prefix is in.
    remaining: usize,
    /// Bytes of the request counted against the budget now.
    held: usize,
    /// Bytes that would be held if the budget allowed: the current message so far (or the
    /// whole body so far, for a unary request).
    receiving: usize,
    /// Bytes of the current message so far, prefix included.
    message_bytes: usize,
    /// When what must arrive before the deadline started, while something is outstanding.
    started: Option<Instant>,
    /// The deadline's timer, made the first time the body has to wait with a deadline running.
    timer: Option<Pin<Box<Sleep>>>,
    done: bool,
}

impl BoundedBody {
    fn new(inner: Body, shared: Arc<Shared>, whole: bool) -> BoundedBody {
        BoundedBody {
            inner,
            shared,
            whole,
            encoding_declared: false,
            prefix: [0; PREFIX_BYTES],
            prefix_seen: 0,
            remaining: 0,
            held: 0,
            receiving: 0,
            message_bytes: 0,
            started: whole.then(Instant::now),
            timer: None,
            done: false,
        }
    }

    fn in_message(&self) -> bool {
        self.prefix_seen > 0
    }

    /// Follows the framing through `data` and counts it against the budget.
    fn advance(&mut self, mut data: &[u8]) -> Result<(), BusError> {
        while !data.is_empty() {
            if self.prefix_seen < PREFIX_BYTES {
                let take = (PREFIX_BYTES - self.prefix_seen).min(data.len());
                self.prefix[self.prefix_seen..self.prefix_seen + take]
                    .copy_from_slice(&data[..take]);
                self.prefix_seen += take;
                self.receiving += take;
                self.message_bytes += take;
                data = &data[take..];
                if self.prefix_seen == PREFIX_BYTES {
                    let [flag, a, b, c, d] = self.prefix;
                    match flag {
                        0 => {}
                        1 if self.encoding_declared => {}
                        _ => {
                            return Err(BusError::MalformedRequest {
                                message: "message".to_owned(),
                                detail: format!(
                                    "its compressed flag is {flag}, but the request declares no \
                                     grpc-encoding (the flag is 0, or 1 with an encoding)"
                                ),
                            })
                        }
                    }
                    let declared = u32::from_be_bytes([a, b, c, d]) as usize;
                    let limit = self.shared.limits.max_message_bytes;
                    if declared > limit {
                        return Err(BusError::MessageTooLarge { declared, limit });
                    }
                    self.remaining = declared;
                    if declared == 0 {
                        self.message_done();
                    }
                }
            } else {
                let take = self.remaining.min(data.len());
                self.remaining -= take;
                self.receiving += take;
                self.message_bytes += take;
                data = &data[take..];
                if self.remaining == 0 {
                    self.message_done();
                }
            }
        }
        if !self.whole && self.in_message() && self.started.is_none() {
            self.started = Some(Instant::now());
        }
        self.hold(self.receiving)
    }

    fn message_done(&mut self) {
        self.prefix_seen = 0;
        self.message_bytes = 0;
        if !self.whole {
            self.receiving = 0;
            self.started = None;
        }
    }

    /// Counts `bytes` against the budget in place of what this body held.
    fn hold(&mut self, bytes: usize) -> Result<(), BusError> {
        if bytes <= self.held {
            self.shared
                .held
                .fetch_sub(self.held - bytes, Ordering::Relaxed);
            self.held = bytes;
            return Ok(());
        }
        let more = bytes - self.held;
        let budget = self.shared.limits.budget_bytes;
        let before = self.shared.held.fetch_add(more, Ordering::Relaxed);
        if before + more > budget {
            self.shared.held.fetch_sub(more, Ordering::Relaxed);
            return Err(BusError::ReceiveBudgetExhausted { budget });
        }
        self.held = bytes;
        Ok(())
    }

    fn fail(&mut self, error: BusError) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.done = true;
        self.started = None;
        let _ = self.hold(0);
        Poll::Ready(Some(Err(Status::from(error))))
    }

    /// Polls the deadline, if one is running; ready once it has passed.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(started) = self.started else {
            return Poll::Pending;
        };
        let deadline = started + self.shared.limits.timeout;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx)
    }
}

impl http_body::Body for BoundedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(error) = this.advance(data) {
                        return this.fail(error);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                if this.in_message() {
                    let arrived = this.message_bytes;
                    return this.fail(BusError::MalformedRequest {
                        message: "message".to_owned(),
                        detail: format!(
                            "the request body ended inside a message, {arrived} bytes into it"
                        ),
                    });
                }
                this.done = true;
                this.started = None;
                let _ = this.hold(0);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(status))) => Poll::Ready(Some(Err(status))),
            Poll::Pending => {
                if this.poll_deadline(cx).is_ready() {
                    let timeout = this.shared.limits.timeout;
                    return this.fail(BusError::ReceiveTimeout { timeout });
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for BoundedBody {
    fn drop(&mut self) {
        let _ = self.hold(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(whole: bool, budget_bytes: usize) -> BoundedBody {
        let layer = ReceiveLayer::new(ReceiveLimits {
            timeout: Duration::from_secs(1),
            budget_bytes,
            max_message_bytes: 1000,
        });
        BoundedBody::new(Body::empty(), layer.shared, whole)
    }

    fn message(len: usize) -> Vec<u8> {
        let mut bytes = vec![0, 0, 0, 0, 0];
        bytes[1..].copy_from_slice(&(len as u32).to_be_bytes());
        bytes.extend(std::iter::repeat_n(7u8, len));
        bytes
    }

    #[test]
    fn follows_messages_across_any_chunking() {
        let stream: Vec<u8> = [message(10), message(0), message(300), message(1)].concat();
        for chunk in [1, 2, 4, 5, 6, 7, 64, stream.len()] {
            let mut body = body(false, 10_000);
            let mut most = 0;
            for piece in stream.chunks(chunk) {
                body.advance(piece).unwrap();
                most = most.max(body.held);
                assert_eq!(body.shared.held.load(Ordering::Relaxed), body.held);
            }
            assert!(!body.in_message(), "chunk {chunk}");
            assert_eq!(
                body.held, 0,
                "chunk {chunk}: a finished message holds nothing"
            );
            assert!(most <= 305, "chunk {chunk}: held {most}");
            assert!(body.started.is_none());
        }
    }

    #[test]
    fn a_unary_body_is_held_whole_until_it_ends() {
        let mut body = body(true, 10_000);
        body.advance(&message(100)).unwrap();
        assert_eq!(body.held, 105);
        assert!(body.started.is_some());
        body.hold(0).unwrap();
        assert_eq!(body.shared.held.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn the_budget_is_shared_and_given_back() {
        let first = &mut body(false, 100);
        let shared = first.shared.clone();
        let mut second = BoundedBody::new(Body::empty(), shared.clone(), false);
        first.advance(&message(200)[..80]).unwrap();
        assert!(matches!(
            second.advance(&message(200)[..30]),
            Err(BusError::ReceiveBudgetExhausted { budget: 100 })
        ));
        assert_eq!(shared.held.load(Ordering::Relaxed), 80);
        drop(std::mem::replace(first, body(false, 1)));
        assert_eq!(shared.held.load(Ordering::Relaxed), 0);
        second.advance(&message(200)[30..60]).unwrap();
    }

    #[test]
    fn a_declared_length_over_the_limit_is_refused_at_its_prefix() {
        assert!(matches!(
            body(false, 10_000).advance(&message(1001)[..5]),
            Err(BusError::MessageTooLarge {
                declared: 1001,
                limit: 1000
            })
        ));
    }

    #[test]
    fn a_compressed_flag_needs_a_declared_encoding() {
        let compressed = |flag: u8| {
            let mut bytes = message(10);
            bytes[0] = flag;
            bytes
        };
        assert!(matches!(
            body(false, 10_000).advance(&compressed(1)),
            Err(BusError::MalformedRequest { .. })
        ));
        let mut declared = body(false, 10_000);
        declared.encoding_declared = true;
        declared.advance(&compressed(1)).unwrap();
        assert!(matches!(
            declared.advance(&compressed(2)),
            Err(BusError::MalformedRequest { .. })
        ));
    }
}
