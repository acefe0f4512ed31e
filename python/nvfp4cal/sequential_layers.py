"""The decoder layers of sequential calibration (sequential.py): finding them in a model, and
catching the inputs of layer 0 (hidden states and the other arguments the model passes it),
which the run then replays layer by layer. sequential.py re-exports every name.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from .capture import CaptureMemoryError, format_bytes


class SequentialError(RuntimeError):
    """Sequential calibration cannot run or failed; the message says why."""


class _StopForward(Exception):
    """Raised by the layer-0 catcher to end a forward once the layer's inputs are recorded."""


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
