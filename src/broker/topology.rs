//! Who publishes to, subscribes to, and answers whom: the web of event dependencies, recorded as
//! the bus sees it so it can be shown (`eventbus topology`) instead of reverse-engineered from
//! code. Updated on the publish path, so lookups take borrowed keys and allocate only for a
//! pair never seen before.
//!
//! # Bounded, aged out, and built outside the lock
//! Sources, topics and subscribers are names clients choose, so the graph is capped: at most
//! `max` edges (publishes and replies together) and `max` subscriptions are tracked, and events
//! along edges past the cap are counted as untracked. An edge unused for `names_idle_after`, and
//! a subscription ended that long ago, is forgotten by [`Topology::sweep_slice`], which works a
//! slice at a time so the routing lock is never held for a time that grows with the graph.
//! [`Topology::raw`] copies the graph's entries (pointers and counts) under the lock;
//! [`RawTopology::build`] does everything else outside it: node ids, MATCHES edges (through a
//! subject tree of the wildcard patterns, not patterns × topics), sorting, and the bounds of
//! one response.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::SystemTime;

use indexmap::IndexMap;

use super::names::SWEEP_SLICE;
use crate::sublist::SubjectTree;
use crate::topic::{Pattern, Topic};

/// Use of one edge: how many events went along it, and when last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeUse {
    pub events: u64,
    pub last_seen: SystemTime,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SubscriptionKey {
    pattern: Arc<str>,
    subscriber: Arc<str>,
    group: Arc<str>,
}

#[derive(Debug, Clone, Copy)]
struct SubscriptionUse {
    active: u32,
    /// When it last started, or, once none is active, when the last one ended.
    last_seen: SystemTime,
}

/// An edge's ends. Hashed as the two strings, so [`EdgeRef`] finds it without allocating.
#[derive(Debug, Clone, PartialEq, Eq)]
struct EdgeKey {
    from: Arc<str>,
    to: Arc<str>,
}

impl Hash for EdgeKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (*self.from).hash(state);
        (*self.to).hash(state);
    }
}

/// A borrowed [`EdgeKey`], for lookups on the publish path.
struct EdgeRef<'a>(&'a str, &'a str);

impl Hash for EdgeRef<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state);
        self.1.hash(state);
    }
}

impl indexmap::Equivalent<EdgeKey> for EdgeRef<'_> {
    fn equivalent(&self, key: &EdgeKey) -> bool {
        *key.from == *self.0 && *key.to == *self.1
    }
}

/// Edges by (source, target): bumped for every published event, so foldhash and borrowed-key
/// lookups rather than SipHash on owned keys.
type EdgeMap = IndexMap<EdgeKey, EdgeUse, hashbrown::DefaultHashBuilder>;

/// The recorded graph.
#[derive(Debug)]
pub struct Topology {
    /// source -> topic family.
    publishes: EdgeMap,
    /// replier -> asker.
    replies: EdgeMap,
    subscriptions: IndexMap<SubscriptionKey, SubscriptionUse, hashbrown::DefaultHashBuilder>,
    /// Edges (publishes and replies together), and separately subscriptions, kept at most.
    max: usize,
    /// Events along edges that were not tracked because the graph was full.
    untracked_events: u64,
    /// Where the sweep goes on: which map (0 publishes, 1 replies, 2 subscriptions), and where.
    sweep_at: (u8, usize),
}

impl Default for Topology {
    fn default() -> Self {
        Topology::new(usize::MAX)
    }
}

impl Topology {
    /// An empty graph that tracks at most `max` edges and `max` subscriptions.
    pub fn new(max: usize) -> Topology {
        Topology {
            publishes: EdgeMap::default(),
            replies: EdgeMap::default(),
            subscriptions: IndexMap::default(),
            max,
            untracked_events: 0,
            sweep_at: (0, 0),
        }
    }

    /// `source` published an event to `topic`.
    pub fn record_publish(&mut self, source: &str, topic: &Topic, now: SystemTime) {
        self.bump(false, source, topic.family(), now);
    }

    /// `replier` answered a query that `asker` made through the bus.
    pub fn record_reply(&mut self, replier: &str, asker: &str, now: SystemTime) {
        self.bump(true, replier, asker, now);
    }

    fn bump(&mut self, reply: bool, from: &str, to: &str, now: SystemTime) {
        let full = self.publishes.len() + self.replies.len() >= self.max;
        let map = if reply {
            &mut self.replies
        } else {
            &mut self.publishes
        };
        match map.get_mut(&EdgeRef(from, to)) {
            Some(edge) => {
                edge.events += 1;
                edge.last_seen = now;
            }
            None if full => self.untracked_events += 1,
            None => {
                map.insert(
                    EdgeKey {
                        from: Arc::from(from),
                        to: Arc::from(to),
                    },
                    EdgeUse {
                        events: 1,
                        last_seen: now,
                    },
                );
            }
        }
    }

    fn subscription_key(pattern: &Pattern, subscriber: &str, group: &str) -> SubscriptionKey {
        SubscriptionKey {
            pattern: Arc::from(pattern.as_str()),
            subscriber: Arc::from(subscriber),
            group: Arc::from(group),
        }
    }

    /// A subscription started. Past the cap it is not drawn (it still works).
    pub fn subscription_started(
        &mut self,
        pattern: &Pattern,
        subscriber: &str,
        group: &str,
        now: SystemTime,
    ) {
        let key = Self::subscription_key(pattern, subscriber, group);
        if self.subscriptions.len() >= self.max && !self.subscriptions.contains_key(&key) {
            return;
        }
        let entry = self.subscriptions.entry(key).or_insert(SubscriptionUse {
            active: 0,
            last_seen: now,
        });
        entry.active += 1;
        entry.last_seen = now;
    }

    /// A subscription ended. The edge stays, with no active subscription, so the graph shows
    /// who depended on what even after a service went away, until it has been idle for
    /// `names_idle_after`.
    pub fn subscription_ended(&mut self, pattern: &Pattern, subscriber: &str, group: &str) {
        let key = Self::subscription_key(pattern, subscriber, group);
        if let Some(entry) = self.subscriptions.get_mut(&key) {
            entry.active = entry.active.saturating_sub(1);
            if entry.active == 0 {
                entry.last_seen = SystemTime::now();
            }
        }
    }

    /// How many edges and subscriptions are tracked.
    pub fn entries(&self) -> usize {
        self.publishes.len() + self.replies.len() + self.subscriptions.len()
    }

    /// Looks at up to [`SWEEP_SLICE`] entries from where the last slice stopped, forgetting edges
    /// last used, and subscriptions last ended, before `idle_before`, counting them in
    /// `forgotten`. Returns whether the sweep went round the whole graph.
    pub fn sweep_slice(&mut self, idle_before: SystemTime, forgotten: &mut usize) -> bool {
        let mut budget = SWEEP_SLICE;
        loop {
            let (map, at) = &mut self.sweep_at;
            let done = match map {
                0 => sweep_map(&mut self.publishes, at, &mut budget, forgotten, |e| {
                    e.last_seen < idle_before
                }),
                1 => sweep_map(&mut self.replies, at, &mut budget, forgotten, |e| {
                    e.last_seen < idle_before
                }),
                _ => sweep_map(&mut self.subscriptions, at, &mut budget, forgotten, |s| {
                    s.active == 0 && s.last_seen < idle_before
                }),
            };
            if !done {
                return false;
            }
            *at = 0;
            if *map == 2 {
                *map = 0;
                return true;
            }
            *map += 1;
        }
    }

    /// Literal (wildcard-free) patterns with a live subscription: topics someone waits on.
    pub fn live_literal_patterns(&self) -> Vec<Arc<str>> {
        self.subscriptions
            .iter()
            .filter(|(key, used)| {
                used.active > 0
                    && !key.pattern.contains(['*', '>'])
                    && !key.pattern.starts_with("_bus.inbox.")
            })
            .map(|(key, _)| key.pattern.clone())
            .collect()
    }

    /// The subscriptions alone, copied as pointers and counts: what a node tells the others of
    /// its clients (`super::peers`).
    pub fn subscriptions(&self) -> Vec<SubscriptionEntry> {
        self.subscriptions
            .iter()
            .map(|(key, used)| {
                (
                    key.pattern.clone(),
                    key.subscriber.clone(),
                    key.group.clone(),
                    used.active,
                    used.last_seen,
                )
            })
            .collect()
    }

    /// The graph's entries, copied as pointers and counts (O(edges) and no string copied), for
    /// [`RawTopology::build`] to turn into a graph outside the routing lock.
    pub fn raw(&self) -> RawTopology {
        let edges = |map: &EdgeMap| {
            map.iter()
                .map(|(key, used)| (key.from.clone(), key.to.clone(), *used))
                .collect()
        };
        RawTopology {
            publishes: edges(&self.publishes),
            replies: edges(&self.replies),
            subscriptions: self
                .subscriptions
                .iter()
                .map(|(key, used)| {
                    (
                        key.pattern.clone(),
                        key.subscriber.clone(),
                        key.group.clone(),
                        *used,
                    )
                })
                .collect(),
            untracked_events: self.untracked_events,
        }
    }

    /// The whole graph as nodes and edges, sorted so output is stable.
    pub fn snapshot(&self) -> TopologySnapshot {
        self.raw().build(usize::MAX, usize::MAX)
    }
}

/// One slice of a sweep over `map` from `at`, removing entries `stale` says are stale. Returns
/// whether it reached the end.
fn sweep_map<K, V>(
    map: &mut IndexMap<K, V, hashbrown::DefaultHashBuilder>,
    at: &mut usize,
    budget: &mut usize,
    forgotten: &mut usize,
    stale: impl Fn(&V) -> bool,
) -> bool {
    while *budget > 0 && *at < map.len() {
        *budget -= 1;
        let (_, value) = map.get_index(*at).expect("within bounds");
        if stale(value) {
            // The last entry moves here: look at this position again.
            map.swap_remove_index(*at);
            *forgotten += 1;
        } else {
            *at += 1;
        }
    }
    if *at < map.len() {
        return false;
    }
    if map.capacity() > 2 * map.len() + 1024 {
        map.shrink_to_fit();
    }
    true
}

/// The graph's entries as [`Topology::raw`] copied them.
#[derive(Debug, Default)]
pub struct RawTopology {
    publishes: Vec<(Arc<str>, Arc<str>, EdgeUse)>,
    replies: Vec<(Arc<str>, Arc<str>, EdgeUse)>,
    /// (pattern, subscriber, group, use).
    subscriptions: Vec<RawSubscription>,
    untracked_events: u64,
}

type RawSubscription = (Arc<str>, Arc<str>, Arc<str>, SubscriptionUse);

/// A subscription as nodes exchange it: (pattern, subscriber, group, active subscriptions,
/// when one last started or ended).
pub type SubscriptionEntry = (Arc<str>, Arc<str>, Arc<str>, u32, SystemTime);

/// Bytes a node or an edge takes in a response beyond its strings: field tags, lengths, numbers
/// and a timestamp, rounded up.
const ENTRY_OVERHEAD_BYTES: usize = 48;

impl RawTopology {
    /// Adds subscriptions held on other nodes of a cluster, as (pattern, subscriber, group,
    /// active subscriptions, last seen). One with the same pattern, subscriber and group as one
    /// held here is the same edge: its active count is added, and the later last-seen kept.
    pub fn add_subscriptions(&mut self, more: impl IntoIterator<Item = SubscriptionEntry>) {
        // (pattern, subscriber, group) -> index in `subscriptions`.
        type Key = (Arc<str>, Arc<str>, Arc<str>);
        let mut at: HashMap<Key, usize> = self
            .subscriptions
            .iter()
            .enumerate()
            .map(|(i, (pattern, subscriber, group, _))| {
                ((pattern.clone(), subscriber.clone(), group.clone()), i)
            })
            .collect();
        for (pattern, subscriber, group, active, last_seen) in more {
            let key = (pattern.clone(), subscriber.clone(), group.clone());
            match at.get(&key) {
                Some(&i) => {
                    let used = &mut self.subscriptions[i].3;
                    used.active += active;
                    used.last_seen = used.last_seen.max(last_seen);
                }
                None => {
                    at.insert(key, self.subscriptions.len());
                    self.subscriptions.push((
                        pattern,
                        subscriber,
                        group,
                        SubscriptionUse { active, last_seen },
                    ));
                }
            }
        }
    }

    /// The graph as nodes and edges, sorted by kind, then ends, then group. At most
    /// `max_edges` edges, and edges and their nodes of at most about `max_bytes` in all: a
    /// graph cut short keeps a prefix of that order (which MATCHES edges it keeps is not
    /// specified) and says so in `truncated`. Nodes are those the kept edges name.
    pub fn build(self, max_edges: usize, max_bytes: usize) -> TopologySnapshot {
        let mut edges = Vec::with_capacity(
            self.publishes.len() + self.replies.len() + self.subscriptions.len(),
        );
        let mut published_topics = HashSet::new();
        for (source, family, used) in &self.publishes {
            published_topics.insert(family.clone());
            edges.push(Edge {
                from: format!("service:{source}"),
                to: format!("topic:{family}"),
                kind: EdgeKind::Publishes,
                events: used.events,
                group: String::new(),
                active_subscriptions: 0,
                last_seen: used.last_seen,
            });
        }
        for (replier, asker, used) in &self.replies {
            edges.push(Edge {
                from: format!("service:{replier}"),
                to: format!("service:{asker}"),
                kind: EdgeKind::Replies,
                events: used.events,
                group: String::new(),
                active_subscriptions: 0,
                last_seen: used.last_seen,
            });
        }
        let mut wildcards = SubjectTree::<Option<Arc<str>>>::new();
        for (pattern, subscriber, group, used) in &self.subscriptions {
            if let Ok(parsed) = Pattern::parse(pattern) {
                if !parsed.is_literal() {
                    *wildcards.entry(&parsed) = Some(pattern.clone());
                }
            }
            edges.push(Edge {
                from: format!("topic:{pattern}"),
                to: format!("service:{subscriber}"),
                kind: EdgeKind::Subscribes,
                events: 0,
                group: group.to_string(),
                active_subscriptions: used.active,
                last_seen: used.last_seen,
            });
        }
        // MATCHES edges sort last: once the others fill the bound, none is needed.
        let mut truncated = edges.len() > max_edges;
        let room = max_edges.saturating_sub(edges.len());
        let mut matches = 0usize;
        'topics: for name in &published_topics {
            // Inboxes are private to one query each; no pattern is meant to catch them.
            let Ok(published) = Topic::parse(name) else {
                continue;
            };
            let mut found = Vec::new();
            wildcards.for_each_match(&published, |pattern| {
                if let Some(pattern) = pattern {
                    found.push(pattern.clone());
                }
            });
            for pattern in found {
                if matches >= room {
                    truncated = true;
                    break 'topics;
                }
                matches += 1;
                edges.push(Edge {
                    from: format!("topic:{name}"),
                    to: format!("topic:{pattern}"),
                    kind: EdgeKind::Matches,
                    events: 0,
                    group: String::new(),
                    active_subscriptions: 0,
                    last_seen: SystemTime::UNIX_EPOCH,
                });
            }
        }
        edges.sort_by(|a, b| {
            (a.kind, &a.from, &a.to, &a.group).cmp(&(b.kind, &b.from, &b.to, &b.group))
        });
        let mut nodes = BTreeMap::new();
        let mut bytes = 0usize;
        let mut kept = 0;
        for edge in &edges {
            if kept == max_edges {
                break;
            }
            let mut cost = edge.from.len() + edge.to.len() + edge.group.len();
            cost += ENTRY_OVERHEAD_BYTES;
            for end in [&edge.from, &edge.to] {
                if !nodes.contains_key(end.as_str()) {
                    cost += 2 * end.len() + ENTRY_OVERHEAD_BYTES;
                }
            }
            if bytes.saturating_add(cost) > max_bytes {
                break;
            }
            bytes += cost;
            kept += 1;
            for end in [&edge.from, &edge.to] {
                if !nodes.contains_key(end.as_str()) {
                    nodes.insert(end.clone(), node(end));
                }
            }
        }
        if kept < edges.len() {
            truncated = true;
            edges.truncate(kept);
        }
        TopologySnapshot {
            nodes: nodes.into_values().collect(),
            edges,
            truncated,
            untracked_events: self.untracked_events,
        }
    }
}

/// The node an edge end names (`service:<name>` or `topic:<name>`).
fn node(id: &str) -> Node {
    let (kind, name) = match id.split_once(':') {
        Some(("service", name)) => (NodeKind::Service, name),
        Some((_, name)) => (NodeKind::Topic, name),
        None => (NodeKind::Topic, id),
    };
    Node {
        id: id.to_owned(),
        kind,
        name: name.to_owned(),
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

/// The graph, or the bounded part of it one response holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TopologySnapshot {
    pub nodes: Vec<Node>,
    pub edges: Vec<Edge>,
    /// Whether edges were left out to keep within the asked bounds.
    pub truncated: bool,
    /// Events along edges the bus did not track because the graph was at its cap.
    pub untracked_events: u64,
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
    fn idle_edges_and_ended_subscriptions_age_out_and_the_graph_is_capped() {
        use std::time::Duration;
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let mut topology = Topology::new(3);
        let x = Topic::parse("x").unwrap();
        topology.record_publish("a", &x, start);
        topology.record_publish("b", &x, start + Duration::from_secs(10));
        topology.record_reply("c", "a", start);
        topology.record_publish("d", &x, start);
        assert_eq!(
            topology.raw().untracked_events,
            1,
            "the fourth edge is past the cap"
        );
        let live = Pattern::parse("live.*").unwrap();
        let ended = Pattern::parse("ended.*").unwrap();
        topology.subscription_started(&live, "s", "", start);
        topology.subscription_started(&ended, "s", "", start);
        topology.subscription_ended(&ended, "s", "");
        assert_eq!(topology.entries(), 5);

        let mut forgotten = 0;
        while !topology.sweep_slice(start + Duration::from_secs(5), &mut forgotten) {}
        assert_eq!(
            forgotten, 2,
            "a -> x and c -> a were idle; the ended one ended just now"
        );
        let later = SystemTime::now() + Duration::from_secs(60);
        while !topology.sweep_slice(later, &mut forgotten) {}
        let snapshot = topology.snapshot();
        let edges: Vec<_> = snapshot
            .edges
            .iter()
            .map(|e| (e.from.as_str(), e.to.as_str()))
            .collect();
        assert_eq!(
            edges,
            [("topic:live.*", "service:s")],
            "a live subscription stays"
        );
    }

    #[test]
    fn a_large_graph_is_cut_to_the_asked_bounds() {
        let mut topology = Topology::default();
        let now = SystemTime::now();
        for i in 0..100 {
            topology.record_publish(&format!("s{i}"), &Topic::parse("t").unwrap(), now);
        }
        let cut = topology.raw().build(10, usize::MAX);
        assert!(cut.truncated);
        assert_eq!(cut.edges.len(), 10);
        assert_eq!(cut.nodes.len(), 11, "ten services and the topic");
        let small = topology.raw().build(usize::MAX, 1_000);
        assert!(small.truncated);
        assert!(!small.edges.is_empty() && small.edges.len() < 10);
        let whole = topology.raw().build(usize::MAX, usize::MAX);
        assert!(!whole.truncated);
        assert_eq!(whole.edges.len(), 100);
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
