#!/usr/bin/env bash
# Fuzzes every cargo-fuzz target in fuzz/fuzz_targets/ (libFuzzer) for a bounded time:
# `scripts/fuzz.sh [seconds]` (default 30) spends about that many seconds in all, shared between
# the targets (at least 5 s each), after building them all once. The targets:
#   segment_reader   the file store's segment reader and recovery
#   topic_pattern    the topic and pattern parser
#   sublist_matcher  the subject tree against a naive reference matcher
#   config_file      the TOML config file parser
#   event_from_pb    the publish path's checks on arbitrary protobuf bytes
# cargo-fuzz needs a nightly toolchain; without one this says so and exits 0, since each
# target's rule also runs as a property test in the normal suite (tests/bad_input.rs, and the
# reader's in src/store/codec.rs and src/store/file/tests.rs).
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
targets=$(cargo +nightly fuzz list)
count=$(echo "$targets" | wc -l)
each=$((seconds / count))
if [ "$each" -lt 5 ]; then
    each=5
fi
# One build for all targets, so the time below is fuzzing, not compiling.
cargo +nightly fuzz build
for target in $targets; do
    cargo +nightly fuzz run "$target" -- -max_total_time="$each"
    echo "fuzz: $target ran ${each}s without a failure"
done
