"""Events as Python values, and the one boundary where they become wire messages and back.

The wrapper never hands out generated protobuf classes: callers get an immutable :class:`Event`
with plain types (``bytes``, ``dict``, ``datetime``), so code using this package does not depend
on the generated stubs, which are rebuilt from the proto and never committed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, Union

from google.protobuf import empty_pb2, timestamp_pb2

from ._proto import eventbus_pb2 as pb

#: A payload: bytes are sent as they are; ``str`` as UTF-8 text; anything else as JSON.
Data = Union[bytes, str, Mapping[str, Any], list[Any], int, float, bool, None]

#: Where a subscription starts: only new events, everything held, after a sequence (resume),
#: or from a time.
Start = Union[Literal["latest", "earliest"], int, datetime]

JSON = "application/json"


@dataclass(frozen=True)
class Event:
    """One event on the bus (CloudEvents 1.0 fields plus the bus's own). ``sequence`` and
    ``publish_time`` are set by the bus; on publish they are ignored."""

    topic: str
    data: bytes = b""
    id: str = ""
    source: str = ""
    type: str = ""
    time: datetime | None = None
    data_content_type: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    correlation_id: str = ""
    causation_id: str = ""
    reply_to: str = ""
    sequence: int = 0
    publish_time: datetime | None = None

    def json(self) -> Any:
        """The data parsed as JSON."""
        return json.loads(self.data)

    def text(self) -> str:
        """The data as UTF-8 text."""
        return self.data.decode()


def encode_data(data: Data, content_type: str | None = None) -> tuple[bytes, str]:
    """The bytes and media type of a payload; ``content_type`` wins when given."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data), content_type or ""
    if isinstance(data, str):
        return data.encode(), content_type or "text/plain; charset=utf-8"
    return json.dumps(data, separators=(",", ":")).encode(), content_type or JSON


def new_event(topic: str, data: Data = b"", **fields: Any) -> Event:
    """An :class:`Event` to publish; ``fields`` are any other :class:`Event` fields."""
    payload, content_type = encode_data(data, fields.pop("data_content_type", None))
    return Event(topic=topic, data=payload, data_content_type=content_type, **fields)


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    stamp.FromDatetime(value.astimezone(timezone.utc))
    return stamp


def _datetime(stamp: timestamp_pb2.Timestamp, present: bool) -> datetime | None:
    if not present:
        return None
    moment: datetime = stamp.ToDatetime(tzinfo=timezone.utc)
    return moment


def to_pb(event: Event, default_source: str) -> pb.Event:
    """The wire form of an event; an empty ``source`` becomes this client's source."""
    message = pb.Event(
        id=event.id,
        source=event.source or default_source,
        type=event.type,
        topic=event.topic,
        data_content_type=event.data_content_type,
        data=event.data,
        attributes=dict(event.attributes),
        correlation_id=event.correlation_id,
        causation_id=event.causation_id,
        reply_to=event.reply_to,
    )
    if event.time is not None:
        message.time.CopyFrom(_timestamp(event.time))
    return message


def from_pb(message: pb.Event) -> Event:
    """An event as received from the bus."""
    return Event(
        id=message.id,
        source=message.source,
        type=message.type,
        topic=message.topic,
        time=_datetime(message.time, message.HasField("time")),
        data_content_type=message.data_content_type,
        data=message.data,
        attributes=dict(message.attributes),
        correlation_id=message.correlation_id,
        causation_id=message.causation_id,
        reply_to=message.reply_to,
        sequence=message.sequence,
        publish_time=_datetime(message.publish_time, message.HasField("publish_time")),
    )


def subscribe_request(
    pattern: str, group: str | None, subscriber: str, start: Start
) -> pb.SubscribeRequest:
    """The wire form of a subscription request."""
    request = pb.SubscribeRequest(topic=pattern, group=group or "", subscriber=subscriber)
    if start == "latest":
        request.latest.CopyFrom(empty_pb2.Empty())
    elif start == "earliest":
        request.earliest.CopyFrom(empty_pb2.Empty())
    elif isinstance(start, bool):
        raise TypeError("start must be 'latest', 'earliest', a sequence (int) or a datetime")
    elif isinstance(start, int):
        if start < 0:
            raise ValueError(f"start: sequence {start} is negative")
        request.after_sequence = start
    elif isinstance(start, datetime):
        request.from_time.CopyFrom(_timestamp(start))
    else:
        raise TypeError("start must be 'latest', 'earliest', a sequence (int) or a datetime")
    return request


def query_request(event: Event, default_source: str, timeout: float | None) -> pb.QueryRequest:
    """The wire form of a query; ``timeout`` in seconds, the bus's default when ``None``."""
    request = pb.QueryRequest(event=to_pb(event, default_source))
    if timeout is not None:
        if timeout <= 0:
            raise ValueError(f"timeout: {timeout} s is not positive")
        request.timeout.FromTimedelta(timedelta(seconds=timeout))
    return request


@dataclass(frozen=True)
class Reply:
    """What a query handler returns when it wants more than the data: a type, attributes or a
    media type of its own. Plain data returned by a handler is wrapped in one."""

    data: Data = b""
    type: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)
    data_content_type: str | None = None


class ReplyError(Exception):
    """Raised by a query handler to answer with an error reply as docs/scenario-protocol.md
    defines it: data ``{"error": {"code": CODE, "message": TEXT}}`` and attribute
    ``error`` = CODE (``not_found``, ``invalid``, ``unavailable``, ``internal``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def reply_event(request: Event, outcome: Reply | Data, source: str) -> Event:
    """The reply to a query event: to its ``reply_to``, same ``correlation_id``, ``causation_id``
    = the query's id, ``type`` = the query topic plus ``.result`` unless the handler chose one."""
    reply = outcome if isinstance(outcome, Reply) else Reply(data=outcome)
    payload, content_type = encode_data(reply.data, reply.data_content_type)
    return Event(
        topic=request.reply_to,
        data=payload,
        data_content_type=content_type,
        source=source,
        type=reply.type or f"{request.topic}.result",
        attributes=dict(reply.attributes),
        correlation_id=request.correlation_id,
        causation_id=request.id,
    )


def error_reply(error: ReplyError) -> Reply:
    """The scenario protocol's error reply for a :class:`ReplyError`."""
    return Reply(
        data={"error": {"code": error.code, "message": error.message}},
        attributes={"error": error.code},
    )
