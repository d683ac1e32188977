"""W3C trace context through a real bus: a producer's ``traceparent`` reaches subscribers, and a
query's reaches the responder and comes back on the reply."""

from __future__ import annotations

from eventbus_client import Bus, Event

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_traceparent_reaches_subscribers(bus: Bus) -> None:
    with bus.subscribe("traced.>") as subscription:
        bus.publish("traced.created", b"x", traceparent=PARENT, tracestate="vendor=1")
        bus.publish("traced.plain", b"y")
        first = subscription.next_event(timeout=10)
        second = subscription.next_event(timeout=10)
    assert first is not None and second is not None
    assert first.traceparent == PARENT
    assert first.tracestate == "vendor=1"
    assert second.traceparent is None


def test_a_query_carries_its_traceparent_to_the_responder_and_back(bus: Bus) -> None:
    seen: list[str | None] = []

    def answer(query: Event) -> bytes:
        seen.append(query.traceparent)
        return b"42"

    with bus.serve("traced.query", None, answer):
        reply = bus.query("traced.query", b"?", timeout=10, traceparent=PARENT)
    assert seen == [PARENT]
    assert reply.traceparent == PARENT
