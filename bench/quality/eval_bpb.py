#!/usr/bin/env python3
"""Bits per byte of dev-lm (or a checkpoint of it written by `nvfp4cal quantize`).

    python3 bench/quality/eval_bpb.py --model DIR [--eval FILE] [--device cuda] [--batch 64]

Protocol (dev-lm README): split eval.bin into non-overlapping 257-byte windows; each window
predicts its last 256 bytes from its first 256; cross-entropy in fp32, summed, divided by the
number of predicted bytes and by ln 2. NVFP4 weights are dequantized (code * weight_scale *
weight_scale_2, nvfp4_checkpoint.py) and loaded into the fp32 model built from config.json
(its quantization_config removed). Needs torch and transformers (the GPU machine).
"""
import argparse
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nvfp4_checkpoint  # noqa: E402

DEFAULT_EVAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                            "shared", "data", "dev-lm", "eval.bin")


def load_model(model_dir, device):
    import torch
    import transformers

    with open(os.path.join(model_dir, "config.json")) as f:
        config_dict = json.load(f)
    config_dict.pop("quantization_config", None)
    config = transformers.LlamaConfig.from_dict(config_dict)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    state = {k: torch.from_numpy(np.ascontiguousarray(v))
             for k, v in nvfp4_checkpoint.dequantized_weights(model_dir).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise SystemExit(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval()


def bits_per_byte(model, data, device, batch):
    import torch

    window = 257
    count = len(data) // window
    windows = np.frombuffer(data[: count * window], np.uint8).reshape(count, window)
    total = 0.0
    with torch.no_grad():
        for i in range(0, count, batch):
            chunk = torch.from_numpy(windows[i:i + batch].astype(np.int64)).to(device)
            logits = model(input_ids=chunk[:, :256]).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
    return total / (count * 256) / math.log(2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--eval", default=None, help="eval.bin (default: DIR/eval.bin, else dev-lm's)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    path = args.eval or (os.path.join(args.model, "eval.bin")
                         if os.path.exists(os.path.join(args.model, "eval.bin")) else DEFAULT_EVAL)
    with open(path, "rb") as f:
        data = f.read()
    model = load_model(args.model, args.device)
    print(f"{bits_per_byte(model, data, args.device, args.batch):.4f}")


if __name__ == "__main__":
    main()
