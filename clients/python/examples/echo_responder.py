"""A responder for trying queries out: answers every query on a topic with its own data.

    python clients/python/examples/echo_responder.py greet.hello --bus 127.0.0.1:50051

With it running, ``bus.query("greet.hello", {"name": "Ada"})`` (or grpcurl's Query, see
the README section "Explore with grpcurl") gets ``{"name": "Ada"}`` back.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from types import FrameType

from eventbus_client import Bus, Event, Reply


def echo(request: Event) -> Reply:
    """The query's own data and media type."""
    return Reply(data=request.data, data_content_type=request.data_content_type)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("topic", help="the query topic to answer")
    parser.add_argument("--bus", default=os.environ.get("EVENTBUS_SERVER"),
                        help="the bus [env: EVENTBUS_SERVER]")
    parser.add_argument("--group", default="echo", help="consumer group")
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="echo: %(message)s")
    with Bus(options.bus, source="echo") as bus:
        bus.wait_ready(timeout=30.0)
        responder = bus.serve(options.topic, options.group, echo)

        def stop(signum: int, frame: FrameType | None) -> None:
            responder.stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        logging.info("answering queries on %s", options.topic)
        responder.wait()


if __name__ == "__main__":
    main()
