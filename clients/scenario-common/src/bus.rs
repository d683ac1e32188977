//! Asking and answering the scenario's queries over the bus, in the protocol's shape.
//!
//! - [`ask`]: one query with a JSON request and a typed reply; the error says which of the ways
//!   a query fails it was (no responder, timeout, an error reply, the bus), because callers
//!   answer each differently (503 at once, 504, the error's own code).
//! - [`serve_until`]: answers a query topic in the service's consumer group until shutdown,
//!   subscribing again with backoff when the bus is away at start (once subscribed, the SDK's
//!   subscription resumes by itself).
//! - [`ok`], [`error`], [`parse`]: replies and requests as `docs/scenario-protocol.md` has them.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use eventbus_client::pb;
use eventbus_client::{Backoff, Client, Error as SdkError, Reply, ERROR_ATTRIBUTE};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::model::{ErrorCode, ErrorDetail, ErrorReply};

/// A client for `source` that connects on first use and again after the bus went away, so a
/// service can start before the bus. Reads its credentials from the environment, as the CLI
/// does: `EVENTBUS_TOKEN` (bearer token), `EVENTBUS_TLS_CA` (a CA PEM file for `https://`
/// URLs), and `EVENTBUS_TLS_CERT` with `EVENTBUS_TLS_KEY` (a client certificate for mutual
/// TLS; both or neither).
pub fn connect(url: &str, source: &str) -> anyhow::Result<Client> {
    let env = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
    let mut builder = Client::builder(url)
        .source(source)
        .connect_timeout(Duration::from_secs(2))
        .keepalive(Duration::from_secs(5));
    if let Some(token) = env("EVENTBUS_TOKEN") {
        builder = builder.token(token);
    }
    if let Some(ca) = env("EVENTBUS_TLS_CA") {
        builder = builder.tls_ca_file(ca);
    }
    match (env("EVENTBUS_TLS_CERT"), env("EVENTBUS_TLS_KEY")) {
        (Some(cert), Some(key)) => builder = builder.tls_client_cert_files(cert, key),
        (None, None) => {}
        _ => anyhow::bail!("EVENTBUS_TLS_CERT and EVENTBUS_TLS_KEY go together"),
    }
    Ok(builder.connect_lazy()?)
}

/// Why a query did not give the expected answer.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// Nobody subscribes to the topic: the bus failed the query at once.
    #[error("no responders for topic {topic}")]
    NoResponders { topic: String },
    /// No reply in time.
    #[error("no reply on topic {topic} within {timeout:?}")]
    Timeout { topic: String, timeout: Duration },
    /// The responder answered with an error reply.
    #[error("{code}: {message}")]
    Remote { code: ErrorCode, message: String },
    /// The reply was not the expected JSON.
    #[error("bad reply on topic {topic}: {message}")]
    BadReply { topic: String, message: String },
    /// The bus could not be asked (e.g. it is down).
    #[error(transparent)]
    Bus(SdkError),
}

/// The request a query belongs to: its correlation id, and the W3C trace context the request
/// came with (the HTTP `traceparent`/`tracestate` headers), so every query of one request is one
/// conversation and, with a tracing client, one trace through the bus.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conversation {
    pub correlation_id: String,
    /// A well-formed `traceparent` (see `eventbus_client::tracecontext::is_valid_traceparent`).
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

impl Conversation {
    /// A conversation with `correlation_id` and no trace context.
    pub fn new(correlation_id: impl Into<String>) -> Conversation {
        Conversation {
            correlation_id: correlation_id.into(),
            ..Conversation::default()
        }
    }

    /// The conversation `event` (a query being handled) belongs to: its correlation id and
    /// trace context, for the queries its handler asks in turn.
    pub fn of(event: &eventbus_client::pb::Event) -> Conversation {
        Conversation {
            correlation_id: event.correlation_id.clone(),
            traceparent: eventbus_client::traceparent(event).map(str::to_owned),
            tracestate: event
                .attributes
                .get(eventbus_client::tracecontext::TRACESTATE)
                .cloned(),
        }
    }
}

/// Asks `request` as JSON on `topic` as part of `conversation` and waits up to `timeout` for a
/// reply of type `R`.
pub async fn ask<Q: Serialize, R: DeserializeOwned>(
    client: &Client,
    topic: &str,
    request: &Q,
    conversation: &Conversation,
    timeout: Duration,
) -> Result<R, AskError> {
    let mut event = client
        .event(topic)
        .json(request)
        .map_err(AskError::Bus)?
        .correlation_id(&conversation.correlation_id);
    if let Some(traceparent) = &conversation.traceparent {
        event = event.trace_context(traceparent.clone(), conversation.tracestate.clone());
    }
    let reply = match event.query(timeout).await {
        Ok(reply) => reply,
        Err(error) if error.is_no_responders() => {
            return Err(AskError::NoResponders {
                topic: topic.to_string(),
            })
        }
        Err(error) if error.is_timeout() => {
            return Err(AskError::Timeout {
                topic: topic.to_string(),
                timeout,
            })
        }
        Err(SdkError::Remote { message, reply, .. }) => {
            return Err(match serde_json::from_slice::<ErrorReply>(&reply.data) {
                Ok(body) => AskError::Remote {
                    code: body.error.code,
                    message: body.error.message,
                },
                Err(_) => AskError::Remote {
                    code: ErrorCode::parse(&message),
                    message: String::from_utf8_lossy(&reply.data).into_owned(),
                },
            })
        }
        Err(error) => return Err(AskError::Bus(error)),
    };
    serde_json::from_slice(&reply.data).map_err(|error| AskError::BadReply {
        topic: topic.to_string(),
        message: error.to_string(),
    })
}

/// [`ask`] for a read, which is safe to send twice: when the bus could not be reached (a
/// transport error, not an answer of the bus), tries once more after a moment. A connection
/// that was down fails its first call while it reconnects, so the first request after the bus
/// comes back would fail without this.
pub async fn ask_read<Q: Serialize, R: DeserializeOwned>(
    client: &Client,
    topic: &str,
    request: &Q,
    conversation: &Conversation,
    timeout: Duration,
) -> Result<R, AskError> {
    match ask(client, topic, request, conversation, timeout).await {
        Err(AskError::Bus(error))
            if error.code() == tonic::Code::Unavailable && error.reason().is_none() =>
        {
            tracing::debug!(topic, %error, "bus unreachable; asking once more");
            tokio::time::sleep(Duration::from_millis(50)).await;
            ask(client, topic, request, conversation, timeout).await
        }
        outcome => outcome,
    }
}

/// A successful reply to a query on `topic`: JSON data, type `<topic>.result`.
pub fn ok<T: Serialize>(topic: &str, value: &T) -> Reply {
    Reply::json(value)
        .expect("payloads serialize")
        .event_type(format!("{topic}.result"))
}

/// An error reply to a query on `topic`: `{"error": {"code", "message"}}` and the `error`
/// attribute set to the code.
pub fn error(topic: &str, code: ErrorCode, message: impl Into<String>) -> Reply {
    let body = ErrorReply {
        error: ErrorDetail {
            code,
            message: message.into(),
        },
    };
    ok(topic, &body).attr(ERROR_ATTRIBUTE, code.as_str())
}

/// The query's JSON data, or the `invalid` error reply to send back.
#[allow(clippy::result_large_err)] // the error is the reply itself, sent at once
pub fn parse<T: DeserializeOwned>(event: &pb::Event) -> Result<T, Reply> {
    serde_json::from_slice(&event.data).map_err(|e| {
        error(
            &event.topic,
            ErrorCode::Invalid,
            format!("bad {} request: {e}", event.topic),
        )
    })
}

/// Answers queries on `topic` in the consumer group `group` with `handler` until `shutdown`,
/// each reply `reply_delay` late (zero but for demos of a slow service). When the bus cannot be reached to subscribe, tries again with backoff; once subscribed, the
/// SDK's subscription resumes by itself after a broken stream.
pub async fn serve_until<H, F>(
    client: Client,
    topic: &'static str,
    group: &str,
    reply_delay: Duration,
    handler: H,
    shutdown: CancellationToken,
) where
    H: Fn(pb::Event) -> F + Send + Sync + 'static,
    F: Future<Output = Reply> + Send + 'static,
{
    let handler = Arc::new(handler);
    let backoff = Backoff::default();
    let mut failures = 0;
    while !shutdown.is_cancelled() {
        let handler = handler.clone();
        let answer = move |event: pb::Event| {
            let reply = handler(event);
            async move {
                let reply = reply.await;
                if !reply_delay.is_zero() {
                    tokio::time::sleep(reply_delay).await;
                }
                match reply.attributes.get(ERROR_ATTRIBUTE) {
                    None => tracing::info!(topic, "answered"),
                    Some(code) => tracing::info!(topic, error = %code, "answered with an error"),
                }
                Ok::<_, Infallible>(reply)
            }
        };
        let stop = shutdown.clone();
        match client
            .serve(topic, group, answer, stop.cancelled_owned())
            .await
        {
            Ok(()) => return,
            Err(error) => {
                let delay = backoff.delay(failures);
                failures = failures.saturating_add(1);
                tracing::warn!(topic, %error, retry_in = ?delay, "cannot serve; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_replies_have_the_protocol_shape() {
        let reply = error("user.query", ErrorCode::NotFound, "unknown user 7");
        assert_eq!(reply.event_type, "user.query.result");
        assert_eq!(reply.attributes[ERROR_ATTRIBUTE], "not_found");
        assert_eq!(reply.data_content_type, "application/json");
        let body: ErrorReply = serde_json::from_slice(&reply.data).unwrap();
        assert_eq!(body.error.code, ErrorCode::NotFound);
    }

    #[test]
    fn malformed_requests_get_invalid() {
        let event = pb::Event {
            topic: "user.query".into(),
            data: "{".into(),
            ..Default::default()
        };
        let reply = parse::<crate::model::ByUser>(&event).unwrap_err();
        assert_eq!(reply.attributes[ERROR_ATTRIBUTE], "invalid");
    }
}
