//! What the client commands print and how they read their arguments, as pure functions: one
//! line per event (the JSON form is in `cloudevent`), the topic table, the topology as text, DOT or Mermaid.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::SystemTime;

use base64::Engine as _;

use crate::pb;
use crate::sdk::Start;

/// `KEY=VALUE` of `--attr`.
pub fn parse_attr(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// `--from`: `earliest`, `latest`, a sequence (resume after it), or an RFC 3339 time.
pub fn parse_start(text: &str) -> Result<Start, String> {
    match text {
        "earliest" => Ok(Start::Earliest),
        "latest" => Ok(Start::Latest),
        _ if text.bytes().all(|b| b.is_ascii_digit()) => text
            .parse()
            .map(Start::AfterSequence)
            .map_err(|e| format!("bad sequence {text:?}: {e}")),
        _ => parse_time(text).map(Start::FromTime).map_err(|e| {
            format!(
                "expected earliest, latest, a sequence or an RFC 3339 time \
                 (2024-05-01T12:00:00Z), got {text:?}: {e}"
            )
        }),
    }
}

/// An RFC 3339 time with its offset (`2024-05-01T12:00:00Z`, `...T14:00:00+02:00`):
/// [`crate::timefmt::parse_time`].
///
/// # Errors
/// As [`crate::timefmt::parse_time`].
pub fn parse_time(text: &str) -> Result<SystemTime, String> {
    crate::timefmt::parse_time(text)
}

/// A protobuf timestamp as RFC 3339, empty when unset or out of range.
pub fn time_text(time: Option<&prost_types::Timestamp>) -> String {
    time.and_then(|time| SystemTime::try_from(*time).ok())
        .and_then(crate::timefmt::format_time)
        .unwrap_or_default()
}

/// Data as text when it is UTF-8 (control characters escaped so it stays one line), else its
/// length and base64.
pub fn data_text(data: &[u8]) -> String {
    match std::str::from_utf8(data) {
        Ok(text) => text
            .chars()
            .flat_map(|c| {
                let escaped: Vec<char> = if c.is_control() {
                    c.escape_default().collect()
                } else {
                    vec![c]
                };
                escaped
            })
            .collect(),
        Err(_) => format!(
            "<{} bytes, base64 {}>",
            data.len(),
            base64::engine::general_purpose::STANDARD.encode(data)
        ),
    }
}

/// One line per event: `#SEQUENCE TOPIC: DATA`.
pub fn event_line(event: &pb::Event) -> String {
    format!(
        "#{} {}: {}",
        event.sequence,
        event.topic,
        data_text(&event.data)
    )
}

/// `eventbus topics`: a table, one row per topic.
pub fn topics_table(topics: &[pb::TopicInfo]) -> String {
    if topics.is_empty() {
        return "no topics yet\n".to_string();
    }
    let header = [
        "TOPIC",
        "LAST SEQ",
        "HELD",
        "PUBLISHED",
        "SUBSCRIBERS",
        "GROUPS",
        "LAST PUBLISH",
    ];
    let rows: Vec<[String; 7]> = topics
        .iter()
        .map(|topic| {
            [
                topic.name.clone(),
                topic.last_sequence.to_string(),
                topic.events_held.to_string(),
                topic.events_published.to_string(),
                topic.subscriber_count.to_string(),
                if topic.groups.is_empty() {
                    "-".to_string()
                } else {
                    topic.groups.join(",")
                },
                time_text(topic.last_publish_time.as_ref()),
            ]
        })
        .collect();
    aligned_table(header, &rows, |i| (1..=4).contains(&i))
}

/// `rows` under `header` in columns as wide as their widest cell, two spaces apart; columns
/// for which `right(i)` holds (numbers) right-aligned, the others left-aligned.
pub fn aligned_table<const N: usize>(
    header: [&str; N],
    rows: &[[String; N]],
    right: impl Fn(usize) -> bool,
) -> String {
    let mut widths = header.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if right(i) {
                let _ = write!(text, "{cell:>width$}  ");
            } else {
                let _ = write!(text, "{cell:<width$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in rows {
        line(&row.each_ref().map(String::as_str));
    }
    out
}

/// How `eventbus topology` prints the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TopologyFormat {
    /// Lists of services, topics and edges.
    Text,
    /// Graphviz DOT (`| dot -Tsvg`).
    Dot,
    /// A Mermaid flowchart (renders in GitHub markdown).
    Mermaid,
    /// One JSON document: nodes, edges, whether it was cut (same as `--json`).
    Json,
}

/// The topology in the given format.
pub fn topology(response: &pb::GetTopologyResponse, format: TopologyFormat) -> String {
    let graph = Graph::new(response);
    match format {
        TopologyFormat::Text => graph.text(),
        TopologyFormat::Dot => graph.dot(),
        TopologyFormat::Mermaid => graph.mermaid(),
        TopologyFormat::Json => format!("{}\n", super::json::topology(response)),
    }
}

/// The topology with every node an edge mentions, and edges in a stable order.
struct Graph<'a> {
    /// By id: is it a service, and its name.
    nodes: BTreeMap<String, (bool, String)>,
    edges: Vec<&'a pb::TopologyEdge>,
}

impl<'a> Graph<'a> {
    fn new(graph: &'a pb::GetTopologyResponse) -> Self {
        let mut nodes = BTreeMap::new();
        for node in &graph.nodes {
            let service = node.kind == pb::NodeKind::Service as i32;
            nodes.insert(node.id.clone(), (service, node.name.clone()));
        }
        for edge in &graph.edges {
            for id in [&edge.from, &edge.to] {
                nodes
                    .entry(id.clone())
                    .or_insert_with(|| match id.split_once(':') {
                        Some(("service", name)) => (true, name.to_string()),
                        Some((_, name)) => (false, name.to_string()),
                        None => (false, id.clone()),
                    });
            }
        }
        let mut edges: Vec<_> = graph.edges.iter().collect();
        edges.sort_by(|a, b| (a.kind, &a.from, &a.to).cmp(&(b.kind, &b.from, &b.to)));
        Graph { nodes, edges }
    }

    fn name<'s>(&'s self, id: &'s str) -> &'s str {
        self.nodes.get(id).map_or(id, |(_, name)| name.as_str())
    }

    /// `publishes (12)`, `subscribes (group g, 2 live)`, ...
    fn label(edge: &pb::TopologyEdge) -> String {
        let kind = match pb::EdgeKind::try_from(edge.kind) {
            Ok(pb::EdgeKind::Publishes) => "publishes",
            Ok(pb::EdgeKind::Subscribes) => "subscribes",
            Ok(pb::EdgeKind::Replies) => "replies",
            Ok(pb::EdgeKind::Matches) => "matches",
            Ok(pb::EdgeKind::Unspecified) | Err(_) => "uses",
        };
        let mut details = Vec::new();
        if !edge.group.is_empty() {
            details.push(format!("group {}", edge.group));
        }
        if edge.kind == pb::EdgeKind::Subscribes as i32 {
            details.push(format!("{} live", edge.active_subscriptions));
        }
        if edge.events > 0 {
            details.push(format!("{} events", edge.events));
        }
        if details.is_empty() {
            kind.to_string()
        } else {
            format!("{kind} ({})", details.join(", "))
        }
    }

    fn text(&self) -> String {
        let mut out = String::new();
        for (title, want_service) in [("services", true), ("topics", false)] {
            let names: Vec<_> = self
                .nodes
                .values()
                .filter(|(service, _)| *service == want_service)
                .map(|(_, name)| name.as_str())
                .collect();
            let _ = writeln!(out, "{title} ({}):", names.len());
            for name in names {
                let _ = writeln!(out, "  {name}");
            }
        }
        let _ = writeln!(out, "edges ({}):", self.edges.len());
        for edge in &self.edges {
            let _ = writeln!(
                out,
                "  {} -> {}  {}",
                self.name(&edge.from),
                self.name(&edge.to),
                Self::label(edge)
            );
        }
        out
    }

    fn dot(&self) -> String {
        let quote = |text: &str| format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""));
        let mut out = String::from("digraph eventbus {\n  rankdir=LR;\n");
        for (id, (service, name)) in &self.nodes {
            let shape = if *service { "box" } else { "ellipse" };
            let _ = writeln!(
                out,
                "  {} [label={}, shape={shape}];",
                quote(id),
                quote(name)
            );
        }
        for edge in &self.edges {
            let style = match pb::EdgeKind::try_from(edge.kind) {
                Ok(pb::EdgeKind::Subscribes) => ", style=dashed",
                Ok(pb::EdgeKind::Replies) => ", style=bold",
                Ok(pb::EdgeKind::Matches) => ", style=dotted",
                _ => "",
            };
            let _ = writeln!(
                out,
                "  {} -> {} [label={}{style}];",
                quote(&edge.from),
                quote(&edge.to),
                quote(&Self::label(edge))
            );
        }
        out.push_str("}\n");
        out
    }

    fn mermaid(&self) -> String {
        // Mermaid ids may not hold dots or colons: number the nodes instead.
        let ids: BTreeMap<&str, String> = self
            .nodes
            .keys()
            .enumerate()
            .map(|(i, id)| (id.as_str(), format!("n{i}")))
            .collect();
        let quote = |text: &str| format!("\"{}\"", text.replace('"', "#quot;"));
        let mut out = String::from("flowchart LR\n");
        for (id, (service, name)) in &self.nodes {
            let (open, close) = if *service { ("[", "]") } else { ("([", "])") };
            let _ = writeln!(out, "  {}{open}{}{close}", ids[id.as_str()], quote(name));
        }
        for edge in &self.edges {
            let arrow = match pb::EdgeKind::try_from(edge.kind) {
                Ok(pb::EdgeKind::Subscribes) | Ok(pb::EdgeKind::Matches) => "-.->",
                Ok(pb::EdgeKind::Replies) => "==>",
                _ => "-->",
            };
            let _ = writeln!(
                out,
                "  {} {arrow}|{}| {}",
                ids[edge.from.as_str()],
                quote(&Self::label(edge)),
                ids[edge.to.as_str()]
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn attrs_need_a_key_and_an_equals_sign() {
        assert_eq!(parse_attr("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_attr("a="), Ok(("a".into(), "".into())));
        assert!(parse_attr("=b").is_err());
        assert!(parse_attr("ab").is_err());
    }

    #[test]
    fn start_positions() {
        assert_eq!(parse_start("earliest"), Ok(Start::Earliest));
        assert_eq!(parse_start("latest"), Ok(Start::Latest));
        assert_eq!(parse_start("42"), Ok(Start::AfterSequence(42)));
        let utc = parse_start("2024-05-01T12:00:00Z").unwrap();
        let shifted = parse_start("2024-05-01T14:00:00+02:00").unwrap();
        assert_eq!(utc, shifted);
        assert_eq!(
            parse_start("2024-05-01T07:30:00-04:30").unwrap(),
            utc,
            "negative offsets move forward"
        );
        assert!(parse_start("yesterday").is_err());
    }

    #[test]
    fn lines_keep_text_on_one_line_and_show_binary_as_base64() {
        let mut event = pb::Event {
            topic: "a.b".into(),
            sequence: 7,
            data: Bytes::from_static(b"hi\nthere"),
            ..Default::default()
        };
        assert_eq!(event_line(&event), "#7 a.b: hi\\nthere");
        event.data = Bytes::from_static(&[0xff, 0x00, 0x01]);
        assert_eq!(event_line(&event), "#7 a.b: <3 bytes, base64 /wAB>");
    }

    #[test]
    fn topics_table_aligns_columns() {
        let topics = vec![
            pb::TopicInfo {
                name: "orders.created".into(),
                last_sequence: 120,
                events_held: 100,
                events_published: 120,
                subscriber_count: 2,
                groups: vec!["billing".into(), "mail".into()],
                last_publish_time: None,
            },
            pb::TopicInfo {
                name: "a".into(),
                last_sequence: 3,
                ..Default::default()
            },
        ];
        let table = topics_table(&topics);
        let lines: Vec<_> = table.lines().collect();
        assert_eq!(
            lines[0],
            "TOPIC           LAST SEQ  HELD  PUBLISHED  SUBSCRIBERS  GROUPS        LAST PUBLISH"
        );
        assert_eq!(
            lines[1],
            "orders.created       120   100        120            2  billing,mail"
        );
        assert_eq!(
            lines[2],
            "a                      3     0          0            0  -"
        );
        assert_eq!(topics_table(&[]), "no topics yet\n");
    }

    fn sample_graph() -> pb::GetTopologyResponse {
        let node = |id: &str, kind: pb::NodeKind, name: &str| pb::TopologyNode {
            id: id.into(),
            kind: kind as i32,
            name: name.into(),
        };
        let edge = |from: &str, to: &str, kind: pb::EdgeKind, events: u64| pb::TopologyEdge {
            from: from.into(),
            to: to.into(),
            kind: kind as i32,
            events,
            ..Default::default()
        };
        pb::GetTopologyResponse {
            nodes: vec![
                node("service:orders", pb::NodeKind::Service, "orders"),
                node(
                    "topic:orders.created",
                    pb::NodeKind::Topic,
                    "orders.created",
                ),
                node("service:billing", pb::NodeKind::Service, "billing"),
            ],
            edges: vec![
                pb::TopologyEdge {
                    group: "billing".into(),
                    active_subscriptions: 2,
                    ..edge(
                        "topic:orders.created",
                        "service:billing",
                        pb::EdgeKind::Subscribes,
                        0,
                    )
                },
                edge(
                    "service:orders",
                    "topic:orders.created",
                    pb::EdgeKind::Publishes,
                    12,
                ),
                // A node known only from an edge.
                edge(
                    "topic:orders.created",
                    "topic:orders.>",
                    pb::EdgeKind::Matches,
                    0,
                ),
            ],
            ..Default::default()
        }
    }

    #[test]
    fn topology_as_text() {
        assert_eq!(
            topology(&sample_graph(), TopologyFormat::Text),
            "services (2):\n  billing\n  orders\ntopics (2):\n  orders.>\n  orders.created\n\
             edges (3):\n  orders -> orders.created  publishes (12 events)\n  \
             orders.created -> billing  subscribes (group billing, 2 live)\n  \
             orders.created -> orders.>  matches\n"
        );
    }

    #[test]
    fn topology_as_dot() {
        let dot = topology(&sample_graph(), TopologyFormat::Dot);
        assert!(dot.starts_with("digraph eventbus {\n  rankdir=LR;\n"));
        assert!(dot.contains("  \"service:orders\" [label=\"orders\", shape=box];\n"));
        assert!(dot.contains("  \"topic:orders.>\" [label=\"orders.>\", shape=ellipse];\n"));
        assert!(dot.contains(
            "  \"topic:orders.created\" -> \"service:billing\" \
             [label=\"subscribes (group billing, 2 live)\", style=dashed];\n"
        ));
        assert!(dot.ends_with("}\n"));
    }

    #[test]
    fn topology_as_mermaid() {
        let mermaid = topology(&sample_graph(), TopologyFormat::Mermaid);
        // Nodes are numbered in id order: service:billing, service:orders, topic:orders.>,
        // topic:orders.created.
        assert_eq!(
            mermaid,
            "flowchart LR\n  n0[\"billing\"]\n  n1[\"orders\"]\n  n2([\"orders.>\"])\n  \
             n3([\"orders.created\"])\n  n1 -->|\"publishes (12 events)\"| n3\n  \
             n3 -.->|\"subscribes (group billing, 2 live)\"| n0\n  n3 -.->|\"matches\"| n2\n"
        );
    }
}
