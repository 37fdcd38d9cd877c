"""`qwen2vl-jax eval`: predictions for a dataset (or a file of them) scored with a benchmark's metric.

    qwen2vl-jax eval --model M --data docvqa.jsonl --metric anls --out preds.jsonl
    qwen2vl-jax eval --model M --data chartqa.jsonl --preset chartqa            # the published settings
    qwen2vl-jax eval --data textvqa.jsonl --predictions preds.jsonl --metric vqa # score existing predictions
    qwen2vl-jax eval --model M --data mmmu.jsonl --metric choice --choice-by loglikelihood

The predictions are `predict`'s (the same flags, resumable, shared between processes: `cli/predict.py`); each item's
score goes to `--records` (one JSON line per item: prediction, references, score) and a summary table (or `--json`)
to stdout. What each metric reads from the data: `evaluation.evaluate`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import UserError, add_generation_args, add_model_args, add_quantize_arg, positive, say
from .predict import add_run_args, predict_file, prepare_items

COMPILES = True  # runs the model: takes --no-compile-cache
METRIC_NAMES = ("anls", "vqa", "textvqa", "relaxed", "exact", "choice", "iou")


def add_parser(subparsers):
    p = subparsers.add_parser("eval", help="score predictions for a dataset with a benchmark metric")
    add_model_args(p, required=False)
    add_quantize_arg(p)
    add_generation_args(p)
    add_run_args(p)
    p.add_argument("--metric", choices=METRIC_NAMES, help="the metric (default: the preset's)")
    p.add_argument("--preset", metavar="FAMILY/TASK", help="a benchmark's published settings as lmms-eval runs them "
                                                            "(pixel bounds, prompt, max new tokens, stops, metric), "
                                                            "e.g. qwen2_vl/docvqa: evaluation.presets")
    p.add_argument("--out", help="where the predictions go (default: <data stem>.predictions.jsonl here)")
    p.add_argument("--predictions", metavar="FILE", help="score these predictions (predict's output) instead of "
                                                          "running the model")
    p.add_argument("--records", metavar="FILE", help="per-item scores (default: <predictions>.scores.jsonl)")
    p.add_argument("--choice-by", choices=["generate", "loglikelihood"], default="generate",
                   help="choice metric: parse the generated answer (MMMU's rule), or take the option whose text "
                        "is likeliest (lmms-eval's multiple_choice)")
    p.add_argument("--batch-size", type=positive(int), default=8, help="rows per forward for --choice-by "
                                                                        "loglikelihood")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    p.set_defaults(func=run, max_new_tokens=None)
    return p


def _preset(args):
    if args.preset is None:
        return None
    from ..evaluation.presets import preset

    try:
        chosen = preset(args.preset)
    except ValueError as e:
        raise UserError(str(e)) from None
    for flag in ("min_pixels", "max_pixels"):
        if getattr(args, flag) is None:
            setattr(args, flag, getattr(chosen, flag))
    return chosen


def _family(args) -> str:
    from ..processing.processor import processor_class_for
    from .common import resolve_model

    return "qwen2_5_vl" if processor_class_for(resolve_model(args)) == "Qwen2_5_VLProcessor" else "qwen2_vl"


def _bounds(args) -> dict:
    from .common import load_processor, resolve_model

    image_processor = load_processor(args, resolve_model(args)).image_processor
    return {"min_pixels": image_processor.min_pixels, "max_pixels": image_processor.max_pixels}


def _read_predictions(path: Path) -> dict[int, dict]:
    """`predict`'s rows by index: each a JSON object with an integer "index" and a string "answer" (or an "error")."""
    rows = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        index = row.get("index") if isinstance(row, dict) else None
        if not isinstance(index, int) or isinstance(index, bool) or not (
                isinstance(row.get("answer"), str) or "error" in row):
            raise UserError(f"{path} line {n}: not a prediction row ({{\"index\": int, \"answer\": str}})")
        rows[index] = row
    return rows


def _table(summary: dict) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}"
    ci = f"[{pct(summary['ci95_low'])}, {pct(summary['ci95_high'])}]"
    head = f"{'metric':<8} {'items':>6} {'score':>8} {'95% CI':>17} {'errors':>7}"
    line = f"{summary['metric']:<8} {summary['count']:>6} {pct(summary['mean']):>8} {ci:>17} {summary['errors']:>7}"
    return f"{head}\n{line}"


def run(args) -> int:
    from ..evaluation.evaluate import apply_preset, choose, evaluate
    from ..evaluation.predict import read_items
    from ..evaluation.runs import atomic_write

    chosen = _preset(args)
    metric = args.metric or (chosen.metric if chosen else None)
    if metric is None:
        raise UserError("name a --metric (or a --preset that has one)")
    if args.model is None and (args.predictions is None or metric == "iou" or args.choice_by == "loglikelihood"):
        raise UserError("--model is needed to predict (no --predictions given), for the iou metric (the processor "
                        "places the boxes) and for --choice-by loglikelihood")
    items = prepare_items(args, read_items(args.data))
    generation = {}
    if chosen is not None:
        if args.model is not None and _family(args) != chosen.family:
            print(f"warning: preset {chosen.name} holds {chosen.family}'s settings, the model is {_family(args)}",
                  file=sys.stderr, flush=True)
        items = [apply_preset(chosen, item) for item in items]
        generation = {"max_new_tokens": chosen.max_new_tokens, "do_sample": False, "stop": list(chosen.stop)}
    if args.predictions is not None:
        out = Path(args.predictions)
        predictions = _read_predictions(out)
    elif metric == "choice" and args.choice_by == "loglikelihood":
        from .common import choose_dtype, load_model, load_processor, resolve_model

        directory = resolve_model(args)
        processor = load_processor(args, directory)
        model = load_model(args, directory, choose_dtype(args, directory))
        out = Path(args.out or f"{Path(args.data).stem}.choices.jsonl")
        predictions = choose(model, processor, items, batch_size=args.batch_size)
        atomic_write(out, "".join(json.dumps(predictions[i.index]) + "\n" for i in items).encode())
    else:
        out = Path(args.out or f"{Path(args.data).stem}.predictions.jsonl")
        summary = predict_file(args, out, preset_generation=generation, items=items)
        if not summary["merged"]:
            say(args, "eval: this process's part is done; the score comes from the last process to finish")
            return 0
        predictions = _read_predictions(out)
    family, bounds = (_family(args), _bounds(args)) if metric == "iou" else ("qwen2_vl", {})
    try:
        records, summary = evaluate(items, predictions, metric, family=family, pixel_bounds=bounds)
    except ValueError as e:  # a line without what the metric reads, an iou item without an image, a bad box
        raise UserError(f"{args.data}: {e}") from None
    records_path = Path(args.records or f"{out}.scores.jsonl")
    atomic_write(records_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    summary.update(predictions=str(out), records=str(records_path), preset=args.preset)
    if args.json:
        print(json.dumps(summary))
    else:
        print(_table(summary))
        say(args, f"eval: per-item scores in {records_path}")
    if summary["errors"]:
        print(f"warning: {summary['errors']} items had no prediction (scored 0)", file=sys.stderr)
    return 0
