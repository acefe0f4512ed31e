"""Pure-numpy reader of checkpoints written by `nvfp4cal quantize` (and of plain ones).

read_tensors(DIR) -> {name: numpy array}: every tensor of model.safetensors (or the shards of
model.safetensors.index.json). dequantized_weights(DIR) -> {name: float32 array}: the model's
tensors with every NVFP4 module `<m>` turned back into `<m>.weight` = e2m1(code) * weight_scale
* weight_scale_2 (fp32, in that order) and its scale tensors dropped; other tensors as float32.
"""
import json
import os
import struct

import numpy as np

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def _e4m3_table():
    out = np.zeros(256, np.float32)
    for b in range(256):
        e, m = (b >> 3) & 15, b & 7
        if e == 15 and m == 7:
            v = np.nan
        elif e == 0:
            v = m * 2.0 ** -9
        else:
            v = (1 + m / 8.0) * 2.0 ** (e - 7)
        out[b] = -v if b & 0x80 else v
    return out


E4M3 = _e4m3_table()


def _decode(dtype, raw, shape):
    if dtype == "BF16":
        u = np.frombuffer(raw, "<u2").astype(np.uint32) << 16
        return u.view(np.float32).reshape(shape)
    if dtype == "F16":
        return np.frombuffer(raw, "<f2").astype(np.float32).reshape(shape)
    if dtype == "F32":
        return np.frombuffer(raw, "<f4").reshape(shape).copy()
    if dtype == "U8":
        return np.frombuffer(raw, np.uint8).reshape(shape).copy()
    if dtype == "F8_E4M3":
        return np.frombuffer(raw, np.uint8).reshape(shape).copy()  # bytes; see E4M3
    raise ValueError(f"unsupported dtype {dtype}")


def read_safetensors(path):
    """{name: (dtype, array)} of one file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        out[name] = (info["dtype"], _decode(info["dtype"], data[begin:end], info["shape"]))
    return out


def read_tensors(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    files = ["model.safetensors"]
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for name in files:
        out.update(read_safetensors(os.path.join(model_dir, name)))
    return out


def dequantize(codes, scale_bytes, scale_2):
    """codes uint8 [out, in/2], scale bytes [out, in/16], scale_2 fp32 scalar -> fp32 [out, in]."""
    rows = codes.shape[0]
    nib = np.empty((rows, codes.shape[1] * 2), np.uint8)
    nib[:, 0::2] = codes & 0xF
    nib[:, 1::2] = codes >> 4
    scale = np.repeat(E4M3[scale_bytes], 16, axis=1)
    return (E2M1[nib] * scale).astype(np.float32) * np.float32(scale_2)


def dequantized_weights(model_dir):
    tensors = read_tensors(model_dir)
    out = {}
    for name, (dtype, value) in tensors.items():
        if name.endswith((".weight_scale", ".weight_scale_2", ".input_scale")):
            continue
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        if module is not None and module + ".weight_scale" in tensors:
            out[name] = dequantize(value, tensors[module + ".weight_scale"][1],
                                   tensors[module + ".weight_scale_2"][1].reshape(()))
        else:
            out[name] = value.astype(np.float32)
    return out


def full_hessian_errors(original_dir, quantized_dir, hessians_path):
    """{module: tr(E H E^T)} in float64 for every NVFP4 module with a full `<m>.hessian`."""
    original = read_tensors(original_dir)
    quantized = dequantized_weights(quantized_dir)
    quant_modules = {n[: -len(".weight_scale")] for n, _ in read_tensors(quantized_dir).items()
                     if n.endswith(".weight_scale")}
    hessians = read_safetensors(hessians_path)
    out = {}
    for m in sorted(quant_modules):
        key = m + ".hessian"
        if key not in hessians or hessians[key][1].ndim != 2:
            continue
        h = hessians[key][1].astype(np.float64)
        e = original[m + ".weight"][1].astype(np.float64) - quantized[m + ".weight"].astype(np.float64)
        out[m] = float(np.sum((e @ h) * e))
    return out
