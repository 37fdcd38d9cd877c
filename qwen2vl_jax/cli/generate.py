"""`qwen2vl-jax generate`: answer one prompt about images / a video, streamed or as one JSON object."""

from __future__ import annotations

import json
import sys

from .common import (
    add_generation_args,
    add_mesh_args,
    add_model_args,
    add_quantize_arg,
    check_memory,
    choose_dtype,
    encode,
    load_model,
    load_processor,
    media,
    messages_for,
    resolve_model,
    run_generation,
    sampling_note,
    say,
    summary_line,
)

COMPILES = True  # runs the model: takes --no-compile-cache


def add_parser(subparsers):
    p = subparsers.add_parser("generate", help="answer one prompt about images / a video")
    add_model_args(p)
    add_quantize_arg(p)
    add_mesh_args(p)
    add_generation_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video file (repeatable)")
    p.add_argument("--stream", dest="stream", action="store_true", default=None, help="print while decoding")
    p.add_argument("--no-stream", dest="stream", action="store_false")
    p.add_argument("--json", action="store_true", help="print one JSON object (answer + stats)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
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
