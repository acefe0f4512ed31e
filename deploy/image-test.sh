#!/usr/bin/env bash
# Builds the container image (Dockerfile) with podman and runs it the way deploy/k8s runs it,
# then checks it. No registry is needed: the debian:12-slim (and, for --backend=cpu, debian:12)
# base images are made with mmdebstrap from the Debian mirror this machine's apt uses and
# imported under those names; their root filesystem tarballs and podman's layer cache are kept
# in the cache folder between runs.
#
# Checks (each prints "ok <check>" or "FAIL <check>: ..."):
#   image-user     the image's USER is the manifests' runAsUser:runAsGroup (non-root)
#   image-size     the image is at most NVFP4CAL_IMAGE_MAX_MB MiB (default 250)
#   image-clean    no compiler, headers or build tree in the image
#   version        `nvfp4cal-server --version` in the image (read-only root, non-root user)
#                  prints what the host binary prints; `nvfp4cal --help` runs too
#   start          the server starts with the cpu-only overlay's flags (a mounted flagfile,
#                  read-only root, tmpfs /tmp, all capabilities dropped, no new privileges)
#                  and runs as that user
#   liveness       grpc.health.v1 on the liveness/startup probe's port and service is SERVING
#   readiness      the same on the readiness probe's port and service (nvfp4cal.v1.Calibrator)
#   quantize       `nvfp4cal quantize --server` (host CLI) of the example checkpoint is
#                  byte-identical to the in-process quantize
#   metrics        GET /metrics on the metrics port has nvfp4cal_queue_depth and a nonzero
#                  nvfp4cal_blocks_quantized_total
#   drain          `podman stop` (SIGTERM) ends the container with exit code 0 within the
#                  manifests' terminationGracePeriodSeconds minus preStop
#
# usage: deploy/image-test.sh [--server BIN --cli BIN] [--backend=prebuilt|cpu]
#                             [--dockerfile FILE] [--fail-fast] [--self-test]
#   --server/--cli: the host's binaries (default build/server/nvfp4cal-server and
#     build/client/nvfp4cal); the CLI makes the example checkpoint and the reference quantize.
#   --backend=prebuilt (default): the image's build stage takes these binaries (Dockerfile
#     BACKEND=prebuilt, built on the host: Debian 12, same libraries) instead of compiling;
#     --backend=cpu compiles them in the image's build stage (debian:12 + install-deps.sh; slow).
#   --fail-fast: exit 1 at the first failed check (the self-test's variants use it).
#   --self-test: builds deliberately broken variants of the Dockerfile (a runtime library
#     package removed, USER root, a build tree left in /src, SIGKILL as stop signal) and
#     requires this script to fail each of them on the check that covers the fault.
#
# Environment: NVFP4CAL_IMAGE_CACHE (default ${XDG_CACHE_HOME:-~/.cache}/nvfp4cal-image: base
# tarballs and podman storage; delete it to refresh the base images), NVFP4CAL_IMAGE_MIRROR (the
# mirror argument of mmdebstrap; default this machine's Debian apt sources file),
# NVFP4CAL_IMAGE_STORAGE_DRIVER (overlay as root, vfs otherwise), NVFP4CAL_IMAGE_RUNTIME (runc
# when installed, else podman's default), NVFP4CAL_IMAGE_NETWORK (private, the default: the
# container gets its own network namespace and its ports are published on 127.0.0.1; host: the
# container shares the host's, where CNI/iptables or slirp4netns do not work, and the flagfile's
# ports are moved to free ones; the build's apt-get always uses the host's network),
# NVFP4CAL_IMAGE_MAX_MB.
# Exit 0: every check passed; 1: a check failed; 77: skipped (a tool is missing; the reason is
# printed), which ctest reports as skipped.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
server="$root/build/server/nvfp4cal-server"
cli="$root/build/client/nvfp4cal"
backend=prebuilt
dockerfile="$root/Dockerfile"
self_test=0
fail_fast=0
tag=localhost/nvfp4cal-image-test:latest
while [ $# -gt 0 ]; do
  case "$1" in
    --server) server="$2"; shift 2 ;;
    --cli) cli="$2"; shift 2 ;;
    --backend=*) backend="${1#--backend=}"; shift ;;
    --dockerfile) dockerfile="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    --self-test) self_test=1; shift ;;
    --fail-fast) fail_fast=1; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
case "$backend" in prebuilt|cpu) ;; *) echo "--backend must be prebuilt or cpu" >&2; exit 2 ;; esac
# CNI's bridge plugin runs iptables, which is in sbin (not in a non-root user's PATH).
export PATH="$PATH:/usr/sbin:/sbin"
start=$SECONDS
log() { echo "[$((SECONDS - start)) s] $*"; }
skip() { echo "skipped: $*" >&2; exit 77; }

# --- tools ---------------------------------------------------------------------------------
for tool in podman mmdebstrap; do
  command -v "$tool" >/dev/null || skip "missing tool: $tool (scripts/install-deps.sh installs it)"
done
# A python3 with grpcio and yaml (Debian's; a python3 earlier in PATH may lack them).
python=""
for p in ${PYTHON:-} python3 /usr/bin/python3; do
  if "$p" -c 'import grpc, yaml' 2>/dev/null; then python="$p"; break; fi
done
[ -n "$python" ] || skip "no python3 with grpc and yaml (python3-grpcio, python3-yaml)"
[ -x "$server" ] && [ -x "$cli" ] || { echo "no binaries: $server, $cli" >&2; exit 2; }
if [ "$(id -u)" != 0 ] && ! grep -q "^$(id -un):" /etc/subuid 2>/dev/null; then
  skip "rootless podman and mmdebstrap need a range in /etc/subuid for $(id -un) (uidmap)"
fi

cache="${NVFP4CAL_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nvfp4cal-image}"
mkdir -p "$cache/base"
driver="${NVFP4CAL_IMAGE_STORAGE_DRIVER:-}"
if [ -z "$driver" ]; then
  if [ "$(id -u)" = 0 ] && grep -qw overlay /proc/filesystems; then driver=overlay; else driver=vfs; fi
fi
network="${NVFP4CAL_IMAGE_NETWORK:-private}"
# runc works with cgroups v1, v2 and hybrid; Debian 12's crun refuses hybrid mode.
runtime="${NVFP4CAL_IMAGE_RUNTIME:-}"
if [ -z "$runtime" ] && command -v runc >/dev/null; then runtime=runc; fi
max_mb="${NVFP4CAL_IMAGE_MAX_MB:-250}"
# Own storage (layer cache kept between runs) and runtime folder; cgroupfs and the file events
# backend work without systemd (containers, CI runners) and with cgroups v1 or v2.
runroot="${XDG_RUNTIME_DIR:-/tmp}/nvfp4cal-image-run-$(id -u)"
pm() {
  podman --root "$cache/storage-$driver" --runroot "$runroot" --storage-driver "$driver" \
    --cgroup-manager cgroupfs --events-backend file ${runtime:+--runtime "$runtime"} "$@"
}

work="$(mktemp -d)"
container=""
cleanup() {
  [ -n "$container" ] && pm rm -f -t 0 "$container" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# --- self-test: broken variants must fail ----------------------------------------------------
if [ $self_test = 1 ]; then
  status=0
  variant() {  # NAME EXPECTED_FAIL_CHECK SED_SCRIPT
    local name="$1" expect="$2" script="$3"
    mkdir -p "$work/$name"
    sed -e "$script" "$dockerfile" > "$work/$name/Dockerfile"
    if cmp -s "$dockerfile" "$work/$name/Dockerfile"; then
      echo "self-test $name: the edit did not change the Dockerfile" >&2; status=1; return
    fi
    log "self-test $name: expecting FAIL $expect"
    local rc=0
    "$0" --server "$server" --cli "$cli" --backend="$backend" --fail-fast \
      --dockerfile "$work/$name/Dockerfile" --tag "localhost/nvfp4cal-image-test:$name" \
      > "$work/$name.log" 2>&1 || rc=$?
    if [ $rc = 1 ] && grep -q "^FAIL $expect" "$work/$name.log"; then
      echo "ok self-test $name: $(grep "^FAIL $expect" "$work/$name.log" | head -1)"
    else
      echo "FAIL self-test $name: exit $rc, no 'FAIL $expect'; log:" >&2
      cat "$work/$name.log" >&2; status=1
    fi
    pm rmi -f "localhost/nvfp4cal-image-test:$name" >/dev/null 2>&1 || true
  }
  variant missing-library version 's/ liblapack3 / /'
  variant root-user image-user 's/^USER 10001:10001$/USER root/'
  variant build-tree image-clean 's|^COPY --from=build /out/bin/nvfp4cal-server .*|&\nCOPY --from=build /out/ /src/build/|'
  variant no-drain drain 's|^ENTRYPOINT |STOPSIGNAL SIGKILL\n&|'
  [ $status = 0 ] && log "self-test passed: every broken variant failed its check"
  exit $status
fi

# --- what the manifests say ------------------------------------------------------------------
"$python" - "$root/deploy/k8s/base/deployment.yaml" > "$work/manifest.env" <<'EOF'
import sys, yaml
d = yaml.safe_load(open(sys.argv[1]))
pod = d["spec"]["template"]["spec"]
c = pod["containers"][0]
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
sc = pod.get("securityContext", {})
pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
prestop = int(pre[1]) if len(pre) == 2 and pre[0] == "sleep" else 0
print(f"grpc_port={ports['grpc']} metrics_port={ports['metrics']}")
print(f"live_port={c['livenessProbe']['grpc']['port']} "
      f"live_service='{c['livenessProbe']['grpc'].get('service', '')}'")
print(f"ready_port={c['readinessProbe']['grpc']['port']} "
      f"ready_service='{c['readinessProbe']['grpc'].get('service', '')}'")
print(f"run_user={sc['runAsUser']} run_group={sc['runAsGroup']}")
print(f"grace={pod['terminationGracePeriodSeconds']} prestop={prestop}")
EOF
. "$work/manifest.env"
flags="$root/deploy/k8s/overlays/cpu-only/server.flags"

# --- base images -----------------------------------------------------------------------------
mirror="${NVFP4CAL_IMAGE_MIRROR:-}"
if [ -z "$mirror" ]; then
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [ -s "$f" ]; then mirror="$f"; break; fi
  done
  mirror="${mirror:-http://deb.debian.org/debian}"
fi
base_image() {  # NAME (12 or 12-slim)
  local name="$1" tarball="$cache/base/debian-$1.tar"
  # merged-usr hook: /usr merged by mmdebstrap and usr-is-merged installed, as in the official
  # images (without it apt satisfies init-system-helpers with usrmerge, which pulls in perl).
  local opts=(--variant=minbase --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr)
  if [ "$name" = 12-slim ]; then
    # As the official slim image: no documentation, man pages or locales (also for packages
    # installed later, dpkg's path-exclude stays in the image).
    for p in doc info man locale groff linda lintian; do
      opts+=("--dpkgopt=path-exclude=/usr/share/$p/*")
    done
    opts+=(--dpkgopt='path-include=/usr/share/doc/*/copyright'
           --dpkgopt='path-include=/usr/share/locale/locale.alias')
  fi
  if pm image exists "docker.io/library/debian:$name"; then return; fi
  if [ ! -s "$tarball" ]; then
    log "mmdebstrap debian:$name from $mirror"
    # The name must end in .tar (mmdebstrap picks the output format from it).
    rm -rf "$cache/base/partial-$name.tar"
    mmdebstrap "${opts[@]}" --aptopt='Acquire::Retries "3"' bookworm \
      "$cache/base/partial-$name.tar" "$mirror"
    mv "$cache/base/partial-$name.tar" "$tarball"
  fi
  log "import debian:$name"
  pm import --quiet "$tarball" "docker.io/library/debian:$name" >/dev/null
}
base_image 12-slim
[ "$backend" = cpu ] && base_image 12

# --- build -----------------------------------------------------------------------------------
if [ "$backend" = prebuilt ]; then
  # The build context: the two binaries, and in lib/ the shared libraries they link that no
  # Debian package provides (libcudart when the host build has the CUDA backend).
  ctx="$work/context"
  mkdir -p "$ctx/bin" "$ctx/lib"
  cp "$server" "$ctx/bin/nvfp4cal-server"
  cp "$cli" "$ctx/bin/nvfp4cal"
  libs="$(ldd "$server" "$cli" | sed -n 's/.*=> \(\/[^ ]*\) .*/\1/p' | sort -u)"
  owned="$(for l in $libs; do echo "$l"; readlink -f "$l"; done | sort -u |
           xargs dpkg -S 2>/dev/null | sed 's/^.*: //' || true)"
  for lib in $libs; do
    if ! grep -qxF -e "$lib" -e "$(readlink -f "$lib")" <<< "$owned"; then
      echo "copying $lib (no Debian package provides it) into the image"
      cp -L "$lib" "$ctx/lib/"
    fi
  done
else
  ctx="$root"
fi
log "build $tag (BACKEND=$backend, storage $driver, cache $cache)"
pm build --format docker --pull=never --network=host --build-arg BACKEND="$backend" \
  -f "$dockerfile" -t "$tag" "$ctx"
log "built"

status=0
ok() { echo "ok $*"; }
fail() {
  echo "FAIL $*"; status=1
  if [ $fail_fast = 1 ]; then exit 1; fi
}

# --- static checks ---------------------------------------------------------------------------
# podman's default rlimits for root (nofile 1048576, nproc 4194304) can be above what this
# process may set (no CAP_SYS_RESOURCE in sandboxes): take the host's open files limit and a
# process limit far above the server's threads.
hard_nofile="$(ulimit -Hn)"
[ "$hard_nofile" = unlimited ] && hard_nofile=1048576
# --no-healthcheck: the HEALTHCHECK would need systemd timers (Kubernetes ignores it anyway).
limits=(--no-healthcheck --ulimit "nofile=$hard_nofile:$hard_nofile" --ulimit nproc=8192:8192)
user="$(pm image inspect --format '{{.Config.User}}' "$tag")"
if [ "$user" = "$run_user:$run_group" ] || [ "$user" = "$run_user" ]; then
  ok "image-user: $user (runAsUser $run_user, runAsGroup $run_group)"
else
  fail "image-user: image USER is '${user:-(none: root)}', the manifests run $run_user:$run_group" \
       "with runAsNonRoot"
fi
size="$(pm image inspect --format '{{.Size}}' "$tag")"
size_mb=$((size / 1048576))
if [ "$size_mb" -le "$max_mb" ]; then ok "image-size: $size_mb MiB (limit $max_mb)"
else fail "image-size: $size_mb MiB, above the limit of $max_mb MiB"; fi
found="$(pm run --rm --network=none "${limits[@]}" --entrypoint /bin/sh "$tag" -c '
  for p in /usr/bin/gcc* /usr/bin/g++* /usr/bin/cc /usr/bin/c++ /usr/bin/cpp /usr/bin/clang* \
           /usr/bin/ld /usr/bin/as /usr/bin/cmake /usr/bin/ninja /usr/bin/make /usr/bin/protoc \
           /usr/local/cuda* /usr/include/c++ /src /build; do
    [ -e "$p" ] && echo "$p"
  done
  find / -xdev \( -name "*.h" -o -name "*.hpp" -o -name "*.a" -o -name CMakeCache.txt \
                  -o -name "*.o" \) -print 2>/dev/null | head -5
  echo scanned' 2>&1)" || true
if [ "$found" = scanned ]; then ok "image-clean: no compiler, headers or build tree"
else fail "image-clean: found $(echo ${found%scanned})"; fi

# --- the binaries in the image, as the manifests run them ------------------------------------
run_opts=("${limits[@]}" --read-only --read-only-tmpfs=false --tmpfs /tmp:size=64m --user "$run_user:$run_group"
          --cap-drop=all --security-opt=no-new-privileges)
want="$("$server" --version 2>&1)"
got="$(pm run --rm --network=none "${run_opts[@]}" "$tag" --version 2>&1)" || true
if [ "$got" = "$want" ] &&
   pm run --rm --network=none "${run_opts[@]}" --entrypoint nvfp4cal "$tag" --help >/dev/null 2>&1
then
  ok "version: $(echo $got) (and nvfp4cal --help)"
else
  fail "version: expected '$(echo $want)', got: $got"
fi

# --- the server ------------------------------------------------------------------------------
mkdir -p "$work/flags"
cp "$flags" "$work/flags/flags"
net_opts=()
if [ "$network" = host ]; then
  # The container shares the host's ports: move the flagfile's ports to free ones.
  free_ports="$("$python" -c 'import socket
ss = [socket.socket() for _ in range(3)]
for s in ss: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))')"
  read -r p_grpc p_metrics p_health <<< "$free_ports"
  sed -i -e "s/:$grpc_port\$/:$p_grpc/" -e "s/:$metrics_port\$/:$p_metrics/" \
         -e "s/:$live_port\$/:$p_health/" "$work/flags/flags"
  declare -A hostport=([$grpc_port]=$p_grpc [$metrics_port]=$p_metrics [$live_port]=$p_health)
  net_opts=(--network=host)
else
  net_opts=(-p "127.0.0.1::$grpc_port" -p "127.0.0.1::$metrics_port" -p "127.0.0.1::$live_port")
fi
container="nvfp4cal-image-test-$$"
started=1
if ! pm run -d --name "$container" "${run_opts[@]}" "${net_opts[@]}" \
     -v "$work/flags:/etc/nvfp4cal:ro" "$tag" --flagfile=/etc/nvfp4cal/flags > "$work/run.log" 2>&1
then
  fail "start: podman run failed: $(tail -3 "$work/run.log")"
  started=0
elif [ "$network" != host ]; then
  declare -A hostport
  for p in $grpc_port $metrics_port $live_port; do
    hostport[$p]="$(pm port "$container" "$p/tcp" | sed 's/.*://')"
  done
fi
target() { echo "127.0.0.1:${hostport[$1]}"; }
sleep 1
if [ $started = 0 ]; then :
elif [ "$(pm inspect --format '{{.State.Running}}' "$container")" != true ]; then
  fail "start: the container exited: $(pm logs "$container" 2>&1 | tail -20)"
  started=0
else
  uids="$(pm exec "$container" sh -c 'grep -E "^(Uid|Gid):" /proc/1/status' | awk '{print $2}' |
          tr '\n' ' ')"
  if [ "$uids" = "$run_user $run_group " ]; then
    ok "start: running as uid/gid $run_user/$run_group, read-only root, flags $flags"
  else
    fail "start: server runs as uid/gid $uids, expected $run_user $run_group"
  fi
fi
health_ok=$started
if [ $started = 0 ]; then
  fail "liveness, readiness, quantize, metrics, drain: not checked (the server did not start)"
elif "$python" "$root/deploy/checks/grpc_health.py" "$(target "$live_port")" \
     --service "$live_service" --wait 60; then
  ok "liveness: port $live_port service '$live_service'"
else fail "liveness: port $live_port service '$live_service'"; health_ok=0; fi
if [ $started = 0 ]; then :
elif "$python" "$root/deploy/checks/grpc_health.py" "$(target "$ready_port")" \
     --service "$ready_service" --wait 30; then
  ok "readiness: port $ready_port service '$ready_service'"
else fail "readiness: port $ready_port service '$ready_service'"; health_ok=0; fi

if [ $health_ok = 1 ]; then
  "$cli" example --out "$work/example" >/dev/null
  "$cli" quantize --model "$work/example" --hessians "$work/example/hessians.safetensors" \
    --out "$work/local" >/dev/null
  if "$cli" quantize --model "$work/example" --hessians "$work/example/hessians.safetensors" \
       --out "$work/remote" --server "$(target "$grpc_port")" > "$work/remote.log" 2>&1; then
    if diff -r "$work/local" "$work/remote" > "$work/diff.log"; then
      ok "quantize: --server output byte-identical to in-process" \
         "($(find "$work/remote" -type f | wc -l) files)"
    else fail "quantize: outputs differ: $(head -5 "$work/diff.log")"; fi
  else fail "quantize --server failed: $(tail -5 "$work/remote.log")"; fi

  if "$python" - "http://$(target "$metrics_port")/metrics" > "$work/metrics.log" 2>&1 <<'EOF'
import re, sys, urllib.request
text = urllib.request.urlopen(sys.argv[1], timeout=10).read().decode()
assert re.search(r"^nvfp4cal_queue_depth ", text, re.M), "no nvfp4cal_queue_depth"
blocks = re.search(r"^nvfp4cal_blocks_quantized_total (\S+)", text, re.M)
assert blocks and float(blocks.group(1)) > 0, "nvfp4cal_blocks_quantized_total is not > 0"
print(f"nvfp4cal_blocks_quantized_total {blocks.group(1)}")
EOF
  then ok "metrics: port $metrics_port /metrics: $(cat "$work/metrics.log")"
  else fail "metrics: port $metrics_port: $(tail -3 "$work/metrics.log")"; fi
fi

# SIGTERM after preStop: the server must drain and exit 0 before the grace period ends.
budget=$((grace - prestop))
if [ $started = 1 ]; then
  t0=$(date +%s.%N)
  pm stop -t "$budget" "$container" >/dev/null 2>&1 || true
  t1=$(date +%s.%N)
  code="$(pm inspect --format '{{.State.ExitCode}}' "$container")"
  took="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')"
  if [ "$code" = 0 ] && awk -v t="$took" -v b="$budget" 'BEGIN { exit !(t < b) }'; then
    ok "drain: SIGTERM -> exit 0 in $took s (grace ${grace} s - preStop ${prestop} s)"
  else
    fail "drain: exit code $code after $took s (budget $budget s); log:" \
         "$(pm logs "$container" 2>&1 | tail -3)"
  fi
fi
pm rm -f "$container" >/dev/null 2>&1 || true
container=""

if [ $status = 0 ]; then log "image test passed ($tag, $size_mb MiB)"
else log "image test FAILED"; fi
exit $status
