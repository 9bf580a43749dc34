#!/usr/bin/env bash
# `make bench`: the standard benchmark suite on a local cluster (release build), written
# to docs/benchmarks.md. The cluster runs on its own ports and database, so `make run`
# may stay up beside it. Every scenario's JSON line goes to target/bench/results.jsonl.
#
# Environment: BENCH_QUICK=1 runs a smaller suite (for trying the tool, not for figures);
# BENCH_ONLY="persist reconnect" runs only those scenarios (idle, light, ramp, fanout,
# persist, persist-open, search, reconnect). Either writes its report under target/bench/ instead of docs/.
# BENCH_BIN=dir takes every binary (chat-message, chat-gateway, chat-bench) from dir
# instead of building them: A/B runs of two builds, with BENCH_ONLY.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BENCH_BIN:-target/release}
OUT=target/bench
RESULTS=$OUT/results.jsonl
SECRET=bench-secret-at-least-32-bytes-long
PREFIX="bench$$"
DB=chat_bench_$$
PG_BASE="${BENCH_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432}"
GW_A=127.0.0.1:18080
GW_B=127.0.0.1:18081
MSG=127.0.0.1:50151

if [ -n "${BENCH_BIN:-}" ] && [ -z "${BENCH_ONLY:-}" ]; then
  echo "BENCH_BIN is for A/B runs: give BENCH_ONLY too (the report in docs/ is of this tree's build)" >&2
  exit 2
fi
[ -n "${BENCH_BIN:-}" ] || cargo build --release --workspace --bins
mkdir -p "$OUT"
: >"$RESULTS"
# The gateways and chat-bench hold thousands of sockets each.
ulimit -n "$(ulimit -Hn)"

pids=()
cleanup() {
  trap - EXIT INT TERM
  [ ${#pids[@]} -gt 0 ] && kill -TERM "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  psql "$PG_BASE/postgres" -qc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true
  redis-cli --scan --pattern "$PREFIX:*" | xargs -r redis-cli del >/dev/null 2>&1 || true
}
trap cleanup EXIT INT TERM

wait_ready() { # host:port
  for _ in $(seq 1 300); do
    curl -fsS -o /dev/null "http://$1/readyz" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "gateway $1 not ready" >&2
  exit 1
}

export RUST_LOG=warn REDIS_CHANNEL_PREFIX=$PREFIX JWT_SECRET=$SECRET ENVIRONMENT=development
# Limits meant for abusive clients are off: the bench is one client doing a lot.
export RATE_CONN_PER_SEC=0 RATE_USER_PER_SEC=0 RATE_SEARCH_PER_SEC=0 MAX_CONNECTIONS_PER_USER=0

start_gateway() { # addr
  GATEWAY_ADDR=$1 MESSAGE_SERVICE_URL=http://$MSG "$BIN/chat-gateway" &
  pids+=($!)
  last_pid=$!
}

# Loopback: no TLS to Postgres (the driver would otherwise prefer it).
MESSAGE_ADDR=$MSG METRICS_ADDR=127.0.0.1:19191 DATABASE_URL="$PG_BASE/$DB?sslmode=disable" "$BIN/chat-message" &
pids+=($!)
message_pid=$!
start_gateway $GW_A; gw_a_pid=$last_pid
start_gateway $GW_B; gw_b_pid=$last_pid
wait_ready $GW_A
wait_ready $GW_B

# CPU ticks (user + system) of the cluster's processes that still run.
cluster_ticks() {
  local total=0 pid
  for pid in "$message_pid" "$gw_a_pid" "$gw_b_pid"; do
    [ -r "/proc/$pid/stat" ] || continue
    total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
  done
  echo "$total"
}

# Waits (up to 60 s) until the cluster is idle: the previous scenario's disconnects
# (presence, announcements) must not be measured as the next one's load.
settle() {
  local before after
  for _ in $(seq 1 60); do
    before=$(cluster_ticks)
    sleep 1
    after=$(cluster_ticks)
    [ $((after - before)) -le 5 ] && return 0
  done
}

# Vacuums and analyses the bench database, as autovacuum would in production. The
# machine's shared Postgres may run with autovacuum off (this one does, a CI setting):
# then every scenario's dead row versions (each batch rewrites its rooms' `last_seq`)
# and stale statistics pile up for the next, and persist after light, ramp and fanout
# measured 3,900 sends/s against 11,800 on a stock Postgres (docs/benchmarks.md).
vacuum() {
  psql -q -X "$PG_BASE/$DB?sslmode=disable" -c "VACUUM (ANALYZE)" >/dev/null 2>&1 ||
    echo "bench: VACUUM of $DB failed; figures may suffer" >&2
}

# Runs a scenario (named by $1 for BENCH_ONLY) unless BENCH_ONLY leaves it out.
run() {
  local name=$1
  shift
  case " ${BENCH_ONLY:-$name} " in *" $name "*) ;; *) return 0 ;; esac
  vacuum
  settle
  "$BIN/chat-bench" "$@" --gateways "$GW_A,$GW_B" --secret "$SECRET" --out "$RESULTS"
}
backend="--pids $message_pid,$gw_a_pid,$gw_b_pid --pid-names postgres,redis-server"
sources="--sources 127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5"

if [ "${BENCH_QUICK:-0}" = 1 ]; then
  IDLE=2000 ROOMS=20 RAMP=200,400 FAN_RATE=400 SECS=4 RECONNECT_ROOMS=20
  SEARCH="--messages 100000 --queries 500 --seconds 20"
else
  IDLE=19000 ROOMS=100 RAMP=250,500,1000,1500,2000 FAN_RATE=1500 SECS=10 RECONNECT_ROOMS=100
  SEARCH="--messages 1000000 --queries 3000 --seconds 60"
fi

# Idle first, on a fresh gateway: its RSS growth is then the connections' alone.
# shellcheck disable=SC2086
run idle idle --connections "$IDLE" --gateway-pid "$gw_a_pid" $sources
# shellcheck disable=SC2086
run light fanout --name light --rooms 10 --members 100 --rate 1000 --seconds "$SECS" $backend
# shellcheck disable=SC2086
run ramp ramp --rooms "$ROOMS" --members 100 --rates "$RAMP" --seconds "$SECS" $sources
# shellcheck disable=SC2086
run fanout fanout --rooms "$ROOMS" --members 100 --rate "$FAN_RATE" --seconds "$SECS" $backend $sources
# shellcheck disable=SC2086
run persist persist --rooms 100 --senders 200 --window 4 --seconds "$SECS" $backend
# shellcheck disable=SC2086
run persist persist --rooms 1 --senders 100 --window 4 --seconds "$SECS" $backend
# Open loop: ack latency at a fixed offered rate (#17's target: p99 ≤ 20 ms at 10,000/s;
# OPEN_RATE=2000 BENCH_ONLY=persist-open for another rate).
# shellcheck disable=SC2086
run persist-open persist --rooms 100 --senders 200 --rate "${OPEN_RATE:-10000}" --seconds "$SECS" $backend
# #19: one-word searches over a million messages seeded into the cluster's database
# (1,000 rooms, the searching users in 100 each), 4 clients. Up to about two minutes:
# seeding takes 20-40 s here, the queries at most 90 s. Before reconnect, which kills a gateway.
# shellcheck disable=SC2086
run search search --database-url "$PG_BASE/$DB?sslmode=disable" $SEARCH $backend
# Last: it kills gateway A.
# shellcheck disable=SC2086
run reconnect reconnect --rooms "$RECONNECT_ROOMS" --members 100 --rate 200 --kill-pid "$gw_a_pid" $sources

if [ "${BENCH_QUICK:-0}" = 1 ] || [ -n "${BENCH_ONLY:-}" ]; then
  # A trial or partial run's figures are not the suite's: keep them out of docs/.
  "$BIN/chat-bench" report --results "$RESULTS" --out "$OUT/benchmarks.md" \
    --plot "$OUT/benchmarks-latency.png" --history "$OUT/history.jsonl"
else
  "$BIN/chat-bench" report --results "$RESULTS"
fi
