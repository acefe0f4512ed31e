"""Sequential calibration: decoder layer by layer, each layer's Hessians captured with every
earlier layer already replaced by its dequantized NVFP4 weights (how ModelOpt and
llm-compressor run GPTQ: later layers see the errors of earlier ones).

    import nvfp4cal
    batches = [{"input_ids": ids, "attention_mask": mask}, ...]   # model(**batch)
    with nvfp4cal.Client(["gpu-0:50051"]) as client:               # or client=None: a local
        result = nvfp4cal.calibrate_sequential(model, batches,     # nvfp4cal-server is started
                                               client=client, method="gptq")
    result.save("hessians.safetensors")       # then `nvfp4cal quantize --method gptq` on it

How (memory: one layer's activations and Hessians at a time):

1. the decoder layers are found (`find_decoder_layers`: the largest `nn.ModuleList` of blocks
   of one class holding Linear modules, e.g. `model.layers` of Hugging Face Llama);
2. every calibration batch runs through the model up to layer 0, whose inputs (hidden states,
   and the other arguments the model passes it: attention mask, `position_embeddings`, ...) are
   caught and kept on the model's device; the forward stops there;
3. for each layer i: the layer runs on the cached hidden states with `nvfp4cal.capture` hooks
   (Hessians, input / output amax); its Linear weights are quantized through the client with the
   method and parameters the final `nvfp4cal quantize` will use (fused q/k/v and gate/up share
   their global amax, as in the CLI); each weight is replaced by its dequantized NVFP4 values
   (code * weight_scale * weight_scale_2, in the model's dtype); the layer runs again, with the
   quantized weights, and its outputs become layer i+1's inputs;
4. Linear modules outside the decoder layers that the selection keeps (none under the default
   excludes for a causal LM: lm_head and the embeddings are excluded) are captured by one more
   pass of every batch through the whole, now quantized, model.

The Hessians file holds every layer's Hessians as captured, so `nvfp4cal quantize` on the
original checkpoint with it writes the very codes and scales the run used (same weights, same
Hessians, same method: the quantizer is deterministic and every backend gives the same bytes).
The model is left with dequantized weights (restore_weights=True puts the originals back).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import __version__
from .capture import (CaptureMemoryError, HessianCapture, _fused_key, available_memory_bytes,
                      format_bytes, layout_for_method)
from .hessians_file import HESSIAN_SUFFIX, write_hessians
# The decoder layers and the local server live in sequential_layers.py and local_server.py;
# every name stays importable from here.
from .local_server import LocalServer, find_server_binary  # noqa: F401
from .sequential_layers import (  # noqa: F401
    SequentialError, _batch_mask, _batch_tokens, _catch_layer_inputs, _check_uniform_layers,
    _default_forward, _has_linear, _LayerInputs, _pre_hook_takes_kwargs, _resolve_layers,
    _StopForward, find_decoder_layers)


# Methods whose quantization reads the Hessian (the others take it for statistics only).
_NEEDS_HESSIAN = ("local_hessian", "dss", "gptq")
_GPTQ_PARAMS = ("damping", "act_order", "block_columns", "scale_objective", "scale_search",
                "compare_local_hessian")
_ALL_PARAMS = ("beta_step", "beta_half_range", "scale_neighbours", "symmetry_tolerance") + \
    _GPTQ_PARAMS


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr)


# --- the result --------------------------------------------------------------------------------


@dataclass
class SequentialCalibration:
    """The Hessians of a sequential run, in the form `write_hessians` takes; `save()` writes
    the file `nvfp4cal quantize --hessians` reads."""
    layout: str
    method: str
    accumulation: str
    layers_name: str
    num_layers: int
    hessians: Dict[str, np.ndarray] = field(default_factory=dict)   # entry -> fp32, normalized
    input_amax: Dict[str, float] = field(default_factory=dict)      # entry -> amax
    output_amax: Dict[str, float] = field(default_factory=dict)     # module -> amax
    aliases: Dict[str, str] = field(default_factory=dict)           # module.hessian -> entry
    tokens: Dict[str, int] = field(default_factory=dict)            # entry -> tokens
    modules: List[str] = field(default_factory=list)                # captured modules
    quantized: Dict[str, Any] = field(default_factory=dict)         # module -> QuantizedTensor
    params: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def num_tokens(self) -> int:
        return max(self.tokens.values(), default=0)

    def hessian(self, module: str) -> np.ndarray:
        """The Hessian serving `module` (its entry or the entry its alias names)."""
        entry = module + HESSIAN_SUFFIX
        entry = self.aliases.get(entry, entry)
        if entry not in self.hessians:
            raise KeyError(f"no Hessian for module {module!r}")
        return self.hessians[entry]

    def save(self, path: str, metadata: Optional[Dict[str, str]] = None) -> None:
        if not self.hessians:
            raise ValueError("no calibration token reached any captured module: nothing to save")
        meta = {
            "nvfp4cal.layout": self.layout,
            "nvfp4cal.tokens": str(self.num_tokens),
            "nvfp4cal.normalization": "divided_by_tokens",
            "nvfp4cal.accumulation": self.accumulation,
            "nvfp4cal.producer": json.dumps({"name": "nvfp4cal", "version": __version__,
                                             "tool": "nvfp4cal.calibrate_sequential (python)"}),
            "nvfp4cal.sequential": json.dumps({"layers": self.layers_name,
                                               "num_layers": self.num_layers,
                                               "method": self.method, "params": self.params}),
        }
        meta.update(metadata or {})
        write_hessians(path, self.hessians, input_amax=self.input_amax,
                       output_amax=self.output_amax, aliases=self.aliases, tokens=self.tokens,
                       metadata=meta)


def _fnmatch_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _collect(cap: HessianCapture, result: SequentialCalibration,
             spill_dir: Optional[str]) -> Dict[str, np.ndarray]:
    """Moves a finished capture's Hessians into `result` (spilled to .npy files when
    `spill_dir`); returns module -> the Hessian array used for it (one object per input)."""
    by_module: Dict[str, np.ndarray] = {}
    for leader, members in cap.groups().items():
        acc_tokens = cap._of_module[leader].tokens  # pylint: disable=protected-access
        if acc_tokens == 0:
            continue
        entry = leader + HESSIAN_SUFFIX
        h = cap.hessian(leader).cpu().numpy()
        if spill_dir is not None:
            path = os.path.join(spill_dir, f"{len(result.hessians):06d}.npy")
            np.save(path, h)
            h = np.load(path, mmap_mode="r")
        result.hessians[entry] = h
        result.input_amax[entry] = cap.input_amax(leader)
        result.tokens[entry] = acc_tokens
        for member in members:
            by_module[member] = h
            if member != leader:
                result.aliases[member + HESSIAN_SUFFIX] = entry
    result.output_amax.update(cap.output_amax())
    result.modules.extend(cap.modules)
    return by_module


# --- quantize one layer ------------------------------------------------------------------------


def _check_params(method: str, params: Mapping[str, Any]) -> Dict[str, Any]:
    params = {k: v for k, v in params.items() if v is not None}
    for key in params:
        if key not in _ALL_PARAMS:
            raise TypeError(f"unknown parameter {key!r}; expected one of {', '.join(_ALL_PARAMS)}")
        if key in _GPTQ_PARAMS and method != "gptq":
            raise ValueError(f"parameter {key!r} applies to method gptq only")
    return params


def _quantize_layer(session, modules: Mapping[str, torch.nn.Linear],
                    hessians: Mapping[str, np.ndarray], method: str, params: Dict[str, Any],
                    fallback_method: Optional[str], full_hessian_layout: str,
                    result: SequentialCalibration, keep_quantized: bool,
                    originals: Optional[Dict[str, torch.Tensor]]) -> None:
    """Quantizes every module of one layer through `session`, then replaces its weight by the
    dequantized values. Fused siblings share g = the max of their max |W| (as the CLI)."""
    amax: Dict[str, float] = {}
    for name, module in modules.items():
        own = float(module.weight.detach().abs().max().to(torch.float32))
        key = _fused_key(name)
        amax[key] = max(amax.get(key, 0.0), own)
    results = {}
    for name, module in modules.items():
        h = hessians.get(name)
        m, p = method, params
        if h is None and method in _NEEDS_HESSIAN:
            if fallback_method is None:
                raise SequentialError(f"{name}: no calibration token reached it, so it has no "
                                      f"Hessian, and --method {method} needs one (give "
                                      "--fallback-method max|mse)")
            m, p = fallback_method, {}
        try:
            q = session.quantize(module.weight.detach(), hessian=h, method=m,
                                 name=name + ".weight", global_amax=amax[_fused_key(name)],
                                 full_hessian_layout=full_hessian_layout, **p)
        except Exception as error:
            raise SequentialError(f"quantizing {name}.weight failed: {error}") from error
        results[name] = q
    with torch.no_grad():
        for name, module in modules.items():
            q = results[name]
            if originals is not None:
                originals[name] = module.weight.detach().to("cpu", copy=True)
            w = module.weight
            w.copy_(q.dequantize().to(device=w.device, dtype=w.dtype))
            if keep_quantized:
                result.quantized[name] = q


# --- the run -----------------------------------------------------------------------------------


def _check_arguments(method: str, layout: str, params: Optional[Mapping[str, Any]],
                     fallback_method: Optional[str],
                     full_hessian_layout: str) -> Tuple[str, Dict[str, Any]]:
    """(the layout, the checked params); ValueError / TypeError for a bad argument."""
    layout = layout_for_method(method) if layout == "auto" else layout
    params = _check_params(method, dict(params or {}))
    if fallback_method not in (None, "max", "mse"):
        raise ValueError(f"fallback_method {fallback_method!r}: expected max or mse")
    if full_hessian_layout not in ("upper", "full"):
        raise ValueError(f"full_hessian_layout {full_hessian_layout!r}: expected upper or full")
    return layout, params


def _layer_captures(layer_list: torch.nn.ModuleList, prefixes: Sequence[str],
                    selected: Sequence[str], options: Dict[str, Any], memory_fraction: float,
                    check_memory: bool) -> List[Optional[HessianCapture]]:
    """A capture of each decoder layer's selected modules (None: the layer has none)."""
    layer_caps: List[Optional[HessianCapture]] = []
    for i, layer in enumerate(layer_list):
        if any(n.startswith(prefixes[i]) for n in selected):
            layer_caps.append(HessianCapture(layer, prefix=prefixes[i],
                                             memory_fraction=memory_fraction,
                                             check_memory=check_memory, **options))
        else:
            layer_caps.append(None)
    return layer_caps


def _input_memory_limit(batches: Sequence[Any], layers_name: str,
                        layer_list: torch.nn.ModuleList, module_count: int, hessian_bytes: int,
                        check_memory: bool, memory_fraction: float,
                        say: Callable[[str], None]) -> Optional[int]:
    """Says what the cached layer inputs and one layer's Hessians take on the layers' device;
    returns the bytes the cached inputs may take (None: unchecked). CaptureMemoryError when the
    batches' token count already says they would not fit."""
    first = next(p for p in layer_list[0].parameters())
    device = first.device
    tokens = [_batch_tokens(b) for b in batches]
    width = next((m.in_features for m in layer_list[0].modules()
                  if isinstance(m, torch.nn.Linear)), 0)
    free = available_memory_bytes(device) if device.type in ("cuda", "cpu") else None
    limit = int(free * memory_fraction) - hessian_bytes if (check_memory and free) else None
    if None not in tokens:
        estimate = sum(tokens) * width * first.element_size()
        say(f"nvfp4cal sequential: {len(layer_list)} decoder layers ({layers_name}), "
            f"{module_count} Linear modules; the layer inputs of {sum(tokens)} token "
            f"positions need about {format_bytes(estimate)} on {device} (x {width}, "
            f"{str(first.dtype).replace('torch.', '')}), one layer's Hessians "
            f"{format_bytes(hessian_bytes)}"
            + (f"; {format_bytes(free)} available" if free is not None else ""))
        if limit is not None and estimate > limit:
            raise CaptureMemoryError(
                f"sequential calibration caches the inputs of a decoder layer on {device}: about "
                f"{format_bytes(estimate)} for {sum(tokens)} token positions, plus "
                f"{format_bytes(hessian_bytes)} of one layer's Hessians, but only "
                f"{format_bytes(free)} is available (limit {memory_fraction:.0%} of it): use "
                "fewer or shorter samples, or a device with more memory")
    else:
        say(f"nvfp4cal sequential: {len(layer_list)} decoder layers ({layers_name}), "
            f"{module_count} Linear modules; one layer's Hessians need "
            f"{format_bytes(hessian_bytes)} on {device}"
            + (f"; {format_bytes(free)} available" if free is not None else ""))
    return limit


@dataclass
class _LayerWork:
    """What is done with each decoder layer's capture: where its Hessians go and how its
    modules are quantized (as the final `nvfp4cal quantize` will)."""
    result: SequentialCalibration
    spill_dir: Optional[str]
    method: str
    params: Dict[str, Any]
    fallback_method: Optional[str]
    full_hessian_layout: str
    keep_quantized: bool
    originals: Optional[Dict[str, torch.Tensor]]   # module -> original weight (restore_weights)


def _capture_and_quantize(cap: HessianCapture, layer: torch.nn.Module, inputs: _LayerInputs,
                          client, work: _LayerWork) -> int:
    """Runs `layer` on the cached inputs under `cap`, then quantizes its modules and replaces
    their weights by the dequantized values; returns the number of modules."""
    with cap:
        for k in range(len(inputs.hidden)):
            cap.set_mask(inputs.masks[k])
            inputs.call(layer, k)
    hessians = _collect(cap, work.result, work.spill_dir)
    with client.session() as session:
        _quantize_layer(session, cap.modules, hessians, work.method, work.params,
                        work.fallback_method, work.full_hessian_layout, work.result,
                        work.keep_quantized, work.originals)
    return len(cap.modules)


def _calibrate_layers(layer_list: torch.nn.ModuleList,
                      layer_caps: List[Optional[HessianCapture]], prefixes: Sequence[str],
                      inputs: _LayerInputs, client, work: _LayerWork,
                      say: Callable[[str], None]) -> None:
    """Layer by layer: capture and quantize, then the layer's outputs (with the quantized
    weights) become the next layer's inputs. Each capture is dropped once used."""
    for i, layer in enumerate(layer_list):
        layer_start = time.monotonic()
        quantized = 0
        if layer_caps[i] is not None:
            quantized = _capture_and_quantize(layer_caps[i], layer, inputs, client, work)
            layer_caps[i] = None  # free its accumulators
        if i + 1 < len(layer_list):
            for k in range(len(inputs.hidden)):
                inputs.hidden[k] = inputs.call(layer, k).detach()
        say(f"nvfp4cal sequential: {prefixes[i][:-1]} ({i + 1}/{len(layer_list)}): "
            f"{quantized} modules captured and quantized ({work.method}) in "
            f"{time.monotonic() - layer_start:.2f} s")


def _capture_outside(model: torch.nn.Module, batches: Sequence[Any],
                     forward: Callable[[torch.nn.Module, Any], Any], outside: Sequence[str],
                     options: Dict[str, Any], result: SequentialCalibration,
                     spill_dir: Optional[str], say: Callable[[str], None]) -> None:
    """Captures the selected modules outside the decoder layers with one more pass of every
    batch through the whole, now quantized, model."""
    only = [_fnmatch_escape(n) for n in outside]
    cap = HessianCapture(model, **dict(options, include=only))
    with cap:
        for batch in batches:
            cap.set_mask(_batch_mask(batch))
            forward(model, batch)
    _collect(cap, result, spill_dir)
    say(f"nvfp4cal sequential: {len(outside)} modules outside the decoder layers "
        f"captured after them: {', '.join(outside[:4])}"
        f"{' ...' if len(outside) > 4 else ''}")


def _restore_originals(model: torch.nn.Module, originals: Dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        modules = dict(model.named_modules())
        for name, weight in originals.items():
            modules[name].weight.copy_(weight.to(modules[name].weight.device))


def calibrate_sequential(model: torch.nn.Module, batches: Sequence[Any], client=None,
                         method: str = "dss", layout: str = "auto", *,
                         forward: Optional[Callable[[torch.nn.Module, Any], Any]] = None,
                         layers: Union[None, str, torch.nn.ModuleList] = None,
                         dtype: torch.dtype = torch.float32, include: Sequence[str] = (),
                         exclude: Sequence[str] = (), default_excludes: bool = True,
                         params: Optional[Mapping[str, Any]] = None,
                         fallback_method: Optional[str] = None,
                         full_hessian_layout: str = "upper", server_binary: Optional[str] = None,
                         check_memory: bool = True, memory_fraction: float = 0.9,
                         keep_quantized: bool = False, restore_weights: bool = False,
                         spill_dir: Optional[str] = None, verbose: bool = True,
                         log: Callable[[str], None] = _log_stderr) -> SequentialCalibration:
    """Sequential calibration of `model` over `batches` (see the module docstring).

    batches: a sequence (read once) of model inputs: a dict is called as model(**batch) (its
    2-D "attention_mask" masks padding tokens out of the Hessians), a tuple as model(*batch),
    anything else as model(batch); or give forward(model, batch).
    client: an nvfp4cal.Client, server addresses ("host:port" or a list), or None to start a
    local nvfp4cal-server on a loopback port for the run (server_binary, $NVFP4CAL_SERVER_BIN,
    or nvfp4cal-server on PATH).
    method / params / fallback_method: what the final `nvfp4cal quantize` will use: params are
    MethodConfig fields (beta_step; gptq: damping, act_order, block_columns, scale_objective,
    scale_search, compare_local_hessian); fallback_method (max or mse) for a module no token reached.
    layout / dtype / include / exclude / default_excludes: as nvfp4cal.capture.
    layers: the decoder layers (a ModuleList or its name), default find_decoder_layers(model).
    keep_quantized: keep each module's QuantizedTensor in result.quantized.
    restore_weights: put the original weights back at the end (else the model keeps the
    dequantized NVFP4 weights). spill_dir: keep the Hessians in .npy files there (memory-mapped)
    instead of host memory until save().
    check_memory / memory_fraction: refuse (CaptureMemoryError) when the cached layer inputs and
    one layer's Hessians would take more than that fraction of the device's free memory."""
    layout, params = _check_arguments(method, layout, params, fallback_method,
                                      full_hessian_layout)
    forward = forward or _default_forward
    say = log if verbose else (lambda s: None)
    options = dict(layout=layout, method=method, dtype=dtype, include=include, exclude=exclude,
                   default_excludes=default_excludes, verbose=False, log=log)
    whole = HessianCapture(model, **options)   # validates the selection; installs nothing
    layers_name, layer_list = _resolve_layers(model, layers)
    _check_uniform_layers(model, len(layer_list))
    prefixes = [f"{layers_name}.{i}." if layers_name else f"{i}." for i in range(len(layer_list))]
    outside = [n for n in whole.modules if not any(n.startswith(p) for p in prefixes)]
    device = next(p for p in layer_list[0].parameters()).device
    started = time.monotonic()
    result = SequentialCalibration(layout=whole.layout, method=method,
                                   accumulation=str(dtype).replace("torch.", ""),
                                   layers_name=layers_name, num_layers=len(layer_list),
                                   params=dict(params))

    # Memory: the cached inputs of a layer plus one layer's Hessians, on the layers' device.
    layer_caps = _layer_captures(layer_list, prefixes, whole.modules, options, memory_fraction,
                                 check_memory)
    hessian_bytes = max((sum(e for e, _ in c.memory_plan().values()) for c in layer_caps if c),
                        default=0)
    limit = _input_memory_limit(batches, layers_name, layer_list, len(whole.modules),
                                hessian_bytes, check_memory, memory_fraction, say)

    own_client = None
    server = None
    work = _LayerWork(result, spill_dir, method, params, fallback_method, full_hessian_layout,
                      keep_quantized, originals={} if restore_weights else None)
    try:
        if client is None:
            server = LocalServer(find_server_binary(server_binary),
                                 device="cpu" if device.type == "cpu" else "auto", log=say)
            client = own_client = server.client()
        elif isinstance(client, (str, list, tuple)):
            from .client import Client  # pylint: disable=import-outside-toplevel
            client = own_client = Client(client)
        with torch.no_grad():
            inputs = _catch_layer_inputs(model, layer_list[0], batches, forward,
                                         limit, str(device))
            hidden_bytes, other_bytes = inputs.tensor_bytes()
            say(f"nvfp4cal sequential: cached the inputs of layer 0 for {len(inputs.hidden)} "
                f"batches: hidden states {format_bytes(hidden_bytes)}, other layer arguments "
                f"{format_bytes(other_bytes)}")
            _calibrate_layers(layer_list, layer_caps, prefixes, inputs, client, work, say)
            del inputs
            if outside:
                _capture_outside(model, batches, forward, outside, options, result, spill_dir,
                                 say)
    finally:
        if work.originals:  # restore_weights: also when the run failed part way
            _restore_originals(model, work.originals)
        if own_client is not None:
            own_client.close()
        if server is not None:
            server.stop()
    result.seconds = time.monotonic() - started
    return result
