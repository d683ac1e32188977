"""The shared scenarios (``scenarios/*.json``, format in scenarios/README.md) run with the Python
client: one test per file, each against its own bus process, or for a scenario with ``cluster``
its own bus nodes over one JetStream stream on a nats-server of its own."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import subprocess
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from eventbus_client import (
    Bus,
    BusError,
    Delivery,
    Event,
    ManualSubscription,
    NoResponders,
    NodeUnavailable,
    Publisher,
    QueryTimeout,
    Responder,
    Subscription,
    new_event,
)
from eventbus_client.testing import (
    BusProcess,
    NatsServer,
    TestCertificates,
    bus_binary,
    make_test_certificates,
    wait_for,
)

SCENARIOS = Path(__file__).resolve().parents[3] / "scenarios"
FILES = sorted(SCENARIOS.glob("*.json"))

#: The Python idiom of each error reason a scenario may expect.
ERRORS: dict[str, type[BusError]] = {
    "no-responders": NoResponders,
    "query-timeout": QueryTimeout,
}
SCENARIO_KEYS = {"name", "description", "bus", "cluster", "steps"}
#: The fields of each op (besides ``op``). A field or an ``expect`` key not listed here fails
#: the scenario, so a behaviour added to scenarios/README.md cannot be skipped silently.
STEP_KEYS: dict[str, set[str]] = {
    "subscribe": {"id", "pattern", "group", "ack", "ack_deadline_ms", "max_deliveries",
                  "dead_letter_topic", "settle", "nack_delay_ms"},
    "publish": {"topic", "count", "first", "batch", "repeat", "via", "rate", "background",
                "expect"},
    "publish_wait": {"id", "within_ms"},
    "kill_node": {"node"},
    "restart_node": {"node"},
    "quiet": {"from", "for_ms"},
    "serve": {"topic", "group"},
    "query": {"topic", "data", "timeout_ms", "retry_within_ms", "expect"},
    "receive": {"from", "count", "within_ms", "expect"},
}
EXPECT_KEYS: dict[str, set[str]] = {
    "publish": {"same_sequences"},
    "query": {"reply", "reply_type", "error", "status", "within_ms", "after_ms"},
    "receive": {"n_range", "n_set", "attempts", "redelivered_after_ms", "attributes",
                "in_order", "each_at_least", "resumed"},
}
#: The fields of a ``subscribe`` step that only a MANUAL-ack member (``ack: "manual"``) has.
MANUAL_KEYS = {"ack_deadline_ms", "max_deliveries", "dead_letter_topic", "settle",
               "nack_delay_ms"}
#: What a MANUAL-ack member does with each delivery (``settle``).
SETTLES = {"ack", "nack", "nack_first", "ignore_first"}
#: How long a step asks again after errors the client calls retryable (its node went away), and
#: how long a publish through the batching publisher waits for its acknowledgements.
RETRY_WITHIN = 30.0
#: How long ``restart_node`` waits for the restarted node to answer health SERVING.
RESTART_WITHIN = 30.0
#: How long closing a batching publisher at the end of a scenario may take.
CLOSE_WITHIN = 10.0


def retrying(call: Callable[[], Any], within: float, also: tuple[type[BaseException], ...] = ()) -> Any:
    """``call()``, asked again while it raises :class:`NodeUnavailable` (or ``also``), for up to
    ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            return call()
        except (NodeUnavailable, *also):
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def check_step(step: dict[str, Any]) -> None:
    """Fails on an op, a field or an ``expect`` key this runner does not know."""
    op = step["op"]
    assert op in STEP_KEYS, f"unknown op {op}"
    unknown = set(step) - {"op"} - STEP_KEYS[op]
    assert not unknown, f"unknown {op} keys {unknown}"
    if "expect" in step:
        unknown = set(step["expect"]) - EXPECT_KEYS[op]
        assert not unknown, f"unknown {op} expect keys {unknown}"


@dataclass(frozen=True)
class Received:
    """One delivery a subscription collected."""

    event: Event
    #: Which delivery of the event this is, from 1 (MANUAL-ack members; None for others).
    attempt: int | None
    #: When it arrived, by ``time.monotonic()``.
    at: float

    @property
    def n(self) -> int:
        n: int = self.event.json()["n"]
        return n


def settle(delivery: Delivery, how: str, nack_delay: float) -> None:
    """What a MANUAL-ack member does with a delivery, as its ``settle`` says."""
    first = delivery.attempt == 1
    if how == "ack" or (how in ("nack_first", "ignore_first") and not first):
        delivery.ack()
    elif how == "nack" or how == "nack_first":
        delivery.nack(nack_delay)
    # ignore_first, attempt 1: neither, as a worker that crashed holding it.


@dataclass
class Collector:
    """A subscription and what its background reader collected. A MANUAL-ack member's
    deliveries are settled (``settle``) before they are collected, so a collected delivery is
    already acked or nacked."""

    subscription: Subscription | ManualSubscription
    settle: str = "ack"
    nack_delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    error: BusError | None = None

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            if isinstance(self.subscription, ManualSubscription):
                for delivery in self.subscription:
                    at = time.monotonic()
                    settle(delivery, self.settle, self.nack_delay)
                    self.received.append(Received(delivery.event, delivery.attempt, at))
            else:
                for event in self.subscription:
                    self.received.append(Received(event, None, time.monotonic()))
        except BusError as error:
            self.error = error

    def check(self) -> None:
        """Raises the error that ended the reader, if one did."""
        if self.error is not None:
            raise self.error


#: A publish step's work: publishes, and puts the acknowledgement of each event sent through the
#: batching publisher in the list it is given.
Work = Callable[[list[concurrent.futures.Future[int]]], None]


@dataclass
class Background:
    """A publish step that runs on a thread of its own (``background``) until ``publish_wait``."""

    work: Work
    futures: list[concurrent.futures.Future[int]] = field(default_factory=list)
    error: BaseException | None = None
    waited: bool = False

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.work(self.futures)
        except BaseException as error:  # handed to publish_wait, which fails the step
            self.error = error


def check_acknowledged(futures: list[concurrent.futures.Future[int]], within: float) -> None:
    """Every future resolves with a sequence within ``within`` seconds."""
    _, not_done = concurrent.futures.wait(futures, timeout=max(0.0, within))
    assert not not_done, (f"{len(not_done)} of {len(futures)} events unacknowledged after "
                          f"{within:.1f} s")
    failed = [f.exception() for f in futures if f.exception() is not None]
    assert not failed, f"{len(failed)} of {len(futures)} events failed, the first: {failed[0]!r}"


class Runner:
    def __init__(self, bus: Bus, nodes: list[BusProcess]) -> None:
        self.bus = bus
        self.nodes = nodes
        self.collectors: dict[str, Collector] = {}
        self.responders: list[Responder] = []
        self.publishers: list[Publisher] = []
        self.background: dict[str, Background] = {}
        #: What each node logged before a ``restart_node`` (a restart starts a new log).
        self.earlier_logs: dict[int, list[str]] = defaultdict(list)
        self._closing = threading.Event()

    def close(self) -> None:
        self._closing.set()
        for publisher in self.publishers:
            publisher.close(timeout=CLOSE_WITHIN)
        for collector in self.collectors.values():
            collector.subscription.close()
        for responder in self.responders:
            responder.stop()

    def logs(self, node: int) -> str:
        """Everything bus node ``node`` logged, across restarts."""
        return "".join([*self.earlier_logs[node], self.nodes[node].output()])

    def run(self, step: dict[str, Any]) -> None:
        check_step(step)
        getattr(self, f"op_{step['op']}")(step)

    def op_subscribe(self, step: dict[str, Any]) -> None:
        group = step.get("group")
        if "ack" not in step:
            assert not set(step) & MANUAL_KEYS, f"{set(step) & MANUAL_KEYS} need ack: manual"
            self.collectors[step["id"]] = Collector(self.bus.subscribe(step["pattern"],
                                                                       group=group))
            return
        assert step["ack"] == "manual", f"unknown ack {step['ack']!r}"
        assert group, "a MANUAL-ack member needs a group"
        how = step.get("settle", "ack")
        assert how in SETTLES, f"unknown settle {how!r}"
        # The client's own defaults for what the step leaves out.
        options: dict[str, Any] = {}
        if "ack_deadline_ms" in step:
            options["ack_deadline"] = step["ack_deadline_ms"] / 1000
        if "max_deliveries" in step:
            options["max_deliveries"] = step["max_deliveries"]
        if "dead_letter_topic" in step:
            options["dead_letter_topic"] = step["dead_letter_topic"]
        subscription = self.bus.subscribe_manual(step["pattern"], group, **options)
        self.collectors[step["id"]] = Collector(subscription, how,
                                                step.get("nack_delay_ms", 0) / 1000)

    def op_publish(self, step: dict[str, Any]) -> None:
        via = step.get("via", "call")
        if via == "call":
            work = self._publish_calls(step)
        elif via == "publisher":
            work = self._publish_stream(step)
        else:
            raise AssertionError(f"unknown via {via!r}")
        if "background" in step:
            assert step["background"] not in self.background, \
                f"background {step['background']} twice"
            self.background[step["background"]] = Background(work)
            return
        futures: list[concurrent.futures.Future[int]] = []
        work(futures)
        # The publisher's acknowledgements: it resends by itself, for as long as a step retries.
        check_acknowledged(futures, RETRY_WITHIN)

    def _events(self, step: dict[str, Any], ids: bool) -> list[Event]:
        """The step's events, ``{"n": first + i}``; with ``ids``, each with an id of its own, so
        an event sent again is recognised by the bus and stored once."""
        return [new_event(step["topic"], {"n": step["first"] + i},
                          **({"id": str(uuid.uuid4())} if ids else {}))
                for i in range(step["count"])]

    def _publish_calls(self, step: dict[str, Any]) -> Work:
        """A publish with Publish calls, each made ``repeat`` times with the same events."""
        assert "rate" not in step, "rate is for via: publisher"
        events = self._events(step, ids=True)
        calls = [events] if step.get("batch", False) else [[event] for event in events]
        same_sequences = step.get("expect", {}).get("same_sequences", False)

        def work(futures: list[concurrent.futures.Future[int]]) -> None:
            for call in calls:
                # Asked again with the same ids while the client moves: each is stored once.
                answers = [retrying(lambda: self.bus.publish_batch(call), RETRY_WITHIN)
                           for _ in range(step.get("repeat", 1))]
                if same_sequences:
                    assert all(answer == answers[0] for answer in answers), \
                        f"a repeat of a call was answered with other sequences: {answers}"

        return work

    def _publish_stream(self, step: dict[str, Any]) -> Work:
        """A publish through the client's batching publisher (its own ids; it resends by
        itself), at most ``rate`` events per second."""
        assert not {"batch", "repeat", "expect"} & set(step), \
            "batch, repeat and expect are for via: call"
        events = self._events(step, ids=False)
        rate = step.get("rate")
        publisher = self.bus.publisher()
        self.publishers.append(publisher)

        def work(futures: list[concurrent.futures.Future[int]]) -> None:
            started = time.monotonic()
            for i, event in enumerate(events):
                if rate is not None:
                    # Pacing, not waiting for a condition: event i goes no sooner than i / rate
                    # seconds in (stopped when the scenario ends first).
                    pause = started + i / rate - time.monotonic()
                    if pause > 0 and self._closing.wait(pause):
                        raise AssertionError(f"scenario ended after {i} of {len(events)} events")
                futures.append(publisher.submit(event))

        return work

    def op_publish_wait(self, step: dict[str, Any]) -> None:
        background = self.background[step["id"]]
        background.waited = True
        within = step["within_ms"] / 1000
        deadline = time.monotonic() + within
        background.thread.join(within)
        assert not background.thread.is_alive(), \
            f"background publish {step['id']} still submitting after {within} s"
        if background.error is not None:
            raise background.error
        check_acknowledged(background.futures, deadline - time.monotonic())

    def op_kill_node(self, step: dict[str, Any]) -> None:
        self.nodes[step["node"]].kill()

    def op_restart_node(self, step: dict[str, Any]) -> None:
        node = self.nodes[step["node"]]
        node.kill()
        self.earlier_logs[step["node"]].append(node.output())
        # Same port, flags and data directory; returns once health says SERVING.
        node.restart(crash=True, timeout=RESTART_WITHIN)

    def op_quiet(self, step: dict[str, Any]) -> None:
        names = step["from"]
        collectors = [self.collectors[name] for name in names]
        before = [len(c.received) for c in collectors]
        # The one wait by definition: an absence shows only by waiting it out. Polled, so an
        # arrival fails the step at once.
        deadline = time.monotonic() + step["for_ms"] / 1000
        while True:
            for name, collector, count in zip(names, collectors, before):
                collector.check()
                new = collector.received[count:]
                assert not new, (f"{name} collected {len(new)} more while it should be quiet: "
                                 f"{[(r.n, r.event.sequence, r.attempt) for r in new]}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(0.02, remaining))

    def op_serve(self, step: dict[str, Any]) -> None:
        self.responders.append(
            self.bus.serve(step["topic"], step["group"], lambda q: {"echo": q.json()}))

    def op_query(self, step: dict[str, Any]) -> None:
        expect = step["expect"]
        started = time.monotonic()
        reply: Event | None = None
        error: BusError | None = None

        def ask() -> Event:
            return self.bus.query(step["topic"], step["data"], timeout=step["timeout_ms"] / 1000)

        try:
            if "retry_within_ms" in step:
                reply = retrying(ask, step["retry_within_ms"] / 1000, also=(NoResponders,))
            else:
                reply = ask()
        except BusError as caught:
            error = caught
        elapsed_ms = (time.monotonic() - started) * 1000
        if "error" in expect:
            assert error is not None, f"expected {expect['error']}, got reply {reply}"
            assert isinstance(error, ERRORS[expect["error"]]), repr(error)
            assert error.reason == expect["error"]
            assert error.code.name == expect["status"]
        else:
            assert error is None, f"query failed: {error!r}"
            assert reply is not None
            if "reply" in expect:
                assert reply.json() == expect["reply"]
            if "reply_type" in expect:
                assert reply.type == expect["reply_type"]
        if "within_ms" in expect:
            assert elapsed_ms < expect["within_ms"], f"took {elapsed_ms:.0f} ms"
        if "after_ms" in expect:
            assert elapsed_ms >= expect["after_ms"], f"took only {elapsed_ms:.0f} ms"

    def op_receive(self, step: dict[str, Any]) -> None:
        expect = step["expect"]
        collectors = [self.collectors[name] for name in step["from"]]

        def collected() -> bool:
            for collector in collectors:
                collector.check()
            return sum(len(c.received) for c in collectors) >= step["count"]

        wait_for(collected, timeout=step["within_ms"] / 1000,
                 what=f"{step['count']} events on {step['from']}")
        batches = [list(c.received[:step["count"]]) for c in collectors]
        everything = [r for batch in batches for r in batch]
        if "n_range" in expect:
            low, high = expect["n_range"]
            assert sorted(r.n for r in everything) == list(range(low, high))
        if "n_set" in expect:
            low, high = expect["n_set"]
            assert sorted({r.n for r in everything}) == list(range(low, high))
        by_n: dict[int, list[Received]] = defaultdict(list)
        for received in sorted(everything, key=lambda r: r.at):
            by_n[received.n].append(received)
        if "attempts" in expect:
            assert all(r.attempt is not None for r in everything), \
                "attempts are for MANUAL-ack subscriptions"
            attempts = {n: sorted(r.attempt or 0 for r in deliveries)
                        for n, deliveries in by_n.items()}
            wrong = {n: got for n, got in attempts.items() if got != expect["attempts"]}
            assert not wrong, f"attempts per n other than {expect['attempts']}: {wrong}"
        if "redelivered_after_ms" in expect:
            gaps = {n: [round((later.at - earlier.at) * 1000)
                        for earlier, later in zip(deliveries, deliveries[1:])]
                    for n, deliveries in by_n.items()}
            short = {n: ms for n, ms in gaps.items()
                     if any(gap < expect["redelivered_after_ms"] for gap in ms)}
            assert not short, (f"redelivered sooner than {expect['redelivered_after_ms']} ms "
                               f"(gaps in ms per n): {short}")
        if "attributes" in expect:
            missing = [(r.n, dict(r.event.attributes)) for r in everything
                       if any(r.event.attributes.get(key) != value
                              for key, value in expect["attributes"].items())]
            assert not missing, f"events without {expect['attributes']}: {missing}"
        if expect.get("in_order"):
            for batch in batches:
                ns = [r.n for r in batch]
                sequences = [r.event.sequence for r in batch]
                assert ns == sorted(set(ns)) and sequences == sorted(set(sequences))
        if "each_at_least" in expect:
            assert all(len(b) >= expect["each_at_least"] for b in batches), \
                [len(b) for b in batches]
        if expect.get("resumed"):
            assert all(c.subscription.resumes >= 1 for c in collectors), "no stream dropped"


def test_every_step_kind_is_known() -> None:
    """Every op of every scenario has a runner step, and its fields are known (without starting
    a bus, so a new op or key fails here first)."""
    ops = {name.removeprefix("op_") for name in dir(Runner) if name.startswith("op_")}
    assert ops == set(STEP_KEYS)
    for path in FILES:
        for step in json.loads(path.read_text())["steps"]:
            try:
                check_step(step)
            except AssertionError as error:
                raise AssertionError(f"{path.name}: {error}") from None


#: The bearer token of a secure run's one principal.
TOKEN = "scenario-runner-token"


@dataclass
class Secure:
    """A secure run: TLS with a CA made for the test, and a config file with one principal
    (by :data:`TOKEN`, hashed by ``eventbus hash-token``) that may do what scenarios do."""

    certificates: TestCertificates
    config: Path

    @classmethod
    def make(cls, directory: Path) -> Secure:
        token_hash = subprocess.run([str(bus_binary()), "hash-token", TOKEN], check=True,
                                    capture_output=True, text=True).stdout.strip()
        config = directory / "eventbus.toml"
        config.write_text(
            "[[principals]]\nname = \"scenario-runner\"\n"
            f"token_hash = \"{token_hash}\"\n"
            "publish = [\">\"]\nsubscribe = [\">\"]\nsources = [\"*\"]\n")
        return cls(make_test_certificates(directory), config)


@contextlib.contextmanager
def buses(scenario: dict[str, Any], secure: Secure | None,
          directory: Path) -> Iterator[list[BusProcess]]:
    """The scenario's bus, or its ``cluster.nodes`` bus nodes on one JetStream stream; with
    ``secure``, over TLS with the principal's config. A bus on the file store
    (``"storage": "file"``) keeps its log in a directory of its own under ``directory``, kept
    across restarts."""
    settings = dict(scenario.get("bus", {}))
    tls = None
    if secure is not None:
        tls = secure.certificates
        settings["config"] = secure.config
    if settings.get("storage") == "file":
        data_dir = directory / "node-0-data"
        data_dir.mkdir()
        settings["data_dir"] = data_dir
    cluster = scenario.get("cluster")
    if cluster is None:
        with BusProcess(tls=tls, **settings) as process:
            yield [process]
        return
    assert set(cluster) <= {"nodes"}, f"unknown cluster keys {set(cluster) - {'nodes'}}"
    assert "storage" not in settings, "a cluster's nodes keep their log in JetStream"
    with NatsServer() as nats:
        nodes = [BusProcess(tls=tls, storage="jetstream", nats_url=nats.url, **settings)
                 for _ in range(cluster["nodes"])]
        try:
            for node in nodes:
                node.start()
            yield nodes
        finally:
            for node in nodes:
                node.kill()


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "tls-token"])
@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_scenario(path: Path, secure: bool, tmp_path: Path) -> None:
    """Every scenario, against a plain bus and against one with TLS and a bearer token."""
    scenario = json.loads(path.read_text())
    assert set(scenario) <= SCENARIO_KEYS, f"unknown keys {set(scenario) - SCENARIO_KEYS}"
    security = Secure.make(tmp_path) if secure else None
    credentials: dict[str, Any] = (
        {"tls_ca": security.certificates.ca, "token": TOKEN} if security else {})
    with buses(scenario, security, tmp_path) as nodes, \
            Bus([node.url for node in nodes], source=f"scenario-{scenario['name']}",
                **credentials) as bus:
        runner = Runner(bus, nodes)
        try:
            for step in scenario["steps"]:
                runner.run(step)
            unwaited = [name for name, b in runner.background.items() if not b.waited]
            assert not unwaited, f"background publishes never waited for: {unwaited}"
        except BaseException:
            # The buses' logs (warnings and errors) beside the failure.
            for index in range(len(nodes)):
                print(f"--- bus node {index} ---\n{runner.logs(index)}")
            raise
        finally:
            runner.close()
