#!/usr/bin/env bash
# Checks the alerting rules offline. Their one source is the PrometheusRule in
# k8s/components/prometheus-operator/prometheusrule.yaml; this script extracts its
# `spec` (a plain Prometheus rules file) into a temporary directory and
#   1. runs `promtool check rules` on it (PromQL and annotation templates parse),
#   2. checks every alert for a severity (critical or warning), a summary, a
#      description and a runbook_url whose anchor is a section of docs/runbook.md, and
#      that docs/runbook.md has no section for an alert that does not exist,
#   3. runs `promtool test rules` with chat-alerts.test.yml (annotations removed from
#      the copy under test: the cases state when an alert fires and with which labels),
#      and checks that every alert has a case where it fires and one where it does not.
# Exits non-zero on any failure.
#
#   bash deploy/prometheus/check-rules.sh
#
# Needs promtool (Debian: apt-get install prometheus) and python3 with PyYAML.
set -euo pipefail
cd "$(dirname "$0")/../.."

RULE=k8s/components/prometheus-operator/prometheusrule.yaml
TESTS=deploy/prometheus/chat-alerts.test.yml
RUNBOOK=docs/runbook.md

die() { echo "check-rules: $*" >&2; exit 1; }
command -v promtool >/dev/null 2>&1 || die "promtool not found: apt-get install prometheus"
python3 -c 'import yaml' 2>/dev/null || die "python3 cannot import yaml: pip install pyyaml"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/check" "$tmp/test"

echo "check-rules: $(promtool --version 2>&1 | head -n1), rules from $RULE"

failed=()
if python3 - "$RULE" "$TESTS" "$RUNBOOK" "$tmp" <<'PY'
import re
import sys
import yaml

rule_path, tests_path, runbook_path, tmp = sys.argv[1:]
doc = yaml.safe_load(open(rule_path))
if doc.get("kind") != "PrometheusRule":
    sys.exit(f"{rule_path}: not a PrometheusRule")
spec = doc["spec"]
yaml.safe_dump(spec, open(f"{tmp}/check/chat-alerts.rules.yml", "w"), sort_keys=False)

# GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes.
def slug(heading):
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")

anchors = {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", open(runbook_path).read(), re.M)}
alert_sections = {a for a in anchors if a.startswith("chat")}

problems, alerts = [], []
for group in spec["groups"]:
    for rule in group["rules"]:
        if "alert" not in rule:
            continue
        name = rule["alert"]
        alerts.append(name)
        if rule.get("labels", {}).get("severity") not in ("critical", "warning"):
            problems.append(f"{name}: severity is not critical or warning")
        ann = rule.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            if not ann.get(key):
                problems.append(f"{name}: no {key} annotation")
        url = ann.get("runbook_url", "")
        m = re.search(r"docs/runbook\.md#([\w-]+)$", url)
        if not m:
            problems.append(f"{name}: runbook_url {url!r} does not point into docs/runbook.md")
        elif m.group(1) not in anchors:
            problems.append(f"{name}: {runbook_path} has no section #{m.group(1)}")
        elif m.group(1) != name.lower():
            problems.append(f"{name}: runbook anchor #{m.group(1)} is not the alert's name")

for extra in sorted(alert_sections - {a.lower() for a in alerts}):
    problems.append(f"{runbook_path}: section #{extra} names no alert")

# Which alerts the tests show firing and staying silent.
fires, silent = set(), set()
for test in yaml.safe_load(open(tests_path))["tests"]:
    for case in test.get("alert_rule_test", []):
        (fires if case.get("exp_alerts") else silent).add(case["alertname"])
for name in alerts:
    if name not in fires:
        problems.append(f"{name}: no test case where it fires")
    if name not in silent:
        problems.append(f"{name}: no test case where it stays silent")

for group in spec["groups"]:
    for rule in group["rules"]:
        rule.pop("annotations", None)
yaml.safe_dump(spec, open(f"{tmp}/test/chat-alerts.rules.yml", "w"), sort_keys=False)

for p in problems:
    print(f"  FAIL {p}")
print(f"alerts   {'FAILED' if problems else 'ok'}: {len(alerts)} alerts with severity, summary, "
      f"description and a runbook section; each fires and stays silent in a test")
sys.exit(1 if problems else 0)
PY
then :; else failed+=("alert metadata"); fi
[ -s "$tmp/test/chat-alerts.rules.yml" ] || die "could not extract the rules from $RULE"
if promtool check rules "$tmp/check/chat-alerts.rules.yml" >"$tmp/check.out" 2>&1; then
  echo "syntax   ok: promtool check rules: $(sed -n 's/^ *SUCCESS: //p' "$tmp/check.out")"
else
  sed -e "s#$tmp/check/chat-alerts.rules.yml#$RULE (spec)#" -e 's/^/  /' "$tmp/check.out"
  echo "syntax   FAILED: promtool check rules"
  failed+=("promtool check rules")
fi

cp "$TESTS" "$tmp/test/"
if promtool test rules "$tmp/test/$(basename "$TESTS")" >"$tmp/test.out" 2>&1; then
  echo "tests    ok: $(grep -c 'alertname:' "$TESTS") alert cases in $TESTS"
else
  sed -e "s#$tmp/test/##" -e 's/^/  /' "$tmp/test.out"
  echo "tests    FAILED: promtool test rules $TESTS"
  failed+=("promtool test rules")
fi

if [ ${#failed[@]} -gt 0 ]; then
  echo "check-rules: FAILED (${failed[*]})"
  exit 1
fi
echo "check-rules: all passed"
