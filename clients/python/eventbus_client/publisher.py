"""The batching publisher: many events over one ``PublishStream``, with many batches in flight.

One unary ``Publish`` per event pays a round trip each; the stream amortises that. A background
thread collects submitted events into batches (up to ``max_batch`` events or ``max_batch_bytes``
encoded bytes, or whatever arrived within ``linger`` seconds of the batch's first event), tags
each with a ``request_id`` and keeps up to ``max_in_flight`` batches unanswered. Each event's
``concurrent.futures.Future`` resolves with its sequence when its batch's answer comes back.
:class:`AsyncPublisher` hands out asyncio futures over the same machinery.

Failures, as the Rust SDK's ``sdk::Publisher``:

- A batch the bus refuses (``PublishError``) fails exactly that batch's events with the matching
  :class:`eventbus_client.BusError`; nothing of it was stored. Except an UNAVAILABLE answer
  other than ``no-responders`` (``store-failed``: the node could not get the batch into its log
  in time): the batch's fate is unknown, as below.
- When the stream itself breaks (the bus restarts, the connection drops), the bus may or may not
  have stored the batches in flight. Every event got an id before its first send (a UUIDv7 when
  it had none), and the bus deduplicates by (source, id) within its dedupe window (2 minutes by
  default, rebuilt from the log after a restart of a file-store bus), so those batches, and the
  ones a node answered UNAVAILABLE, are sent again with the same ids, with :class:`Backoff`
  between attempts: an event stored the first time is answered with its original sequence, and
  stored once. Batches waiting to be sent again keep the order they were published in, however
  each one failed, and no newer batch goes before them. By default this never gives up
  (``max_retries=None``); with a limit, events fail with :class:`StreamBroken` after it.
- On a clustered bus, a stream broken because its node is gone, or a batch answered
  UNAVAILABLE by a node that is going (both :func:`eventbus_client._common.moves_on`), moves the
  publisher to another node (:class:`eventbus_client._nodes.Nodes`) for its next stream, and
  the resends go there: the nodes share JetStream's dedupe window, so the cluster still stores
  each event once.

Threads: one batcher thread owns the state (under one condition variable), one reader thread
per open stream turns answers into results, and grpcio's own thread drains the request queue.
Futures are settled outside the lock, so callbacks may call back into the publisher.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc

from . import errors
from ._common import Backoff, Failover, is_retryable, moves_on
from ._nodes import Nodes
from ._proto import eventbus_pb2 as pb
from .events import Data, Event, new_event, to_pb

log = logging.getLogger(__name__)


def uuid7() -> str:
    """A UUIDv7 (RFC 9562) as text: 48 bits of Unix milliseconds, then random bits. Ids made
    this way sort by creation time, as the Rust SDK's ``Uuid::now_v7``."""
    millis = time.time_ns() // 1_000_000
    value = (millis & ((1 << 48) - 1)) << 80 | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    text = f"{value:032x}"
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


class PublisherClosed(errors.BusError):
    """The publisher was closed before the event was handed over."""

    def __init__(self) -> None:
        super().__init__(grpc.StatusCode.CANCELLED, "the publisher is closed")


class StreamBroken(errors.BusError):
    """The publish stream broke while this event's batch was in flight, or the node answered
    the batch UNAVAILABLE (it could not store it), and the publisher's ``max_retries`` resends
    were used up. The event may or may not be stored. The code and reason are the last
    failure's."""


@dataclass
class _Batch:
    """A batch on its way: kept until answered, so it can be sent again on a new stream."""

    events: list[pb.Event]
    futures: list[concurrent.futures.Future[int]]
    #: The batch's place in the publisher's order, fixed when it is made: batches waiting to be
    #: sent again are kept in this order, whichever way their sends failed (a refused batch is
    #: sent again with a newer request id than the batches behind it that were in flight), so
    #: the bus stores a publisher's events in the order it published them.
    order: int
    attempts: int = 0
    #: When it may be sent again (``time.monotonic()``), once queued to be.
    due: float = 0.0


@dataclass
class _Stream:
    """One open ``PublishStream``: requests go in through a queue that grpcio drains."""

    requests: queue.SimpleQueue[pb.PublishStreamRequest | None] = field(
        default_factory=queue.SimpleQueue)
    call: Any = None
    #: The node it is open on (an index into the publisher's nodes).
    node: int = 0
    #: The bus answered on it: a break of this stream is news, not a failed reconnect.
    answered: bool = False

    def request_iterator(self) -> Iterator[pb.PublishStreamRequest]:
        while True:
            request = self.requests.get()
            if request is None:
                return
            yield request

    def end(self) -> None:
        self.requests.put(None)


class Publisher:
    """A batching publisher over one ``PublishStream``; made by
    :meth:`eventbus_client.Bus.publisher`. Thread-safe. Use it as a context manager, or call
    :meth:`close`, which sends what is queued and waits for every answer.

    Settings: ``max_batch`` events per batch; ``max_batch_bytes`` encoded bytes per batch (keep
    it under the bus's ``--max-message-bytes``); ``linger`` seconds the first event of a batch
    waits for company; ``max_in_flight`` batches sent and unanswered; ``queue`` events waiting
    in front of the batcher before :meth:`submit` blocks; ``backoff`` the delays between resends
    of a batch whose fate is unknown (its stream broke, or its node answered UNAVAILABLE);
    ``max_retries`` resends before its events fail with :class:`StreamBroken` (``None``: never
    give up). Defaults are the Rust SDK's, except that it gives up after 5 resends.
    """

    def __init__(self, nodes: Nodes, source: str, *, max_batch: int = 512,
                 max_batch_bytes: int = 1024 * 1024, linger: float = 0.002,
                 max_in_flight: int = 16, queue: int = 4096, backoff: Backoff | None = None,
                 max_retries: int | None = None) -> None:
        self.source = source
        self._nodes = nodes
        #: The node new streams open on; moved when a stream breaks because its node is gone.
        self._node = nodes.endpoints.index
        self._max_batch = max(1, max_batch)
        self._max_batch_bytes = max_batch_bytes
        self._linger = linger
        self._max_in_flight = max(1, max_in_flight)
        self._queue_size = max(1, queue)
        self._backoff = backoff or Backoff()
        self._max_retries = max_retries
        self._cond = threading.Condition()
        self._pending: collections.deque[tuple[pb.Event, concurrent.futures.Future[int], int]] = \
            collections.deque()
        self._pending_bytes = 0
        self._deadline: float | None = None
        self._force = False
        self._in_flight: dict[int, _Batch] = {}
        #: Batches whose fate is unknown, to send again in their order (:attr:`_Batch.order`):
        #: the front one once it is due, and no new batch before them.
        self._resend: collections.deque[_Batch] = collections.deque()
        self._next_order = 0
        self._next_id = 1
        self._stream: _Stream | None = None
        self._closing = False
        self._done = False
        self._settle: list[tuple[concurrent.futures.Future[int], int | BaseException]] = []
        #: Times the publish stream broke (failed reconnect attempts during an outage included).
        self.reconnects = 0
        #: Times the publisher moved to another node.
        self.failovers = 0
        #: Batches sent again: after a broken stream, or answered UNAVAILABLE by their node.
        self.resent_batches = 0
        self._thread = threading.Thread(target=self._run, name="eventbus-publisher",
                                        daemon=True)
        self._thread.start()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def publish(self, topic: str, data: Data = b"",
                **fields: Any) -> concurrent.futures.Future[int]:
        """Queues one event (fields as :func:`eventbus_client.new_event`) and returns a future
        of its sequence. Blocks only while ``queue`` events are waiting."""
        return self.submit(new_event(topic, data, **fields))

    def submit(self, event: Event) -> concurrent.futures.Future[int]:
        """Queues ``event`` and returns a future of its sequence (for a duplicate of an event
        already stored within the dedupe window, the original's). An event without ``id`` gets
        a UUIDv7 now, before its first send, so resends are recognised; without ``source``,
        this publisher's. The future fails with :class:`eventbus_client.BusError` (the bus's
        refusal of the batch), :class:`StreamBroken` (its resends used up) or
        :class:`PublisherClosed`. Raises :class:`PublisherClosed` after :meth:`close`."""
        future = self._try_submit(event, block=True)
        assert future is not None
        return future

    def _try_submit(self, event: Event, block: bool) -> concurrent.futures.Future[int] | None:
        message = to_pb(event, self.source)
        if not message.id:
            message.id = uuid7()
        size = message.ByteSize()
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        future.set_running_or_notify_cancel()
        with self._cond:
            while len(self._pending) >= self._queue_size and not self._closing:
                if not block:
                    return None
                self._cond.wait()
            if self._closing:
                raise PublisherClosed()
            if not self._pending:
                self._deadline = time.monotonic() + self._linger
            self._pending.append((message, future, size))
            self._pending_bytes += size
            self._cond.notify_all()
        return future

    def flush(self, timeout: float | None = None) -> None:
        """Sends what is queued now and waits until every event submitted before this call is
        answered (successfully or not). Raises ``TimeoutError`` after ``timeout`` seconds."""
        with self._cond:
            waiting = [f for _, f, _ in self._pending]
            for batch in [*self._in_flight.values(), *self._resend]:
                waiting.extend(batch.futures)
            self._force = True
            self._cond.notify_all()
        _, not_done = concurrent.futures.wait(waiting, timeout)
        if not_done:
            raise TimeoutError(f"{len(not_done)} events unanswered after {timeout} s")

    def close(self, timeout: float | None = None) -> None:
        """Sends what is queued, waits for every answer, and stops; later submits raise
        :class:`PublisherClosed`. ``timeout`` seconds bound the wait (``TimeoutError``)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"publisher still busy after {timeout} s")

    # The batcher thread.

    def _batch_due(self, now: float) -> bool:
        return bool(self._pending) and (
            self._force or self._closing or len(self._pending) >= self._max_batch
            or self._pending_bytes >= self._max_batch_bytes
            or (self._deadline is not None and now >= self._deadline))

    def _run(self) -> None:
        while True:
            with self._cond:
                finished = self._step()
                settle, self._settle = self._settle, []
            _settle(settle)
            if finished:
                return

    def _step(self) -> bool:
        """One round of the batcher under the lock: send what may go, or wait for a change.
        True once closing and everything is answered."""
        now = time.monotonic()
        room = len(self._in_flight) < self._max_in_flight
        if self._resend and room and now >= self._resend[0].due:
            # Batches to send again go first, so the stream keeps the publisher's order; the
            # front one once it is due (each waits its own backoff), the others behind it.
            self._send(self._resend.popleft())
            return False
        if not self._resend and room and self._batch_due(now):
            self._send(self._take_batch())
            self._cond.notify_all()  # room in the queue for blocked submitters
            return False
        if self._closing and not self._pending and not self._in_flight and not self._resend:
            if self._stream is not None:
                self._stream.end()
                self._stream = None
            self._done = True
            return True
        wait: float | None = None
        if self._pending and room and self._deadline is not None:
            wait = max(0.0, self._deadline - now)
        if self._resend:
            until = max(0.0, self._resend[0].due - now)
            wait = until if wait is None else min(wait, until)
        self._cond.wait(wait)
        return False

    def _take_batch(self) -> _Batch:
        events: list[pb.Event] = []
        futures: list[concurrent.futures.Future[int]] = []
        size = 0
        while self._pending:
            message, future, event_size = self._pending[0]
            if events and (len(events) == self._max_batch
                           or size + event_size > self._max_batch_bytes):
                break
            self._pending.popleft()
            events.append(message)
            futures.append(future)
            size += event_size
        self._pending_bytes -= size
        if not self._pending:
            self._deadline = None
            self._force = False
        self._next_order += 1
        return _Batch(events, futures, order=self._next_order)

    def _send(self, batch: _Batch) -> None:
        request_id = self._next_id
        self._next_id += 1
        batch.attempts += 1
        if batch.attempts > 1:
            self.resent_batches += 1
        if self._stream is None:
            stream = _Stream(node=self._node)
            try:
                stub = self._nodes.stub(self._node)
                stream.call = stub.PublishStream(stream.request_iterator())
            except (ValueError, errors.Cancelled) as error:  # the channel is closed
                closed = errors.Cancelled(grpc.StatusCode.CANCELLED, f"publisher: {error}")
                self._settle.extend((f, closed) for f in batch.futures)
                return
            self._stream = stream
            threading.Thread(target=self._read, args=(stream,), name="eventbus-publisher-read",
                             daemon=True).start()
        self._in_flight[request_id] = batch
        self._stream.requests.put(pb.PublishStreamRequest(request_id=request_id,
                                                          events=batch.events))

    # The reader thread of one stream.

    def _read(self, stream: _Stream) -> None:
        failure: errors.BusError
        try:
            for response in stream.call:
                with self._cond:
                    if self._stream is not stream:
                        return
                    stream.answered = True
                    unstored = self._on_response(response)
                    settle, self._settle = self._settle, []
                    self._cond.notify_all()
                _settle(settle)
                if unstored is not None:
                    # The node is going: the next stream opens elsewhere. This one is kept
                    # for the answers still due on it, as the Rust SDK does.
                    self._move(stream, unstored)
            failure = errors.Unavailable(grpc.StatusCode.UNAVAILABLE,
                                         "the bus ended the publish stream")
        except grpc.RpcError as error:
            failure = errors.from_rpc_error(error)
        with self._cond:
            if self._stream is not stream:
                # The publisher ended this stream itself (it is closing): nothing to resend,
                # and no reason to leave the node. Failing over here would move the whole
                # client, and probe channels that Bus.close may be closing.
                return
        self._move(stream, failure, broken=True)

    def _move(self, stream: _Stream, failure: errors.BusError, broken: bool = False) -> None:
        """After ``failure`` on ``stream``: moves the publisher's next stream off the stream's
        node when the failure says the node is gone or going; when ``broken`` (the stream
        ended), also queues what was in flight on it to be sent again."""
        # Chosen before taking the lock: choosing may probe the other nodes' health. When the
        # client already left the node (a refusal on this stream moved it), this is that choice.
        to = self._nodes.fail_over(stream.node) if moves_on(failure) else stream.node
        moved = False
        with self._cond:
            if self._stream is stream:
                if to != self._node:
                    self._node = to
                    self.failovers += 1
                    moved = True
                if broken:
                    self._break_stream(stream, failure)
            settle, self._settle = self._settle, []
            self._cond.notify_all()
        if moved:  # outside the lock: the hook may call the publisher
            endpoints = self._nodes.endpoints
            endpoints.report(Failover("publisher", endpoints.address(stream.node),
                                      endpoints.address(to), failure))
        _settle(settle)

    def _on_response(self, response: pb.PublishStreamResponse) -> errors.BusError | None:
        """Settles a batch by its answer, or queues it to be sent again when its node could
        not store it; returns that refusal (the node may be going), else ``None``."""
        batch = self._in_flight.pop(response.request_id, None)
        if batch is None:
            log.warning("answer for an unknown batch %d", response.request_id)
            return None
        kind = response.WhichOneof("result")
        if kind == "published" and len(response.published.sequences) == len(batch.futures):
            self._settle.extend(zip(batch.futures, response.published.sequences))
        elif kind == "error":
            refusal = response.error
            code = _status_code(refusal.code)
            reason = refusal.reason or None
            error = errors.error_class(code, reason)(code, refusal.message, reason)
            if moves_on(error):
                # The node could not store it now (its log is unreachable): its fate is
                # unknown, so it is sent again with the same ids, as after a broken stream.
                log.debug("batch %d not stored (%s); sending it again", response.request_id,
                          error)
                self._retry_or_fail(batch, error, "the node did not confirm the batch")
                return error
            self._settle.extend((f, error) for f in batch.futures)
        else:
            error = errors.BusError(grpc.StatusCode.INTERNAL,
                                    f"unexpected answer to a batch of {len(batch.futures)}: "
                                    f"{response}")
            self._settle.extend((f, error) for f in batch.futures)
        return None

    def _break_stream(self, stream: _Stream, failure: errors.BusError) -> None:
        """The stream is gone: what is in flight may or may not be stored, so it is sent again
        on a new stream (the bus deduplicates by event id), unless the bus refused the stream
        itself."""
        log.log(logging.INFO if stream.answered else logging.DEBUG,
                "publish stream broke (%s) with %d batches in flight; resending", failure,
                len(self._in_flight))
        stream.end()
        stream.call.cancel()
        self._stream = None
        self.reconnects += 1
        broken = list(self._in_flight.values())
        self._in_flight.clear()
        for batch in broken:
            if is_retryable(failure):
                self._retry_or_fail(batch, failure, "publish stream broke before the batch "
                                    "was acknowledged")
            else:
                self._settle.extend((f, failure) for f in batch.futures)

    def _retry_or_fail(self, batch: _Batch, failure: errors.BusError, what: str) -> None:
        """Queues a batch whose fate is unknown to be sent again after its backoff, or fails
        its events with :class:`StreamBroken` (saying ``what`` happened) once its resends are
        used up."""
        if self._max_retries is not None and batch.attempts > self._max_retries:
            lost = StreamBroken(failure.code, f"{what} (it may or may not be stored): "
                                f"{failure.details}", failure.reason)
            self._settle.extend((f, lost) for f in batch.futures)
            return
        batch.due = time.monotonic() + self._backoff.delay(batch.attempts - 1)
        # In its place by order, however it failed: batches in flight go back in front of
        # those waiting (which wait while resends go out first), and a refused batch sent
        # again on the same stream, so with a newer request id than the batches behind it,
        # still goes before them.
        at = next((i for i, queued in enumerate(self._resend) if queued.order > batch.order),
                  len(self._resend))
        self._resend.insert(at, batch)


def _status_code(number: int) -> grpc.StatusCode:
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code
    return grpc.StatusCode.UNKNOWN


def _settle(outcomes: list[tuple[concurrent.futures.Future[int], int | BaseException]]) -> None:
    for future, outcome in outcomes:
        if future.done():
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


class AsyncPublisher:
    """:class:`Publisher` for asyncio code; made by :meth:`eventbus_client.AsyncBus.publisher`.
    :meth:`submit` returns an asyncio future of the sequence. The batching, resending and
    settings are :class:`Publisher`'s, which runs on its own threads over a blocking gRPC
    channel to the same bus (grpcio's asyncio API would need the stream's reader and writer as
    tasks; the threads keep one implementation of the resend rules)."""

    def __init__(self, publisher: Publisher, nodes: Nodes) -> None:
        self._publisher = publisher
        self._nodes = nodes

    @property
    def reconnects(self) -> int:
        """Times the publish stream broke (failed reconnect attempts included)."""
        return self._publisher.reconnects

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def publish(self, topic: str, data: Data = b"", **fields: Any) -> asyncio.Future[int]:
        """Queues one event; returns a future of its sequence (see :meth:`submit`)."""
        return await self.submit(new_event(topic, data, **fields))

    async def submit(self, event: Event) -> asyncio.Future[int]:
        """Queues ``event`` (waiting, without blocking the loop, while the queue is full) and
        returns an asyncio future of its sequence; see :meth:`Publisher.submit`."""
        future = self._publisher._try_submit(event, block=False)
        if future is None:
            loop = asyncio.get_running_loop()
            future = await loop.run_in_executor(None, self._publisher.submit, event)
        return asyncio.wrap_future(future)

    async def flush(self, timeout: float | None = None) -> None:
        """Sends what is queued and waits for the answers; see :meth:`Publisher.flush`."""
        await asyncio.get_running_loop().run_in_executor(None, self._publisher.flush, timeout)

    async def close(self, timeout: float | None = None) -> None:
        """Sends what is queued, waits for every answer, stops; see :meth:`Publisher.close`."""
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._publisher.close, timeout)
        finally:
            self._nodes.close()
