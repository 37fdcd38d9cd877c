"""`qwen2vl-jax finetune`: the command's flags and entry point (the loop itself is `training/finetune.py`, imported
only when the command runs, so building the parser imports no JAX)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..modeling.config import REMAT_POLICIES
from .common import non_negative_float, seed

COMPILES = True  # runs the model: takes --no-compile-cache


def add_parser(subparsers) -> argparse.ArgumentParser:
    """`qwen2vl-jax finetune ...`: registered by `cli.app.build_parser`."""
    p = subparsers.add_parser("finetune", help="fine-tune on a JSONL of conversations (LoRA or full)",
                              description="Fine-tune Qwen2-VL on a JSONL of conversations (docs/TRAINING.md).")
    p.add_argument("--model", required=True, help="Hub model id or checkpoint directory")
    p.add_argument("--data", required=True, help="training JSONL (one conversation per line)")
    p.add_argument("--out", required=True, help="output directory (checkpoints, metrics, adapter / model)")
    p.add_argument("--eval-data", help="evaluation JSONL: loss over all of it every --eval-every steps and at the end")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--lora-rank", type=int, metavar="R", help="train LoRA adapters of rank R")
    what.add_argument("--full", action="store_true", help="train every weight")
    p.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: 2 x rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--lora-targets", help="comma-separated module names (PEFT's rule; default: q/k/v/o, gate/up/down)")
    p.add_argument("--vision-lora", action="store_true", help="adapt the vision blocks too")
    p.add_argument("--freeze-vision", action="store_true", help="full tuning with the vision tower frozen (not its "
                   "merger)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: 2e-4 LoRA, 1e-5 full)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--steps", type=int, help="optimizer steps")
    steps.add_argument("--epochs", type=float, help="passes over the data (default: 1)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-length", type=int, help="cut longer conversations to this many tokens")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps (and always at the end)")
    p.add_argument("--eval-every", type=int, help="eval every N steps (and at the end)")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=non_negative_float, default=1.0, help="global-norm clipping (0: off)")
    p.add_argument("--seed", type=seed, default=0, help="LoRA init, dropout and data order, 0..2**63-1 (default 0)")
    p.add_argument("--remat", choices=REMAT_POLICIES, help="rematerialise each layer (less memory, more compute)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="QLoRA: quantize the base's text decoder projections and output projection as it loads "
                        "(int8 per channel, int4 in groups of 128) and train the LoRA adapters over them")
    p.add_argument("--attn-implementation", metavar="NAME", help="attention backend (see `generate --help`)")
    p.add_argument("--min-pixels", type=int, help="lower bound on pixels per image (processor override)")
    p.add_argument("--max-pixels", type=int, help="upper bound on pixels per image (processor override)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--offline", action="store_true", help="never download (same as HF_HUB_OFFLINE=1)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """The `finetune` command (its FinetuneError / DataError / LoRAError are user errors for `cli.main`)."""
    if args.offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    from ..training.finetune import FinetuneConfig, finetune

    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()] if args.lora_targets else None
    cfg = FinetuneConfig(
        model=args.model, data=args.data, out=args.out, eval_data=args.eval_data, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lora_targets=targets,
        vision_lora=args.vision_lora, freeze_vision=args.freeze_vision, lr=args.lr, steps=args.steps,
        epochs=args.epochs, batch_size=args.batch_size, grad_accum=args.grad_accum, max_length=args.max_length,
        save_every=args.save_every, eval_every=args.eval_every, warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm or None, seed=args.seed,
        remat=args.remat, dtype=args.dtype, resume=args.resume, attn_implementation=args.attn_implementation,
        min_pixels=args.min_pixels, max_pixels=args.max_pixels, quantize=args.quantize)
    result = finetune(cfg, progress=not args.quiet)  # user errors: one line, exit 2, through cli.main
    if args.json:
        print(json.dumps(result))
    elif not args.quiet:
        ev, paths = result["eval"], result["paths"]
        loss = "n/a" if result["loss"] is None else f"{result['loss']:.4f}"
        print(f"done: {result['steps']} steps, loss {loss}" + (f", eval loss {ev['loss']:.4f}" if ev else "")
              + f" -> {paths.get('adapter') or paths.get('model')}", file=sys.stderr, flush=True)
    return 0
