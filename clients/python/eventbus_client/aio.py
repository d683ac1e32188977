"""The asyncio client on grpc.aio: :class:`AsyncBus`, with the surface of the blocking
:class:`eventbus_client.Bus` (``await``-ed), subscriptions as async iterators, and responders
as tasks. The stream-resume rule is the blocking client's (:class:`ResumePoint`)."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar, Union

import grpc
import grpc.aio
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
from ._nodes import Nodes
from ._proto import eventbus_pb2 as pb
from ._proto import eventbus_pb2_grpc as pb_grpc
from .publisher import AsyncPublisher, Publisher
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

#: A query handler, plain or ``async``: gets the query event, returns the reply data (or a
#: :class:`Reply`), or raises :class:`ReplyError` to answer with an error.
AsyncHandler = Callable[[Event], Union["Reply | Data", Awaitable["Reply | Data"]]]


def _with_metadata(details: grpc.aio.ClientCallDetails,
                   metadata: Sequence[tuple[str, str]]) -> grpc.aio.ClientCallDetails:
    entries = grpc.aio.Metadata(*tuple(details.metadata or ()), *metadata)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, entries,
                                      details.credentials, details.wait_for_ready)


class _UnaryUnaryMetadata(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = metadata

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_metadata(details, self._metadata), request)


class _UnaryStreamMetadata(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = metadata

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_metadata(details, self._metadata), request)


class _StreamUnaryMetadata(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = metadata

    async def intercept_stream_unary(self, continuation: Any, details: Any,
                                     requests: Any) -> Any:
        return await continuation(_with_metadata(details, self._metadata), requests)


class _StreamStreamMetadata(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = metadata

    async def intercept_stream_stream(self, continuation: Any, details: Any,
                                      requests: Any) -> Any:
        return await continuation(_with_metadata(details, self._metadata), requests)


def _aio_channel(target: Target) -> grpc.aio.Channel:
    """A channel to ``target``: TLS for an ``https://`` target (never plaintext), the bearer
    token on every call if set. grpc.aio files an interceptor under one kind only, hence one
    per kind."""
    security = target.security
    metadata = security.metadata()
    interceptors = [kind(metadata) for kind in (_UnaryUnaryMetadata, _UnaryStreamMetadata,
                                                 _StreamUnaryMetadata, _StreamStreamMetadata)]
    if not metadata:
        interceptors = []
    if target.tls:
        return grpc.aio.secure_channel(target.address, security.channel_credentials(),
                                       options=CHANNEL_OPTIONS, interceptors=interceptors)
    return grpc.aio.insecure_channel(target.address, options=CHANNEL_OPTIONS,
                                     interceptors=interceptors)


class AsyncNodes:
    """:class:`eventbus_client._nodes.Nodes` on grpc.aio channels: one per node, opened on first
    use, and the move to another node when one fails. Used from one event loop only."""

    def __init__(self, targets: list[Target], on_failover: FailoverHook | None) -> None:
        self.endpoints = Endpoints(targets, on_failover)
        self._channels: dict[int, grpc.aio.Channel] = {}
        self._stubs: dict[int, pb_grpc.EventBusServiceStub] = {}

    def stub(self, index: int) -> pb_grpc.EventBusServiceStub:
        stub = self._stubs.get(index)
        if stub is None:
            channel = self._channels[index] = _aio_channel(self.endpoints.targets[index])
            stub = self._stubs[index] = pb_grpc.EventBusServiceStub(  # type: ignore[no-untyped-call]
                channel)
        return stub

    async def serving(self, index: int, service: str = "",
                      timeout: float = PROBE_TIMEOUT) -> str:
        """The node's health for ``service``, by name, or the failure of the probe."""
        self.stub(index)
        try:
            response = await health_pb2_grpc.HealthStub(self._channels[index]).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError as error:
            return f"{error.code().name}: {error.details()}"
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return name

    async def fail_over(self, failed: int) -> int:
        """See :meth:`eventbus_client._nodes.Nodes.fail_over`."""
        endpoints = self.endpoints
        if len(endpoints.targets) < 2 or endpoints.moved_from(failed):
            return endpoints.index
        serving = None
        for index in endpoints.candidates(failed):
            if await self.serving(index) == "SERVING":
                serving = index
                break
        return endpoints.choose(failed, serving)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()


class AsyncBus:
    """A connection to the bus (one node, or several of a cluster) for asyncio code; see
    :class:`eventbus_client.Bus` for the arguments and how it moves between nodes. Create it
    inside a running event loop."""

    def __init__(self, target: Targets = None, *, source: str = "python-client",
                 on_failover: FailoverHook | None = None, tls_ca: Pem | None = None,
                 tls_cert: Pem | None = None, tls_key: Pem | None = None,
                 token: str | None = None) -> None:
        self._targets = parse_targets(target, Security.of(tls_ca, tls_cert, tls_key, token))
        self._on_failover = on_failover
        self._nodes = AsyncNodes(self._targets, on_failover)
        self.source = source

    @property
    def target(self) -> str:
        """The node in use now, ``host:port``."""
        return self._nodes.endpoints.address(self._nodes.endpoints.index)

    @property
    def endpoints(self) -> list[str]:
        """Every node this client may use, ``host:port``, in the order given."""
        return [target.address for target in self._targets]

    @property
    def _stub(self) -> pb_grpc.EventBusServiceStub:
        return self._nodes.stub(self._nodes.endpoints.index)

    async def _unary(self, what: str, method: str, request: Any, **kwargs: Any) -> Any:
        """One unary call on the node in use; see :meth:`eventbus_client.Bus._unary`."""
        index = self._nodes.endpoints.index
        try:
            return await getattr(self._nodes.stub(index), method)(request, **kwargs)
        except grpc.aio.AioRpcError as rpc_error:
            error = errors.from_rpc_error(rpc_error)
        # Only the call that moves the client reports the move.
        if moves_on(error) and self._nodes.endpoints.index == index:
            to = await self._nodes.fail_over(index)
            self._nodes.endpoints.report(Failover(what, self._nodes.endpoints.address(index),
                                                  self._nodes.endpoints.address(to), error))
        raise error

    async def __aenter__(self) -> AsyncBus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the connection; open subscriptions end."""
        await self._nodes.close()

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Polls health until the event API is SERVING on a node (moving to the first that
        serves); :class:`errors.Unavailable` if none does within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        endpoints = self._nodes.endpoints
        last = "no answer"
        while True:
            start = endpoints.index
            for index in [start, *endpoints.candidates(start)[:-1]]:
                status = await self._nodes.serving(index, HEALTH_SERVICE, timeout=1.0)
                if status == "SERVING":
                    endpoints.choose(start, index)
                    return
                last = f"{endpoints.address(index)}: {status}"
            if loop.time() >= deadline:
                raise errors.Unavailable(grpc.StatusCode.UNAVAILABLE,
                                         f"bus at {', '.join(self.endpoints)} not serving "
                                         f"after {timeout} s ({last})")
            await asyncio.sleep(0.05)

    async def publish(self, topic: str, data: Data = b"", **fields: Any) -> int:
        """Publishes one event; returns its sequence."""
        return (await self.publish_batch([new_event(topic, data, **fields)]))[0]

    async def publish_batch(self, events: Iterable[Event]) -> list[int]:
        """Publishes events in order, all or none; returns their sequences."""
        request = pb.PublishRequest(events=[to_pb(e, self.source) for e in events])
        response = await self._unary("call", "Publish", request)
        return list(response.sequences)

    def publisher(self, *, max_batch: int = 512, max_batch_bytes: int = 1024 * 1024,
                  linger: float = 0.002, max_in_flight: int = 16, queue: int = 4096,
                  backoff: Backoff | None = None,
                  max_retries: int | None = None) -> AsyncPublisher:
        """A batching publisher handing out asyncio futures; settings as
        :meth:`eventbus_client.Bus.publisher`. It has its own (blocking) gRPC connection to the
        same bus, closed with it: see :class:`AsyncPublisher`."""
        nodes = Nodes(self._targets, self._on_failover)
        nodes.endpoints.choose(0, self._nodes.endpoints.index)
        publisher = Publisher(nodes, self.source, max_batch=max_batch,
                              max_batch_bytes=max_batch_bytes, linger=linger,
                              max_in_flight=max_in_flight, queue=queue, backoff=backoff,
                              max_retries=max_retries)
        return AsyncPublisher(publisher, nodes)

    async def query(self, topic: str, data: Data = b"", *, timeout: float | None = None,
                    retry: bool = False, backoff: Backoff | None = None,
                    **fields: Any) -> Event:
        """Asks a question over events; returns the reply. Raises :class:`errors.NoResponders`
        or :class:`errors.QueryTimeout` as the blocking client does, and
        :class:`errors.RemoteError` for an error reply; :class:`errors.NodeUnavailable` (which
        may be retried) when the node failed under it, or with ``retry`` sends it again as
        :meth:`eventbus_client.Bus.query` does."""
        request = query_request(new_event(topic, data, **fields), self.source, timeout)
        backoff = backoff or Backoff()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + (timeout or DEFAULT_QUERY_TIMEOUT)
        attempt = 0
        while True:
            try:
                response = await self._unary("query", "Query", request,
                                             timeout=grpc_deadline(timeout))
                return errors.raise_if_error_reply(topic, from_pb(response.reply))
            except errors.NodeUnavailable:
                wait = backoff.delay(attempt)
                if not retry or loop.time() + wait >= give_up:
                    raise
            await asyncio.sleep(wait)
            attempt += 1

    async def subscribe(self, pattern: str, *, group: str | None = None,
                        start: Start = "latest", subscriber: str | None = None,
                        resume: bool = True, backoff: Backoff | None = None,
                        reconnect_timeout: float | None = None,
                        rejoin_timeout: float = 30.0,
                        confirm_timeout: float = 10.0,
                        max_batch_events: int = DEFAULT_MAX_BATCH_EVENTS) -> AsyncSubscription:
        """Subscribes and returns once the bus has confirmed; iterate the result with
        ``async for``. Resumes broken streams, and takes ``max_batch_events`` (batched
        delivery), as :meth:`eventbus_client.Bus.subscribe` does."""
        subscription = AsyncSubscription(self._nodes, pattern, group=group, start=start,
                                         subscriber=subscriber or self.source, resume=resume,
                                         backoff=backoff or Backoff(),
                                         reconnect_timeout=reconnect_timeout,
                                         rejoin_timeout=rejoin_timeout, manual=None,
                                         max_batch_events=max_batch_events)
        await subscription._start(confirm_timeout)
        return subscription

    async def subscribe_manual(self, pattern: str, group: str, *, ack_deadline: float = 30.0,
                               max_deliveries: int = 5, max_in_flight: int = 256,
                               dead_letter_topic: str | None = None, start: Start = "latest",
                               subscriber: str | None = None, resume: bool = True,
                               backoff: Backoff | None = None,
                               reconnect_timeout: float | None = None,
                               rejoin_timeout: float = 30.0,
                               confirm_timeout: float = 10.0,
                               max_batch_events: int = DEFAULT_MAX_BATCH_EVENTS,
                               ) -> AsyncManualSubscription:
        """Joins ``group`` as a MANUAL-ack member; ``async for`` the result for
        :class:`AsyncDelivery` items. Arguments as :meth:`eventbus_client.Bus.subscribe_manual`."""
        manual = ManualAck(ack_deadline=ack_deadline, max_deliveries=max_deliveries,
                           max_in_flight=max_in_flight, dead_letter_topic=dead_letter_topic)
        subscription = AsyncManualSubscription(self._nodes, pattern, group=group, start=start,
                                               subscriber=subscriber or self.source,
                                               resume=resume, backoff=backoff or Backoff(),
                                               reconnect_timeout=reconnect_timeout,
                                               rejoin_timeout=rejoin_timeout,
                                               manual=manual,
                                               max_batch_events=max_batch_events)
        await subscription._start(confirm_timeout)
        return subscription

    async def ack(self, group: str, sequences: Iterable[int]) -> AckResult:
        """Acknowledges events of a MANUAL-ack group; see :meth:`eventbus_client.Bus.ack`."""
        response = await self._unary("call", "Ack",
                                     pb.AckRequest(group=group, sequences=list(sequences)))
        return AckResult(acknowledged=response.acknowledged, group_cursor=response.group_cursor)

    async def nack(self, group: str, sequences: Iterable[int],
                   delay: float | None = None) -> int:
        """Hands events back for redelivery; see :meth:`eventbus_client.Bus.nack`."""
        response = await self._unary("call", "Nack", nack_request(group, sequences, delay))
        requeued: int = response.requeued
        return requeued

    async def serve(self, topic: str, group: str | None,
                    handler: AsyncHandler) -> AsyncResponder:
        """Answers the queries on ``topic`` with ``handler`` (plain or async) in a task, one at a
        time; returns once subscribed."""
        subscription = await self.subscribe(topic, group=group)
        return AsyncResponder(self, subscription, handler)


T = TypeVar("T")


class _AsyncSubscription(Generic[T]):
    """What :class:`AsyncSubscription` and :class:`AsyncManualSubscription` share: reading,
    the resume rule (the blocking client's), closing. ``T`` is what each event is handed out
    as."""

    def __init__(self, nodes: AsyncNodes, pattern: str, *, group: str | None,
                 start: Start, subscriber: str, resume: bool, backoff: Backoff,
                 reconnect_timeout: float | None, rejoin_timeout: float,
                 manual: ManualAck | None, max_batch_events: int) -> None:
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
        #: The node the stream is open on.
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
        #: The rest of a batch, received (and counted by ``_point``) but not handed out yet.
        self._ready: deque[T] = deque()
        self._call: Any = None
        self._closed = False

    def _item(self, event: pb.Event, attempt: int) -> T:
        raise NotImplementedError

    def close(self) -> None:
        """Ends the subscription."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()

    async def _start(self, confirm_timeout: float) -> None:
        try:
            call, subscribed = await asyncio.wait_for(self._open(self._point.start, ""),
                                                      confirm_timeout)
        except asyncio.TimeoutError:
            self.close()
            raise errors.DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED,
                                          f"no subscribed confirmation for {self.pattern} "
                                          f"within {confirm_timeout} s") from None
        self._point.confirmed(subscribed)
        self.confirmation = subscribed
        self._call = call

    async def _open(self, start: Start, log_id: str) -> tuple[Any, pb.Subscribed]:
        """Opens a stream and reads its `subscribed` confirmation (or the refusal)."""
        call = self._nodes.stub(self._node).Subscribe(subscribe_request(self.pattern, self.group,
                                                      self._subscriber, start, self._manual,
                                                      log_id, self._max_batch_events))
        self._call = call
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as error:
            raise errors.from_rpc_error(error) from None
        if first is grpc.aio.EOF or first.WhichOneof("message") != "subscribed":
            raise errors.Unavailable(grpc.StatusCode.UNAVAILABLE,
                                     "the bus ended the subscription stream before confirming")
        return call, first.subscribed

    async def _next_item(self) -> T | None:
        """The next item, or ``None`` once closed; raises the error that ended it for good."""
        while not self._closed:
            if self._ready:
                return self._ready.popleft()
            try:
                message = await self._call.read()
            except grpc.aio.AioRpcError as error:
                if self._closed:
                    return None
                failure = errors.from_rpc_error(error)
                self.last_error = failure
                if not self._resume or not is_retryable(failure):
                    raise failure from None
                await self._reopen(failure)
                continue
            except asyncio.CancelledError:
                if self._closed:
                    return None
                raise
            if message is grpc.aio.EOF:
                if self._closed:
                    return None
                failure = errors.Unavailable(grpc.StatusCode.UNAVAILABLE,
                                             "the bus ended the subscription stream")
                if not self._resume:
                    raise failure
                await self._reopen(failure)
                continue
            if message.WhichOneof("message") == "caught_up":
                self.caught_up = message.caught_up.sequence
            self._ready.extend(self._item(event, attempt) for event, attempt in received(message)
                               if self._point.is_new(event.sequence))
        return None

    async def _reopen(self, failure: errors.BusError) -> None:
        """Subscribes again after the last event seen with :class:`Backoff` between attempts;
        raises the last error when refused, or out of attempts or time."""
        log.info("subscription to %s broke (%s); resuming", self.pattern, failure)
        loop = asyncio.get_running_loop()
        started = loop.time()
        failures = 0
        last = failure
        broke_on = self._node
        rejoin_until: float | None = None
        if moves_on(failure):
            self._node = await self._nodes.fail_over(self._node)
        while not self._closed:
            out_of_time = (self._reconnect_timeout is not None
                           and loop.time() - started >= self._reconnect_timeout)
            if out_of_time or not self._backoff.allows(failures):
                raise last
            await asyncio.sleep(self._backoff.delay(failures))
            if self._closed:
                return
            try:
                call, subscribed = await self._open(self._point.next_start(),
                                                    self._point.log_id)
            except errors.BusError as error:
                self.last_error = last = error
                if is_group_elsewhere(error):
                    # The group's members are still on the old node; wait (bounded) for them
                    # to leave, as the blocking client does.
                    now = loop.time()
                    rejoin_until = rejoin_until or now + self._rejoin_timeout
                    if now >= rejoin_until:
                        raise error from None
                elif not is_retryable(error):
                    raise error from None
                elif moves_on(error):
                    self._node = await self._nodes.fail_over(self._node)
                failures += 1
                continue
            reset = self._point.confirmed(subscribed)
            if reset is not None:
                self.resets.append(reset)
                log.warning("subscription to %s: the bus's log started over (last seen %d, new "
                            "head %d); starting over on the new log", self.pattern,
                            reset.last_seen, reset.head)
                if not self.group and not subscribed.log_changed:
                    # A bus that ignored log_id started after the old position: again from
                    # the new log's beginning.
                    call.cancel()
                    failures = 0
                    continue
            self._call = call
            self.resumes += 1
            if self._node != broke_on:
                self.failovers += 1
                endpoints = self._nodes.endpoints
                endpoints.report(Failover(
                    "subscription", endpoints.address(broke_on), endpoints.address(self._node),
                    failure, self.pattern,
                    None if self._manual is not None else self._point.last_sequence))
            return


class AsyncSubscription(_AsyncSubscription[Event]):
    """A live subscription; ``async for event in subscription``. Ends with :meth:`close`."""

    def _item(self, event: pb.Event, attempt: int) -> Event:
        return from_pb(event)

    async def __aenter__(self) -> AsyncSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncSubscription:
        return self

    async def __anext__(self) -> Event:
        event = await self.next_event()
        if event is None:
            raise StopAsyncIteration
        return event

    async def next_event(self) -> Event | None:
        """The next event, or ``None`` once closed; raises the error that ended it for good."""
        return await self._next_item()


class AsyncDelivery:
    """An event of a MANUAL-ack group, to acknowledge once processed (see
    :class:`eventbus_client.Delivery`); ``ack`` and ``nack`` are awaited."""

    def __init__(self, event: Event, attempt: int, group: str,
                 stub: pb_grpc.EventBusServiceStub) -> None:
        self.event = event
        self.attempt = attempt
        self.group = group
        self._stub = stub

    def __repr__(self) -> str:
        return (f"AsyncDelivery(group={self.group!r}, attempt={self.attempt}, "
                f"sequence={self.event.sequence}, topic={self.event.topic!r})")

    async def ack(self) -> AckResult:
        """Confirms the event is processed; see :meth:`eventbus_client.Delivery.ack`."""
        return await _ack(self._stub, self.group, [self.event.sequence])

    async def nack(self, delay: float | None = None) -> bool:
        """Hands the event back after ``delay`` seconds at least; see
        :meth:`eventbus_client.Delivery.nack`."""
        return await _nack(self._stub, self.group, [self.event.sequence], delay) == 1


class AsyncManualSubscription(_AsyncSubscription[AsyncDelivery]):
    """A member of a MANUAL-ack group; ``async for delivery in subscription``, then
    ``await delivery.ack()``. See :class:`eventbus_client.ManualSubscription`."""

    def _item(self, event: pb.Event, attempt: int) -> AsyncDelivery:
        assert self.group is not None
        return AsyncDelivery(from_pb(event), attempt, self.group, self._nodes.stub(self._node))

    async def __aenter__(self) -> AsyncManualSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncManualSubscription:
        return self

    async def __anext__(self) -> AsyncDelivery:
        delivery = await self.next_delivery()
        if delivery is None:
            raise StopAsyncIteration
        return delivery

    async def next_delivery(self) -> AsyncDelivery | None:
        """The next delivery, or ``None`` once closed; raises the error that ended it."""
        return await self._next_item()


async def _ack(stub: pb_grpc.EventBusServiceStub, group: str,
               sequences: Iterable[int]) -> AckResult:
    try:
        response = await stub.Ack(pb.AckRequest(group=group, sequences=list(sequences)))
    except grpc.aio.AioRpcError as error:
        raise errors.from_rpc_error(error) from None
    return AckResult(acknowledged=response.acknowledged, group_cursor=response.group_cursor)


async def _nack(stub: pb_grpc.EventBusServiceStub, group: str, sequences: Iterable[int],
                delay: float | None) -> int:
    try:
        response = await stub.Nack(nack_request(group, sequences, delay))
    except grpc.aio.AioRpcError as error:
        raise errors.from_rpc_error(error) from None
    requeued: int = response.requeued
    return requeued


class AsyncResponder:
    """Answers queries in a task until :meth:`stop`. ``handled`` counts the queries answered."""

    def __init__(self, bus: AsyncBus, subscription: AsyncSubscription,
                 handler: AsyncHandler) -> None:
        self.topic = subscription.pattern
        self.handled = 0
        self._bus = bus
        self._subscription = subscription
        self._handler = handler
        self._task = asyncio.create_task(self._run(), name=f"eventbus-serve-{self.topic}")

    async def stop(self) -> None:
        """Stops answering and waits for the query in hand to finish."""
        self._subscription.close()
        await self._task

    async def wait(self) -> None:
        """Waits until the responder stops."""
        await asyncio.shield(self._task)

    async def _run(self) -> None:
        try:
            async for request in self._subscription:
                await self._answer(request)
        except errors.BusError as error:
            log.error("responder on %s stopped: %s", self.topic, error)

    async def _answer(self, request: Event) -> None:
        if not request.reply_to:
            log.warning("event %s on %s has no reply_to; not a query, ignored", request.id,
                        self.topic)
            return
        outcome: Reply | Data
        try:
            result = self._handler(request)
            outcome = await result if inspect.isawaitable(result) else result
        except ReplyError as error:
            outcome = error_reply(error)
        except Exception as error:  # a handler bug must not stop the responder
            log.exception("handler for %s failed on event %s", self.topic, request.id)
            outcome = exception_reply(error)
        try:
            await self._bus.publish_batch([reply_event(request, outcome, self._bus.source)])
            self.handled += 1
        except errors.BusError as error:
            log.error("reply to %s on %s not published: %s", request.id, self.topic, error)
