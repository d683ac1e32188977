//! `GET /api/v1/overview`: one JSON document with what the dashboard's graph and tables show,
//! and the error shape every dashboard endpoint answers with.
//!
//! Counts are totals since the bus (or the entry) started; the page turns them into rates by
//! the difference between two polls, so the bus keeps no rate windows for it.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::DashboardState;
use crate::broker::groups::{GroupAckMode, GroupSnapshot};
use crate::broker::topology::{EdgeKind, NodeKind, TopologySnapshot};
use crate::broker::TopicSummary;

/// Topics listed in one overview, at most (sorted by name; `topics_truncated` says when more
/// exist). A page for people: past this, `eventbus topics` pages through them all.
pub const OVERVIEW_TOPICS: usize = 500;
/// Edges of the graph in one overview, at most.
pub const OVERVIEW_EDGES: usize = 1000;
/// About the most bytes of names the graph of one overview holds.
pub const OVERVIEW_GRAPH_BYTES: usize = 1 << 20;

/// An error answer: `{"error": "<field or resource>: <rule>"}` with its HTTP status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    /// 400 for a query parameter that breaks a rule; `field` names it.
    pub fn invalid(field: &str, rule: impl std::fmt::Display) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!("{field}: {rule}"),
        }
    }

    /// 400 for a query string that does not parse (a number that is not one, a repeated
    /// parameter), with axum's explanation.
    pub fn query(rejection: axum::extract::rejection::QueryRejection) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!("query string: {}", rejection.body_text()),
        }
    }

    /// 403 for the event views on a bus with authentication (see the module docs of
    /// [`super`]).
    pub fn event_data_closed() -> ApiError {
        ApiError {
            status: StatusCode::FORBIDDEN,
            message: "event contents are shown only on a bus without authentication: \
                      the admin listener cannot check a caller's permissions"
                .to_owned(),
        }
    }

    /// 500 for a store that could not be read.
    pub fn storage(error: impl std::fmt::Display) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("reading the log: {error}"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// Milliseconds since the Unix epoch (fractional: microseconds kept), as JavaScript's `Date`
/// takes them; 0 for a time before the epoch.
pub fn epoch_ms(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0.0, |since| since.as_secs_f64() * 1000.0)
}

/// The overview document.
#[derive(Debug, Serialize)]
pub struct Overview {
    pub node: NodeInfo,
    pub topics: Vec<TopicRow>,
    /// More topics exist than [`OVERVIEW_TOPICS`].
    pub topics_truncated: bool,
    pub groups: Vec<GroupRow>,
    pub graph: Graph,
    pub queries: QueryCounts,
    /// Subscriptions the bus ended for not keeping up, since start.
    pub slow_consumers_ended: u64,
}

/// The node answering.
#[derive(Debug, Serialize)]
pub struct NodeInfo {
    pub version: &'static str,
    /// `memory`, `file` or `jetstream`.
    pub storage: &'static str,
    pub log_id: String,
    pub head_sequence: u64,
    pub oldest_sequence: Option<u64>,
    pub uptime_seconds: u64,
    pub connections: u64,
    pub subscriptions: u64,
    /// Whether the tail and the conversation view may show event contents.
    pub event_data: bool,
    /// When this document was made, ms since the epoch (the page's clock for rates).
    pub now_ms: f64,
}

/// One topic, as `ListTopics` reports it.
#[derive(Debug, Serialize)]
pub struct TopicRow {
    pub name: String,
    pub events_published: u64,
    pub events_held: u64,
    pub last_sequence: u64,
    pub subscribers: u32,
    pub groups: Vec<String>,
    pub last_publish_ms: Option<f64>,
}

/// One consumer group, as `ListGroups` reports it.
#[derive(Debug, Serialize)]
pub struct GroupRow {
    pub name: String,
    pub pattern: String,
    /// `auto` or `manual`.
    pub ack_mode: &'static str,
    pub members: u32,
    pub cursor: u64,
    pub pending: u64,
    pub in_flight: u64,
    pub redelivered: u64,
    pub dead_lettered: u64,
    pub parked: bool,
    pub dead_letter_topic: String,
}

/// The dependency graph, as `GetTopology` reports it.
#[derive(Debug, Serialize)]
pub struct Graph {
    pub nodes: Vec<GraphNode>,
    pub edges: Vec<GraphEdge>,
    /// Edges were left out to stay within [`OVERVIEW_EDGES`] or [`OVERVIEW_GRAPH_BYTES`].
    pub truncated: bool,
}

/// A service or a topic (pattern) of the graph.
#[derive(Debug, Serialize)]
pub struct GraphNode {
    /// `service:<name>` or `topic:<pattern>`.
    pub id: String,
    /// `service` or `topic`.
    pub kind: &'static str,
    pub name: String,
}

/// An edge of the graph.
#[derive(Debug, Serialize)]
pub struct GraphEdge {
    pub from: String,
    pub to: String,
    /// `publishes`, `subscribes`, `replies` or `matches`.
    pub kind: &'static str,
    /// Events along it so far (publishes and replies).
    pub events: u64,
    pub group: String,
    pub active_subscriptions: u32,
}

/// Queries by how they ended, since start.
#[derive(Debug, Serialize)]
pub struct QueryCounts {
    pub answered: u64,
    pub no_responders: u64,
    pub timeout: u64,
    pub error: u64,
}

pub(crate) fn topic_row(topic: TopicSummary) -> TopicRow {
    TopicRow {
        name: topic.name,
        events_published: topic.events_published,
        events_held: topic.events_held,
        last_sequence: topic.last_sequence,
        subscribers: topic.subscriber_count,
        groups: topic.groups,
        last_publish_ms: topic.last_publish_time.map(epoch_ms),
    }
}

pub(crate) fn group_row(group: GroupSnapshot) -> GroupRow {
    GroupRow {
        name: group.name,
        pattern: group.pattern,
        ack_mode: match group.ack_mode {
            GroupAckMode::Auto => "auto",
            GroupAckMode::Manual => "manual",
        },
        members: group.members,
        cursor: group.cursor,
        pending: group.pending,
        in_flight: group.in_flight,
        redelivered: group.redelivered,
        dead_lettered: group.dead_lettered,
        parked: group.parked,
        dead_letter_topic: group.dead_letter_topic,
    }
}

pub(crate) fn graph(snapshot: TopologySnapshot) -> Graph {
    Graph {
        nodes: snapshot
            .nodes
            .into_iter()
            .map(|node| GraphNode {
                id: node.id,
                kind: match node.kind {
                    NodeKind::Service => "service",
                    NodeKind::Topic => "topic",
                },
                name: node.name,
            })
            .collect(),
        edges: snapshot
            .edges
            .into_iter()
            .map(|edge| GraphEdge {
                from: edge.from,
                to: edge.to,
                kind: match edge.kind {
                    EdgeKind::Publishes => "publishes",
                    EdgeKind::Subscribes => "subscribes",
                    EdgeKind::Replies => "replies",
                    EdgeKind::Matches => "matches",
                },
                events: edge.events,
                group: edge.group,
                active_subscriptions: edge.active_subscriptions,
            })
            .collect(),
        truncated: snapshot.truncated,
    }
}

/// `GET /api/v1/overview`.
pub async fn overview(State(state): State<DashboardState>) -> Result<Json<Overview>, ApiError> {
    let broker = state.broker.clone();
    // On a cluster, the other nodes' subscribers and subscriptions too, as the gRPC calls do.
    let peers = broker.peer_views().await;
    let event_data = state.shows_event_data();
    // The graph and the listing copy tables under the routing lock and build outside it:
    // off the async workers, as GetTopology does.
    let overview = crate::admin::off_workers(move || {
        let page = broker.list_topics(None, None, OVERVIEW_TOPICS, &peers);
        let snapshot = broker.topology(OVERVIEW_EDGES, OVERVIEW_GRAPH_BYTES, &peers);
        let server = broker.server_snapshot();
        let metrics = broker.metrics();
        let [answered, no_responders, timeout, error] = metrics.query_outcomes();
        Overview {
            node: NodeInfo {
                version: env!("CARGO_PKG_VERSION"),
                storage: server.storage,
                log_id: server.log_id,
                head_sequence: server.head_sequence,
                oldest_sequence: server.oldest_sequence,
                uptime_seconds: server.uptime.as_secs(),
                connections: server.connections,
                subscriptions: server.subscriptions,
                event_data,
                now_ms: epoch_ms(SystemTime::now()),
            },
            topics_truncated: page.next_after.is_some(),
            topics: page.topics.into_iter().map(topic_row).collect(),
            groups: broker.list_groups().into_iter().map(group_row).collect(),
            graph: graph(snapshot),
            queries: QueryCounts {
                answered,
                no_responders,
                timeout,
                error,
            },
            slow_consumers_ended: metrics.slow_consumers_ended(),
        }
    })
    .await;
    Ok(Json(overview))
}
