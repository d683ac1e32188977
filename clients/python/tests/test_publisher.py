"""The batching publisher against real bus processes: batching and order, refusals of one
batch, client-assigned ids, resends across a crash and restart of a file-store bus that store
every event exactly once, and resends of batches a clustered bus's node could not store."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from eventbus_client import (
    AsyncBus,
    Backoff,
    Bus,
    BusError,
    InvalidArgument,
    PublisherClosed,
    new_event,
)
from eventbus_client.publisher import uuid7
from eventbus_client.testing import BusProcess, NatsServer, wait_for

UUID7 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_uuid7_is_a_version_7_uuid_in_time_order() -> None:
    ids = [uuid7() for _ in range(50)]
    assert all(UUID7.match(i) for i in ids), ids[:3]
    assert len(set(ids)) == 50
    first, later = uuid7(), (time.sleep(0.002), uuid7())[1]
    assert first[:13] < later[:13]


def test_batches_in_order_with_ids_given_before_sending(bus: Bus) -> None:
    with bus.subscribe("pub.order") as subscription, \
            bus.publisher(linger=0.01, max_batch=7) as publisher:
        futures = [publisher.publish("pub.order", {"n": n}) for n in range(50)]
        publisher.flush(timeout=10)
        sequences = [f.result(0) for f in futures]
        events = [subscription.next_event(timeout=10) for _ in range(50)]
    assert sequences == sorted(set(sequences))
    assert [e.json()["n"] for e in events if e] == list(range(50))
    assert [e.sequence for e in events if e] == sequences
    assert all(e is not None and UUID7.match(e.id) and e.source == "pytest" for e in events)
    # A given id is kept.
    with bus.publisher() as publisher:
        future = publisher.submit(new_event("pub.order", b"x", id="mine-1"))
        again = publisher.submit(new_event("pub.order", b"x", id="mine-1"))
        assert future.result(10) == again.result(10)  # the bus's dedupe


def test_a_refused_batch_fails_only_its_events(bus: Bus) -> None:
    with bus.publisher(linger=0.05) as publisher:
        good = publisher.publish("pub.ok", b"1")
        publisher.flush(timeout=10)
        bad = publisher.publish("bad topic!", b"2")
        publisher.flush(timeout=10)
        after = publisher.publish("pub.ok", b"3")
        assert after.result(10) > good.result(10)
        with pytest.raises(InvalidArgument, match="topic"):
            bad.result(10)
    with pytest.raises(PublisherClosed):
        publisher.publish("pub.ok", b"late")


def test_resends_across_a_bus_crash_store_each_event_once(
        tmp_path: Path, start_bus: Callable[..., BusProcess]) -> None:
    process = start_bus(storage="file", data_dir=tmp_path / "data", fsync="always")
    total = 600
    with Bus(process.address, source="crash-test") as bus, \
            bus.publisher(linger=0.001, max_batch=20, max_in_flight=8,
                          backoff=Backoff(initial=0.02, max=0.2)) as publisher:
        futures: list[concurrent.futures.Future[int]] = []
        halfway = threading.Event()

        def produce() -> None:
            for n in range(total):
                futures.append(publisher.publish("pub.crash", {"n": n}))
                if n == total // 3:
                    halfway.set()
                time.sleep(0.0005)

        producer = threading.Thread(target=produce)
        producer.start()
        assert halfway.wait(20)
        process.restart(crash=True)  # SIGKILL mid-stream, same port and data directory
        producer.join(30)
        publisher.flush(timeout=30)
        sequences = [f.result(0) for f in futures]
        assert publisher.reconnects >= 1
    assert len(sequences) == total
    # Replay the whole log: every event is there exactly once, in publish order.
    with Bus(process.address) as bus, bus.subscribe("pub.crash", start="earliest") as replay:
        stored = [replay.next_event(timeout=10) for _ in range(total)]
        with pytest.raises(TimeoutError):
            replay.next_event(timeout=0.5)
    ns = [e.json()["n"] for e in stored if e is not None]
    duplicates = [n for n, count in Counter(ns).items() if count > 1]
    assert not duplicates, f"stored more than once: {duplicates}"
    assert ns == list(range(total))
    assert sorted(e.sequence for e in stored if e) == sorted(set(sequences))


def test_a_batch_its_node_could_not_store_is_resent_and_stored_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """Two bus nodes on one nats-server. NATS freezes while one batch is begun on the
    publisher's node, then dies; the batches published after that are refused unbegun. Once its
    append deadline (30 s) has passed, the node answers the begun batch UNAVAILABLE
    ``store-failed`` and ends the stream. The publisher sends that batch again with the same ids
    instead of failing it, ahead of the later ones that the end of the stream sends again; once
    NATS is back, every event is stored once, in publish order, at the sequence its future
    gave."""
    caplog.set_level(logging.DEBUG, logger="eventbus_client.publisher")
    with NatsServer() as nats:
        nodes = [BusProcess(storage="jetstream", nats_url=nats.url) for _ in range(2)]
        try:
            for node in nodes:
                node.start()
            with Bus([node.address for node in nodes], source="unstored") as bus, \
                    bus.publisher(linger=0.05, max_batch=5,
                                  backoff=Backoff(initial=0.05, max=0.5)) as publisher:
                futures: list[concurrent.futures.Future[int]] = []

                def publish(numbers: range) -> None:
                    futures.extend(publisher.publish("pub.unstored", {"n": n}, id=f"u-{n}")
                                   for n in numbers)

                publish(range(20))
                publisher.flush(timeout=20)
                # The fault window: NATS frozen while one batch reaches the node, which begins
                # it (its append waits), then killed. One begun batch only: the node's NATS
                # client sends its own resends of a begun batch's first event when NATS is
                # back, and those of several batches would land out of order.
                nats.signal(signal.SIGSTOP)
                publish(range(20, 25))
                time.sleep(1)
                nats.kill()
                wait_for(lambda: bus._nodes.serving(0) == "NOT_SERVING", 20,
                         "the node to notice it lost NATS")
                publish(range(25, 50))

                def answered() -> bool:
                    failed = any(f.done() and f.exception() for f in futures)
                    return failed or publisher.resent_batches > 0

                wait_for(answered, 90, "the node to answer the batch it began")
                nats.restart()
                publisher.flush(timeout=90)
                sequences = [f.result(0) for f in futures]
            assert any("not stored" in record.getMessage() for record in caplog.records), \
                "no batch was answered UNAVAILABLE"

            with Bus(nodes[1].address) as bus, \
                    bus.subscribe("pub.unstored", start="earliest") as replay:
                stored = [replay.next_event(timeout=20) for _ in range(50)]
                with pytest.raises(TimeoutError):
                    replay.next_event(timeout=0.5)
        finally:
            for node in nodes:
                node.kill()
    assert [e.id for e in stored if e is not None] == [f"u-{n}" for n in range(50)]
    assert [e.sequence for e in stored if e is not None] == sequences


async def test_async_publisher_returns_asyncio_futures(bus_process: BusProcess) -> None:
    async with AsyncBus(bus_process.address, source="aio") as bus:
        subscription = await bus.subscribe("pub.aio")
        async with bus.publisher(linger=0.01) as publisher:
            futures = [await publisher.publish("pub.aio", {"n": n}) for n in range(20)]
            assert all(isinstance(f, asyncio.Future) for f in futures)
            sequences = await asyncio.wait_for(asyncio.gather(*futures), 10)
        assert sequences == sorted(set(sequences))
        received = []
        async for event in subscription:
            received.append(event.json()["n"])
            if len(received) == 20:
                break
        assert received == list(range(20))
        subscription.close()


def test_closing_the_publisher_keeps_the_client_on_its_node(bus_process: BusProcess) -> None:
    # Two names for one bus: a move to the second shows in `target`. The stream ends because
    # the publisher closed it, which is no failure of the node.
    with Bus([bus_process.address, f"localhost:{bus_process.port}"]) as bus:
        before = set(threading.enumerate())
        with bus.publisher() as publisher:
            assert publisher.publish("pub.close", b"1").result(10) > 0
            readers = [t for t in set(threading.enumerate()) - before
                       if t.name == "eventbus-publisher-read"]
        assert readers
        for reader in readers:
            reader.join(10)
            assert not reader.is_alive()
        assert (bus.target, publisher.failovers) == (bus_process.address, 0)


def test_events_fail_once_the_connection_is_closed(bus_process: BusProcess) -> None:
    bus = Bus(bus_process.address)
    publisher = bus.publisher()
    assert publisher.publish("pub.closed", b"1").result(10) > 0
    bus.close()
    late = publisher.publish("pub.closed", b"2")
    with pytest.raises(BusError):
        late.result(10)
    publisher.close(timeout=10)
