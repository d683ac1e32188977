//! The gRPC adapter: implements `eventbus.v1`'s services on top of the [`Broker`]. It converts
//! wire types at one boundary ([`convert`]), calls the broker, and maps errors in one place
//! ([`status`]). It holds no state of its own beyond the resolved settings it reports.

pub mod convert;
pub mod status;
pub mod subscribe;

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::{self, BoxStream, FuturesOrdered, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, debug_span, info_span, Instrument};

use crate::auth::{self, Auth, Caller};
use crate::broker::{Broker, Delivery, GroupPlace, Published};
use crate::error::BusError;
use crate::pb;
use crate::telemetry::PublishSpans;
use crate::tracecontext::TraceContext;
use pb::admin_service_server::AdminService;
use pb::event_bus_service_server::EventBusService;
use subscribe::SubscribeFrame;

/// `eventbus.v1.EventBusService`.
#[derive(Clone)]
pub struct EventBusApi {
    broker: Broker,
    auth: Auth,
}

impl EventBusApi {
    /// The service of an open bus (no principals).
    pub fn new(broker: Broker) -> EventBusApi {
        let auth = Auth::open(broker.metrics().clone());
        EventBusApi::with_auth(broker, auth)
    }

    /// The service, checking calls against `auth` (whose [`auth::AuthLayer`] must wrap it).
    pub fn with_auth(broker: Broker, auth: Auth) -> EventBusApi {
        EventBusApi { broker, auth }
    }
}

/// `eventbus.v1.AdminService`.
#[derive(Clone)]
pub struct AdminApi {
    broker: Broker,
    auth: Auth,
    /// Where each setting came from, for GetServerInfo ([`crate::config::SettingSource`]).
    settings: Arc<[crate::config::SettingSource]>,
}

impl AdminApi {
    /// The service of an open bus (no principals).
    pub fn new(broker: Broker) -> AdminApi {
        let auth = Auth::open(broker.metrics().clone());
        AdminApi::with_auth(broker, auth)
    }

    /// The service, checking calls against `auth` (whose [`auth::AuthLayer`] must wrap it).
    pub fn with_auth(broker: Broker, auth: Auth) -> AdminApi {
        AdminApi {
            broker,
            auth,
            settings: Arc::from([]),
        }
    }

    /// Reports `settings` (the resolved configuration and where each value came from) in
    /// GetServerInfo.
    pub fn with_settings(mut self, settings: &[crate::config::SettingSource]) -> AdminApi {
        self.settings = Arc::from(settings);
        self
    }

    /// Refuses callers without the admin right.
    fn admit<T>(&self, request: &Request<T>, method: &str) -> Result<(), Status> {
        let caller = auth::caller_of(&self.auth, request)?;
        Ok(self.auth.authorize_admin(&caller, method)?)
    }
}

impl EventBusApi {
    /// Checks a batch before anything of it is stored: sources filled and allowed, topics
    /// allowed (a reply only into an inbox a query waits on, here or on another node), then
    /// the publish rates; converts it.
    ///
    /// A long-lived stream's caller is first brought up to the policy in force
    /// ([`Auth::recheck`]): a reload that removed its principal or rotated its token refuses
    /// its next batch.
    async fn admit_batch(
        &self,
        caller: &mut Caller,
        mut events: Vec<pb::Event>,
    ) -> Result<Vec<crate::event::Event>, BusError> {
        use prost::Message as _;
        self.auth.recheck(caller)?;
        let caller = &*caller;
        for event in &mut events {
            self.auth.fill_source(caller, &mut event.source);
        }
        let bytes = events.iter().map(|event| event.encoded_len()).sum();
        let count = events.len();
        let events = convert::events_from_pb(events, self.broker.config().max_message_bytes)?;
        let waiting = self.waiting_queries(caller, &events).await;
        self.auth.authorize_publish(caller, &events, |inbox| {
            waiting.get(inbox).cloned().flatten()
        })?;
        self.auth.admit_publish(caller, count, bytes)?;
        Ok(events)
    }

    /// For an authenticated caller, the query waiting on each reply inbox `events` go to.
    async fn waiting_queries(
        &self,
        caller: &Caller,
        events: &[crate::event::Event],
    ) -> std::collections::HashMap<crate::topic::Topic, Option<crate::topic::Topic>> {
        let mut waiting = std::collections::HashMap::new();
        if caller.principal().is_none() {
            return waiting;
        }
        for event in events.iter().filter(|event| event.topic.is_inbox()) {
            if !waiting.contains_key(&event.topic) {
                let query = self.broker.waiting_query_anywhere(&event.topic).await;
                waiting.insert(event.topic.clone(), query);
            }
        }
        waiting
    }
}

fn subscribe_message(message: pb::subscribe_response::Message) -> pb::SubscribeResponse {
    pb::SubscribeResponse {
        message: Some(message),
        delivery_attempt: 0,
    }
}

#[tonic::async_trait]
impl EventBusService for EventBusApi {
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let mut caller = auth::caller_of(&self.auth, &request)?;
        let trace = TraceContext::from_metadata(request.metadata());
        let events = request.into_inner().events;
        let span = info_span!(
            "publish",
            events = events.len(),
            topic = events.first().map(|e| e.topic.as_str()).unwrap_or(""),
            first_sequence = tracing::field::Empty,
        );
        let mut events = self.admit_batch(&mut caller, events).await?;
        if let Some(trace) = &trace {
            events.iter_mut().for_each(|event| trace.apply(event));
        }
        let spans = PublishSpans::open(&mut events);
        let published = self.broker.publish(events).instrument(span.clone()).await;
        spans.record(published.as_ref().map(|p| &p.sequences[..]));
        let published = published?;
        span.record(
            "first_sequence",
            published.sequences.first().copied().unwrap_or(0),
        );
        Ok(Response::new(pb::PublishResponse {
            sequences: published.sequences,
            duplicates: published.duplicates,
        }))
    }

    type PublishStreamStream = BoxStream<'static, Result<pb::PublishStreamResponse, Status>>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishStreamRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let span = info_span!("publish_stream");
        let caller = auth::caller_of(&self.auth, &request)?;
        let state = PublishStreamState {
            trace: TraceContext::from_metadata(request.metadata()),
            api: self.clone(),
            caller,
            broker: self.broker.clone(),
            inbound: request.into_inner(),
            in_flight: FuturesOrdered::new(),
            inbound_done: false,
            inbound_error: None,
            ended: false,
        };
        let responses = stream::unfold(state, move |mut state| {
            let span = span.clone();
            async move {
                let response = state.next().await?;
                Some((response, state))
            }
            .instrument(span)
        });
        Ok(Response::new(responses.boxed()))
    }

    type SubscribeStream = BoxStream<'static, Result<pb::SubscribeResponse, Status>>;

    /// The bus serves Subscribe through [`subscribe::EventBusServer`], which encodes frames
    /// itself; this is the same stream as generated messages, for anyone mounting the
    /// generated server.
    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let frames = self.subscribe_frames(request).await?;
        Ok(Response::new(
            frames
                .map(|frame| frame.map(SubscribeFrame::into_pb))
                .boxed(),
        ))
    }

    async fn query(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        let caller = auth::caller_of(&self.auth, &request)?;
        let grpc_deadline = grpc_timeout(request.metadata());
        let trace = TraceContext::from_metadata(request.metadata());
        let request = request.into_inner();
        let mut event = request
            .event
            .ok_or_else(|| BusError::invalid("event", "is required"))?;
        self.auth.fill_source(&caller, &mut event.source);
        let bytes = prost::Message::encoded_len(&event);
        let mut event = convert::event_from_pb(
            event,
            convert::EventPath::Named("event"),
            self.broker.config().max_message_bytes,
        )?;
        self.auth
            .authorize_publish(&caller, std::slice::from_ref(&event), |inbox| {
                self.broker.waiting_query(inbox)
            })?;
        self.auth.admit_publish(&caller, 1, bytes)?;
        let _in_flight = self.auth.start_query(&caller)?;
        if let Some(trace) = &trace {
            trace.apply(&mut event);
        }
        let spans = PublishSpans::open(std::slice::from_mut(&mut event));
        let config = self.broker.config();
        let timeout = convert::query_timeout(
            request.timeout,
            grpc_deadline,
            config.default_query_timeout,
            config.max_query_timeout,
        )?;
        let span = info_span!(
            "query",
            topic = %event.topic,
            source = %event.source,
            correlation_id = tracing::field::Empty,
            reply_sequence = tracing::field::Empty,
        );
        if !event.correlation_id.is_empty() {
            span.record("correlation_id", event.correlation_id.as_str());
        }
        let reply = self
            .broker
            .query(event, timeout)
            .instrument(span.clone())
            .await
            .inspect_err(|error| debug!(parent: &span, %error, "query failed"));
        // The query's span ends with the answer (or the error): its duration is the round trip.
        spans.record(
            reply
                .as_ref()
                .map(|reply| std::slice::from_ref(&reply.sequence)),
        );
        drop(spans);
        let reply = reply?;
        span.record("correlation_id", reply.event.correlation_id.as_str());
        span.record("reply_sequence", reply.sequence);
        debug!(
            parent: &span,
            topic = %reply.event.topic,
            sequence = reply.sequence,
            correlation_id = %reply.event.correlation_id,
            responder = %reply.event.source,
            "query answered"
        );
        let mut response = Response::new(pb::QueryResponse {
            reply: Some(convert::event_to_pb(&reply)),
        });
        // The reply's trace context, for clients that read it from metadata.
        if let Some(trace) = TraceContext::from_attributes(&reply.event.attributes) {
            trace.to_metadata(response.metadata_mut());
        }
        Ok(response)
    }

    async fn ack(
        &self,
        request: Request<pb::AckRequest>,
    ) -> Result<Response<pb::AckResponse>, Status> {
        let caller = auth::caller_of(&self.auth, &request)?;
        let request = request.into_inner();
        #[cfg(test)]
        if request.group == test_hooks::PANIC {
            panic!("test-only panic in the Ack handler");
        }
        let group = EventBusApi::group_of(&request.group)?;
        self.auth.authorize_group(&caller, group)?;
        let sequences = EventBusApi::sequences_of(&request.sequences)?;
        let acked = self.broker.ack_anywhere(group, sequences).await?;
        debug!(
            group,
            acked = acked.acknowledged,
            cursor = acked.cursor,
            "ack"
        );
        Ok(Response::new(pb::AckResponse {
            acknowledged: acked.acknowledged,
            group_cursor: acked.cursor,
        }))
    }

    async fn nack(
        &self,
        request: Request<pb::NackRequest>,
    ) -> Result<Response<pb::NackResponse>, Status> {
        let caller = auth::caller_of(&self.auth, &request)?;
        let request = request.into_inner();
        let group = EventBusApi::group_of(&request.group)?;
        self.auth.authorize_group(&caller, group)?;
        let sequences = EventBusApi::sequences_of(&request.sequences)?;
        let delay = convert::delay_from_pb(request.redeliver_after, "redeliver_after")?;
        let requeued = self.broker.nack_anywhere(group, sequences, delay).await?;
        debug!(group, requeued, "nack");
        Ok(Response::new(pb::NackResponse { requeued }))
    }
}

impl EventBusApi {
    /// Opens a subscription: the confirmation, then its deliveries, as frames.
    async fn subscribe_frames(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<BoxStream<'static, Result<SubscribeFrame, Status>>, Status> {
        let caller = auth::caller_of(&self.auth, &request)?;
        let max_batch = request.get_ref().max_batch_events;
        if max_batch > subscribe::MAX_BATCH_EVENTS {
            return Err(BusError::invalid(
                "max_batch_events",
                format!("must be at most {}", subscribe::MAX_BATCH_EVENTS),
            )
            .into());
        }
        let options = convert::subscribe_options_from_pb(request.into_inner())?;
        self.auth
            .authorize_subscribe(&caller, &options.pattern, options.group.as_deref())?;
        // Held for as long as the stream is.
        let slots = self.auth.open_subscription(&caller)?;
        let mut filter =
            self.auth
                .delivery_filter(&caller, &options.pattern, options.group.as_deref());
        let manual_group = options
            .group
            .clone()
            .filter(|_| matches!(options.ack, crate::broker::AckMode::Manual(_)));
        let broker = self.broker.clone();
        #[cfg(test)]
        let panics = options.subscriber.as_ref() == test_hooks::PANIC;
        // At debug level: the span lives as long as the stream, and an enabled one costs about
        // 500 bytes of every idle subscription; only the debug lines below use it.
        let span = debug_span!(
            "subscribe",
            topic = %options.pattern,
            group = options.group.as_deref().unwrap_or(""),
            subscriber = %options.subscriber,
            subscription_id = tracing::field::Empty,
        );
        let subscriber = options.subscriber.clone();
        // The placement is held for as long as the stream is: see `Broker::place_group`.
        let (subscription, placement) =
            match self.broker.place_group(options.group.as_deref()).await? {
                GroupPlace::Here(placement) => {
                    if !matches!(options.start, crate::broker::StartPosition::Latest) {
                        // A replay from here holds what other nodes had acknowledged before
                        // this call.
                        self.broker.route_log_head().await;
                    }
                    (span.in_scope(|| self.broker.subscribe(options))?, placement)
                }
                // The group's home serves the member; this node relays.
                GroupPlace::Elsewhere(home) => {
                    (self.broker.join_elsewhere(options, home).await?, None)
                }
            };
        span.record("subscription_id", subscription.info().id);
        debug!(parent: &span, head = subscription.info().head_sequence, "subscribed");
        let subscribed = SubscribeFrame::Message(Box::new(subscribe_message(
            pb::subscribe_response::Message::Subscribed(convert::subscribed_to_pb(
                subscription.info(),
            )),
        )));
        let deliveries = subscription.filter_map(move |delivery| {
            let _held = (&placement, &slots);
            let frame = match delivery {
                Ok(Delivery::Event { event, attempt }) => {
                    match filter.admits(&event.event.topic) {
                        Ok(true) => {}
                        Ok(false) => {
                            // Not this principal's to see (a denied topic inside its
                            // pattern): a MANUAL group's event is settled, not redelivered.
                            if let Some(group) = &manual_group {
                                broker.settle_unseen(group, event.sequence);
                            }
                            return std::future::ready(None);
                        }
                        Err(error) => return std::future::ready(Some(Err(error.into()))),
                    }
                    debug!(
                        parent: &span,
                        topic = %event.event.topic,
                        sequence = event.sequence,
                        correlation_id = %event.event.correlation_id,
                        subscriber = %subscriber,
                        attempt,
                        "delivered"
                    );
                    Ok(SubscribeFrame::Event { event, attempt })
                }
                Ok(Delivery::CaughtUp { sequence }) => {
                    Ok(SubscribeFrame::Message(Box::new(subscribe_message(
                        pb::subscribe_response::Message::CaughtUp(pb::CaughtUp { sequence }),
                    ))))
                }
                Err(error) => {
                    debug!(parent: &span, %error, "subscription ended");
                    Err(status::to_status(&error))
                }
            };
            std::future::ready(Some(frame))
        });
        let confirmation = stream::once(async move {
            #[cfg(test)]
            if panics {
                panic!("test-only panic in a Subscribe stream");
            }
            Ok(subscribed)
        });
        if max_batch > 1 {
            // Whatever is ready when the stream is polled, up to the limit, never waiting
            // for more: one response then carries a run of events.
            let batched = subscribe::ReadyBatches::new(deliveries.boxed(), max_batch as usize);
            return Ok(confirmation.chain(batched).boxed());
        }
        Ok(confirmation.chain(deliveries).boxed())
    }

    fn group_of(group: &str) -> Result<&str, BusError> {
        if group.is_empty() {
            return Err(BusError::invalid("group", "must name the MANUAL-ack group"));
        }
        Ok(group)
    }

    fn sequences_of(sequences: &[u64]) -> Result<&[u64], BusError> {
        if sequences.is_empty() {
            return Err(BusError::invalid(
                "sequences",
                "must hold at least one sequence",
            ));
        }
        Ok(sequences)
    }
}

/// Test-only triggers, compiled into the crate's unit tests alone (`server`'s tests use them to
/// check that panics are contained): a MANUAL-ack group named [`test_hooks::PANIC`] makes Ack
/// panic in its handler, and a subscriber of that name makes its Subscribe stream panic.
#[cfg(test)]
pub(crate) mod test_hooks {
    pub const PANIC: &str = "test-panic";
}

/// Batches one PublishStream keeps waiting for durability at once: enough to fill many group
/// commits, bounded so a client cannot make the bus hold unbounded work.
const MAX_BATCHES_IN_FLIGHT: usize = 1024;

type BatchOutcome = (u64, Result<Published, BusError>);

/// The per-stream state of a PublishStream call. Batches are appended in the order they arrive
/// and answered in that order; waiting for durability overlaps, so one fsync covers many.
struct PublishStreamState {
    /// Checks each batch ([`EventBusApi::admit_batch`]) for `caller`.
    api: EventBusApi,
    caller: Caller,
    broker: Broker,
    /// The stream's trace context (request metadata), applied to every batch.
    trace: Option<TraceContext>,
    inbound: Streaming<pb::PublishStreamRequest>,
    in_flight: FuturesOrdered<BoxFuture<'static, BatchOutcome>>,
    inbound_done: bool,
    /// Why the inbound side failed (a request that did not decode, was too large or stopped
    /// arriving), if it did: the stream ends with it once the batches before it are answered.
    inbound_error: Option<Status>,
    ended: bool,
}

impl PublishStreamState {
    async fn next(&mut self) -> Option<Result<pb::PublishStreamResponse, Status>> {
        loop {
            if self.ended {
                return None;
            }
            if self.inbound_done && self.in_flight.is_empty() {
                self.ended = true;
                return self.inbound_error.take().map(Err);
            }
            let accepting = !self.inbound_done && self.in_flight.len() < MAX_BATCHES_IN_FLIGHT;
            tokio::select! {
                biased;
                _ = self.broker.stopped(), if self.in_flight.is_empty() => {
                    self.ended = true;
                    return Some(Err(status::to_status(&BusError::ShuttingDown)));
                }
                Some((request_id, outcome)) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    return self.answer(request_id, outcome);
                }
                request = self.inbound.next(), if accepting => match request {
                    None => self.inbound_done = true,
                    Some(Err(status)) => {
                        // A request that cannot be read (or a client that broke its side):
                        // answer what is in flight, take no more, end with the reason.
                        debug!(%status, "publish stream's inbound side failed");
                        self.inbound_done = true;
                        self.inbound_error = Some(status);
                    }
                    Some(Ok(request)) => self.begin(request).await,
                },
            }
        }
    }

    /// Checks and begins one batch. Awaited in the stream's loop, so batches begin in the
    /// order they arrived; the check waits only for a reply into another node's inbox (one
    /// NATS request).
    ///
    /// A batch refused because the log cannot be written now (`store-failed`: a shared log's
    /// NATS is away) ends the stream with that status, once the batches before it are
    /// answered, instead of failing alone: the batches the client sent after it are then not
    /// begun here, and the client sends them all again, in order, on another node. Answered
    /// alone, a later batch begun once the log was back would be stored ahead of the refused
    /// one's resend, out of the publisher's order.
    async fn begin(&mut self, request: pb::PublishStreamRequest) {
        let request_id = request.request_id;
        let admitted = self.api.admit_batch(&mut self.caller, request.events).await;
        let trace = self.trace.as_ref();
        let mut spans = PublishSpans::default();
        let pending = admitted.and_then(|mut events| {
            if let Some(trace) = trace {
                events.iter_mut().for_each(|event| trace.apply(event));
            }
            spans = PublishSpans::open(&mut events);
            self.broker.begin_publish(events)
        });
        if let Err(error @ BusError::Storage(crate::store::StoreError::Failed(_))) = &pending {
            spans.record(Err(error));
            debug!(%error, "publish stream ends: the log cannot be written now");
            self.inbound_done = true;
            self.inbound_error = Some(status::to_status(error));
            return;
        }
        self.in_flight.push_back(Box::pin(async move {
            let outcome = match pending {
                Ok(pending) => pending.finish().await,
                Err(error) => Err(error),
            };
            spans.record(outcome.as_ref().map(|p| &p.sequences[..]));
            (request_id, outcome)
        }));
    }

    fn answer(
        &mut self,
        request_id: u64,
        outcome: Result<Published, BusError>,
    ) -> Option<Result<pb::PublishStreamResponse, Status>> {
        let result = match outcome {
            Ok(published) => {
                pb::publish_stream_response::Result::Published(pb::PublishedSequences {
                    sequences: published.sequences,
                    duplicates: published.duplicates,
                })
            }
            Err(BusError::ShuttingDown) => {
                self.ended = true;
                return Some(Err(status::to_status(&BusError::ShuttingDown)));
            }
            Err(error) => {
                let (code, reason) = status::classify(&error);
                pb::publish_stream_response::Result::Error(pb::PublishError {
                    code: code as i32,
                    message: error.to_string(),
                    reason: reason.to_owned(),
                })
            }
        };
        Some(Ok(pb::PublishStreamResponse {
            request_id,
            result: Some(result),
        }))
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn list_topics(
        &self,
        request: Request<pb::ListTopicsRequest>,
    ) -> Result<Response<pb::ListTopicsResponse>, Status> {
        self.admit(&request, "ListTopics")?;
        let request = request.into_inner();
        let filter = if request.pattern.is_empty() {
            None
        } else {
            Some(
                crate::topic::Pattern::parse(&request.pattern)
                    .map_err(|rule| BusError::invalid("pattern", rule.to_string()))?,
            )
        };
        let page_size = convert::page_size(request.page_size, TOPICS_PAGE_DEFAULT, TOPICS_PAGE_MAX);
        let after = (!request.page_token.is_empty()).then_some(request.page_token.as_str());
        // On a cluster, the other nodes' subscribers too.
        let peers = self.broker.peer_views().await;
        let page = self
            .broker
            .list_topics(filter.as_ref(), after, page_size, &peers);
        Ok(Response::new(pb::ListTopicsResponse {
            topics: page.topics.into_iter().map(convert::topic_to_pb).collect(),
            next_page_token: page.next_after.unwrap_or_default(),
            untracked_events: page.untracked_events,
        }))
    }

    async fn get_topology(
        &self,
        request: Request<pb::GetTopologyRequest>,
    ) -> Result<Response<pb::GetTopologyResponse>, Status> {
        self.admit(&request, "GetTopology")?;
        let max_edges = convert::page_size(
            request.into_inner().max_edges,
            TOPOLOGY_EDGES_DEFAULT,
            TOPOLOGY_EDGES_MAX,
        );
        // The estimate of a graph's size is rough (and high), the limits are not: half the
        // server's message limit, and within the 4 MiB that gRPC clients accept by default.
        let max_bytes = (self.broker.config().max_message_bytes / 2).min(TOPOLOGY_MAX_BYTES);
        let broker = self.broker.clone();
        // On a cluster, the other nodes' subscriptions too.
        let peers = self.broker.peer_views().await;
        // Building a large graph takes a while: keep it off the async workers. A panic there is
        // resumed here, where the panic layer answers INTERNAL as for any handler.
        let snapshot =
            tokio::task::spawn_blocking(move || broker.topology(max_edges, max_bytes, &peers))
                .await
                .unwrap_or_else(|error| std::panic::resume_unwind(error.into_panic()));
        Ok(Response::new(convert::topology_to_pb(snapshot)))
    }

    async fn list_groups(
        &self,
        request: Request<pb::ListGroupsRequest>,
    ) -> Result<Response<pb::ListGroupsResponse>, Status> {
        self.admit(&request, "ListGroups")?;
        let only = request.into_inner().group;
        let groups = self
            .broker
            .list_groups()
            .into_iter()
            .filter(|group| only.is_empty() || group.name == only)
            .map(convert::group_to_pb)
            .collect();
        Ok(Response::new(pb::ListGroupsResponse { groups }))
    }

    async fn get_server_info(
        &self,
        request: Request<pb::GetServerInfoRequest>,
    ) -> Result<Response<pb::GetServerInfoResponse>, Status> {
        self.admit(&request, "GetServerInfo")?;
        let principals = if self.auth.is_open() {
            0
        } else {
            self.auth.principal_count()
        };
        Ok(Response::new(convert::server_info_to_pb(
            self.broker.server_snapshot(),
            principals,
            &self.settings,
        )))
    }
}

/// ListTopics pages: the default and the most topics in one.
pub const TOPICS_PAGE_DEFAULT: usize = 1_000;
pub const TOPICS_PAGE_MAX: usize = 10_000;
/// GetTopology: the default and the most edges in one response.
pub const TOPOLOGY_EDGES_DEFAULT: usize = 10_000;
pub const TOPOLOGY_EDGES_MAX: usize = 100_000;
/// GetTopology: the most bytes of one response, by a high estimate.
pub const TOPOLOGY_MAX_BYTES: usize = 3 * 1024 * 1024;

/// The call's deadline from its `grpc-timeout` header (e.g. `500m`, `5S`), if any.
fn grpc_timeout(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_grpc_timeouts() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        assert_eq!(grpc_timeout(&metadata), None);
        for (header, expected) in [
            ("5S", Duration::from_secs(5)),
            ("250m", Duration::from_millis(250)),
            ("2M", Duration::from_secs(120)),
            ("1H", Duration::from_secs(3600)),
            ("7u", Duration::from_micros(7)),
            ("9n", Duration::from_nanos(9)),
        ] {
            metadata.insert("grpc-timeout", header.parse().unwrap());
            assert_eq!(grpc_timeout(&metadata), Some(expected), "{header}");
        }
        metadata.insert("grpc-timeout", "5x".parse().unwrap());
        assert_eq!(grpc_timeout(&metadata), None);
    }
}
