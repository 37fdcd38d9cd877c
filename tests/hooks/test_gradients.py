"""Gradients at hook points and attribution patching (`qwen2vl_jax.interventions`), against torch autograd.

The oracle for gradients is transformers 4.57 (eager attention, fp32) under torch autograd: forward hooks keep its
modules' outputs (decoder layers, self_attn, vision blocks) and o_proj's input with `retain_grad()`, and the same
metric is back-propagated. Attribution patching is checked against real activation patching over every (layer,
position) of the tiny model, and against gradient x difference computed here from `gradients_at` and
`run_with_cache`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.tree_util import Partial

import helpers
from qwen2vl_jax import Qwen2VLForConditionalGeneration, hooks
from qwen2vl_jax.hooks.interventions import gradients as G
from qwen2vl_jax.modeling.hook_points import HookError

TOL = 1e-5
N_LAYERS = helpers.TINY_TEXT["num_hidden_layers"]
N_BLOCKS = helpers.TINY_VISION["depth"]


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint), helpers.load_hf_model(tiny_checkpoint)


def _rel(ours, ref) -> float:
    """||ours - ref|| / ||ref|| (Frobenius norms, float64)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30))


def _logit_diff(tokens, logits_BTV):
    """Summed over the batch rows: logit of tokens[0] minus logit of tokens[1] at the last position."""
    last_BV = logits_BTV[:, -1]
    return (last_BV[:, tokens[0]] - last_BV[:, tokens[1]]).sum()


def _output_logit_diff(tokens, out):
    return _logit_diff(tokens, out.logits)


def _jax_metric(tokens):
    """The metric for `gradients_at`: one module-level function, the tokens a traced `Partial` argument (so new
    tokens reuse the compiled program)."""
    return Partial(_output_logit_diff, jnp.asarray(tokens))


# --------------------------------------------------------------------------------------- torch autograd oracle
def _torch_gradients(hf, inputs, tokens) -> tuple[float, dict[str, np.ndarray]]:
    """transformers' metric value and its gradient w.r.t. the values our hook points name (head_out flattened to
    o_proj's input [B, T, N*H])."""
    kept: dict[str, torch.Tensor] = {}

    def keep(name, tensor):
        tensor.retain_grad()
        kept[name] = tensor

    def on_output(name):
        return lambda mod, args, out: keep(name, out[0] if isinstance(out, tuple) else out)

    handles = []
    for i, layer in enumerate(hf.model.language_model.layers):
        handles += [layer.register_forward_hook(on_output(f"text.layers.{i}.resid_post")),
                    layer.self_attn.register_forward_hook(on_output(f"text.layers.{i}.attn_out")),
                    layer.self_attn.o_proj.register_forward_pre_hook(
                        lambda mod, args, i=i: keep(f"text.layers.{i}.attn.head_out", args[0]))]
    for i, block in enumerate(hf.model.visual.blocks):
        handles.append(block.register_forward_hook(on_output(f"vision.blocks.{i}.resid_post")))
    try:
        out = hf(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()})
        value = _logit_diff(tokens, out.logits)
        value.backward()
    finally:
        for h in handles:
            h.remove()
        hf.zero_grad(set_to_none=True)
    return float(value.detach()), {name: t.grad.detach().numpy().copy() for name, t in kept.items()}


@pytest.fixture(scope="module")
def photo_inputs(hf_tokenizer, photos):
    return helpers.parity_inputs(hf_tokenizer, photos, "one_photo")


@pytest.mark.parametrize("case", ["one_photo", "left_padded_batch"])
def test_gradients_match_torch_autograd(pair, photo_inputs, two_rows, case):
    """Residual streams, attention outputs, head outputs before o_proj and vision block outputs: one program, the
    vision tower and the decoder differentiated together."""
    ours, hf = pair
    inputs = photo_inputs if case == "one_photo" else two_rows
    tokens = (101, 202)
    backend = ours.config.attn_implementation
    names = ["text.layers.*.resid_post", "text.layers.*.attn_out", "text.layers.*.attn.head_out",
             "vision.blocks.*.resid_post"]
    value, grads = G.gradients_at(ours, names, _jax_metric(tokens), **inputs)
    ref_value, ref = _torch_gradients(hf, inputs, tokens)
    assert ours.config.attn_implementation == backend  # the model's backend is as it was
    assert abs(float(value) - ref_value) <= TOL * max(abs(ref_value), 1.0)
    want = [f"text.layers.{i}.{s}" for s in ("resid_post", "attn_out", "attn.head_out") for i in range(N_LAYERS)]
    want += [f"vision.blocks.{i}.resid_post" for i in range(N_BLOCKS)]
    assert sorted(grads) == sorted(want) == sorted(ref)
    B, T = inputs["input_ids"].shape
    cfg = ours.config.text_config
    assert grads["text.layers.0.attn.head_out"].shape == (B, T, cfg.num_attention_heads, cfg.head_dim)
    assert grads["vision.blocks.0.resid_post"].shape == (inputs["pixel_values"].shape[0],
                                                          ours.config.vision_config.embed_dim)
    errors = {}
    for name in want:
        got = np.asarray(grads[name]).reshape(ref[name].shape)  # head_out: [B, T, N, H] -> o_proj's [B, T, N*H]
        assert np.linalg.norm(ref[name]) > 0, name  # the metric depends on every point compared
        errors[name] = _rel(got, ref[name])
    worst = max(errors.values())
    print(f"gradients vs torch autograd ({case}): max relative error {worst:.2e}",
          {n: f"{e:.1e}" for n, e in errors.items()})
    helpers.record(f"hooks/gradients/{case}", max_rel_err=worst, points=len(errors))
    assert worst <= TOL, errors
    if case == "left_padded_batch":  # the left padding of the shorter row gets no gradient
        pad = ~inputs["attention_mask"].astype(bool)
        assert pad.any()
        assert np.abs(np.asarray(grads["text.layers.0.resid_post"])[pad]).max() == 0.0


@pytest.mark.slow
def test_qwen25_gradients_match_torch_autograd(tiny25_checkpoint, photo_inputs):
    """Qwen2.5-VL: window-attention vision blocks run in window order, in both implementations; the gradients come
    back in that row order, as run_with_cache records the values."""
    ours = Qwen2VLForConditionalGeneration.from_pretrained(tiny25_checkpoint)
    hf = helpers.load_hf_model_25(tiny25_checkpoint)
    tokens = (101, 202)
    names = ["text.layers.*.resid_post", "text.layers.*.attn.head_out", "vision.blocks.*.resid_post"]
    value, grads = G.gradients_at(ours, names, _jax_metric(tokens), **photo_inputs)
    ref_value, ref = _torch_gradients(hf, photo_inputs, tokens)
    assert abs(float(value) - ref_value) <= TOL * max(abs(ref_value), 1.0)
    assert len(grads) == 2 * N_LAYERS + helpers.TINY_VISION_25["depth"]
    errors = {n: _rel(np.asarray(g).reshape(ref[n].shape), ref[n]) for n, g in grads.items()}
    print(f"Qwen2.5-VL gradients vs torch autograd: max relative error {max(errors.values()):.2e}")
    helpers.record("hooks/gradients/qwen25_one_photo", max_rel_err=max(errors.values()), points=len(errors))
    assert max(errors.values()) <= TOL, errors


# ------------------------------------------------------------------------------------------ attribution patching
@pytest.fixture(scope="module")
def clean_corrupt(hf_tokenizer):
    """Two prompts of one length that differ in one word."""
    clean = helpers.hf_inputs(hf_tokenizer, [helpers.chat("The capital of France is the city of")])
    corrupt = helpers.hf_inputs(hf_tokenizer, [helpers.chat("The capital of Spain is the city of")])
    assert clean["input_ids"].shape == corrupt["input_ids"].shape
    assert (clean["input_ids"] != corrupt["input_ids"]).sum() == 1
    return clean, corrupt


def test_attribution_patching_is_gradient_times_difference_and_tracks_real_patching(pair, clean_corrupt):
    ours, _ = pair
    clean, corrupt = clean_corrupt
    top = lambda inputs: int(np.asarray(ours(**inputs).logits)[0, -1].argmax())
    tokens = (top(clean), top(corrupt))
    assert tokens[0] != tokens[1]
    metric = _jax_metric(tokens)
    resid = [f"text.layers.{i}.resid_post" for i in range(N_LAYERS)]
    head = "text.layers.1.attn.head_out"
    elementwise = G.attribution_patching(ours, clean, corrupt, metric, ["text.layers.*.resid_post", head], per=None)
    assert list(elementwise) == [*resid, head]

    # gradient x (clean - corrupt), from gradients_at on the corrupt run and the two runs' cached values
    _, grads = G.gradients_at(ours, [*resid, head], metric, **corrupt)
    _, clean_cache = hooks.run_with_cache(ours, [*resid, head], **clean)
    _, corrupt_cache = hooks.run_with_cache(ours, [*resid, head], **corrupt)
    for name in [*resid, head]:
        want = np.asarray(grads[name]) * (np.asarray(clean_cache[name]) - np.asarray(corrupt_cache[name]))
        np.testing.assert_allclose(elementwise[name], want, rtol=1e-5, atol=1e-7, err_msg=name)
    # the reductions: per position sums batch and features; per head / (position, head) for head outputs
    per_position = G.attribution_patching(ours, clean, corrupt, metric, "text.layers.*.resid_post")
    for name in resid:
        np.testing.assert_allclose(per_position[name], elementwise[name].sum(axis=(0, 2)), rtol=1e-6, atol=1e-9)
    e = elementwise[head]
    np.testing.assert_allclose(G.reduce_per(ours, head, e, "head"), e.sum(axis=(0, 1, 3)), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(G.reduce_per(ours, head, e, "position_head"), e.sum(axis=(0, 3)), rtol=1e-6,
                               atol=1e-9)

    # against real activation patching of every (layer, position)
    real = G.patch_each(ours, clean, corrupt, metric, "text.layers.*.resid_post")
    T = clean["input_ids"].shape[1]
    est_LT = np.stack([per_position[n] for n in resid])
    real_LT = np.stack([real[n] for n in resid])
    assert est_LT.shape == real_LT.shape == (N_LAYERS, T)
    assert (np.abs(real_LT) > 1e-3).sum() >= 5  # the effects are not all zero
    pearson = float(np.corrcoef(est_LT.ravel(), real_LT.ravel())[0, 1])
    pearson_but_last = float(np.corrcoef(est_LT[:, :-1].ravel(), real_LT[:, :-1].ravel())[0, 1])
    print(f"attribution patching vs real patching over {N_LAYERS} layers x {T} positions: Pearson {pearson:.4f} "
          f"({pearson_but_last:.4f} without the last position)")
    helpers.record("hooks/attribution_patching/pearson", pearson=pearson, pearson_but_last=pearson_but_last)
    assert pearson >= 0.9
    # before the differing word the two runs are equal: nothing to patch, both exactly zero
    first = int(np.nonzero(clean["input_ids"][0] != corrupt["input_ids"][0])[0][0])
    assert (est_LT[:, :first] == 0).all() and (real_LT[:, :first] == 0).all()


# --------------------------------------------------------------------------------------------------- compiles
def test_a_second_call_with_the_same_names_and_shapes_compiles_nothing(pair, clean_corrupt):
    ours, _ = pair
    clean, corrupt = clean_corrupt
    names = ["text.layers.0.mlp_out", "text.embed"]  # a set no other test differentiates: a new program
    before = G.compiles()["gradients"]
    _, first = G.gradients_at(ours, names, _jax_metric((5, 6)), **clean)
    assert G.compiles()["gradients"] == before + 1  # the counter moves when a program is compiled
    # other tokens (traced Partial arguments) and another input of the same shape: the same program
    _, second = G.gradients_at(ours, names, _jax_metric((7, 8)), **corrupt)
    assert G.compiles()["gradients"] == before + 1
    assert np.abs(np.asarray(first["text.embed"]) - np.asarray(second["text.embed"])).max() > 0  # it did run


def test_bad_names_and_metrics_fail_clearly(pair, clean_corrupt):
    ours, _ = pair
    clean, corrupt = clean_corrupt
    with pytest.raises(HookError, match="'text.layer.0.resid_post' matches no hook point"):
        G.gradients_at(ours, "text.layer.0.resid_post", _jax_metric((1, 2)), **clean)
    with pytest.raises(HookError, match="real scalar"):
        G.gradients_at(ours, "logits", lambda out: out.logits[0, -1], **clean)
    with pytest.raises(TypeError, match="unexpected inputs"):
        G.gradients_at(ours, "logits", _jax_metric((1, 2)), max_new_tokens=3, **clean)
    with pytest.raises(HookError, match="no head axis"):
        G.reduce_per(ours, "text.layers.0.resid_post", np.zeros((1, 3, 64)), "head")
    short = {k: v[:, :-1] for k, v in corrupt.items()}
    with pytest.raises(HookError, match="one shape"):
        G.attribution_patching(ours, clean, short, _jax_metric((1, 2)), "text.layers.0.resid_post")
