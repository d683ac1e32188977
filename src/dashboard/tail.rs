//! `GET /api/v1/tail?pattern=P`: a live tail of the events matching a topic pattern, as
//! server-sent events (`text/event-stream`), for the dashboard's tail view or `curl -N`.
//!
//! The tail reads the log, not the routing path: after each change of the visible head it reads
//! the new events ([`Broker::read_visible`]) and sends the matching ones. So it is not a
//! subscription (no responder for queries, no topology entry, no queue the router fills), and a
//! tail that falls behind skips ahead instead of holding anything back.
//!
//! Stream items (each `data` is one JSON document):
//! - `event: ready`: `{"pattern", "head_sequence", "resumed_after"}`, first; events after
//!   `resumed_after` (when resuming) or after that head follow.
//! - `event: event`: one event in the CloudEvents JSON format (as `eventbus subscribe --json`
//!   prints it, with the `sequence` extension); its SSE `id` is the sequence.
//!
//! Resuming: a client that reconnects with `Last-Event-ID: <sequence>` (as a browser's
//! `EventSource` does by itself after a dropped connection) gets the events after that sequence
//! first, so a bus restart or a network blip leaves no silent gap: what the log still holds is
//! sent, at most [`MAX_BEHIND`] of it (`skipped` says when less). A `Last-Event-ID` past the
//! head (the log was replaced, e.g. a memory store restarted) starts at the head.
//! - `event: skipped`: `{"events": N, "why"}`: N events of the log were not looked at, because
//!   the tail was more than [`MAX_BEHIND`] behind the head, or matching events were over
//!   [`MAX_EVENTS_PER_SECOND`].
//!
//! Errors: 400 for a malformed `pattern` (the message names the rule), 403 on a bus with
//! authentication, 503 when [`super::MAX_TAILS`] tails are open.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::api::ApiError;
use super::DashboardState;
use crate::auth::Auth;
use crate::broker::Broker;
use crate::event::SharedEvent;
use crate::topic::Pattern;

/// Events of the log the tail may be behind the head before it skips to the newest ones: a
/// tail is for watching, and a page cannot show a backlog anyway.
pub const MAX_BEHIND: u64 = 10_000;
/// Matching events sent per second, at most; the rest are counted in `skipped`.
pub const MAX_EVENTS_PER_SECOND: u32 = 200;
/// Events read from the log at a time.
const READ_CHUNK: usize = 512;
/// Bytes of held events read at a time, at most.
const READ_CHUNK_BYTES: usize = 4 << 20;
/// Stream items waiting for the HTTP connection, at most.
const QUEUE: usize = 64;

/// The query of a tail request.
#[derive(Debug, Deserialize)]
pub struct TailParams {
    /// A topic pattern (`orders.*`, `user.>`); `>` when absent.
    pub pattern: Option<String>,
}

/// `GET /api/v1/tail`.
pub async fn tail(
    State(state): State<DashboardState>,
    headers: HeaderMap,
    params: Result<Query<TailParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) = params.map_err(ApiError::query)?;
    let resume_after = match headers.get("last-event-id") {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::invalid("Last-Event-ID", "must be a sequence number"))?,
        ),
    };
    let text = params.pattern.as_deref().unwrap_or(">");
    let pattern = Pattern::parse(text).map_err(|rule| ApiError::invalid("pattern", rule))?;
    if !state.shows_event_data() {
        return Err(ApiError::event_data_closed());
    }
    let Ok(permit) = state.tails.clone().try_acquire_owned() else {
        return Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!(
                "{} tails are open, the most this bus serves at once; close one",
                super::MAX_TAILS
            ),
        });
    };
    let (sender, receiver) = mpsc::channel(QUEUE);
    let broker = state.broker.clone();
    let state_auth = state.auth.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let stopped = broker.clone();
        tokio::select! {
            () = follow(broker, state_auth, pattern, resume_after, sender) => {}
            // Ends the stream on shutdown, so the admin listener's graceful stop is not held
            // by an open tail.
            () = stopped.stopped() => {}
        }
    });
    Ok(Sse::new(ReceiverStream::new(receiver))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

type Sender = mpsc::Sender<Result<SseEvent, Infallible>>;

/// Sends one item; false once the client has gone.
async fn send(sender: &Sender, kind: &str, data: serde_json::Value) -> bool {
    let item = SseEvent::default().event(kind).data(data.to_string());
    sender.send(Ok(item)).await.is_ok()
}

/// Sends one event, with its sequence as the SSE id (what `Last-Event-ID` resumes from).
async fn send_event(sender: &Sender, event: &SharedEvent) -> bool {
    let pb = crate::service::convert::event_to_pb(event);
    let item = SseEvent::default()
        .event("event")
        .id(event.sequence.to_string())
        .data(crate::cli::cloudevent::to_json(&pb).to_string());
    sender.send(Ok(item)).await.is_ok()
}

/// Counts matching events per one-second window against [`MAX_EVENTS_PER_SECOND`].
struct RateWindow {
    started: Instant,
    sent: u32,
}

impl RateWindow {
    fn admits(&mut self, now: Instant) -> bool {
        if now.duration_since(self.started) >= Duration::from_secs(1) {
            self.started = now;
            self.sent = 0;
        }
        self.sent += 1;
        self.sent <= MAX_EVENTS_PER_SECOND
    }
}

/// Sends `pattern`'s events from the log as the head moves. Ends, with an `error` item, once
/// `auth` is no longer open (a reload turned authentication on: event contents are closed to
/// the admin listener from then on, see the module docs of [`super`]).
async fn follow(
    broker: Broker,
    auth: Auth,
    pattern: Pattern,
    resume_after: Option<u64>,
    sender: Sender,
) {
    let mut head = broker.watch_head();
    let now = *head.borrow_and_update();
    let resume_after = resume_after.filter(|after| *after <= now);
    let mut cursor = resume_after.unwrap_or(now);
    let ready = serde_json::json!({
        "pattern": pattern.as_str(),
        "head_sequence": now,
        "resumed_after": resume_after,
    });
    if !send(&sender, "ready", ready).await {
        return;
    }
    let mut window = RateWindow {
        started: Instant::now(),
        sent: 0,
    };
    loop {
        // Waits for news only once it has read up to the head (a resumed tail reads what it
        // missed first).
        if cursor >= *head.borrow_and_update() {
            tokio::select! {
                changed = head.changed() => if changed.is_err() { return },
                () = sender.closed() => return,
            }
        }
        if !auth.is_open() {
            let error = serde_json::json!({
                "error": "the bus now authenticates callers: event contents are no longer shown"
            });
            send(&sender, "error", error).await;
            return;
        }
        let target = *head.borrow_and_update();
        if target.saturating_sub(cursor) > MAX_BEHIND {
            let skipped = target - MAX_BEHIND - cursor;
            cursor = target - MAX_BEHIND;
            let why = "the tail was too far behind the head";
            if !send(&sender, "skipped", skipped_json(skipped, why)).await {
                return;
            }
        }
        while cursor < target {
            let reader = broker.clone();
            let after = cursor;
            let read = crate::admin::off_workers(move || {
                reader.read_visible(after, READ_CHUNK, READ_CHUNK_BYTES)
            })
            .await;
            let events: Vec<SharedEvent> = match read {
                Ok(events) => events,
                Err(error) => {
                    let error = serde_json::json!({ "error": format!("reading the log: {error}") });
                    send(&sender, "error", error).await;
                    return;
                }
            };
            let Some(last) = events.last().map(|event| event.sequence) else {
                // Retention dropped what was left before the head: nothing more to read.
                cursor = target;
                break;
            };
            cursor = last;
            let mut over_rate = 0u64;
            for event in events
                .iter()
                .filter(|event| pattern.matches(&event.event.topic))
            {
                if !window.admits(Instant::now()) {
                    over_rate += 1;
                    continue;
                }
                if !send_event(&sender, event).await {
                    return;
                }
            }
            if over_rate > 0 {
                let why = format!(
                    "over {MAX_EVENTS_PER_SECOND} matching events per second, the most a tail shows"
                );
                if !send(&sender, "skipped", skipped_json(over_rate, &why)).await {
                    return;
                }
            }
        }
    }
}

fn skipped_json(events: u64, why: &str) -> serde_json::Value {
    serde_json::json!({ "events": events, "why": why })
}
