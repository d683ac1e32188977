#!/usr/bin/env bash
# The eventbus.v1 API's hygiene: `buf lint` (the STANDARD rules) and `buf breaking` against the
# image of the last release (proto/released/eventbus-v1-<version>.binpb): a change that would
# break clients built against that release (a field renamed or renumbered, a type changed, an
# RPC removed) fails here. buf comes pinned from the npm registry (scripts/buf/package-lock.json).
#
# At a release, write the new image: (cd proto && ../scripts/buf/node_modules/.bin/buf build -o
# released/eventbus-v1-<version>.binpb) and point RELEASED below at it.
set -euo pipefail
cd "$(dirname "$0")/.."

RELEASED=released/eventbus-v1-0.1.0.binpb

(cd scripts/buf && npm ci --no-audit --no-fund --loglevel=error)
buf="$PWD/scripts/buf/node_modules/.bin/buf"
cd proto
"$buf" lint
"$buf" breaking --against "$RELEASED"
echo "proto: buf lint and buf breaking (against $RELEASED) pass"
