"""The `qwen2vl-jax` command line: generate, chat, convert, info, selfcheck.

User errors (a missing file, an unreadable image, an unknown model id while offline, too little memory) print one
line and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .runtime import COMPILE_CACHE_ENV  # stdlib only: importing it changes nothing

EXIT_USER_ERROR = 2
COMPILING_COMMANDS = ("generate", "chat", "selfcheck", "finetune")  # run the model; they use the compile cache


class UserError(Exception):
    """A problem the user can fix; printed without a traceback, exit status 2."""


# ------------------------------------------------------------------------------------------------ helpers
def _say(args, *parts) -> None:
    if not getattr(args, "quiet", False):
        print(*parts, file=sys.stderr, flush=True)


def _resolve(args) -> Path:
    from .checkpoint import resolve_source

    if getattr(args, "quiet", False):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return resolve_source(args.model, local_files_only=getattr(args, "offline", None) or None)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise UserError(str(e)) from None


def _checkpoint_summary(directory: Path) -> tuple[int, int, str]:
    """(parameters, bytes on disk, dtype) from the safetensors headers alone."""
    from .params import CheckpointError, safetensors_files
    from .safetensors_io import SafetensorsFile

    try:
        files = safetensors_files(directory)
    except (FileNotFoundError, CheckpointError) as e:
        raise UserError(str(e)) from None
    numel = nbytes = 0
    dtypes = set()
    for f in files:
        sf = SafetensorsFile(f)
        for k in sf.keys():
            n = 1
            for s in sf.shape(k):
                n *= s
            numel += n
            nbytes += sf.nbytes(k)
            dtypes.add(str(sf.dtype(k)))
    return numel, nbytes, "/".join(sorted(dtypes))


def _choose_dtype(args, directory: Path) -> str:
    """`--dtype auto`: float32 when it fits comfortably in memory (most faithful; fastest decode on CPU),
    else bfloat16. Fails early, with the numbers, when even bfloat16 does not fit."""
    import psutil

    numel, _, _ = _checkpoint_summary(directory)
    available = psutil.virtual_memory().available
    dtype = args.dtype
    if dtype == "auto":
        dtype = "float32" if numel * 4 <= 0.6 * available else "bfloat16"
    need = numel * (4 if dtype == "float32" else 2)
    if need > 0.95 * available:
        hint = " Try --dtype bfloat16." if dtype == "float32" else " Use a machine with more memory or a smaller model."
        raise UserError(f"not enough memory: the weights need {need / 1e9:.1f} GB in {dtype} but only "
                        f"{available / 1e9:.1f} GB is available.{hint}")
    if dtype == "float32" and getattr(args, "exact_fp32", False):
        from .runtime import use_exact_cpu_fp32_matmuls

        use_exact_cpu_fp32_matmuls()  # before JAX starts; PyTorch-level fp32 rounding, slower CPU prefill
    return dtype


def _load_model(args, directory: Path, dtype: str):
    from .attention import AttentionBackendError
    from .params import CheckpointError
    from .pretrained import Qwen2VLForConditionalGeneration

    try:
        model = Qwen2VLForConditionalGeneration.from_pretrained(directory, dtype=dtype,
                                                                attn_implementation=args.attn_implementation,
                                                                progress=not getattr(args, "quiet", False))
    except (FileNotFoundError, CheckpointError, AttentionBackendError) as e:
        raise UserError(str(e)) from None
    if getattr(args, "adapter", None):
        from .lora import LoRAError, load_adapter

        try:  # kept unmerged: the adapted model computes exactly what PEFT's does
            load_adapter(model, args.adapter)
        except LoRAError as e:
            raise UserError(str(e)) from None
    return model


def _load_processor(args, directory: Path):
    from .processing import Qwen2VLProcessor

    overrides = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels)) if v}
    try:
        return Qwen2VLProcessor.from_pretrained(directory, **overrides)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"cannot load the processor from {directory}: {e}") from None


def _media(paths: list[str], kind: str) -> list[str]:
    for p in paths:
        if not Path(p).is_file():
            raise UserError(f"{kind} not found: {p}")
    return list(paths)


def _messages_for(text: str, images: list, videos: list, system: str | None = None, history=None) -> list[dict]:
    messages = list(history or [])
    if system and not messages:
        messages.append({"role": "system", "content": system})
    content = [{"type": "image", "image": p} for p in images] + [{"type": "video", "video": p} for p in videos]
    messages.append({"role": "user", "content": content + [{"type": "text", "text": text}]})
    return messages


def _encode(processor, messages: list[dict]):
    images = [c["image"] for m in messages if isinstance(m["content"], list) for c in m["content"]
              if c.get("type") == "image"]
    videos = [c["video"] for m in messages if isinstance(m["content"], list) for c in m["content"]
              if c.get("type") == "video"]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    try:
        return processor(text=[prompt], images=images or None, videos=videos or None)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read the media: {e}") from None


def _generation_kwargs(args) -> dict:
    kw = {"max_new_tokens": args.max_new_tokens, "seed": args.seed}
    if args.repetition_penalty is not None:
        kw["repetition_penalty"] = args.repetition_penalty
    if args.greedy or args.temperature == 0:
        kw["do_sample"] = False
    elif any(v is not None for v in (args.temperature, args.top_p, args.top_k)):
        kw["do_sample"] = True
        kw.update({k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p), ("top_k", args.top_k))
                   if v is not None})
    return kw


def _run_generation(args, model, processor, inputs, stream: bool, on_text=None):
    """Generate for one prompt; returns (answer text, stats dict)."""
    from .generation import TextStreamer

    streamer = TextStreamer(processor.tokenizer, on_text=on_text) if stream else None
    try:
        out = model.generate(**inputs, streamer=streamer, return_dict=True, **_generation_kwargs(args))
    except ValueError as e:  # invalid generation settings
        raise UserError(str(e)) from None
    prompt_len = inputs["input_ids"].shape[1]
    new_ids = out.sequences[0, prompt_len:].tolist()
    answer = processor.decode(new_ids, skip_special_tokens=True)
    ids = inputs["input_ids"][0]
    stats = {
        "prompt_tokens": int(prompt_len),
        "vision_tokens": int(((ids == processor.image_token_id) | (ids == processor.video_token_id)).sum()),
        "new_tokens": int(out.new_tokens),
        "prefill_s": round(out.prefill_seconds, 3),
        "decode_tok_s": round((out.new_tokens - 1) / out.decode_seconds, 2) if out.new_tokens > 1 and
        out.decode_seconds > 0 else None,
    }
    return answer, stats


def _summary_line(stats: dict) -> str:
    rate = "n/a" if stats["decode_tok_s"] is None else f"{stats['decode_tok_s']:.2f} tok/s"
    return (f"[prompt {stats['prompt_tokens']} tokens ({stats['vision_tokens']} vision) | new {stats['new_tokens']} "
            f"tokens | prefill {stats['prefill_s']:.2f} s | decode {rate}]")


# ---------------------------------------------------------------------------------------------- commands
def cmd_generate(args) -> int:
    directory = _resolve(args)
    images, videos = _media(args.image, "image"), _media(args.video, "video")
    dtype = _choose_dtype(args, directory)
    processor = _load_processor(args, directory)
    inputs = _encode(processor, _messages_for(args.prompt, images, videos, args.system))
    model = _load_model(args, directory, dtype)
    stream = args.stream if args.stream is not None else (sys.stdout.isatty() and not args.json)
    stream = stream and not args.json
    on_text = (lambda piece: print(piece, end="", flush=True)) if stream else None
    answer, stats = _run_generation(args, model, processor, inputs, stream, on_text)
    if args.json:
        print(json.dumps({"answer": answer, "model": str(args.model), "dtype": dtype, **stats}, ensure_ascii=False))
        return 0
    print("" if stream else answer, flush=True)
    _say(args, _summary_line(stats))
    return 0


def cmd_chat(args) -> int:
    directory = _resolve(args)
    dtype = _choose_dtype(args, directory)
    processor = _load_processor(args, directory)
    model = _load_model(args, directory, dtype)
    interactive = sys.stdin.isatty()
    history: list[dict] = []
    pending_images: list[str] = []
    pending_videos: list[str] = []
    _say(args, "chat: /image PATH, /video PATH attach media to your next message; /reset clears; /exit quits.")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history, pending_images, pending_videos = [], [], []
            print("(history cleared)", flush=True)
            continue
        if line.startswith(("/image ", "/video ")):
            kind, path = line[1:6], line[7:].strip()
            try:
                (pending_images if kind == "image" else pending_videos).extend(_media([path], kind))
                print(f"({kind} attached: {path})", flush=True)
            except UserError as e:  # a typo in a path must not end the session
                print(f"error: {e}", file=sys.stderr, flush=True)
            continue
        if line.startswith("/"):
            print(f"error: unknown command {line.split()[0]} (use /image, /video, /reset, /exit)", file=sys.stderr)
            continue
        messages = _messages_for(line, pending_images, pending_videos, args.system, history)
        try:
            inputs = _encode(processor, messages)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            pending_images, pending_videos = [], []
            continue
        answer, stats = _run_generation(args, model, processor, inputs, True,
                                        lambda piece: print(piece, end="", flush=True))
        print(flush=True)
        _say(args, _summary_line(stats))
        history = messages + [{"role": "assistant", "content": answer}]
        pending_images, pending_videos = [], []
    return 0


def cmd_info(args) -> int:
    import jax
    import numpy as np
    from flax import nnx

    from .config import Qwen2VLConfig
    from .pretrained import Qwen2VLForConditionalGeneration

    directory = _resolve(args)
    try:
        config = Qwen2VLConfig.from_hf(directory)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"cannot read the config of {directory}: {e}") from None
    from .attention import AttentionBackendError, available_backends, resolve

    try:
        attention = resolve(args.attn_implementation)  # the backend a generate would run
    except AttentionBackendError as e:
        raise UserError(str(e)) from None
    numel, nbytes, dtype = _checkpoint_summary(directory)
    abstract = nnx.eval_shape(lambda: Qwen2VLForConditionalGeneration(config, rngs=nnx.Rngs(0)))
    counts = abstract.num_params()
    assert counts["total"] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    t, v = config.text_config, config.vision_config
    info = {
        "model": str(args.model), "directory": str(directory), "checkpoint_dtype": dtype,
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
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"model        {info['model']}  ({directory})")
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


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", help="system prompt (default: the chat template's)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float, help="default: the checkpoint's generation_config (1.05)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-pixels", type=int, help="lower bound on pixels per image (processor override)")
    p.add_argument("--max-pixels", type=int, help="upper bound on pixels per image (processor override)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter in PEFT's format (e.g. finetune's out/adapter)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen2vl-jax", description="Qwen2-VL in JAX: generate, chat, convert.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="answer one prompt about images / a video")
    _add_model_args(p)
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

    p = sub.add_parser("selfcheck", help="offline parity check against PyTorch on random weights")
    p.add_argument("--preset", choices=["2b", "7b", "72b"], default="2b")
    p.add_argument("--layers", type=int, default=2, help="decoder layers to keep (the preset's widths stay)")
    p.add_argument("--vision-depth", type=int, default=2, help="vision blocks to keep")
    p.add_argument("--new-tokens", type=int, default=16, help="greedy tokens to compare")
    p.add_argument("--workdir", help="where to write the random checkpoint (default: a temp dir)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_selfcheck)
    from .cli_finetune import add_finetune_parser  # its own file: the command has many flags

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
        from .runtime import enable_compilation_cache

        enable_compilation_cache()  # before anything compiles; warns and carries on when the directory is unusable
    try:
        return args.func(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
