#!/usr/bin/env bash
# Offline checks of the deployment files: every kustomize overlay renders (kubectl kustomize),
# yamllint passes on the sources, and deploy/checks/check_deploy.py checks the rendered objects
# and the Dockerfile (ports, probes, flags against the server binary, drain, security, apt
# packages). Needs kubectl, yamllint and python3-yaml (Debian packages); no cluster, no
# container engine. Exit 0 when everything passes, 1 otherwise.
#
# Schema validation of every rendered object against the Kubernetes API schemas (npm packages
# kubernetes-models and @kubernetes-models/prometheus-operator, run by node) happens when
# `npm ci --prefix deploy/checks` installed them, or always with --schema=required.
#
# usage: deploy/check.sh --server BIN [--cli BIN] [--dockerfile FILE] [--overlay DIR ...]
#                        [--schema=auto|required|off]
#   default overlays: deploy/k8s/base and every deploy/k8s/overlays/*; default Dockerfile: the
#   repository's; default --schema=auto.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
server="" cli="" dockerfile="$root/Dockerfile" overlays=() schema=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --server) server="$2"; shift 2 ;;
    --cli) cli="$2"; shift 2 ;;
    --dockerfile) dockerfile="$2"; shift 2 ;;
    --overlay) overlays+=("$2"); shift 2 ;;
    --schema=*) schema="${1#--schema=}"; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[ -n "$server" ] || { echo "--server BIN is required" >&2; exit 2; }
kubectl="${KUBECTL:-kubectl}"
for tool in yamllint python3; do
  # Exit 77: ctest reports the check as skipped, with this reason.
  command -v "$tool" >/dev/null || { echo "skipped: missing tool: $tool" >&2; exit 77; }
done
# Without kubectl (Debian 12 packages none recent enough) the source-level checks still run:
# yamllint of the sources, the Dockerfile against install-deps.sh and its flags against the
# binary. The rendering and the checks of rendered objects are then reported as skipped.
have_kubectl=1
command -v "$kubectl" >/dev/null || have_kubectl=0
python3 -c 'import yaml' 2>/dev/null || { echo "missing python3-yaml" >&2; exit 1; }
if [ ${#overlays[@]} -eq 0 ]; then
  overlays=("$root/deploy/k8s/base")
  for d in "$root"/deploy/k8s/overlays/*/; do overlays+=("${d%/}"); done
fi

status=0
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
rendered=()
for dir in "${overlays[@]}"; do
  [ $have_kubectl -eq 1 ] || break
  name="$(basename "$dir")"
  if "$kubectl" kustomize "$dir" > "$out/$name.yaml" 2> "$out/$name.err"; then
    echo "rendered $dir"
    rendered+=("$out/$name.yaml")
  else
    echo "FAIL kubectl kustomize $dir:" >&2; cat "$out/$name.err" >&2; status=1
  fi
done

lint_dirs=()
for dir in "${overlays[@]}"; do lint_dirs+=("$dir"); done
if ! yamllint -s -c "$root/deploy/.yamllint" "${lint_dirs[@]}"; then
  echo "FAIL yamllint" >&2; status=1
fi
if [ ${#rendered[@]} -gt 0 ] && ! yamllint -s \
    -d '{extends: relaxed, rules: {line-length: disable}}' "${rendered[@]}"; then
  echo "FAIL yamllint (rendered output)" >&2; status=1
fi

args=(--server "$server" --docs "$root/docs/server.md"
      --install-deps "$root/scripts/install-deps.sh" --dockerfile "$dockerfile")
[ -n "$cli" ] && args+=(--binary "$cli")
if ! python3 "$root/deploy/checks/check_deploy.py" "${args[@]}" "${rendered[@]}"; then
  status=1
fi
checks="$root/deploy/checks"
if [ "$schema" != off ]; then
  if [ -d "$checks/node_modules/kubernetes-models" ] && command -v node >/dev/null; then
    for r in "${rendered[@]}"; do
      echo "schema $(basename "$r")"
      if ! python3 -c 'import json, sys, yaml
print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))' "$r" \
          | node "$checks/validate_schema.mjs"; then
        status=1
      fi
    done
  elif [ "$schema" = required ]; then
    echo "FAIL schema validation: run npm ci --prefix deploy/checks (needs node)" >&2; status=1
  else
    echo "schema validation skipped: npm ci --prefix deploy/checks has not been run"
  fi
fi
if [ $status -eq 0 ] && [ $have_kubectl -eq 0 ]; then
  echo "source checks passed; skipped: missing tool: $kubectl (rendering, probes, schemas)" >&2
  exit 77
fi
[ $status -eq 0 ] && echo "deploy checks passed"
exit $status
