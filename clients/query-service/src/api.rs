//! The HTTP API. Every response names the mode (`X-Query-Mode` header, and `mode` in the JSON
//! body) and carries the request's correlation id (`X-Correlation-Id`: the client's, or a new
//! UUIDv7), which also goes on every query this request causes, so every log line of its path
//! through all the services carries it. Request-reply answers carry `Server-Timing` with each
//! bus call's duration; projection answers carry `X-Projection-Sequence`, the last bus sequence
//! the read model had applied when the request came in.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use eventbus_client::Client;
use scenario_common::bus::{ask, ask_read, AskError, Conversation};
use scenario_common::model::{
    services, topics, ByUser, CreateOrder, ErrorCode, OrderItem, OrderReply, OrdersReply,
    ProductQuery, ProductsReply, UserReply,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::Instrument as _;

use crate::projection::Projection;
use crate::view::{self, UserProducts};
use crate::Mode;

pub const MODE_HEADER: &str = "x-query-mode";
pub const CORRELATION_HEADER: &str = "x-correlation-id";
pub const SEQUENCE_HEADER: &str = "x-projection-sequence";

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub mode: Mode,
    pub client: Client,
    pub timeouts: Timeouts,
    /// Set in projection mode.
    pub projection: Option<Projection>,
}

/// Per-call timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub user: Duration,
    pub orders: Duration,
    pub products: Duration,
    pub create: Duration,
}

/// The request's conversation: its correlation id and trace context.
#[derive(Debug, Clone)]
struct CorrelationId(Conversation);

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/users/{id}/products", get(user_products))
        .route("/users/{id}/orders", post(create_order))
        .route("/status", get(status))
        .route("/health", get(health))
        .fallback(no_route)
        .layer(middleware::from_fn_with_state(state.clone(), context))
        .with_state(state)
}

/// The request's W3C trace context: a well-formed `traceparent`, and its `tracestate` (at most
/// the bus's limit) only beside one.
fn trace_headers(headers: &axum::http::HeaderMap) -> (Option<String>, Option<String>) {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(|value| value.trim().to_owned())
    };
    let traceparent = header("traceparent")
        .filter(|value| eventbus_client::tracecontext::is_valid_traceparent(value));
    let tracestate = traceparent
        .as_ref()
        .and(header("tracestate"))
        .filter(|state| state.len() <= eventbus_client::tracecontext::MAX_TRACESTATE_BYTES);
    (traceparent, tracestate)
}

/// Sets up the request's correlation id and span, logs the outcome, and adds the headers every
/// response carries.
async fn context(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let correlation_id = request
        .headers()
        .get(CORRELATION_HEADER)
        .and_then(|value| value.to_str().ok())
        .filter(|id| !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let span = tracing::info_span!(
        "http",
        correlation_id = %correlation_id,
        method = %request.method(),
        path = %request.uri().path(),
        mode = state.mode.as_str(),
    );
    // A caller that traces (W3C Trace Context headers) gets its trace carried into the queries.
    let (traceparent, tracestate) = trace_headers(request.headers());
    request.extensions_mut().insert(CorrelationId(Conversation {
        correlation_id: correlation_id.clone(),
        traceparent,
        tracestate,
    }));
    let sequence = state.projection.as_ref().map(Projection::last_sequence);
    let started = Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::info!(
            status = response.status().as_u16(),
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "answered"
        )
    });
    let headers = response.headers_mut();
    headers.insert(MODE_HEADER, HeaderValue::from_static(state.mode.as_str()));
    if let Ok(value) = HeaderValue::from_str(&correlation_id) {
        headers.insert(CORRELATION_HEADER, value);
    }
    if let Some(sequence) = sequence {
        headers.insert(SEQUENCE_HEADER, HeaderValue::from(sequence));
    }
    response
}

/// An error answer: `{"mode", "error": {"code", "message", "service"}}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    /// The service that failed to answer, when one did.
    service: Option<&'static str>,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            service: None,
            message: message.into(),
        }
    }

    /// A failed query to `service`, as an HTTP answer.
    fn from_ask(error: AskError, service: &'static str) -> ApiError {
        let (status, code, message) = match error {
            AskError::NoResponders { topic } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("{service} is not running: no responders for topic {topic}"),
            ),
            AskError::Timeout { topic, timeout } => (
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!("{service} did not answer {topic} within {timeout:?}"),
            ),
            AskError::Remote { code, message } => match code {
                ErrorCode::NotFound => (StatusCode::NOT_FOUND, "not_found", message),
                ErrorCode::Invalid => (StatusCode::BAD_REQUEST, "invalid", message),
                ErrorCode::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", message),
                ErrorCode::Internal => (StatusCode::BAD_GATEWAY, "internal", message),
            },
            AskError::BadReply { .. } => (StatusCode::BAD_GATEWAY, "bad_reply", error.to_string()),
            AskError::Bus(error) => {
                return ApiError {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    code: "bus_unavailable",
                    service: Some("eventbus"),
                    message: format!("cannot reach the bus: {error}"),
                }
            }
        };
        ApiError {
            status,
            code,
            service: Some(service),
            message,
        }
    }
}

/// Each bus call's duration, for the `Server-Timing` header.
#[derive(Debug, Default)]
struct Timings(Mutex<Vec<(&'static str, &'static str, Duration)>>);

impl Timings {
    /// Runs `call`, recording how long it took under `name` (with `topic` as description).
    async fn time<F: std::future::Future>(
        &self,
        name: &'static str,
        topic: &'static str,
        call: F,
    ) -> F::Output {
        let started = Instant::now();
        let out = call.await;
        let elapsed = started.elapsed();
        tracing::debug!(
            call = name,
            topic,
            elapsed_ms = elapsed.as_secs_f64() * 1e3,
            "bus call done"
        );
        self.0
            .lock()
            .expect("never poisoned: no panics under it")
            .push((name, topic, elapsed));
        out
    }

    /// `user;desc="user.query";dur=1.234, orders;...`
    fn header(&self) -> Option<HeaderValue> {
        let entries = self.0.lock().expect("never poisoned: no panics under it");
        if entries.is_empty() {
            return None;
        }
        let value = entries
            .iter()
            .map(|(name, topic, d)| {
                format!("{name};desc=\"{topic}\";dur={:.3}", d.as_secs_f64() * 1e3)
            })
            .collect::<Vec<_>>()
            .join(", ");
        HeaderValue::from_str(&value).ok()
    }
}

/// The response for `outcome`, with `Server-Timing` when bus calls were timed.
fn respond<T: Serialize>(
    mode: Mode,
    ok_status: StatusCode,
    outcome: Result<T, ApiError>,
    timings: &Timings,
) -> Response {
    let mut response = match outcome {
        Ok(body) => (ok_status, Json(body)).into_response(),
        Err(error) => {
            tracing::info!(status = error.status.as_u16(), code = error.code, service = error.service, message = %error.message, "request failed");
            let mut detail = json!({"code": error.code, "message": error.message});
            if let Some(service) = error.service {
                detail["service"] = json!(service);
            }
            (
                error.status,
                Json(json!({"mode": mode.as_str(), "error": detail})),
            )
                .into_response()
        }
    };
    if let Some(value) = timings.header() {
        response
            .headers_mut()
            .insert(HeaderName::from_static("server-timing"), value);
    }
    response
}

fn parse_user_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid",
            format!("user id must be an integer, not {raw:?}"),
        )
    })
}

/// `GET /users/{id}/products`.
async fn user_products(
    State(state): State<AppState>,
    Extension(CorrelationId(conversation)): Extension<CorrelationId>,
    Path(raw): Path<String>,
) -> Response {
    let timings = Timings::default();
    let outcome = match parse_user_id(&raw) {
        Err(error) => Err(error),
        Ok(user_id) => match &state.projection {
            None => request_reply(&state, &conversation, user_id, &timings).await,
            Some(projection) => {
                timings
                    .time("db", "projection", from_projection(projection, user_id))
                    .await
            }
        },
    };
    respond(state.mode, StatusCode::OK, outcome, &timings)
}

/// Request-reply: the user and the orders in parallel, then all the products in one query.
async fn request_reply(
    state: &AppState,
    conversation: &Conversation,
    user_id: i64,
    timings: &Timings,
) -> Result<UserProducts, ApiError> {
    let client = &state.client;
    let by_user = ByUser { user_id };
    tracing::info!(user_id, "asking user-service and order-service");
    let user = async {
        timings
            .time(
                "user",
                topics::USER_QUERY,
                ask_read::<_, UserReply>(
                    client,
                    topics::USER_QUERY,
                    &by_user,
                    conversation,
                    state.timeouts.user,
                ),
            )
            .await
            .map_err(|e| ApiError::from_ask(e, services::USER))
    };
    let orders = async {
        timings
            .time(
                "orders",
                topics::ORDER_QUERY,
                ask_read::<_, OrdersReply>(
                    client,
                    topics::ORDER_QUERY,
                    &by_user,
                    conversation,
                    state.timeouts.orders,
                ),
            )
            .await
            .map_err(|e| ApiError::from_ask(e, services::ORDER))
    };
    // try_join: the first failure answers at once (a 503 does not wait for the other call).
    let (user, orders) = tokio::try_join!(user, orders)?;
    let totals = view::totals(&orders.orders);
    let products = if totals.is_empty() {
        Vec::new()
    } else {
        let query = ProductQuery {
            product_ids: totals.keys().copied().collect(),
        };
        tracing::info!(products = query.product_ids.len(), "asking product-service");
        timings
            .time(
                "products",
                topics::PRODUCT_QUERY,
                ask_read::<_, ProductsReply>(
                    client,
                    topics::PRODUCT_QUERY,
                    &query,
                    conversation,
                    state.timeouts.products,
                ),
            )
            .await
            .map_err(|e| ApiError::from_ask(e, services::PRODUCT))?
            .products
    };
    Ok(view::join(
        Mode::RequestReply.as_str(),
        user.user,
        totals,
        products,
    ))
}

async fn from_projection(projection: &Projection, user_id: i64) -> Result<UserProducts, ApiError> {
    match projection.user_products(user_id).await {
        Ok(Some(answer)) => Ok(answer),
        Ok(None) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("unknown user {user_id}"),
        )),
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "projection read failed");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "projection read failed",
            ))
        }
    }
}

/// `POST /users/{id}/orders` body.
#[derive(Debug, Deserialize)]
struct NewOrder {
    items: Vec<OrderItem>,
}

/// The created order.
#[derive(Debug, Serialize)]
struct Created {
    mode: &'static str,
    order: scenario_common::model::Order,
}

/// `POST /users/{id}/orders`: `order.create` over the bus, in both modes.
async fn create_order(
    State(state): State<AppState>,
    Extension(CorrelationId(conversation)): Extension<CorrelationId>,
    Path(raw): Path<String>,
    body: Bytes,
) -> Response {
    let timings = Timings::default();
    let outcome = async {
        let user_id = parse_user_id(&raw)?;
        let new: NewOrder = serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid",
                format!(
                    "body must be {{\"items\": [{{\"product_id\": N, \"quantity\": N}}]}}: {e}"
                ),
            )
        })?;
        let command = CreateOrder {
            user_id,
            items: new.items,
        };
        tracing::info!(user_id, "asking order-service to create an order");
        let reply: OrderReply = timings
            .time(
                "create",
                topics::ORDER_CREATE,
                ask(
                    &state.client,
                    topics::ORDER_CREATE,
                    &command,
                    &conversation,
                    state.timeouts.create,
                ),
            )
            .await
            .map_err(|e| ApiError::from_ask(e, services::ORDER))?;
        Ok(Created {
            mode: state.mode.as_str(),
            order: reply.order,
        })
    }
    .await;
    respond(state.mode, StatusCode::CREATED, outcome, &timings)
}

/// `GET /status`: the mode, and in projection mode how far the read model is.
async fn status(State(state): State<AppState>) -> Response {
    let timings = Timings::default();
    let outcome = match &state.projection {
        None => Ok(json!({"mode": state.mode.as_str()})),
        Some(projection) => match projection.status(&state.client).await {
            Ok(status) => Ok(serde_json::to_value(status).expect("status serializes")),
            Err(error) => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("{error:#}"),
            )),
        },
    };
    respond(state.mode, StatusCode::OK, outcome, &timings)
}

/// `GET /health`: up.
async fn health(State(state): State<AppState>) -> Response {
    Json(json!({"mode": state.mode.as_str(), "status": "ok"})).into_response()
}

async fn no_route(State(state): State<AppState>) -> Response {
    let timings = Timings::default();
    let error = ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route: GET /users/{id}/products, POST /users/{id}/orders, GET /status",
    );
    respond::<()>(state.mode, StatusCode::NOT_FOUND, Err(error), &timings)
}
