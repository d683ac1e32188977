"""Events as Python values, and the one boundary where they become wire messages and back.

The wrapper never hands out generated protobuf classes: callers get an immutable :class:`Event`
with plain types (``bytes``, ``dict``, ``datetime``), so code using this package does not depend
on the generated stubs, which are rebuilt from the proto and never committed.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
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

#: The attributes (and gRPC metadata keys) of the W3C trace context.
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"


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

    @property
    def traceparent(self) -> str | None:
        """The W3C trace context's ``traceparent`` the event carries (set by its producer, or
        by the bus from the producer's ``traceparent`` request metadata), if any."""
        return self.attributes.get(TRACEPARENT)

    @property
    def tracestate(self) -> str | None:
        """The W3C ``tracestate`` beside :attr:`traceparent`, if any."""
        return self.attributes.get(TRACESTATE)

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


def new_event(topic: str, data: Data = b"", *, traceparent: str | None = None,
              tracestate: str | None = None, **fields: Any) -> Event:
    """An :class:`Event` to publish; ``fields`` are any other :class:`Event` fields.
    ``traceparent`` (and ``tracestate``) set the W3C trace context as attributes, which the bus
    carries to every subscriber and a responder carries into its reply."""
    payload, content_type = encode_data(data, fields.pop("data_content_type", None))
    if traceparent is not None:
        attributes = dict(fields.pop("attributes", {}))
        attributes[TRACEPARENT] = traceparent
        if tracestate is not None:
            attributes[TRACESTATE] = tracestate
        fields["attributes"] = attributes
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


@dataclass(frozen=True)
class ManualAck:
    """Settings of a MANUAL-ack (at-least-once) group subscription; the bus's defaults.

    The bus keeps the group's cursor (durably with its file store), hands each event to one
    member, and waits for an ack. ``ack_deadline`` (seconds, positive): an event unacked this
    long is delivered again. ``max_deliveries``: deliveries of one event (every nack, passed
    deadline or member leaving counts) before it moves to ``dead_letter_topic``
    (``_bus.dlq.<group>`` when ``None``). ``max_in_flight``: unacked events this member holds at
    once. ``max_deliveries`` and ``dead_letter_topic`` are per group: the member that creates
    the group sets them; ``ack_deadline`` and ``max_in_flight`` are per member.
    """

    ack_deadline: float = 30.0
    max_deliveries: int = 5
    max_in_flight: int = 256
    dead_letter_topic: str | None = None


#: Events per response a subscription asks for by default (``max_batch_events``).
DEFAULT_MAX_BATCH_EVENTS = 256
#: The most events per response the bus accepts to send.
MAX_BATCH_EVENTS = 1024


def subscribe_request(
    pattern: str, group: str | None, subscriber: str, start: Start,
    manual: ManualAck | None = None, log_id: str = "",
    max_batch_events: int = DEFAULT_MAX_BATCH_EVENTS,
) -> pb.SubscribeRequest:
    """The wire form of a subscription request; ``log_id`` names the log ``start`` was taken
    from (empty on a first subscription). ``max_batch_events`` above 1 asks for batched
    delivery (``event_batch`` responses of up to that many events); a bus that does not know
    it sends single ``event`` responses, which the subscriptions read all the same."""
    if not 0 <= max_batch_events <= MAX_BATCH_EVENTS:
        raise ValueError(f"max_batch_events: {max_batch_events} is not between 0 and "
                         f"{MAX_BATCH_EVENTS}")
    request = pb.SubscribeRequest(topic=pattern, group=group or "", subscriber=subscriber,
                                  log_id=log_id, max_batch_events=max_batch_events)
    if manual is not None:
        if manual.ack_deadline <= 0:
            raise ValueError(f"ack_deadline: {manual.ack_deadline} s is not positive")
        request.ack_mode = pb.ACK_MODE_MANUAL
        request.ack_deadline.FromTimedelta(timedelta(seconds=manual.ack_deadline))
        request.max_deliveries = manual.max_deliveries
        request.max_in_flight = manual.max_in_flight
        request.dead_letter_topic = manual.dead_letter_topic or ""
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


def nack_request(group: str, sequences: Iterable[int], delay: float | None) -> pb.NackRequest:
    """The wire form of a Nack; ``delay`` in seconds (the bus's redelivery backoff alone when
    ``None``)."""
    request = pb.NackRequest(group=group, sequences=list(sequences))
    if delay is not None:
        if delay < 0:
            raise ValueError(f"delay: {delay} s is negative")
        request.redeliver_after.FromTimedelta(timedelta(seconds=delay))
    return request


@dataclass(frozen=True)
class AckResult:
    """The bus's answer to an Ack: how many of the sequences were waiting for one (the others
    were already acked, redelivered elsewhere, or never delivered to the group) and the group's
    cursor after it (every event up to it is acked or dead-lettered)."""

    acknowledged: int
    group_cursor: int


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
    attributes = dict(reply.attributes)
    # The reply continues the asker's trace unless the handler set a context of its own.
    if TRACEPARENT not in attributes:
        for key in (TRACEPARENT, TRACESTATE):
            if key in request.attributes:
                attributes[key] = request.attributes[key]
    return Event(
        topic=request.reply_to,
        data=payload,
        data_content_type=content_type,
        source=source,
        type=reply.type or f"{request.topic}.result",
        attributes=attributes,
        correlation_id=request.correlation_id,
        causation_id=request.id,
    )


#: The attribute that marks a reply as an error (both conventions below set it).
ERROR_ATTRIBUTE = "error"

#: The ``type`` of an error reply made from a handler's exception, as the Rust SDK's.
ERROR_EVENT_TYPE = "eventbus.error"


def exception_reply(error: BaseException) -> Reply:
    """The error reply for a handler that raised, as the Rust SDK sends a handler's error:
    ``type`` ``eventbus.error``, attribute ``error`` = the message, and the same message as
    ``text/plain`` data. The asking side's ``query`` raises :class:`RemoteError` for it."""
    message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    return Reply(data=message, type=ERROR_EVENT_TYPE, attributes={ERROR_ATTRIBUTE: message},
                 data_content_type="text/plain; charset=utf-8")


def error_reply(error: ReplyError) -> Reply:
    """The scenario protocol's error reply for a :class:`ReplyError`."""
    return Reply(
        data={"error": {"code": error.code, "message": error.message}},
        attributes={ERROR_ATTRIBUTE: error.code},
    )
