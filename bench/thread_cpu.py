#!/usr/bin/env python3
"""Per-thread CPU time of running processes, by thread name, until they all exit.

  bench/thread_cpu.py OUT PID [PID ...]

Samples /proc/PID/task/*/stat every 0.1 s while any of the processes lives and writes to OUT,
per process: its threads' user and system seconds summed by thread name (nvfp4cal names its
threads: nvf-send, nvf-receive, nvf-scan, nvf-write, nvf-copy, nvf-quantize, the server's
nvf-worker; gRPC's callback threads are nexting_thread), the busiest thread of each name, and
the twelve busiest threads. A thread whose CPU time is near the run's wall time is the run's
limit; when none is, the stages wait for each other. A thread that ends between two samples
counts with its last sample. Linux only; standard library only.

  nvfp4cal-server ... & S=$!
  nvfp4cal quantize ... --server ... & C=$!
  bench/thread_cpu.py cpu.txt $C $S
"""
import collections
import os
import sys
import time


def sample(pids, last):
    """Reads every thread's (name, user s, system s) into last; returns how many pids live."""
    hz = os.sysconf("SC_CLK_TCK")
    alive = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        alive += 1
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            name = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            last[(pid, int(tid))] = (name, int(fields[11]) / hz, int(fields[12]) / hz)
    return alive


def report(pids, last, wall, out):
    for pid in pids:
        rows = [(name, u, s, tid) for (p, tid), (name, u, s) in last.items() if p == pid]
        groups = collections.defaultdict(lambda: [0, 0.0, 0.0, 0.0])
        for name, u, s, _ in rows:
            g = groups[name]
            g[0] += 1
            g[1] += u
            g[2] += s
            g[3] = max(g[3], u + s)
        out.write(f"pid {pid} (sampled {wall:.1f} s): {len(rows)} threads, user "
                  f"{sum(r[1] for r in rows):.2f} s, system {sum(r[2] for r in rows):.2f} s\n")
        by_cpu = sorted(groups.items(), key=lambda kv: -(kv[1][1] + kv[1][2]))
        for name, (n, u, s, busiest) in by_cpu:
            out.write(f"  {name:<18} x{n:<3} user {u:7.2f}  sys {s:7.2f}  busiest thread "
                      f"{busiest:6.2f}\n")
        top = sorted(rows, key=lambda r: -(r[1] + r[2]))[:12]
        out.write("  busiest threads: " +
                  ", ".join(f"{name}/{tid} {u:.2f}+{s:.2f}" for name, u, s, tid in top) + "\n")


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__.strip().splitlines()[2].strip())
    pids = [int(p) for p in sys.argv[2:]]
    last = {}
    start = time.monotonic()
    while sample(pids, last):
        time.sleep(0.1)
    with open(sys.argv[1], "w") as out:
        report(pids, last, time.monotonic() - start, out)


if __name__ == "__main__":
    main()
