"""What the blocking and the asyncio clients share: target parsing, channel options, and the rule
for which broken subscriptions are resumed and from where."""

from __future__ import annotations

import os
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


class ResumePoint:
    """Tracks how far a subscription got, so a reopened stream goes on after the last event seen:
    no duplicates, and no gaps while the bus still holds the events."""

    def __init__(self, start: Start, group: str | None) -> None:
        self.start = start
        self.group = group
        self.last_sequence = 0
        self.head_at_confirmation: int | None = None

    def confirmed(self, subscribed: pb.Subscribed) -> None:
        if self.head_at_confirmation is None:
            self.head_at_confirmation = subscribed.head_sequence

    def is_new(self, sequence: int) -> bool:
        """Records a received sequence; False for one already delivered (a replay overlap)."""
        if sequence <= self.last_sequence:
            return False
        self.last_sequence = sequence
        return True

    def next_start(self) -> Start:
        """Where the reopened stream starts. Group members always start at ``latest``: the bus
        refuses replay for groups, whose members share live events."""
        if self.group:
            return "latest"
        if self.last_sequence:
            return self.last_sequence
        if self.start == "latest" and self.head_at_confirmation is not None:
            return self.head_at_confirmation
        return self.start
