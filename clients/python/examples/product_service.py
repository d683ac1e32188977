"""The scenario's product service in Python: a stand-in for the Rust ``clients/product-service``
that speaks docs/scenario-protocol.md exactly, so either can answer the query service.

- Answers ``product.query`` (``{"product_ids": [3, 9]}`` → ``{"products": [...], "missing":
  [9]}``) in the consumer group ``product-service``, so replicas split the queries.
- Owns its data in SQLite and publishes ``product.created`` for every product, its seed data
  included, exactly once. It does so with an outbox: seeding writes the products and their change
  events in one transaction, and an event is marked published only after the bus stored it. A
  restart finds nothing unpublished and publishes nothing again; a crash between the publish and
  the mark publishes that batch again with the same stable ids (``product-3-created``), which
  consumers deduplicate.

Run::

    python clients/python/examples/product_service.py --bus http://127.0.0.1:50051 \\
        --db product-service.db
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sqlite3
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

from eventbus_client import Bus, Event, ReplyError, new_event

SERVICE = "product-service"
QUERY_TOPIC = "product.query"
CREATED_TOPIC = "product.created"
DEFAULT_FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "products.json"
#: Change events published per Publish call while draining the outbox.
OUTBOX_BATCH = 100

log = logging.getLogger(SERVICE)

SCHEMA = """
CREATE TABLE IF NOT EXISTS products (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL,
    price_cents INTEGER NOT NULL,
    created_at  TEXT    NOT NULL
);
-- Change events to publish: a row is written with the change it describes, in the same
-- transaction, and marked published once the bus has stored it.
CREATE TABLE IF NOT EXISTS outbox (
    event_id     TEXT PRIMARY KEY,
    topic        TEXT NOT NULL,
    data         TEXT NOT NULL,
    published_at TEXT
);
"""


def change_event_id(product_id: int) -> str:
    """The stable id of a product's creation event, so consumers can deduplicate."""
    return f"product-{product_id}-created"


class ProductStore:
    """The service's own data: products, and the outbox of their change events."""

    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def seed(self, products: Iterable[dict[str, Any]]) -> int:
        """Adds the products not yet known, each with its change event; returns how many."""
        added = 0
        with self.db:
            for product in products:
                cursor = self.db.execute(
                    "INSERT OR IGNORE INTO products (id, name, price_cents, created_at) "
                    "VALUES (:id, :name, :price_cents, :created_at)", product)
                if cursor.rowcount:
                    added += 1
                    self.db.execute(
                        "INSERT INTO outbox (event_id, topic, data) VALUES (?, ?, ?)",
                        (change_event_id(product["id"]), CREATED_TOPIC,
                         json.dumps(product, separators=(",", ":"))))
        return added

    def unpublished(self, limit: int) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT event_id, topic, data FROM outbox WHERE published_at IS NULL "
            "ORDER BY rowid LIMIT ?", (limit,)).fetchall()

    def mark_published(self, event_ids: Sequence[str]) -> None:
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        with self.db:
            self.db.executemany("UPDATE outbox SET published_at = ? WHERE event_id = ?",
                                [(now, event_id) for event_id in event_ids])

    def find(self, ids: Sequence[int]) -> tuple[list[dict[str, Any]], list[int]]:
        """The products with these ids, in the order asked (each once), and the ids not found."""
        wanted = list(dict.fromkeys(ids))
        found: dict[int, dict[str, Any]] = {}
        if wanted:
            marks = ",".join("?" * len(wanted))
            for row in self.db.execute(
                    f"SELECT id, name, price_cents, created_at FROM products WHERE id IN ({marks})",
                    wanted):
                found[row["id"]] = dict(row)
        return ([found[i] for i in wanted if i in found], [i for i in wanted if i not in found])


def publish_outbox(store: ProductStore, bus: Bus) -> int:
    """Publishes every unpublished change event, oldest first; returns how many."""
    published = 0
    while rows := store.unpublished(OUTBOX_BATCH):
        bus.publish_batch([
            new_event(row["topic"], row["data"].encode(), id=row["event_id"], type=row["topic"],
                      source=SERVICE, data_content_type="application/json")
            for row in rows
        ])
        store.mark_published([row["event_id"] for row in rows])
        published += len(rows)
    return published


def product_ids(request: Event) -> list[int]:
    """The ids of a ``product.query``; :class:`ReplyError` ``invalid`` when malformed."""
    try:
        body = request.json()
    except (ValueError, UnicodeDecodeError) as error:
        raise ReplyError("invalid", f"request data is not JSON: {error}") from None
    ids = body.get("product_ids") if isinstance(body, dict) else None
    if not isinstance(ids, list):
        raise ReplyError("invalid", "product_ids: required, a list of integers")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ReplyError("invalid", "product_ids: every id must be an integer")
    return ids


def answer(store: ProductStore, request: Event) -> dict[str, Any]:
    """The reply to one ``product.query``."""
    products, missing = store.find(product_ids(request))
    return {"products": products, "missing": missing}


def load_fixture(path: Path) -> list[dict[str, Any]]:
    products: list[dict[str, Any]] = json.loads(path.read_text())
    return products


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="The scenario's product service (Python).")
    parser.add_argument("--bus", default=os.environ.get("EVENTBUS_SERVER"),
                        help="the bus, e.g. http://127.0.0.1:50051 [env: EVENTBUS_SERVER]")
    parser.add_argument("--db", default="product-service.db", help="SQLite file of its data")
    parser.add_argument("--fixture", type=Path, default=DEFAULT_FIXTURE,
                        help="seed products (JSON list)")
    parser.add_argument("--group", default=SERVICE, help="consumer group for product.query")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    store = ProductStore(options.db)
    # Credentials as the Rust scenario services read them (README "TLS").
    with Bus(options.bus, source=SERVICE, token=os.environ.get("EVENTBUS_TOKEN") or None,
             tls_ca=os.environ.get("EVENTBUS_TLS_CA") or None,
             tls_cert=os.environ.get("EVENTBUS_TLS_CERT") or None,
             tls_key=os.environ.get("EVENTBUS_TLS_KEY") or None) as bus:
        bus.wait_ready(timeout=30.0)
        added = store.seed(load_fixture(options.fixture))
        # Change events go out before queries are answered, so a client that got an answer
        # knows every change event of the seed is on the bus.
        published = publish_outbox(store, bus)
        responder = bus.serve(QUERY_TOPIC, options.group, lambda event: answer(store, event))

        def stop(signum: int, frame: FrameType | None) -> None:
            responder.stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        log.info("serving %s as group %s (seeded %d products, published %d change events)",
                 QUERY_TOPIC, options.group, added, published)
        responder.wait()
    store.close()
    log.info("stopped after answering %d queries", responder.handled)


if __name__ == "__main__":
    main()
