#!/usr/bin/env python3
"""Calibration front end on dev-lm: Hessians captured by `python -m nvfp4cal calibrate`
(static, and --sequential per method), quantized by `nvfp4cal quantize`, evaluated in bits per
byte (eval_bpb.py's protocol), beside dev-lm's shipped Hessians.

    PYTHONPATH=python:build/python python3 bench/quality/run_calibration.py \
        --nvfp4cal build/client/nvfp4cal [--nvfp4cal-server build/server/nvfp4cal-server] \
        [--model DEV_LM_DIR] [--work DIR] [--methods gptq,dss] [--samples 128] [--seq-len 256]
        [--device cuda]

Needs torch and transformers (the GPU machine). Prints each calibrate run's own last line
(tokens, seconds, tokens/s) and a table.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
DEFAULT_MODEL = os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared", "data", "dev-lm"))


def run(cmd):
    """Runs a command, echoing its last output line; returns (seconds, last line)."""
    start = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.time() - start
    if p.returncode != 0:
        sys.stderr.write(p.stdout + p.stderr)
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}")
    lines = [line for line in (p.stdout + p.stderr).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    print(f"  {os.path.basename(cmd[0]) if cmd[0] != sys.executable else 'calibrate'}: "
          f"{seconds:.1f} s; {last}", flush=True)
    return seconds, last


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nvfp4cal", required=True)
    ap.add_argument("--nvfp4cal-server", default=None)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--work", default=None)
    ap.add_argument("--methods", default="gptq,dss")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="nvfp4cal-calibration-")
    os.makedirs(work, exist_ok=True)
    import eval_bpb
    with open(os.path.join(args.model, "eval.bin"), "rb") as f:
        data = f.read()

    def bpb(folder):
        return eval_bpb.bits_per_byte(eval_bpb.load_model(folder, args.device), data,
                                      args.device, 64)

    calibrate = [sys.executable, "-m", "nvfp4cal", "calibrate", "--model", args.model,
                 "--data", os.path.join(args.model, "calib.txt"), "--tokenizer", "bytes",
                 "--samples", str(args.samples), "--seq-len", str(args.seq_len),
                 "--device", args.device, "--layout", "full", "--overwrite"]
    rows = [("bf16 (reference)", "-", bpb(args.model), "-")]
    hessians = {"shipped": os.path.join(args.model, "hessians.safetensors")}
    sources = ["shipped"] if os.path.exists(hessians["shipped"]) else []
    print("static capture:", flush=True)
    hessians["static"] = os.path.join(work, "static.safetensors")
    seconds, line = run(calibrate + ["--out", hessians["static"]])
    capture_lines = [("static", line)]
    for method in args.methods.split(","):
        print(f"sequential capture, {method}:", flush=True)
        key = f"sequential-{method}"
        hessians[key] = os.path.join(work, key + ".safetensors")
        extra = ["--sequential", "--method", method]
        if args.nvfp4cal_server:
            extra += ["--nvfp4cal-server", args.nvfp4cal_server]
        seconds, line = run(calibrate + extra + ["--out", hessians[key]])
        capture_lines.append((key, f"{seconds:.1f} s with the per-layer quantization; " + line))
        for source in sources + ["static", key]:
            out = os.path.join(work, f"{method}-{source}")
            seconds, _ = run([args.nvfp4cal, "quantize", "--model", args.model, "--hessians",
                              hessians[source], "--out", out, "--method", method, "--overwrite",
                              "--quiet"])
            rows.append((method, source, bpb(out), f"{seconds:.1f}"))
    print()
    for key, line in capture_lines:
        print(f"capture {key}: {line}")
    print()
    print("| method | Hessians | bits per byte | quantize s |")
    print("|---|---|---|---|")
    for method, source, value, seconds in rows:
        print(f"| {method} | {source} | {value:.4f} | {seconds} |")


if __name__ == "__main__":
    main()
