"""The published evaluation settings, per family and benchmark: image size bounds, prompt, answer length, stops, metric.

    p = preset("qwen2_vl/docvqa")
    text = p.render(question)                     # the user turn's text, after the image
    config = {"max_new_tokens": p.max_new_tokens, "stop": list(p.stop)}
    image = {"type": "image", "image": path, "min_pixels": p.min_pixels, "max_pixels": p.max_pixels}
    score = score_row(p.metric, answer, row)      # metrics.METRICS

Every value is the one lmms-eval (EvolvingLMMs-Lab/lmms-eval, the public harness; version 0.7.3 is the one read)
runs for its `qwen2_vl` / `qwen2_5_vl` models on the task named, and each preset's `source` names the files:

  * pixels: the model classes' defaults, `Qwen2_VL` (models/simple/qwen2_vl.py: min_pixels 3136, max_pixels
    602112) and `Qwen2_5_VL` (models/simple/qwen2_5_vl.py: min_pixels 256 * 28 * 28, max_pixels 1605632), passed
    to the processor and on every image;
  * prompt: the task's `doc_to_text` with its `lmms_eval_specific_kwargs` "default" entry (the "qwen_vl" entries
    are for Qwen-VL, a model of its own); the text follows the image in one user turn, under the system prompt
    "You are a helpful assistant." (both classes' default; Qwen's chat template inserts the same one);
  * max_new_tokens: the task yaml's `generation_kwargs`, or where it sets none the model class's default (128 for
    `Qwen2_VL`, 32768 for `Qwen2_5_VL`); decoding is greedy in every case (temperature 0);
  * stop: the yaml's `until`; where it sets none, lmms-eval's TaskConfig puts its few-shot delimiter "\\n\\n" there,
    which `Qwen2_VL` cuts the answer at and `Qwen2_5_VL` drops ("to prevent truncation");
  * metric: the name in `metrics.METRICS` that computes the task's `process_results` score.

These reproduce lmms-eval's numbers for the two families, not necessarily the numbers of Qwen's technical reports,
whose prompts and settings are not all published.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

__all__ = ["Preset", "PRESETS", "preset"]

QWEN2_VL = {"family": "qwen2_vl", "min_pixels": 3136, "max_pixels": 602112}
QWEN2_5_VL = {"family": "qwen2_5_vl", "min_pixels": 256 * 28 * 28, "max_pixels": 1605632}
MODEL_SOURCE = {"qwen2_vl": "models/simple/qwen2_vl.py (Qwen2_VL defaults: pixels, max_new_tokens 128)",
                "qwen2_5_vl": "models/simple/qwen2_5_vl.py (Qwen2_5_VL defaults: pixels, max_new_tokens 32768, "
                              "'\\n\\n' dropped from the stops)"}
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclasses.dataclass(frozen=True)
class Preset:
    """One family's published settings for one benchmark.

    `prompt` is a `str.format` template of the user turn's text: `{question}` is the dataset's question (for
    refcoco the referring expression), `{options}` the choices of a multiple-choice question, one "A. text" per
    line (`render` fills both). `capitalize_question`: the task passes `question.capitalize()` (textvqa: the first
    letter upper-cased, the rest lower-cased). `task` is lmms-eval's task name; `metric` a key of
    `metrics.METRICS`."""

    name: str
    family: str
    task: str
    min_pixels: int
    max_pixels: int
    prompt: str
    max_new_tokens: int
    metric: str
    stop: tuple[str, ...] = ()
    capitalize_question: bool = False
    source: str = ""
    notes: str = ""

    def render(self, question: str, choices: Sequence[str] | None = None) -> str:
        """The prompt's text for one question (and its options, where the prompt lists them)."""
        if self.capitalize_question:
            question = question.capitalize()
        if "{options}" in self.prompt:
            if not choices:
                raise ValueError(f"preset {self.name!r} lists the options: pass the question's choices")
            options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices))
            return self.prompt.format(question=question, options=options)
        return self.prompt.format(question=question)


def _presets() -> dict[str, Preset]:
    out = {}
    for model in (QWEN2_VL, QWEN2_5_VL):
        family = model["family"]
        qwen2 = family == "qwen2_vl"
        default_length = 128 if qwen2 else 32768  # the model class's max_new_tokens where the task sets none
        delimiter = ("\n\n",) if qwen2 else ()  # lmms-eval's default `until`, which Qwen2_5_VL drops
        common = dict(model)
        tasks = [
            Preset(name=f"{family}/docvqa", task="docvqa_val", prompt="{question}" + SHORT_ANSWER, max_new_tokens=32,
                   metric="anls", stop=delimiter,
                   source="lmms-eval 0.7.3 tasks/docvqa/_default_template_docvqa_yaml (post_prompt, "
                          "generation_kwargs), tasks/docvqa/docvqa_val.yaml (metric anls), api/metrics.py (anls), "
                          + MODEL_SOURCE[family],
                   notes="Rows: the question's list of answers. The test split is scored by the RRC server.",
                   **common),
            Preset(name=f"{family}/chartqa", task="chartqa",
                   prompt="{question}\nAnswer the question with a single word.", max_new_tokens=16,
                   metric="relaxed", stop=delimiter,
                   source="lmms-eval 0.7.3 tasks/chartqa/chartqa.yaml (post_prompt, generation_kwargs), "
                          "tasks/chartqa/utils.py (relaxed_correctness), " + MODEL_SOURCE[family],
                   notes="lmms-eval reports the human and augmented test splits apart as well as together.",
                   **common),
            Preset(name=f"{family}/textvqa", task="textvqa_val", prompt="{question}" + SHORT_ANSWER,
                   max_new_tokens=default_length, metric="textvqa", stop=("ASSISTANT:",), capitalize_question=True,
                   source="lmms-eval 0.7.3 tasks/textvqa/_default_template_textvqa_yaml (post_prompt, until, "
                          "ocr false), tasks/textvqa/utils.py (textvqa_doc_to_text, textvqa_process_results with "
                          "EvalAIAnswerProcessor), " + MODEL_SOURCE[family],
                   notes="No OCR tokens in the prompt (the default ocr: false). Rows: the 10 human answers.",
                   **common),
            Preset(name=f"{family}/vqav2", task="vqav2_val", prompt="{question}" + SHORT_ANSWER, max_new_tokens=16,
                   metric="vqa", stop=delimiter,
                   source="lmms-eval 0.7.3 tasks/vqav2/_default_template_vqav2_yaml (post_prompt, "
                          "generation_kwargs), tasks/vqav2/vqav2_val.yaml, tasks/vqav2/utils.py "
                          "(vqav2_process_results), " + MODEL_SOURCE[family],
                   notes="Rows: the 10 human answers. test-dev is scored by the EvalAI server.",
                   **common),
            Preset(name=f"{family}/mmmu", task="mmmu_val",
                   prompt="{question}\n{options}\n\nAnswer with the option's letter from the given choices directly.",
                   max_new_tokens=128, metric="choice", stop=delimiter,
                   source="lmms-eval 0.7.3 tasks/mmmu/mmmu_val.yaml (multiple_choice_prompt), "
                          "tasks/mmmu/_default_template_yaml (generation_kwargs), tasks/mmmu/utils.py "
                          "(construct_prompt, parse_options, parse_multi_choice_response), " + MODEL_SOURCE[family],
                   notes="Multiple-choice questions only: MMMU's open questions take the prompt '{question}\\n\\n"
                         "Answer the question using a single word or phrase.' and MMMU's eval_open, not here. "
                         "lmms-eval's Qwen2_VL / Qwen2_5_VL classes (simple models: doc_to_text) put every image "
                         "ahead of this text and leave the question's '<image N>' marks in it.",
                   **common),
            Preset(name=f"{family}/refcoco", task="refcoco_bbox_rec_val",
                   prompt="Bounding box coordinates are specified in the format (top-left x, top-left y, "
                          "bottom-right x, bottom-right y). All values are floating point numbers bounded between 0 "
                          "and 1. Please provide the bounding box coordinate of the region this sentence describes: "
                          "{question}",
                   max_new_tokens=default_length, metric="iou", stop=("ASSISTANT:",),
                   source="lmms-eval 0.7.3 tasks/refcoco/_default_template_bbox_rec_yaml (until, metrics), "
                          "tasks/refcoco/utils_rec.py (refcoco_bbox_rec_doc_to_text, compute_accuracy), "
                          + MODEL_SOURCE[family],
                   notes="One row per referring expression. The target box is COCO's (x, y, w, h) turned into "
                         "(x1, y1, x2, y2) divided by the image's width and height; lmms-eval reads the first "
                         "'[x1, y1, x2, y2]' of the answer (none: [0, 0, 0, 0]). It reports Acc@0.5 (this metric) "
                         "beside IoU, Acc@0.1-0.9 and center accuracy. The prompt asks for 0-1 coordinates, not the "
                         "family's own grounding format.",
                   **common),
        ]
        out.update((p.name, p) for p in tasks)
    return out


PRESETS: dict[str, Preset] = _presets()


def preset(name: str) -> Preset:
    """The preset `name` ("qwen2_vl/docvqa", "qwen2_5_vl/mmmu", ...)."""
    if name not in PRESETS:
        raise ValueError(f"unknown evaluation preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
