"""The Python commands: `calibrate` and `calibrate-quantize`.

    python -m nvfp4cal calibrate --model DIR --data FILE --out hessians.safetensors
    nvfp4cal-calibrate --model DIR --data FILE --out hessians.safetensors      # same
    nvfp4cal-calibrate-quantize --model DIR --data FILE --out DIR-nvfp4 [quantize options]
    python -m nvfp4cal finetune-scales --model DIR --checkpoint DIR-nvfp4 --data FILE --out DIR

`calibrate` runs the model over calibration samples with nvfp4cal.capture and writes the
Hessians file `nvfp4cal quantize --hessians` reads. `calibrate-quantize` then runs the C++
`nvfp4cal quantize` (in-process, or on servers with --server) with every option it does not
know itself passed through. Exit codes as the C++ CLI: 0 success, 1 failure (one line
`nvfp4cal COMMAND: error: MESSAGE` on stderr), 2 bad command line. Nothing is written on
failure: the Hessians file appears whole (temporary file + rename) or not at all.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from . import __version__
from . import finetune
from .capture import LAYOUTS, METHODS, CaptureMemoryError, capture
from .data import TOKEN_DTYPES, ByteTokenizer, DataError, HFTokenizer, batches, count_tokens
from .data import make_samples, read_documents
from .sequential import LocalServer, SequentialError, calibrate_sequential, find_server_binary

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


class CalibrateError(Exception):
    """A failure reported as `nvfp4cal calibrate: error: MESSAGE` (exit code 1)."""


def _log(args, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


# --- command line ------------------------------------------------------------------------------


def add_calibrate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="Hugging Face model folder (config.json + weights)")
    p.add_argument("--data", required=True, action="append", metavar="FILE",
                   help="calibration data: UTF-8 text, .jsonl with a \"text\" field, .npy or "
                        ".bin token ids; repeat for several files")
    p.add_argument("--samples", type=int, default=128, metavar="N",
                   help="calibration samples (windows of --seq-len tokens), default 128")
    p.add_argument("--seq-len", type=int, default=None, metavar="L",
                   help="tokens per sample, default min(2048, the model's max positions)")
    p.add_argument("--batch", type=int, default=8, metavar="B", help="samples per forward (8)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where the model runs and the Hessians accumulate (auto: cuda if usable)")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="bf16", help="model dtype (bf16)")
    p.add_argument("--layout", choices=LAYOUTS, default="auto",
                   help="Hessian layout: full [in, in], block [in/16, 16, 16], auto: by --method")
    p.add_argument("--method", choices=METHODS, default="dss",
                   help="the quantize method the Hessians are for (gptq needs full), default dss")
    p.add_argument("--accumulate", choices=("fp32", "fp64"), default="fp32",
                   help="accumulation precision of sum x x^T (fp32)")
    p.add_argument("--seed", type=int, default=0, help="sample selection seed (0)")
    p.add_argument("--tokenizer", default="auto", metavar="auto|bytes|DIR",
                   help="auto: the model folder's tokenizer; bytes: UTF-8 bytes as ids "
                        "(byte-level models); or a tokenizer folder")
    p.add_argument("--token-dtype", choices=tuple(TOKEN_DTYPES), default=None,
                   help="element type of raw .bin token files")
    p.add_argument("--include", action="append", default=[], metavar="GLOB",
                   help="capture only matching modules (fnmatch on module names)")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="do not capture matching modules")
    p.add_argument("--no-default-excludes", action="store_true",
                   help="also capture lm_head, embeddings and routers")
    p.add_argument("--model-loader", metavar="MODULE:FUNCTION",
                   help="advanced: FUNCTION(model_dir, dtype, device) returns the torch model "
                        "instead of transformers' AutoModelForCausalLM; it is called as "
                        "model(input_ids=..., attention_mask=...)")
    p.add_argument("--sequential", action="store_true",
                   help="layer by layer: each decoder layer's Hessians captured with the earlier "
                        "layers replaced by their dequantized NVFP4 weights (quantized through "
                        "--server, or a local nvfp4cal-server started for the run)")
    p.add_argument("--nvfp4cal-server", metavar="PATH",
                   help="--sequential without --server: the nvfp4cal-server binary to start on a "
                        "loopback port (default: $NVFP4CAL_SERVER_BIN, beside nvfp4cal, PATH)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or notes")


def add_quantize_arguments(p: argparse.ArgumentParser) -> None:
    """The `nvfp4cal quantize` options --sequential needs to quantize each layer as the final
    quantize will (the same names; calibrate-quantize reads them from what it passes through)."""
    g = p.add_argument_group("quantizing each layer (--sequential; as `nvfp4cal quantize`)")
    g.add_argument("--server", metavar="HOST:PORT[,...]", action="append", default=[],
                   help="nvfp4cal servers (default: a local nvfp4cal-server for the run)")
    g.add_argument("--timeout", type=float, default=0.0, metavar="SECONDS",
                   help="deadline of each server stream, 0 = none")
    g.add_argument("--retries", type=int, default=4, metavar="N",
                   help="attempts per tensor when a server is unavailable (4)")
    g.add_argument("--tls", action="store_true", help="connect to the servers with TLS")
    g.add_argument("--tls-ca", metavar="FILE", default=os.environ.get("NVFP4CAL_TLS_CA"))
    g.add_argument("--tls-cert", metavar="FILE", default=os.environ.get("NVFP4CAL_TLS_CERT"))
    g.add_argument("--tls-key", metavar="FILE", default=os.environ.get("NVFP4CAL_TLS_KEY"))
    g.add_argument("--token-file", metavar="FILE", default=os.environ.get("NVFP4CAL_TOKEN_FILE"))
    g.add_argument("--beta-step", type=float, metavar="X", help="dss beta grid spacing")
    g.add_argument("--gptq-damping", type=float, metavar="X")
    g.add_argument("--gptq-act-order", action="store_true")
    g.add_argument("--gptq-block-columns", type=int, metavar="N")
    g.add_argument("--gptq-scale-objective", choices=("hessian_block", "gptq_cost"))
    g.add_argument("--gptq-scale-search", choices=("sweep", "dss"))
    g.add_argument("--gptq-compare", action="store_true")
    g.add_argument("--gptq-hessian-layout", choices=("upper", "full"))
    g.add_argument("--fallback-method", choices=("max", "mse"))


_QUANTIZE_DESTS = ("server", "timeout", "retries", "tls", "tls_ca", "tls_cert", "tls_key",
                   "token_file", "beta_step", "gptq_damping", "gptq_act_order",
                   "gptq_block_columns", "gptq_scale_objective", "gptq_scale_search",
                   "gptq_compare", "gptq_hessian_layout", "fallback_method")


def _quantize_options_from(passthrough: List[str]) -> argparse.Namespace:
    """calibrate-quantize: the quantize options among those passed through to the C++ CLI."""
    parser = argparse.ArgumentParser(prog="nvfp4cal calibrate-quantize", add_help=False,
                                     allow_abbrev=False)
    add_quantize_arguments(parser)
    options, _ = parser.parse_known_args(passthrough)
    return options


def build_parser(prog: str = "python -m nvfp4cal") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="nvfp4cal Python front end "
                                     f"{__version__}: calibration Hessians from PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    cal = sub.add_parser("calibrate", allow_abbrev=False, help="write the Hessians file of a model",
                         description="Run a model over calibration data and write the Hessians "
                                     "file `nvfp4cal quantize --hessians` reads.")
    add_calibrate_arguments(cal)
    add_quantize_arguments(cal)
    cal.add_argument("--out", required=True, metavar="FILE", help="the Hessians file to write")
    cal.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    cq = sub.add_parser("calibrate-quantize", allow_abbrev=False,
                        help="calibrate, then nvfp4cal quantize",
                        description="calibrate, then run the C++ `nvfp4cal quantize` on the "
                                    "result; options not listed here (--server, --kv-cache, "
                                    "--gptq-*, --overwrite, ...) are passed to it. With "
                                    "--sequential its --server, --beta-step, --gptq-*, "
                                    "--fallback-method, TLS and token options also say how "
                                    "each layer is quantized during the calibration.")
    add_calibrate_arguments(cq)
    cq.add_argument("--out", required=True, metavar="DIR", help="the NVFP4 checkpoint folder")
    cq.add_argument("--nvfp4cal", metavar="PATH",
                    help="the nvfp4cal binary (default: $NVFP4CAL_BIN, then nvfp4cal on PATH)")
    cq.add_argument("--keep-hessians", metavar="FILE",
                    help="write the Hessians file here and keep it (default: a temporary file)")
    ft = sub.add_parser("finetune-scales", allow_abbrev=False,
                        help="fine-tune the block scales of an NVFP4 checkpoint",
                        description="Train the E4M3 block scales of an NVFP4 checkpoint (codes "
                                    "and weight_scale_2 fixed) by distillation from the "
                                    "unquantized model; write the checkpoint with only the "
                                    "weight_scale bytes changed.")
    finetune.add_arguments(ft)
    return parser


def _check_arguments(args) -> None:
    for name, value, low in (("--samples", args.samples, 1), ("--batch", args.batch, 1)):
        if value < low:
            raise CalibrateError(f"{name} = {value} must be >= {low}")
    if args.seq_len is not None and args.seq_len < 3:
        raise CalibrateError(f"--seq-len = {args.seq_len} must be >= 3")
    if args.layout == "block" and args.method == "gptq":
        raise CalibrateError("--method gptq needs --layout full (or auto): gptq propagates "
                             "errors across blocks")
    for path in args.data:
        if not os.path.isfile(path):
            raise CalibrateError(f"--data {path}: no such file")
    if not os.path.isdir(args.model):
        raise CalibrateError(f"--model {args.model}: no such folder")
    _check_quantize_arguments(args)


def _check_quantize_arguments(args) -> None:
    """The quantize options' rules, as the C++ CLI checks them (before any work is done)."""
    given = [d for d in ("server", "beta_step", "gptq_damping", "gptq_act_order",
                         "gptq_block_columns", "gptq_scale_objective", "gptq_scale_search",
                         "gptq_compare", "gptq_hessian_layout", "fallback_method")
             if getattr(args, d, None)]
    if args.command == "calibrate" and given and not args.sequential:
        raise CalibrateError(f"--{given[0].replace('_', '-')} applies with --sequential only "
                             "(it says how each layer is quantized)")
    if not args.sequential:
        if getattr(args, "nvfp4cal_server", None):
            raise CalibrateError("--nvfp4cal-server applies with --sequential only")
        return
    if args.method != "gptq":
        for d in ("gptq_damping", "gptq_act_order", "gptq_block_columns", "gptq_scale_objective",
                  "gptq_scale_search", "gptq_compare", "gptq_hessian_layout"):
            if getattr(args, d, None):
                raise CalibrateError(f"--{d.replace('_', '-')} applies to --method gptq only")
    if args.gptq_hessian_layout and not args.server:
        raise CalibrateError("--gptq-hessian-layout applies with --server only")
    if args.server and args.nvfp4cal_server:
        raise CalibrateError("give --server or --nvfp4cal-server, not both")
    checks = (("--beta-step", args.beta_step, 0.005, 0.5),
              ("--gptq-damping", args.gptq_damping, 0, 10),
              ("--gptq-block-columns", args.gptq_block_columns, 16, 8192),
              ("--retries", args.retries, 1, 100), ("--timeout", args.timeout, 0, 1e7))
    for flag, value, low, high in checks:
        if value is not None and not low <= value <= high:
            raise CalibrateError(f"{flag} = {value} is out of range [{low}, {high}]")
    if args.gptq_block_columns is not None and args.gptq_block_columns % 16:
        raise CalibrateError(f"--gptq-block-columns = {args.gptq_block_columns} is not a "
                             "multiple of 16")


def _check_out_file(args, out: str) -> None:
    if os.path.isdir(out):
        raise CalibrateError(f"--out {out} is a folder; give the Hessians file's path")
    if os.path.exists(out) and not getattr(args, "overwrite", False):
        raise CalibrateError(f"--out {out} already exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise CalibrateError(f"--out {out}: folder {parent} does not exist")
    for path in args.data:
        if os.path.exists(out) and os.path.samefile(out, path):
            raise CalibrateError(f"--out {out} is the --data file {path}")


# --- model -------------------------------------------------------------------------------------


def read_model_config(model_dir: str) -> Dict[str, Any]:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as error:
        raise CalibrateError(f"--model {model_dir}: config.json: {error}") from None
    if not isinstance(config, dict):
        raise CalibrateError(f"--model {model_dir}: config.json is not a JSON object")
    return config


def _config_value(config: Dict[str, Any], keys: Sequence[str]) -> Optional[int]:
    for scope in (config, config.get("text_config") or {}):
        for key in keys:
            if isinstance(scope.get(key), int):
                return scope[key]
    return None


def _import_transformers():
    try:
        return importlib.import_module("transformers")
    except ImportError:
        raise CalibrateError("loading a Hugging Face model needs transformers: "
                             "pip install 'nvfp4cal[hf]' (or pip install transformers)") from None


def load_model(args, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The model of --model: AutoModelForCausalLM, or --model-loader's."""
    if args.model_loader:
        module_name, _, function = args.model_loader.partition(":")
        try:
            loader = getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError) as error:
            raise CalibrateError(f"--model-loader {args.model_loader}: {error}") from None
        model = loader(args.model, dtype, device)
    else:
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise CalibrateError(f"--model {args.model}: no config.json")
        transformers = _import_transformers()
        # transformers 4.56 renamed torch_dtype to dtype.
        version = tuple(int(p) for p in transformers.__version__.split(".")[:2] if p.isdigit())
        key = "dtype" if version >= (4, 56) else "torch_dtype"
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, **{key: dtype})
        if hasattr(model, "config"):
            model.config.use_cache = False
    model = model.to(device)
    model.eval()
    return model


def load_tokenizer(args):
    if args.tokenizer == "bytes":
        return ByteTokenizer()
    source = args.model if args.tokenizer == "auto" else args.tokenizer
    if not any(os.path.exists(os.path.join(source, f)) for f in _TOKENIZER_FILES):
        raise CalibrateError(f"--tokenizer {args.tokenizer}: {source} has no tokenizer files "
                             f"({', '.join(_TOKENIZER_FILES)}); for a byte-level model pass "
                             "--tokenizer bytes, or use pre-tokenized .npy / .bin data")
    transformers = _import_transformers()
    return HFTokenizer(transformers.AutoTokenizer.from_pretrained(source))


def _needs_tokenizer(paths: Sequence[str]) -> bool:
    return any(not p.endswith((".npy", ".bin")) for p in paths)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CalibrateError("--device cuda: no usable GPU (torch.cuda.is_available() is False)")
    return torch.device(name)


# --- calibrate ---------------------------------------------------------------------------------


def _progress(args, total: int):
    if args.quiet or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    except ImportError:
        return None
    return tqdm(total=total, unit="tok", unit_scale=True, desc="calibrate", file=sys.stderr)


def calibrate(args, out: str) -> Dict[str, Any]:
    """Runs the calibration and writes the Hessians file `out`; returns a summary."""
    _check_arguments(args)
    _check_out_file(args, out)
    config = read_model_config(args.model)
    max_positions = _config_value(config, _POSITION_KEYS)
    seq_len = args.seq_len or min(2048, max_positions or 2048)
    if max_positions is not None and seq_len > max_positions:
        raise CalibrateError(f"--seq-len {seq_len} is above the model's max_position_embeddings "
                             f"{max_positions} (config.json)")
    tokenizer = load_tokenizer(args) if _needs_tokenizer(args.data) else ByteTokenizer()
    docs = read_documents(args.data, tokenizer, args.token_dtype,
                          vocab_size=_config_value(config, ("vocab_size",)))
    samples = make_samples(docs, seq_len, args.samples, args.seed, tokenizer.bos_id)
    tokens, count = count_tokens(samples)
    if count < args.samples:
        _log(args, f"note: the data holds {count} samples of <= {seq_len} tokens, fewer than "
                   f"--samples {args.samples}: using all")
    device = _device(args.device)
    description = {"model": os.path.abspath(args.model),
                   "data": [os.path.abspath(p) for p in args.data],
                   "samples": count, "seq_len": seq_len, "seed": args.seed,
                   "tokenizer": tokenizer.name, "dtype": args.dtype, "method": args.method}
    if args.sequential:
        with _SequentialQuantizer(args, device) as client:  # checked before the model loads
            model = load_model(args, _DTYPES[args.dtype], device)
            return _calibrate_sequential(args, model, client, samples, tokenizer, device, out,
                                         description, tokens, count, seq_len)
    model = load_model(args, _DTYPES[args.dtype], device)
    accumulate = torch.float64 if args.accumulate == "fp64" else torch.float32
    cap = capture(model, layout=args.layout, method=args.method, dtype=accumulate,
                  include=args.include, exclude=args.exclude,
                  default_excludes=not args.no_default_excludes, verbose=not args.quiet)
    bar = _progress(args, tokens)
    start = time.monotonic()
    with cap, torch.no_grad():
        for batch in batches(samples, args.batch, tokenizer.pad_id):
            ids = batch.input_ids.to(device)
            mask = batch.attention_mask.to(device)
            cap.set_mask(mask)
            model(input_ids=ids, attention_mask=mask)
            if bar is not None:
                bar.update(int(batch.attention_mask.sum()))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.monotonic() - start
    if bar is not None:
        bar.close()
    cap.save(out, metadata={"nvfp4cal.calibration": json.dumps(description)})
    summary = {"out": out, "tokens": tokens, "samples": count, "seconds": seconds,
               "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
               "entries": len(cap.groups()), "modules": len(cap.modules), "layout": cap.layout}
    _log(args, f"nvfp4cal calibrate: {tokens} tokens ({count} samples x <= {seq_len}) through "
               f"{summary['modules']} Linear modules in {seconds:.2f} s "
               f"({summary['tokens_per_second']:.0f} tokens/s); {summary['entries']} Hessians "
               f"({cap.layout}) written to {out}")
    return summary


class _SequentialQuantizer:
    """--sequential's client: to --server (each address asked for its ServerInfo first), or to
    a local nvfp4cal-server started on a loopback port for the run."""

    def __init__(self, args, device: torch.device) -> None:
        self.args, self.device = args, device
        self.server: Optional[LocalServer] = None
        self.client = None

    def __enter__(self):
        args = self.args
        from .client import Client, ServerError  # pylint: disable=import-outside-toplevel
        if args.server:
            addresses = [a for value in args.server for a in value.split(",") if a]
            self.client = Client(addresses, tls=args.tls, tls_ca=args.tls_ca,
                                 tls_cert=args.tls_cert, tls_key=args.tls_key,
                                 token_file=args.token_file, timeout=args.timeout or None,
                                 max_attempts=args.retries)
        else:
            binary = find_server_binary(args.nvfp4cal_server, getattr(args, "nvfp4cal", None))
            self.server = LocalServer(binary, device="cpu" if self.device.type == "cpu" else "auto",
                                      log=lambda s: _log(args, s))
            self.client = self.server.client()
        errors, methods = [], None
        for index, address in enumerate(self.client.addresses):
            try:
                info = self.client.server_info(index)
                methods = [m.name for m in info.methods]
            except ServerError as error:
                errors.append(str(error))
        if methods is None:
            self.__exit__(None, None, None)
            raise CalibrateError("--sequential: no server answers: " + "; ".join(errors))
        if args.method not in methods:
            self.__exit__(None, None, None)
            raise CalibrateError(f"--sequential: the server does not offer --method {args.method} "
                                 f"(it offers {', '.join(methods)})")
        return self.client

    def __exit__(self, *_) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.server is not None:
            self.server.stop()
            self.server = None


def _calibrate_sequential(args, model, client, samples, tokenizer, device, out, description,
                          tokens, count, seq_len) -> Dict[str, Any]:
    params = {"beta_step": args.beta_step, "damping": args.gptq_damping,
              "act_order": True if args.gptq_act_order else None,
              "block_columns": args.gptq_block_columns,
              "scale_objective": args.gptq_scale_objective,
              "scale_search": args.gptq_scale_search,
              "compare_local_hessian": True if args.gptq_compare else None}
    data = [{"input_ids": b.input_ids.to(device), "attention_mask": b.attention_mask.to(device)}
            for b in batches(samples, args.batch, tokenizer.pad_id)]
    parent = os.path.dirname(os.path.abspath(out))
    spill = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.sequential-", dir=parent)
    try:
        result = calibrate_sequential(
            model, data, client, method=args.method, layout=args.layout,
            dtype=torch.float64 if args.accumulate == "fp64" else torch.float32,
            include=args.include, exclude=args.exclude,
            default_excludes=not args.no_default_excludes, params=params,
            fallback_method=args.fallback_method,
            full_hessian_layout=args.gptq_hessian_layout or "upper", spill_dir=spill,
            verbose=not args.quiet, log=lambda s: _log(args, s))
        description = dict(description, sequential=True)
        result.save(out, metadata={"nvfp4cal.calibration": json.dumps(description)})
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    seconds = result.seconds
    summary = {"out": out, "tokens": tokens, "samples": count, "seconds": seconds,
               "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
               "entries": len(result.hessians), "modules": len(result.modules),
               "layout": result.layout}
    _log(args, f"nvfp4cal calibrate --sequential: {tokens} tokens ({count} samples x <= {seq_len}) "
               f"through {result.num_layers} decoder layers, {summary['modules']} Linear modules "
               f"captured and quantized ({args.method}) in {seconds:.2f} s; "
               f"{summary['entries']} Hessians ({result.layout}) written to {out}")
    return summary


def _find_nvfp4cal(args) -> str:
    candidate = args.nvfp4cal or os.environ.get("NVFP4CAL_BIN") or shutil.which("nvfp4cal")
    if not candidate or not os.access(candidate, os.X_OK):
        raise CalibrateError("the C++ nvfp4cal binary was not found: pass --nvfp4cal PATH, set "
                             "NVFP4CAL_BIN, or put it on PATH (build/client/nvfp4cal)")
    return candidate


def calibrate_quantize(args, passthrough: List[str]) -> int:
    """calibrate into --keep-hessians (or a temporary file), then `nvfp4cal quantize`."""
    binary = _find_nvfp4cal(args)
    if args.sequential:
        vars(args).update(vars(_quantize_options_from(passthrough)))
    else:
        for dest in _QUANTIZE_DESTS:
            setattr(args, dest, None)
    if args.keep_hessians:
        hessians, temp_dir = args.keep_hessians, None
    else:
        parent = os.path.dirname(os.path.abspath(args.out))
        if not os.path.isdir(parent):
            raise CalibrateError(f"--out {args.out}: folder {parent} does not exist")
        temp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(args.out)}.hessians-", dir=parent)
        hessians = os.path.join(temp_dir, "hessians.safetensors")
    try:
        calibrate(args, hessians)
        command = [binary, "quantize", "--model", args.model, "--hessians", hessians,
                   "--out", args.out, "--method", args.method] + passthrough
        # The modules calibrate selected are the ones quantize quantizes.
        command += [a for g in args.include for a in ("--include", g)]
        command += [a for g in args.exclude for a in ("--exclude", g)]
        if args.no_default_excludes:
            command.append("--no-default-excludes")
        if args.quiet:
            command.append("--quiet")
        _log(args, "running: " + " ".join(command))
        return subprocess.run(command, check=False).returncode
    finally:
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def main(argv: Optional[List[str]] = None, prog: str = "python -m nvfp4cal") -> int:
    parser = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "calibrate-quantize":
        args, passthrough = parser.parse_known_args(argv)
    else:
        args, passthrough = parser.parse_args(argv), []
    try:
        if args.command == "calibrate":
            calibrate(args, args.out)
            return 0
        if args.command == "finetune-scales":
            finetune.run_command(args)
            return 0
        return calibrate_quantize(args, passthrough)
    except (CalibrateError, DataError, CaptureMemoryError, SequentialError, ValueError,
            RuntimeError, OSError) as error:
        if os.environ.get("NVFP4CAL_DEBUG"):
            raise
        print(f"nvfp4cal {args.command}: error: {error}", file=sys.stderr)
        return 1


def calibrate_main() -> int:
    """Console script `nvfp4cal-calibrate` = `python -m nvfp4cal calibrate`."""
    return main(["calibrate"] + sys.argv[1:], prog="nvfp4cal-calibrate")


def calibrate_quantize_main() -> int:
    """Console script `nvfp4cal-calibrate-quantize`."""
    return main(["calibrate-quantize"] + sys.argv[1:], prog="nvfp4cal-calibrate-quantize")


def finetune_scales_main() -> int:
    """Console script `nvfp4cal-finetune-scales` = `python -m nvfp4cal finetune-scales`."""
    return main(["finetune-scales"] + sys.argv[1:], prog="nvfp4cal-finetune-scales")
