//! The bus log in a NATS JetStream stream, shared by every bus node that points at it.
//!
//! # Why a stream, and how it maps
//! A clustered bus must not be a home-made cluster: JetStream already gives a replicated,
//! totally ordered stream, a dedupe window and durable key-value buckets. So a node keeps no
//! log of its own; it is a stateless front over one stream:
//!
//! | bus | JetStream |
//! |---|---|
//! | the log, its sequence | the stream `--jetstream-stream` (default `EVENTBUS`), its stream sequence |
//! | topic `orders.created` | subject `EVENTBUS.orders.created` (the stream takes `EVENTBUS.>`) |
//! | an event | one message: the file store's record ([`super::codec`]) as payload |
//! | publish time | the message's JetStream timestamp |
//! | idempotent publish by (source, id) | the `Nats-Msg-Id` header and the stream's duplicate window |
//! | retention (events, bytes, age) | the stream's `max_msgs`, `max_bytes`, `max_age` (discard old) |
//! | `log_id` | stream name and creation time: it changes when the stream is recreated |
//! | MANUAL-ack group cursors | the stream `<stream>-groups`: one message per group on `_EVENTBUS.<stream>.groups.<hex name>`, the last one kept (a key-value bucket by hand: NATS 2.9's answer to async-nats's bucket creation does not parse) |
//! | "is there a responder for this query anywhere?" | a core NATS request to `_EVENTBUS.<stream>.responders.<topic>`, answered by every node for each pattern it has subscribers for; NATS's no-responders status says "nobody" at once |
//!
//! A starting node creates the two streams when they are missing and updates them only when
//! their limits differ from its own flags ([`set_up_stream`]): nodes started together race to
//! create them, and a node joining running ones sends JetStream no write at all.
//!
//! # What a node keeps
//! Nothing of the stream: the tail it routes passes through a bounded channel
//! ([`TAIL_BUFFER`] events), the tail's last events are kept for reads just behind the head
//! ([`recent`]: at most 1,024 events and 4 MiB), other reads are fetched per call and dropped
//! by the caller, and the bounds it reports are a few cached numbers.
//!
//! # Sync reads over an async client
//! The [`Store`] read methods are synchronous (the embedded stores answer from memory or a
//! local file). This store answers them over the network: the NATS client lives on a runtime of
//! its own (two threads, `eventbus-nats`), and a read blocks its caller until the answer comes
//! back, bounded by [`REQUEST_TIMEOUT`]. On a multi-threaded runtime the caller's worker hands
//! its other tasks away first (`block_in_place`). Reads the caller would cut anyway (past the
//! last sequence this node has routed) return at once without a round trip, which covers the
//! common case of a replay that reaches the head; reads of what the tail has just read are
//! answered from its record ([`recent`]), so the one read made under the broker's routing
//! lock (a replay's last step) does not wait on JetStream. JetStream may serve a read from a replica
//! behind its leader; a read that skips or stops short of sequences the stream holds is read
//! again, never taken for the log (`JetStreamStore::fetch`).
//!
//! # Writes
//! Appends do not go through [`Store::append`] (which would assign sequences under the
//! broker's routing lock): a node hands batches to the stream in call order through
//! [`SharedLog::begin_append`], and routes only what it reads back from the stream's tail, so
//! every node routes every event, from whichever node it came, in sequence order.
//!
//! Because a node routes the tail at its own pace, a Subscribe with a start position first
//! asks the stream's last sequence ([`SharedLog::last_sequence`]) and waits (briefly) until
//! this node has routed it: a replay then holds everything any node had acknowledged before
//! the call, ahead of its `caught_up`.
//!
//! How the appends keep a node's call order across a stream leader's death and a dropped
//! connection (a connection of their own, never reconnected) is in [`append`]'s docs.
//!
//! A batch of 2 to [`append::MAX_ATOMIC_BATCH`] events goes out as one JetStream atomic batch
//! when the server has them with message ids (nats-server 2.12.1+; the stream then gets
//! `allow_atomic`): stored whole or not at all, at consecutive sequences, as on one bus
//! (`append::send_batch`). Otherwise a batch's events are separate messages: a message whose
//! acknowledgement fails is sent again with the same `Nats-Msg-Id` until it is acknowledged or
//! [`APPEND_DEADLINE`] passes, so a batch is stored whole unless JetStream stays unavailable
//! that long; a batch that fails may then be stored in part, and a retry by the publisher with
//! the same ids completes it without duplicates.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

mod append;
mod peer;
mod recent;

pub use append::STALL_AFTER;
use append::{AppendJob, AppendLink};
pub use peer::{PeerError, PeerRequest};
use recent::RecentTail;

use super::{codec, GroupCursor, HeldCounts, LogBounds, Store, StoreError, WithinBytes};
use crate::event::{Event, SharedEvent, StoredEvent};
use crate::topic::{Pattern, Topic};

/// How long one request to NATS (a read, a stream lookup, a cursor save) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a starting node keeps asking a JetStream that times out to set up its streams
/// before it gives up (a NATS cluster electing its meta leader answers nothing for seconds).
pub const SETUP_PATIENCE: Duration = Duration::from_secs(30);
/// How long an append keeps resending messages JetStream has not acknowledged.
pub const APPEND_DEADLINE: Duration = Duration::from_secs(30);
/// Events read from the tail and not yet routed, at most: the tail consumer waits (JetStream
/// flow control) while the broker is behind.
pub const TAIL_BUFFER: usize = 4096;
/// How many times a read served by a replica behind its leader is read again (with pauses of
/// 10 ms doubling to 200 ms, about 2 s in all) before it is refused.
pub const LAGGING_READ_RETRIES: u32 = 14;
/// How long cached stream facts (oldest sequence, held counts) are trusted.
const INFO_TTL: Duration = Duration::from_millis(500);

/// Where the stream lives and how it is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JetStreamConfig {
    /// NATS servers to connect to (`nats://host:4222`), any of them.
    pub urls: Vec<String>,
    /// The stream's name; its subjects are `<name>.>`.
    pub stream: String,
    /// Stream replicas: 1 on one NATS server, 3 in a cluster (an acknowledgement then means a
    /// quorum has the event).
    pub replicas: usize,
    /// Retention, as [`crate::broker::BusConfig`] has it.
    pub max_events: u64,
    pub max_bytes: u64,
    pub max_age: Option<Duration>,
    /// The duplicate window; zero: no dedupe (no `Nats-Msg-Id` is sent).
    pub dedupe_window: Duration,
    /// The largest message the stream takes, in bytes.
    pub max_message_bytes: usize,
    /// The largest event data the bus accepts: NATS's `max_payload` must fit it and the most
    /// metadata an event may carry ([`RECORD_OVERHEAD_BYTES`]), or the node refuses to start.
    pub max_event_data_bytes: usize,
}

/// The most an event's record may weigh beyond its data: 64 attributes of 128-byte keys and
/// 4 KiB values, eight names of 256 bytes, and framing (see `service::convert`'s limits),
/// rounded up.
pub const RECORD_OVERHEAD_BYTES: usize = 320 * 1024;

/// One event's place in the log after an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Its sequence; for a duplicate, the original's.
    pub sequence: u64,
    /// Whether the log already held an event with the same (source, id) within the window.
    pub duplicate: bool,
}

/// A log that several bus nodes share: the broker appends to it and routes what it reads back
/// from its tail, instead of routing its own appends.
pub trait SharedLog: Send + Sync + 'static {
    /// Hands `events` to the log, in the order of the calls (before returning), and resolves
    /// once the log has acknowledged each of them: one [`Appended`] per event, in order.
    fn begin_append(
        &self,
        events: Vec<Event>,
    ) -> BoxFuture<'static, Result<Vec<Appended>, StoreError>>;

    /// Every event of the log with a sequence greater than `after`, from every node, in
    /// sequence order, for as long as the receiver is kept. Called once per log.
    fn tail(&self, after: u64) -> mpsc::Receiver<SharedEvent>;

    /// Whether some other node has a subscriber whose pattern matches `topic` (it announced
    /// one with [`SharedLog::announce_interest`]). Errs towards `true` when NATS does not
    /// answer in time: a query then waits out its timeout rather than failing wrongly.
    fn remote_responders(&self, topic: &Topic) -> BoxFuture<'static, bool>;

    /// Tells the other nodes that this node now has (`present`) or no longer has subscribers
    /// for `pattern`. Never blocks: called under the routing lock.
    fn announce_interest(&self, pattern: &Pattern, present: bool);

    /// The node that has members of consumer group `group` (it announced them with
    /// [`SharedLog::announce_group`]), if another has; `None` when none answers in time.
    fn group_elsewhere(&self, group: &str) -> BoxFuture<'static, Option<PeerNode>>;

    /// Tells the other nodes that this node now has (`present`) or no longer has members of
    /// `group`. Sent before it returns; the future resolves once NATS has the announcement
    /// (at most [`ANNOUNCE_WAIT`] later), so a member confirmed after it is found by a member
    /// joining through another node. Dropping the future does not take the announcement back.
    fn announce_group(&self, group: &str, present: bool) -> BoxFuture<'static, ()>;

    /// Tells the other nodes that a query on `query_topic` waits for its reply on `inbox` here
    /// (`Some`), or no longer does (`None`). Never blocks.
    fn announce_inbox(&self, inbox: &Topic, query_topic: Option<&Topic>);

    /// The topic of the query waiting on `inbox` at another node, if one answers in time: how
    /// permissions check a reply into an inbox this node does not hold ([`crate::auth`]).
    fn inbox_query(&self, inbox: &Topic) -> BoxFuture<'static, Option<Topic>>;

    /// Answers the other nodes' [`SharedLog::peer_views`] with `view()`: this node's account
    /// of the clients connected to it, encoded by the broker (`crate::broker::peers`), made
    /// afresh for each request. Called once per log.
    fn answer_views(&self, view: Arc<dyn Fn() -> Bytes + Send + Sync>);

    /// Every other node's answer to [`SharedLog::answer_views`] (this node's own left out),
    /// gathered until none has come for [`VIEW_QUIET`] (and for at most [`VIEW_WINDOW`]);
    /// empty when NATS is away. A node that answers later than that is left out.
    fn peer_views(&self) -> BoxFuture<'static, Vec<Bytes>>;

    /// The last sequence the log holds now, as its leader says (one request); `None` when it
    /// does not answer within [`LAST_SEQUENCE_WAIT`]. What this node must have routed before a
    /// replay it starts can hold every event another node has had acknowledged.
    fn last_sequence(&self) -> BoxFuture<'static, Option<u64>>;

    /// This node's address among the nodes: a subject token (ASCII letters and digits), the
    /// [`PeerNode::key`] other nodes see.
    fn node_key(&self) -> &str;

    /// Requests other nodes send to `suffix` (a subject suffix of dot-separated tokens; this
    /// node's own ones start `node.<node_key>`) with [`SharedLog::ask_peer`], for as long as
    /// the receiver is kept; subscribed once the future resolves. See [`peer`].
    ///
    /// # Errors
    /// [`StoreError::Failed`] when NATS cannot take the subscription.
    fn serve_peer(
        &self,
        suffix: &str,
    ) -> BoxFuture<'static, Result<mpsc::Receiver<PeerRequest>, StoreError>>;

    /// One request to whichever node serves `suffix`, answered within `wait`.
    fn ask_peer(
        &self,
        suffix: &str,
        payload: Bytes,
        wait: Duration,
    ) -> BoxFuture<'static, Result<Bytes, PeerError>>;
}

/// Another bus node on the same log, as its announcements name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerNode {
    /// Its address for [`SharedLog::ask_peer`] (`node.<key>....`).
    pub key: String,
    /// Its name for people: `node <key> (pid <pid>)`.
    pub name: String,
}

/// How long [`SharedLog::announce_group`] waits for NATS to take the announcement.
pub const ANNOUNCE_WAIT: Duration = Duration::from_secs(1);

/// How long [`SharedLog::last_sequence`] waits for the stream's state.
pub const LAST_SEQUENCE_WAIT: Duration = Duration::from_secs(2);

/// How long [`SharedLog::peer_views`] waits for more answers after the last one came.
pub const VIEW_QUIET: Duration = Duration::from_millis(100);
/// The longest [`SharedLog::peer_views`] gathers answers.
pub const VIEW_WINDOW: Duration = Duration::from_secs(1);
/// The header naming the node that answered a view request, so the asker can leave its own out.
const NODE_HEADER: &str = "Eventbus-Node";

/// Cached facts about the stream, refreshed at most every [`INFO_TTL`].
#[derive(Debug, Default)]
struct Facts {
    first_sequence: u64,
    /// The oldest held event's publish time; `None` when nothing is held.
    first_time: Option<SystemTime>,
    /// The newest event's publish time, held or not; `None` before the first.
    last_time: Option<SystemTime>,
    /// The last counts read, answered while NATS cannot be asked.
    held: HeldCounts,
    info_at: Option<Instant>,
}

/// The log in a JetStream stream. See the module docs.
pub struct JetStreamStore {
    /// The NATS client's own runtime; `None` once dropped.
    runtime: Option<tokio::runtime::Runtime>,
    io: tokio::runtime::Handle,
    context: jetstream::Context,
    stream: String,
    /// `<stream>.`: a topic's subject is this plus the topic.
    subject_prefix: String,
    /// `_EVENTBUS.<stream>.responders.`
    responders_prefix: String,
    /// `_EVENTBUS.<stream>.members.`: a subject per consumer group this node has members of.
    members_prefix: String,
    /// `_EVENTBUS.<stream>.inboxes.`: a subject per reply inbox a query waits on here.
    inboxes_prefix: String,
    /// `_EVENTBUS.<stream>.views`: where nodes ask each other for their views (see
    /// [`SharedLog::peer_views`]).
    views_subject: String,
    urls: String,
    log_id: String,
    dedupe: bool,
    /// The stream of group cursors, and the subject prefix of its messages.
    cursors: String,
    cursor_prefix: String,
    publisher: mpsc::UnboundedSender<AppendJob>,
    /// Subjects to answer requests on (with that answer), or to stop answering (`None`).
    interest: mpsc::UnboundedSender<Announcement>,
    /// The node's name, the answer to responder and view requests.
    node: Bytes,
    /// The node's subject token ([`SharedLog::node_key`]).
    node_key: String,
    /// `_EVENTBUS.<stream>.peer.`: requests between nodes (see [`peer`]).
    peer_prefix: String,
    connected: Arc<AtomicBool>,
    /// The last sequence the tail has read: reads past it are answered empty at once.
    tail_head: Arc<AtomicU64>,
    /// The tail's last events: reads just behind the head are answered from here, without a
    /// round trip (see [`recent`]).
    recent: Arc<Mutex<RecentTail>>,
    /// The highest sequence this node knows the stream holds: what JetStream acknowledged for
    /// its appends, and the last sequence a replay asked for. A tail that stands still short of
    /// it is followed anew (see [`follow`]).
    acked_head: Arc<AtomicU64>,
    /// The stream's last sequence when this node opened it.
    head_at_open: u64,
    /// The stream's `max_msgs`.
    max_events: u64,
    /// Whether the stream stores a multi-event batch atomically (`allow_atomic`, NATS 2.12.1+;
    /// see [`append`]).
    atomic: bool,
    /// The stream's `max_age`, when it has one.
    max_age: Option<Duration>,
    facts: Mutex<Facts>,
}

impl std::fmt::Debug for JetStreamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamStore")
            .field("stream", &self.stream)
            .field("urls", &self.urls)
            .finish_non_exhaustive()
    }
}

fn failed(what: &str, error: impl std::fmt::Display) -> StoreError {
    StoreError::Failed(format!("{what}: {error}"))
}

impl JetStreamStore {
    /// Asks whichever node answers `subject` (one of the announcements of [`announce`]) and
    /// returns its answer; `None` when none answers within a second, or NATS is away.
    fn ask_nodes(&self, subject: String) -> BoxFuture<'static, Option<Bytes>> {
        let client = self.context.client();
        let asked = self.io.spawn(async move {
            match tokio::time::timeout(
                Duration::from_secs(1),
                client.request(subject, Bytes::new()),
            )
            .await
            {
                Ok(Ok(answer)) => Some(answer.payload),
                _ => None,
            }
        });
        Box::pin(async move { asked.await.ok().flatten() })
    }

    /// Connects to NATS, creates the stream (or updates its limits to `config`'s) and the
    /// cursor bucket. Must be called on a Tokio runtime; the client runs on one of its own.
    ///
    /// # Errors
    /// [`StoreError::Failed`] naming the URLs when NATS cannot be reached within
    /// [`REQUEST_TIMEOUT`], or the stream cannot be created (for example, its subjects overlap
    /// another stream's, or a cluster has fewer servers than `replicas`).
    pub async fn open(config: JetStreamConfig) -> Result<JetStreamStore, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("eventbus-nats")
            .enable_all()
            .build()
            .map_err(StoreError::Io)?;
        let io = runtime.handle().clone();
        let urls = config.urls.join(",");
        let connected = Arc::new(AtomicBool::new(false));
        let opened = io
            .spawn(connect(config.clone(), connected.clone()))
            .await
            .map_err(|error| failed("starting the NATS client", error))?;
        let (client, context, info) = match opened {
            Ok(opened) => opened,
            Err(error) => {
                runtime.shutdown_background();
                return Err(error);
            }
        };
        let stream = config.stream.clone();
        let created = info
            .created
            .unix_timestamp_nanos()
            .try_into()
            .unwrap_or(0u128);
        let head_at_open = info.state.last_sequence;
        let (publisher, jobs) = mpsc::unbounded_channel();
        let addresses = server_addresses(&config.urls)?;
        let link = Arc::new(AppendLink::new(addresses, urls.clone(), client.clone()));
        // Connected now, so that a node that cannot append does not start.
        if let Err(error) = io
            .spawn({
                let link = link.clone();
                async move { link.context().await.map(|_| ()) }
            })
            .await
            .map_err(|error| failed("starting the NATS client", error))
            .and_then(|connected| connected)
        {
            runtime.shutdown_background();
            return Err(error);
        }
        io.spawn(link.clone().replace_dropped());
        let acked_head = Arc::new(AtomicU64::new(head_at_open));
        io.spawn(append::publish_jobs(link, jobs, acked_head.clone()));
        let (interest, announcements) = mpsc::unbounded_channel();
        let responders_prefix = format!("_EVENTBUS.{stream}.responders.");
        // The last 12 hex digits of a UUIDv7: random bits.
        let node_key = crate::event::new_id()[24..].to_owned();
        let node = format!("node {node_key} (pid {})", std::process::id());
        let node = Bytes::from(node);
        io.spawn(announce(client.clone(), announcements));
        let store = JetStreamStore {
            runtime: Some(runtime),
            io,
            context,
            subject_prefix: format!("{stream}."),
            responders_prefix,
            members_prefix: format!("_EVENTBUS.{stream}.members."),
            inboxes_prefix: format!("_EVENTBUS.{stream}.inboxes."),
            views_subject: format!("_EVENTBUS.{stream}.views"),
            peer_prefix: format!("_EVENTBUS.{stream}.peer."),
            node,
            node_key,
            log_id: format!("{stream}-{created:x}"),
            stream,
            urls,
            dedupe: !config.dedupe_window.is_zero(),
            cursor_prefix: format!("_EVENTBUS.{}.groups.", config.stream),
            cursors: format!("{}-groups", config.stream),
            publisher,
            interest,
            connected,
            tail_head: Arc::new(AtomicU64::new(head_at_open)),
            recent: Arc::new(Mutex::new(RecentTail::starting_after(head_at_open))),
            acked_head,
            head_at_open,
            max_events: config.max_events,
            atomic: info.config.allow_atomic_publish,
            max_age: config.max_age.filter(|age| !age.is_zero()),
            facts: Mutex::new(Facts::default()),
        };
        store.note_info(&info);
        Ok(store)
    }

    /// Runs `future` on the NATS runtime and blocks the caller until it resolves or
    /// [`REQUEST_TIMEOUT`] passes.
    fn block<T: Send + 'static>(
        &self,
        what: &'static str,
        future: impl Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (sender, receiver) = std::sync::mpsc::sync_channel(1);
        self.io.spawn(async move {
            let result = match tokio::time::timeout(REQUEST_TIMEOUT, future).await {
                Ok(result) => result,
                Err(_) => Err(StoreError::Failed(format!(
                    "{what}: NATS did not answer within {REQUEST_TIMEOUT:?}"
                ))),
            };
            let _ = sender.send(result);
        });
        blocking(move || {
            receiver.recv().unwrap_or_else(|_| {
                Err(StoreError::Failed(format!(
                    "{what}: the NATS client stopped"
                )))
            })
        })
    }

    fn note_info(&self, info: &stream::Info) {
        let mut facts = self.lock_facts();
        facts.first_sequence = info.state.first_sequence;
        facts.first_time =
            (info.state.messages > 0).then(|| SystemTime::from(info.state.first_timestamp));
        facts.last_time =
            (info.state.last_sequence > 0).then(|| SystemTime::from(info.state.last_timestamp));
        facts.info_at = Some(Instant::now());
    }

    fn lock_recent(&self) -> std::sync::MutexGuard<'_, RecentTail> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_facts(&self) -> std::sync::MutexGuard<'_, Facts> {
        self.facts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refresh_info(&self) -> Result<(), StoreError> {
        let context = self.context.clone();
        let name = self.stream.clone();
        let info = self.block("reading the stream's state", async move {
            let stream = context
                .get_stream_no_info(&name)
                .await
                .map_err(|e| failed("looking up the stream", e))?;
            stream
                .get_info()
                .await
                .map_err(|e| failed("reading the stream's state", e))
        })?;
        self.note_info(&info);
        Ok(())
    }

    /// Reads up to `max` events after `after`, within `max_bytes`: the events from `after + 1`
    /// on, gap-free above the oldest sequence the stream holds, up to `max`, the byte bound or
    /// the last sequence this node has routed, whichever comes first.
    ///
    /// A read is served by an ephemeral consumer, which JetStream may place on a replica that
    /// is behind its leader (seen right after a stream leader was killed): such a read skips
    /// sequences the stream holds, or stops short of ones this node has already routed (which
    /// the stream therefore holds). Either is read again ([`LAGGING_READ_RETRIES`] times,
    /// with short pauses) and then refused with [`StoreError::Failed`], so a caller never takes
    /// a lagging replica's view for the log: a short read taken at face value would let a
    /// replay skip to live past events it never delivered. A read that fails outright (a
    /// JetStream 503 while a cluster settles after a fault, or no answer within
    /// [`REQUEST_TIMEOUT`]) is tried again for up to twice that before its error is returned.
    fn fetch(
        &self,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<SharedEvent>, StoreError> {
        let head = self.tail_head.load(Ordering::Acquire);
        if after >= head || max == 0 {
            return Ok(Vec::new());
        }
        let max = max.min((head - after) as usize);
        // Only from where the stream still holds events (as its last known state and the
        // count limit say), and with no event past the age limit: retention is the stream's,
        // and the record must not answer with what the stream has dropped.
        if after + 1 >= self.bounds().oldest.unwrap_or(u64::MAX) {
            if let Some(read) = self.lock_recent().after(after, max, max_bytes) {
                let now = SystemTime::now();
                let aged = self.max_age.is_some_and(|max_age| {
                    read.iter().any(|event| {
                        now.duration_since(event.publish_time)
                            .is_ok_and(|age| age >= max_age)
                    })
                });
                if !aged {
                    return Ok(read);
                }
            }
        }
        let mut pause = Duration::from_millis(10);
        let mut attempt = 0;
        // A read refused (a 503 while a cluster settles its consumers after a fault, say) or
        // timed out (a reader placed on a server that is down) is tried again until this
        // passes, rather than ending the subscriber's stream at once: at least one more try
        // after a timeout.
        let patience = Instant::now() + 2 * REQUEST_TIMEOUT;
        loop {
            let read = match self.fetch_once(after, max, max_bytes) {
                Ok(read) => read,
                Err(error) if Instant::now() < patience => {
                    tracing::debug!(after, %error, "a read of the log failed; reading again");
                    blocking(|| std::thread::sleep(pause));
                    pause = (pause * 2).min(Duration::from_millis(200));
                    continue;
                }
                Err(error) => return Err(error),
            };
            let lag = match self.lagging(after, max, &read)? {
                None => return Ok(read.events),
                Some(lag) => lag,
            };
            attempt += 1;
            if attempt > LAGGING_READ_RETRIES {
                return Err(StoreError::Failed(format!(
                    "reading the log after {after}: {lag} (a replica behind its leader?); \
                     read again"
                )));
            }
            tracing::debug!(after, %lag, attempt, "a read from a replica behind; reading again");
            blocking(|| std::thread::sleep(pause));
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// One read through an ephemeral pull consumer (created, fetched once without waiting,
    /// deleted), cut at the first skip in the stream sequences it was served.
    fn fetch_once(&self, after: u64, max: usize, max_bytes: usize) -> Result<Read, StoreError> {
        let context = self.context.clone();
        let name = self.stream.clone();
        let prefix_len = self.subject_prefix.len();
        self.block("reading the log", async move {
            let stream = context
                .get_stream_no_info(&name)
                .await
                .map_err(|e| failed("looking up the stream", e))?;
            let consumer = stream
                .create_consumer(read_consumer(
                    consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: after + 1,
                    },
                    max,
                ))
                .await
                .map_err(|e| failed("creating a reader", e))?;
            let name = consumer.cached_info().name.clone();
            let mut batch = consumer
                .fetch()
                .max_messages(max)
                .messages()
                .await
                .map_err(|e| failed("reading the log", e))?;
            let mut read = Read::default();
            let mut messages = 0;
            let mut within = WithinBytes::new(max_bytes);
            while let Some(message) = batch.next().await {
                let message = message.map_err(|e| failed("reading the log", e))?;
                let Ok(info) = message.info() else {
                    // Not a stream message: it has no place in the log to check.
                    continue;
                };
                let sequence = info.stream_sequence;
                match read.through {
                    None => read.first = Some(sequence),
                    Some(through) if sequence != through + 1 => break,
                    Some(_) => {}
                }
                // A message the bus did not write still holds its place in the sequence.
                if let Some(event) = decode(&message, prefix_len) {
                    if !within.admits(&event) {
                        read.full = true;
                        break;
                    }
                    read.events.push(Arc::new(event));
                }
                read.through = Some(sequence);
                messages += 1;
                if messages >= max {
                    read.full = true;
                    break;
                }
            }
            drop(batch);
            tokio::spawn(async move {
                let _ = stream.delete_consumer(&name).await;
            });
            Ok(read)
        })
    }

    /// Why a read of up to `max` events after `after` is not the log as it stands (`None`: it
    /// is), see [`lag_of`]; the stream's oldest sequence is asked of the stream itself (one
    /// more round trip, only for a read that starts late or ends short).
    fn lagging(&self, after: u64, max: usize, read: &Read) -> Result<Option<String>, StoreError> {
        lag_of(after, max, read, || {
            self.refresh_info()?;
            Ok(self.lock_facts().first_sequence)
        })
    }
}

/// Why a read of up to `max` events after `after` (with `after + max` at most the last
/// sequence the node has routed, so held unless retention dropped it) is not the log as it
/// stands, or `None` when it is. Retention drops only from the front, so above the oldest held
/// sequence (`oldest()`) every sequence is there: a read that starts past `after + 1` and past
/// the oldest, or stops short of `after + max` (not at its count or byte bound) with the
/// next sequence still held, was served by a replica behind its leader.
fn lag_of(
    after: u64,
    max: usize,
    read: &Read,
    mut oldest: impl FnMut() -> Result<u64, StoreError>,
) -> Result<Option<String>, StoreError> {
    if let Some(first) = read.first.filter(|first| *first > after + 1) {
        let expected = (after + 1).max(oldest()?);
        if first > expected {
            return Ok(Some(format!(
                "skipped to {first} though the stream holds {expected} on"
            )));
        }
    }
    let through = read.through.unwrap_or(after);
    let end = after + max as u64;
    if read.full || through >= end {
        return Ok(None);
    }
    // Short: fine only if what follows was dropped meanwhile (the next read then starts past
    // it, which the check above accepts).
    if oldest()? > through + 1 {
        return Ok(None);
    }
    Ok(Some(format!(
        "stopped at {through} though the stream holds through {end}"
    )))
}

/// Runs `wait`, which blocks its thread; on a multi-threaded runtime the caller's worker hands
/// its other tasks away first.
fn blocking<T>(wait: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

/// What one read through an ephemeral consumer was served.
#[derive(Default)]
struct Read {
    /// The events, in sequence order.
    events: Vec<SharedEvent>,
    /// The first stream sequence served, and the last one before the first skip (messages the
    /// bus did not write included: they hold their place).
    first: Option<u64>,
    through: Option<u64>,
    /// Whether the read stopped at its count or byte bound rather than where the stream ran
    /// out.
    full: bool,
}

/// An ephemeral pull consumer that reads once: explicit ack (NATS 2.9 refuses pull consumers
/// without), never acked, gone soon after it is left.
fn read_consumer(deliver_policy: consumer::DeliverPolicy, max: usize) -> consumer::pull::Config {
    consumer::pull::Config {
        deliver_policy,
        ack_policy: consumer::AckPolicy::Explicit,
        max_ack_pending: max.max(1) as i64,
        inactive_threshold: Duration::from_secs(10),
        memory_storage: true,
        num_replicas: 1,
        ..Default::default()
    }
}

/// A message of the stream as the event it holds, with the stream's sequence and timestamp; a
/// message the bus did not write is skipped with a warning.
fn decode(message: &jetstream::Message, prefix_len: usize) -> Option<StoredEvent> {
    let info = match message.info() {
        Ok(info) => info,
        Err(error) => {
            tracing::warn!(%error, subject = %message.subject, "a stream message without JetStream metadata: skipped");
            return None;
        }
    };
    let sequence = info.stream_sequence;
    let published = SystemTime::from(info.published);
    match codec::decode(&message.payload) {
        Ok((mut event, _)) => {
            event.sequence = sequence;
            event.publish_time = published;
            // As the other stores do on append: an event without a time is stamped with its
            // publish time (here JetStream's, known only once stored).
            event.event.time.get_or_insert(published);
            Some(event)
        }
        Err(error) => {
            let subject = message.subject.as_str();
            tracing::warn!(
                sequence,
                subject = subject.get(prefix_len..).unwrap_or(subject),
                %error,
                "a stream message the bus did not write (publish through the bus, not to the stream's subjects): skipped"
            );
            None
        }
    }
}

/// The NATS servers `urls` name.
fn server_addresses(urls: &[String]) -> Result<Vec<async_nats::ServerAddr>, StoreError> {
    urls.iter()
        .map(|url| {
            url.parse()
                .map_err(|e| failed(&format!("NATS URL {url:?}"), e))
        })
        .collect()
}

async fn connect(
    config: JetStreamConfig,
    connected: Arc<AtomicBool>,
) -> Result<(async_nats::Client, jetstream::Context, stream::Info), StoreError> {
    let urls = config.urls.join(",");
    let addresses = server_addresses(&config.urls)?;
    let flag = connected.clone();
    let options = async_nats::ConnectOptions::new()
        .name("eventbus")
        .connection_timeout(REQUEST_TIMEOUT)
        .max_reconnects(None)
        .event_callback(move |event| {
            let flag = flag.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        flag.store(true, Ordering::Release);
                        tracing::info!("connected to NATS");
                    }
                    async_nats::Event::Disconnected => {
                        flag.store(false, Ordering::Release);
                        tracing::warn!(
                            "lost the connection to NATS: publishes refused until it is back"
                        );
                    }
                    other => tracing::debug!(event = %other, "NATS client event"),
                }
            }
        });
    let client = tokio::time::timeout(REQUEST_TIMEOUT, options.connect(addresses))
        .await
        .map_err(|_| {
            StoreError::Failed(format!(
                "cannot reach NATS at {urls}: no answer within {REQUEST_TIMEOUT:?} (is nats-server running there, with JetStream enabled?)"
            ))
        })?
        .map_err(|e| StoreError::Failed(format!("cannot reach NATS at {urls}: {e}")))?;
    let max_payload = client.server_info().max_payload;
    let needed = config.max_event_data_bytes + RECORD_OVERHEAD_BYTES;
    if max_payload < needed {
        return Err(StoreError::Failed(format!(
            "NATS at {urls} takes messages of at most {max_payload} bytes (its max_payload), \
             but events of up to {} bytes of data (--max-event-data-bytes) need {needed}: raise \
             max_payload in the nats-server configuration (8MB is NATS's advice) or lower \
             --max-event-data-bytes",
            config.max_event_data_bytes
        )));
    }
    // The callback may not have run yet for the first connection.
    connected.store(
        client.connection_state() == async_nats::connection::State::Connected,
        Ordering::Release,
    );
    let context = jetstream::ContextBuilder::new()
        .timeout(REQUEST_TIMEOUT)
        .max_ack_inflight(16_384)
        .backpressure_on_inflight(true)
        .build(client.clone());
    let atomic = supports_atomic_batches(&client.server_info().version);
    let max_age = config.max_age.unwrap_or_default();
    let mut duplicate_window = config.dedupe_window;
    if !max_age.is_zero() && duplicate_window > max_age {
        duplicate_window = max_age;
    }
    let stream_config = stream::Config {
        name: config.stream.clone(),
        subjects: vec![format!("{}.>", config.stream)],
        max_messages: i64::try_from(config.max_events).unwrap_or(i64::MAX),
        max_bytes: i64::try_from(config.max_bytes).unwrap_or(i64::MAX),
        max_age,
        max_message_size: i32::try_from(config.max_message_bytes).unwrap_or(i32::MAX),
        max_messages_per_subject: -1,
        discard: stream::DiscardPolicy::Old,
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        duplicate_window: if duplicate_window.is_zero() {
            Duration::from_millis(1)
        } else {
            duplicate_window
        },
        allow_direct: true,
        allow_atomic_publish: atomic,
        description: Some("eventbus log: written by eventbus nodes only".to_owned()),
        ..Default::default()
    };
    let cursors = stream::Config {
        name: format!("{}-groups", config.stream),
        subjects: vec![format!("_EVENTBUS.{}.groups.*", config.stream)],
        max_messages_per_subject: 1,
        // What JetStream reports for "no limit" and its default window, spelled out so that
        // a node finds an existing stream unchanged (`update_stream`).
        max_messages: -1,
        max_bytes: -1,
        max_message_size: -1,
        duplicate_window: Duration::from_secs(120),
        discard: stream::DiscardPolicy::Old,
        storage: stream::StorageType::File,
        num_replicas: config.replicas,
        allow_direct: true,
        description: Some("eventbus MANUAL-ack group cursors, the last per group".to_owned()),
        ..Default::default()
    };
    let patience = tokio::time::Instant::now() + SETUP_PATIENCE;
    let info = set_up_stream(&context, &stream_config, &urls, patience).await?;
    set_up_stream(&context, &cursors, &urls, patience).await?;
    Ok((client, context, info))
}

/// Whether a nats-server of `version` (`2.15.1`) stores a batch atomically with the
/// `Nats-Msg-Id` of each message checked: atomic batch publish came in 2.12.0 (ADR-50), and
/// message ids inside a batch in 2.12.1. An unparsable version counts as too old.
fn supports_atomic_batches(version: &str) -> bool {
    let mut parts = version
        .split(['.', '-'])
        .map(|part| part.parse::<u64>().unwrap_or(0));
    let (major, minor, patch) = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    (major, minor, patch) >= (2, 12, 1)
}

/// Makes sure the stream `wanted.name` exists with `wanted`'s settings: creates it when it is
/// missing, updates it when its limits differ, and leaves it alone otherwise (a node starting
/// beside running ones sends no write to JetStream's meta layer).
///
/// Nodes started together race to create it: the loser's create fails (the name or the
/// subjects are taken) and looking again finds the winner's stream. JetStream may answer slowly
/// or not at all for a while (a cluster electing its meta leader, a loaded server, NATS 2.9's
/// parallel stream creation, nats-server issue #3677): an attempt that fails is made again,
/// with backoff from 50 ms to 1 s: any failure twice, then timeouts and unavailability until
/// `patience` (a refusal such as more replicas than servers is reported at once). A stream of
/// that name with other subjects was not made by eventbus and is refused at once.
///
/// # Errors
/// [`StoreError::Failed`] naming the stream and `urls`, with JetStream's last answer.
async fn set_up_stream(
    context: &jetstream::Context,
    wanted: &stream::Config,
    urls: &str,
    patience: tokio::time::Instant,
) -> Result<stream::Info, StoreError> {
    let failed = |e: &dyn std::fmt::Display| {
        format!(
            "cannot set up JetStream stream {} at {urls}: {e}",
            wanted.name
        )
    };
    let mut pause = Duration::from_millis(50);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let attempt = async {
            let existing = match context.get_stream(&wanted.name).await {
                Ok(existing) => existing,
                Err(lookup) => match context.create_stream(wanted.clone()).await {
                    Ok(mut created) => {
                        return created.info().await.cloned().map_err(Retry::from)
                    }
                    Err(create) => context.get_stream(&wanted.name).await.map_err(|again| {
                        tracing::debug!(stream = %wanted.name, %lookup, %again, "looking the stream up failed");
                        Retry::from(create)
                    })?,
                },
            };
            update_stream(context, existing, wanted).await
        };
        match attempt.await {
            Ok(info) => return Ok(info),
            Err(Retry::Refused(why)) => return Err(StoreError::Failed(failed(&why))),
            // Any failure is tried again twice (a lost race may fail both the create and
            // the look-up while the winner's stream is being made); then only slow answers.
            Err(Retry::Again(why))
                if attempts < 3
                    || (is_transient(&why) && tokio::time::Instant::now() < patience) =>
            {
                if is_transient(&why) {
                    tracing::warn!(stream = %wanted.name, %why, "JetStream is slow to set the stream up; asking again");
                } else {
                    tracing::debug!(stream = %wanted.name, %why, "setting the stream up failed; asking again");
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            Err(Retry::Again(why)) => return Err(StoreError::Failed(failed(&why))),
        }
    }
}

/// Whether a JetStream failure may pass by itself: no answer in time, JetStream "temporarily
/// unavailable" (10008, a cluster without a meta leader) or nobody listening on its API yet.
fn is_transient(why: &str) -> bool {
    let why = why.to_ascii_lowercase();
    why.contains("timed out")
        || why.contains("temporarily unavailable")
        || why.contains("no responders")
}

/// How a step of [`set_up_stream`] failed: for good, or worth asking again.
enum Retry {
    /// The stream is not ours: no answer will change that.
    Refused(String),
    /// Any other failure (a timeout, a lost race, a server busy electing a leader).
    Again(String),
}

impl<E: std::fmt::Display> From<E> for Retry {
    fn from(error: E) -> Retry {
        Retry::Again(error.to_string())
    }
}

/// Brings an existing stream's limits to `wanted` when they differ, refusing a stream of the
/// same name that eventbus did not make (other subjects).
async fn update_stream(
    context: &jetstream::Context,
    mut existing: stream::Stream,
    wanted: &stream::Config,
) -> Result<stream::Info, Retry> {
    let info = existing.info().await?.clone();
    let current = &info.config;
    if current.subjects != wanted.subjects {
        return Err(Retry::Refused(format!(
            "the stream exists with subjects {:?}, not {:?}: it was not made by eventbus; \
             choose another --jetstream-stream",
            current.subjects, wanted.subjects
        )));
    }
    let same = current.max_messages == wanted.max_messages
        && current.max_bytes == wanted.max_bytes
        && current.max_age == wanted.max_age
        && current.max_message_size == wanted.max_message_size
        && current.max_messages_per_subject == wanted.max_messages_per_subject
        && current.discard == wanted.discard
        && current.num_replicas == wanted.num_replicas
        && current.duplicate_window == wanted.duplicate_window
        && current.allow_direct == wanted.allow_direct
        && current.allow_atomic_publish == wanted.allow_atomic_publish
        && current.description == wanted.description;
    if same {
        return Ok(info);
    }
    Ok(context
        .update_stream(&stream::Config {
            // Fixed at creation: keep what the stream has.
            storage: current.storage,
            ..wanted.clone()
        })
        .await?)
}

/// Answers, with this node's name, requests on each subject this node announces:
/// `_EVENTBUS.<stream>.responders.<pattern>` for each pattern it has subscribers for (so
/// another node can ask whether anyone would answer a query) and
/// `_EVENTBUS.<stream>.members.<group>` for each consumer group it has members of.
async fn announce(
    client: async_nats::Client,
    mut announcements: mpsc::UnboundedReceiver<Announcement>,
) {
    let mut answering: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    while let Some(Announcement {
        subject,
        answer,
        done,
    }) = announcements.recv().await
    {
        let Some(node) = answer else {
            if let Some(task) = answering.remove(&subject) {
                task.abort();
            }
            if let Some(done) = done {
                let _ = done.send(());
            }
            continue;
        };
        if answering.contains_key(&subject) {
            if let Some(done) = done {
                let _ = done.send(());
            }
            continue;
        }
        let key = subject.clone();
        let client = client.clone();
        let task = tokio::spawn(async move {
            let mut requests = match client.subscribe(subject.clone()).await {
                Ok(requests) => requests,
                Err(error) => {
                    tracing::warn!(%error, %subject, "cannot announce a responder");
                    return;
                }
            };
            if let Some(done) = done {
                // The server has the subscription once the flush returns.
                let _ = client.flush().await;
                let _ = done.send(());
            }
            while let Some(request) = requests.next().await {
                if let Some(reply) = request.reply {
                    let _ = client.publish(reply, node.clone()).await;
                }
            }
        });
        answering.insert(key, task);
    }
}

/// A subject to answer requests on with `answer`, or to stop answering (`None`); `done` is told
/// once NATS has it.
struct Announcement {
    subject: String,
    answer: Option<Bytes>,
    done: Option<oneshot::Sender<()>>,
}

/// How long the tail may read nothing while this node's appends were acknowledged past it
/// before it is followed anew (see [`follow`]).
const TAIL_STALL: Duration = Duration::from_secs(2);

/// Reads the stream from `after + 1` on, for ever, with an ordered consumer (the client
/// recreates it across gaps and reconnects), and hands each event to `sink` in order.
///
/// An ordered consumer lives on the stream's leader; when that server dies, the client notices
/// only after two missed idle heartbeats (10 s, fixed in async-nats) and then asks for a new
/// one, while every publish on this node waits to see its events come back (seen: 10–25 s
/// in a trial), and a replay started here waits for the tail to reach the stream's last
/// sequence. So a watchdog follows the tail anew, from the last sequence read, once it has
/// read nothing for [`TAIL_STALL`] although the stream is known to hold more (`acked_head`:
/// this node's acknowledged appends, the last sequence a replay asked for, and the stream's
/// last sequence, which the watchdog asks for itself at most once per [`TAIL_STALL`] while the
/// tail is quiet, waiting up to [`REQUEST_TIMEOUT`] for the answer beside the tail: one small
/// request every 2 s on an idle bus).
async fn follow(
    context: jetstream::Context,
    stream_name: String,
    prefix_len: usize,
    after: u64,
    tail: Tail,
    acked_head: Arc<AtomicU64>,
    sink: mpsc::Sender<SharedEvent>,
) {
    let mut last = after;
    // The last stream sequence read, of any message (one the bus did not write included).
    let mut seen = after;
    let mut pause = Duration::from_millis(50);
    let mut failed_to_follow = false;
    loop {
        let messages = async {
            let stream = context
                .get_stream_no_info(&stream_name)
                .await
                .map_err(|e| e.to_string())?;
            let consumer = stream
                .create_consumer(consumer::push::OrderedConfig {
                    deliver_subject: context.client().new_inbox(),
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: last + 1,
                    },
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            consumer.messages().await.map_err(|e| e.to_string())
        }
        .await;
        let mut messages = match messages {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(%error, "cannot follow the stream's tail; trying again");
                failed_to_follow = true;
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = sink.closed() => return,
                }
                pause = (pause * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        // The warning above says the tail is not followed; this says it is again.
        if std::mem::take(&mut failed_to_follow) {
            tracing::info!(after = last, "following the stream's tail again");
        }
        pause = Duration::from_millis(50);
        let mut check = tokio::time::interval(TAIL_STALL / 4);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // The last sequence read, and since when; when the stream was last asked how far it
        // goes.
        let mut progress = (seen, tokio::time::Instant::now());
        let mut asked_at = None;
        // The stream's last sequence, asked for while the tail is quiet: polled beside the
        // tail rather than awaited, since right after a leader's death JetStream may take
        // seconds to answer (a node without appends of its own has no other way to learn that
        // its tail stands still, and a 1 s wait left one such node unaware for minutes).
        let mut asking: Option<futures_util::future::BoxFuture<'static, Option<u64>>> = None;
        loop {
            let next = tokio::select! {
                next = messages.next() => next,
                _ = sink.closed() => return,
                held = async { asking.as_mut().expect("guarded").await }, if asking.is_some() => {
                    asking = None;
                    if let Some(held) = held {
                        // The stream's word is final (it may hold less than was known, if it
                        // was made anew).
                        acked_head.store(held, Ordering::Release);
                    }
                    continue;
                }
                _ = check.tick() => {
                    if seen != progress.0 {
                        progress = (seen, tokio::time::Instant::now());
                        continue;
                    }
                    if progress.1.elapsed() < TAIL_STALL {
                        continue;
                    }
                    let known = acked_head.load(Ordering::Acquire);
                    if known > seen {
                        tracing::info!(
                            seen,
                            known,
                            "the stream's tail stands still short of what the stream holds: following it anew"
                        );
                        break;
                    }
                    // Quiet for a while: ask the stream how far it goes (at most once per
                    // TAIL_STALL, one request at a time), so a node with no appends of its
                    // own notices too.
                    if asking.is_none()
                        && asked_at.is_none_or(|at: tokio::time::Instant| at.elapsed() >= TAIL_STALL)
                    {
                        asked_at = Some(tokio::time::Instant::now());
                        let context = context.clone();
                        let stream_name = stream_name.clone();
                        asking = Some(Box::pin(async move {
                            stream_last_sequence(&context, &stream_name, REQUEST_TIMEOUT).await
                        }));
                    }
                    continue;
                }
            };
            match next {
                Some(Ok(message)) => {
                    let sequence = message.info().ok().map(|info| info.stream_sequence);
                    if let Some(sequence) = sequence {
                        seen = seen.max(sequence);
                    }
                    let event = decode(&message, prefix_len).map(Arc::new);
                    if let Some(sequence) = sequence {
                        tail.record(sequence, event.as_ref());
                    }
                    let Some(event) = event else {
                        continue;
                    };
                    if event.sequence <= last {
                        continue;
                    }
                    last = event.sequence;
                    tail.head.fetch_max(last, Ordering::AcqRel);
                    if sink.send(event).await.is_err() {
                        return;
                    }
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, "the stream's tail reported an error");
                }
                None => break,
            }
        }
    }
}

/// What the tail shares with the store's reads: the last sequence it read, and its last
/// events.
struct Tail {
    head: Arc<AtomicU64>,
    recent: Arc<Mutex<RecentTail>>,
}

impl Tail {
    /// Records stream message `sequence` (the bus's `event`, or another's), before the event
    /// is handed on, so a read that finds it routed finds it here too.
    fn record(&self, sequence: u64, event: Option<&SharedEvent>) {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read(sequence, event);
    }
}

/// The stream's last sequence, as its leader says; `None` without an answer within `wait`.
async fn stream_last_sequence(
    context: &jetstream::Context,
    stream_name: &str,
    wait: Duration,
) -> Option<u64> {
    let read = async {
        let stream = context.get_stream_no_info(stream_name).await.ok()?;
        let info = stream.get_info().await.ok()?;
        Some(info.state.last_sequence)
    };
    tokio::time::timeout(wait, read).await.ok().flatten()
}

/// A header-safe `Nats-Msg-Id` for (source, id): both percent-escaped where they hold a byte
/// outside printable ASCII, `%` or the separating `|`, so different pairs never share an id.
fn message_id(source: &str, id: &str) -> String {
    fn push(out: &mut String, text: &str) {
        for byte in text.bytes() {
            if byte.is_ascii_graphic() && byte != b'%' && byte != b'|' {
                out.push(byte as char);
            } else {
                out.push_str(&format!("%{byte:02X}"));
            }
        }
    }
    let mut out = String::with_capacity(source.len() + id.len() + 1);
    push(&mut out, source);
    out.push('|');
    push(&mut out, id);
    out
}

/// A group name as a key of the cursor bucket: hex, since group names may hold characters
/// keys may not.
fn cursor_key(group: &str) -> String {
    let mut key = String::with_capacity(2 + group.len() * 2);
    key.push_str("g_");
    for byte in group.bytes() {
        key.push_str(&format!("{byte:02x}"));
    }
    key
}

fn group_of_key(key: &str) -> Option<String> {
    let hex = key.strip_prefix("g_")?;
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
        })
        .collect();
    String::from_utf8(bytes?).ok()
}

impl SharedLog for JetStreamStore {
    fn begin_append(
        &self,
        events: Vec<Event>,
    ) -> BoxFuture<'static, Result<Vec<Appended>, StoreError>> {
        let now = SystemTime::now();
        let events_len = events.len();
        let messages = events
            .into_iter()
            .map(|event| {
                let subject = format!("{}{}", self.subject_prefix, event.topic.as_str());
                let id = self.dedupe.then(|| message_id(&event.source, &event.id));
                let mut payload = Vec::new();
                codec::encode(&StoredEvent::new(0, now, event), &mut payload);
                (subject, Bytes::from(payload), id)
            })
            .collect();
        let (reply, answer) = oneshot::channel();
        let atomic = self.atomic && (2..=append::MAX_ATOMIC_BATCH).contains(&events_len);
        let sent = self.publisher.send(AppendJob {
            messages,
            atomic,
            reply,
        });
        Box::pin(async move {
            sent.map_err(|_| StoreError::Failed("the NATS client stopped".into()))?;
            answer
                .await
                .map_err(|_| StoreError::Failed("the NATS client stopped".into()))?
        })
    }

    fn tail(&self, after: u64) -> mpsc::Receiver<SharedEvent> {
        let (sender, receiver) = mpsc::channel(TAIL_BUFFER);
        *self.lock_recent() = RecentTail::starting_after(after);
        self.io.spawn(follow(
            self.context.clone(),
            self.stream.clone(),
            self.subject_prefix.len(),
            after,
            Tail {
                head: self.tail_head.clone(),
                recent: self.recent.clone(),
            },
            self.acked_head.clone(),
            sender,
        ));
        receiver
    }

    fn remote_responders(&self, topic: &Topic) -> BoxFuture<'static, bool> {
        let client = self.context.client();
        let subject = format!("{}{}", self.responders_prefix, topic.as_str());
        let io = self.io.clone();
        Box::pin(async move {
            let asked = io.spawn(async move {
                match tokio::time::timeout(
                    Duration::from_secs(1),
                    client.request(subject, Bytes::new()),
                )
                .await
                {
                    Ok(Ok(_)) => true,
                    Ok(Err(error)) => {
                        error.kind() != async_nats::client::RequestErrorKind::NoResponders
                    }
                    Err(_) => true,
                }
            });
            asked.await.unwrap_or(true)
        })
    }

    fn announce_interest(&self, pattern: &Pattern, present: bool) {
        let subject = format!("{}{}", self.responders_prefix, pattern.as_str());
        let _ = self.interest.send(Announcement {
            subject,
            answer: present.then(|| self.node.clone()),
            done: None,
        });
    }

    fn last_sequence(&self) -> BoxFuture<'static, Option<u64>> {
        let context = self.context.clone();
        let name = self.stream.clone();
        // What the stream holds is also what the tail should reach: its watchdog follows the
        // tail anew when it stands still short of this (see `follow`).
        let known_head = self.acked_head.clone();
        let asked = self.io.spawn(async move {
            let last = stream_last_sequence(&context, &name, LAST_SEQUENCE_WAIT).await?;
            known_head.fetch_max(last, Ordering::AcqRel);
            Some(last)
        });
        Box::pin(async move { asked.await.ok().flatten() })
    }

    fn group_elsewhere(&self, group: &str) -> BoxFuture<'static, Option<PeerNode>> {
        let asked = self.ask_nodes(format!("{}{}", self.members_prefix, cursor_key(group)));
        let own = self.node_key.clone();
        Box::pin(async move {
            let answer = asked.await?;
            let (key, name) = std::str::from_utf8(&answer).ok()?.split_once(' ')?;
            // This node's own announcement, not yet withdrawn (its last member has just
            // left, and the unsubscribe is still on its way to NATS), is not "elsewhere".
            (key != own).then(|| PeerNode {
                key: key.to_owned(),
                name: name.to_owned(),
            })
        })
    }

    /// The announcement answers `<node key> <node name>`: the key to reach the group's home
    /// with, the name for people.
    fn announce_group(&self, group: &str, present: bool) -> BoxFuture<'static, ()> {
        let subject = format!("{}{}", self.members_prefix, cursor_key(group));
        let answer = present.then(|| {
            let mut answer = format!("{} ", self.node_key).into_bytes();
            answer.extend_from_slice(&self.node);
            Bytes::from(answer)
        });
        let (done, taken) = oneshot::channel();
        let _ = self.interest.send(Announcement {
            subject,
            answer,
            done: Some(done),
        });
        Box::pin(async move {
            let _ = tokio::time::timeout(ANNOUNCE_WAIT, taken).await;
        })
    }

    fn node_key(&self) -> &str {
        &self.node_key
    }

    fn serve_peer(
        &self,
        suffix: &str,
    ) -> BoxFuture<'static, Result<mpsc::Receiver<PeerRequest>, StoreError>> {
        let client = self.context.client();
        let subject = format!("{}{suffix}", self.peer_prefix);
        let served = self.io.spawn(peer::serve(client, subject.clone()));
        Box::pin(async move {
            match served.await {
                Ok(Ok(receiver)) => Ok(receiver),
                Ok(Err(error)) => Err(failed(&format!("subscribing to {subject}"), error)),
                Err(error) => Err(failed(&format!("subscribing to {subject}"), error)),
            }
        })
    }

    fn ask_peer(
        &self,
        suffix: &str,
        payload: Bytes,
        wait: Duration,
    ) -> BoxFuture<'static, Result<Bytes, PeerError>> {
        let client = self.context.client();
        let subject = format!("{}{suffix}", self.peer_prefix);
        let asked = self.io.spawn(peer::ask(client, subject, payload, wait));
        Box::pin(async move {
            asked
                .await
                .unwrap_or_else(|error| Err(PeerError::Failed(error.to_string())))
        })
    }

    fn announce_inbox(&self, inbox: &Topic, query_topic: Option<&Topic>) {
        let subject = format!("{}{}", self.inboxes_prefix, inbox.as_str());
        let answer = query_topic.map(|topic| Bytes::copy_from_slice(topic.as_str().as_bytes()));
        let _ = self.interest.send(Announcement {
            subject,
            answer,
            done: None,
        });
    }

    fn inbox_query(&self, inbox: &Topic) -> BoxFuture<'static, Option<Topic>> {
        let asked = self.ask_nodes(format!("{}{}", self.inboxes_prefix, inbox.as_str()));
        Box::pin(async move {
            let answer = asked.await?;
            Topic::parse(std::str::from_utf8(&answer).ok()?).ok()
        })
    }

    fn answer_views(&self, view: Arc<dyn Fn() -> Bytes + Send + Sync>) {
        let client = self.context.client();
        let subject = self.views_subject.clone();
        let node = String::from_utf8_lossy(&self.node).into_owned();
        self.io.spawn(async move {
            // Resubscribed by the client after a reconnect.
            let mut requests = match client.subscribe(subject.clone()).await {
                Ok(requests) => requests,
                Err(error) => {
                    tracing::warn!(%error, %subject, "cannot answer other nodes' view requests: their topics and topology will leave this node's clients out");
                    return;
                }
            };
            while let Some(request) = requests.next().await {
                let Some(reply) = request.reply else {
                    continue;
                };
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(NODE_HEADER, node.as_str());
                let _ = client.publish_with_headers(reply, headers, view()).await;
            }
        });
    }

    fn peer_views(&self) -> BoxFuture<'static, Vec<Bytes>> {
        let client = self.context.client();
        let subject = self.views_subject.clone();
        let own = String::from_utf8_lossy(&self.node).into_owned();
        let gathered = self.io.spawn(async move {
            let inbox = client.new_inbox();
            let Ok(mut answers) = client.subscribe(inbox.clone()).await else {
                return Vec::new();
            };
            if client
                .publish_with_reply(subject, inbox, Bytes::new())
                .await
                .is_err()
            {
                return Vec::new();
            }
            let window = tokio::time::Instant::now() + VIEW_WINDOW;
            // Until the first answer (this node's own comes at once), the whole window.
            let mut until = window;
            let mut views = Vec::new();
            while let Ok(Some(answer)) = tokio::time::timeout_at(until, answers.next()).await {
                let from = answer
                    .headers
                    .as_ref()
                    .and_then(|headers| headers.get(NODE_HEADER))
                    .map(|node| node.as_str().to_owned());
                if from.as_deref() != Some(own.as_str()) {
                    views.push(answer.payload);
                }
                until = (tokio::time::Instant::now() + VIEW_QUIET).min(window);
            }
            views
        });
        Box::pin(async move { gathered.await.unwrap_or_default() })
    }
}

impl Store for JetStreamStore {
    fn kind(&self) -> &'static str {
        "jetstream"
    }

    /// Refused: a shared log is appended to through [`SharedLog::begin_append`] (the broker
    /// does so), because its sequences are assigned by JetStream, not under a local lock.
    fn append(&self, events: Vec<Event>, now: SystemTime) -> Result<Vec<SharedEvent>, StoreError> {
        let _ = (events, now);
        Err(StoreError::Failed(
            "a JetStream log is appended to through SharedLog::begin_append".into(),
        ))
    }

    fn read_after(&self, after: u64, max: usize) -> Result<Vec<SharedEvent>, StoreError> {
        self.fetch(after, max, usize::MAX)
    }

    fn read_after_within(
        &self,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<SharedEvent>, StoreError> {
        self.fetch(after, max, max_bytes)
    }

    fn first_sequence_at_or_after(&self, time: SystemTime) -> Result<Option<u64>, StoreError> {
        let context = self.context.clone();
        let name = self.stream.clone();
        let start_time = time::OffsetDateTime::from(time);
        self.block("finding a time in the log", async move {
            let stream = context
                .get_stream_no_info(&name)
                .await
                .map_err(|e| failed("looking up the stream", e))?;
            let consumer = stream
                .create_consumer(read_consumer(
                    consumer::DeliverPolicy::ByStartTime { start_time },
                    1,
                ))
                .await
                .map_err(|e| failed("creating a reader", e))?;
            let consumer_name = consumer.cached_info().name.clone();
            let mut batch = consumer
                .fetch()
                .max_messages(1)
                .messages()
                .await
                .map_err(|e| failed("reading the log", e))?;
            let first = match batch.next().await {
                Some(Ok(message)) => message.info().ok().map(|info| info.stream_sequence),
                Some(Err(error)) => return Err(failed("reading the log", error)),
                None => None,
            };
            drop(batch);
            let _ = stream.delete_consumer(&consumer_name).await;
            Ok(first)
        })
    }

    fn bounds(&self) -> LogBounds {
        let head = self.tail_head.load(Ordering::Acquire);
        let facts = self.lock_facts();
        // The stream's state is read every INFO_TTL; between reads, the count limit alone
        // says which events are surely gone.
        let by_count = (head + 1).saturating_sub(self.max_events);
        let first = facts.first_sequence.max(by_count).max(1);
        let oldest = (first <= head).then_some(first);
        // JetStream does not say when the newest dropped event was published: no later than
        // the oldest held one, or than the newest of all when none is held.
        let newest_dropped_time = if first <= 1 {
            None
        } else if oldest.is_some() && first == facts.first_sequence {
            facts.first_time.map(|t| t - Duration::from_nanos(1))
        } else {
            facts.last_time.or(facts.first_time)
        };
        LogBounds {
            oldest,
            head,
            newest_dropped_time,
        }
    }

    fn held_counts(&self) -> HeldCounts {
        let context = self.context.clone();
        let name = self.stream.clone();
        let filter = format!("{}>", self.subject_prefix);
        let prefix_len = self.subject_prefix.len();
        let counted = self.block("counting events per subject", async move {
            let stream = context
                .get_stream_no_info(&name)
                .await
                .map_err(|e| failed("looking up the stream", e))?;
            let mut subjects = stream
                .info_with_subjects(filter)
                .await
                .map_err(|e| failed("counting events per subject", e))?;
            let mut held = HeldCounts::new();
            while let Some(entry) = subjects.next().await {
                let (subject, count) =
                    entry.map_err(|e| failed("counting events per subject", e))?;
                if let Ok(topic) = Topic::parse(subject.get(prefix_len..).unwrap_or("")) {
                    *held.entry_ref(topic.family()).or_insert(0) += count as u64;
                }
            }
            Ok(held)
        });
        match counted {
            Ok(held) => {
                self.lock_facts().held = held.clone();
                held
            }
            Err(error) => {
                tracing::warn!(%error, "cannot count held events");
                self.lock_facts().held.clone()
            }
        }
    }

    /// JetStream applies age retention itself; this refreshes the cached oldest sequence.
    /// JetStream applies the age limit itself (the stream's `max_age`); this only refreshes
    /// the cached stream facts the bounds are read from. A refresh NATS does not answer (a
    /// stream leader being elected) is no retention failure: it is logged at debug level and
    /// made again on the next call.
    fn expire(&self, now: SystemTime) -> Result<(), StoreError> {
        let _ = now;
        let stale = self
            .lock_facts()
            .info_at
            .is_none_or(|at| at.elapsed() >= INFO_TTL);
        if stale && self.connected.load(Ordering::Acquire) {
            if let Err(error) = self.refresh_info() {
                tracing::debug!(%error, "refreshing the stream's state failed; asking again shortly");
            }
        }
        Ok(())
    }

    fn durability_error(&self) -> Option<String> {
        (!self.connected.load(Ordering::Acquire))
            .then(|| format!("lost the connection to NATS at {}", self.urls))
    }

    fn log_id(&self) -> &str {
        &self.log_id
    }

    fn load_group_cursors(&self) -> Result<HashMap<String, GroupCursor>, StoreError> {
        let context = self.context.clone();
        let name = self.cursors.clone();
        let prefix = self.cursor_prefix.clone();
        self.block("loading group cursors", async move {
            let stream = context
                .get_stream_no_info(&name)
                .await
                .map_err(|e| failed("looking up the group cursors", e))?;
            let mut subjects = stream
                .info_with_subjects(format!("{prefix}*"))
                .await
                .map_err(|e| failed("listing group cursors", e))?;
            let mut names = Vec::new();
            while let Some(entry) = subjects.next().await {
                names.push(entry.map_err(|e| failed("listing group cursors", e))?.0);
            }
            let mut loaded = HashMap::new();
            for subject in names {
                let Some(group) = subject.strip_prefix(&prefix).and_then(group_of_key) else {
                    continue;
                };
                let message = stream
                    .get_last_raw_message_by_subject(&subject)
                    .await
                    .map_err(|e| failed("reading a group cursor", e))?;
                let cursor: GroupCursor =
                    serde_json::from_slice(&message.payload).map_err(|e| {
                        failed(&format!("group cursor of {group:?} in stream {name}"), e)
                    })?;
                loaded.insert(group, cursor);
            }
            Ok(loaded)
        })
    }

    fn save_group_cursor(&self, group: &str, cursor: &GroupCursor) -> Result<(), StoreError> {
        let context = self.context.clone();
        let subject = format!("{}{}", self.cursor_prefix, cursor_key(group));
        let value = Bytes::from(serde_json::to_vec(cursor).expect("a cursor serializes"));
        self.block("saving a group cursor", async move {
            context
                .publish(subject, value)
                .await
                .map_err(|e| failed("saving a group cursor", e))?
                .await
                .map(|_| ())
                .map_err(|e| failed("saving a group cursor", e))
        })
    }
}

impl JetStreamStore {
    /// The stream's last sequence when this node opened it: the tail starts after it.
    pub fn head_at_open(&self) -> u64 {
        self.head_at_open
    }
}

impl Drop for JetStreamStore {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(first: u64, through: u64, full: bool) -> Read {
        Read {
            events: Vec::new(),
            first: Some(first),
            through: Some(through),
            full,
        }
    }

    #[test]
    fn a_read_from_a_replica_behind_is_told_from_retention() {
        let held_from = |oldest: u64| move || Ok::<u64, StoreError>(oldest);
        // The whole range asked for (events 11..=20), or stopped at the count or byte bound.
        assert_eq!(
            lag_of(10, 10, &served(11, 20, false), held_from(1)).unwrap(),
            None
        );
        assert_eq!(
            lag_of(10, 10, &served(11, 15, true), held_from(1)).unwrap(),
            None
        );
        // Stopped short of what the node has routed while the rest is held: behind.
        let short = lag_of(10, 10, &served(11, 15, false), held_from(1)).unwrap();
        assert!(short.unwrap().contains("stopped at 15"));
        // Nothing at all served though 11..=20 is held: behind.
        let empty = Read::default();
        assert!(lag_of(10, 10, &empty, held_from(1)).unwrap().is_some());
        // Nothing served because retention dropped it all meanwhile: the log as it is.
        assert_eq!(lag_of(10, 10, &empty, held_from(21)).unwrap(), None);
        // Starts past `after + 1`: retention (the oldest held is 14) or behind (it is 1).
        assert_eq!(
            lag_of(10, 10, &served(14, 20, false), held_from(14)).unwrap(),
            None
        );
        let skipped = lag_of(10, 10, &served(14, 20, false), held_from(1)).unwrap();
        assert!(skipped.unwrap().contains("skipped to 14"));
        // Oldest not asked when the read is whole.
        let never = || -> Result<u64, StoreError> { panic!("asked the stream") };
        assert_eq!(lag_of(10, 10, &served(11, 20, false), never).unwrap(), None);
    }

    #[test]
    fn message_ids_escape_so_different_pairs_never_collide() {
        assert_eq!(message_id("svc", "42"), "svc|42");
        assert_ne!(message_id("a|b", "c"), message_id("a", "b|c"));
        assert_eq!(message_id("a b", "x\n"), "a%20b|x%0A");
        assert_ne!(message_id("a%7C", "b"), message_id("a|", "b"));
    }

    #[test]
    fn atomic_batches_with_message_ids_need_nats_2_12_1() {
        for (version, atomic) in [
            ("2.9.10", false),
            ("2.12.0", false),
            ("2.12.1", true),
            ("2.15.1", true),
            ("3.0.0-beta", true),
            ("", false),
        ] {
            assert_eq!(supports_atomic_batches(version), atomic, "{version}");
        }
    }

    #[test]
    fn cursor_keys_round_trip_any_group_name() {
        for name in ["orders", "a.b*>", "名前", ""] {
            let key = cursor_key(name);
            assert!(key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
            assert_eq!(group_of_key(&key).as_deref(), Some(name));
        }
    }
}
