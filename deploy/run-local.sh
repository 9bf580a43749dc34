#!/usr/bin/env bash
# Starts the local cluster of the client contract: the message service on 127.0.0.1:50051
# and two gateways on 127.0.0.1:8080 and 127.0.0.1:8081, against DATABASE_URL and
# REDIS_URL (local defaults). GATEWAYS=N starts N gateways (8080, 8081, …); LB_ADDR puts
# HAProxy in front of them.
#
# It supervises them as Kubernetes does its pods: a process that exits is reported and
# started again after a back-off (1 s, doubling up to 30 s, back to 1 s once it has
# stayed up a minute) while the others keep serving, so killing a gateway shows failover
# rather than the end of the cluster. Only a process that dies before the cluster is up
# stops it (a wrong setting would otherwise restart forever). Ctrl-C stops everything.
#
# The gateways call the message service over mutual TLS, as in production (where
# cert-manager issues the certificates): `chatctl certs` makes a development CA and both
# certificates in TLS_DIR (target/dev-tls) once, and reuses them after. TLS=off: plaintext.
#
# Overrides, for a second cluster beside the first or for tests: GATEWAY_BASE_PORT (8080),
# MESSAGE_ADDR (127.0.0.1:50051), METRICS_ADDR (127.0.0.1:9091), BIN_DIR (a directory of
# built binaries, e.g. target/debug: no cargo build), PROFILE=debug (build debug).
set -euo pipefail
# `wait -n -p`, EPOCHREALTIME and associative arrays: bash 5.1 or later (macOS ships 3.2).
if (( BASH_VERSINFO[0] < 5 || (BASH_VERSINFO[0] == 5 && BASH_VERSINFO[1] < 1) )); then
  echo "run-local.sh needs bash 5.1 or later (this is $BASH_VERSION)" >&2
  exit 1
fi
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
# No load balancer polls a local process's readiness, so waiting before stopping (what
# lets one notice in Kubernetes) would only slow Ctrl-C and restarts down.
export DRAIN_DELAY_MS="${DRAIN_DELAY_MS:-0}"
PROFILE="${PROFILE:-release}"
GATEWAYS="${GATEWAYS:-2}"
GATEWAY_BASE_PORT="${GATEWAY_BASE_PORT:-8080}"
MESSAGE_ADDR="${MESSAGE_ADDR:-127.0.0.1:50051}"
METRICS_ADDR="${METRICS_ADDR:-127.0.0.1:9091}"
LB_ADDR="${LB_ADDR:-}"
BIN_DIR="${BIN_DIR:-}"
TLS="${TLS:-on}"
TLS_DIR="${TLS_DIR:-target/dev-tls}"
case "$TLS" in
  on | off) ;;
  *) echo "TLS=$TLS: expected on or off" >&2; exit 1 ;;
esac

# Restart back-off, as the kubelet's (10 s doubling to 5 min there; a laptop wants it shorter).
FIRST_DELAY_MS=1000
MAX_DELAY_MS=30000
# Up this long, a process is healthy again: its next exit restarts after FIRST_DELAY_MS.
STABLE_MS=60000
# How long the processes get to stop after SIGTERM (their own grace is 20 s) before SIGKILL.
STOP_WITHIN_MS=25000

if [ -n "$BIN_DIR" ]; then
  BIN="$BIN_DIR"
elif [ "$PROFILE" = release ]; then
  cargo build --release --workspace --bins
  BIN=target/release
else
  cargo build --workspace --bins
  BIN=target/debug
fi
needed=(chat-message chat-gateway)
[ "$TLS" = off ] || needed+=(chatctl)
for b in "${needed[@]}"; do
  [ -x "$BIN/$b" ] || { echo "$BIN/$b is missing: build it (cargo build --workspace --bins)" >&2; exit 1; }
done

# Milliseconds since the epoch; EPOCHREALTIME's separator follows the locale.
now_ms() { local t=${EPOCHREALTIME//[!0-9]/}; echo $((t / 1000)); }
log() { echo "[run-local] $*"; }

# mTLS settings, each only for the process it belongs to: a gateway given the server's
# key, or the message service the client's, would hide a mix-up that production would show.
message_tls=()
gateway_tls=()
if [ "$TLS" != off ]; then
  # Kept as they are when TLS_DIR already holds a CA, so restarts reuse the same ones.
  "$BIN/chatctl" certs --dir "$TLS_DIR"
  message_tls=(
    "GRPC_TLS_CERT=$TLS_DIR/message.crt"
    "GRPC_TLS_KEY=$TLS_DIR/message.key"
    "GRPC_TLS_CLIENT_CA=$TLS_DIR/ca.crt"
  )
  # The URL stays http://: the gateway turns TLS on from MESSAGE_TLS_*, and the server
  # name is the certificate's (the Kubernetes Service name), not 127.0.0.1.
  gateway_tls=(
    "MESSAGE_TLS_CA=$TLS_DIR/ca.crt"
    "MESSAGE_TLS_CERT=$TLS_DIR/gateway.crt"
    "MESSAGE_TLS_KEY=$TLS_DIR/gateway.key"
    "MESSAGE_TLS_SERVER_NAME=chat-message"
  )
fi

run_message() { MESSAGE_ADDR=$MESSAGE_ADDR METRICS_ADDR=$METRICS_ADDR exec env "${message_tls[@]}" "$BIN/chat-message"; }
run_gateway() { GATEWAY_ADDR=$1 MESSAGE_SERVICE_URL="http://$MESSAGE_ADDR" exec env "${gateway_tls[@]}" "$BIN/chat-gateway"; }
run_haproxy() { exec ./deploy/lb/haproxy.sh run "$LB_ADDR" "$@"; }

# Per process name: the command that starts it, its pid while it runs (empty while it
# waits for a restart), when it started, its next back-off and when that restart is due.
declare -A cmd=() pid=() started=() delay=() due=()
names=()
ticker=""
stopping=""

spawn() { # name
  local name=$1
  # The command is a function and its arguments, none with spaces: split on purpose.
  # shellcheck disable=SC2086
  ${cmd[$name]} &
  pid[$name]=$!
  started[$name]=$(now_ms)
  due[$name]=""
  log "started $name (pid ${pid[$name]})"
}

add() { # name, command...
  local name=$1
  shift
  names+=("$name")
  cmd[$name]="$*"
  delay[$name]=$FIRST_DELAY_MS
  spawn "$name"
}

live_pids() {
  local name
  for name in "${names[@]}"; do
    [ -z "${pid[$name]}" ] || echo "${pid[$name]}"
  done
}

name_of() { # pid
  local name
  [ -n "$1" ] || return 0
  for name in "${names[@]}"; do
    [ "${pid[$name]}" != "$1" ] || { echo "$name"; return; }
  done
}

# How a process ended, from the status `wait` gave: above 128 is death by a signal.
describe() { # status
  if [ "$1" -gt 128 ]; then
    echo "was killed by SIG$(kill -l $(($1 - 128)) 2>/dev/null || echo "$(($1 - 128))")"
  else
    echo "exited with status $1"
  fi
}

# Processes that ended while the script was not in `wait` (bash has reaped them and
# dropped them from its job table, so `wait -n` no longer knows them) go to `reaped`, one
# "name pid status" each, and are marked as not running.
reaped=()
reap_dead() {
  local name p status
  reaped=()
  for name in "${names[@]}"; do
    p=${pid[$name]}
    [ -n "$p" ] && ! kill -0 "$p" 2>/dev/null || continue
    status=0
    wait "$p" 2>/dev/null || status=$?
    pid[$name]=""
    reaped+=("$name $p $status")
  done
}

# SIGTERM to every running process, then waits for them, with SIGKILL for whatever is
# still running after STOP_WITHIN_MS: nothing outlives the script.
stop_all() {
  [ -z "$ticker" ] || kill "$ticker" 2>/dev/null || true
  local live
  mapfile -t live < <(live_pids)
  [ ${#live[@]} -gt 0 ] || return 0
  log "stopping the cluster..."
  kill -TERM "${live[@]}" 2>/dev/null || true
  local deadline=$(($(now_ms) + STOP_WITHIN_MS)) killed="" done_pid name status t
  while :; do
    reap_dead
    mapfile -t live < <(live_pids)
    [ ${#live[@]} -gt 0 ] || break
    if [ -z "$killed" ] && [ "$(now_ms)" -ge "$deadline" ]; then
      log "still running after $((STOP_WITHIN_MS / 1000)) s, killing: ${live[*]}"
      kill -KILL "${live[@]}" 2>/dev/null || true
      killed=1
    fi
    sleep 0.2 &
    t=$!
    done_pid=""
    status=0
    wait -n -p done_pid "${live[@]}" "$t" || status=$?
    kill "$t" 2>/dev/null || true
    wait "$t" 2>/dev/null || true
    name=$(name_of "${done_pid:-}")
    if [ -n "$name" ]; then
      [ "$status" -eq 0 ] || log "$name (pid $done_pid) $(describe "$status") while stopping"
      pid[$name]=""
    fi
  done
}

# Ctrl-C (SIGINT) or SIGTERM only sets a flag: a trapped signal ends `wait` at once, and
# the loop that was waiting stops the cluster outside the trap.
on_signal() { stopping=1; }
on_exit() {
  trap - INT TERM EXIT
  stop_all
}
trap on_signal INT TERM
trap on_exit EXIT
stop_and_exit() {
  trap '' INT TERM
  stop_all
  log "cluster stopped"
  exit 0
}

wait_ready() { # url, name
  for _ in $(seq 1 150); do
    [ -z "$stopping" ] || stop_and_exit
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    if ! kill -0 "${pid[$2]}" 2>/dev/null; then
      status=0
      wait "${pid[$2]}" 2>/dev/null || status=$?
      pid[$2]=""
      log "$2 $(describe "$status") during start-up; stopping" >&2
      exit 1
    fi
    sleep 0.2
  done
  log "$2 not ready after 30 s" >&2
  exit 1
}

add message run_message
# Gateways on GATEWAY_BASE_PORT, +1, … (GATEWAYS, default 2: the contract's local cluster).
gateways=()
for i in $(seq 1 "$GATEWAYS"); do
  addr="127.0.0.1:$((GATEWAY_BASE_PORT + i - 1))"
  add "gateway-$i" run_gateway "$addr"
  gateways+=("$addr")
done
for i in "${!gateways[@]}"; do
  wait_ready "http://${gateways[$i]}/readyz" "gateway-$((i + 1))"
done

# Optionally HAProxy in front of them (LB_ADDR, e.g. 127.0.0.1:8000; `make run-lb`).
lb_line=""
if [ -n "$LB_ADDR" ]; then
  add haproxy run_haproxy "${gateways[@]}"
  wait_ready "http://$LB_ADDR/readyz" haproxy
  lb_line="    load balancer    ws://$LB_ADDR/ws   (HAProxy over ${#gateways[@]} gateways)"
fi

secret_hint=""
[ "$JWT_SECRET" = "$DEV_SECRET" ] && secret_hint=" (dev default; set JWT_SECRET to override)"
tls_line="    mTLS             gateway → message service, certificates in $TLS_DIR"
[ "$TLS" != off ] || tls_line="    mTLS             off: plaintext gateway → message service (TLS=off)"
cat <<INFO

  chat cluster is up
    message service  grpc://$MESSAGE_ADDR   metrics http://$METRICS_ADDR/metrics
${tls_line}
$(for i in "${!gateways[@]}"; do gw=${gateways[$i]}; echo "    gateway-$((i + 1))        ws://$gw/ws   http://$gw/metrics   http://$gw/openapi.json"; done)
${lb_line}
    database         $DATABASE_URL
    redis            $REDIS_URL
    JWT_SECRET       $JWT_SECRET$secret_hint

  browser client:  http://${gateways[0]}/   (sign in with any user name: DEV_TOKENS=$DEV_TOKENS)
  a dev token:     JWT_SECRET=$JWT_SECRET $BIN/chatctl token --sub alice
  a session:       JWT_SECRET=$JWT_SECRET $BIN/chatctl connect --user alice
  A process that exits is restarted (try: kill -9 <pid of gateway-2>). Ctrl-C stops the cluster.

INFO

# Supervision: wait for any process to end, report it and schedule its restart; a short
# ticker wakes the loop while a restart is due. A trapped signal (Ctrl-C) ends `wait` at once.
while :; do
  [ -z "$stopping" ] || stop_and_exit
  now=$(now_ms)
  for name in "${names[@]}"; do
    if [ -z "${pid[$name]}" ] && [ "$now" -ge "${due[$name]}" ]; then spawn "$name"; fi
  done
  pending=""
  for name in "${names[@]}"; do [ -n "${pid[$name]}" ] || pending=1; done
  if [ -n "$pending" ] && [ -z "$ticker" ]; then
    sleep 0.1 &
    ticker=$!
  fi
  # What ended while the loop was busy elsewhere, then the next process to end.
  reap_dead
  ended=("${reaped[@]}")
  [ -z "$ticker" ] || kill -0 "$ticker" 2>/dev/null || ticker=""
  if [ ${#ended[@]} -eq 0 ]; then
    mapfile -t live < <(live_pids)
    done_pid=""
    status=0
    wait -n -p done_pid "${live[@]}" ${ticker:+"$ticker"} || status=$?
    if [ -z "${done_pid:-}" ]; then continue; fi
    if [ "${done_pid:-}" = "$ticker" ]; then
      ticker=""
      continue
    fi
    name=$(name_of "${done_pid:-}")
    [ -z "$name" ] || ended+=("$name $done_pid $status")
  fi
  for line in "${ended[@]}"; do
    read -r name done_pid status <<<"$line"
    now=$(now_ms)
    up_ms=$((now - started[$name]))
    [ "$up_ms" -lt "$STABLE_MS" ] || delay[$name]=$FIRST_DELAY_MS
    pid[$name]=""
    due[$name]=$((now + delay[$name]))
    log "$name (pid $done_pid) $(describe "$status") after $((up_ms / 1000)) s; restarting in $((delay[$name] / 1000)) s" >&2
    delay[$name]=$((delay[$name] * 2 > MAX_DELAY_MS ? MAX_DELAY_MS : delay[$name] * 2))
  done
done
