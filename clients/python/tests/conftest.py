"""Fixtures: a real bus process per test module (or per test, for one with its own settings),
and clients connected to it. Nothing here depends on a shared server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from eventbus_client import Bus
from eventbus_client.testing import BusProcess

@pytest.fixture(scope="module")
def bus_process() -> Iterator[BusProcess]:
    with BusProcess() as process:
        yield process


@pytest.fixture
def bus(bus_process: BusProcess) -> Iterator[Bus]:
    with Bus(bus_process.address, source="pytest") as client:
        yield client


@pytest.fixture
def start_bus() -> Iterator[Callable[..., BusProcess]]:
    """Starts a bus with its own settings, stopped at the end of the test."""
    started: list[BusProcess] = []

    def start(**settings: Any) -> BusProcess:
        process = BusProcess(**settings).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()

