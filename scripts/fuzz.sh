#!/usr/bin/env bash
# Fuzzes the file store's segment reader (fuzz/fuzz_targets/segment_reader.rs) with cargo-fuzz
# (libFuzzer) for a bounded time: `scripts/fuzz.sh [seconds]` (default 30). cargo-fuzz needs a
# nightly toolchain; without one this says so and exits 0, since the reader's property tests
# (src/store/codec.rs, src/store/file/tests.rs) still run in the normal test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "fuzz: skipped, no nightly toolchain here (cargo-fuzz needs one)"
    exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install --locked --quiet cargo-fuzz
fi
cd fuzz
cargo +nightly fuzz run segment_reader -- -max_total_time="$seconds"
echo "fuzz: segment_reader ran ${seconds}s without a failure"
