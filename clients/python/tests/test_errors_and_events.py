"""Pure logic, no bus: how statuses become exceptions, and events become wire messages."""

from __future__ import annotations

import logging
from datetime import datetime, timezone

import grpc
import pytest

from eventbus_client import errors
from eventbus_client._common import (
    WARN_EVERY,
    Endpoints,
    Failover,
    ResumePoint,
    parse_target,
    parse_targets,
)
from eventbus_client._proto import eventbus_pb2 as pb
from eventbus_client.events import (
    Event,
    Reply,
    ReplyError,
    encode_data,
    error_reply,
    from_pb,
    query_request,
    reply_event,
    subscribe_request,
    to_pb,
)

C = grpc.StatusCode


@pytest.mark.parametrize("code, reason, expected", [
    (C.UNAVAILABLE, "no-responders", errors.NoResponders),
    (C.UNAVAILABLE, "shutting-down", errors.ShuttingDown),
    (C.UNAVAILABLE, None, errors.NodeUnavailable),
    (C.UNAVAILABLE, "store-failed", errors.NodeUnavailable),
    (C.DEADLINE_EXCEEDED, "query-timeout", errors.QueryTimeout),
    (C.DEADLINE_EXCEEDED, None, errors.DeadlineExceeded),
    (C.INVALID_ARGUMENT, "invalid-argument", errors.InvalidArgument),
    (C.INVALID_ARGUMENT, "event-too-large", errors.EventTooLarge),
    (C.RESOURCE_EXHAUSTED, "slow-consumer", errors.SlowConsumer),
    (C.RESOURCE_EXHAUSTED, "replay-overrun", errors.ReplayOverrun),
    (C.CANCELLED, None, errors.Cancelled),
    (C.INTERNAL, "storage", errors.BusError),
    (C.UNAVAILABLE, "some-future-reason", errors.NodeUnavailable),
])
def test_error_class_by_reason_then_code(code: grpc.StatusCode, reason: str | None,
                                         expected: type[errors.BusError]) -> None:
    assert errors.error_class(code, reason) is expected


def test_node_unavailable_says_it_may_be_retried() -> None:
    assert errors.NodeUnavailable(C.UNAVAILABLE, "gone").retryable
    assert errors.ShuttingDown(C.UNAVAILABLE, "stopping").retryable
    assert issubclass(errors.NodeUnavailable, errors.Unavailable)
    assert not errors.NoResponders(C.UNAVAILABLE, "nobody").retryable


def test_no_responders_is_still_unavailable() -> None:
    error = errors.NoResponders(C.UNAVAILABLE, "no responders for topic x", "no-responders")
    assert isinstance(error, errors.Unavailable)
    assert error.code == C.UNAVAILABLE and error.reason == "no-responders"
    assert "UNAVAILABLE" in str(error)


def test_slow_consumer_names_the_resume_point() -> None:
    error = errors.SlowConsumer(C.RESOURCE_EXHAUSTED, "subscriber too slow: ...; resubscribe "
                                "with after_sequence=41 to go on", "slow-consumer")
    assert error.last_delivered == 41
    assert errors.SlowConsumer(C.RESOURCE_EXHAUSTED, "odd", None).last_delivered is None


def test_reason_of_reads_bytes_and_text_metadata() -> None:
    assert errors.reason_of([("other", "x"), ("eventbus-error", b"no-responders")]) == \
        "no-responders"
    assert errors.reason_of([("eventbus-error", "query-timeout")]) == "query-timeout"
    assert errors.reason_of(None) is None
    assert errors.reason_of([("other", "x")]) is None


def test_targets() -> None:
    assert parse_target("http://127.0.0.1:1/").address == "127.0.0.1:1"
    assert parse_target("https://bus.example:443").tls
    assert not parse_target("127.0.0.1:1").tls


def test_several_targets_from_a_list_a_string_or_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def addresses(value: str | list[str] | None) -> list[str]:
        return [target.address for target in parse_targets(value)]

    assert addresses(["http://a:1", "b:2"]) == ["a:1", "b:2"]
    assert addresses("http://a:1, http://b:2,") == ["a:1", "b:2"]
    assert addresses(["a:1,b:2", "c:3"]) == ["a:1", "b:2", "c:3"]
    monkeypatch.delenv("EVENTBUS_URL", raising=False)
    monkeypatch.setenv("EVENTBUS_SERVER", "http://s:9")
    assert addresses(None) == ["s:9"]
    monkeypatch.setenv("EVENTBUS_URL", "http://a:1,http://b:2")  # wins over EVENTBUS_SERVER
    assert addresses(None) == addresses([]) == ["a:1", "b:2"]
    assert parse_target(None).address == "a:1"


def test_endpoints_move_to_a_serving_node_else_the_next_once_per_failure() -> None:
    endpoints = Endpoints(parse_targets("a:1,b:2,c:3"))
    assert endpoints.candidates(0) == [1, 2, 0]
    assert endpoints.choose(0, 2) == 2  # c serves: skip b
    assert endpoints.moved_from(0)
    assert endpoints.choose(0, 1) == 2  # a second failure of a's calls: the move stands
    assert endpoints.choose(2, None) == 0  # none serves: the next in order


def test_moves_in_an_outage_warn_once_then_debug_until_warn_every_passed(
        caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    hooked: list[Failover] = []
    endpoints = Endpoints(parse_targets("a:1,b:2"), hooked.append, clock=lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="eventbus_client")

    def move(times: int) -> None:
        for _ in range(times):
            index = endpoints.index
            to = endpoints.choose(index, None)
            endpoints.report(Failover("subscription", endpoints.address(index),
                                      endpoints.address(to),
                                      errors.NodeUnavailable(C.UNAVAILABLE, "connection refused"),
                                      pattern="orders.>"))
            now[0] += 0.25

    def levels() -> list[int]:
        return [record.levelno for record in caplog.records if "moved from" in record.getMessage()]

    # Every node down: a move every 250 ms for 5 s.
    move(20)
    assert levels() == [logging.WARNING] + [logging.DEBUG] * 19
    assert caplog.records[0].moves_since_last_warning == 0
    assert "moves_since_last_warning" not in caplog.records[0].getMessage()
    assert len(hooked) == 20  # the hook hears of every move all the same

    # Still down once the period has passed since the first warning: one more warning, with a
    # count of the quiet moves.
    caplog.clear()
    now[0] = 100.0 + WARN_EVERY
    move(3)
    assert levels() == [logging.WARNING, logging.DEBUG, logging.DEBUG]
    warning = caplog.records[0]
    assert warning.moves_since_last_warning == 19
    assert warning.getMessage() == ("subscription orders.> moved from a:1 to b:2 (UNAVAILABLE: "
                                    "connection refused); moves_since_last_warning=19")
    assert len(hooked) == 23


def test_target_defaults_to_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EVENTBUS_URL", raising=False)
    monkeypatch.setenv("EVENTBUS_SERVER", "http://10.9.8.7:1234")
    assert parse_target(None).address == "10.9.8.7:1234"
    monkeypatch.delenv("EVENTBUS_SERVER")
    assert parse_target(None).address == "127.0.0.1:50051"


def test_data_encoding() -> None:
    assert encode_data(b"\x00\x01") == (b"\x00\x01", "")
    assert encode_data("héllo") == ("héllo".encode(), "text/plain; charset=utf-8")
    assert encode_data({"a": [1, 2]}) == (b'{"a":[1,2]}', "application/json")
    assert encode_data({"a": 1}, "application/vnd.x+json")[1] == "application/vnd.x+json"


def test_event_round_trip_through_the_wire_form() -> None:
    when = datetime(2025, 1, 2, 3, 4, 5, 600000, tzinfo=timezone.utc)
    event = Event(topic="a.b", data=b"x", id="e1", type="t", time=when,
                  attributes={"traceparent": "00-1"}, correlation_id="c", causation_id="k",
                  reply_to="_bus.inbox.1")
    message = to_pb(event, "svc")
    assert message.source == "svc"
    back = from_pb(message)
    assert back == Event(topic="a.b", data=b"x", id="e1", source="svc", type="t", time=when,
                         attributes={"traceparent": "00-1"}, correlation_id="c",
                         causation_id="k", reply_to="_bus.inbox.1")
    assert back.publish_time is None


def test_subscribe_request_start_positions() -> None:
    assert subscribe_request("a", None, "s", "latest").WhichOneof("start") == "latest"
    assert subscribe_request("a", None, "s", "earliest").WhichOneof("start") == "earliest"
    assert subscribe_request("a", "g", "s", 7).after_sequence == 7
    when = datetime(2025, 1, 1, tzinfo=timezone.utc)
    assert subscribe_request("a", None, "s", when).from_time.seconds == int(when.timestamp())
    with pytest.raises(ValueError, match="negative"):
        subscribe_request("a", None, "s", -1)
    with pytest.raises(TypeError):
        subscribe_request("a", None, "s", True)
    with pytest.raises(TypeError):
        subscribe_request("a", None, "s", "yesterday")  # type: ignore[arg-type]


def test_query_request_timeout() -> None:
    assert not query_request(Event(topic="q"), "s", None).HasField("timeout")
    assert query_request(Event(topic="q"), "s", 1.5).timeout.ToMilliseconds() == 1500
    with pytest.raises(ValueError, match="not positive"):
        query_request(Event(topic="q"), "s", 0)


def test_reply_event_follows_the_protocol() -> None:
    request = Event(topic="user.query", id="q1", correlation_id="c1", reply_to="_bus.inbox.9")
    reply = reply_event(request, {"ok": True}, "user-service")
    assert (reply.topic, reply.correlation_id, reply.causation_id, reply.source, reply.type) == \
        ("_bus.inbox.9", "c1", "q1", "user-service", "user.query.result")
    custom = reply_event(request, Reply(data="x", type="custom", attributes={"a": "b"}), "s")
    assert (custom.type, custom.attributes, custom.data) == ("custom", {"a": "b"}, b"x")


def test_error_reply_shape() -> None:
    reply = error_reply(ReplyError("not_found", "unknown user 7"))
    assert reply.data == {"error": {"code": "not_found", "message": "unknown user 7"}}
    assert reply.attributes == {"error": "not_found"}


def test_resume_point() -> None:
    point = ResumePoint("latest", None)
    point.confirmed(pb.Subscribed(head_sequence=10))
    assert point.next_start() == 10
    assert point.is_new(11) and not point.is_new(11) and not point.is_new(5)
    assert point.next_start() == 11
    assert ResumePoint("earliest", None).next_start() == "earliest"
    grouped = ResumePoint("latest", "workers")
    grouped.is_new(3)
    assert grouped.next_start() == "latest"
