//! What the read verbs print with `--json`: one JSON document each, field names as in the proto
//! (snake_case), enum values as lower-case words, times as RFC 3339 strings, unset times left
//! out. Scripts read these instead of scraping the tables, so the shapes are tested here.

use serde_json::{json, Map, Value};

use super::format::time_text;
use crate::pb;

/// Puts `time` under `key` when it is set.
fn put_time(object: &mut Map<String, Value>, key: &str, time: Option<&prost_types::Timestamp>) {
    let text = time_text(time);
    if !text.is_empty() {
        object.insert(key.to_owned(), Value::String(text));
    }
}

/// `eventbus topics --json`: an array of topics, sorted by name as the bus lists them.
pub fn topics(topics: &[pb::TopicInfo]) -> Value {
    Value::Array(
        topics
            .iter()
            .map(|topic| {
                let mut object = json!({
                    "name": topic.name,
                    "last_sequence": topic.last_sequence,
                    "events_held": topic.events_held,
                    "events_published": topic.events_published,
                    "subscriber_count": topic.subscriber_count,
                    "groups": topic.groups,
                });
                let map = object.as_object_mut().expect("an object");
                put_time(map, "last_publish_time", topic.last_publish_time.as_ref());
                object
            })
            .collect(),
    )
}

fn node_kind(kind: i32) -> &'static str {
    match pb::NodeKind::try_from(kind) {
        Ok(pb::NodeKind::Service) => "service",
        Ok(pb::NodeKind::Topic) => "topic",
        Ok(pb::NodeKind::Unspecified) | Err(_) => "unspecified",
    }
}

fn edge_kind(kind: i32) -> &'static str {
    match pb::EdgeKind::try_from(kind) {
        Ok(pb::EdgeKind::Publishes) => "publishes",
        Ok(pb::EdgeKind::Subscribes) => "subscribes",
        Ok(pb::EdgeKind::Replies) => "replies",
        Ok(pb::EdgeKind::Matches) => "matches",
        Ok(pb::EdgeKind::Unspecified) | Err(_) => "unspecified",
    }
}

/// `eventbus topology --json`: `{nodes, edges, truncated, untracked_events}`, as the bus sent
/// them; an edge's `group` is left out when empty.
pub fn topology(graph: &pb::GetTopologyResponse) -> Value {
    let nodes: Vec<Value> = graph
        .nodes
        .iter()
        .map(|node| json!({"id": node.id, "kind": node_kind(node.kind), "name": node.name}))
        .collect();
    let edges: Vec<Value> = graph
        .edges
        .iter()
        .map(|edge| {
            let mut object = json!({
                "from": edge.from,
                "to": edge.to,
                "kind": edge_kind(edge.kind),
                "events": edge.events,
                "active_subscriptions": edge.active_subscriptions,
            });
            let map = object.as_object_mut().expect("an object");
            if !edge.group.is_empty() {
                map.insert("group".to_owned(), Value::String(edge.group.clone()));
            }
            put_time(map, "last_seen", edge.last_seen.as_ref());
            object
        })
        .collect();
    json!({
        "nodes": nodes,
        "edges": edges,
        "truncated": graph.truncated,
        "untracked_events": graph.untracked_events,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_an_array_with_times_when_set() {
        let value = topics(&[
            pb::TopicInfo {
                name: "orders.created".into(),
                last_sequence: 120,
                events_held: 100,
                events_published: 120,
                subscriber_count: 2,
                groups: vec!["billing".into()],
                last_publish_time: Some(prost_types::Timestamp {
                    seconds: 1_714_564_800,
                    nanos: 0,
                }),
            },
            pb::TopicInfo {
                name: "a".into(),
                ..Default::default()
            },
        ]);
        assert_eq!(
            value,
            json!([
                {"name": "orders.created", "last_sequence": 120, "events_held": 100,
                 "events_published": 120, "subscriber_count": 2, "groups": ["billing"],
                 "last_publish_time": "2024-05-01T12:00:00Z"},
                {"name": "a", "last_sequence": 0, "events_held": 0, "events_published": 0,
                 "subscriber_count": 0, "groups": []},
            ])
        );
    }

    #[test]
    fn topology_names_kinds_in_words() {
        let graph = pb::GetTopologyResponse {
            nodes: vec![pb::TopologyNode {
                id: "service:orders".into(),
                kind: pb::NodeKind::Service as i32,
                name: "orders".into(),
            }],
            edges: vec![pb::TopologyEdge {
                from: "service:orders".into(),
                to: "topic:o".into(),
                kind: pb::EdgeKind::Publishes as i32,
                events: 3,
                ..Default::default()
            }],
            truncated: true,
            untracked_events: 4,
        };
        assert_eq!(
            topology(&graph),
            json!({
                "nodes": [{"id": "service:orders", "kind": "service", "name": "orders"}],
                "edges": [{"from": "service:orders", "to": "topic:o", "kind": "publishes",
                           "events": 3, "active_subscriptions": 0}],
                "truncated": true,
                "untracked_events": 4,
            })
        );
    }
}
