//! Snapshots of what the broker knows about its consumer groups and itself, for the admin API
//! (`ListGroups`, `GetServerInfo`) and the CLI's `groups`, `server info` and `server check`.
//! Copies only: each table is read under its own lock and nothing is held while the caller
//! formats, so asking never stalls publishers for long.

use std::time::{Duration, SystemTime};

use super::Broker;
use crate::broker::BusConfig;

/// How a group's deliveries are confirmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupAckMode {
    /// A live group in the subject tree: each event goes to one member's queue, delivered means
    /// done. It exists while it has members.
    Auto,
    /// A MANUAL-ack group reading the log from its cursor (see [`super::durable`]).
    Manual,
}

/// One consumer group as the broker sees it now. For AUTO groups only `name`, `pattern` and
/// `members` mean anything; the other counts are 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSnapshot {
    /// The group's name.
    pub name: String,
    /// The topic pattern its members subscribe to.
    pub pattern: String,
    /// AUTO or MANUAL.
    pub ack_mode: GroupAckMode,
    /// Live members (subscriptions) on this bus process.
    pub members: u32,
    /// MANUAL: every event up to this sequence is acked or dead-lettered.
    pub cursor: u64,
    /// MANUAL: log events after the cursor that are not in flight, matching the pattern or not
    /// (an upper bound of what the group has still to deliver: counting only the matching ones
    /// would mean reading the log).
    pub pending: u64,
    /// MANUAL: events read ahead and waiting for a member (or for a nack's delay), exact.
    pub ready: u64,
    /// MANUAL: events delivered and not yet acked.
    pub in_flight: u64,
    /// MANUAL: deliveries after an event's first, since the group was loaded on this process.
    pub redelivered: u64,
    /// MANUAL: events moved to the dead-letter topic since the group was loaded.
    pub dead_lettered: u64,
    /// MANUAL: events retention dropped before the group could deliver them.
    pub dropped: u64,
    /// MANUAL: no member; the group waits in the log without reading it.
    pub parked: bool,
    /// MANUAL: deliveries of one event before it is dead-lettered.
    pub max_deliveries: u32,
    /// MANUAL: where its dead letters go.
    pub dead_letter_topic: String,
}

/// What the broker knows about itself, for `GetServerInfo`.
#[derive(Debug, Clone)]
pub struct ServerSnapshot {
    /// When this broker was made (the process start, near enough).
    pub started: SystemTime,
    /// How long ago that was.
    pub uptime: Duration,
    /// The store's kind: `memory`, `file` or `jetstream`.
    pub storage: &'static str,
    /// The oldest sequence held, `None` when the log holds nothing.
    pub oldest_sequence: Option<u64>,
    /// The last sequence assigned (0 before the first).
    pub head_sequence: u64,
    /// The log's identity (see `Subscribed.log_id`).
    pub log_id: String,
    /// The limits and retention the broker runs with.
    pub config: BusConfig,
    /// Open client connections (from the connection gauge).
    pub connections: u64,
    /// Open subscriptions, group members included.
    pub subscriptions: u64,
    /// MANUAL-ack groups loaded, parked ones included.
    pub durable_groups: u64,
}

impl Broker {
    /// Every consumer group known now, sorted by name, then pattern: the live (AUTO) groups of
    /// the subject tree and the loaded MANUAL-ack groups. A MANUAL group unloaded after idling
    /// (`names_idle_after` with no member) is not listed; its cursor stays saved in the store.
    pub fn list_groups(&self) -> Vec<GroupSnapshot> {
        let mut groups = Vec::new();
        {
            let routing = self.lock_routing();
            routing.subscriptions.for_each(|pattern, interest| {
                for group in &interest.groups {
                    groups.push(GroupSnapshot {
                        name: group.name.to_string(),
                        pattern: pattern.to_owned(),
                        ack_mode: GroupAckMode::Auto,
                        members: group.members.len() as u32,
                        cursor: 0,
                        pending: 0,
                        ready: 0,
                        in_flight: 0,
                        redelivered: 0,
                        dead_lettered: 0,
                        dropped: 0,
                        parked: false,
                        max_deliveries: 0,
                        dead_letter_topic: String::new(),
                    });
                }
            });
        }
        let head = self.shared.store.bounds().head;
        groups.extend(self.durable_snapshots(head));
        groups.sort_by(|a, b| (&a.name, &a.pattern).cmp(&(&b.name, &b.pattern)));
        groups
    }

    /// What the broker knows about itself now (see [`ServerSnapshot`]).
    pub fn server_snapshot(&self) -> ServerSnapshot {
        let bounds = self.shared.store.bounds();
        ServerSnapshot {
            started: self.shared.started,
            uptime: SystemTime::now()
                .duration_since(self.shared.started)
                .unwrap_or_default(),
            storage: self.shared.store.kind(),
            oldest_sequence: bounds.oldest,
            head_sequence: bounds.head,
            log_id: self.log_id().to_owned(),
            config: self.shared.config.clone(),
            connections: self.shared.metrics.connections_active(),
            subscriptions: self.shared.metrics.subscriptions_open(),
            durable_groups: self.durable_stats().groups as u64,
        }
    }
}
