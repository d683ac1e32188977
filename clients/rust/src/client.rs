//! [`Client`]: the connection to the bus and the calls that need nothing more than one RPC.
//!
//! # Several bus nodes
//! A client may be given several endpoints (the nodes of a clustered bus, see README "Run a
//! cluster"): it uses one at a time, and moves to the next when a call fails the way a node
//! that is gone or going fails (UNAVAILABLE, a broken connection). The SDK's own retry loops
//! (subscriptions resuming, the publisher resending, responders resubscribing) report such
//! failures with [`Client::fail_over`], so they resume on the next node after their backoff.
//!
//! # TLS and tokens
//! An `https://` URL is always TLS ([`ClientBuilder::tls_ca_pem`] and the other `tls_*`
//! options add a CA and a client certificate); the SDK never falls back to plaintext for one,
//! so a bus that does not speak TLS fails the connection. `http://` is plaintext whatever the
//! `tls_*` options say. [`ClientBuilder::token`] sends `authorization: Bearer <token>` with
//! every call, on either.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::error::ERROR_REASON_KEY;
use super::error::{Error, Result};
use super::event::EventBuilder;
use super::publisher::{Publisher, PublisherOptions};
use super::subscription::{SubscribeOptions, Subscription};
use crate::pb;
use crate::pb::admin_service_client::AdminServiceClient;
use crate::pb::event_bus_service_client::EventBusServiceClient;
use tonic::Code;

/// The source name used when none is set.
pub const DEFAULT_SOURCE: &str = "eventbus-sdk";

/// Largest message the SDK accepts from the bus: a full publish batch or a big event must fit
/// (the bus's own event limit is 1 MiB by default, batches hold many).
const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// The generated bus stub as the SDK uses it: on the node in use, with the client's
/// [`Credentials`] on every call.
pub type BusClient = EventBusServiceClient<InterceptedService<Channel, Credentials>>;

/// What the client sends with every call to say who it is: `authorization: Bearer <token>`
/// when a token is set ([`ClientBuilder::token`]), nothing otherwise.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    authorization: Option<MetadataValue<Ascii>>,
}

impl Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A handle to the bus. Cheap to clone (a tonic `Channel` multiplexes every call over one
/// HTTP/2 connection), so clone it into tasks rather than sharing it behind a lock.
#[derive(Debug, Clone)]
pub struct Client {
    nodes: Arc<Nodes>,
    /// The service name: `Event.source` of everything published through this client, and
    /// `SubscribeRequest.subscriber`, so the bus's topology shows who is who.
    source: Arc<str>,
    /// Sent with every call.
    credentials: Credentials,
}

/// The bus nodes a client may use, and the one it uses now.
#[derive(Debug)]
struct Nodes {
    /// One per node, in the order given; empty for a client made from a channel.
    endpoints: Vec<(String, Endpoint)>,
    current: Mutex<Current>,
}

#[derive(Debug, Clone)]
struct Current {
    index: usize,
    channel: Channel,
    since: Instant,
    /// When a move was last logged at WARN, and the moves logged at DEBUG since: see
    /// [`WARN_EVERY`].
    warned: Option<Instant>,
    quiet_moves: u32,
}

impl Current {
    /// Counts a move at `now`: `Some(moves logged quietly since the last warning)` when this
    /// one is to be a WARN, `None` when it is DEBUG ([`WARN_EVERY`]).
    fn count_move(&mut self, now: Instant) -> Option<u32> {
        let loud = self
            .warned
            .is_none_or(|warned| now.duration_since(warned) >= WARN_EVERY);
        if loud {
            self.warned = Some(now);
            Some(std::mem::take(&mut self.quiet_moves))
        } else {
            self.quiet_moves += 1;
            None
        }
    }
}

/// A client moves on at most once per [`MIN_STAY`], so with every node down it would log a
/// move a few times a second. The first move of an outage is a WARN; later ones within this
/// time are DEBUG, and the next WARN says how many there were.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// How long a client stays on a node it just moved to before another failure moves it on:
/// the failures of calls that were in flight on the old node move it once, not once each.
const MIN_STAY: Duration = Duration::from_millis(250);

impl Nodes {
    fn channel(&self) -> Channel {
        lock(&self.current).channel.clone()
    }

    fn fail_over(&self, why: &tonic::Status) {
        // A lost group home is another node's loss: this one is fine, and rejoining through it
        // makes it (or another live node) the group's home.
        if self.endpoints.len() < 2 || !moves_on(why) || is_group_home_lost(why) {
            return;
        }
        let mut current = lock(&self.current);
        if current.since.elapsed() < MIN_STAY {
            return;
        }
        self.move_to_next(&mut current, &super::error::describe_status(why));
    }

    /// Moves to the next node whatever the time since the last move.
    fn skip(&self, why: &str) {
        self.move_to_next(&mut lock(&self.current), why);
    }

    fn move_to_next(&self, current: &mut Current, why: &str) {
        let from = current.index;
        let to = (from + 1) % self.endpoints.len();
        let now = Instant::now();
        let (from_url, to_url) = (&self.endpoints[from].0, &self.endpoints[to].0);
        match current.count_move(now) {
            Some(quiet_moves) => tracing::warn!(
                from = %from_url,
                to = %to_url,
                why,
                moves_since_last_warning = quiet_moves,
                "moving to another bus node"
            ),
            None => {
                tracing::debug!(from = %from_url, to = %to_url, why, "moving to another bus node");
            }
        }
        current.index = to;
        current.channel = self.endpoints[to].1.connect_lazy();
        current.since = now;
    }

    fn current_url(&self) -> Option<String> {
        let index = lock(&self.current).index;
        self.endpoints.get(index).map(|(url, _)| url.clone())
    }
}

fn lock(current: &Mutex<Current>) -> std::sync::MutexGuard<'_, Current> {
    current
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether a failure says the node is gone or going (so another may serve): UNAVAILABLE (a
/// refused or broken connection, `shutting-down`, `store-failed` while a node has lost its
/// log; not `no-responders`, which is the cluster's answer) or a transport error tonic
/// reports as UNKNOWN; CANCELLED made by the client's own transport when the connection closed
/// under a call (hyper's "operation was canceled: connection closed", which carries the
/// transport error as its source; a CANCELLED the server sent has none; among them
/// `group-home-lost`, a consumer group's home node gone); also a consumer group that moved to
/// another node while this member joined (`group-on-another-node`).
pub(crate) fn moves_on(status: &tonic::Status) -> bool {
    let reason = status
        .metadata()
        .get(ERROR_REASON_KEY)
        .and_then(|reason| reason.to_str().ok());
    match status.code() {
        // The whole cluster's answer, not this node's state.
        Code::Unavailable if reason == Some("no-responders") => false,
        Code::Unavailable | Code::Unknown => true,
        Code::Cancelled => std::error::Error::source(status).is_some(),
        Code::FailedPrecondition => is_group_elsewhere(status),
        _ => false,
    }
}

/// UNAVAILABLE `group-home-lost`: the consumer group's home, another node than the one in use,
/// went away. Worth rejoining, through the same node.
pub(crate) fn is_group_home_lost(status: &tonic::Status) -> bool {
    status.code() == Code::Unavailable
        && status
            .metadata()
            .get(ERROR_REASON_KEY)
            .and_then(|reason| reason.to_str().ok())
            == Some("group-home-lost")
}

/// FAILED_PRECONDITION `group-on-another-node`: the group moved to another node of a cluster
/// while this member joined it; worth retrying.
pub(crate) fn is_group_elsewhere(status: &tonic::Status) -> bool {
    status.code() == Code::FailedPrecondition
        && status
            .metadata()
            .get(ERROR_REASON_KEY)
            .and_then(|reason| reason.to_str().ok())
            == Some("group-on-another-node")
}

/// The endpoints a client is given: one URL, a comma-separated list in one string
/// (`EVENTBUS_URL=http://a:50051,http://b:50051`), or a list.
pub trait IntoUrls {
    /// The URLs, each trimmed; empty entries dropped.
    fn into_urls(self) -> Vec<String>;
}

fn split_urls(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(str::to_owned)
        .collect()
}

impl IntoUrls for &str {
    fn into_urls(self) -> Vec<String> {
        split_urls(self)
    }
}

impl IntoUrls for String {
    fn into_urls(self) -> Vec<String> {
        split_urls(&self)
    }
}

impl IntoUrls for &String {
    fn into_urls(self) -> Vec<String> {
        split_urls(self)
    }
}

impl<S: AsRef<str>, const N: usize> IntoUrls for [S; N] {
    fn into_urls(self) -> Vec<String> {
        self.iter()
            .flat_map(|url| split_urls(url.as_ref()))
            .collect()
    }
}

impl<S: AsRef<str>> IntoUrls for Vec<S> {
    fn into_urls(self) -> Vec<String> {
        self.iter()
            .flat_map(|url| split_urls(url.as_ref()))
            .collect()
    }
}

impl<S: AsRef<str>> IntoUrls for &[S] {
    fn into_urls(self) -> Vec<String> {
        self.iter()
            .flat_map(|url| split_urls(url.as_ref()))
            .collect()
    }
}

/// PEM text, given as bytes or as a file read when the client connects.
#[derive(Debug, Clone)]
enum Pem {
    Bytes(Vec<u8>),
    File(PathBuf),
}

impl Pem {
    fn read(&self, url: &str) -> Result<Vec<u8>> {
        match self {
            Pem::Bytes(pem) => Ok(pem.clone()),
            Pem::File(path) => std::fs::read(path).map_err(|error| Error::Tls {
                url: url.to_owned(),
                why: format!("cannot read {}: {error}", path.display()),
            }),
        }
    }
}

/// Connection settings for a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    urls: Vec<String>,
    source: String,
    connect_timeout: Duration,
    keepalive: Duration,
    /// A CA trusted for `https://` URLs besides the system's and webpki's roots.
    tls_ca: Option<Pem>,
    /// A client certificate (chain) and its key, for mutual TLS.
    tls_identity: Option<(Pem, Pem)>,
    /// The bearer token, if any.
    token: Option<String>,
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

    /// Trusts the CA certificates in `pem` (PEM text) for `https://` URLs, besides the system's
    /// and webpki's roots.
    pub fn tls_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls_ca = Some(Pem::Bytes(pem.into()));
        self
    }

    /// As [`ClientBuilder::tls_ca_pem`], from a PEM file read when the client connects (an
    /// unreadable file fails the connect with [`Error::Tls`]).
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.tls_ca = Some(Pem::File(path.into()));
        self
    }

    /// Presents the client certificate `cert` (PEM, leaf first) with its private key `key`
    /// (PEM) on `https://` URLs, for a bus with mutual TLS.
    pub fn tls_client_cert_pem(
        mut self,
        cert: impl Into<Vec<u8>>,
        key: impl Into<Vec<u8>>,
    ) -> Self {
        self.tls_identity = Some((Pem::Bytes(cert.into()), Pem::Bytes(key.into())));
        self
    }

    /// As [`ClientBuilder::tls_client_cert_pem`], from PEM files read when the client connects.
    pub fn tls_client_cert_files(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.tls_identity = Some((Pem::File(cert.into()), Pem::File(key.into())));
        self
    }

    /// Sends `authorization: Bearer <token>` with every call (the bus's principals, see
    /// README "TLS"). A token that is not a valid header value (control characters) fails the
    /// connect with [`Error::InvalidToken`].
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    fn credentials(&self) -> Result<Credentials> {
        let authorization = match &self.token {
            None => None,
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse()
                    .map_err(|_| Error::InvalidToken)?,
            ),
        };
        Ok(Credentials { authorization })
    }

    /// The TLS settings for an `https://` URL: the enabled roots, the CA and the identity.
    fn tls_config(&self, url: &str) -> Result<ClientTlsConfig> {
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = &self.tls_ca {
            tls = tls.ca_certificate(Certificate::from_pem(ca.read(url)?));
        }
        if let Some((cert, key)) = &self.tls_identity {
            tls = tls.identity(Identity::from_pem(cert.read(url)?, key.read(url)?));
        }
        Ok(tls)
    }

    fn endpoints(&self) -> Result<Vec<(String, Endpoint)>> {
        if self.urls.is_empty() {
            return Err(Error::Protocol("no bus URL given".into()));
        }
        self.urls
            .iter()
            .map(|url| {
                let mut endpoint =
                    Endpoint::from_shared(url.clone()).map_err(|source| Error::InvalidUrl {
                        url: url.clone(),
                        source,
                    })?;
                if endpoint.uri().scheme_str() == Some("https") {
                    endpoint = endpoint
                        .tls_config(self.tls_config(url)?)
                        .map_err(|error| Error::Tls {
                            url: url.clone(),
                            why: error.to_string(),
                        })?;
                }
                Ok((
                    url.clone(),
                    endpoint
                        .connect_timeout(self.connect_timeout)
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(self.keepalive)
                        .keep_alive_while_idle(true),
                ))
            })
            .collect()
    }

    /// Connects now, to the first of the URLs that answers (in the order given), so a wrong
    /// address fails here rather than at the first call.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] for a URL that does not parse; [`Error::Tls`] for TLS files that
    /// cannot be read; [`Error::Connect`] naming the last URL tried when none answers (an
    /// `https://` URL of a bus without TLS, or whose certificate does not verify, is one).
    pub async fn connect(self) -> Result<Client> {
        let endpoints = self.endpoints()?;
        let credentials = self.credentials()?;
        let mut last_error = None;
        for (index, (url, endpoint)) in endpoints.iter().enumerate() {
            match endpoint.connect().await {
                Ok(channel) => {
                    return Ok(Client::on_nodes(endpoints, index, channel, self.source)
                        .with_credentials(credentials))
                }
                Err(source) => {
                    tracing::debug!(%url, error = %source, "bus node does not answer");
                    last_error = Some(Error::Connect {
                        url: url.clone(),
                        source,
                    });
                }
            }
        }
        Err(last_error.expect("at least one URL"))
    }

    /// Connects on first use (and reconnects after failures by itself, moving to the next URL
    /// when a node is gone); calls fail with UNAVAILABLE while the bus cannot be reached.
    ///
    /// # Errors
    /// As [`ClientBuilder::connect`], but for the connection itself.
    pub fn connect_lazy(self) -> Result<Client> {
        let endpoints = self.endpoints()?;
        let credentials = self.credentials()?;
        let channel = endpoints[0].1.connect_lazy();
        Ok(Client::on_nodes(endpoints, 0, channel, self.source).with_credentials(credentials))
    }
}

impl Client {
    /// Connects to the bus at `urls`, as [`DEFAULT_SOURCE`]: one URL such as
    /// `http://127.0.0.1:50051` (or `127.0.0.1:50051`: a URL without a scheme is taken as
    /// `http://`, as the Python and TypeScript clients do), or several nodes of a clustered bus
    /// (`["http://a:50051", "http://b:50051"]`, or one string with commas), of which it uses
    /// one at a time and moves to the next when one is gone (see the module docs).
    pub async fn connect(urls: impl IntoUrls) -> Result<Client> {
        Client::builder(urls).connect().await
    }

    /// Connection settings, for a source name or timeouts.
    pub fn builder(urls: impl IntoUrls) -> ClientBuilder {
        let urls = urls
            .into_urls()
            .into_iter()
            .map(|url| {
                if url.contains("://") {
                    url
                } else {
                    format!("http://{url}")
                }
            })
            .collect();
        ClientBuilder {
            urls,
            source: DEFAULT_SOURCE.to_string(),
            connect_timeout: Duration::from_secs(5),
            keepalive: Duration::from_secs(20),
            tls_ca: None,
            tls_identity: None,
            token: None,
        }
    }

    /// Wraps an existing channel (e.g. with TLS or interceptors set up by the caller); such a
    /// client has one node and never moves.
    pub fn from_channel(channel: Channel, source: impl Into<String>) -> Client {
        Client::on_nodes(Vec::new(), 0, channel, source.into())
    }

    fn on_nodes(
        endpoints: Vec<(String, Endpoint)>,
        index: usize,
        channel: Channel,
        source: String,
    ) -> Client {
        Client {
            nodes: Arc::new(Nodes {
                endpoints,
                current: Mutex::new(Current {
                    index,
                    channel,
                    since: Instant::now(),
                    warned: None,
                    quiet_moves: 0,
                }),
            }),
            source: source.into(),
            credentials: Credentials::default(),
        }
    }

    fn with_credentials(mut self, credentials: Credentials) -> Client {
        self.credentials = credentials;
        self
    }

    /// Reports a failed call: when it says the node is gone or going (UNAVAILABLE, or a call
    /// cut by a closed connection) and the client has other nodes, it moves to the next (at most once per 250 ms, so the failures
    /// of every call in flight move it once). The SDK's retry loops call it; so may callers
    /// that retry their own calls.
    pub fn fail_over(&self, why: &tonic::Status) {
        self.nodes.fail_over(why);
    }

    /// Before a retry: asks the node in use for its gRPC health and moves past nodes that
    /// answer NOT_SERVING (a node that lost its log), once round the list at most, so a retry
    /// goes to a serving node if one answers. A node that does not answer is left to the
    /// retry itself to find out. Each check waits up to 1 s.
    pub async fn prefer_serving(&self) {
        use tonic_health::pb::health_check_response::ServingStatus;
        let nodes = &self.nodes;
        if nodes.endpoints.len() < 2 {
            return;
        }
        for _ in 0..nodes.endpoints.len() {
            let mut health = tonic_health::pb::health_client::HealthClient::with_interceptor(
                nodes.channel(),
                self.credentials.clone(),
            );
            let check = health.check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            });
            match tokio::time::timeout(Duration::from_secs(1), check).await {
                Ok(Ok(answer)) if answer.get_ref().status == ServingStatus::NotServing as i32 => {
                    nodes.skip("the node answers health NOT_SERVING");
                }
                _ => return,
            }
        }
    }

    /// The URL of the node this client uses now (`None` for a client made from a channel).
    pub fn current_url(&self) -> Option<String> {
        self.nodes.current_url()
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

    /// The generated gRPC stub, for anything the SDK does not wrap, on the node in use now.
    pub fn bus(&self) -> BusClient {
        EventBusServiceClient::with_interceptor(self.nodes.channel(), self.credentials.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
    }

    fn admin(&self) -> AdminServiceClient<InterceptedService<Channel, Credentials>> {
        AdminServiceClient::with_interceptor(self.nodes.channel(), self.credentials.clone())
            .max_decoding_message_size(MAX_MESSAGE_SIZE)
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
        let response = match self.bus().publish(pb::PublishRequest { events }).await {
            Ok(response) => response.into_inner(),
            Err(status) => {
                self.fail_over(&status);
                return Err(status.into());
            }
        };
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
        Ok(self.admin().list_topics(request).await?.into_inner())
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
            .admin()
            .get_topology(pb::GetTopologyRequest { max_edges })
            .await?
            .into_inner())
    }

    /// The consumer groups the bus process knows now (all when `group` is `None`), with the
    /// cursor and counts of MANUAL-ack groups.
    pub async fn list_groups(&self, group: Option<&str>) -> Result<Vec<pb::GroupInfo>> {
        let request = pb::ListGroupsRequest {
            group: group.unwrap_or_default().to_owned(),
        };
        Ok(self.admin().list_groups(request).await?.into_inner().groups)
    }

    /// What the bus process is: version, uptime, storage, log bounds, limits, load, auth.
    pub async fn server_info(&self) -> Result<pb::GetServerInfoResponse> {
        Ok(self
            .admin()
            .get_server_info(pb::GetServerInfoRequest {})
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
            Client::builder("127.0.0.1:50051").urls,
            ["http://127.0.0.1:50051"]
        );
        assert_eq!(Client::builder("http://h:1").urls, ["http://h:1"]);
        assert_eq!(Client::builder("https://h:1").urls, ["https://h:1"]);
        assert!(Client::builder("localhost:50051").endpoints().is_ok());
    }

    #[test]
    fn several_nodes_come_as_a_list_or_one_string_with_commas() {
        let expected = ["http://a:1", "http://b:2"];
        assert_eq!(Client::builder(["http://a:1", "b:2"]).urls, expected);
        assert_eq!(Client::builder("http://a:1, b:2,").urls, expected);
        assert_eq!(
            Client::builder(vec!["a:1".to_owned(), "b:2".to_owned()]).urls,
            expected
        );
        assert!(Client::builder("").endpoints().is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_goes_with_every_call_as_a_bearer_header() {
        let builder = Client::builder("http://127.0.0.1:1").token("s3cret");
        let mut credentials = builder.credentials().unwrap();
        let request = credentials.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            request.metadata().get("authorization").unwrap(),
            "Bearer s3cret"
        );
        let mut none = Client::builder("http://127.0.0.1:1").credentials().unwrap();
        let request = none.call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
        let bad = Client::builder("http://127.0.0.1:1").token("line\nbreak");
        assert!(matches!(bad.credentials(), Err(Error::InvalidToken)));
    }

    #[tokio::test]
    async fn a_lost_group_home_is_rejoined_through_the_same_node() {
        let client = Client::builder(["http://127.0.0.1:1", "http://127.0.0.1:2"])
            .connect_lazy()
            .unwrap();
        let mut lost = tonic::Status::unavailable("lost group \"g\"'s home node");
        lost.metadata_mut()
            .insert(ERROR_REASON_KEY, "group-home-lost".parse().unwrap());
        assert!(Error::Status(lost.clone()).is_retryable());
        // Past the stay that keeps a client on a node it just moved to.
        lock(&client.nodes.current).since = Instant::now() - MIN_STAY * 2;
        client.fail_over(&lost);
        assert_eq!(client.current_url().as_deref(), Some("http://127.0.0.1:1"));
        let gone = tonic::Status::unavailable("connection refused");
        client.fail_over(&gone);
        assert_eq!(client.current_url().as_deref(), Some("http://127.0.0.1:2"));
    }

    #[test]
    fn a_call_cut_by_a_closed_connection_moves_on_but_a_sent_cancel_does_not() {
        // What tonic makes of hyper's `Canceled` error when a node dies under a call.
        let mut cut = tonic::Status::cancelled("operation was canceled");
        cut.set_source(std::sync::Arc::new(std::io::Error::other(
            "connection closed",
        )));
        assert!(moves_on(&cut));
        assert!(Error::Status(cut).is_retryable());
        let sent = tonic::Status::cancelled("the server gave up");
        assert!(!moves_on(&sent));
        assert!(!Error::Status(sent).is_retryable());
    }

    #[tokio::test]
    async fn moves_in_an_outage_warn_once_then_quietly_until_warn_every_passed() {
        let mut current = Current {
            index: 0,
            channel: Endpoint::from_static("http://127.0.0.1:1").connect_lazy(),
            since: Instant::now(),
            warned: None,
            quiet_moves: 0,
        };
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        // Every node down: a move each MIN_STAY.
        let moves: Vec<Option<u32>> = (0..20)
            .map(|i| current.count_move(at(i * MIN_STAY.as_millis() as u64)))
            .collect();
        assert_eq!(moves[0], Some(0));
        assert!(moves[1..].iter().all(Option::is_none), "{moves:?}");
        // Past the period, the next move warns and says how many went unwarned.
        let later = at(WARN_EVERY.as_millis() as u64);
        assert_eq!(current.count_move(later), Some(19));
        assert_eq!(current.count_move(later + MIN_STAY), None);
    }

    #[test]
    fn an_unreadable_ca_file_is_named() {
        let builder = Client::builder("https://127.0.0.1:1").tls_ca_file("/nonexistent/ca.pem");
        let error = builder.connect_lazy().unwrap_err().to_string();
        assert!(error.contains("/nonexistent/ca.pem"), "{error}");
    }
}
