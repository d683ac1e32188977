//! Appends: a node's batches go to the stream in the order they were begun, and stay in that
//! order across a stream leader's death and a lost NATS connection.
//!
//! # Why order can break, and what keeps it
//! Appends are pipelined: a job's messages go out before earlier jobs are acknowledged. Two
//! things could then store a later message ahead of an earlier one:
//!
//! - **A stream leader dies** with acknowledgements outstanding. Its messages are sent again
//!   (same `Nats-Msg-Id`, so never stored twice) once their [`REQUEST_TIMEOUT`] passes; a job
//!   sent to the new leader before those resends would be stored ahead of them. [`InFlight`]
//!   holds new jobs back once the oldest has waited [`STALL_AFTER`], and a job resends only
//!   after every earlier job is resolved.
//! - **The NATS connection drops.** A NATS client keeps what it was asked to send while it is
//!   disconnected and writes it after it reconnects: messages of later jobs, queued after the
//!   earlier ones were lost with the socket, would land first (and an append given up after
//!   [`APPEND_DEADLINE`] would still land, later, behind the publisher's own retry). So appends
//!   go out on a connection of their own ([`AppendLink`]) that is **never reconnected**: once it
//!   drops, it is shut down with everything queued on it, a new one is made, and jobs wait
//!   until every job sent on the old one is resolved (acknowledged, or resent on the new one in
//!   job order). Nothing written before a disconnect can arrive after it.
//!
//! Pipelining is untouched while acknowledgements come in time; the cost is a pause of new
//! appends while a stream or a connection recovers, which they would spend failing anyway.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{failed, Appended, APPEND_DEADLINE, REQUEST_TIMEOUT};
use crate::store::StoreError;

/// One call's events, as (subject, record, `Nats-Msg-Id`) in order, and where to answer.
pub(super) struct AppendJob {
    pub messages: Vec<(String, Bytes, Option<String>)>,
    /// Sent as one atomic batch ([`send_batch`]): the stream allows it and the job has 2 to
    /// [`MAX_ATOMIC_BATCH`] messages.
    pub atomic: bool,
    pub reply: oneshot::Sender<Result<Vec<Appended>, StoreError>>,
}

/// The most messages JetStream takes in one atomic batch (its default `max_batch_size`, ADR-50).
pub const MAX_ATOMIC_BATCH: usize = 1000;

/// JetStream's error code for an atomic batch holding a `Nats-Msg-Id` it already has (or
/// holding one twice): nothing of the batch is stored.
const BATCH_DUPLICATE_ID: u64 = 10201;
/// JetStream's error code for an atomic batch it did not get whole: a message of it was refused
/// (too large for the stream), or its messages went to a stream leader that changed before the
/// commit. Nothing of the batch is stored.
const BATCH_INCOMPLETE: u64 = 10176;
/// Times a batch JetStream found incomplete is sent again before that counts as a refusal: a
/// leader change passes, a message too large does not.
const INCOMPLETE_RETRIES: u32 = 2;

/// How long the oldest unacknowledged job may wait before new jobs are held back (see
/// [`InFlight`]). JetStream acknowledges in milliseconds; a job this late has most likely lost
/// its acknowledgement to a stream leader that died.
pub const STALL_AFTER: Duration = Duration::from_millis(500);

/// Resends in a row without an acknowledgement after which their connection is abandoned
/// for a new one: a stream leader elected meanwhile answers a resend within milliseconds,
/// so two silent ones (about [`REQUEST_TIMEOUT`] each) say the way through this server is
/// not working (seen once in a manual trial on nats-server 2.15.1: one node's appends got
/// no answer for 30 s after a new leader was elected, while another node's were answered).
const ABANDON_AFTER_SILENT: u32 = 2;

/// The wait before a reconnect of the append connection: for ever. It is never reconnected
/// (see the module docs); a new connection replaces it.
const NEVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// The NATS connection appends go out on, apart from the node's main connection (which reads
/// the tail, answers other nodes and reconnects by itself). See the module docs.
pub(super) struct AppendLink {
    addresses: Vec<async_nats::ServerAddr>,
    urls: String,
    /// The node's main client: the servers of the cluster it learned of (`connect_urls`) are
    /// tried too, so appends go on when the servers named at start-up are gone.
    main: async_nats::Client,
    current: tokio::sync::Mutex<Option<Link>>,
    /// How many connections were made: each job records the one it went out on.
    made: std::sync::atomic::AtomicU64,
    /// Woken when the live connection drops, so that [`AppendLink::replace_dropped`] shuts it
    /// down at once: what waits for its acknowledgements fails then, instead of after
    /// [`REQUEST_TIMEOUT`], and is sent again on the new one.
    dropped: Arc<tokio::sync::Notify>,
}

/// One append connection, on a runtime of its own so that shutting it down drops whatever the
/// client still holds to send.
struct Link {
    generation: u64,
    context: jetstream::Context,
    /// Set when the connection dropped: it will never send again.
    lost: Arc<AtomicBool>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Link {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl AppendLink {
    /// A link to the servers at `addresses` (`urls` for messages) and those of their cluster
    /// that `main` learned of; connects on first use.
    pub fn new(
        addresses: Vec<async_nats::ServerAddr>,
        urls: String,
        main: async_nats::Client,
    ) -> AppendLink {
        AppendLink {
            addresses,
            urls,
            main,
            current: tokio::sync::Mutex::new(None),
            made: std::sync::atomic::AtomicU64::new(0),
            dropped: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Replaces each connection as soon as it drops, for as long as the link is used
    /// elsewhere (run it as a task of its own).
    pub async fn replace_dropped(self: Arc<Self>) {
        let dropped = self.dropped.clone();
        let link = Arc::downgrade(&self);
        drop(self);
        loop {
            dropped.notified().await;
            let Some(link) = link.upgrade() else {
                return;
            };
            if let Err(error) = link.context().await {
                tracing::warn!(%error, "cannot replace the append connection to NATS yet: appends are sent again once it is back");
            }
        }
    }

    /// The live connection's JetStream context and its generation (1 for the first
    /// connection, one more for each that replaced a dropped one); connects when there is
    /// none or the last one dropped (shutting that one down first).
    ///
    /// # Errors
    /// [`StoreError::Failed`] naming the URLs when NATS does not take a connection within
    /// [`REQUEST_TIMEOUT`].
    pub async fn context(&self) -> Result<(u64, jetstream::Context), StoreError> {
        let mut current = self.current.lock().await;
        if let Some(link) = current.as_ref() {
            if !link.lost.load(Ordering::Acquire) {
                return Ok((link.generation, link.context.clone()));
            }
            tracing::info!(
                generation = link.generation,
                "the append connection to NATS dropped: replacing it; appends not yet \
                 acknowledged are sent again on the new one, in order and with their ids, so \
                 none is lost or stored twice"
            );
        }
        // Shut down before connecting again: nothing queued on it may ever be written.
        *current = None;
        let link = self.connect().await?;
        let answer = (link.generation, link.context.clone());
        *current = Some(link);
        Ok(answer)
    }

    /// Gives up connection `generation` if it is still the live one: the next
    /// [`AppendLink::context`] replaces it (what it holds unsent is dropped).
    pub async fn abandon(&self, generation: u64) {
        let current = self.current.lock().await;
        if let Some(link) = current
            .as_ref()
            .filter(|link| link.generation == generation)
        {
            tracing::info!(
                generation,
                "JetStream leaves appends on this connection unanswered: abandoning it"
            );
            link.lost.store(true, Ordering::Release);
        }
    }

    async fn connect(&self) -> Result<Link, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("eventbus-nats-append")
            .enable_all()
            .build()
            .map_err(StoreError::Io)?;
        let lost = Arc::new(AtomicBool::new(false));
        let connected = Arc::new(AtomicBool::new(false));
        let (flag, once, dropped) = (lost.clone(), connected.clone(), self.dropped.clone());
        let options = async_nats::ConnectOptions::new()
            .name("eventbus-append")
            .connection_timeout(REQUEST_TIMEOUT)
            // In the order above.
            .retain_servers_order()
            // The first connection is tried at once; after a drop, the client waits for ever
            // instead of reconnecting (and writing what it queued).
            .reconnect_delay_callback(move |_| {
                if once.load(Ordering::Acquire) {
                    NEVER
                } else {
                    Duration::ZERO
                }
            })
            .event_callback(move |event| {
                let (flag, dropped) = (flag.clone(), dropped.clone());
                async move {
                    if matches!(event, async_nats::Event::Disconnected) {
                        flag.store(true, Ordering::Release);
                        dropped.notify_one();
                    }
                }
            });
        // The named servers from a random one on (so that nodes given the same list spread
        // their append connections), then those learned from them.
        let mut addresses = self.addresses.clone();
        if !addresses.is_empty() {
            let offset = uuid::Uuid::new_v4().as_u128() % addresses.len() as u128;
            addresses.rotate_left(offset as usize);
        }
        for url in self.main.server_info().connect_urls {
            if let Ok(address) = format!("nats://{url}").parse::<async_nats::ServerAddr>() {
                if !addresses.contains(&address) {
                    addresses.push(address);
                }
            }
        }
        let connecting = runtime.spawn(async move {
            tokio::time::timeout(REQUEST_TIMEOUT, options.connect(addresses)).await
        });
        let why = match connecting.await {
            Ok(Ok(Ok(client))) => Ok(client),
            Ok(Ok(Err(error))) => Err(error.to_string()),
            Ok(Err(_)) => Err(format!("no answer within {REQUEST_TIMEOUT:?}")),
            Err(error) => Err(error.to_string()),
        };
        let client = match why {
            Ok(client) => client,
            Err(why) => {
                runtime.shutdown_background();
                return Err(StoreError::Failed(format!(
                    "cannot reach NATS at {} for appends: {why}",
                    self.urls
                )));
            }
        };
        connected.store(true, Ordering::Release);
        let context = jetstream::ContextBuilder::new()
            .timeout(REQUEST_TIMEOUT)
            .max_ack_inflight(16_384)
            .backpressure_on_inflight(true)
            .build(client);
        Ok(Link {
            generation: self.made.fetch_add(1, Ordering::Relaxed) + 1,
            context,
            lost,
            runtime: Some(runtime),
        })
    }
}

/// The jobs sent and not yet resolved (acknowledged, or failed for good), by job number, with
/// when each was sent. Keeps a node's appends in its call order (see the module docs):
///
/// - once the oldest job has waited [`STALL_AFTER`], or the append connection was replaced,
///   [`publish_jobs`] sends nothing new until every earlier job is resolved;
/// - a job resends only once every job before it is resolved
///   ([`InFlight::wait_resolved_before`]).
///
/// Jobs are resolved in job order, and the stream holds them in that order.
#[derive(Default)]
struct InFlight {
    unresolved: Mutex<std::collections::BTreeMap<u64, tokio::time::Instant>>,
    changed: tokio::sync::Notify,
    /// Jobs that failed for good so far: a job that sees it move between its start and its
    /// first resend fails too (see [`acknowledged`]).
    failures: std::sync::atomic::AtomicU64,
}

impl InFlight {
    fn begin(&self, job: u64) {
        self.unresolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(job, tokio::time::Instant::now());
    }

    fn failures(&self) -> u64 {
        self.failures.load(Ordering::Acquire)
    }

    fn resolve(&self, job: u64, failed: bool) {
        if failed {
            self.failures.fetch_add(1, Ordering::AcqRel);
        }
        self.unresolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&job);
        self.changed.notify_waiters();
    }

    /// Whether the oldest unresolved job was sent more than [`STALL_AFTER`] ago.
    fn stalled(&self) -> bool {
        self.unresolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .next()
            .is_some_and(|sent| sent.elapsed() > STALL_AFTER)
    }

    /// Returns once no job numbered below `job` is unresolved.
    async fn wait_resolved_before(&self, job: u64) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let oldest = self
                .unresolved
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .next()
                .copied();
            if oldest.is_none_or(|oldest| oldest >= job) {
                return;
            }
            changed.await;
        }
    }
}

/// Sends each job's messages in job order (so batches from this node reach the stream in
/// the order they were begun), then waits for their acknowledgements off the send loop; holds
/// new jobs back while an earlier one is stalled or was sent on a connection since replaced
/// ([`InFlight`]).
///
/// `acked_head` is raised to every sequence JetStream acknowledges (the tail's watchdog
/// compares it with what the tail has read).
pub(super) async fn publish_jobs(
    link: Arc<AppendLink>,
    mut jobs: mpsc::UnboundedReceiver<AppendJob>,
    acked_head: Arc<std::sync::atomic::AtomicU64>,
) {
    let in_flight = Arc::new(InFlight::default());
    let mut next_job = 0u64;
    // The connection the last job went out on.
    let mut sent_on = None;
    while let Some(job) = jobs.recv().await {
        let number = next_job;
        next_job += 1;
        let mut connection = link.context().await;
        let replaced =
            matches!((&connection, sent_on), (Ok((now, _)), Some(before)) if *now != before);
        if replaced || in_flight.stalled() {
            tracing::debug!(replaced, "an append waits for earlier ones to be resolved");
            in_flight.wait_resolved_before(number).await;
            connection = link.context().await;
        }
        in_flight.begin(number);
        let failures_at_start = in_flight.failures();
        let mut acks = Vec::with_capacity(job.messages.len());
        match &connection {
            Ok((generation, context)) => {
                sent_on = Some(*generation);
                if job.atomic {
                    acks.push(send_batch(context, &job.messages).await.ok());
                } else {
                    for (subject, payload, id) in &job.messages {
                        // On an error: sent again in `acknowledged`, with the same id, until
                        // the deadline.
                        acks.push(send(context, subject, payload, id.as_deref()).await.ok());
                    }
                }
            }
            Err(error) => {
                tracing::debug!(%error, "no append connection: the job is sent when there is one");
                let expected = if job.atomic { 1 } else { job.messages.len() };
                acks.resize_with(expected, || None);
            }
        }
        let link = link.clone();
        let in_flight = in_flight.clone();
        let acked_head = acked_head.clone();
        tokio::spawn(async move {
            let earlier_resolved = || in_flight.wait_resolved_before(number);
            let earlier_failed = || in_flight.failures() != failures_at_start;
            let result = if job.atomic {
                let ack = acks.pop().flatten();
                batch_acknowledged(&link, job.messages, ack, earlier_resolved, earlier_failed).await
            } else {
                acknowledged(&link, job.messages, acks, earlier_resolved, earlier_failed).await
            };
            if let Some(last) = result.iter().flatten().map(|a| a.sequence).max() {
                acked_head.fetch_max(last, Ordering::AcqRel);
            }
            in_flight.resolve(number, result.is_err());
            let _ = job.reply.send(result);
        });
    }
}

async fn send(
    context: &jetstream::Context,
    subject: &str,
    payload: &Bytes,
    id: Option<&str>,
) -> Result<jetstream::context::PublishAckFuture, StoreError> {
    let mut publish = jetstream::message::PublishMessage::build().payload(payload.clone());
    if let Some(id) = id {
        publish = publish.message_id(id);
    }
    context
        .send_publish(subject.to_owned(), publish)
        .await
        .map_err(|e| failed("publishing to JetStream", e))
}

/// Sends `messages` as one atomic batch (ADR-50: `Nats-Batch-Id`, `Nats-Batch-Sequence`, and
/// `Nats-Batch-Commit` on the last, each with its `Nats-Msg-Id`): JetStream stores all of
/// them, in order and at consecutive sequences, or none. All but the last go out as plain
/// publishes; the returned acknowledgement is the commit's, for the last sequence. A fresh
/// batch id each call, so a batch sent again is a new batch.
async fn send_batch(
    context: &jetstream::Context,
    messages: &[(String, Bytes, Option<String>)],
) -> Result<jetstream::context::PublishAckFuture, StoreError> {
    let batch = uuid::Uuid::new_v4().simple().to_string();
    let client = context.client();
    let last = messages.len();
    for (number, (subject, payload, id)) in messages.iter().enumerate() {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Batch-Id", batch.as_str());
        headers.insert("Nats-Batch-Sequence", (number + 1).to_string().as_str());
        if let Some(id) = id {
            headers.insert("Nats-Msg-Id", id.as_str());
        }
        if number + 1 == last {
            headers.insert("Nats-Batch-Commit", "1");
            let publish = jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .headers(headers);
            return context
                .send_publish(subject.clone(), publish)
                .await
                .map_err(|e| failed("publishing a batch to JetStream", e));
        }
        client
            .publish_with_headers(subject.clone(), headers, payload.clone())
            .await
            .map_err(|e| failed("publishing a batch to JetStream", e))?;
    }
    Err(StoreError::Failed(
        "an empty batch cannot be committed".into(),
    ))
}

/// Waits `pause` before sending again, and doubles it for the next time, up to 500 ms.
async fn back_off(pause: &mut Duration) {
    tokio::time::sleep(*pause).await;
    *pause = (*pause * 2).min(Duration::from_millis(500));
}

/// Why a job that would have to be sent again is refused instead: a job before it failed for
/// good, and its publisher sends that one again first (see [`acknowledged`]).
fn earlier_append_failed() -> StoreError {
    StoreError::Failed(
        "an earlier append on this node failed for good, so this one is refused too (send \
         both again, in order)"
            .into(),
    )
}

/// How an atomic batch's commit failed.
enum BatchFailure {
    /// JetStream already holds one of its ids (or it holds one twice): nothing was stored.
    DuplicateId,
    /// JetStream did not get it whole ([`BATCH_INCOMPLETE`]): nothing was stored.
    Incomplete(String),
    /// JetStream refused it for a reason that will not pass (a 4xx API error: too large, a
    /// stream limit): nothing was stored.
    Refused(String),
    /// No answer, no stream leader, a broken connection, JetStream unavailable (5xx): it may
    /// or may not be stored.
    Unsure(String),
}

fn batch_failure(error: &jetstream::context::PublishError) -> BatchFailure {
    use jetstream::context::PublishErrorKind;
    let api = std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<jetstream::Error>());
    match (error.kind(), api) {
        (PublishErrorKind::Other, Some(api))
            if api.error_code() == jetstream::ErrorCode(BATCH_DUPLICATE_ID) =>
        {
            BatchFailure::DuplicateId
        }
        (PublishErrorKind::Other, Some(api))
            if api.error_code() == jetstream::ErrorCode(BATCH_INCOMPLETE) =>
        {
            BatchFailure::Incomplete(api.to_string())
        }
        (PublishErrorKind::Other, Some(api)) if (400..500).contains(&api.code()) => {
            BatchFailure::Refused(api.to_string())
        }
        _ => BatchFailure::Unsure(error.to_string()),
    }
}

/// [`acknowledged`] for a job sent as one atomic batch ([`send_batch`]): `ack` is the commit's.
/// Acknowledged: the events sit at the `messages.len()` sequences ending with the commit's. A
/// commit that went unanswered is sent again as a new batch, with the same ids and the same
/// ordering rules as single messages, until [`APPEND_DEADLINE`]. A batch JetStream refuses
/// for a duplicate id (a publisher's retry of a batch already stored, or an acknowledgement
/// lost with a leader) is sent message by message instead ([`acknowledged`]), which answers
/// each id's sequence and stores what is missing: so a batch that mixes events the stream holds
/// with new ones is stored event by event, not atomically.
async fn batch_acknowledged<F: Future<Output = ()>>(
    link: &AppendLink,
    messages: Vec<(String, Bytes, Option<String>)>,
    ack: Option<jetstream::context::PublishAckFuture>,
    earlier_resolved: impl Fn() -> F,
    earlier_failed: impl Fn() -> bool,
) -> Result<Vec<Appended>, StoreError> {
    let mut ack = ack;
    let mut waited_for_earlier = false;
    let mut silent = 0;
    let mut incomplete = 0;
    let deadline = tokio::time::Instant::now() + APPEND_DEADLINE;
    let mut pause = Duration::from_millis(20);
    loop {
        let attempt = match ack.take() {
            Some(ack) => ack.await,
            None => {
                if !waited_for_earlier {
                    earlier_resolved().await;
                    waited_for_earlier = true;
                    if earlier_failed() {
                        return Err(earlier_append_failed());
                    }
                }
                let (generation, context) = match link.context().await {
                    Ok(live) => live,
                    Err(error) if tokio::time::Instant::now() < deadline => {
                        tracing::debug!(%error, "no append connection to send a batch again on");
                        back_off(&mut pause).await;
                        continue;
                    }
                    Err(error) => return Err(error),
                };
                let sent_at = tokio::time::Instant::now();
                let resent = match send_batch(&context, &messages).await {
                    Ok(ack) => ack.await,
                    Err(error) if tokio::time::Instant::now() < deadline => {
                        tracing::debug!(%error, "sending a batch again failed");
                        back_off(&mut pause).await;
                        continue;
                    }
                    Err(error) => return Err(error),
                };
                let timed_out = resent.is_err() && sent_at.elapsed() >= REQUEST_TIMEOUT;
                silent = if timed_out { silent + 1 } else { 0 };
                if silent >= ABANDON_AFTER_SILENT {
                    link.abandon(generation).await;
                    silent = 0;
                }
                resent
            }
        };
        let error = match attempt {
            Ok(ack) => {
                let count = messages.len() as u64;
                let Some(first) = (ack.sequence + 1).checked_sub(count) else {
                    return Err(StoreError::Failed(format!(
                        "JetStream acknowledged a batch of {count} at sequence {}, which cannot \
                         hold it",
                        ack.sequence
                    )));
                };
                return Ok((first..=ack.sequence)
                    .map(|sequence| Appended {
                        sequence,
                        duplicate: false,
                    })
                    .collect());
            }
            Err(error) => error,
        };
        let failure = match batch_failure(&error) {
            BatchFailure::Incomplete(why) if incomplete < INCOMPLETE_RETRIES => {
                incomplete += 1;
                BatchFailure::Unsure(why)
            }
            BatchFailure::Incomplete(why) => BatchFailure::Refused(why),
            other => other,
        };
        match failure {
            BatchFailure::DuplicateId => {
                tracing::debug!(
                    "the stream holds an id of the batch: sending it message by message"
                );
                let acks = std::iter::repeat_with(|| None)
                    .take(messages.len())
                    .collect();
                return acknowledged(link, messages, acks, earlier_resolved, earlier_failed).await;
            }
            BatchFailure::Refused(why) | BatchFailure::Incomplete(why) => {
                return Err(StoreError::Failed(format!(
                    "JetStream refused the batch (nothing of it is stored): {why}"
                )))
            }
            // Without ids a resend could store the batch twice: fail instead.
            BatchFailure::Unsure(why)
                if messages.iter().any(|(_, _, id)| id.is_none())
                    || tokio::time::Instant::now() >= deadline =>
            {
                return Err(StoreError::Failed(format!(
                    "JetStream did not acknowledge the batch: {why}"
                )))
            }
            BatchFailure::Unsure(why) => {
                tracing::debug!(%why, "sending an unacknowledged batch again with its ids");
                back_off(&mut pause).await;
            }
        }
    }
}

/// Waits for each message's acknowledgement; a message whose acknowledgement fails is sent
/// again with the same id (JetStream answers a duplicate with the original's sequence), on
/// the link's live connection, until [`APPEND_DEADLINE`].
///
/// Before its first resend it waits for `earlier_resolved`: every job sent before this one
/// acknowledged or failed, so resends reach the stream in job order ([`InFlight`]). If one of
/// those failed for good meanwhile (`earlier_failed`), this job fails too without resending:
/// its publisher was told the earlier batch failed and sends it again (elsewhere), and this
/// one must come after it, not ahead. (What of this job the stream already holds, it holds
/// behind the earlier job's messages, which it then holds too: JetStream stores a stream's
/// messages as its leader received them, a prefix survives a leader's death, so the
/// publisher's retry finds both by their ids, in order.)
///
/// A connection on which JetStream leaves [`ABANDON_AFTER_SILENT`] resends in a row
/// unanswered is abandoned ([`AppendLink::abandon`]): another one, perhaps to another server,
/// takes over.
async fn acknowledged<F: Future<Output = ()>>(
    link: &AppendLink,
    messages: Vec<(String, Bytes, Option<String>)>,
    acks: Vec<Option<jetstream::context::PublishAckFuture>>,
    earlier_resolved: impl Fn() -> F,
    earlier_failed: impl Fn() -> bool,
) -> Result<Vec<Appended>, StoreError> {
    let mut waited_for_earlier = false;
    // Resends in a row that got no acknowledgement.
    let mut silent = 0;
    let deadline = tokio::time::Instant::now() + APPEND_DEADLINE;
    let mut appended = Vec::with_capacity(messages.len());
    for ((subject, payload, id), ack) in messages.iter().zip(acks) {
        let mut ack = ack;
        let mut pause = Duration::from_millis(20);
        loop {
            let attempt = match ack.take() {
                Some(ack) => ack
                    .await
                    .map_err(|e| failed("JetStream did not acknowledge", e)),
                None => {
                    if !waited_for_earlier {
                        earlier_resolved().await;
                        waited_for_earlier = true;
                        if earlier_failed() {
                            return Err(earlier_append_failed());
                        }
                    }
                    match link.context().await {
                        Ok((generation, context)) => {
                            let sent_at = tokio::time::Instant::now();
                            let resent = match send(&context, subject, payload, id.as_deref()).await
                            {
                                Ok(ack) => ack
                                    .await
                                    .map_err(|e| failed("JetStream did not acknowledge", e)),
                                Err(error) => Err(error),
                            };
                            // Timed out, not refused at once (as while a leader is elected).
                            let timed_out = resent.is_err() && sent_at.elapsed() >= REQUEST_TIMEOUT;
                            silent = if timed_out { silent + 1 } else { 0 };
                            if silent >= ABANDON_AFTER_SILENT {
                                link.abandon(generation).await;
                                silent = 0;
                            }
                            resent
                        }
                        Err(error) => Err(error),
                    }
                }
            };
            match attempt {
                Ok(ack) => {
                    appended.push(Appended {
                        sequence: ack.sequence,
                        duplicate: ack.duplicate,
                    });
                    break;
                }
                // Without an id a resend could store the event twice: fail instead.
                Err(error) if id.is_none() || tokio::time::Instant::now() >= deadline => {
                    return Err(error);
                }
                Err(error) => {
                    tracing::debug!(%error, "resending an unacknowledged message with its id");
                    back_off(&mut pause).await;
                }
            }
        }
    }
    Ok(appended)
}
