"""The command line of `python -m nvfp4cal finetune-scales` (finetune.py re-exports both
functions): its options, and reading the data and the model before finetune_scales runs.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict

from .finetune_checkpoint import FinetuneError, check_out, read_nvfp4_modules


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
    from .finetune import finetune_scales, split_windows  # finetune imports this module

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
