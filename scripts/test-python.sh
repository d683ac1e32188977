#!/usr/bin/env bash
# Tests of the Python client (clients/python), the product service, the shared scenarios and the
# grpcurl docs, against real bus processes; and of the deployment files (deploy/tests: the compose
# file and the Dockerfile, validated, not run). Needs only python3 (3.10+) with venv and pip, PyPI,
# cargo (or EVENTBUS_BIN naming a built bus binary), and nats-server for the failover tests
# (scripts/nats-server.sh system, or EVENTBUS_TEST_NATS_SERVER naming one).
#
# Creates clients/python/.venv if missing with the pinned versions of requirements-dev.txt,
# generates the stubs from the proto, type-checks with mypy, runs pytest (which also builds the
# sdist and wheel and installs the wheel into a throwaway virtualenv).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if [[ -z "${EVENTBUS_BIN:-}" ]]; then
    cargo build --locked --quiet
    export EVENTBUS_BIN="$root/target/debug/eventbus"
fi
# The failover tests run a clustered bus on a nats-server of their own (the machine's unless
# scripts/test.sh chose one).
if [[ -z "${EVENTBUS_TEST_NATS_SERVER:-}" ]]; then
    EVENTBUS_TEST_NATS_SERVER="$(./scripts/nats-server.sh system)"
    export EVENTBUS_TEST_NATS_SERVER
fi

venv=clients/python/.venv
stamp="$venv/.requirements-dev.txt"
if [[ ! -x "$venv/bin/python" ]]; then
    rm -rf "$venv"
    # Some distributions ship python3 without its venv module; virtualenv from PyPI does the same.
    if ! python3 -m venv "$venv" 2>/dev/null; then
        rm -rf "$venv"
        python3 -m pip install --quiet --user virtualenv==21.15.11
        python3 -m virtualenv --quiet "$venv"
    fi
fi
# Reinstall only when the pins changed since the last install.
if ! cmp -s clients/python/requirements-dev.txt "$stamp"; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        -r clients/python/requirements-dev.txt
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --no-build-isolation --no-deps -e clients/python
    rm -rf "$venv/wheelhouse"
    cp clients/python/requirements-dev.txt "$stamp"
fi
# The runtime dependencies as wheels, at the pinned versions: tests/test_package.py installs the
# built wheel into a fresh virtualenv from these and nothing else (--no-index).
if [[ ! -d "$venv/wheelhouse" ]]; then
    rm -rf "$venv/wheelhouse.tmp"
    "$venv/bin/python" -m pip download --quiet --disable-pip-version-check --only-binary :all: \
        -d "$venv/wheelhouse.tmp" -c clients/python/requirements-dev.txt \
        grpcio grpcio-health-checking protobuf
    mv "$venv/wheelhouse.tmp" "$venv/wheelhouse"
fi

"$venv/bin/python" clients/python/generate.py 2>/dev/null
(cd clients/python && .venv/bin/python -m mypy --no-error-summary)
"$venv/bin/python" -m pytest -c clients/python/pyproject.toml --rootdir clients/python \
    clients/python/tests tests/grpcurl deploy/tests "$@"
