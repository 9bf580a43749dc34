#!/usr/bin/env bash
# Starts the local cluster of the client contract: the message service on 127.0.0.1:50051
# and two gateways on 127.0.0.1:8080 and 127.0.0.1:8081, against DATABASE_URL and
# REDIS_URL (local defaults). GATEWAYS=N starts N gateways (8080, 8081, …); LB_ADDR puts
# HAProxy in front of them. Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."

# Loopback: TLS would only cost CPU (Debian's Postgres offers it, and the driver prefers it).
export DATABASE_URL="${DATABASE_URL:-postgres://localhost/chat?sslmode=disable}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
DEV_SECRET="dev-secret-change-me"
export JWT_SECRET="${JWT_SECRET:-$DEV_SECRET}"
export RUST_LOG="${RUST_LOG:-info}"
# A local development cluster: the browser client at / may sign in by user name
# (POST /v1/dev/token). Gateways refuse DEV_TOKENS when ENVIRONMENT=production.
export ENVIRONMENT="${ENVIRONMENT:-development}"
export DEV_TOKENS="${DEV_TOKENS:-true}"
PROFILE="${PROFILE:-release}"
GATEWAYS="${GATEWAYS:-2}"
LB_ADDR="${LB_ADDR:-}"

if [ "$PROFILE" = release ]; then
  cargo build --release --workspace --bins
  BIN=target/release
else
  cargo build --workspace --bins
  BIN=target/debug
fi

pids=()
cleanup() {
  trap - INT TERM EXIT
  if [ ${#pids[@]} -gt 0 ]; then
    echo "stopping the cluster..."
    kill -TERM "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
  fi
}
stop() { cleanup; exit 0; }
trap stop INT TERM
trap cleanup EXIT

wait_ready() { # url, name, pid
  for _ in $(seq 1 150); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    if ! kill -0 "$3" 2>/dev/null; then echo "$2 exited during start-up" >&2; exit 1; fi
    sleep 0.2
  done
  echo "$2 not ready after 30 s" >&2
  exit 1
}

MESSAGE_ADDR=127.0.0.1:50051 METRICS_ADDR="${METRICS_ADDR:-127.0.0.1:9091}" "$BIN/chat-message" &
pids+=($!)
# Gateways on 8080, 8081, … (GATEWAYS, default 2: the contract's local cluster).
gateways=()
for i in $(seq 0 $((GATEWAYS - 1))); do
  addr="127.0.0.1:$((8080 + i))"
  GATEWAY_ADDR=$addr MESSAGE_SERVICE_URL=http://127.0.0.1:50051 "$BIN/chat-gateway" &
  pids+=($!)
  gateways+=("$addr")
done
for i in "${!gateways[@]}"; do
  wait_ready "http://${gateways[$i]}/readyz" "gateway ${gateways[$i]}" "${pids[$((i + 1))]}"
done

# Optionally HAProxy in front of them (LB_ADDR, e.g. 127.0.0.1:8000; `make run-lb`).
lb_line=""
if [ -n "$LB_ADDR" ]; then
  ./deploy/lb/haproxy.sh run "$LB_ADDR" "${gateways[@]}" &
  pids+=($!)
  wait_ready "http://$LB_ADDR/readyz" "haproxy" "${pids[-1]}"
  lb_line="    load balancer    ws://$LB_ADDR/ws   (HAProxy over ${#gateways[@]} gateways)"
fi

secret_hint=""
[ "$JWT_SECRET" = "$DEV_SECRET" ] && secret_hint=" (dev default; set JWT_SECRET to override)"
cat <<INFO

  chat cluster is up
    message service  grpc://127.0.0.1:50051   metrics http://127.0.0.1:9091/metrics
$(for gw in "${gateways[@]}"; do echo "    gateway          ws://$gw/ws   http://$gw/metrics   http://$gw/openapi.json"; done)
${lb_line}
    database         $DATABASE_URL
    redis            $REDIS_URL
    JWT_SECRET       $JWT_SECRET$secret_hint

  browser client:  http://${gateways[0]}/   (sign in with any user name: DEV_TOKENS=$DEV_TOKENS)
  a dev token:     JWT_SECRET=$JWT_SECRET $BIN/chatctl token --sub alice
  a session:       JWT_SECRET=$JWT_SECRET $BIN/chatctl connect --user alice
  Ctrl-C stops the cluster.

INFO

# Exit (and stop the rest) as soon as any process ends. Ctrl-C reaches the services
# too, and they stop cleanly with status 0.
status=0
wait -n "${pids[@]}" || status=$?
if [ "$status" -eq 0 ]; then
  echo "cluster stopped"
  exit 0
fi
echo "a cluster process exited with status $status; stopping the rest" >&2
exit 1
