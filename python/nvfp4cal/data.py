"""Calibration data: files -> token documents -> fixed-length samples -> padded batches.

Files (by extension): `.jsonl` one JSON object per line with a string field `text`; `.npy`
integer token ids (1-D: one document, 2-D: one document per row); `.bin` raw token ids of
`token_dtype` (uint8, uint16 or int32, little-endian); anything else UTF-8 text, the whole
file one document. Text is tokenized with the model's tokenizer or byte by byte.

Samples: every document is cut into non-overlapping windows of `seq_len` tokens (a shorter
document is one shorter sample, padded and masked in its batch); when the tokenizer has a BOS
token, each window starts with it. `samples` windows are drawn without replacement with numpy's
default_rng(seed), so the same files and seed give the same samples.

    docs = read_documents(paths, ByteTokenizer())
    samples = make_samples(docs, seq_len=256, count=128, seed=0, bos_id=None)
    for ids, mask in batches(samples, batch_size=8, pad_id=0): ...
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

TOKEN_DTYPES = {"uint8": np.dtype("u1"), "uint16": np.dtype("<u2"), "int32": np.dtype("<i4")}


class DataError(ValueError):
    """Calibration data that cannot be used; the message names the file and the value."""


class ByteTokenizer:
    """UTF-8 bytes as token ids (vocabulary 256), for byte-level models."""
    bos_id: Optional[int] = None
    pad_id: int = 0
    name = "bytes"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)


class HFTokenizer:
    """A transformers tokenizer; special tokens are added per sample (BOS), not per text."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.name = type(tokenizer).__name__
        adds_bos = getattr(tokenizer, "add_bos_token", True)
        self.bos_id = tokenizer.bos_token_id if adds_bos else None
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    def encode(self, text: str) -> np.ndarray:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return np.asarray(ids, dtype=np.int64)


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        blob = f.read()
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"--data {path}: not UTF-8 text (byte {error.start}); pre-tokenized "
                        "ids belong in a .npy or .bin file") from None


def _read_jsonl(path: str) -> List[str]:
    texts = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"--data {path}: line {number} is not JSON: {error.msg}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"--data {path}: line {number} has no string field \"text\"")
        texts.append(record["text"])
    return texts


def _read_token_ids(path: str, token_dtype: Optional[str]) -> List[np.ndarray]:
    if path.endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as error:
            raise DataError(f"--data {path}: not a .npy array: {error}") from None
        if array.dtype.kind not in "iu" or array.ndim not in (1, 2):
            raise DataError(f"--data {path}: token ids must be a 1-D or 2-D integer array, got "
                            f"{array.ndim}-D {array.dtype}")
        rows = [array] if array.ndim == 1 else list(array)
    else:
        if token_dtype is None:
            raise DataError(f"--data {path}: a raw .bin file needs --token-dtype "
                            f"({', '.join(TOKEN_DTYPES)})")
        dtype = TOKEN_DTYPES[token_dtype]
        size = os.path.getsize(path)
        if size % dtype.itemsize:
            raise DataError(f"--data {path}: {size} bytes is not a multiple of {dtype.itemsize} "
                            f"(--token-dtype {token_dtype})")
        rows = [np.fromfile(path, dtype=dtype)]
    docs = [np.asarray(r, dtype=np.int64) for r in rows]
    for doc in docs:
        if doc.size and doc.min() < 0:
            raise DataError(f"--data {path}: negative token id {int(doc.min())}")
    return docs


def read_documents(paths: Sequence[str], tokenizer, token_dtype: Optional[str] = None,
                   vocab_size: Optional[int] = None) -> List[np.ndarray]:
    """The token documents of every file, in order. DataError for a missing, malformed or
    empty file, or a token id >= vocab_size."""
    docs: List[np.ndarray] = []
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"--data {path}: no such file")
        if path.endswith((".npy", ".bin")):
            file_docs = _read_token_ids(path, token_dtype)
        else:
            texts = _read_jsonl(path) if path.endswith(".jsonl") else [_read_text(path)]
            file_docs = [tokenizer.encode(t) for t in texts if t]
        file_docs = [d for d in file_docs if d.size]
        if not file_docs:
            raise DataError(f"--data {path}: no tokens (empty file or no text)")
        if vocab_size is not None:
            largest = max(int(d.max()) for d in file_docs)
            if largest >= vocab_size:
                raise DataError(f"--data {path}: token id {largest} >= the model's vocab_size "
                                f"{vocab_size} (wrong tokenizer or --token-dtype?)")
        docs.extend(file_docs)
    return docs


def make_samples(docs: Sequence[np.ndarray], seq_len: int, count: int, seed: int,
                 bos_id: Optional[int] = None) -> List[np.ndarray]:
    """`count` windows of at most `seq_len` tokens (see the module docstring), in document
    order. All windows when there are fewer than `count`."""
    if seq_len < 2 or (bos_id is not None and seq_len < 3):
        raise DataError(f"--seq-len {seq_len} is too short")
    body = seq_len - (1 if bos_id is not None else 0)
    windows: List[np.ndarray] = []
    for doc in docs:
        starts = range(0, max(1, doc.size - body + 1), body) if doc.size >= body else [0]
        for s in starts:
            piece = doc[s:s + body]
            windows.append(piece if bos_id is None else np.concatenate([[bos_id], piece]))
    if not windows:
        raise DataError("the calibration data holds no tokens")
    if count < len(windows):
        rng = np.random.default_rng(seed)
        chosen = np.sort(rng.choice(len(windows), size=count, replace=False))
        windows = [windows[i] for i in chosen]
    return windows


@dataclass
class Batch:
    input_ids: torch.Tensor       # int64 [batch, longest]
    attention_mask: torch.Tensor  # int64 [batch, longest], 0 on right padding


def batches(samples: Sequence[np.ndarray], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Right-padded batches of the samples, in order."""
    for begin in range(0, len(samples), batch_size):
        group = samples[begin:begin + batch_size]
        longest = max(s.size for s in group)
        ids = np.full((len(group), longest), pad_id, dtype=np.int64)
        mask = np.zeros((len(group), longest), dtype=np.int64)
        for row, sample in enumerate(group):
            ids[row, :sample.size] = sample
            mask[row, :sample.size] = 1
        yield Batch(torch.from_numpy(ids), torch.from_numpy(mask))


def count_tokens(samples: Sequence[np.ndarray]) -> Tuple[int, int]:
    """(tokens, samples)."""
    return int(sum(s.size for s in samples)), len(samples)
