//! OpenTelemetry export: a real `eventbus serve --otlp-endpoint` process sends its spans to an
//! OTLP/gRPC collector this test runs (the trace service generated from the OTLP protos by
//! `opentelemetry-proto`), and one query's trace runs asker → bus → responder → bus.

mod bus_process;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bus_process::BusProcess;
use eventbus::sdk::{Client, Reply, ServeOptions};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// Every export request the collector got.
#[derive(Clone, Default)]
struct Collector {
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.requests.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Starts the collector on 127.0.0.1:0; returns its `http://` endpoint.
    async fn start(self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(self))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        endpoint
    }

    /// The spans received so far, with the resource's `service.name` of each.
    fn spans(&self) -> Vec<(String, Span)> {
        let requests = self.requests.lock().unwrap();
        let mut spans = Vec::new();
        for request in requests.iter() {
            for resource in &request.resource_spans {
                let service = resource
                    .resource
                    .as_ref()
                    .and_then(|r| string_attribute(&r.attributes, "service.name"))
                    .unwrap_or_default();
                for scope in &resource.scope_spans {
                    for span in &scope.spans {
                        spans.push((service.clone(), span.clone()));
                    }
                }
            }
        }
        spans
    }
}

fn attribute<'a>(
    attributes: &'a [opentelemetry_proto::tonic::common::v1::KeyValue],
    key: &str,
) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn string_attribute(
    attributes: &[opentelemetry_proto::tonic::common::v1::KeyValue],
    key: &str,
) -> Option<String> {
    match attribute(attributes, key)? {
        Value::StringValue(text) => Some(text.clone()),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_is_one_trace_from_asker_through_bus_and_responder_back() {
    let collector = Collector::default();
    let endpoint = collector.clone().start().await;
    // Spans are sent in batches; a short delay keeps the test short.
    let bus = tokio::task::spawn_blocking(move || {
        BusProcess::start_with_env(
            &["--otlp-endpoint", &endpoint],
            None,
            &[("OTEL_BSP_SCHEDULE_DELAY", "100")],
        )
    })
    .await
    .unwrap();

    let stop = CancellationToken::new();
    let users = Client::builder(bus.url())
        .source("user-service")
        .connect()
        .await
        .unwrap();
    let responder = users
        .responder("user.query", ServeOptions::default())
        .await
        .unwrap();
    let serving = tokio::spawn(responder.run(
        |_query: eventbus::pb::Event| async move { Ok::<_, String>(Reply::new("{\"id\":7}")) },
        stop.clone().cancelled_owned(),
    ));
    let asker = Client::builder(bus.url())
        .source("query-service")
        .connect()
        .await
        .unwrap();
    // An event without trace context: no span.
    let untraced = asker.publish("audit.logged", "{}").await.unwrap();

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let reply = asker
        .event("user.query")
        .data("{\"id\":7}")
        .correlation_id("get-7")
        .trace_context(format!("00-{trace_id}-{client_span}-01"), None)
        .query(Duration::from_secs(10))
        .await
        .unwrap();
    let reply_traceparent = eventbus::sdk::traceparent(&reply).expect("the reply keeps the trace");
    assert!(reply_traceparent.contains(trace_id), "{reply_traceparent}");

    let deadline = Instant::now() + WAIT;
    let spans = loop {
        let spans = collector.spans();
        if spans.len() >= 2 {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "two spans within {WAIT:?}; got {spans:?}; bus logs: {:?}",
            bus.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let find = |name: &str| {
        spans
            .iter()
            .find(|(_, span)| span.name == name)
            .unwrap_or_else(|| panic!("a span named {name:?} in {spans:?}"))
    };
    let (service, query) = find("publish user.query");
    let (_, reply_span) = find("publish _bus.inbox.*");
    assert_eq!(service, "eventbus");

    // One trace: the client's span → the bus's query span → (the responder copied the query's
    // context, which the bus pointed at its span) → the bus's reply span.
    assert_eq!(hex(&query.trace_id), trace_id);
    assert_eq!(hex(&query.parent_span_id), client_span);
    assert_eq!(hex(&reply_span.trace_id), trace_id);
    assert_eq!(reply_span.parent_span_id, query.span_id);
    // And what the asker got points at the reply's span.
    assert!(
        reply_traceparent.contains(&hex(&reply_span.span_id)),
        "{reply_traceparent}"
    );

    // The messaging semantic conventions.
    assert_eq!(query.kind, SpanKind::Producer as i32);
    let text = |span: &Span, key: &str| string_attribute(&span.attributes, key);
    assert_eq!(text(query, "messaging.system").as_deref(), Some("eventbus"));
    assert_eq!(
        text(query, "messaging.operation.type").as_deref(),
        Some("send")
    );
    assert_eq!(
        text(query, "messaging.destination.name").as_deref(),
        Some("user.query")
    );
    assert_eq!(
        text(query, "messaging.message.conversation_id").as_deref(),
        Some("get-7")
    );
    assert_eq!(
        text(query, "messaging.client.id").as_deref(),
        Some("query-service")
    );
    assert_eq!(
        text(reply_span, "messaging.client.id").as_deref(),
        Some("user-service")
    );
    assert_eq!(
        attribute(&reply_span.attributes, "messaging.destination.temporary"),
        Some(&Value::BoolValue(true))
    );
    match attribute(&query.attributes, "messaging.eventbus.sequence") {
        Some(Value::IntValue(sequence)) => assert!(*sequence as u64 > untraced),
        other => panic!("the query's sequence as an integer, not {other:?}"),
    }
    // The query's span covers the round trip, so the reply's span lies inside it.
    assert!(query.start_time_unix_nano <= reply_span.start_time_unix_nano);
    assert!(reply_span.end_time_unix_nano <= query.end_time_unix_nano);

    // Nothing for the event without trace context.
    assert!(
        spans
            .iter()
            .all(|(_, span)| hex(&span.trace_id) == trace_id),
        "{spans:?}"
    );
    stop.cancel();
    serving.await.unwrap().unwrap();
}

#[test]
fn a_bad_endpoint_is_refused_at_start_naming_the_setting() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_eventbus"))
        .args(["serve", "--storage", "memory", "--listen", "127.0.0.1:0"])
        .args(["--otlp-endpoint", "collector:4317"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("otlp_endpoint") && stderr.contains("http://"),
        "{stderr}"
    );
}
