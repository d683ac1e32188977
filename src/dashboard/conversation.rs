//! Conversations: every event of one correlation id, found in the log, with each query paired
//! with its reply so the page can draw where the time went.
//!
//! - `GET /api/v1/conversations?limit=N`: the newest conversations (correlation ids) among the
//!   last [`RECENT_SCAN_EVENTS`] events of the log, newest first, at most `limit` (default 20,
//!   at most [`MAX_RECENT`]).
//! - `GET /api/v1/conversations/<correlation id>`: that conversation's events among the newest
//!   [`SCAN_EVENTS`] of the log, oldest first (at most [`MAX_EVENTS`]), and its exchanges.
//!
//! A query is stored as an event with a `reply_to` inbox; its reply is the event published to
//! that inbox. Times are the bus's publish times (one clock for every service), in ms since the
//! epoch. The scan reads the log, so it finds what retention still holds, on any node of a
//! cluster alike; it costs a read of up to [`SCAN_EVENTS`] events per request, paid by the
//! operator who asks and never by the publish path.

use std::collections::HashMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::api::{epoch_ms, ApiError};
use super::DashboardState;
use crate::broker::Broker;
use crate::event::SharedEvent;
use crate::sdk::{ERROR_ATTRIBUTE, ERROR_EVENT_TYPE};

/// Events of the log (the newest) searched for one correlation id.
pub const SCAN_EVENTS: u64 = 100_000;
/// Events of the log (the newest) looked at for the list of recent conversations.
pub const RECENT_SCAN_EVENTS: u64 = 5_000;
/// Events of one conversation returned, at most (the oldest first).
pub const MAX_EVENTS: usize = 1_000;
/// Conversations listed, at most.
pub const MAX_RECENT: usize = 100;
/// Correlation ids longer than this are refused (the bus's own ids are 36 characters).
const MAX_ID_BYTES: usize = 256;
/// Events read from the log at a time.
const READ_CHUNK: usize = 2_048;
/// Bytes of held events read at a time, at most.
const READ_CHUNK_BYTES: usize = 8 << 20;

/// One event of a conversation.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ConversationEvent {
    pub sequence: u64,
    pub topic: String,
    pub source: String,
    #[serde(rename = "type")]
    pub event_type: String,
    pub id: String,
    /// When the bus stored it, ms since the epoch.
    pub publish_ms: f64,
    /// Set on a query: the inbox its reply goes to.
    pub reply_to: Option<String>,
    pub causation_id: String,
    /// An error reply (`type` `eventbus.error` or an `error` attribute): its message.
    pub error: Option<String>,
}

/// A query and its reply, if one came.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Exchange {
    /// The query's topic.
    pub topic: String,
    /// Who asked.
    pub asker: String,
    pub query_sequence: u64,
    pub asked_ms: f64,
    /// Who answered; `None` while (or if) no reply is in the log.
    pub responder: Option<String>,
    pub reply_sequence: Option<u64>,
    pub answered_ms: Option<f64>,
    /// `answered_ms - asked_ms`.
    pub took_ms: Option<f64>,
    /// The reply was an error reply.
    pub error: bool,
}

/// `GET /api/v1/conversations/<id>`.
#[derive(Debug, Serialize)]
pub struct Conversation {
    pub correlation_id: String,
    /// The sequences searched, inclusive (`None` on an empty log).
    pub scanned: Option<(u64, u64)>,
    /// More than [`MAX_EVENTS`] matched; the newest were left out.
    pub truncated: bool,
    pub events: Vec<ConversationEvent>,
    /// Queries in the order asked.
    pub exchanges: Vec<Exchange>,
    /// The index in `exchanges` of the slowest answered query.
    pub slowest: Option<usize>,
    /// From the first event to the last, ms.
    pub span_ms: f64,
}

/// One entry of `GET /api/v1/conversations`.
#[derive(Debug, Serialize, PartialEq)]
pub struct ConversationSummary {
    pub correlation_id: String,
    pub first_ms: f64,
    pub last_ms: f64,
    pub events: u32,
    /// Queries among them (events with a reply inbox).
    pub queries: u32,
    /// Its topics, inboxes left out, in order of first appearance, at most 8.
    pub topics: Vec<String>,
}

fn conversation_event(stored: &SharedEvent) -> ConversationEvent {
    let event = &stored.event;
    let error = event.attributes.get(ERROR_ATTRIBUTE).cloned().or_else(|| {
        (event.event_type == ERROR_EVENT_TYPE).then(|| String::from_utf8_lossy(&event.data).into())
    });
    ConversationEvent {
        sequence: stored.sequence,
        topic: event.topic.to_string(),
        source: event.source.to_string(),
        event_type: event.event_type.clone(),
        id: event.id.clone(),
        publish_ms: epoch_ms(stored.publish_time),
        reply_to: event.reply_to.as_ref().map(|topic| topic.to_string()),
        causation_id: event.causation_id.clone(),
        error,
    }
}

/// Pairs each query (an event with `reply_to`) with the first later event on its inbox, and
/// finds the slowest answered one. `events` are in sequence order.
pub fn exchanges(events: &[ConversationEvent]) -> (Vec<Exchange>, Option<usize>) {
    let mut exchanges = Vec::new();
    let mut waiting: HashMap<&str, usize> = HashMap::new();
    for event in events {
        if let Some(at) = waiting.remove(event.topic.as_str()) {
            let exchange: &mut Exchange = &mut exchanges[at];
            exchange.responder = Some(event.source.clone());
            exchange.reply_sequence = Some(event.sequence);
            exchange.answered_ms = Some(event.publish_ms);
            exchange.took_ms = Some(event.publish_ms - exchange.asked_ms);
            exchange.error = event.error.is_some();
        }
        if let Some(inbox) = &event.reply_to {
            waiting.insert(inbox.as_str(), exchanges.len());
            exchanges.push(Exchange {
                topic: event.topic.clone(),
                asker: event.source.clone(),
                query_sequence: event.sequence,
                asked_ms: event.publish_ms,
                responder: None,
                reply_sequence: None,
                answered_ms: None,
                took_ms: None,
                error: false,
            });
        }
    }
    let slowest = exchanges
        .iter()
        .enumerate()
        .filter_map(|(index, exchange)| exchange.took_ms.map(|took| (index, took)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(index, _)| index);
    (exchanges, slowest)
}

/// Reads the log from `from` (exclusive) to the visible head in chunks, handing each event to
/// `each` until it returns false. Blocking.
fn scan(
    broker: &Broker,
    from: u64,
    mut each: impl FnMut(&SharedEvent) -> bool,
) -> Result<(), ApiError> {
    let mut after = from;
    loop {
        let chunk = broker
            .read_visible(after, READ_CHUNK, READ_CHUNK_BYTES)
            .map_err(ApiError::storage)?;
        let Some(last) = chunk.last().map(|event| event.sequence) else {
            return Ok(());
        };
        for event in &chunk {
            if !each(event) {
                return Ok(());
            }
        }
        after = last;
    }
}

/// The sequence after which the newest `events` of the log start, and the head.
fn window(broker: &Broker, events: u64) -> (u64, u64) {
    let head = broker.visible_head();
    let oldest = broker.oldest_held().unwrap_or(head + 1);
    (
        head.saturating_sub(events).max(oldest.saturating_sub(1)),
        head,
    )
}

/// `GET /api/v1/conversations/<correlation id>`.
pub async fn one(
    State(state): State<DashboardState>,
    Path(correlation_id): Path<String>,
) -> Result<Json<Conversation>, ApiError> {
    if correlation_id.is_empty() || correlation_id.len() > MAX_ID_BYTES {
        return Err(ApiError::invalid(
            "correlation_id",
            format!("must be 1 to {MAX_ID_BYTES} bytes"),
        ));
    }
    if !state.shows_event_data() {
        return Err(ApiError::event_data_closed());
    }
    let broker = state.broker.clone();
    crate::admin::off_workers(move || {
        let (after, head) = window(&broker, SCAN_EVENTS);
        let mut events = Vec::new();
        let mut truncated = false;
        scan(&broker, after, |stored| {
            if stored.event.correlation_id == correlation_id {
                if events.len() == MAX_EVENTS {
                    truncated = true;
                    return false;
                }
                events.push(conversation_event(stored));
            }
            true
        })?;
        let (exchanges, slowest) = exchanges(&events);
        let span_ms = match (events.first(), events.last()) {
            (Some(first), Some(last)) => last.publish_ms - first.publish_ms,
            _ => 0.0,
        };
        Ok(Json(Conversation {
            correlation_id,
            scanned: (head > after).then_some((after + 1, head)),
            truncated,
            events,
            exchanges,
            slowest,
            span_ms,
        }))
    })
    .await
}

/// The query of `GET /api/v1/conversations`.
#[derive(Debug, Deserialize)]
pub struct RecentParams {
    /// Conversations to list (1 to [`MAX_RECENT`]; default 20).
    pub limit: Option<usize>,
}

/// `GET /api/v1/conversations`.
pub async fn recent(
    State(state): State<DashboardState>,
    params: Result<Query<RecentParams>, QueryRejection>,
) -> Result<Json<Vec<ConversationSummary>>, ApiError> {
    let Query(params) = params.map_err(ApiError::query)?;
    let limit = params.limit.unwrap_or(20);
    if !(1..=MAX_RECENT).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("must be 1 to {MAX_RECENT}"),
        ));
    }
    if !state.shows_event_data() {
        return Err(ApiError::event_data_closed());
    }
    let broker = state.broker.clone();
    crate::admin::off_workers(move || {
        let (after, _) = window(&broker, RECENT_SCAN_EVENTS);
        let mut events = Vec::new();
        scan(&broker, after, |stored| {
            if !stored.event.correlation_id.is_empty() {
                events.push(stored.clone());
            }
            true
        })?;
        Ok(Json(summaries(&events, limit)))
    })
    .await
}

/// Groups `events` (in sequence order, each with a correlation id) into conversations, the
/// one with the newest event first, at most `limit`.
fn summaries(events: &[SharedEvent], limit: usize) -> Vec<ConversationSummary> {
    let mut by_id: HashMap<&str, ConversationSummary> = HashMap::new();
    for stored in events {
        let event = &stored.event;
        let at = epoch_ms(stored.publish_time);
        let summary = by_id
            .entry(event.correlation_id.as_str())
            .or_insert_with(|| ConversationSummary {
                correlation_id: event.correlation_id.clone(),
                first_ms: at,
                last_ms: at,
                events: 0,
                queries: 0,
                topics: Vec::new(),
            });
        summary.last_ms = at;
        summary.events += 1;
        summary.queries += u32::from(event.reply_to.is_some());
        let topic = event.topic.as_str();
        if !event.topic.is_inbox()
            && summary.topics.len() < 8
            && !summary.topics.iter().any(|t| t == topic)
        {
            summary.topics.push(topic.to_owned());
        }
    }
    let mut summaries: Vec<ConversationSummary> = by_id.into_values().collect();
    summaries.sort_by(|a, b| b.last_ms.total_cmp(&a.last_ms));
    summaries.truncate(limit);
    summaries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sequence: u64, topic: &str, source: &str, at: f64) -> ConversationEvent {
        ConversationEvent {
            sequence,
            topic: topic.to_owned(),
            source: source.to_owned(),
            event_type: "t".to_owned(),
            id: sequence.to_string(),
            publish_ms: at,
            reply_to: None,
            causation_id: String::new(),
            error: None,
        }
    }

    fn query(sequence: u64, topic: &str, inbox: &str, at: f64) -> ConversationEvent {
        ConversationEvent {
            reply_to: Some(inbox.to_owned()),
            ..event(sequence, topic, "query-service", at)
        }
    }

    #[test]
    fn pairs_each_query_with_the_reply_on_its_inbox_and_finds_the_slowest() {
        let events = vec![
            query(1, "user.query", "_bus.inbox.a", 0.0),
            event(2, "_bus.inbox.a", "user-service", 2.0),
            query(3, "order.query", "_bus.inbox.b", 2.5),
            query(4, "product.query", "_bus.inbox.c", 2.75),
            ConversationEvent {
                error: Some("boom".to_owned()),
                ..event(5, "_bus.inbox.c", "product-service", 3.0)
            },
            event(6, "_bus.inbox.b", "order-service", 9.5),
            // A second reply on an inbox already answered is not the answer.
            event(7, "_bus.inbox.a", "user-service", 20.0),
        ];
        let (exchanges, slowest) = exchanges(&events);
        let got: Vec<_> = exchanges
            .iter()
            .map(|e| (e.topic.as_str(), e.responder.as_deref(), e.took_ms, e.error))
            .collect();
        assert_eq!(
            got,
            vec![
                ("user.query", Some("user-service"), Some(2.0), false),
                ("order.query", Some("order-service"), Some(7.0), false),
                ("product.query", Some("product-service"), Some(0.25), true),
            ]
        );
        assert_eq!(slowest, Some(1));
    }

    #[test]
    fn an_unanswered_query_has_no_responder_and_is_never_the_slowest() {
        let events = vec![
            query(1, "user.query", "_bus.inbox.a", 0.0),
            query(2, "order.query", "_bus.inbox.b", 1.0),
            event(3, "_bus.inbox.b", "order-service", 1.5),
        ];
        let (exchanges, slowest) = exchanges(&events);
        assert_eq!(exchanges[0].responder, None);
        assert_eq!(exchanges[0].took_ms, None);
        assert_eq!(slowest, Some(1));
    }
}
