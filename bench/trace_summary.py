#!/usr/bin/env python3
"""Summarises `nvfp4cal quantize --trace FILE` timelines in text.

  bench/trace_summary.py TRACE.json [TRACE.json ...] [--buckets N]

For each file: the run's span; per category, the summed span time and the time covered by at
least one span (the union: how long that stage was going on somewhere); per thread, its busy
time by category; the tensors' async rows (scan end to result, and through servers the last
chunk sent to the result) as percentiles; and a time
line in N buckets showing which categories were active in each (a letter per category, upper
case when more than half of the bucket was covered). What it answers: which stage the run
waited on, and when.
"""

import argparse
import json
from collections import defaultdict


def union_length(intervals):
    total = 0
    end = None
    start = None
    for b, e in sorted(intervals):
        if end is None or b > end:
            if end is not None:
                total += end - start
            start, end = b, e
        else:
            end = max(end, e)
    if end is not None:
        total += end - start
    return total


def covered(intervals, lo, hi):
    clipped = [(max(b, lo), min(e, hi)) for b, e in intervals if e > lo and b < hi]
    return union_length(clipped)


def percentile(values, q):
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]


def summarise(path, buckets):
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    names = {}
    spans = []  # (category, thread, begin, end, name)
    asyncs = {}
    for ev in events:
        if ev.get("ph") == "M" and ev.get("name") == "thread_name":
            names[ev["tid"]] = ev["args"]["name"]
        elif ev.get("ph") == "X":
            spans.append((ev.get("cat", ""), ev["tid"], ev["ts"], ev["ts"] + ev["dur"],
                          ev["name"]))
        elif ev.get("ph") in ("b", "e"):
            key = (ev["id"], ev["name"])
            entry = asyncs.setdefault(key, {"cat": ev.get("cat", "")})
            entry[ev["ph"]] = ev["ts"]
    if not spans:
        print(f"{path}: no spans")
        return
    t0 = min(s[2] for s in spans)
    t1 = max(s[3] for s in spans)
    print(f"== {path}: {len(spans)} spans over {(t1 - t0) / 1e6:.3f} s")
    by_cat = defaultdict(list)
    by_name_kind = defaultdict(list)
    for cat, _, b, e, name in spans:
        by_cat[cat].append((b, e))
        by_name_kind[(cat, name.split(" ")[0])].append((b, e))
    print(f"{'category':<10} {'sum s':>8} {'covered s':>10}")
    for cat in sorted(by_cat):
        iv = by_cat[cat]
        print(f"{cat:<10} {sum(e - b for b, e in iv) / 1e6:8.3f} {union_length(iv) / 1e6:10.3f}")
    print(f"{'stage':<28} {'count':>6} {'sum s':>8} {'covered s':>10} {'max ms':>8}")
    for (cat, kind), iv in sorted(by_name_kind.items()):
        print(f"{cat + '/' + kind:<28} {len(iv):6d} {sum(e - b for b, e in iv) / 1e6:8.3f} "
              f"{union_length(iv) / 1e6:10.3f} {max(e - b for b, e in iv) / 1e3:8.1f}")
    per_thread = defaultdict(lambda: defaultdict(float))
    for cat, tid, b, e, name in spans:
        # Waits ("wait for <tensor>", "wait for read-ahead memory") apart from the work.
        per_thread[tid]["wait" if name.startswith("wait for") else cat] += (e - b) / 1e6
    print("threads (seconds by category; waits apart):")
    for tid in sorted(per_thread):
        parts = ", ".join(f"{c} {s:.2f}" for c, s in sorted(per_thread[tid].items()))
        print(f"  {names.get(tid, tid)}: {parts}")
    # Per tensor: scan end to result (category quantize); through servers also the last chunk
    # sent to the result (category server).
    for cat, label in (("quantize", "scan->result"), ("server", "sent->result (at the server)")):
        done = [v for v in asyncs.values() if v["cat"] == cat and "b" in v and "e" in v]
        lat = [(v["e"] - v["b"]) / 1e3 for v in done]
        if not lat:
            continue
        print(f"tensors {label}: {len(lat)}, ms p10 {percentile(lat, 0.1):.0f} "
              f"p50 {percentile(lat, 0.5):.0f} p90 {percentile(lat, 0.9):.0f} "
              f"max {max(lat):.0f}")
        if cat == "quantize":
            ends = sorted(v["e"] for v in done)
            print(f"  results: first at {(ends[0] - t0) / 1e6:.2f} s, last at "
                  f"{(ends[-1] - t0) / 1e6:.2f} s")
    cats = sorted(by_cat)
    letters = {}  # one letter per category, distinct (its first not taken yet)
    for c in cats:
        letters[c] = next((ch for ch in c.lower() if ch.isalpha() and ch not in letters.values()),
                          "?")
    print("time line (" + ", ".join(f"{letters[c]}={c}" for c in cats) +
          "; upper case: more than half of the bucket):")
    width = (t1 - t0) / buckets
    for k in range(buckets):
        lo, hi = t0 + k * width, t0 + (k + 1) * width
        marks = ""
        for c in cats:
            share = covered(by_cat[c], lo, hi) / width
            marks += (letters[c].upper() if share > 0.5 else letters[c]) if share > 0 else "."
        done = sum(1 for v in asyncs.values()
                   if v["cat"] == "quantize" and "e" in v and v["e"] <= hi)
        print(f"  {(lo - t0) / 1e6:6.2f} s {marks}  results {done}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("traces", nargs="+")
    p.add_argument("--buckets", type=int, default=20)
    args = p.parse_args()
    for path in args.traces:
        summarise(path, args.buckets)


if __name__ == "__main__":
    main()
