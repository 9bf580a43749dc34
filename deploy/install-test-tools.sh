#!/usr/bin/env bash
# Installs what the end-to-end tests need beyond Postgres and Redis: HAProxy (from
# Debian's packages) for the load-balancer test. Idempotent; `make test` calls it.
set -euo pipefail
command -v haproxy >/dev/null 2>&1 && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing haproxy (load-balancer test)"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -qq haproxy >/dev/null 2>&1 || { $sudo apt-get update -qq && $sudo apt-get install -y -qq haproxy; }
