"""The asyncio client against a real bus: the same surface, awaited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from eventbus_client import (
    AsyncBus,
    AsyncSubscription,
    Event,
    InvalidArgument,
    NoResponders,
    QueryTimeout,
    RemoteError,
    ReplyError,
    SlowConsumer,
    Unavailable,
    new_event,
)
from eventbus_client.testing import BusProcess, free_port


async def take(subscription: AsyncSubscription, count: int, timeout: float = 10.0) -> list[Event]:
    """The next ``count`` events, failing after ``timeout`` seconds."""
    async def collect() -> list[Event]:
        events: list[Event] = []
        async for event in subscription:
            events.append(event)
            if len(events) == count:
                break
        return events
    return await asyncio.wait_for(collect(), timeout)


async def test_publish_and_subscribe_in_order(bus_process: BusProcess) -> None:
    async with AsyncBus(bus_process.address, source="aio") as bus:
        async with await bus.subscribe("aio.order.>") as subscription:
            await bus.publish("aio.order.a", {"n": 0})
            await bus.publish_batch([new_event("aio.order.b", {"n": n}) for n in range(1, 4)])
            events = await take(subscription, 4)
    assert [e.json()["n"] for e in events] == [0, 1, 2, 3]
    assert events[0].source == "aio"


async def test_async_responder_answers_and_maps_errors(bus_process: BusProcess) -> None:
    async def handler(request: Event) -> dict[str, object]:
        await asyncio.sleep(0)
        if request.json().get("missing"):
            raise ReplyError("not_found", "no such thing")
        return {"echo": request.json()}

    async with AsyncBus(bus_process.address, source="aio") as bus:
        responder = await bus.serve("aio.echo", "aio-echo", handler)
        reply = await bus.query("aio.echo", {"x": 1}, timeout=5)
        assert reply.json() == {"echo": {"x": 1}}
        assert reply.type == "aio.echo.result"
        with pytest.raises(RemoteError) as failed:
            await bus.query("aio.echo", {"missing": True}, timeout=5)
        assert failed.value.message == "not_found"
        assert failed.value.reply.attributes == {"error": "not_found"}
        await responder.stop()
        assert responder.handled == 2


async def test_raising_async_handler_sends_the_rust_sdks_error_reply(
        bus_process: BusProcess) -> None:
    async def handler(request: Event) -> bytes:
        raise ValueError("bad input")

    async with AsyncBus(bus_process.address, source="aio") as bus:
        responder = await bus.serve("aio.raise", None, handler)
        with pytest.raises(RemoteError) as caught:
            await bus.query("aio.raise", b"", timeout=5)
        assert caught.value.message == "ValueError: bad input"
        assert caught.value.reply.type == "eventbus.error"
        await responder.stop()


async def test_query_errors(bus_process: BusProcess) -> None:
    async with AsyncBus(bus_process.address) as bus:
        started = time.monotonic()
        with pytest.raises(NoResponders) as nobody:
            await bus.query("aio.nobody", b"", timeout=10)
        assert time.monotonic() - started < 2
        assert nobody.value.code.name == "UNAVAILABLE"
        async with await bus.subscribe("aio.silent"):
            with pytest.raises(QueryTimeout) as late:
                await bus.query("aio.silent", b"", timeout=0.3)
        assert late.value.code.name == "DEADLINE_EXCEEDED"


async def test_invalid_arguments(bus_process: BusProcess) -> None:
    async with AsyncBus(bus_process.address) as bus:
        with pytest.raises(InvalidArgument):
            await bus.publish("", b"")
        with pytest.raises(InvalidArgument):
            await bus.subscribe("a..b")


async def test_resumes_after_slow_consumer(start_bus: Callable[..., BusProcess]) -> None:
    process = start_bus(subscriber_queue_size=1, max_subscriber_lag=1)
    async with AsyncBus(process.address) as bus:
        subscription = await bus.subscribe("aio.flood")
        await bus.publish_batch([new_event("aio.flood", {"n": n}) for n in range(200)])
        events = await take(subscription, 200)
        assert [e.json()["n"] for e in events] == list(range(200))
        assert subscription.resumes >= 1
        assert isinstance(subscription.last_error, SlowConsumer)
        subscription.close()
        assert await subscription.next_event() is None


async def test_without_resume_the_error_is_raised(start_bus: Callable[..., BusProcess]) -> None:
    process = start_bus(subscriber_queue_size=1, max_subscriber_lag=1)
    async with AsyncBus(process.address) as bus:
        subscription = await bus.subscribe("aio.flood", resume=False)
        await bus.publish_batch([new_event("aio.flood", {"n": n}) for n in range(200)])
        with pytest.raises(SlowConsumer):
            await asyncio.wait_for(take(subscription, 200), 10)


async def test_unreachable_bus() -> None:
    async with AsyncBus(f"127.0.0.1:{free_port()}") as bus:
        with pytest.raises(Unavailable):
            await bus.publish("a", b"")
        with pytest.raises(Unavailable, match="not serving"):
            await bus.wait_ready(timeout=0.3)
        with pytest.raises(Unavailable):
            await bus.subscribe("a")


async def test_gives_up_when_the_bus_stays_away(start_bus: Callable[..., BusProcess]) -> None:
    process = start_bus()
    async with AsyncBus(process.address) as bus:
        subscription = await bus.subscribe("aio.gone", reconnect_timeout=0.5)
        process.stop()
        with pytest.raises(Unavailable):
            await asyncio.wait_for(subscription.next_event(), 15)
