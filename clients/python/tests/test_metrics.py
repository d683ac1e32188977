"""The bus's admin listener scraped as Prometheus scrapes it: ``/metrics`` read with the
``prometheus_client`` package's own parser, before and after traffic, against a real bus process."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from eventbus_client import Bus, NoResponders
from eventbus_client.testing import BusProcess, free_port, wait_for


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``: (name, sorted labels) → value."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_as_traffic_flows() -> None:
    admin = f"127.0.0.1:{free_port()}"
    with BusProcess(admin_listen=admin) as process, Bus(process.address, source="pytest") as bus:
        before = scrape(admin)
        assert value(before, "eventbus_build_info", version="0.1.0") == 1.0
        assert value(before, "eventbus_events_published_total", family="orders") == 0.0

        with bus.serve("prices.query", None, lambda query: b"42"):
            with bus.subscribe("orders.>") as subscription:
                for i in range(5):
                    bus.publish("orders.created", f"order-{i}".encode())
                for _ in range(5):
                    assert subscription.next_event(timeout=10) is not None
                assert bus.query("prices.query", b"?", timeout=10).data == b"42"
                try:
                    bus.query("nobody.listens", b"?", timeout=2)
                except NoResponders:
                    pass
                else:
                    raise AssertionError("a query nobody serves must fail")

                after = wait_for(
                    lambda: (lambda s: s if value(s, "eventbus_events_delivered_total",
                                                  family="orders") >= 5 else None)(
                        scrape(admin)),
                    what="deliveries counted")
                assert value(after, "eventbus_subscriptions_active") >= 2  # ours, the responder's
        assert value(after, "eventbus_events_published_total", family="orders") == 5
        assert value(after, "eventbus_queries_total", outcome="answered") == 1
        assert value(after, "eventbus_queries_total", outcome="no_responders") == 1
        assert value(after, "eventbus_query_duration_seconds_count") == 1
        assert value(after, "eventbus_publish_duration_seconds_count") >= 6
        assert value(after, "eventbus_store_events") >= 6
        assert value(after, "eventbus_connections_active") >= 1
        # The query's reply went to an inbox: counted under one family, not one per inbox.
        assert value(after, "eventbus_events_published_total", family="_bus.inbox") == 1

        health = urllib.request.urlopen(f"http://{admin}/readyz", timeout=10)
        assert health.status == 200 and health.read() == b"ready\n"
