//! Panics are contained to the call they happen in, and never silent.
//!
//! [`install_panic_hook`] logs every panic of the process through `tracing`. While serving, a
//! panic can happen in two places: in a handler (the future that makes the response), which
//! tower-http's `CatchPanicLayer` turns into an INTERNAL response ([`catch_panics`]); or while a
//! response body is polled, after its headers went out: a server stream (Subscribe,
//! PublishStream, health's Watch) and its encoder. hyper polls those in the HTTP/2 stream's own
//! task, so a panic there would reset the stream with no status. [`PanicSafeBodyLayer`] ends such
//! a body with INTERNAL trailers instead. Either way the status carries reason `internal`, and
//! the connection and its other calls go on.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Once;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use tonic::codegen::http;
use tonic::codegen::Service;
use tower_http::catch_panic::CatchPanicLayer;

use crate::error::BusError;

/// Installs, once per process, a panic hook that logs every panic through `tracing` at ERROR with
/// its message, location and thread, so a panic in a task others share (a connection, a group's
/// dispatcher, the store's sync thread) is never silent. The hook it replaces (by default,
/// printing to stderr) still runs when no global `tracing` subscriber is set, as in tests and
/// embedders that log otherwise.
pub fn install_panic_hook() {
    static INSTALLED: Once = Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = panic_message(info.payload());
            let location = info
                .location()
                .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
                .unwrap_or_default();
            let thread = std::thread::current();
            tracing::error!(
                panic.message = %message,
                panic.location = %location,
                thread = thread.name().unwrap_or("<unnamed>"),
                "panic"
            );
            if !tracing::dispatcher::has_been_set() {
                previous(info);
            }
        }));
    });
}

/// A panic's message, when it is text (as `panic!` makes it). Used by the hook and by the
/// supervisor of group dispatchers.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> &str {
    if let Some(text) = payload.downcast_ref::<&str>() {
        text
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text
    } else {
        "<non-text panic payload>"
    }
}

/// The answer to a call whose handler panicked (the hook has logged the panic): INTERNAL with
/// reason `internal`, as a gRPC response, so the connection and its other calls go on.
fn panic_response(
    _panic: Box<dyn Any + Send>,
) -> tonic::codegen::http::Response<tonic::body::Body> {
    tonic::Status::from(BusError::Internal).into_http()
}

/// tower-http's panic layer, answering a panicking handler with INTERNAL `internal`.
pub fn catch_panics() -> CatchPanicLayer<PanicResponse> {
    CatchPanicLayer::custom(panic_response as PanicResponse)
}

/// The function [`catch_panics`] answers with.
pub type PanicResponse = fn(Box<dyn Any + Send>) -> http::Response<tonic::body::Body>;

/// Wraps every response body so that a panic while polling it ends the call with INTERNAL
/// trailers (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct PanicSafeBodyLayer;

impl<S> tower_layer::Layer<S> for PanicSafeBodyLayer {
    type Service = PanicSafeBodies<S>;

    fn layer(&self, inner: S) -> PanicSafeBodies<S> {
        PanicSafeBodies { inner }
    }
}

/// The service [`PanicSafeBodyLayer`] makes.
#[derive(Debug, Clone)]
pub struct PanicSafeBodies<S> {
    inner: S,
}

impl<S, Request, B> Service<Request> for PanicSafeBodies<S>
where
    S: Service<Request, Response = http::Response<B>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    B: 'static,
{
    type Response = http::Response<PanicSafeBody<B>>;
    type Error = S::Error;
    type Future = futures_util::future::MapOk<S::Future, fn(http::Response<B>) -> Self::Response>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        use futures_util::TryFutureExt as _;
        let wrap: fn(http::Response<B>) -> Self::Response = |response| {
            response.map(|inner| PanicSafeBody {
                inner,
                panicked: false,
            })
        };
        self.inner.call(request).map_ok(wrap)
    }
}

/// A response body that ends with INTERNAL trailers if polling it panics.
#[derive(Debug)]
pub struct PanicSafeBody<B> {
    inner: B,
    /// Set once a poll panicked: the inner body is not polled again.
    panicked: bool,
}

impl<B> http_body::Body for PanicSafeBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if self.panicked {
            return Poll::Ready(None);
        }
        let inner = &mut self.inner;
        match std::panic::catch_unwind(AssertUnwindSafe(|| Pin::new(inner).poll_frame(cx))) {
            Ok(polled) => polled,
            Err(_panic) => {
                // The hook has logged it.
                self.panicked = true;
                let mut trailers = http::HeaderMap::new();
                let _ = tonic::Status::from(BusError::Internal).add_header(&mut trailers);
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.panicked || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
