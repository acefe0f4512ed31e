#!/usr/bin/python3
"""Self-test of runtime_conformance.py (Python 3 + numpy only, a few seconds).

Builds tiny NVFP4 checkpoints of every kind nvfp4cal writes in a temporary folder (ModelOpt
NVFP4 and W4A16_NVFP4, with and without FP8 KV cache, sharded with an index, a 3-D expert
tensor, compressed-tensors W4A4 and W4A16), asserts that each passes, then plants one fault at
a time and asserts that the checker reports it under the expected rule id.

usage: runtime_conformance_selftest.py      exit 0 when every expectation holds
"""
import collections
import json
import os
import struct
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import runtime_conformance as rc  # noqa: E402

HIDDEN, INTER, VOCAB, EXPERTS = 32, 64, 16, 4


def e4m3_table():
    vals = []
    for byte in range(0x7F):
        e, m = byte >> 3, byte & 7
        vals.append(m * 2.0 ** -9 if e == 0 else (1 + m / 8.0) * 2.0 ** (e - 7))
    return np.array(vals)


E4M3 = e4m3_table()


def to_bf16(a):
    bits = np.asarray(a, dtype=np.float32).view(np.uint32)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return bits


def bf16_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


class Model(object):
    """An in-memory checkpoint: tensors name -> [dtype, shape, bytes], configs, shard count."""

    def __init__(self):
        self.tensors = collections.OrderedDict()
        self.config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                       "hidden_size": HIDDEN, "vocab_size": VOCAB}
        self.hfq = None
        self.shards = 1
        self.index_drop = []      # names left out of weight_map
        self.extra_files = {}     # file name -> text

    def put(self, name, dtype, shape, data):
        self.tensors[name] = [dtype, list(shape), bytes(data)]


def f32(x, shape):
    return np.asarray(x, dtype="<f4").reshape(shape).tobytes()


def block_scales(w, s2):
    """E4M3 bytes of amax_block / 6 / s2 (nearest value), as NVFP4 max calibration gives."""
    rows = w.reshape(-1, w.shape[-1])
    amax = np.abs(rows.reshape(rows.shape[0], -1, 16)).max(axis=2) / 6.0
    v = np.clip(amax / s2, 2.0 ** -9, 448.0)
    idx = np.abs(v[..., None] - E4M3[None, None, :]).argmin(axis=2).astype(np.uint8)
    return idx.reshape(w.shape[:-1] + (w.shape[-1] // 16,))


def build(fmt="modelopt", act=True, kv=False, shards=1, moe=False, seed=0):
    """Returns (quantized Model, original Model)."""
    rng = np.random.RandomState(seed)
    orig = Model()
    mods = []  # (module, float32 weights)

    def weight(name, shape, scale=0.05):
        w = bf16_to_f32(to_bf16(rng.standard_normal(shape).astype(np.float32) * scale))
        orig.put(name + ".weight", "BF16", shape, to_bf16(w).tobytes())
        return w

    weight("model.embed_tokens", (VOCAB, HIDDEN))
    for layer in range(2):
        p = "model.layers.%d." % layer
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            mods.append((p + "self_attn." + n, weight(p + "self_attn." + n, (HIDDEN, HIDDEN))))
        if moe and layer == 0:
            mods.append((p + "mlp.experts.gate_up_proj",
                         weight(p + "mlp.experts.gate_up_proj", (EXPERTS, 2 * INTER, HIDDEN))))
            mods.append((p + "mlp.experts.down_proj",
                         weight(p + "mlp.experts.down_proj", (EXPERTS, HIDDEN, INTER))))
            weight(p + "mlp.gate", (EXPERTS, HIDDEN))
        else:
            for n, shape in (("gate_proj", (INTER, HIDDEN)), ("up_proj", (INTER, HIDDEN)),
                             ("down_proj", (HIDDEN, INTER))):
                mods.append((p + "mlp." + n, weight(p + "mlp." + n, shape)))
        for n in ("input_layernorm", "post_attention_layernorm"):
            orig.put(p + n + ".weight", "BF16", (HIDDEN,), to_bf16(np.ones(HIDDEN)).tobytes())
    orig.put("model.norm.weight", "BF16", (HIDDEN,), to_bf16(np.ones(HIDDEN)).tobytes())
    weight("lm_head", (VOCAB, HIDDEN))

    # Left unquantized: lm_head, layer 1's down_proj, the router.
    skip = {"model.layers.1.mlp.down_proj"}
    ignore = ["lm_head", "model.layers.1.mlp.down_proj"] + (
        ["model.layers.0.mlp.gate"] if moe else [])
    q = Model()
    q.shards = shards
    quantized = [(m, w) for m, w in mods if m not in skip]
    # Global amax per fused group, expert by expert.
    gmax = {}
    for m, w in quantized:
        a = np.abs(w).reshape(w.shape[0], -1).max(axis=1) if w.ndim == 3 else \
            np.array([np.abs(w).max()])
        k = rc.fused_key(m) or m
        gmax[k] = a if k not in gmax else np.maximum(gmax[k], a)
    qset = set(m for m, _ in quantized)
    for name, (dtype, shape, data) in orig.tensors.items():
        m = name[:-len(".weight")] if name.endswith(".weight") else None
        if m not in qset:
            q.tensors[name] = [dtype, shape, data]
            continue
        w = dict(quantized)[m]
        g = gmax[rc.fused_key(m) or m].astype(np.float32)
        s2 = g / np.float32(2688.0)
        lead = list(w.shape[:-2])
        if w.ndim == 3:
            sf = np.stack([block_scales(w[e], s2[e]) for e in range(w.shape[0])])
        else:
            sf = block_scales(w, s2[0])
        codes = rng.randint(0, 256, size=lead + [w.shape[-2], w.shape[-1] // 2]).astype(np.uint8)
        experts = w.shape[0] if w.ndim == 3 else 0
        sshape = [experts] if experts else ([] if fmt == "modelopt" else [1])
        act_amax = np.full(max(experts, 1), 3.5, dtype=np.float32)
        if fmt == "modelopt":
            q.put(m + ".weight", "U8", codes.shape, codes.tobytes())
            q.put(m + ".weight_scale", "F8_E4M3", sf.shape, sf.tobytes())
            q.put(m + ".weight_scale_2", "F32", sshape, f32(s2, sshape))
            if act:
                q.put(m + ".input_scale", "F32", sshape, f32(act_amax / np.float32(2688), sshape))
        else:
            q.put(m + ".weight_packed", "U8", codes.shape, codes.tobytes())
            q.put(m + ".weight_scale", "F8_E4M3", sf.shape, sf.tobytes())
            q.put(m + ".weight_global_scale", "F32", sshape, f32(np.float32(2688) / g, sshape))
            if act:
                q.put(m + ".input_global_scale", "F32", sshape,
                      f32(np.float32(2688) / act_amax, sshape))
        if kv and m.endswith(("k_proj", "v_proj")):
            kind = m[-6]
            if fmt == "modelopt":
                q.put("%s.%s_scale" % (m, kind), "F32", [], f32(0.1, []))
            else:
                attn = m.rsplit(".", 1)[0]
                q.put("%s.%s_scale" % (attn, kind), "BF16", [1], to_bf16([0.1]).tobytes())
    wargs = {"num_bits": 4, "type": "float", "group_size": 16, "dynamic": False}
    if fmt == "modelopt":
        algo = "NVFP4" if act else "W4A16_NVFP4"
        group = {"weights": dict(wargs)}
        if act:
            group["input_activations"] = dict(wargs)
        group["targets"] = ["Linear"]
        qc = {"quant_method": "modelopt", "quant_algo": algo,
              "config_groups": {"group_0": group}, "ignore": list(ignore)}
        if kv:
            qc["kv_cache_quant_algo"] = "FP8"
            qc["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
        q.hfq = {"producer": {"name": "nvfp4cal", "version": "test"},
                 "quantization": {"quant_algo": algo, "kv_cache_quant_algo": "FP8" if kv else None,
                                  "group_size": 16, "exclude_modules": list(ignore)}}
    else:
        w = dict(wargs, strategy="tensor_group", symmetric=True)
        group = {"targets": ["Linear"], "weights": w,
                 "input_activations": dict(w, dynamic="local") if act else None,
                 "output_activations": None, "format": "nvfp4-pack-quantized"}
        qc = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
              "quantization_status": "compressed", "config_groups": {"group_0": group},
              "ignore": list(ignore),
              "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor",
                                  "dynamic": False, "symmetric": True} if kv else None}
    q.config = dict(orig.config, quantization_config=qc)
    return q, orig


def write_st(path, tensors, hole=False):
    header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data) + (4 if hole else 0)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, (_, _, data) in tensors.items():
            f.write(data)
            if hole:
                f.write(b"\0" * 4)


def write(model, folder, hole=False):
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.config, f, indent=1)
    if model.hfq is not None:
        with open(os.path.join(folder, "hf_quant_config.json"), "w") as f:
            json.dump(model.hfq, f, indent=1)
    for name, text in model.extra_files.items():
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)
    names = list(model.tensors)
    if model.shards == 1:
        write_st(os.path.join(folder, "model.safetensors"), model.tensors, hole)
        return
    weight_map = {}
    per = (len(names) + model.shards - 1) // model.shards
    for k in range(model.shards):
        file = "model-%05d-of-%05d.safetensors" % (k + 1, model.shards)
        part = collections.OrderedDict((n, model.tensors[n]) for n in names[k * per:(k + 1) * per])
        write_st(os.path.join(folder, file), part, hole and k == 0)
        for n in part:
            if n not in model.index_drop:
                weight_map[n] = file
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)


# ------------------------------------------------------------------------ faults
def set_ignore(q, entries):
    qc = q.config["quantization_config"]
    qc["ignore"] = list(entries)
    if q.hfq is not None:
        q.hfq["quantization"]["exclude_modules"] = list(entries)


def scale_f32(q, name, factor):
    dtype, shape, data = q.tensors[name]
    a = np.frombuffer(data, dtype="<f4") * np.float32(factor)
    q.tensors[name][2] = a.astype("<f4").tobytes()


def poke_byte(q, name, index, value):
    data = bytearray(q.tensors[name][2])
    data[index] = value
    q.tensors[name][2] = bytes(data)


A = "model.layers.0.self_attn."
M = "model.layers.0.mlp."


def f_drop(name):
    return lambda q: q.tensors.pop(name)


def f_input_scale_1(q):
    q.tensors[A + "o_proj.input_scale"][1] = [1]


def f_wgs_scalar(q):
    q.tensors[A + "o_proj.weight_global_scale"][1] = []


def f_wgs_as_s2(q):
    # Every module's weight_global_scale stored as amax / 2688 instead of 2688 / amax.
    for n in q.tensors:
        if n.endswith(".weight_global_scale"):
            a = np.frombuffer(q.tensors[n][2], dtype="<f4")
            q.tensors[n][2] = (np.float32(1.0) / a).astype("<f4").tobytes()


def f_add_input_scale(q):
    q.put(A + "o_proj.input_scale", "F32", [], f32(0.001, []))


def f_ia_with_w4a16(q):
    q.config["quantization_config"]["config_groups"]["group_0"]["input_activations"] = \
        {"num_bits": 4, "type": "float", "group_size": 16, "dynamic": False}


def f_fused_scale(suffix):
    return lambda q: scale_f32(q, A + "k_proj" + suffix, 1.5)


def f_unlisted(q):
    set_ignore(q, [e for e in q.config["quantization_config"]["ignore"]
                   if e != "model.layers.1.mlp.down_proj"])


def f_ignore_hits(entry):
    return lambda q: set_ignore(q, q.config["quantization_config"]["ignore"] + [entry])


def f_index_drop(q):
    q.index_drop.append(A + "o_proj.weight_scale")


def f_scale_dtype(q):
    q.tensors[A + "o_proj.weight_scale"][0] = "U8"


def f_kv_label_only(q):
    qc = q.config["quantization_config"]
    qc["kv_cache_quant_algo"] = "FP8"
    qc["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"}
    q.hfq["quantization"]["kv_cache_quant_algo"] = "FP8"


def f_kscale_no_label(q):
    q.put(A + "k_proj.k_scale", "F32", [], f32(0.1, []))


def f_label_mismatch(q):
    q.hfq["quantization"]["quant_algo"] = "W4A16_NVFP4"


def f_e4m3_nan(q):
    poke_byte(q, A + "o_proj.weight_scale", 3, 0x7F)


def f_e4m3_neg(q):
    poke_byte(q, A + "o_proj.weight_scale", 3, 0x85)


def f_nan_s2(q):
    q.tensors[A + "o_proj.weight_scale_2"][2] = f32(float("nan"), [])


def f_s2_off(q):
    scale_f32(q, A + "o_proj.weight_scale_2", 1.001)


def f_q_unquantized(q):
    # q_proj left bf16 (and excluded) while k_proj / v_proj are quantized.
    for s in (".weight", ".weight_scale", ".weight_scale_2", ".input_scale"):
        q.tensors.pop(A + "q_proj" + s, None)
    q.put(A + "q_proj.weight", "BF16", [HIDDEN, HIDDEN], b"\0" * (2 * HIDDEN * HIDDEN))
    f_ignore_hits(A + "q_proj")(q)


def f_expert_s2_shape(q):
    q.tensors[M + "experts.down_proj.weight_scale_2"][1] = [EXPERTS, 1, 1]


def f_ct_extra_igs(q):
    q.put(A + "o_proj.input_global_scale", "F32", [1], f32(700.0, [1]))


def f_ct_hfq(q):
    q.extra_files["hf_quant_config.json"] = "{}"


def f_ct_kv_attn_missing(q):
    q.tensors.pop(A + "v_scale")


def f_ct_strategy(q):
    q.config["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "group"


# (name, build kwargs, fault, expected rule id, checker kwargs, hole)
VALID = [
    ("modelopt NVFP4", dict(fmt="modelopt", act=True)),
    ("modelopt W4A16_NVFP4", dict(fmt="modelopt", act=False)),
    ("modelopt NVFP4 + FP8 KV", dict(fmt="modelopt", act=True, kv=True)),
    ("modelopt W4A16 + FP8 KV, 3 shards", dict(fmt="modelopt", act=False, kv=True, shards=3)),
    ("modelopt NVFP4 3-D experts, 2 shards", dict(fmt="modelopt", act=True, moe=True, shards=2)),
    ("compressed-tensors W4A4", dict(fmt="ct", act=True)),
    ("compressed-tensors W4A16", dict(fmt="ct", act=False)),
    ("compressed-tensors W4A4 + FP8 KV, 2 shards", dict(fmt="ct", act=True, kv=True, shards=2)),
    ("compressed-tensors W4A16 3-D experts", dict(fmt="ct", act=False, moe=True)),
]

MO4 = dict(fmt="modelopt", act=True)
MO16 = dict(fmt="modelopt", act=False)
CT4 = dict(fmt="ct", act=True)
CT16 = dict(fmt="ct", act=False)
FAULTS = [
    ("NVFP4 label, an input_scale missing", MO4, f_drop(A + "o_proj.input_scale"),
     "mo-missing-input-scale", {}, False),
    ("W4A16_NVFP4 label with an input_scale", MO16, f_add_input_scale,
     "mo-unexpected-input-scale", {}, False),
    ("input_activations group with W4A16 label", MO16, f_ia_with_w4a16,
     "mo-input-activations", {}, False),
    ("ModelOpt input_scale shape [1] instead of []", MO4, f_input_scale_1,
     "mo-scalar-shape", {}, False),
    ("CT weight_global_scale shape [] instead of [1]", CT4, f_wgs_scalar,
     "ct-scalar-shape", {}, False),
    ("CT weight_global_scale stored as s2 (amax/2688)", CT4, f_wgs_as_s2,
     "global-scale-implausible", {}, False),
    ("CT weight_global_scale stored as s2, --original", CT4, f_wgs_as_s2,
     "orig-global-scale", {"original": True}, False),
    ("ModelOpt weight_scale_2 off by 1e-3, --original", MO4, f_s2_off,
     "orig-global-scale", {"original": True}, False),
    ("ModelOpt fused siblings, different weight_scale_2", MO4, f_fused_scale(".weight_scale_2"),
     "fused-scale", {}, False),
    ("CT fused siblings, different weight_global_scale", CT16,
     f_fused_scale(".weight_global_scale"), "fused-scale", {}, False),
    ("ModelOpt bf16 Linear weight not in ignore", MO4, f_unlisted, "not-excluded", {}, False),
    ("CT bf16 Linear weight not in ignore", CT4, f_unlisted, "not-excluded", {}, False),
    ("ModelOpt ignore entry names a quantized module", MO4,
     f_ignore_hits("model.layers.0.mlp.down_proj"), "excluded-but-quantized", {}, False),
    ("ModelOpt ignore wildcard matches quantized modules", MO16,
     f_ignore_hits("*layers.0.self_attn*"), "excluded-but-quantized", {}, False),
    ("CT ignore regex matches a quantized module", CT4,
     f_ignore_hits("re:.*layers\\.0\\.mlp\\.down_proj$"), "excluded-but-quantized", {}, False),
    ("index weight_map missing a tensor", dict(MO4, shards=2), f_index_drop,
     "index-missing-tensor", {}, False),
    ("weight_scale dtype U8 instead of F8_E4M3", MO4, f_scale_dtype, "mo-dtype", {}, False),
    ("FP8 KV label without k_scale / v_scale", MO4, f_kv_label_only, "kv-missing-scale", {},
     False),
    ("k_scale present without FP8 KV label", MO4, f_kscale_no_label, "kv-unexpected-scale", {},
     False),
    ("hf_quant_config.json and config.json disagree", MO4, f_label_mismatch,
     "mo-label-mismatch", {}, False),
    ("E4M3 block scale NaN", MO4, f_e4m3_nan, "e4m3-nan", {}, False),
    ("E4M3 block scale negative", MO4, f_e4m3_neg, "e4m3-negative", {}, False),
    ("weight_scale_2 NaN", MO4, f_nan_s2, "scale-value", {}, False),
    ("fused group half quantized", MO4, f_q_unquantized, "fused-mixed", {}, False),
    ("3-D expert weight_scale_2 shape [E,1,1]", dict(MO4, moe=True), f_expert_s2_shape,
     "mo-shape", {}, False),
    ("CT W4A16 with an input_global_scale", CT16, f_ct_extra_igs,
     "ct-unexpected-input-global-scale", {}, False),
    ("CT W4A4 input_global_scale missing", CT4, f_drop(A + "o_proj.input_global_scale"),
     "ct-missing-input-global-scale", {}, False),
    ("CT with a hf_quant_config.json", CT4, f_ct_hfq, "ct-hf-quant-config", {}, False),
    ("CT FP8 KV, a v_scale missing", dict(CT4, kv=True), f_ct_kv_attn_missing,
     "kv-missing-scale", {}, False),
    ("CT weights strategy 'group'", CT4, f_ct_strategy, "ct-weights-args", {}, False),
    ("safetensors buffer with holes", MO4, lambda q: None, "st-offsets", {}, True),
]


def main():
    failures = []
    passed = 0
    with tempfile.TemporaryDirectory(prefix="runtime_conformance_") as tmp:
        for i, (label, kw) in enumerate(VALID):
            q, orig = build(**kw)
            d = os.path.join(tmp, "valid%d" % i)
            o = os.path.join(tmp, "orig%d" % i)
            write(q, d)
            write(orig, o)
            got = rc.check_folder(d, original=o)
            if got:
                failures.append("valid %s: unexpected violations:\n    %s"
                                % (label, "\n    ".join(got)))
            else:
                passed += 1
        for i, (label, kw, fault, rule, ckw, hole) in enumerate(FAULTS):
            q, orig = build(**kw)
            fault(q)
            d = os.path.join(tmp, "fault%d" % i)
            write(q, d, hole=hole)
            original = None
            if ckw.get("original"):
                original = os.path.join(tmp, "fault%d_orig" % i)
                write(orig, original)
            got = rc.check_folder(d, original=original)
            ids = [line.split(": ")[1] for line in got]
            if rule not in ids:
                failures.append("fault %s: expected rule %s, got:\n    %s"
                                % (label, rule, "\n    ".join(got) or "(no violation)"))
            else:
                passed += 1
                print("caught %-50s -> %s" % (label, rule))
        # runtime_only drops the consistency rules: a [1]-shaped ModelOpt input_scale loads.
        q, _ = build(**MO4)
        f_input_scale_1(q)
        d = os.path.join(tmp, "runtime_only")
        write(q, d)
        got = rc.check_folder(d, runtime_only=True)
        if got:
            failures.append("runtime_only: expected no violation, got %s" % got)
        else:
            passed += 1
            print("runtime_only: ModelOpt input_scale [1] tolerated (vLLM _is_1d_and_scalar)")
        # The command line: exit 0 and one OK line per valid folder, 1 on a faulty one.
        import io
        import contextlib
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc_ok = rc.main(["rc", os.path.join(tmp, "valid0"), os.path.join(tmp, "valid5")])
            rc_bad = rc.main(["rc", os.path.join(tmp, "fault0")])
        lines = out.getvalue().splitlines()
        if rc_ok != 0 or rc_bad != 1 or not lines[0].endswith(")") or " OK (" not in lines[0]:
            failures.append("command line: exit %d / %d, output %r" % (rc_ok, rc_bad, lines))
        else:
            passed += 1
            print("\n".join("cli: " + line for line in lines))
    total = len(VALID) + len(FAULTS) + 2
    for f in failures:
        print("FAIL " + f)
    print("runtime_conformance selftest: %d of %d expectations hold (%d valid checkpoints, "
          "%d planted faults, runtime-only, CLI)" % (passed, total, len(VALID), len(FAULTS)))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
