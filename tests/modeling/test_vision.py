"""Vision tower + merger vs transformers 4.57 `model.visual` (fp32, per-block hidden states and merger output)."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import helpers
from qwen2vl_jax.modeling import programs
from qwen2vl_jax.modeling.config import qwen2_vl_2b
from qwen2vl_jax.modeling.hook_points import make_hookset
from qwen2vl_jax.modeling.rope import vision_cos_sin
from qwen2vl_jax.modeling.vision import VisionTransformer
from qwen2vl_jax.modeling.vision_layout import merge_order_positions, vision_layout
from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

TOL = 1e-5


def _vision_inputs(photos):
    proc = helpers.hf_image_processor(max_pixels=256 * 28 * 28)
    one = proc(images=[photos["astronaut"]], return_tensors="np")
    three = proc(images=[photos["coffee"], photos["chelsea"], photos["rocket"]], return_tensors="np")
    video = proc(images=None, videos=[helpers.video_frames(6)], return_tensors="np")
    assert video["video_grid_thw"][0, 0] >= 3
    mixed = (np.concatenate([three["pixel_values"], video["pixel_values_videos"]]),
             np.concatenate([three["image_grid_thw"], video["video_grid_thw"]]))
    return {
        "one_photo": (one["pixel_values"], one["image_grid_thw"]),
        "three_images": (three["pixel_values"], three["image_grid_thw"]),
        "video": (video["pixel_values_videos"], video["video_grid_thw"]),
        "images_and_video": mixed,
    }


@pytest.fixture(scope="module")
def vision_inputs(photos):
    return _vision_inputs(photos)


def _hf_visual(hf, pixels, grid):
    return helpers.hf_visual_blocks(hf, pixels, grid)


def _check_parity(ours_model, hf, pixels, grid, name):
    ref, ref_blocks = _hf_visual(hf, pixels, grid)
    merged, hidden = ours_model.visual(pixels, grid, output_hidden_states=True)
    assert merged.shape == ref.shape == (int(np.prod(grid, -1).sum()) // 4, ours_model.config.text_config.hidden_size)
    errs = [helpers.rel_err(h, r) for h, r in zip(hidden, ref_blocks, strict=True)]
    errs.append(helpers.rel_err(merged, ref))
    helpers.record(f"vision/{name}", max_block_rel_err=max(errs[:-1]), merger_rel_err=errs[-1],
                   patches=int(pixels.shape[0]), grid=np.asarray(grid).tolist())
    assert max(errs) <= TOL, errs
    return errs


@pytest.fixture(scope="module")
def tiny_pair(tiny_checkpoint):
    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint), helpers.load_hf_model(tiny_checkpoint)


@pytest.mark.parametrize("case", ["one_photo", "three_images", "video", "images_and_video"])
def test_tiny_vision_parity(tiny_pair, vision_inputs, case):
    ours, hf = tiny_pair
    _check_parity(ours, hf, *vision_inputs[case], name=f"tiny/{case}")


@pytest.fixture(scope="module")
def slice_pair(slice_2b_checkpoint):
    return (Qwen2VLForConditionalGeneration.from_pretrained(slice_2b_checkpoint),
            helpers.load_hf_model(slice_2b_checkpoint))


@pytest.mark.parametrize("case", ["one_photo", "three_images", "video", "images_and_video"])
def test_real_width_2b_slice_vision_parity(slice_pair, vision_inputs, case):
    ours, hf = slice_pair
    v = ours.config.vision_config
    assert (v.embed_dim, v.num_heads, v.mlp_dim, v.hidden_size, v.depth) == (1280, 16, 5120, 1536, 2)
    _check_parity(ours, hf, *vision_inputs[case], name=f"2b-slice/{case}")


def test_positions_and_rotary_match_reference(tiny_pair):
    ours, hf = tiny_pair
    # The worked example of transformers `Qwen2VisionTransformerPretrainedModel.rot_pos_emb` for h = w = 4.
    pos = merge_order_positions(4, 4, 2)
    assert pos[:, 0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    assert pos[:, 1].tolist() == [0, 1, 0, 1, 2, 3, 2, 3, 0, 1, 0, 1, 2, 3, 2, 3]
    grid = np.array([[1, 6, 10], [3, 4, 2]])
    layout = vision_layout(grid, 2)
    with torch.no_grad():
        ref_angles = hf.model.visual.rot_pos_emb(torch.from_numpy(grid)).numpy()  # [P, head_dim/2]
    cos, sin = vision_cos_sin(layout.pos_hw_P2[: layout.num_patches], ours.visual.config)
    ref_emb = np.concatenate([ref_angles, ref_angles], -1)
    assert np.max(np.abs(np.asarray(cos) - np.cos(ref_emb))) < 1e-6
    assert np.max(np.abs(np.asarray(sin) - np.sin(ref_emb))) < 1e-6
    # Segments == the reference's cu_seqlens: one per temporal slice, no attention across images or frames.
    seg_len = layout.seg_valid_QL.sum(1)
    assert seg_len[seg_len > 0].tolist() == [60, 8, 8, 8]
    starts = layout.seg_rows_QL[seg_len > 0, 0].tolist()
    assert starts == [0, 60, 68, 76]


def test_padded_and_unpadded_runs_agree(tiny_pair, vision_inputs):
    ours, _ = tiny_pair
    pixels, grid = vision_inputs["images_and_video"]
    padded = np.asarray(ours.visual(pixels, grid))
    exact = vision_layout(grid, 2, patch_bucket=lambda n: n, segment_bucket=lambda n: n,
                          segments_bucket=lambda n: n)
    assert exact.padded_patches == pixels.shape[0]
    merged, _ = ours.visual.run_padded(pixels, exact)
    assert np.asarray(merged).shape == padded.shape
    assert np.max(np.abs(np.asarray(merged) - padded)) <= 1e-6 * np.max(np.abs(padded))


def test_one_compile_serves_several_sizes_of_a_bucket_compiles(tiny_pair):
    ours, _ = tiny_pair
    rng = np.random.default_rng(1)
    grids = [[1, 20, 30], [1, 24, 28], [1, 22, 32], [1, 26, 26]]  # 600, 672, 704, 676 patches -> bucket 768
    layouts = [vision_layout(np.array([g]), 2) for g in grids]
    assert len({(lay.padded_patches, lay.seg_rows_QL.shape) for lay in layouts}) == 1
    jax.clear_caches()  # count from zero: earlier tests may have compiled these buckets
    outs = []
    for g in grids:
        pixels = rng.standard_normal((int(np.prod(g)), 1176)).astype(np.float32)
        outs.append(ours.visual(pixels, np.array([g])))
    assert programs.compiles()["vision"] == 1
    assert [o.shape[0] for o in outs] == [150, 168, 176, 169]
    ours.visual(rng.standard_normal((1024, 1176)).astype(np.float32), np.array([[1, 32, 32]]))  # the next bucket
    assert programs.compiles()["vision"] == 2


def test_2b_vision_parameter_count_without_allocation():
    cfg = qwen2_vl_2b().vision_config
    abstract = nnx.eval_shape(lambda: VisionTransformer(cfg, rngs=nnx.Rngs(0)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == 665_271_296


def test_hook_points_record_block_outputs(tiny_pair, vision_inputs):
    ours, _ = tiny_pair
    pixels, grid = vision_inputs["three_images"]
    merged, hidden = ours.visual(pixels, grid, output_hidden_states=True)
    names = make_hookset(ours.config, record=["vision.blocks.*.resid_post", "vision.merger.out"])
    padded, layout = ours.visual.prepare(pixels, grid)
    out, records = ours.visual.run_hooked(padded, layout, names)
    np.testing.assert_allclose(np.asarray(records["vision.merger.out"]), np.asarray(merged), rtol=0, atol=1e-6)
    for i, h in enumerate(hidden):
        np.testing.assert_allclose(np.asarray(records[f"vision.blocks.{i}.resid_post"]), np.asarray(h), rtol=0,
                                   atol=1e-6)


@pytest.mark.parametrize("pixels_shape, grid, match", [
    ((100, 1176), [[1, 8, 10]], r"100 rows .* 80 patches"),
    ((60, 1176), [[1, 5, 12]], r"multiples of spatial_merge_size=2.*\[1, 5, 12\]"),
    ((80, 1000), [[1, 8, 10]], r"\[num_patches, 1176\].*\(80, 1000\)"),
    ((80, 1176), [[8, 10]], r"\[num_images, 3\]"),
    ((80, 1176), [[0, 8, 10]], r"positive"),
])
def test_wrong_inputs_raise_with_numbers(tiny_pair, pixels_shape, grid, match):
    ours, _ = tiny_pair
    with pytest.raises(ValueError, match=match):
        ours.visual(np.zeros(pixels_shape, np.float32), np.array(grid))
