//! [`Subscription`]: a stream of events that survives broken streams.
//!
//! A gRPC stream can end for reasons that are no fault of the subscriber's code: the bus
//! restarts or shuts down (UNAVAILABLE), the subscriber fell too far behind and the bus cut
//! it off to stay bounded (RESOURCE_EXHAUSTED), or the connection dropped. The bus keeps
//! recent events and numbers every one with a global sequence, so the SDK resumes by itself:
//! it reconnects with [`Backoff`], asks for `after_sequence = last sequence seen`, and drops
//! anything it has already delivered. The caller sees one stream, without duplicates, and
//! without gaps as long as the bus still holds the events; when it no longer does, the stream
//! says so with [`SubscriptionItem::Gap`] instead of hiding it.
//!
//! Refusals (INVALID_ARGUMENT, PERMISSION_DENIED, ...) are not retried: the stream yields the
//! error and ends.
//!
//! Consumer groups are live-only on the bus, so a group subscription resumes at `latest`:
//! events published while it was away went to other members of the group (or, with none
//! left, to no member).
//!
//! A background task reads the gRPC stream into a bounded channel; when the caller reads
//! slowly the task stops reading too, and the bus's rules for subscribers that fall behind
//! apply: the bus catches it up from its log, or ends it past `max_subscriber_lag` (followed by
//! a resume). Dropping the [`Subscription`] ends the task and the stream.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use futures_util::{FutureExt as _, Stream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::Code;
use tracing::Instrument as _;

use super::backoff::Backoff;
use super::client::Client;
use super::error::{Error, Result};
use crate::pb;
use crate::pb::subscribe_request::Start as PbStart;
use crate::pb::subscribe_response::Message;

/// Where a subscription starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Start {
    /// Only events published after the subscription is confirmed.
    #[default]
    Latest,
    /// Every event the bus still holds, then live ones.
    Earliest,
    /// Every held event with a greater sequence.
    AfterSequence(u64),
    /// Every held event published at or after this time.
    FromTime(SystemTime),
}

impl Start {
    fn to_pb(&self) -> PbStart {
        match self {
            Start::Latest => PbStart::Latest(()),
            Start::Earliest => PbStart::Earliest(()),
            Start::AfterSequence(sequence) => PbStart::AfterSequence(*sequence),
            Start::FromTime(time) => PbStart::FromTime((*time).into()),
        }
    }
}

/// Options of [`Client::subscribe_with`].
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// Consumer group: members share the events, each goes to one of them.
    pub group: Option<String>,
    /// Where to start (the bus refuses anything but `Latest` with a group).
    pub start: Start,
    /// The subscriber's name in the topology; the client's source when unset.
    pub subscriber: Option<String>,
    /// Reconnect delays after a broken stream.
    pub backoff: Backoff,
    /// Items read ahead from the bus before the SDK stops reading (about: they are held in
    /// chunks of up to 64).
    pub buffer: usize,
    /// At-least-once delivery for a group: see [`ManualAck`].
    pub manual_ack: Option<ManualAck>,
    /// Batched delivery (`SubscribeRequest.max_batch_events`): the bus sends up to this many
    /// ready events in one response, and the SDK hands them to the caller one by one as
    /// always. 256 by default; 0 or 1 asks for one event per response. At most 1024 (the bus
    /// answers INVALID_ARGUMENT beyond). A bus that predates batching ignores it.
    pub max_batch_events: u32,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            group: None,
            start: Start::Latest,
            subscriber: None,
            backoff: Backoff::default(),
            buffer: 256,
            manual_ack: None,
            max_batch_events: DEFAULT_MAX_BATCH_EVENTS,
        }
    }
}

/// MANUAL-ack settings: the bus keeps the group's cursor (durably with its file store), hands
/// each event to one member, waits for [`Delivery::ack`], and delivers again what is not acked
/// within `ack_deadline` or is nacked; after `max_deliveries` the event goes to the group's
/// dead-letter topic. Events arrive as [`SubscriptionItem::Delivery`]. A new group starts at the
/// subscription's start position; an existing group resumes from its cursor, after a bus
/// restart too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManualAck {
    /// Unacked this long, an event is delivered again.
    pub ack_deadline: std::time::Duration,
    /// Deliveries before the dead-letter topic.
    pub max_deliveries: u32,
    /// Unacked events this member holds at once.
    pub max_in_flight: u32,
    /// Where dead letters go (default `_bus.dlq.<group>`).
    pub dead_letter_topic: Option<String>,
}

impl Default for ManualAck {
    fn default() -> Self {
        ManualAck {
            ack_deadline: std::time::Duration::from_secs(30),
            max_deliveries: 5,
            max_in_flight: 256,
            dead_letter_topic: None,
        }
    }
}

/// An event of a MANUAL-ack group, to be acknowledged once processed.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub event: pb::Event,
    /// Which delivery of this event this is, from 1.
    pub attempt: u32,
    group: String,
    client: Client,
}

impl PartialEq for Delivery {
    fn eq(&self, other: &Self) -> bool {
        self.event == other.event && self.attempt == other.attempt && self.group == other.group
    }
}

impl Delivery {
    /// Confirms the event is processed: it is not delivered again.
    pub async fn ack(&self) -> Result<()> {
        self.client
            .ack(&self.group, &[self.event.sequence])
            .await
            .map(|_| ())
    }

    /// Hands the event back, to be delivered again after `redeliver_after`.
    pub async fn nack(&self, redeliver_after: std::time::Duration) -> Result<()> {
        self.client
            .nack(&self.group, &[self.event.sequence], redeliver_after)
            .await
            .map(|_| ())
    }
}

impl SubscribeOptions {
    /// Default options: latest, no group.
    pub fn new() -> Self {
        Self::default()
    }

    /// Joins a consumer group.
    pub fn group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into()).filter(|group| !group.is_empty());
        self
    }

    /// Sets the start position.
    pub fn start(mut self, start: Start) -> Self {
        self.start = start;
        self
    }

    /// Names the subscriber (default: the client's source).
    pub fn subscriber(mut self, subscriber: impl Into<String>) -> Self {
        self.subscriber = Some(subscriber.into());
        self
    }

    /// Sets the reconnect delays.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Sets the read-ahead buffer size (see [`SubscribeOptions::buffer`]).
    pub fn buffer(mut self, buffer: usize) -> Self {
        self.buffer = buffer.max(1);
        self
    }

    /// At-least-once delivery with acknowledgements (needs a group).
    pub fn manual_ack(mut self, settings: ManualAck) -> Self {
        self.manual_ack = Some(settings);
        self
    }

    /// Sets the most events per response (see [`SubscribeOptions::max_batch_events`]).
    pub fn max_batch_events(mut self, events: u32) -> Self {
        self.max_batch_events = events;
        self
    }
}

/// [`SubscribeOptions::max_batch_events`] unless set.
pub const DEFAULT_MAX_BATCH_EVENTS: u32 = 256;

/// One item of a [`Subscription`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
// Events are nearly every item; boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub enum SubscriptionItem {
    /// A matching event.
    Event(pb::Event),
    /// A matching event of a MANUAL-ack group, to acknowledge.
    Delivery(Delivery),
    /// A replay from the start position reached the live head: later events are live.
    CaughtUp {
        /// The last replayed sequence.
        sequence: u64,
    },
    /// The stream broke for a reason worth retrying (the node went away, or is unreachable):
    /// the SDK is subscribing again, on another node when the client knows several, with
    /// backoff, until it can ([`SubscriptionItem::Resumed`] follows). Informational: left out
    /// when the reader has a full queue of items still to take.
    Interrupted {
        /// What broke it, on one line (`message (CODE)`).
        why: String,
        /// The node it tries next.
        node: String,
    },
    /// The stream broke and the SDK subscribed again.
    Resumed {
        /// The bus's id of the new subscription.
        subscription_id: String,
        /// The resume point (`None` when nothing was seen yet, or for a group).
        after_sequence: Option<u64>,
    },
    /// The bus's sequence went backwards on a resume: it restarted without its log (the
    /// in-memory store). Sequences start again; the subscription goes on from the start of
    /// the new log (live for a group), and anything published to the old bus after
    /// `last_seen` that was not delivered is lost.
    BusReset {
        /// The last sequence delivered from the old log.
        last_seen: u64,
        /// The new bus's head sequence when it was noticed.
        head: u64,
    },
    /// Events in `from..=to` (global sequences; not all of them matched this subscription)
    /// were gone from the bus when the subscription (re)started: they are lost to this
    /// subscriber.
    Gap {
        /// The first sequence that may be missing.
        from: u64,
        /// The last sequence that may be missing.
        to: u64,
    },
}

/// A live subscription; made by [`Client::subscribe`]. A [`Stream`] of
/// `Result<SubscriptionItem>`.
///
/// When the stream breaks (the bus restarts or shuts down, cuts off a slow reader with
/// RESOURCE_EXHAUSTED, or the connection drops) it resubscribes by itself with [`Backoff`],
/// from right after the last event it delivered, and drops anything already delivered: no
/// duplicates, and no gaps while the bus still holds the events. A [`SubscriptionItem::Resumed`]
/// marks each resume, a [`SubscriptionItem::Gap`] any range the bus no longer held, and a
/// [`SubscriptionItem::BusReset`] a bus that came back without its log. A group
/// subscription resumes live (`latest`): the bus serves groups live only, and what was
/// published meanwhile went to other members. Refusals (INVALID_ARGUMENT, PERMISSION_DENIED,
/// ...) are not retried: the stream yields the error and ends.
///
/// Items are read ahead into a bounded buffer ([`SubscribeOptions::buffer`]); a reader slower
/// than that holds up the gRPC stream: the bus then catches the subscription up from its log,
/// or past `max_subscriber_lag` ends it (and a resume follows). Dropping the subscription ends
/// it.
#[derive(Debug)]
pub struct Subscription {
    items: ItemReceiver,
    subscribed: pb::Subscribed,
    task: JoinHandle<()>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Subscription {
    pub(crate) async fn open(
        client: Client,
        pattern: String,
        options: SubscribeOptions,
    ) -> Result<Subscription> {
        let mut request = pb::SubscribeRequest {
            topic: pattern,
            group: options.group.clone().unwrap_or_default(),
            subscriber: options
                .subscriber
                .clone()
                .unwrap_or_else(|| client.source().to_string()),
            start: Some(options.start.to_pb()),
            max_batch_events: options.max_batch_events,
            ..Default::default()
        };
        if let Some(manual) = &options.manual_ack {
            request.ack_mode = pb::AckMode::Manual as i32;
            request.ack_deadline = prost_types::Duration::try_from(manual.ack_deadline).ok();
            request.max_deliveries = manual.max_deliveries;
            request.max_in_flight = manual.max_in_flight;
            request.dead_letter_topic = manual.dead_letter_topic.clone().unwrap_or_default();
        }
        let span = tracing::info_span!(
            "subscription",
            topic = %request.topic,
            group = %request.group,
            subscriber = %request.subscriber,
        );
        let (subscribed, stream) = subscribe_once(&client, request.clone())
            .instrument(span.clone())
            .await?;
        let mut cursor = Cursor::new(options.start.clone(), options.group.is_some());
        cursor.manual = options.manual_ack.is_some();
        cursor.log_id = Some(subscribed.log_id.clone()).filter(|id| !id.is_empty());
        let (items, receiver) = item_channel(options.buffer);
        if let Some((from, to)) = cursor.gap(&subscribed) {
            tracing::warn!(parent: &span, from, to, "start is older than the bus holds");
            let _ = items
                .sender
                .try_send(vec![Ok(SubscriptionItem::Gap { from, to })]);
        }
        let resumer = Resumer {
            client,
            request,
            cursor,
            backoff: options.backoff,
            items,
        };
        let task = tokio::spawn(resumer.run(stream).instrument(span));
        Ok(Subscription {
            items: receiver,
            subscribed,
            task,
        })
    }

    /// The bus's confirmation of the first subscription: its id, the head sequence at that
    /// moment, and whether the requested start was older than what the bus holds.
    pub fn subscribed(&self) -> &pb::Subscribed {
        &self.subscribed
    }

    /// The next event, skipping the markers; `None` when the subscription ended.
    pub async fn next_event(&mut self) -> Option<Result<pb::Event>> {
        loop {
            match self.items.recv().await? {
                Ok(SubscriptionItem::Event(event)) => return Some(Ok(event)),
                Ok(SubscriptionItem::Delivery(delivery)) => return Some(Ok(delivery.event)),
                Ok(_) => continue,
                Err(error) => return Some(Err(error)),
            }
        }
    }
}

impl Stream for Subscription {
    type Item = Result<SubscriptionItem>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.items.poll_recv(cx)
    }
}

/// Items cross from the background task to the reader in chunks of up to this many: one
/// channel hand-off (and one wake-up) per chunk instead of per event.
const ITEMS_PER_CHUNK: usize = 64;

/// A channel of item chunks holding about `buffer` items.
fn item_channel(buffer: usize) -> (ItemSender, ItemReceiver) {
    let (sender, receiver) = mpsc::channel(buffer.div_ceil(ITEMS_PER_CHUNK).max(1));
    (
        ItemSender { sender },
        ItemReceiver {
            receiver,
            ready: VecDeque::new(),
        },
    )
}

#[derive(Debug)]
struct ItemSender {
    sender: mpsc::Sender<Vec<Result<SubscriptionItem>>>,
}

impl ItemSender {
    /// Sends one item if there is room now; dropped otherwise.
    fn offer(&self, item: SubscriptionItem) {
        let _ = self.sender.try_send(vec![Ok(item)]);
    }

    /// Sends one item; `Err` when the reader is gone.
    async fn send(&self, item: Result<SubscriptionItem>) -> std::result::Result<(), ()> {
        self.send_chunk(vec![item]).await
    }

    async fn send_chunk(
        &self,
        chunk: Vec<Result<SubscriptionItem>>,
    ) -> std::result::Result<(), ()> {
        self.sender.send(chunk).await.map_err(|_| ())
    }

    async fn closed(&self) {
        self.sender.closed().await
    }
}

#[derive(Debug)]
struct ItemReceiver {
    receiver: mpsc::Receiver<Vec<Result<SubscriptionItem>>>,
    /// The rest of the last chunk received.
    ready: VecDeque<Result<SubscriptionItem>>,
}

impl ItemReceiver {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<SubscriptionItem>>> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Poll::Ready(Some(item));
            }
            match std::task::ready!(self.receiver.poll_recv(cx)) {
                Some(chunk) => self.ready.extend(chunk),
                None => return Poll::Ready(None),
            }
        }
    }

    async fn recv(&mut self) -> Option<Result<SubscriptionItem>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }
}

/// Opens one Subscribe stream and waits for its confirmation.
async fn subscribe_once(
    client: &Client,
    request: pb::SubscribeRequest,
) -> Result<(pb::Subscribed, tonic::Streaming<pb::SubscribeResponse>)> {
    let mut stream = client.bus().subscribe(request).await?.into_inner();
    match stream.message().await? {
        Some(pb::SubscribeResponse {
            message: Some(Message::Subscribed(subscribed)),
            ..
        }) => {
            tracing::debug!(
                subscription_id = %subscribed.subscription_id,
                head = subscribed.head_sequence,
                "subscribed"
            );
            Ok((subscribed, stream))
        }
        Some(other) => Err(Error::Protocol(format!(
            "expected a subscribed confirmation first, got {other:?}"
        ))),
        None => Err(Error::Status(tonic::Status::unavailable(
            "the bus ended the subscription before confirming it",
        ))),
    }
}

/// Whether a broken stream is worth resuming. Refusals of the request itself are not: the
/// same request would be refused again.
pub(crate) fn is_retryable(code: Code) -> bool {
    match code {
        Code::Unavailable
        | Code::ResourceExhausted
        | Code::Aborted
        | Code::Internal
        | Code::Unknown
        | Code::Cancelled
        | Code::DeadlineExceeded
        | Code::DataLoss
        | Code::Ok => true,
        Code::InvalidArgument
        | Code::NotFound
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Unauthenticated => false,
    }
}

/// The resume position: what was asked for and what was seen. Pure, so the no-duplicates,
/// no-gaps rules are unit-tested without a bus.
#[derive(Debug, Clone)]
struct Cursor {
    start: Start,
    group: bool,
    /// A MANUAL-ack group: the bus keeps the position and redelivers on purpose.
    manual: bool,
    last_seen: Option<u64>,
    /// The bus's log identity, to tell a resume from a log that started over.
    log_id: Option<String>,
}

impl Cursor {
    fn new(start: Start, group: bool) -> Self {
        Cursor {
            start,
            group,
            manual: false,
            last_seen: None,
            log_id: None,
        }
    }

    /// Where the next subscription starts: right after the last event seen; before anything
    /// was seen, the original start (a replay interrupted before its first event must still
    /// replay); `latest` for a group, which the bus only serves live.
    fn next_start(&self) -> Start {
        match self.last_seen {
            // The bus resumes a MANUAL-ack group from its own cursor, whatever is asked.
            _ if self.manual => self.start.clone(),
            _ if self.group => Start::Latest,
            Some(sequence) => Start::AfterSequence(sequence),
            None => self.start.clone(),
        }
    }

    /// Records an event; false when it was already delivered. A MANUAL-ack group's
    /// redeliveries are on purpose, so they all pass.
    fn accept(&mut self, sequence: u64) -> bool {
        if self.manual {
            return true;
        }
        if self.last_seen.is_some_and(|last| sequence <= last) {
            return false;
        }
        self.last_seen = Some(sequence);
        true
    }

    /// Notices a bus whose log restarted (its head is behind what was already seen) and
    /// starts over on the new log: from its earliest event, or live for a group. Returns the
    /// last sequence seen on the old log.
    fn reset_if_log_restarted(&mut self, subscribed: &pb::Subscribed) -> Option<u64> {
        let known = self.log_id.clone();
        if !subscribed.log_id.is_empty() {
            self.log_id = Some(subscribed.log_id.clone());
        }
        let last = self.last_seen?;
        let restarted = match (known, subscribed.log_id.as_str()) {
            // The bus names its log: a new name is a new log, however far its head is.
            (Some(known), current) if !current.is_empty() => known != current,
            // An older bus without log ids: only a head behind what was seen gives it away.
            _ => subscribed.head_sequence < last,
        };
        if !restarted {
            return None;
        }
        self.last_seen = None;
        self.start = if self.group {
            Start::Latest
        } else {
            Start::Earliest
        };
        Some(last)
    }

    /// The sequences lost between the requested start and the oldest event the bus holds,
    /// when the bus says the start was truncated.
    fn gap(&self, subscribed: &pb::Subscribed) -> Option<(u64, u64)> {
        if !subscribed.start_truncated {
            return None;
        }
        let after = match (self.last_seen, self.next_start()) {
            (Some(last), _) => last,
            (None, Start::AfterSequence(sequence)) => sequence,
            (None, _) => 0,
        };
        let to = if subscribed.oldest_sequence == 0 {
            subscribed.head_sequence
        } else {
            subscribed.oldest_sequence - 1
        };
        (after < to).then_some((after + 1, to))
    }
}

/// The background task of a subscription: pumps the stream and resumes it.
struct Resumer {
    client: Client,
    request: pb::SubscribeRequest,
    cursor: Cursor,
    backoff: Backoff,
    items: ItemSender,
}

impl Resumer {
    async fn run(mut self, mut stream: tonic::Streaming<pb::SubscribeResponse>) {
        loop {
            let Some(broken) = self.pump(&mut stream).await else {
                return;
            };
            if !is_retryable(broken.code()) {
                let _ = self.items.send(Err(broken.into())).await;
                return;
            }
            self.client.fail_over(&broken);
            let node = self.client.current_url().unwrap_or_default();
            tracing::info!(
                error = %broken,
                last_seen = self.cursor.last_seen,
                node,
                "subscription stream broke, resuming"
            );
            self.items.offer(SubscriptionItem::Interrupted {
                why: super::error::describe_status(&broken),
                node,
            });
            match self.resume(broken).await {
                Some(resumed) => stream = resumed,
                None => return,
            }
        }
    }

    /// Delivers the stream's items until it breaks (`Some(why)`) or the caller is gone. What
    /// the stream has ready is passed on in one chunk.
    async fn pump(
        &mut self,
        stream: &mut tonic::Streaming<pb::SubscribeResponse>,
    ) -> Option<tonic::Status> {
        loop {
            let mut message = tokio::select! {
                _ = self.items.closed() => return None,
                message = stream.message() => message,
            };
            let mut chunk = Vec::new();
            let broken = loop {
                if let Err(status) = self.items_of(message, &mut chunk) {
                    break Some(status);
                }
                if chunk.len() >= ITEMS_PER_CHUNK {
                    break None;
                }
                // `message()` is cancel-safe: a message not ready now is read next round.
                match stream.message().now_or_never() {
                    Some(next) => message = next,
                    None => break None,
                }
            };
            if !chunk.is_empty() && self.items.send_chunk(chunk).await.is_err() {
                return None;
            }
            if broken.is_some() {
                return broken;
            }
        }
    }

    /// What one read from the stream means: items to deliver (an event, each event of a
    /// batch, the caught-up marker) added to `chunk`, nothing (a duplicate, an unknown
    /// message), or the stream's end.
    fn items_of(
        &mut self,
        message: std::result::Result<Option<pb::SubscribeResponse>, tonic::Status>,
        chunk: &mut Vec<Result<SubscriptionItem>>,
    ) -> std::result::Result<(), tonic::Status> {
        match message {
            Ok(Some(pb::SubscribeResponse {
                message: Some(Message::Event(event)),
                delivery_attempt,
            })) => {
                chunk.extend(self.event_item(event, delivery_attempt).map(Ok));
                Ok(())
            }
            Ok(Some(pb::SubscribeResponse {
                message: Some(Message::EventBatch(batch)),
                ..
            })) => {
                let mut attempts = batch.delivery_attempts.into_iter();
                for event in batch.events {
                    let attempt = attempts.next().unwrap_or(0);
                    chunk.extend(self.event_item(event, attempt).map(Ok));
                }
                Ok(())
            }
            Ok(Some(pb::SubscribeResponse {
                message: Some(Message::CaughtUp(caught_up)),
                ..
            })) => {
                chunk.push(Ok(SubscriptionItem::CaughtUp {
                    sequence: caught_up.sequence,
                }));
                Ok(())
            }
            Ok(Some(other)) => {
                tracing::debug!(?other, "ignoring an unexpected subscription message");
                Ok(())
            }
            Ok(None) => Err(tonic::Status::unavailable(
                "the bus ended the subscription stream",
            )),
            Err(status) => Err(status),
        }
    }

    /// The item for one delivered event: `None` for one already delivered (a resume's
    /// overlap).
    fn event_item(&mut self, event: pb::Event, attempt: u32) -> Option<SubscriptionItem> {
        if !self.cursor.accept(event.sequence) {
            tracing::debug!(sequence = event.sequence, "dropping a duplicate");
            return None;
        }
        Some(if self.cursor.manual {
            SubscriptionItem::Delivery(Delivery {
                event,
                attempt,
                group: self.request.group.clone(),
                client: self.client.clone(),
            })
        } else {
            SubscriptionItem::Event(event)
        })
    }

    /// Subscribes again with backoff; `None` when the caller is gone or it gave up (after
    /// telling the caller why).
    async fn resume(
        &mut self,
        mut last_error: tonic::Status,
    ) -> Option<tonic::Streaming<pb::SubscribeResponse>> {
        let mut failures = 0;
        loop {
            if !self.backoff.allows(failures) {
                let _ = self.items.send(Err(last_error.into())).await;
                return None;
            }
            let delay = self.backoff.delay(failures);
            tokio::select! {
                _ = self.items.closed() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
            self.client.prefer_serving().await;
            let start = self.cursor.next_start();
            let request = pb::SubscribeRequest {
                start: Some(start.to_pb()),
                // The bus drops a position taken from another log and starts at its oldest
                // event, saying so in `log_changed`, in the same round trip.
                log_id: self.cursor.log_id.clone().unwrap_or_default(),
                ..self.request.clone()
            };
            match subscribe_once(&self.client, request).await {
                Ok((subscribed, stream)) => {
                    if let Some(last_seen) = self.cursor.reset_if_log_restarted(&subscribed) {
                        tracing::warn!(
                            last_seen,
                            head = subscribed.head_sequence,
                            "the bus restarted without its log; starting over on the new log"
                        );
                        let reset = SubscriptionItem::BusReset {
                            last_seen,
                            head: subscribed.head_sequence,
                        };
                        if self.items.send(Ok(reset)).await.is_err() {
                            return None;
                        }
                        if !self.cursor.group && !subscribed.log_changed {
                            // A bus that did not understand `log_id` started this stream after
                            // `last_seen`, past events of the new log: subscribe again from its
                            // beginning.
                            drop(stream);
                            failures = 0;
                            continue;
                        }
                    }
                    let after_sequence = match start {
                        Start::AfterSequence(sequence) => Some(sequence),
                        _ => None,
                    };
                    let mut items = vec![SubscriptionItem::Resumed {
                        subscription_id: subscribed.subscription_id.clone(),
                        after_sequence,
                    }];
                    if let Some((from, to)) = self.cursor.gap(&subscribed) {
                        tracing::warn!(from, to, "events were lost while resuming");
                        items.push(SubscriptionItem::Gap { from, to });
                    }
                    for item in items {
                        if self.items.send(Ok(item)).await.is_err() {
                            return None;
                        }
                    }
                    return Some(stream);
                }
                Err(Error::Status(status))
                    if is_retryable(status.code())
                        || super::client::is_group_elsewhere(&status) =>
                {
                    failures += 1;
                    tracing::debug!(error = %status, failures, "resubscribe failed");
                    self.client.fail_over(&status);
                    last_error = status;
                }
                Err(error) => {
                    let _ = self.items.send(Err(error)).await;
                    return None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subscribed(truncated: bool, oldest: u64, head: u64) -> pb::Subscribed {
        pb::Subscribed {
            start_truncated: truncated,
            oldest_sequence: oldest,
            head_sequence: head,
            ..Default::default()
        }
    }

    #[test]
    fn resumes_after_the_last_event_seen_and_drops_duplicates() {
        let mut cursor = Cursor::new(Start::Earliest, false);
        assert_eq!(cursor.next_start(), Start::Earliest);
        assert!(cursor.accept(5));
        assert!(cursor.accept(9));
        assert_eq!(cursor.next_start(), Start::AfterSequence(9));
        assert!(!cursor.accept(9));
        assert!(!cursor.accept(3));
        assert!(cursor.accept(10));
    }

    #[test]
    fn nothing_seen_resumes_from_the_original_start() {
        let cursor = Cursor::new(Start::AfterSequence(41), false);
        assert_eq!(cursor.next_start(), Start::AfterSequence(41));
        let time = SystemTime::UNIX_EPOCH;
        assert_eq!(
            Cursor::new(Start::FromTime(time), false).next_start(),
            Start::FromTime(time)
        );
    }

    #[test]
    fn groups_resume_live() {
        let mut cursor = Cursor::new(Start::Latest, true);
        cursor.accept(7);
        assert_eq!(cursor.next_start(), Start::Latest);
    }

    #[test]
    fn truncated_start_reports_the_lost_range() {
        let mut cursor = Cursor::new(Start::Latest, false);
        cursor.accept(10);
        assert_eq!(cursor.gap(&subscribed(true, 15, 20)), Some((11, 14)));
        assert_eq!(cursor.gap(&subscribed(false, 15, 20)), None);
        // Nothing held at all: everything up to the head is gone.
        assert_eq!(cursor.gap(&subscribed(true, 0, 30)), Some((11, 30)));
        let fresh = Cursor::new(Start::AfterSequence(3), false);
        assert_eq!(fresh.gap(&subscribed(true, 8, 9)), Some((4, 7)));
        // Truncated but nothing actually missing.
        assert_eq!(cursor.gap(&subscribed(true, 11, 20)), None);
    }

    #[test]
    fn a_restarted_log_starts_over() {
        let mut cursor = Cursor::new(Start::Latest, false);
        assert_eq!(
            cursor.reset_if_log_restarted(&subscribed(false, 0, 0)),
            None
        );
        cursor.accept(10);
        assert_eq!(
            cursor.reset_if_log_restarted(&subscribed(false, 1, 10)),
            None
        );
        assert_eq!(
            cursor.reset_if_log_restarted(&subscribed(false, 1, 3)),
            Some(10)
        );
        assert_eq!(cursor.next_start(), Start::Earliest);
        assert!(cursor.accept(1), "the new log's sequences are new events");

        let mut group = Cursor::new(Start::Latest, true);
        group.accept(10);
        assert_eq!(
            group.reset_if_log_restarted(&subscribed(false, 0, 0)),
            Some(10)
        );
        assert_eq!(group.next_start(), Start::Latest);
    }

    #[test]
    fn refusals_are_not_retried() {
        assert!(is_retryable(Code::Unavailable));
        assert!(is_retryable(Code::ResourceExhausted));
        assert!(!is_retryable(Code::InvalidArgument));
        assert!(!is_retryable(Code::PermissionDenied));
    }
}
