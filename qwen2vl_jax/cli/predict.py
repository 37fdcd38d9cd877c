"""`qwen2vl-jax predict`: answer every prompt of a JSONL file on the serving engine, resumably, in several processes.

    qwen2vl-jax predict --model M --data val.jsonl --out preds.jsonl --max-new-tokens 32
    qwen2vl-jax predict ... --process-index 1 --process-count 4     # this process's quarter; the last one merges

The data is the fine-tuning JSONL format without the answer turn (`evaluation.predict`); the output has one line
per input line, in input order, carrying the input's "id" (`evaluation.runs`: a killed run started again continues
where it stopped, and the file ends byte-identical to an uninterrupted run's). A progress bar on stderr shows items
and tokens per second and the time left.
"""

from __future__ import annotations

import argparse
import sys
import time

from .common import (
    UserError,
    add_generation_args,
    add_model_args,
    add_quantize_arg,
    choose_dtype,
    generation_kwargs,
    int_in,
    load_model,
    load_processor,
    positive,
    resolve_model,
    say,
)

COMPILES = True  # runs the model: takes --no-compile-cache
DEFAULT_MAX_NEW_TOKENS = 256  # as `generate`


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The data, the output and how the work is shared (predict, eval)."""
    p.add_argument("--data", required=True, help="JSONL of prompts: {\"messages\": [...], \"id\": ...} per line")
    p.add_argument("--max-slots", type=positive(int), default=8,
                   help="sequences the engine decodes at once (default 8)")
    p.add_argument("--max-context", type=positive(int),
                   help="tokens per sequence at most, prompt + answer (default: the model's, at most 8192)")
    p.add_argument("--process-index", type=int_in(0, 1 << 20, "--process-index"),
                   help="this process's share of the items (default: jax.process_index())")
    p.add_argument("--process-count", type=positive(int), help="processes sharing the items (default: "
                                                                "jax.process_count())")


def add_parser(subparsers):
    p = subparsers.add_parser("predict", help="answer every prompt of a JSONL file (batched, resumable)")
    add_model_args(p)
    add_quantize_arg(p)
    add_generation_args(p)
    add_run_args(p)
    p.add_argument("--out", required=True, help="the predictions, one JSON line per input line")
    p.set_defaults(func=run, max_new_tokens=None)  # None: the preset's, else DEFAULT_MAX_NEW_TOKENS
    return p


def _video_options(args) -> dict:
    return {k: v for k, v in (("fps", args.fps), ("max_frames", args.max_frames)) if v is not None}


def prepare_items(args, items):
    """`--system` for items without a system turn; `--fps` / `--max-frames` for videos without their own options."""
    from ..processing.vision_info import VIDEO_OPTIONS

    options = _video_options(args)
    for item in items:
        if args.system and item.messages[0]["role"] != "system":
            item.messages.insert(0, {"role": "system", "content": args.system})
        for message in item.messages:
            for part in message["content"] if isinstance(message["content"], list) else []:
                if part.get("type") == "video" and options and not any(k in part for k in VIDEO_OPTIONS):
                    part.update(options)
    return items


def shares(args) -> tuple[int, int]:
    import jax

    count = args.process_count if args.process_count is not None else jax.process_count()
    index = args.process_index if args.process_index is not None else jax.process_index()
    if index >= count:
        raise UserError(f"--process-index {index} must be < --process-count {count}")
    return index, count


def fingerprint(args, directory, dtype: str, generation: dict) -> dict:
    """What determines the rows: resuming with anything else is refused (`evaluation.runs`)."""
    from ..evaluation.runs import file_sha256

    return {"data_sha256": file_sha256(args.data), "model": str(directory), "dtype": dtype,
            "adapter": args.adapter, "quantize": args.quantize, "generation": generation, "seed": args.seed,
            "system": args.system, "min_pixels": args.min_pixels, "max_pixels": args.max_pixels,
            "video": _video_options(args), "attn_implementation": args.attn_implementation,
            "exact_fp32": args.exact_fp32, "preset": getattr(args, "preset", None)}


def predict_file(args, out_path, *, preset_generation: dict | None = None, items=None) -> dict:
    """Run (or resume) the predictions of `args.data` (or of `items` read from it) into `out_path`; returns a
    summary. Shared with `eval`."""
    from ..evaluation.predict import Predictor, read_items
    from ..evaluation.runs import RunOutput

    directory = resolve_model(args)
    if items is None:
        items = prepare_items(args, read_items(args.data))
    dtype = choose_dtype(args, directory)
    flags = {k: v for k, v in generation_kwargs(args).items() if v is not None and k != "seed"}
    generation = {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, **(preset_generation or {}), **flags}
    index, count = shares(args)
    output = RunOutput(out_path, indices=[it.index for it in items], process_index=index, process_count=count,
                       fingerprint=fingerprint(args, directory, dtype, generation))
    todo = output.remaining()
    summary = {"items": len(output.mine), "written": 0, "resumed_from": output.done, "errors": 0, "tokens": 0,
               "seconds": 0.0, "out": str(out_path)}
    if todo:
        say(args, f"predict: {len(todo)} of {len(output.mine)} items to answer"
                  + (f" (resuming after {output.done})" if output.done else "")
                  + (f"; process {index} of {count}" if count > 1 else ""))
        processor = load_processor(args, directory)
        model = load_model(args, directory, dtype)
        by_index = {it.index: it for it in items}
        start = time.perf_counter()
        with Predictor(model, processor, max_slots=args.max_slots, generation=generation, seed=args.seed,
                       max_context=args.max_context) as predictor, _progress(args, output) as bar:
            for row in predictor.run(by_index[i] for i in todo):
                output.append(row)
                summary["written"] += 1
                summary["errors"] += "error" in row
                summary["tokens"] += row.get("new_tokens", 0)
                if "error" in row:
                    print(f"warning: item {row['index']}: {row['error']}", file=sys.stderr, flush=True)
                bar.update(1)
                elapsed = time.perf_counter() - start
                bar.set_postfix_str(f"{summary['tokens'] / max(elapsed, 1e-9):.1f} tok/s", refresh=False)
        summary["seconds"] = time.perf_counter() - start
    summary["merged"] = output.finish()
    return summary


class _NoBar:
    def update(self, n): pass

    def set_postfix_str(self, s, refresh=True): pass

    def __enter__(self):
        return self

    def __exit__(self, *exc): pass


def _progress(args, output):
    if args.quiet:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=len(output.mine), initial=output.done, unit="item", desc="predict", file=sys.stderr,
                dynamic_ncols=True, smoothing=0.1)


def run(args) -> int:
    summary = predict_file(args, args.out)
    s, rate = summary, ""
    if s["seconds"]:
        rate = f"; {s['written'] / s['seconds']:.2f} items/s, {s['tokens'] / s['seconds']:.1f} tok/s"
    where = args.out if s["merged"] else f"this process's part (the others are not complete yet: {args.out} is " \
                                          "written by the last process to finish)"
    say(args, f"predict: {s['written']} answered now, {s['resumed_from']} before{rate}; {s['errors']} errors; "
              f"wrote {where}")
    return 0
