#!/usr/bin/env bash
# Lint everything under deploy/ with the tools that are installed; say which were missing.
#   yamllint, check-jsonschema (compose spec), docker-compose (`config -q`), hadolint,
#   helm (lint --strict + template) or the helm-python-sdk package (the same Helm library),
#   kubernetes-validate (rendered manifests against the Kubernetes 1.30 schemas).
set -uo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
status=0
missing=()
run() { echo "== $*"; "$@" || status=1; }
have() { command -v "$1" > /dev/null 2>&1; }

if have yamllint; then run yamllint -c .yamllint.yaml compose helm/localroute/Chart.yaml helm/localroute/values.yaml
else missing+=(yamllint); fi
if have check-jsonschema; then
  run check-jsonschema --builtin-schema vendor.compose-spec compose/docker-compose.yml
else missing+=(check-jsonschema); fi
if have docker-compose; then run docker-compose -f compose/docker-compose.yml config -q
elif docker compose version > /dev/null 2>&1; then run docker compose -f compose/docker-compose.yml config -q
else missing+=(docker-compose); fi
if have hadolint; then  # from the repository root: its .hadolint.yaml applies
  echo "== hadolint deploy/Dockerfile.cpu Dockerfile.gpu"
  (cd .. && hadolint deploy/Dockerfile.cpu Dockerfile.gpu) || status=1
else missing+=(hadolint); fi
run "$PY" -c "import json, sys; json.load(open('grafana/localroute.json'))"

rendered=$(mktemp -d)
trap 'rm -rf "$rendered"' EXIT
values='{"secret": {"frontierApiKey": "k", "routingLogUrl": "postgresql://u:p@pg/db", "redisUrl": "redis://r/0"}}'
if have helm; then
  run helm lint --strict helm/localroute
  helm template lr helm/localroute --set secret.frontierApiKey=k --output-dir "$rendered" > /dev/null || status=1
elif "$PY" -c "import helm_python" 2> /dev/null; then
  echo "== helm-python-sdk: lint --strict and render"
  "$PY" - "$rendered" "$values" << 'PYEOF' || status=1
import json, pathlib, sys
from helm_python import chart
out, values = pathlib.Path(sys.argv[1]), json.loads(sys.argv[2])
report = chart.lint("helm/localroute", values, strict=True, kube_version="v1.30.0")
for m in report["messages"]:
    print(f"  lint {m['severity']} {m['path']}: {m['error']}")
if report["errors"] or any(m["severity"] >= 2 for m in report["messages"]):
    sys.exit(1)
for name, text in chart.Chart.load("helm/localroute").render(values, name="lr", namespace="default").items():
    if name.endswith(".yaml") and text.strip():
        (out / name.replace("/", "_")).write_text(text)
PYEOF
else missing+=("helm (or helm-python-sdk)"); fi
if compgen -G "$rendered/*.yaml" > /dev/null; then
  if have yamllint; then run yamllint -c .yamllint.yaml "$rendered"; fi
  if have kubernetes-validate; then run kubernetes-validate -k 1.30.0 --strict --quiet "$rendered"/*.yaml
  else missing+=(kubernetes-validate); fi
fi
[ ${#missing[@]} -eq 0 ] || echo "not run (not installed): ${missing[*]}"
exit $status
