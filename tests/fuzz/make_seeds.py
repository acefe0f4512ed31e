#!/usr/bin/python3
"""Writes the seed corpora of the fuzz targets into tests/fuzz/corpus/<target>/.

Deterministic: rerunning rewrites the same files. The seeds are starting points only; libFuzzer
grows its own corpus from them at run time (scripts/test.sh keeps that one in the build folder).
"""
import json
import os
import random
import struct
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(target, name, data):
    os.makedirs(os.path.join(ROOT, target), exist_ok=True)
    with open(os.path.join(ROOT, target, name), "wb") as f:
        f.write(data)


def safetensors(tensors, metadata=None):
    """tensors: list of (name, dtype, shape, bytes)."""
    header, offset, buf = {}, 0, b""
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        buf += data
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + buf


def f32(values):
    return struct.pack("<%df" % len(values), *values)


def identity_block(n, off=0.01):
    return [1.0 if i == j else off for i in range(n) for j in range(n)]


def safetensors_seeds():
    write("safetensors", "hessians", safetensors([
        ("model.layers.0.self_attn.q_proj.hessian", "F32", [16, 16], f32(identity_block(16))),
        ("model.layers.0.self_attn.o_proj.hessian", "F32", [2, 16, 16],
         f32(identity_block(16) * 2)),
    ], {"model.layers.0.mlp.up_proj.hessian": "model.layers.0.self_attn.o_proj.hessian"}))
    write("safetensors", "weights", safetensors([
        ("model.embed_tokens.weight", "BF16", [2, 16], bytes(range(64))),
        ("lm_head.weight", "F16", [1, 16], bytes(32)),
        ("model.norm.weight", "F32", [], f32([1.0])),
        ("codes", "U8", [4], b"\x01\x02\x03\x04"),
        ("scales", "F8_E4M3", [2], b"\x38\x40"),
    ], {"format": "pt"}))
    write("safetensors", "empty", safetensors([]))
    write("safetensors", "truncated", safetensors([("x", "F32", [4], f32([1, 2, 3, 4]))])[:-5])
    write("safetensors", "asymmetric", safetensors([
        ("a.hessian", "F32", [16, 16], f32([float(i) for i in range(256)]))]))


def validation_seeds():
    rng = random.Random(1)
    for i in range(24):
        shape = rng.randrange(256)
        flags = rng.randrange(64)
        body = bytes(rng.randrange(256) for _ in range(rng.randrange(40, 400)))
        write("validation", "random-%02d" % i, bytes([shape, rng.randrange(3), flags]) + body)
    # dss with Hessians, bf16, 4 rows x 32 cols, plausible weights (0x3c.. high bytes).
    weights = b"".join(struct.pack("<H", 0x3c00 + (i * 97) % 0x300) for i in range(4 * 32))
    write("validation", "dss-bf16", bytes([4 | (1 << 3), 0, 3 | 4]) + weights)
    write("validation", "max-f32", bytes([2, 2, 0]) + f32([0.5 * (i % 7) - 1 for i in range(32)]))


def u32(v):
    return struct.pack("<I", v)


def session_header(name_idx, rows, cols_idx, dtype, method_idx, amax, hessian_idx, layout):
    extras = 4 if amax else 0
    out = bytes([1, name_idx]) + u32(rows + 1) + bytes([cols_idx]) + u32(dtype)
    out += bytes([method_idx, extras])
    if amax:
        out += b"\x01"  # Bool() true: global_amax 8
    return out + bytes([hessian_idx]) + u32(layout)


def session_weights(rows, mode=100):
    return bytes([5, 0]) + u32(rows - 1) + bytes([mode])


def session_hessian(count):
    return bytes([3, 0]) + u32(count - 1) + b"\x40"


def session_seeds():
    # max, bf16, 4 x 16, streamed (global amax), two chunks.
    write("session", "max-streamed",
          session_header(0, 4, 0, 2, 0, True, 0, 0) + session_weights(2) + session_weights(2))
    # dss with a block Hessian, 3 x 32 buffered (no amax), then a second tensor sharing it.
    write("session", "dss-shared-hessian",
          bytes([0]) + u32(5) +
          session_header(0, 3, 1, 2, 3, False, 1, 1) + session_hessian(300) +
          session_hessian(212) + session_weights(3) +
          session_header(1, 2, 1, 1, 2, True, 1, 1) + session_weights(2))
    # local_hessian, full layout 16 x 16, fp32.
    write("session", "full-layout",
          session_header(2, 2, 0, 1, 2, True, 2, 2) + session_hessian(256) + session_weights(2))
    # cancellation after the header, and an empty message.
    write("session", "cancel", session_header(0, 8, 0, 2, 0, True, 0, 0) + bytes([9, 7]))
    rng = random.Random(2)
    for i in range(12):
        write("session", "random-%02d" % i,
              bytes(rng.randrange(256) for _ in range(rng.randrange(20, 160))))


if __name__ == "__main__":
    safetensors_seeds()
    validation_seeds()
    session_seeds()
    sys.exit(0)
