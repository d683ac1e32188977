//! Accepting connections without spinning: the stream of accepted TCP connections the server
//! hands to tonic, and the open-file limit raised at start.
//!
//! tonic's own `TcpIncoming` yields every accept error and its server loop retries at once. When
//! the process is out of file descriptors (EMFILE, or ENFILE for the whole system), the pending
//! connection stays in the listen queue, the listener stays readable, and the loop spins a whole
//! core while every other task starves. [`Incoming`] instead sleeps after such an error, 10 ms
//! and doubling up to 1 s until an accept succeeds, and logs the errors at ERROR at most once per
//! [`LOG_EVERY`] with a count of the ones it left out.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use futures_util::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tracing::{debug, error, info, warn};

/// The first pause after an accept error.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// The longest pause between accept attempts while they keep failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// At most one accept-error log line per this long.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

/// Accepted connections (with TCP_NODELAY set), for `serve_with_incoming_shutdown`. Never yields
/// an error: errors are logged and waited out (see the module docs).
#[derive(Debug)]
pub struct Incoming {
    listener: TcpListener,
    /// Armed after an accept error; no accept is tried until it fires.
    pause: Option<Pin<Box<Sleep>>>,
    /// The next pause, doubled after each error in a row.
    backoff: Duration,
    /// When an accept error was last logged, and how many have failed since without a log.
    last_logged: Option<Instant>,
    unlogged: u64,
}

impl Incoming {
    /// Accepts connections on `listener`.
    pub fn new(listener: TcpListener) -> Incoming {
        Incoming {
            listener,
            pause: None,
            backoff: FIRST_BACKOFF,
            last_logged: None,
            unlogged: 0,
        }
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
    type Item = io::Result<TcpStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(pause) = self.pause.as_mut() {
                ready!(pause.as_mut().poll(cx));
                self.pause = None;
            }
            match ready!(self.listener.poll_accept(cx)) {
                Ok((stream, _peer)) => {
                    if self.backoff != FIRST_BACKOFF {
                        info!(left_out = self.unlogged, "accepting connections again");
                        self.backoff = FIRST_BACKOFF;
                        self.last_logged = None;
                        self.unlogged = 0;
                    }
                    if let Err(error) = stream.set_nodelay(true) {
                        debug!(%error, "cannot set TCP_NODELAY on an accepted connection");
                    }
                    return Poll::Ready(Some(Ok(stream)));
                }
                Err(error) if is_per_connection(&error) => {
                    debug!(%error, "an accepted connection was already gone");
                }
                Err(error) => self.on_error(&error),
            }
        }
    }
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
