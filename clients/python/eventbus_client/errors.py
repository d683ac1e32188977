"""Exceptions that keep the gRPC status.

Every RPC failure becomes a :class:`BusError` carrying the status code, the details and the bus's
stable reason. The bus puts that reason in the ``eventbus-error`` metadata of every error status
(see ``src/service/status.rs``), because several errors share a code: "no responders" and
"shutting down" are both UNAVAILABLE, yet a caller treats them differently. The reason, not the
message text, picks the subclass; errors from the transport itself (connection refused, a
client-side deadline) have no reason and are classified by their code alone.

Hierarchy::

    BusError
    ├── InvalidArgument          INVALID_ARGUMENT
    │   └── EventTooLarge        (event-too-large)
    ├── Unavailable              UNAVAILABLE
    │   ├── NoResponders         (no-responders)
    │   └── NodeUnavailable      the node is gone or going: no reason, or store-failed;
    │       │                    the call may be retried (on another node)
    │       └── ShuttingDown     (shutting-down)
    ├── DeadlineExceeded         DEADLINE_EXCEEDED
    │   └── QueryTimeout         (query-timeout)
    ├── ResourceExhausted        RESOURCE_EXHAUSTED
    │   ├── SlowConsumer         (slow-consumer)
    │   └── ReplayOverrun        (replay-overrun)
    ├── NotFound                 NOT_FOUND
    │   └── UnknownGroup         (unknown-group)
    ├── Cancelled                CANCELLED
    └── RemoteError              UNKNOWN: a responder answered a query with an error reply
"""

from __future__ import annotations

import re

from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from .events import Event

#: The metadata key of the bus's stable error reason.
ERROR_REASON_KEY = "eventbus-error"


class BusError(Exception):
    """A failed call to the bus. ``code`` is the gRPC status code, ``details`` its message and
    ``reason`` the bus's stable reason (``None`` when the failure did not come from the bus)."""

    def __init__(self, code: grpc.StatusCode, details: str, reason: str | None = None) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.reason = reason

    #: Whether the same call may succeed if made again (see :class:`NodeUnavailable`).
    retryable = False


class InvalidArgument(BusError):
    """The request broke a rule; ``details`` names the field and the rule."""


class EventTooLarge(InvalidArgument):
    """An event's data is over the bus's size limit."""


class Unavailable(BusError):
    """The bus cannot take the call now (down, unreachable, or see the subclasses)."""


class NoResponders(Unavailable):
    """A query's topic had no subscriber, so no reply could come. Raised at once."""


class NodeUnavailable(Unavailable):
    """The bus node the call went to is gone or going: unreachable, the connection broke under
    the call, stopping, or it lost its store (``store-failed``). The call may be retried; a
    client given several nodes has moved to another by the time this is raised.
    ``retryable`` is True."""

    retryable = True


class ShuttingDown(NodeUnavailable):
    """The bus is stopping."""


class DeadlineExceeded(BusError):
    """A deadline passed."""


class QueryTimeout(DeadlineExceeded):
    """No reply to a query came in time."""


class ResourceExhausted(BusError):
    """A limit of the bus was reached."""


class SlowConsumer(ResourceExhausted):
    """A subscription fell further behind than the bus's ``max_subscriber_lag`` and the bus
    ended it. ``last_delivered`` is the sequence to resume after (subscriptions of this package
    do so by themselves)."""

    @property
    def last_delivered(self) -> int | None:
        return _last_delivered(self.details)


class ReplayOverrun(ResourceExhausted):
    """A replay fell behind the bus's retention; events after ``last_delivered`` were dropped."""

    @property
    def last_delivered(self) -> int | None:
        return _last_delivered(self.details)


class NotFound(BusError):
    """Something the request names does not exist."""


class UnknownGroup(NotFound):
    """An Ack or Nack named no MANUAL-ack group of this bus (a bus that restarted with its memory
    store forgets its groups)."""


class Cancelled(BusError):
    """The call was cancelled (by this client, usually through ``close()``)."""


class RemoteError(BusError):
    """The responder answered a query with an error reply: a reply carrying the attribute
    ``error`` (the Rust SDK's ``Error::Remote``). ``topic`` is the query's topic, ``message`` the
    attribute's value (the handler's error message, or the scenario protocol's error code such
    as ``not_found``), ``reply`` the whole reply event, e.g. for ``reply.json()``. The code is
    UNKNOWN: the failure is the responder's own, not the bus's."""

    def __init__(self, topic: str, message: str, reply: Event) -> None:
        super().__init__(grpc.StatusCode.UNKNOWN, f"the responder on {topic} failed: {message}")
        self.topic = topic
        self.message = message
        self.reply = reply


_BY_REASON: dict[str, type[BusError]] = {
    "invalid-argument": InvalidArgument,
    "event-too-large": EventTooLarge,
    "no-responders": NoResponders,
    "shutting-down": ShuttingDown,
    "store-failed": NodeUnavailable,
    "query-timeout": QueryTimeout,
    "slow-consumer": SlowConsumer,
    "replay-overrun": ReplayOverrun,
    "unknown-group": UnknownGroup,
}

_BY_CODE: dict[grpc.StatusCode, type[BusError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAVAILABLE: NodeUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.NOT_FOUND: NotFound,
}

_LAST_DELIVERED = re.compile(r"after_sequence=(\d+)")


def _last_delivered(details: str) -> int | None:
    match = _LAST_DELIVERED.search(details)
    return int(match.group(1)) if match else None


def error_class(code: grpc.StatusCode, reason: str | None) -> type[BusError]:
    """The exception class for a status: by reason when the bus gave one, else by code."""
    if reason is not None and reason in _BY_REASON:
        return _BY_REASON[reason]
    return _BY_CODE.get(code, BusError)


def reason_of(metadata: object) -> str | None:
    """The ``eventbus-error`` value in gRPC metadata (a sequence of key/value pairs), if any."""
    if not metadata:
        return None
    for key, value in metadata:  # type: ignore[attr-defined]
        if key == ERROR_REASON_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def raise_if_error_reply(topic: str, reply: Event) -> Event:
    """Returns ``reply``, or raises :class:`RemoteError` when it is marked as an error."""
    message = reply.attributes.get("error")
    if message is not None:
        raise RemoteError(topic, message, reply)
    return reply


def from_rpc_error(error: grpc.RpcError) -> BusError:
    """Converts a failed call of grpcio (sync or aio) into the matching :class:`BusError`."""
    # grpcio has no type hints: these are the methods every failed call of it has.
    code: grpc.StatusCode = error.code()
    details: str = error.details() or ""
    reason = reason_of(error.trailing_metadata())
    return error_class(code, reason)(code, details, reason)
