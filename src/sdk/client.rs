//! [`Client`]: the connection to the bus and the calls that need nothing more than one RPC.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tonic::transport::{Channel, Endpoint};

use super::error::{Error, Result};
use super::event::EventBuilder;
use super::publisher::{Publisher, PublisherOptions};
use super::subscription::{SubscribeOptions, Subscription};
use crate::pb;
use crate::pb::admin_service_client::AdminServiceClient;
use crate::pb::event_bus_service_client::EventBusServiceClient;

/// The source name used when none is set.
pub const DEFAULT_SOURCE: &str = "eventbus-sdk";

/// Largest message the SDK accepts from the bus: a full publish batch or a big event must fit
/// (the bus's own event limit is 1 MiB by default, batches hold many).
const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// A handle to the bus. Cheap to clone (a tonic `Channel` multiplexes every call over one
/// HTTP/2 connection), so clone it into tasks rather than sharing it behind a lock.
#[derive(Debug, Clone)]
pub struct Client {
    bus: EventBusServiceClient<Channel>,
    admin: AdminServiceClient<Channel>,
    /// The service name: `Event.source` of everything published through this client, and
    /// `SubscribeRequest.subscriber`, so the bus's topology shows who is who.
    source: Arc<str>,
}

/// Connection settings for a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    url: String,
    source: String,
    connect_timeout: Duration,
    keepalive: Duration,
}

impl ClientBuilder {
    /// The service name this client publishes and subscribes as (default `eventbus-sdk`).
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// How long to wait for the TCP and HTTP/2 handshake (default 5 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// HTTP/2 keepalive ping interval, so a dead bus is noticed on idle subscriptions (default
    /// 20 s).
    pub fn keepalive(mut self, interval: Duration) -> Self {
        self.keepalive = interval;
        self
    }

    fn endpoint(&self) -> Result<Endpoint> {
        let endpoint =
            Endpoint::from_shared(self.url.clone()).map_err(|source| Error::InvalidUrl {
                url: self.url.clone(),
                source,
            })?;
        Ok(endpoint
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.keepalive)
            .keep_alive_while_idle(true))
    }

    /// Connects now, so a wrong address fails here rather than at the first call.
    pub async fn connect(self) -> Result<Client> {
        let channel = self
            .endpoint()?
            .connect()
            .await
            .map_err(|source| Error::Connect {
                url: self.url.clone(),
                source,
            })?;
        Ok(Client::from_channel(channel, self.source))
    }

    /// Connects on first use (and reconnects after failures by itself); calls fail with
    /// UNAVAILABLE while the bus cannot be reached.
    pub fn connect_lazy(self) -> Result<Client> {
        let channel = self.endpoint()?.connect_lazy();
        Ok(Client::from_channel(channel, self.source))
    }
}

impl Client {
    /// Connects to the bus at `url`, e.g. `http://127.0.0.1:50051` (or `127.0.0.1:50051`: a URL
    /// without a scheme is taken as `http://`, as the Python and TypeScript clients do), as
    /// [`DEFAULT_SOURCE`].
    pub async fn connect(url: impl Into<String>) -> Result<Client> {
        Client::builder(url).connect().await
    }

    /// Connection settings, for a source name or timeouts.
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        let url: String = url.into();
        ClientBuilder {
            url: if url.contains("://") {
                url
            } else {
                format!("http://{url}")
            },
            source: DEFAULT_SOURCE.to_string(),
            connect_timeout: Duration::from_secs(5),
            keepalive: Duration::from_secs(20),
        }
    }

    /// Wraps an existing channel (e.g. with TLS or interceptors set up by the caller).
    pub fn from_channel(channel: Channel, source: impl Into<String>) -> Client {
        let source: String = source.into();
        Client {
            bus: EventBusServiceClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE_SIZE),
            admin: AdminServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_SIZE),
            source: source.into(),
        }
    }

    /// The same connection under another service name.
    pub fn with_source(mut self, source: impl Into<String>) -> Client {
        self.source = source.into().into();
        self
    }

    /// The service name this client publishes and subscribes as.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The generated gRPC stub, for anything the SDK does not wrap.
    pub fn bus(&self) -> EventBusServiceClient<Channel> {
        self.bus.clone()
    }

    /// Publishes `data` to `topic` and returns its sequence. See [`Client::event`] for the
    /// other fields.
    pub async fn publish(&self, topic: impl Into<String>, data: impl Into<Bytes>) -> Result<u64> {
        self.event(topic).data(data).publish().await
    }

    /// Starts a full event for `topic`, to publish or to ask as a query.
    pub fn event(&self, topic: impl Into<String>) -> EventBuilder {
        EventBuilder::new(self.clone(), topic.into())
    }

    /// Publishes a batch in one call, all or nothing: the bus validates every event first and
    /// the error names the index of a bad one. Events without a source get this client's.
    pub async fn publish_batch(&self, mut events: Vec<pb::Event>) -> Result<Vec<u64>> {
        for event in &mut events {
            self.fill_source(event);
        }
        let count = events.len();
        let response = self
            .bus
            .clone()
            .publish(pb::PublishRequest { events })
            .await?
            .into_inner();
        if response.sequences.len() != count {
            return Err(Error::Protocol(format!(
                "{} sequences for {count} events",
                response.sequences.len()
            )));
        }
        Ok(response.sequences)
    }

    /// A batching publisher over one `PublishStream`, with default options.
    pub fn publisher(&self) -> Publisher {
        Publisher::new(self.clone(), PublisherOptions::default())
    }

    /// A batching publisher over one `PublishStream`.
    pub fn publisher_with(&self, options: PublisherOptions) -> Publisher {
        Publisher::new(self.clone(), options)
    }

    /// Subscribes to `pattern` from the latest event, resuming by itself after a broken
    /// stream. Returns once the bus has confirmed the subscription: every matching event
    /// published after that is delivered.
    pub async fn subscribe(&self, pattern: impl Into<String>) -> Result<Subscription> {
        self.subscribe_with(pattern, SubscribeOptions::default())
            .await
    }

    /// Subscribes with a group, a start position or other [`SubscribeOptions`].
    pub async fn subscribe_with(
        &self,
        pattern: impl Into<String>,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
        Subscription::open(self.clone(), pattern.into(), options).await
    }

    /// Lists the topics the bus has seen, optionally only those matching `pattern`.
    /// Acknowledges events of the MANUAL-ack group `group`; returns how many were waiting for
    /// it and the group's cursor.
    pub async fn ack(&self, group: &str, sequences: &[u64]) -> Result<pb::AckResponse> {
        let response = self
            .bus()
            .ack(pb::AckRequest {
                group: group.to_owned(),
                sequences: sequences.to_vec(),
            })
            .await?;
        Ok(response.into_inner())
    }

    /// Hands events of the MANUAL-ack group `group` back for another delivery after
    /// `redeliver_after`; returns how many were handed back.
    pub async fn nack(
        &self,
        group: &str,
        sequences: &[u64],
        redeliver_after: Duration,
    ) -> Result<u32> {
        let response = self
            .bus()
            .nack(pb::NackRequest {
                group: group.to_owned(),
                sequences: sequences.to_vec(),
                redeliver_after: prost_types::Duration::try_from(redeliver_after).ok(),
            })
            .await?;
        Ok(response.into_inner().requeued)
    }

    /// Every topic matching `pattern` (all when `None`), sorted by name: follows the pages of
    /// ListTopics to the last.
    pub async fn list_topics(&self, pattern: Option<&str>) -> Result<Vec<pb::TopicInfo>> {
        let mut topics = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self.list_topics_page(pattern, 0, &page_token).await?;
            topics.extend(page.topics);
            if page.next_page_token.is_empty() {
                return Ok(topics);
            }
            page_token = page.next_page_token;
        }
    }

    /// One page of ListTopics: `page_size` topics at most (0: the server's default), after the
    /// page whose `next_page_token` is `page_token` (empty for the first).
    pub async fn list_topics_page(
        &self,
        pattern: Option<&str>,
        page_size: u32,
        page_token: &str,
    ) -> Result<pb::ListTopicsResponse> {
        let request = pb::ListTopicsRequest {
            pattern: pattern.unwrap_or_default().to_string(),
            page_size,
            page_token: page_token.to_owned(),
        };
        Ok(self.admin.clone().list_topics(request).await?.into_inner())
    }

    /// Who publishes to and who subscribes to which topic, as the bus has seen it, within the
    /// server's default bound (see [`Client::topology_bounded`]).
    pub async fn topology(&self) -> Result<pb::GetTopologyResponse> {
        self.topology_bounded(0).await
    }

    /// The topology with at most `max_edges` edges (0: the server's default); `truncated` in
    /// the answer tells whether edges were left out.
    pub async fn topology_bounded(&self, max_edges: u32) -> Result<pb::GetTopologyResponse> {
        Ok(self
            .admin
            .clone()
            .get_topology(pb::GetTopologyRequest { max_edges })
            .await?
            .into_inner())
    }

    pub(crate) fn fill_source(&self, event: &mut pb::Event) {
        if event.source.is_empty() {
            event.source = self.source.to_string();
        }
    }
}

#[cfg(test)]
mod url_tests {
    use super::*;

    #[test]
    fn an_address_without_a_scheme_is_taken_as_http() {
        assert_eq!(
            Client::builder("127.0.0.1:50051").url,
            "http://127.0.0.1:50051"
        );
        assert_eq!(Client::builder("http://h:1").url, "http://h:1");
        assert_eq!(Client::builder("https://h:1").url, "https://h:1");
        assert!(Client::builder("localhost:50051").endpoint().is_ok());
    }
}
