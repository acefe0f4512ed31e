#!/usr/bin/env python3
"""Block-scale fine-tuning (`python -m nvfp4cal finetune-scales`) on dev-lm: bits per byte of the
bf16 model, of the given NVFP4 checkpoints, and of the fine-tuned start checkpoint per seed and
option variant, with time and peak GPU memory.

    PYTHONPATH=python:bench/quality python3 bench/quality/run_finetune.py \
        --model DEV_LM_DIR --start DIR_gptq_dss [--baseline max=DIR --baseline gptq=DIR ...] \
        [--seeds 0,1,2] [--variant "default:" --variant "lr2e-3:--lr 2e-3"] [--device cuda] \
        [--work DIR] [--json FILE] [--repeat-check]

The checkpoints come from `nvfp4cal quantize` (e.g. `--method gptq --gptq-scale-search dss`
with dev-lm's hessians.safetensors). Training data: DEV_LM_DIR/calib.txt byte by byte; the
figure: eval_bpb.py's protocol on DEV_LM_DIR/eval.bin. Gap closed = (max - x) / (max - bf16)
when a `max` baseline is given. Needs torch and transformers (the GPU machine).
"""
import argparse
import json
import os
import shlex
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "..", "python"))
DEFAULT_MODEL = os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared", "data", "dev-lm"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--start", required=True, help="the NVFP4 checkpoint to fine-tune")
    ap.add_argument("--baseline", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:OPTIONS",
                    help="finetune-scales options of a variant (default: 'default:')")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None, help="write every result here")
    ap.add_argument("--repeat-check", action="store_true",
                    help="run the first variant's first seed twice and compare the bytes")
    args = ap.parse_args()
    import torch
    import eval_bpb
    from nvfp4cal import cli

    work = args.work or tempfile.mkdtemp(prefix="nvfp4cal-finetune-")
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(args.model, "eval.bin"), "rb") as f:
        data = f.read()

    def bpb(folder):
        return eval_bpb.bits_per_byte(eval_bpb.load_model(folder, args.device), data,
                                      args.device, 64)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"device: {device_name}; torch {torch.__version__}", flush=True)
    results = {"device": device_name, "torch": torch.__version__, "rows": []}
    rows = results["rows"]
    rows.append({"name": "bf16 (reference)", "bpb": bpb(args.model)})
    for spec in args.baseline:
        name, _, folder = spec.partition("=")
        rows.append({"name": name, "bpb": bpb(folder)})
        print(f"{name}: {rows[-1]['bpb']:.4f}", flush=True)
    rows.append({"name": "start", "bpb": bpb(args.start)})
    bf16 = rows[0]["bpb"]
    maxv = next((r["bpb"] for r in rows if r["name"] == "max"), None)

    def closed(value):
        return None if maxv is None else (maxv - value) / (maxv - bf16)

    variants = args.variant or ["default:"]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    runs = [(v, s) for v in variants for s in seeds]
    if args.repeat_check:
        runs.insert(1, (variants[0], seeds[0]))
    outputs = {}
    for variant, seed in runs:
        name, _, options = variant.partition(":")
        out = os.path.join(work, f"{name}-seed{seed}")
        repeat = out in outputs
        if repeat:
            out += "-repeat"
        argv = ["finetune-scales", "--model", args.model, "--checkpoint", args.start,
                "--data", os.path.join(args.model, "calib.txt"), "--tokenizer", "bytes",
                "--out", out, "--device", args.device, "--dtype", "fp32", "--seed", str(seed),
                "--overwrite", "--quiet"] + shlex.split(options)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        start = time.time()
        code = cli.main(argv)
        wall = time.time() - start
        if code != 0:
            raise SystemExit(f"finetune-scales failed ({code}): {' '.join(argv)}")
        with open(out + ".finetune.json") as f:
            stats = json.load(f)
        value = bpb(out)
        with open(os.path.join(out, "model.safetensors"), "rb") as f:
            outputs.setdefault(out.replace("-repeat", ""), []).append(f.read())
        row = {"name": f"{name} seed {seed}" + (" (repeat)" if repeat else ""), "bpb": value,
               "variant": name, "options": options, "seed": seed, "wall_s": wall,
               "train_s": stats["seconds"], "peak_gpu_bytes": stats["peak_gpu_memory_bytes"],
               "best_step": stats["best_step"], "steps_run": stats["steps_run"],
               "scales_moved": stats["scales_moved"], "scales": stats["scales"],
               "initial_val_kl": stats["initial_val_kl"], "best_val_kl": stats["best_val_kl"],
               "evaluations": stats["evaluations"]}
        rows.append(row)
        gap = closed(value)
        print(f"{row['name']}: bpb {value:.4f}" + (f" ({100 * gap:.1f}% of the gap)" if gap is not
                                                   None else "")
              + f"; best step {row['best_step']}/{row['steps_run']}, {row['scales_moved']}/"
              f"{row['scales']} scales moved; val KL {row['initial_val_kl']:.5f} -> "
              f"{row['best_val_kl']:.5f}; {wall:.1f} s wall ({row['train_s']:.1f} s training), "
              f"peak {(row['peak_gpu_bytes'] or 0) / 2**20:.0f} MiB", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    if args.repeat_check:
        for key, blobs in outputs.items():
            if len(blobs) > 1:
                results["repeat_identical"] = blobs[0] == blobs[1]
                print(f"repeat of {os.path.basename(key)}: "
                      f"{'identical' if blobs[0] == blobs[1] else 'DIFFERENT'} bytes", flush=True)
    print()
    print(f"device: {device_name}")
    print("| checkpoint | bits per byte | gap closed | best step | scales moved | time s | "
          "peak GPU MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        gap = closed(r["bpb"])
        cells = [r["name"], f"{r['bpb']:.4f}", "-" if gap is None else f"{100 * gap:.1f}%"]
        if "wall_s" in r:
            cells += [f"{r['best_step']} / {r['steps_run']}",
                      f"{r['scales_moved']} / {r['scales']}",
                      f"{r['wall_s']:.1f}", f"{(r['peak_gpu_bytes'] or 0) / 2**20:.0f}"]
        else:
            cells += ["-"] * 4
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
