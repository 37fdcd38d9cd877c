"""`qwen2vl-jax generate --json` reports the boxes of an answer in the original image's pixels
(qwen2vl_jax/cli/generate.py `answer_boxes`), for either family, the processor's pixel bounds, EXIF-rotated photos
and several images.

A random model writes no boxes: `answer_boxes` is tested on chosen answers, and the one CLI run swaps the model
and its generation for a canned answer (nothing compiles), so the flags, the processor the CLI loads and the JSON it
prints are the real ones.
"""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from qwen2vl_jax import cli
from qwen2vl_jax.cli import generate
from qwen2vl_jax.processing.processor import Qwen2_5_VLProcessor, Qwen2VLProcessor


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("boxes")
    paths = {}
    for name, size in (("wide", (400, 100)), ("small", (100, 80))):
        paths[name] = root / f"{name}.png"
        Image.new("RGB", size, (200, 100, 50)).save(paths[name])
    # stored 100 wide x 60 high, EXIF orientation 6 (rotate 90): the processor sees it 60 wide x 100 high
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.new("RGB", (100, 60), (10, 20, 30)).save(buf, format="JPEG", exif=exif.tobytes())
    paths["rotated"] = root / "rotated.jpg"
    paths["rotated"].write_bytes(buf.getvalue())
    return {k: str(v) for k, v in paths.items()}


QWEN2_ANSWER = ("<|object_ref_start|>cat<|object_ref_end|><|box_start|>(0,0),(500,1000)<|box_end|>"
                "<|box_start|>(500,500),(1000,1000)<|box_end|>")


def test_answer_boxes_qwen2_vl(proc, photo_files):
    out = generate.answer_boxes(QWEN2_ANSWER, proc, [photo_files["wide"]])
    assert out == {"boxes": [{"label": "cat", "xyxy": [0.0, 0.0, 200.0, 100.0], "image": 0},
                             {"label": "cat", "xyxy": [200.0, 50.0, 400.0, 100.0], "image": 0}],
                   "points": [], "box_problems": []}
    # as the CLI decodes it (skip_special_tokens=True): the bare form, the label alone on its line
    bare = proc.decode(proc.tokenizer.encode(QWEN2_ANSWER, add_special_tokens=False))
    assert bare == "cat(0,0),(500,1000)(500,500),(1000,1000)"
    assert generate.answer_boxes(bare, proc, [photo_files["wide"]]) == out
    assert generate.answer_boxes("A cat on a mat.", proc, [photo_files["wide"]]) == {}
    # the EXIF orientation is applied, as the processor applies it: 60 wide, 100 high
    rotated = generate.answer_boxes("<|box_start|>(0,0),(1000,1000)<|box_end|>", proc, [photo_files["rotated"]])
    assert rotated["boxes"] == [{"label": "", "xyxy": [0.0, 0.0, 60.0, 100.0], "image": 0}]


def test_answer_boxes_qwen2_5_vl_uses_the_processors_bounds(proc, photo_files):
    small_max = Qwen2VLProcessor(proc.image_processor.__class__(min_pixels=3136, max_pixels=4 * 28 * 28),
                                 proc.tokenizer)
    processor = Qwen2_5_VLProcessor(small_max.image_processor, proc.tokenizer)
    # 400 x 100 under 4*28*28 pixels: smart_resize gives 112 x 28
    answer = 'Found:\n```json\n[{"bbox_2d": [0, 0, 56, 28], "label": "left half"}]\n```'
    out = generate.answer_boxes(answer, processor, [photo_files["wide"]])
    assert out["boxes"] == [{"label": "left half", "xyxy": [0.0, 0.0, 200.0, 100.0], "image": 0}]
    default = Qwen2_5_VLProcessor(proc.image_processor, proc.tokenizer)  # 400 x 100 -> 392 x 112: a range problem
    assert generate.answer_boxes(answer.replace("56, 28", "56, 113"), default, [photo_files["wide"]])[
        "box_problems"][0]["kind"] == "range"


def test_answer_boxes_with_several_images_or_none(proc, photo_files):
    images = [photo_files["wide"], photo_files["small"]]
    unread = generate.answer_boxes(QWEN2_ANSWER, proc, images)
    assert unread["boxes"] == [] and unread["box_problems"][0]["kind"] == "image"
    assert "--boxes-image" in unread["box_problems"][0]["message"]
    second = generate.answer_boxes(QWEN2_ANSWER, proc, images, which=1)
    assert second["boxes"][0] == {"label": "cat", "xyxy": [0.0, 0.0, 50.0, 80.0], "image": 1}
    assert generate.answer_boxes(QWEN2_ANSWER, proc, [])["box_problems"][0]["kind"] == "image"


def test_generate_json_reports_boxes(tiny_checkpoint, photo_files, monkeypatch, capsys):
    stats = {"prompt_tokens": 10, "vision_tokens": 4, "new_tokens": 3, "prefill_s": 0.1, "decode_tok_s": None}
    monkeypatch.setattr(generate, "load_model", lambda *a, **k: None)
    # what the model writes (tags kept: the raw text the boxes are read from) and the answer shown (tags skipped)
    raw = "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(0,0),(500,1000)<|box_end|><|im_end|>"
    monkeypatch.setattr(generate, "run_generation", lambda *a, **k: ("cat(0,0),(500,1000)", dict(stats), raw))
    base = ["generate", "--model", str(tiny_checkpoint), "--prompt", "Where is the cat?", "--json", "--quiet",
            "--dtype", "float32"]
    assert cli.main(base + ["--image", photo_files["wide"]]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["answer"] == "cat(0,0),(500,1000)" and data["new_tokens"] == 3
    assert data["boxes"] == [{"label": "cat", "xyxy": [0.0, 0.0, 200.0, 100.0], "image": 0}]
    assert cli.main(base + ["--image", photo_files["wide"], "--image", photo_files["small"], "--boxes-image",
                            "1"]) == 0
    assert json.loads(capsys.readouterr().out)["boxes"][0]["xyxy"] == [0.0, 0.0, 50.0, 80.0]
    assert cli.main(base + ["--image", photo_files["wide"], "--boxes-image", "1"]) == 2
    assert "--boxes-image 1" in capsys.readouterr().err
