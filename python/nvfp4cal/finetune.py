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
import shutil
import stat
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import __version__

SCALE_SUFFIX = ".weight_scale"
E4M3_MIN = 2.0 ** -9       # smallest positive E4M3 value (subnormal)
E4M3_MAX = 448.0           # largest finite E4M3 value
RESUME_SUFFIX = ".finetune-resume.safetensors"
STATS_SUFFIX = ".finetune.json"
_RESUME_VERSION = 1

# 2 * e2m1(code) for the 16 codes: integers, exact in int8 (sign bit 3 = 0x8).
_E2M1_TWICE = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)


class FinetuneError(ValueError):
    """Input that cannot be fine-tuned (checkpoint, model, data, options); nothing is written."""


# --- E4M3 --------------------------------------------------------------------------------------


def e4m3_positive_values() -> np.ndarray:
    """The 126 positive finite E4M3 values, float32, ascending: value k is byte k + 1."""
    out = np.empty(126, np.float32)
    for byte in range(1, 127):
        exponent, mantissa = byte >> 3, byte & 7
        out[byte - 1] = (mantissa * 2.0 ** -9 if exponent == 0
                         else (1 + mantissa / 8.0) * 2.0 ** (exponent - 7))
    return out


E4M3_VALUES = e4m3_positive_values()


def snap_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Nearest positive finite E4M3 value of every element (fp32), ties to even, clamped to
    [2^-9, 448] (NaN -> 2^-9): the values `EncodeE4M3Scale` (kernels/.../codecs.h) writes."""
    x = torch.nan_to_num(x.float(), nan=E4M3_MIN).clamp(E4M3_MIN, E4M3_MAX)
    _, exponent = torch.frexp(x)            # x = m * 2^exponent, m in [0.5, 1)
    # Spacing of E4M3 values around x: 2^(floor(log2 x) - 3), never below the subnormal 2^-9.
    # Built from the exponent bits, so it is an exact power of two on every device.
    step_exp = (exponent.to(torch.int32) - 4).clamp(min=-9)
    step = ((step_exp + 127) << 23).view(torch.float32)
    return (torch.round(x / step) * step).clamp(E4M3_MIN, E4M3_MAX)  # round: half to even


def e4m3_bytes(values: np.ndarray) -> np.ndarray:
    """Bytes 0x01..0x7E of exact positive E4M3 values (as snap_e4m3 gives)."""
    values = np.asarray(values, np.float32)
    index = np.clip(np.searchsorted(E4M3_VALUES, values), 0, 125)
    if not np.array_equal(E4M3_VALUES[index], values):
        raise AssertionError("e4m3_bytes: a value is not a positive E4M3 value")
    return (index + 1).astype(np.uint8)


def e4m3_decode(data: np.ndarray) -> np.ndarray:
    """float32 values of E4M3 scale bytes 0x00..0x7E (0x00 -> 0)."""
    table = np.concatenate([[0.0], E4M3_VALUES, [np.nan]]).astype(np.float32)
    return table[np.asarray(data, np.uint8) & 0x7F]


# --- the checkpoint ----------------------------------------------------------------------------


@dataclass
class NVFP4Module:
    """One NVFP4 module of a checkpoint: where its scale bytes live and what it holds."""
    name: str
    shard: str                 # file name inside the checkpoint folder
    scale_offset: int          # absolute file offset of the weight_scale bytes
    codes: np.ndarray          # uint8 [out, in/2]
    scale_bytes: np.ndarray    # uint8 [out, in/16]
    scale_2: float             # fp32

    @property
    def shape(self) -> Tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * 2


def _read_header(path: str) -> Tuple[Dict[str, Any], int]:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FinetuneError(f"{path}: too short for a safetensors file")
            (length,) = struct.unpack("<Q", head)
            if length > (100 << 20):
                raise FinetuneError(f"{path}: header length {length} exceeds the limit")
            header = json.loads(f.read(length).decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FinetuneError(f"{path}: not a safetensors file: {error}") from None
    if not isinstance(header, dict):
        raise FinetuneError(f"{path}: the header is not a JSON object")
    return header, 8 + length


def checkpoint_shards(folder: str) -> List[str]:
    """The safetensors files of a checkpoint folder (index or model.safetensors)."""
    if not os.path.isdir(folder):
        raise FinetuneError(f"--checkpoint {folder}: no such folder")
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            return sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise FinetuneError(f"{index}: {error}") from None
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return ["model.safetensors"]
    raise FinetuneError(f"--checkpoint {folder}: no model.safetensors or "
                        "model.safetensors.index.json")


def read_nvfp4_modules(folder: str) -> Dict[str, NVFP4Module]:
    """Every NVFP4 module (ModelOpt layout) of a checkpoint folder, by name. FinetuneError for
    none, for the compressed-tensors layout, for 3-D expert tensors and for inconsistent
    tensors, naming the module."""
    modules: Dict[str, NVFP4Module] = {}
    for shard in checkpoint_shards(folder):
        path = os.path.join(folder, shard)
        header, data_start = _read_header(path)
        header.pop("__metadata__", None)
        if any(n.endswith(".weight_packed") for n in header):
            raise FinetuneError(f"--checkpoint {folder}: the compressed-tensors layout "
                                "(weight_packed) is not supported; quantize with --format "
                                "modelopt (the default)")
        with open(path, "rb") as f:
            def read(name: str, dtype: str) -> Tuple[np.ndarray, int]:
                spec = header.get(name)
                if spec is None:
                    raise FinetuneError(f"{path}: {name} is missing")
                if spec.get("dtype") != dtype:
                    raise FinetuneError(f"{path}: {name} is {spec.get('dtype')}, expected "
                                        f"{dtype}")
                begin, end = (int(v) for v in spec["data_offsets"])
                f.seek(data_start + begin)
                raw = f.read(end - begin)
                np_dtype = np.float32 if dtype == "F32" else np.uint8
                array = np.frombuffer(raw, np_dtype)
                shape = tuple(int(d) for d in spec["shape"])
                if array.size != int(np.prod(shape, dtype=np.int64)):
                    raise FinetuneError(f"{path}: {name}: data does not hold shape "
                                        f"{list(shape)}")
                return array.reshape(shape), data_start + begin

            for name in sorted(header):
                if not name.endswith(SCALE_SUFFIX):
                    continue
                module = name[:-len(SCALE_SUFFIX)]
                scales, offset = read(name, "F8_E4M3")
                codes, _ = read(module + ".weight", "U8")
                scale_2, _ = read(module + ".weight_scale_2", "F32")
                if codes.ndim == 3 or scales.ndim == 3:
                    raise FinetuneError(f"--checkpoint {folder}: {module}: 3-D expert tensors "
                                        f"{list(codes.shape)} are not supported; quantize "
                                        "them per expert or exclude them (--exclude)")
                if (codes.ndim != 2 or scales.ndim != 2 or scale_2.size != 1
                        or codes.shape[0] != scales.shape[0]
                        or codes.shape[1] * 2 != scales.shape[1] * 16):
                    raise FinetuneError(f"--checkpoint {folder}: {module}: inconsistent NVFP4 "
                                        f"tensors: weight {list(codes.shape)}, weight_scale "
                                        f"{list(scales.shape)}, weight_scale_2 "
                                        f"{list(scale_2.shape)}")
                if np.any((scales & 0x7F) == 0x7F):
                    raise FinetuneError(f"--checkpoint {folder}: {module}: NaN block scales")
                modules[module] = NVFP4Module(module, shard, offset, codes.copy(),
                                              scales.copy(), float(scale_2.reshape(())))
    if not modules:
        raise FinetuneError(f"--checkpoint {folder}: no NVFP4 modules (no <module>.weight_scale "
                            "tensors): give a checkpoint written by `nvfp4cal quantize`")
    return modules


def _unpacked_codes(codes: np.ndarray) -> np.ndarray:
    """Packed codes [out, in/2] -> int8 2 * e2m1 [out, in] (even column in the low nibble)."""
    out = np.empty((codes.shape[0], codes.shape[1] * 2), np.int8)
    out[:, 0::2] = _E2M1_TWICE[codes & 0xF]
    out[:, 1::2] = _E2M1_TWICE[codes >> 4]
    return out


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


def _write_json(path: str, value: Any) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=1)
            f.write("\n")
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


# --- output folder -----------------------------------------------------------------------------


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _inside(child: str, parent: str) -> bool:
    child, parent = _real(child), _real(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_out(out: str, checkpoint: str, inputs: Sequence[str] = (),
              overwrite: bool = False) -> None:
    """The rules for --out, checked before any work: not an input, nor inside or around one;
    an existing --out only with overwrite, and only an nvfp4cal output or an empty folder."""
    if not out:
        raise FinetuneError("--out is empty")
    parent = os.path.dirname(os.path.abspath(out.rstrip("/")))
    if not os.path.isdir(parent):
        raise FinetuneError(f"--out {out}: folder {parent} does not exist")
    for path in [checkpoint] + [p for p in inputs if p]:
        if _inside(out, path) or _inside(path, out):
            raise FinetuneError(f"--out {out} must not be, contain or lie inside the input {path}")
    if os.path.lexists(out):
        if not os.path.isdir(out) or os.path.islink(out):
            raise FinetuneError(f"--out {out} exists and is not a folder")
        if not overwrite:
            raise FinetuneError(f"--out {out} already exists; pass --overwrite to replace it")
        if os.listdir(out) and not _is_nvfp4cal_output(out):
            raise FinetuneError(f"--out {out} is neither empty nor an nvfp4cal checkpoint "
                                "(hf_quant_config.json with producer nvfp4cal): not replaced")


def _is_nvfp4cal_output(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "hf_quant_config.json"), encoding="utf-8") as f:
            return json.load(f)["producer"]["name"] == "nvfp4cal"
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_checkpoint(checkpoint: str, out: str, modules: Dict[str, NVFP4Module],
                     scale_bytes: Dict[str, np.ndarray], overwrite: bool = False) -> None:
    """Copies the checkpoint folder to `out` with only the `weight_scale` bytes replaced (every
    other byte, header and file the same), through a temporary folder beside `out` renamed into
    place; on any error nothing is left behind."""
    check_out(out, checkpoint, overwrite=overwrite)
    out = out.rstrip("/")
    parent = os.path.dirname(os.path.abspath(out))
    temp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.finetune-tmp-", dir=parent)
    old = None
    try:
        for entry in sorted(os.listdir(checkpoint)):
            source = os.path.join(checkpoint, entry)
            target = os.path.join(temp, entry)
            if os.path.isdir(source):
                shutil.copytree(source, target)
            else:
                shutil.copy2(source, target)
        by_shard: Dict[str, List[NVFP4Module]] = {}
        for module in modules.values():
            by_shard.setdefault(module.shard, []).append(module)
        for shard, shard_modules in by_shard.items():
            path = os.path.join(temp, shard)
            mode = os.stat(path).st_mode
            os.chmod(path, mode | 0o200)
            with open(path, "r+b") as f:
                for module in shard_modules:
                    data = np.ascontiguousarray(scale_bytes[module.name], np.uint8)
                    if data.shape != module.scale_bytes.shape:
                        raise FinetuneError(f"{module.name}: scale bytes shaped {data.shape}")
                    f.seek(module.scale_offset)
                    f.write(data.tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.chmod(path, mode)
        os.chmod(temp, stat.S_IMODE(os.stat(checkpoint).st_mode) | 0o700)
        if os.path.lexists(out):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.finetune-old-", dir=parent)
            os.rename(out, os.path.join(old, "out"))
        os.rename(temp, out)
        temp = None
    except BaseException:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
            if old is not None and not os.path.lexists(out):
                os.rename(os.path.join(old, "out"), out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


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


def save_resume_file(path: str, meta: Dict[str, Any], log_scales: Sequence[torch.Tensor],
                     best_bytes: Sequence[np.ndarray], optimizer_state: Dict[str, Any]) -> None:
    """The training state as safetensors (no pickle): `log_scale.<i>`, `best_bytes.<i>`, the
    optimizer's tensors `optimizer.<param>.<key>`; everything else as JSON in `__metadata__`
    (floats round-trip exactly). Written atomically."""
    # pylint: disable=import-outside-toplevel
    from .hessians_file import RawTensor, write_safetensors
    tensors: Dict[str, Any] = {}
    for i, (scale, data) in enumerate(zip(log_scales, best_bytes)):
        tensors[f"log_scale.{i}"] = scale.detach().cpu().numpy()
        tensors[f"best_bytes.{i}"] = RawTensor("U8", tuple(data.shape),
                                              np.ascontiguousarray(data, np.uint8))
    optimizer_values: Dict[str, Dict[str, Any]] = {}
    for index, entry in optimizer_state["state"].items():
        values = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().numpy()
            else:
                values[key] = value
        optimizer_values[str(index)] = values
    metadata = {"nvfp4cal.finetune": json.dumps(meta),
                "nvfp4cal.optimizer": json.dumps({"state": optimizer_values,
                                                  "param_groups": optimizer_state["param_groups"]})}
    write_safetensors(path, tensors, metadata)


def load_resume_file(path: str) -> Dict[str, Any]:
    """save_resume_file's dictionary back: the meta keys plus `log_scales` (tensors),
    `best_bytes` (uint8 arrays) and `optimizer` (a state dict)."""
    # pylint: disable=import-outside-toplevel
    from .hessians_file import read_safetensors
    try:
        tensors, metadata = read_safetensors(path)
        state = json.loads(metadata["nvfp4cal.finetune"])
        optimizer = json.loads(metadata["nvfp4cal.optimizer"])
    except (ValueError, KeyError, OSError) as error:
        raise FinetuneError(f"{path}: not a finetune-scales resume file ({error})") from None
    count = sum(1 for n in tensors if n.startswith("log_scale."))
    state["log_scales"] = [torch.from_numpy(np.array(tensors[f"log_scale.{i}"].data))
                           for i in range(count)]
    state["best_bytes"] = [np.array(tensors[f"best_bytes.{i}"].data, np.uint8)
                           for i in range(count)]
    entries: Dict[int, Dict[str, Any]] = {int(i): dict(v) for i, v in optimizer["state"].items()}
    for name, raw in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            entries.setdefault(int(index), {})[key] = torch.from_numpy(np.array(raw.data))
    state["optimizer"] = {"state": entries, "param_groups": optimizer["param_groups"]}
    return state


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


# --- command line ------------------------------------------------------------------------------


def add_arguments(p) -> None:
    """The options of `python -m nvfp4cal finetune-scales`."""
    from .data import TOKEN_DTYPES  # pylint: disable=import-outside-toplevel
    p.add_argument("--model", required=True, metavar="DIR",
                   help="the unquantized Hugging Face model folder (the teacher)")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="its NVFP4 checkpoint from `nvfp4cal quantize` (ModelOpt layout)")
    p.add_argument("--data", required=True, action="append", metavar="FILE",
                   help="calibration data as for `calibrate` (text, .jsonl, .npy, .bin)")
    p.add_argument("--out", required=True, metavar="DIR", help="the checkpoint folder to write")
    p.add_argument("--samples", type=int, default=4096, metavar="N",
                   help="at most N training windows of --seq-len tokens (4096; fewer when the "
                        "data holds fewer: all of it is used)")
    p.add_argument("--val-samples", type=int, default=64, metavar="N",
                   help="held-out validation windows, drawn besides --samples (64; at most "
                        "half of the windows)")
    p.add_argument("--seq-len", type=int, default=256, metavar="L", help="tokens per window (256)")
    p.add_argument("--batch", type=int, default=16, metavar="B", help="windows per step (16)")
    p.add_argument("--steps", type=int, default=1000, metavar="N", help="step budget (1000)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate on log scales (1e-3)")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant")
    p.add_argument("--eval-every", type=int, default=50, metavar="N",
                   help="validate every N steps (50); the best evaluation's scales are written")
    p.add_argument("--patience", type=int, default=0, metavar="N",
                   help="stop after N evaluations without a better validation loss (0: never)")
    p.add_argument("--seed", type=int, default=0, help="data selection, split and order (0)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="model dtype (bf16)")
    p.add_argument("--tokenizer", default="auto", metavar="auto|bytes|DIR")
    p.add_argument("--token-dtype", choices=tuple(TOKEN_DTYPES), default=None)
    p.add_argument("--model-loader", metavar="MODULE:FUNCTION",
                   help="advanced: FUNCTION(model_dir, dtype, device) returns the torch model")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>.finetune-resume.safetensors (saved at every "
                        "evaluation)")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop after STEP steps, keep the resume file, write no checkpoint")
    p.add_argument("--teacher-cache-mib", type=int, default=2048, metavar="MIB",
                   help="keep the teacher's log-probabilities when they fit (2048 MiB)")
    p.add_argument("--stats-json", metavar="FILE",
                   help="statistics as JSON (default: <out>.finetune.json)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out (an nvfp4cal checkpoint or an empty folder)")
    p.add_argument("--quiet", action="store_true")


def run_command(args) -> Dict[str, Any]:
    """`finetune-scales`: reads the data as `calibrate` does, loads the model, trains, writes."""
    # pylint: disable=import-outside-toplevel
    from .cli import (_DTYPES, _config_value, _device, _needs_tokenizer, load_model,
                      load_tokenizer, read_model_config)
    from .data import ByteTokenizer, make_samples, read_documents

    def say(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr)

    for flag, value, low in (("--samples", args.samples, 1), ("--val-samples", args.val_samples, 1),
                             ("--seq-len", args.seq_len, 3)):
        if value < low:
            raise FinetuneError(f"{flag} = {value} must be >= {low}")
    if not os.path.isdir(args.model):
        raise FinetuneError(f"--model {args.model}: no such folder")
    check_out(args.out, args.checkpoint, [args.model] + list(args.data), args.overwrite)
    modules = read_nvfp4_modules(args.checkpoint)  # checked before the model loads
    config = read_model_config(args.model)
    max_positions = _config_value(config, ("max_position_embeddings", "n_positions",
                                           "max_seq_len", "seq_length"))
    if max_positions is not None and args.seq_len > max_positions:
        raise FinetuneError(f"--seq-len {args.seq_len} is above the model's "
                            f"max_position_embeddings {max_positions}")
    tokenizer = load_tokenizer(args) if _needs_tokenizer(args.data) else ByteTokenizer()
    docs = read_documents(args.data, tokenizer, args.token_dtype,
                          vocab_size=_config_value(config, ("vocab_size",)))
    windows = make_samples(docs, args.seq_len, args.samples + args.val_samples, args.seed,
                           tokenizer.bos_id)
    val_count = min(args.val_samples, len(windows) // 2)
    if len(windows) < args.samples + args.val_samples:
        say(f"note: the data holds {len(windows)} windows of <= {args.seq_len} tokens, fewer than "
            f"--samples + --val-samples = {args.samples + args.val_samples}: all used, "
            f"{val_count} for validation, {len(windows) - val_count} for training")
    train, validation = split_windows(windows, val_count, args.seed)
    device = _device(args.device)
    model = load_model(args, _DTYPES[args.dtype], device)
    say(f"nvfp4cal finetune-scales: {len(modules)} NVFP4 modules, "
        f"{sum(m.scale_bytes.size for m in modules.values())} block scales; "
        f"{len(train)} training and {len(validation)} validation windows of <= {args.seq_len} "
        f"tokens; {args.steps} steps of {args.batch} windows, lr {args.lr:g} ({args.lr_schedule}) "
        f"on {device}")
    result = finetune_scales(
        model, args.checkpoint, train, validation, out=args.out, steps=args.steps, lr=args.lr,
        lr_schedule=args.lr_schedule, batch_size=args.batch, eval_every=args.eval_every,
        patience=args.patience, seed=args.seed, pad_id=tokenizer.pad_id, resume=args.resume,
        stop_at=args.stop_at, overwrite=args.overwrite, stats_json=args.stats_json,
        teacher_cache_bytes=args.teacher_cache_mib << 20,
        progress=None if not args.quiet else False, log=say, modules=modules)
    stats = result.stats
    if result.finished and not args.quiet:
        print(f"nvfp4cal finetune-scales: {stats['scales_moved']} of {stats['scales']} block "
              f"scales moved ({100 * stats['scales_moved_fraction']:.1f}%); best step "
              f"{stats['best_step']} of {stats['steps_run']} (validation KL "
              f"{stats['initial_val_kl']:.6g} -> {stats['best_val_kl']:.6g}); "
              f"{stats['seconds']:.1f} s; wrote {args.out}")
    return stats
