#!/usr/bin/env bash
# Checks the Kubernetes manifests offline: renders every kustomize overlay under
# k8s/overlays with `kubectl kustomize` (between them they include every component
# under k8s/components), validates every rendered object of a built-in kind against the
# Kubernetes OpenAPI schemas with kubernetes-validate (the schemas ship inside the
# package, so no cluster or network is needed), then checks what the schemas cannot:
# probes, resources and securityContext on every container (Job pods: no probes),
# references that resolve (Service/PDB/NetworkPolicy selectors, Ingress and HTTPRoute
# backends, HPA targets, ServiceMonitor Services and ports, Certificate issuers,
# Secret keys and ConfigMaps), egress to backend ports only towards named pods or
# CIDRs, and no Secret objects outside the dev overlay.
#
# Custom resources (ServiceMonitor, PrometheusRule, HTTPRoute, Certificate, Issuer,
# ScaledObject) are not given to kubernetes-validate: it has no schemas for CRDs and
# would only warn. Instead each must have an apiVersion from the allow-list below and
# the fields it cannot work without, checked in policy_check. Any other kind still goes
# to kubernetes-validate, where a missing schema (e.g. a mistyped apiVersion) fails.
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

# Splits a rendered overlay into built-in objects (for kubernetes-validate) and custom
# resources of the allow-list (for policy_check). Prints the two counts.
split_crds() { # rendered.yaml builtin.yaml
  python3 - "$1" "$2" <<'PY'
import sys
import yaml

CRD_GROUPS = ("monitoring.coreos.com/", "gateway.networking.k8s.io/", "cert-manager.io/", "keda.sh/")
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
builtin = [d for d in docs if not d.get("apiVersion", "").startswith(CRD_GROUPS)]
yaml.safe_dump_all(builtin, open(sys.argv[2], "w"), sort_keys=False)
print(len(builtin), len(docs) - len(builtin))
PY
}

# What the schemas cannot see. Prints one line per problem and exits 1 if there is any.
policy_check() { # rendered.yaml overlay-name
  python3 - "$1" "$2" "$SECRETS_ALLOWED_IN" <<'PY'
import ipaddress
import re
import sys
import yaml

path, overlay, secrets_allowed = sys.argv[1], sys.argv[2], sys.argv[3].split()
docs = [d for d in yaml.safe_load_all(open(path)) if d]
problems = []
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
# Custom resources we render: kind -> the one apiVersion accepted.
CRDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "HTTPRoute": "gateway.networking.k8s.io/v1",
    "Certificate": "cert-manager.io/v1",
    "Issuer": "cert-manager.io/v1",
    "ScaledObject": "keda.sh/v1alpha1",
}
CRD_GROUPS = ("monitoring.coreos.com/", "gateway.networking.k8s.io/", "cert-manager.io/", "keda.sh/")
# Ports of backends whose egress must name pods or CIDRs, never "anywhere".
BACKEND_PORTS = {5432: "Postgres", 6379: "Redis", 4317: "OTLP"}
DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")


def name(d):
    return f"{d['kind']}/{d['metadata']['name']}"


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def need(d, dotted):
    """The value at a dotted path of d, or a problem if it is missing or empty."""
    v = d
    for key in dotted.split("."):
        v = v.get(key) if isinstance(v, dict) else None
        if v in (None, "", [], {}):
            problems.append(f"{name(d)}: no {dotted}")
            return None
    return v


pods = {}  # workload -> (kind, pod labels, pod spec)
for d in docs:
    if d["kind"] in WORKLOADS:
        t = d["spec"]["template"]
        pods[name(d)] = (d["kind"], t["metadata"].get("labels", {}), t["spec"])

secrets = {d["metadata"]["name"]: set(d.get("data", {})) | set(d.get("stringData", {}))
           for d in docs if d["kind"] == "Secret"}
configmaps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
issuers = {d["metadata"]["name"] for d in docs if d["kind"] == "Issuer"}
certificates = {d["spec"].get("secretName"): d["metadata"]["name"] for d in docs if d["kind"] == "Certificate"}
external, from_certs = set(), set()
containers = 0

if secrets and overlay not in secrets_allowed:
    problems.append(f"renders Secret(s) {sorted(secrets)}: secrets are created out of band here")


def secret_ref(where, sname, key=None):
    if sname in secrets:
        if key is not None and key not in secrets[sname]:
            problems.append(f"{where}: Secret {sname} has no key {key}")
    elif sname in certificates:
        from_certs.add(sname)
    else:
        external.add(sname)


for wl, (kind, labels, spec) in pods.items():
    psc = spec.get("securityContext", {})
    if spec.get("automountServiceAccountToken") is not False:
        problems.append(f"{wl}: automountServiceAccountToken is not false")
    if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append(f"{wl}: pod seccompProfile is not RuntimeDefault")
    if kind == "Job" and spec.get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append(f"{wl}: restartPolicy is not Never or OnFailure")
    for v in spec.get("volumes", []):
        if "configMap" in v and v["configMap"]["name"] not in configmaps:
            problems.append(f"{wl}: volume {v['name']}: ConfigMap {v['configMap']['name']} is not rendered")
        if "secret" in v:
            secret_ref(f"{wl} volume {v['name']}", v["secret"]["secretName"])
    inits = spec.get("initContainers", [])
    for c in inits + spec["containers"]:
        containers += 1
        where = f"{wl} container {c['name']}"
        # Init containers and Jobs run to completion: no readiness or liveness.
        for probe in () if c in inits or kind == "Job" else ("readinessProbe", "livenessProbe"):
            if probe not in c:
                problems.append(f"{where}: no {probe}")
        res = c.get("resources", {})
        for rkind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(rkind, {}):
                    problems.append(f"{where}: no {rkind}.{r}")
        sc = c.get("securityContext", {})
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem is not true")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.append(f"{where}: capabilities do not drop ALL")
        for m in c.get("volumeMounts", []):
            if m.get("subPath") and any(v["name"] == m["name"] and "secret" in v for v in spec.get("volumes", [])):
                problems.append(f"{where}: Secret volume {m['name']} mounted with subPath (never updated on rotation)")
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                secret_ref(where, ref["name"], ref["key"])
        for e in c.get("envFrom", []):
            if "configMapRef" in e and e["configMapRef"]["name"] not in configmaps:
                problems.append(f"{where}: envFrom ConfigMap {e['configMapRef']['name']} is not rendered")


def service_port(where, svc, port):
    s = services.get(svc)
    if s is None:
        problems.append(f"{where}: Service {svc} is not rendered")
    elif port not in [x.get("name") for x in s["spec"]["ports"]] + [x["port"] for x in s["spec"]["ports"]]:
        problems.append(f"{where}: Service {svc} has no port {port}")


refs = crds = 0
for d in docs:
    kind, spec = d["kind"], d.get("spec", {})
    if d.get("apiVersion", "").startswith(CRD_GROUPS):
        crds += 1
        if CRDS.get(kind) != d["apiVersion"]:
            problems.append(f"{name(d)}: apiVersion {d['apiVersion']} is not in the allow-list "
                            f"({CRDS.get(kind, 'no custom resource of this kind is expected')})")
            continue
    if kind == "Service" and spec.get("selector"):
        refs += 1
        if not any(selects(spec["selector"], l) for _, l, _ in pods.values()):
            problems.append(f"{name(d)}: selector {spec['selector']} matches no pod template")
    elif kind in ("PodDisruptionBudget", "NetworkPolicy"):
        sel = (spec.get("selector") if kind == "PodDisruptionBudget" else spec.get("podSelector")) or {}
        refs += 1
        if not any(selects(sel.get("matchLabels", {}), l) for _, l, _ in pods.values()):
            problems.append(f"{name(d)}: selector {sel} matches no pod template")
        for rule in spec.get("egress", []) if kind == "NetworkPolicy" else []:
            ports = {p.get("port") for p in rule.get("ports", [])}
            for port in sorted(ports & set(BACKEND_PORTS)):
                if not rule.get("to"):
                    problems.append(f"{name(d)}: egress to {BACKEND_PORTS[port]} ({port}) is open to any address")
            for peer in rule.get("to", []):
                if "ipBlock" in peer:
                    ipaddress.ip_network(peer["ipBlock"]["cidr"])
                    if (peer["ipBlock"]["cidr"] in ("0.0.0.0/0", "::/0") and not peer["ipBlock"].get("except")
                            and ports & set(BACKEND_PORTS)):
                        problems.append(f"{name(d)}: egress to backend ports is open to {peer['ipBlock']['cidr']}")
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
                service_port(name(d), svc["name"], svc["port"].get("name", svc["port"].get("number")))
    elif kind == "ServiceMonitor":
        refs += 1
        sel = (need(d, "spec.selector") or {}).get("matchLabels", {})
        matched = [s for s in services.values() if selects(sel, s["metadata"].get("labels", {}))]
        if not matched:
            problems.append(f"{name(d)}: selector {sel} matches no rendered Service")
        for ep in need(d, "spec.endpoints") or []:
            if "port" not in ep:
                problems.append(f"{name(d)}: an endpoint has no named port")
            for s in matched:
                service_port(name(d), s["metadata"]["name"], ep.get("port"))
    elif kind == "PrometheusRule":
        for g in need(d, "spec.groups") or []:
            for r in g.get("rules", []):
                if ("alert" in r) == ("record" in r) or not r.get("expr"):
                    problems.append(f"{name(d)}: group {g.get('name')}: a rule needs expr and one of alert/record")
                elif "alert" in r and not r.get("labels", {}).get("severity"):
                    problems.append(f"{name(d)}: alert {r['alert']} has no severity label")
    elif kind == "HTTPRoute":
        for p in need(d, "spec.parentRefs") or []:
            if not p.get("name"):
                problems.append(f"{name(d)}: a parentRef has no name")
        for rule in need(d, "spec.rules") or []:
            for b in rule.get("backendRefs", []):
                refs += 1
                if b.get("kind", "Service") == "Service":
                    service_port(name(d), b["name"], b.get("port"))
            for key, value in rule.get("timeouts", {}).items():
                if key not in ("request", "backendRequest") or not DURATION.match(str(value)):
                    problems.append(f"{name(d)}: timeouts.{key}: {value!r} is not a Gateway API duration")
    elif kind == "Certificate":
        refs += 1
        need(d, "spec.secretName")
        ref = need(d, "spec.issuerRef") or {}
        if ref.get("kind", "Issuer") == "Issuer" and ref.get("name") not in issuers:
            problems.append(f"{name(d)}: Issuer {ref.get('name')} is not rendered")
        if not any(spec.get(k) for k in ("commonName", "dnsNames", "uris", "ipAddresses", "emailAddresses")):
            problems.append(f"{name(d)}: no commonName, dnsNames, uris, ipAddresses or emailAddresses")
    elif kind == "Issuer":
        types = [k for k in ("selfSigned", "ca", "acme", "vault", "venafi") if k in spec]
        if len(types) != 1:
            problems.append(f"{name(d)}: needs exactly one issuer type, has {types}")
        elif types == ["ca"]:
            refs += 1
            sname = spec["ca"].get("secretName")
            if sname not in certificates and sname not in secrets:
                problems.append(f"{name(d)}: CA Secret {sname} is neither rendered nor a Certificate's")
    elif kind == "ScaledObject":
        refs += 1
        t = need(d, "spec.scaleTargetRef") or {}
        if f"{t.get('kind', 'Deployment')}/{t.get('name')}" not in pods:
            problems.append(f"{name(d)}: scale target {t.get('name')} is not rendered")
        need(d, "spec.triggers")

for p in problems:
    print(f"  FAIL {p}")
notes = []
if external:
    notes.append(f"expects out-of-band Secret(s): {', '.join(sorted(external))}")
if from_certs:
    notes.append(f"Secret(s) from cert-manager: {', '.join(sorted(from_certs))}")
print(f"policy   {'FAILED' if problems else 'ok'}: probes, resources, securityContext on "
      f"{containers} containers in {len(pods)} workloads; {refs} selectors/backends/targets/references "
      f"checked; {crds} custom resources checked structurally"
      + "".join(f"; {n}" for n in notes))
sys.exit(1 if problems else 0)
PY
}

# Every component must be included by some overlay, or nothing would check it.
components_check() {
  python3 - <<'PY'
import os
import sys
import yaml

used = set()
for overlay in sorted(os.listdir("k8s/overlays")):
    k = os.path.join("k8s/overlays", overlay, "kustomization.yaml")
    if os.path.exists(k):
        for c in yaml.safe_load(open(k)).get("components", []):
            used.add(os.path.normpath(os.path.join("k8s/overlays", overlay, c)))
have = {os.path.join("k8s/components", c) for c in os.listdir("k8s/components")} if os.path.isdir("k8s/components") else set()
problems = [f"{m} is included by no overlay under k8s/overlays, so nothing renders or checks it"
            for m in sorted(have - used)]

# The HPA's pods metric must be one the Prometheus Adapter rule serves (that file is
# configuration for the adapter, not a kustomize resource).
hpa, adapter = "k8s/components/connections-hpa/patch-hpa.yaml", "k8s/components/connections-hpa/prometheus-adapter-values.yaml"
if os.path.exists(hpa):
    wanted = {op["value"]["pods"]["metric"]["name"] for op in yaml.safe_load(open(hpa)) if op["value"].get("type") == "Pods"}
    served = {r.get("name", {}).get("as") for r in (yaml.safe_load(open(adapter)) or {}).get("rules", {}).get("custom", [])}
    problems += [f"{hpa}: pods metric {m} is served by no rule in {adapter}" for m in sorted(wanted - served)]

for p in problems:
    print(f"  FAIL {p}")
print(f"components {'FAILED' if problems else 'ok'}: {len(have)} under k8s/components, each included by an overlay; "
      f"HPA pods metrics served by the adapter rules")
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

echo
components_check || failed+=("components")

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
  read -r count ncrd < <(split_crds "$out" "$tmp/$overlay.builtin.yaml")
  total=$((total + count + ncrd))
  echo "render   ok: $((count + ncrd)) objects ($ncrd custom resources, checked by policy only)"

  # kubernetes-validate only warns (exit 0) when it has no schema for a kind/apiVersion,
  # which would let a mistyped apiVersion through unchecked: count a WARN as a failure.
  rc=0
  kubernetes-validate "${versions[@]}" --strict "$tmp/$overlay.builtin.yaml" >"$tmp/$overlay.validate" 2>&1 || rc=$?
  sed -e "s#$tmp/$overlay.builtin.yaml#$dir#" -e 's/^INFO .* passed for resource /  ok   /' \
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
