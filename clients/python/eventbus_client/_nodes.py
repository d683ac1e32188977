"""The blocking client's connections to the bus's nodes (:class:`Nodes`): a channel per node,
opened on first use, and the move to another node when one fails. Used by
:class:`eventbus_client.Bus` and the batching publisher (also :class:`eventbus_client.AsyncBus`'s,
which runs on blocking channels)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from . import errors
from ._common import (
    CHANNEL_OPTIONS,
    PROBE_TIMEOUT,
    Endpoints,
    FailoverHook,
    Target,
)
from ._proto import eventbus_pb2_grpc as pb_grpc


class _CallDetails(grpc.ClientCallDetails):  # type: ignore[misc]
    def __init__(self, details: grpc.ClientCallDetails,
                 metadata: Sequence[tuple[str, str]]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = [*(details.metadata or ()), *metadata]
        self.credentials = details.credentials
        self.wait_for_ready = details.wait_for_ready
        self.compression = getattr(details, "compression", None)


class _Metadata(grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
                grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
                grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
                grpc.StreamStreamClientInterceptor):  # type: ignore[misc]
    """Adds the client's metadata (the bearer token) to every call."""

    def __init__(self, metadata: Sequence[tuple[str, str]]) -> None:
        self._metadata = metadata

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_CallDetails(details, self._metadata), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(_CallDetails(details, self._metadata), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(_CallDetails(details, self._metadata), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(_CallDetails(details, self._metadata), requests)


def _channel(target: Target) -> grpc.Channel:
    security = target.security
    if target.tls:
        channel = grpc.secure_channel(target.address, security.channel_credentials(),
                                      options=CHANNEL_OPTIONS)
    else:
        channel = grpc.insecure_channel(target.address, options=CHANNEL_OPTIONS)
    metadata = security.metadata()
    if metadata:
        return grpc.intercept_channel(channel, _Metadata(metadata))
    return channel


class Nodes:
    """The blocking client's view of the bus's nodes: a channel per node (opened on first use)
    and the move to another node when one fails (see :class:`Endpoints`)."""

    def __init__(self, targets: list[Target], on_failover: FailoverHook | None) -> None:
        self.endpoints = Endpoints(targets, on_failover)
        self._lock = threading.Lock()
        self._channels: dict[int, grpc.Channel] = {}
        self._stubs: dict[int, pb_grpc.EventBusServiceStub] = {}
        self._health: dict[int, health_pb2_grpc.HealthStub] = {}
        self._closed = False

    def channel(self, index: int) -> grpc.Channel:
        with self._lock:
            channel = self._channels.get(index)
            if channel is None:
                if self._closed:
                    raise errors.Cancelled(grpc.StatusCode.CANCELLED, "the bus client is closed")
                channel = self._channels[index] = _channel(self.endpoints.targets[index])
                # Stubs are made here, under the lock, once per channel: making one registers
                # its methods on the channel, which grpcio says is not thread-safe, and a health
                # probe's stub made while close() closes the channel crashed the process.
                self._stubs[index] = pb_grpc.EventBusServiceStub(  # type: ignore[no-untyped-call]
                    channel)
                self._health[index] = health_pb2_grpc.HealthStub(channel)
            return channel

    def stub(self, index: int) -> pb_grpc.EventBusServiceStub:
        self.channel(index)
        return self._stubs[index]

    def serving(self, index: int, service: str = "", timeout: float = PROBE_TIMEOUT) -> str:
        """The node's health for ``service`` (``""``: the node as a whole), by name:
        ``SERVING``, ``NOT_SERVING``, ..., or the failure of the probe."""
        try:
            self.channel(index)
            response = self._health[index].Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as error:
            return f"{error.code().name}: {error.details()}"
        except (ValueError, errors.Cancelled) as error:  # the client is closed
            return f"CANCELLED: {error}"
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return name

    def fail_over(self, failed: int) -> int:
        """Moves off ``failed`` (when the client is still on it) to the first other node whose
        health is SERVING, else to the next in order; returns the node to use now."""
        endpoints = self.endpoints
        if len(endpoints.targets) < 2 or endpoints.moved_from(failed):
            return endpoints.index
        serving = next((index for index in endpoints.candidates(failed)
                        if self.serving(index) == "SERVING"), None)
        return endpoints.choose(failed, serving)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channels = list(self._channels.values())
        for channel in channels:
            channel.close()
