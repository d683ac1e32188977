#!/usr/bin/env bash
# The one test command (README "Run every test"): everything CI checks for behaviour, runnable on
# a fresh machine. Installs what it needs by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --workspace --locked --all-targets
# The black-box suite again, with every test bus on the durable file store.
EVENTBUS_TEST_STORAGE=file cargo test --locked --tests -p eventbus
