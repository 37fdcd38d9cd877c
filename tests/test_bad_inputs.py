"""Bad inputs a new user tries: each raises one clear error naming the problem (or, for NumPy scalars, just works)."""

import logging
import shutil

import numpy as np
import pytest
import torch

import helpers
from qwen2vl_jax.generation.decoding import generate
from qwen2vl_jax.generation.sampling import GenerationConfig
from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration
from qwen2vl_jax.processing.image import Qwen2VLImageProcessor


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def image_batch(proc, photos):
    return proc(text=helpers.chat("What is this?", n_images=1), images=[photos["coffee"]], min_pixels=56 * 56,
                max_pixels=56 * 56)


# ------------------------------------------------------------------------------------------ 1, 2: generation
def test_numpy_scalar_generation_knobs_are_accepted(model):
    ids = np.array([[1, 2, 3, 4]])
    ref = generate(model, ids, max_new_tokens=4, top_k=1, temperature=0.7, seed=3)
    out = generate(model, ids, max_new_tokens=np.int64(4), top_k=np.int32(1), temperature=np.float32(0.7),
                   seed=np.int64(3), do_sample=np.bool_(False))
    np.testing.assert_array_equal(out, ref)
    assert out.shape == (1, 8)
    config = GenerationConfig(max_new_tokens=np.int64(4), eos_token_id=np.array([5, 6]))
    assert type(config.max_new_tokens) is int and config.eos_token_id == (5, 6)


@pytest.mark.parametrize("pad", [-5, 151936])
def test_bad_pad_token_id_is_named(model, pad):
    with pytest.raises(ValueError, match=r"invalid generation parameter `pad_token_id`: must be None or an id in "
                                         r"\[0, 151936\)"):
        generate(model, np.array([[1, 2, 3]]), max_new_tokens=2, pad_token_id=pad)


# ----------------------------------------------------------------------------------------- 3: pixel bounds
def test_bad_pixel_bounds_are_named(proc, photos):
    with pytest.raises(ValueError, match="`max_pixels` must be a positive integer, got 0"):
        Qwen2VLImageProcessor(max_pixels=0)
    with pytest.raises(ValueError, match="`max_pixels` must be a positive integer, got 0"):
        Qwen2VLImageProcessor.from_dict({}, max_pixels=0)  # an explicit 0 used to fall back to the default
    with pytest.raises(ValueError, match="`max_pixels` must be a positive integer, got 0"):
        proc.image_processor(photos["coffee"], max_pixels=0)  # was ZeroDivisionError
    with pytest.raises(ValueError, match="`max_pixels` must be a positive integer, got 0"):
        proc(text=helpers.chat("hi", n_images=1), images=[photos["coffee"]], max_pixels=0)
    with pytest.raises(ValueError, match=r"`min_pixels` \(5000\) must not exceed `max_pixels` \(4000\)"):
        proc(text="hi", min_pixels=5000, max_pixels=4000)


# ---------------------------------------------------------------------------------- 4: empty text, bad mask
def test_empty_text_is_named(proc):
    with pytest.raises(ValueError, match="`text` must be a non-empty string or list of strings, got an empty list"):
        proc(text=[])
    with pytest.raises(ValueError, match="`text` must be a non-empty string or list of strings, got int 3"):
        proc(text=3)


def test_attention_mask_shape_is_named(model):
    ids = np.array([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \[B, T\] = \[1, 4\], "
                                         r"got \[1, 3\]"):
        model(ids, attention_mask=np.ones((1, 3), np.int64))
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \[B, T\] = \[1, 4\], "
                                         r"got \[2, 2\]"):
        generate(model, ids, attention_mask=np.ones((2, 2), np.int64), max_new_tokens=2)


# ------------------------------------------------------------------------------ 5: placeholders without pixels
def test_placeholders_without_pixels_are_refused(model, image_batch):
    ids = image_batch["input_ids"]
    n = int((ids == model.config.image_token_id).sum())
    assert n > 0
    message = rf"tokens: {n}, features 0 \(input_ids hold {n} image placeholder token\(s\) but no pixel values"
    with pytest.raises(ValueError, match=message):
        model(ids)
    with pytest.raises(ValueError, match=message):
        generate(model, ids, max_new_tokens=2)
    video_ids = np.array([[1, model.config.video_token_id, 2]])
    with pytest.raises(ValueError, match=r"Videos features and video tokens do not match: tokens: 1, features 0 .*"
                                         r"pass `pixel_values_videos` and `video_grid_thw`"):
        model(video_ids)


# ---------------------------------------------------------------------------------------- 6: non-finite pixels
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_pixel_values_are_refused(model, image_batch, bad):
    pixels = np.array(image_batch["pixel_values"], copy=True)
    pixels[0, 3] = bad
    with pytest.raises(ValueError, match="`pixel_values` must be finite numbers, got NaN or inf values"):
        model(image_batch["input_ids"], pixel_values=pixels, image_grid_thw=image_batch["image_grid_thw"])


# ------------------------------------------------------------------------------------ 7: tied config, stored head
def test_tied_config_ignores_a_stored_lm_head_like_transformers(checkpoint_factory, tmp_path, caplog):
    from safetensors.numpy import load_file, save_file

    path = shutil.copytree(checkpoint_factory(tied=True), tmp_path / "tied-with-head")
    tensors = load_file(path / "model.safetensors")
    assert "lm_head.weight" not in tensors
    embed = next(v for k, v in tensors.items() if k.endswith("embed_tokens.weight"))
    head = np.random.default_rng(7).standard_normal(embed.shape).astype(embed.dtype)
    save_file({**tensors, "lm_head.weight": head}, path / "model.safetensors", metadata={"format": "pt"})

    with caplog.at_level(logging.WARNING, logger="qwen2vl_jax.checkpoints.load"):
        ours = Qwen2VLForConditionalGeneration.from_pretrained(path)
    assert "lm_head.weight is ignored because the config ties it" in caplog.text
    assert ours.lm_head is None and ours.config.tie_word_embeddings

    hf = helpers.load_hf_model(path)
    assert hf.lm_head.weight is hf.get_input_embeddings().weight  # transformers ties over the stored head
    ids = np.array([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids)).logits.float().numpy()
    got = np.asarray(ours(ids).logits)
    assert np.abs(got - ref).max() <= 1e-5
