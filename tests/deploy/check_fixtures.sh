#!/usr/bin/env bash
# Tests deploy/check.sh itself: the broken fixtures must fail, each for every planted reason.
# usage: check_fixtures.sh SOURCE_DIR SERVER_BIN CLI_BIN
set -uo pipefail
src="$1" server="$2" cli="$3"
fx="$src/tests/deploy/fixtures"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
"$src/deploy/check.sh" --server "$server" --cli "$cli" \
  --overlay "$fx/broken-overlay" --dockerfile "$fx/broken-docker/Dockerfile" > "$log" 2>&1
rc=$?
cat "$log"
if [ $rc -eq 77 ]; then exit 77; fi  # yamllint or python3 missing: skipped, reason above
if [ $rc -eq 0 ]; then
  echo "TEST FAIL: deploy/check.sh accepted the broken fixtures"; exit 1
fi
# Faults in rendered objects (need kubectl), then faults of the Dockerfile (checked always).
rendered_expected=(
  "readinessProbe port 8080 is not the gRPC port 50051"
  "readinessProbe service '', expected 'nvfp4cal.v1.Calibrator'"
  "terminationGracePeriodSeconds 20 is not above"
  "readOnlyRootFilesystem is not true"
  "rollout must be RollingUpdate maxSurge 0"
  "PodDisruptionBudget selector does not match the pods"
  "flag --drain_timout does not exist"
  "--device=cpu with nvidia.com/gpu limit 1"
  "HorizontalPodAutoscaler nvfp4cal-old: apiVersion autoscaling/v1, expected autoscaling/v2"
)
expected=(
  "build stage installs curl"
  "runtime stage installs build package libprotobuf-dev"
  "runtime stage lacks package libgrpc++1.51"
  "runtime package libnosuch42 is unknown to apt"
  "runtime stage does not run as a non-root USER"
  "ENTRYPOINT is not exec form"
  "Dockerfile CMD: flag --listen does not exist"
  "port 9400 is not EXPOSEd"
  "no HEALTHCHECK"
  "runtime stage does not copy the nvfp4cal CLI"
  "build stage installs no CUDA compiler"
)
if command -v "${KUBECTL:-kubectl}" > /dev/null; then
  expected+=("${rendered_expected[@]}")
else
  echo "kubectl missing: only the Dockerfile's planted faults are expected"
fi
# Schema faults are only reported where the schema packages are installed (and kubectl renders).
if command -v "${KUBECTL:-kubectl}" > /dev/null &&
    [ -d "$src/deploy/checks/node_modules/kubernetes-models" ]; then
  expected+=("FAIL schema: ServiceMonitor nvfp4cal: data/spec/endpoints/0/interval must be string")
fi
missing=0
for e in "${expected[@]}"; do
  if ! grep -qF -- "$e" "$log"; then echo "TEST FAIL: no failure reported for: $e"; missing=1; fi
done
# yamllint must reject a source file with a lint error.
bad="$(mktemp -d)"
printf -- '---\nkey: 1\nkey: 2   \n' > "$bad/bad.yaml"
if yamllint -s -c "$src/deploy/.yamllint" "$bad" > /dev/null 2>&1; then
  echo "TEST FAIL: yamllint accepted a duplicate key and trailing spaces"; missing=1
fi
rm -rf "$bad"
[ $missing -eq 0 ] && echo "every planted fault was reported"
exit $missing
