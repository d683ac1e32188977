#!/usr/bin/env bash
# Tests of the TypeScript client (clients/node) and the shared scenarios, against real bus
# processes. Needs node 20+ with npm, the npm registry, cargo (or EVENTBUS_BIN naming a built
# bus binary), and nats-server for the failover tests (scripts/nats-server.sh system, or
# EVENTBUS_TEST_NATS_SERVER naming one). Installs exactly package-lock.json (npm ci), generates
# the types from the proto, compiles with tsc, runs node's test runner.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${EVENTBUS_BIN:-}" ]]; then
    cargo build --locked --quiet
    export EVENTBUS_BIN="$PWD/target/debug/eventbus"
fi
# The failover tests run a clustered bus on a nats-server of their own (the machine's unless
# scripts/test.sh chose one).
if [[ -z "${EVENTBUS_TEST_NATS_SERVER:-}" ]]; then
    EVENTBUS_TEST_NATS_SERVER="$(./scripts/nats-server.sh system)"
    export EVENTBUS_TEST_NATS_SERVER
fi

cd clients/node
npm ci --no-audit --no-fund --loglevel=error
npm run --silent build
npm test
