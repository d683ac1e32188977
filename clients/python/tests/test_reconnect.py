"""Reconnects: the backoff schedule (pure), the resume rule across a log that started over
(pure), and subscriptions and their resumes against bus processes that crash and come back."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from eventbus_client import AsyncBus, Backoff, Bus, Unavailable, new_event
from eventbus_client._common import ResumePoint
from eventbus_client._proto import eventbus_pb2 as pb
from eventbus_client.events import subscribe_request
from eventbus_client.testing import BusProcess


def test_backoff_defaults_are_the_rust_sdks_schedule_with_full_jitter() -> None:
    backoff = Backoff()
    assert (backoff.initial, backoff.max, backoff.multiplier, backoff.jitter,
            backoff.max_attempts) == (0.05, 5.0, 2.0, 1.0, None)
    assert backoff.allows(10**9)


def test_backoff_grows_exponentially_and_is_capped() -> None:
    backoff = Backoff(initial=0.1, max=1.0, jitter=0.0)
    assert [round(backoff.delay_with(n, 0.5), 3) for n in range(6)] == \
        [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert Backoff().delay_with(100_000, 0.0) == 5.0


def test_jitter_only_shortens_within_its_fraction() -> None:
    half = Backoff(jitter=0.5)
    assert half.delay_with(3, 0.0) == pytest.approx(0.4)
    assert half.delay_with(3, 1.0) == pytest.approx(0.2)
    assert all(0.2 <= half.delay(3) <= 0.4 for _ in range(100))
    full = Backoff(jitter=1.0)  # "full jitter": anywhere from 0 to the whole delay
    assert full.delay_with(3, 1.0) == 0.0


def test_max_attempts_limits_retries() -> None:
    backoff = Backoff(max_attempts=2)
    assert backoff.allows(0) and backoff.allows(1) and not backoff.allows(2)


def confirmation(log_id: str, head: int, log_changed: bool = False) -> pb.Subscribed:
    return pb.Subscribed(log_id=log_id, head_sequence=head, log_changed=log_changed)


def test_resume_point_starts_over_when_the_log_changes() -> None:
    point = ResumePoint("latest", None)
    assert point.confirmed(confirmation("log-a", 3)) is None
    assert point.is_new(4) and point.is_new(5)
    assert point.next_start() == 5 and point.log_id == "log-a"
    assert point.confirmed(confirmation("log-a", 9)) is None  # same log: go on
    reset = point.confirmed(confirmation("log-b", 2, log_changed=True))
    assert reset is not None
    assert (reset.last_seen, reset.head, reset.log_id, reset.log_changed) == \
        (5, 2, "log-b", True)
    assert point.next_start() == "earliest" and point.log_id == "log-b"
    assert point.is_new(1)  # sequences begin again


def test_resume_point_without_log_ids_notices_the_sequence_going_back() -> None:
    point = ResumePoint("earliest", "workers")
    point.confirmed(confirmation("", 0))
    point.is_new(7)
    reset = point.confirmed(confirmation("", 2))
    assert reset is not None and not reset.log_changed
    assert point.next_start() == "latest"  # groups are served live


def test_resume_request_carries_the_log_id() -> None:
    request = subscribe_request("a.>", None, "me", 41, log_id="log-a")
    assert (request.after_sequence, request.log_id) == (41, "log-a")


def test_subscription_survives_a_bus_crash_without_duplicates(
        tmp_path: Path, start_bus: Callable[..., BusProcess]) -> None:
    process = start_bus(storage="file", data_dir=tmp_path / "data")
    with Bus(process.address) as bus, bus.subscribe("re.file") as subscription:
        first = bus.publish_batch([new_event("re.file", {"n": n}) for n in range(3)])
        seen = [subscription.next_event(timeout=10) for _ in range(3)]
        assert [e.sequence for e in seen if e] == first
        process.restart(crash=True, down_for=0.5)
        bus.wait_ready()
        more = bus.publish_batch([new_event("re.file", {"n": n}) for n in range(3, 6)])
        events = [subscription.next_event(timeout=15) for _ in range(3)]
        assert [e.sequence for e in events if e] == more
        assert [e.json()["n"] for e in events if e] == [3, 4, 5]
        assert subscription.resumes >= 1 and not subscription.resets
        with pytest.raises(TimeoutError):
            subscription.next_event(timeout=0.3)


def test_a_log_that_started_over_is_reported_and_followed(
        start_bus: Callable[..., BusProcess]) -> None:
    process = start_bus()  # memory store: a restart starts a new log
    with Bus(process.address) as bus, bus.subscribe("re.mem") as subscription:
        old_log = subscription.confirmation.log_id  # type: ignore[union-attr]
        bus.publish_batch([new_event("re.mem", {"n": n}) for n in range(5)])
        assert [subscription.next_event(timeout=10).json()["n"] for _ in range(5)] == \
            list(range(5))  # type: ignore[union-attr]
        process.restart(crash=True)
        bus.wait_ready()
        fresh = bus.publish_batch([new_event("re.mem", {"n": n}) for n in (10, 11)])
        events = [subscription.next_event(timeout=15) for _ in range(2)]
        assert [(e.sequence, e.json()["n"]) for e in events if e] == list(zip(fresh, [10, 11]))
        [reset] = subscription.resets
        assert reset.last_seen == 5 and reset.log_id != old_log
        assert reset.log_changed  # the bus answered the log_id the resume sent


def test_gives_up_after_max_attempts(start_bus: Callable[..., BusProcess]) -> None:
    process = start_bus()
    with Bus(process.address) as bus:
        subscription = bus.subscribe("re.gone", backoff=Backoff(initial=0.01, max_attempts=3))
        process.stop()
        started = time.monotonic()
        with pytest.raises(Unavailable):
            subscription.next_event(timeout=15)
        assert time.monotonic() - started < 5


async def test_async_subscription_follows_a_restarted_bus(
        start_bus: Callable[..., BusProcess]) -> None:
    process = start_bus()
    async with AsyncBus(process.address) as bus:
        subscription = await bus.subscribe("re.aio")
        await bus.publish("re.aio", {"n": 0})
        first = await asyncio.wait_for(subscription.next_event(), 10)
        assert first is not None
        await asyncio.get_running_loop().run_in_executor(None, process.restart)
        await bus.wait_ready()
        await bus.publish("re.aio", {"n": 1})
        again = await asyncio.wait_for(subscription.next_event(), 15)
        assert again is not None and again.json() == {"n": 1} and again.sequence == 1
        assert len(subscription.resets) == 1 and subscription.resets[0].log_changed
        subscription.close()
