"""The blocking client against a real bus process: every call, and every way it fails."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

import pytest

from eventbus_client import (
    Bus,
    BusError,
    Event,
    EventTooLarge,
    InvalidArgument,
    NoResponders,
    QueryTimeout,
    RemoteError,
    Reply,
    ReplyError,
    SlowConsumer,
    Unavailable,
    new_event,
)
from eventbus_client.testing import BusProcess, free_port, wait_for


def drain(subscription: object, count: int, timeout: float = 10.0) -> list[Event]:
    deadline = time.monotonic() + timeout
    events = []
    for _ in range(count):
        event = subscription.next_event(timeout=max(0.0, deadline - time.monotonic()))  # type: ignore[attr-defined]
        assert event is not None
        events.append(event)
    return events


def test_publish_returns_increasing_sequences(bus: Bus) -> None:
    first = bus.publish("py.seq", b"a")
    batch = bus.publish_batch([new_event("py.seq", {"n": n}) for n in range(3)])
    assert batch == [first + 1, first + 2, first + 3]


def test_subscribe_delivers_in_order_with_fields(bus: Bus) -> None:
    with bus.subscribe("py.order.*") as subscription:
        assert subscription.confirmation is not None
        bus.publish("py.order.created", {"n": 0}, type="order.created",
                    attributes={"traceparent": "00-abc-01"}, id="order-0")
        bus.publish_batch([new_event("py.order.paid", {"n": n}) for n in range(1, 5)])
        events = drain(subscription, 5)
    assert [e.json()["n"] for e in events] == [0, 1, 2, 3, 4]
    assert [e.sequence for e in events] == sorted({e.sequence for e in events})
    first = events[0]
    assert (first.id, first.type, first.source, first.attributes) == \
        ("order-0", "order.created", "pytest", {"traceparent": "00-abc-01"})
    assert first.data_content_type == "application/json"
    assert first.publish_time is not None and first.time is not None


def test_replay_from_earliest_sequence_and_time(bus: Bus) -> None:
    before = datetime.now(timezone.utc) - timedelta(seconds=1)
    sequences = bus.publish_batch([new_event("py.replay", {"n": n}) for n in range(3)])
    with bus.subscribe("py.replay", start="earliest") as subscription:
        assert [e.sequence for e in drain(subscription, 3)] == sequences
        wait_for(lambda: subscription.caught_up is not None, what="caught_up marker")
    with bus.subscribe("py.replay", start=sequences[0]) as subscription:
        assert [e.sequence for e in drain(subscription, 2)] == sequences[1:]
    with bus.subscribe("py.replay", start=before) as subscription:
        assert [e.sequence for e in drain(subscription, 3)] == sequences


def test_group_members_share_events(bus: Bus) -> None:
    members = [bus.subscribe("py.work", group="workers") for _ in range(2)]
    watcher = bus.subscribe("py.work")
    bus.publish_batch([new_event("py.work", {"n": n}) for n in range(10)])
    assert len(drain(watcher, 10)) == 10
    got: list[list[int]] = [[], []]
    deadline = time.monotonic() + 10
    while sum(map(len, got)) < 10:
        assert time.monotonic() < deadline, f"group members got only {got}"
        for index, member in enumerate(members):
            try:
                event = member.next_event(timeout=0.05)
            except TimeoutError:
                continue
            assert event is not None
            got[index].append(event.json()["n"])
    assert sorted(got[0] + got[1]) == list(range(10))
    assert got[0] and got[1], got
    for subscription in [*members, watcher]:
        subscription.close()


def test_close_ends_iteration(bus: Bus) -> None:
    subscription = bus.subscribe("py.close")
    threading.Timer(0.2, subscription.close).start()
    assert list(subscription) == []
    assert subscription.next_event() is None


def test_next_event_times_out(bus: Bus) -> None:
    with bus.subscribe("py.quiet") as subscription, pytest.raises(TimeoutError):
        subscription.next_event(timeout=0.1)


def test_invalid_publish_names_the_event_and_stores_nothing(bus: Bus) -> None:
    with bus.subscribe("py.atomic") as subscription:
        with pytest.raises(InvalidArgument) as caught:
            bus.publish_batch([new_event("py.atomic", b"ok"), new_event("bad topic!", b"x")])
        assert caught.value.reason == "invalid-argument"
        assert "events[1].topic" in caught.value.details
        bus.publish("py.atomic", b"after")
        assert subscription.next_event(timeout=5).data == b"after"  # type: ignore[union-attr]


def test_invalid_pattern_fails_at_subscribe(bus: Bus) -> None:
    with pytest.raises(InvalidArgument, match="topic"):
        bus.subscribe("a.>.b")


def test_group_replay_is_refused(bus: Bus) -> None:
    with pytest.raises(InvalidArgument, match="start"):
        bus.subscribe("py.g", group="g", start="earliest")


def test_event_too_large(start_bus: Callable[..., BusProcess]) -> None:
    process = start_bus(max_event_data_bytes=1024, max_message_bytes=1024 * 1024,
                        retention_max_bytes=1024 * 1024)
    with Bus(process.address) as small, pytest.raises(EventTooLarge) as caught:
        small.publish("py.big", b"x" * 2048)
    assert isinstance(caught.value, InvalidArgument)
    assert "1024" in caught.value.details


def test_query_reply_follows_the_protocol(bus: Bus) -> None:
    with bus.serve("py.echo", "echo", lambda request: {"echo": request.json()}) as responder:
        reply = bus.query("py.echo", {"hi": 1}, timeout=5)
        assert reply.json() == {"echo": {"hi": 1}}
        assert reply.type == "py.echo.result"
        assert reply.source == "pytest"
        assert reply.correlation_id and reply.causation_id
        wait_for(lambda: responder.handled == 1, what="handled count")


def test_query_keeps_a_given_correlation_id(bus: Bus) -> None:
    with bus.serve("py.corr", None, lambda request: Reply(data=request.correlation_id)):
        reply = bus.query("py.corr", b"", timeout=5, correlation_id="mine-1")
    assert (reply.correlation_id, reply.text()) == ("mine-1", "mine-1")


def test_handler_errors_raise_remote_error_on_the_asking_side(bus: Bus) -> None:
    def handler(request: Event) -> dict[str, int]:
        if request.json().get("boom"):
            raise RuntimeError("kaput")
        raise ReplyError("not_found", "unknown thing")

    with bus.serve("py.fail", "fail", handler) as responder:
        # The scenario protocol's error reply, from ReplyError.
        with pytest.raises(RemoteError) as caught:
            bus.query("py.fail", {"boom": False}, timeout=5)
        assert caught.value.message == "not_found"
        assert caught.value.topic == "py.fail"
        assert caught.value.code.name == "UNKNOWN"
        assert caught.value.reply.json() == \
            {"error": {"code": "not_found", "message": "unknown thing"}}
        assert caught.value.reply.attributes == {"error": "not_found"}
        # Any other exception: the Rust SDK's error reply.
        with pytest.raises(RemoteError) as crashed:
            bus.query("py.fail", {"boom": True}, timeout=5)
        assert crashed.value.message == "RuntimeError: kaput"
        assert crashed.value.reply.type == "eventbus.error"
        assert crashed.value.reply.text() == "RuntimeError: kaput"
        assert "py.fail" in str(crashed.value) and "kaput" in str(crashed.value)
        wait_for(lambda: responder.handled == 2, what="handled count")


def test_remote_error_is_a_bus_error(bus: Bus) -> None:
    with bus.serve("py.fail2", None, lambda request: Reply(attributes={"error": "nope"})):
        with pytest.raises(BusError, match="nope"):
            bus.query("py.fail2", b"", timeout=5)


def test_responder_ignores_events_without_reply_to(bus: Bus) -> None:
    calls = []
    with bus.serve("py.plain", None, lambda request: calls.append(request) or b"x") as responder:
        bus.publish("py.plain", b"not a query")
        assert bus.query("py.plain", b"q", timeout=5).data == b"x"
        wait_for(lambda: responder.handled == 1, what="handled count")
        assert len(calls) == 1


def test_query_without_responders_is_unavailable_at_once(bus: Bus) -> None:
    started = time.monotonic()
    with pytest.raises(NoResponders) as caught:
        bus.query("py.nobody", b"?", timeout=10)
    assert time.monotonic() - started < 2
    assert isinstance(caught.value, Unavailable)
    assert caught.value.code.name == "UNAVAILABLE"
    assert "py.nobody" in caught.value.details


def test_query_timeout(bus: Bus) -> None:
    with bus.subscribe("py.silent"):
        started = time.monotonic()
        with pytest.raises(QueryTimeout) as caught:
            bus.query("py.silent", b"?", timeout=0.3)
    assert 0.25 <= time.monotonic() - started < 3
    assert caught.value.code.name == "DEADLINE_EXCEEDED"
    assert caught.value.reason == "query-timeout"


def test_query_timeout_must_be_positive(bus: Bus) -> None:
    with pytest.raises(ValueError):
        bus.query("py.x", b"", timeout=-1)


def test_unreachable_bus() -> None:
    with Bus(f"127.0.0.1:{free_port()}") as nowhere:
        with pytest.raises(Unavailable):
            nowhere.publish("a", b"")
        with pytest.raises(Unavailable, match="not serving"):
            nowhere.wait_ready(timeout=0.3)
        with pytest.raises(Unavailable):
            nowhere.subscribe("a")


def test_wait_ready_on_a_closed_client_says_unavailable(bus_process: BusProcess) -> None:
    # A health probe on a closed channel fails as a probe (not with grpcio's ValueError, which
    # would also end a failover running on a background thread).
    bus = Bus(bus_process.address)
    bus.wait_ready()
    bus.close()
    with pytest.raises(Unavailable, match="CANCELLED"):
        bus.wait_ready(timeout=0.2)


def test_subscription_resumes_after_slow_consumer(start_bus: Callable[..., BusProcess]) -> None:
    process = start_bus(subscriber_queue_size=1, max_subscriber_lag=1)
    with Bus(process.address) as client, client.subscribe("py.flood") as subscription:
        client.publish_batch([new_event("py.flood", {"n": n}) for n in range(200)])
        events = drain(subscription, 200)
        assert [e.json()["n"] for e in events] == list(range(200))
        assert subscription.resumes >= 1
        assert isinstance(subscription.last_error, SlowConsumer)


def test_without_resume_the_slow_consumer_error_is_raised(
        start_bus: Callable[..., BusProcess]) -> None:
    process = start_bus(subscriber_queue_size=1, max_subscriber_lag=1)
    with Bus(process.address) as client:
        subscription = client.subscribe("py.flood", resume=False)
        client.publish_batch([new_event("py.flood", {"n": n}) for n in range(200)])
        with pytest.raises(SlowConsumer) as caught:
            for _ in subscription:
                pass
        assert caught.value.last_delivered is not None
        assert subscription.resumes == 0


def test_subscription_gives_up_when_the_bus_stays_away(
        start_bus: Callable[..., BusProcess]) -> None:
    process = start_bus()
    with Bus(process.address) as client:
        subscription = client.subscribe("py.gone", reconnect_timeout=0.5)
        process.stop()
        with pytest.raises(Unavailable):
            subscription.next_event(timeout=15)
