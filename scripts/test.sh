#!/usr/bin/env bash
# The one test command (README "Run every test"): everything CI checks for behaviour, runnable on
# a fresh machine. Installs what it needs by itself (a Python virtualenv with pinned versions,
# npm packages from the lockfile).
set -euo pipefail
cd "$(dirname "$0")/.."

# The Rust workspace: unit, property and black-box tests on the memory store...
cargo test --workspace --locked --all-targets
# ...and the black-box suite again with every test bus on the durable file store.
EVENTBUS_TEST_STORAGE=file cargo test --locked --tests -p eventbus

# The clients in other languages, the shared scenarios and the grpcurl docs, against the bus
# binary built above.
export EVENTBUS_BIN="$PWD/target/debug/eventbus"
./scripts/test-python.sh
./scripts/test-node.sh
