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

import inspect
import json
import os
import queue
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import __version__
from .capture import (CaptureMemoryError, HessianCapture, _fused_key, available_memory_bytes,
                      format_bytes, layout_for_method)
from .hessians_file import HESSIAN_SUFFIX, write_hessians

# Methods whose quantization reads the Hessian (the others take it for statistics only).
_NEEDS_HESSIAN = ("local_hessian", "dss", "gptq")
_GPTQ_PARAMS = ("damping", "act_order", "block_columns", "scale_objective", "scale_search")
_ALL_PARAMS = ("beta_step", "beta_half_range", "scale_neighbours", "symmetry_tolerance") + \
    _GPTQ_PARAMS


class SequentialError(RuntimeError):
    """Sequential calibration cannot run or failed; the message says why."""


class _StopForward(Exception):
    """Raised by the layer-0 catcher to end a forward once the layer's inputs are recorded."""


def _log_stderr(message: str) -> None:
    print(message, file=sys.stderr)


# --- decoder layers ----------------------------------------------------------------------------


def _has_linear(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Linear) for m in module.modules())


def find_decoder_layers(model: torch.nn.Module) -> Tuple[str, torch.nn.ModuleList]:
    """(name, ModuleList) of the model's decoder layers: among the nn.ModuleLists whose
    children are all of one class and hold Linear modules, and which are not inside another
    such list (MoE expert lists are inside their layer), the one with the most Linear modules
    (`model.layers` for Hugging Face Llama, Qwen, Mistral, ...). SequentialError if none."""
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or not all(_has_linear(child) for child in module):
            continue
        candidates.append((name, module))
    outer = [(n, m) for n, m in candidates
             if not any(n.startswith(other + ".") for other, _ in candidates if other != n)]
    if not outer:
        raise SequentialError(
            f"the model ({type(model).__name__}) has no decoder layers: sequential calibration "
            "needs an nn.ModuleList of blocks of one class holding Linear modules (such as "
            "model.layers); pass layers= to name it")
    def linear_count(item):
        return sum(isinstance(m, torch.nn.Linear) for m in item[1].modules())
    return max(outer, key=linear_count)


def _resolve_layers(model, layers) -> Tuple[str, torch.nn.ModuleList]:
    if layers is None:
        return find_decoder_layers(model)
    if isinstance(layers, str):
        try:
            module = model.get_submodule(layers)
        except AttributeError as error:
            raise SequentialError(f"layers={layers!r}: {error}") from None
        if not isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)):
            raise SequentialError(f"layers={layers!r} is a {type(module).__name__}, not an "
                                  "nn.ModuleList")
        return layers, module
    for name, module in model.named_modules():
        if module is layers:
            return name, module
    raise SequentialError("layers= is not a submodule of the model")


def _check_uniform_layers(model, count: int) -> None:
    """Layer 0's caught arguments are replayed to every layer: refuse models whose layers get
    different ones (per-layer attention types: sliding-window layers, Gemma 2/3, gpt-oss)."""
    config = getattr(model, "config", None)
    for scope in (config, getattr(config, "text_config", None)):
        types = getattr(scope, "layer_types", None) if scope is not None else None
        if isinstance(types, (list, tuple)) and len(set(types[:count])) > 1:
            raise SequentialError(
                "sequential calibration replays the arguments decoder layer 0 receives to every "
                f"layer, but this model's layers differ (config.layer_types: "
                f"{sorted(set(types))}); calibrate it without --sequential")


# --- inputs of layer 0 -------------------------------------------------------------------------


def _default_forward(model: torch.nn.Module, batch) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _batch_mask(batch) -> Optional[torch.Tensor]:
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask
    return None


def _batch_tokens(batch) -> Optional[int]:
    """Token positions of a batch (for the memory estimate), when they can be told."""
    if isinstance(batch, torch.Tensor) and batch.dim() == 2:
        return batch.numel()
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
        return batch["input_ids"].numel()
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0].numel() if batch[0].dim() == 2 else None
    return None


def _pre_hook_takes_kwargs() -> bool:
    try:
        signature = inspect.signature(torch.nn.Module.register_forward_pre_hook)
        return "with_kwargs" in signature.parameters
    except (TypeError, ValueError):
        return False


@dataclass
class _LayerInputs:
    """What layer 0 received, per batch: the hidden states (replaced by each layer's outputs as
    the run goes on) and the other arguments, replayed to every layer."""
    hidden: List[torch.Tensor] = field(default_factory=list)
    args: List[tuple] = field(default_factory=list)       # positional arguments after hidden
    kwargs: List[dict] = field(default_factory=list)
    masks: List[Optional[torch.Tensor]] = field(default_factory=list)
    hidden_keyword: bool = False                           # hidden_states passed by keyword

    def call(self, layer: torch.nn.Module, k: int) -> torch.Tensor:
        if self.hidden_keyword:
            out = layer(*self.args[k], hidden_states=self.hidden[k], **self.kwargs[k])
        else:
            out = layer(self.hidden[k], *self.args[k], **self.kwargs[k])
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise SequentialError(f"a decoder layer returned {type(out).__name__}, not the hidden "
                                  "states (a tensor, or a tuple starting with them)")
        return out

    def tensor_bytes(self) -> Tuple[int, int]:
        """(bytes of the hidden states, bytes of the other tensor arguments, shared ones once)."""
        hidden = sum(h.numel() * h.element_size() for h in self.hidden)
        seen, other = set(), 0

        def visit(value):
            nonlocal other
            if isinstance(value, torch.Tensor):
                key = (value.data_ptr(), value.numel(), value.dtype)
                if key not in seen:
                    seen.add(key)
                    other += value.numel() * value.element_size()
            elif isinstance(value, (tuple, list)):
                for v in value:
                    visit(v)
            elif isinstance(value, Mapping):
                for v in value.values():
                    visit(v)
        for a, kw in zip(self.args, self.kwargs):
            visit(a)
            visit(kw)
        return hidden, other


def _catch_layer_inputs(model, layer, batches, forward, limit_bytes: Optional[int],
                        device_text: str) -> _LayerInputs:
    """Runs each batch through the model until `layer` is called; records its arguments."""
    inputs = _LayerInputs()
    record: Dict[str, Any] = {}

    def catch(args, kwargs):
        record["args"], record["kwargs"] = tuple(args), dict(kwargs)
        raise _StopForward

    if _pre_hook_takes_kwargs():
        handle = layer.register_forward_pre_hook(lambda _m, a, k: catch(a, k), with_kwargs=True)
        restore = handle.remove
    else:  # torch 1.x: pre-hooks see no keyword arguments; intercept forward itself
        own = layer.__dict__.get("forward")
        layer.forward = lambda *a, **k: catch(a, k)

        def restore():
            if own is None:
                del layer.forward
            else:
                layer.forward = own
    try:
        for number, batch in enumerate(batches):
            record.clear()
            try:
                forward(model, batch)
            except _StopForward:
                pass
            if "args" not in record:
                raise SequentialError(f"batch {number}: the forward never called decoder layer 0")
            args, kwargs = record["args"], record["kwargs"]
            if args and isinstance(args[0], torch.Tensor):
                hidden, args, keyword = args[0], args[1:], False
            elif isinstance(kwargs.get("hidden_states"), torch.Tensor):
                hidden, keyword = kwargs.pop("hidden_states"), True
            else:
                raise SequentialError("decoder layer 0 was called without a hidden-states tensor "
                                      "(first positional argument or hidden_states=)")
            for key in ("past_key_value", "past_key_values"):
                if kwargs.get(key) is not None:  # no KV cache: each layer runs on its own
                    kwargs[key] = None
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            if number > 0 and keyword != inputs.hidden_keyword:
                raise SequentialError("decoder layer 0 got its hidden states by position in one "
                                      "batch and by keyword in another")
            inputs.hidden_keyword = keyword
            inputs.hidden.append(hidden.detach())
            inputs.args.append(args)
            inputs.kwargs.append(kwargs)
            inputs.masks.append(_batch_mask(batch))
            if limit_bytes is not None:
                used = sum(inputs.tensor_bytes())
                if used > limit_bytes:
                    raise CaptureMemoryError(
                        f"the cached inputs of the decoder layers reached {format_bytes(used)} "
                        f"on {device_text} after {number + 1} batch(es), over the "
                        f"{format_bytes(limit_bytes)} allowed: use fewer or shorter samples")
    finally:
        restore()
    if not inputs.hidden:
        raise SequentialError("no calibration batch")
    return inputs


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
    scale_search); fallback_method (max or mse) for a module no token reached.
    layout / dtype / include / exclude / default_excludes: as nvfp4cal.capture.
    layers: the decoder layers (a ModuleList or its name), default find_decoder_layers(model).
    keep_quantized: keep each module's QuantizedTensor in result.quantized.
    restore_weights: put the original weights back at the end (else the model keeps the
    dequantized NVFP4 weights). spill_dir: keep the Hessians in .npy files there (memory-mapped)
    instead of host memory until save().
    check_memory / memory_fraction: refuse (CaptureMemoryError) when the cached layer inputs and
    one layer's Hessians would take more than that fraction of the device's free memory."""
    layout = layout_for_method(method) if layout == "auto" else layout
    params = _check_params(method, dict(params or {}))
    if fallback_method not in (None, "max", "mse"):
        raise ValueError(f"fallback_method {fallback_method!r}: expected max or mse")
    if full_hessian_layout not in ("upper", "full"):
        raise ValueError(f"full_hessian_layout {full_hessian_layout!r}: expected upper or full")
    forward = forward or _default_forward
    say = log if verbose else (lambda s: None)
    options = dict(layout=layout, method=method, dtype=dtype, include=include, exclude=exclude,
                   default_excludes=default_excludes, verbose=False, log=log)
    whole = HessianCapture(model, **options)   # validates the selection; installs nothing
    layers_name, layer_list = _resolve_layers(model, layers)
    _check_uniform_layers(model, len(layer_list))
    prefixes = [f"{layers_name}.{i}." if layers_name else f"{i}." for i in range(len(layer_list))]
    outside = [n for n in whole.modules if not any(n.startswith(p) for p in prefixes)]
    first = next(p for p in layer_list[0].parameters())
    device = first.device
    started = time.monotonic()
    result = SequentialCalibration(layout=whole.layout, method=method,
                                   accumulation=str(dtype).replace("torch.", ""),
                                   layers_name=layers_name, num_layers=len(layer_list),
                                   params=dict(params))

    # Memory: the cached inputs of a layer plus one layer's Hessians, on the layers' device.
    layer_caps = []
    for i, layer in enumerate(layer_list):
        if any(n.startswith(prefixes[i]) for n in whole.modules):
            layer_caps.append(HessianCapture(layer, prefix=prefixes[i],
                                             memory_fraction=memory_fraction,
                                             check_memory=check_memory, **options))
        else:
            layer_caps.append(None)
    hessian_bytes = max((sum(e for e, _ in c.memory_plan().values()) for c in layer_caps if c),
                        default=0)
    tokens = [_batch_tokens(b) for b in batches]
    width = next((m.in_features for m in layer_list[0].modules()
                  if isinstance(m, torch.nn.Linear)), 0)
    free = available_memory_bytes(device) if device.type in ("cuda", "cpu") else None
    limit = int(free * memory_fraction) - hessian_bytes if (check_memory and free) else None
    if None not in tokens:
        estimate = sum(tokens) * width * first.element_size()
        say(f"nvfp4cal sequential: {len(layer_list)} decoder layers ({layers_name}), "
            f"{len(whole.modules)} Linear modules; the layer inputs of {sum(tokens)} token "
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
            f"{len(whole.modules)} Linear modules; one layer's Hessians need "
            f"{format_bytes(hessian_bytes)} on {device}"
            + (f"; {format_bytes(free)} available" if free is not None else ""))

    own_client = None
    server = None
    originals: Optional[Dict[str, torch.Tensor]] = {} if restore_weights else None
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
            for i, layer in enumerate(layer_list):
                layer_start = time.monotonic()
                cap = layer_caps[i]
                quantized = 0
                if cap is not None:
                    with cap:
                        for k in range(len(inputs.hidden)):
                            cap.set_mask(inputs.masks[k])
                            inputs.call(layer, k)
                    hessians = _collect(cap, result, spill_dir)
                    with client.session() as session:
                        _quantize_layer(session, cap.modules, hessians, method, params,
                                        fallback_method, full_hessian_layout, result,
                                        keep_quantized, originals)
                    quantized = len(cap.modules)
                    layer_caps[i] = None  # free its accumulators
                    del cap
                if i + 1 < len(layer_list):
                    for k in range(len(inputs.hidden)):
                        inputs.hidden[k] = inputs.call(layer, k).detach()
                say(f"nvfp4cal sequential: {prefixes[i][:-1]} ({i + 1}/{len(layer_list)}): "
                    f"{quantized} modules captured and quantized ({method}) in "
                    f"{time.monotonic() - layer_start:.2f} s")
            del inputs
            if outside:
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
    finally:
        if originals:  # restore_weights: also when the run failed part way
            with torch.no_grad():
                modules = dict(model.named_modules())
                for name, weight in originals.items():
                    modules[name].weight.copy_(weight.to(modules[name].weight.device))
        if own_client is not None:
            own_client.close()
        if server is not None:
            server.stop()
    result.seconds = time.monotonic() - started
    return result


# --- a local nvfp4cal-server -------------------------------------------------------------------


def find_server_binary(explicit: Optional[str] = None, nvfp4cal: Optional[str] = None) -> str:
    """The nvfp4cal-server binary: `explicit`, $NVFP4CAL_SERVER_BIN, beside the nvfp4cal binary
    (`nvfp4cal`, $NVFP4CAL_BIN or on PATH; also ../server/ of a CMake build's client/), or on
    PATH. SequentialError when none is found."""
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise SequentialError(f"--nvfp4cal-server {explicit}: not an executable file")
        return explicit
    candidates = [os.environ.get("NVFP4CAL_SERVER_BIN")]
    for cli in (nvfp4cal, os.environ.get("NVFP4CAL_BIN"), shutil.which("nvfp4cal")):
        if cli:
            folder = os.path.dirname(os.path.abspath(cli))
            candidates += [os.path.join(folder, "nvfp4cal-server"),
                           os.path.join(folder, "..", "server", "nvfp4cal-server")]
    candidates.append(shutil.which("nvfp4cal-server"))
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.normpath(candidate)
    raise SequentialError("--sequential quantizes each layer on an nvfp4cal server: give "
                          "--server HOST:PORT, or --nvfp4cal-server PATH (started on a loopback "
                          "port for the run), or put nvfp4cal-server on PATH or beside nvfp4cal")


class LocalServer:
    """nvfp4cal-server on a free 127.0.0.1 port for one run, with a random bearer token (a
    0600 file in a private temporary folder) so that no other local user's calls are served.
    `client()` gives an nvfp4cal.Client to it; `stop()` (SIGTERM, then kill) ends it."""

    def __init__(self, binary: str, device: str = "auto", flags: Sequence[str] = (),
                 startup_timeout: float = 120.0,
                 log: Callable[[str], None] = lambda s: None) -> None:
        self.binary = binary
        self._dir = tempfile.mkdtemp(prefix="nvfp4cal-server-")
        self.token = secrets.token_hex(24)
        token_file = os.path.join(self._dir, "token")
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token + "\n")
        self._log_path = os.path.join(self._dir, "server.log")
        self._stderr = open(self._log_path, "wb")
        command = [binary, "--address=127.0.0.1:0", "--metrics_address=", f"--device={device}",
                   f"--auth_token_file={token_file}"] + list(flags)
        try:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._stderr,
                                            stdin=subprocess.DEVNULL)
        except OSError as error:
            self._cleanup()
            raise SequentialError(f"cannot start {binary}: {error}") from None
        lines: "queue.Queue[Optional[bytes]]" = queue.Queue()

        def drain():  # reads stdout to its end so that the server never blocks on it
            for line in self.process.stdout:
                lines.put(line)
            lines.put(None)
        threading.Thread(target=drain, daemon=True).start()
        self.address = None
        deadline = time.monotonic() + startup_timeout
        while self.address is None:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                raise SequentialError(f"{binary} did not start (no 'listening on' line within "
                                      f"{startup_timeout:.0f} s): {self._tail()}")
            text = line.decode("utf-8", "replace")
            if text.startswith("listening on "):
                self.address = text[len("listening on "):].strip()
        log(f"nvfp4cal sequential: started {binary} on {self.address} (device {device})")

    def _tail(self) -> str:
        try:
            with open(self._log_path, "rb") as f:
                text = f.read()[-2000:].decode("utf-8", "replace").strip()
        except OSError:
            text = ""
        code = self.process.poll()
        return (f"exit code {code}; " if code is not None else "") + (text or "no output")

    def client(self, **options):
        from .client import Client  # pylint: disable=import-outside-toplevel
        return Client([self.address], token=self.token, **options)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        try:
            self._stderr.close()
        except (AttributeError, OSError):
            pass
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "LocalServer":
        return self

    def __exit__(self, *_) -> None:
        self.stop()
