#!/usr/bin/python3
"""Independent reader of nvfp4cal's NVFP4 checkpoints (numpy only, no nvfp4cal code).

Parses every safetensors header and byte by hand, decodes the FP4 codes and FP8 E4M3 scales
with its own tables, dequantizes, and checks the checkpoint against NUMERICS.md:

  * header: 8-byte length multiple of 8, tensors contiguous from offset 0, file size exact;
  * each NVFP4 module: U8 [out, in/2], F8_E4M3 [out, in/16] with bytes 0x01..0x7E,
    F32 scalar weight_scale_2 == float32(g) / 2688 with g = max |W| over the fused group;
  * the dequantized weights equal the C++ `nvfp4cal dequantize --dtype float32` output bit for
    bit and are close to the original weights;
  * with --method max: the scale bytes and codes equal an independent implementation of the
    max method (NUMERICS §3) byte for byte;
  * untouched tensors equal the original's bytes; config.json / hf_quant_config.json / index.

usage: nvfp4_reader.py QUANTIZED_DIR ORIGINAL_DIR DEQUANTIZED_DIR METHOD
Prints "python reader: ok, N modules" and exits 0, or prints the first problem and exits 1.
"""
import json
import os
import struct
import sys

import numpy as np

DTYPES = {"BF16": (np.uint16, 2), "F16": (np.float16, 2), "F32": (np.float32, 4),
          "U8": (np.uint8, 1), "F8_E4M3": (np.uint8, 1), "I64": (np.int64, 8)}
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)


class CheckError(Exception):
    pass


def check(condition, message):
    if not condition:
        raise CheckError(message)


def read_safetensors(path):
    """name -> (dtype, shape, raw bytes), checking the header layout by hand."""
    with open(path, "rb") as f:
        data = f.read()
    check(len(data) >= 8, f"{path}: shorter than 8 bytes")
    (n,) = struct.unpack("<Q", data[:8])
    check(n % 8 == 0, f"{path}: header length {n} is not a multiple of 8")
    check(8 + n <= len(data), f"{path}: header runs past the file")
    header = json.loads(data[8:8 + n].decode("utf-8"))
    buffer = data[8 + n:]
    tensors = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        check(dtype in DTYPES, f"{path}: {name}: unexpected dtype {dtype}")
        size = DTYPES[dtype][1] * int(np.prod(shape, dtype=np.int64))
        check(end - begin == size, f"{path}: {name}: {end - begin} bytes for {shape} {dtype}")
        spans.append((begin, end, name))
        tensors[name] = (dtype, shape, buffer[begin:end])
    spans.sort()
    offset = 0
    for begin, end, name in spans:
        check(begin == offset, f"{path}: {name} starts at {begin}, expected {offset}")
        offset = end
    check(offset == len(buffer), f"{path}: buffer {len(buffer)} bytes, tensors cover {offset}")
    return tensors


def read_model(folder):
    """All tensors of a model folder (single file or shards) -> name -> (dtype, shape, bytes)."""
    tensors = {}
    for file in sorted(os.listdir(folder)):
        if file.startswith("model") and file.endswith(".safetensors"):
            for name, value in read_safetensors(os.path.join(folder, file)).items():
                check(name not in tensors, f"{name} in two shards")
                tensors[name] = value + (file,)
    return tensors


def as_float32(dtype, shape, raw):
    if dtype == "BF16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if dtype == "F16":
        return np.frombuffer(raw, dtype="<f2").astype(np.float32).reshape(shape)
    check(dtype == "F32", f"cannot read {dtype} as float")
    return np.frombuffer(raw, dtype="<f4").reshape(shape)


def e4m3_values():
    """Value of every E4M3 byte 0x00..0x7E (bias 7, subnormals 2^-9 * m), as float64."""
    values = []
    for byte in range(0x7F):
        exponent, mantissa = byte >> 3, byte & 7
        if exponent == 0:
            values.append(mantissa * 2.0 ** -9)
        else:
            values.append((1.0 + mantissa / 8.0) * 2.0 ** (exponent - 7))
    return np.array(values, dtype=np.float64)


E4M3 = e4m3_values()


def encode_e4m3(v):
    """float32 array in [2^-9, 448] -> nearest E4M3 byte, ties to the even byte."""
    v = v.astype(np.float64)
    hi = np.clip(np.searchsorted(E4M3, v, side="left"), 1, 126)
    lo = hi - 1
    d_lo = v - E4M3[lo]
    d_hi = E4M3[hi] - v
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
    return np.where(pick_hi, hi, lo).astype(np.uint8)


def encode_e2m1(y):
    """NUMERICS §2's table: magnitude index by thresholds, sign from y."""
    a = np.abs(y)
    index = np.select([a <= 0.25, a < 0.75, a <= 1.25, a < 1.75, a <= 2.5, a < 3.5, a <= 5.0],
                      [0, 1, 2, 3, 4, 5, 6], default=7).astype(np.uint8)
    return index | np.where(y < 0, 8, 0).astype(np.uint8)


def unpack_codes(packed, rows, cols):
    p = np.frombuffer(packed, dtype=np.uint8).reshape(rows, cols // 2)
    codes = np.empty((rows, cols), dtype=np.uint8)
    codes[:, 0::2] = p & 0xF
    codes[:, 1::2] = p >> 4
    return codes


def group_key(module):
    parent, _, leaf = module.rpartition(".")
    for suffix, leaves in (("qkv", ("q_proj", "k_proj", "v_proj")),
                           ("gate_up", ("gate_proj", "up_proj")), ("w13", ("w1", "w3"))):
        if leaf in leaves:
            return parent + "|" + suffix
    return module


def max_method(w, g, s2):
    """Independent NUMERICS §3 `max`: scale bytes and codes, fp32 in the spec's order."""
    rows, cols = w.shape
    blocks = w.reshape(rows, cols // 16, 16)
    amax = np.abs(blocks).max(axis=2).astype(np.float32)
    a6 = np.where(amax == 0, np.float32(1.0), amax / np.float32(6.0)).astype(np.float32)
    v = (a6 * np.float32(448.0)) / (np.float32(g) / np.float32(6.0))
    v = np.clip(v.astype(np.float32), np.float32(2.0 ** -9), np.float32(448.0))
    sf8 = encode_e4m3(v)
    d = (E4M3[sf8].astype(np.float32) * np.float32(s2)).astype(np.float32)
    codes = encode_e2m1((blocks / d[:, :, None]).astype(np.float32))
    return sf8, codes.reshape(rows, cols)


def run(quantized_dir, original_dir, dequantized_dir, method):
    q = read_model(quantized_dir)
    original = read_model(original_dir)
    deq = read_model(dequantized_dir)
    modules = sorted(name[:-len(".weight_scale_2")] for name in q
                     if name.endswith(".weight_scale_2"))
    check(modules, "no NVFP4 module found")

    # Global amax per fused group, from the original weights.
    group_amax = {}
    for m in modules:
        dtype, shape, raw, _ = original[m + ".weight"]
        g = np.float32(np.abs(as_float32(dtype, shape, raw)).max())
        group_amax[group_key(m)] = max(group_amax.get(group_key(m), np.float32(0)), g)

    quantized_parts = set()
    errors = []
    for m in modules:
        w_dtype, w_shape, w_raw, _ = original[m + ".weight"]
        rows, cols = w_shape
        c_dtype, c_shape, c_raw, c_file = q[m + ".weight"]
        s_dtype, s_shape, s_raw, s_file = q[m + ".weight_scale"]
        g_dtype, g_shape, g_raw, g_file = q[m + ".weight_scale_2"]
        check(c_dtype == "U8" and c_shape == [rows, cols // 2], f"{m}.weight: {c_dtype} {c_shape}")
        check(s_dtype == "F8_E4M3" and s_shape == [rows, cols // 16],
              f"{m}.weight_scale: {s_dtype} {s_shape}")
        check(g_dtype == "F32" and g_shape == [], f"{m}.weight_scale_2: {g_dtype} {g_shape}")
        check(c_file == s_file == g_file == original[m + ".weight"][3], f"{m}: moved shard")
        quantized_parts.update([m + ".weight", m + ".weight_scale", m + ".weight_scale_2"])
        if m + ".input_scale" in q:
            i_dtype, i_shape, _, i_file = q[m + ".input_scale"]
            check(i_dtype == "F32" and i_shape == [] and i_file == c_file,
                  f"{m}.input_scale: {i_dtype} {i_shape} in {i_file}")
            quantized_parts.add(m + ".input_scale")

        s2 = np.frombuffer(g_raw, dtype="<f4")[0]
        g = group_amax[group_key(m)]
        check(s2 == np.float32(g) / np.float32(2688.0),
              f"{m}: weight_scale_2 {s2!r} != g / 2688 with g = {g!r}")
        sf8 = np.frombuffer(s_raw, dtype=np.uint8).reshape(rows, cols // 16)
        check(((sf8 >= 1) & (sf8 <= 0x7E)).all(), f"{m}: scale byte outside 0x01..0x7E")
        codes = unpack_codes(c_raw, rows, cols)

        # Dequantize: (e2m1 * e4m3) * s2 in fp32, compared bit for bit with the C++ tool.
        values = np.where(codes & 8, -E2M1[codes & 7], E2M1[codes & 7]).astype(np.float32)
        block_scale = np.repeat(E4M3[sf8].astype(np.float32), 16, axis=1)
        w_hat = ((values * block_scale).astype(np.float32) * s2).astype(np.float32)
        d_dtype, d_shape, d_raw, _ = deq[m + ".weight"]
        check(d_dtype == "F32" and d_shape == [rows, cols], f"dequantized {m}: {d_dtype}")
        cpp = np.frombuffer(d_raw, dtype="<f4").reshape(rows, cols)
        mismatch = np.count_nonzero(cpp.view(np.uint32) != w_hat.view(np.uint32))
        check(mismatch == 0, f"{m}: {mismatch} dequantized values differ from the C++ result")

        w = as_float32(w_dtype, w_shape, w_raw)
        diff = (w_hat - w).astype(np.float64)
        error = np.linalg.norm(diff) / np.linalg.norm(w.astype(np.float64))
        check(error < 0.5, f"{m}: relative dequantization error {error:.3f}")
        errors.append(error)

        if method == "max":
            want_sf8, want_codes = max_method(w, g, s2)
            check((want_sf8 == sf8).all(),
                  f"{m}: {np.count_nonzero(want_sf8 != sf8)} scale bytes differ from the "
                  f"independent max method")
            check((want_codes == codes).all(),
                  f"{m}: {np.count_nonzero(want_codes != codes)} codes differ from the "
                  f"independent max method")

    # FP8 KV cache: a scalar scale beside every k_proj / v_proj weight exactly when labelled.
    hf = json.load(open(os.path.join(quantized_dir, "hf_quant_config.json")))
    kv_fp8 = hf["quantization"].get("kv_cache_quant_algo") == "FP8"
    for name in original:
        for weight, scale in ((".k_proj.weight", ".k_scale"), (".v_proj.weight", ".v_scale")):
            if name.endswith(weight):
                scale_name = name[:-len(".weight")] + scale
                check((scale_name in q) == kv_fp8, f"{scale_name}: present {scale_name in q}, "
                      f"kv_cache_quant_algo {hf['quantization'].get('kv_cache_quant_algo')}")
                if kv_fp8:
                    check(q[scale_name][:2] == ("F32", []), f"{scale_name}: {q[scale_name][:2]}")
                    quantized_parts.add(scale_name)

    # Untouched tensors: identical bytes.
    for name, (dtype, shape, raw, file) in original.items():
        if name in quantized_parts:
            continue
        check(name in q, f"{name} missing from the output")
        check(q[name][:3] == (dtype, shape, raw), f"{name} changed")
    check(set(q) == set(original) | quantized_parts, "unexpected tensors in the output")

    # Configs and index.
    config = json.load(open(os.path.join(quantized_dir, "config.json")))
    qc = config["quantization_config"]
    # The label must not promise what the tensors lack (runtimes trust it): W4A4 "NVFP4" with an
    # input_scale for every module, or weight-only "W4A16_NVFP4" with none.
    with_input_scale = sum(m + ".input_scale" in q for m in modules)
    check(with_input_scale in (0, len(modules)),
          f"{with_input_scale} of {len(modules)} modules have input_scale: neither label fits")
    algo = "NVFP4" if with_input_scale == len(modules) else "W4A16_NVFP4"
    check(qc["quant_method"] == "modelopt" and qc["quant_algo"] == algo, f"config: {qc}")
    args = {"num_bits": 4, "type": "float", "group_size": 16, "dynamic": False}
    check(qc["config_groups"]["group_0"]["weights"] == args, "config weights")
    if algo == "NVFP4":
        check(qc["config_groups"]["group_0"]["input_activations"] == args, "config activations")
    else:
        check(qc["config_groups"]["group_0"].get("input_activations") is None,
              "weight-only config with input_activations")
    check(qc["config_groups"]["group_0"]["targets"] == ["Linear"], "config targets")
    not_quantized = sorted(n[:-len(".weight")] for n, (d, s, _, _) in original.items()
                           if n.endswith(".weight") and len(s) == 2 and n[:-7] not in modules)
    check(sorted(qc["ignore"]) == not_quantized, f"ignore {qc['ignore']} != {not_quantized}")
    check(hf["producer"]["name"] == "nvfp4cal", "hf_quant_config producer")
    check(hf["quantization"]["quant_algo"] == algo, "hf_quant_config quant_algo")
    check(hf["quantization"]["group_size"] == 16, "hf_quant_config group_size")
    check(kv_fp8 or hf["quantization"]["kv_cache_quant_algo"] is None, "hf_quant_config kv cache")
    check(sorted(hf["quantization"]["exclude_modules"]) == not_quantized, "exclude_modules")
    index_path = os.path.join(quantized_dir, "model.safetensors.index.json")
    if os.path.exists(os.path.join(original_dir, "model.safetensors.index.json")):
        index = json.load(open(index_path))
        check(index["weight_map"] == {n: v[3] for n, v in q.items()}, "index weight_map")
        check(index["metadata"]["total_size"] == sum(len(v[2]) for v in q.values()),
              "index total_size")
    else:
        check(not os.path.exists(index_path), "index written for a single-file model")
    return len(modules), max(errors)


def main():
    if len(sys.argv) != 5:
        print(__doc__)
        return 2
    try:
        count, worst = run(*sys.argv[1:])
    except CheckError as e:
        print(f"python reader: FAILED: {e}")
        return 1
    print(f"python reader: ok, {count} modules, worst relative weight error {worst:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
