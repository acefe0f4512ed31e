#!/usr/bin/python3
"""Every output the CLI can write passes the runtime conformance checker, and the two layouts
hold the same numbers.

Runs the real `nvfp4cal` binary on its example model (and a small MoE model with 3-D expert
tensors made here): for both layouts (modelopt, compressed-tensors), weight-only and W4A4 with
an FP8 KV cache, single-file and sharded, each output passes runtime_conformance.check_folder
(with the unquantized model as --original). Then the round trip:

  * codes and block scales: the same bytes in both layouts;
  * global scales: compressed-tensors' weight_global_scale == float32(1 / weight_scale_2),
    input_global_scale == float32(2688 / amax) where ModelOpt has input_scale == amax / 2688;
  * `nvfp4cal dequantize --dtype float32` of each equals this file's own numpy dequantization
    by that layout's rule (ModelOpt: (code * s) * s2; compressed-tensors: code * (s / gs)),
    bit for bit;
  * the two layouts' dequantized weights agree bit for bit for most elements and within two
    units in the last place for the others: ModelOpt rounds once ((code * s) is exact, times
    s2), compressed-tensors up to three times (1 / s2 when written, s / gs, times code), and no
    float32 divisor reproduces every product with a float32 multiplier (docs/cli.md). The
    share of elements that differ is printed.

usage: output_formats_test.py NVFP4CAL_BINARY WORK_DIR
"""
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runtime_conformance  # noqa: E402

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6],
                dtype=np.float32)


def e4m3_table():
    values = np.zeros(256, dtype=np.float32)
    for b in range(256):
        sign = -1.0 if b & 0x80 else 1.0
        exp, man = (b >> 3) & 0xF, b & 7
        if exp == 0xF and man == 7:
            values[b] = np.nan
        elif exp == 0:
            values[b] = sign * (man / 8.0) * 2.0 ** -6
        else:
            values[b] = sign * (1 + man / 8.0) * 2.0 ** (exp - 7)
    return values


E4M3 = e4m3_table()
DTYPES = {"F32": np.float32, "U8": np.uint8, "F8_E4M3": np.uint8, "BF16": np.uint16}


def read_st(path):
    """name -> numpy array (F8 as raw bytes, BF16 as raw bits)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        b, end = e["data_offsets"]
        out[name] = np.frombuffer(data[8 + n + b:8 + n + end],
                                  dtype=DTYPES[e["dtype"]]).reshape(e["shape"])
    return out, header.get("__metadata__", {})


def write_st(path, tensors, metadata):
    header, blobs, offset = {}, [], 0
    for name, (dtype, arr) in tensors.items():
        raw = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def read_folder(folder):
    tensors = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            tensors.update(read_st(os.path.join(folder, name))[0])
    return tensors


class Runner(object):
    def __init__(self, binary, work):
        self.binary, self.work = binary, work
        self.failures = []

    def cli(self, *args, expect_ok=True):
        p = subprocess.run([self.binary] + list(args), capture_output=True, text=True)
        if (p.returncode == 0) != expect_ok:
            raise SystemExit(f"nvfp4cal {' '.join(args)}: exit {p.returncode}\n{p.stderr}")
        return p

    def check(self, condition, message):
        if not condition:
            self.failures.append(message)
            print("FAIL:", message)

    def path(self, *parts):
        return os.path.join(self.work, *parts)


def hessians_with_amax(src, dst):
    """The example's Hessians plus an input amax per entry and an output amax per k/v_proj."""
    tensors, metadata = read_st(src)
    out = {name: ("F32", arr) for name, arr in tensors.items()}
    for i, name in enumerate(sorted(tensors)):
        if name.endswith(".hessian"):
            module = name[:-len(".hessian")]
            out[module + ".input_amax"] = ("F32", np.array([3.5 + i], dtype=np.float32))
    for layer in range(2):
        for leaf in ("k_proj", "v_proj"):
            module = f"model.layers.{layer}.self_attn.{leaf}"
            out[module + ".output_amax"] = ("F32", np.array(20.0 + layer, dtype=np.float32))
    write_st(dst, out, metadata)


def moe_model(folder):
    """A Mixtral-like layer with fused 3-D experts [experts, out, in] and a router."""
    os.makedirs(folder)
    rng = np.random.default_rng(7)

    def bf16(shape, scale):
        f = (rng.standard_normal(shape) * scale).astype(np.float32)
        return ("BF16", (f.view(np.uint32) >> 16).astype(np.uint16))

    p = "model.layers.0.block_sparse_moe."
    tensors = {
        p + "experts.w1.weight": bf16((4, 64, 32), 0.1),
        p + "experts.w3.weight": bf16((4, 64, 32), 0.2),
        p + "experts.w2.weight": bf16((4, 32, 64), 0.1),
        p + "gate.weight": bf16((4, 32), 0.1),
        "model.layers.0.self_attn.q_proj.weight": bf16((32, 32), 0.1),
        "model.embed_tokens.weight": bf16((16, 32), 1.0),
    }
    write_st(os.path.join(folder, "model.safetensors"), tensors, {"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}, f)


def input_amax(amaxes, module):
    """The recorded amax a module resolves to (its own entry, else its fused sibling's)."""
    parent, leaf = module.rsplit(".", 1)
    for candidate in (leaf, "q_proj", "gate_proj"):
        name = f"{parent}.{candidate}.input_amax"
        if name in amaxes and (candidate == leaf or leaf in ("k_proj", "v_proj", "up_proj")):
            return amaxes[name].astype(np.float32).reshape(())
    raise KeyError(module)


def dequantize_numpy(tensors, module, layout):
    codes = tensors[module + (".weight" if layout == "modelopt" else ".weight_packed")]
    scales = E4M3[tensors[module + ".weight_scale"]]
    glob = tensors[module + (".weight_scale_2" if layout == "modelopt"
                             else ".weight_global_scale")].astype(np.float32)
    low, high = E2M1[codes & 0xF], E2M1[codes >> 4]
    q = np.stack([low, high], axis=-1).reshape(codes.shape[:-1] + (codes.shape[-1] * 2,))
    block = np.repeat(scales, 16, axis=-1)
    g = glob.reshape(glob.shape[:1] + (1,) * (q.ndim - 1)) if codes.ndim == 3 else glob.reshape(())
    if layout == "modelopt":
        return (q * block).astype(np.float32) * g
    return q * (block / g).astype(np.float32)


def main():
    binary, work = sys.argv[1], sys.argv[2]
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    r = Runner(binary, work)
    r.cli("example", "--out", r.path("ex"))
    r.cli("example", "--out", r.path("ex3"), "--shards", "3")
    hessians_with_amax(r.path("ex", "hessians.safetensors"), r.path("amax.safetensors"))
    moe_model(r.path("moe"))

    runs = {}
    for layout in ("modelopt", "compressed-tensors"):
        runs[f"{layout}-w4a16"] = ("ex", ["--hessians", r.path("ex", "hessians.safetensors")])
        runs[f"{layout}-w4a4-kv"] = ("ex", ["--hessians", r.path("amax.safetensors"),
                                            "--kv-cache", "fp8"])
        runs[f"{layout}-sharded"] = ("ex3", ["--hessians", r.path("ex3", "hessians.safetensors"),
                                             "--method", "local_hessian"])
        runs[f"{layout}-moe"] = ("moe", ["--method", "mse"])
    for name, (model, extra) in runs.items():
        layout = name.split("-w4")[0].split("-sharded")[0].split("-moe")[0]
        r.cli("quantize", "--model", r.path(model), "--out", r.path(name), "--format", layout,
              *extra)
        violations = runtime_conformance.check_folder(r.path(name), original=r.path(model))
        r.check(not violations, f"{name}: {violations}")

    # Labels as asked for.
    for layout in ("modelopt", "compressed-tensors"):
        q = json.load(open(r.path(f"{layout}-w4a4-kv", "config.json")))["quantization_config"]
        if layout == "modelopt":
            r.check(q["quant_algo"] == "NVFP4" and q["kv_cache_quant_algo"] == "FP8",
                    f"modelopt W4A4 label: {q}")
        else:
            g = q["config_groups"]["group_0"]
            r.check(g["input_activations"] is not None and q["kv_cache_scheme"] is not None,
                    f"compressed-tensors W4A4 label: {q}")
        r.check(layout == "modelopt" or
                not os.path.exists(r.path(f"{layout}-w4a4-kv", "hf_quant_config.json")),
                "compressed-tensors output has an hf_quant_config.json")

    # inspect reads both layouts' labels and KV scales: no warning, every k/v_proj has its scale.
    for name in runs:
        info = json.loads(r.cli("inspect", "--json", r.path(name)).stdout)
        r.check(not info["warnings"], f"inspect {name}: {info['warnings']}")
        kv = info["kv_cache"]
        want = 4 if name.endswith("w4a4-kv") else 0
        r.check(kv["scales"] == want and (want == 0 or kv["k_v_projections"] == want),
                f"inspect {name}: kv_cache {kv}, expected {want} scales")

    # Round trip between the layouts, and each dequantization against numpy.
    mismatched = elements = 0
    amaxes = read_st(r.path("amax.safetensors"))[0]
    for run in ("w4a16", "w4a4-kv", "sharded", "moe"):
        mo = read_folder(r.path(f"modelopt-{run}"))
        ct = read_folder(r.path(f"compressed-tensors-{run}"))
        modules = sorted(n[:-len(".weight_scale_2")] for n in mo if n.endswith(".weight_scale_2"))
        r.check(modules and sorted(n[:-len(".weight_global_scale")] for n in ct
                                   if n.endswith(".weight_global_scale")) == modules,
                f"{run}: the layouts quantize different modules")
        for m in modules:
            r.check(np.array_equal(mo[m + ".weight"], ct[m + ".weight_packed"]), f"{m}: codes")
            r.check(np.array_equal(mo[m + ".weight_scale"], ct[m + ".weight_scale"]),
                    f"{m}: block scales")
            s2 = mo[m + ".weight_scale_2"].astype(np.float32).reshape(-1)
            gs = ct[m + ".weight_global_scale"].astype(np.float32).reshape(-1)
            want = np.where(s2 > 0, np.float32(1) / np.where(s2 > 0, s2, 1), 1).astype(np.float32)
            r.check(np.array_equal(gs, want), f"{m}: weight_global_scale {gs} != 1/{s2}")
            if m + ".input_scale" in mo:
                amax = input_amax(amaxes, m)
                igs = ct[m + ".input_global_scale"].astype(np.float32).reshape(-1)
                r.check(np.array_equal(igs, [np.float32(2688) / amax]),
                        f"{m}: input_global_scale {igs} for amax {amax}")
                r.check(np.array_equal(mo[m + ".input_scale"].reshape(-1),
                                       [amax / np.float32(2688)]), f"{m}: input_scale")
            else:
                r.check(m + ".input_global_scale" not in ct, f"{m}: stray input_global_scale")
            a = dequantize_numpy(mo, m, "modelopt")
            b = dequantize_numpy(ct, m, "compressed-tensors")
            differ = a.view(np.uint32) != b.view(np.uint32)
            mismatched += int(differ.sum())
            elements += a.size
            if differ.any():
                ulps = np.abs(a.view(np.int32)[differ].astype(np.int64) -
                              b.view(np.int32)[differ].astype(np.int64))
                r.check(int(ulps.max()) <= 2, f"{m}: layouts differ by {int(ulps.max())} ulp")
        for layout, tensors in (("modelopt", mo), ("compressed-tensors", ct)):
            out = r.path(f"deq-{layout}-{run}")
            r.cli("dequantize", "--in", r.path(f"{layout}-{run}"), "--out", out,
                  "--dtype", "float32")
            deq = read_folder(out)
            for m in modules:
                got = deq[m + ".weight"]
                want = dequantize_numpy(tensors, m, layout)
                r.check(got.shape == want.shape and
                        np.array_equal(got.view(np.uint32), want.view(np.uint32)),
                        f"dequantize {layout} {m}: differs from the layout's rule")
    print(f"layouts: {mismatched} of {elements} dequantized weights differ by one or two ulp "
          f"({100.0 * mismatched / max(elements, 1):.3f}%), the rest are identical")

    # A broken output fails the checker (the checker is live on these outputs).
    broken = r.path("broken")
    shutil.copytree(r.path("compressed-tensors-w4a4-kv"), broken)
    q = json.load(open(os.path.join(broken, "config.json")))
    q["quantization_config"]["config_groups"]["group_0"]["input_activations"] = None
    json.dump(q, open(os.path.join(broken, "config.json"), "w"))
    r.check(runtime_conformance.check_folder(broken, original=r.path("ex")),
            "a W4A16 label over input_global_scale tensors passed the checker")

    if r.failures:
        print(f"{len(r.failures)} failure(s)")
        return 1
    print(f"OK: {len(runs)} outputs conform; layouts hold the same codes and scales")
    return 0


if __name__ == "__main__":
    sys.exit(main())
