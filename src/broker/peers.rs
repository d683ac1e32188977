//! What the other nodes of a cluster say about the clients connected to them, so that
//! ListTopics and GetTopology show the whole cluster on every node (issue #12).
//!
//! # Why only subscriptions travel
//! Every node routes every event of the shared log, so each already counts every topic's
//! events and records every publish and reply edge. What it cannot see is a subscription: that
//! lives on the node its client is connected to. So a node asked for topics or the topology
//! gathers the other nodes' [`NodeView`]s through the log ([`SharedLog::peer_views`], a NATS
//! scatter-gather on JetStream) and adds their subscriptions to its own: subscriber counts
//! and groups per topic, SUBSCRIBES edges, and topics someone listens to by name.
//!
//! A view is JSON (`serde_json`), made afresh for each request under the routing lock (a copy
//! of pointers and counts, as the local listing does). A node that does not answer within the
//! gathering window ([`crate::store::jetstream::VIEW_WINDOW`]) is left out of that answer.
//!
//! [`SharedLog::peer_views`]: crate::store::jetstream::SharedLog::peer_views

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::Broker;

/// One node's account of the clients connected to it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    /// Its subscriptions as the topology records them.
    pub subscriptions: Vec<ViewSubscription>,
    /// Its live subscriptions by pattern, for topics' subscriber counts and groups.
    pub interests: Vec<ViewInterest>,
    /// Its MANUAL-ack groups with members.
    pub durable: Vec<ViewDurable>,
}

/// A SUBSCRIBES edge: (pattern, subscriber, group) with how many such subscriptions are
/// active, and when one last started or ended (Unix milliseconds).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewSubscription {
    pub pattern: String,
    pub subscriber: String,
    pub group: String,
    pub active: u32,
    pub last_seen_ms: u64,
}

/// Live subscriptions on one pattern: individual subscribers, and members per AUTO group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewInterest {
    pub pattern: String,
    pub individual: u32,
    pub groups: Vec<(String, u32)>,
}

/// A MANUAL-ack group's members on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViewDurable {
    pub group: String,
    pub pattern: String,
    pub members: u32,
}

impl ViewSubscription {
    /// The edge as [`super::topology::RawTopology::add_subscriptions`] takes it.
    pub fn entry(&self) -> super::topology::SubscriptionEntry {
        (
            self.pattern.as_str().into(),
            self.subscriber.as_str().into(),
            self.group.as_str().into(),
            self.active,
            SystemTime::UNIX_EPOCH + Duration::from_millis(self.last_seen_ms),
        )
    }
}

impl Broker {
    /// On a shared log, starts answering the other nodes' view requests. The answerer holds
    /// the broker weakly: once the broker is gone it answers with an empty view.
    pub(super) fn answer_peers(&self) {
        let Some(log) = &self.shared.log else {
            return;
        };
        let shared = Arc::downgrade(&self.shared);
        log.answer_views(Arc::new(move || {
            let view = shared
                .upgrade()
                .map(|shared| Broker { shared }.local_view())
                .unwrap_or_default();
            Bytes::from(serde_json::to_vec(&view).unwrap_or_default())
        }));
    }

    /// This node's view: its subscriptions, live interests and MANUAL-ack members.
    pub fn local_view(&self) -> NodeView {
        let (subscriptions, interests) = {
            let routing = self.lock_routing();
            let mut interests = Vec::new();
            routing.subscriptions.for_each(|pattern, interest| {
                interests.push(ViewInterest {
                    pattern: pattern.to_owned(),
                    individual: interest.individual.len() as u32,
                    groups: interest
                        .groups
                        .iter()
                        .map(|group| (group.name.to_string(), group.members.len() as u32))
                        .collect(),
                });
            });
            (routing.topology.subscriptions(), interests)
        };
        let subscriptions = subscriptions
            .into_iter()
            .map(
                |(pattern, subscriber, group, active, last_seen)| ViewSubscription {
                    pattern: pattern.to_string(),
                    subscriber: subscriber.to_string(),
                    group: group.to_string(),
                    active,
                    last_seen_ms: last_seen
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map_or(0, |since| since.as_millis() as u64),
                },
            )
            .collect();
        let durable = self
            .durable_member_counts()
            .into_iter()
            .map(|(group, pattern, members)| ViewDurable {
                group: group.to_string(),
                pattern: pattern.as_str().to_owned(),
                members,
            })
            .collect();
        NodeView {
            subscriptions,
            interests,
            durable,
        }
    }

    /// The other nodes' views (none without a shared log); an answer that does not decode is
    /// left out with a warning (a node of another version).
    pub async fn peer_views(&self) -> Vec<NodeView> {
        let Some(log) = &self.shared.log else {
            return Vec::new();
        };
        log.peer_views()
            .await
            .into_iter()
            .filter_map(|bytes| {
                serde_json::from_slice(&bytes)
                    .inspect_err(|error| {
                        tracing::warn!(%error, "a node's view did not decode: its clients are left out")
                    })
                    .ok()
            })
            .collect()
    }
}
