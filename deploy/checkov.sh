#!/usr/bin/env bash
# Static analysis of the rendered Kubernetes manifests with checkov (its Kubernetes
# framework: security contexts, resources, probes, images, secrets, ...). Renders every
# overlay under k8s/overlays with `kubectl kustomize` and scans each; exits non-zero on
# any failed check.
#
# A check is skipped only on the object it does not fit, with the reason beside it:
#   metadata.annotations: {checkov.io/skip1: "CKV_K8S_43=<why>"}
# and the reasons are printed here, so a new skip shows in the output.
#
#   bash deploy/checkov.sh
#
# Needs kubectl and: pip install checkov==3.3.30
set -euo pipefail
cd "$(dirname "$0")/.."

CHECKOV_VERSION=3.3.30
KUBECTL="${KUBECTL:-kubectl}"

die() { echo "checkov: $*" >&2; exit 1; }
command -v "$KUBECTL" >/dev/null 2>&1 || die "kubectl not found (set KUBECTL=/path/to/kubectl)"
command -v checkov >/dev/null 2>&1 || die "checkov is missing: pip install checkov==$CHECKOV_VERSION"
have="$(checkov --version 2>/dev/null || true)"
[ "$have" = "$CHECKOV_VERSION" ] \
  || die "checkov ${have:-?} found, $CHECKOV_VERSION expected: pip install checkov==$CHECKOV_VERSION"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "checkov: $have, framework kubernetes"

failed=()
for dir in k8s/overlays/*/; do
  dir="${dir%/}"
  [ -f "$dir/kustomization.yaml" ] || continue
  overlay="$(basename "$dir")"
  mkdir "$tmp/$overlay"
  "$KUBECTL" kustomize "$dir" >"$tmp/$overlay/rendered.yaml" || { failed+=("$overlay: render"); continue; }
  # No update check, no platform upload: offline and reproducible.
  rc=0
  BC_SKIP_MAPPING=TRUE checkov --compact --skip-download --framework kubernetes \
    -d "$tmp/$overlay" -o json >"$tmp/$overlay.json" 2>"$tmp/$overlay.err" || rc=$?
  if ! python3 - "$tmp/$overlay.json" "$dir" <<'PY'
import json
import sys

path, overlay = sys.argv[1], sys.argv[2]
text = open(path).read().strip()
reports = json.loads(text) if text else []
if isinstance(reports, dict):
    reports = [reports]
passed = failed = errors = 0
skips = {}
for r in reports:
    res = r.get("results", {})
    passed += r.get("summary", {}).get("passed", 0)
    errors += r.get("summary", {}).get("parsing_errors", 0)
    for c in res.get("failed_checks", []):
        failed += 1
        print(f"  FAIL {c['check_id']} {c['check_name']}: {c['resource']}")
    for c in res.get("skipped_checks", []):
        reason = (c.get("check_result") or {}).get("suppress_comment", "")
        skips.setdefault((c["check_id"], reason), []).append(c["resource"])
for (check, reason), resources in sorted(skips.items()):
    print(f"  skip {check} on {len(resources)} ({', '.join(sorted(r.split('.')[-1] for r in resources))}): {reason}")
if errors:
    print(f"  FAIL {errors} file(s) checkov could not parse")
bad = failed or errors or not passed
print(f"checkov  {'FAILED' if bad else 'ok'}: {overlay}: {passed} passed, {failed} failed, "
      f"{sum(len(v) for v in skips.values())} skipped with a reason")
sys.exit(1 if bad else 0)
PY
  then
    [ -s "$tmp/$overlay.err" ] && sed 's/^/  /' "$tmp/$overlay.err"
    failed+=("$overlay")
  elif [ "$rc" -ne 0 ]; then
    sed 's/^/  /' "$tmp/$overlay.err"
    echo "checkov  FAILED: $dir: checkov exited $rc"
    failed+=("$overlay")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "checkov: FAILED (${failed[*]})"
  exit 1
fi
echo "checkov: all overlays passed"
