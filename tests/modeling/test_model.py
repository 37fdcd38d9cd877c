"""M-RoPE decoder, get_rope_index and the full forward vs transformers 4.57 (fp32, eager attention)."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import helpers
from qwen2vl_jax import hooks
from qwen2vl_jax.modeling.config import qwen2_vl_2b, qwen2_vl_7b, qwen2_vl_72b
from qwen2vl_jax.modeling.rope import get_rope_index
from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

TOL = 1e-5
IMG, VID, VS, VE = 151655, 151656, 151652, 151653


# ---------------------------------------------------------------------------------------------- rope index
def _vision_ids(text_before: int, grid, token, merge=2, text_after=3, start=1000):
    n = int(np.prod(grid)) // merge**2
    return list(range(start, start + text_before)) + [VS] + [token] * n + [VE] + list(range(7, 7 + text_after))


def _hf_rope(hf, ids, image_grid=None, video_grid=None, mask=None):
    t = lambda a: None if a is None else torch.as_tensor(np.asarray(a))
    pos, deltas = hf.model.get_rope_index(t(ids), t(image_grid), t(video_grid), t(mask))
    return pos.numpy(), deltas.numpy()


def _rope_cases():
    g1, g2, gv = [1, 8, 12], [1, 6, 4], [3, 8, 12]
    long_video = [8, 4, 4]  # grid_t > max(h, w) / 2 (transformers 5 diverges here; 4.57 is the reference)
    image = _vision_ids(5, g1, IMG)
    two_images = _vision_ids(4, g1, IMG) + _vision_ids(2, g2, IMG)
    video = _vision_ids(3, gv, VID)
    mixed = _vision_ids(2, g2, IMG) + _vision_ids(3, gv, VID, start=2000)
    late_video = _vision_ids(2, long_video, VID)
    return {
        "text_only": ([[5, 6, 7, 8, 9, 10]], None, None, None),
        "one_image": ([image], [g1], None, None),
        "two_images_of_different_sizes": ([two_images], [g1, g2], None, None),
        "video": ([video], None, [gv], None),
        "image_then_video": ([mixed], [g2], [gv], None),
        "video_with_long_time_axis": ([late_video], None, [long_video], None),
    }


@pytest.fixture(scope="module")
def tiny_pair(tiny_checkpoint):
    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint), helpers.load_hf_model(tiny_checkpoint)


@pytest.mark.parametrize("case", list(_rope_cases()))
def test_get_rope_index_matches_reference(tiny_pair, case):
    ours, hf = tiny_pair
    ids, ig, vg, mask = _rope_cases()[case]
    pos, deltas = get_rope_index(np.array(ids), ig, vg, mask, ours.config)
    ref_pos, ref_deltas = _hf_rope(hf, np.array(ids), ig, vg, mask)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(deltas, ref_deltas)
    if case == "video_with_long_time_axis":
        # the block starts at 3 (2 text + vision_start); <|vision_end|> after it sits at 3 + grid_t = 11 on every
        # axis (transformers 4.57), where transformers 5.x would put it at 3 + max(h, w) / 2 = 5
        assert pos[:, 0, -4].tolist() == [11, 11, 11]


def test_get_rope_index_left_padded_mixed_batch(tiny_pair):
    ours, hf = tiny_pair
    g1, g2, gv = [1, 8, 12], [1, 6, 4], [2, 4, 8]
    rows = [_vision_ids(3, g1, IMG), list(range(100, 120)), _vision_ids(1, g2, IMG) + _vision_ids(2, gv, VID),
            list(range(300, 305))]
    S = max(map(len, rows)) + 2
    ids = np.zeros((len(rows), S), np.int64)
    mask = np.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, S - len(r):], mask[b, S - len(r):] = r, 1
        ids[b, : S - len(r)] = 151643
    pos, deltas = get_rope_index(ids, [g1, g2], [gv], mask, ours.config)
    ref_pos, ref_deltas = _hf_rope(hf, ids, [g1, g2], [gv], mask)
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(deltas, ref_deltas)
    # text-only batch with padding takes the reference's cumsum path
    pos, deltas = get_rope_index(ids[1:2], None, None, mask[1:2], ours.config)
    ref_pos, ref_deltas = _hf_rope(hf, ids[1:2], None, None, mask[1:2])
    np.testing.assert_array_equal(pos, ref_pos)
    np.testing.assert_array_equal(deltas, ref_deltas)


def test_get_rope_index_worked_example():
    """A worked example: [T, T, VS, IMG x 6, VE, T, T], grid (1, 4, 6); with and without 2 left pads."""
    ids = [1, 2, VS] + [IMG] * 6 + [VE, 3, 4]
    pos, deltas = get_rope_index(np.array([ids]), [[1, 4, 6]])
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8]
    assert pos[1, 0].tolist() == [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8]
    assert pos[2, 0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]
    assert deltas.tolist() == [[-3]]
    padded = np.array([[0, 0] + ids])
    pos2, deltas2 = get_rope_index(padded, [[1, 4, 6]], None, (padded != 0).astype(int) | (np.arange(14) >= 2))
    np.testing.assert_array_equal(pos2[:, :, 2:], pos)
    assert deltas2.tolist() == [[-5]] and 12 + deltas[0, 0] == 14 + deltas2[0, 0] == 9


# ------------------------------------------------------------------------------------------------ logits
def _hf_logits(hf, inputs, **kw):
    with torch.no_grad():
        out = hf(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}, **kw)
    return out


def _compare_logits(ours, hf, inputs, name):
    ref = _hf_logits(hf, inputs).logits.numpy()
    got = np.asarray(ours(**inputs).logits)
    mask = inputs["attention_mask"].astype(bool)
    err = helpers.rel_err(got[mask], ref[mask])  # pad positions hold garbage in both
    helpers.record(f"logits/{name}", rel_err=err, tokens=int(mask.sum()), batch=int(mask.shape[0]),
                   top1_agree=float((got[mask].argmax(-1) == ref[mask].argmax(-1)).mean()))
    assert err <= TOL, err
    return err


CASES = helpers.PARITY_CASES


@pytest.mark.parametrize("case", CASES)
def test_tiny_logits_parity(tiny_pair, hf_tokenizer, photos, case):
    ours, hf = tiny_pair
    _compare_logits(ours, hf, helpers.parity_inputs(hf_tokenizer, photos, case), f"tiny/{case}")


@pytest.mark.parametrize("tied, layout", [(True, "hub"), (False, "new"), (True, "new")])
def test_tied_untied_and_both_key_layouts(checkpoint_factory, hf_tokenizer, photos, tied, layout):
    path = checkpoint_factory(tied=tied, layout=layout)
    ours = Qwen2VLForConditionalGeneration.from_pretrained(path)
    assert (ours.lm_head is None) is tied
    _compare_logits(ours, helpers.load_hf_model(path), helpers.parity_inputs(hf_tokenizer, photos, "one_photo"),
                    f"tiny-{'tied' if tied else 'untied'}-{layout}-layout/one_photo")


@pytest.fixture(scope="module")
def slice_pair(slice_2b_checkpoint):
    return (Qwen2VLForConditionalGeneration.from_pretrained(slice_2b_checkpoint),
            helpers.load_hf_model(slice_2b_checkpoint))


@pytest.mark.parametrize("case", ["one_photo", "left_padded_batch"])
def test_real_width_2b_slice_logits_parity(slice_pair, hf_tokenizer, photos, case):
    ours, hf = slice_pair
    t = ours.config.text_config
    assert (t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.mrope_section) == (
        1536, 12, 2, 128, (16, 24, 24))
    _compare_logits(ours, hf, helpers.parity_inputs(hf_tokenizer, photos, case), f"2b-slice/{case}")


def test_hidden_states_and_attentions_match_reference(tiny_pair, hf_tokenizer, photos):
    ours, hf = tiny_pair
    inputs = helpers.parity_inputs(hf_tokenizer, photos, "one_photo")
    ref = _hf_logits(hf, inputs, output_hidden_states=True, output_attentions=True)
    out = ours(**inputs, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == ours.config.text_config.num_hidden_layers + 1
    for h, r in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert helpers.rel_err(h, r.numpy()) <= TOL
    for a, r in zip(out.attentions, ref.attentions, strict=True):
        assert np.max(np.abs(np.asarray(a) - r.numpy())) <= 1e-5
    # the same values through the hook points (a separately compiled program, so compare at TOL)
    hooked_out, cache = hooks.run_with_cache(ours, ["text.layers.0.resid_post", "text.layers.1.attn.probs"], **inputs)
    assert helpers.rel_err(hooked_out.logits, out.logits) <= TOL
    assert helpers.rel_err(cache["text.layers.0.resid_post"], out.hidden_states[1]) <= TOL
    assert helpers.rel_err(cache["text.layers.1.attn.probs"], out.attentions[1]) <= TOL


@pytest.mark.parametrize("case", ["one_photo", "left_padded_batch"])
def test_cached_decode_step_equals_full_forward(tiny_pair, hf_tokenizer, photos, case):
    ours, _ = tiny_pair
    inputs = helpers.parity_inputs(hf_tokenizer, photos, case)
    full = np.asarray(ours(**inputs).logits)
    B, T = inputs["input_ids"].shape
    prefix = {k: v for k, v in inputs.items()}
    prefix["input_ids"], prefix["attention_mask"] = inputs["input_ids"][:, :-1], inputs["attention_mask"][:, :-1]
    cache = ours.init_cache(B, T + 8)
    out = ours(**prefix, cache=cache)
    step = ours(inputs["input_ids"][:, -1:], attention_mask=inputs["attention_mask"][:, -1:], cache=out.cache)
    assert int(step.cache.length) == T
    err = helpers.rel_err(np.asarray(step.logits)[:, 0], full[:, -1])
    helpers.record(f"kv_cache_step/{case}", rel_err=err)
    assert err <= TOL, err
    real = prefix["attention_mask"].astype(bool)  # pad rows attend to nothing real: garbage in both runs
    assert helpers.rel_err(np.asarray(out.logits)[real], full[:, :-1][real]) <= TOL


def test_vision_token_count_mismatch_raises_like_reference(tiny_pair, hf_tokenizer, photos):
    ours, _ = tiny_pair
    inputs = helpers.parity_inputs(hf_tokenizer, photos, "one_photo")
    ids = inputs["input_ids"].copy()
    n = int((ids == IMG).sum())
    ids[0, np.flatnonzero(ids[0] == IMG)[:3]] = 9707
    with pytest.raises(ValueError, match=f"Image features and image tokens do not match: tokens: {n - 3}, "
                                         f"features {n}"):
        ours(**{**inputs, "input_ids": ids})


@pytest.mark.parametrize("preset, expected", [(qwen2_vl_2b, 2_208_985_600), (qwen2_vl_7b, 8_291_375_616),
                                              (qwen2_vl_72b, 73_405_560_320)])
def test_preset_parameter_counts_without_allocation(preset, expected):
    abstract = nnx.eval_shape(lambda: Qwen2VLForConditionalGeneration(preset(), rngs=nnx.Rngs(0)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param))) == expected
    assert abstract.num_params()["total"] == expected


def test_a_block_without_its_name_is_an_error():
    """Every named module takes its hook-point name and layer (no default that would record under layer 0)."""
    import jax.numpy as jnp

    from qwen2vl_jax.modeling import text, vision
    from qwen2vl_jax.modeling.config import Qwen2VLConfig
    from qwen2vl_jax.testing import demo

    cfg = Qwen2VLConfig.from_hf(demo.TINY_HF_CONFIG)
    with pytest.raises(TypeError, match="name"):
        text.Attention(cfg.text_config, param_dtype=jnp.float32, rngs=nnx.Rngs(0), layer=0)
    for bad in ("", "text.layers.0.", None):
        with pytest.raises(ValueError, match="hook-point name"):
            vision.VisionMLP(cfg.vision_config, param_dtype=jnp.float32, rngs=nnx.Rngs(0), name=bad, layer=0)
    mlp = text.MLP(cfg.text_config, param_dtype=jnp.float32, rngs=nnx.Rngs(0), name="text.layers.1.mlp", layer=1)
    assert (mlp.name, mlp.layer) == ("text.layers.1.mlp", 1)
