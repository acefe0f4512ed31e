"""The checkpoint side of `finetune-scales` (finetune.py): the E4M3 block-scale codec, reading
the NVFP4 modules of a checkpoint written by `nvfp4cal quantize` (ModelOpt layout), the rules of
--out and writing the checkpoint with new `weight_scale` bytes (every other byte the same), and
the resume file of a training run. finetune.py re-exports every name.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch


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


# --- resume file -------------------------------------------------------------------------------


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
