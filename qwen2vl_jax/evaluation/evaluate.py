"""Scoring predictions against a dataset's references: one record per item and a summary.

    items = read_items("docvqa_val.jsonl")                     # {"messages": ..., "answers": [...]} per line
    records, summary = evaluate(items, rows, "anls")          # rows: `predict`'s output, by index
    summary["score"], summary["ci95"]

What each metric reads from an item's line (`metrics.METRICS` holds the definitions):

- anls, vqa, exact: `"answers"`: [str, ...] (or `"answer"`: str); the prediction is the answer text.
- relaxed: `"answer"`: str (ChartQA's one target); the answer text.
- choice: `"choices"`: [str, ...] and `"answer"`: a letter or the option's index; the option the answer text names
  (MMMU's parsing rule), or with `choose(...)` the likeliest option.
- iou: `"bbox"` (or `"answer"`): [x1, y1, x2, y2] in the first image's pixels; the answer's first box, in either
  family's format (`grounding.parse_boxes`).

A trailing assistant turn in the line (a fine-tuning file) is the reference when the line has no "answers" /
"answer". Items whose prediction failed (`"error"` rows) score 0 and are counted apart, so a crash never raises a
number. `choose` answers multiple-choice items by log-likelihood instead of generation (lmms-eval's
`multiple_choice` output type: each option's text scored as the continuation, the highest sum wins).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..grounding import parse_boxes
from ..processing.image_io import load_image
from .metrics import METRICS, score_row, summarize
from .predict import Item
from .presets import Preset
from .scoring import score

__all__ = ["references", "evaluate", "choose", "first_image_size", "apply_preset"]


def references(item: Item) -> dict[str, Any]:
    """The fields the metrics read (module docstring's table): the line's own, else its trailing assistant turn."""
    row = dict(item.record)
    if "answers" not in row and "answer" not in row and item.reference is not None:
        row["answer"] = item.reference
    return row


def apply_preset(preset: Preset, item: Item) -> Item:
    """The item with its last user turn's text rendered by the preset's prompt (`Preset.render`): the line's
    "question" (and "choices") when it has one, else the turn's own text. The media parts stay, before the text,
    as lmms-eval's Qwen2-VL classes order them."""
    messages = [dict(m) for m in item.messages]
    last = messages[-1]
    parts = last["content"] if isinstance(last["content"], list) else [{"type": "text", "text": last["content"]}]
    question = item.record.get("question")
    if not isinstance(question, str):
        question = "".join(p["text"] for p in parts if p.get("type") == "text")
    text = preset.render(question, item.record.get("choices"))
    last["content"] = [p for p in parts if p.get("type") != "text"] + [{"type": "text", "text": text}]
    return Item(item.index, messages, item.reference, item.record)


def first_image_size(item: Item) -> tuple[int, int] | None:
    """(width, height) of the item's first image as stored (boxes refer to it), or None without one."""
    for message in item.messages:
        for part in message["content"] if isinstance(message["content"], list) else []:
            if part.get("type") == "image":
                image = part["image"]
                if isinstance(image, str | os.PathLike):
                    image = load_image(image)
                if hasattr(image, "shape"):  # an array [H, W, C]
                    return int(image.shape[1]), int(image.shape[0])
                return tuple(image.size)
    return None


def _iou_score(prediction: str, item: Item, row: dict, family: str, pixel_bounds: Mapping[str, int | None]) -> float:
    target = row.get("bbox", row.get("answer"))
    size = first_image_size(item)
    if size is None:
        raise ValueError(f"item {item.index}: the iou metric needs an image (boxes are in its pixels)")
    bounds = {k: v for k, v in pixel_bounds.items() if v is not None}
    for message in item.messages:  # an image's own qwen-vl-utils bounds win, as when it was encoded
        for part in message["content"] if isinstance(message["content"], list) else []:
            if part.get("type") == "image":
                bounds.update({k: part[k] for k in ("min_pixels", "max_pixels") if k in part})
                break
    boxes = parse_boxes(prediction, family=family, image_size=size, **bounds)
    return score_row("iou", prediction, {"bbox": target}, box=boxes[0].xyxy if boxes else None)


def evaluate(items: Sequence[Item], predictions: Mapping[int, Mapping[str, Any]], metric: str, *,
             family: str = "qwen2_vl", pixel_bounds: Mapping[str, int | None] | None = None
             ) -> tuple[list[dict], dict]:
    """(one record per item, the summary) of `metric` over `items`, whose predictions are `predictions[index]`
    (`predict`'s rows). `family` and `pixel_bounds` (min_pixels / max_pixels of the processor that ran) place the
    boxes of the iou metric; the other metrics ignore them."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    records, values, errors = [], [], 0
    for item in items:
        prediction = predictions.get(item.index)
        record = {"index": item.index, **({"id": item.id} if item.id is not None else {})}
        row = references(item)
        if prediction is None or "error" in prediction:
            errors += 1
            record.update(score=0.0, error=(prediction or {}).get("error", "no prediction for this item"))
        else:
            text = prediction["answer"]
            try:
                if metric == "iou":
                    value = _iou_score(text, item, row, family, pixel_bounds or {})
                else:
                    value = score_row(metric, text, row)
            except (ValueError, TypeError, OSError) as e:  # what the line lacks, an unreadable image, a bad box
                where = f"item {item.index}" + (f" (id {item.id!r})" if item.id is not None else "")
                raise ValueError(f"{where}: {e}") from None
            record.update(prediction=text, score=float(value))
        record["reference"] = {k: row[k] for k in ("answers", "answer", "choices", "bbox") if k in row}
        records.append(record)
        values.append(record["score"])
    summary = {"metric": metric, **summarize(values), "errors": errors}
    return records, summary


def choose(model, processor, items: Sequence[Item], *, batch_size: int = 8, hooks=None) -> dict[int, dict]:
    """Multiple-choice items answered by log-likelihood: each option's text after the prompt (`score`), the likeliest
    wins. Returns `predict`-style rows by index, the answer being the option's letter ("A", "B", ...) and the
    options' log-probabilities under "logprobs"."""
    prompts, continuations, owners = [], [], []
    for item in items:
        choices = item.record.get("choices")
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"item {item.index}: multiple choice needs \"choices\": a list of option texts")
        for choice in choices:
            prompts.append(item.messages)
            continuations.append(choice)
            owners.append(item.index)
    scores = score(model, processor, prompts, continuations, batch_size=batch_size, hooks=hooks)
    rows: dict[int, dict] = {}
    for owner, s in zip(owners, scores):
        rows.setdefault(owner, {"index": owner, "logprobs": []})["logprobs"].append(s.logprob)
    for row in rows.values():
        best = max(range(len(row["logprobs"])), key=row["logprobs"].__getitem__)
        row["answer"] = chr(ord("A") + best)
    return rows
