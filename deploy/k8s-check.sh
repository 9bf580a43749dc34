#!/usr/bin/env bash
# Checks the Kubernetes manifests offline: renders every kustomize overlay under
# k8s/overlays with `kubectl kustomize`, validates every rendered object against the
# Kubernetes OpenAPI schemas with kubernetes-validate (the schemas ship inside the
# package, so no cluster or network is needed), then checks what the schemas cannot:
# probes, resources and securityContext on every container, references that resolve
# (Service/PDB/NetworkPolicy selectors, Ingress backends, HPA targets), and no Secret
# objects outside the dev overlay.
#
# Exits non-zero if any overlay fails to render or any object fails a check.
#
#   bash deploy/k8s-check.sh                      # against Kubernetes 1.32
#   K8S_VERSION="1.32 1.33" bash deploy/k8s-check.sh
#
# Needs kubectl (kustomize v5 built in) and: pip install kubernetes-validate==1.37.0
set -euo pipefail
cd "$(dirname "$0")/.."

VALIDATOR_VERSION=1.37.0
# The oldest cluster version we support; kubectl here is 1.32 too. kubernetes-validate
# 1.37.0 ships schemas for 1.25 to 1.37.
K8S_VERSION="${K8S_VERSION:-1.32}"
KUBECTL="${KUBECTL:-kubectl}"
# Overlays that may render Secret objects (placeholder values only).
SECRETS_ALLOWED_IN="${SECRETS_ALLOWED_IN:-dev}"

die() { echo "k8s-check: $*" >&2; exit 1; }

command -v "$KUBECTL" >/dev/null 2>&1 || die "kubectl not found (set KUBECTL=/path/to/kubectl)"
command -v kubernetes-validate >/dev/null 2>&1 \
  || die "the kubernetes-validate command is missing: pip install kubernetes-validate==$VALIDATOR_VERSION"
have="$(kubernetes-validate --version 2>/dev/null || true)"
[ "$have" = "$VALIDATOR_VERSION" ] \
  || die "kubernetes-validate ${have:-?} found, $VALIDATOR_VERSION expected: pip install kubernetes-validate==$VALIDATOR_VERSION"
command -v python3 >/dev/null 2>&1 || die "python3 not found"
python3 -c 'import yaml' 2>/dev/null \
  || die "python3 cannot import yaml: pip install kubernetes-validate==$VALIDATOR_VERSION (it brings PyYAML)"

versions=()
for v in $K8S_VERSION; do versions+=(-k "$v"); done

kustomize_version="$("$KUBECTL" version --client 2>/dev/null | sed -n 's/^Kustomize Version: //p')"
echo "k8s-check: kubectl kustomize (kustomize ${kustomize_version:-?}), kubernetes-validate $have --strict, Kubernetes $K8S_VERSION"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# What the schemas cannot see. Prints one line per problem and exits 1 if there is any.
policy_check() { # rendered.yaml overlay-name
  python3 - "$1" "$2" "$SECRETS_ALLOWED_IN" <<'PY'
import sys
import yaml

path, overlay, secrets_allowed = sys.argv[1], sys.argv[2], sys.argv[3].split()
docs = [d for d in yaml.safe_load_all(open(path)) if d]
problems = []
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}


def name(d):
    return f"{d['kind']}/{d['metadata']['name']}"


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


pods = {}  # workload -> (pod labels, pod spec)
for d in docs:
    if d["kind"] in WORKLOADS:
        t = d["spec"]["template"]
        pods[name(d)] = (t["metadata"].get("labels", {}), t["spec"])

secrets = {d["metadata"]["name"] for d in docs if d["kind"] == "Secret"}
services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
external = set()
containers = 0

if secrets and overlay not in secrets_allowed:
    problems.append(f"renders Secret(s) {sorted(secrets)}: secrets are created out of band here")

for wl, (labels, spec) in pods.items():
    psc = spec.get("securityContext", {})
    if spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{wl}: automountServiceAccountToken is not false")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{wl}: pod seccompProfile is not RuntimeDefault")
    for c in spec.get("initContainers", []) + spec["containers"]:
        containers += 1
        where = f"{wl} container {c['name']}"
        init = c in spec.get("initContainers", [])
        for probe in () if init else ("readinessProbe", "livenessProbe"):
            if probe not in c:
                problems.append(f"{where}: no {probe}")
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(kind, {}):
                    problems.append(f"{where}: no {kind}.{r}")
        sc = c.get("securityContext", {})
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem is not true")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.append(f"{where}: capabilities do not drop ALL")
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref and ref["name"] not in secrets:
                external.add(ref["name"])

refs = 0
for d in docs:
    kind, spec = d["kind"], d.get("spec", {})
    if kind == "Service" and spec.get("selector"):
        refs += 1
        if not any(selects(spec["selector"], l) for l, _ in pods.values()):
            problems.append(f"{name(d)}: selector {spec['selector']} matches no pod template")
    elif kind in ("PodDisruptionBudget", "NetworkPolicy"):
        sel = (spec.get("selector") if kind == "PodDisruptionBudget" else spec.get("podSelector")) or {}
        refs += 1
        if not any(selects(sel.get("matchLabels", {}), l) for l, _ in pods.values()):
            problems.append(f"{name(d)}: selector {sel} matches no pod template")
    elif kind == "HorizontalPodAutoscaler":
        refs += 1
        t = spec["scaleTargetRef"]
        if f"{t['kind']}/{t['name']}" not in pods:
            problems.append(f"{name(d)}: scale target {t['kind']}/{t['name']} is not rendered")
    elif kind == "Ingress":
        for rule in spec.get("rules", []):
            for p in rule.get("http", {}).get("paths", []):
                refs += 1
                svc = p["backend"]["service"]
                port = svc["port"].get("name", svc["port"].get("number"))
                s = services.get(svc["name"])
                if s is None:
                    problems.append(f"{name(d)}: backend Service {svc['name']} is not rendered")
                elif port not in [x.get("name") for x in s["spec"]["ports"]] + [x["port"] for x in s["spec"]["ports"]]:
                    problems.append(f"{name(d)}: Service {svc['name']} has no port {port}")

for p in problems:
    print(f"  FAIL {p}")
note = f"; expects out-of-band Secret(s): {', '.join(sorted(external))}" if external else ""
print(f"policy   {'FAILED' if problems else 'ok'}: probes, resources, securityContext on "
      f"{containers} containers in {len(pods)} workloads; {refs} selectors/backends/targets checked{note}")
sys.exit(1 if problems else 0)
PY
}

failed=()
total=0
overlays=()
for dir in k8s/overlays/*/; do
  dir="${dir%/}"
  [ -f "$dir/kustomization.yaml" ] || continue
  overlays+=("$dir")
done
[ ${#overlays[@]} -gt 0 ] || die "no overlays found under k8s/overlays"

for dir in "${overlays[@]}"; do
  overlay="$(basename "$dir")"
  out="$tmp/$overlay.yaml"
  echo
  echo "== $dir"
  if ! "$KUBECTL" kustomize "$dir" >"$out" 2>"$tmp/$overlay.err"; then
    sed 's/^/  /' "$tmp/$overlay.err"
    echo "render   FAILED: kubectl kustomize $dir"
    failed+=("$overlay: render")
    continue
  fi
  count="$(python3 -c 'import sys, yaml; print(sum(1 for d in yaml.safe_load_all(open(sys.argv[1])) if d))' "$out")"
  total=$((total + count))
  echo "render   ok: $count objects"

  # kubernetes-validate only warns (exit 0) when it has no schema for a kind/apiVersion,
  # which would let a mistyped apiVersion through unchecked: count a WARN as a failure.
  rc=0
  kubernetes-validate "${versions[@]}" --strict "$out" >"$tmp/$overlay.validate" 2>&1 || rc=$?
  sed -e "s#$out#$dir#" -e 's/^INFO .* passed for resource /  ok   /' \
      -e 's/^ERROR /  FAIL /' -e 's/^WARN /  FAIL (no schema) /' "$tmp/$overlay.validate"
  passed="$(grep -c '^INFO .* passed' "$tmp/$overlay.validate" || true)"
  expected=$((count * $(wc -w <<<"$K8S_VERSION")))
  if [ "$rc" -ne 0 ] || grep -q '^WARN ' "$tmp/$overlay.validate" || [ "$passed" -ne "$expected" ]; then
    echo "schema   FAILED: $passed/$expected object checks passed (exit $rc)"
    failed+=("$overlay: schema")
  else
    echo "schema   ok: $passed/$expected object checks passed"
  fi

  policy_check "$out" "$overlay" || failed+=("$overlay: policy")
done

echo
if [ ${#failed[@]} -gt 0 ]; then
  echo "k8s-check: FAILED (${failed[*]})"
  exit 1
fi
echo "k8s-check: ${#overlays[@]} overlays, $total objects: all passed"
