#!/usr/bin/python3
"""Offline structural checks of the rendered Kubernetes manifests and the Dockerfile.

Usage: check_deploy.py --server BIN --docs docs/server.md --install-deps scripts/install-deps.sh
                       [--dockerfile Dockerfile] [--binary BIN ...] RENDERED.yaml ...
Each RENDERED.yaml is the `kubectl kustomize` output of one overlay. Prints every failure and
exits 1 when there is any.
"""
import argparse
import json
import os
import re
import shlex
import subprocess
import sys

import yaml

EXPECTED_API = {
    "Deployment": "apps/v1",
    "Service": "v1",
    "ConfigMap": "v1",
    "PodDisruptionBudget": "policy/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "ServiceMonitor": "monitoring.coreos.com/v1",
}
LIVENESS_SERVICE = ""
READINESS_SERVICE = "nvfp4cal.v1.Calibrator"
# Packages of the debian:12-slim base image that the binaries link.
BASE_IMAGE_PACKAGES = {"libc6", "libgcc-s1", "libstdc++6", "zlib1g"}

failures = []


def fail(where, message):
    failures.append(f"{where}: {message}")


def server_flags(binary):
    out = subprocess.run([binary, "--helpfull"], capture_output=True, text=True, check=False)
    flags = set(re.findall(r"^\s+--([A-Za-z0-9_]+)", out.stdout + out.stderr, re.M))
    if "address" not in flags:
        sys.exit(f"cannot read the flags of {binary} (--helpfull printed no --address)")
    return flags


def parse_duration(text):
    """absl duration ("30s", "1m30s", "500ms", "2h") -> seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
    parts = re.findall(r"([0-9.]+)(ms|us|ns|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


def parse_flag_lines(lines):
    """['--name=value', '--switch', ...] -> {name: value or None}"""
    flags = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"--([A-Za-z0-9_]+)(?:=(.*))?", line)
        if not m:
            flags.setdefault("__bad__", []).append(line)
            continue
        flags[m.group(1)] = m.group(2)
    return flags


def check_flag_names(where, flags, known):
    for bad in flags.get("__bad__", []):
        fail(where, f"not a --flag=value line: {bad!r}")
    for name in flags:
        if name == "__bad__":
            continue
        if name not in known and not (name.startswith("no") and name[2:] in known):
            fail(where, f"flag --{name} does not exist in nvfp4cal-server --helpfull")


def port_of(address, default):
    if address is None:
        return default
    m = re.search(r":([0-9]+)$", address)
    return int(m.group(1)) if m else None


def labels_match(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def metric_names(docs_path):
    """Metric names of the docs/server.md metrics table, with the documented prefix."""
    text = open(docs_path, encoding="utf-8").read()
    m = re.search(r"^## Metrics \(prefix `([a-z0-9_]+)`\)(.*?)(?=^## )", text, re.M | re.S)
    if not m:
        sys.exit(f"{docs_path}: no '## Metrics (prefix ...)' section")
    prefix, body = m.group(1), m.group(2)
    names = {}
    for row in re.findall(r"^\| (.+?) \| (\w+) \|", body, re.M):
        for name in re.findall(r"`([a-z_]+)", row[0]):
            names[prefix + name] = row[1]
    return names


def check_overlay(path, known, metrics):
    where = os.path.basename(path)
    docs = [d for d in yaml.safe_load_all(open(path, encoding="utf-8")) if d]
    by_kind = {}
    for d in docs:
        kind, api = d.get("kind"), d.get("apiVersion")
        by_kind.setdefault(kind, []).append(d)
        if kind not in EXPECTED_API:
            fail(where, f"unexpected kind {kind}")
        elif api != EXPECTED_API[kind]:
            fail(where, f"{kind} {d['metadata'].get('name')}: apiVersion {api}, "
                        f"expected {EXPECTED_API[kind]}")
    for kind in EXPECTED_API:
        if kind not in by_kind:
            fail(where, f"no {kind}")
    if len(by_kind.get("Deployment", [])) != 1:
        fail(where, "expected exactly one Deployment")
        return
    dep = by_kind["Deployment"][0]
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"].get("labels", {})
    if not labels_match(spec.get("selector", {}).get("matchLabels"), pod_labels):
        fail(where, "Deployment selector does not match its pod labels")
    roll = spec.get("strategy", {})
    ru = roll.get("rollingUpdate", {})
    if roll.get("type") != "RollingUpdate" or str(ru.get("maxSurge")) != "0" \
            or str(ru.get("maxUnavailable")) != "1":
        fail(where, f"rollout must be RollingUpdate maxSurge 0 / maxUnavailable 1, got {roll}")
    servers = [c for c in pod["containers"] if c["name"] == "server"]
    if len(servers) != 1:
        fail(where, "no container named server")
        return
    c = servers[0]

    # Flags: args and the flagfile from the ConfigMap.
    args = parse_flag_lines(c.get("args", []) + c.get("command", [])[1:])
    check_flag_names(f"{where} args", args, known)
    flags = dict(args)
    if "flagfile" in args:
        fpath = args["flagfile"]
        mdir, fname = os.path.dirname(fpath), os.path.basename(fpath)
        mount = [m for m in c.get("volumeMounts", []) if m["mountPath"].rstrip("/") == mdir]
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        if not mount or "configMap" not in vols.get(mount[0]["name"], {}):
            fail(where, f"--flagfile={fpath}: no ConfigMap volume mounted at {mdir}")
        else:
            cm_name = vols[mount[0]["name"]]["configMap"]["name"]
            cms = [m for m in by_kind.get("ConfigMap", []) if m["metadata"]["name"] == cm_name]
            if not cms or fname not in cms[0].get("data", {}):
                fail(where, f"--flagfile={fpath}: ConfigMap {cm_name} has no key {fname}")
            else:
                ff = parse_flag_lines(cms[0]["data"][fname].splitlines())
                check_flag_names(f"{where} ConfigMap {cm_name}", ff, known)
                flags.update(ff)

    # Ports and probes.
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    grpc_port = port_of(flags.get("address"), 50051)
    metrics_port = port_of(flags.get("metrics_address"), 9400)
    # Probes go to the plaintext health-only port when there is one (TLS or tokens on the
    # gRPC port would fail them), else to the gRPC port.
    health_port = port_of(flags.get("health_address"), None)
    probe_port = health_port if health_port is not None else grpc_port
    if health_port is not None and ports.get("health") != health_port:
        fail(where, f"container port health = {ports.get('health')}, "
                    f"--health_address listens on {health_port}")
    if ports.get("grpc") != grpc_port:
        fail(where, f"container port grpc = {ports.get('grpc')}, server listens on {grpc_port}")
    if metrics_port is not None and ports.get("metrics") != metrics_port:
        fail(where, f"container port metrics = {ports.get('metrics')}, "
                    f"metrics endpoint on {metrics_port}")
    for probe, service in (("livenessProbe", LIVENESS_SERVICE),
                           ("readinessProbe", READINESS_SERVICE),
                           ("startupProbe", LIVENESS_SERVICE)):
        p = c.get(probe)
        if p is None:
            if probe != "startupProbe":
                fail(where, f"no {probe}")
            continue
        g = p.get("grpc")
        if g is None:
            fail(where, f"{probe} is not a native gRPC probe")
            continue
        if g.get("port") != probe_port:
            what = "health port" if health_port is not None else "gRPC port"
            fail(where, f"{probe} port {g.get('port')} is not the {what} {probe_port}")
        if (g.get("service") or "") != service:
            fail(where, f"{probe} service {g.get('service')!r}, expected {service!r}")

    # Drain: grace period above preStop + --drain_timeout.
    try:
        drain = parse_duration(flags.get("drain_timeout") or "30s")
    except ValueError as e:
        fail(where, f"--drain_timeout: {e}")
        drain = 30
    pre = 0
    cmd = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    if cmd[:1] == ["sleep"]:
        pre = float(cmd[1])
    grace = pod.get("terminationGracePeriodSeconds", 30)
    if not grace > drain + pre:
        fail(where, f"terminationGracePeriodSeconds {grace} is not above preStop {pre:g} s "
                    f"+ --drain_timeout {drain:g} s")

    # Security context.
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    if not (csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
        fail(where, "runAsNonRoot is not true")
    if (csc.get("runAsUser", psc.get("runAsUser")) or 0) == 0:
        fail(where, "runAsUser is missing or 0")
    if csc.get("readOnlyRootFilesystem") is not True:
        fail(where, "readOnlyRootFilesystem is not true")
    if csc.get("allowPrivilegeEscalation") is not False:
        fail(where, "allowPrivilegeEscalation is not false")

    # Resources and GPU.
    res = c.get("resources", {})
    for part in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in res.get(part, {}):
                fail(where, f"no {part}.{r}")
    gpus = int(res.get("limits", {}).get("nvidia.com/gpu", 0))
    device = flags.get("device", "auto")
    if device == "cpu" and gpus:
        fail(where, f"--device=cpu with nvidia.com/gpu limit {gpus}")
    if device in ("cuda", "auto") and gpus < 1:
        fail(where, f"--device={device} without an nvidia.com/gpu limit")
    if device not in ("cpu", "cuda", "auto"):
        fail(where, f"--device={device} is not auto, cpu or cuda")

    # Services.
    services = by_kind.get("Service", [])
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    cluster = [s for s in services if s["spec"].get("clusterIP") != "None"
               and s["spec"].get("type", "ClusterIP") == "ClusterIP"]
    if len(headless) != 1 or headless[0]["metadata"]["name"] != "nvfp4cal-headless":
        fail(where, "expected one headless Service named nvfp4cal-headless")
    if len(cluster) != 1:
        fail(where, "expected one ClusterIP Service")
    by_name = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    for s in services:
        sname = s["metadata"]["name"]
        if not labels_match(s["spec"].get("selector"), pod_labels):
            fail(where, f"Service {sname} selector does not match the pods")
        for p in s["spec"].get("ports", []):
            t = p.get("targetPort", p["port"])
            target = by_name.get(t) if isinstance(t, str) else t
            if target not in by_name.values():
                fail(where, f"Service {sname} port {p.get('name')} targets {t}, "
                            f"not a container port")
            if p.get("name") == "grpc" and target != grpc_port:
                fail(where, f"Service {sname} grpc port targets {target}, not {grpc_port}")
        if not any(p.get("name") == "grpc" for p in s["spec"].get("ports", [])):
            fail(where, f"Service {sname} has no grpc port")

    # PodDisruptionBudget.
    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not labels_match(pdb["spec"].get("selector", {}).get("matchLabels"), pod_labels):
            fail(where, "PodDisruptionBudget selector does not match the pods")

    # HorizontalPodAutoscaler on the queue-depth gauge.
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"].get("scaleTargetRef", {})
        if ref.get("kind") != "Deployment" or ref.get("name") != dep["metadata"]["name"]:
            fail(where, f"HPA scaleTargetRef {ref} is not the Deployment")
        lo, hi = hpa["spec"].get("minReplicas", 1), hpa["spec"].get("maxReplicas", 0)
        if not 1 <= lo <= hi:
            fail(where, f"HPA minReplicas {lo} / maxReplicas {hi}")
        pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"].get("metrics", [])
                        if m.get("type") == "Pods"]
        queue = [n for n, t in metrics.items() if n.endswith("queue_depth") and t == "gauge"]
        if not queue:
            fail(where, "docs/server.md lists no queue_depth gauge")
        elif queue[0] not in pods_metrics:
            fail(where, f"HPA has no Pods metric {queue[0]} (has {pods_metrics})")
        for n in pods_metrics:
            if n not in metrics:
                fail(where, f"HPA metric {n} is not a server metric in docs/server.md")

    # ServiceMonitor: selects exactly one Service, on its metrics port.
    for sm in by_kind.get("ServiceMonitor", []):
        sel = sm["spec"].get("selector", {}).get("matchLabels", {})
        hits = [s for s in services if labels_match(sel, s["metadata"].get("labels", {}))]
        if len(hits) != 1:
            fail(where, f"ServiceMonitor selects {len(hits)} Services, expected 1")
            continue
        sports = {p.get("name"): p for p in hits[0]["spec"]["ports"]}
        for ep in sm["spec"].get("endpoints", []):
            p = sports.get(ep.get("port"))
            t = p and p.get("targetPort", p["port"])
            t = by_name.get(t) if isinstance(t, str) else t
            if t != metrics_port:
                fail(where, f"ServiceMonitor endpoint port {ep.get('port')!r} does not reach "
                            f"the metrics port {metrics_port}")
            if ep.get("path", "/metrics") != "/metrics":
                fail(where, f"ServiceMonitor path {ep.get('path')}, server serves /metrics")


def dockerfile_instructions(path):
    text = open(path, encoding="utf-8").read()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        word, _, rest = s.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def apt_installs(run):
    pkgs = []
    for m in re.finditer(r"apt-get install ([^&;|]*)", run):
        pkgs += [w for w in m.group(1).split() if not w.startswith("-")]
    return pkgs


# Loaded with dlopen by the CUDA gptq backend (kernels/cuda/cuda_gptq.cu) and what they link.
DLOPENED_LIBRARIES = ["libcublas.so", "libcublasLt.so", "libcusolver.so", "libcusparse.so",
                      "libnvJitLink.so"]


def linked_packages(binaries):
    """dpkg package of every shared library of the binaries; None for files dpkg does not own."""
    libs = set()
    for b in binaries:
        out = subprocess.run(["ldd", b], capture_output=True, text=True, check=True).stdout
        libs |= set(re.findall(r"=> (/\S+)", out))
    paths = sorted(libs | {os.path.realpath(l) for l in libs})
    r = subprocess.run(["dpkg", "-S"] + paths, capture_output=True, text=True)
    owner = {}
    for line in r.stdout.splitlines():
        pkgs, _, path = line.partition(": ")
        owner[path.strip()] = pkgs.split(",")[0].split(":")[0].strip()
    return {l: owner.get(l) or owner.get(os.path.realpath(l)) for l in libs}


def check_dockerfile(path, install_deps, known, binaries):
    where = os.path.basename(path)
    ins = dockerfile_instructions(path)
    stages = []
    for word, rest in ins:
        if word == "FROM":
            stages.append({"from": rest, "ins": []})
        elif stages:
            stages[-1]["ins"].append((word, rest))
    if len(stages) < 2:
        fail(where, "not a multi-stage build")
        return
    # Every stage before the last one is a build stage (deps, build-cuda, build-cpu, ...).
    build, runtime = stages[0], stages[-1]
    build_ins = [i for st in stages[:-1] for i in st["ins"]]
    if not re.match(r"debian:12(\s|$)", build["from"]):
        fail(where, f"build stage is {build['from']!r}, expected debian:12")
    runs = [r for w, r in build_ins if w == "RUN"]
    if not any(re.search(r"\bscripts/install-deps\.sh\b", r) for r in runs) or not any(
            w == "COPY" and "scripts/install-deps.sh" in r for w, r in build_ins):
        fail(where, "build stage does not COPY and RUN scripts/install-deps.sh")
    deps_text = re.sub(r"#.*", "", open(install_deps, encoding="utf-8").read())
    m = re.search(r"packages=\((.*?)\)", deps_text, re.S)
    deps = set(m.group(1).split()) if m else set()
    if not deps:
        fail(install_deps, "no packages=( ... ) list")
    for r in runs:
        for p in apt_installs(r):
            if p not in deps and not re.match(r"(cuda-|libcublas-dev-|libcusolver-dev-)", p):
                fail(where, f"build stage installs {p}, which scripts/install-deps.sh does not")
    if not any(re.search(r"\bcuda-nvcc-", r) for r in runs):
        fail(where, "build stage installs no CUDA compiler (cuda-nvcc-*)")

    rt_runs = [r for w, r in runtime["ins"] if w == "RUN"]
    rt_pkgs = set(p for r in rt_runs for p in apt_installs(r))
    for p in sorted(rt_pkgs):
        if p.endswith("-dev") or p in deps - {"ca-certificates"}:
            fail(where, f"runtime stage installs build package {p}")
    copies = " ".join(r for w, r in runtime["ins"] if w == "COPY")
    for lib, pkg in sorted(linked_packages(binaries).items(), key=lambda kv: kv[0]):
        if pkg is None:
            soname = os.path.basename(lib).split(".so")[0]
            if soname not in copies and soname not in " ".join(runs):
                fail(where, f"{lib} (no Debian package) is not copied into the runtime stage")
        elif pkg not in rt_pkgs and pkg not in BASE_IMAGE_PACKAGES:
            fail(where, f"runtime stage lacks package {pkg} ({lib})")
    # Libraries the CUDA gptq backend dlopens (ldd does not list them).
    for soname in DLOPENED_LIBRARIES:
        if soname not in copies and soname not in " ".join(runs):
            fail(where, f"{soname} (dlopen'ed by the CUDA gptq backend) is not copied into the "
                 "runtime stage")
    # Package names apt knows (needs the package lists that install-deps.sh's apt-get update
    # leaves behind); one apt-cache call for all of them.
    if rt_pkgs:
        r = subprocess.run(["apt-cache", "policy", "libc6"] + sorted(rt_pkgs),
                           capture_output=True, text=True)
        known_pkgs = {}
        for block in re.split(r"^(?=\S)", r.stdout, flags=re.M):
            m = re.match(r"(\S+?):(?:amd64)?\s*\n\s+Installed:.*\n\s+Candidate: (\S+)", block)
            if m:
                known_pkgs[m.group(1)] = m.group(2)
        if known_pkgs.get("libc6", "(none)") != "(none)":
            for p in sorted(rt_pkgs):
                if known_pkgs.get(p, "(none)") == "(none)":
                    fail(where, f"runtime package {p} is unknown to apt")

    users = [r for w, r in runtime["ins"] if w == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        fail(where, "runtime stage does not run as a non-root USER")
    eps = [r for w, r in runtime["ins"] if w == "ENTRYPOINT"]
    if not eps:
        fail(where, "no ENTRYPOINT")
    else:
        try:
            ep = json.loads(eps[-1])
        except ValueError:
            ep = None
        if not isinstance(ep, list):
            fail(where, f"ENTRYPOINT is not exec form: {eps[-1]}")
        elif not ep[0].endswith("/nvfp4cal-server"):
            fail(where, f"ENTRYPOINT runs {ep[0]}, not nvfp4cal-server")
        else:
            check_flag_names(f"{where} ENTRYPOINT", parse_flag_lines(ep[1:]), known)
    for w, r in runtime["ins"]:
        if w == "CMD":
            try:
                cmd = json.loads(r)
            except ValueError:
                cmd = None
            if not isinstance(cmd, list):
                fail(where, f"CMD is not exec form: {r}")
            else:
                check_flag_names(f"{where} CMD", parse_flag_lines(cmd), known)
    if not re.search(r"/nvfp4cal(\s|$)", copies):
        fail(where, "runtime stage does not copy the nvfp4cal CLI")
    if "nvfp4cal-server" not in copies:
        fail(where, "runtime stage does not copy nvfp4cal-server")
    exposed = set()
    for w, r in runtime["ins"]:
        if w == "EXPOSE":
            exposed |= {int(x.split("/")[0]) for x in r.split()}
    for port in (50051, 9400):
        if port not in exposed:
            fail(where, f"port {port} is not EXPOSEd")
    if not any(w == "HEALTHCHECK" for w, _ in runtime["ins"]):
        fail(where, "no HEALTHCHECK")
    ignore = os.path.join(os.path.dirname(os.path.abspath(path)), ".dockerignore")
    if not os.path.exists(ignore):
        fail(where, "no .dockerignore next to the Dockerfile")
    else:
        lines = {l.strip().rstrip("/") for l in open(ignore, encoding="utf-8")}
        for must in (".git", "build"):
            if must not in lines:
                fail(".dockerignore", f"does not exclude {must}/")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--binary", action="append", default=[])
    ap.add_argument("--docs", required=True)
    ap.add_argument("--install-deps", required=True)
    ap.add_argument("--dockerfile")
    ap.add_argument("rendered", nargs="*")
    a = ap.parse_args()
    known = server_flags(a.server)
    metrics = metric_names(a.docs)
    for r in a.rendered:
        check_overlay(r, known, metrics)
    if a.dockerfile:
        check_dockerfile(a.dockerfile, a.install_deps, known, [a.server] + a.binary)
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    if failures:
        return 1
    print(f"ok: {len(a.rendered)} overlay(s)" + (", Dockerfile" if a.dockerfile else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
