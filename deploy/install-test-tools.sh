#!/usr/bin/env bash
# Installs what the end-to-end tests need beyond Postgres and Redis, idempotently;
# `make test` calls it:
# - HAProxy (Debian) for the load-balancer test;
# - Chromium (Debian) for the browser test, driven by playwright-core;
# - the npm packages of the TypeScript SDK (clients/ts) and of the browser test
#   (tests/browser), exactly as their lock files pin them.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -qq "$@" >/dev/null 2>&1 || { $sudo apt-get update -qq && $sudo apt-get install -y -qq "$@"; }
}

if ! command -v haproxy >/dev/null 2>&1; then
  echo "installing haproxy (load-balancer test)"
  apt_install haproxy
fi
if [ ! -x /usr/bin/chromium ]; then
  echo "installing chromium (browser test)"
  apt_install chromium
fi
command -v npm >/dev/null 2>&1 || { echo "Node.js and npm are needed for the SDK and browser tests" >&2; exit 1; }
for dir in clients/ts tests/browser; do
  # Skip when node_modules was installed from this very lock file (stamped below).
  stamp="$dir/node_modules/.installed-from-lock"
  if ! cmp -s "$dir/package-lock.json" "$stamp" 2>/dev/null; then
    echo "npm ci in $dir"
    npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error
    cp "$dir/package-lock.json" "$stamp"
  fi
done
