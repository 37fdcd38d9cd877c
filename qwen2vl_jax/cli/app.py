"""The `qwen2vl-jax` command line: generate, chat (cli_chat.py), convert, info, plan (plan.py), selfcheck, finetune
(cli_finetune.py), serve (server.py); shared pieces in cli_common.py.

User errors (a missing file, an unreadable image, a corrupt checkpoint, an invalid config.json, an unknown model id
while offline, too little memory, a bad flag) print one line and exit with status 2, through one path: `main`
catches the library's user-error types (`cli_common.USER_ERROR_TYPES`) and `UserError`. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..runtime import COMPILE_CACHE_ENV  # stdlib only: importing it changes nothing
from .common import (
    EXIT_USER_ERROR,
    Parser,
    UserError,
    byte_size,
    check_memory,
    checkpoint_summary,
    choose_dtype,
    encode,
    load_model,
    load_processor,
    media,
    messages_for,
    port,
    positive,
    resolve_model,
    run_generation,
    sampling_note,
    say,
    seed,
    summary_line,
    user_error_message,
)

__all__ = ["main", "build_parser", "UserError", "EXIT_USER_ERROR"]

API_KEY_ENV = "QWEN2VL_JAX_API_KEY"  # serve's --api-key, from the environment (kept out of `ps` listings)
COMPILING_COMMANDS = ("generate", "chat", "selfcheck", "finetune", "serve")  # run the model; they use the compile cache


# ---------------------------------------------------------------------------------------------- commands
def cmd_generate(args) -> int:
    directory = resolve_model(args)
    images, videos = media(args.image, "image"), media(args.video, "video")
    dtype = choose_dtype(args, directory)
    processor = load_processor(args, directory)
    inputs = encode(processor, messages_for(args.prompt, images, videos, args.system), args)
    dtype = check_memory(args, directory, dtype, inputs, may_switch=True)
    note = sampling_note(args, directory)
    if note:
        print(f"note: {note}", file=sys.stderr, flush=True)
    model = load_model(args, directory, dtype)
    stream = args.stream if args.stream is not None else (sys.stdout.isatty() and not args.json)
    stream = stream and not args.json
    on_text = (lambda piece: print(piece, end="", flush=True)) if stream else None
    answer, stats = run_generation(args, model, processor, inputs, stream, on_text)
    if args.json:
        print(json.dumps({"answer": answer, "model": str(args.model), "dtype": dtype, **stats}, ensure_ascii=False))
        return 0
    print("" if stream else answer, flush=True)
    say(args, summary_line(stats))
    return 0


def cmd_chat(args) -> int:
    from .chat import run_chat

    return run_chat(args)


def cmd_info(args) -> int:
    import jax
    import numpy as np
    from flax import nnx

    from ..modeling.config import Qwen2VLConfig
    from ..pretrained import Qwen2VLForConditionalGeneration

    directory = resolve_model(args)
    try:
        config = Qwen2VLConfig.from_hf(directory)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"cannot read the config of {directory}: {e}") from None
    from ..attention import AttentionBackendError, available_backends, resolve

    try:
        attention = resolve(args.attn_implementation)  # the backend a generate would run
    except AttentionBackendError as e:
        raise UserError(str(e)) from None
    numel, nbytes, dtype = checkpoint_summary(directory)
    abstract = nnx.eval_shape(lambda: Qwen2VLForConditionalGeneration(config, rngs=nnx.Rngs(0)))
    counts = abstract.num_params()
    assert counts["total"] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    t, v = config.text_config, config.vision_config
    info = {
        "model": str(args.model), "directory": str(directory), "model_type": config.model_type,
        "checkpoint_dtype": dtype,
        "checkpoint_bytes": nbytes, "checkpoint_tensor_elements": numel,
        "parameters": counts, "attention": attention,
        "bytes_float32": counts["total"] * 4, "bytes_bfloat16": counts["total"] * 2,
        "text": {"layers": t.num_hidden_layers, "hidden": t.hidden_size, "heads": t.num_attention_heads,
                 "kv_heads": t.num_key_value_heads, "head_dim": t.head_dim, "mlp": t.intermediate_size,
                 "vocab": t.vocab_size, "mrope_section": list(t.mrope_section), "rope_theta": t.rope_theta,
                 "rms_norm_eps": t.rms_norm_eps, "tie_word_embeddings": config.tie_word_embeddings},
        "vision": {"depth": v.depth, "embed_dim": v.embed_dim, "heads": v.num_heads, "mlp": v.mlp_dim,
                   "patch": v.patch_size, "temporal_patch": v.temporal_patch_size, "merge": v.spatial_merge_size,
                   "out": v.hidden_size},
    }
    if v.window_size is not None:  # Qwen2.5-VL
        info["vision"].update(window=v.window_size, fullatt_blocks=list(v.fullatt_block_indexes),
                              tokens_per_second=v.tokens_per_second)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"model        {info['model']}  ({directory}, {config.model_type})")
    print(f"checkpoint   {dtype}, {nbytes / 1e9:.2f} GB on disk")
    print(f"parameters   {counts['total']:,} total = vision {counts['visual']:,} + language "
          f"{counts['language_model']:,} + lm_head {counts['lm_head']:,}"
          + (" (tied to the embedding)" if config.tie_word_embeddings else ""))
    print(f"memory       {counts['total'] * 4 / 1e9:.2f} GB float32, {counts['total'] * 2 / 1e9:.2f} GB bfloat16")
    print("text         " + ", ".join(f"{k} {val}" for k, val in info["text"].items()))
    print("vision       " + ", ".join(f"{k} {val}" for k, val in info["vision"].items()))
    print(f"attention    {attention} (--attn-implementation: {', '.join(available_backends())})")
    return 0


def cmd_convert(args) -> int:
    from conversion import flax_to_hf, hf_to_flax

    module = hf_to_flax if args.direction == "hf-to-flax" else flax_to_hf
    try:
        return module.run(args)
    except (FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        raise UserError(str(e)) from None
    except ValueError as e:  # CheckpointError and bad options
        raise UserError(str(e)) from None


def cmd_plan(args) -> int:
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
    if args.model.lower() in PRESETS:
        config = PRESETS[args.model.lower()]()
    elif Path(args.model).is_dir():
        config = Qwen2VLConfig.from_hf(args.model)  # a bad config.json is a ConfigError: one line
    else:
        raise UserError(f"--model {args.model!r} is neither a preset ({', '.join(PRESETS)}) nor a checkpoint directory")
    try:
        result = plan_lib.plan(config, mesh, batch=args.batch, context=args.context or
                               config.text_config.max_position_embeddings, dtype=args.dtype,
                               scan_layers=args.scan_layers, name=args.model)
    except ValueError as e:  # batch / context out of range, a mesh the rules cannot use
        raise UserError(str(e)) from None
    print(json.dumps(result.as_dict()) if args.json else result.text())
    return 0


def cmd_serve(args) -> int:
    import os

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_serve_exposure(args.host, api_key, args.allow_unauthenticated)  # before anything is loaded
    try:  # the optional extra: `pip install 'qwen2vl_jax[serve]'`
        import uvicorn

        from ..server.app import Engine, create_app, served_name
        from ..server.guard import uvicorn_config
        from ..server.media import MediaPolicy
    except ImportError as e:
        raise UserError(f"serve needs FastAPI and uvicorn ({e}); install them with: pip install "
                        f"'qwen2vl_jax[serve]'") from None
    try:
        media = MediaPolicy(args.allowed_local_media_path, max_pixels=args.max_image_pixels,
                            max_bytes=args.max_request_bytes)
    except ValueError as e:
        raise UserError(str(e)) from None
    directory = resolve_model(args)
    dtype = choose_dtype(args, directory)
    processor = load_processor(args, directory)
    model = load_model(args, directory, dtype)
    engine = Engine(model, processor, model_name=args.served_model_name or served_name(args.model),
                    max_batch=args.max_batch, max_queue=args.max_queue, max_request_bytes=args.max_request_bytes,
                    max_images=args.max_images, default_max_tokens=args.default_max_tokens,
                    max_tokens=args.max_tokens, media=media, max_memory=args.max_memory)
    app = create_app(engine, api_key=api_key, bind_host=args.host, allowed_hosts=args.allowed_host, docs=args.docs)
    url = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    print(f"serving {engine.model_name} ({dtype}) at {url}/v1 (OpenAI API: /v1/chat/completions, /v1/models)"
          f"{'; API key required' if api_key else ''}", flush=True)
    if any(getattr(r, "path", "").startswith("/explorer") for r in app.routes):
        print(f"explorer at {url}/explorer", flush=True)
    try:
        uvicorn.Server(uvicorn_config(app, host=args.host, port=args.port,
                                      log_level="warning" if args.quiet else "info")).run()
    finally:
        engine.close()
    return 0


def check_serve_exposure(host: str, api_key: str | None, allow_unauthenticated: bool) -> None:
    """Refuse to bind an address other machines can reach without an API key, unless the operator says so."""
    from ..server.guard import is_loopback

    if not is_loopback(host) and not api_key and not allow_unauthenticated:
        raise UserError(f"refusing to serve on {host} without an API key: anyone who can reach it could use the "
                        f"model; set --api-key KEY (or {API_KEY_ENV}), bind 127.0.0.1, or pass "
                        "--allow-unauthenticated if you mean it")


def cmd_selfcheck(args) -> int:
    from .selfcheck import run_selfcheck

    return run_selfcheck(args)


# ------------------------------------------------------------------------------------------------- parser
def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hub model id, HF checkpoint directory or converted directory")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="weights and activations (auto: float32 when it fits in memory, else bfloat16)")
    p.add_argument("--offline", action="store_true", help="never download (same as HF_HUB_OFFLINE=1)")
    p.add_argument("--exact-fp32", action="store_true",
                   help="CPU float32: accumulate matmuls like PyTorch (4x smaller rounding error, ~2x slower prefill)")
    p.add_argument("--attn-implementation", metavar="NAME",
                   help="attention backend: xla, cpu (native CPU kernels), jax (jax.nn.dot_product_attention), "
                        "pallas (TPU flash attention); default: cpu where the kernels build, else xla")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary lines")


def _add_mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", metavar="AXES", help="run on a device mesh, e.g. data=2,model=4 (axes data / fsdp / "
                                                  "model; their product <= the devices; per-device memory: "
                                                  "`qwen2vl-jax plan`)")
    p.add_argument("--scan-layers", action="store_true",
                   help="stack the layers and run them with lax.scan (one compiled block: faster compiles on pods)")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", help="system prompt (default: the chat template's)")
    p.add_argument("--max-new-tokens", type=positive(int), default=256)
    p.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default: the checkpoint's generation_config)")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest tokens, 0 = all (default: the checkpoint's)")
    p.add_argument("--repetition-penalty", type=float, help="default: the checkpoint's generation_config (1.05)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--seed", type=seed, default=0, help="sampling seed, 0..2**63-1 (default 0)")
    p.add_argument("--min-pixels", type=positive(int), help="lower bound on pixels per image / frame (processor)")
    p.add_argument("--max-pixels", type=positive(int),
                   help="upper bound on pixels per image / frame (processor; default 12845056 = 16384 vision tokens)")
    p.add_argument("--max-frames", type=positive(int), help="at most this many frames per video (default 768)")
    p.add_argument("--fps", type=positive(float),
                   help="frames sampled per second of video (default 2.0); for Qwen2.5-VL this also sets the time "
                        "spacing of its video positions (the rate actually sampled)")
    p.add_argument("--max-memory", type=byte_size, metavar="SIZE",
                   help="refuse requests estimated to need more than SIZE (e.g. 12GB; default: the available memory)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter in PEFT's format (e.g. finetune's out/adapter)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qwen2vl-jax", description="Qwen2-VL and Qwen2.5-VL in JAX: generate, chat, convert.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="answer one prompt about images / a video")
    _add_model_args(p)
    _add_mesh_args(p)
    _add_generation_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video file (repeatable)")
    p.add_argument("--stream", dest="stream", action="store_true", default=None, help="print while decoding")
    p.add_argument("--no-stream", dest="stream", action="store_false")
    p.add_argument("--json", action="store_true", help="print one JSON object (answer + stats)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive multi-turn chat (/image PATH, /video PATH, /reset, /exit)")
    _add_model_args(p)
    _add_mesh_args(p)
    _add_generation_args(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("convert", help="convert checkpoints between the HF and our Flax layouts")
    conv = p.add_subparsers(dest="direction", required=True)
    from conversion import flax_to_hf, hf_to_flax

    for name, module in (("hf-to-flax", hf_to_flax), ("flax-to-hf", flax_to_hf)):
        cp = conv.add_parser(name, help=module.__doc__.strip().splitlines()[0] if module.__doc__ else None)
        module.add_arguments(cp)
        cp.set_defaults(func=cmd_convert)

    p = sub.add_parser("info", help="config summary, parameter counts, dtype, bytes")
    _add_model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plan", help="per-device bytes of the parameters, KV cache and largest activation on a mesh")
    p.add_argument("--model", help="a preset (2b, 7b, 72b) or a checkpoint directory (its config.json)")
    p.add_argument("--mesh", default="data=1,fsdp=1,model=1", help="mesh axis sizes, e.g. data=1,fsdp=1,model=8")
    p.add_argument("--batch", type=positive(int), default=1, help="rows of the batch (default 1)")
    p.add_argument("--context", type=positive(int), help="tokens per row: prefill length and KV cache slots "
                                                         "(default: the model's max_position_embeddings)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="weights and activations")
    p.add_argument("--scan-layers", action="store_true", help="plan stacked [L, ...] layers (the same totals)")
    p.add_argument("--json", action="store_true", help="print one JSON object (exact bytes)")
    p.add_argument("--table", action="store_true",
                   help="print docs/SCALING.md's markdown table (2B / 7B / 72B on common TPU and GPU slices)")
    p.add_argument("--rules", action="store_true", help="print the sharding rules as a markdown table")
    p.set_defaults(func=cmd_plan)

    from ..server.media import DEFAULT_MAX_IMAGE_PIXELS  # Pillow and the standard library only

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP API (/v1/chat/completions) over one model")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=8000, help="TCP port, 0..65535 (default 8000)")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the `model` clients send (default: the checkpoint folder's name, or the Hub id)")
    p.add_argument("--api-key", metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every request but /health (also from "
                        f"{API_KEY_ENV}, which keeps it out of process listings)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve a non-loopback --host without an API key (refused otherwise)")
    p.add_argument("--allowed-local-media-path", metavar="DIR",
                   help="let clients name image files (paths or file:// URLs) inside DIR; without it only data URLs "
                        "are accepted")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="another name clients may send in the Host header (repeatable; default: the bound address, "
                        "and localhost for a loopback bind)")
    p.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json (off by default)")
    p.add_argument("--max-batch", type=positive(int), default=8, help="requests run together in one batch at most")
    p.add_argument("--max-queue", type=positive(int), default=64,
                   help="requests waiting at most; more are refused with 503")
    p.add_argument("--max-request-bytes", type=byte_size, default=20 * 2**20, metavar="SIZE",
                   help="largest request body (default 20MiB; larger: 413)")
    p.add_argument("--max-images", type=positive(int), default=16, help="images per request at most")
    p.add_argument("--max-image-pixels", type=positive(int), default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                   help=f"largest image decoded, width x height from its header (default {DEFAULT_MAX_IMAGE_PIXELS} "
                        "= 8192 x 8192)")
    p.add_argument("--max-tokens", type=positive(int), default=4096,
                   help="the most new tokens a request may ask for (default 4096; more: 400)")
    p.add_argument("--default-max-tokens", type=positive(int), default=512,
                   help="new tokens for a request without max_tokens (never past the context or --max-tokens)")
    p.add_argument("--max-memory", type=byte_size, metavar="SIZE",
                   help="memory the server may use in all, weights included (e.g. 12GB; default: what it holds "
                        "plus what the machine has available); a request whose estimate does not fit: 400")
    p.add_argument("--min-pixels", type=positive(int), help="lower bound on pixels per image (processor)")
    p.add_argument("--max-pixels", type=positive(int), help="upper bound on pixels per image (processor)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter in PEFT's format (e.g. finetune's out/adapter)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("selfcheck", help="offline parity check against PyTorch on random weights")
    p.add_argument("--preset", choices=["2b", "7b", "72b"], default="2b")
    p.add_argument("--layers", type=positive(int), default=2, help="decoder layers to keep (the preset's widths stay)")
    p.add_argument("--vision-depth", type=positive(int), default=2, help="vision blocks to keep")
    p.add_argument("--new-tokens", type=positive(int), default=16, help="greedy tokens to compare")
    p.add_argument("--workdir", help="where to write the random checkpoint (default: a temp dir)")
    p.add_argument("--timing", action="store_true",
                   help="also time forward and decode, ours vs PyTorch, in the benchmark's modes (a fresh process)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_selfcheck)
    from .finetune import add_finetune_parser  # its own file: the command has many flags

    add_finetune_parser(sub)
    for name in COMPILING_COMMANDS:  # the commands that compile programs share the persistent cache's opt-out
        sub.choices[name].add_argument("--no-compile-cache", action="store_true",
                                       help=f"don't read or write the persistent XLA compilation cache "
                                            f"(default: $XDG_CACHE_HOME/qwen2vl_jax/xla_cache; "
                                            f"{COMPILE_CACHE_ENV}=0 also turns it off, =DIR moves it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in COMPILING_COMMANDS and not args.no_compile_cache:
        from ..runtime import enable_compilation_cache

        enable_compilation_cache()  # before anything compiles; warns and carries on when the directory is unusable
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # the one error path of every command
        message = user_error_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
