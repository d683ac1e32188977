//! Consumer groups with members on several nodes of a shared log.
//!
//! # Why a home node, and relays to it
//! Every node routes every event of the log, so a group served by two nodes at once would get
//! each event twice. A group therefore has one **home**: the node that announces it
//! ([`SharedLog::announce_group`]; the first node a member joins while no node announces it).
//! The home runs the group exactly as a single bus does (the subject tree's round robin for an
//! AUTO group, the dispatcher of [`super::durable`] with its cursor, deadlines, redelivery and
//! dead letters for a MANUAL one). A member that connects to another node is **relayed**: its
//! node joins the group at the home on its behalf, and the home delivers to it like to any
//! other member, over core NATS requests ([`SharedLog::ask_peer`]) instead of a gRPC stream.
//! One place keeps every group rule, and a group gets each event once whichever nodes its
//! members use.
//!
//! # The conversation (`_EVENTBUS.<stream>.peer.` subjects)
//! - The member's node subscribes to `relay.<its key>.<n>`, then asks the home at
//!   `node.<home key>` to **join** ([`Join`]): the home places and subscribes a member with the
//!   same options and answers with the confirmation ([`Joined`]).
//! - The home sends the member's deliveries as **frames** to `relay....`, up to
//!   [`FRAME_EVENTS`] events or [`FRAME_BYTES`] each, one at a time: the member's node answers
//!   a frame once its client has taken the previous one, so a slow client holds the home back
//!   exactly as a slow gRPC stream would (the home's queue for it fills and its usual rules
//!   apply: an AUTO member is skipped or catches up, a MANUAL one holds `max_in_flight`).
//! - An idle relay sends an empty frame every [`HEARTBEAT`].
//! - Ack and Nack for the group on the member's node are **settled** at the home ([`Settle`]).
//! - When the member's stream ends, its node stops serving `relay....` and tells the home
//!   (**leave**); the home's member ends, and a MANUAL group delivers what it held again.
//!
//! # Failures
//! - The member's node dies: the home's next frame (at most [`HEARTBEAT`] later) finds no
//!   responder, and its member ends. While a frame waits for a slow client, the home asks the
//!   node itself every [`HEARTBEAT`], so a node killed with a frame in hand is found gone
//!   as soon. A frame unanswered for [`RELAY_ANSWER`] ends the member too.
//! - The home dies or stops: its relays stop, and each relayed member ends after
//!   [`HOME_SILENCE`] (at once on a stopping home, which ends its members) with UNAVAILABLE
//!   `group-home-lost` ([`BusError::GroupHomeLost`]). Clients rejoin as after any lost node,
//!   and the first member to rejoin makes its node the new home: a MANUAL group resumes from
//!   its cursor in the log (at least once); an AUTO group loses what its dead home had queued,
//!   as it would on one bus.
//! - Two nodes that place a group's first members within one NATS round trip of each other
//!   can both become its home (the check in [`Broker::place_group`] is not a lock); the group
//!   then gets each event once per home until one home's members leave.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use hashbrown::HashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::durable::{Acked, ManualAck};
use super::subscription::{AckMode, Delivery, StartPosition, SubscribeOptions, Subscription};
use super::{Broker, GroupPlace};
use crate::error::BusError;
use crate::event::SharedEvent;
use crate::store::{codec, PeerError, PeerNode, PeerRequest, SharedLog};
use crate::topic::{Pattern, Topic};

/// How often a home sends an idle relay an empty frame, so each side learns of the other's
/// death within about this.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a relayed member waits for a frame (heartbeats included) before it takes its home
/// for gone and ends with `group-home-lost`.
pub const HOME_SILENCE: Duration = Duration::from_secs(5);
/// How long a home waits for the member's node to take a frame before it ends the member (a
/// client that reads nothing for this long, or a node that hangs).
pub const RELAY_ANSWER: Duration = Duration::from_secs(30);
/// How long a node waits for the home's answer to a join or a settle.
pub const ASK_WAIT: Duration = Duration::from_secs(5);
/// How long a home keeps trying to reach a new relay that NATS does not know yet (in a NATS
/// cluster the relay's subscription can reach the home's server after the join did).
const FIRST_CONTACT: Duration = Duration::from_secs(2);
/// Events in one frame, at most.
pub const FRAME_EVENTS: usize = 256;
/// A frame's bytes, at most, unless one event alone is larger (an event always fits NATS's
/// `max_payload`: the store checks it at start-up).
pub const FRAME_BYTES: usize = 256 * 1024;

/// A frame entry's first byte.
const EVENT: u8 = b'E';
const CAUGHT_UP: u8 = b'C';
const ENDED: u8 = b'X';
/// A request to a home's `node.<key>` starts with one of these.
const JOIN: u8 = b'J';
const SETTLE: u8 = b'S';
const LEAVE: u8 = b'L';
/// Are you there? Answered at once by a node's `node.<key>` server.
const PING: u8 = b'P';
/// A relayed member's node answers a frame with this when the member has left.
const GONE: &[u8] = b"gone";

/// What a node keeps of relays: the ones it serves as a home (to end on a leave) and the groups
/// its members are relayed to (to settle their acks at the home).
#[derive(Default)]
pub(super) struct Relays {
    next: AtomicU64,
    /// Home side: relay subject suffix -> ends that relay.
    served: Mutex<HashMap<String, CancellationToken>>,
    /// Member side: group -> its home and how many members this node relays to it.
    relayed: Mutex<HashMap<Arc<str>, (PeerNode, usize)>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A join: the member's options and where to send its deliveries.
#[derive(Serialize, Deserialize)]
struct Join {
    relay: String,
    /// The member's node's key.
    node: String,
    pattern: String,
    group: String,
    subscriber: String,
    start: WireStart,
    manual: Option<WireManual>,
    log_id: Option<String>,
}

#[derive(Serialize, Deserialize)]
enum WireStart {
    Latest,
    Earliest,
    After(u64),
    FromTime(SystemTime),
}

#[derive(Serialize, Deserialize)]
struct WireManual {
    ack_deadline: Duration,
    max_deliveries: u32,
    max_in_flight: u32,
    dead_letter_topic: Option<String>,
}

/// A home's answer to a join.
#[derive(Serialize, Deserialize)]
enum Joined {
    Member(WireInfo),
    Refused(WireError),
}

/// [`super::SubscriptionInfo`] less what the member's node knows itself.
#[derive(Serialize, Deserialize)]
struct WireInfo {
    id: u64,
    head_sequence: u64,
    oldest_sequence: Option<u64>,
    start_truncated: bool,
    log_id: String,
    group_cursor: Option<u64>,
    log_changed: bool,
    group_dropped: u64,
}

/// The errors a home passes on as they are; any other becomes `group-home-lost`.
#[derive(Serialize, Deserialize)]
enum WireError {
    Invalid {
        field: String,
        rule: String,
    },
    SlowGroupMember {
        behind: u64,
        max_lag: u64,
        last_delivered: u64,
    },
    UnknownGroup,
    Moved {
        node: String,
    },
    Other(String),
}

impl WireError {
    fn of(error: &BusError) -> WireError {
        match error {
            BusError::InvalidArgument { field, rule } => WireError::Invalid {
                field: field.clone(),
                rule: rule.clone(),
            },
            BusError::SlowGroupMember {
                behind,
                max_lag,
                last_delivered,
            } => WireError::SlowGroupMember {
                behind: *behind,
                max_lag: *max_lag,
                last_delivered: *last_delivered,
            },
            BusError::UnknownGroup { .. } => WireError::UnknownGroup,
            other => WireError::Other(other.to_string()),
        }
    }

    fn into_error(self, group: &str, home: &PeerNode) -> BusError {
        match self {
            WireError::Invalid { field, rule } => BusError::InvalidArgument { field, rule },
            WireError::SlowGroupMember {
                behind,
                max_lag,
                last_delivered,
            } => BusError::SlowGroupMember {
                behind,
                max_lag,
                last_delivered,
            },
            WireError::UnknownGroup => BusError::UnknownGroup {
                group: group.to_owned(),
            },
            WireError::Moved { node } => BusError::GroupOnAnotherNode {
                group: group.to_owned(),
                node,
            },
            WireError::Other(detail) => home_lost(group, home, detail),
        }
    }
}

/// An Ack (no `nack_after`) or a Nack, settled at the group's home.
#[derive(Serialize, Deserialize)]
struct Settle {
    group: String,
    sequences: Vec<u64>,
    nack_after: Option<Duration>,
}

#[derive(Serialize, Deserialize)]
enum Settled {
    Acked { acknowledged: u32, cursor: u64 },
    Nacked(u32),
    Refused(WireError),
}

fn home_lost(group: &str, home: &PeerNode, detail: impl Into<String>) -> BusError {
    BusError::GroupHomeLost {
        group: group.to_owned(),
        node: home.name.clone(),
        detail: detail.into(),
    }
}

fn request(tag: u8, body: &impl Serialize) -> Bytes {
    let mut bytes = vec![tag];
    serde_json::to_writer(&mut bytes, body).expect("relay messages serialize");
    Bytes::from(bytes)
}

impl Broker {
    fn shared_log(&self) -> &Arc<dyn SharedLog> {
        self.shared
            .log
            .as_ref()
            .expect("relays exist only on a shared log")
    }

    /// On a shared log, starts answering other nodes' joins, settles and leaves for the groups
    /// this node is home to: subscribed when this returns, so no member's join finds a
    /// starting node deaf. Ends when the broker stops.
    pub(super) async fn serve_relays(&self) {
        let Some(log) = self.shared.log.clone() else {
            return;
        };
        let suffix = format!("node.{}", log.node_key());
        let mut requests = match log.serve_peer(&suffix).await {
            Ok(requests) => requests,
            Err(error) => {
                tracing::warn!(%error, "cannot serve consumer-group members relayed from other nodes: such members will end with group-home-lost and join elsewhere");
                return;
            }
        };
        let broker = self.clone();
        tokio::spawn(async move {
            loop {
                let request = tokio::select! {
                    _ = broker.stopped() => {
                        broker.withdraw_groups();
                        return;
                    }
                    request = requests.recv() => request,
                };
                let Some(request) = request else {
                    return;
                };
                match request.payload().first() {
                    Some(&JOIN) => {
                        tokio::spawn(broker.clone().home_join(request));
                    }
                    Some(&SETTLE) => broker.home_settle(request),
                    Some(&LEAVE) => {
                        let relay = String::from_utf8_lossy(&request.payload()[1..]).into_owned();
                        if let Some(relay) = lock(&broker.shared.relays.served).remove(&relay) {
                            relay.cancel();
                        }
                        request.answer(Bytes::new());
                    }
                    // PING, and anything a later version may send.
                    _ => request.answer(Bytes::new()),
                }
            }
        });
    }

    /// A stopping node is no group's home: it stops telling other nodes it has groups at once
    /// (not when its process exits), so members rejoining through them make a new home.
    fn withdraw_groups(&self) {
        let log = self.shared_log();
        let placed = std::mem::take(&mut *super::lock_placed(&self.shared.placed_groups));
        for group in placed.keys() {
            drop(log.announce_group(group, false));
        }
    }

    /// Home side of a join: places and subscribes the member, answers, and relays its
    /// deliveries.
    async fn home_join(self, request: PeerRequest) {
        let join: Join = match serde_json::from_slice(&request.payload()[1..]) {
            Ok(join) => join,
            Err(error) => {
                let refused = Joined::Refused(WireError::Other(format!("malformed join: {error}")));
                request.answer(Bytes::from(
                    serde_json::to_vec(&refused).unwrap_or_default(),
                ));
                return;
            }
        };
        let relay = join.relay.clone();
        let node = join.node.clone();
        let (answer, relayed) = match self.join_here(join).await {
            Ok((info, subscription, placement)) => {
                (Joined::Member(info), Some((subscription, placement)))
            }
            Err(refused) => (Joined::Refused(refused), None),
        };
        request.answer(Bytes::from(serde_json::to_vec(&answer).unwrap_or_default()));
        let Some((subscription, placement)) = relayed else {
            return;
        };
        let cancel = CancellationToken::new();
        lock(&self.shared.relays.served).insert(relay.clone(), cancel.clone());
        let link = Link {
            log: self.shared_log().clone(),
            relay: relay.clone(),
            node: format!("node.{node}"),
            cancel,
        };
        self.relay(link, subscription).await;
        lock(&self.shared.relays.served).remove(&relay);
        drop(placement);
    }

    async fn join_here(
        &self,
        join: Join,
    ) -> Result<(WireInfo, Subscription, Option<super::GroupPlacement>), WireError> {
        let options = options_of(&join)?;
        let placement = match self
            .place_group(Some(&join.group))
            .await
            .map_err(|error| WireError::of(&error))?
        {
            GroupPlace::Here(placement) => placement,
            GroupPlace::Elsewhere(node) => return Err(WireError::Moved { node: node.name }),
        };
        let subscription = self
            .subscribe(options)
            .map_err(|error| WireError::of(&error))?;
        let info = subscription.info();
        let wire = WireInfo {
            id: info.id,
            head_sequence: info.head_sequence,
            oldest_sequence: info.oldest_sequence,
            start_truncated: info.start_truncated,
            log_id: info.log_id.clone(),
            group_cursor: info.group_cursor,
            log_changed: info.log_changed,
            group_dropped: info.group_dropped,
        };
        Ok((wire, subscription, placement))
    }

    /// Sends `subscription`'s deliveries to the relay, a frame at a time, until either side
    /// ends. Dropping the subscription ends the home's member.
    async fn relay(&self, link: Link, subscription: Subscription) {
        let group = subscription.info().group.clone().unwrap_or_default();
        let mut subscription = subscription.into_uncounted();
        let ended = |error: String| {
            tracing::debug!(%error, %group, relay = link.relay, "a relayed member ends");
        };
        // First contact: the relay subscribed before it asked to join, but in a NATS cluster
        // its subscription may reach this node's server after the join did.
        let patience = tokio::time::Instant::now() + FIRST_CONTACT;
        loop {
            match link.send(Bytes::new()).await {
                Ok(()) => break,
                Err(Some(PeerError::NoResponders)) if tokio::time::Instant::now() < patience => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => return ended(describe(error)),
            }
        }
        let mut carried: Option<Option<Result<Delivery, BusError>>> = None;
        loop {
            let first = match carried.take() {
                Some(item) => item,
                None => tokio::select! {
                    _ = link.cancel.cancelled() => return ended("its member left".into()),
                    item = subscription.next() => item,
                    _ = tokio::time::sleep(HEARTBEAT) => {
                        if let Err(error) = link.send(Bytes::new()).await {
                            return ended(describe(error));
                        }
                        continue;
                    }
                },
            };
            let mut frame = Vec::new();
            let mut events = 0;
            let mut last = encode_item(&first, &mut frame, &mut events);
            while !last && events < FRAME_EVENTS && frame.len() < FRAME_BYTES {
                let Some(item) = subscription.next().now_or_never() else {
                    break;
                };
                let mut entry = Vec::new();
                let mut counted = 0;
                let ends = encode_item(&item, &mut entry, &mut counted);
                if frame.len() + entry.len() > FRAME_BYTES {
                    carried = Some(item);
                    break;
                }
                frame.extend_from_slice(&entry);
                events += counted;
                last = ends;
            }
            if let Err(error) = link.send(Bytes::from(frame)).await {
                return ended(describe(error));
            }
            if last {
                return;
            }
        }
    }

    /// Home side of an Ack or Nack from a relayed member's node.
    fn home_settle(&self, request: PeerRequest) {
        let settled = match serde_json::from_slice::<Settle>(&request.payload()[1..]) {
            Err(error) => Settled::Refused(WireError::Other(format!("malformed settle: {error}"))),
            Ok(settle) => match settle.nack_after {
                None => match self.ack(&settle.group, &settle.sequences) {
                    Ok(acked) => Settled::Acked {
                        acknowledged: acked.acknowledged,
                        cursor: acked.cursor,
                    },
                    Err(error) => Settled::Refused(WireError::of(&error)),
                },
                Some(delay) => match self.nack(&settle.group, &settle.sequences, delay) {
                    Ok(requeued) => Settled::Nacked(requeued),
                    Err(error) => Settled::Refused(WireError::of(&error)),
                },
            },
        };
        request.answer(Bytes::from(
            serde_json::to_vec(&settled).unwrap_or_default(),
        ));
    }

    /// Joins `options.group` at its home `home` on behalf of a member connected here: the
    /// returned subscription delivers what the home sends (see the module docs).
    ///
    /// # Errors
    /// The home's refusal as the home gave it (an invalid option, for one);
    /// [`BusError::GroupHomeLost`] when the home does not answer within [`ASK_WAIT`];
    /// [`BusError::GroupOnAnotherNode`] when the group moved on meanwhile.
    pub async fn join_elsewhere(
        &self,
        options: SubscribeOptions,
        home: PeerNode,
    ) -> Result<Subscription, BusError> {
        let log = self.shared_log().clone();
        let group: Arc<str> = options
            .group
            .clone()
            .ok_or_else(|| BusError::invalid("group", "a relayed member belongs to a group"))?;
        let relay = format!(
            "relay.{}.{}",
            log.node_key(),
            self.shared.relays.next.fetch_add(1, Ordering::Relaxed)
        );
        let inbox = log
            .serve_peer(&relay)
            .await
            .map_err(|error| home_lost(&group, &home, error.to_string()))?;
        let join = Join {
            relay: relay.clone(),
            node: log.node_key().to_owned(),
            pattern: options.pattern.as_str().to_owned(),
            group: group.to_string(),
            subscriber: options.subscriber.to_string(),
            start: match options.start {
                StartPosition::Latest => WireStart::Latest,
                StartPosition::Earliest => WireStart::Earliest,
                StartPosition::AfterSequence(sequence) => WireStart::After(sequence),
                StartPosition::FromTime(time) => WireStart::FromTime(time),
            },
            manual: match &options.ack {
                AckMode::Auto => None,
                AckMode::Manual(manual) => Some(WireManual {
                    ack_deadline: manual.ack_deadline,
                    max_deliveries: manual.max_deliveries,
                    max_in_flight: manual.max_in_flight,
                    dead_letter_topic: manual.dead_letter_topic.as_ref().map(|t| t.to_string()),
                }),
            },
            log_id: options.log_id.clone(),
        };
        let answer = log
            .ask_peer(
                &format!("node.{}", home.key),
                request(JOIN, &join),
                ASK_WAIT,
            )
            .await
            .map_err(|error| home_lost(&group, &home, format!("joining: {error}")))?;
        let info = match serde_json::from_slice::<Joined>(&answer) {
            Ok(Joined::Member(info)) => info,
            Ok(Joined::Refused(refused)) => return Err(refused.into_error(&group, &home)),
            Err(error) => return Err(home_lost(&group, &home, format!("its answer: {error}"))),
        };
        let info = super::SubscriptionInfo {
            id: info.id,
            pattern: options.pattern.clone(),
            group: Some(group.clone()),
            head_sequence: info.head_sequence,
            oldest_sequence: info.oldest_sequence,
            start_truncated: info.start_truncated,
            log_id: info.log_id,
            group_cursor: info.group_cursor,
            log_changed: info.log_changed,
            group_dropped: info.group_dropped,
        };
        let relayed = Relayed::new(self.clone(), group.clone(), home.clone(), relay);
        let member = RelayedMember {
            broker: self.clone(),
            inbox,
            held: None,
            pending: VecDeque::new(),
            ended: false,
            relayed,
        };
        let deliveries = futures_util::stream::unfold(member, |mut member| async move {
            let item = member.next().await?;
            Some((item, member))
        });
        Ok(Subscription::relayed(self, info, deliveries.boxed()))
    }

    /// [`Broker::ack`], or, for a group whose home is another node, the same at that home.
    pub async fn ack_anywhere(&self, group: &str, sequences: &[u64]) -> Result<Acked, BusError> {
        match self.ack(group, sequences) {
            Err(BusError::UnknownGroup { .. }) if self.relayed_home(group).is_some() => {
                match self.settle_at_home(group, sequences, None).await? {
                    Settled::Acked {
                        acknowledged,
                        cursor,
                    } => Ok(Acked {
                        acknowledged,
                        cursor,
                    }),
                    _ => Err(BusError::Internal),
                }
            }
            local => local,
        }
    }

    /// [`Broker::nack`], or, for a group whose home is another node, the same at that home.
    pub async fn nack_anywhere(
        &self,
        group: &str,
        sequences: &[u64],
        delay: Duration,
    ) -> Result<u32, BusError> {
        match self.nack(group, sequences, delay) {
            Err(BusError::UnknownGroup { .. }) if self.relayed_home(group).is_some() => {
                match self.settle_at_home(group, sequences, Some(delay)).await? {
                    Settled::Nacked(requeued) => Ok(requeued),
                    _ => Err(BusError::Internal),
                }
            }
            local => local,
        }
    }

    /// Acks, without waiting, an event a member here will not deliver (its principal may not
    /// see it): at once for a group homed here, at the home otherwise.
    pub fn settle_unseen(&self, group: &str, sequence: u64) {
        if !matches!(
            self.ack(group, &[sequence]),
            Err(BusError::UnknownGroup { .. })
        ) {
            return;
        }
        if self.relayed_home(group).is_none() {
            return;
        }
        let broker = self.clone();
        let group = group.to_owned();
        tokio::spawn(async move {
            let _ = broker.settle_at_home(&group, &[sequence], None).await;
        });
    }

    fn relayed_home(&self, group: &str) -> Option<PeerNode> {
        lock(&self.shared.relays.relayed)
            .get(group)
            .map(|(home, _)| home.clone())
    }

    async fn settle_at_home(
        &self,
        group: &str,
        sequences: &[u64],
        nack_after: Option<Duration>,
    ) -> Result<Settled, BusError> {
        let Some(home) = self.relayed_home(group) else {
            return Err(BusError::UnknownGroup {
                group: group.to_owned(),
            });
        };
        let settle = Settle {
            group: group.to_owned(),
            sequences: sequences.to_vec(),
            nack_after,
        };
        let answer = self
            .shared_log()
            .ask_peer(
                &format!("node.{}", home.key),
                request(SETTLE, &settle),
                ASK_WAIT,
            )
            .await
            .map_err(|error| home_lost(group, &home, format!("settling: {error}")))?;
        match serde_json::from_slice::<Settled>(&answer) {
            Ok(Settled::Refused(refused)) => Err(refused.into_error(group, &home)),
            Ok(settled) => Ok(settled),
            Err(error) => Err(home_lost(group, &home, format!("its answer: {error}"))),
        }
    }
}

/// Home side: where a relayed member's frames go, and how its node is watched.
struct Link {
    log: Arc<dyn SharedLog>,
    /// The relay's subject suffix.
    relay: String,
    /// The member's node's own suffix (`node.<key>`), asked while a frame waits.
    node: String,
    /// Cancelled when the member's node says the member left.
    cancel: CancellationToken,
}

impl Link {
    /// Sends one frame and waits until the member's node has taken it: `Err(None)` when the
    /// member left meanwhile, `Err(Some(_))` when its node does not answer. A frame may wait
    /// for as long as the client takes to read the last one ([`RELAY_ANSWER`] at most), so
    /// meanwhile the node itself is asked every [`HEARTBEAT`]: a node killed with a frame in
    /// hand is found gone within about two heartbeats, not [`RELAY_ANSWER`].
    async fn send(&self, frame: Bytes) -> Result<(), Option<PeerError>> {
        let taken = self.log.ask_peer(&self.relay, frame, RELAY_ANSWER);
        tokio::pin!(taken);
        loop {
            tokio::select! {
                answer = &mut taken => {
                    return match answer {
                        Ok(answer) if answer.as_ref() == GONE => Err(None),
                        Ok(_) => Ok(()),
                        Err(error) => Err(Some(error)),
                    };
                }
                _ = self.cancel.cancelled() => return Err(None),
                _ = tokio::time::sleep(HEARTBEAT) => {
                    let ping = Bytes::from_static(&[PING]);
                    if let Err(error) = self.log.ask_peer(&self.node, ping, HEARTBEAT * 2).await {
                        return Err(Some(error));
                    }
                }
            }
        }
    }
}

fn describe(error: Option<PeerError>) -> String {
    match error {
        None => "its member left".into(),
        Some(error) => format!("its node does not answer: {error}"),
    }
}

/// The options a join carries, checked as a Subscribe's are.
fn options_of(join: &Join) -> Result<SubscribeOptions, WireError> {
    let invalid = |field: &str, error: &dyn std::fmt::Display| WireError::Invalid {
        field: field.to_owned(),
        rule: error.to_string(),
    };
    let pattern = Pattern::parse(&join.pattern).map_err(|error| invalid("topic", &error))?;
    let ack = match &join.manual {
        None => AckMode::Auto,
        Some(manual) => AckMode::Manual(ManualAck {
            ack_deadline: manual.ack_deadline,
            max_deliveries: manual.max_deliveries,
            max_in_flight: manual.max_in_flight,
            dead_letter_topic: match &manual.dead_letter_topic {
                None => None,
                Some(topic) => Some(
                    Topic::parse(topic).map_err(|error| invalid("dead_letter_topic", &error))?,
                ),
            },
        }),
    };
    Ok(SubscribeOptions {
        pattern,
        group: Some(Arc::from(join.group.as_str())),
        subscriber: Arc::from(join.subscriber.as_str()),
        start: match join.start {
            WireStart::Latest => StartPosition::Latest,
            WireStart::Earliest => StartPosition::Earliest,
            WireStart::After(sequence) => StartPosition::AfterSequence(sequence),
            WireStart::FromTime(time) => StartPosition::FromTime(time),
        },
        ack,
        log_id: join.log_id.clone(),
    })
}

/// Appends one subscription item to a frame; whether it ends the relay. An event counts one
/// towards `events`.
fn encode_item(
    item: &Option<Result<Delivery, BusError>>,
    frame: &mut Vec<u8>,
    events: &mut usize,
) -> bool {
    match item {
        Some(Ok(Delivery::Event { event, attempt })) => {
            frame.push(EVENT);
            frame.extend_from_slice(&attempt.to_le_bytes());
            codec::encode(event, frame);
            *events += 1;
            false
        }
        Some(Ok(Delivery::CaughtUp { sequence })) => {
            frame.push(CAUGHT_UP);
            frame.extend_from_slice(&sequence.to_le_bytes());
            false
        }
        Some(Err(error)) => {
            frame.push(ENDED);
            serde_json::to_writer(&mut *frame, &WireError::of(error)).expect("serializes");
            true
        }
        None => {
            frame.push(ENDED);
            let ended = WireError::Other("its member's stream ended".into());
            serde_json::to_writer(&mut *frame, &ended).expect("serializes");
            true
        }
    }
}

/// The items of a frame, in order; an `ENDED` entry is the last.
fn decode_frame(
    frame: &[u8],
    group: &str,
    home: &PeerNode,
) -> Result<Vec<Result<Delivery, BusError>>, String> {
    let mut items = Vec::new();
    let mut at = 0;
    while at < frame.len() {
        let tag = frame[at];
        at += 1;
        match tag {
            EVENT => {
                let attempt = frame
                    .get(at..at + 4)
                    .ok_or("a frame ends inside an event's attempt")?;
                let attempt = u32::from_le_bytes(attempt.try_into().expect("4 bytes"));
                at += 4;
                let (event, len) =
                    codec::decode(&frame[at..]).map_err(|error| error.to_string())?;
                at += len;
                let event: SharedEvent = Arc::new(event);
                items.push(Ok(Delivery::Event { event, attempt }));
            }
            CAUGHT_UP => {
                let sequence = frame
                    .get(at..at + 8)
                    .ok_or("a frame ends inside a caught-up sequence")?;
                at += 8;
                items.push(Ok(Delivery::CaughtUp {
                    sequence: u64::from_le_bytes(sequence.try_into().expect("8 bytes")),
                }));
            }
            ENDED => {
                let error: WireError =
                    serde_json::from_slice(&frame[at..]).map_err(|error| error.to_string())?;
                items.push(Err(error.into_error(group, home)));
                break;
            }
            other => return Err(format!("unknown frame entry {other:#04x}")),
        }
    }
    Ok(items)
}

/// Member side: counts this node's members relayed to a group's home while they live, and
/// tells the home when one leaves.
struct Relayed {
    broker: Broker,
    group: Arc<str>,
    home: PeerNode,
    relay: String,
}

impl Relayed {
    fn new(broker: Broker, group: Arc<str>, home: PeerNode, relay: String) -> Relayed {
        lock(&broker.shared.relays.relayed)
            .entry(group.clone())
            .and_modify(|(known, count)| {
                *known = home.clone();
                *count += 1;
            })
            .or_insert((home.clone(), 1));
        Relayed {
            broker,
            group,
            home,
            relay,
        }
    }
}

impl Drop for Relayed {
    fn drop(&mut self) {
        {
            let mut relayed = lock(&self.broker.shared.relays.relayed);
            if let Some((_, count)) = relayed.get_mut(&self.group) {
                *count -= 1;
                if *count == 0 {
                    relayed.remove(&self.group);
                }
            }
        }
        // Sent at once (the log spawns the request); its answer does not matter: a home that
        // misses it finds no responder at its next frame.
        let mut leave = vec![LEAVE];
        leave.extend_from_slice(self.relay.as_bytes());
        drop(self.broker.shared_log().ask_peer(
            &format!("node.{}", self.home.key),
            Bytes::from(leave),
            ASK_WAIT,
        ));
    }
}

/// Member side: the deliveries of a relayed member, as its home sends them.
struct RelayedMember {
    broker: Broker,
    inbox: mpsc::Receiver<PeerRequest>,
    /// The last frame, answered once its items are taken (the home sends the next then).
    held: Option<PeerRequest>,
    pending: VecDeque<Result<Delivery, BusError>>,
    ended: bool,
    relayed: Relayed,
}

impl Drop for RelayedMember {
    /// The frame in hand is answered "gone", so the home ends the member at once.
    fn drop(&mut self) {
        if let Some(frame) = self.held.take() {
            frame.answer(Bytes::from_static(GONE));
        }
    }
}

impl RelayedMember {
    async fn next(&mut self) -> Option<Result<Delivery, BusError>> {
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Some(item);
            }
            if self.ended {
                return None;
            }
            if let Some(frame) = self.held.take() {
                frame.answer(Bytes::new());
            }
            let frame = tokio::select! {
                _ = self.broker.stopped() => {
                    self.ended = true;
                    return Some(Err(BusError::ShuttingDown));
                }
                frame = tokio::time::timeout(HOME_SILENCE, self.inbox.recv()) => frame,
            };
            let frame = match frame {
                Ok(Some(frame)) => frame,
                Ok(None) => return Some(Err(self.lost("its relay stopped".into()))),
                Err(_) => {
                    return Some(Err(self.lost(format!(
                        "nothing came from it for {}",
                        crate::timefmt::format_duration(HOME_SILENCE)
                    ))))
                }
            };
            match decode_frame(frame.payload(), &self.relayed.group, &self.relayed.home) {
                Ok(items) => {
                    self.ended = items.last().is_some_and(|item| item.is_err());
                    self.pending.extend(items);
                    self.held = Some(frame);
                }
                Err(detail) => {
                    return Some(Err(self.lost(format!("a frame did not decode: {detail}"))))
                }
            }
        }
    }

    fn lost(&mut self, detail: String) -> BusError {
        self.ended = true;
        home_lost(&self.relayed.group, &self.relayed.home, detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, StoredEvent};

    fn home() -> PeerNode {
        PeerNode {
            key: "abc".into(),
            name: "node abc (pid 1)".into(),
        }
    }

    #[test]
    fn a_frame_carries_events_caught_up_and_the_ending_in_order() {
        let event = Arc::new(StoredEvent::new(
            7,
            SystemTime::UNIX_EPOCH + Duration::from_secs(5),
            Event {
                data: Bytes::from_static(b"hello"),
                ..Event::for_test("orders.created")
            },
        ));
        let mut frame = Vec::new();
        let mut events = 0;
        for item in [
            Some(Ok(Delivery::Event {
                event: event.clone(),
                attempt: 3,
            })),
            Some(Ok(Delivery::CaughtUp { sequence: 7 })),
        ] {
            assert!(!encode_item(&item, &mut frame, &mut events));
        }
        let slow = BusError::SlowGroupMember {
            behind: 10,
            max_lag: 5,
            last_delivered: 7,
        };
        assert!(encode_item(&Some(Err(slow)), &mut frame, &mut events));
        assert_eq!(events, 1);
        let items = decode_frame(&frame, "g", &home()).unwrap();
        assert_eq!(items.len(), 3);
        match &items[0] {
            Ok(Delivery::Event {
                event: got,
                attempt,
            }) => {
                assert_eq!(*attempt, 3);
                assert_eq!(got.sequence, 7);
                assert_eq!(got.event, event.event);
            }
            other => panic!("not the event: {other:?}"),
        }
        assert!(matches!(items[1], Ok(Delivery::CaughtUp { sequence: 7 })));
        assert!(matches!(
            items[2],
            Err(BusError::SlowGroupMember {
                last_delivered: 7,
                ..
            })
        ));
    }

    #[test]
    fn a_damaged_frame_is_refused_not_misread() {
        let event = Arc::new(StoredEvent::new(
            1,
            SystemTime::UNIX_EPOCH,
            Event::for_test("a"),
        ));
        let mut frame = Vec::new();
        let mut events = 0;
        encode_item(
            &Some(Ok(Delivery::Event { event, attempt: 1 })),
            &mut frame,
            &mut events,
        );
        let last = frame.len() - 1;
        frame[last] ^= 0xff;
        assert!(decode_frame(&frame, "g", &home()).is_err());
        assert!(decode_frame(b"Q", "g", &home()).is_err());
        assert!(decode_frame(&frame[..3], "g", &home()).is_err());
    }

    #[test]
    fn errors_a_home_passes_on_keep_their_kind() {
        let invalid = WireError::of(&BusError::invalid("start", "must be latest"));
        let back = serde_json::from_slice::<WireError>(&serde_json::to_vec(&invalid).unwrap())
            .unwrap()
            .into_error("g", &home());
        assert!(matches!(back, BusError::InvalidArgument { field, .. } if field == "start"));
        let other = WireError::of(&BusError::ShuttingDown).into_error("g", &home());
        assert!(
            matches!(other, BusError::GroupHomeLost { node, .. } if node == "node abc (pid 1)")
        );
    }
}
