"""What the blocking and the asyncio clients share: target parsing, channel options, and the rule
for which broken subscriptions are resumed and from where."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import grpc

from . import errors
from ._proto import eventbus_pb2 as pb
from .events import Start

#: The environment variable naming the bus, shared with the Rust CLI.
SERVER_ENV = "EVENTBUS_SERVER"
DEFAULT_TARGET = "127.0.0.1:50051"

#: The health-service name the bus reports for its event API.
HEALTH_SERVICE = "eventbus.v1.EventBusService"

#: The bus accepts gRPC messages of 16 MiB by default; allow replies and batches that size.
CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]

#: Reasons a broken subscription stream is worth reopening: the bus ended it on purpose with a
#: place to resume from, or the bus or the connection went away for a while.
RESUMABLE = (errors.ResourceExhausted, errors.Unavailable)


def is_retryable(error: errors.BusError) -> bool:
    """Whether a broken stream is worth reopening, by its code, as the Rust SDK decides: a
    refusal of the request itself (INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, ...) would
    be refused again; anything else (the bus away, shutting down, a slow consumer cut off, an
    internal failure) may pass."""
    return error.code not in _NOT_RETRYABLE


_NOT_RETRYABLE = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.UNAUTHENTICATED,
})


@dataclass(frozen=True)
class Target:
    """Where the bus is: grpcio's ``host:port`` and whether to use TLS."""

    address: str
    tls: bool


def parse_target(target: str | None) -> Target:
    """Accepts ``host:port``, ``http://host:port`` (plaintext) or ``https://host:port`` (TLS);
    ``None`` means ``$EVENTBUS_SERVER``, else ``127.0.0.1:50051``."""
    value = target or os.environ.get(SERVER_ENV) or DEFAULT_TARGET
    if value.startswith("https://"):
        return Target(value.removeprefix("https://").rstrip("/"), tls=True)
    return Target(value.removeprefix("http://").rstrip("/"), tls=False)


def secure_credentials() -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials()


def grpc_deadline(timeout: float | None) -> float | None:
    """The gRPC deadline of a query: a little past the query's own timeout, so the bus's
    DEADLINE_EXCEEDED (which names the topic and carries the ``query-timeout`` reason) arrives
    before the transport gives up on its own."""
    return None if timeout is None else timeout + 2.0


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays, as the Rust SDK's ``sdk::Backoff`` with its defaults.

    Attempt ``n`` (0-based, counted from the last success) waits
    ``min(max, initial * multiplier ** n)`` seconds, shortened by a random part of up to
    ``jitter`` of itself (``jitter=1.0`` is "full jitter": anywhere from 0 to the full delay),
    so clients cut off together (a bus restart) do not all come back in the same instant.
    ``max_attempts`` failed attempts in a row give up; ``None`` (the default) never does.
    """

    #: Seconds before the first attempt.
    initial: float = 0.05
    #: The largest delay, in seconds.
    max: float = 5.0
    #: Growth per attempt.
    multiplier: float = 2.0
    #: Fraction (0.0 to 1.0) of each delay that is randomised away.
    jitter: float = 0.3
    #: Failed attempts in a row before giving up; ``None`` retries for ever.
    max_attempts: int | None = None

    def delay_with(self, attempt: int, unit: float) -> float:
        """The delay in seconds before attempt ``attempt``, with ``unit`` a random number in
        ``[0, 1)``: pure, so the schedule can be tested."""
        try:
            base = self.initial * max(self.multiplier, 1.0) ** attempt
        except OverflowError:
            base = self.max
        capped = min(base, self.max)
        jitter = min(max(self.jitter, 0.0), 1.0) * min(max(unit, 0.0), 1.0)
        return capped * (1.0 - jitter)

    def delay(self, attempt: int) -> float:
        """The delay in seconds before attempt ``attempt``, with fresh randomness."""
        return self.delay_with(attempt, random.random())

    def allows(self, failed: int) -> bool:
        """Whether another attempt is allowed after ``failed`` failures in a row."""
        return self.max_attempts is None or failed < self.max_attempts


@dataclass(frozen=True)
class BusReset:
    """A resumed subscription found that the bus's log started over (a memory-store bus that
    restarted, a repaired log): sequences begin again, and the subscription went on from the
    start of the new log (live for a group). Events of the old log after ``last_seen`` that
    were not delivered are lost to it."""

    #: The last sequence delivered from the old log.
    last_seen: int
    #: The new log's head sequence when it was noticed.
    head: int
    #: The new log's id (empty from a bus that does not send one).
    log_id: str
    #: The bus itself said the position named another log (``Subscribed.log_changed``, an
    #: answer to the ``log_id`` the resume sent); False when it was noticed by the sequence
    #: going backwards.
    log_changed: bool


class ResumePoint:
    """Tracks how far a subscription got, so a reopened stream goes on after the last event seen:
    no duplicates, and no gaps while the bus still holds the events. Knows the log the position
    belongs to (``log_id``), so a log that started over is noticed. Pure (no I/O), shared by the
    blocking and the asyncio subscriptions; the rules are the Rust SDK's ``Cursor``."""

    def __init__(self, start: Start, group: str | None, manual: bool = False) -> None:
        self.start = start
        self.group = group
        #: A MANUAL-ack group: the bus keeps the position and redelivers on purpose.
        self.manual = manual
        self.last_sequence = 0
        self.head_at_confirmation: int | None = None
        #: The log the position belongs to, from the last confirmation.
        self.log_id = ""

    def confirmed(self, subscribed: pb.Subscribed) -> BusReset | None:
        """Records a confirmation; returns a :class:`BusReset` when it shows the log started
        over since the last one (the position is then dropped and the start set to the new
        log's beginning, ``latest`` for a group)."""
        known = self.log_id
        if subscribed.log_id:
            self.log_id = subscribed.log_id
        if self.head_at_confirmation is None:
            self.head_at_confirmation = subscribed.head_sequence
            return None
        last = self.last_sequence
        if known and subscribed.log_id:
            restarted = known != subscribed.log_id
        else:
            restarted = last > 0 and subscribed.head_sequence < last
        if not restarted:
            return None
        self.last_sequence = 0
        self.head_at_confirmation = subscribed.head_sequence
        self.start = "latest" if self.group else "earliest"
        return BusReset(last_seen=last, head=subscribed.head_sequence,
                        log_id=subscribed.log_id, log_changed=subscribed.log_changed)

    def is_new(self, sequence: int) -> bool:
        """Records a received sequence; False for one already delivered (a replay overlap).
        A MANUAL-ack group's redeliveries are on purpose, so they all pass."""
        if self.manual:
            return True
        if sequence <= self.last_sequence:
            return False
        self.last_sequence = sequence
        return True

    def next_start(self) -> Start:
        """Where the reopened stream starts. A MANUAL-ack group resumes from the cursor the bus
        keeps, whatever is asked; other group members at ``latest`` (the bus refuses replay for
        groups, whose members share live events)."""
        if self.manual:
            return self.start
        if self.group:
            return "latest"
        if self.last_sequence:
            return self.last_sequence
        if self.start == "latest" and self.head_at_confirmation is not None:
            return self.head_at_confirmation
        return self.start
