"""The blocking client: :class:`Bus`, its :class:`Subscription` iterator and the query
:class:`Responder`.

A subscription reads its gRPC stream on a background thread into a small bounded queue, and the
caller iterates the queue. The thread is what makes three things possible with grpcio's blocking
API: waiting for the ``subscribed`` confirmation with a timeout (so ``subscribe()`` returns only
once no publish can race past it), ``next_event(timeout)``, and reopening a broken stream without
the caller noticing. The queue is bounded so a slow caller still slows the stream down, and the
bus, not this process, decides when a subscriber is too slow.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import errors
from ._common import (
    CHANNEL_OPTIONS,
    DEFAULT_QUERY_TIMEOUT,
    HEALTH_SERVICE,
    PROBE_TIMEOUT,
    Backoff,
    BusReset,
    Endpoints,
    Failover,
    FailoverHook,
    ResumePoint,
    Target,
    Targets,
    grpc_deadline,
    is_group_elsewhere,
    is_retryable,
    moves_on,
    Pem,
    Security,
    parse_targets,
    received,
)
from ._proto import eventbus_pb2 as pb
from ._nodes import Nodes
from .publisher import Publisher
from ._proto import eventbus_pb2_grpc as pb_grpc
from .events import (
    DEFAULT_MAX_BATCH_EVENTS,
    AckResult,
    Data,
    Event,
    ManualAck,
    Reply,
    ReplyError,
    Start,
    error_reply,
    exception_reply,
    from_pb,
    nack_request,
    new_event,
    query_request,
    reply_event,
    subscribe_request,
    to_pb,
)

log = logging.getLogger(__name__)

#: A query handler: gets the query event, returns the reply data (or a :class:`Reply`), or
#: raises :class:`ReplyError` to answer with an error.
Handler = Callable[[Event], "Reply | Data"]


def _call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return function(*args, **kwargs)
    except grpc.RpcError as error:
        raise errors.from_rpc_error(error) from None


class Bus:
    """A connection to the bus: to one node, or to several nodes of a clustered bus.

    ``target`` is ``host:port``, ``http://host:port`` or ``https://host:port``; several nodes
    as a list or one comma-separated string (default: ``$EVENTBUS_URL``, else
    ``$EVENTBUS_SERVER``, else ``127.0.0.1:50051``). The client uses one node at a time. When a
    call fails the way a node that is gone fails (UNAVAILABLE: a refused or broken connection,
    ``shutting-down``, ``store-failed``), it moves to the next node that answers SERVING to a
    health check (or the next in order when none does): subscriptions resume there after the
    last sequence they delivered, MANUAL-ack members rejoin their group, the batching publisher
    resends what was unanswered with the same ids, and a failed query or unary call raises
    :class:`errors.NodeUnavailable` (retry it: the next call goes to the new node).
    ``on_failover`` is called with a :class:`Failover` for every move (they are also logged on
    the ``eventbus_client`` logger: a warning, or DEBUG within 10 seconds of the last warning,
    which the next warning counts).

    ``source`` names this service: it is the ``source`` of the events it publishes and its name
    in the bus's topology.

    An ``https://`` target is always TLS, never plaintext: ``tls_ca`` is a CA to trust instead
    of the system's roots, ``tls_cert`` and ``tls_key`` a client certificate for a bus with
    mutual TLS (each a file path, or the PEM bytes). ``token`` is sent with every call as
    ``authorization: Bearer <token>``. A file that cannot be read raises ``ValueError``.
    """

    def __init__(self, target: Targets = None, *, source: str = "python-client",
                 on_failover: FailoverHook | None = None, tls_ca: Pem | None = None,
                 tls_cert: Pem | None = None, tls_key: Pem | None = None,
                 token: str | None = None) -> None:
        self._nodes = Nodes(parse_targets(target, Security.of(tls_ca, tls_cert, tls_key, token)),
                            on_failover)
        self.source = source

    @property
    def target(self) -> str:
        """The node in use now, ``host:port``."""
        return self._nodes.endpoints.address(self._nodes.endpoints.index)

    @property
    def endpoints(self) -> list[str]:
        """Every node this client may use, ``host:port``, in the order given."""
        return [target.address for target in self._nodes.endpoints.targets]

    @property
    def _stub(self) -> pb_grpc.EventBusServiceStub:
        return self._nodes.stub(self._nodes.endpoints.index)

    def _unary(self, what: str, method: str, request: Any, **kwargs: Any) -> Any:
        """One unary call on the node in use; a failure that says the node is gone moves the
        client to another node for the next call, and is raised."""
        index = self._nodes.endpoints.index
        try:
            return _call(getattr(self._nodes.stub(index), method), request, **kwargs)
        except errors.BusError as error:
            # Only the call that moves the client reports the move.
            if moves_on(error) and self._nodes.endpoints.index == index:
                to = self._nodes.fail_over(index)
                self._nodes.endpoints.report(Failover(what, self._nodes.endpoints.address(index),
                                                      self._nodes.endpoints.address(to), error))
            raise

    def __enter__(self) -> Bus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connection; open subscriptions end."""
        self._nodes.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Polls the bus's health until its event API is SERVING on a node (the node in use
        first, then the others in turn, moving to the first that serves); raises
        :class:`errors.Unavailable` when none does within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        endpoints = self._nodes.endpoints
        last = "no answer"
        while True:
            start = endpoints.index
            for index in [start, *endpoints.candidates(start)[:-1]]:
                status = self._nodes.serving(index, HEALTH_SERVICE, timeout=1.0)
                if status == "SERVING":
                    endpoints.choose(start, index)
                    return
                last = f"{endpoints.address(index)}: {status}"
            if time.monotonic() >= deadline:
                raise errors.Unavailable(grpc.StatusCode.UNAVAILABLE,
                                         f"bus at {', '.join(self.endpoints)} not serving "
                                         f"after {timeout} s ({last})")
            time.sleep(0.05)

    def publish(self, topic: str, data: Data = b"", **fields: Any) -> int:
        """Publishes one event and returns its sequence. ``fields`` are other :class:`Event`
        fields: ``type``, ``attributes``, ``id``, ``correlation_id``, ``data_content_type``..."""
        return self.publish_batch([new_event(topic, data, **fields)])[0]

    def publish_batch(self, events: Iterable[Event]) -> list[int]:
        """Publishes events in order, all or none, and returns their sequences. Build events with
        :func:`eventbus_client.new_event`."""
        request = pb.PublishRequest(events=[to_pb(e, self.source) for e in events])
        response = self._unary("call", "Publish", request)
        return list(response.sequences)

    def publisher(self, *, max_batch: int = 512, max_batch_bytes: int = 1024 * 1024,
                  linger: float = 0.002, max_in_flight: int = 16, queue: int = 4096,
                  backoff: Backoff | None = None,
                  max_retries: int | None = None) -> Publisher:
        """A batching publisher over one ``PublishStream`` on this connection, with
        client-assigned ids and resends after a broken stream; see :class:`Publisher` for the
        settings (``linger`` in seconds, ``max_batch_bytes`` in bytes). Close it before the
        bus."""
        return Publisher(self._nodes, self.source, max_batch=max_batch,
                         max_batch_bytes=max_batch_bytes, linger=linger,
                         max_in_flight=max_in_flight, queue=queue, backoff=backoff,
                         max_retries=max_retries)

    def query(self, topic: str, data: Data = b"", *, timeout: float | None = None,
              retry: bool = False, backoff: Backoff | None = None, **fields: Any) -> Event:
        """Asks a question over events and returns the reply event. ``timeout`` in seconds (the
        bus's default, 5 s, when ``None``). Raises :class:`errors.NoResponders` at once when
        nobody serves the topic, :class:`errors.QueryTimeout` when no reply comes in time, and
        :class:`errors.RemoteError` when the responder answered with an error reply (a reply
        with the attribute ``error``: a handler that raised, or a :class:`ReplyError`).

        When the node in use fails under the query (it died, is stopping, lost its store), the
        client moves to another node and the query raises :class:`errors.NodeUnavailable`,
        which may be retried. With ``retry``, the query is sent again instead (to the new node,
        after ``backoff``, with the same event id) until ``timeout`` (5 s when ``None``) has
        passed since the first send; a responder may then see the query twice."""
        request = query_request(new_event(topic, data, **fields), self.source, timeout)
        backoff = backoff or Backoff()
        give_up = time.monotonic() + (timeout or DEFAULT_QUERY_TIMEOUT)
        attempt = 0
        while True:
            try:
                response = self._unary("query", "Query", request,
                                       timeout=grpc_deadline(timeout))
                return errors.raise_if_error_reply(topic, from_pb(response.reply))
            except errors.NodeUnavailable:
                wait = backoff.delay(attempt)
                if not retry or time.monotonic() + wait >= give_up:
                    raise
            time.sleep(wait)
            attempt += 1

    def subscribe(self, pattern: str, *, group: str | None = None, start: Start = "latest",
                  subscriber: str | None = None, resume: bool = True,
                  backoff: Backoff | None = None, reconnect_timeout: float | None = None,
                  rejoin_timeout: float = 30.0, confirm_timeout: float = 10.0,
                  buffer: int = 1024,
                  max_batch_events: int = DEFAULT_MAX_BATCH_EVENTS) -> Subscription:
        """Subscribes to a topic pattern (``*`` one token, ``>`` the rest) and returns once the bus
        has confirmed it: every matching event published after this returns is delivered.

        ``start`` is ``"latest"`` (default), ``"earliest"``, a sequence to resume after, or a
        ``datetime``. With ``resume`` (default), a broken stream (the bus ended it as too slow,
        went away, restarted) is reopened after the last event seen, waiting ``backoff``
        between attempts (default :class:`Backoff`: 50 ms doubling to 5 s, full jitter, no
        limit on attempts) and for at most ``reconnect_timeout`` seconds in all when given
        (default: no limit). Events come without duplicates or gaps while the bus still holds
        them; a bus whose log started over is noticed by its ``log_id`` and the subscription
        starts over on the new log (recorded in ``resets``). Refusals (INVALID_ARGUMENT, ...)
        are not retried. ``buffer`` bounds the events read ahead of the caller.
        ``max_batch_events`` (0 to 1024) lets the bus send up to that many events in one
        response, fewer and larger messages for a fast stream; the events are handed out one
        by one all the same. 0 or 1 asks for one event per response, as a bus that does not
        batch sends anyway.
        With several nodes, a stream broken because its node is gone is reopened on another
        node (one that answers SERVING when any does), after the same last event, and the move
        is reported to ``on_failover`` once the new node confirmed; ``failovers`` counts them.
        A group member whose group is still on the old node is retried for up to
        ``rejoin_timeout`` seconds (see :meth:`subscribe_manual`).
        Raises :class:`errors.InvalidArgument` for a bad pattern or start,
        :class:`errors.Unavailable` when the bus cannot be reached, ``ValueError`` for a
        ``max_batch_events`` out of range.
        """
        return Subscription(self._nodes, pattern, group=group, start=start,
                            subscriber=subscriber or self.source, resume=resume,
                            backoff=backoff or Backoff(), reconnect_timeout=reconnect_timeout,
                            rejoin_timeout=rejoin_timeout,
                            confirm_timeout=confirm_timeout, buffer=buffer, manual=None,
                            max_batch_events=max_batch_events)

    def subscribe_manual(self, pattern: str, group: str, *, ack_deadline: float = 30.0,
                         max_deliveries: int = 5, max_in_flight: int = 256,
                         dead_letter_topic: str | None = None, start: Start = "latest",
                         subscriber: str | None = None, resume: bool = True,
                         backoff: Backoff | None = None,
                         reconnect_timeout: float | None = None,
                         rejoin_timeout: float = 30.0,
                         confirm_timeout: float = 10.0, buffer: int = 1024,
                         max_batch_events: int = DEFAULT_MAX_BATCH_EVENTS) -> ManualSubscription:
        """Joins ``group`` as a MANUAL-ack (at-least-once) member on ``pattern`` and returns once
        confirmed; iterate the result for :class:`Delivery` items and ack each.

        ``ack_deadline`` (seconds): an event unacked this long is delivered again.
        ``max_deliveries``: deliveries before an event moves to ``dead_letter_topic``
        (``_bus.dlq.<group>`` when ``None``). ``max_in_flight``: unacked events this member
        holds at once. See :class:`ManualAck` for which settings are per group. A new group
        starts at ``start``; an existing group resumes from its cursor. After a move to another
        node of a cluster, the member rejoins its group there (the bus relays it to the group's
        home node); a FAILED_PRECONDITION ``group-on-another-node`` (the group moved while it
        joined) is retried with ``backoff`` for up to ``rejoin_timeout`` seconds. What this
        member held unacked is
        delivered again. The other arguments are :meth:`subscribe`'s; with
        ``max_batch_events`` the bus sends several deliveries per response, each still its own
        :class:`Delivery` with its own ``attempt``.
        """
        manual = ManualAck(ack_deadline=ack_deadline, max_deliveries=max_deliveries,
                           max_in_flight=max_in_flight, dead_letter_topic=dead_letter_topic)
        return ManualSubscription(self._nodes, pattern, group=group, start=start,
                                  subscriber=subscriber or self.source, resume=resume,
                                  backoff=backoff or Backoff(),
                                  reconnect_timeout=reconnect_timeout,
                                  rejoin_timeout=rejoin_timeout,
                                  confirm_timeout=confirm_timeout, buffer=buffer, manual=manual,
                                  max_batch_events=max_batch_events)

    def ack(self, group: str, sequences: Iterable[int]) -> AckResult:
        """Acknowledges events of a MANUAL-ack group by sequence (any member may). Raises
        :class:`errors.UnknownGroup` for a group the bus does not know."""
        response = self._unary("call", "Ack", pb.AckRequest(group=group,
                                                            sequences=list(sequences)))
        return AckResult(acknowledged=response.acknowledged, group_cursor=response.group_cursor)

    def nack(self, group: str, sequences: Iterable[int], delay: float | None = None) -> int:
        """Hands events of a MANUAL-ack group back for redelivery after ``delay`` seconds at
        least; returns how many were in flight and are requeued."""
        requeued: int = self._unary("call", "Nack",
                                    nack_request(group, sequences, delay)).requeued
        return requeued

    def serve(self, topic: str, group: str | None, handler: Handler) -> Responder:
        """Answers the queries on ``topic``: each query event goes to ``handler`` (on a background
        thread, one at a time) and its result is published to the query's ``reply_to`` with the
        same ``correlation_id``. ``group`` lets replicas share the queries (use the service's
        name); ``None`` means this responder gets every query. Returns once subscribed.

        A handler that raises :class:`ReplyError` answers with the scenario protocol's error
        reply (JSON ``{"error": {"code", "message"}}``, attribute ``error`` = the code); any
        other exception answers as the Rust SDK does (type ``eventbus.error``, attribute
        ``error`` = the message, the message as text data). Either way the asker's
        :meth:`query` raises :class:`errors.RemoteError`."""
        return Responder(self, topic, group, handler)


_END = object()

T = TypeVar("T")


class _Subscription(Generic[T]):
    """What :class:`Subscription` and :class:`ManualSubscription` share: the background reader,
    the resume rule, iteration. ``T`` is what each event is handed out as."""

    def __init__(self, nodes: Nodes, pattern: str, *, group: str | None,
                 start: Start, subscriber: str, resume: bool, backoff: Backoff,
                 reconnect_timeout: float | None, rejoin_timeout: float,
                 confirm_timeout: float, buffer: int, manual: ManualAck | None,
                 max_batch_events: int) -> None:
        self.pattern = pattern
        self.group = group
        #: How many times a broken stream was reopened.
        self.resumes = 0
        #: The error that broke the stream most recently, resumed or not.
        self.last_error: errors.BusError | None = None
        #: The bus's first confirmation.
        self.confirmation: pb.Subscribed | None = None
        #: The sequence of the ``caught_up`` marker, once a replay reached the live head.
        self.caught_up: int | None = None
        #: Each time a resume found the bus's log had started over (see :class:`BusReset`).
        self.resets: list[BusReset] = []
        #: How many times the subscription moved to another node.
        self.failovers = 0
        self._nodes = nodes
        #: The node the stream is open on (an index into ``nodes.endpoints``).
        self._node = nodes.endpoints.index
        self._subscriber = subscriber
        self._resume = resume
        self._backoff = backoff
        self._reconnect_timeout = reconnect_timeout
        self._rejoin_timeout = rejoin_timeout
        self._manual = manual
        #: Sent with every request, resumes included.
        self._max_batch_events = max_batch_events
        self._point = ResumePoint(start, group, manual=manual is not None)
        self._queue: queue.Queue[object] = queue.Queue(maxsize=buffer)
        self._closed = threading.Event()
        self._confirmed = threading.Event()
        self._failure: errors.BusError | None = None
        self._lock = threading.Lock()
        self._call: Any = None
        self._ended = False
        # Open the first stream here so a bad request fails in the caller's thread.
        first = self._open(start, "")
        self._thread = threading.Thread(target=self._run, args=(first,),
                                        name=f"eventbus-subscribe-{pattern}", daemon=True)
        self._thread.start()
        if not self._confirmed.wait(confirm_timeout):
            self.close()
            raise errors.DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED,
                                          f"no subscribed confirmation for {pattern} within "
                                          f"{confirm_timeout} s")
        if self._failure is not None and self.confirmation is None:
            self.close()
            raise self._failure

    def _item(self, event: pb.Event, attempt: int) -> T:
        raise NotImplementedError

    def _next_item(self, timeout: float | None) -> T | None:
        if self._ended:
            return None
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no event on {self.pattern} within {timeout} s") from None
        if item is _END:
            self._ended = True
            if self._failure is not None and not self._closed.is_set():
                raise self._failure
            return None
        return item  # type: ignore[return-value]

    def close(self) -> None:
        """Ends the subscription; iteration stops after the events already received."""
        self._closed.set()
        with self._lock:
            if self._call is not None:
                self._call.cancel()
        self._confirmed.set()

    @property
    def endpoint(self) -> str:
        """The node the subscription's stream is on, ``host:port``."""
        return self._nodes.endpoints.address(self._node)

    def _open(self, start: Start, log_id: str) -> Any:
        request = subscribe_request(self.pattern, self.group, self._subscriber, start,
                                    self._manual, log_id, self._max_batch_events)
        call = self._nodes.stub(self._node).Subscribe(request)
        with self._lock:
            self._call = call
            if self._closed.is_set():
                call.cancel()
        return call

    def _run(self, call: Any) -> None:
        failure: errors.BusError | None = None
        try:
            while True:
                failure = self._read(call)
                if self._closed.is_set() or failure is None:
                    break
                # Before the first confirmation only a node that is gone is worth another try
                # (on another node); a refusal of the request itself is the caller's to see.
                first_failed = self.confirmation is None and not (
                    moves_on(failure) and len(self._nodes.endpoints.targets) > 1)
                if not self._resume or first_failed or not is_retryable(failure):
                    break
                log.info("subscription to %s broke (%s); resuming", self.pattern, failure)
                call = self._reopen(failure)
                if call is None:
                    failure = self._failure
                    break
                self.resumes += 1
        finally:
            if failure is not None and not self._closed.is_set():
                self._failure = failure
            self._confirmed.set()
            self._put(_END, force=True)

    def _read(self, call: Any) -> errors.BusError | None:
        """Reads one stream to its end; returns the error that ended it (None: ended cleanly)."""
        try:
            for message in call:
                kind = message.WhichOneof("message")
                if kind == "subscribed":
                    self._point.confirmed(message.subscribed)
                    if self.confirmation is None:
                        self.confirmation = message.subscribed
                    self._confirmed.set()
                elif kind == "caught_up":
                    self.caught_up = message.caught_up.sequence
                else:  # an event, or a batch of them
                    for event, attempt in received(message):
                        if self._point.is_new(event.sequence):
                            if not self._put(self._item(event, attempt)):
                                return None
            return errors.Unavailable(grpc.StatusCode.UNAVAILABLE,
                                      "the bus ended the subscription stream")
        except grpc.RpcError as error:
            failure = errors.from_rpc_error(error)
            self.last_error = failure
            if self.confirmation is None:
                self._failure = failure
            return failure

    def _reopen(self, failure: errors.BusError) -> Any:
        """Reopens the stream after the last event seen, waiting with :class:`Backoff` between
        attempts, until the bus confirms; None (with ``_failure`` set) when closed, refused,
        or out of attempts or time."""
        started = time.monotonic()
        failures = 0
        last = failure
        broke_on = self._node
        rejoin_until: float | None = None
        if moves_on(failure):
            self._node = self._nodes.fail_over(self._node)
        while not self._closed.is_set():
            out_of_time = (self._reconnect_timeout is not None
                           and time.monotonic() - started >= self._reconnect_timeout)
            if out_of_time or not self._backoff.allows(failures):
                self._failure = last
                return None
            if self._closed.wait(self._backoff.delay(failures)):
                return None
            call = self._open(self._point.next_start(), self._point.log_id)
            # The first message tells whether the bus took it: `subscribed`, or an error.
            try:
                first = next(call)
            except grpc.RpcError as error:
                last = errors.from_rpc_error(error)
                self.last_error = last
                if self._closed.is_set():
                    return None
                if is_group_elsewhere(last):
                    # The group's members are still on the old node: they leave when it dies
                    # or notices this member is gone. Wait for that, for a bounded time.
                    now = time.monotonic()
                    rejoin_until = rejoin_until or now + self._rejoin_timeout
                    if now >= rejoin_until:
                        self._failure = last
                        return None
                elif not is_retryable(last):
                    self._failure = last
                    return None
                elif moves_on(last):
                    self._node = self._nodes.fail_over(self._node)
                failures += 1
                continue
            except StopIteration:
                last = errors.Unavailable(grpc.StatusCode.UNAVAILABLE,
                                          "the bus ended the subscription before confirming it")
                failures += 1
                continue
            if first.WhichOneof("message") != "subscribed":
                call.cancel()
                self._failure = errors.BusError(grpc.StatusCode.INTERNAL,
                                                "expected a subscribed confirmation first")
                return None
            reset = self._point.confirmed(first.subscribed)
            if reset is not None:
                self.resets.append(reset)
                log.warning("subscription to %s: the bus's log started over (last seen %d, new "
                            "head %d); starting over on the new log", self.pattern,
                            reset.last_seen, reset.head)
                if not self.group and not first.subscribed.log_changed:
                    # A bus that ignored log_id started this stream after the old position,
                    # past events of the new log: subscribe again from its beginning.
                    call.cancel()
                    failures = 0
                    continue
            self._failure = None
            if self._node != broke_on:
                self.failovers += 1
                endpoints = self._nodes.endpoints
                endpoints.report(Failover(
                    "subscription", endpoints.address(broke_on), endpoints.address(self._node),
                    failure, self.pattern,
                    None if self._manual is not None else self._point.last_sequence))
            return call
        return None

    def _put(self, item: object, force: bool = False) -> bool:
        """Queues an item for the caller, waiting while the buffer is full; False if closed."""
        while True:
            if self._closed.is_set() and not force:
                return False
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                if force:
                    # The caller stopped reading; make room for the end marker.
                    try:
                        self._queue.get_nowait()
                    except queue.Empty:
                        pass
                continue


class Subscription(_Subscription[Event], Iterator[Event]):
    """A live subscription: iterate it for events (in sequence order), or call
    :meth:`next_event`. Ends with :meth:`close` (or the ``with`` block); raises the
    :class:`errors.BusError` that ended it when it cannot be resumed."""

    def _item(self, event: pb.Event, attempt: int) -> Event:
        return from_pb(event)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Subscription:
        return self

    def __next__(self) -> Event:
        event = self.next_event()
        if event is None:
            raise StopIteration
        return event

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event; ``None`` once the subscription is closed. Raises ``TimeoutError``
        when none comes within ``timeout`` seconds, and the ending error when it broke for good."""
        return self._next_item(timeout)


class Delivery:
    """An event of a MANUAL-ack group, to acknowledge once processed. ``attempt`` is which
    delivery of the event this is, from 1."""

    def __init__(self, event: Event, attempt: int, group: str,
                 stub: pb_grpc.EventBusServiceStub) -> None:
        self.event = event
        self.attempt = attempt
        self.group = group
        self._stub = stub

    def __repr__(self) -> str:
        return (f"Delivery(group={self.group!r}, attempt={self.attempt}, "
                f"sequence={self.event.sequence}, topic={self.event.topic!r})")

    def ack(self) -> AckResult:
        """Confirms the event is processed: it is not delivered again, and the group's cursor
        moves past it once everything before it is acked too. Raises
        :class:`errors.UnknownGroup` when the bus no longer knows the group."""
        return _ack(self._stub, self.group, [self.event.sequence])

    def nack(self, delay: float | None = None) -> bool:
        """Hands the event back to the group, to be delivered again (to any member) after
        ``delay`` seconds at the least, and after the bus's redelivery backoff (none before the
        second delivery, then 50 ms doubling up to 5 s). Counts against ``max_deliveries``.
        True when the event was in flight and is requeued."""
        return _nack(self._stub, self.group, [self.event.sequence], delay) == 1


class ManualSubscription(_Subscription[Delivery], Iterator[Delivery]):
    """A member of a MANUAL-ack (at-least-once) group: iterate it for :class:`Delivery` items,
    or call :meth:`next_delivery`, and ack each one once processed. Redeliveries (after a nack, a
    passed ack deadline or a member leaving) come again with a higher ``attempt``. A broken
    stream is reopened; the bus resumes the group from its own cursor, and what this member held
    unacked is delivered again."""

    def _item(self, event: pb.Event, attempt: int) -> Delivery:
        assert self.group is not None
        # Acked on the node that delivered it: the group lives there.
        return Delivery(from_pb(event), attempt, self.group, self._nodes.stub(self._node))

    def __enter__(self) -> ManualSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> ManualSubscription:
        return self

    def __next__(self) -> Delivery:
        delivery = self.next_delivery()
        if delivery is None:
            raise StopIteration
        return delivery

    def next_delivery(self, timeout: float | None = None) -> Delivery | None:
        """The next delivery; ``None`` once closed. Raises ``TimeoutError`` when none comes
        within ``timeout`` seconds, and the ending error when it broke for good."""
        return self._next_item(timeout)


def _ack(stub: pb_grpc.EventBusServiceStub, group: str, sequences: Iterable[int]) -> AckResult:
    response = _call(stub.Ack, pb.AckRequest(group=group, sequences=list(sequences)))
    return AckResult(acknowledged=response.acknowledged, group_cursor=response.group_cursor)


def _nack(stub: pb_grpc.EventBusServiceStub, group: str, sequences: Iterable[int],
          delay: float | None) -> int:
    response = _call(stub.Nack, nack_request(group, sequences, delay))
    requeued: int = response.requeued
    return requeued


class Responder:
    """Answers queries on a topic until :meth:`stop`. ``handled`` counts the queries answered."""

    def __init__(self, bus: Bus, topic: str, group: str | None, handler: Handler) -> None:
        self.topic = topic
        self.handled = 0
        self._bus = bus
        self._handler = handler
        self._subscription = bus.subscribe(topic, group=group)
        self._thread = threading.Thread(target=self._run, name=f"eventbus-serve-{topic}",
                                        daemon=True)
        self._thread.start()

    def __enter__(self) -> Responder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 5.0) -> None:
        """Stops answering and waits for the query in hand to finish."""
        self._subscription.close()
        self._thread.join(timeout)

    def wait(self) -> None:
        """Blocks until the responder stops (for a service's main thread)."""
        while self._thread.is_alive():
            self._thread.join(0.5)

    def _run(self) -> None:
        try:
            for request in self._subscription:
                self._answer(request)
        except errors.BusError as error:
            log.error("responder on %s stopped: %s", self.topic, error)

    def _answer(self, request: Event) -> None:
        if not request.reply_to:
            log.warning("event %s on %s has no reply_to; not a query, ignored", request.id,
                        self.topic)
            return
        outcome: Reply | Data
        try:
            outcome = self._handler(request)
        except ReplyError as error:
            outcome = error_reply(error)
        except Exception as error:  # a handler bug must not stop the responder
            log.exception("handler for %s failed on event %s", self.topic, request.id)
            outcome = exception_reply(error)
        try:
            self._bus.publish_batch([reply_event(request, outcome, self._bus.source)])
            self.handled += 1
        except errors.BusError as error:
            log.error("reply to %s on %s not published: %s", request.id, self.topic, error)
