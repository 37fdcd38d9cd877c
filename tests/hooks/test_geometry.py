"""qwen2vl_jax.geometry: token boxes in original pixels, M-RoPE positions, attention heatmaps (real tokenizer,
real photos and video frames, the tiny checkpoint's config and processor files)."""

from __future__ import annotations

import numpy as np
import pytest

import helpers
from qwen2vl_jax.hooks import geometry
from qwen2vl_jax.modeling.config import Qwen2VLConfig
from qwen2vl_jax.modeling.rope import get_rope_index
from qwen2vl_jax.processing.image import smart_resize
from qwen2vl_jax.processing.processor import Qwen2VLProcessor

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def config(tiny_checkpoint):
    return Qwen2VLConfig.from_hf(tiny_checkpoint / "config.json")


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return Qwen2VLProcessor.from_pretrained(tiny_checkpoint)


def one_image(processor, config, image, max_pixels=None):
    inputs = processor(text=[helpers.chat("Describe.", 1)], images=[image], max_pixels=max_pixels)
    geoms = geometry.vision_token_geometry(inputs["input_ids"], inputs["image_grid_thw"], image_sizes=[image],
                                           config=config, processor=processor, max_pixels=max_pixels)
    assert len(geoms) == 1
    return inputs, geoms[0]


@pytest.mark.parametrize("name, max_pixels", [("astronaut", None), ("coffee", 200 * 28 * 28),
                                               ("grace_hopper", 90 * 28 * 28), ("chelsea", 60 * 28 * 28)])
def test_boxes_tile_resized_and_original_image(processor, config, photos, name, max_pixels):
    image = photos[name]
    _, g = one_image(processor, config, image, max_pixels)
    H0, W0 = image.height, image.width
    H1, W1 = smart_resize(H0, W0, max_pixels=max_pixels or processor.image_processor.max_pixels)
    assert g.original_size == (H0, W0) and g.resized_size == (H1, W1)
    assert g.grid_thw == (1, H1 // 14, W1 // 14) and g.merged_grid == (1, H1 // 28, W1 // 28)
    assert g.num_tokens == H1 * W1 // 28**2
    if max_pixels is not None:
        assert H1 * W1 <= max_pixels and (H1, W1) != (round(H0 / 28) * 28, round(W0 / 28) * 28)

    coverage = np.zeros((H1, W1), np.int64)
    for x0, y0, x1, y1 in g.resized_boxes_M4:
        assert x1 - x0 == 28 and y1 - y0 == 28
        coverage[y0:y1, x0:x1] += 1
    assert np.all(coverage == 1)

    # Original boxes: the resized ones scaled by W0 / W1, H0 / H1; every pixel centre in exactly one.
    scale = np.array([W0 / W1, H0 / H1, W0 / W1, H0 / H1])
    np.testing.assert_allclose(g.boxes_M4, g.resized_boxes_M4 * scale, rtol=1e-12)
    assert g.boxes_M4[:, 0].min() == 0 and g.boxes_M4[:, 1].min() == 0
    assert g.boxes_M4[:, 2].max() == W0 and g.boxes_M4[:, 3].max() == H0
    np.testing.assert_allclose(np.prod(g.boxes_M4[:, 2:] - g.boxes_M4[:, :2], axis=1).sum(), H0 * W0)
    cx, cy = np.arange(W0) + 0.5, np.arange(H0) + 0.5
    hits = np.zeros((H0, W0), np.int64)
    for x0, y0, x1, y1 in g.boxes_M4:
        hits += ((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]
    assert np.all(hits == 1)
    # Token order: t-major, then merged row, then merged column.
    t2, h2, w2 = g.merged_grid
    np.testing.assert_array_equal(g.thw_M3[w2 + 1], [0, 1, 1])
    assert g.box(w2 + 1) == tuple(g.boxes_M4[w2 + 1]) and g.box(-1)[2:] == (W0, H0) and g.frames(0) == (0,)


def test_positions_and_token_columns_for_images_and_a_video(processor, config, photos):
    frames = helpers.video_frames(4, size=(112, 196))
    texts = [helpers.chat("One photo.", 1),
             "<|im_start|>user\n" + IMAGE + "and the clip" + VIDEO + "and another" + IMAGE + "<|im_end|>\n"]
    images = [photos["rocket"], photos["chelsea"], photos["coffee"]]
    kw = dict(min_pixels=None, max_pixels=120 * 28 * 28)
    inputs = processor(text=texts, images=images, videos=[frames], padding_side="left", **kw)
    assert inputs["attention_mask"][1].min() == 0 or inputs["attention_mask"][0].min() == 0  # one row is padded
    geoms = geometry.vision_token_geometry(
        inputs["input_ids"], inputs["image_grid_thw"], images, inputs["video_grid_thw"], [frames], config=config,
        attention_mask=inputs["attention_mask"], row=1, processor=processor, **kw)
    assert [(g.kind, g.index) for g in geoms] == [("image", 1), ("video", 0), ("image", 2)]
    assert [g.original_size for g in geoms] == [(300, 451), (112, 196), (400, 600)]
    video = geoms[1]
    assert video.grid_thw == (2, 8, 14) and video.merged_grid == (2, 4, 7) and video.num_tokens == 56
    assert video.frames(0) == (0, 1) and video.frames(28) == (2, 3) and tuple(video.thw_M3[28]) == (1, 0, 0)

    position_ids, _ = get_rope_index(inputs["input_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"],
                                     inputs["attention_mask"], config)
    ids = inputs["input_ids"][1]
    columns = np.concatenate([g.token_index_M for g in geoms])
    pad_columns = np.flatnonzero((ids == config.image_token_id) | (ids == config.video_token_id))
    np.testing.assert_array_equal(columns, pad_columns)  # every pad token, once, in prompt order
    for g in geoms:
        token = config.image_token_id if g.kind == "image" else config.video_token_id
        assert np.all(ids[g.token_index_M] == token)
        np.testing.assert_array_equal(g.positions_M3, position_ids[:, 1, g.token_index_M].T)
        np.testing.assert_array_equal(g.positions_M3 - g.positions_M3[0], g.thw_M3)  # start + (t, row, col)
    # Row 0 (one image) is counted by index, so its geometry is image 0.
    row0 = geometry.vision_token_geometry(inputs["input_ids"], inputs["image_grid_thw"], images,
                                          inputs["video_grid_thw"], [(112, 196)], config=config,
                                          attention_mask=inputs["attention_mask"], row=0, processor=processor, **kw)
    assert [(g.kind, g.index, g.original_size) for g in row0] == [("image", 0, (427, 640))]
    np.testing.assert_array_equal(row0[0].positions_M3, position_ids[:, 0, row0[0].token_index_M].T)


def fake_probs(geom, m, T, L=2, N=3, seed=0):
    """[L, 1, N, T, T] random attention whose last query is one-hot on token m of `geom`."""
    probs = np.random.default_rng(seed).random((L, 1, N, T, T)).astype(np.float32)
    probs[:, :, :, -1] = 0
    probs[:, :, :, -1, geom.token_index_M[m]] = 1
    return probs


def test_one_hot_attention_lights_exactly_that_tokens_box(processor, config, photos):
    image = photos["rocket"]  # 427 x 640: neither side a multiple of 28, scaled down by max_pixels
    inputs, g = one_image(processor, config, image, max_pixels=150 * 28 * 28)
    assert g.resized_size != g.original_size
    T = inputs["input_ids"].shape[1]
    t2, h2, w2 = g.merged_grid
    H0, W0 = g.original_size
    cx, cy = np.arange(W0) + 0.5, np.arange(H0) + 0.5
    for m in (0, w2 - 1, g.num_tokens - w2, g.num_tokens - 1, (h2 // 2) * w2 + w2 // 3):
        probs = fake_probs(g, m, T)
        grid = geometry.attention_to_vision(probs, g, query=T - 1)
        assert grid.shape == (t2, h2, w2) and grid.sum() == 1 and np.argmax(grid) == m
        heat = geometry.heatmap_on_image(grid, g)
        assert heat.shape == (H0, W0)
        x0, y0, x1, y1 = g.box(m)
        expected = ((cy >= y0) & (cy < y1))[:, None] & ((cx >= x0) & (cx < x1))[None, :]
        lit = heat > 0
        np.testing.assert_array_equal(lit, expected)
        rows, cols = np.flatnonzero(lit.any(1)), np.flatnonzero(lit.any(0))
        assert abs(cols[0] - x0) <= 1 and abs(cols[-1] + 1 - x1) <= 1
        assert abs(rows[0] - y0) <= 1 and abs(rows[-1] + 1 - y1) <= 1
        np.testing.assert_array_equal(geometry.heatmap_on_image(grid.ravel(), g), heat)  # [M] form

    # Another query, per-layer / per-head selection, the run_with_cache dict form, reduce=None.
    probs = fake_probs(g, 0, T, L=3, N=4)
    manual = probs[1, 0, 2, 5][g.token_index_M].reshape(t2, h2, w2)
    np.testing.assert_allclose(geometry.attention_to_vision(probs, g, query=5, layers=1, heads=[2]), manual)
    cache = {f"text.layers.{i}.attn.probs": probs[i] for i in range(3)}
    full = geometry.attention_to_vision(cache, g, query=5, reduce=None)
    assert full.shape == (3, 4, t2, h2, w2)
    np.testing.assert_allclose(full[1, 2], manual)
    np.testing.assert_allclose(geometry.attention_to_vision(cache, g, query=5), full.mean(axis=(0, 1)))
    with pytest.raises(ValueError, match="layer 7"):
        geometry.attention_to_vision(cache, g, query=5, layers=[7])
    with pytest.raises(ValueError, match="query 999"):
        geometry.attention_to_vision(probs, g, query=999)


def test_mismatched_image_size_raises_naming_the_image(processor, config, photos):
    images = [photos["astronaut"], photos["coffee"]]
    inputs = processor(text=[helpers.chat("Two.", 2)], images=images, max_pixels=100 * 28 * 28)
    args = (inputs["input_ids"], inputs["image_grid_thw"])
    with pytest.raises(ValueError, match=r"image 1: original size 300x300.*max_pixels"):
        geometry.vision_token_geometry(*args, image_sizes=[images[0], (300, 300)], config=config,
                                       max_pixels=100 * 28 * 28)
    with pytest.raises(ValueError, match=r"image 0: .*max_pixels=12845056"):  # forgot the call's max_pixels
        geometry.vision_token_geometry(*args, image_sizes=images, config=config, processor=processor)
    with pytest.raises(ValueError, match="image_sizes has 1 entries"):
        geometry.vision_token_geometry(*args, image_sizes=images[:1], config=config, max_pixels=100 * 28 * 28)
    ok = geometry.vision_token_geometry(*args, image_sizes=[np.asarray(im) for im in images], config=config,
                                        max_pixels=100 * 28 * 28)
    assert [g.original_size for g in ok] == [(512, 512), (400, 600)]


def test_plots_draw_the_heatmap_and_the_token_grid(processor, config, photos):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image = photos["coffee"]
    _, g = one_image(processor, config, image, max_pixels=80 * 28 * 28)
    m = g.num_tokens // 2 + 3
    values = np.zeros(g.num_tokens)
    values[m] = 1.0
    ax = geometry.plot_attention(image, values, g, title="coffee", grid=True)
    try:
        assert len(ax.images) == 2 and ax.get_title() == "coffee" and len(ax.collections) == 1
        overlay = np.asarray(ax.images[1].get_array())
        assert overlay.shape == (400, 600) and ax.images[1].get_extent() == [0, 600, 400, 0]
        y, x = np.unravel_index(np.argmax(overlay), overlay.shape)
        x0, y0, x1, y1 = g.box(m)
        assert x0 <= x + 0.5 < x1 and y0 <= y + 0.5 < y1
        ax.figure.canvas.draw()
    finally:
        plt.close(ax.figure)

    ax = geometry.plot_token_grid(image, g)
    try:
        assert len(ax.images) == 1 and len(ax.texts) == g.num_tokens
        assert ax.texts[0].get_text() == ",".join(str(v) for v in g.positions_M3[0])
        assert ax.texts[-1].get_position() == pytest.approx(((g.box(-1)[0] + 600) / 2, (g.box(-1)[1] + 400) / 2))
        geometry.plot_token_grid(image, g, ax=ax, label="index")
        assert ax.texts[-1].get_text() == str(g.token_index_M[-1])
    finally:
        plt.close(ax.figure)
    with pytest.raises(ValueError, match="not image 0's original size"):
        geometry.plot_attention(photos["astronaut"], values, g)


def test_real_attention_from_run_with_cache(tiny_checkpoint, processor, config, photos):
    from qwen2vl_jax import hooks
    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    inputs, g = one_image(processor, config, photos["chelsea"], max_pixels=40 * 28 * 28)
    _, cache = hooks.run_with_cache(model, ["text.layers.*.attn.probs"], **inputs)
    stacked = hooks.stack_layers(cache, "text.layers.{i}.attn.probs")  # [L, B, N, T, T]
    T = inputs["input_ids"].shape[1]
    assert stacked.shape[-2:] == (T, T)
    grid = geometry.attention_to_vision(cache, g, query=-1)
    np.testing.assert_allclose(grid, geometry.attention_to_vision(stacked, g, query=T - 1), rtol=1e-12)
    manual = stacked[:, 0, :, -1][:, :, g.token_index_M].mean(axis=(0, 1))
    np.testing.assert_allclose(grid.ravel(), manual, rtol=1e-6)
    assert 0 < grid.sum() < 1  # the rest of the last token's attention is on text tokens
    heat = geometry.heatmap_on_image(grid, g)
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    x0, y0, x1, y1 = g.box(int(np.argmax(grid)))
    assert x0 <= x + 0.5 < x1 and y0 <= y + 0.5 < y1
