#!/usr/bin/env python3
"""End-to-end `nvfp4cal quantize` of a Llama-3-8B-shaped example, beside each stage's floor.

Builds the example once (`nvfp4cal example` with Llama-3-8B's shapes, 16 GB; `--small` for a
CPU-sized one), then in one run times:

  in-process     `nvfp4cal quantize` (a first run fills the page cache; the figures are of the
                 warm runs, as a second run sees them)
  1 server       the same through one `nvfp4cal-server` on loopback
  N servers      through --servers servers on loopback, sharing this machine's GPU

The runs alternate round by round (in-process, then each server configuration, every server up
for the whole bench), --repeat rounds; each configuration's best and median and its ratio to the
same round's in-process run are printed. Every run writes into a fresh --out: an earlier output
there is removed before the clock starts
(removing 6 GB of old output took 1.0-1.8 s on the H100 machines, a cost of `--overwrite`, not of
the path measured). Every output is compared byte for byte with the in-process one. Per run: wall seconds, the CLI's
own split (read / copy / quantize / write), peak RSS of the CLI (and of the servers), peak device
memory (nvidia-smi, above the level before the run). Then each stage alone (stage_floor_bench:
read, h2d, d2h, write; cuda_layer_bench: the kernels) with the word "floor", and how far the
end-to-end figure is from the largest floor.

  bench/end_to_end_bench.py --build BUILD_DIR --work DIR [--small] [--method dss]
                            [--servers 3] [--repeat 2] [--keep] [--trace-dir DIR
                            [--trace-summary]] [--thread-cpu]

BUILD_DIR is searched for nvfp4cal, nvfp4cal-server, stage_floor_bench and cuda_layer_bench
(a build folder or a gpu-bundle's bin/). Standard library only.
"""
import argparse
import filecmp
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time

LLAMA3_8B = ["--layers", "32", "--hidden", "4096", "--intermediate", "14336", "--heads", "32",
             "--kv-heads", "8", "--vocab", "128256", "--shards", "4"]
SMALL = ["--layers", "2", "--hidden", "512", "--intermediate", "1408", "--heads", "8",
         "--kv-heads", "2", "--vocab", "4096", "--shards", "2"]


def find_binary(build, name):
    for root, dirs, files in os.walk(build):
        dirs[:] = [d for d in dirs if d != "CMakeFiles"]
        if name in files and os.access(os.path.join(root, name), os.X_OK):
            return os.path.join(root, name)
    return None


def safetensors_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def shard_files(folder):
    return sorted(f for f in os.listdir(folder)
                  if f.endswith(".safetensors") and f != "hessians.safetensors")


def output_bytes(out_dir):
    """(quantized bf16 bytes in, codes + block scales out, all shard bytes) of an output."""
    weights_in = device_out = total = 0
    for name in shard_files(out_dir):
        path = os.path.join(out_dir, name)
        total += os.path.getsize(path)
        for tensor, info in safetensors_header(path).items():
            begin, end = info["data_offsets"]
            if tensor.endswith(".weight") and info["dtype"] == "U8":
                weights_in += 4 * (end - begin)  # two bf16 bytes per element, half a byte out
                device_out += end - begin
            elif tensor.endswith(".weight_scale"):
                device_out += end - begin
    return weights_in, device_out, total


class DeviceMemoryPeak:
    """Polls nvidia-smi's used memory while a run lasts; MiB above the level at the start."""

    def __init__(self):
        self.available = shutil.which("nvidia-smi") is not None
        self.peak = None

    def _used(self):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used",
                                  "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=10).stdout
            return int(out.split()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None

    def __enter__(self):
        if self.available:
            self.base = self._used()
            self.peak = self.base
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self._poll, daemon=True)
            self.thread.start()
        return self

    def _poll(self):
        while not self.stop.wait(0.2):
            used = self._used()
            if used is not None and self.peak is not None:
                self.peak = max(self.peak, used)

    def __exit__(self, *exc):
        if self.available:
            self.stop.set()
            self.thread.join()

    def text(self):
        if not self.available or self.peak is None or self.base is None:
            return "n/a"
        return f"{self.peak - self.base} MiB"


def run_timed(cmd, log, thread_cpu_pids=None):
    """Runs cmd; returns (wall seconds, peak RSS in MiB, (user, system) CPU seconds). Exits on
    failure, printing its log. With thread_cpu_pids (a list, maybe empty), prints the per-thread
    CPU of cmd and of those processes (bench/thread_cpu.py; theirs since they started)."""
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        sampler = None
        if thread_cpu_pids is not None:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import thread_cpu
            pids = [proc.pid] + list(thread_cpu_pids)
            last, stop = {}, threading.Event()

            def run():
                while not stop.is_set():
                    thread_cpu.sample(pids, last)
                    time.sleep(0.1)

            sampler = threading.Thread(target=run)
            sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    if sampler is not None:
        stop.set()
        sampler.join()
        thread_cpu.report(pids, last, wall, sys.stdout)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.stdout.write(open(log).read()[-4000:])
        sys.exit(f"end_to_end_bench: failed ({os.waitstatus_to_exitcode(status)}): {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 1024.0, (usage.ru_utime, usage.ru_stime)


def same_outputs(a, b):
    names = shard_files(a)
    if names != shard_files(b):
        return False
    return all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)


def compared(a, b):
    return "byte-identical to" if same_outputs(a, b) else "DIFFERS FROM"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, proc, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"end_to_end_bench: server on port {port} exited ({proc.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"end_to_end_bench: server on port {port} did not listen within {timeout} s")


class Servers:
    """N nvfp4cal-server processes on loopback; their peak RSS is read when they stop."""

    def __init__(self, binary, count, work, extra=(), tag=""):
        self.ports = [free_port() for _ in range(count)]
        self.procs = []
        self.logs = []
        for i, port in enumerate(self.ports):
            self.logs.append(os.path.join(work, f"server{tag}-{count}-{i}.log"))
            log = open(self.logs[-1], "w")
            self.procs.append(subprocess.Popen(
                [binary, f"--address=127.0.0.1:{port}", "--metrics_address="] + list(extra),
                stdout=log, stderr=subprocess.STDOUT))
        for port, proc in zip(self.ports, self.procs):
            wait_for_port(port, proc)

    def addresses(self):
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def stop(self):
        """Stops them; returns each one's (peak RSS in MiB, user CPU s, system CPU s)."""
        stopped = []
        for proc in self.procs:
            proc.terminate()
            _, _, usage = os.wait4(proc.pid, 0)
            stopped.append((usage.ru_maxrss / 1024.0, usage.ru_utime, usage.ru_stime))
        return stopped

    def batches(self):
        """Each server's last words on its batches ("stopped after N batches ..."), once stopped."""
        lines = []
        for path in self.logs:
            with open(path, errors="replace") as f:
                found = [l.strip() for l in f if "stopped after" in l]
            lines.append(found[-1].split("stopped after ", 1)[1] if found else "(not logged)")
        return lines


TRACES = []  # the --trace files written so far


def quantize(cli, args, model, out, extra, stats, log, trace=None, servers=None):
    """One timed run; with --trace-dir and a `trace` label, also that run's --trace file."""
    if args.trace_dir and trace:
        path = os.path.join(args.trace_dir, f"{len(TRACES) + 1:02d}-{trace}.json")
        TRACES.append(path)
        extra = extra + ["--trace", path]
    if os.path.exists(out):
        shutil.rmtree(out)
    cmd = [cli, "quantize", "--model", model, "--hessians",
           os.path.join(model, "hessians.safetensors"), "--out", out, "--method", args.method,
           "--overwrite", "--quiet", "--stats-json", stats] + extra
    with DeviceMemoryPeak() as mem:
        wall, rss, cpu = run_timed(
            cmd, log, ([p.pid for p in servers.procs] if servers else []) if args.thread_cpu
            else None)
    with open(stats) as f:
        seconds = json.load(f)["seconds"]
    return {"wall": wall, "rss": rss, "cpu": cpu, "device": mem.text(), "seconds": seconds}


def best_of(runs):
    return min(runs, key=lambda r: r["wall"])


def describe(label, r, baseline=None):
    s = r["seconds"]
    ratio = f"  {r['wall'] / baseline:.2f}x in-process" if baseline else ""
    print(f"{label:<14} {r['wall']:7.2f} s  (read {s['read']:.2f}, scan {s.get('scan', 0):.2f}, "
          f"copy {s['copy']:.2f}, "
          + (f"Hessians read {s['hessian_read']:.2f}, " if s.get("hessian_read") else "")
          + f"quantize {s['quantize']:.2f}, write {s['write']:.2f}; server kernels "
          f"{s.get('server_kernel', 0.0):.2f}, queued {s.get('server_queue', 0.0):.2f})  peak RSS {r['rss']:.0f} MiB, device "
          f"{r['device']}, CPU {r['cpu'][0]:.1f} s user + {r['cpu'][1]:.1f} s system{ratio}")


def kernel_floor(binary, method):
    if binary is None:
        return None
    proc = subprocess.run([binary, "--layers=32", f"--methods={method}", "--nofull",
                           "--cpu_rows_fraction=0.0005"], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        fields = line.split()
        if fields and fields[0] == method and len(fields) > 2:
            return float(fields[2])  # the "x32 layers s" column
    print(f"(no kernel floor: cuda_layer_bench said: {(proc.stderr or proc.stdout)[-300:]})")
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--build", required=True, help="folder holding the binaries")
    p.add_argument("--work", required=True, help="folder for the example and the outputs")
    p.add_argument("--small", action="store_true", help="a CPU-sized example instead of 8B")
    p.add_argument("--method", default="dss")
    p.add_argument("--layers", type=int, help="decoder layers of the example [default: 32, "
                   "--small 2]; gptq's full Hessians take ~1 GB per 8B-shaped layer")
    p.add_argument("--servers", type=int, default=3, help="servers of the multi-server run")
    p.add_argument("--repeat", type=int, default=2, help="timed runs per configuration")
    p.add_argument("--keep", action="store_true", help="keep the outputs")
    p.add_argument("--tools", help="folder of stage_floor_bench and cuda_layer_bench "
                   "[default: --build]")
    p.add_argument("--baseline-cli", help="another nvfp4cal (an earlier build): its in-process "
                   "runs are timed in the same run and its output compared")
    p.add_argument("--no-servers", action="store_true", help="in-process runs only")
    p.add_argument("--streams-per-server", type=int,
                   help="also time one server with this many client streams (the other runs "
                   "use the CLI's default)")
    p.add_argument("--client-flags", action="append", default=[],
                   help="also time one server with these extra CLI flags (e.g. '--chunk-kib "
                   "4096'); repeat for more configurations")
    p.add_argument("--no-floors", action="store_true", help="skip the stage floors")
    p.add_argument("--trace-dir", help="write each run's --trace timeline of this build's CLI "
                   "into this folder (NN-LABEL.json; the baseline CLI's runs have none)")
    p.add_argument("--trace-archive", help="with --trace-dir: also pack the timelines into this "
                   ".tar.gz (one file: the GPU machine's calls bring back a few files only)")
    p.add_argument("--thread-cpu", action="store_true", help="print each run's CPU per thread "
                   "name of the CLI and its servers (bench/thread_cpu.py, beside this script)")
    p.add_argument("--trace-summary", action="store_true", help="with --trace-dir: also print "
                   "each timeline's summary (bench/trace_summary.py, found beside this script)")
    p.add_argument("--in-process-flags", action="append", default=[],
                   help="also time this build's CLI in-process with these extra flags (e.g. "
                   "'--keep-freed-memory-mib 0'); repeat for more configurations")
    p.add_argument("--baseline-server", help="another nvfp4cal-server (an earlier build): one "
                   "server of it is timed in the same rounds, through this build's CLI")
    p.add_argument("--baseline-server-flags", action="append", default=[],
                   help="also time one server started with these extra flags (e.g. "
                   "--cuda_workers_per_device=1), for comparison; repeat for more servers")
    args = p.parse_args()
    cli = find_binary(args.build, "nvfp4cal")
    server = find_binary(args.build, "nvfp4cal-server")
    floors = find_binary(args.tools or args.build, "stage_floor_bench")
    layer_bench = find_binary(args.tools or args.build, "cuda_layer_bench")
    if cli is None:
        sys.exit(f"end_to_end_bench: no nvfp4cal under {args.build}")
    if (args.trace_archive or args.trace_summary) and not args.trace_dir:
        sys.exit("end_to_end_bench: --trace-archive and --trace-summary need --trace-dir")
    os.makedirs(args.work, exist_ok=True)
    shapes = list(SMALL if args.small else LLAMA3_8B)
    if args.layers is not None:
        shapes[shapes.index("--layers") + 1] = str(args.layers)
    if args.method == "gptq":
        shapes.append("--full-hessians")  # gptq needs the full [in, in] Hessians
    model = os.path.join(args.work, "small" if args.small else "llama3-8b-shaped")
    marker = os.path.join(model, ".end_to_end_bench")
    if not os.path.exists(marker) or open(marker).read() != " ".join(shapes):
        start = time.monotonic()
        run_timed([cli, "example", "--out", model, "--overwrite-any"] + shapes,
                  os.path.join(args.work, "example.log"))
        with open(marker, "w") as f:
            f.write(" ".join(shapes))
        print(f"example: {' '.join(shapes)}: written in {time.monotonic() - start:.1f} s")
    in_bytes = sum(os.path.getsize(os.path.join(model, f)) for f in shard_files(model))
    print(f"model: {model}, {in_bytes / 1e9:.2f} GB of shards, method {args.method}")

    ref = os.path.join(args.work, "out-in-process")
    out = os.path.join(args.work, "out")
    stats = os.path.join(args.work, "stats.json")
    log = os.path.join(args.work, "quantize.log")
    if args.trace_dir:
        os.makedirs(args.trace_dir, exist_ok=True)
    first = quantize(cli, args, model, ref, [], stats, log, "first")
    describe("first run", first)

    # (servers, their extra flags, the CLI's extra flags, their binary)
    configs = [(1, [], [], server)]
    if args.baseline_server:
        configs.append((1, [], [], args.baseline_server))
    if args.streams_per_server is not None:
        configs.append((1, [], ["--streams-per-server", str(args.streams_per_server)], server))
    for flags in args.client_flags:
        configs.append((1, [], flags.split(), server))
    for flags in args.baseline_server_flags:
        configs.append((1, flags.split(), [], server))
    if args.servers != 1:
        configs.append((args.servers, [], [], server))
    if not server or args.no_servers:
        configs = []
    # Every configuration's servers stay up for the whole bench and the runs alternate, round
    # by round (in-process, baseline CLI, then each configuration), so that a drift of the
    # machine (one configuration's figures varied by over 1 s within a call) reaches all alike;
    # each round's ratios compare runs made next to each other.
    labels = ["in-process"] + (["baseline CLI"] if args.baseline_cli else [])
    labels += [f"in-process {flags}" for flags in args.in_process_flags]
    servers_of = []
    for count, server_flags, client_flags, binary in configs:
        extra = server_flags + client_flags
        labels.append(f"{count} server" + ("s" if count > 1 else "") +
                      (" " + " ".join(extra) if extra else "") +
                      (" (baseline)" if binary != server else ""))
        servers_of.append(Servers(binary, count, args.work, server_flags, f"-c{len(servers_of)}"))
    runs = {label: [] for label in labels}
    outputs_differ = {label: 0 for label in labels}
    for _ in range(args.repeat):
        runs["in-process"].append(quantize(cli, args, model, ref, [], stats, log, "in-process"))
        if args.baseline_cli:
            runs["baseline CLI"].append(quantize(args.baseline_cli, args, model, out, [], stats,
                                                 log))
            outputs_differ["baseline CLI"] += not same_outputs(ref, out)
        for flags in args.in_process_flags:
            label = f"in-process {flags}"
            runs[label].append(quantize(cli, args, model, out, flags.split(), stats, log,
                                        "in-process-flags"))
            outputs_differ[label] += not same_outputs(ref, out)
        for (count, server_flags, client_flags, _), servers, label in zip(
                configs, servers_of, labels[len(labels) - len(configs):]):
            tag = f"{count}-server" + ("-flags" if server_flags or client_flags else "")
            runs[label].append(quantize(cli, args, model, out,
                                        ["--server", servers.addresses()] + client_flags, stats,
                                        log, tag, servers))
            outputs_differ[label] += not same_outputs(ref, out)
    baseline = best_of(runs["in-process"])["wall"]
    stopped_of = [servers.stop() for servers in servers_of]
    for k, label in enumerate(labels):
        describe(label, best_of(runs[label]), None if k == 0 else baseline)
        walls = [r["wall"] for r in runs[label]]
        rounds = ""
        if k > 0:
            ratios = [r["wall"] / i["wall"] for r, i in zip(runs[label], runs["in-process"])]
            rounds = (f"; against the same round's in-process: "
                      f"{', '.join(f'{x:.2f}x' for x in ratios)} (median "
                      f"{sorted(ratios)[len(ratios) // 2]:.2f}x)")
        print(f"{'':<14} runs {', '.join(f'{w:.2f}' for w in walls)} s (median "
              f"{sorted(walls)[len(walls) // 2]:.2f} s){rounds}")
        if k > 0:
            print(f"{'':<14} output "
                  f"{'byte-identical to' if outputs_differ[label] == 0 else 'DIFFERS FROM'} "
                  f"in-process in {len(walls) - outputs_differ[label]} of {len(walls)} runs")
        server_index = k - (len(labels) - len(configs))
        if server_index >= 0:
            stopped = stopped_of[server_index]
            print(f"{'':<14} servers' peak RSS: "
                  f"{', '.join(f'{r:.0f} MiB' for r, _, _ in stopped)}; CPU (whole life, user + "
                  f"system): {', '.join(f'{u:.1f} + {y:.1f} s' for _, u, y in stopped)}; "
                  f"batches: {'; '.join(servers_of[server_index].batches())}")

    if TRACES:
        print(f"{'':<14} timelines (--trace): {len(TRACES)} files in {args.trace_dir}")
        if args.trace_summary:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import trace_summary
            for path in TRACES:
                if os.path.exists(path):
                    trace_summary.summarise(path, 20)
        if args.trace_archive:
            with tarfile.open(args.trace_archive, "w:gz") as archive:
                for path in TRACES:
                    archive.add(path, arcname=os.path.basename(path))
            print(f"{'':<14} packed into {args.trace_archive}")
    weights_in, device_out, total_out = output_bytes(ref)
    print(f"\nbytes: {in_bytes / 1e9:.2f} GB read, {weights_in / 1e9:.2f} GB of weights to the "
          f"device, {device_out / 1e9:.2f} GB back, {total_out / 1e9:.2f} GB written")
    floor_values = {}
    if floors and not args.no_floors:
        proc = subprocess.run([floors, "--model", model, "--out-dir", args.work, "--h2d-bytes",
                               str(weights_in), "--d2h-bytes", str(device_out), "--write-bytes",
                               str(total_out)], capture_output=True, text=True)
        sys.stdout.write(proc.stdout + proc.stderr)
        for line in proc.stdout.splitlines():
            f = line.split()
            if len(f) > 2 and f[0] == "floor" and f[2] != "no":  # the best way of a stage
                floor_values[f[1]] = min(float(f[2]), floor_values.get(f[1], float("inf")))
    kernels = None if args.small or args.no_floors else kernel_floor(layer_bench, args.method)
    if kernels is not None:
        floor_values["kernel"] = kernels
        print(f"floor kernel {kernels:8.3f} s  (cuda_layer_bench, {args.method}, 32 layers)")
    if floor_values:
        stage, largest = max(floor_values.items(), key=lambda kv: kv[1])
        print(f"largest floor: {stage} {largest:.3f} s; sum of floors "
              f"{sum(floor_values.values()):.3f} s; in-process {baseline:.2f} s = "
              f"{baseline / largest:.2f}x the largest floor")
    if not args.keep:
        shutil.rmtree(ref, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
