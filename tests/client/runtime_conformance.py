#!/usr/bin/python3
"""Runtime conformance checker for NVFP4 checkpoint folders (Python 3 + numpy only).

Encodes what inference runtimes (vLLM first of all) require of an NVFP4 checkpoint in
Hugging Face safetensors layout, in either of the two layouts nvfp4cal writes:

  * ModelOpt     (config.json quantization_config.quant_method "modelopt", hf_quant_config.json)
  * compressed-tensors (quant_method "compressed-tensors", format "nvfp4-pack-quantized")

usage: runtime_conformance.py [--original DIR] [--runtime-only] DIR [DIR...]

Prints one line per conforming folder, `DIR: <format> <label> OK (N modules ...)`, and exits
0; otherwise prints every violation found, `DIR: <rule id>: <what>`, and exits 1.
Importable: check_folder(path, original=None, runtime_only=False) -> list of violations.

Every rule below carries its source next to it. "runtime" rules are what a runtime needs to
load and run the checkpoint correctly; "consistency" rules are conventions of the reference
producers (ModelOpt, llm-compressor / compressed-tensors) and label self-consistency that the
runtimes tolerate. --runtime-only (runtime_only=True) drops the consistency rules.

Sources (vllm-project/vllm unless said otherwise), read for this file:
  VM  = vllm/model_executor/layers/quantization/modelopt.py
  CT  = vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py
  CTU = vllm/model_executor/layers/quantization/compressed_tensors/utils.py
  W4A4 = .../compressed_tensors/schemes/compressed_tensors_w4a4_nvfp4.py
  W4A16 = .../compressed_tensors/schemes/compressed_tensors_w4a16_nvfp4.py
  QU  = vllm/model_executor/layers/quantization/utils/quant_utils.py
  PAR = vllm/model_executor/parameter.py
  WU  = vllm/model_executor/model_loader/weight_utils.py
  KV  = vllm/model_executor/layers/quantization/kv_cache.py
  CTS = vllm-project/compressed-tensors src/compressed_tensors/quantization/quant_scheme.py
  CTI = vllm-project/compressed-tensors src/compressed_tensors/quantization/lifecycle/initialize.py
  CTP = vllm-project/compressed-tensors src/compressed_tensors/compressors/nvfp4/{base,helpers}.py
  CTC = vllm-project/compressed-tensors src/compressed_tensors/entrypoints/convert/converters/
        modelopt_nvfp4.py
"""
import fnmatch
import json
import math
import os
import re
import struct
import sys

import numpy as np

# rule id -> kind ("runtime" or "consistency"). The source of each rule is cited where it is
# checked.
RULES = {
    # safetensors / folder layout
    "st-header": "runtime", "st-dtype": "runtime", "st-size": "runtime",
    "st-offsets": "runtime", "st-duplicate": "runtime", "files-layout": "runtime",
    "index-missing-file": "runtime", "index-missing-tensor": "runtime",
    "index-wrong-file": "runtime", "index-extra-tensor": "runtime",
    "index-unreferenced-file": "consistency",
    # labels
    "cfg-json": "runtime", "cfg-quantization-config": "runtime", "cfg-quant-method": "runtime",
    "mo-quant-algo": "runtime", "mo-hfq-fields": "runtime", "mo-group-size": "runtime",
    "mo-kv-algo": "runtime", "mo-label-mismatch": "consistency",
    "mo-config-groups": "consistency", "mo-input-activations": "consistency",
    "ct-format": "runtime", "ct-weights-args": "runtime", "ct-input-args": "runtime",
    "ct-no-target": "runtime", "ct-kv-scheme": "runtime", "ct-status": "consistency",
    "ct-hf-quant-config": "consistency",
    # tensors of quantized modules
    "mo-dtype": "runtime", "mo-shape": "runtime", "mo-scalar-shape": "consistency",
    "mo-incomplete": "runtime", "mo-foreign-tensor": "runtime",
    "mo-missing-input-scale": "runtime", "mo-unexpected-input-scale": "consistency",
    "ct-dtype": "runtime", "ct-shape": "runtime", "ct-scalar-shape": "consistency",
    "ct-incomplete": "runtime", "ct-foreign-tensor": "runtime",
    "ct-missing-input-global-scale": "runtime", "ct-unexpected-input-global-scale": "runtime",
    "ct-lm-head-quantized": "runtime", "quantized-embedding": "runtime",
    "scale-value": "runtime", "e4m3-nan": "runtime", "e4m3-negative": "runtime",
    "global-scale-implausible": "consistency",
    # fused siblings
    "fused-scale": "runtime", "fused-mixed": "runtime",
    # exclusion / ignore lists
    "not-excluded": "runtime", "excluded-but-quantized": "runtime",
    "mo-vision-quantized": "runtime", "ignore-fused-mixed": "runtime",
    # kv cache
    "kv-missing-scale": "runtime", "kv-unexpected-scale": "runtime", "kv-scale-value": "runtime",
    "kv-scale-name": "runtime",
    # --original
    "orig-missing": "runtime", "orig-shape": "runtime", "orig-global-scale": "runtime",
}

# safetensors dtypes and their byte widths (huggingface/safetensors Dtype).
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
               "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

# HF leaf names a runtime loads into one fused matrix. vLLM's packed_modules_mapping for Llama
# and most decoders: qkv_proj <- q/k/v_proj, gate_up_proj <- gate/up_proj; FusedMoE's w13 <- w1/w3
# (Mixtral expert names).
FUSED_FAMILIES = (("qkv_proj", ("q_proj", "k_proj", "v_proj")),
                  ("gate_up_proj", ("gate_proj", "up_proj")),
                  ("w13", ("w1", "w3")))
FUSED_OF_LEAF = {leaf: fused for fused, leaves in FUSED_FAMILIES for leaf in leaves}
VLLM_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

FP4_E4M3_PRODUCT = 2688.0  # 6 (E2M1 max) * 448 (E4M3 max)


class Tensor(object):
    __slots__ = ("name", "dtype", "shape", "file", "offset", "nbytes")

    def __init__(self, name, dtype, shape, file, offset, nbytes):
        self.name, self.dtype, self.shape = name, dtype, list(shape)
        self.file, self.offset, self.nbytes = file, offset, nbytes

    def numel(self):
        n = 1
        for d in self.shape:
            n *= d
        return n

    def raw(self):
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            return f.read(self.nbytes)

    def as_float(self):
        """float32 (or float64) array of a float tensor."""
        raw = self.raw()
        if self.dtype == "F32":
            a = np.frombuffer(raw, dtype="<f4")
        elif self.dtype == "F16":
            a = np.frombuffer(raw, dtype="<f2").astype(np.float32)
        elif self.dtype == "BF16":
            a = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        elif self.dtype == "F64":
            a = np.frombuffer(raw, dtype="<f8")
        else:
            raise ValueError("not a float tensor: %s %s" % (self.name, self.dtype))
        return a.reshape(self.shape)

    def as_u8(self):
        return np.frombuffer(self.raw(), dtype=np.uint8).reshape(self.shape)


class Checker(object):
    def __init__(self, folder, original=None, runtime_only=False):
        self.folder = folder
        self.original = original
        self.runtime_only = runtime_only
        self.violations = []
        self.tensors = {}

    # ------------------------------------------------------------------ reporting
    def v(self, rule, message):
        assert rule in RULES, rule
        if self.runtime_only and RULES[rule] != "runtime":
            return
        self.violations.append("%s: %s: %s" % (self.folder, rule, message))

    # ------------------------------------------------------------------ safetensors
    def parse_safetensors(self, path, into, file_label):
        """Header checks after the safetensors format spec (huggingface/safetensors README:
        8-byte LE header size N, N bytes of JSON, then a byte buffer that the tensors index
        entirely, without holes or overlaps). vLLM reads the files with safetensors.safe_open
        (WU safetensors_weights_iterator), which refuses headers that break these rules."""
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                self.v("st-header", "%s: shorter than 8 bytes" % file_label)
                return
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                self.v("st-header", "%s: header length %d runs past the file (%d bytes)"
                       % (file_label, n, size))
                return
            try:
                header = json.loads(f.read(n).decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                self.v("st-header", "%s: header is not JSON (%s)" % (file_label, e))
                return
        if not isinstance(header, dict):
            self.v("st-header", "%s: header is not a JSON object" % file_label)
            return
        meta = header.get("__metadata__")
        if meta is not None and not (isinstance(meta, dict)
                                     and all(isinstance(x, str) for x in meta.values())):
            self.v("st-header", "%s: __metadata__ must map strings to strings" % file_label)
        base = 8 + n
        buffer_len = size - base
        spans = []
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
                self.v("st-header", "%s: %s: entry must have exactly dtype, shape, data_offsets, "
                       "found %r" % (file_label, name, entry))
                continue
            dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
            if dtype not in DTYPE_SIZES:
                self.v("st-dtype", "%s: %s: unknown dtype %r" % (file_label, name, dtype))
                continue
            if (not isinstance(shape, list)
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                               for d in shape)):
                self.v("st-header", "%s: %s: bad shape %r" % (file_label, name, shape))
                continue
            if (not isinstance(offs, list) or len(offs) != 2
                    or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                    or offs[0] < 0 or offs[1] < offs[0]):
                self.v("st-offsets", "%s: %s: bad data_offsets %r" % (file_label, name, offs))
                continue
            numel = 1
            for d in shape:
                numel *= d
            want = numel * DTYPE_SIZES[dtype]
            if offs[1] - offs[0] != want:
                self.v("st-size", "%s: %s: %s %s needs %d bytes, data_offsets give %d"
                       % (file_label, name, dtype, shape, want, offs[1] - offs[0]))
                continue
            if offs[1] > buffer_len:
                self.v("st-offsets", "%s: %s: data_offsets %r past the %d-byte buffer"
                       % (file_label, name, offs, buffer_len))
                continue
            spans.append((offs[0], offs[1], name))
            if name in into:
                self.v("st-duplicate", "tensor %s in both %s and %s"
                       % (name, os.path.basename(into[name].file), file_label))
                continue
            into[name] = Tensor(name, dtype, shape, path, base + offs[0], want)
        spans.sort()
        pos = 0
        for begin, end, name in spans:
            if begin != pos:
                what = "overlaps the previous tensor" if begin < pos else "leaves a hole"
                self.v("st-offsets", "%s: %s starts at %d, expected %d (%s)"
                       % (file_label, name, begin, pos, what))
            pos = max(pos, end)
        if pos != buffer_len:
            self.v("st-offsets", "%s: tensors cover %d bytes of a %d-byte buffer"
                   % (file_label, pos, buffer_len))

    def read_weights(self, folder, into, quiet=False):
        """One model.safetensors, or shards listed by model.safetensors.index.json.
        vllm/model_executor/model_loader/default_loader.py DefaultModelLoader._prepare_weights
        globs every *.safetensors of the folder; WU filter_duplicate_safetensors_files then
        keeps only the files named in the index's weight_map, and all of them when there is
        no index. So without an index any other .safetensors file (a Hessians file, say) is
        loaded as weights, and with one, weight_map must name every tensor at its file."""
        index_path = os.path.join(folder, "model.safetensors.index.json")
        files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        checker = self if not quiet else Checker(folder)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    index = json.load(f)
                weight_map = index["weight_map"]
                assert isinstance(weight_map, dict)
            except (ValueError, KeyError, AssertionError, TypeError) as e:
                checker.v("cfg-json", "model.safetensors.index.json: no weight_map (%s)" % e)
                return
            listed = sorted(set(weight_map.values()))
            for shard in listed:
                if not os.path.exists(os.path.join(folder, shard)):
                    checker.v("index-missing-file", "weight_map names %s, which does not exist"
                              % shard)
            for shard in files:
                if shard not in listed:
                    checker.v("index-unreferenced-file",
                              "%s is in the folder but not in weight_map (runtimes skip it)"
                              % shard)
            per_file = {}
            for shard in listed:
                p = os.path.join(folder, shard)
                if os.path.exists(p):
                    checker.parse_safetensors(p, into, shard)
            for name, t in into.items():
                per_file.setdefault(os.path.basename(t.file), set()).add(name)
                if name not in weight_map:
                    checker.v("index-missing-tensor", "%s (in %s) is not in weight_map"
                              % (name, os.path.basename(t.file)))
                elif weight_map[name] != os.path.basename(t.file):
                    checker.v("index-wrong-file", "weight_map puts %s in %s, it is in %s"
                              % (name, weight_map[name], os.path.basename(t.file)))
            for name, shard in weight_map.items():
                if name not in into and os.path.exists(os.path.join(folder, shard)):
                    checker.v("index-extra-tensor", "weight_map lists %s in %s, which lacks it"
                              % (name, shard))
        else:
            if files != ["model.safetensors"]:
                checker.v("files-layout", "no model.safetensors.index.json, so expected exactly "
                          "model.safetensors, found %s (without an index, runtimes load every "
                          "*.safetensors file as weights)" % (files or "no .safetensors file"))
            for shard in files:
                checker.parse_safetensors(os.path.join(folder, shard), into, shard)
        if quiet:
            self.violations.extend(checker.violations)

    # ------------------------------------------------------------------ helpers
    def load_json(self, name, required):
        p = os.path.join(self.folder, name)
        if not os.path.exists(p):
            if required:
                self.v("cfg-json", "%s is missing" % name)
            return None
        try:
            with open(p) as f:
                data = json.load(f)
        except ValueError as e:
            self.v("cfg-json", "%s is not JSON (%s)" % (name, e))
            return None
        if not isinstance(data, dict):
            self.v("cfg-json", "%s is not a JSON object" % name)
            return None
        return data

    def f32_values(self, t):
        return t.as_float().astype(np.float64).reshape(-1)

    def check_positive_finite(self, t, what):
        """F32 global / activation scales: the kernels divide by or multiply with them
        (VM ModelOptNvFp4LinearMethod.process_weights_after_loading: alpha =
        input_scale * weight_scale_2, input_global_scale_inv = 1 / input_scale; W4A4
        process_weights_after_loading: alpha = 1 / (input_global_scale * weight_global_scale))."""
        vals = self.f32_values(t)
        bad = [float(x) for x in vals if not (math.isfinite(x) and x > 0)]
        if bad:
            self.v("scale-value", "%s (%s) must be finite and > 0, found %r"
                   % (t.name, what, bad[:4]))
            return False
        return True

    def check_e4m3(self, t):
        """Block scales are float8_e4m3fn (VM create_weights: weight_scale dtype
        torch.float8_e4m3fn; W4A4/W4A16 create_weights the same). 0x7F / 0xFF are its NaNs;
        block scales of |w| are never negative."""
        b = t.as_u8().reshape(-1)
        nan = (b & 0x7F) == 0x7F
        if nan.any():
            self.v("e4m3-nan", "%s: %d E4M3 block scales are NaN (0x7F/0xFF), first at flat "
                   "index %d" % (t.name, int(nan.sum()), int(np.argmax(nan))))
        neg = ((b & 0x80) != 0) & ~nan
        if neg.any():
            self.v("e4m3-negative", "%s: %d E4M3 block scales have the sign bit set, first "
                   "0x%02X at flat index %d" % (t.name, int(neg.sum()), int(b[np.argmax(neg)]),
                                                int(np.argmax(neg))))


def split_module(name):
    parent, _, leaf = name.rpartition(".")
    return parent, leaf


def fused_key(module):
    parent, leaf = split_module(module)
    if leaf in FUSED_OF_LEAF:
        return parent + "|" + FUSED_OF_LEAF[leaf]
    return None


def experts_prefix(module):
    """vLLM FusedMoE layer name of an expert module: everything up to '.experts'."""
    m = re.search(r"\.experts(?=\.|$)", module)
    return module[:m.end()] if m else None


def is_embedding_like(module):
    leaf = module.rsplit(".", 1)[-1]
    return ("embed" in leaf or leaf in ("wte", "wpe", "word_embeddings", "position_embeddings",
                                        "token_type_embeddings", "shared"))


# ---------------------------------------------------------------------- ModelOpt exclusion
_MIXED = "mixed"


def vllm_is_layer_skipped(prefix, ignored, fused_mapping):
    """QU is_layer_skipped (exact match; fused names checked shard by shard, which must agree;
    'experts' prefixes: skipped when the prefix is contained in an ignore entry that names
    experts)."""
    proj = prefix.split(".")[-1]
    if proj in fused_mapping:
        result = None
        for shard in fused_mapping[proj]:
            s = prefix.replace(proj, shard) in ignored
            if result is None:
                result = s
            elif s != result:
                return _MIXED
        return result
    if "experts" in prefix:
        return any(prefix in e for e in ignored if "experts" in e)
    return prefix in ignored


def modelopt_is_layer_excluded(prefix, exclude, patterns):
    """VM ModelOptQuantConfigBase.is_layer_excluded: is_layer_skipped with the packed mapping,
    then the legacy substring test (also after stripping 'language_model.'), then fnmatch of
    every entry as a wildcard."""
    if not exclude:
        return False
    r = vllm_is_layer_skipped(prefix, exclude, VLLM_PACKED)
    if r is _MIXED or r:
        return r
    for e in exclude:
        if e != prefix and (e in prefix or (prefix.startswith("language_model.")
                                            and e in prefix[len("language_model."):])):
            return True
    return any(fnmatch.fnmatchcase(prefix, p) for p in patterns)


def narrow_patterns(exclude):
    """VM ModelOptQuantConfigBase.apply_vllm_mapper rewrites 'path*' (not '.*') into 'path' and
    'path.*' for models with a weights mapper: a narrower match than plain fnmatch."""
    out = []
    for e in exclude:
        if len(e) >= 2 and e[-1] == "*" and e[-2] != ".":
            out += [e[:-1], e[:-1] + ".*"]
        else:
            out.append(e)
    return out


def vllm_views(module):
    """The vLLM layer prefixes a checkpoint module may be queried under: its own name, the
    fused qkv_proj / gate_up_proj name, or its FusedMoE layer name."""
    views = [module]
    parent, leaf = split_module(module)
    if leaf in ("q_proj", "k_proj", "v_proj"):
        views.append(parent + ".qkv_proj")
    elif leaf in ("gate_proj", "up_proj"):
        views.append(parent + ".gate_up_proj")
    ep = experts_prefix(module)
    if ep is not None and ep != module:
        views.append(ep)
    return views


# ---------------------------------------------------------------------- compressed-tensors
def ct_match(name, targets):
    """CTU _is_equal_or_regex_match: exact string, or 're:' + regex applied with re.match."""
    for t in targets:
        if t.startswith("re:"):
            try:
                if re.match(t[3:], name):
                    return True
            except re.error:
                pass
        elif t == name:
            return True
    return False


def ct_should_ignore(prefix, ignore):
    """CTU should_ignore_layer: fused names check every shard (which must agree) unless the
    fused name itself is listed."""
    proj = prefix.split(".")[-1]
    if proj in VLLM_PACKED and prefix not in ignore:
        result = None
        for shard in VLLM_PACKED[proj]:
            s = ct_match(prefix.replace(proj, shard), ignore)
            if result is None:
                result = s
            elif s != result:
                return _MIXED
        return result
    return ct_match(prefix, ignore)


def qargs(d):
    """compressed-tensors QuantizationArgs defaults (CTU QuantizationArgs / quant_args.py):
    num_bits 8, type int, symmetric True, group_size None, strategy None, dynamic False."""
    out = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
           "strategy": None, "dynamic": False}
    out.update(d or {})
    return out


# ---------------------------------------------------------------------- main check
def check_folder(path, original=None, runtime_only=False):
    """All violations found in the checkpoint folder `path` (empty list: conforming)."""
    return _check(path, original, runtime_only)[0]


def _check(path, original, runtime_only):
    c = Checker(path, original, runtime_only)
    if not os.path.isdir(path):
        c.v("files-layout", "no such folder")
        return c.violations, None
    config = c.load_json("config.json", required=True)
    c.read_weights(path, c.tensors)
    if config is None:
        return c.violations, None
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        # vLLM get_quant_config (WU) reads config.json quantization_config first; nvfp4cal
        # always writes it.
        c.v("cfg-quantization-config", "config.json has no quantization_config object")
        return c.violations, None
    method = str(qc.get("quant_method", "")).lower()
    if method == "modelopt":
        summary = check_modelopt(c, qc)
    elif method == "compressed-tensors":
        summary = check_ct(c, qc)
    else:
        c.v("cfg-quant-method", "quantization_config.quant_method is %r, expected 'modelopt' or "
            "'compressed-tensors'" % qc.get("quant_method"))
        summary = None
    return c.violations, summary


def collect_fp_linear_weights(c, quantized):
    """2-D float `<m>.weight` tensors that are not quantized: Linear-like modules a runtime
    builds as Linear layers (embeddings excluded by name)."""
    out = []
    for name, t in c.tensors.items():
        if not name.endswith(".weight") or len(t.shape) != 2 or t.dtype not in FLOAT_DTYPES:
            continue
        m = name[:-len(".weight")]
        if m in quantized or is_embedding_like(m):
            continue
        out.append(m)
    return sorted(out)


def check_fused(c, quantized, global_scale_suffix, fp_modules):
    """Fused siblings share one global scale.  vLLM loads q/k/v (gate/up, w1/w3) into one
    matrix with one per-tensor scale and keeps the max: VM ModelOptNvFp4LinearMethod /
    ModelOptNvFp4W4A16LinearMethod.process_weights_after_loading (weight_scale_2.max(), with a
    warning when they differ), W4A4 / W4A16 process_weights_after_loading
    (weight_global_scale.max()), VM ModelOptNvFp4FusedMoE.process_weights_after_loading
    (keeps w13_weight_scale_2[:, 0] only: 'w1_weight_scale_2 must match w3_weight_scale_2').
    A mixed group (one sibling quantized, another not) cannot be loaded at all: QU
    is_layer_skipped / CTU should_ignore_layer raise ValueError."""
    groups = {}
    for m in quantized:
        k = fused_key(m)
        if k is not None:
            groups.setdefault(k, []).append(m)
    for m in fp_modules:
        k = fused_key(m)
        if k is not None and k in groups:
            c.v("fused-mixed", "%s is not quantized but its fused sibling(s) %s are"
                % (m, ", ".join(sorted(groups[k]))))
    for k, members in sorted(groups.items()):
        if len(members) < 2:
            continue
        members.sort()
        ref = c.tensors.get(members[0] + global_scale_suffix)
        for m in members[1:]:
            t = c.tensors.get(m + global_scale_suffix)
            if ref is None or t is None:
                continue
            if ref.raw() != t.raw():
                c.v("fused-scale", "%s%s = %r differs from %s%s = %r; fused siblings must "
                    "share one global scale (equal bits)"
                    % (m, global_scale_suffix, c.f32_values(t)[:4].tolist(), members[0],
                       global_scale_suffix, c.f32_values(ref)[:4].tolist()))
    return groups


def check_module_shapes(c, m, packed, scale, rule_prefix):
    """U8 [.., out, in/2] codes (two E2M1 per byte along the input dim) and F8_E4M3
    [.., out, in/16] block scales: VM ModelOptNvFp4LinearMethod.create_weights (weight
    [out, in // 2] uint8, weight_scale [out, in // group_size] float8_e4m3fn, and 'in features
    size is not multiple of 16' is refused); W4A4 / W4A16 create_weights the same for
    weight_packed. 3-D expert tensors carry a leading expert dimension. Returns experts (0 for
    2-D) or None."""
    ok = True
    if packed.dtype != "U8":
        c.v(rule_prefix + "-dtype", "%s: dtype %s, expected U8" % (packed.name, packed.dtype))
        ok = False
    if scale.dtype != "F8_E4M3":
        c.v(rule_prefix + "-dtype", "%s: dtype %s, expected F8_E4M3" % (scale.name, scale.dtype))
        ok = False
    if len(packed.shape) not in (2, 3):
        c.v(rule_prefix + "-shape", "%s: shape %s, expected [out, in/2] or [experts, out, in/2]"
            % (packed.name, packed.shape))
        return None
    experts = packed.shape[0] if len(packed.shape) == 3 else 0
    lead = packed.shape[:-2]
    out, half = packed.shape[-2], packed.shape[-1]
    cols = 2 * half
    if cols % 16 != 0:
        c.v(rule_prefix + "-shape", "%s: %d input columns, not a multiple of 16"
            % (packed.name, cols))
        ok = False
    want = lead + [out, cols // 16]
    if scale.shape != want:
        c.v(rule_prefix + "-shape", "%s: shape %s, expected %s for %s %s"
            % (scale.name, scale.shape, want, packed.name, packed.shape))
        ok = False
    if ok and scale.dtype == "F8_E4M3":
        c.check_e4m3(scale)
    return experts


def check_scalar(c, t, experts, rule_prefix, strict_shape, what):
    """A per-tensor F32 scale: one value per module (per expert for 3-D). vLLM registers it as
    PerTensorScaleParameter of len(output_partition_sizes) and accepts a 0-d or a [1] tensor
    (PAR BasevLLMParameter._assert_and_load / _is_1d_and_scalar, PerTensorScaleParameter.
    _load_into_shard_id: 'AutoFP8 scales do not have a shape, compressed-tensors scales do');
    the producers' own conventions are ModelOpt [] and compressed-tensors [1]
    (CTI initialize_qparams: torch.empty(1) for *_global_scale)."""
    if t.dtype != "F32":
        c.v(rule_prefix + "-dtype", "%s: dtype %s, expected F32" % (t.name, t.dtype))
        return False
    if experts:
        ok_shapes = ([experts], [experts, 1])
        if t.shape not in ok_shapes:
            c.v(rule_prefix + "-shape", "%s: shape %s, expected [%d] (one %s per expert)"
                % (t.name, t.shape, experts, what))
            return False
    else:
        if t.numel() != 1 or len(t.shape) > 1:
            c.v(rule_prefix + "-shape", "%s: shape %s, expected %s (one %s)"
                % (t.name, t.shape, strict_shape, what))
            return False
        if t.shape != strict_shape:
            c.v(rule_prefix + "-scalar-shape", "%s: shape %s, expected %s (runtimes accept "
                "either, the reference producer writes %s)" % (t.name, t.shape, strict_shape,
                                                                 strict_shape))
    return c.check_positive_finite(t, what)


def check_kv(c, kv_fp8, accepted, fmt):
    """FP8 KV cache scales: one positive per-tensor k_scale / v_scale per attention layer.
    KV BaseKVCacheMethod.process_weights_after_loading: scales > 0 are used, both missing
    fall back to 1.0 with a warning, a lone one is duplicated; 'Only support per-tensor
    scaling factor for fp8 KV cache'.  Names: WU maybe_remap_kv_scale_name maps ModelOpt's
    '.self_attn.k_proj.k_scale' / '.self_attn.v_proj.v_scale' and any other '.k_scale' /
    '.v_scale' (llm-compressor writes them on the attention module: CTI
    initialize_attn_qparams registers 'k_scale' / 'v_scale' there) to '.attn.k_scale';
    CT get_cache_scale maps '.k_proj.output_scale' (older llm-compressor)."""
    kv_tensors = {}
    for name in c.tensors:
        if name.endswith((".k_scale", ".v_scale")) or (
                name.endswith(".output_scale") and (".k_proj" in name or ".v_proj" in name)):
            kv_tensors[name] = c.tensors[name]
    attn = {}
    for name in c.tensors:
        if name.endswith(".k_proj.weight") or name.endswith(".k_proj.weight_packed"):
            attn.setdefault(name.rsplit(".k_proj.", 1)[0], set()).add("k")
        if name.endswith(".v_proj.weight") or name.endswith(".v_proj.weight_packed"):
            attn.setdefault(name.rsplit(".v_proj.", 1)[0], set()).add("v")
    if not kv_fp8:
        for name in sorted(kv_tensors):
            c.v("kv-unexpected-scale", "%s present but the label has no FP8 KV cache "
                "(vLLM would load it as a KV scale)" % name)
        return 0
    found = 0
    used = set()
    for a in sorted(attn):
        for kind in sorted(attn[a]):
            names = [n.format(a=a, k=kind) for n in accepted]
            present = [n for n in names if n in c.tensors]
            if not present:
                c.v("kv-missing-scale", "FP8 KV cache labelled but none of %s is present"
                    % " / ".join(names))
                continue
            if len(present) > 1:
                c.v("kv-unexpected-scale", "%s: more than one %s scale: %s"
                    % (a, kind, ", ".join(present)))
            for n in present:
                used.add(n)
                t = c.tensors[n]
                if t.dtype not in FLOAT_DTYPES or t.numel() != 1 or len(t.shape) > 1:
                    c.v("kv-scale-value", "%s: %s %s, expected one float (per-tensor)"
                        % (n, t.dtype, t.shape))
                    continue
                if fmt == "modelopt" and (t.dtype != "F32" or t.shape != []):
                    c.v("kv-scale-value", "%s: %s %s, expected F32 [] as ModelOpt writes"
                        % (n, t.dtype, t.shape))
                val = float(t.as_float().reshape(-1)[0])
                if not (math.isfinite(val) and val > 0):
                    c.v("kv-scale-value", "%s = %r, must be finite and > 0" % (n, val))
                # maybe_remap_kv_scale_name only strips '_proj' for '.self_attn.' parents.
                if n.endswith(("k_proj.k_scale", "v_proj.v_scale")) and \
                        a.rsplit(".", 1)[-1] != "self_attn":
                    c.v("kv-scale-name", "%s: vLLM remaps <attn>.k_proj.k_scale only under "
                        "'.self_attn.' (maybe_remap_kv_scale_name); this one would be dropped" % n)
                found += 1
    for n in sorted(set(kv_tensors) - used):
        c.v("kv-unexpected-scale", "%s is not the %s scale of any attention layer"
            % (n, "k/v"))
    return found


def check_original(c, quantized, groups, global_suffix, fmt):
    """--original: each quantized module's global scale against the unquantized weights.
    g = max |W| over the module, or over its quantized fused siblings (expert by expert);
    ModelOpt weight_scale_2 = g / 2688 (VM ModelOptNvFp4W4A16LinearMethod docstring:
    'amax / (6.0 * 448.0)'), compressed-tensors weight_global_scale = 2688 / g (CTC: it is
    1 / weight_scale_2; W4A16 process_weights_after_loading: 'ct stores the inverse')."""
    orig = {}
    Checker(c.folder).read_weights(c.original, orig, quiet=False)
    amax = {}
    for m in sorted(quantized):
        t = orig.get(m + ".weight")
        if t is None:
            c.v("orig-missing", "%s.weight not in the original model %s" % (m, c.original))
            continue
        packed = c.tensors[m + (".weight" if fmt == "modelopt" else ".weight_packed")]
        want = packed.shape[:-1] + [packed.shape[-1] * 2]
        if t.shape != want or t.dtype not in FLOAT_DTYPES:
            c.v("orig-shape", "%s.weight: original %s %s, quantized implies %s"
                % (m, t.dtype, t.shape, want))
            continue
        w = np.abs(t.as_float().astype(np.float32))
        a = w.reshape(w.shape[0], -1).max(axis=1) if len(w.shape) == 3 else np.array([w.max()])
        amax[m] = a.astype(np.float32)
    gmax = {}
    for m, a in amax.items():
        k = fused_key(m)
        key = k if (k in groups and len(groups[k]) > 1) else m
        gmax[key] = a if key not in gmax else np.maximum(gmax[key], a)
    for m in sorted(amax):
        k = fused_key(m)
        g = gmax[k if (k in groups and len(groups[k]) > 1) else m]
        t = c.tensors.get(m + global_suffix)
        if t is None or t.dtype != "F32":
            continue
        have = c.f32_values(t)
        if have.size != g.size:
            continue
        g64 = g.astype(np.float64)
        want = g64 / FP4_E4M3_PRODUCT if fmt == "modelopt" else FP4_E4M3_PRODUCT / g64
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.abs(have - want) / np.abs(want)
        if not np.all(rel <= 1e-6):
            i = int(np.nanargmax(np.where(np.isfinite(rel), rel, np.inf)))
            formula = "g / 2688" if fmt == "modelopt" else "2688 / g"
            c.v("orig-global-scale", "%s%s[%d] = %r, expected %s = %r (g = %r from the "
                "original weights)" % (m, global_suffix, i, float(have[i]), formula,
                                       float(want[i]), float(g64[i])))


# ---------------------------------------------------------------------- ModelOpt
def check_modelopt(c, qc):
    T = c.tensors
    # Labels. VM ModelOptQuantConfigBase.from_config: config.json form reads quant_algo,
    # kv_cache_scheme (type float + num_bits 8 => FP8), ignore, group_size (top level);
    # hf_quant_config.json form reads quantization.{quant_algo, kv_cache_quant_algo, group_size,
    # exclude_modules}. WU get_quant_config uses config.json's quantization_config when present.
    algo = str(qc.get("quant_algo", "")).upper()
    # VM ModelOptNvFp4Config.__init__: 'NVFP4' -> W4A4 method, 'W4A16_NVFP4' -> W4A16 (Marlin)
    # method, anything else refused; override_quantization_method routes both to modelopt_fp4.
    if algo not in ("NVFP4", "W4A16_NVFP4"):
        c.v("mo-quant-algo", "config.json quant_algo %r, expected 'NVFP4' or 'W4A16_NVFP4'"
            % qc.get("quant_algo"))
    w4a4 = algo == "NVFP4"
    ignore = qc.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
        # VM from_config: 'exclude_modules must be a list'
        c.v("mo-quant-algo", "config.json ignore must be a list of strings, found %r" % (ignore,))
        ignore = []
    scheme = qc.get("kv_cache_scheme")
    kv_cfg = isinstance(scheme, dict) and scheme.get("type") == "float" and \
        scheme.get("num_bits") == 8
    if scheme is not None and not kv_cfg:
        c.v("mo-kv-algo", "config.json kv_cache_scheme %r is not FP8 (type float, num_bits 8); "
            "vLLM would ignore it" % (scheme,))
    if "kv_cache_quant_algo" in qc and qc["kv_cache_quant_algo"] is not None and \
            str(qc["kv_cache_quant_algo"]).upper() != ("FP8" if kv_cfg else ""):
        c.v("mo-label-mismatch", "config.json kv_cache_quant_algo %r but kv_cache_scheme %r"
            % (qc["kv_cache_quant_algo"], scheme))
    if qc.get("group_size") not in (None, 16):
        c.v("mo-group-size", "config.json group_size %r, NVFP4 needs 16" % qc.get("group_size"))
    # config_groups: not read by vLLM's ModelOpt path; must describe the same thing.
    groups = qc.get("config_groups")
    g0 = None
    if isinstance(groups, dict) and len(groups) == 1:
        g0 = list(groups.values())[0]
    if not isinstance(g0, dict):
        c.v("mo-config-groups", "config_groups must hold one group, found %r" % (groups,))
    else:
        w = g0.get("weights") or {}
        if not (w.get("num_bits") == 4 and w.get("type") == "float" and w.get("group_size") == 16):
            c.v("mo-config-groups", "config_groups weights %r, expected num_bits 4, type float, "
                "group_size 16" % (w,))
        if "Linear" not in (g0.get("targets") or []):
            c.v("mo-config-groups", "config_groups targets %r, expected ['Linear']"
                % (g0.get("targets"),))
        ia = g0.get("input_activations")
        if w4a4 and not ia:
            c.v("mo-input-activations", "quant_algo NVFP4 (W4A4) but config_groups has no "
                "input_activations")
        if algo == "W4A16_NVFP4" and ia:
            c.v("mo-input-activations", "quant_algo W4A16_NVFP4 (weight-only) but config_groups "
                "has input_activations %r" % (ia,))
        if ia and not (ia.get("num_bits") == 4 and ia.get("type") == "float"
                       and ia.get("group_size") == 16):
            c.v("mo-config-groups", "config_groups input_activations %r, expected num_bits 4, "
                "type float, group_size 16" % (ia,))
    hfq = c.load_json("hf_quant_config.json", required=False)
    if hfq is not None:
        quant = hfq.get("quantization")
        if not isinstance(quant, dict):
            c.v("mo-hfq-fields", "hf_quant_config.json has no 'quantization' object")
        else:
            # VM ModelOptNvFp4Config._from_config: 'NVFP4 quantization requires the following
            # fields in hf_quant_config.json' group_size, kv_cache_quant_algo, exclude_modules.
            missing = [k for k in ("quant_algo", "group_size", "kv_cache_quant_algo",
                                   "exclude_modules") if k not in quant]
            if missing:
                c.v("mo-hfq-fields", "hf_quant_config.json quantization lacks %s" % missing)
            if quant.get("group_size", 16) != 16:
                c.v("mo-group-size", "hf_quant_config.json group_size %r, NVFP4 needs 16"
                    % quant.get("group_size"))
            if str(quant.get("quant_algo", "")).upper() != algo:
                c.v("mo-label-mismatch", "hf_quant_config.json quant_algo %r, config.json %r"
                    % (quant.get("quant_algo"), qc.get("quant_algo")))
            kvq = quant.get("kv_cache_quant_algo")
            # VM KV_CACHE_QUANT_ALGOS = ['FP8', 'NVFP4']; nvfp4cal writes null or FP8.
            if kvq is not None and str(kvq).upper() != "FP8":
                c.v("mo-kv-algo", "hf_quant_config.json kv_cache_quant_algo %r, expected null "
                    "or 'FP8'" % kvq)
            if (kvq is not None and str(kvq).upper() == "FP8") != kv_cfg:
                c.v("mo-label-mismatch", "hf_quant_config.json kv_cache_quant_algo %r but "
                    "config.json kv_cache_scheme %r" % (kvq, scheme))
            ex = quant.get("exclude_modules", [])
            if not isinstance(ex, list) or sorted(ex) != sorted(ignore):
                c.v("mo-label-mismatch", "hf_quant_config.json exclude_modules %r differ from "
                    "config.json ignore %r" % (ex, ignore))
    hq = (hfq or {}).get("quantization")
    nvfp4_embed = bool(qc.get("nvfp4_embed", False)) or (
        isinstance(hq, dict) and bool(hq.get("nvfp4_embed", False)))

    # Quantized modules: those with a weight_scale (VM ModelOptNvFp4LinearMethod.create_weights
    # registers weight, weight_scale, weight_scale_2, input_scale).
    quantized = set()
    for name in T:
        for suffix in (".weight_scale", ".weight_scale_2", ".input_scale"):
            if name.endswith(suffix):
                quantized.add(name[:-len(suffix)])
    for name in T:
        for suffix in (".weight_packed", ".weight_global_scale", ".input_global_scale"):
            if name.endswith(suffix):
                c.v("mo-foreign-tensor", "%s is a compressed-tensors name in a ModelOpt "
                    "checkpoint (vLLM's modelopt path has no such parameter)" % name)
    n_experts = 0
    for m in sorted(quantized):
        parts = [T.get(m + s) for s in (".weight", ".weight_scale", ".weight_scale_2")]
        if any(p is None for p in parts):
            c.v("mo-incomplete", "%s: quantized module needs .weight, .weight_scale and "
                ".weight_scale_2; missing %s" % (m, [s for s, p in zip(
                    (".weight", ".weight_scale", ".weight_scale_2"), parts) if p is None]))
            continue
        experts = check_module_shapes(c, m, parts[0], parts[1], "mo")
        if experts is None:
            continue
        if experts:
            # 3-D experts: accepted as nvfp4cal writes them; no vLLM loader for this shape was
            # found (see the report).
            n_experts += 1
        s2 = parts[2]
        if check_scalar(c, s2, experts, "mo", [], "weight_scale_2"):
            vals = c.f32_values(s2)
            # weight_scale_2 = amax / 2688 < 1 for any weight with amax < 2688.
            if np.any(vals >= 1.0):
                c.v("global-scale-implausible", "%s.weight_scale_2 = %r implies weight amax "
                    ">= 2688; ModelOpt stores amax / 2688 (is it the reciprocal?)"
                    % (m, vals[:4].tolist()))
        ins = T.get(m + ".input_scale")
        if ins is not None:
            if algo == "W4A16_NVFP4":
                # VM ModelOptNvFp4W4A16LinearMethod registers a placeholder input_scale and
                # discards it, so this loads; the label says the activations are not quantized.
                c.v("mo-unexpected-input-scale", "%s.input_scale present but quant_algo is "
                    "W4A16_NVFP4 (weight-only)" % m)
            check_scalar(c, ins, experts, "mo", [], "input_scale")
        elif w4a4:
            # VM ModelOptNvFp4LinearMethod.create_weights registers input_scale with
            # torch.empty: without it the activation global scale is uninitialised memory.
            c.v("mo-missing-input-scale", "%s.input_scale missing but quant_algo is NVFP4 "
                "(W4A4)" % m)
        if is_embedding_like(m) and not nvfp4_embed:
            c.v("quantized-embedding", "%s is quantized but nvfp4_embed is not set (VM "
                "get_quant_method quantizes embeddings only with nvfp4_embed)" % m)

    fp_modules = collect_fp_linear_weights(c, quantized)
    groups = check_fused(c, quantized, ".weight_scale_2", fp_modules)

    # Exclusion. VM get_quant_method: a Linear (or lm_head) that is_layer_excluded gets
    # UnquantizedLinearMethod; one that is not gets the NVFP4 method with U8 [out, in/2]
    # weights, so a bf16 [out, in] weight cannot load (and vice versa). Prefixes containing
    # 'vision_tower' / 'vision_model' / 'visual' are always unquantized.
    broad, narrow = list(ignore), narrow_patterns(ignore)

    def vision(m):
        return "vision_tower" in m or "vision_model" in m or "visual" in m

    for m in fp_modules:
        if vision(m):
            continue
        for view in vllm_views(m):
            r = modelopt_is_layer_excluded(view, ignore, narrow)
            if r is _MIXED:
                c.v("ignore-fused-mixed", "%s: exclude list names some but not all shards of "
                    "%s (is_layer_skipped raises)" % (m, view))
                break
            if not r:
                c.v("not-excluded", "%s.weight is %s %s, not quantized, and not matched by "
                    "exclude_modules/ignore (as %s)" % (m, T[m + ".weight"].dtype,
                                                       T[m + ".weight"].shape, view))
                break
    for m in sorted(quantized):
        if vision(m):
            c.v("mo-vision-quantized", "%s is quantized but vLLM's modelopt path loads "
                "vision_tower/vision_model/visual layers unquantized" % m)
        for view in vllm_views(m):
            r = modelopt_is_layer_excluded(view, ignore, broad)
            if r is _MIXED:
                c.v("ignore-fused-mixed", "%s: exclude list names some but not all shards of "
                    "%s (is_layer_skipped raises)" % (m, view))
                break
            if r:
                hits = [e for e in ignore if e == view or e in view or
                        fnmatch.fnmatchcase(view, e) or ("experts" in e and view in e)]
                c.v("excluded-but-quantized", "%s is quantized but exclude_modules/ignore "
                    "entries %s match it (as %s)" % (m, hits[:3], view))
                break

    kv = check_kv(c, kv_cfg, ["{a}.{k}_proj.{k}_scale"], "modelopt")
    if c.original:
        check_original(c, quantized, groups, ".weight_scale_2", "modelopt")
    label = algo + ("+FP8-KV" if kv_cfg else "")
    return "modelopt %s" % label, (len(quantized), n_experts, kv)


# ---------------------------------------------------------------------- compressed-tensors
def check_ct(c, qc):
    T = c.tensors
    # CT from_config / _quantization_scheme_map_from_config; utils is_activation_quantization_format
    # lists nvfp4-pack-quantized (so input_activations are read).
    if qc.get("format") != "nvfp4-pack-quantized":
        c.v("ct-format", "quantization_config.format %r, expected 'nvfp4-pack-quantized'"
            % qc.get("format"))
    if qc.get("quantization_status") != "compressed":
        c.v("ct-status", "quantization_status %r, expected 'compressed'"
            % qc.get("quantization_status"))
    if os.path.exists(os.path.join(c.folder, "hf_quant_config.json")):
        # vLLM reads config.json's quantization_config first (WU get_quant_config) and so
        # ignores it, but ModelOpt-aware tools look for hf_quant_config.json first.
        c.v("ct-hf-quant-config", "hf_quant_config.json present in a compressed-tensors "
            "checkpoint")
    ignore = qc.get("ignore", []) or []
    if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
        c.v("ct-format", "ignore must be a list of strings, found %r" % (ignore,))
        ignore = []
    groups = qc.get("config_groups")
    schemes = []  # (targets, input_activations or None)
    if not isinstance(groups, dict) or not groups:
        c.v("ct-weights-args", "config_groups missing or empty")
        groups = {}
    for gname, g in groups.items():
        if not isinstance(g, dict):
            c.v("ct-weights-args", "config_groups.%s is not an object" % gname)
            continue
        w = qargs(g.get("weights"))
        # CT _is_fp4a4_nvfp4 / _is_fp4a16_nvfp4: strategy tensor_group, symmetric, group_size
        # 16, type float, num_bits 4. CTS NVFP4 / NVFP4A16 presets: dynamic False.
        bad = [k for k, want in (("num_bits", 4), ("type", "float"), ("strategy", "tensor_group"),
                                 ("group_size", 16), ("symmetric", True), ("dynamic", False))
               if w.get(k) != want]
        if g.get("weights") is None or bad:
            c.v("ct-weights-args", "config_groups.%s.weights %r: %s not as NVFP4 needs "
                "(num_bits 4, type float, strategy tensor_group, group_size 16, symmetric true, "
                "dynamic false)" % (gname, g.get("weights"), bad))
        ia = g.get("input_activations")
        if ia:
            a = qargs(ia)
            # CTS NVFP4 preset input_activations: tensor_group, group 16, dynamic "local".
            bad = [k for k, want in (("num_bits", 4), ("type", "float"),
                                     ("strategy", "tensor_group"), ("group_size", 16),
                                     ("symmetric", True), ("dynamic", "local")) if a.get(k) != want]
            if bad:
                c.v("ct-input-args", "config_groups.%s.input_activations %r: %s not as NVFP4 "
                    "W4A4 needs (num_bits 4, type float, strategy tensor_group, group_size 16, "
                    "symmetric true, dynamic 'local')" % (gname, ia, bad))
        if g.get("format") not in (None, "nvfp4-pack-quantized"):
            c.v("ct-format", "config_groups.%s.format %r" % (gname, g.get("format")))
        targets = g.get("targets") or []
        if not isinstance(targets, list) or not targets:
            c.v("ct-weights-args", "config_groups.%s.targets %r" % (gname, targets))
            targets = []
        schemes.append((gname, targets, bool(ia)))
    scheme = qc.get("kv_cache_scheme")
    kv_fp8 = scheme is not None
    if kv_fp8:
        # CT CompressedTensorsKVCacheMethod.validate_kv_cache_scheme: type float, num_bits 8,
        # strategy 'tensor', symmetric.
        if not (isinstance(scheme, dict) and scheme.get("type") == "float"
                and scheme.get("num_bits") == 8 and scheme.get("strategy") == "tensor"
                and scheme.get("symmetric") is True):
            c.v("ct-kv-scheme", "kv_cache_scheme %r: vLLM supports only type float, num_bits 8, "
                "strategy tensor, symmetric true" % (scheme,))

    def scheme_of(m):
        """CTU find_matched_target: layer name (exact / re:), then the class name by
        substring (every Linear class contains 'linear'), then fused shards."""
        for gname, targets, act in schemes:
            if ct_match(m, targets):
                return gname, act
        for gname, targets, act in schemes:
            if any(not t.startswith("re:") and "linear" in t.lower() for t in targets):
                return gname, act
        return None

    quantized = set()
    for name in T:
        for suffix in (".weight_packed", ".weight_global_scale", ".input_global_scale"):
            if name.endswith(suffix):
                quantized.add(name[:-len(suffix)])
    for name in T:
        for suffix in (".weight_scale_2", ".input_scale"):
            if name.endswith(suffix):
                c.v("ct-foreign-tensor", "%s is a ModelOpt name in a compressed-tensors "
                    "checkpoint (W4A4 / W4A16 create_weights register no such parameter)" % name)
    n_experts = 0
    any_act = False
    for m in sorted(quantized):
        parts = [T.get(m + s) for s in (".weight_packed", ".weight_scale", ".weight_global_scale")]
        if any(p is None for p in parts):
            c.v("ct-incomplete", "%s: quantized module needs .weight_packed, .weight_scale and "
                ".weight_global_scale; missing %s" % (m, [s for s, p in zip(
                    (".weight_packed", ".weight_scale", ".weight_global_scale"), parts)
                    if p is None]))
            continue
        if m + ".weight" in T:
            c.v("ct-foreign-tensor", "%s.weight next to %s.weight_packed" % (m, m))
        experts = check_module_shapes(c, m, parts[0], parts[1], "ct")
        if experts is None:
            continue
        if experts:
            n_experts += 1
        sch = scheme_of(m)
        if sch is None:
            c.v("ct-no-target", "%s is quantized but no config_groups target matches it" % m)
            act = False
        else:
            act = sch[1]
        any_act = any_act or act
        gs = parts[2]
        if check_scalar(c, gs, experts, "ct", [1], "weight_global_scale"):
            vals = c.f32_values(gs)
            # weight_global_scale = 2688 / amax > 1 for any weight with amax < 2688; a value
            # below 1 is what storing weight_scale_2 (amax / 2688) instead would give.
            if np.any(vals <= 1.0):
                c.v("global-scale-implausible", "%s.weight_global_scale = %r implies weight "
                    "amax >= 2688; compressed-tensors stores 2688 / amax (is it amax / 2688?)"
                    % (m, vals[:4].tolist()))
        igs = T.get(m + ".input_global_scale")
        if igs is not None:
            if not act:
                # W4A16 create_weights registers no input_global_scale: the loader finds no
                # parameter for it.
                c.v("ct-unexpected-input-global-scale", "%s.input_global_scale present but its "
                    "scheme has no input_activations (W4A16)" % m)
            check_scalar(c, igs, experts, "ct", [1], "input_global_scale")
        elif act:
            # W4A4 create_weights registers input_global_scale (torch.empty): it must be loaded.
            c.v("ct-missing-input-global-scale", "%s.input_global_scale missing but its scheme "
                "quantizes input activations (W4A4)" % m)
        if m.rsplit(".", 1)[-1] == "lm_head":
            # CT get_quant_method applies schemes to LinearBase only; ParallelLMHead is not one.
            c.v("ct-lm-head-quantized", "%s is quantized; vLLM's compressed-tensors path loads "
                "lm_head unquantized" % m)
        elif is_embedding_like(m):
            c.v("quantized-embedding", "%s is quantized; vLLM's compressed-tensors path has no "
                "quantized embedding" % m)

    fp_modules = collect_fp_linear_weights(c, quantized)
    groups_f = check_fused(c, quantized, ".weight_global_scale", fp_modules)

    # Ignore list. CT get_scheme: should_ignore_layer -> no scheme -> UnquantizedLinearMethod;
    # otherwise find_matched_target ('Linear' matches every Linear class) gives the NVFP4
    # scheme, whose weight_packed a bf16 .weight cannot fill. lm_head is not a LinearBase.
    for m in fp_modules:
        if m.rsplit(".", 1)[-1] == "lm_head":
            continue
        if scheme_of(m) is None:
            continue  # no target would quantize it
        for view in vllm_views(m):
            if view == experts_prefix(m):
                continue
            r = ct_should_ignore(view, ignore)
            if r is _MIXED:
                c.v("ignore-fused-mixed", "%s: ignore names some but not all shards of %s "
                    "(should_ignore_layer raises)" % (m, view))
                break
            if not r:
                c.v("not-excluded", "%s.weight is %s %s, not quantized, and not matched by "
                    "ignore (exact name or 're:' regex, as %s)"
                    % (m, T[m + ".weight"].dtype, T[m + ".weight"].shape, view))
                break
    for m in sorted(quantized):
        for view in vllm_views(m):
            if view == experts_prefix(m):
                continue
            r = ct_should_ignore(view, ignore)
            if r is _MIXED:
                c.v("ignore-fused-mixed", "%s: ignore names some but not all shards of %s "
                    "(should_ignore_layer raises)" % (m, view))
                break
            if r:
                c.v("excluded-but-quantized", "%s is quantized but matched by ignore (as %s)"
                    % (m, view))
                break

    kv = check_kv(c, kv_fp8, ["{a}.{k}_scale", "{a}.{k}_proj.{k}_scale",
                              "{a}.{k}_proj.output_scale"], "ct")
    if c.original:
        check_original(c, quantized, groups_f, ".weight_global_scale", "ct")
    label = ("W4A4" if any_act else "W4A16") + ("+FP8-KV" if kv_fp8 else "")
    return "compressed-tensors %s" % label, (len(quantized), n_experts, kv)


def main(argv):
    args = list(argv[1:])
    original = None
    runtime_only = False
    dirs = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--original":
            if i + 1 >= len(args):
                print("--original needs a folder", file=sys.stderr)
                return 2
            original = args[i + 1]
            i += 2
            continue
        if a.startswith("--original="):
            original = a.split("=", 1)[1]
        elif a == "--runtime-only":
            runtime_only = True
        elif a in ("-h", "--help"):
            print(__doc__)
            return 0
        elif a.startswith("--"):
            print("unknown option %s" % a, file=sys.stderr)
            return 2
        else:
            dirs.append(a)
        i += 1
    if not dirs:
        print("usage: runtime_conformance.py [--original DIR] [--runtime-only] DIR [DIR...]",
              file=sys.stderr)
        return 2
    failed = False
    for d in dirs:
        violations, summary = _check(d, original, runtime_only)
        if violations:
            failed = True
            for line in violations:
                print(line)
        else:
            label, (n, experts, kv) = summary
            extra = []
            if experts:
                extra.append("%d 3-D expert tensors" % experts)
            if kv:
                extra.append("%d kv scales" % kv)
            print("%s: %s OK (%d modules%s)" % (d, label, n,
                                                ", " + ", ".join(extra) if extra else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
