"""Batched delivery (``max_batch_events``): the option's range, the reading of ``event_batch``
responses (from a scripted stand-in bus, so every shape is exercised: a batch after an old
bus's single event, an overlap after a resume, a MANUAL-ack batch with its attempts), and
against a real bus a burst read in batches and a MANUAL-ack group member. Blocking and asyncio."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import grpc
import pytest

import eventbus_client.aio
import eventbus_client.bus
from eventbus_client import AsyncBus, Backoff, Bus, Event, new_event
from eventbus_client._common import received
from eventbus_client._proto import eventbus_pb2 as pb
from eventbus_client._proto import eventbus_pb2_grpc as pb_grpc
from eventbus_client.events import subscribe_request
from eventbus_client.testing import BusProcess

# --- The option ---------------------------------------------------------------------------


def test_every_subscribe_request_carries_max_batch_events() -> None:
    assert subscribe_request("a", None, "s", "latest").max_batch_events == 256
    assert subscribe_request("a", None, "s", 41, log_id="l",
                             max_batch_events=1024).max_batch_events == 1024
    assert subscribe_request("a", None, "s", "latest", max_batch_events=0).max_batch_events == 0


@pytest.mark.parametrize("value", [-1, 1025])
def test_max_batch_events_out_of_range_is_refused(value: int) -> None:
    with Bus("127.0.0.1:9") as bus:  # refused before anything is sent
        with pytest.raises(ValueError, match="max_batch_events: .* not between 0 and 1024"):
            bus.subscribe("a.>", max_batch_events=value)
        with pytest.raises(ValueError, match="max_batch_events"):
            bus.subscribe_manual("a.>", "g", max_batch_events=value)


@pytest.mark.parametrize("value", [-1, 1025])
async def test_async_max_batch_events_out_of_range_is_refused(value: int) -> None:
    async with AsyncBus("127.0.0.1:9") as bus:
        with pytest.raises(ValueError, match="max_batch_events"):
            await bus.subscribe("a.>", max_batch_events=value)
        with pytest.raises(ValueError, match="max_batch_events"):
            await bus.subscribe_manual("a.>", "g", max_batch_events=value)


# --- Reading batches, from a scripted stand-in bus ----------------------------------------


class ScriptedBus(pb_grpc.EventBusServiceServicer):
    """Answers each Subscribe stream with the next script of responses; every stream but the
    last then breaks (UNAVAILABLE, which the client resumes), the last stays open until the
    client leaves. Records the requests."""

    def __init__(self, *scripts: list[pb.SubscribeResponse]) -> None:
        self.requests: list[pb.SubscribeRequest] = []
        self._scripts = list(scripts)

    def Subscribe(self, request: pb.SubscribeRequest,
                  context: grpc.ServicerContext) -> Iterator[pb.SubscribeResponse]:
        self.requests.append(request)
        script = self._scripts.pop(0) if self._scripts else []
        yield from script
        if self._scripts:
            context.abort(grpc.StatusCode.UNAVAILABLE, "scripted break")
        while context.is_active():
            time.sleep(0.02)


@contextmanager
def scripted_bus(*scripts: list[pb.SubscribeResponse]) -> Iterator[tuple[ScriptedBus, str]]:
    servicer = ScriptedBus(*scripts)
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_EventBusServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def subscribed(head: int) -> pb.SubscribeResponse:
    return pb.SubscribeResponse(subscribed=pb.Subscribed(log_id="log-a", head_sequence=head))


def wire_event(sequence: int) -> pb.Event:
    return pb.Event(topic="fake.topic", id=f"id-{sequence}", sequence=sequence)


def single(sequence: int, attempt: int = 0) -> pb.SubscribeResponse:
    return pb.SubscribeResponse(event=wire_event(sequence), delivery_attempt=attempt)


def batch(*sequences: int, attempts: tuple[int, ...] = ()) -> pb.SubscribeResponse:
    return pb.SubscribeResponse(event_batch=pb.EventBatch(
        events=[wire_event(sequence) for sequence in sequences],
        delivery_attempts=list(attempts)))


def caught_up(sequence: int) -> pb.SubscribeResponse:
    return pb.SubscribeResponse(caught_up=pb.CaughtUp(sequence=sequence))


def resumed_scripts() -> tuple[list[pb.SubscribeResponse], ...]:
    """An old bus's single event, a batch overlapping it, a break; the resume after 3 gets a
    batch overlapping again. Delivered: 1 to 5, once each."""
    return ([subscribed(0), single(1), batch(1, 2, 3), caught_up(3)],
            [subscribed(5), batch(3, 4, 5)])


#: A MANUAL-ack batch with an attempt per event, then a redelivery as a single event.
MANUAL_SCRIPT = [subscribed(0), batch(7, 8, attempts=(1, 3)), single(7, attempt=2)]


def check_resumed(servicer: ScriptedBus, events: list[Event | None]) -> None:
    assert [event.sequence for event in events if event] == [1, 2, 3, 4, 5]
    assert [event.id for event in events if event] == [f"id-{n}" for n in range(1, 6)]
    first, again = servicer.requests
    assert (first.max_batch_events, again.max_batch_events) == (64, 64)
    assert (again.after_sequence, again.log_id) == (3, "log-a")


def test_batches_are_handed_out_one_by_one_without_duplicates() -> None:
    with scripted_bus(*resumed_scripts()) as (servicer, address), Bus(address) as bus, \
            bus.subscribe("fake.>", max_batch_events=64,
                          backoff=Backoff(initial=0.01)) as subscription:
        events = [subscription.next_event(timeout=5) for _ in range(5)]
        with pytest.raises(TimeoutError):
            subscription.next_event(timeout=0.2)
        assert (subscription.caught_up, subscription.resumes) == (3, 1)
    check_resumed(servicer, events)


def test_a_manual_batch_gives_each_delivery_its_attempt() -> None:
    with scripted_bus(MANUAL_SCRIPT) as (servicer, address), Bus(address) as bus, \
            bus.subscribe_manual("fake.>", "g") as member:
        deliveries = [member.next_delivery(timeout=5) for _ in range(3)]
    assert [(d.event.sequence, d.attempt) for d in deliveries if d] == [(7, 1), (8, 3), (7, 2)]
    assert servicer.requests[0].max_batch_events == 256


async def test_async_batches_are_handed_out_one_by_one_without_duplicates() -> None:
    with scripted_bus(*resumed_scripts()) as (servicer, address):
        async with AsyncBus(address) as bus:
            subscription = await bus.subscribe("fake.>", max_batch_events=64,
                                               backoff=Backoff(initial=0.01))
            events = [await asyncio.wait_for(subscription.next_event(), 5) for _ in range(5)]
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(subscription.next_event(), 0.2)
            assert (subscription.caught_up, subscription.resumes) == (3, 1)
            subscription.close()
    check_resumed(servicer, events)


async def test_async_manual_batch_gives_each_delivery_its_attempt() -> None:
    with scripted_bus(MANUAL_SCRIPT) as (servicer, address):
        async with AsyncBus(address) as bus:
            member = await bus.subscribe_manual("fake.>", "g")
            deliveries = [await asyncio.wait_for(member.next_delivery(), 5) for _ in range(3)]
            member.close()
    assert [(d.event.sequence, d.attempt) for d in deliveries if d] == [(7, 1), (8, 3), (7, 2)]
    assert servicer.requests[0].max_batch_events == 256


# --- Against a real bus -------------------------------------------------------------------


@pytest.fixture
def responses(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """The kind and event count of every event-carrying response the subscriptions read, to
    tell batches (``event_batch``) from single events."""
    seen: list[tuple[str, int]] = []

    def spy(message: pb.SubscribeResponse) -> list[tuple[pb.Event, int]]:
        events = received(message)
        seen.append((str(message.WhichOneof("message")), len(events)))
        return events

    monkeypatch.setattr(eventbus_client.bus, "received", spy)
    monkeypatch.setattr(eventbus_client.aio, "received", spy)
    return seen


def check_batched(responses: list[tuple[str, int]], max_batch_events: int) -> None:
    batches = [count for kind, count in responses if kind == "event_batch"]
    assert batches, f"no event_batch among {len(responses)} responses"
    assert max(batches) <= max_batch_events
    assert min(batches) > 1  # a lone event comes as `event`


def test_a_burst_arrives_once_in_sequence_order(
        bus: Bus, responses: list[tuple[str, int]]) -> None:
    count = 5_000

    def publish() -> list[int]:
        with bus.publisher() as publisher:
            futures = [publisher.publish("batch.burst", {"n": n}) for n in range(count)]
            publisher.flush(timeout=30)
            return [future.result() for future in futures]

    with bus.subscribe("batch.burst", max_batch_events=128) as subscription, \
            ThreadPoolExecutor(max_workers=1) as executor:
        publishing = executor.submit(publish)
        events = [subscription.next_event(timeout=10) for _ in range(count)]
        sequences = publishing.result(timeout=30)
        with pytest.raises(TimeoutError):
            subscription.next_event(timeout=0.3)
    assert [event.sequence for event in events if event] == sequences
    assert sequences == sorted(sequences) and len(set(sequences)) == count
    assert [event.json()["n"] for event in events if event] == list(range(count))
    check_batched(responses, 128)


async def test_async_burst_arrives_once_in_sequence_order(
        bus_process: BusProcess, responses: list[tuple[str, int]]) -> None:
    count, chunk = 5_000, 250
    async with AsyncBus(bus_process.address) as bus:
        subscription = await bus.subscribe("batch.aio-burst", max_batch_events=100)

        async def publish() -> list[int]:
            sequences: list[int] = []
            for first in range(0, count, chunk):
                sequences += await bus.publish_batch(
                    [new_event("batch.aio-burst", {"n": n}) for n in range(first, first + chunk)])
            return sequences

        publishing = asyncio.create_task(publish())

        async def take() -> list[Event]:
            events: list[Event] = []
            async for event in subscription:
                events.append(event)
                if len(events) == count:
                    break
            return events

        events = await asyncio.wait_for(take(), 30)
        sequences = await publishing
        subscription.close()
    assert [event.sequence for event in events] == sequences
    assert [event.json()["n"] for event in events] == list(range(count))
    check_batched(responses, 100)


def test_max_batch_events_0_keeps_one_event_per_response(
        bus: Bus, responses: list[tuple[str, int]]) -> None:
    with bus.subscribe("batch.single", max_batch_events=0) as subscription:
        sequences = bus.publish_batch([new_event("batch.single", {"n": n}) for n in range(50)])
        events = [subscription.next_event(timeout=10) for _ in range(50)]
    assert [event.sequence for event in events if event] == sequences
    assert {kind for kind, _ in responses} == {"event"}


def test_a_batched_group_member_gets_each_attempt(
        bus: Bus, responses: list[tuple[str, int]]) -> None:
    def take(member: Any, count: int) -> list[Any]:
        return [member.next_delivery(timeout=10) for _ in range(count)]

    with bus.subscribe_manual("batch.manual", "batchers", max_batch_events=16) as member:
        sequences = bus.publish_batch([new_event("batch.manual", {"n": n}) for n in range(10)])
        deliveries = take(member, 10)
        assert [(d.event.sequence, d.attempt) for d in deliveries] == \
            [(sequence, 1) for sequence in sequences]
        check_batched(responses, 16)
        assert deliveries[4].nack() is True
        again = take(member, 1)[0]
        assert (again.event.sequence, again.attempt) == (sequences[4], 2)
        # Two handed back at once come back together, each with its own attempt.
        assert bus.nack("batchers", [sequences[0], sequences[1]]) == 2
        both = take(member, 2)
        assert sorted((d.event.sequence, d.attempt) for d in both) == \
            [(sequences[0], 2), (sequences[1], 2)]
        results = [delivery.ack() for delivery in [*deliveries[2:4], *deliveries[5:], again,
                                                   *both]]
        assert all(result.acknowledged == 1 for result in results)
        assert results[-1].group_cursor == sequences[-1]
        with pytest.raises(TimeoutError):
            member.next_delivery(timeout=0.3)


async def test_async_batched_group_member_gets_each_attempt(
        bus_process: BusProcess, responses: list[tuple[str, int]]) -> None:
    async with AsyncBus(bus_process.address) as bus:
        member = await bus.subscribe_manual("batch.aio-manual", "aio-batchers",
                                            max_batch_events=16)
        sequences = await bus.publish_batch(
            [new_event("batch.aio-manual", {"n": n}) for n in range(10)])
        deliveries = [await asyncio.wait_for(member.next_delivery(), 10) for _ in range(10)]
        assert [(d.event.sequence, d.attempt) for d in deliveries if d] == \
            [(sequence, 1) for sequence in sequences]
        check_batched(responses, 16)
        assert deliveries[4] is not None and await deliveries[4].nack() is True
        again = await asyncio.wait_for(member.next_delivery(), 10)
        assert again is not None and (again.event.sequence, again.attempt) == (sequences[4], 2)
        result = await bus.ack("aio-batchers", sequences)
        assert (result.acknowledged, result.group_cursor) == (10, sequences[-1])
        member.close()
