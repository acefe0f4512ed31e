"""The two layouts' checks of runtime_conformance.py: check_modelopt (ModelOpt: config.json and
hf_quant_config.json labels, weight / weight_scale / weight_scale_2 / input_scale) and check_ct
(compressed-tensors nvfp4-pack-quantized: config_groups, weight_packed / weight_global_scale /
input_global_scale). Each returns (label, (modules, 3-D expert tensors, kv scales)).
Imported by runtime_conformance.py (which re-exports every name)."""
import fnmatch
import os

import numpy as np

from runtime_conformance_rules import (_MIXED, check_fused, check_kv, check_module_shapes,
                                       check_original, check_scalar, collect_fp_linear_weights,
                                       ct_match, ct_should_ignore, experts_prefix,
                                       is_embedding_like, modelopt_is_layer_excluded,
                                       narrow_patterns, qargs, vllm_views)


# ---------------------------------------------------------------------- ModelOpt
def check_modelopt(c, qc):
    algo, ignore, scheme, kv_cfg = _modelopt_labels(c, qc)
    _modelopt_config_groups(c, qc, algo)
    hfq = c.load_json("hf_quant_config.json", required=False)
    if hfq is not None:
        _modelopt_hf_quant_config(c, hfq, qc, algo, ignore, scheme, kv_cfg)
    hq = (hfq or {}).get("quantization")
    nvfp4_embed = bool(qc.get("nvfp4_embed", False)) or (
        isinstance(hq, dict) and bool(hq.get("nvfp4_embed", False)))

    quantized = _modelopt_quantized_modules(c)
    n_experts = 0
    for m in sorted(quantized):
        experts = _modelopt_check_module(c, m, algo, nvfp4_embed)
        if experts:
            # 3-D experts: accepted as nvfp4cal writes them; no vLLM loader for this shape was
            # found (see the report).
            n_experts += 1

    fp_modules = collect_fp_linear_weights(c, quantized)
    groups = check_fused(c, quantized, ".weight_scale_2", fp_modules)
    _modelopt_check_exclusion(c, quantized, fp_modules, ignore)

    kv = check_kv(c, kv_cfg, ["{a}.{k}_proj.{k}_scale"], "modelopt")
    if c.original:
        check_original(c, quantized, groups, ".weight_scale_2", "modelopt")
    label = algo + ("+FP8-KV" if kv_cfg else "")
    return "modelopt %s" % label, (len(quantized), n_experts, kv)


def _modelopt_labels(c, qc):
    """Checks config.json's quant_algo, ignore, kv_cache_scheme, kv_cache_quant_algo and
    group_size; returns (algo upper-cased, ignore list, kv_cache_scheme, whether it is FP8)."""
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
    return algo, ignore, scheme, kv_cfg


def _modelopt_config_groups(c, qc, algo):
    """config_groups: not read by vLLM's ModelOpt path; must describe the same thing."""
    groups = qc.get("config_groups")
    g0 = None
    if isinstance(groups, dict) and len(groups) == 1:
        g0 = list(groups.values())[0]
    if not isinstance(g0, dict):
        c.v("mo-config-groups", "config_groups must hold one group, found %r" % (groups,))
        return
    w = g0.get("weights") or {}
    if not (w.get("num_bits") == 4 and w.get("type") == "float" and w.get("group_size") == 16):
        c.v("mo-config-groups", "config_groups weights %r, expected num_bits 4, type float, "
            "group_size 16" % (w,))
    if "Linear" not in (g0.get("targets") or []):
        c.v("mo-config-groups", "config_groups targets %r, expected ['Linear']"
            % (g0.get("targets"),))
    ia = g0.get("input_activations")
    if algo == "NVFP4" and not ia:
        c.v("mo-input-activations", "quant_algo NVFP4 (W4A4) but config_groups has no "
            "input_activations")
    if algo == "W4A16_NVFP4" and ia:
        c.v("mo-input-activations", "quant_algo W4A16_NVFP4 (weight-only) but config_groups "
            "has input_activations %r" % (ia,))
    if ia and not (ia.get("num_bits") == 4 and ia.get("type") == "float"
                   and ia.get("group_size") == 16):
        c.v("mo-config-groups", "config_groups input_activations %r, expected num_bits 4, "
            "type float, group_size 16" % (ia,))


def _modelopt_hf_quant_config(c, hfq, qc, algo, ignore, scheme, kv_cfg):
    """hf_quant_config.json's quantization object: complete and saying what config.json says."""
    quant = hfq.get("quantization")
    if not isinstance(quant, dict):
        c.v("mo-hfq-fields", "hf_quant_config.json has no 'quantization' object")
        return
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


def _modelopt_quantized_modules(c):
    """The modules with a weight_scale, weight_scale_2 or input_scale (VM
    ModelOptNvFp4LinearMethod.create_weights registers weight, weight_scale, weight_scale_2,
    input_scale); flags compressed-tensors tensor names."""
    T = c.tensors
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
    return quantized


def _modelopt_check_module(c, m, algo, nvfp4_embed):
    """Checks quantized module `m`'s tensors; returns whether it holds 3-D experts, or None
    when its tensors are incomplete or misshapen (then the other checks are skipped)."""
    T = c.tensors
    parts = [T.get(m + s) for s in (".weight", ".weight_scale", ".weight_scale_2")]
    if any(p is None for p in parts):
        c.v("mo-incomplete", "%s: quantized module needs .weight, .weight_scale and "
            ".weight_scale_2; missing %s" % (m, [s for s, p in zip(
                (".weight", ".weight_scale", ".weight_scale_2"), parts) if p is None]))
        return None
    experts = check_module_shapes(c, m, parts[0], parts[1], "mo")
    if experts is None:
        return None
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
    elif algo == "NVFP4":
        # VM ModelOptNvFp4LinearMethod.create_weights registers input_scale with
        # torch.empty: without it the activation global scale is uninitialised memory.
        c.v("mo-missing-input-scale", "%s.input_scale missing but quant_algo is NVFP4 "
            "(W4A4)" % m)
    if is_embedding_like(m) and not nvfp4_embed:
        c.v("quantized-embedding", "%s is quantized but nvfp4_embed is not set (VM "
            "get_quant_method quantizes embeddings only with nvfp4_embed)" % m)
    return experts


def _is_vision(m):
    return "vision_tower" in m or "vision_model" in m or "visual" in m


def _modelopt_check_exclusion(c, quantized, fp_modules, ignore):
    """Exclusion. VM get_quant_method: a Linear (or lm_head) that is_layer_excluded gets
    UnquantizedLinearMethod; one that is not gets the NVFP4 method with U8 [out, in/2]
    weights, so a bf16 [out, in] weight cannot load (and vice versa). Prefixes containing
    'vision_tower' / 'vision_model' / 'visual' are always unquantized."""
    T = c.tensors
    broad, narrow = list(ignore), narrow_patterns(ignore)
    for m in fp_modules:
        if _is_vision(m):
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
        if _is_vision(m):
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


# ---------------------------------------------------------------------- compressed-tensors
def check_ct(c, qc):
    ignore = _ct_labels(c, qc)
    schemes = _ct_schemes(c, qc)
    kv_fp8 = _ct_kv_scheme(c, qc)

    quantized = _ct_quantized_modules(c)
    n_experts = 0
    any_act = False
    for m in sorted(quantized):
        checked = _ct_check_module(c, m, schemes)
        if checked is None:
            continue
        experts, act = checked
        if experts:
            n_experts += 1
        any_act = any_act or act

    fp_modules = collect_fp_linear_weights(c, quantized)
    groups_f = check_fused(c, quantized, ".weight_global_scale", fp_modules)
    _ct_check_ignore(c, quantized, fp_modules, ignore, schemes)

    kv = check_kv(c, kv_fp8, ["{a}.{k}_scale", "{a}.{k}_proj.{k}_scale",
                              "{a}.{k}_proj.output_scale"], "ct")
    if c.original:
        check_original(c, quantized, groups_f, ".weight_global_scale", "ct")
    label = ("W4A4" if any_act else "W4A16") + ("+FP8-KV" if kv_fp8 else "")
    return "compressed-tensors %s" % label, (len(quantized), n_experts, kv)


def _ct_labels(c, qc):
    """Checks quantization_config's format and status, and that no hf_quant_config.json sits
    beside it; returns the ignore list ([] when malformed)."""
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
    return ignore


def _ct_schemes(c, qc):
    """Checks every config_groups entry; returns [(group name, targets, whether it quantizes
    input activations)] in the file's order."""
    groups = qc.get("config_groups")
    schemes = []
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
    return schemes


def _ct_kv_scheme(c, qc):
    """Checks kv_cache_scheme; returns whether one is given (an FP8 KV cache)."""
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
    return kv_fp8


def _ct_scheme_of(m, schemes):
    """CTU find_matched_target: layer name (exact / re:), then the class name by
    substring (every Linear class contains 'linear'), then fused shards."""
    for gname, targets, act in schemes:
        if ct_match(m, targets):
            return gname, act
    for gname, targets, act in schemes:
        if any(not t.startswith("re:") and "linear" in t.lower() for t in targets):
            return gname, act
    return None


def _ct_quantized_modules(c):
    """The modules with a weight_packed, weight_global_scale or input_global_scale; flags
    ModelOpt tensor names."""
    T = c.tensors
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
    return quantized


def _ct_check_module(c, m, schemes):
    """Checks quantized module `m`'s tensors against its scheme; returns (whether it holds
    3-D experts, whether its scheme quantizes input activations), or None when its tensors
    are incomplete or misshapen (then the other checks are skipped)."""
    T = c.tensors
    parts = [T.get(m + s) for s in (".weight_packed", ".weight_scale", ".weight_global_scale")]
    if any(p is None for p in parts):
        c.v("ct-incomplete", "%s: quantized module needs .weight_packed, .weight_scale and "
            ".weight_global_scale; missing %s" % (m, [s for s, p in zip(
                (".weight_packed", ".weight_scale", ".weight_global_scale"), parts)
                if p is None]))
        return None
    if m + ".weight" in T:
        c.v("ct-foreign-tensor", "%s.weight next to %s.weight_packed" % (m, m))
    experts = check_module_shapes(c, m, parts[0], parts[1], "ct")
    if experts is None:
        return None
    sch = _ct_scheme_of(m, schemes)
    if sch is None:
        c.v("ct-no-target", "%s is quantized but no config_groups target matches it" % m)
        act = False
    else:
        act = sch[1]
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
    return experts, act


def _ct_check_ignore(c, quantized, fp_modules, ignore, schemes):
    """Ignore list. CT get_scheme: should_ignore_layer -> no scheme -> UnquantizedLinearMethod;
    otherwise find_matched_target ('Linear' matches every Linear class) gives the NVFP4
    scheme, whose weight_packed a bf16 .weight cannot fill. lm_head is not a LinearBase."""
    T = c.tensors
    for m in fp_modules:
        if m.rsplit(".", 1)[-1] == "lm_head":
            continue
        if _ct_scheme_of(m, schemes) is None:
            continue  # no target would quantize it
        view = _first_view_ignored(c, m, ignore, False)
        if view is not None:
            c.v("not-excluded", "%s.weight is %s %s, not quantized, and not matched by "
                "ignore (exact name or 're:' regex, as %s)"
                % (m, T[m + ".weight"].dtype, T[m + ".weight"].shape, view))
    for m in sorted(quantized):
        view = _first_view_ignored(c, m, ignore, True)
        if view is not None:
            c.v("excluded-but-quantized", "%s is quantized but matched by ignore (as %s)"
                % (m, view))


def _first_view_ignored(c, m, ignore, ignored):
    """The first vLLM view of module m (an expert tensor's own prefix aside) that the ignore
    list matches (ignored=True) or does not (False); None when there is none, or when a fused
    view is named for some shards only (reported here: should_ignore_layer raises)."""
    for view in vllm_views(m):
        if view == experts_prefix(m):
            continue
        r = ct_should_ignore(view, ignore)
        if r is _MIXED:
            c.v("ignore-fused-mixed", "%s: ignore names some but not all shards of %s "
                "(should_ignore_layer raises)" % (m, view))
            return None
        if r == ignored:
            return view
    return None
