#!/usr/bin/env bash
# The scenario in one command: builds the workspace (release), starts the bus and the four
# services (query-service twice: request-reply on :8080, projection on :8081), prints what to
# try, and stops everything on Ctrl-C. Data lives in a fresh temporary directory (DEMO_DIR to
# choose one); logs are there too.
#
#   ./scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

BUS_PORT=${BUS_PORT:-50051}
RR_PORT=${RR_PORT:-8080}
PROJECTION_PORT=${PROJECTION_PORT:-8081}

cargo build --release --workspace --quiet
BIN=$PWD/target/release
if [[ -n "${DEMO_DIR:-}" ]]; then
  mkdir -p "$DEMO_DIR"
else
  DEMO_DIR=$(mktemp -d -t eventbus-demo-XXXXXX)
fi
export EVENTBUS_SERVER=http://127.0.0.1:$BUS_PORT

pids=()
stop() {
  trap - INT TERM EXIT
  echo
  echo "stopping..."
  # Reverse order: services first, the bus last.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  echo "stopped; data and logs are in $DEMO_DIR"
}
trap stop INT TERM EXIT

start() { # name, then the command
  local name=$1
  shift
  "$@" >"$DEMO_DIR/$name.log" 2>&1 &
  pids+=($!)
  echo $! >"$DEMO_DIR/$name.pid"
}

wait_until() { # what, then a command that succeeds when ready
  local what=$1
  shift
  for _ in $(seq 1 150); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "error: $what did not come up; see $DEMO_DIR" >&2
  exit 1
}

start eventbus "$BIN/eventbus" serve --listen "127.0.0.1:$BUS_PORT" --data-dir "$DEMO_DIR/eventbus-data"
wait_until "the bus" "$BIN/eventbus" topics
for service in user-service product-service order-service; do
  start "$service" "$BIN/$service" --db "$DEMO_DIR/$service.db"
done
start query-rr "$BIN/query-service" --mode request-reply --listen "127.0.0.1:$RR_PORT"
start query-projection "$BIN/query-service" --mode projection \
  --listen "127.0.0.1:$PROJECTION_PORT" --db "$DEMO_DIR/query-service.db"
wait_until "query-service (request-reply)" curl -sf "http://127.0.0.1:$RR_PORT/health"
wait_until "query-service (projection)" curl -sf "http://127.0.0.1:$PROJECTION_PORT/health"

cat <<TXT

eventbus demo is up (bus $EVENTBUS_SERVER; data and logs in $DEMO_DIR)

  request-reply:  curl -si http://127.0.0.1:$RR_PORT/users/7/products
  projection:     curl -si http://127.0.0.1:$PROJECTION_PORT/users/7/products
  projection lag: curl -s  http://127.0.0.1:$PROJECTION_PORT/status

  stop the user service, then ask both again (503 at once vs 200):
                  kill \$(cat $DEMO_DIR/user-service.pid)
  start it again: $BIN/user-service --db $DEMO_DIR/user-service.db &

  create an order, then watch it in the projection:
                  curl -si -X POST http://127.0.0.1:$RR_PORT/users/7/orders \\
                       -d '{"items": [{"product_id": 3, "quantity": 2}]}'

  the web of dependencies: $BIN/eventbus topology   (--format mermaid|dot)
  follow one request:      grep <x-correlation-id> $DEMO_DIR/*.log

Ctrl-C stops everything.
TXT
wait
