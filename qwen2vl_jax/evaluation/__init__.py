"""Evaluation: predictions over a dataset, the benchmarks' metrics, log-likelihood scoring, lmms-eval's plugin.

    metrics.py        anls, vqa_accuracy, textvqa_accuracy, relaxed_accuracy, exact_match, choice_accuracy,
                      iou_accuracy; the METRICS registry, score_row, summarize
    vqa_normalize.py  the official VQA answer normalisation (vqaEval.py) and TextVQA's variant
    presets.py        the published evaluation settings per family and benchmark (lmms-eval's)
    scoring.py        score(model, processor, prompts, continuations): summed log-probabilities, greedy or not
    predict.py        read_items (prompts in the fine-tuning JSONL format), Predictor: answers on the serving engine
    runs.py           RunOutput: a prediction file resumable after a kill, shared between processes
    evaluate.py       evaluate (records + summary of a metric over items), choose (multiple choice by likelihood)
    lmms_plugin/      the lmms-eval model plugin (LMMS_EVAL_PLUGINS=qwen2vl_jax.evaluation.lmms_plugin)
"""

from .evaluate import apply_preset, choose, evaluate, references
from .metrics import (
    METRICS,
    Metric,
    anls,
    box_iou,
    choice_accuracy,
    exact_match,
    iou_accuracy,
    levenshtein,
    parse_choice,
    relaxed_accuracy,
    score_row,
    summarize,
    textvqa_accuracy,
    vqa_accuracy,
)
from .predict import Item, Predictor, generation_config, read_items
from .presets import PRESETS, Preset, preset
from .runs import RunError, RunOutput
from .scoring import Score, encode_prompt, score
from .vqa_normalize import normalize_answer, normalize_textvqa_answer

__all__ = ["METRICS", "Metric", "anls", "box_iou", "choice_accuracy", "exact_match", "iou_accuracy", "levenshtein",
           "parse_choice", "relaxed_accuracy", "score_row", "summarize", "textvqa_accuracy", "vqa_accuracy",
           "PRESETS", "Preset", "preset", "normalize_answer", "normalize_textvqa_answer",
           "Score", "encode_prompt", "score", "Item", "Predictor", "generation_config", "read_items",
           "RunError", "RunOutput", "apply_preset", "choose", "evaluate", "references"]
