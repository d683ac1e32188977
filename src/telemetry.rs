//! OpenTelemetry traces of what the bus stores: one span per published event that carries W3C
//! trace context, named and described by the OpenTelemetry messaging semantic conventions, and
//! exported over OTLP/gRPC when `--otlp-endpoint` is set ([`install`]).
//!
//! # What a trace looks like
//! A client sends its context as request metadata or event attributes ([`crate::tracecontext`]).
//! For each such event the bus opens a `publish <topic>` span (kind PRODUCER: the bus hands the
//! event on to its subscribers) as a child of the client's span, and, while exporting, **rewrites
//! the event's `traceparent` to its own span**, so subscribers and a query's responder continue
//! the trace from the bus: asker → `publish user.query` (bus) → responder → `publish
//! _bus.inbox.*` (bus, the reply) → asker, in one trace. The span ends when the event is durable
//! and routed (the publish's acknowledgement), so its duration is the bus's own share of the
//! latency; a query's span ends when its answer comes, so it covers the round trip.
//!
//! Attributes (semantic conventions for messaging, v1.27+): `messaging.system` (`eventbus`),
//! `messaging.operation.type` (`send`), `messaging.operation.name` (`publish`),
//! `messaging.destination.name` (the topic; the template `_bus.inbox.*` for reply inboxes, with
//! `messaging.destination.temporary`), `messaging.message.id` (when the producer set one),
//! `messaging.message.conversation_id` (the correlation id), `messaging.client.id` (the source),
//! and `messaging.eventbus.sequence` once stored. A refused publish sets the span's status to
//! error with `error.type`.
//!
//! Events without trace context get no span, and with no endpoint set no span is made at all
//! ([`enabled`] is one relaxed atomic load): the publish path pays nothing for tracing it does
//! not use. Only spans of [`TARGET`] are exported; the bus's other spans (one per RPC) stay in
//! its logs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::event::Event;
use crate::topic::INBOX_FAMILY;
use crate::tracecontext::{TRACEPARENT, TRACESTATE};

/// The `tracing` target of the spans exported over OTLP.
pub const TARGET: &str = "eventbus::telemetry";

/// `service.name` of the exported spans, unless `OTEL_SERVICE_NAME` says otherwise.
pub const SERVICE_NAME: &str = "eventbus";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported (an endpoint was installed in this process).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The exporter's pipeline; [`Telemetry::shutdown`] flushes the spans not yet sent.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

/// Errors setting up the exporter.
#[derive(Debug, thiserror::Error)]
#[error("otlp_endpoint {endpoint}: {source}")]
pub struct TelemetryError {
    endpoint: String,
    source: opentelemetry_otlp::ExporterBuildError,
}

/// Builds the OTLP/gRPC exporter to `endpoint` (`http://collector:4317`) with a batch span
/// processor, and returns the `tracing` layer that feeds it (to be added to the subscriber with
/// a filter of [`TARGET`], see `cli::serve`). Must run inside the Tokio runtime: the gRPC channel
/// is driven by it. The standard `OTEL_*` variables of the SDK apply (`OTEL_SERVICE_NAME`,
/// `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_EXPORTER_OTLP_TIMEOUT`, ...).
///
/// # Errors
/// [`TelemetryError`] when the exporter cannot be built from `endpoint`.
pub fn install<S>(
    endpoint: &str,
) -> Result<
    (
        tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>,
        Telemetry,
    ),
    TelemetryError,
>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    use opentelemetry_otlp::WithExportConfig as _;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|source| TelemetryError {
            endpoint: endpoint.to_owned(),
            source,
        })?;
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| SERVICE_NAME.to_owned());
    let resource = Resource::builder()
        .with_service_name(service)
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer(SERVICE_NAME);
    ENABLED.store(true, Ordering::Relaxed);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // The bus's spans carry their semantic-convention attributes themselves; the source
        // location and thread of each are noise in a trace view.
        .with_location(false)
        .with_threads(false);
    Ok((layer, Telemetry { provider }))
}

impl Telemetry {
    /// Sends the spans still batched and stops the exporter (blocking, bounded by the
    /// exporter's timeout).
    pub fn shutdown(self) {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "flushing the last spans to the OTLP endpoint failed");
        }
    }
}

/// The spans of one published batch: one per event with trace context, in the batch's order,
/// ended when dropped. Empty (and free) when spans are not exported.
#[derive(Default)]
pub struct PublishSpans {
    /// (index in the batch, span).
    spans: Vec<(usize, Span)>,
}

impl PublishSpans {
    /// Opens a `publish <topic>` span for each event of `events` that carries a `traceparent`,
    /// as that context's child, and points the event's `traceparent`/`tracestate` at the new
    /// span (see the module docs). Does nothing unless [`enabled`].
    pub fn open(events: &mut [Event]) -> PublishSpans {
        if !enabled() {
            return PublishSpans::default();
        }
        let propagator = TraceContextPropagator::new();
        let mut spans = Vec::new();
        for (index, event) in events.iter_mut().enumerate() {
            if !event.attributes.contains_key(TRACEPARENT) {
                continue;
            }
            let parent = propagator.extract(&event.attributes);
            let temporary = event.topic.is_inbox();
            let destination = if temporary {
                INBOX_TEMPLATE
            } else {
                event.topic.as_str()
            };
            let span = tracing::info_span!(
                target: TARGET,
                "publish",
                otel.name = format!("publish {destination}"),
                otel.kind = "producer",
                messaging.system = "eventbus",
                messaging.operation.type = "send",
                messaging.operation.name = "publish",
                messaging.destination.name = destination,
                messaging.destination.temporary = temporary,
                messaging.message.id = tracing::field::Empty,
                messaging.message.conversation_id = tracing::field::Empty,
                messaging.client.id = &*event.source,
                messaging.eventbus.sequence = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
                error.r#type = tracing::field::Empty,
            );
            if !event.id.is_empty() {
                span.record("messaging.message.id", event.id.as_str());
            }
            if !event.correlation_id.is_empty() {
                span.record(
                    "messaging.message.conversation_id",
                    event.correlation_id.as_str(),
                );
            }
            // A span no layer records (the filter left it out) has no context to hand on.
            if span.is_disabled() || span.set_parent(parent).is_err() {
                continue;
            }
            let mut carrier = HashMap::new();
            propagator.inject_context(&span.context(), &mut carrier);
            if let Some(traceparent) = carrier.remove(TRACEPARENT) {
                event.attributes.insert(TRACEPARENT.to_owned(), traceparent);
                match carrier.remove(TRACESTATE).filter(|state| !state.is_empty()) {
                    Some(state) => event.attributes.insert(TRACESTATE.to_owned(), state),
                    None => event.attributes.remove(TRACESTATE),
                };
            }
            spans.push((index, span));
        }
        PublishSpans { spans }
    }

    /// Records the outcome: each event's sequence, or the error on every span. The spans end
    /// when `self` is dropped.
    pub fn record<E: std::fmt::Display>(&self, outcome: Result<&[u64], &E>) {
        for (index, span) in &self.spans {
            match outcome {
                Ok(sequences) => {
                    if let Some(sequence) = sequences.get(*index) {
                        // As a signed integer: OTLP's integer attribute is an int64, and
                        // tracing-opentelemetry sends a u64 as text. Sequences stay below 2^63.
                        span.record("messaging.eventbus.sequence", *sequence as i64);
                    }
                }
                Err(error) => {
                    span.record("otel.status_code", "ERROR");
                    span.record("error.type", error.to_string().as_str());
                }
            }
        }
    }
}

/// `messaging.destination.name` of reply inboxes: one template for every inbox, since each id
/// is random (the conventions ask for a template for temporary destinations).
const INBOX_TEMPLATE: &str = INBOX_FAMILY;
