#!/usr/bin/env bash
# The scenario in one command: builds the workspace (release), starts the bus and the four
# services (query-service twice: request-reply on :8080, projection on :8081), prints what to
# try, and stops everything on Ctrl-C. Data lives in a fresh temporary directory (DEMO_DIR to
# choose one); logs are there too. DEMO_BIN=<dir> uses binaries already built there instead of
# building.
#
# With --cluster, the same on a clustered bus: three nats-servers with JetStream joined by
# cluster routes (ports 4301-4303, routes 6301-6303), two bus nodes on them (BUS_PORT and
# BUS_PORT+1, stream replicas 3), and the services spread over the two nodes, each knowing both.
#
#   ./scripts/demo.sh [--cluster]
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=false
if [[ "${1:-}" == "--cluster" ]]; then
  CLUSTER=true
fi
BUS_PORT=${BUS_PORT:-50051}
RR_PORT=${RR_PORT:-8080}
PROJECTION_PORT=${PROJECTION_PORT:-8081}

if [[ -n "${DEMO_BIN:-}" ]]; then
  BIN=$(cd "$DEMO_BIN" && pwd)
else
  cargo build --release --workspace --quiet
  BIN=$PWD/target/release
fi
if [[ -n "${DEMO_DIR:-}" ]]; then
  mkdir -p "$DEMO_DIR"
else
  DEMO_DIR=$(mktemp -d -t eventbus-demo-XXXXXX)
fi
BUS2_PORT=$((BUS_PORT + 1))
if $CLUSTER; then
  # Every service knows both nodes; half of them start on the second.
  NODES_A=http://127.0.0.1:$BUS_PORT,http://127.0.0.1:$BUS2_PORT
  NODES_B=http://127.0.0.1:$BUS2_PORT,http://127.0.0.1:$BUS_PORT
else
  NODES_A=http://127.0.0.1:$BUS_PORT
  NODES_B=$NODES_A
fi
export EVENTBUS_SERVER=$NODES_A

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

# The pids listening on TCP port $1, one a line (empty when none or when no tool can tell).
listeners() {
  if command -v ss >/dev/null; then
    ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u
  elif command -v lsof >/dev/null; then
    lsof -nP -t -iTCP:"$1" -sTCP:LISTEN 2>/dev/null | sort -u
  fi
}

# Fails unless process $2 (started as $1) is alive and is the one listening on port $3: with
# another bus or service already on that port, a health check would be answered by it while the
# process this script started has died.
check_ours() { # name, pid, port
  local name=$1 pid=$2 port=$3
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "error: $name (pid $pid) exited: $(tail -n 1 "$DEMO_DIR/$name.log" 2>/dev/null)" >&2
    echo "       see $DEMO_DIR/$name.log" >&2
    exit 1
  fi
  local holders
  holders=$(listeners "$port")
  if [[ -z "$holders" ]] && ! command -v ss >/dev/null && ! command -v lsof >/dev/null; then
    # No tool to ask: the process is alive, and it could not be if it had failed to bind.
    return 0
  fi
  if ! grep -qx "$pid" <<<"$holders"; then
    echo "error: port $port answers, but not from the $name this script started (pid $pid);" >&2
    echo "       it is held by pid(s) $(echo "$holders" | tr '\n' ' ')- stop that, or choose" >&2
    echo "       another port (BUS_PORT, RR_PORT, PROJECTION_PORT); see $DEMO_DIR/$name.log" >&2
    exit 1
  fi
}

wait_until() { # name, its pid, what, then a command that succeeds when ready
  local name=$1 pid=$2 what=$3
  shift 3
  for _ in $(seq 1 150); do
    # A process that died cannot come up: say so at once rather than after the timeout.
    if ! kill -0 "$pid" 2>/dev/null; then check_ours "$name" "$pid" 0; fi
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  echo "error: $what did not come up; see $DEMO_DIR" >&2
  exit 1
}

if $CLUSTER; then
  NATS=$(./scripts/nats-server.sh system)
  NATS_URLS=nats://127.0.0.1:4301,nats://127.0.0.1:4302,nats://127.0.0.1:4303
  for i in 1 2 3; do
    cat >"$DEMO_DIR/nats-$i.conf" <<CONF
server_name: n$i
listen: 127.0.0.1:430$i
max_payload: 8MB
jetstream { store_dir: "$DEMO_DIR/nats-$i" }
cluster { name: eventbus-demo, listen: 127.0.0.1:630$i,
          routes: [nats://127.0.0.1:6301, nats://127.0.0.1:6302, nats://127.0.0.1:6303] }
CONF
    start "nats-$i" "$NATS" -c "$DEMO_DIR/nats-$i.conf"
  done
  # A bus node exits when JetStream cannot create the stream yet (no leader elected in the
  # NATS cluster): start the first one again until it stays up.
  for _ in $(seq 1 50); do
    start eventbus "$BIN/eventbus" serve --listen "127.0.0.1:$BUS_PORT" \
      --storage jetstream --nats-url "$NATS_URLS" --jetstream-replicas 3
    bus_pid=$!
    sleep 1
    kill -0 "$bus_pid" 2>/dev/null && break
  done
  wait_until eventbus "$bus_pid" "the first bus node" \
    "$BIN/eventbus" topics --server "http://127.0.0.1:$BUS_PORT"
  start eventbus-2 "$BIN/eventbus" serve --listen "127.0.0.1:$BUS2_PORT" \
    --storage jetstream --nats-url "$NATS_URLS" --jetstream-replicas 3
  bus2_pid=$!
  wait_until eventbus-2 "$bus2_pid" "the second bus node" \
    "$BIN/eventbus" topics --server "http://127.0.0.1:$BUS2_PORT"
  check_ours eventbus-2 "$bus2_pid" "$BUS2_PORT"
else
  start eventbus "$BIN/eventbus" serve --listen "127.0.0.1:$BUS_PORT" --data-dir "$DEMO_DIR/eventbus-data"
  bus_pid=$!
  wait_until eventbus "$bus_pid" "the bus" "$BIN/eventbus" topics
fi
check_ours eventbus "$bus_pid" "$BUS_PORT"
EVENTBUS_SERVER=$NODES_B start user-service "$BIN/user-service" --db "$DEMO_DIR/user-service.db"
for service in product-service order-service; do
  start "$service" "$BIN/$service" --db "$DEMO_DIR/$service.db"
done
start query-rr "$BIN/query-service" --mode request-reply --listen "127.0.0.1:$RR_PORT"
rr_pid=$!
start query-projection "$BIN/query-service" --mode projection \
  --listen "127.0.0.1:$PROJECTION_PORT" --db "$DEMO_DIR/query-service.db"
projection_pid=$!
wait_until query-rr "$rr_pid" "query-service (request-reply)" curl -sf "http://127.0.0.1:$RR_PORT/health"
wait_until query-projection "$projection_pid" "query-service (projection)" \
  curl -sf "http://127.0.0.1:$PROJECTION_PORT/health"
check_ours query-rr "$rr_pid" "$RR_PORT"
check_ours query-projection "$projection_pid" "$PROJECTION_PORT"
# Still the bus this script started (it could have died while the services came up).
check_ours eventbus "$bus_pid" "$BUS_PORT"
for service in user-service product-service order-service; do
  pid=$(cat "$DEMO_DIR/$service.pid")
  kill -0 "$pid" 2>/dev/null || check_ours "$service" "$pid" 0
done

cat <<TXT

eventbus demo is up (bus $EVENTBUS_SERVER; data and logs in $DEMO_DIR)
$($CLUSTER && printf '\n  a clustered bus: kill the first node; the services move to the other:\n                  kill -9 $(cat %s/eventbus.pid)\n' "$DEMO_DIR")

  request-reply:  curl -si http://127.0.0.1:$RR_PORT/users/7/products
  projection:     curl -si http://127.0.0.1:$PROJECTION_PORT/users/7/products
  projection lag: curl -s  http://127.0.0.1:$PROJECTION_PORT/status

  stop the user service, then ask both again (503 at once vs 200):
                  kill \$(cat $DEMO_DIR/user-service.pid)
  start it again: EVENTBUS_SERVER=$NODES_B $BIN/user-service --db $DEMO_DIR/user-service.db &

  create an order, then watch it in the projection:
                  curl -si -X POST http://127.0.0.1:$RR_PORT/users/7/orders \\
                       -d '{"items": [{"product_id": 3, "quantity": 2}]}'

  the web of dependencies: $BIN/eventbus --server $NODES_B topology   (--format mermaid|dot)
  follow one request:      grep <x-correlation-id> $DEMO_DIR/*.log

Ctrl-C stops everything.
TXT
wait
