#!/usr/bin/env python3
"""Checks nvfp4_checkpoint.py (the reader eval_bpb.py uses) without torch: quantizes dev-lm with
gptq and local_hessian through the CLI, recomputes tr(E H E^T) from the written files with the
full Hessians, and compares with the totals the CLI printed. Exit 77 (skip) without dev-lm.

    /usr/bin/python3 bench/quality/test_checkpoint_reader.py NVFP4CAL_BINARY DEV_LM_DIR
"""
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nvfp4_checkpoint  # noqa: E402


def main():
    binary, model = sys.argv[1], sys.argv[2]
    hessians = os.path.join(model, "hessians.safetensors")
    if not os.path.exists(hessians):
        print(f"skipped: no dev-lm at {model}")
        return 77
    work = tempfile.mkdtemp(prefix="nvfp4cal-reader-")
    results = {}
    for method in ("gptq", "local_hessian"):
        out = os.path.join(work, method)
        compare = ["--gptq-compare"] if method == "gptq" else []
        r = subprocess.run([binary, "quantize", "--model", model, "--hessians", hessians, "--out",
                            out, "--method", method] + compare, capture_output=True, text=True,
                           check=True)
        results[method] = (r.stdout, nvfp4_checkpoint.full_hessian_errors(model, out, hessians))
    table = results["gptq"][0].split("full-Hessian error")[1]
    m = re.search(r"total \(28\)\s+(\S+)\s+(\S+)", table)
    cli_local, cli_gptq = float(m.group(1)), float(m.group(2))
    py_gptq = sum(results["gptq"][1].values())
    py_local = sum(results["local_hessian"][1].values())
    print(f"tr(E H E^T) summed over {len(results['gptq'][1])} modules: gptq CLI {cli_gptq} "
          f"reader {py_gptq:.6g}; local_hessian CLI {cli_local} reader {py_local:.6g}")
    ok = len(results["gptq"][1]) == 28
    ok = ok and abs(py_gptq - cli_gptq) <= 1e-5 * cli_gptq
    ok = ok and abs(py_local - cli_local) <= 1e-5 * cli_local
    ok = ok and py_gptq < 0.85 * py_local
    # Dequantized weights are finite and shaped like the originals.
    original = nvfp4_checkpoint.read_tensors(model)
    deq = nvfp4_checkpoint.dequantized_weights(os.path.join(work, "gptq"))
    for name, (_, value) in original.items():
        ok = ok and name in deq and deq[name].shape == value.shape
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
