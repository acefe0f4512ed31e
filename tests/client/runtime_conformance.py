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
import os
import sys

# The checker's parts live beside this file (runtime_conformance_files.py: the folder and its
# safetensors; _rules.py: naming and shared checks; _formats.py: each layout's checks); every
# name stays importable from here.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)
from runtime_conformance_files import (  # noqa: E402,F401
    DTYPE_SIZES, FLOAT_DTYPES, FP4_E4M3_PRODUCT, FUSED_FAMILIES, FUSED_OF_LEAF, RULES,
    VLLM_PACKED, Checker, Tensor)
from runtime_conformance_formats import check_ct, check_modelopt  # noqa: E402
from runtime_conformance_rules import (  # noqa: E402,F401
    _MIXED, check_fused, check_kv, check_module_shapes, check_original, check_scalar,
    collect_fp_linear_weights, ct_match, ct_should_ignore, experts_prefix, fused_key,
    is_embedding_like, modelopt_is_layer_excluded, narrow_patterns, qargs, split_module,
    vllm_is_layer_skipped, vllm_views)


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
