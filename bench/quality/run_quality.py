#!/usr/bin/env python3
"""Quantizes dev-lm with several methods and prints bits per byte and summed tr(E H E^T).

    python3 bench/quality/run_quality.py --nvfp4cal build/client/nvfp4cal \
        [--model DEV_LM_DIR] [--work DIR] [--methods max,local_hessian,dss,gptq] [--device cuda]
        [--no-eval]      (only the tr(E H E^T) column: no torch needed)

Each method runs `nvfp4cal quantize --method M` (extra CLI flags per method with M:flag,flag,
e.g. `gptq:--gptq-act-order`); tr(E H E^T) is recomputed here from the written checkpoint with
the full Hessians (nvfp4_checkpoint.py), bpb by eval_bpb.py's protocol.
"""
import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nvfp4_checkpoint  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODEL = os.path.normpath(os.path.join(HERE, "..", "..", "..", "shared", "data", "dev-lm"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nvfp4cal", required=True)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--hessians", default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--methods", default="max,local_hessian,dss,gptq,gptq:--gptq-act-order")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-eval", action="store_true")
    args = ap.parse_args()
    hessians = args.hessians or os.path.join(args.model, "hessians.safetensors")
    work = args.work or tempfile.mkdtemp(prefix="nvfp4cal-quality-")
    rows = []
    if not args.no_eval:
        import eval_bpb
        with open(os.path.join(args.model, "eval.bin"), "rb") as f:
            data = f.read()
        bpb = eval_bpb.bits_per_byte(eval_bpb.load_model(args.model, args.device), data,
                                     args.device, 64)
        rows.append(("bf16 (reference)", bpb, 0.0))
    for spec in args.methods.split(","):
        method, _, flags = spec.partition(":")
        extra = [f for f in flags.split(",") if f]
        out = os.path.join(work, spec.replace(":", "_").replace("-", ""))
        cmd = [args.nvfp4cal, "quantize", "--model", args.model, "--hessians", hessians, "--out",
               out, "--method", method, "--overwrite", "--quiet"] + extra
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        errors = nvfp4_checkpoint.full_hessian_errors(args.model, out, hessians)
        bpb = None
        if not args.no_eval:
            bpb = eval_bpb.bits_per_byte(eval_bpb.load_model(out, args.device), data, args.device,
                                         64)
        rows.append((" ".join([method] + extra), bpb, sum(errors.values())))
    print("| method | bits per byte | sum tr(E H E^T) |")
    print("|---|---|---|")
    for name, bpb, err in rows:
        print(f"| {name} | {'-' if bpb is None else f'{bpb:.4f}'} | {err:.6g} |")


if __name__ == "__main__":
    main()
