"""Hook points, run_with_cache / run_with_hooks and the ready interventions, against transformers (eager, fp32).

The oracle for recorded values is transformers 4.57 itself: torch forward hooks on its modules (decoder layers,
self_attn, o_proj, mlp, down_proj; vision blocks, attn, proj, mlp, fc2, merger) and, for q / k after the rotary and
the vision probabilities, transformers' own `apply_multimodal_rotary_pos_emb` / `apply_rotary_pos_emb_vision` on
the inputs its modules received.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import helpers
from qwen2vl_jax import Qwen2VLForConditionalGeneration, hooks
from qwen2vl_jax.generation.decoding import generate
from qwen2vl_jax.hooks import interventions as iv
from qwen2vl_jax.modeling import programs
from qwen2vl_jax.modeling.hook_points import HookError, HookSet, make_hookset

TOL = 1e-5


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint), helpers.load_hf_model(tiny_checkpoint)


def _torch_inputs(inputs):
    return {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}


# ------------------------------------------------------------------------------------- transformers' values
def _hf_record(hf, inputs) -> tuple[dict, np.ndarray]:
    """Every hook point's value from transformers, by our names, plus its logits."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl as ref

    got: dict[str, np.ndarray] = {}
    handles = []
    cfg = hf.config

    def keep(name, tensor):
        value = tensor.detach().float().numpy().copy()
        if name.startswith("vision.") and name in got:  # images and videos go through the tower in two calls
            value = np.concatenate([got[name], value])
        got[name] = value

    def on_output(name, first=True):
        return lambda mod, args, out: keep(name, out[0] if first and isinstance(out, tuple) else out)

    def on_input(name):
        return lambda mod, args: keep(name, args[0])

    for i, layer in enumerate(hf.model.language_model.layers):
        p = f"text.layers.{i}"

        def text_attn_inputs(mod, args, kwargs, p=p):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            B, T, _ = h.shape
            H = mod.head_dim
            q = mod.q_proj(h).view(B, T, -1, H).transpose(1, 2)
            k = mod.k_proj(h).view(B, T, -1, H).transpose(1, 2)
            v = mod.v_proj(h).view(B, T, -1, H)
            cos, sin = kwargs["position_embeddings"]
            q, k = ref.apply_multimodal_rotary_pos_emb(q, k, cos, sin, cfg.rope_scaling["mrope_section"])
            keep(f"{p}.attn.q", q.transpose(1, 2))
            keep(f"{p}.attn.k", k.transpose(1, 2))
            keep(f"{p}.attn.v", v)

        def layer_input(mod, args, kwargs, p=p):
            keep(f"{p}.resid_pre", kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

        handles += [
            layer.register_forward_pre_hook(layer_input, with_kwargs=True),
            layer.register_forward_hook(on_output(f"{p}.resid_post")),
            layer.self_attn.register_forward_pre_hook(text_attn_inputs, with_kwargs=True),
            layer.self_attn.register_forward_hook(on_output(f"{p}.attn_out")),
            layer.self_attn.register_forward_hook(lambda m, a, out, p=p: keep(f"{p}.attn.probs", out[1])),
            layer.self_attn.o_proj.register_forward_pre_hook(on_input(f"{p}.attn.head_out")),
            layer.mlp.register_forward_hook(on_output(f"{p}.mlp_out", first=False)),
            layer.mlp.down_proj.register_forward_pre_hook(on_input(f"{p}.mlp.act")),
        ]
    visual = hf.model.visual
    handles.append(visual.patch_embed.register_forward_hook(on_output("vision.patch_embed", first=False)))
    handles.append(visual.merger.register_forward_hook(on_output("vision.merger.out", first=False)))
    for i, block in enumerate(visual.blocks):
        p = f"vision.blocks.{i}"

        def vision_attn_inputs(mod, args, kwargs, p=p):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            L = h.shape[0]
            q, k, v = mod.qkv(h).reshape(L, 3, mod.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            cos, sin = kwargs["position_embeddings"]
            q, k = ref.apply_rotary_pos_emb_vision(q, k, cos, sin)
            keep(f"{p}.attn.q", q)
            keep(f"{p}.attn.k", k)
            keep(f"{p}.attn.v", v)
            cu = kwargs["cu_seqlens"].tolist()
            probs = []
            for a, b in zip(cu[:-1], cu[1:]):
                s = torch.einsum("lnh,mnh->nlm", q[a:b].float(), k[a:b].float()) * mod.scaling
                probs.append(torch.softmax(s, dim=-1).numpy())
            got[f"{p}.attn.probs"] = got.get(f"{p}.attn.probs", ()) + tuple(probs)

        def block_input(mod, args, kwargs, p=p):
            keep(f"{p}.resid_pre", kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])

        handles += [
            block.register_forward_pre_hook(block_input, with_kwargs=True),
            block.register_forward_hook(on_output(f"{p}.resid_post", first=False)),
            block.attn.register_forward_pre_hook(vision_attn_inputs, with_kwargs=True),
            block.attn.register_forward_hook(on_output(f"{p}.attn_out", first=False)),
            block.attn.proj.register_forward_pre_hook(on_input(f"{p}.attn.head_out")),
            block.mlp.register_forward_hook(on_output(f"{p}.mlp_out", first=False)),
            block.mlp.fc2.register_forward_pre_hook(on_input(f"{p}.mlp.act")),
        ]
    try:
        with torch.no_grad():
            out = hf(**_torch_inputs(inputs), output_hidden_states=True, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    got["text.embed"] = out.hidden_states[0].numpy()
    got["text.final_norm"] = out.hidden_states[-1].numpy()
    got["logits"] = out.logits.numpy()
    for prefix in [f"text.layers.{i}" for i in range(cfg.num_hidden_layers)] + [
            f"vision.blocks.{i}" for i in range(cfg.vision_config.depth)]:
        if f"{prefix}.resid_pre" in got:  # the reference adds the attention output to its input (same fp32 op)
            got[f"{prefix}.resid_mid"] = got[f"{prefix}.resid_pre"] + got[f"{prefix}.attn_out"]
    return got, out.logits.numpy()


def _check_recorded(ours, hf, inputs, tag):
    ref, _ = _hf_record(hf, inputs)
    out, cache = hooks.run_with_cache(ours, None, **inputs)
    names = hooks.list_hook_points(ours)
    assert sorted(cache) == sorted(names)
    assert set(ref) == set(names), set(names) ^ set(ref)  # the oracle covers every point
    mask = inputs["attention_mask"].astype(bool)
    worst = {}
    for name in names:
        got, want = cache[name], ref[name]
        if name.endswith("head_out"):  # the reference's projection input: heads flattened
            got = np.asarray(got).reshape(want.shape)
        if name.endswith("attn.probs") and name.startswith("vision."):
            assert len(got) == len(want)  # one [N, L, L] per segment (temporal slice)
            for g, w in zip(got, want, strict=True):
                assert np.asarray(g).shape == w.shape
                np.testing.assert_allclose(np.asarray(g).sum(-1), 1.0, atol=1e-5)
            err = max(helpers.rel_err(g, w) for g, w in zip(got, want, strict=True))
        elif name.startswith("vision."):
            err = helpers.rel_err(got, want)
        elif name.endswith("attn.probs"):  # [B, N, T, S]: real query rows
            err = helpers.rel_err(np.asarray(got).transpose(0, 2, 1, 3)[mask], want.transpose(0, 2, 1, 3)[mask])
        else:  # [B, T, ...]: real tokens (padding rows hold garbage in both)
            err = helpers.rel_err(np.asarray(got)[mask], want[mask])
        worst[name] = err
    bad = {n: e for n, e in worst.items() if e > TOL}
    helpers.record(f"hooks/recorded/{tag}", max_rel_err=max(worst.values()), points=len(worst))
    assert not bad, bad
    assert helpers.rel_err(np.asarray(out.logits)[mask], ref["logits"][mask]) <= TOL


@pytest.mark.parametrize("case", ["one_photo", "video", "left_padded_batch"])
def test_recorded_values_match_transformers(pair, hf_tokenizer, photos, case):
    ours, hf = pair
    _check_recorded(ours, hf, helpers.parity_inputs(hf_tokenizer, photos, case), case)


def test_recorded_values_on_the_xla_backend(pair, tiny_checkpoint, hf_tokenizer, photos):
    """The path accelerators run: every attention in the `xla` formulation (unhooked blocks too)."""
    _, hf = pair
    ours = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="xla")
    _check_recorded(ours, hf, helpers.parity_inputs(hf_tokenizer, photos, "image_and_video"), "image_and_video/xla")


# ------------------------------------------------------------------------------------------- free when unused
def _lowered_forward(model, prep, hookset):
    return programs.forward.lower(model, prep.input_ids_BT, prep.attention_mask_BT, prep.position_ids_ZBT,
                                  None, None, None, hookset).as_text()


def test_unhooked_and_identity_hooked_programs_are_the_plain_program(pair, hf_tokenizer):
    ours, _ = pair
    prep = ours.prepare_inputs(np.asarray(hf_tokenizer("A cat sat on the mat.")["input_ids"]))
    plain = _lowered_forward(ours, prep, None)
    assert _lowered_forward(ours, prep, HookSet()) == plain
    # identity hooks everywhere a hook does not change which attention runs: the very same program
    cheap = [n for n in hooks.list_hook_points(ours) if n.startswith("text.") or n == "logits"]
    cheap = [n for n in cheap if not n.endswith(("attn.probs",))]
    ident = make_hookset(ours.config, {n: (lambda v, ctx: v) for n in cheap})
    assert _lowered_forward(ours, prep, ident) == plain
    # and a real edit does change it (the comparison can fail)
    edit = make_hookset(ours.config, {"text.layers.0.resid_post": lambda v, ctx: v * 2})
    assert _lowered_forward(ours, prep, edit) != plain


def test_identity_hooks_on_every_point_leave_logits_and_tokens(pair, hf_tokenizer, photos):
    ours, _ = pair
    inputs = helpers.parity_inputs(hf_tokenizer, photos, "left_padded_batch")
    every = {n: (lambda v, ctx: v) for n in hooks.list_hook_points(ours)}
    plain = np.asarray(ours(**inputs).logits)
    hooked = np.asarray(hooks.run_with_hooks(ours, every, **inputs).logits)
    mask = inputs["attention_mask"].astype(bool)
    # probabilities and vision q/k/v hooked run the attention in the xla formulation: same math, other kernels
    assert helpers.rel_err(hooked[mask], plain[mask]) <= 1e-6
    gen = dict(max_new_tokens=12, do_sample=False, repetition_penalty=1.0)
    want = ours.generate(**inputs, **gen)
    got = hooks.run_with_hooks(ours, every, generate=True, **inputs, **gen).sequences
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------------------------- head ablation
def _hf_logits(hf, inputs):
    with torch.no_grad():
        return hf(**_torch_inputs(inputs)).logits.numpy()


@pytest.mark.parametrize("tower, layer, head", [("text", 1, 2), pytest.param("text", 0, 0, marks=pytest.mark.slow),
                                                ("vision", 1, 1)])
def test_zero_head_ablation_equals_zeroed_projection_columns(pair, hf_tokenizer, photos, tower, layer, head):
    ours, hf = pair
    inputs = helpers.parity_inputs(hf_tokenizer, photos, "one_photo")
    got = np.asarray(hooks.run_with_hooks(ours, iv.ablate_heads(ours, {layer: [head]}, tower=tower), **inputs).logits)
    if tower == "text":
        proj, H = hf.model.language_model.layers[layer].self_attn.o_proj, hf.config.hidden_size // 4
    else:
        proj, H = hf.model.visual.blocks[layer].attn.proj, hf.config.vision_config.embed_dim // 2
    saved = proj.weight.detach().clone()
    try:
        with torch.no_grad():
            proj.weight[:, head * H:(head + 1) * H] = 0
        want = _hf_logits(hf, inputs)
    finally:
        with torch.no_grad():
            proj.weight.copy_(saved)
    plain = _hf_logits(hf, inputs)
    helpers.record(f"hooks/zero_ablation/{tower}/layer{layer}/head{head}", rel_err=helpers.rel_err(got, want))
    assert helpers.rel_err(got, want) <= TOL
    assert helpers.rel_err(got, plain) > 1e-3  # the ablation did something


@pytest.mark.parametrize("tower, layer, head", [("text", 1, 3), ("vision", 0, 1)])
def test_mean_head_ablation_matches_transformers(pair, hf_tokenizer, photos, tower, layer, head):
    ours, hf = pair
    inputs = helpers.parity_inputs(hf_tokenizer, photos, "one_photo")
    ablation = iv.ablate_heads(ours, {layer: [head]}, tower=tower, mode="mean")
    got = np.asarray(hooks.run_with_hooks(ours, ablation, **inputs).logits)
    if tower == "text":
        proj, H = hf.model.language_model.layers[layer].self_attn.o_proj, ours.config.text_config.head_dim
    else:
        proj, H = hf.model.visual.blocks[layer].attn.proj, ours.config.vision_config.head_dim

    def replace_with_mean(mod, args):  # over every real row: one prompt, one image (no padding rows in either)
        x = args[0].clone()
        cols = slice(head * H, (head + 1) * H)
        x[..., cols] = x[..., cols].reshape(-1, H).mean(0)
        return (x,)

    handle = proj.register_forward_pre_hook(replace_with_mean)
    try:
        want = _hf_logits(hf, inputs)
    finally:
        handle.remove()
    helpers.record(f"hooks/mean_ablation/{tower}/layer{layer}/head{head}", rel_err=helpers.rel_err(got, want))
    assert helpers.rel_err(got, want) <= TOL
    assert helpers.rel_err(got, _hf_logits(hf, inputs)) > 1e-4  # the ablation did something
    # the same through means measured on a reference input (here: the same input)
    means = iv.mean_head_outputs(ours, [layer], tower=tower, **inputs)
    fixed = hooks.run_with_hooks(ours, iv.ablate_heads(ours, {layer: [head]}, tower=tower, mode="mean", means=means),
                                 **inputs)
    assert helpers.rel_err(fixed.logits, got) <= 1e-6


# --------------------------------------------------------------------------------------------- activation patching
def _same_shape_pair(processor_inputs, photos):
    a = processor_inputs(photos["astronaut"])
    b = processor_inputs(photos["coffee"].resize(photos["astronaut"].size))
    assert a["input_ids"].shape == b["input_ids"].shape
    return a, b


@pytest.fixture(scope="module")
def ab_inputs(hf_tokenizer, photos):
    make = lambda photo: helpers.hf_inputs(hf_tokenizer, [helpers.chat("What is in this picture?", 1)], images=[photo])
    return _same_shape_pair(make, photos)


@pytest.mark.parametrize("layer", [0, 1])
def test_patching_every_position_gives_the_source_logits(pair, ab_inputs, layer):
    ours, _ = pair
    a, b = ab_inputs
    name = f"text.layers.{layer}.resid_post"
    out_a, cache_a = hooks.run_with_cache(ours, [name], **a)
    logits_b = np.asarray(ours(**b).logits)
    assert helpers.rel_err(out_a.logits, logits_b) > 1e-2  # the two inputs really differ
    patched = np.asarray(hooks.run_with_hooks(ours, iv.patch(cache_a, [name]), **b).logits)
    np.testing.assert_array_equal(patched, np.asarray(out_a.logits))
    nothing = np.zeros(b["input_ids"].shape[1], bool)
    unpatched = np.asarray(hooks.run_with_hooks(ours, iv.patch(cache_a, [name], positions=nothing), **b).logits)
    np.testing.assert_array_equal(unpatched, logits_b)


def test_patching_one_position_of_the_last_layer_changes_only_that_position(pair, ab_inputs):
    ours, _ = pair
    a, b = ab_inputs
    name = "text.layers.1.resid_post"
    _, cache_a = hooks.run_with_cache(ours, [name], **a)
    base = np.asarray(ours(**b).logits)
    p = 20
    got = np.asarray(hooks.run_with_hooks(ours, iv.patch(cache_a, [name], positions=[p]), **b).logits)
    changed = np.abs(got - base).max(-1)[0] > 0
    assert changed.tolist() == [t == p for t in range(base.shape[1])]


def test_activation_patching_sweep(pair, ab_inputs):
    ours, _ = pair
    a, b = ab_inputs
    T = a["input_ids"].shape[1]
    before = programs.compiles()["forward"]
    grid = iv.activation_patching(ours, a, b, layers=[1], positions=[T - 1, T - 2])
    assert programs.compiles()["forward"] - before <= 2  # the source run + one program for the sweep
    out_a = np.asarray(ours(**a).logits)[0, -1]
    # patching the last layer at the last position recovers the source's prediction exactly
    want = float(jax.nn.log_softmax(jnp.asarray(out_a))[int(out_a.argmax())])
    assert grid.shape == (1, 2) and abs(grid[0, 0] - want) < 1e-5
    assert grid[0, 1] != grid[0, 0]


# ------------------------------------------------------------------------------------------- steering, generation
def test_steering_adds_the_vector_and_reuses_the_program(pair, hf_tokenizer):
    ours, _ = pair
    ids = np.asarray(hf_tokenizer("The weather today is")["input_ids"])[None]
    D = ours.config.text_config.hidden_size
    rng = np.random.default_rng(0)
    v1, v2 = rng.standard_normal(D).astype(np.float32), rng.standard_normal(D).astype(np.float32)
    _, base = hooks.run_with_cache(ours, ["text.layers.0.resid_post"], input_ids=ids)
    _, steered = hooks.run_with_cache(ours, ["text.layers.0.resid_post"], hooks=iv.steer({0: v1}, scale=3.0),
                                      input_ids=ids)
    np.testing.assert_allclose(steered["text.layers.0.resid_post"], base["text.layers.0.resid_post"] + 3.0 * v1,
                               atol=1e-5)
    first = np.asarray(hooks.run_with_hooks(ours, iv.steer({0: v1}), input_ids=ids).logits)
    before = programs.compiles()["forward"]
    second = np.asarray(hooks.run_with_hooks(ours, iv.steer({0: v2}, scale=-1.0), input_ids=ids).logits)
    assert programs.compiles()["forward"] == before  # a new vector and scale: same compiled program
    assert np.abs(first - second).max() > 1e-3  # ... which did use the new vector
    hooks.run_with_hooks(ours, iv.steer({1: v2}), input_ids=ids)
    assert programs.compiles()["forward"] == before + 1  # another hooked point: a new program
    # positions: only token 2 moves
    _, one = hooks.run_with_cache(ours, ["text.layers.0.resid_post"], hooks=iv.steer({0: v1}, positions=[2]),
                                  input_ids=ids)
    moved = np.abs(one["text.layers.0.resid_post"] - base["text.layers.0.resid_post"]).max(-1)[0] > 0
    assert moved.tolist() == [t == 2 for t in range(ids.shape[1])]


def test_a_hook_on_one_decode_step_changes_generation_from_that_step_on(pair, hf_tokenizer, photos):
    ours, _ = pair
    inputs = helpers.parity_inputs(hf_tokenizer, photos, "one_photo")
    gen = dict(max_new_tokens=10, do_sample=False, repetition_penalty=1.0, output_logits=True)
    k = 4
    kick = np.random.default_rng(1).standard_normal(ours.config.text_config.hidden_size).astype(np.float32) * 50

    def at_step_k(value, ctx):
        return jnp.where(ctx.step == k, value + kick, value)

    plain = ours.generate(**inputs, **gen)
    edited = hooks.run_with_hooks(ours, {"text.layers.1.resid_post": at_step_k}, generate=True, **inputs, **gen)
    # generate's own `hooks=` does the same and records nothing unless asked
    direct = generate(ours, **inputs, **gen, hooks={"text.layers.1.resid_post": at_step_k})
    assert direct.records is None
    np.testing.assert_array_equal(direct.sequences, edited.sequences)
    T = inputs["input_ids"].shape[1]
    np.testing.assert_array_equal(edited.sequences[:, :T + k], plain.sequences[:, :T + k])
    np.testing.assert_array_equal(edited.logits[:, :k], plain.logits[:, :k])
    assert np.abs(edited.logits[:, k] - plain.logits[:, k]).max() > 1.0
    assert (edited.sequences[:, T + k] != plain.sequences[:, T + k]).all()


def test_records_inside_generate_equal_one_forward_over_the_output(pair, hf_tokenizer, photos):
    ours, _ = pair
    inputs = helpers.parity_inputs(hf_tokenizer, photos, "left_padded_batch")
    names = ["text.layers.0.resid_post", "text.layers.1.attn.probs", "text.layers.1.mlp.act", "vision.merger.out"]
    gen = dict(max_new_tokens=6, do_sample=False, repetition_penalty=1.0, min_new_tokens=6)
    out, rec = hooks.run_with_cache(ours, names, generate=True, **inputs, **gen)
    seq = out.sequences[:, :-1]
    mask = np.concatenate([inputs["attention_mask"], np.ones((seq.shape[0], 5), np.int64)], axis=1)
    full_inputs = {**inputs, "input_ids": seq, "attention_mask": mask}
    _, want = hooks.run_with_cache(ours, names, **full_inputs)
    m = mask.astype(bool)
    for name in names:
        got, ref = np.asarray(rec[name]), np.asarray(want[name])
        assert got.shape == ref.shape, name
        if name.startswith("text.") and not name.endswith("probs"):
            got, ref = got[m], ref[m]
        elif name.endswith("probs"):
            got, ref = got.transpose(0, 2, 1, 3)[m], ref.transpose(0, 2, 1, 3)[m]
        assert helpers.rel_err(got, ref) <= 1e-5, name


# ---------------------------------------------------------------------------------------------------- logit lens
def test_logit_lens_last_row_is_the_model_logits(pair, hf_tokenizer, photos):
    ours, _ = pair
    inputs = helpers.parity_inputs(hf_tokenizer, photos, "one_photo")
    lens = iv.logit_lens(ours, positions=[-4, -3, -2, -1], **inputs)
    L = ours.config.text_config.num_hidden_layers
    assert lens.layers == ["embed"] + [f"text.layers.{i}.resid_post" for i in range(L)]
    logits = np.asarray(ours(**inputs).logits)[:, -4:]
    assert lens.logits_LBPV.shape == (L + 1, *logits.shape)
    assert helpers.rel_err(lens.logits_LBPV[-1], logits) <= 1e-6
    assert helpers.rel_err(lens.logits_LBPV[0], logits) > 0.1  # the embedding row is not the answer
    ids, probs = lens.top_k(5)
    assert ids.shape == (L + 1, 1, logits.shape[1], 5) and (np.diff(probs, axis=-1) <= 0).all()
    assert (ids[-1, 0, :, 0] == logits[0].argmax(-1)).all()


# --------------------------------------------------------------------------------------------------------- errors
def test_bad_hooks_fail_with_one_clear_error(pair, hf_tokenizer):
    ours, _ = pair
    ids = np.asarray(hf_tokenizer("Hello there")["input_ids"])[None]
    with pytest.raises(HookError, match=r"'text.layer.0.resid_post' matches no hook point.*close"):
        hooks.run_with_hooks(ours, {"text.layer.0.resid_post": lambda v, c: v}, input_ids=ids)
    with pytest.raises(HookError, match=r"'text.layers.0.mlp_out' returned shape \(1, 3, 64\).*\(1, 3, 64\)|"
                                        r"text.layers.0.mlp_out.*returned shape"):
        hooks.run_with_hooks(ours, {"text.layers.0.mlp_out": lambda v, c: v[:, :1]}, input_ids=ids)
    with pytest.raises(HookError, match="returned None"):
        hooks.run_with_hooks(ours, {"logits": lambda v, c: None}, input_ids=ids)
    with pytest.raises(HookError, match="at least one hook"):
        hooks.run_with_hooks(ours, {}, input_ids=ids)
    with pytest.raises(HookError, match="12 layers|2 layers of 4 heads"):
        iv.ablate_heads(ours, {0: [7]})
    with pytest.raises(TypeError, match="generate=True"):
        hooks.run_with_cache(ours, "logits", input_ids=ids, max_new_tokens=3)
