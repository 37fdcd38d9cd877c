"""`scan_layers=True`: the same checkpoints stacked and run with `jax.lax.scan` give the unrolled model's numbers.

Compared in one process on the same inputs (images of two sizes and a video, a left-padded batch): logits,
every hidden state, attention probabilities, vision features, greedy tokens; the checkpoint written back from a
scanned model is the original's bytes; what needs per-layer modules (hooks, LoRA) refuses with one clear error.
"""

import numpy as np
import pytest

import helpers
from qwen2vl_jax.lora import LoRAError, apply_lora
from qwen2vl_jax.modeling.hook_points import HookError
from qwen2vl_jax.modeling.parameters import model_params
from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration as M


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(a).max())


@pytest.fixture(scope="module")
def batch(hf_tokenizer, photos):
    return helpers.hf_inputs(
        hf_tokenizer, [helpers.chat("Compare the two pictures.", 2), helpers.chat("Describe the video.", 0, 1),
                       helpers.chat("Hi")],
        images=[photos["astronaut"], photos["coffee"].resize((180, 120))], videos=[helpers.video_frames(4)],
        image_processor=helpers.hf_image_processor(max_pixels=160 * 160))


def test_scanned_model_matches_unrolled(tiny_checkpoint, batch, tmp_path):
    one = M.from_pretrained(tiny_checkpoint)
    sc = M.from_pretrained(tiny_checkpoint, scan_layers=True)
    L, depth = one.config.text_config.num_hidden_layers, one.config.vision_config.depth
    params = model_params(sc)
    assert params["language_model.layers.self_attn.q_proj.weight"].shape[0] == L
    assert params["visual.blocks.attn.qkv.weight"].shape[0] == depth
    assert not any(".0." in p for p in params)  # every per-layer parameter is stacked

    a = one(**batch, output_hidden_states=True, output_attentions=True)
    b = sc(**batch, output_hidden_states=True, output_attentions=True)
    rel = _rel(a.logits, b.logits)
    helpers.record("scan/tiny-logits", max_rel=rel)
    assert rel <= 1e-6
    assert len(a.hidden_states) == len(b.hidden_states) == L + 1
    assert max(_rel(x, y) for x, y in zip(a.hidden_states, b.hidden_states)) <= 1e-6
    assert len(b.attentions) == L and max(_rel(x, y) for x, y in zip(a.attentions, b.attentions)) <= 1e-6
    grid = batch["image_grid_thw"]
    (fa, ha), (fb, hb) = (m.visual(batch["pixel_values"], grid, output_hidden_states=True) for m in (one, sc))
    assert _rel(fa, fb) <= 1e-6 and len(hb) == depth and max(_rel(x, y) for x, y in zip(ha, hb)) <= 1e-6

    ga = one.generate(**batch, max_new_tokens=12, do_sample=False)
    gb = sc.generate(**batch, max_new_tokens=12, do_sample=False)
    assert np.array_equal(ga, gb) and ga.shape[1] == batch["input_ids"].shape[1] + 12

    # written back per layer: the same tensors, byte for byte, as the unrolled model writes
    sc.save_pretrained(tmp_path / "scan", format="flax")
    one.save_pretrained(tmp_path / "one", format="flax")
    from qwen2vl_jax.checkpoints.safetensors_io import SafetensorsFile

    fa, fb = SafetensorsFile(tmp_path / "one" / "model.safetensors"), SafetensorsFile(tmp_path / "scan" /
                                                                                       "model.safetensors")
    assert sorted(fa.keys()) == sorted(fb.keys())
    assert all(np.array_equal(fa.read(k), fb.read(k)) for k in fa.keys())


def test_scanned_model_refuses_per_layer_tools(tiny_checkpoint, batch):
    sc = M.from_pretrained(tiny_checkpoint, scan_layers=True)
    from qwen2vl_jax.hooks.run import run_with_cache

    with pytest.raises(HookError, match="scan_layers=False"):
        run_with_cache(sc, ["text.layers.0.resid_post"], **batch)
    with pytest.raises(LoRAError, match="scan_layers=False"):
        apply_lora(sc, rank=4)


@pytest.mark.slow
def test_scanned_2b_width_slice_matches_unrolled(slice_2b_checkpoint, batch):
    one = M.from_pretrained(slice_2b_checkpoint)
    sc = M.from_pretrained(slice_2b_checkpoint, scan_layers=True)
    rel = _rel(one(**batch).logits, sc(**batch).logits)
    helpers.record("scan/2b-slice-logits", max_rel=rel)
    assert rel <= 1e-6
