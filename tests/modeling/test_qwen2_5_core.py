"""Qwen2.5-VL on the shared core, beyond the end-to-end parity of test_qwen2_5_vl.py: config and family selection,
the window order against transformers' `get_window_index`, every attention backend, scan_layers (window / full
blocks picked with lax.cond), hooks (window-order rows), LoRA and gradients through the windowed tower.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from qwen2vl_jax import attention
from qwen2vl_jax.modeling.config import PRESETS, ConfigError, Qwen2VLConfig, Qwen2VLVisionConfig
from qwen2vl_jax.modeling.vision_layout import vision_layout, window_index

GRIDS = [  # (t, h, w) in patches: not multiples of the 8-patch window, exact multiples, smaller than one window,
    [1, 18, 26], [1, 16, 16], [1, 4, 6], [3, 10, 8], [1, 2, 34], [2, 8, 24]]  # a video, thin strips


@pytest.fixture(scope="module")
def ckpt25(tmp_path_factory, tokenizer_dir):
    return helpers.build_checkpoint_25(tmp_path_factory.mktemp("q25core") / "tiny", tokenizer_dir=tokenizer_dir,
                                       seed=3)


@pytest.fixture(scope="module")
def hf25(ckpt25):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt25, dtype=torch.float32,
                                                              attn_implementation="eager").eval()


def _inputs(config, seed=0):
    """A left-padded batch: row 0 a 10x12-patch image (5x6 merged tokens: four windows, three of them partial)
    and a 2-temporal-patch video, row 1 text only."""
    rng = np.random.default_rng(seed)
    img, vid = np.array([[1, 10, 12]]), np.array([[2, 6, 10]])

    def block(token, grid):
        return [config.vision_start_token_id] + [token] * (int(np.prod(grid)) // 4) + [config.vision_end_token_id]

    row0 = [9, 10] + block(config.image_token_id, img[0]) + [11] + block(config.video_token_id, vid[0]) + [12, 13]
    S = len(row0)
    ids, mask = np.zeros((2, S), np.int64), np.zeros((2, S), np.int64)
    ids[0], mask[0] = row0, 1
    ids[1, -5:], mask[1, -5:] = [20, 21, 22, 23, 24], 1
    pv = rng.standard_normal((int(np.prod(img)), 1176)).astype(np.float32)
    pvv = rng.standard_normal((int(np.prod(vid)), 1176)).astype(np.float32)
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pv, image_grid_thw=img, pixel_values_videos=pvv,
                video_grid_thw=vid, second_per_grid_ts=np.array([2.0]))


def _hf_logits(hf, inputs):
    import torch

    with torch.no_grad():
        return hf(**{k: torch.tensor(v) for k, v in inputs.items()}).logits.numpy()


# ------------------------------------------------------------------------------------------------- config
def test_config_families_round_trip_and_refuse_mixed_fields():
    for key, make in PRESETS.items():
        config = make()
        assert Qwen2VLConfig.from_hf(config.to_hf_dict()) == config, key
        assert config.to_hf_dict()["model_type"] == config.model_type
    v = PRESETS["2.5-7b"]().to_hf_dict()["vision_config"]
    assert (v["hidden_size"], v["out_hidden_size"], v["intermediate_size"]) == (1280, 3584, 3420)
    with pytest.raises(ConfigError, match="`window_size`: is a Qwen2.5-VL field"):
        Qwen2VLVisionConfig(window_size=112)
    with pytest.raises(ConfigError, match="SwiGLU \\('silu'\\), got 'quick_gelu'"):
        dataclasses.replace(PRESETS["2.5-3b"]().vision_config, hidden_act="quick_gelu")
    with pytest.raises(ConfigError, match="smaller than one merged token"):
        dataclasses.replace(PRESETS["2.5-3b"]().vision_config, window_size=20)
    with pytest.raises(ConfigError, match="`vision_config.model_type`: 'qwen2_vl' does not match"):
        PRESETS["2.5-7b"]().replace(vision_config=PRESETS["7b"]().vision_config)
    with pytest.raises(ConfigError, match="unsupported model_type 'qwen3_vl'"):
        Qwen2VLConfig.from_hf({**PRESETS["2.5-7b"]().to_hf_dict(), "model_type": "qwen3_vl"})


def test_parameter_count_formula_matches_the_modules():
    from qwen2vl_jax.generation.memory import parameter_count
    from qwen2vl_jax.modeling.parameters import model_params
    from qwen2vl_jax.sharding.plan import abstract

    for key in ("2.5-3b", "2.5-72b"):
        config = PRESETS[key]()
        counted = sum(int(np.prod(p.shape)) for p in model_params(abstract(config, "bfloat16")).values())
        assert parameter_count(config) == counted, key


# ------------------------------------------------------------------------------------------- window order
def test_window_index_and_layout_match_get_window_index():
    import torch
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    tower = Qwen2_5_VisionTransformerPretrainedModel(Qwen2_5_VLVisionConfig(**helpers.TINY_VISION_25))
    for grids in [[g] for g in GRIDS] + [GRIDS]:
        grid = np.array(grids)
        ref_index, ref_cu = tower.get_window_index(torch.tensor(grid))
        index, lengths = window_index(grid, 2, 4)
        assert np.array_equal(index, ref_index.numpy()), grids
        cu = torch.unique_consecutive(torch.tensor(ref_cu)).numpy()
        assert np.array_equal(np.cumsum(lengths) * 4, cu[1:]), grids
        layout = vision_layout(grid, 2, window_tokens=4)
        P = layout.num_patches
        # windows are contiguous runs of the permuted rows; frames too (the full-attention segments)
        w = layout.windows
        assert np.array_equal(w.bounds_Q2[: len(lengths), 1], lengths * 4)
        assert np.array_equal(np.sort(layout.window_rows_P), np.arange(P))
        assert np.array_equal(layout.to_prompt_order(np.arange(P)[layout.window_rows_P]), np.arange(P))
        restore = layout.restore_M[: P // 4]
        assert np.array_equal(index[restore], np.arange(P // 4))


# ------------------------------------------------------------------------------------------------ backends
def test_every_backend_and_scan_match_the_reference(ckpt25, hf25):
    from qwen2vl_jax import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt25, dtype=jnp.float32)
    inputs = _inputs(model.config)
    ref = _hf_logits(hf25, inputs)
    keep = inputs["attention_mask"].astype(bool)
    import torch

    with torch.no_grad():  # greedy tokens of the reference, for each backend's generate
        hf_ids = hf25.generate(**{k: torch.tensor(v) for k, v in inputs.items()}, max_new_tokens=8, do_sample=False,
                               repetition_penalty=1.0).numpy()[:, keep.shape[1]:]
    errors = {}
    for name in ("xla", "cpu", "jax", "pallas"):  # the built-in backends (other tests register their own)
        try:
            attention.resolve(name)
        except attention.AttentionBackendError:
            continue  # not usable on this machine (the native kernels need AVX2 + FMA)
        model.set_attn_implementation(name)
        errors[name] = helpers.rel_err(np.asarray(model(**inputs).logits)[keep], ref[keep])
        ids = model.generate(**inputs, max_new_tokens=8, do_sample=False, repetition_penalty=1.0)
        assert np.array_equal(np.asarray(ids)[:, keep.shape[1]:], hf_ids), name
    assert {"xla", "jax", "pallas"} <= set(errors), errors
    assert max(errors.values()) <= 1e-5, errors
    scanned = Qwen2VLForConditionalGeneration.from_pretrained(ckpt25, dtype=jnp.float32, scan_layers=True)
    model.set_attn_implementation(None)
    unrolled = np.asarray(model(**inputs).logits)
    errors["scan_layers"] = helpers.rel_err(np.asarray(scanned(**inputs).logits)[keep], unrolled[keep])
    assert errors["scan_layers"] <= 1e-6, errors
    helpers.record("qwen2_5_vl_backends", **{f"logits_rel_{k}": v for k, v in errors.items()})


def test_hooks_see_window_order_and_can_edit(ckpt25):
    from qwen2vl_jax import Qwen2VLForConditionalGeneration, hooks

    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt25, dtype=jnp.float32)
    inputs = _inputs(model.config)
    grid = inputs["image_grid_thw"]
    pixels = inputs["pixel_values"]
    _, hidden = model.visual(pixels, grid, output_hidden_states=True)
    ids = inputs["input_ids"][:1, : 2 + 32 + 1]  # two text tokens, the image block, one text token
    assert ids[0, -2] == model.config.vision_end_token_id
    out, cache = hooks.run_with_cache(model, ["vision.blocks.*.resid_post", "vision.blocks.*.attn.probs"],
                                      pixel_values=pixels, image_grid_thw=grid, input_ids=ids)
    layout = vision_layout(grid, 2, window_tokens=4)
    for i in range(4):
        recorded = np.asarray(cache[f"vision.blocks.{i}.resid_post"])  # window order
        assert helpers.rel_err(layout.to_prompt_order(recorded), np.asarray(hidden[i])) <= 1e-6, i
        assert helpers.rel_err(recorded, np.asarray(hidden[i])) > 0.1, i  # the orders do differ
    # window blocks (0, 2) attend per window: 4 windows of 5 x 6 merged tokens (4x4 windows), full blocks per image
    assert len(cache["vision.blocks.0.attn.probs"]) == 4 and len(cache["vision.blocks.1.attn.probs"]) == 1
    assert cache["vision.blocks.0.attn.probs"][0].shape == (2, 64, 64)
    assert cache["vision.blocks.0.attn.probs"][-1].shape == (2, 8, 8)  # the bottom-right partial window: 1 x 2
    np.testing.assert_allclose(np.asarray(cache["vision.blocks.1.attn.probs"][0]).sum(-1), 1.0, rtol=1e-5)

    # An edit in window order: zero the first window's rows after the last block; only that window's 16 merged
    # tokens (prompt order: window_index[:16]) change, since the merger works token by token.
    def zero_first_window(value, ctx):
        return value.at[:64].set(0.0)

    edited = hooks.run_with_cache(model, ["vision.merger.out"], hooks={"vision.blocks.3.resid_post": zero_first_window},
                                  pixel_values=pixels, image_grid_thw=grid, input_ids=ids)[1]["vision.merger.out"]
    changed = np.flatnonzero(np.abs(np.asarray(edited) - np.asarray(cache_merged(model, pixels, grid))).max(-1) > 0)
    assert np.array_equal(changed, np.sort(window_index(grid, 2, 4)[0][:16]))


def cache_merged(model, pixels, grid):
    return np.asarray(model.visual(pixels, grid))


def test_lora_and_gradients_through_the_windowed_tower(ckpt25):
    from flax import nnx

    from qwen2vl_jax import Qwen2VLForConditionalGeneration, lora

    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt25, dtype=jnp.float32)
    lora.apply_lora(model, rank=4, seed=0)
    adapted = set(lora.lora_modules(model))
    # PEFT's suffix match: DEFAULT_TARGETS reach the SwiGLU projections of the vision blocks too
    assert {f"visual.blocks.{i}.mlp.{p}" for i in range(4) for p in ("gate_proj", "up_proj", "down_proj")} <= adapted
    assert lora.peft_config(model)["auto_mapping"]["base_model_class"] == "Qwen2_5_VLForConditionalGeneration"

    # Gradients through the windowed tower: unrolled blocks vs scan_layers (window / full picked by lax.cond)
    inputs = _inputs(model.config)
    pixels, layout = model.visual.prepare(inputs["pixel_values"], inputs["image_grid_thw"])
    probe = jnp.asarray(np.random.default_rng(1).standard_normal((layout.padded_patches // 4, 64)), jnp.float32)
    grads = {}
    for scan in (False, True):
        visual = Qwen2VLForConditionalGeneration.from_pretrained(ckpt25, dtype=jnp.float32, scan_layers=scan).visual
        graphdef, params, rest = nnx.split(visual, nnx.Param, ...)

        def loss(p, graphdef=graphdef, rest=rest):
            merged, _ = nnx.merge(graphdef, p, rest).forward(pixels, layout.pos_hw_P2, layout.segments())
            return jnp.sum(jnp.sin(merged[: layout.num_merged]) * probe[: layout.num_merged])

        g = jax.jit(jax.grad(loss))(params)
        grads[scan] = {".".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(g)}
    unrolled, stacked = grads[False], grads[True]["blocks.mlp.gate_proj.weight"]
    for i in range(4):  # blocks 0, 2 attend in windows, 1, 3 over the whole image
        g = unrolled[f"blocks.{i}.mlp.gate_proj.weight"]
        assert np.abs(g).max() > 0, i
        assert helpers.rel_err(stacked[i], g) <= 1e-5, i


# ------------------------------------------------------------------------------------------------------- CLI
def test_cli_names_the_family_and_generates_from_a_video(ckpt25, capsys):
    import json

    from qwen2vl_jax import Qwen2VLForConditionalGeneration, Qwen2VLProcessor, cli

    assert cli.main(["info", "--model", str(ckpt25), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "qwen2_5_vl" and info["parameters"]["total"] == info["checkpoint_tensor_elements"]
    assert info["vision"]["window"] == 112 and info["vision"]["fullatt_blocks"] == [1, 3]
    assert cli.main(["plan", "--model", "2.5-7b", "--mesh", "model=4", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["parameters"]["count"] == 8_292_166_656 and plan["context"] == 128000  # the preset's max positions

    video = str(helpers.video_path())
    args = ["generate", "--model", str(ckpt25), "--video", video, "--fps", "1", "--prompt", "What happens?",
            "--max-new-tokens", "6", "--greedy", "--json", "--quiet", "--dtype", "float32", "--max-pixels", "12544"]
    assert cli.main(args) == 0
    answer = json.loads(capsys.readouterr().out)["answer"]
    # the same request in Python: the processor samples the file at fps 1 and spaces the positions by that rate
    processor = Qwen2VLProcessor.from_pretrained(ckpt25)
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}]
    inputs = processor(text=[processor.apply_chat_template(messages)], videos=[video], fps=1.0, max_pixels=12544)
    from qwen2vl_jax.processing.video import fetch_video

    _, sampled = fetch_video(video, fps=1.0, max_pixels=12544)  # the rate actually sampled (a 4-frame minimum)
    assert inputs["second_per_grid_ts"].tolist() == [2 / sampled.sample_fps]
    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt25, dtype=jnp.float32)
    ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:])[0] == answer


def test_server_answers_with_a_qwen2_5_checkpoint(ckpt25, photos):
    import base64
    import io

    from fastapi.testclient import TestClient

    from qwen2vl_jax.generation.decoding import generate
    from qwen2vl_jax.server.app import build_engine, create_app

    engine = build_engine(ckpt25, model_name="tiny-2.5", max_pixels=64 * 28 * 28)
    try:
        photo = photos["coffee"]
        buf = io.BytesIO()
        photo.save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
        with TestClient(create_app(engine), base_url="http://127.0.0.1") as client:  # a loopback Host
            r = client.post("/v1/chat/completions", json={"model": "tiny-2.5", "max_tokens": 6, "temperature": 0,
                                                          "messages": [{"role": "user", "content": content}]})
        assert r.status_code == 200, r.text
        prompt = engine.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}])
        inputs = engine.processor(text=[prompt], images=[photo])
        out = generate(engine.model, **inputs, max_new_tokens=6, do_sample=False)
        expected = engine.processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert r.json()["choices"][0]["message"]["content"] == expected and expected
    finally:
        engine.close()
