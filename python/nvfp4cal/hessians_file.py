"""Safetensors files, and the Hessians file `nvfp4cal quantize --hessians` reads.

Written by hand with numpy (no `safetensors` package needed): 8 bytes little-endian header
length N, N bytes of JSON `{"<tensor>": {"dtype", "shape", "data_offsets": [b, e]}, ...,
"__metadata__": {str: str}}` padded with spaces to a multiple of 8, then the data buffer.

The Hessians file (docs/cli.md, "Hessians"):

- `<module>.hessian`: F32, `[in, in]` (full) or `[in/16, 16, 16]` (diagonal 16x16 blocks);
- `<x>.input_amax`: F32 `[]`, the largest |activation| of the input whose Hessian is
  `<x>.hessian`;
- `<module>.output_amax`: F32 `[]` (k_proj / v_proj, for `quantize --kv-cache fp8`);
- `__metadata__`: aliases `"<module>.hessian": "<entry name>"` (the value must be an entry and
  the key must not be one; aliases do not chain), `tokens.<entry>` token counts, and
  `nvfp4cal.*` descriptive keys (layout, producer, ...).

    write_hessians("h.safetensors", {"m.q_proj.hessian": H}, aliases={"m.k_proj.hessian":
                   "m.q_proj.hessian"}, input_amax={"m.q_proj.hessian": 3.5})
    tensors, metadata = read_safetensors("h.safetensors")
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Tuple, Union

import numpy as np

# safetensors dtype name -> numpy dtype holding its bytes. BF16 and the FP8 types have no
# numpy dtype: their bit patterns are read as unsigned integers of the same width.
_DTYPES: Dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"), "F8_E4M3": np.dtype("u1"), "F8_E5M2": np.dtype("u1"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAME_OF_NUMPY = {
    np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16",
    np.dtype("<i8"): "I64", np.dtype("<i4"): "I32", np.dtype("<i2"): "I16", np.dtype("i1"): "I8",
    np.dtype("<u8"): "U64", np.dtype("<u4"): "U32", np.dtype("<u2"): "U16", np.dtype("u1"): "U8",
    np.dtype("?"): "BOOL",
}
# A header larger than this is refused by the reader (the C++ reader's limit is similar).
MAX_HEADER_BYTES = 100 << 20

HESSIAN_SUFFIX = ".hessian"


@dataclass
class RawTensor:
    """A tensor given by its safetensors dtype name and bytes, for dtypes numpy lacks (BF16,
    F8_E4M3): `RawTensor("BF16", (4, 16), uint16_array)`."""
    dtype: str
    shape: Tuple[int, ...]
    data: np.ndarray


TensorLike = Union[np.ndarray, RawTensor]


def _as_raw(name: str, tensor: TensorLike) -> RawTensor:
    if isinstance(tensor, RawTensor):
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"tensor '{name}': unknown dtype {tensor.dtype!r} "
                             f"(accepted: {', '.join(sorted(_DTYPES))})")
        data = np.ascontiguousarray(tensor.data)
        expected = int(np.prod(tensor.shape, dtype=np.int64)) * _DTYPES[tensor.dtype].itemsize
        if data.nbytes != expected:
            raise ValueError(f"tensor '{name}': {data.nbytes} bytes but shape "
                             f"{list(tensor.shape)} x {tensor.dtype} needs {expected}")
        return RawTensor(tensor.dtype, tuple(int(d) for d in tensor.shape), data)
    array = np.asarray(tensor)
    little = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    dtype_name = _NAME_OF_NUMPY.get(np.dtype(little))
    if dtype_name is None:
        raise ValueError(f"tensor '{name}': numpy dtype {array.dtype} has no safetensors name")
    return RawTensor(dtype_name, tuple(int(d) for d in array.shape),
                     np.ascontiguousarray(array, dtype=little))


def _atomic_write(path: str, chunks: Iterable[bytes]) -> None:
    """Writes the chunks to a temporary file beside `path`, then renames it onto `path`: a
    failure (or a kill) never leaves a partial `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise


def write_safetensors(path: str, tensors: Mapping[str, TensorLike],
                      metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes `tensors` (laid out in name order) and the string map `metadata` to `path`
    atomically (temporary file + rename)."""
    raws = {}
    for name in sorted(tensors):
        if not name or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        raws[name] = _as_raw(name, tensors[name])
    header: Dict[str, object] = {}
    if metadata:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError(f"__metadata__ must map str to str: {key!r} -> {value!r}")
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for name, raw in raws.items():
        header[name] = {"dtype": raw.dtype, "shape": list(raw.shape),
                        "data_offsets": [offset, offset + raw.data.nbytes]}
        offset += raw.data.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)

    def chunks():
        yield struct.pack("<Q", len(text))
        yield text
        for raw in raws.values():
            yield raw.data.tobytes()

    _atomic_write(path, chunks())


def read_safetensors(path: str) -> Tuple[Dict[str, RawTensor], Dict[str, str]]:
    """Reads a whole safetensors file: (name -> RawTensor with a numpy array of the dtype's
    storage type, shaped), metadata. ValueError naming the file for a malformed one."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"{path}: {len(blob)} bytes, too short for a safetensors header")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(blob):
        raise ValueError(f"{path}: header length {header_len} runs past the end of the "
                         f"{len(blob)}-byte file or exceeds the limit")
    try:
        header = json.loads(blob[8:8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: header is not valid JSON: {error}") from None
    metadata = header.pop("__metadata__", {}) or {}
    buffer = memoryview(blob)[8 + header_len:]
    tensors = {}
    for name, spec in header.items():
        dtype = spec.get("dtype")
        if dtype not in _DTYPES:
            raise ValueError(f"{path}: tensor '{name}': unknown dtype {dtype!r}")
        shape = tuple(int(d) for d in spec["shape"])
        begin, end = (int(v) for v in spec["data_offsets"])
        need = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
        if end - begin != need or end > len(buffer) or begin < 0:
            raise ValueError(f"{path}: tensor '{name}': data_offsets [{begin}, {end}] do not "
                             f"hold shape {list(shape)} x {dtype} ({need} bytes)")
        array = np.frombuffer(buffer[begin:end], dtype=_DTYPES[dtype]).reshape(shape)
        tensors[name] = RawTensor(dtype, shape, array)
    return tensors, dict(metadata)


def check_aliases(entries: Iterable[str], aliases: Mapping[str, str]) -> None:
    """The sharing rule's constraints on `__metadata__` aliases (docs/cli.md): each value is an
    entry of the file, and no key is itself an entry (the entry would win). ValueError naming
    the alias otherwise."""
    names = set(entries)
    for alias, target in aliases.items():
        if alias in names:
            raise ValueError(f"alias '{alias}' is also the name of a Hessian written "
                             f"(the entry would win)")
        if target not in names:
            raise ValueError(f"alias '{alias}' names '{target}', which is not one of the "
                             f"Hessians written")
        if not alias.endswith(HESSIAN_SUFFIX):
            raise ValueError(f"alias '{alias}' must end with '{HESSIAN_SUFFIX}'")


def _check_hessian(name: str, h: np.ndarray) -> None:
    if not name.endswith(HESSIAN_SUFFIX):
        raise ValueError(f"Hessian entry '{name}' must end with '{HESSIAN_SUFFIX}'")
    full = h.ndim == 2 and h.shape[0] == h.shape[1] and h.shape[0] % 16 == 0
    blocks = h.ndim == 3 and h.shape[1:] == (16, 16)
    if not (full or blocks) or h.shape[0] == 0:
        raise ValueError(f"Hessian '{name}': shape {list(h.shape)} is neither [in, in] nor "
                         f"[in/16, 16, 16] with in a positive multiple of 16")
    if not np.all(np.isfinite(h)):
        raise ValueError(f"Hessian '{name}': non-finite values")


def _scalar(name: str, value: float) -> np.ndarray:
    v = np.float32(value)
    if not np.isfinite(v) or v < 0:
        raise ValueError(f"{name} = {value} must be finite and >= 0")
    return np.array(v, dtype=np.float32)


def write_hessians(path: str, hessians: Mapping[str, np.ndarray], *,
                   input_amax: Optional[Mapping[str, float]] = None,
                   output_amax: Optional[Mapping[str, float]] = None,
                   aliases: Optional[Mapping[str, str]] = None,
                   tokens: Optional[Mapping[str, int]] = None,
                   metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes a Hessians file that `nvfp4cal quantize --hessians` accepts.

    hessians: entry name `<module>.hessian` -> fp32 [in, in] or [in/16, 16, 16].
    input_amax: entry name -> amax, written as `<module>.input_amax`.
    output_amax: module name -> amax, written as `<module>.output_amax`.
    aliases: `<module>.hessian` -> entry name (the sharing rule).
    tokens: entry name -> token count (`tokens.<entry>` in the metadata, as the C++ writer).
    Everything is checked before anything is written; ValueError names what is wrong."""
    tensors: Dict[str, TensorLike] = {}
    for name, h in hessians.items():
        array = np.asarray(h, dtype=np.float32)
        _check_hessian(name, array)
        tensors[name] = array
    aliases = dict(aliases or {})
    check_aliases(tensors.keys(), aliases)
    for entry, amax in (input_amax or {}).items():
        if entry not in tensors:
            raise ValueError(f"input amax for '{entry}', which is not a Hessian entry")
        stem = entry[:-len(HESSIAN_SUFFIX)]
        tensors[stem + ".input_amax"] = _scalar(stem + ".input_amax", amax)
    for module, amax in (output_amax or {}).items():
        name = module + ".output_amax"
        if name in tensors:
            raise ValueError(f"'{name}' collides with another entry")
        tensors[name] = _scalar(name, amax)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    overlap = set(meta) & set(aliases)
    if overlap:
        raise ValueError(f"metadata keys {sorted(overlap)} collide with aliases")
    meta.update(aliases)
    for entry, count in (tokens or {}).items():
        meta["tokens." + entry] = str(int(count))
    write_safetensors(path, tensors, meta)


def resolve_hessian_entry(module: str, entries: Iterable[str],
                          metadata: Mapping[str, str]) -> Optional[str]:
    """The entry that serves `module` under the CLI's sharing rule (own entry, then alias, then
    the fused siblings q/k/v, gate/up, w1/w3), or None. ValueError for a dangling alias."""
    names = set(entries)
    own = module + HESSIAN_SUFFIX
    alias = metadata.get(own)
    if alias is not None and alias not in names:
        raise ValueError(f"__metadata__ alias '{own}' (for {module}) names entry '{alias}', "
                         f"which the file does not hold")
    if own in names:
        return own
    if alias is not None:
        return alias
    parent, _, leaf = module.rpartition(".")
    prefix = parent + "." if parent else ""
    for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3")):
        if leaf in group:
            for sibling in group:
                if prefix + sibling + HESSIAN_SUFFIX in names:
                    return prefix + sibling + HESSIAN_SUFFIX
    return None
