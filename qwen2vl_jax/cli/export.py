"""`qwen2vl-jax export`: lower one program for TPU, CUDA and / or CPU with `jax.export` (abstract weights, no
checkpoint needed) and write `program.jax_exported` + `manifest.json` (`qwen2vl_jax.export`)."""

from __future__ import annotations

import json
import os

from .common import UserError, positive

COMPILES = False  # lowering only: XLA compiles nothing

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
MAX_VIRTUAL_DEVICES = 1024  # each virtual CPU device costs the process memory and threads: a pod slice's count


def add_parser(subparsers):
    p = subparsers.add_parser("export", help="lower a program (vision, prefill, decode, engine_step, train) for "
                                             "TPU / CUDA / CPU "
                                             "with jax.export and write the artifact")
    p.add_argument("--model", required=True, help="a preset (2b, 7b, 72b, 2.5-3b, 2.5-7b, 2.5-32b, 2.5-72b) or a "
                                                   "checkpoint directory (only its config.json is read)")
    p.add_argument("--program", required=True, choices=["vision", "prefill", "decode", "engine_step", "train"])
    p.add_argument("--platform", required=True,
                   help="tpu, cuda, rocm or cpu; several comma-separated (one program carrying each one's kernels)")
    p.add_argument("--mesh", help="mesh axis sizes, e.g. data=2,model=4 (default: one device)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="weights and activations")
    p.add_argument("--batch", type=positive(int), default=1, help="rows (default 1)")
    p.add_argument("--prompt-len", type=positive(int), default=1024,
                   help="prefill / train: tokens per row (default 1024)")
    p.add_argument("--cache-len", type=positive(int), default=2048, help="decode: KV cache slots (default 2048)")
    p.add_argument("--vision-grid", default="1,32,32",
                   help="vision / prefill: one image's (t,h,w) in 14-pixel patches (default 1,32,32: 448x448); "
                        "'none' for a text-only prefill")
    p.add_argument("--lora-rank", type=positive(int), default=16, help="train: the LoRA adapters' rank")
    p.add_argument("--scan-layers", action="store_true", help="stacked layers under one jax.lax.scan")
    p.add_argument("--quantize", choices=["int8", "int4"], help="the text decoder's projections as int8 / int4 "
                                                                "weights (qwen2vl_jax.quantization)")
    p.add_argument("--attn-implementation", help="attention backend (default: auto, each platform's own kernels)")
    p.add_argument("--out", required=True, help="the artifact folder")
    p.set_defaults(func=run)
    return p


def _grid(text: str):
    if text.strip().lower() == "none":
        return None
    parts = text.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"--vision-grid {text!r}: give t,h,w as three positive integers (or 'none')")
    return tuple(int(p) for p in parts)


def _ensure_devices(n: int) -> None:
    """A mesh of n devices lowers on n virtual CPU devices: ask XLA for them before JAX starts its CPU client."""
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and DEVICE_COUNT_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={n}".strip()


def run(args) -> int:
    from ..sharding.mesh import parse_mesh

    try:
        mesh = parse_mesh(args.mesh) if args.mesh else None
    except ValueError as e:
        raise UserError(str(e)) from None
    if mesh:
        devices = mesh["data"] * mesh["fsdp"] * mesh["model"]
        if devices > MAX_VIRTUAL_DEVICES:
            raise UserError(f"--mesh {args.mesh}: {devices} devices; this command lowers on at most "
                            f"{MAX_VIRTUAL_DEVICES} virtual CPU devices")
        _ensure_devices(devices)
    from ..attention import AttentionBackendError
    from ..export import Shapes, export_program

    platforms = tuple(p.strip() for p in args.platform.split(",") if p.strip())
    shapes = Shapes(batch=args.batch, prompt_len=args.prompt_len, cache_len=args.cache_len,
                    vision_grid=_grid(args.vision_grid), lora_rank=args.lora_rank, quantization=args.quantize)
    try:
        art = export_program(args.model, args.program, platforms=platforms, mesh=mesh, dtype=args.dtype,
                             shapes=shapes, attn_implementation=args.attn_implementation,
                             scan_layers=args.scan_layers or None)
    except (ValueError, AttentionBackendError) as e:
        raise UserError(str(e)) from None
    out = art.save(args.out)
    m = art.manifest
    print(json.dumps({"out": str(out), "program": m["program"], "platforms": m["platforms"],
                      "nr_devices": m["nr_devices"], "custom_calls": m["custom_calls"],
                      "module_bytes": m["module_bytes"], "export_seconds": m["export_seconds"],
                      "memory_plan_bytes_per_device": m["memory_plan_bytes_per_device"]}))
    return 0
