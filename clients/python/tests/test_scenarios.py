"""The shared scenarios (``scenarios/*.json``, format in scenarios/README.md) run with the Python
client: one test per file, each against its own bus process, or for a scenario with ``cluster``
its own bus nodes over one JetStream stream on a nats-server of its own."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from eventbus_client import (
    Bus,
    BusError,
    Event,
    NoResponders,
    NodeUnavailable,
    QueryTimeout,
    Responder,
    Subscription,
    new_event,
)
from eventbus_client.testing import BusProcess, NatsServer, wait_for

SCENARIOS = Path(__file__).resolve().parents[3] / "scenarios"
FILES = sorted(SCENARIOS.glob("*.json"))

#: The Python idiom of each error reason a scenario may expect.
ERRORS: dict[str, type[BusError]] = {
    "no-responders": NoResponders,
    "query-timeout": QueryTimeout,
}
QUERY_EXPECT = {"reply", "reply_type", "error", "status", "within_ms", "after_ms"}
SCENARIO_KEYS = {"name", "description", "bus", "cluster", "steps"}
#: How long a step asks again after errors the client calls retryable (its node went away).
RETRY_WITHIN = 30.0


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
RECEIVE_EXPECT = {"n_range", "in_order", "each_at_least", "resumed"}


@dataclass
class Collector:
    """A subscription and the events its background reader collected."""

    subscription: Subscription
    events: list[Event] = field(default_factory=list)
    error: BusError | None = None

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for event in self.subscription:
                self.events.append(event)
        except BusError as error:
            self.error = error


class Runner:
    def __init__(self, bus: Bus, nodes: list[BusProcess]) -> None:
        self.bus = bus
        self.nodes = nodes
        self.collectors: dict[str, Collector] = {}
        self.responders: list[Responder] = []

    def close(self) -> None:
        for collector in self.collectors.values():
            collector.subscription.close()
        for responder in self.responders:
            responder.stop()

    def run(self, step: dict[str, Any]) -> None:
        getattr(self, f"op_{step['op']}")(step)

    def op_subscribe(self, step: dict[str, Any]) -> None:
        subscription = self.bus.subscribe(step["pattern"], group=step.get("group"))
        self.collectors[step["id"]] = Collector(subscription)

    def op_publish(self, step: dict[str, Any]) -> None:
        events = [new_event(step["topic"], {"n": step["first"] + i}) for i in range(step["count"])]
        batches = [events] if step["batch"] else [[event] for event in events]
        for batch in batches:
            # Asked again with the same ids while the client moves: each is stored once.
            retrying(lambda: self.bus.publish_batch(batch), RETRY_WITHIN)

    def op_kill_node(self, step: dict[str, Any]) -> None:
        self.nodes[step["node"]].kill()

    def op_serve(self, step: dict[str, Any]) -> None:
        self.responders.append(
            self.bus.serve(step["topic"], step["group"], lambda q: {"echo": q.json()}))

    def op_query(self, step: dict[str, Any]) -> None:
        expect = step["expect"]
        assert set(expect) <= QUERY_EXPECT, f"unknown expect keys {set(expect) - QUERY_EXPECT}"
        started = time.monotonic()
        reply: Event | None = None
        error: BusError | None = None
        unknown = set(step) - {"op", "topic", "data", "timeout_ms", "retry_within_ms", "expect"}
        assert not unknown, f"unknown query keys {unknown}"

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
        assert set(expect) <= RECEIVE_EXPECT, f"unknown expect keys {set(expect) - RECEIVE_EXPECT}"
        collectors = [self.collectors[name] for name in step["from"]]

        def collected() -> bool:
            for collector in collectors:
                if collector.error is not None:
                    raise collector.error
            return sum(len(c.events) for c in collectors) >= step["count"]

        wait_for(collected, timeout=step["within_ms"] / 1000,
                 what=f"{step['count']} events on {step['from']}")
        batches = [list(c.events[:step["count"]]) for c in collectors]
        if "n_range" in expect:
            low, high = expect["n_range"]
            assert sorted(e.json()["n"] for b in batches for e in b) == list(range(low, high))
        if expect.get("in_order"):
            for batch in batches:
                ns = [e.json()["n"] for e in batch]
                sequences = [e.sequence for e in batch]
                assert ns == sorted(set(ns)) and sequences == sorted(set(sequences))
        if "each_at_least" in expect:
            assert all(len(b) >= expect["each_at_least"] for b in batches), \
                [len(b) for b in batches]
        if expect.get("resumed"):
            assert all(c.subscription.resumes >= 1 for c in collectors), "no stream dropped"


def test_every_step_kind_is_known() -> None:
    known = {name.removeprefix("op_") for name in dir(Runner) if name.startswith("op_")}
    for path in FILES:
        for step in json.loads(path.read_text())["steps"]:
            assert step["op"] in known, f"{path.name}: unknown op {step['op']}"


@contextlib.contextmanager
def buses(scenario: dict[str, Any]) -> Iterator[list[BusProcess]]:
    """The scenario's bus, or its ``cluster.nodes`` bus nodes on one JetStream stream."""
    settings = scenario.get("bus", {})
    cluster = scenario.get("cluster")
    if cluster is None:
        with BusProcess(**settings) as process:
            yield [process]
        return
    assert set(cluster) <= {"nodes"}, f"unknown cluster keys {set(cluster) - {'nodes'}}"
    with NatsServer() as nats:
        nodes = [BusProcess(storage="jetstream", nats_url=nats.url, **settings)
                 for _ in range(cluster["nodes"])]
        try:
            for node in nodes:
                node.start()
            yield nodes
        finally:
            for node in nodes:
                node.kill()


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_scenario(path: Path) -> None:
    scenario = json.loads(path.read_text())
    assert set(scenario) <= SCENARIO_KEYS, f"unknown keys {set(scenario) - SCENARIO_KEYS}"
    with buses(scenario) as nodes, \
            Bus([node.url for node in nodes], source=f"scenario-{scenario['name']}") as bus:
        runner = Runner(bus, nodes)
        try:
            for step in scenario["steps"]:
                runner.run(step)
        finally:
            runner.close()
