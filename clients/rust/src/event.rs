//! [`EventBuilder`]: every field of an event, set by name, then published or asked as a query.

use std::time::Duration;

use bytes::Bytes;

use super::client::Client;
use super::error::Result;
use crate::pb;

/// The content type set by [`EventBuilder::json`].
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// A full event under construction; made by [`Client::event`]. Fields the bus fills (id, time,
/// sequence, publish time) may be left unset.
#[derive(Debug, Clone)]
#[must_use = "an event builder does nothing until published"]
pub struct EventBuilder {
    client: Client,
    event: pb::Event,
}

impl EventBuilder {
    pub(crate) fn new(client: Client, topic: String) -> Self {
        let event = pb::Event {
            topic,
            source: client.source().to_string(),
            ..Default::default()
        };
        EventBuilder { client, event }
    }

    /// The payload.
    pub fn data(mut self, data: impl Into<Bytes>) -> Self {
        self.event.data = data.into();
        self
    }

    /// The payload as JSON, with `data_content_type` `application/json`.
    pub fn json<T: serde::Serialize + ?Sized>(mut self, value: &T) -> Result<Self> {
        self.event.data = serde_json::to_vec(value)?.into();
        self.event.data_content_type = JSON_CONTENT_TYPE.to_string();
        Ok(self)
    }

    /// The media type of the payload, e.g. `text/plain`.
    pub fn content_type(mut self, content_type: impl Into<String>) -> Self {
        self.event.data_content_type = content_type.into();
        self
    }

    /// The kind of event (CloudEvents `type`); the bus uses the topic when unset.
    pub fn event_type(mut self, event_type: impl Into<String>) -> Self {
        self.event.r#type = event_type.into();
        self
    }

    /// An extension attribute or header, e.g. `traceparent`.
    pub fn attr(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.event.attributes.insert(key.into(), value.into());
        self
    }

    /// Ties this event to a request.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.event.correlation_id = id.into();
        self
    }

    /// The id of the event that caused this one.
    pub fn causation_id(mut self, id: impl Into<String>) -> Self {
        self.event.causation_id = id.into();
        self
    }

    /// Where a reply is expected.
    pub fn reply_to(mut self, topic: impl Into<String>) -> Self {
        self.event.reply_to = topic.into();
        self
    }

    /// The event id; the bus assigns a UUIDv7 when unset.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.event.id = id.into();
        self
    }

    /// Overrides the client's source name for this event.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.event.source = source.into();
        self
    }

    /// The producer time; the bus sets the publish time when unset.
    pub fn time(mut self, time: std::time::SystemTime) -> Self {
        self.event.time = Some(time.into());
        self
    }

    /// Sets the W3C trace context (`traceparent`, and `tracestate` if given) as attributes, so
    /// the bus carries it to every subscriber and a query's responder carries it into the reply.
    pub fn trace_context(
        mut self,
        traceparent: impl Into<String>,
        tracestate: Option<String>,
    ) -> Self {
        let attributes = &mut self.event.attributes;
        attributes.insert(
            crate::tracecontext::TRACEPARENT.to_owned(),
            traceparent.into(),
        );
        match tracestate {
            Some(state) => {
                attributes.insert(crate::tracecontext::TRACESTATE.to_owned(), state);
            }
            None => {
                attributes.remove(crate::tracecontext::TRACESTATE);
            }
        }
        self
    }

    /// The event as built, e.g. for [`Client::publish_batch`] or a [`super::Publisher`].
    pub fn build(self) -> pb::Event {
        self.event
    }

    /// Publishes the event with one unary call and returns its sequence.
    pub async fn publish(self) -> Result<u64> {
        let sequences = self.client.publish_batch(vec![self.event]).await?;
        Ok(sequences[0])
    }

    /// Asks the event as a query and returns the reply (see [`Client::query_event`]).
    pub async fn query(self, timeout: Duration) -> Result<pb::Event> {
        self.client.query_event(self.event, timeout).await
    }

    /// As [`EventBuilder::query`], and asks again, on the next node of a cluster, when the
    /// node asked goes away mid-query ([`crate::Error::is_retryable`]), until `timeout`
    /// (for all attempts together) passes. A query has no effect but its question, so asking
    /// again is safe; each attempt gets a new id from the bus unless the event names one (then
    /// a second attempt the bus saw is refused as a duplicate, which ends the retries). The
    /// Python and TypeScript clients' `retry` option.
    pub async fn query_retrying(self, timeout: Duration) -> Result<pb::Event> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.client.query_event(self.event.clone(), left).await {
                Err(error) if error.is_retryable() && !left.is_zero() => {
                    tracing::info!(%error, "the query's node went away; asking again");
                    tokio::time::sleep(pause.min(left)).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                answer => return answer,
            }
        }
    }
}

/// The W3C `traceparent` a received event carries (set by its producer, or by the bus from
/// the producer's request metadata), if any.
pub fn traceparent(event: &pb::Event) -> Option<&str> {
    event
        .attributes
        .get(crate::tracecontext::TRACEPARENT)
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn builder_sets_every_field() {
        let client = Client::builder("http://127.0.0.1:1")
            .source("svc")
            .connect_lazy()
            .unwrap();
        let event = client
            .event("user.query")
            .json(&serde_json::json!({"id": 7}))
            .unwrap()
            .event_type("user.lookup")
            .attr("traceparent", "00-abc")
            .correlation_id("c1")
            .causation_id("e0")
            .reply_to("_bus.inbox.x")
            .id("e1")
            .build();
        assert_eq!(event.topic, "user.query");
        assert_eq!(event.source, "svc");
        assert_eq!(event.data.as_ref(), br#"{"id":7}"#);
        assert_eq!(event.data_content_type, JSON_CONTENT_TYPE);
        assert_eq!(event.r#type, "user.lookup");
        assert_eq!(event.attributes["traceparent"], "00-abc");
        assert_eq!(event.correlation_id, "c1");
        assert_eq!(event.causation_id, "e0");
        assert_eq!(event.reply_to, "_bus.inbox.x");
        assert_eq!(event.id, "e1");
    }
}
