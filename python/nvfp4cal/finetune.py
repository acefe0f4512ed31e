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
from dataclasses import dataclass
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
    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1),
                             ("eval_every", eval_every, 1), ("patience", patience, 0)):
        if value < low:
            raise FinetuneError(f"--{name.replace('_', '-')} = {value} must be >= {low}")
    if not (lr >= 0 and math.isfinite(lr)):
        raise FinetuneError(f"--lr = {lr} must be finite and >= 0")
    if lr_schedule not in ("constant", "cosine"):
        raise FinetuneError(f"--lr-schedule {lr_schedule}: constant or cosine")
    if stop_at is not None and stop_at < 1:
        raise FinetuneError(f"--stop-at = {stop_at} must be >= 1")
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
    checkpoint = checkpoint.rstrip("/") or checkpoint
    if out is not None:
        check_out(out, checkpoint, overwrite=overwrite)
        resume_path = resume_path or out.rstrip("/") + RESUME_SUFFIX
    if (resume or stop_at is not None) and resume_path is None:
        raise FinetuneError("resuming and --stop-at need a resume file: give out or resume_path")
    modules = modules if modules is not None else read_nvfp4_modules(checkpoint)
    linears = match_model(model, modules)
    names = sorted(modules)
    settings = {"lr": lr, "lr_schedule": lr_schedule, "batch_size": batch_size, "steps": steps,
                "eval_every": eval_every, "patience": patience, "seed": seed, "pad_id": pad_id}
    fingerprint = _fingerprint(modules, settings, list(train) + [np.array([-1])] + list(validation))
    state = None
    if resume_path is not None and os.path.exists(resume_path):
        if not resume:
            raise FinetuneError(f"{resume_path} (the resume file of an earlier run) exists: pass "
                                "--resume to continue that run, or delete it")
        state = load_resume_file(resume_path)
        if state.get("version") != _RESUME_VERSION or state.get("fingerprint") != fingerprint:
            raise FinetuneError(f"{resume_path} belongs to another run (other checkpoint, data "
                                "or options): delete it or run with the same inputs")
    elif resume:
        say(f"note: no resume file {resume_path}: starting from step 0")

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
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
    optimizer = torch.optim.Adam(log_scales, lr=lr)
    log_min, log_max = math.log(E4M3_MIN), math.log(E4M3_MAX)

    def current_bytes() -> Dict[str, np.ndarray]:
        result = {}
        with torch.no_grad():
            for n, p in zip(names, log_scales):
                value = e4m3_bytes(snap_e4m3(torch.exp(p)).cpu().numpy())
                result[n] = np.where(zero_blocks[n], initial_bytes[n], value).astype(np.uint8)
        return result

    step, best_step, best_loss, best_bytes, since_best = 0, 0, math.inf, initial_bytes, 0
    evaluations: List[Dict[str, float]] = []
    if state is not None:
        with torch.no_grad():
            for p, saved in zip(log_scales, state["log_scales"]):
                p.copy_(saved.to(device))
        optimizer.load_state_dict(state["optimizer"])
        step, best_step, best_loss = state["step"], state["best_step"], state["best_loss"]
        since_best = state["since_best"]
        best_bytes = dict(zip(names, state["best_bytes"]))
        evaluations = [dict(e) for e in state["evaluations"]]
        say(f"resuming from step {step} (best so far: step {best_step}, validation KL "
            f"{best_loss:.6g})")

    # The teacher's log-probabilities: computed once and kept when they fit the budget.
    vocab = None
    cache: Optional[Dict[int, torch.Tensor]] = None
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    slots = _WeightSlots([linears[n] for n in names])
    start = time.monotonic()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = None
    try:
        model.eval()
        for p, _ in frozen:
            p.requires_grad_(False)

        def teacher_logp(windows):
            slots.teacher()
            with torch.no_grad():
                ids, mask = _batch(windows, pad_id, device)
                return torch.log_softmax(_logits(model(input_ids=ids, attention_mask=mask))
                                         .float(), dim=-1), ids, mask

        probe, _, _ = teacher_logp(train[:1])
        vocab = probe.shape[-1]
        longest = max(w.size for w in list(train) + list(validation))
        cache_bytes = (len(train) + len(validation)) * longest * vocab * 4
        if cache_bytes <= teacher_cache_bytes:
            cache = {}
            every = list(train) + list(validation)
            for begin in range(0, len(every), batch_size):
                logp, _, _ = teacher_logp(every[begin:begin + batch_size])
                for row in range(logp.shape[0]):
                    cache[begin + row] = logp[row, :every[begin + row].size]

        def batch_teacher(indices: Sequence[int], windows: Sequence[np.ndarray]):
            if cache is None:
                return teacher_logp(windows)
            ids, mask = _batch(windows, pad_id, device)
            logp = torch.zeros(ids.shape + (vocab,), dtype=torch.float32, device=device)
            for row, index in enumerate(indices):
                logp[row, :windows[row].size] = cache[index]
            return logp, ids, mask

        def student_forward(ids, mask):
            slots.student([_DequantizeScales.apply(p, c, s2, dtype)
                           for p, c, s2 in zip(log_scales, codes, scales_2)])
            return _logits(model(input_ids=ids, attention_mask=mask))

        def validate() -> float:
            total, count = 0.0, 0.0
            with torch.no_grad():
                for begin in range(0, len(validation), batch_size):
                    windows = validation[begin:begin + batch_size]
                    indices = range(len(train) + begin, len(train) + begin + len(windows))
                    logp, ids, mask = batch_teacher(indices, windows)
                    loss, tokens = _kl(logp, student_forward(ids, mask), mask)
                    total += float(loss)
                    count += float(tokens)
            return total / max(count, 1.0)

        def save_state() -> None:
            if resume_path is None:
                return
            meta = {"version": _RESUME_VERSION, "fingerprint": fingerprint, "step": step,
                    "best_step": best_step, "best_loss": best_loss, "since_best": since_best,
                    "evaluations": evaluations}
            save_resume_file(resume_path, meta, [p.detach() for p in log_scales],
                             [best_bytes[n] for n in names], optimizer.state_dict())

        def evaluate() -> bool:
            """Validation at `step`; True when patience says stop."""
            nonlocal best_step, best_loss, best_bytes, since_best
            loss = validate()
            evaluations.append({"step": step, "val_kl": loss})
            snapshot = current_bytes()
            if loss < best_loss:
                best_step, best_loss, best_bytes, since_best = step, loss, snapshot, 0
            else:
                since_best += 1
            if on_eval is not None:
                on_eval(step, loss, snapshot)
            if bar is not None:
                bar.set_postfix(val_kl=f"{loss:.5f}", best=best_step)
            else:
                say(f"step {step}: validation KL {loss:.6g} (best: step {best_step}, "
                    f"{best_loss:.6g})")
            return patience > 0 and since_best >= patience

        paused = False
        show = progress if progress is not None else sys.stderr.isatty()
        if show:
            try:
                from tqdm import tqdm  # pylint: disable=import-outside-toplevel
                bar = tqdm(total=steps, initial=step, desc="finetune-scales", unit="step",
                           file=sys.stderr)
            except ImportError:
                bar = None
        stopped_early = False
        if step == 0:
            stopped_early = evaluate()
            save_state()
        elif evaluations and evaluations[-1]["step"] == step and patience and \
                since_best >= patience:
            stopped_early = True
        per_epoch = max(1, len(train) // batch_size)
        while step < steps and not stopped_early and (stop_at is None or step < stop_at):
            epoch, index = divmod(step, per_epoch)
            order = _epoch_order(seed, epoch, len(train))
            chosen = order[index * batch_size:(index + 1) * batch_size].tolist()
            factor = (1.0 if lr_schedule == "constant"
                      else 0.5 * (1 + math.cos(math.pi * step / steps)))
            for group in optimizer.param_groups:
                group["lr"] = lr * factor
            logp, ids, mask = batch_teacher(chosen, [train[i] for i in chosen])
            loss, tokens = _kl(logp, student_forward(ids, mask), mask)
            optimizer.zero_grad(set_to_none=True)
            (loss / tokens.clamp(min=1)).backward()
            optimizer.step()
            with torch.no_grad():
                for p in log_scales:
                    p.clamp_(log_min, log_max)
            step += 1
            if bar is not None:
                bar.update(1)
            if step % eval_every == 0 or step == steps:
                stopped_early = evaluate()
                save_state()
        paused = step < steps and not stopped_early
        if paused:
            save_state()
    finally:
        if bar is not None:
            bar.close()
        slots.restore()
        for p, flag in frozen:
            p.requires_grad_(flag)
        model.train(was_training)
    seconds = time.monotonic() - start
    stats = _statistics(modules, names, initial_bytes, best_bytes)
    stats.update({
        "producer": {"name": "nvfp4cal", "version": __version__, "command": "finetune-scales"},
        "checkpoint": os.path.abspath(checkpoint), "steps_run": step, "steps": steps,
        "stopped_early": bool(stopped_early), "best_step": best_step,
        "initial_val_kl": evaluations[0]["val_kl"] if evaluations else None,
        "best_val_kl": best_loss, "evaluations": evaluations,
        "train_windows": len(train), "val_windows": len(validation),
        "windows_per_step": min(batch_size, len(train)),
        "options": settings, "seconds": seconds, "device": str(device), "dtype": str(dtype),
        "teacher_cached": cache is not None,
        "peak_gpu_memory_bytes": (int(torch.cuda.max_memory_allocated(device))
                                  if device.type == "cuda" else None)})
    result = FinetuneResult(checkpoint, modules, best_bytes, stats, finished=not paused)
    if paused:
        say(f"stopped at step {step} (--stop-at); the state is in {resume_path}: run again with "
            "--resume to continue")
        return result
    if out is not None:
        result.save(out, overwrite=overwrite, stats_json=stats_json)
        if resume_path is not None and os.path.exists(resume_path):
            os.unlink(resume_path)
    return result


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
