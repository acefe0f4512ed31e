"""The module-level rules of runtime_conformance.py that both layouts share: how vLLM names and
groups modules (fused siblings, FusedMoE prefixes, exclude and ignore matching), and the checks
of a quantized module's tensors, fused siblings' scales, KV-cache scales and --original.
Imported by runtime_conformance.py (which re-exports every name)."""
import fnmatch
import math
import re

import numpy as np

from runtime_conformance_files import (FLOAT_DTYPES, FP4_E4M3_PRODUCT, FUSED_OF_LEAF,
                                       VLLM_PACKED, Checker)


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
