#!/usr/bin/env bash
# Tests of the TypeScript client (clients/node) and the shared scenarios, against real bus
# processes. Needs node 20+ with npm, the npm registry, and cargo (or EVENTBUS_BIN naming a built
# bus binary). Installs exactly package-lock.json (npm ci), generates the types from the proto,
# compiles with tsc, runs node's test runner.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${EVENTBUS_BIN:-}" ]]; then
    cargo build --locked --quiet
    export EVENTBUS_BIN="$PWD/target/debug/eventbus"
fi

cd clients/node
npm ci --no-audit --no-fund --loglevel=error
npm run --silent build
npm test
