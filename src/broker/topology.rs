//! Who publishes to, subscribes to, and answers whom: the web of event dependencies, recorded as
//! the bus sees it so it can be shown (`eventbus topology`) instead of reverse-engineered from
//! code. Updated on the publish path, so lookups take borrowed keys and allocate only for a
//! pair never seen before.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::SystemTime;

use crate::topic::{Pattern, Topic};

/// Use of one edge: how many events went along it, and when last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeUse {
    pub events: u64,
    pub last_seen: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct SubscriptionKey {
    pattern: String,
    subscriber: String,
    group: String,
}

#[derive(Debug, Clone, Copy)]
struct SubscriptionUse {
    active: u32,
    last_seen: SystemTime,
}

/// Edges by source, then target: bumped for every published event, so hashbrown (foldhash)
/// with borrowed-key lookups rather than SipHash on owned keys.
type EdgeMap = hashbrown::HashMap<String, hashbrown::HashMap<String, EdgeUse>>;

/// The recorded graph.
#[derive(Debug, Default)]
pub struct Topology {
    /// source -> topic family -> use.
    publishes: EdgeMap,
    /// replier -> asker -> use.
    replies: EdgeMap,
    subscriptions: HashMap<SubscriptionKey, SubscriptionUse>,
}

impl Topology {
    /// `source` published an event to `topic`.
    pub fn record_publish(&mut self, source: &str, topic: &Topic, now: SystemTime) {
        bump(&mut self.publishes, source, topic.family(), now);
    }

    /// `replier` answered a query that `asker` made through the bus.
    pub fn record_reply(&mut self, replier: &str, asker: &str, now: SystemTime) {
        bump(&mut self.replies, replier, asker, now);
    }

    /// A subscription started.
    pub fn subscription_started(
        &mut self,
        pattern: &Pattern,
        subscriber: &str,
        group: &str,
        now: SystemTime,
    ) {
        let entry = self
            .subscriptions
            .entry(SubscriptionKey {
                pattern: pattern.as_str().to_owned(),
                subscriber: subscriber.to_owned(),
                group: group.to_owned(),
            })
            .or_insert(SubscriptionUse {
                active: 0,
                last_seen: now,
            });
        entry.active += 1;
        entry.last_seen = now;
    }

    /// A subscription ended. The edge stays, with no active subscription, so the graph shows
    /// who depended on what even after a service went away.
    pub fn subscription_ended(&mut self, pattern: &Pattern, subscriber: &str, group: &str) {
        let key = SubscriptionKey {
            pattern: pattern.as_str().to_owned(),
            subscriber: subscriber.to_owned(),
            group: group.to_owned(),
        };
        if let Some(entry) = self.subscriptions.get_mut(&key) {
            entry.active = entry.active.saturating_sub(1);
        }
    }

    /// Literal (wildcard-free) patterns with a live subscription: topics someone waits on.
    pub fn live_literal_patterns(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .subscriptions
            .iter()
            .filter(|(key, used)| {
                used.active > 0
                    && !key.pattern.contains(['*', '>'])
                    && !key.pattern.starts_with("_bus.inbox.")
            })
            .map(|(key, _)| key.pattern.clone())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// The graph as nodes and edges, sorted so output is stable.
    pub fn snapshot(&self) -> TopologySnapshot {
        let mut nodes = BTreeMap::new();
        let mut edges = Vec::new();
        let service = |nodes: &mut BTreeMap<String, Node>, name: &str| {
            let id = format!("service:{name}");
            nodes.entry(id.clone()).or_insert_with(|| Node {
                id: id.clone(),
                kind: NodeKind::Service,
                name: name.to_owned(),
            });
            id
        };
        let topic = |nodes: &mut BTreeMap<String, Node>, name: &str| {
            let id = format!("topic:{name}");
            nodes.entry(id.clone()).or_insert_with(|| Node {
                id: id.clone(),
                kind: NodeKind::Topic,
                name: name.to_owned(),
            });
            id
        };
        let mut published_topics = HashSet::new();
        for (source, topics) in &self.publishes {
            for (family, edge_use) in topics {
                published_topics.insert(family.as_str());
                edges.push(Edge {
                    from: service(&mut nodes, source),
                    to: topic(&mut nodes, family),
                    kind: EdgeKind::Publishes,
                    events: edge_use.events,
                    group: String::new(),
                    active_subscriptions: 0,
                    last_seen: edge_use.last_seen,
                });
            }
        }
        for (replier, askers) in &self.replies {
            for (asker, edge_use) in askers {
                edges.push(Edge {
                    from: service(&mut nodes, replier),
                    to: service(&mut nodes, asker),
                    kind: EdgeKind::Replies,
                    events: edge_use.events,
                    group: String::new(),
                    active_subscriptions: 0,
                    last_seen: edge_use.last_seen,
                });
            }
        }
        let mut wildcard_patterns = HashSet::new();
        for (key, subscription) in &self.subscriptions {
            if let Ok(pattern) = Pattern::parse(&key.pattern) {
                if !pattern.is_literal() {
                    wildcard_patterns.insert(pattern);
                }
            }
            edges.push(Edge {
                from: topic(&mut nodes, &key.pattern),
                to: service(&mut nodes, &key.subscriber),
                kind: EdgeKind::Subscribes,
                events: 0,
                group: key.group.clone(),
                active_subscriptions: subscription.active,
                last_seen: subscription.last_seen,
            });
        }
        for pattern in &wildcard_patterns {
            for name in &published_topics {
                // Inboxes are private to one query each; no pattern is meant to catch them.
                let Ok(published) = Topic::parse(name) else {
                    continue;
                };
                if pattern.matches(&published) {
                    edges.push(Edge {
                        from: topic(&mut nodes, name),
                        to: topic(&mut nodes, pattern.as_str()),
                        kind: EdgeKind::Matches,
                        events: 0,
                        group: String::new(),
                        active_subscriptions: 0,
                        last_seen: SystemTime::UNIX_EPOCH,
                    });
                }
            }
        }
        edges.sort_by(|a, b| {
            (a.kind, &a.from, &a.to, &a.group).cmp(&(b.kind, &b.from, &b.to, &b.group))
        });
        TopologySnapshot {
            nodes: nodes.into_values().collect(),
            edges,
        }
    }
}

fn bump(map: &mut EdgeMap, from: &str, to: &str, now: SystemTime) {
    let targets = map.entry_ref(from).or_default();
    match targets.get_mut(to) {
        Some(edge) => {
            edge.events += 1;
            edge.last_seen = now;
        }
        None => {
            targets.insert(
                to.to_owned(),
                EdgeUse {
                    events: 1,
                    last_seen: now,
                },
            );
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum NodeKind {
    Service,
    Topic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum EdgeKind {
    Publishes,
    Subscribes,
    Replies,
    Matches,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub id: String,
    pub kind: NodeKind,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    pub from: String,
    pub to: String,
    pub kind: EdgeKind,
    pub events: u64,
    pub group: String,
    pub active_subscriptions: u32,
    pub last_seen: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopologySnapshot {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_publishes_replies_subscriptions_and_matches() {
        let mut topology = Topology::default();
        let now = SystemTime::now();
        let query = Topic::parse("user.query").unwrap();
        topology.record_publish("query-service", &query, now);
        topology.record_publish("query-service", &query, now);
        topology.record_reply("user-service", "query-service", now);
        let pattern = Pattern::parse("user.*").unwrap();
        topology.subscription_started(&pattern, "user-service", "user-service", now);
        topology.subscription_started(&pattern, "user-service", "user-service", now);
        topology.subscription_ended(&pattern, "user-service", "user-service");

        let snapshot = topology.snapshot();
        let kinds: Vec<_> = snapshot
            .edges
            .iter()
            .map(|e| (e.kind, e.from.as_str(), e.to.as_str()))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (
                    EdgeKind::Publishes,
                    "service:query-service",
                    "topic:user.query"
                ),
                (EdgeKind::Subscribes, "topic:user.*", "service:user-service"),
                (
                    EdgeKind::Replies,
                    "service:user-service",
                    "service:query-service"
                ),
                (EdgeKind::Matches, "topic:user.query", "topic:user.*"),
            ]
        );
        assert_eq!(snapshot.edges[0].events, 2);
        assert_eq!(snapshot.edges[1].active_subscriptions, 1);
        assert_eq!(snapshot.nodes.len(), 4);
    }

    #[test]
    fn inboxes_fold_into_one_topic_node() {
        let mut topology = Topology::default();
        let now = SystemTime::now();
        topology.record_publish("a", &Topic::new_inbox(), now);
        topology.record_publish("a", &Topic::new_inbox(), now);
        let snapshot = topology.snapshot();
        assert_eq!(snapshot.edges.len(), 1);
        assert_eq!(snapshot.edges[0].to, "topic:_bus.inbox.*");
        assert_eq!(snapshot.edges[0].events, 2);
    }
}
