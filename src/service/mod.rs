//! The gRPC adapter: implements `eventbus.v1`'s services on top of the [`Broker`]. It converts
//! wire types at one boundary ([`convert`]), calls the broker, and maps errors in one place
//! ([`status`]). It holds no state of its own.

pub mod convert;
pub mod status;

use std::time::Duration;

use futures_util::stream::{self, BoxStream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info_span, Instrument};

use crate::broker::{Broker, Delivery};
use crate::error::BusError;
use crate::pb;
use pb::admin_service_server::AdminService;
use pb::event_bus_service_server::EventBusService;

/// `eventbus.v1.EventBusService`.
#[derive(Clone)]
pub struct EventBusApi {
    broker: Broker,
}

impl EventBusApi {
    pub fn new(broker: Broker) -> EventBusApi {
        EventBusApi { broker }
    }
}

/// `eventbus.v1.AdminService`.
#[derive(Clone)]
pub struct AdminApi {
    broker: Broker,
}

impl AdminApi {
    pub fn new(broker: Broker) -> AdminApi {
        AdminApi { broker }
    }
}

fn subscribe_message(message: pb::subscribe_response::Message) -> pb::SubscribeResponse {
    pb::SubscribeResponse {
        message: Some(message),
    }
}

#[tonic::async_trait]
impl EventBusService for EventBusApi {
    async fn publish(
        &self,
        request: Request<pb::PublishRequest>,
    ) -> Result<Response<pb::PublishResponse>, Status> {
        let events = request.into_inner().events;
        let span = info_span!(
            "publish",
            events = events.len(),
            topic = events.first().map(|e| e.topic.as_str()).unwrap_or(""),
            first_sequence = tracing::field::Empty,
        );
        let _entered = span.enter();
        let sequences =
            convert::events_from_pb(events).and_then(|events| self.broker.publish(events))?;
        span.record("first_sequence", sequences.first().copied().unwrap_or(0));
        Ok(Response::new(pb::PublishResponse { sequences }))
    }

    type PublishStreamStream = BoxStream<'static, Result<pb::PublishStreamResponse, Status>>;

    async fn publish_stream(
        &self,
        request: Request<Streaming<pb::PublishStreamRequest>>,
    ) -> Result<Response<Self::PublishStreamStream>, Status> {
        let span = info_span!("publish_stream");
        let state = PublishStreamState {
            broker: self.broker.clone(),
            inbound: request.into_inner(),
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

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let options = convert::subscribe_options_from_pb(request.into_inner())?;
        let span = info_span!(
            "subscribe",
            topic = %options.pattern,
            group = options.group.as_deref().unwrap_or(""),
            subscriber = %options.subscriber,
            subscription_id = tracing::field::Empty,
        );
        let subscription = span.in_scope(|| self.broker.subscribe(options))?;
        span.record("subscription_id", subscription.info().id);
        debug!(parent: &span, head = subscription.info().head_sequence, "subscribed");
        let subscribed = subscribe_message(pb::subscribe_response::Message::Subscribed(
            convert::subscribed_to_pb(subscription.info()),
        ));
        let log_span = span.clone();
        let deliveries = subscription.map(move |delivery| match delivery {
            Ok(Delivery::Event(event)) => {
                tracing::trace!(parent: &log_span, sequence = event.sequence, topic = %event.event.topic, correlation_id = %event.event.correlation_id, "deliver");
                Ok(subscribe_message(pb::subscribe_response::Message::Event(
                    convert::event_to_pb(&event),
                )))
            }
            Ok(Delivery::CaughtUp { sequence }) => Ok(subscribe_message(
                pb::subscribe_response::Message::CaughtUp(pb::CaughtUp { sequence }),
            )),
            Err(error) => {
                debug!(parent: &log_span, %error, "subscription ended");
                Err(status::to_status(&error))
            }
        });
        let responses = stream::once(async move { Ok(subscribed) }).chain(deliveries);
        Ok(Response::new(responses.boxed()))
    }

    async fn query(
        &self,
        request: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        let grpc_deadline = grpc_timeout(request.metadata());
        let request = request.into_inner();
        let event = request
            .event
            .ok_or_else(|| BusError::invalid("event", "is required"))?;
        let event = convert::event_from_pb(event, "event")?;
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
            .inspect_err(|error| debug!(parent: &span, %error, "query failed"))?;
        span.record("correlation_id", reply.event.correlation_id.as_str());
        span.record("reply_sequence", reply.sequence);
        Ok(Response::new(pb::QueryResponse {
            reply: Some(convert::event_to_pb(&reply)),
        }))
    }
}

/// The per-stream state of a PublishStream call.
struct PublishStreamState {
    broker: Broker,
    inbound: Streaming<pb::PublishStreamRequest>,
    ended: bool,
}

impl PublishStreamState {
    async fn next(&mut self) -> Option<Result<pb::PublishStreamResponse, Status>> {
        if self.ended {
            return None;
        }
        let request = tokio::select! {
            biased;
            _ = self.broker.stopped() => {
                self.ended = true;
                return Some(Err(status::to_status(&BusError::ShuttingDown)));
            }
            request = self.inbound.next() => request,
        };
        let request = match request? {
            Ok(request) => request,
            // The client broke its side of the stream: nothing to answer.
            Err(status) => {
                debug!(%status, "publish stream ended by the client");
                return None;
            }
        };
        let request_id = request.request_id;
        let result = match convert::events_from_pb(request.events)
            .and_then(|events| self.broker.publish(events))
        {
            Ok(sequences) => {
                pb::publish_stream_response::Result::Published(pb::PublishedSequences { sequences })
            }
            Err(BusError::ShuttingDown) => {
                self.ended = true;
                return Some(Err(status::to_status(&BusError::ShuttingDown)));
            }
            Err(error) => {
                let (code, _) = status::classify(&error);
                pb::publish_stream_response::Result::Error(pb::PublishError {
                    code: code as i32,
                    message: error.to_string(),
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
        let pattern = request.into_inner().pattern;
        let filter = if pattern.is_empty() {
            None
        } else {
            Some(
                crate::topic::Pattern::parse(&pattern)
                    .map_err(|rule| BusError::invalid("pattern", rule.to_string()))?,
            )
        };
        let topics = self
            .broker
            .list_topics(filter.as_ref())
            .into_iter()
            .map(convert::topic_to_pb)
            .collect();
        Ok(Response::new(pb::ListTopicsResponse { topics }))
    }

    async fn get_topology(
        &self,
        _request: Request<pb::GetTopologyRequest>,
    ) -> Result<Response<pb::GetTopologyResponse>, Status> {
        Ok(Response::new(convert::topology_to_pb(
            self.broker.topology(),
        )))
    }
}

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
