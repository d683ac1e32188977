"""TLS: publish and subscribe over TLS with a CA made at test time, and no plaintext to an
``https://`` target (nor TLS to a plaintext one)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from eventbus_client import AsyncBus, Bus, BusError
from eventbus_client.testing import BusProcess, make_test_certificates


def test_publish_and_subscribe_over_tls_with_a_custom_ca(
        tmp_path: Path, start_bus: Callable[..., BusProcess]) -> None:
    certificates = make_test_certificates(tmp_path)
    process = start_bus(tls=certificates)
    with Bus(process.url, source="pytest", tls_ca=certificates.ca, token="t0k") as bus:
        with bus.subscribe("tls.*") as subscription:
            sequence = bus.publish("tls.checked", b"secret")
            event = subscription.next_event(timeout=10)
            assert event is not None
            assert (event.sequence, event.data) == (sequence, b"secret")


async def test_the_async_client_over_tls_with_pem_bytes(
        tmp_path: Path, start_bus: Callable[..., BusProcess]) -> None:
    certificates = make_test_certificates(tmp_path)
    process = start_bus(tls=certificates)
    async with AsyncBus(process.url, tls_ca=certificates.ca.read_bytes(),
                        token="t0k") as bus:
        assert await bus.publish("tls.async", b"x") >= 1


def test_no_plaintext_to_https_and_no_tls_to_a_plaintext_port(
        tmp_path: Path, start_bus: Callable[..., BusProcess]) -> None:
    certificates = make_test_certificates(tmp_path)
    tls_process = start_bus(tls=certificates)
    # Plaintext to the TLS port: the call fails, nothing is published.
    with Bus(f"http://{tls_process.address}") as bus, pytest.raises(BusError):
        bus.publish("tls.plain", b"x")
    plain_process = start_bus()
    # An https:// target never speaks plaintext, even to a plaintext bus.
    with Bus(f"https://{plain_process.address}", tls_ca=certificates.ca) as bus, \
            pytest.raises(BusError):
        bus.publish("tls.plain", b"x")
    # A file that cannot be read is named.
    with pytest.raises(ValueError, match="tls_ca"):
        Bus(tls_process.url, tls_ca=tmp_path / "missing.pem")
    # Without the CA, the bus's certificate is not trusted.
    untrusted: Any = Bus(tls_process.url)
    with untrusted as bus, pytest.raises(BusError):
        bus.publish("tls.untrusted", b"x")
