"""Direct logit attribution (`qwen2vl_jax.interventions`) on the tiny random checkpoints of both families
(Qwen2-VL with its own LM head, Qwen2.5-VL tied to the embedding), fp32, a prompt with a real photo.

The checks: the components sum to the model's own logit (a token, a difference, a direction); a layer's heads sum
to its attention term and a head's key positions to the head; the residual decomposition's partial sums are
transformers' hidden states (the oracle: `output_hidden_states`, eager fp32); the image heatmap has the photo's
token grid and sums to the image tokens' contribution.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import helpers
from qwen2vl_jax import Qwen2VLForConditionalGeneration, hooks
from qwen2vl_jax.hooks.interventions import logit_attribution as la
from qwen2vl_jax.modeling.hook_points import HookError
from qwen2vl_jax.processing.processor import Qwen2VLProcessor

TOL = 1e-5
MAX_PIXELS = 36 * 28 * 28  # the astronaut as 6 x 6 merged tokens


@dataclasses.dataclass
class Run:
    family: str
    model: object
    processor: object
    inputs: dict
    cache: dict  # every attribution point (all layers' probs / v too) and text.final_norm, from one forward
    logits_TV: np.ndarray  # the model's own logits (a plain forward), row 0
    path: object


_RUNS: dict[str, Run] = {}


def _run(family: str, path, photos) -> Run:
    """One family's model, inputs and cache, built once per module (both fixtures share them)."""
    if family not in _RUNS:
        model = Qwen2VLForConditionalGeneration.from_pretrained(path)
        assert (model.lm_head is None) == (family == "qwen25")  # untied / tied
        processor = Qwen2VLProcessor.from_pretrained(path, max_pixels=MAX_PIXELS)
        inputs = dict(processor(text=[helpers.chat("What is in this picture?", 1)], images=[photos["astronaut"]]))
        L = model.config.text_config.num_hidden_layers
        points = la.attribution_points(model, range(L)) + ["text.final_norm"]
        _, cache = hooks.run_with_cache(model, points, **inputs)
        logits_TV = np.asarray(model(**inputs).logits[0], np.float64)
        _RUNS[family] = Run(family, model, processor, inputs, cache, logits_TV, path)
    return _RUNS[family]


@pytest.fixture(scope="module", params=["qwen2", "qwen25"])
def run(request, tiny_checkpoint, tiny25_checkpoint, photos) -> Run:
    return _run(request.param, tiny_checkpoint if request.param == "qwen2" else tiny25_checkpoint, photos)


@pytest.fixture(scope="module")
def qwen2_run(tiny_checkpoint, photos) -> Run:
    """Qwen2-VL only: the checks that need one family (each hooked point set is a compile)."""
    yield _run("qwen2", tiny_checkpoint, photos)
    _RUNS.clear()


def _main_terms(attr: dict) -> dict:
    return {k: v for k, v in attr.items() if k == "embed" or k.endswith(("attn_out", "mlp_out"))}


def _err(got: float, want: float, terms) -> float:
    """|got - want| relative to the largest of |want| and the summed terms' magnitudes (a sum of large terms that
    cancel has that term's rounding, not the small result's)."""
    return abs(got - want) / max(abs(want), *(abs(t) for t in terms), 1e-30)


# ------------------------------------------------------------------------------------------- sums to the logit
def test_components_sum_to_the_logit(run):
    model, cache, logits_TV = run.model, run.cache, run.logits_TV
    a, b = int(logits_TV[-1].argmax()), int(logits_TV[-1].argmin())
    errs = {}
    for position in (-1, -3):
        attr = la.direct_logit_attribution(model, a, position, cache=cache, **run.inputs)
        main = _main_terms(attr)
        L = model.config.text_config.num_hidden_layers
        assert list(main) == ["embed"] + [f"text.layers.{i}.{p}" for i in range(L) for p in ("attn_out", "mlp_out")]
        errs[f"token/pos{position}"] = _err(sum(main.values()), logits_TV[position, a], main.values())
    # a logit difference: the pair, and the same as a direction (the difference of the two unembedding rows)
    diff = _main_terms(la.direct_logit_attribution(model, (a, b), cache=cache, **run.inputs))
    errs["difference"] = _err(sum(diff.values()), logits_TV[-1, a] - logits_TV[-1, b], diff.values())
    head = run.model.lm_head if run.model.lm_head is not None else run.model.language_model.embed_tokens
    w_U = np.asarray(head.weight[...], np.float64)
    as_direction = la.direct_logit_attribution(model, direction=w_U[a] - w_U[b], cache=cache)
    assert max(abs(as_direction[k] - v) for k, v in diff.items()) <= 1e-12 * max(abs(v) for v in diff.values())
    # any direction u in the LM head's input space: u . final_norm(x)
    u_D = np.random.default_rng(0).standard_normal(w_U.shape[1])
    along = _main_terms(la.direct_logit_attribution(model, direction=u_D, cache=cache))
    errs["direction"] = _err(sum(along.values()), float(np.asarray(cache["text.final_norm"][0, -1]) @ u_D),
                             along.values())
    helpers.record(f"hooks/logit_attribution/sum/{run.family}", max_rel_err=max(errs.values()))
    assert max(errs.values()) <= TOL, errs
    assert abs(diff["embed"]) > 0 and len({round(v, 6) for v in diff.values()}) > 3  # real, distinct terms


def test_one_forward_without_a_cache_gives_the_same_attribution(qwen2_run):
    run = qwen2_run
    a = int(run.logits_TV[-1].argmax())
    got = la.direct_logit_attribution(run.model, a, **run.inputs)  # runs its own forward (no probs: other kernel)
    want = la.direct_logit_attribution(run.model, a, cache=run.cache)
    assert list(got) == list(want)
    scale = max(abs(v) for v in want.values())
    assert max(abs(got[k] - want[k]) for k in want) <= TOL * scale


# ------------------------------------------------------------------------------------- heads and key positions
def test_heads_sum_to_their_layer_and_key_positions_to_their_head(run):
    model, cache = run.model, run.cache
    L, N = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    a = int(run.logits_TV[-1].argmax())
    attr = la.direct_logit_attribution(model, a, cache=cache)
    assert not any(k.endswith("attn.bias") for k in attr)  # Qwen2's o_proj has no bias
    errs = {}
    for i in range(L):
        heads = [attr[f"text.layers.{i}.attn.head.{n}"] for n in range(N)]
        errs[f"layer{i}/heads"] = _err(sum(heads), attr[f"text.layers.{i}.attn_out"], heads)
        layer_S = la.source_attribution(model, a, layer=i, cache=cache)
        errs[f"layer{i}/keys"] = _err(layer_S.sum(), attr[f"text.layers.{i}.attn_out"], heads)
        for n in range(N):
            head_S = la.source_attribution(model, a, layer=i, head=n, cache=cache)
            assert head_S.shape == (run.inputs["input_ids"].shape[1],)
            errs[f"layer{i}/head{n}/keys"] = _err(head_S.sum(), heads[n], [heads[n], *np.abs(head_S)])
    every_S = la.source_attribution(model, a, cache=cache)
    attn = [attr[f"text.layers.{i}.attn_out"] for i in range(L)]
    errs["all/keys"] = _err(every_S.sum(), sum(attn), attn)
    helpers.record(f"hooks/logit_attribution/heads_and_keys/{run.family}", max_rel_err=max(errs.values()))
    assert max(errs.values()) <= TOL, errs
    # a later key never contributes to an earlier query (causal): the split is over real keys only
    assert not la.source_attribution(model, a, -5, layer=0, head=0, cache=cache)[-4:].any()


def test_the_weights_the_forward_uses_bias_quantized_and_adapted(tiny_checkpoint, qwen2_run):
    """Qwen2's o_proj has no bias; given one it is its own term (`attn.bias`: heads + bias sum to `attn_out`).
    int4 o_proj / lm_head weights are read dequantized, and a LoRA adapter on o_proj adds `scaling * B @ A`."""
    run = qwen2_run
    import jax.numpy as jnp
    from flax import nnx

    from qwen2vl_jax.lora import apply_lora
    from qwen2vl_jax.quantization.apply import quantize

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    rng = np.random.default_rng(1)
    D, N = model.config.text_config.hidden_size, model.config.text_config.num_attention_heads
    o_proj = model.language_model.layers[1].self_attn.o_proj
    o_proj.bias = nnx.data(nnx.Param(jnp.asarray(0.5 * rng.standard_normal(D), jnp.float32)))
    quantize(model, "int4", targets=r"o_proj$|^lm_head$", group=32)
    for lin in apply_lora(model, rank=2, target_modules=["o_proj"]).values():
        lin.lora.lora_B.set_value(jnp.asarray(0.2 * rng.standard_normal(lin.lora.lora_B.shape), jnp.float32))
    assert o_proj.scale is not None and model.lm_head.scale is not None and o_proj.lora is not None
    a = int(run.logits_TV[-1].argmax())
    attr = la.direct_logit_attribution(model, a, **run.inputs)
    logit = float(np.asarray(model(**run.inputs).logits[0, -1, a]))
    assert abs(logit - run.logits_TV[-1, a]) > 1e-3  # the changes changed the model
    main = _main_terms(attr)
    errs = {"logit": _err(sum(main.values()), logit, main.values())}
    for i in (0, 1):
        parts = [attr[f"text.layers.{i}.attn.head.{n}"] for n in range(N)] + [attr.get(f"text.layers.{i}.attn.bias", 0)]
        errs[f"layer{i}"] = _err(sum(parts), attr[f"text.layers.{i}.attn_out"], parts)
    helpers.record("hooks/logit_attribution/bias_int4_lora", max_rel_err=max(errs.values()))
    assert max(errs.values()) <= TOL, errs
    assert abs(attr["text.layers.1.attn.bias"]) > 1e-3 and "text.layers.0.attn.bias" not in attr


# -------------------------------------------------------------------------------------- against transformers
def test_residual_partial_sums_are_transformers_hidden_states(run):
    model, cache = run.model, run.cache
    hf = (helpers.load_hf_model if run.family == "qwen2" else helpers.load_hf_model_25)(run.path)
    with torch.no_grad():
        out = hf(**{k: torch.from_numpy(np.asarray(v)) for k, v in run.inputs.items()}, output_hidden_states=True)
    hidden = [h[0].numpy() for h in out.hidden_states]  # embeddings, after layers 0..L-2, then the final norm's
    L = model.config.text_config.num_hidden_layers
    errs = {}
    for position in (-1, 10):
        names, parts_CD = la.decompose_resid(model, position, cache=cache)
        assert names[0] == "embed" and len(names) == 1 + 2 * L
        partial_CD = np.cumsum(parts_CD, axis=0)
        for i in range(L):  # the residual after layer i - 1 = embed + every attn_out / mlp_out before layer i
            errs[f"pos{position}/before{i}"] = helpers.rel_err(partial_CD[2 * i], hidden[i][position])
        norm = model.language_model.norm  # the frozen-scale norm of the whole sum is transformers' final norm
        x_D = partial_CD[-1]
        normed_D = np.asarray(norm.weight[...], np.float64) * x_D / np.sqrt(np.mean(x_D**2) + norm.eps)
        errs[f"pos{position}/final_norm"] = helpers.rel_err(normed_D, hidden[L][position])
    a = int(run.logits_TV[-1].argmax())
    main = _main_terms(la.direct_logit_attribution(model, a, cache=cache))
    errs["logit"] = _err(sum(main.values()), float(out.logits[0, -1, a]), main.values())
    helpers.record(f"hooks/logit_attribution/vs_transformers/{run.family}", max_rel_err=max(errs.values()))
    assert max(errs.values()) <= TOL, errs


# ---------------------------------------------------------------------------------------------- on the photo
def test_image_heatmap_has_the_token_grid_and_the_image_tokens_total(run, photos):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, cache, photo = run.model, run.cache, photos["astronaut"]
    L = model.config.text_config.num_hidden_layers
    a = int(run.logits_TV[-1].argmax())
    t, h, w = (int(v) for v in run.inputs["image_grid_thw"][0])
    image_cols = np.flatnonzero(run.inputs["input_ids"][0] == model.config.image_token_id)
    assert len(image_cols) == t * h * w // 4
    for layer, head in [(L - 1, 1), (0, None), (None, None)]:
        heat = la.image_token_heatmap(model, a, layer=layer, head=head, image_sizes=[photo],
                                      processor=run.processor, cache=cache, **run.inputs)
        assert heat.grid.shape == (t, h // 2, w // 2) == heat.geometry.merged_grid
        np.testing.assert_array_equal(heat.geometry.token_index_M, image_cols)
        per_key_S = la.source_attribution(model, a, layer=layer, head=head, cache=cache)
        want = per_key_S[image_cols].sum()
        assert abs(heat.total - want) <= 1e-12 * np.abs(per_key_S).sum()
        assert np.abs(heat.grid).max() > 0
        assert heat.on_image().shape == (photo.height, photo.width)
    assert heat.component == "text.layers.*.attn"
    ax = heat.plot(photo)
    assert ax.get_title() == "text.layers.*.attn"
    plt.close(ax.figure)


# ---------------------------------------------------------------------------------------------------- errors
def test_bad_arguments_fail_with_one_clear_error(qwen2_run):
    run = qwen2_run
    model, cache = run.model, run.cache
    with pytest.raises(HookError, match="exactly one of token_id"):
        la.direct_logit_attribution(model, 5, direction=np.ones(64), cache=cache)
    with pytest.raises(HookError, match="exactly one of token_id"):
        la.direct_logit_attribution(model, cache=cache)
    with pytest.raises(HookError, match="out of range for a vocabulary"):
        la.direct_logit_attribution(model, (1, 10**7), cache=cache)
    with pytest.raises(HookError, match="direction must have shape"):
        la.direct_logit_attribution(model, direction=np.ones(3), cache=cache)
    with pytest.raises(HookError, match="position 999 out of range"):
        la.direct_logit_attribution(model, 5, 999, cache=cache)
    with pytest.raises(HookError, match="2 decoder layers"):
        la.source_attribution(model, 5, layer=7, cache=cache)
    with pytest.raises(HookError, match="head needs a layer"):
        la.source_attribution(model, 5, head=0, cache=cache)
    with pytest.raises(HookError, match="the cache lacks"):
        la.source_attribution(model, 5, layer=0, cache={"text.embed": cache["text.embed"]})
