#!/usr/bin/env bash
# The dashboard (dashboard/, served by the admin listener): checks that the committed build in
# dashboard/dist/ is what its sources and lockfile produce, then drives the page in headless
# Chromium against a real bus and the scenario's services. Needs node 20+ with npm, the npm
# registry, cargo (or EVENTBUS_BIN naming a built bus binary with the scenario services beside
# it), and Chromium: Debian's `chromium` package, installed here with apt-get when absent
# (`npx playwright install` cannot download browsers on machines without the internet).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${CHROMIUM:-}" ]]; then
    CHROMIUM=/usr/bin/chromium
    if [[ ! -x "$CHROMIUM" ]]; then
        echo "installing Debian's chromium for the browser tests" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq chromium >/dev/null ||
            { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
    fi
    export CHROMIUM
fi

# The bus and the scenario services (each its own process in the test).
cargo build --locked --quiet -p eventbus -p user-service -p order-service -p product-service \
    -p query-service
export EVENTBUS_BIN="${EVENTBUS_BIN:-$PWD/target/debug/eventbus}"

cd dashboard
npm ci --no-audit --no-fund --loglevel=error
# The embedded build must be reproducible from the sources and lockfile.
committed="$(mktemp -d)"
trap 'rm -rf "$committed"' EXIT
cp -r dist/. "$committed"
npm run --silent build
if ! diff -r "$committed" dist >/dev/null; then
    echo "dashboard/dist differs from what 'npm run build' makes of dashboard/src:" >&2
    diff -r "$committed" dist | head -20 >&2 || true
    echo "rebuild it (cd dashboard && npm ci && npm run build) and commit dist/" >&2
    exit 1
fi
npm test
