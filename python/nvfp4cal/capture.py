"""Hessian capture: forward hooks on every `torch.nn.Linear` of a model.

For each Linear input x (tokens t), the capture accumulates H = sum_t x_t x_t^T (NUMERICS §6),
the token count and max |x| (the input amax of W4A4 checkpoints); for k_proj / v_proj also the
output amax (FP8 KV-cache scales). Modules that read the very same input tensor in a forward
(q/k/v, gate/up, w1/w3) are detected from the tensors, not from names, and share one
accumulator, stored once with `__metadata__` aliases (docs/cli.md, sharing rule).

    import nvfp4cal
    with nvfp4cal.capture(model, layout="full") as cap:   # or "block", or "auto" + method
        for ids, mask in batches:
            cap.set_mask(mask)                            # padding tokens are left out
            model(input_ids=ids, attention_mask=mask)
    cap.save("hessians.safetensors")                      # what `nvfp4cal quantize` reads

Layouts: "full" keeps [in, in] per input (method gptq needs it), "block" the diagonal 16x16
blocks [in/16, 16, 16] (every other method); "auto" picks by `method`.
"""

from __future__ import annotations

import fnmatch
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from . import __version__
from .hessians_file import HESSIAN_SUFFIX, write_hessians

# The CLI's default excludes (client/checkpoint.cc): modules `quantize` leaves unquantized.
DEFAULT_EXCLUDES: Tuple[str, ...] = (
    "*lm_head*", "*router*", "*mlp.gate.*", "*output_layer*", "*embed*",
    "*.wte.*", "*.wpe.*", "*vision_tower*", "*vision_model*", "*visual.*")
# Fused families of the CLI; used only to *estimate* memory before the first forward (the
# sharing itself is detected from the tensors).
FUSED_FAMILIES: Tuple[Tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))
# Modules whose output amax is recorded (`<module>.output_amax`, `quantize --kv-cache fp8`).
KV_CACHE_LEAVES: Tuple[str, ...] = ("k_proj", "v_proj")
METHODS: Tuple[str, ...] = ("max", "mse", "local_hessian", "dss", "gptq")
LAYOUTS: Tuple[str, ...] = ("auto", "block", "full")
# Recently seen inputs kept alive within a forward, so that an address cannot be reused by
# another tensor while a later module could still be matched against it.
_WINDOW = 16


class CaptureMemoryError(MemoryError):
    """The Hessians would not fit in the memory of their device."""


def layout_for_method(method: Optional[str]) -> str:
    """The Hessian layout a method consumes: "full" for gptq (error propagation across
    blocks), "block" otherwise."""
    if method is not None and method not in METHODS:
        raise ValueError(f"method {method!r} is unknown; expected one of {', '.join(METHODS)}")
    return "full" if method == "gptq" else "block"


@dataclass
class _Accumulator:
    """sum x x^T of one input, shared by the modules (members) that read it."""
    members: List[str]
    in_features: int
    total: Optional[torch.Tensor] = None   # [in, in] or [in/16, 16, 16], allocated lazily
    amax: Optional[torch.Tensor] = None    # 0-d fp32 on the device
    tokens: int = 0
    contributions: int = 0                 # input tensors added
    consumers: Set[str] = field(default_factory=set)  # members that read the latest one

    @property
    def leader(self) -> str:
        return self.members[0]


@dataclass
class _Seen:
    """An input accumulated during the current forward (held alive: see _WINDOW)."""
    tensor: torch.Tensor
    version: int
    accumulator: _Accumulator
    contribution: int


def _matches(pattern_list: Iterable[str], name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name + ".weight", p)
               for p in pattern_list)


def _fused_key(name: str) -> str:
    parent, _, leaf = name.rpartition(".")
    for family in FUSED_FAMILIES:
        if leaf in family:
            return parent + "|" + family[0]
    return name


def available_memory_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device, or the host's available memory for the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


class HessianCapture:
    """Hooks on the Linear modules of `model`; see the module docstring and `capture()`."""

    def __init__(self, model: torch.nn.Module, layout: str = "auto", method: Optional[str] = None,
                 *, dtype: torch.dtype = torch.float32, include: Sequence[str] = (),
                 exclude: Sequence[str] = (), default_excludes: bool = True,
                 share_inputs: bool = True, check_memory: bool = True,
                 memory_fraction: float = 0.9, verbose: bool = True, prefix: str = "",
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout {layout!r} is unknown; expected one of {', '.join(LAYOUTS)}")
        self.layout = layout_for_method(method) if layout == "auto" else layout
        if method is not None:
            layout_for_method(method)  # validates the name
            if method == "gptq" and self.layout != "full":
                raise ValueError("method gptq needs layout 'full' (it propagates errors across "
                                 "16-column blocks); got layout 'block'")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype {dtype} is not supported: use torch.float32 or float64")
        self.model = model
        self.method = method
        self.dtype = dtype
        self.share_inputs = share_inputs
        self._log = log if verbose else (lambda s: None)
        self.prefix = prefix
        self.modules = self._select_modules(model, include, exclude, default_excludes)
        self._check_memory = check_memory
        self._memory_fraction = memory_fraction
        self._accumulators: List[_Accumulator] = []
        self._of_module: Dict[str, _Accumulator] = {}
        self._output_amax: Dict[str, torch.Tensor] = {}
        self._window: List[_Seen] = []
        self._mask: Optional[torch.Tensor] = None
        self._mask_by_device: Dict[torch.device, torch.Tensor] = {}
        self._unmasked_warned: Set[str] = set()
        self._handles: list = []

    # --- selection and memory --------------------------------------------------------------

    def _select_modules(self, model, include, exclude, default_excludes) -> Dict[str, torch.nn.Linear]:
        linears = [(self.prefix + n, m) for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear)]
        if not linears:
            raise ValueError(f"the model ({type(model).__name__}) has no torch.nn.Linear layers: "
                             "nothing to capture")
        excludes = list(exclude) + (list(DEFAULT_EXCLUDES) if default_excludes else [])
        chosen, skipped = {}, []
        for name, module in linears:
            if (include and not _matches(include, name)) or _matches(excludes, name):
                continue
            if module.in_features % 16 != 0:
                skipped.append(f"{name} (in = {module.in_features})")
                continue
            chosen[name] = module
        if skipped:
            self._log(f"note: not captured, in is not a multiple of 16: {', '.join(skipped)}")
        if not chosen:
            raise ValueError(f"none of the model's {len(linears)} Linear layers is selected "
                             f"(include {list(include)}, exclude {excludes}, in % 16 == 0)")
        return chosen

    def entry_bytes(self, in_features: int) -> int:
        """Bytes of one accumulator of an input with `in_features` features."""
        elements = in_features * in_features if self.layout == "full" else in_features * 16
        return elements * torch.tensor([], dtype=self.dtype).element_size()

    def memory_plan(self) -> Dict[torch.device, Tuple[int, int]]:
        """Per device: (bytes expected with q/k/v, gate/up, w1/w3 sharing their input as their
        names suggest, bytes if no input is shared)."""
        plan: Dict[torch.device, List[int]] = {}
        seen_keys: Set[str] = set()
        for name, module in self.modules.items():
            device = module.weight.device
            expected, worst = plan.setdefault(device, [0, 0])
            size = self.entry_bytes(module.in_features)
            key = _fused_key(name)
            plan[device] = [expected + (0 if key in seen_keys else size), worst + size]
            seen_keys.add(key)
        return {d: (e, w) for d, (e, w) in plan.items()}

    def _report_and_check_memory(self) -> None:
        for device, (expected, worst) in self.memory_plan().items():
            free = available_memory_bytes(device) if device.type in ("cuda", "cpu") else None
            free_text = f", {format_bytes(free)} available" if free is not None else ""
            self._log(f"nvfp4cal capture: {len(self.modules)} Linear modules, {self.layout} "
                      f"layout, {str(self.dtype).replace('torch.', '')}: Hessians need "
                      f"{format_bytes(expected)} on {device} ({format_bytes(worst)} if no input "
                      f"is shared){free_text}")
            if self._check_memory and free is not None and expected > free * self._memory_fraction:
                hint = ("use layout 'block' unless the method is gptq, "
                        if self.layout == "full" else "")
                raise CaptureMemoryError(
                    f"the Hessians need {format_bytes(expected)} on {device} but only "
                    f"{format_bytes(free)} is available (limit {self._memory_fraction:.0%} of it): "
                    f"{hint}capture fewer modules (include/exclude), use float32 accumulation, "
                    f"or place the model on a device with more memory")

    # --- hooks -----------------------------------------------------------------------------

    def __enter__(self) -> "HessianCapture":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop(check=exc_type is None)

    def start(self) -> None:
        """Checks memory and installs the hooks (what `with` does)."""
        if self._handles:
            raise RuntimeError("the capture is already running")
        self._report_and_check_memory()
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(name)))
            if name.rpartition(".")[2] in KV_CACHE_LEAVES:
                self._handles.append(module.register_forward_hook(self._output_hook(name)))
        self._handles.append(self.model.register_forward_hook(lambda *_: self._window.clear()))

    def stop(self, check: bool = True) -> None:
        """Removes the hooks; with `check`, verifies that every shared input was read by every
        module sharing it in the last forward."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._window.clear()
        if check:
            for acc in self._accumulators:
                self._check_consumed(acc)

    def set_mask(self, mask: Optional[torch.Tensor]) -> None:
        """Token mask [batch, seq] (1/True = a real token, 0 = padding) for the next forwards,
        e.g. the batch's attention_mask; None counts every token. Applied to each Linear input
        whose leading shape is [batch, seq] (or [batch * seq] flattened); other inputs (MoE
        experts' routed tokens) cannot be masked and a warning names the module once."""
        self._mask = None if mask is None else mask.detach().to(torch.bool)
        self._mask_by_device = {}

    def _pre_hook(self, name: str):
        def hook(module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return None
            x = args[0]
            if x.shape[-1] == module.in_features and x.numel() > 0:
                with torch.no_grad():
                    self._observe(name, x)
            return None
        return hook

    def _output_hook(self, name: str):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor) and output.numel() > 0:
                with torch.no_grad():
                    rows = self._masked_rows(name, output)
                    if rows.shape[0] > 0:
                        amax = rows.abs().max().to(torch.float32)
                        prev = self._output_amax.get(name)
                        self._output_amax[name] = amax if prev is None else torch.maximum(prev, amax)
            return None
        return hook

    # --- accumulation ----------------------------------------------------------------------

    def _find_seen(self, x: torch.Tensor) -> Optional[_Seen]:
        for seen in reversed(self._window):
            t = seen.tensor
            if (t.data_ptr() == x.data_ptr() and t.shape == x.shape and t.stride() == x.stride()
                    and t.dtype == x.dtype and t.device == x.device and x._version == seen.version):
                return seen
        return None

    def _observe(self, name: str, x: torch.Tensor) -> None:
        acc = self._of_module.get(name)
        seen = self._find_seen(x) if self.share_inputs else None
        if seen is not None:
            group = seen.accumulator
            if (acc is group and seen.contribution == group.contributions
                    and name not in group.consumers):
                group.consumers.add(name)  # the shared input is accumulated already
                return
            if acc is None and group.contributions == 1 and seen.contribution == 1:
                group.members.append(name)  # joins: it has seen exactly what the group has
                group.consumers.add(name)
                self._of_module[name] = group
                return
        if acc is None:
            acc = _Accumulator(members=[name], in_features=self.modules[name].in_features)
            self._accumulators.append(acc)
            self._of_module[name] = acc
        self._check_consumed(acc, reader=name)
        self._accumulate(acc, name, x)
        self._window.append(_Seen(x, x._version, acc, acc.contributions))
        del self._window[:-_WINDOW]

    def _check_consumed(self, acc: _Accumulator, reader: Optional[str] = None) -> None:
        if len(acc.members) > 1 and acc.consumers != set(acc.members):
            missing = [m for m in acc.members if m not in acc.consumers]
            raise RuntimeError(
                f"modules {acc.members} read the same input in the first forward, but "
                f"{', '.join(missing)} did not read the input {', '.join(sorted(acc.consumers))} "
                f"read later" + (f" ({reader} read a new one)" if reader else "") +
                ": their Hessians differ; capture with share_inputs=False")

    def _masked_rows(self, name: str, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self._mask is None:
            return rows
        mask = self._mask
        if tuple(x.shape[:-1]) == tuple(mask.shape) or (x.dim() == 2 and x.shape[0] == mask.numel()):
            keep = self._mask_by_device.get(x.device)
            if keep is None:
                keep = mask.reshape(-1).to(x.device)
                self._mask_by_device[x.device] = keep
            return rows[keep]
        if name not in self._unmasked_warned:
            self._unmasked_warned.add(name)
            self._log(f"warning: {name}: input shape {list(x.shape)} does not match the mask "
                      f"{list(mask.shape)}: its padding tokens are counted")
        return rows

    def _accumulate(self, acc: _Accumulator, name: str, x: torch.Tensor) -> None:
        rows = self._masked_rows(name, x)
        acc.contributions += 1
        acc.consumers = {name}
        tokens = rows.shape[0]
        if tokens == 0:
            return
        n = acc.in_features
        if acc.total is None:
            shape = (n, n) if self.layout == "full" else (n // 16, 16, 16)
            acc.total = torch.zeros(shape, dtype=self.dtype, device=x.device)
            acc.amax = torch.zeros((), dtype=torch.float32, device=x.device)
        r = rows.to(self.dtype)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # full fp32 products, never TF32
        try:
            if self.layout == "full":
                acc.total.addmm_(r.t(), r)
            else:
                blocks = r.reshape(tokens, n // 16, 16).transpose(0, 1)  # [J, T, 16]
                acc.total.baddbmm_(blocks.transpose(1, 2), blocks)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        acc.amax = torch.maximum(acc.amax, rows.abs().max().to(torch.float32))
        acc.tokens += tokens

    # --- results ---------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        """The largest token count of any input (the calibration tokens of a dense model)."""
        return max((a.tokens for a in self._accumulators), default=0)

    def groups(self) -> Dict[str, List[str]]:
        """Entry module -> modules sharing its input (itself first)."""
        return {a.leader: list(a.members) for a in self._accumulators}

    def modules_without_tokens(self) -> List[str]:
        """Selected modules that saw no (unmasked) token: no Hessian is written for them."""
        with_data = {m for a in self._accumulators if a.tokens > 0 for m in a.members}
        return [m for m in self.modules if m not in with_data]

    def hessian(self, module: str, normalize: bool = True) -> torch.Tensor:
        """The fp32 Hessian of `module`'s input in the capture's layout, exactly symmetric,
        divided by its token count when `normalize` (on the accumulator's device)."""
        acc = self._of_module.get(module)
        if acc is None or acc.total is None:
            raise KeyError(f"no tokens reached module {module!r}")
        h = acc.total
        h = (h + h.transpose(-1, -2)) * 0.5  # exact symmetry: (a + b) * 0.5 == (b + a) * 0.5
        if normalize:
            h = h * (1.0 / acc.tokens)
        return h.to(torch.float32)

    def input_amax(self, module: str) -> float:
        acc = self._of_module[module]
        return float(acc.amax.item()) if acc.amax is not None else 0.0

    def output_amax(self) -> Dict[str, float]:
        return {m: float(v.item()) for m, v in self._output_amax.items()}

    def save(self, path: str, normalize: bool = True,
             metadata: Optional[Dict[str, str]] = None) -> None:
        """Writes the Hessians file `nvfp4cal quantize --hessians` reads (atomically): one
        entry per shared input named after its first module, aliases for the others,
        `<entry>.input_amax`, `<k|v_proj>.output_amax`, and metadata (`tokens.<entry>`,
        `nvfp4cal.layout`, `nvfp4cal.tokens`, `nvfp4cal.normalization`, `nvfp4cal.producer`).
        `normalize` divides each H by its token count. ValueError when no token was seen."""
        if self._handles:
            raise RuntimeError("save() while the capture runs: leave the `with` block first")
        accs = [a for a in self._accumulators if a.tokens > 0]
        if not accs:
            raise ValueError("no calibration token reached any captured module: nothing to save")
        missing = self.modules_without_tokens()
        if missing:
            self._log(f"warning: no Hessian for {len(missing)} module(s) that saw no token: "
                      f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        hessians, amax, tokens, aliases = {}, {}, {}, {}
        for acc in accs:
            entry = acc.leader + HESSIAN_SUFFIX
            hessians[entry] = self.hessian(acc.leader, normalize).cpu().numpy()
            amax[entry] = self.input_amax(acc.leader)
            tokens[entry] = acc.tokens
            for member in acc.members[1:]:
                aliases[member + HESSIAN_SUFFIX] = entry
        meta = {
            "nvfp4cal.layout": self.layout,
            "nvfp4cal.tokens": str(self.num_tokens),
            "nvfp4cal.normalization": "divided_by_tokens" if normalize else "sum",
            "nvfp4cal.accumulation": str(self.dtype).replace("torch.", ""),
            "nvfp4cal.producer": json.dumps({"name": "nvfp4cal", "version": __version__,
                                             "tool": "nvfp4cal.capture (python)"}),
        }
        meta.update(metadata or {})
        write_hessians(path, hessians, input_amax=amax, output_amax=self.output_amax(),
                       aliases=aliases, tokens=tokens, metadata=meta)


def capture(model: torch.nn.Module, layout: str = "auto", method: Optional[str] = None,
            **options) -> HessianCapture:
    """A HessianCapture of every torch.nn.Linear of `model` (use it with `with`).

    layout: "full" [in, in], "block" [in/16, 16, 16], or "auto" (by `method`: gptq -> full,
    else block). Options: dtype (torch.float32 or torch.float64 accumulation), include /
    exclude (fnmatch globs on module names, as `quantize --include/--exclude`),
    default_excludes (lm_head, embeddings, routers: on), share_inputs (detect q/k/v-style
    shared inputs: on), check_memory / memory_fraction (refuse Hessians that would not fit in
    that fraction of the free memory), verbose (the memory line on stderr), prefix (prepended
    to the module names: capture one block of a model under its full names, e.g.
    `capture(model.model.layers[3], prefix="model.layers.3.")`)."""
    return HessianCapture(model, layout, method, **options)
