"""`qwen2vl-jax generate`: answer one prompt about images / a video, streamed or as one JSON object.

With `--json`, an answer holding boxes also gets them in the original image's pixels (`answer_boxes`): "boxes"
[{"label", "xyxy", "image"}], "points" (Qwen2.5-VL's point_2d items) and "box_problems" (what could not be read,
qwen2vl_jax.grounding). The family and the pixel bounds are the processor's. Which image: the only one; with several,
the one `--boxes-image N` names (an answer does not say which image its boxes are about, so none is guessed).
"""

from __future__ import annotations

import json
import sys

from .common import (
    UserError,
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
    p.add_argument("--json", action="store_true", help="print one JSON object (answer + stats, + boxes if any)")
    p.add_argument("--boxes-image", type=int, default=None, metavar="N",
                   help="with several images: the one (0-based) the answer's boxes are about, for --json's boxes")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    directory = resolve_model(args)
    images, videos = media(args.image, "image"), media(args.video, "video")
    if args.boxes_image is not None and not 0 <= args.boxes_image < len(images):
        raise UserError(f"--boxes-image {args.boxes_image}: the prompt has {len(images)} image(s) (0-based)")
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
    answer, stats, raw = run_generation(args, model, processor, inputs, stream, on_text, with_raw=True)
    if args.json:
        boxes = answer_boxes(raw, processor, images, args.boxes_image)
        print(json.dumps({"answer": answer, "model": str(args.model), "dtype": dtype, **stats, **boxes},
                         ensure_ascii=False))
        return 0
    print("" if stream else answer, flush=True)
    say(args, summary_line(stats))
    return 0


def answer_boxes(answer: str, processor, images: list, which: int | None = None) -> dict:
    """--json's box keys for an answer: {} when it holds nothing box-like, else {"boxes", "points", "box_problems"}
    (qwen2vl_jax.grounding `Boxes.as_json`), in the pixels of image `which` (default: the only image) as the
    processor saw it (EXIF orientation applied). Without such an image the boxes stay unread and "box_problems"
    says why (kind "image").

    `answer` is the text decoded with its special tokens kept (`run_generation(..., with_raw=True)`), so a Qwen2-VL
    answer keeps its `<|object_ref_start|>` / `<|box_start|>` tags; text without them is read in the bare form only
    when unambiguous (qwen2vl_jax/grounding/formats.py).
    """
    from ..grounding import has_boxes, parse_boxes, settings_for
    from ..processing.image_io import load_image

    if not has_boxes(answer):
        return {}
    if which is None and len(images) == 1:
        which = 0
    if which is None:
        why = (f"the prompt has {len(images)} images: pass --boxes-image N (0-based) to say which one the boxes are "
               "about" if images else "the prompt has no image (boxes on video frames are not converted)")
        return {"boxes": [], "points": [], "box_problems": [{"kind": "image", "message": why, "text": ""}]}
    size = load_image(images[which], exif_transpose=True).size
    return parse_boxes(answer, image_size=size, **settings_for(processor)).as_json(image=which)
