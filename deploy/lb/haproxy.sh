#!/usr/bin/env bash
# HAProxy in front of N gateways, for a load-balanced cluster on one machine without
# Docker (HAProxy from Debian: apt-get install haproxy).
#
#   deploy/lb/haproxy.sh config LISTEN GATEWAY...   print the configuration
#   deploy/lb/haproxy.sh run LISTEN GATEWAY...      run HAProxy in the foreground
#
# LISTEN and each GATEWAY are host:port. Used by `make run-lb` and by the end-to-end
# test tests/tests/load_balancer.rs.
set -euo pipefail

usage() { echo "usage: $0 config|run LISTEN GATEWAY..." >&2; exit 2; }
[ $# -ge 3 ] || usage
mode=$1 listen=$2
shift 2

config() {
  cat <<CFG
global
    # No maxconn: HAProxy derives it from the open-file limit (two descriptors per
    # proxied WebSocket). No daemon: the caller owns its lifetime.

defaults
    mode http
    option dontlognull
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    # An upgraded WebSocket is a tunnel: idle time between frames is bounded by the
    # gateway's own pings (HEARTBEAT_MS, 25 s), so an hour is only a backstop.
    timeout tunnel 1h
    timeout client-fin 5s
    # A connection refused by a dead gateway is retried on another one.
    retries 3
    option redispatch

frontend chat
    bind ${listen}
    default_backend gateways

backend gateways
    # WebSocket connections are long; spread them by count, not by request.
    balance leastconn
    # /readyz/local turns 503 while a gateway drains (SIGTERM) or is full
    # (MAX_CONNECTIONS), so new connections go elsewhere. Not on a backend outage: that
    # is every gateway's at once (docs/deploy.md). Sessions are left alone when a
    # gateway is marked down: a full one keeps its clients, and a draining one tells
    # its own to reconnect, then closes them with 1012.
    option httpchk GET /readyz/local
    http-check expect status 200
    default-server inter 500ms fall 2 rise 2
CFG
  local i=0
  for gw in "$@"; do
    i=$((i + 1))
    echo "    server gw${i} ${gw} check"
  done
}

case "$mode" in
  config) config "$@" ;;
  run)
    command -v haproxy >/dev/null || { echo "haproxy not found: apt-get install haproxy" >&2; exit 1; }
    # The configuration is read once at start; exec hands signals straight to HAProxy.
    exec haproxy -db -f <(config "$@")
    ;;
  *) usage ;;
esac
