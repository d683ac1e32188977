"""The asyncio client on grpc.aio: :class:`AsyncBus`, with the surface of the blocking
:class:`eventbus_client.Bus` (``await``-ed), subscriptions as async iterators, and responders
as tasks. The stream-resume rule is the blocking client's (:class:`ResumePoint`)."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Union

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import errors
from ._common import (
    CHANNEL_OPTIONS,
    HEALTH_SERVICE,
    RESUMABLE,
    ResumePoint,
    grpc_deadline,
    parse_target,
    secure_credentials,
)
from ._proto import eventbus_pb2 as pb
from ._proto import eventbus_pb2_grpc as pb_grpc
from .events import (
    Data,
    Event,
    Reply,
    ReplyError,
    Start,
    error_reply,
    from_pb,
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

    async def query(self, topic: str, data: Data = b"", *, timeout: float | None = None,
                    **fields: Any) -> Event:
        """Asks a question over events; returns the reply. Raises :class:`errors.NoResponders`
        or :class:`errors.QueryTimeout` as the blocking client does."""
        request = query_request(new_event(topic, data, **fields), self.source, timeout)
        try:
            response = await self._stub.Query(request, timeout=grpc_deadline(timeout))
        except grpc.aio.AioRpcError as error:
            raise errors.from_rpc_error(error) from None
        return from_pb(response.reply)

    async def subscribe(self, pattern: str, *, group: str | None = None,
                        start: Start = "latest", subscriber: str | None = None,
                        resume: bool = True, reconnect_timeout: float = 30.0,
                        confirm_timeout: float = 10.0) -> AsyncSubscription:
        """Subscribes and returns once the bus has confirmed; iterate the result with
        ``async for``. Resumes broken streams as :meth:`eventbus_client.Bus.subscribe` does."""
        subscription = AsyncSubscription(self._stub, pattern, group=group, start=start,
                                         subscriber=subscriber or self.source, resume=resume,
                                         reconnect_timeout=reconnect_timeout)
        await subscription._start(confirm_timeout)
        return subscription

    async def serve(self, topic: str, group: str | None,
                    handler: AsyncHandler) -> AsyncResponder:
        """Answers the queries on ``topic`` with ``handler`` (plain or async) in a task, one at a
        time; returns once subscribed."""
        subscription = await self.subscribe(topic, group=group)
        return AsyncResponder(self, subscription, handler)


class AsyncSubscription:
    """A live subscription; ``async for event in subscription``. Ends with :meth:`close`."""

    def __init__(self, stub: pb_grpc.EventBusServiceStub, pattern: str, *, group: str | None,
                 start: Start, subscriber: str, resume: bool,
                 reconnect_timeout: float) -> None:
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
        self._stub = stub
        self._subscriber = subscriber
        self._resume = resume
        self._reconnect_timeout = reconnect_timeout
        self._point = ResumePoint(start, group)
        self._call: Any = None
        self._closed = False

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

    def close(self) -> None:
        """Ends the subscription."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()

    async def _start(self, confirm_timeout: float) -> None:
        try:
            self._call = await asyncio.wait_for(self._open(self._point.start), confirm_timeout)
        except asyncio.TimeoutError:
            self.close()
            raise errors.DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED,
                                          f"no subscribed confirmation for {self.pattern} "
                                          f"within {confirm_timeout} s") from None

    async def _open(self, start: Start) -> Any:
        """Opens a stream and reads its `subscribed` confirmation (or the refusal)."""
        call = self._stub.Subscribe(subscribe_request(self.pattern, self.group,
                                                      self._subscriber, start))
        self._call = call
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as error:
            raise errors.from_rpc_error(error) from None
        if first is grpc.aio.EOF or first.WhichOneof("message") != "subscribed":
            raise errors.Unavailable(grpc.StatusCode.UNAVAILABLE,
                                     "the bus ended the subscription stream before confirming")
        self._point.confirmed(first.subscribed)
        if self.confirmation is None:
            self.confirmation = first.subscribed
        return call

    async def next_event(self) -> Event | None:
        """The next event, or ``None`` once closed; raises the error that ended it for good."""
        while not self._closed:
            try:
                message = await self._call.read()
            except grpc.aio.AioRpcError as error:
                if self._closed:
                    return None
                failure = errors.from_rpc_error(error)
                self.last_error = failure
                if not self._resume or not isinstance(failure, RESUMABLE):
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
                return from_pb(message.event)
            if kind == "caught_up":
                self.caught_up = message.caught_up.sequence
        return None

    async def _reopen(self, failure: errors.BusError) -> None:
        log.info("subscription to %s broke (%s); resuming", self.pattern, failure)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._reconnect_timeout
        backoff = 0.05
        while not self._closed:
            try:
                self._call = await self._open(self._point.next_start())
                self.resumes += 1
                return
            except errors.BusError as error:
                self.last_error = error
                if not isinstance(error, RESUMABLE) or loop.time() >= deadline:
                    raise error from None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)


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
            outcome = error_reply(ReplyError("internal", f"{type(error).__name__}: {error}"))
        try:
            await self._bus.publish_batch([reply_event(request, outcome, self._bus.source)])
            self.handled += 1
        except errors.BusError as error:
            log.error("reply to %s on %s not published: %s", request.id, self.topic, error)
