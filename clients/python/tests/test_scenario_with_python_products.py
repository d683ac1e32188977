"""The scenario end to end with the Python product service in place of the Rust one: the bus,
the Rust user-, order- and query-services (built binaries, beside the bus binary) and
examples/product_service.py as real processes. The query service's answer for every seeded user
must equal what the fixture files say, in request-reply mode (which asks product-service over
the bus) and in projection mode (which builds its read model from product.created events)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eventbus_client.testing import BusProcess, bus_binary, free_port, wait_for

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parents[1] / "fixtures"
SERVICE = HERE.parent / "examples" / "product_service.py"


def load(name: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((FIXTURES / f"{name}.json").read_text())
    return data


USERS = {u["id"]: u for u in load("users")}
PRODUCTS = {p["id"]: p for p in load("products")}
ORDERS = load("orders")


def expected(user_id: int) -> dict[str, Any]:
    """What GET /users/{id}/products must answer, from the fixtures alone."""
    totals: dict[int, dict[str, Any]] = {}
    for order in (o for o in ORDERS if o["user_id"] == user_id):
        for item in order["items"]:
            total = totals.setdefault(item["product_id"],
                                      {"quantity": 0, "orders": 0, "last_ordered_at": ""})
            total["quantity"] += item["quantity"]
            total["orders"] += 1
            total["last_ordered_at"] = max(total["last_ordered_at"], order["created_at"])
    return {
        "user": USERS[user_id],
        "products": [{"product": PRODUCTS[pid], **totals[pid]} for pid in sorted(totals)],
        "missing_product_ids": [],
    }


class Processes:
    """Real processes, stopped (SIGTERM, then kill) at the end."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> None:
        log = open(self.workdir / f"{name}.log", "wb")
        self.running.append(subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}))

    def stop(self) -> None:
        for process in self.running:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.running:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


def get(port: int, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop()


def test_the_python_product_service_stands_in_for_the_rust_one(
        tmp_path: Path, processes: Processes) -> None:
    binaries = Path(bus_binary()).parent
    for name in ("user-service", "order-service", "query-service"):
        if not (binaries / name).exists():
            pytest.fail(f"{binaries / name} is missing: build the workspace first "
                        "(scripts/test.sh runs cargo test --workspace, which builds it)")
    with BusProcess() as bus:
        env = {"EVENTBUS_SERVER": bus.url}
        for name in ("user-service", "order-service"):
            processes.start(name, [str(binaries / name), "--db", str(tmp_path / f"{name}.db")],
                            env)
        processes.start("product-service.py",
                        [sys.executable, str(SERVICE), "--db", str(tmp_path / "products.db")], env)
        ports = {}
        for mode in ("request-reply", "projection"):
            ports[mode] = free_port()
            processes.start(f"query-{mode}", [
                str(binaries / "query-service"), "--mode", mode,
                "--listen", f"127.0.0.1:{ports[mode]}", "--db", str(tmp_path / f"q-{mode}.db"),
            ], env)

        def answers_like_the_fixture(mode: str) -> bool:
            try:
                status, body = get(ports[mode], "/users/1/products")
            except OSError:
                return False
            body.pop("mode", None)
            return status == 200 and body == expected(1)

        for mode in ports:
            wait_for(lambda: answers_like_the_fixture(mode), timeout=60,
                     what=f"the {mode} query service to answer user 1 from the fixture")
        for user_id in USERS:
            for mode, port in ports.items():
                status, body = get(port, f"/users/{user_id}/products")
                assert status == 200, (mode, user_id, body)
                assert body.pop("mode") == mode
                assert body == expected(user_id), (mode, user_id)
