"""`qwen2vl-jax eval`: scoring a file of predictions (no model), boxes placed through the processor's resize, multiple
choice by log-likelihood, a preset's prompt, and the whole predict-then-score path on the tiny model. Expected
numbers are worked out here from the metrics' definitions, not read back from the code under test."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qwen2vl_jax import cli
from qwen2vl_jax.evaluation import Item, apply_preset, preset, read_items, score


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _text(question: str, image: str | None = None) -> list[dict]:
    content = ([{"type": "image", "image": image}] if image else []) + [{"type": "text", "text": question}]
    return [{"role": "user", "content": content}]


def test_eval_scores_a_predictions_file_without_a_model(tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", [
        {"id": "a", "messages": _text("Q1"), "answers": ["The Cat"]},
        {"id": "b", "messages": _text("Q2"), "answers": ["dog", "Dog."]},
        {"id": "c", "messages": _text("Q3") + [{"role": "assistant", "content": "blue"}]},  # reference: the turn
        {"id": "d", "messages": _text("Q4"), "answers": ["x"]},
    ])
    preds = _write(tmp_path / "p.jsonl", [
        {"index": 0, "id": "a", "answer": " the cat "},  # exact: stripped, lower-cased -> matches "the cat"
        {"index": 1, "id": "b", "answer": "cat"},        # no reference matches
        {"index": 2, "id": "c", "answer": "Blue"},       # matches the assistant turn's "blue"
        {"index": 3, "id": "d", "error": "ValueError: unreadable image"},  # scored 0, counted apart
    ])
    records = tmp_path / "r.jsonl"
    assert cli.main(["eval", "--data", str(data), "--predictions", str(preds), "--metric", "exact", "--records",
                     str(records), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["metric"] == "exact" and summary["count"] == 4 and summary["errors"] == 1
    assert summary["mean"] == pytest.approx(0.5)
    # normal approximation: scores 1, 0, 1, 0 -> sample sd = sqrt(1/3), stderr = sd / 2
    stderr = np.sqrt(1 / 3) / 2
    assert summary["ci95_low"] == pytest.approx(0.5 - 1.96 * stderr, abs=1e-3)
    rows = [json.loads(x) for x in records.read_text().splitlines()]
    assert [r["score"] for r in rows] == [1.0, 0.0, 1.0, 0.0]
    assert rows[2]["reference"] == {"answer": "blue"} and "unreadable image" in rows[3]["error"]
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"]
    # the table names the metric, the count and the score in percent
    assert cli.main(["eval", "--data", str(data), "--predictions", str(preds), "--metric", "exact"]) == 0
    table = capsys.readouterr().out
    assert "exact" in table and "50.00" in table and " 4 " in table


def test_eval_refuses_bad_prediction_files_and_lines_without_references(tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", [{"id": "a", "messages": _text("Q1"), "answers": ["x"]}])
    cases = [(b'{"index": 0, "answer": 5}\n', "line 1: not a prediction row"),
             (b'{"index": 0}\n', "line 1: not a prediction row"),
             (b'{"index": true, "answer": "x"}\n', "line 1: not a prediction row"),
             (b"\xff\xfe", "not UTF-8")]
    for content, message in cases:
        (tmp_path / "p.jsonl").write_bytes(content)
        assert cli.main(["eval", "--data", str(data), "--predictions", str(tmp_path / "p.jsonl"), "--metric",
                         "exact"]) == 2
        assert message in capsys.readouterr().err
    (tmp_path / "p.jsonl").write_text('{"index": 0, "answer": "x"}\n')
    assert cli.main(["eval", "--data", str(data), "--predictions", str(tmp_path / "p.jsonl"), "--metric",
                     "choice"]) == 2
    assert "item 0 (id 'a'): metric \"choice\" needs" in capsys.readouterr().err


def test_eval_iou_places_boxes_through_the_processor_resize(tiny_checkpoint, tmp_path, capsys):
    from PIL import Image

    # a 640x480 image; the tiny checkpoint's processor with max_pixels 200704 resizes it to 504x392 (transformers'
    # smart_resize: round(480/28)*28 = 476, round(640/28)*28 = 644 -> 644*476 > 200704 -> beta = sqrt(307200 /
    # 200704), floor(480/beta/28)*28 = 364, floor(640/beta/28)*28 = 504: 504 x 364)
    Image.new("RGB", (640, 480), (90, 90, 90)).save(tmp_path / "im.png")
    target = [64, 48, 320, 240]  # original pixels
    data = _write(tmp_path / "d.jsonl", [{"messages": _text("Find it.", "im.png"), "bbox": target}] * 3)
    sx, sy = 504 / 640, 364 / 480
    preds = _write(tmp_path / "p.jsonl", [
        # Qwen2-VL: 0-1000 of the image: the target exactly -> IoU 1
        {"index": 0, "answer": "<|object_ref_start|>it<|object_ref_end|><|box_start|>(100,100),(500,500)<|box_end|>"},
        # the target in resized pixels, as Qwen2.5-VL would write it, read as Qwen2-VL 0-1000: a wrong box
        {"index": 1, "answer": "```json\n" + json.dumps([{"bbox_2d": [int(64 * sx), int(48 * sy), int(320 * sx),
                                                                   int(240 * sy)], "label": "it"}]) + "\n```"},
        {"index": 2, "answer": "no box here"},
    ])
    records = tmp_path / "r.jsonl"
    assert cli.main(["eval", "--model", str(tiny_checkpoint), "--data", str(data), "--predictions", str(preds),
                     "--metric", "iou", "--max-pixels", "200704", "--records", str(records), "--json"]) == 0
    got = [json.loads(x)["score"] for x in records.read_text().splitlines()]
    # row 1 parsed as Qwen2-VL (the checkpoint's family) would be [50.4*0.64, ...] = far smaller: IoU < 0.5
    assert got == [1.0, 0.0, 0.0]
    capsys.readouterr()


def test_apply_preset_renders_the_published_prompt(tmp_path):
    p = preset("qwen2_vl/docvqa")
    item = Item(0, _text("What is the date?", "/x.png"), None, {})
    rendered = apply_preset(p, item).messages[-1]["content"]
    assert rendered[0] == {"type": "image", "image": "/x.png"}
    assert rendered[1]["text"] == "What is the date?\nAnswer the question using a single word or phrase."
    assert item.messages[-1]["content"][1]["text"] == "What is the date?"  # the item itself is not changed
    mc = Item(1, _text("ignored"), None, {"question": "Which?", "choices": ["red", "blue"]})
    text = apply_preset(preset("qwen2_vl/mmmu"), mc).messages[-1]["content"][-1]["text"]
    assert "Which?" in text and "A. red" in text and "B. blue" in text
    with pytest.raises(ValueError, match="known: qwen2_vl/docvqa"):
        preset("docvqa")


def test_eval_end_to_end_and_choice_by_loglikelihood(tiny_checkpoint, photos, tmp_path, capsys):
    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration
    from qwen2vl_jax.processing.processor import Qwen2VLProcessor

    photos["coffee"].resize((112, 84)).save(tmp_path / "c.png")
    rows = [{"id": f"m{i}", "messages": _text(f"Which colour? ({i})", "c.png" if i % 2 else None),
             "choices": ["red", "green", "a much longer option"], "answer": "ABC"[i % 3]} for i in range(4)]
    data = _write(tmp_path / "mc.jsonl", rows)
    out = tmp_path / "choices.jsonl"
    common = ["--model", str(tiny_checkpoint), "--data", str(data), "--max-pixels", "12544", "--dtype", "float32",
              "--quiet"]
    assert cli.main(["eval", *common, "--metric", "choice", "--choice-by", "loglikelihood", "--out", str(out),
                     "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    picked = [json.loads(x) for x in out.read_text().splitlines()]
    # the picks are the argmax of each option's log-likelihood, scored apart here with `score`
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    processor = Qwen2VLProcessor.from_pretrained(tiny_checkpoint, max_pixels=12544)
    items = read_items(data)
    for item, row in zip(items, picked):
        lp = [s.logprob for s in score(model, processor, [item.messages] * 3, item.record["choices"])]
        assert row["answer"] == "ABC"[int(np.argmax(lp))]
        np.testing.assert_allclose(row["logprobs"], lp, rtol=1e-5)
    expected = np.mean([row["answer"] == r["answer"] for row, r in zip(picked, rows)])
    assert summary["mean"] == pytest.approx(expected) and summary["count"] == 4
    # generation: predict then score; the predictions file has one row per item with its id
    preds = tmp_path / "gen.jsonl"
    assert cli.main(["eval", *common, "--metric", "exact", "--out", str(preds), "--max-new-tokens", "3",
                     "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert [x["id"] for x in lines] == [r["id"] for r in rows] and all(x["new_tokens"] <= 3 for x in lines)
    assert summary["count"] == 4 and summary["predictions"] == str(preds)
    assert Path(summary["records"]).is_file()
