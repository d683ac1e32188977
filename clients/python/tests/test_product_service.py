"""The Python product service (examples/product_service.py) as a real process on a real bus:
it answers ``product.query`` from the fixture, publishes each ``product.created`` exactly once,
and a restart on the same database publishes nothing again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from eventbus_client import Bus, NoResponders, RemoteError
from eventbus_client.testing import BusProcess, wait_for

HERE = Path(__file__).resolve().parent
SERVICE = HERE.parent / "examples" / "product_service.py"
FIXTURE = HERE.parents[1] / "fixtures" / "products.json"
PRODUCTS = {p["id"]: p for p in json.loads(FIXTURE.read_text())}


class ProductService:
    def __init__(self, bus: BusProcess, db: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(SERVICE), "--db", str(db)],
            env={**os.environ, "EVENTBUS_SERVER": bus.url},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        output, _ = self.process.communicate(timeout=15)
        return output


@pytest.fixture
def client(bus_process: BusProcess) -> Iterator[Bus]:
    with Bus(bus_process.address, source="query-service") as bus:
        yield bus


def ask(bus: Bus, ids: list[int]) -> dict[str, object]:
    reply = bus.query("product.query", {"product_ids": ids}, timeout=5)
    assert reply.source == "product-service"
    assert reply.type == "product.query.result"
    result: dict[str, object] = reply.json()
    return result


def answering(bus: Bus) -> bool:
    """True once the service answers queries (it publishes its seed before it answers)."""
    try:
        ask(bus, [1])
        return True
    except NoResponders:
        return False


def created_events(bus: Bus) -> list[str]:
    """The ids of every ``product.created`` the bus holds."""
    marker = bus.publish("test.marker", b"")
    ids = []
    with bus.subscribe(">", start="earliest") as everything:
        for event in everything:
            if event.sequence == marker:
                return ids
            if event.topic == "product.created":
                ids.append(event.id)
    raise AssertionError("subscription ended before the marker")


def test_product_service_answers_and_publishes_its_seed_once(
        bus_process: BusProcess, client: Bus, tmp_path: Path) -> None:
    db = tmp_path / "products.db"
    service = ProductService(bus_process, db)
    try:
        wait_for(lambda: answering(client), timeout=30, what="product-service to answer")
        result = ask(client, [3, 9999, 1, 3])
        assert result == {"products": [PRODUCTS[3], PRODUCTS[1]], "missing": [9999]}
        assert ask(client, []) == {"products": [], "missing": []}
        everything = ask(client, sorted(PRODUCTS))
        assert everything["products"] == [PRODUCTS[i] for i in sorted(PRODUCTS)]

        for bad in ({"product_ids": "3"}, b"{not json", {"product_ids": [1, "2"]}):
            with pytest.raises(RemoteError) as caught:
                client.query("product.query", bad, timeout=5)
            assert caught.value.message == "invalid"
            assert caught.value.reply.attributes == {"error": "invalid"}
            assert caught.value.reply.json()["error"]["code"] == "invalid"
    finally:
        service.stop()

    ids = created_events(client)
    assert ids == [f"product-{i}-created" for i in sorted(PRODUCTS)]

    restarted = ProductService(bus_process, db)
    try:
        wait_for(lambda: answering(client), timeout=30, what="restarted product-service")
        assert ask(client, [200])["products"] == [PRODUCTS[200]]
    finally:
        output = restarted.stop()
    assert "published 0 change events" in output
    assert created_events(client) == ids


def test_product_created_events_follow_the_protocol(
        bus_process: BusProcess, client: Bus, tmp_path: Path) -> None:
    # From earliest: the bus deduplicates by (source, id), so if another test's service already
    # published these stable ids on this bus, a fresh service's seed is not stored again.
    with client.subscribe("product.created", start="earliest") as created:
        service = ProductService(bus_process, tmp_path / "fresh.db")
        try:
            event = created.next_event(timeout=30)
        finally:
            service.stop()
    assert event is not None
    assert (event.type, event.source, event.data_content_type) == \
        ("product.created", "product-service", "application/json")
    assert event.id == f"product-{event.json()['id']}-created"
    assert event.json() == PRODUCTS[event.json()["id"]]

