"""qwen2vl_jax.grounding: boxes round-trip through both families' conventions (transformers' `smart_resize` the
oracle for the resized size), the parser reads every format and reports every kind of malformed box, and a drawing
changes only the boxes' borders and labels.

The oracle is transformers 4.57's own `smart_resize` (models/qwen2_vl/image_processing_qwen2_vl.py), its code taken
from the installed package's file: importing the module would import torch (about 4 s), and these tests stay fast.
"""

from __future__ import annotations

import ast
import importlib.util
import math
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from qwen2vl_jax import grounding
from qwen2vl_jax.grounding import Box, GroundingError, draw_boxes, format_boxes, parse_boxes

HUB_MIN, HUB_MAX = 3136, 12845056  # the Qwen2-VL / Qwen2.5-VL *-Instruct preprocessor_config.json bounds


def _transformers_smart_resize():
    """transformers' `smart_resize`, compiled from the installed package's source file (nothing of ours in it)."""
    package = Path(importlib.util.find_spec("transformers").submodule_search_locations[0])
    source = (package / "models" / "qwen2_vl" / "image_processing_qwen2_vl.py").read_text()
    (node,) = [n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "smart_resize"]
    namespace = {"math": math}
    exec(compile(ast.Module([node], []), "transformers smart_resize", "exec"), namespace)
    return namespace["smart_resize"]


hf_smart_resize = _transformers_smart_resize()

# (width, height, min_pixels, max_pixels): None = the defaults
SIZES = [
    pytest.param(1920, 480, None, None, id="wide"),
    pytest.param(300, 1200, None, None, id="tall"),
    pytest.param(40, 30, None, None, id="tiny"),  # under min_pixels: scaled up
    pytest.param(6000, 4000, None, None, id="huge"),  # over max_pixels: scaled down
    pytest.param(333, 777, None, None, id="odd"),
    pytest.param(1000, 750, 256 * 28 * 28, 512 * 28 * 28, id="bounded"),  # non-default bounds: scaled down
    pytest.param(120, 90, 512 * 28 * 28, 1024 * 28 * 28, id="raised-min"),  # scaled up to a raised min_pixels
]


def _random_boxes(width, height, n=12, seed=0):
    rng = random.Random(seed)
    boxes = [Box("whole", (0, 0, width, height)), Box("corner", (width - 1, height - 1, width, height))]
    for i in range(n):
        x1, x2 = sorted(rng.uniform(0, width) for _ in range(2))
        y1, y2 = sorted(rng.uniform(0, height) for _ in range(2))
        boxes.append(Box(f"thing {i % 3}", (x1, y1, x2, y2)))
    return boxes


# ------------------------------------------------------------------------------------------------ conventions
@pytest.mark.parametrize("width, height, min_pixels, max_pixels", SIZES)
def test_boxes_round_trip_through_each_convention(width, height, min_pixels, max_pixels):
    bounds = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    h_r, w_r = hf_smart_resize(height, width, factor=28, min_pixels=min_pixels or HUB_MIN,
                               max_pixels=max_pixels or HUB_MAX)
    assert grounding.resized_size((width, height), **bounds) == (w_r, h_r)
    assert grounding.model_frame("qwen2_5_vl", (width, height), **bounds) == (w_r, h_r)
    assert grounding.model_frame("qwen2_vl", (width, height), **bounds) == (1000, 1000)
    boxes = _random_boxes(width, height)
    for family, (fw, fh) in (("qwen2_vl", (1000, 1000)), ("qwen2_5_vl", (w_r, h_r))):
        # the published conventions, computed here: 0-1000 of the image; pixels of the resized input (#721)
        for box in boxes:
            expected = [math.floor(v * (fw if i % 2 == 0 else fh) / (width if i % 2 == 0 else height) + 0.5)
                        for i, v in enumerate(box.xyxy)]
            assert list(grounding.to_model(box.xyxy, family, (width, height), **bounds)) == expected
        answer = format_boxes(boxes, family=family, image_size=(width, height), **bounds)
        parsed = parse_boxes(answer, family=family, image_size=(width, height), strict=True, **bounds)
        assert [b.label for b in parsed] == [b.label for b in boxes] and parsed.problems == []
        # an integer grid: a box comes back within half a step, <= 1 px wherever the step is <= 2 px (every
        # qwen2_5_vl case here; qwen2_vl up to 2000 px)
        step_x, step_y = width / fw, height / fh
        for got, want in zip(parsed, boxes):
            err = np.abs(np.subtract(got.xyxy, want.xyxy))
            assert err[0::2].max() <= step_x / 2 + 1e-9 and err[1::2].max() <= step_y / 2 + 1e-9, (family, got, want)
            if max(step_x, step_y) <= 2:
                assert err.max() <= 1, (family, got, want)
            # the model's own numbers survive reading and writing back exactly
            assert grounding.to_model(got.xyxy, family, (width, height), **bounds) == got.model
        assert parsed[0].xyxy == (0, 0, width, height)  # the image's edges are on every grid


def test_defaults_are_the_released_checkpoints_bounds():
    assert (grounding.DEFAULT_MIN_PIXELS, grounding.DEFAULT_MAX_PIXELS) == (HUB_MIN, HUB_MAX)
    answer = '{"bbox_2d": [10, 20, 30, 40], "label": "a"}'
    for size in [(6000, 4000), (40, 30), (1000, 750)]:
        default = parse_boxes(answer, family="qwen2_5_vl", image_size=size)
        explicit = parse_boxes(answer, family="qwen2_5_vl", image_size=size, min_pixels=HUB_MIN, max_pixels=HUB_MAX)
        assert default == explicit
    # the bounds change the qwen2_5_vl frame, never the 0-1000 grid (the resize maps the frame onto itself)
    small = {"min_pixels": 3136, "max_pixels": 64 * 28 * 28}
    assert parse_boxes(answer, family="qwen2_5_vl", image_size=(1000, 750), **small) != default
    tokens = "<|box_start|>(100,200),(300,400)<|box_end|>"
    assert parse_boxes(tokens, image_size=(1000, 750), **small) == parse_boxes(tokens, image_size=(1000, 750))


def test_settings_for_a_processor(proc):
    from qwen2vl_jax.processing.processor import Qwen2_5_VLProcessor

    assert grounding.settings_for(proc) == {"family": "qwen2_vl", "min_pixels": HUB_MIN, "max_pixels": HUB_MAX,
                                            "factor": 28}
    proc25 = Qwen2_5_VLProcessor(proc.image_processor, proc.tokenizer)
    assert grounding.settings_for(proc25)["family"] == "qwen2_5_vl"


# ------------------------------------------------------------------------------------------------ parsing
SIZE = (640, 480)  # qwen2_5_vl: resized to 644 x 476


def _xyxy(boxes):
    return [tuple(round(v, 2) for v in b.xyxy) for b in boxes]


def test_token_form_one_and_several_boxes_per_label():
    one = parse_boxes("<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(100,250),(500,1000)<|box_end|>",
                      image_size=SIZE)
    assert isinstance(one, list) and [b.label for b in one] == ["the cat"] and one.problems == []
    assert _xyxy(one) == [(64.0, 120.0, 320.0, 480.0)] and one[0].model == (100, 250, 500, 1000)
    text = ("I see <|object_ref_start|>cats<|object_ref_end|><|box_start|>(0,0),(100,100)<|box_end|>"
            "<|box_start|>(200, 200), (300, 300)<|box_end|> and <|object_ref_start|>a dog<|object_ref_end|>\n"
            "<|box_start|>(500,500),(1000,1000)<|box_end|>\n<|box_start|>(1,2),(3,4)<|box_end|><|im_end|>")
    boxes = parse_boxes(text, image_size=SIZE)
    assert [b.label for b in boxes] == ["cats", "cats", "a dog", ""] and boxes.problems == []
    assert _xyxy(boxes)[1] == (128.0, 96.0, 192.0, 144.0)
    # the same syntax from Qwen2.5-VL: pixels of the resized input
    box25 = parse_boxes("<|object_ref_start|>x<|object_ref_end|><|box_start|>(322,238),(644,476)<|box_end|>",
                        family="qwen2_5_vl", image_size=SIZE, strict=True)
    assert _xyxy(box25) == [(320.0, 240.0, 640.0, 480.0)]


@pytest.mark.parametrize("fenced", [True, False])
def test_json_list_and_single_object(fenced):
    items = '[{"bbox_2d": [0, 0, 322, 238], "label": "cat"}, {"bbox_2d": [322, 238, 644, 476], "label": "dog"}]'
    one = '{"bbox_2d": [0, 0, 644, 476], "label": "room"}'
    for body, labels in ((items, ["cat", "dog"]), (one, ["room"])):
        answer = f"Here you go:\n```json\n{body}\n```\nAnything else?" if fenced else f"Sure! {body} That's it."
        boxes = parse_boxes(answer, family="qwen2_5_vl", image_size=SIZE, strict=True)
        assert [b.label for b in boxes] == labels
    assert _xyxy(parse_boxes(items, family="qwen2_5_vl", image_size=SIZE)) == [(0, 0, 320, 240), (320, 240, 640, 480)]


def test_json_points_are_not_boxes_and_nesting_and_order():
    answer = ('```json\n[\n\t{"point_2d": [322, 238], "label": "eye"},\n\t{"bbox_2d": [0, 0, 10, 10], "label": "a"}'
              '\n]\n```\nAlso {"objects": [{"bbox_2d": [10, 10, 20, 20], "label": "b"}]}.')
    boxes = parse_boxes(answer, family="qwen2_5_vl", image_size=SIZE, strict=True)
    assert [b.label for b in boxes] == ["a", "b"]
    assert [(p.label, tuple(round(v, 2) for v in p.xy)) for p in boxes.points] == [("eye", (320.0, 240.0))]
    assert boxes.as_json(image=0)["points"] == [{"label": "eye", "xy": [320.0, 240.0], "image": 0}]


def test_bare_form_only_where_the_label_is_unambiguous():
    """Decoded with skip_special_tokens=True: a label alone on its line before its coordinates is read; bare
    coordinates inside prose are reported."""
    answer = "the cat(100,250),(500,1000)\ndog: (0,0),(10,10)(20,20),(30,30)\n(1,1),(2,2)\nA bird(5,5),(6,6) flies."
    boxes = parse_boxes(answer, image_size=SIZE)
    assert [b.label for b in boxes] == ["the cat", "dog", "dog", ""]
    assert [p.kind for p in boxes.problems] == ["bare"] and "A bird" in boxes.problems[0].text
    assert parse_boxes("A point (3, 4) is no box.", image_size=SIZE) == []
    assert parse_boxes("A point (3, 4) is no box.", image_size=SIZE).problems == []
    # with tags in the answer, bare pairs are prose
    tagged = parse_boxes("(1,1),(2,2) <|box_start|>(5,5),(6,6)<|box_end|>", image_size=SIZE, strict=True)
    assert len(tagged) == 1


MALFORMED = [
    # (family, answer, problem kind)
    ("qwen2_vl", "<|object_ref_start|>a<|object_ref_end|><|box_start|>(1,2),(3,4),(5,6)<|box_end|>", "coords"),
    ("qwen2_vl", "<|box_start|>(1,2,3),(4,5)<|box_end|>", "coords"),
    ("qwen2_vl", "<|box_start|><|box_end|>", "coords"),
    ("qwen2_vl", "<|box_start|>[1, 2, 3, 4]<|box_end|>", "coords"),
    ("qwen2_5_vl", '[{"bbox_2d": [1, 2, 3], "label": "a"}]', "coords"),
    ("qwen2_5_vl", '[{"point_2d": [1, 2, 3], "label": "a"}]', "coords"),
    ("qwen2_vl", "<|box_start|>(a,2),(3,4)<|box_end|>", "number"),
    ("qwen2_5_vl", '[{"bbox_2d": [1, "2", 3, 4], "label": "a"}]', "number"),
    ("qwen2_5_vl", '[{"bbox_2d": [1, true, 3, 4], "label": "a"}]', "number"),
    ("qwen2_vl", "<|box_start|>(300,2),(100,4)<|box_end|>", "order"),
    ("qwen2_5_vl", '{"bbox_2d": [10, 40, 20, 30], "label": "a"}', "order"),
    ("qwen2_vl", "<|box_start|>(100,200),(1200,400)<|box_end|>", "range"),
    ("qwen2_vl", "<|box_start|>(-5,200),(10,400)<|box_end|>", "range"),
    ("qwen2_5_vl", '{"bbox_2d": [10, 20, 645, 30], "label": "a"}', "range"),
    ("qwen2_5_vl", '{"point_2d": [10, 477], "label": "a"}', "range"),
    ("qwen2_vl", "<|object_ref_start|>a<|object_ref_end|><|box_start|>(1,2),(3,4)", "unterminated"),
    ("qwen2_vl", "<|object_ref_start|>a<|box_start|>(1,2),(3,4)<|box_end|>", "unterminated"),
    ("qwen2_vl", "(1,2),(3,4)<|box_end|>", "unterminated"),
    ("qwen2_vl", "<|object_ref_end|>", "unterminated"),
    ("qwen2_5_vl", '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]', "unterminated"),
    ("qwen2_5_vl", '```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"},]\n```', "json"),
    ("qwen2_5_vl", 'The box is "bbox_2d": 1, 2, 3, 4 for the cat.', "json"),
    ("qwen2_vl", "<|object_ref_start|>a cat<|object_ref_end|> but no box", "no_box"),
    ("qwen2_5_vl", '[{"label": "cat"}, {"bbox_2d": [1, 2, 3, 4], "label": "a"}]', "no_box"),
    ("qwen2_vl", "I think a cat(1,2),(3,4) is there.", "bare"),
]


@pytest.mark.parametrize("family, answer, kind", MALFORMED)
def test_malformed_boxes_are_reported_not_guessed(family, answer, kind):
    good = {"qwen2_vl": "<|object_ref_start|>ok<|object_ref_end|><|box_start|>(10,10),(20,20)<|box_end|>",
            "qwen2_5_vl": '```json\n{"bbox_2d": [10, 10, 20, 20], "label": "ok"}\n```'}[family]
    if kind == "bare":  # with box tags in the answer, bare pairs are prose: the good box is bare too
        good = "ok(10,10),(20,20)"
    boxes = parse_boxes(good + "\n" + answer, family=family, image_size=SIZE)
    assert kind in grounding.PROBLEM_KINDS and kind in [p.kind for p in boxes.problems], boxes.problems
    # only the good box (and, for a salvaged list or a cut-off answer, its complete items) comes back
    assert [b.label for b in boxes][0] == "ok"
    assert all(b.label in ("ok", "a", "") for b in boxes)
    assert all(b.xyxy[0] <= b.xyxy[2] and b.xyxy[1] <= b.xyxy[3] for b in boxes)
    if kind in ("coords", "number", "order", "range"):
        assert [b.label for b in boxes] == ["ok"]
    with pytest.raises(GroundingError, match=kind) as raised:
        parse_boxes(good + "\n" + answer, family=family, image_size=SIZE, strict=True)
    assert raised.value.problems == boxes.problems
    assert parse_boxes(good, family=family, image_size=SIZE, strict=True) == boxes[:1]


def test_a_cut_off_json_list_keeps_its_complete_items():
    answer = '```json\n[\n\t{"bbox_2d": [0, 0, 10, 10], "label": "a"},\n\t{"bbox_2d": [5, 5, 2'
    boxes = parse_boxes(answer, family="qwen2_5_vl", image_size=SIZE)
    assert [b.label for b in boxes] == ["a"]
    assert sorted(p.kind for p in boxes.problems) == ["json", "unterminated"]


def test_has_boxes_and_bad_arguments():
    assert grounding.has_boxes("<|box_start|>") and grounding.has_boxes('{"bbox_2d": 1}')
    assert grounding.has_boxes("x(1,2),(3,4)") and not grounding.has_boxes("a point (1, 2) and [1, 2, 3, 4]")
    with pytest.raises(ValueError, match="family"):
        parse_boxes("", family="qwen3_vl", image_size=SIZE)
    with pytest.raises(ValueError, match="width, height"):
        parse_boxes("", image_size=(0, 10))
    with pytest.raises(ValueError, match="not a box inside"):
        format_boxes([("a", (0, 0, 641, 10))], image_size=SIZE)
    with pytest.raises(ValueError, match="not a box inside"):
        format_boxes([("a", (10, 0, 5, 10))], family="qwen2_5_vl", image_size=SIZE)
    with pytest.raises(ValueError, match="special token"):
        format_boxes([("<|box_start|>", (0, 0, 1, 1))], image_size=SIZE)


def test_format_boxes_writes_each_convention():
    boxes = [Box("cat", (0, 0, 320, 240)), ("cat", (320, 240, 640, 480)), Box("dog", (64, 48, 128, 96))]
    assert format_boxes(boxes, image_size=SIZE) == (
        "<|object_ref_start|>cat<|object_ref_end|><|box_start|>(0,0),(500,500)<|box_end|>"
        "<|box_start|>(500,500),(1000,1000)<|box_end|>\n"
        "<|object_ref_start|>dog<|object_ref_end|><|box_start|>(100,100),(200,200)<|box_end|>")
    assert format_boxes(boxes, family="qwen2_5_vl", image_size=SIZE) == (
        '```json\n[\n\t{"bbox_2d": [0, 0, 322, 238], "label": "cat"},\n'
        '\t{"bbox_2d": [322, 238, 644, 476], "label": "cat"},\n'
        '\t{"bbox_2d": [64, 48, 129, 95], "label": "dog"}\n]\n```')
    tokens25 = format_boxes(boxes, family="qwen2_5_vl", image_size=SIZE, syntax="tokens")
    assert "(322,238),(644,476)" in tokens25
    assert _xyxy(parse_boxes(tokens25, family="qwen2_5_vl", image_size=SIZE, strict=True))[1] == (320, 240, 640, 480)


# ------------------------------------------------------------------------------------------------ drawing
def _border_mask(xyxy, size, width):
    """The pixels the module docstring promises: columns round(x1)..round(x2)-1, rows likewise, `width` inward."""
    w_img, h_img = size
    rnd = [math.floor(v + 0.5) for v in xyxy]
    left, top = min(max(rnd[0], 0), w_img - 1), min(max(rnd[1], 0), h_img - 1)
    right, bottom = min(max(rnd[2] - 1, left), w_img - 1), min(max(rnd[3] - 1, top), h_img - 1)
    ys, xs = np.mgrid[0:h_img, 0:w_img]
    inside = (xs >= left) & (xs <= right) & (ys >= top) & (ys <= bottom)
    core = (xs >= left + width) & (xs <= right - width) & (ys >= top + width) & (ys <= bottom - width)
    return inside & ~core, (left, top)


def _label_region(text, corner, size):
    """Where a label may go: its textbbox + 2 px a side, at the box's corner (above it or inside it), moved left
    to stay in the image."""
    w_img, h_img = size
    l, t, r, b = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=ImageFont.load_default())
    w, h = r - l + 4, b - t + 4
    x0 = max(0, min(corner[0], w_img - w))
    ys, xs = np.mgrid[0:h_img, 0:w_img]
    return (xs >= x0) & (xs < x0 + w) & (ys >= corner[1] - h) & (ys < corner[1] + h), w * h


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_drawing_changes_only_borders_and_labels(mode):
    rng = np.random.default_rng(0)
    size = (200, 150)
    array = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    image = Image.fromarray(array, mode)
    boxes = [Box("cat", (20.4, 30.6, 90.2, 100.0)),  # room above for the label
             Box("a long label", (150, 2, 200, 60)),  # at the top and right edges: label inside, moved left
             Box("", (60, 120, 61, 121))]  # one pixel, no label
    out = draw_boxes(image, boxes, color=(255, 0, 0), width=2)
    assert out is not image and out.mode == mode and np.array_equal(np.asarray(image), array)
    got = np.asarray(out)
    changed = (got != array).any(-1)
    allowed = np.zeros(changed.shape, bool)
    for box in boxes:
        border, corner = _border_mask(box.xyxy, size, 2)
        assert (got[border][:, :3] == (255, 0, 0)).all(), box  # every border pixel has the box's colour
        allowed |= border
        if box.label:
            region, area = _label_region(box.label, corner, size)
            assert changed[region & ~border].sum() >= 0.8 * area - border.sum(), box
            allowed |= region
    assert not changed[~allowed].any(), np.argwhere(changed & ~allowed)[:5]

    plain = np.asarray(draw_boxes(image, boxes, color="red", width=1, labels=False))
    allowed = np.zeros(changed.shape, bool)
    for box in boxes:
        allowed |= _border_mask(box.xyxy, size, 1)[0]
    assert np.array_equal((plain != array).any(-1), allowed)


def test_drawing_colours_by_label_and_converts_other_modes():
    image = Image.new("L", (50, 40), 128)
    out = draw_boxes(image, [("a", (0, 0, 10, 10)), ("b", (20, 20, 30, 30)), ("a", (35, 5, 45, 15))], labels=False)
    assert out.mode == "RGB" and image.mode == "L"
    px = out.load()
    assert px[0, 0] == px[35, 5] != px[20, 20]
    with pytest.raises(ValueError, match="width"):
        draw_boxes(image, [], width=0)


@pytest.mark.parametrize("text, kind", [
    ("<|box_start|>(" + "9" * 400 + ",2),(3,4)<|box_end|>", "range"),  # past any float: inf, out of range
    ('[{"bbox_2d": [' + "9" * 5000 + ', 1, 2, 3], "label": "x"}]', "json"),  # past Python's int-string limit
    ("```json\n" + "[" * 5000 + "]" * 5000 + "\n```", "json"),  # nested past the JSON decoder's recursion limit
])
def test_hostile_answers_are_reported_not_raised(text, kind):
    for family in ("qwen2_vl", "qwen2_5_vl"):
        boxes = parse_boxes(text, family=family, image_size=(640, 480))
        assert list(boxes) == [] and kind in [p.kind for p in boxes.problems], (family, boxes.problems)
