"""eventbus-client: Python services on the eventbus, through stubs generated from
``proto/eventbus/v1/eventbus.proto``.

Layout:

- :mod:`eventbus_client.bus`: the blocking client, :class:`Bus` (publish, subscribe, query,
  serve);
- :mod:`eventbus_client.aio`: the same on asyncio (grpc.aio), :class:`AsyncBus`;
- :mod:`eventbus_client.publisher`: the batching :class:`Publisher` over ``PublishStream``
  (client-assigned ids, resends after a broken stream) and :class:`AsyncPublisher`;
- :mod:`eventbus_client.events`: :class:`Event` and the one boundary to and from wire messages;
- :mod:`eventbus_client.errors`: exceptions that keep the gRPC status and the bus's reason;
- :mod:`eventbus_client._common`: what both clients share: :class:`Backoff`, the resume rule,
  the endpoints of a clustered bus and the choice of the next (:class:`Failover`);
- :mod:`eventbus_client._nodes`: the blocking client's channel per node and its failover;
- :mod:`eventbus_client.testing`: :class:`BusProcess`, a real bus process for tests, and
  :class:`NatsServer` for clustered ones;
- ``eventbus_client._proto``: the generated stubs (made at build time by ``setup.py``, or in a
  checkout by ``python clients/python/generate.py``).

Example::

    from eventbus_client import Bus

    with Bus("127.0.0.1:50051", source="greeter") as bus:
        bus.publish("greetings.sent", {"to": "Ada"})
        reply = bus.query("user.query", {"user_id": 7}, timeout=2.0)
        print(reply.json())
"""

try:
    from ._proto import eventbus_pb2 as _generated  # noqa: F401
except ImportError as error:  # pragma: no cover - a message for a fresh checkout
    raise ImportError(
        "eventbus_client's gRPC stubs are not generated yet: run "
        "`python clients/python/generate.py` (needs grpcio-tools)"
    ) from error

from . import errors
from .aio import (
    AsyncBus,
    AsyncDelivery,
    AsyncManualSubscription,
    AsyncResponder,
    AsyncSubscription,
)
from ._common import Backoff, BusReset, Failover
from .bus import Bus, Delivery, ManualSubscription, Responder, Subscription
from .errors import (
    BusError,
    Cancelled,
    DeadlineExceeded,
    EventTooLarge,
    InvalidArgument,
    NodeUnavailable,
    NoResponders,
    NotFound,
    QueryTimeout,
    RemoteError,
    ReplayOverrun,
    ResourceExhausted,
    ShuttingDown,
    SlowConsumer,
    Unavailable,
    UnknownGroup,
)
from .publisher import AsyncPublisher, Publisher, PublisherClosed, StreamBroken
from .events import AckResult, Data, Event, ManualAck, Reply, ReplyError, Start, new_event

__all__ = [
    "AckResult",
    "AsyncBus",
    "AsyncDelivery",
    "AsyncManualSubscription",
    "AsyncPublisher",
    "AsyncResponder",
    "AsyncSubscription",
    "Backoff",
    "Bus",
    "BusError",
    "BusReset",
    "Cancelled",
    "Data",
    "DeadlineExceeded",
    "Delivery",
    "Event",
    "EventTooLarge",
    "Failover",
    "InvalidArgument",
    "ManualAck",
    "ManualSubscription",
    "NodeUnavailable",
    "NoResponders",
    "NotFound",
    "Publisher",
    "PublisherClosed",
    "QueryTimeout",
    "RemoteError",
    "ReplayOverrun",
    "Reply",
    "ReplyError",
    "ResourceExhausted",
    "Responder",
    "ShuttingDown",
    "SlowConsumer",
    "Start",
    "StreamBroken",
    "Subscription",
    "Unavailable",
    "UnknownGroup",
    "errors",
    "new_event",
]
