"""`qwen2vl-jax plan`: per-device bytes of the parameters, KV cache and largest activation on a mesh
(`qwen2vl_jax.sharding.plan`), or its tables (`--table`, `--rules`)."""

from __future__ import annotations

import json

from .common import UserError, positive

COMPILES = False


def add_parser(subparsers):
    p = subparsers.add_parser("plan", help="per-device bytes of the parameters, KV cache and largest activation on a "
                                           "mesh")
    p.add_argument("--model", help="a preset (2b, 7b, 72b) or a checkpoint directory (its config.json)")
    p.add_argument("--mesh", default="data=1,fsdp=1,model=1", help="mesh axis sizes, e.g. data=1,fsdp=1,model=8")
    p.add_argument("--batch", type=positive(int), default=1, help="rows of the batch (default 1)")
    p.add_argument("--context", type=positive(int), help="tokens per row: prefill length and KV cache slots "
                                                         "(default: the model's max_position_embeddings)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="weights and activations")
    p.add_argument("--scan-layers", action="store_true", help="plan stacked [L, ...] layers (the same totals)")
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="the text decoder's projections as int8 / int4 weights with their scales (a quantized "
                        "checkpoint directory is planned as stored)")
    p.add_argument("--json", action="store_true", help="print one JSON object (exact bytes)")
    p.add_argument("--table", action="store_true",
                   help="print docs/SCALING.md's markdown table (2B / 7B / 72B on common TPU and GPU slices)")
    p.add_argument("--rules", action="store_true", help="print the sharding rules as a markdown table")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from pathlib import Path

    from ..modeling.config import PRESETS, Qwen2VLConfig
    from ..sharding import plan as plan_lib
    from ..sharding.mesh import parse_mesh

    if args.table or args.rules:
        print(plan_lib.plan_table() if args.table else plan_lib.rules_table())
        return 0
    if args.model is None:
        raise UserError("plan needs --model (a preset: 2b, 7b, 72b, or a checkpoint directory), or --table / --rules")
    try:
        mesh = parse_mesh(args.mesh)
    except ValueError as e:
        raise UserError(str(e)) from None
    model = None
    if args.model.lower() in PRESETS:
        config = PRESETS[args.model.lower()]()
    elif Path(args.model).is_dir():
        config = Qwen2VLConfig.from_hf(args.model)  # a bad config.json is a ConfigError: one line
        model = stored_model(Path(args.model), config, args)
    else:
        raise UserError(f"--model {args.model!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory")
    try:
        result = plan_lib.plan(config, mesh, batch=args.batch, context=args.context or
                               config.text_config.max_position_embeddings, dtype=args.dtype,
                               scan_layers=args.scan_layers, name=args.model, quantization=args.quantize,
                               model=model)
    except ValueError as e:  # batch / context out of range, a mesh the rules cannot use
        raise UserError(str(e)) from None
    print(json.dumps(result.as_dict()) if args.json else result.text())
    return 0


def stored_model(directory, config, args):
    """The abstract model of a quantized checkpoint directory, quantized as it stores (None: a full-precision one,
    which `--quantize` quantizes as loading would)."""
    from ..checkpoints.keymap import OURS_LAYOUT, CheckpointError, hf_layout
    from ..checkpoints.load import is_ours, read_quantization
    from ..quantization import QuantizationError, quantize_abstract
    from ..sharding import plan as plan_lib

    try:
        stored = read_quantization(directory, OURS_LAYOUT if is_ours(directory) else hf_layout(config.vision_config))
    except CheckpointError as e:
        raise UserError(str(e)) from None
    if stored is None:
        return None
    if args.quantize is not None and args.quantize != stored.mode:
        raise UserError(f"{directory} is stored quantized to {stored.mode}; it cannot be loaded as {args.quantize}")
    model = plan_lib.abstract(config, args.dtype, args.scan_layers)
    try:
        return quantize_abstract(model, stored)
    except QuantizationError as e:
        raise UserError(f"{directory}: {e}") from None
