"""The benchmarks' metrics: one prediction against its references -> a score in [0, 1]; many scores -> a summary.

    anls("Acme Corp", ["ACME Corp."])                     # DocVQA / InfographicVQA
    vqa_accuracy("two", ["2"] * 3 + ["3"] * 7)            # VQA v2 (textvqa_accuracy: TextVQA)
    relaxed_accuracy("12.3", "12.5")                      # ChartQA
    exact_match(" Paris", ["paris"])
    choice_accuracy("It is (B)", "B", ["cat", "dog"])     # MMMU-style multiple choice
    iou_accuracy([10, 10, 50, 50], [12, 8, 48, 52])       # RefCOCO Acc@0.5 (boxes x1, y1, x2, y2)

    scores = [score_row("anls", answer, row) for answer, row in zip(answers, rows)]
    summarize(scores)   # {"mean", "count", "stderr", "ci95_low", "ci95_high"}

Each function mirrors the published evaluation script of its benchmark (cited where it is defined); where the
scripts disagree with each other or with their paper, the docstring says which one this follows and why. They are
pure Python: no NumPy, no JAX, no model.

`METRICS` names them for a data row: `score_row(metric, prediction, row)` reads the references from the row,
the way `predict.read_items` keeps them on `Item.record`: "answers" (a list of strings) or "answer" (a string or
a list), "choices" (the options of a multiple-choice question) and "bbox" (the target box, x1, y1, x2, y2). Boxes
in an answer are for the caller to read (the `grounding` package parses either family's format): `score_row("iou",
prediction, row, box=parsed)` takes the predicted box already parsed, in the row's coordinates, or None.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .vqa_normalize import normalize_answer, normalize_textvqa_answer

__all__ = ["levenshtein", "anls", "vqa_accuracy", "textvqa_accuracy", "relaxed_accuracy", "exact_match",
           "parse_choice", "choice_accuracy", "box_iou", "iou_accuracy", "Metric", "METRICS", "score_row",
           "summarize"]

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
Z95 = 1.959963984540054  # the two-sided 95% quantile of the standard normal


def _as_list(answers: str | Sequence[str]) -> list[str]:
    """One reference or several -> a non-empty list of strings (a number in a JSON row counts as its text)."""
    items = [answers] if isinstance(answers, (str, int, float)) else list(answers)
    if not items:
        raise ValueError("no reference answers to score against")
    return [a if isinstance(a, str) else str(a) for a in items]


# ------------------------------------------------------------------------------------------------ ANLS (DocVQA)
def levenshtein(a: str, b: str) -> int:
    """The edit distance (insertions, deletions, substitutions, each costing 1) between two strings."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _anls_text(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: str | Sequence[str], *, threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one question (ST-VQA's metric, Biten et al. 2019, "Scene Text
    Visual Question Answering"; DocVQA and InfographicVQA score with it): the best over the reference answers of
    `1 - NL` when it reaches `threshold`, else 0, where `NL = levenshtein(a, p) / max(len(a), len(p))` on strings
    lower-cased with their whitespace collapsed (`" ".join(s.strip().lower().split())`, as the DocVQA evaluation
    script lmms-eval and Qwen-VL run: Qwen-VL eval_mm/infographicsvqa_eval.py, lmms-eval `api/metrics.py` `anls`).

    At exactly the threshold this follows the scripts, not the paper: they zero a question when `1 - NL < 0.5`, so
    NL = 0.5 scores 0.5, where the paper's `NL < tau` would give 0. The lengths are those of the normalised strings
    (as in the paper's NL of the two strings compared, and the RRC script before whitespace collapsing was added):
    the scripts above divide by the lengths of the raw strings, which differ only when collapsing removed spaces.
    Two empty strings are identical (NL 0)."""
    p = _anls_text(prediction)
    best = 0.0
    for answer in _as_list(answers):
        a = _anls_text(answer)
        length = max(len(a), len(p))
        similarity = 1.0 - (levenshtein(a, p) / length if length else 0.0)
        best = max(best, similarity if similarity >= threshold else 0.0)
    return best


# ------------------------------------------------------------------------------------------------ VQA accuracy
def _leave_one_out(prediction: str, answers: list[str]) -> float:
    """min(1, humans who gave `prediction` / 3), averaged over the subsets that leave one human answer out."""
    if len(answers) == 1:  # no subset to leave one out of: the lone answer is the reference
        return float(answers[0] == prediction)
    matches = sum(a == prediction for a in answers)
    total = 0.0
    for answer in answers:
        total += min(1.0, (matches - (answer == prediction)) / 3.0)
    return total / len(answers)


def vqa_accuracy(prediction: str, answers: str | Sequence[str]) -> float:
    """The VQA accuracy (Antol et al. 2015; VQA v2, Goyal et al. 2017): `min(1, #humans that said it / 3)`,
    averaged over the 10 subsets of 9 human answers that leave one out, as GT-Vision-Lab/VQA
    PythonEvaluationTools/vqaEvaluation/vqaEval.py computes it. With k humans matching among 10, a subset leaves
    k - 1 matches (the k that drop a matching answer) or k (the rest): 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4+ -> 1.0.
    Any number of answers works the same way (each one left out in turn; with 3 answers the best is 2/3); a single
    answer leaves nothing to compare with, so it scores as the match of the normalised strings.

    The prediction and every answer are normalised with vqaEval.py's processing (`vqa_normalize.normalize_answer`),
    always, as lmms-eval's vqav2 task does. vqaEval.py itself applies only `processPunctuation`, and only when the
    humans disagree, to its answers, relying on the released annotations being written that way already; with
    references from elsewhere ("two", "the cat") that shortcut would never match a normalised prediction."""
    return _leave_one_out(normalize_answer(prediction), [normalize_answer(a) for a in _as_list(answers)])


def textvqa_accuracy(prediction: str, answers: str | Sequence[str]) -> float:
    """`vqa_accuracy` with TextVQA's normalisation (mmf's `EvalAIAnswerProcessor`, `vqa_normalize.
    normalize_textvqa_answer`: commas and question marks deleted before the VQA processing), as TextVQA's
    evaluation (mmf M4C `TextVQAAccuracyEvaluator`, lmms-eval `textvqa_process_results`) scores it."""
    return _leave_one_out(normalize_textvqa_answer(prediction),
                          [normalize_textvqa_answer(a) for a in _as_list(answers)])


# ------------------------------------------------------------------------------------------------ ChartQA
def _to_float(text: str) -> float | None:
    """pix2struct `_to_float`: a trailing '%' divides by 100; anything `float()` refuses is not a number."""
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, *, tolerance: float = 0.05) -> float:
    """ChartQA's relaxed accuracy (Masry et al. 2022, section 5.1, after Methani et al. 2020): a numeric answer is
    right within `tolerance` (5%) of the target's value, `|p - t| / |t| <= tolerance`; any other answer needs an
    exact, case-insensitive match. This is google-research/pix2struct `metrics.relaxed_correctness`, the function
    Qwen-VL's eval_mm/evaluate_vqa.py and lmms-eval's chartqa task copy, with its parsing kept exactly:

      * "45%" reads as 0.45, so it matches a target "0.45" and not a target "45";
      * "1,000" is not a number to `float()`, so it is compared as text and does not match "1000";
      * a target of 0 is compared as text (the script tests the target's value for truth): "0.0" is not "0".

    The surrounding whitespace of both strings is dropped first (Qwen-VL strips the prediction; `float()` ignores
    it anyway)."""
    prediction, target = prediction.strip(), target.strip()
    p, t = _to_float(prediction), _to_float(target)
    if p is not None and t:
        return float(abs(p - t) / abs(t) <= tolerance)
    return float(prediction.lower() == target.lower())


# ------------------------------------------------------------------------------------------------ exact match
def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1 when the prediction equals any answer once both are stripped and lower-cased (Qwen-VL eval_mm/
    evaluate_vqa.py `evaluate_exact_match_accuracy`): no punctuation or article handling."""
    p = prediction.strip().lower()
    return float(any(p == a.strip().lower() for a in _as_list(answers)))


# ------------------------------------------------------------------------------------------------ multiple choice
def _letters(choices: Sequence[str]) -> str:
    if not 0 < len(choices) <= len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 1 to {len(LETTERS)} choices, got {len(choices)}")
    return LETTERS[: len(choices)]


def parse_choice(prediction: str, choices: Sequence[str]) -> int | None:
    """Which option (its index) a free-form answer picked, or None. MMMU's `parse_multi_choice_response`
    (MMMU-Benchmark/MMMU eval/eval_utils.py, as lmms-eval's mmmu task runs it), in order, on the answer with
    ",.!?;:'" stripped from its ends and a space added at both:

      1. "(B)"                                   the letters in parentheses;
      2. " B "                                   a letter standing alone ("B", "The answer is B.");
      3. " B."                                   a letter and a period ("B. Paris"): lmms-eval's addition;
      4. an option's text inside the answer      only for answers of more than 5 words (MMMU's rule);
      5. the answer is an option's text          ("Paris"): ours, see below.

    Several candidates in one step: the one mentioned last wins (MMMU's `rfind`). Letters are upper-case only
    (MMMU's), and option texts are compared case-insensitively.

    Where this departs: MMMU picks a random option when nothing matches (an expected 1/n); this returns None, which
    scores 0, so runs are repeatable. Step 5, a short answer that is exactly one option's text, is ours: MMMU would
    draw at random there. Step 3 needs a space before the letter; lmms-eval's `f"{choice}."` also matches the last
    letter of any upper-case word ("It is DNA. Definitely" -> A). The answer's surrounding whitespace goes before
    the punctuation."""
    letters = _letters(choices)
    response = prediction.strip()
    for char in ",.!?;:'":
        response = response.strip(char)
    response = f" {response} "
    for pattern in ("({})", " {} ", " {}."):
        found = {i: response.rfind(pattern.format(letter)) for i, letter in enumerate(letters)}
        found = {i: at for i, at in found.items() if at >= 0}
        if found:
            return max(found, key=lambda i: (found[i], -i))  # the last mentioned; a tie: the first option
    lowered = response.lower()
    if len(response.split()) > 5:
        found = {i: lowered.rfind(str(c).lower()) for i, c in enumerate(choices) if str(c).strip()}
        found = {i: at for i, at in found.items() if at >= 0}
        if found:
            return max(found, key=lambda i: (found[i], -i))
    for i, choice in enumerate(choices):
        if lowered.strip() == str(choice).strip().lower():
            return i
    return None


def _choice_index(answer: str | int, choices: Sequence[str]) -> int:
    """The reference answer as an option index: an int is the index, a string the letter ("B" or "b")."""
    letters = _letters(choices)
    if isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise ValueError(f"answer index {answer} is out of range for {len(choices)} choices")
        return answer
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in letters:
        return letters.index(answer.strip().upper())
    raise ValueError(f"a multiple-choice answer must be a letter among {', '.join(letters)} or an option index, "
                     f"got {answer!r}")


def choice_accuracy(prediction: str, answer: str | int, choices: Sequence[str]) -> float:
    """1 when `parse_choice` reads the option `answer` names (a letter, or the option's index) from the prediction
    (MMMU's `eval_multi_choice`: the parsed letter equals the answer). An unreadable answer scores 0."""
    return float(parse_choice(prediction, choices) == _choice_index(answer, choices))


# ------------------------------------------------------------------------------------------------ boxes
def box_iou(a_xyxy: Sequence[float], b_xyxy: Sequence[float]) -> float:
    """Intersection over union of two boxes (x1, y1, x2, y2), in continuous coordinates (no +1 pixel convention:
    lmms-eval's refcoco `compute_iou`). A box with x2 < x1 or y2 < y1 has no area; two boxes with no union -> 0."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a_xyxy)
    bx1, by1, bx2, by2 = (float(v) for v in b_xyxy)
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def iou_accuracy(pred_xyxy: Sequence[float] | None, target_xyxy: Sequence[float], *, threshold: float = 0.5) -> float:
    """Referring-expression comprehension accuracy (RefCOCO / RefCOCO+ / RefCOCOg, "Acc@0.5"): 1 when the
    predicted box overlaps the target with IoU >= `threshold` (lmms-eval refcoco `compute_accuracy`). No box
    parsed from the answer (None) scores 0, as lmms-eval's [0, 0, 0, 0] fallback does."""
    if pred_xyxy is None:
        return 0.0
    return float(box_iou(pred_xyxy, target_xyxy) >= threshold)


# ------------------------------------------------------------------------------------------------ the registry
@dataclasses.dataclass(frozen=True)
class Metric:
    """A metric by name: its function, the keys a data row must hold for `score_row`, and what it measures."""

    name: str
    function: Callable[..., float]
    needs: tuple[str, ...]
    description: str


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("anls", anls, ("answers",),
           "DocVQA's ANLS: best 1 - normalized edit distance over the answers, 0 below 0.5"),
    Metric("vqa", vqa_accuracy, ("answers",),
           "VQA accuracy: min(1, matching humans / 3) over leave-one-out subsets, vqaEval.py normalisation"),
    Metric("textvqa", textvqa_accuracy, ("answers",),
           "VQA accuracy with TextVQA's (EvalAI) normalisation"),
    Metric("relaxed", relaxed_accuracy, ("answers",),
           "ChartQA's relaxed accuracy: numbers within 5% of the target, else exact text (best over answers)"),
    Metric("exact", exact_match, ("answers",),
           "exact match of the stripped, lower-cased answer with any reference"),
    Metric("choice", choice_accuracy, ("answer", "choices"),
           "multiple choice: the option MMMU's parser reads from the answer is the reference (a letter or index)"),
    Metric("iou", iou_accuracy, ("bbox",),
           "RefCOCO Acc@0.5: the predicted box (parsed by the caller) has IoU >= 0.5 with the target"),
)}


def _references(row: Mapping[str, Any], metric: str) -> list[str]:
    for key in ("answers", "answer"):
        if row.get(key) is not None:
            return _as_list(row[key])
    raise ValueError(f'metric {metric!r} needs the reference answers on the row: "answers" (a list of strings) or '
                     f'"answer"; the row has {sorted(row)}')


def score_row(metric_name: str, prediction: str, row: Mapping[str, Any], *,
              box: Sequence[float] | None = None) -> float:
    """Score one prediction against the references of its data row with the metric `metric_name` names.

    anls, vqa, textvqa, exact: the row's "answers" (or "answer": a string or a list). relaxed: the same, the best
    over the references (Qwen-VL's `evaluate_relaxed_accuracy`). choice: "answer" (a letter or an option index)
    and "choices". iou: "bbox" (x1, y1, x2, y2), and `box`, the box the caller parsed from the prediction in the
    same coordinates (None when it found none); `prediction` is not read."""
    if metric_name not in METRICS:
        raise ValueError(f"unknown metric {metric_name!r}; known: {', '.join(METRICS)}")
    if metric_name == "choice":
        if row.get("answer") is None or not row.get("choices"):
            raise ValueError(f'metric "choice" needs "answer" (a letter or an option index) and "choices" (the '
                             f'options) on the row; the row has {sorted(row)}')
        return choice_accuracy(prediction, row["answer"], row["choices"])
    if metric_name == "iou":
        if row.get("bbox") is None:
            raise ValueError(f'metric "iou" needs "bbox" (the target box x1, y1, x2, y2) on the row; the row has '
                             f'{sorted(row)}')
        return iou_accuracy(box, row["bbox"])
    references = _references(row, metric_name)
    if metric_name == "relaxed":
        return max(relaxed_accuracy(prediction, r) for r in references)
    return METRICS[metric_name].function(prediction, references)


def summarize(scores: Sequence[float]) -> dict[str, float | int | None]:
    """The mean of per-row scores, their count, the standard error of the mean (sample standard deviation over
    sqrt(n), as lmms-eval's `mean_stderr`) and a 95% confidence interval by the normal approximation,
    mean -/+ 1.96 stderr. It is not clipped: with few rows, or a mean near 0 or 1, it can pass the [0, 1] range
    the scores live in. No rows: everything but the count is None; one row: the stderr and interval are None."""
    values = [float(s) for s in scores]
    n = len(values)
    out: dict[str, float | int | None] = {"mean": None, "count": n, "stderr": None, "ci95_low": None,
                                          "ci95_high": None}
    if n == 0:
        return out
    mean = math.fsum(values) / n
    out["mean"] = mean
    if n > 1:
        stderr = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1) / n)
        out.update(stderr=stderr, ci95_low=mean - Z95 * stderr, ci95_high=mean + Z95 * stderr)
    return out
