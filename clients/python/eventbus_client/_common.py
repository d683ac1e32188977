"""What the blocking and the asyncio clients share: target parsing, channel options and
credentials (:class:`Security`: TLS for ``https://`` targets, a bearer token), the rule for
which broken subscriptions are resumed and from where, and the choice of the next bus node when
one fails (:class:`Endpoints`)."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from . import errors
from ._proto import eventbus_pb2 as pb
from .events import Start

log = logging.getLogger("eventbus_client")

#: The environment variable naming the bus, shared with the Rust CLI.
SERVER_ENV = "EVENTBUS_SERVER"
#: The environment variable naming the bus's nodes, comma-separated, shared with the Rust SDK,
#: the CLI and the scenario services; it wins over ``EVENTBUS_SERVER``.
URL_ENV = "EVENTBUS_URL"
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


def is_group_elsewhere(error: errors.BusError) -> bool:
    """FAILED_PRECONDITION ``group-on-another-node``: on a cluster, the group moved to another
    node while this member joined it through a third; worth retrying."""
    return (error.code == grpc.StatusCode.FAILED_PRECONDITION
            and error.reason == "group-on-another-node")


def moves_on(error: errors.BusError) -> bool:
    """Whether a failure says the node is gone or going, so another node may serve: UNAVAILABLE
    (a refused or broken connection, ``shutting-down``, ``store-failed`` from a node that lost
    its log) but not ``no-responders``, which every node would answer alike. The Rust SDK's
    rule."""
    return error.code == grpc.StatusCode.UNAVAILABLE and error.reason != "no-responders"


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


#: A PEM given as a file path or as the PEM bytes themselves.
Pem = str | os.PathLike[str] | bytes


def _pem(value: Pem | None, option: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        return Path(value).read_bytes()
    except OSError as error:
        raise ValueError(f"{option}: cannot read {value}: {error}") from None


@dataclass(frozen=True)
class Security:
    """What a client sends to say who it is and whom it trusts: for ``https://`` targets a CA
    (PEM, trusted instead of the system's roots) and a client certificate with its key (PEM,
    for a bus with mutual TLS); on every call, ``authorization: Bearer <token>`` if a token is
    set. The TLS settings do not apply to plaintext (``http://``) targets."""

    tls_ca: bytes | None = None
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    token: str | None = field(default=None, repr=False)

    @staticmethod
    def of(tls_ca: Pem | None = None, tls_cert: Pem | None = None, tls_key: Pem | None = None,
           token: str | None = None) -> Security:
        """Reads the files among ``tls_ca``, ``tls_cert``, ``tls_key`` (paths, or PEM bytes as
        they are). Raises ``ValueError`` naming the option for a file that cannot be read, or
        for ``tls_cert`` without ``tls_key`` (or the other way)."""
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together (a client certificate and its "
                             "key)")
        return Security(_pem(tls_ca, "tls_ca"), _pem(tls_cert, "tls_cert"),
                        _pem(tls_key, "tls_key"), token or None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials for an ``https://`` target."""
        return grpc.ssl_channel_credentials(root_certificates=self.tls_ca,
                                            private_key=self.tls_key,
                                            certificate_chain=self.tls_cert)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """What every call carries: the bearer token, if any."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


@dataclass(frozen=True)
class Target:
    """Where the bus is: grpcio's ``host:port``, whether to use TLS (always, for an
    ``https://`` target: never plaintext), and the credentials."""

    address: str
    tls: bool
    security: Security = field(default_factory=Security, compare=False)


def parse_target(target: str | None, security: Security | None = None) -> Target:
    """Accepts ``host:port``, ``http://host:port`` (plaintext) or ``https://host:port`` (TLS);
    ``None`` means the first of :func:`parse_targets`."""
    security = security or Security()
    if not target:
        return parse_targets(None, security)[0]
    value = target.strip()
    if value.startswith("https://"):
        return Target(value.removeprefix("https://").rstrip("/"), tls=True, security=security)
    return Target(value.removeprefix("http://").rstrip("/"), tls=False, security=security)


#: What a client may be given as its bus: one endpoint, several separated by commas in one
#: string, a list of them, or ``None`` for the environment.
Targets = str | Sequence[str] | None


def parse_targets(targets: Targets, security: Security | None = None) -> list[Target]:
    """The bus's nodes: ``"http://a:50051"``, ``"http://a:50051,http://b:50051"`` or a list
    (each entry as :func:`parse_target` takes it, and may itself hold commas). ``None`` (or
    empty) means ``$EVENTBUS_URL``, else ``$EVENTBUS_SERVER``, else ``127.0.0.1:50051``."""
    if isinstance(targets, str):
        texts = [targets]
    elif targets:
        texts = list(targets)
    else:
        texts = []
    parts = [part.strip() for text in texts for part in text.split(",") if part.strip()]
    if not parts:
        env = os.environ.get(URL_ENV) or os.environ.get(SERVER_ENV) or DEFAULT_TARGET
        parts = [part.strip() for part in env.split(",") if part.strip()] or [DEFAULT_TARGET]
    return [parse_target(part, security) for part in parts]


#: The bus's own query timeout, in seconds, when a query names none.
DEFAULT_QUERY_TIMEOUT = 5.0


def grpc_deadline(timeout: float | None) -> float | None:
    """The gRPC deadline of a query: a little past the query's own timeout, so the bus's
    DEADLINE_EXCEEDED (which names the topic and carries the ``query-timeout`` reason) arrives
    before the transport gives up on its own."""
    return None if timeout is None else timeout + 2.0


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: the Rust SDK's ``sdk::Backoff`` schedule, with full jitter by default
    (as the TypeScript client; the Rust SDK takes off at most 30 %).

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
    #: Fraction (0.0 to 1.0) of each delay that is randomised away; 1.0 is full jitter.
    jitter: float = 1.0
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


def received(message: pb.SubscribeResponse) -> list[tuple[pb.Event, int]]:
    """The events of one subscription response, in delivery order, each with which delivery
    of it this is (from 1 on a MANUAL-ack subscription, 0 otherwise): one for ``event`` (what
    a bus that does not batch sends), all of them for ``event_batch``, none for the other
    kinds. Both clients hand these out one by one through :class:`ResumePoint`, so a batch is
    deduplicated and resumed after exactly as single events are."""
    kind = message.WhichOneof("message")
    if kind == "event":
        return [(message.event, message.delivery_attempt)]
    if kind == "event_batch":
        attempts = message.event_batch.delivery_attempts
        return [(event, attempts[index] if index < len(attempts) else 0)
                for index, event in enumerate(message.event_batch.events)]
    return []


@dataclass(frozen=True)
class Failover:
    """A client moved from one bus node to another; given to the ``on_failover`` hook of
    :class:`eventbus_client.Bus` and logged (logger ``eventbus_client``: a warning, or DEBUG
    within :data:`WARN_EVERY` seconds of the last warning)."""

    #: What moved: ``"subscription"``, ``"publisher"``, ``"query"`` or ``"call"`` (a unary call).
    what: str
    #: The endpoint it was on, and the one it moved to (``host:port``).
    from_endpoint: str
    to_endpoint: str
    #: The failure that moved it.
    error: errors.BusError
    #: For a subscription: the topic pattern, and the last sequence it delivered (it resumes
    #: after it; ``None`` for a MANUAL-ack member, which resumes from its group's cursor).
    pattern: str | None = None
    after_sequence: int | None = None


#: The hook a client calls on every :class:`Failover`.
FailoverHook = Callable[[Failover], None]

#: How long a health probe of a candidate node may take, in seconds.
PROBE_TIMEOUT = 0.5

#: With every node down, a client moves on after each failed retry, a few times a second. The
#: first move of an outage is logged as a warning; later ones within this many seconds are
#: logged at DEBUG, and the next warning says how many there were (``moves_since_last_warning``),
#: as the Rust SDK does. ``on_failover`` is called for every move all the same.
WARN_EVERY = 10.0


class Endpoints:
    """The bus nodes a client may use and the one it uses now: pure bookkeeping, shared by the
    blocking and the asyncio clients (which probe health each with their own channels).

    When a call fails the way a node that is gone fails (:func:`moves_on`), the client asks
    :meth:`candidates` for the other nodes in order (the one after the failed node first, the
    failed one last), probes their gRPC health (``grpc.health.v1.Health/Check``, service
    ``""``) and moves to the first that answers SERVING, or to the next in order when none does
    (:meth:`choose`). The lock is a plain ``threading.Lock``: it is held for a few assignments,
    never across I/O."""

    def __init__(self, targets: list[Target], on_failover: FailoverHook | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.targets = targets
        self.on_failover = on_failover
        self._lock = threading.Lock()
        self._index = 0
        # When a move was last logged as a warning, and the moves logged at DEBUG since: see
        # WARN_EVERY. The clock is a parameter so that tests need not wait out the period.
        self._clock = clock
        self._warned: float | None = None
        self._quiet_moves = 0

    @property
    def index(self) -> int:
        with self._lock:
            return self._index

    def address(self, index: int) -> str:
        return self.targets[index].address

    def candidates(self, failed: int) -> list[int]:
        """The nodes to try after ``failed``, in order: the next ones, then ``failed`` itself."""
        count = len(self.targets)
        return [(failed + step) % count for step in range(1, count + 1)]

    def moved_from(self, failed: int) -> bool:
        """Whether the client already left ``failed`` (another call failed over first)."""
        with self._lock:
            return self._index != failed

    def choose(self, failed: int, serving: int | None) -> int:
        """Moves away from ``failed``: to ``serving`` (the first candidate found SERVING), else
        to the next node in order; returns the node now current. When another call already
        moved the client off ``failed``, its choice stands, so the calls that were in flight on
        a node that died move the client once, not once each."""
        with self._lock:
            if self._index == failed:
                self._index = serving if serving is not None else self.candidates(failed)[0]
            return self._index

    def report(self, failover: Failover) -> None:
        """Logs a move (a warning, or DEBUG within :data:`WARN_EVERY` of the last warning) and
        hands it to the hook (whose exceptions are logged, not raised)."""
        if failover.from_endpoint == failover.to_endpoint:
            return
        now = self._clock()
        with self._lock:
            loud = self._warned is None or now - self._warned >= WARN_EVERY
            quiet_moves = self._quiet_moves
            if loud:
                self._warned, self._quiet_moves = now, 0
            else:
                self._quiet_moves += 1
        where = f" {failover.pattern}" if failover.pattern else ""
        after = (f" after sequence {failover.after_sequence}"
                 if failover.after_sequence is not None else "")
        if loud:
            quiet = f"; moves_since_last_warning={quiet_moves}" if quiet_moves else ""
            log.warning("%s%s moved from %s to %s%s (%s)%s", failover.what, where,
                        failover.from_endpoint, failover.to_endpoint, after, failover.error,
                        quiet, extra={"moves_since_last_warning": quiet_moves})
        else:
            log.debug("%s%s moved from %s to %s%s (%s)", failover.what, where,
                      failover.from_endpoint, failover.to_endpoint, after, failover.error)
        if self.on_failover is not None:
            try:
                self.on_failover(failover)
            except Exception:  # a hook's bug must not stop the client
                log.exception("on_failover hook failed")
