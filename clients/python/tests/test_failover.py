"""Failover between the nodes of a clustered bus, with real processes: one nats-server with
JetStream and two bus nodes on it. A client given both nodes has a subscriber, a batching
publisher with known ids, a MANUAL-ack group member and a query in flight on the first node when
it is killed (SIGKILL) mid-stream; then, from the surviving node's log:

- the subscriber delivered exactly the stream's events, no gap and no duplicate;
- every publish was acknowledged and is stored exactly once, at the sequence it was given;
- the MANUAL member got every event at least once;
- the query in flight failed with a retryable error, and a query after the fault is answered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from eventbus_client import Bus, Event, Failover, NodeUnavailable
from eventbus_client.testing import BusProcess, NatsServer, free_port, wait_for

TOTAL = 400
KILL_AFTER = 150


@pytest.fixture
def cluster() -> Iterator[tuple[BusProcess, BusProcess]]:
    with NatsServer() as nats:
        nodes = [BusProcess(storage="jetstream", nats_url=nats.url) for _ in range(2)]
        try:
            for node in nodes:
                node.start()
            yield nodes[0], nodes[1]
        finally:
            for node in nodes:
                node.kill()


def replay(address: str, pattern: str, through: int) -> list[Event]:
    """The log's events on ``pattern`` up to sequence ``through``, read from one node."""
    events: list[Event] = []
    with Bus(address, source="replay") as bus, \
            bus.subscribe(pattern, start="earliest") as subscription:
        while not events or events[-1].sequence < through:
            event = subscription.next_event(timeout=10)
            assert event is not None
            events.append(event)
    return events


def test_clients_fail_over_to_the_surviving_node(cluster: tuple[BusProcess, BusProcess]) -> None:
    first, second = cluster
    moves: list[Failover] = []
    with Bus([first.url, second.url], source="failover", on_failover=moves.append) as bus, \
            Bus(second.address, source="responder") as answering:
        bus.wait_ready()
        assert bus.target == first.address and bus.endpoints == [first.address, second.address]

        held, release = threading.Event(), threading.Event()

        def answer(query: Event) -> dict[str, object]:
            if query.json().get("hold"):
                held.set()
                release.wait(20)
            return {"echo": query.json()}

        responder = answering.serve("failover.echo", None, answer)

        subscription = bus.subscribe("load.>", start="earliest")
        member = bus.subscribe_manual("load.>", "failover-workers", ack_deadline=2.0,
                                      start="earliest")
        delivered: list[int] = []
        worked: set[int] = set()
        stop = threading.Event()

        def read() -> None:
            while not stop.is_set():
                try:
                    event = subscription.next_event(timeout=0.2)
                except TimeoutError:
                    continue
                if event is None:
                    return
                delivered.append(event.sequence)

        def work() -> None:
            while not stop.is_set():
                try:
                    delivery = member.next_delivery(timeout=0.2)
                except TimeoutError:
                    continue
                if delivery is None:
                    return
                worked.add(delivery.event.sequence)
                try:
                    delivery.ack()
                except NodeUnavailable:
                    pass  # delivered by the dead node: the group delivers it again

        readers = [threading.Thread(target=read), threading.Thread(target=work)]
        for thread in readers:
            thread.start()

        # A query in flight on the first node when it dies.
        outcome: list[BaseException | Event] = []

        def ask() -> None:
            try:
                outcome.append(bus.query("failover.echo", {"hold": True}, timeout=20))
            except BaseException as error:  # noqa: BLE001 - recorded for the assertion
                outcome.append(error)

        asker = threading.Thread(target=ask)
        asker.start()
        wait_for(held.is_set, 10, "the held query to reach the responder")

        publisher = bus.publisher(linger=0.002, max_in_flight=4)
        futures = {}
        try:
            for n in range(TOTAL):
                futures[f"load-{n}"] = publisher.publish(f"load.{n % 4}", {"n": n},
                                                         id=f"load-{n}")
                if n == KILL_AFTER:
                    wait_for(lambda: futures["load-100"].done(), 10, "publishes acknowledged")
                    first.kill()  # SIGKILL, mid-stream
                time.sleep(0.002)  # a steady load, not one burst
            publisher.flush(timeout=40)
            sequences = {event_id: future.result() for event_id, future in futures.items()}
        finally:
            publisher.close(timeout=10)

        asker.join(15)
        release.set()
        assert len(outcome) == 1 and isinstance(outcome[0], NodeUnavailable), outcome
        assert outcome[0].retryable

        # Every acknowledged publish is in the log exactly once, at the sequence it was given.
        through = max(sequences.values())
        log = replay(second.address, "load.>", through)
        stored = [event.id for event in log]
        assert sorted(stored) == sorted(sequences), "each acknowledged event stored once"
        assert {event.id: event.sequence for event in log} == sequences
        log_sequences = [event.sequence for event in log]

        # The subscriber: exactly the log, in order, no gap and no duplicate.
        wait_for(lambda: len(delivered) >= len(log_sequences), 20, "the subscriber to catch up")
        assert delivered[:len(log_sequences)] == log_sequences
        assert subscription.failovers == 1 and subscription.endpoint == second.address

        # The MANUAL member: every event at least once.
        wait_for(lambda: worked >= set(log_sequences), 40, "the group to get every event")
        assert member.failovers == 1

        # A query after the fault is answered (here by the node the client moved to).
        reply = bus.query("failover.echo", {"after": 1}, timeout=5, retry=True)
        assert reply.json() == {"echo": {"after": 1}}
        assert bus.target == second.address

        stop.set()
        for thread in readers:
            thread.join(5)
        subscription.close()
        member.close()
        responder.stop()

    kinds = {move.what for move in moves}
    assert {"subscription", "publisher"} <= kinds, moves
    assert all(move.to_endpoint == second.address for move in moves), moves
    resumed = [m for m in moves if m.what == "subscription" and m.pattern == "load.>"
               and m.after_sequence is not None]
    assert resumed and all(m.after_sequence <= through for m in resumed)


def test_failover_skips_a_node_that_is_not_serving() -> None:
    """After the node in use fails, a node whose health says NOT_SERVING (it lost NATS) is
    passed over for one that serves, though it comes first in order."""
    with NatsServer() as nats, NatsServer() as doomed:
        serving = BusProcess(storage="jetstream", nats_url=nats.url).start()
        lost = BusProcess(storage="jetstream", nats_url=doomed.url).start()
        try:
            doomed.stop()  # the second node loses NATS
            with Bus(lost.address) as probe:
                wait_for(lambda: probe._nodes.serving(0) == "NOT_SERVING", 20,
                         "the node without NATS to say NOT_SERVING")
            gone = f"127.0.0.1:{free_port()}"  # nobody listens: the node in use is gone
            moves: list[Failover] = []
            with Bus([gone, lost.address, serving.address], on_failover=moves.append) as bus:
                with pytest.raises(NodeUnavailable):
                    bus.publish("skip.a", b"x")
                assert bus.target == serving.address
                assert bus.publish("skip.a", b"x") > 0
            assert [(m.from_endpoint, m.to_endpoint) for m in moves] == \
                [(gone, serving.address)]
        finally:
            lost.kill()
            serving.kill()
