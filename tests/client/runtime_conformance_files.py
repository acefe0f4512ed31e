"""The folder side of runtime_conformance.py: the rule ids, safetensors dtypes and fused families,
and Checker, which reads a checkpoint folder (safetensors headers, index, JSON files) and
collects violations. Imported by runtime_conformance.py (which re-exports every name)."""
import json
import math
import os
import struct

import numpy as np


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
