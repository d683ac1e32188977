//! [`Publisher`]: many events over one `PublishStream`, batched, with many batches in flight.
//!
//! One unary `Publish` per event pays a round trip each; the stream amortises that. A
//! background task owns the stream: it collects events into batches (up to `max_batch` events
//! or `max_batch_bytes`, or whatever arrived within `linger`), tags each batch with a
//! `request_id`, and keeps up to `max_in_flight` batches unacknowledged. Each event's future
//! resolves when its batch's answer comes back. Every queue is bounded, so a fast producer
//! waits instead of filling memory.
//!
//! Failures: a batch the bus refuses (`PublishError`) fails exactly that batch's events with
//! the bus's code and message; nothing of it was stored. When the stream itself breaks, the
//! bus may or may not have stored the batches in flight. The publisher gives every event an id
//! before its first send (a UUIDv7 when it has none), and the bus deduplicates by (source, id)
//! within its dedupe window (2 minutes by default), so resending is safe: those batches are
//! sent again on a new stream, with backoff, up to [`PublisherOptions::retries`] times, and an
//! event that was stored the first time is answered with its original sequence. Only after the
//! last retry do they fail with [`Error::StreamBroken`].

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument as _;

use super::backoff::Backoff;
use super::client::Client;
use super::error::{Error, Result};
use crate::pb;
use crate::pb::publish_stream_response::Result as BatchResult;

/// Tuning of a [`Publisher`].
#[derive(Debug, Clone)]
pub struct PublisherOptions {
    /// Most events in one batch.
    pub max_batch: usize,
    /// A batch is sent once its encoded events reach this size (keep it under the bus's gRPC
    /// message limit).
    pub max_batch_bytes: usize,
    /// How long the first event of a batch may wait for company.
    pub linger: Duration,
    /// Most batches sent and not yet acknowledged.
    pub max_in_flight: usize,
    /// Events queued in front of the batcher before `publish` waits.
    pub queue: usize,
    /// Times a batch whose stream broke is sent again (with the same event ids, so the bus
    /// stores it once) before its events fail.
    pub retries: u32,
    /// Delays between those retries.
    pub retry_backoff: Backoff,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        PublisherOptions {
            max_batch: 512,
            max_batch_bytes: 1024 * 1024,
            linger: Duration::from_millis(2),
            max_in_flight: 16,
            queue: 4096,
            retries: 5,
            retry_backoff: Backoff::default(),
        }
    }
}

type Ack = oneshot::Sender<Result<u64>>;

// Nearly every command is a Publish: boxing it would cost an allocation per event to save
// space in the rare ones.
#[allow(clippy::large_enum_variant)]
enum Command {
    Publish(pb::Event, Ack),
    Flush(oneshot::Sender<()>),
    Close(oneshot::Sender<()>),
}

/// A batching publisher over one `PublishStream`; made by [`Client::publisher`]. Cheap to
/// clone: clones share the stream. The background task ends when [`Publisher::close`] is
/// called or every clone is dropped, after sending what is queued.
///
/// A batch the bus refuses fails exactly its own events with the bus's code and message
/// (nothing of it was stored). When the stream breaks, the batches in flight are sent again on
/// a new stream with the same event ids, which the bus deduplicates, so an event is stored once
/// (see [`PublisherOptions::retries`]); after the last retry they fail with
/// [`Error::StreamBroken`].
#[derive(Debug, Clone)]
pub struct Publisher {
    commands: mpsc::Sender<Command>,
    source: String,
}

/// The outcome of one queued event: resolves to its sequence once its batch is acknowledged.
#[derive(Debug)]
#[must_use = "the event's outcome is only known by awaiting it"]
pub struct PendingPublish {
    ack: oneshot::Receiver<Result<u64>>,
}

impl Future for PendingPublish {
    type Output = Result<u64>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.ack)
            .poll(cx)
            .map(|answer| answer.unwrap_or(Err(Error::PublisherClosed)))
    }
}

impl Publisher {
    pub(crate) fn new(client: Client, options: PublisherOptions) -> Self {
        let options = PublisherOptions {
            max_batch: options.max_batch.max(1),
            max_in_flight: options.max_in_flight.max(1),
            queue: options.queue.max(1),
            ..options
        };
        let (commands, receiver) = mpsc::channel(options.queue);
        let source = client.source().to_string();
        let span = tracing::debug_span!("publisher", source = %source);
        tokio::spawn(Batcher::new(client, options).run(receiver).instrument(span));
        Publisher { commands, source }
    }

    /// Queues `event` and returns once its batch is acknowledged, with its sequence.
    pub async fn publish(&self, event: pb::Event) -> Result<u64> {
        self.submit(event).await?.await
    }

    /// Queues `event` (waiting only for queue space) and returns a future of its sequence, so
    /// that many events can be in flight from one task.
    pub async fn submit(&self, mut event: pb::Event) -> Result<PendingPublish> {
        if event.source.is_empty() {
            event.source = self.source.clone();
        }
        if event.id.is_empty() {
            // Fixed before the first send, so a resend after a broken stream is recognised by
            // the bus as the same event.
            event.id = uuid::Uuid::now_v7().to_string();
        }
        let (ack, answer) = oneshot::channel();
        self.commands
            .send(Command::Publish(event, ack))
            .await
            .map_err(|_| Error::PublisherClosed)?;
        Ok(PendingPublish { ack: answer })
    }

    /// Sends what is queued now and waits until every event queued before this call is
    /// answered (successfully or not).
    pub async fn flush(&self) -> Result<()> {
        let (done, wait) = oneshot::channel();
        self.commands
            .send(Command::Flush(done))
            .await
            .map_err(|_| Error::PublisherClosed)?;
        wait.await.map_err(|_| Error::PublisherClosed)
    }

    /// Sends what is queued, waits for every answer, and stops the background task. Later
    /// `publish` calls on clones fail with [`Error::PublisherClosed`].
    pub async fn close(self) -> Result<()> {
        let (done, wait) = oneshot::channel();
        self.commands
            .send(Command::Close(done))
            .await
            .map_err(|_| Error::PublisherClosed)?;
        wait.await.map_err(|_| Error::PublisherClosed)
    }
}

/// The open stream: requests go in through a channel that tonic drains.
struct OpenStream {
    requests: mpsc::Sender<pb::PublishStreamRequest>,
    responses: tonic::Streaming<pb::PublishStreamResponse>,
}

/// A batch on its way: kept until answered, so it can be sent again after a broken stream.
struct SentBatch {
    events: Vec<pb::Event>,
    acks: Vec<Ack>,
    /// Sends so far.
    attempts: u32,
    /// The batch's place in the publisher's order, fixed when it is made: batches waiting to
    /// be sent again are kept in this order, whichever way their sends failed, so the bus
    /// stores a publisher's events in the order it published them.
    order: u64,
    /// When it may be sent again, once queued to be ([`Batcher::retry_or_fail`]).
    due: Instant,
}

/// The background task's state.
struct Batcher {
    client: Client,
    options: PublisherOptions,
    /// The batch being collected, and the encoded size of its events.
    pending: Vec<(pb::Event, Ack)>,
    pending_bytes: usize,
    /// When the batch being collected must go out.
    deadline: Option<Instant>,
    /// Send the collected batch at once (a flush or close asked for it).
    force: bool,
    /// Batches sent and not answered, by request_id, in send order.
    in_flight: BTreeMap<u64, SentBatch>,
    /// The order of the next batch made (see [`SentBatch::order`]).
    next_order: u64,
    /// Batches whose fate is unknown (their stream broke, or the node could not store them),
    /// to send again in their order: the front one once it is due, and no new batch before
    /// them.
    resend: VecDeque<SentBatch>,
    next_id: u64,
    stream: Option<OpenStream>,
    /// Flush waiters and the last request_id each one waits for.
    flushes: Vec<(u64, oneshot::Sender<()>)>,
    closes: Vec<oneshot::Sender<()>>,
    /// No more commands will be taken.
    input_done: bool,
}

impl Batcher {
    fn new(client: Client, options: PublisherOptions) -> Self {
        Batcher {
            client,
            options,
            pending: Vec::new(),
            pending_bytes: 0,
            deadline: None,
            force: false,
            in_flight: BTreeMap::new(),
            next_order: 0,
            resend: VecDeque::new(),
            next_id: 1,
            stream: None,
            flushes: Vec::new(),
            closes: Vec::new(),
            input_done: false,
        }
    }

    fn batch_due(&self, now: Instant) -> bool {
        !self.pending.is_empty()
            && (self.force
                || self.input_done
                || self.pending.len() >= self.options.max_batch
                || self.pending_bytes >= self.options.max_batch_bytes
                || self.deadline.is_some_and(|deadline| now >= deadline))
    }

    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            // Batches to send again go first, so the stream keeps the publisher's order.
            while self
                .resend
                .front()
                .is_some_and(|batch| Instant::now() >= batch.due)
                && self.in_flight.len() < self.options.max_in_flight
            {
                let batch = self.resend.pop_front().expect("a front batch");
                self.send(batch).await;
            }
            while self.resend.is_empty()
                && self.batch_due(Instant::now())
                && self.in_flight.len() < self.options.max_in_flight
            {
                self.send_batch().await;
            }
            self.resolve_flushes();
            if self.input_done
                && self.pending.is_empty()
                && self.in_flight.is_empty()
                && self.resend.is_empty()
            {
                for close in self.closes.drain(..) {
                    let _ = close.send(());
                }
                return;
            }
            let accept = !self.input_done
                && self.pending.len() < self.options.max_batch
                && self.pending_bytes < self.options.max_batch_bytes;
            let resend_due = self.resend.front().map(|batch| batch.due);
            let linger = self
                .deadline
                .filter(|_| self.in_flight.len() < self.options.max_in_flight);
            tokio::select! {
                response = next_response(&mut self.stream), if !self.in_flight.is_empty() => {
                    self.on_response(response);
                }
                command = commands.recv(), if accept => match command {
                    Some(command) => self.on_command(command, &mut commands),
                    None => self.input_done = true,
                },
                // Wakes the loop when the collected batch's linger time is up.
                _ = tokio::time::sleep_until(linger.unwrap_or_else(Instant::now)), if linger.is_some() => {}
                // Wakes the loop when batches whose stream broke may be sent again.
                _ = tokio::time::sleep_until(resend_due.unwrap_or_else(Instant::now)), if resend_due.is_some() => {}
                else => return,
            }
        }
    }

    fn on_command(&mut self, command: Command, commands: &mut mpsc::Receiver<Command>) {
        match command {
            Command::Publish(event, ack) => {
                if self.pending.is_empty() {
                    self.deadline = Some(Instant::now() + self.options.linger);
                }
                self.pending_bytes += event.encoded_len();
                self.pending.push((event, ack));
            }
            Command::Flush(done) => {
                let last = if self.pending.is_empty() {
                    self.next_id - 1
                } else {
                    self.next_id
                };
                self.force = true;
                self.flushes.push((last, done));
            }
            Command::Close(done) => {
                self.input_done = true;
                // Later sends fail at once; commands queued after this one are dropped, so
                // their callers see PublisherClosed.
                commands.close();
                self.closes.push(done);
            }
        }
    }

    /// Sends up to one batch's worth of the collected events.
    async fn send_batch(&mut self) {
        let mut take = 0;
        let mut bytes = 0;
        for (event, _) in &self.pending {
            if take > 0
                && (take == self.options.max_batch
                    || bytes + event.encoded_len() > self.options.max_batch_bytes)
            {
                break;
            }
            bytes += event.encoded_len();
            take += 1;
        }
        let (events, acks): (Vec<_>, Vec<_>) = self.pending.drain(..take).unzip();
        self.pending_bytes -= bytes;
        if self.pending.is_empty() {
            self.deadline = None;
            self.force = false;
        }
        let order = self.next_order;
        self.next_order += 1;
        self.send(SentBatch {
            events,
            acks,
            attempts: 0,
            order,
            due: Instant::now(),
        })
        .await;
    }

    /// Sends one batch on the open stream, or on a new one.
    async fn send(&mut self, mut batch: SentBatch) {
        let request_id = self.next_id;
        self.next_id += 1;
        batch.attempts += 1;
        tracing::trace!(
            request_id,
            events = batch.events.len(),
            attempt = batch.attempts,
            "sending batch"
        );
        let request = pb::PublishStreamRequest {
            request_id,
            events: batch.events.clone(),
        };

        if let Some(stream) = &self.stream {
            // Cannot be full: the channel holds max_in_flight + 1 and fewer are unanswered.
            if stream.requests.try_send(request).is_err() {
                // The stream ended before its answers were read: what is in flight on it will
                // never be answered there, so it goes back in the queue with this batch.
                let closed = tonic::Status::unavailable("the publish stream is closed");
                self.break_stream(closed.clone());
                self.retry_or_fail(batch, closed);
            } else {
                self.in_flight.insert(request_id, batch);
            }
            return;
        }
        if batch.attempts > 1 {
            self.client.prefer_serving().await;
        }
        // Open a stream with this batch already queued on it: the bus may wait for the first
        // message before it answers with headers.
        let (requests, receiver) = mpsc::channel(self.options.max_in_flight + 1);
        requests
            .try_send(request)
            .expect("a fresh channel has room");
        match self
            .client
            .bus()
            .publish_stream(ReceiverStream::new(receiver))
            .await
        {
            Ok(response) => {
                self.stream = Some(OpenStream {
                    requests,
                    responses: response.into_inner(),
                });
                self.in_flight.insert(request_id, batch);
            }
            Err(status) => {
                tracing::debug!(error = %status, "cannot open publish stream");
                if super::subscription::is_retryable(status.code()) {
                    self.retry_or_fail(batch, status);
                } else {
                    fail_all(batch.acks, || Error::Status(status.clone()));
                }
            }
        }
    }

    /// Queues a batch whose fate is unknown to be sent again, or fails it after its last retry.
    fn retry_or_fail(&mut self, mut batch: SentBatch, status: tonic::Status) {
        // A node that is gone: the resend goes to the next one, with the same ids.
        self.client.fail_over(&status);
        if batch.attempts > self.options.retries {
            fail_all(batch.acks, || Error::StreamBroken(status.clone()));
            return;
        }
        batch.due = Instant::now() + self.options.retry_backoff.delay(batch.attempts - 1);
        // Keep the oldest first, whichever failed first: a batch that failed to open a
        // stream goes back in front of the ones it was sent before.
        let at = self
            .resend
            .partition_point(|queued| queued.order < batch.order);
        self.resend.insert(at, batch);
    }

    fn on_response(
        &mut self,
        response: std::result::Result<Option<pb::PublishStreamResponse>, tonic::Status>,
    ) {
        let response = match response {
            Ok(Some(response)) => response,
            Ok(None) => {
                return self.break_stream(tonic::Status::unavailable(
                    "the bus ended the publish stream",
                ))
            }
            Err(status) => return self.break_stream(status),
        };
        let Some(batch) = self.in_flight.remove(&response.request_id) else {
            tracing::warn!(
                request_id = response.request_id,
                "answer for an unknown batch"
            );
            return;
        };
        let result = response.result;
        if let Some(BatchResult::Error(error)) = &result {
            let status = tonic::Status::new(tonic::Code::from(error.code), error.message.clone());
            if status.code() == tonic::Code::Unavailable && error.reason != "no-responders" {
                // The node could not store it (its log was unreachable, or it is stopping):
                // its fate is unknown, so it is sent again with the same ids, as after a
                // broken stream, on the next node if this one is going.
                tracing::debug!(request_id = response.request_id, error = %status, "batch not stored; sending it again");
                self.retry_or_fail(batch, status);
                return;
            }
        }
        let acks = batch.acks;
        match result {
            Some(BatchResult::Published(published)) if published.sequences.len() == acks.len() => {
                for (ack, sequence) in acks.into_iter().zip(published.sequences) {
                    let _ = ack.send(Ok(sequence));
                }
            }
            Some(BatchResult::Published(published)) => {
                let message = format!(
                    "{} sequences for a batch of {} events",
                    published.sequences.len(),
                    acks.len()
                );
                fail_all(acks, || Error::Protocol(message.clone()));
            }
            Some(BatchResult::Error(error)) => {
                let status = tonic::Status::new(tonic::Code::from(error.code), error.message);
                tracing::debug!(request_id = response.request_id, error = %status, "batch refused");
                fail_all(acks, || Error::Status(status.clone()));
            }
            None => fail_all(acks, || {
                Error::Protocol("a batch answer with neither sequences nor error".into())
            }),
        }
    }

    /// The stream is gone: what is in flight may or may not be stored, so it is sent again on
    /// a new stream (the bus deduplicates by event id), up to the retry limit.
    fn break_stream(&mut self, status: tonic::Status) {
        tracing::warn!(error = %status, in_flight = self.in_flight.len(), "publish stream broke");
        self.stream = None;
        for (_, batch) in std::mem::take(&mut self.in_flight) {
            self.retry_or_fail(batch, status.clone());
        }
    }

    fn resolve_flushes(&mut self) {
        let oldest_in_flight = self.in_flight.keys().next().copied();
        let next_id = self.next_id;
        // A batch waiting to be sent again was queued before any flush now waiting.
        let resending = !self.resend.is_empty();
        let finished = |last: u64| {
            !resending && next_id > last && oldest_in_flight.is_none_or(|oldest| oldest > last)
        };
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.flushes)
            .into_iter()
            .partition(|(last, _)| finished(*last));
        self.flushes = waiting;
        for (_, flushed) in done {
            let _ = flushed.send(());
        }
    }
}

fn fail_all(acks: Vec<Ack>, error: impl Fn() -> Error) {
    for ack in acks {
        let _ = ack.send(Err(error()));
    }
}

async fn next_response(
    stream: &mut Option<OpenStream>,
) -> std::result::Result<Option<pb::PublishStreamResponse>, tonic::Status> {
    match stream {
        Some(stream) => stream.responses.message().await,
        None => std::future::pending().await,
    }
}
