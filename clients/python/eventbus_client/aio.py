"""The asyncio client on grpc.aio: :class:`AsyncBus`, with the surface of the blocking
:class:`eventbus_client.Bus` (``await``-ed), subscriptions as async iterators, and responders
as tasks. The stream-resume rule is the blocking client's (:class:`ResumePoint`)."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Generic, TypeVar, Union

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import errors
from ._common import (
    CHANNEL_OPTIONS,
    HEALTH_SERVICE,
    Backoff,
    BusReset,
    ResumePoint,
    grpc_deadline,
    is_retryable,
    parse_target,
    secure_credentials,
)
from ._proto import eventbus_pb2 as pb
from ._proto import eventbus_pb2_grpc as pb_grpc
from .publisher import AsyncPublisher, Publisher
from .events import (
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


class AsyncBus:
    """A connection to the bus for asyncio code; see :class:`eventbus_client.Bus` for the
    arguments. Create it inside a running event loop."""

    def __init__(self, target: str | None = None, *, source: str = "python-client") -> None:
        parsed = parse_target(target)
        self._parsed = parsed
        self.target = parsed.address
        self.source = source
        if parsed.tls:
            self._channel = grpc.aio.secure_channel(parsed.address, secure_credentials(),
                                                    options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(parsed.address, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.EventBusServiceStub(self._channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self) -> AsyncBus:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the connection; open subscriptions end."""
        await self._channel.close()

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Polls health until the event API is SERVING; :class:`errors.Unavailable` if not
        within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        request = health_pb2.HealthCheckRequest(service=HEALTH_SERVICE)
        last = "no answer"
        while True:
            try:
                response = await self._health.Check(request, timeout=1.0)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            except grpc.aio.AioRpcError as error:
                last = f"{error.code().name}: {error.details()}"
            if loop.time() >= deadline:
                raise errors.Unavailable(grpc.StatusCode.UNAVAILABLE,
                                         f"bus at {self.target} not serving after {timeout} s "
                                         f"({last})")
            await asyncio.sleep(0.05)

    async def publish(self, topic: str, data: Data = b"", **fields: Any) -> int:
        """Publishes one event; returns its sequence."""
        return (await self.publish_batch([new_event(topic, data, **fields)]))[0]

    async def publish_batch(self, events: Iterable[Event]) -> list[int]:
        """Publishes events in order, all or none; returns their sequences."""
        request = pb.PublishRequest(events=[to_pb(e, self.source) for e in events])
        try:
            response = await self._stub.Publish(request)
        except grpc.aio.AioRpcError as error:
            raise errors.from_rpc_error(error) from None
        return list(response.sequences)

    def publisher(self, *, max_batch: int = 512, max_batch_bytes: int = 1024 * 1024,
                  linger: float = 0.002, max_in_flight: int = 16, queue: int = 4096,
                  backoff: Backoff | None = None,
                  max_retries: int | None = None) -> AsyncPublisher:
        """A batching publisher handing out asyncio futures; settings as
        :meth:`eventbus_client.Bus.publisher`. It has its own (blocking) gRPC connection to the
        same bus, closed with it: see :class:`AsyncPublisher`."""
        if self._parsed.tls:
            channel = grpc.secure_channel(self._parsed.address, secure_credentials(),
                                          options=CHANNEL_OPTIONS)
        else:
            channel = grpc.insecure_channel(self._parsed.address, options=CHANNEL_OPTIONS)
        stub = pb_grpc.EventBusServiceStub(channel)  # type: ignore[no-untyped-call]
        publisher = Publisher(stub, self.source, max_batch=max_batch,
                              max_batch_bytes=max_batch_bytes, linger=linger,
                              max_in_flight=max_in_flight, queue=queue, backoff=backoff,
                              max_retries=max_retries)
        return AsyncPublisher(publisher, channel)

    async def query(self, topic: str, data: Data = b"", *, timeout: float | None = None,
                    **fields: Any) -> Event:
        """Asks a question over events; returns the reply. Raises :class:`errors.NoResponders`
        or :class:`errors.QueryTimeout` as the blocking client does, and
        :class:`errors.RemoteError` for an error reply."""
        request = query_request(new_event(topic, data, **fields), self.source, timeout)
        try:
            response = await self._stub.Query(request, timeout=grpc_deadline(timeout))
        except grpc.aio.AioRpcError as error:
            raise errors.from_rpc_error(error) from None
        return errors.raise_if_error_reply(topic, from_pb(response.reply))

    async def subscribe(self, pattern: str, *, group: str | None = None,
                        start: Start = "latest", subscriber: str | None = None,
                        resume: bool = True, backoff: Backoff | None = None,
                        reconnect_timeout: float | None = None,
                        confirm_timeout: float = 10.0) -> AsyncSubscription:
        """Subscribes and returns once the bus has confirmed; iterate the result with
        ``async for``. Resumes broken streams as :meth:`eventbus_client.Bus.subscribe` does."""
        subscription = AsyncSubscription(self._stub, pattern, group=group, start=start,
                                         subscriber=subscriber or self.source, resume=resume,
                                         backoff=backoff or Backoff(),
                                         reconnect_timeout=reconnect_timeout, manual=None)
        await subscription._start(confirm_timeout)
        return subscription

    async def subscribe_manual(self, pattern: str, group: str, *, ack_deadline: float = 30.0,
                               max_deliveries: int = 5, max_in_flight: int = 256,
                               dead_letter_topic: str | None = None, start: Start = "latest",
                               subscriber: str | None = None, resume: bool = True,
                               backoff: Backoff | None = None,
                               reconnect_timeout: float | None = None,
                               confirm_timeout: float = 10.0) -> AsyncManualSubscription:
        """Joins ``group`` as a MANUAL-ack member; ``async for`` the result for
        :class:`AsyncDelivery` items. Arguments as :meth:`eventbus_client.Bus.subscribe_manual`."""
        manual = ManualAck(ack_deadline=ack_deadline, max_deliveries=max_deliveries,
                           max_in_flight=max_in_flight, dead_letter_topic=dead_letter_topic)
        subscription = AsyncManualSubscription(self._stub, pattern, group=group, start=start,
                                               subscriber=subscriber or self.source,
                                               resume=resume, backoff=backoff or Backoff(),
                                               reconnect_timeout=reconnect_timeout,
                                               manual=manual)
        await subscription._start(confirm_timeout)
        return subscription

    async def ack(self, group: str, sequences: Iterable[int]) -> AckResult:
        """Acknowledges events of a MANUAL-ack group; see :meth:`eventbus_client.Bus.ack`."""
        return await _ack(self._stub, group, sequences)

    async def nack(self, group: str, sequences: Iterable[int],
                   delay: float | None = None) -> int:
        """Hands events back for redelivery; see :meth:`eventbus_client.Bus.nack`."""
        return await _nack(self._stub, group, sequences, delay)

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

    def __init__(self, stub: pb_grpc.EventBusServiceStub, pattern: str, *, group: str | None,
                 start: Start, subscriber: str, resume: bool, backoff: Backoff,
                 reconnect_timeout: float | None, manual: ManualAck | None) -> None:
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
        self._stub = stub
        self._subscriber = subscriber
        self._resume = resume
        self._backoff = backoff
        self._reconnect_timeout = reconnect_timeout
        self._manual = manual
        self._point = ResumePoint(start, group, manual=manual is not None)
        self._call: Any = None
        self._closed = False

    def _item(self, message: pb.SubscribeResponse) -> T:
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
        call = self._stub.Subscribe(subscribe_request(self.pattern, self.group,
                                                      self._subscriber, start, self._manual,
                                                      log_id))
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
            kind = message.WhichOneof("message")
            if kind == "event" and self._point.is_new(message.event.sequence):
                return self._item(message)
            if kind == "caught_up":
                self.caught_up = message.caught_up.sequence
        return None

    async def _reopen(self, failure: errors.BusError) -> None:
        """Subscribes again after the last event seen with :class:`Backoff` between attempts;
        raises the last error when refused, or out of attempts or time."""
        log.info("subscription to %s broke (%s); resuming", self.pattern, failure)
        loop = asyncio.get_running_loop()
        started = loop.time()
        failures = 0
        last = failure
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
                if not is_retryable(error):
                    raise error from None
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
            return


class AsyncSubscription(_AsyncSubscription[Event]):
    """A live subscription; ``async for event in subscription``. Ends with :meth:`close`."""

    def _item(self, message: pb.SubscribeResponse) -> Event:
        return from_pb(message.event)

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

    def _item(self, message: pb.SubscribeResponse) -> AsyncDelivery:
        assert self.group is not None
        return AsyncDelivery(from_pb(message.event), message.delivery_attempt, self.group,
                             self._stub)

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
