"""Fine-tuning of the FP8 block scales of an NVFP4 checkpoint by distillation (issue 21).

    import nvfp4cal
    result = nvfp4cal.finetune_scales(model, "model-nvfp4", train_windows, val_windows,
                                      out="model-nvfp4-ft", steps=1000, lr=1e-3, seed=0)
    result.stats["scales_moved"], result.stats["best_step"]

The codes (`<m>.weight`, packed E2M1) and the per-tensor scale (`<m>.weight_scale_2`) of every
NVFP4 module of a checkpoint written by `nvfp4cal quantize` (ModelOpt layout) stay fixed; each
block scale (`<m>.weight_scale`, E4M3) becomes a trainable parameter `log s`. In the forward pass
the weight is `W = e2m1(code) * snap(exp(log s)) * weight_scale_2` (snap: round to the nearest
positive finite E4M3 value, ties to even, clamped to [2^-9, 448], as the project's
`EncodeE4M3Scale`), computed in fp32 as the checkpoint reader does and cast to the model's dtype;
the gradient goes straight through the snap. The loss is KL(teacher || student) of the next-token
distributions, averaged over the tokens of a batch: the teacher is the model itself with its own
(bf16) weights, the student the same model with the dequantized NVFP4 weights. Adam, a bounded
number of steps, the validation loss (same KL on held-out windows) evaluated every `eval_every`
steps; the scales of the best evaluation (step 0, the input, included) are written, by copying
the checkpoint folder and replacing only the `weight_scale` bytes (same header, layout, labels;
into a temporary folder beside `out`, then renamed; nothing is written on error).

Deterministic with `seed` (data order and split); on the CPU bit for bit, on a GPU as far as the
model's kernels are. Resumable: every evaluation saves the whole training state (scales, Adam
state, step, best scales so far) to `<out>.finetune-resume.safetensors`; `resume=True` continues from it
exactly as the uninterrupted run would have.

Memory: the model (teacher weights), one dequantized copy of the quantized weights in the model's
dtype held for the backward pass, the activations of one forward/backward, 12 bytes per block
scale (parameter and Adam's two moments) and 1 byte per weight for the codes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import __version__
# The checkpoint files and the command line live in finetune_checkpoint.py and
# finetune_command.py; every name stays importable from here.
from .finetune_checkpoint import (  # noqa: F401
    _E2M1_TWICE, _RESUME_VERSION, E4M3_MAX, E4M3_MIN, E4M3_VALUES, RESUME_SUFFIX, SCALE_SUFFIX,
    STATS_SUFFIX, FinetuneError, NVFP4Module, _inside, _is_nvfp4cal_output, _read_header, _real,
    _unpacked_codes, _write_json, check_out, checkpoint_shards, e4m3_bytes, e4m3_decode,
    e4m3_positive_values, load_resume_file, read_nvfp4_modules, save_resume_file, snap_e4m3,
    write_checkpoint)
from .finetune_command import add_arguments, run_command  # noqa: F401


# --- the student's weights ---------------------------------------------------------------------


class _DequantizeScales(torch.autograd.Function):
    """W = (2 e2m1) * snap(exp(log s)) * 0.5 * s2, fp32 then the model's dtype; the gradient of
    log s goes straight through the snap (d snap(s) / ds = 1). Saves only the int8 codes."""

    @staticmethod
    def forward(ctx, log_scale, codes, scale_2, dtype):  # pylint: disable=arguments-differ
        scale = torch.exp(log_scale)
        snapped = snap_e4m3(scale)
        rows, blocks = log_scale.shape
        weight = (codes.view(rows, blocks, 16).float() * snapped.unsqueeze(-1)) * 0.5
        weight = (weight * scale_2).view(rows, blocks * 16).to(dtype)
        ctx.save_for_backward(codes, scale)
        ctx.scale_2 = scale_2
        return weight

    @staticmethod
    def backward(ctx, grad_weight):  # pylint: disable=arguments-differ
        codes, scale = ctx.saved_tensors
        rows, blocks = scale.shape
        grad = (grad_weight.float().view(rows, blocks, 16)
                * codes.view(rows, blocks, 16).float()).sum(-1)
        return grad * (0.5 * ctx.scale_2) * scale, None, None, None


class _WeightSlots:
    """Takes the `weight` Parameter off each Linear so that a plain tensor (the teacher's own
    weight or the student's dequantized one) can be set before each forward; restore() puts
    the Parameters back, in their original order."""

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        self.items = []
        for module in modules:
            order = list(module._parameters.keys())  # pylint: disable=protected-access
            param = module._parameters.pop("weight")  # pylint: disable=protected-access
            self.items.append((module, param, order))
            module.weight = param.detach()

    def teacher(self) -> None:
        for module, param, _ in self.items:
            module.weight = param.detach()

    def student(self, weights: Sequence[torch.Tensor]) -> None:
        for (module, _, _), weight in zip(self.items, weights):
            module.weight = weight

    def restore(self) -> None:
        for module, param, order in self.items:
            if "weight" in module.__dict__:
                del module.__dict__["weight"]
            params = module._parameters  # pylint: disable=protected-access
            ordered = [(k, param if k == "weight" else params[k]) for k in order]
            params.clear()  # an OrderedDict in torch 1.x, a dict in 2.x: rebuilt in order
            params.update(ordered)
        self.items = []


def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise FinetuneError(f"the model returned {type(output).__name__}: expected logits (a "
                        "tensor, an object with .logits, or a tuple starting with them)")


# --- results -----------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    """What finetune_scales trained: `scale_bytes` (module -> uint8 [out, in/16], the best
    evaluation's), `stats` (JSON-ready), `finished` (False when stopped at `stop_at`)."""
    checkpoint: str
    modules: Dict[str, NVFP4Module]
    scale_bytes: Dict[str, np.ndarray]
    stats: Dict[str, Any]
    finished: bool = True
    out: Optional[str] = None

    def save(self, out: str, overwrite: bool = False, stats_json: Optional[str] = None) -> None:
        """Writes the checkpoint with the trained scale bytes to `out` (see write_checkpoint)
        and the statistics beside it (`<out>.finetune.json`, or `stats_json`)."""
        write_checkpoint(self.checkpoint, out, self.modules, self.scale_bytes, overwrite)
        self.out = out
        _write_json(stats_json or out.rstrip("/") + STATS_SUFFIX, self.stats)


# --- training ----------------------------------------------------------------------------------


def _linear_modules(model: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def match_model(model: torch.nn.Module, modules: Dict[str, NVFP4Module],
                max_relative_error: float = 0.5) -> Dict[str, torch.nn.Linear]:
    """The model's nn.Linear of every NVFP4 module, checked: same name, weight [out, in] as the
    codes say, and the dequantized weight close to the model's (relative Frobenius error at most
    `max_relative_error`: NVFP4 gives about 0.1; another model's weights about 1.4)."""
    linears = _linear_modules(model)
    matched = {}
    for name, module in modules.items():
        linear = linears.get(name)
        if linear is None:
            near = [n for n in linears if n.endswith(name.rpartition(".")[2])][:3]
            raise FinetuneError(f"the checkpoint's NVFP4 module {name} is no torch.nn.Linear of "
                                f"the model (the model has {len(linears)} Linear modules"
                                + (f", e.g. {', '.join(near)}" if near else "") + ")")
        if tuple(linear.weight.shape) != module.shape:
            raise FinetuneError(f"{name}: the checkpoint holds a [{module.shape[0]}, "
                                f"{module.shape[1]}] weight, the model's is "
                                f"{list(linear.weight.shape)}")
        with torch.no_grad():
            weight = linear.weight.detach().float()
            device = weight.device
            codes = torch.from_numpy(_unpacked_codes(module.codes)).to(device)
            scale = torch.from_numpy(e4m3_decode(module.scale_bytes)).to(device)
            deq = ((codes.view(scale.shape + (16,)).float() * scale.unsqueeze(-1)) * 0.5
                   ).view(weight.shape) * module.scale_2
            error = float(torch.linalg.norm(weight - deq)) / max(float(torch.linalg.norm(weight)),
                                                                 1e-30)
            del codes, scale, deq, weight
        if not math.isfinite(error) or error > max_relative_error:
            raise FinetuneError(f"{name}: the checkpoint's weight is not a quantization of the "
                                f"model's (relative error {error:.3g} > {max_relative_error}): "
                                "wrong --model or --checkpoint?")
        matched[name] = linear
    return matched


def _fingerprint(modules: Dict[str, NVFP4Module], settings: Dict[str, Any],
                 windows: Sequence[np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    for name in sorted(modules):
        m = modules[name]
        h.update(name.encode())
        h.update(m.scale_bytes.tobytes())
        h.update(np.float32(m.scale_2).tobytes())
        h.update(hashlib.sha256(m.codes.tobytes()).digest())
    for w in windows:
        h.update(np.asarray(w, np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()


def _batch(windows: Sequence[np.ndarray], pad_id: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    longest = max(w.size for w in windows)
    ids = np.full((len(windows), longest), pad_id, np.int64)
    mask = np.zeros((len(windows), longest), np.int64)
    for row, w in enumerate(windows):
        ids[row, :w.size] = w
        mask[row, :w.size] = 1
    return torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)


def _kl(teacher_logp: torch.Tensor, student_logits: torch.Tensor,
        mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum over the unmasked tokens of KL(teacher || student), token count)."""
    student_logp = torch.log_softmax(student_logits.float(), dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    weights = mask.to(kl.dtype)
    return (kl * weights).sum(), weights.sum()


def _epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, 2, epoch]).permutation(count)


def split_windows(windows: Sequence[np.ndarray], val_count: int,
                  seed: int) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """(training, validation): `val_count` windows drawn with default_rng([seed, 1]), both in
    their original order."""
    if len(windows) < 2:
        raise FinetuneError(f"the calibration data holds {len(windows)} window(s): at least 2 "
                            "are needed (training and validation)")
    val_count = min(max(1, val_count), len(windows) - 1)
    chosen = set(np.random.default_rng([seed, 1]).choice(len(windows), val_count,
                                                        replace=False).tolist())
    train = [w for i, w in enumerate(windows) if i not in chosen]
    val = [w for i, w in enumerate(windows) if i in chosen]
    return train, val


@dataclass
class _Options:
    """The training options that decide the result (the fingerprint and the statistics hold
    them, in this order)."""
    lr: float
    lr_schedule: str
    batch_size: int
    steps: int
    eval_every: int
    patience: int
    seed: int
    pad_id: int


def _check_options(options: _Options, stop_at: Optional[int]) -> None:
    for name, value, low in (("steps", options.steps, 1), ("batch_size", options.batch_size, 1),
                             ("eval_every", options.eval_every, 1),
                             ("patience", options.patience, 0)):
        if value < low:
            raise FinetuneError(f"--{name.replace('_', '-')} = {value} must be >= {low}")
    if not (options.lr >= 0 and math.isfinite(options.lr)):
        raise FinetuneError(f"--lr = {options.lr} must be finite and >= 0")
    if options.lr_schedule not in ("constant", "cosine"):
        raise FinetuneError(f"--lr-schedule {options.lr_schedule}: constant or cosine")
    if stop_at is not None and stop_at < 1:
        raise FinetuneError(f"--stop-at = {stop_at} must be >= 1")


def _windows(train: Sequence[np.ndarray], validation: Optional[Sequence[np.ndarray]],
             val_fraction: float, seed: int) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    """(training, validation) as flat int64 arrays without empty ones; `validation` None:
    `val_fraction` of `train`, drawn with `seed`."""
    train = [np.asarray(w, np.int64).reshape(-1) for w in train]
    train = [w for w in train if w.size]
    if validation is None:
        train, validation = split_windows(train, int(round(val_fraction * len(train))), seed)
    validation = [np.asarray(w, np.int64).reshape(-1) for w in validation]
    validation = [w for w in validation if w.size]
    if not train:
        raise FinetuneError("no training data (empty calibration data)")
    if not validation:
        raise FinetuneError("no validation data (empty calibration data)")
    return train, validation


def _read_resume(resume_path: Optional[str], resume: bool, fingerprint: str,
                 say: Callable[[str], None]) -> Optional[Dict[str, Any]]:
    """The saved state of the run `fingerprint` names, or None to start from step 0;
    FinetuneError for a resume file that is not to be used."""
    if resume_path is not None and os.path.exists(resume_path):
        if not resume:
            raise FinetuneError(f"{resume_path} (the resume file of an earlier run) exists: pass "
                                "--resume to continue that run, or delete it")
        saved = load_resume_file(resume_path)
        if saved.get("version") != _RESUME_VERSION or saved.get("fingerprint") != fingerprint:
            raise FinetuneError(f"{resume_path} belongs to another run (other checkpoint, data "
                                "or options): delete it or run with the same inputs")
        return saved
    if resume:
        say(f"note: no resume file {resume_path}: starting from step 0")
    return None


@dataclass
class _Scales:
    """The trainable block scales of the NVFP4 modules `names` (lists in that order), with the
    fixed codes and per-tensor scales they dequantize."""
    names: List[str]
    codes: List[torch.Tensor]                # int8, twice the E2M1 value, one per weight
    scales_2: List[torch.Tensor]             # fp32 scalar weight_scale_2
    log_scales: List[torch.nn.Parameter]     # the trained log s, [out, in/16]
    initial_bytes: Dict[str, np.ndarray]     # the checkpoint's weight_scale bytes
    zero_blocks: Dict[str, np.ndarray]       # blocks whose codes are all zero

    @classmethod
    def from_modules(cls, modules: Dict[str, NVFP4Module], names: List[str],
                     device) -> "_Scales":
        unpacked = {n: _unpacked_codes(modules[n].codes) for n in names}
        codes = [torch.from_numpy(unpacked[n]).to(device) for n in names]
        scales_2 = [torch.tensor(modules[n].scale_2, dtype=torch.float32, device=device)
                    for n in names]
        initial_bytes = {n: modules[n].scale_bytes for n in names}
        log_scales = [torch.nn.Parameter(torch.from_numpy(np.log(np.maximum(
            e4m3_decode(modules[n].scale_bytes), E4M3_MIN))).to(device)) for n in names]
        # Blocks whose codes are all zero keep their byte: their scale does not change the weight.
        zero_blocks = {n: ~np.any(unpacked.pop(n).reshape(
            modules[n].scale_bytes.shape + (16,)) != 0, axis=-1) for n in names}
        return cls(names, codes, scales_2, log_scales, initial_bytes, zero_blocks)

    def current_bytes(self) -> Dict[str, np.ndarray]:
        result = {}
        with torch.no_grad():
            for n, p in zip(self.names, self.log_scales):
                value = e4m3_bytes(snap_e4m3(torch.exp(p)).cpu().numpy())
                result[n] = np.where(self.zero_blocks[n], self.initial_bytes[n],
                                     value).astype(np.uint8)
        return result

    def dequantized(self, dtype: torch.dtype) -> List[torch.Tensor]:
        return [_DequantizeScales.apply(p, c, s2, dtype)
                for p, c, s2 in zip(self.log_scales, self.codes, self.scales_2)]

    def clamp_(self) -> None:
        """Keeps every scale within the finite positive E4M3 range."""
        log_min, log_max = math.log(E4M3_MIN), math.log(E4M3_MAX)
        with torch.no_grad():
            for p in self.log_scales:
                p.clamp_(log_min, log_max)


@dataclass
class _RunState:
    """Where a run stands: what the resume file keeps besides the scales and Adam's state."""
    best_bytes: Dict[str, np.ndarray]
    step: int = 0
    best_step: int = 0
    best_loss: float = math.inf
    since_best: int = 0
    evaluations: List[Dict[str, float]] = field(default_factory=list)


def _resume_state(saved: Dict[str, Any], scales: _Scales, optimizer: torch.optim.Optimizer,
                  device) -> _RunState:
    """Loads a resume file's scales and Adam state into `scales` and `optimizer`; returns the
    run's state."""
    with torch.no_grad():
        for p, value in zip(scales.log_scales, saved["log_scales"]):
            p.copy_(value.to(device))
    optimizer.load_state_dict(saved["optimizer"])
    return _RunState(best_bytes=dict(zip(scales.names, saved["best_bytes"])),
                     step=saved["step"], best_step=saved["best_step"],
                     best_loss=saved["best_loss"], since_best=saved["since_best"],
                     evaluations=[dict(e) for e in saved["evaluations"]])


class _Teacher:
    """The teacher's next-token log-probabilities (the model with its own weights) of token
    windows, indexed by their position in train + validation: computed once and cached when
    they fit the budget (prepare), else again for every batch."""

    def __init__(self, model: torch.nn.Module, slots: _WeightSlots, pad_id: int, device) -> None:
        self.model, self.slots, self.pad_id, self.device = model, slots, pad_id, device
        self.vocab: Optional[int] = None
        self.cache: Optional[Dict[int, torch.Tensor]] = None

    def compute(self, windows: Sequence[np.ndarray]):
        """(log-probabilities, ids, mask) of one batch of windows."""
        self.slots.teacher()
        with torch.no_grad():
            ids, mask = _batch(windows, self.pad_id, self.device)
            return torch.log_softmax(_logits(self.model(input_ids=ids, attention_mask=mask))
                                     .float(), dim=-1), ids, mask

    def prepare(self, train: Sequence[np.ndarray], validation: Sequence[np.ndarray],
                batch_size: int, cache_bytes_limit: int) -> None:
        probe, _, _ = self.compute(train[:1])
        self.vocab = probe.shape[-1]
        longest = max(w.size for w in list(train) + list(validation))
        cache_bytes = (len(train) + len(validation)) * longest * self.vocab * 4
        if cache_bytes <= cache_bytes_limit:
            self.cache = {}
            every = list(train) + list(validation)
            for begin in range(0, len(every), batch_size):
                logp, _, _ = self.compute(every[begin:begin + batch_size])
                for row in range(logp.shape[0]):
                    self.cache[begin + row] = logp[row, :every[begin + row].size]

    def batch(self, indices: Sequence[int], windows: Sequence[np.ndarray]):
        """(log-probabilities, ids, mask) of the windows at `indices`."""
        if self.cache is None:
            return self.compute(windows)
        ids, mask = _batch(windows, self.pad_id, self.device)
        logp = torch.zeros(ids.shape + (self.vocab,), dtype=torch.float32, device=self.device)
        for row, index in enumerate(indices):
            logp[row, :windows[row].size] = self.cache[index]
        return logp, ids, mask


@dataclass
class _Student:
    """The model with the dequantized NVFP4 weights of the current scales."""
    model: torch.nn.Module
    slots: _WeightSlots
    scales: _Scales
    dtype: torch.dtype

    def logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.slots.student(self.scales.dequantized(self.dtype))
        return _logits(self.model(input_ids=ids, attention_mask=mask))


@dataclass
class _Run:
    """What the training loop, its evaluations and its resume file share."""
    student: _Student
    teacher: _Teacher
    optimizer: torch.optim.Optimizer
    state: _RunState
    options: _Options
    train: List[np.ndarray]
    validation: List[np.ndarray]
    resume_path: Optional[str]
    fingerprint: str


def _validation_kl(run: _Run) -> float:
    total, count = 0.0, 0.0
    batch_size, first = run.options.batch_size, len(run.train)
    with torch.no_grad():
        for begin in range(0, len(run.validation), batch_size):
            windows = run.validation[begin:begin + batch_size]
            indices = range(first + begin, first + begin + len(windows))
            logp, ids, mask = run.teacher.batch(indices, windows)
            loss, tokens = _kl(logp, run.student.logits(ids, mask), mask)
            total += float(loss)
            count += float(tokens)
    return total / max(count, 1.0)


def _evaluate(run: _Run, on_eval, bar, say: Callable[[str], None]) -> bool:
    """Validation at the current step; True when patience says stop."""
    state, patience = run.state, run.options.patience
    loss = _validation_kl(run)
    state.evaluations.append({"step": state.step, "val_kl": loss})
    snapshot = run.student.scales.current_bytes()
    if loss < state.best_loss:
        state.best_step, state.best_loss, state.best_bytes = state.step, loss, snapshot
        state.since_best = 0
    else:
        state.since_best += 1
    if on_eval is not None:
        on_eval(state.step, loss, snapshot)
    if bar is not None:
        bar.set_postfix(val_kl=f"{loss:.5f}", best=state.best_step)
    else:
        say(f"step {state.step}: validation KL {loss:.6g} (best: step {state.best_step}, "
            f"{state.best_loss:.6g})")
    return patience > 0 and state.since_best >= patience


def _save_state(run: _Run) -> None:
    if run.resume_path is None:
        return
    state, scales = run.state, run.student.scales
    meta = {"version": _RESUME_VERSION, "fingerprint": run.fingerprint, "step": state.step,
            "best_step": state.best_step, "best_loss": state.best_loss,
            "since_best": state.since_best, "evaluations": state.evaluations}
    save_resume_file(run.resume_path, meta, [p.detach() for p in scales.log_scales],
                     [state.best_bytes[n] for n in scales.names], run.optimizer.state_dict())


def _train_step(run: _Run) -> None:
    """One Adam step on the batch of the current step (the epoch's order drawn with the seed)."""
    options, step, train = run.options, run.state.step, run.train
    per_epoch = max(1, len(train) // options.batch_size)
    epoch, index = divmod(step, per_epoch)
    order = _epoch_order(options.seed, epoch, len(train))
    chosen = order[index * options.batch_size:(index + 1) * options.batch_size].tolist()
    factor = (1.0 if options.lr_schedule == "constant"
              else 0.5 * (1 + math.cos(math.pi * step / options.steps)))
    for group in run.optimizer.param_groups:
        group["lr"] = options.lr * factor
    logp, ids, mask = run.teacher.batch(chosen, [train[i] for i in chosen])
    loss, tokens = _kl(logp, run.student.logits(ids, mask), mask)
    run.optimizer.zero_grad(set_to_none=True)
    (loss / tokens.clamp(min=1)).backward()
    run.optimizer.step()
    run.student.scales.clamp_()


def _progress_bar(progress: Optional[bool], steps: int, initial: int):
    """A tqdm bar on stderr when `progress` (None: stderr is a terminal) and tqdm is installed."""
    show = progress if progress is not None else sys.stderr.isatty()
    if not show:
        return None
    try:
        from tqdm import tqdm  # pylint: disable=import-outside-toplevel
        return tqdm(total=steps, initial=initial, desc="finetune-scales", unit="step",
                    file=sys.stderr)
    except ImportError:
        return None


def _train(run: _Run, stop_at: Optional[int], progress: Optional[bool], on_eval,
           say: Callable[[str], None]) -> Tuple[bool, bool]:
    """Trains from the run's step to the last (or `stop_at`, or until patience says stop),
    evaluating every eval_every steps and saving the resume file then; returns
    (stopped_early, paused), paused when stopped at `stop_at` before the last step."""
    state, options = run.state, run.options
    bar = _progress_bar(progress, options.steps, state.step)
    try:
        stopped_early = False
        if state.step == 0:
            stopped_early = _evaluate(run, on_eval, bar, say)
            _save_state(run)
        elif state.evaluations and state.evaluations[-1]["step"] == state.step and \
                options.patience and state.since_best >= options.patience:
            stopped_early = True
        while state.step < options.steps and not stopped_early and \
                (stop_at is None or state.step < stop_at):
            _train_step(run)
            state.step += 1
            if bar is not None:
                bar.update(1)
            if state.step % options.eval_every == 0 or state.step == options.steps:
                stopped_early = _evaluate(run, on_eval, bar, say)
                _save_state(run)
        paused = state.step < options.steps and not stopped_early
        if paused:
            _save_state(run)
    finally:
        if bar is not None:
            bar.close()
    return stopped_early, paused


def finetune_scales(model: torch.nn.Module, checkpoint: str, train: Sequence[np.ndarray],
                    validation: Optional[Sequence[np.ndarray]] = None, out: Optional[str] = None,
                    *, steps: int = 1000, lr: float = 1e-3, lr_schedule: str = "constant",
                    batch_size: int = 16, eval_every: int = 50, patience: int = 0,
                    val_fraction: float = 0.125, seed: int = 0, pad_id: int = 0,
                    resume: bool = False, resume_path: Optional[str] = None,
                    stop_at: Optional[int] = None, overwrite: bool = False,
                    stats_json: Optional[str] = None, teacher_cache_bytes: int = 2 << 30,
                    progress: Optional[bool] = None, log: Optional[Callable[[str], None]] = None,
                    on_eval: Optional[Callable[[int, float, Dict[str, np.ndarray]], None]] = None,
                    modules: Optional[Dict[str, NVFP4Module]] = None) -> FinetuneResult:
    """Trains the block scales of `checkpoint` (a folder from `nvfp4cal quantize`, ModelOpt
    layout) against `model` (its unquantized torch model, on the device to train on; called as
    `model(input_ids=..., attention_mask=...)`, returning logits or an object with `.logits`)
    on the token windows `train` (numpy int arrays), validating on `validation` (or on
    `val_fraction` of `train`, drawn with `seed`). Writes the result to `out` (when given) and
    returns a FinetuneResult. See the module docstring; `patience` (0: none) stops after that
    many evaluations without a better validation loss; `stop_at` stops after that step, saves
    the resume file and writes no output (`finished` False); `on_eval(step, val_loss,
    scale_bytes)` is called at every evaluation; `modules`: read_nvfp4_modules(checkpoint) when
    the caller has it already. FinetuneError for bad input, before any
    training; nothing is written then."""
    say = log or (lambda s: None)
    options = _Options(lr=lr, lr_schedule=lr_schedule, batch_size=batch_size, steps=steps,
                       eval_every=eval_every, patience=patience, seed=seed, pad_id=pad_id)
    _check_options(options, stop_at)
    train, validation = _windows(train, validation, val_fraction, seed)
    checkpoint = checkpoint.rstrip("/") or checkpoint
    if out is not None:
        check_out(out, checkpoint, overwrite=overwrite)
        resume_path = resume_path or out.rstrip("/") + RESUME_SUFFIX
    if (resume or stop_at is not None) and resume_path is None:
        raise FinetuneError("resuming and --stop-at need a resume file: give out or resume_path")
    modules = modules if modules is not None else read_nvfp4_modules(checkpoint)
    linears = match_model(model, modules)
    names = sorted(modules)
    fingerprint = _fingerprint(modules, asdict(options),
                               list(train) + [np.array([-1])] + list(validation))
    saved = _read_resume(resume_path, resume, fingerprint, say)

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    scales = _Scales.from_modules(modules, names, device)
    optimizer = torch.optim.Adam(scales.log_scales, lr=lr)
    state = _RunState(best_bytes=scales.initial_bytes)
    if saved is not None:
        state = _resume_state(saved, scales, optimizer, device)
        say(f"resuming from step {state.step} (best so far: step {state.best_step}, validation "
            f"KL {state.best_loss:.6g})")

    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    slots = _WeightSlots([linears[n] for n in names])
    start = time.monotonic()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    teacher = _Teacher(model, slots, pad_id, device)
    run = _Run(_Student(model, slots, scales, dtype), teacher, optimizer, state, options, train,
               validation, resume_path, fingerprint)
    try:
        model.eval()
        for p, _ in frozen:
            p.requires_grad_(False)
        teacher.prepare(train, validation, batch_size, teacher_cache_bytes)
        stopped_early, paused = _train(run, stop_at, progress, on_eval, say)
    finally:
        slots.restore()
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    stats = _run_statistics(run, modules, checkpoint, stopped_early,
                            time.monotonic() - start, device)
    result = FinetuneResult(checkpoint, modules, state.best_bytes, stats, finished=not paused)
    if paused:
        say(f"stopped at step {state.step} (--stop-at); the state is in {resume_path}: run again "
            "with --resume to continue")
        return result
    if out is not None:
        result.save(out, overwrite=overwrite, stats_json=stats_json)
        if resume_path is not None and os.path.exists(resume_path):
            os.unlink(resume_path)
    return result


def _run_statistics(run: _Run, modules: Dict[str, NVFP4Module], checkpoint: str,
                    stopped_early: bool, seconds: float, device) -> Dict[str, Any]:
    """The statistics of a finished (or paused) run, JSON-ready."""
    state, options, scales = run.state, run.options, run.student.scales
    stats = _statistics(modules, scales.names, scales.initial_bytes, state.best_bytes)
    stats.update({
        "producer": {"name": "nvfp4cal", "version": __version__, "command": "finetune-scales"},
        "checkpoint": os.path.abspath(checkpoint), "steps_run": state.step,
        "steps": options.steps, "stopped_early": bool(stopped_early),
        "best_step": state.best_step,
        "initial_val_kl": state.evaluations[0]["val_kl"] if state.evaluations else None,
        "best_val_kl": state.best_loss, "evaluations": state.evaluations,
        "train_windows": len(run.train), "val_windows": len(run.validation),
        "windows_per_step": min(options.batch_size, len(run.train)),
        "options": asdict(options), "seconds": seconds, "device": str(device),
        "dtype": str(run.student.dtype), "teacher_cached": run.teacher.cache is not None,
        "peak_gpu_memory_bytes": (int(torch.cuda.max_memory_allocated(device))
                                  if device.type == "cuda" else None)})
    return stats


def _statistics(modules: Dict[str, NVFP4Module], names: Sequence[str],
                before: Dict[str, np.ndarray], after: Dict[str, np.ndarray]) -> Dict[str, Any]:
    total = moved = 0
    steps_hist: Dict[str, int] = {}
    per_module = {}
    for n in names:
        old = before[n].astype(np.int32)
        new = after[n].astype(np.int32)
        changed = int(np.count_nonzero(old != new))
        total += old.size
        moved += changed
        per_module[n] = {"scales": int(old.size), "moved": changed}
        delta, counts = np.unique(new - old, return_counts=True)
        for d, c in zip(delta.tolist(), counts.tolist()):
            if d:
                key = f"{d:+d}"
                steps_hist[key] = steps_hist.get(key, 0) + int(c)
    return {"modules": len(names), "scales": total, "scales_moved": moved,
            "scales_moved_fraction": moved / total if total else 0.0,
            "moved_by_e4m3_steps": dict(sorted(steps_hist.items(), key=lambda kv: int(kv[0]))),
            "per_module": per_module}
