//! Requests between bus nodes over core NATS, for the broker's consumer-group relays
//! (`crate::broker::relay`): a node that has a member of a group homed on another node joins
//! it there, receives its deliveries and forwards its acknowledgements, all as requests on
//! `_EVENTBUS.<stream>.peer.<suffix>`. The broker picks the suffixes and the bytes; this module
//! only carries them, so the broker sees no NATS type.
//!
//! Core NATS, not JetStream: these are conversations between live processes, worth nothing
//! once either side is gone (a node that dies takes its members with it; the group's home
//! redelivers what they held).

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

/// Requests one [`PeerRequest`] receiver holds before the subscription waits for the broker to
/// take them (NATS then buffers, and the asking node's request waits for its answer).
const INBOX_CAPACITY: usize = 16;

/// A request from another node, to be answered once.
pub struct PeerRequest {
    payload: Bytes,
    reply: Option<async_nats::Subject>,
    client: async_nats::Client,
}

impl PeerRequest {
    /// What the asking node sent.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Answers the request (nothing happens when the asker wanted no answer). Never waits: the
    /// answer is queued on the NATS client.
    pub fn answer(self, payload: Bytes) {
        let Some(reply) = self.reply else {
            return;
        };
        let client = self.client;
        // Spawned on the caller's runtime (the client's own task, on the NATS runtime, sends
        // it); outside any runtime (a drop at exit) there is no one left to answer anyway.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = client.publish(reply, payload).await;
            });
        }
    }
}

/// Why a request to another node got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// No node serves the subject (NATS's no-responders status): the node is gone, or no longer
    /// serves it.
    #[error("no node answers on it")]
    NoResponders,
    /// The request was sent and no answer came within the wait.
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    /// NATS could not take the request (the connection is down).
    #[error("{0}")]
    Failed(String),
}

/// Subscribes `client` to `subject` and returns the requests that arrive, subscribed once this
/// returns. Dropping the receiver unsubscribes at once (the task watches it), so a node asking
/// afterwards gets [`PeerError::NoResponders`].
pub(super) async fn serve(
    client: async_nats::Client,
    subject: String,
) -> Result<mpsc::Receiver<PeerRequest>, async_nats::Error> {
    let mut requests = client.subscribe(subject).await?;
    // The server has the subscription before anything this node sends afterwards.
    client.flush().await?;
    let (sender, receiver) = mpsc::channel(INBOX_CAPACITY);
    tokio::spawn(async move {
        loop {
            let request = tokio::select! {
                _ = sender.closed() => break,
                request = requests.next() => request,
            };
            let Some(request) = request else {
                break;
            };
            let request = PeerRequest {
                payload: request.payload,
                reply: request.reply,
                client: client.clone(),
            };
            if sender.send(request).await.is_err() {
                break;
            }
        }
        // Dropping `requests` unsubscribes.
    });
    Ok(receiver)
}

/// One request to whichever node serves `subject`, answered within `wait`.
pub(super) async fn ask(
    client: async_nats::Client,
    subject: String,
    payload: Bytes,
    wait: Duration,
) -> Result<Bytes, PeerError> {
    let request = async_nats::Request::new()
        .payload(payload)
        .timeout(Some(wait));
    // The outer timeout covers a connection that cannot even take the request.
    match tokio::time::timeout(wait, client.send_request(subject, request)).await {
        Ok(Ok(answer)) => Ok(answer.payload),
        Ok(Err(error)) => match error.kind() {
            async_nats::client::RequestErrorKind::NoResponders => Err(PeerError::NoResponders),
            async_nats::client::RequestErrorKind::TimedOut => Err(PeerError::TimedOut(wait)),
            _ => Err(PeerError::Failed(error.to_string())),
        },
        Err(_) => Err(PeerError::TimedOut(wait)),
    }
}
