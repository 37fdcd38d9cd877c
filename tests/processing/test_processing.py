"""Processor parity with transformers 4.57: pixels, grids, token ids, chat template, padding, errors.

Oracle: transformers' Qwen2VLProcessor needs torchvision (its video processor), which does not import beside
torch 2.13, so the oracle is assembled from HF parts: the SLOW `Qwen2VLImageProcessor` (PIL path), the real
`Qwen2TokenizerFast` (+ its `apply_chat_template`) and transformers 4.57's placeholder-expansion loop copied
verbatim below.
"""

from __future__ import annotations

import io
import json
import shutil
import warnings

import numpy as np
import pytest
import skimage.data
from PIL import Image

from qwen2vl_jax.processing.image import Qwen2VLImageProcessor, convert_to_rgb, smart_resize
from qwen2vl_jax.processing.image_io import qvu_smart_resize
from qwen2vl_jax.processing.processor import Qwen2VLProcessor
from qwen2vl_jax.processing.tokenizer import DEFAULT_CHAT_TEMPLATE, Qwen2Tokenizer

HUB_MIN, HUB_MAX = 3136, 12845056  # Qwen2-VL-*-Instruct Hub preprocessor_config.json
MAX_ABS_DIFF = {}  # largest |ours - HF| seen per test case, reported by test_report_max_abs_diff


# ------------------------------------------------------------------------------------------------ oracles
def hf_image_processor(min_pixels=HUB_MIN, max_pixels=HUB_MAX):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as HFSlow

    return HFSlow(min_pixels=min_pixels, max_pixels=max_pixels)


def hf_expand(texts, grid_thw, token, merge_length=4):
    """transformers 4.57 models/qwen2_vl/processing_qwen2_vl.py `Qwen2VLProcessor.__call__`, verbatim logic."""
    texts = list(texts)
    index = 0
    for i in range(len(texts)):
        while token in texts[i]:
            num = int(np.prod(grid_thw[index])) // merge_length
            texts[i] = texts[i].replace(token, "<|placeholder|>" * num, 1)
            index += 1
        texts[i] = texts[i].replace("<|placeholder|>", token)
    return texts


def hf_processor_call(hf_tokenizer, texts, images, min_pixels=HUB_MIN, max_pixels=HUB_MAX):
    vision = hf_image_processor(min_pixels, max_pixels)(images=images, return_tensors="np")
    text_inputs = hf_tokenizer(hf_expand(texts, vision["image_grid_thw"], "<|image_pad|>"), padding=True,
                         return_tensors="np")
    return {**text_inputs, **vision}


def image_prompt(proc, n_images=1, question="Describe this."):
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return proc.apply_chat_template([{"role": "user", "content": content}])


def record(name, ours, ref):
    diff = float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))))
    MAX_ABS_DIFF[name] = max(MAX_ABS_DIFF.get(name, 0.0), diff)
    return diff


def sized(name, width, height):
    import helpers

    return helpers.photo(name).resize((width, height), Image.Resampling.LANCZOS)


# ------------------------------------------------------------------------------------------------ smart_resize
# Worked values and HF-test cases; "cls" = HF class default max 1003520, "hub" = 12845056.
SMART_RESIZE_TABLE = [
    ((561, 278), 56 * 56, 28 * 28 * 1280, (560, 280)),
    ((1024, 1024), 56 * 56, 28 * 28 * 1280, (980, 980)),
    ((1024, 1024), HUB_MIN, HUB_MAX, (1036, 1036)),
    ((224, 224), HUB_MIN, HUB_MAX, (224, 224)),
    ((480, 640), HUB_MIN, HUB_MAX, (476, 644)),
    ((1080, 1920), 56 * 56, 28 * 28 * 1280, (728, 1316)),
    ((1080, 1920), HUB_MIN, HUB_MAX, (1092, 1932)),
    ((3024, 4032), 56 * 56, 28 * 28 * 1280, (840, 1148)),
    ((3024, 4032), HUB_MIN, HUB_MAX, (3024, 4032)),
    ((10, 500), 56 * 56, 28 * 28 * 1280, (28, 420)),
]


@pytest.mark.parametrize("hw, lo, hi, expected", SMART_RESIZE_TABLE)
def test_smart_resize_table(hw, lo, hi, expected):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

    assert smart_resize(*hw, factor=28, min_pixels=lo, max_pixels=hi) == expected
    assert hf_smart_resize(*hw, factor=28, min_pixels=lo, max_pixels=hi) == expected


def test_smart_resize_sweep_matches_hf():
    """Every (h, w) on a grid with halves (banker's rounding), thin shapes and both pixel bounds."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

    sizes = [1, 7, 13, 14, 27, 28, 42, 56, 70, 98, 126, 210, 300, 451, 700, 1001, 2000, 5000]
    checked = 0
    for h in sizes:
        for w in sizes:
            if max(h, w) / min(h, w) > 200:
                continue
            for lo, hi in ((56 * 56, 28 * 28 * 1280), (HUB_MIN, HUB_MAX), (256 * 28 * 28, 512 * 28 * 28)):
                assert smart_resize(h, w, 28, lo, hi) == hf_smart_resize(h, w, 28, lo, hi), (h, w, lo, hi)
                checked += 1
    assert checked > 500


@pytest.mark.parametrize("hw", [(1, 201), (10, 2500), (3000, 14)])
def test_smart_resize_ratio_over_200_raises(hw):
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(*hw)
    with pytest.raises(ValueError, match="aspect ratio"):
        qvu_smart_resize(*hw)


def test_image_with_ratio_over_200_raises(proc):
    thin = Image.new("RGB", (600, 2), "gray")
    with pytest.raises(ValueError, match="aspect ratio"):
        proc(text=image_prompt(proc), images=[thin])


def test_qwen_vl_utils_variant_differs_for_thin_images():
    # (10, 500) -> HF (28, 420), qwen-vl-utils (28, 504).
    assert smart_resize(10, 500, 28, 56 * 56, 28 * 28 * 1280) == (28, 420)
    assert qvu_smart_resize(10, 500, 28, 56 * 56, 28 * 28 * 1280) == (28, 504)
    # Down-scale branch without max(factor, .): a very thin, very large image goes below one factor in QVU.
    assert qvu_smart_resize(28, 5000, 28, 56 * 56, 100 * 28 * 28)[0] == 0
    assert smart_resize(28, 5000, 28, 56 * 56, 100 * 28 * 28)[0] == 28


# ------------------------------------------------------------------------------------------------ pixel parity
def _case_images():
    """(case id, PIL image, min_pixels, max_pixels): >= 10 target sizes on real photos."""
    import helpers

    hubble = Image.fromarray(skimage.data.hubble_deep_field())  # 1000x872
    retina = Image.fromarray(skimage.data.retina())  # 1411x1411
    cases = [(name, helpers.photo(name), HUB_MIN, HUB_MAX) for name in helpers.PHOTO_NAMES]
    cases += [
        ("coffee-tiny-below-min", sized("coffee", 30, 20), HUB_MIN, HUB_MAX),
        ("rocket-thin-44x9", sized("rocket", 44, 9), HUB_MIN, HUB_MAX),
        ("chelsea-odd-333x127", sized("chelsea", 333, 127), HUB_MIN, HUB_MAX),
        ("grace-upscale-min256tok", sized("grace_hopper", 100, 117), 256 * 28 * 28, HUB_MAX),
        ("hubble-hub", hubble, HUB_MIN, HUB_MAX),
        ("hubble-cls-default", hubble, 56 * 56, 28 * 28 * 1280),
        ("retina-above-max", retina, HUB_MIN, 28 * 28 * 1280),
        ("retina-custom-256tok", retina, 64 * 28 * 28, 256 * 28 * 28),
        ("astronaut-custom-small", helpers.photo("astronaut"), 4 * 28 * 28, 16 * 28 * 28),
    ]
    return cases


CASES = _case_images()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_pixel_values_grid_and_ids_match_hf(case, tokenizer_dir, hf_tokenizer):
    name, image, lo, hi = case
    proc = Qwen2VLProcessor.from_pretrained(tokenizer_dir, min_pixels=lo, max_pixels=hi)
    text = image_prompt(proc)
    ours = proc(text=text, images=[image])
    ref = hf_processor_call(hf_tokenizer, [text], [image], lo, hi)
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["pixel_values"].shape == ref["pixel_values"].shape
    assert ours["pixel_values"].dtype == ref["pixel_values"].dtype == np.float32
    assert record(name, ours["pixel_values"], ref["pixel_values"]) <= 1e-6
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
    t, h, w = ours["image_grid_thw"][0]
    assert (ours["input_ids"] == proc.image_token_id).sum() == t * h * w // 4


def test_sizes_cover_required_range():
    """The parity cases reach >= 10 distinct target sizes, incl. below min_pixels and above max_pixels."""
    targets = set()
    below = above = False
    for _, image, lo, hi in CASES:
        w, h = image.size
        targets.add(smart_resize(h, w, 28, lo, hi))
        below |= h * w < lo
        above |= h * w > hi
    assert len(targets) >= 10 and below and above
    assert any(a != b for a, b in targets)  # non-square targets


def test_white_224_reference_value(proc):
    white = Image.new("RGB", (224, 224), (255, 255, 255))
    out = proc.image_processor(images=white)
    assert out["pixel_values"].shape == (256, 1176)
    np.testing.assert_array_equal(out["image_grid_thw"], [[1, 16, 16]])
    assert abs(float(out["pixel_values"].mean()) - 2.050372362136841) <= 1e-6  # HF's value (the oracle below agrees)
    ref = hf_image_processor()(images=white, return_tensors="np")["pixel_values"]
    assert record("white224", out["pixel_values"], ref) <= 1e-6


def test_patch_layout_merge_block_order(proc):
    """Rows run (t, block_row, block_col, in_row, in_col); a row is (C, T, ph, pw) (transformers
    models/qwen2_vl/image_processing_qwen2_vl.py `Qwen2VLImageProcessor._preprocess`)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(56, 84, 3), dtype=np.uint8)  # 56x84 stays 56x84: grid (1, 4, 6)
    out = proc.image_processor(images=[image])
    rows = out["pixel_values"].reshape(-1, 3, 2, 14, 14)
    lut = proc.image_processor._lut_c256
    for row_idx, (bh, bw, mh, mw) in enumerate(np.ndindex(2, 3, 2, 2)):
        y, x = (bh * 2 + mh) * 14, (bw * 2 + mw) * 14
        patch = image[y:y + 14, x:x + 14]  # [14, 14, 3]
        for c in range(3):
            np.testing.assert_array_equal(rows[row_idx, c, 0], lut[c][patch[..., c]])
            np.testing.assert_array_equal(rows[row_idx, c, 1], rows[row_idx, c, 0])  # T copies of the image


# ------------------------------------------------------------------------------------------------ input types
def _png_bytes(image, fmt="PNG"):
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_input_types_give_identical_pixels(proc, photos, tmp_path):
    image = photos["chelsea"]
    reference = proc.image_processor(images=[image])["pixel_values"]
    path = tmp_path / "chelsea.png"
    image.save(path)
    array = np.asarray(image)
    variants = {
        "ndarray-hwc-uint8": array,
        "ndarray-chw-uint8": array.transpose(2, 0, 1).copy(),
        "ndarray-float-0-255": array.astype(np.float32),
        "path-str": str(path),
        "path-obj": path,
        "file-url": f"file://{path}",
        "bytes": _png_bytes(image),
        "bytearray": bytearray(_png_bytes(image)),
    }
    for name, value in variants.items():
        out = proc.image_processor(images=value)["pixel_values"]
        np.testing.assert_array_equal(out, reference, err_msg=name)


def test_grey_and_rgba_arrays_match_their_pil_images(proc, photos):
    """HF rejects grey / RGBA arrays; here they are accepted and equal HF's result for the same PIL image."""
    rgba = photos["rocket"].resize((90, 60)).convert("RGBA")
    rgba.putalpha(128)
    grey = photos["rocket"].resize((90, 60)).convert("L")
    hf = hf_image_processor()
    for array, pil in ((np.asarray(grey), grey), (np.asarray(grey)[..., None], grey), (np.asarray(rgba), rgba)):
        ours = proc.image_processor(images=[array])["pixel_values"]
        np.testing.assert_array_equal(ours, hf(images=[pil], return_tensors="np")["pixel_values"])


def test_float_unit_range_array_matches_hf(proc, photos):
    """A [0, 1] float array: HF truncates x255 to uint8 for PIL, rescales back, then rescales again (and warns)."""
    array = np.asarray(photos["coffee"].resize((120, 80)), dtype=np.float64) / 255.0
    with pytest.warns(UserWarning, match="rescale already rescaled"):
        ours = proc.image_processor(images=[array])
    ref = hf_image_processor()(images=[array], return_tensors="np")
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert record("float01", ours["pixel_values"], ref["pixel_values"]) <= 1e-6


def test_exif_orientation_applied_for_files_like_hf(tmp_path, photos):
    """Paths go through transformers' `load_image` semantics: EXIF orientation is applied, then RGB."""
    from transformers.image_utils import load_image as hf_load_image

    image = photos["rocket"].resize((90, 60))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes())
    ip = Qwen2VLImageProcessor(min_pixels=HUB_MIN, max_pixels=HUB_MAX)
    ours = ip(images=str(path))
    ref = hf_image_processor()(images=hf_load_image(str(path)), return_tensors="np")
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert ours["image_grid_thw"][0, 1] > ours["image_grid_thw"][0, 2]  # portrait after the rotation
    np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"])


def _mode_images(photo):
    base = photo.resize((96, 64))
    rng = np.random.default_rng(1)
    alpha = Image.fromarray(rng.integers(0, 256, size=(64, 96), dtype=np.uint8))
    rgba = base.copy()
    rgba.putalpha(alpha)
    la = base.convert("L")
    la.putalpha(alpha)
    p_trans = base.quantize(32)
    p_trans.info["transparency"] = 5
    i16 = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 200).astype(np.uint16))
    assert i16.mode == "I;16"
    return {"RGBA": rgba, "LA": la, "P": base.quantize(64), "P+transparency": p_trans, "CMYK": base.convert("CMYK"),
            "I;16": i16, "L": base.convert("L"), "1": base.convert("1")}


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "P+transparency", "CMYK", "I;16", "L", "1"])
def test_convert_to_rgb_modes_match_hf(mode, photos):
    from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb

    image = _mode_images(photos["astronaut"])[mode]
    np.testing.assert_array_equal(np.asarray(convert_to_rgb(image)), np.asarray(hf_convert_to_rgb(image)))
    ip = Qwen2VLImageProcessor(min_pixels=HUB_MIN, max_pixels=HUB_MAX)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about palette transparency; HF sees the same warning
        ours = ip(images=[image])
        ref = hf_image_processor()(images=[image], return_tensors="np")
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"])


def test_rgba_alpha_is_dropped_not_composited():
    """HF's convert_to_rgb is Pillow's RGBA->RGB: the colour under a fully transparent pixel is kept."""
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.asarray(convert_to_rgb(rgba))[0, 0].tolist() == [10, 20, 30]


def test_url_is_refused(proc):
    with pytest.raises(ValueError, match="download"):
        proc(text=image_prompt(proc), images=["https://example.com/cat.jpg"])


def test_unreadable_and_missing_image_files(proc, photos, tmp_path):
    good = _png_bytes(photos["coffee"], "JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    text = image_prompt(proc)
    with pytest.raises(ValueError, match="truncated.jpg"):
        proc(text=text, images=[str(truncated)])
    with pytest.raises(ValueError, match="garbage.png"):
        proc(text=text, images=[garbage])
    with pytest.raises(ValueError, match="could not read image"):
        proc(text=text, images=[good[: len(good) // 3]])
    with pytest.raises(ValueError, match="empty"):
        proc(text=text, images=[b""])
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        proc(text=text, images=[str(missing)])


@pytest.mark.parametrize("n_images, n_placeholders", [(2, 1), (1, 2), (0, 1)])
def test_image_placeholder_count_mismatch_raises(proc, photos, n_images, n_placeholders):
    text = image_prompt(proc, n_placeholders)
    images = [photos["chelsea"]] * n_images or None
    with pytest.raises(ValueError, match="placeholder"):
        proc(text=text, images=images)


def test_images_without_placeholders_raise(proc, photos):
    with pytest.raises(ValueError, match=r"1 image\(s\) given but the text has 0"):
        proc(text="no placeholder here", images=photos["chelsea"])


# ------------------------------------------------------------------------------------------------ chat template
def _messages():
    img, vid = {"type": "image"}, {"type": "video"}
    txt = lambda s: {"type": "text", "text": s}
    return {
        "no-system": [{"role": "user", "content": [img, txt("What kind of dog is this?")]}],
        "system": [{"role": "system", "content": "You are a terse captioner."},
                   {"role": "user", "content": [img, txt("Caption it.")]}],
        "system-as-list": [{"role": "system", "content": [txt("Be brief.")]},
                           {"role": "user", "content": "Hi!"}],
        "string-content": [{"role": "user", "content": "Hello, 世界 🤗\nsecond line"}],
        "multi-turn": [{"role": "user", "content": [img, txt("What is this?")]},
                       {"role": "assistant", "content": "A cat on a sofa."},
                       {"role": "user", "content": [txt("And its colour?")]},
                       {"role": "assistant", "content": [txt("Orange.")]},
                       {"role": "user", "content": "Thanks."}],
        "multi-image": [{"role": "user", "content": [img, img, txt("Compare"), img]}],
        "image-and-video": [{"role": "user", "content": [vid, txt("Then this:"), img, txt("Same scene?")]}],
        "payload-keys": [{"role": "user", "content": [{"type": "image", "image": "x.png"},
                                                      {"type": "video", "video": "y.mp4"}, txt("?")]}],
    }


@pytest.mark.parametrize("name", list(_messages()))
@pytest.mark.parametrize("add_vision_id", [False, True])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_text_matches_hf(proc, hf_tokenizer, name, add_vision_id, add_generation_prompt):
    messages = _messages()[name]
    ours = proc.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                    add_vision_id=add_vision_id)
    ref = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                     add_vision_id=add_vision_id)
    assert ours == ref
    assert ours.count("<|image_pad|>") == sum(
        1 for m in messages if isinstance(m["content"], list) for c in m["content"] if c["type"] == "image")


@pytest.mark.parametrize("name", list(_messages()))
def test_chat_template_ids_match_hf(proc, hf_tokenizer, name):
    messages = _messages()[name]
    ref = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert proc.tokenizer.apply_chat_template(messages, add_generation_prompt=True) == ref
    if name != "payload-keys":  # items without media: the processor only tokenizes
        ours = proc.apply_chat_template(messages, tokenize=True)
        np.testing.assert_array_equal(ours, [ref])


def test_chat_template_tokenize_with_media_runs_the_processor(proc, hf_tokenizer, photos):
    """Like transformers 4.57's processor `apply_chat_template(tokenize=True)`: media in the content items are
    processed and the placeholders expanded."""
    image = photos["chelsea"].resize((150, 100))
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]
    out = proc.apply_chat_template(messages, tokenize=True, return_dict=True)
    text = proc.apply_chat_template(messages)
    ref = hf_processor_call(hf_tokenizer, [text], [image])
    assert list(out) == ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]
    np.testing.assert_array_equal(out["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(out["pixel_values"], ref["pixel_values"])
    ids = proc.apply_chat_template(messages, tokenize=True)
    np.testing.assert_array_equal(ids, ref["input_ids"])


def test_chat_template_reference_rendering(proc):
    # A rendered example and its ids (HF-tests).
    messages = _messages()["no-system"]
    text = proc.apply_chat_template(messages)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>What kind of dog is this?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = proc.tokenizer.encode(text)
    assert ids[:17] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 151652,
                        151655, 151653]
    assert ids[-15:] == [151652, 151655, 151653, 3838, 3093, 315, 5562, 374, 419, 30, 151645, 198, 151644, 77091,
                         198]


def test_chat_template_batched_and_continue_final_message(proc, hf_tokenizer):
    batch = [_messages()["no-system"], _messages()["multi-turn"]]
    assert proc.apply_chat_template(batch) == hf_tokenizer.apply_chat_template(batch, tokenize=False,
                                                                        add_generation_prompt=True)
    partial = _messages()["no-system"] + [{"role": "assistant", "content": [{"type": "text", "text": "It is a"}]}]
    ours = proc.apply_chat_template(partial, add_generation_prompt=False, continue_final_message=True)
    ref = hf_tokenizer.apply_chat_template(partial, tokenize=False, continue_final_message=True)
    assert ours == ref and ours.endswith("It is a")


def test_chat_template_jinja_features_match_hf(proc, hf_tokenizer):
    """Sandbox helpers HF registers: raise_exception, tojson (no HTML escaping), special tokens, loop controls."""
    template = ("{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
                "{% if loop.index > 2 %}{% break %}{% endif %}{{ m | tojson }}{{ eos_token }}\n  {% endfor %}"
                "{% generation %}gen{% endgeneration %}{{ pad_token }}")
    messages = [{"role": "user", "content": "<a&b>"}, {"role": "assistant", "content": "é"},
                {"role": "user", "content": "x"}]
    ours = proc.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert ours == hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role"):
        proc.apply_chat_template([{"role": "bad", "content": "x"}], chat_template=template)


# ------------------------------------------------------------------------------------------------ batching
def test_batched_call_left_padding_matches_hf(proc, hf_tokenizer, photos):
    texts = [image_prompt(proc, 1, "Short?"),
             image_prompt(proc, 2, "A much longer question about both of these two pictures, please.")]
    small = lambda name: photos[name].resize((photos[name].width // 3, photos[name].height // 3))
    images = [small("chelsea"), small("coffee"), small("rocket")]
    ours = proc(text=texts, images=images)
    ref = hf_processor_call(hf_tokenizer, texts, images)
    assert hf_tokenizer.padding_side == "left" and proc.tokenizer.padding_side == "left"
    assert list(ours) == ["input_ids", "attention_mask", "pixel_values", "image_grid_thw"]
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(ours["attention_mask"], ref["attention_mask"])
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"])
    assert record("batch", ours["pixel_values"], ref["pixel_values"]) <= 1e-6
    assert ours["input_ids"].dtype == ours["attention_mask"].dtype == np.int64
    assert ours["attention_mask"][0, 0] == 0 and ours["input_ids"][0, 0] == proc.tokenizer.pad_token_id == 151643
    assert ours["attention_mask"][:, -1].tolist() == [1, 1]
    assert ours.input_ids is ours["input_ids"]  # attribute access
    # Right padding on request also matches HF.
    right = proc(text=texts, images=images, padding_side="right")
    ref_right = hf_tokenizer(hf_expand(texts, ref["image_grid_thw"], "<|image_pad|>"), padding=True,
                       padding_side="right", return_tensors="np")
    np.testing.assert_array_equal(right["input_ids"], ref_right["input_ids"])


def test_text_only_and_unpadded_calls(proc, hf_tokenizer):
    texts = ["Hello, world!", "A longer sentence with 123 digits."]
    ours = proc(text=texts)
    ref = hf_tokenizer(texts, padding=True, return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
    assert list(ours) == ["input_ids", "attention_mask"]
    lists = proc(text=texts, padding=False, return_tensors=None)
    assert lists["input_ids"] == hf_tokenizer(texts)["input_ids"]
    with pytest.raises(ValueError, match="padding"):
        proc(text=texts, padding=False)


def test_mm_token_type_ids(proc, photos):
    out = proc(text=image_prompt(proc), images=[photos["chelsea"]], return_mm_token_type_ids=True)
    assert list(out)[:3] == ["input_ids", "attention_mask", "mm_token_type_ids"]
    np.testing.assert_array_equal(out["mm_token_type_ids"], (out["input_ids"] == 151655).astype(np.int64))
    assert out["mm_token_type_ids"].sum() == np.prod(out["image_grid_thw"]) // 4


# ------------------------------------------------------------------------------------------------ tokenizer
def test_tokenizer_attributes_match_hf(proc, hf_tokenizer):
    tok = proc.tokenizer
    assert tok.vocab_size == hf_tokenizer.vocab_size == 151643
    assert len(tok) == len(hf_tokenizer) == 151657
    assert tok.pad_token_id == hf_tokenizer.pad_token_id == 151643
    assert tok.eos_token_id == hf_tokenizer.eos_token_id == 151645
    assert tok.bos_token_id is None and hf_tokenizer.bos_token_id is None
    assert tok.special_tokens_map == hf_tokenizer.special_tokens_map
    assert sorted(tok.all_special_ids) == sorted(hf_tokenizer.all_special_ids)
    tokens = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "hello", "not-a-token"]
    assert tok.convert_tokens_to_ids(tokens) == hf_tokenizer.convert_tokens_to_ids(tokens)
    assert (proc.image_token_id, proc.video_token_id) == (151655, 151656)
    assert (proc.vision_start_token_id, proc.vision_end_token_id) == (151652, 151653)


DECODE_TEXTS = ["Hello, world!", "  leading spaces and trailing   ", "🤗 Transformers 提供了 API 和工具。",
                "<|im_start|>user\nHi<|im_end|>\n<|vision_start|><|image_pad|><|vision_end|>", "tab\tnew\nline 12345",
                "don't , do ."]


@pytest.mark.parametrize("skip", [False, True])
def test_decode_matches_hf(proc, hf_tokenizer, skip):
    ids = [hf_tokenizer(t)["input_ids"] for t in DECODE_TEXTS]
    for seq in ids:
        expected = hf_tokenizer.decode(seq, skip_special_tokens=skip)
        assert proc.tokenizer.decode(seq, skip_special_tokens=skip) == expected
        assert proc.tokenizer.decode(np.array(seq), skip_special_tokens=skip) == hf_tokenizer.decode(
            seq, skip_special_tokens=skip)
    assert proc.tokenizer.batch_decode(ids, skip_special_tokens=skip) == hf_tokenizer.batch_decode(
        ids, skip_special_tokens=skip)
    # A multi-byte character cut in half decodes with U+FFFD like HF (errors="replace").
    emoji_ids = hf_tokenizer("🤗")["input_ids"]
    assert proc.tokenizer.decode(emoji_ids[:1]) == hf_tokenizer.decode(emoji_ids[:1])


def test_processor_decode_defaults(proc, hf_tokenizer):
    ids = proc(text=["<|im_start|>assistant\nA cat.<|im_end|>", "Dog<|endoftext|>"])["input_ids"]
    assert proc.batch_decode(ids) == hf_tokenizer.batch_decode(ids, skip_special_tokens=True) == ["assistant\nA cat.",
                                                                                           "Dog"]
    assert proc.decode(ids[1]) == "Dog"
    assert proc.batch_decode(ids, skip_special_tokens=False) == hf_tokenizer.batch_decode(ids)


# ------------------------------------------------------------------------------------------------ loading
def test_overrides_take_effect(tokenizer_dir, photos):
    image = photos["grace_hopper"]
    default = Qwen2VLProcessor.from_pretrained(tokenizer_dir)
    small = Qwen2VLProcessor.from_pretrained(tokenizer_dir, min_pixels=32 * 28 * 28, max_pixels=64 * 28 * 28)
    assert (default.image_processor.min_pixels, default.image_processor.max_pixels) == (HUB_MIN, HUB_MAX)
    g_default = default.image_processor(images=image)["image_grid_thw"][0]
    g_small = small.image_processor(images=image)["image_grid_thw"][0]
    assert g_default.tolist() == [1, 42, 36]  # HF's grid for this photo at the Hub bounds
    assert np.prod(g_small) // 4 <= 64 and g_small.tolist() != g_default.tolist()
    ref = hf_image_processor(32 * 28 * 28, 64 * 28 * 28)(images=image, return_tensors="np")
    np.testing.assert_array_equal(g_small, ref["image_grid_thw"][0])
    assert small.video_processor.max_pixels == 64 * 28 * 28  # transformers hands the kwargs to both
    per_call = default(images=image, max_pixels=64 * 28 * 28)["image_grid_thw"][0]
    ref_per_call = hf_image_processor(HUB_MIN, 64 * 28 * 28)(images=image, return_tensors="np")
    np.testing.assert_array_equal(per_call, ref_per_call["image_grid_thw"][0])
    with pytest.raises(ValueError, match="unknown"):
        Qwen2VLProcessor.from_pretrained(tokenizer_dir, max_pixel=10)


def test_size_form_and_missing_files(tokenizer_dir, tmp_path, photos):
    # Only tokenizer.json: Instruct defaults everywhere.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tokenizer_dir / "tokenizer.json", bare / "tokenizer.json")
    proc = Qwen2VLProcessor.from_pretrained(bare)
    assert (proc.image_processor.min_pixels, proc.image_processor.max_pixels) == (HUB_MIN, HUB_MAX)
    assert proc.chat_template == DEFAULT_CHAT_TEMPLATE
    assert proc.tokenizer.padding_side == "left" and proc.tokenizer.pad_token_id == 151643
    assert proc.tokenizer.eos_token_id == 151645
    # `size: {shortest_edge, longest_edge}` form, video config, chat_template.jinja preferred over json.
    sized_dir = tmp_path / "sized"
    shutil.copytree(tokenizer_dir, sized_dir)
    config = json.loads((sized_dir / "preprocessor_config.json").read_text())
    config.pop("min_pixels")
    config.pop("max_pixels")
    config["size"] = {"shortest_edge": 8 * 28 * 28, "longest_edge": 100 * 28 * 28}
    (sized_dir / "preprocessor_config.json").write_text(json.dumps(config))
    (sized_dir / "video_preprocessor_config.json").write_text(json.dumps({"min_pixels": 1, "max_pixels": 50 * 784}))
    (sized_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    proc = Qwen2VLProcessor.from_pretrained(sized_dir)
    assert proc.image_processor.size == {"shortest_edge": 8 * 28 * 28, "longest_edge": 100 * 28 * 28}
    assert proc.video_processor.max_pixels == 50 * 784
    assert proc.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"
    # tokenizer.json is required.
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Qwen2VLProcessor.from_pretrained(empty)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Qwen2Tokenizer.from_pretrained(empty)


# ------------------------------------------------------------------------------------------------ module layout
# The preprocessing modules, each with the qwen2vl_jax modules it may load (itself and what it imports, directly or
# not). Imports point one way: processor -> image / tokenizer -> video -> image_io; none of them imports JAX,
# torch, transformers or any model module (the processor resolves Hub ids with the top-level `hub`).
PREPROCESSING_IMPORTS = {
    "processing.tokenizer": set(),
    "processing.image_io": set(),
    "processing.video": {"processing.image_io"},
    "processing.vision_info": {"processing.image_io", "processing.video"},
    "processing.image": {"processing.image_io", "processing.video", "processing.tokenizer"},
    "processing.processor": {"hub", "processing.image_io", "processing.image", "processing.tokenizer",
                             "processing.video"},
}


@pytest.mark.parametrize("module", sorted(PREPROCESSING_IMPORTS))
def test_preprocessing_modules_import_one_way(module):
    """Import one module in a fresh interpreter and list what it loaded: no JAX, no torch, no transformers, and of
    this package only the module, the package `__init__`s and the modules it is allowed to import."""
    import subprocess
    import sys

    code = (f"import json, sys; import qwen2vl_jax.{module}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('qwen2vl_jax', 'jax', 'jaxlib', 'flax', 'torch', 'transformers'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    allowed = {"qwen2vl_jax", "qwen2vl_jax.processing", f"qwen2vl_jax.{module}"} | {
        f"qwen2vl_jax.{m}" for m in PREPROCESSING_IMPORTS[module]}
    assert loaded <= allowed, f"qwen2vl_jax.{module} loads {sorted(loaded - allowed)}"


def test_each_preprocessing_name_has_one_home():
    """Every module's `__all__` names exist and are defined in that module (no re-exports: the processor module
    exports its processors, the image processor lives in `image`), and each `smart_resize` has one meaning."""
    import importlib

    for module in PREPROCESSING_IMPORTS:
        mod = importlib.import_module(f"qwen2vl_jax.{module}")
        for name in getattr(mod, "__all__", []):
            value = getattr(mod, name)
            assert getattr(value, "__module__", mod.__name__) == mod.__name__, f"{module}.{name} is re-exported"
    from qwen2vl_jax.processing import image, image_io, processor, video

    assert not hasattr(processor, "OPENAI_CLIP_MEAN") or processor.OPENAI_CLIP_MEAN is image.OPENAI_CLIP_MEAN
    # HF's `smart_resize` in `image`, qwen-vl-utils' is `qvu_smart_resize` (image_io); video has neither of its own
    assert not hasattr(image_io, "smart_resize") and not hasattr(video, "smart_resize")
    assert image_io.qvu_smart_resize(10, 500) != image.smart_resize(10, 500)


def test_report_max_abs_diff():
    """Runs last in this file: every recorded HF comparison stayed within 1e-6 (printed with -s)."""
    assert MAX_ABS_DIFF, "no parity case recorded"
    print("\nmax |ours - HF| per case:", json.dumps(MAX_ABS_DIFF, indent=1))
    import helpers

    for name, diff in MAX_ABS_DIFF.items():
        helpers.record(f"processor/{name}", max_abs_diff=diff)
    assert max(MAX_ABS_DIFF.values()) <= 1e-6
