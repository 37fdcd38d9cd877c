"""Every attention backend against transformers 4.57 (fp32, eager), the registry, and the backend seam itself.

Each backend that runs on a CPU is checked end to end through the model: `xla` (the formulation every accelerator
runs), `cpu` (the native kernels; also the default suite's path), `jax` (`jax.nn.dot_product_attention`) and
`pallas` (TPU flash attention in Pallas' interpret mode).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import helpers
from qwen2vl_jax import attention, kernels
from qwen2vl_jax.attention import xla as xla_attention
from qwen2vl_jax.modeling.rope import apply_rotary
from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

TOL = 1e-5
BACKENDS = ["xla", "cpu", "jax", "pallas"]
# pallas runs interpreted on a CPU (~10x slower): the cases that reach its every branch (several query and key
# blocks, left padding, video frames as separate segments); the others take every parity case but the default
# backend's own suite (test_model.py) already runs them all.
CASES = {"xla": ["text_only", "three_images", "image_and_video", "long_prompt", "left_padded_batch"],
         "jax": ["text_only", "three_images", "image_and_video", "long_prompt", "left_padded_batch"],
         "cpu": ["image_and_video", "left_padded_batch"],
         "pallas": ["long_prompt", "left_padded_batch"]}
N_NEW = 12
_HF_LOGITS: dict = {}
_HF_TOKENS: dict = {}


def _needs_kernels(name):
    return pytest.mark.skipif(name == "cpu" and not kernels.available(), reason=kernels.unavailable_reason())


# Heavier cases already run elsewhere in the default suite run only with `-m slow`: the xla long prompt and three
# images are test_model.py's cases in the kernels-off child run (the xla backend end to end); jax and pallas keep
# the text-only / image-and-video / left-padded mixed batch cases by default.
SLOW_CASES = {("xla", "long_prompt"), ("xla", "three_images"), ("pallas", "long_prompt"), ("jax", "long_prompt"),
              ("jax", "three_images")}


def _marks(backend, case):
    return [_needs_kernels(backend)] + ([pytest.mark.slow] if (backend, case) in SLOW_CASES else [])


@pytest.fixture(scope="module")
def hf_tiny(tiny_checkpoint):
    return helpers.load_hf_model(tiny_checkpoint)


@pytest.fixture(scope="module")
def models(tiny_checkpoint):
    loaded = {}

    def get(name):
        if name not in loaded:
            loaded[name] = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation=name)
        return loaded[name]

    return get


def _hf_logits(hf, inputs, key):
    if key not in _HF_LOGITS:
        with torch.no_grad():
            _HF_LOGITS[key] = hf(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}).logits.numpy()
    return _HF_LOGITS[key]


@pytest.mark.parametrize("backend, case", [pytest.param(b, c, marks=_marks(b, c)) for b in BACKENDS
                                           for c in CASES[b]])
def test_backend_logits_match_transformers(models, hf_tiny, hf_tokenizer, photos, backend, case):
    inputs = helpers.parity_inputs(hf_tokenizer, photos, case)
    model = models(backend)
    assert model.config.attn_implementation == backend
    got = np.asarray(model(**inputs).logits)
    ref = _hf_logits(hf_tiny, inputs, case)
    mask = inputs["attention_mask"].astype(bool)
    err = helpers.rel_err(got[mask], ref[mask])
    helpers.record(f"logits/tiny/{case}/attn={backend}", rel_err=err, tokens=int(mask.sum()),
                   batch=int(mask.shape[0]), top1_agree=float((got[mask].argmax(-1) == ref[mask].argmax(-1)).mean()))
    assert err <= TOL, err


@pytest.mark.parametrize("backend", [pytest.param(b, marks=_needs_kernels(b)) for b in BACKENDS])
def test_backend_greedy_tokens_match_transformers(models, hf_tiny, hf_tokenizer, photos, backend):
    """Prefill (a causal kernel for `pallas`: the cache starts empty) plus decode steps over the cache."""
    inputs = helpers.parity_inputs(hf_tokenizer, photos, "left_padded_batch")
    kw = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False)
    if "ref" not in _HF_TOKENS:
        with torch.no_grad():
            _HF_TOKENS["ref"] = hf_tiny.generate(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()},
                                                 **kw).numpy()
    got = models(backend).generate(**inputs, **kw)
    helpers.record(f"generate/greedy/left_padded_batch/attn={backend}", tokens_compared=int(got.shape[0] * N_NEW),
                   identical=bool((got == _HF_TOKENS["ref"]).all()))
    np.testing.assert_array_equal(got, _HF_TOKENS["ref"])


@pytest.fixture(scope="module")
def slice_hf(slice_2b_checkpoint):
    return helpers.load_hf_model(slice_2b_checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("backend", [pytest.param(b, marks=_needs_kernels(b)) for b in BACKENDS])
def test_backend_real_width_2b_slice_logits(slice_2b_checkpoint, slice_hf, hf_tokenizer, photos, backend):
    model = Qwen2VLForConditionalGeneration.from_pretrained(slice_2b_checkpoint, attn_implementation=backend)
    for case in ("one_photo", "left_padded_batch"):
        inputs = helpers.parity_inputs(hf_tokenizer, photos, case)
        got = np.asarray(model(**inputs).logits)
        ref = _hf_logits(slice_hf, inputs, ("2b-slice", case))
        mask = inputs["attention_mask"].astype(bool)
        err = helpers.rel_err(got[mask], ref[mask])
        helpers.record(f"logits/2b-slice/{case}/attn={backend}", rel_err=err, tokens=int(mask.sum()),
                       batch=int(mask.shape[0]),
                       top1_agree=float((got[mask].argmax(-1) == ref[mask].argmax(-1)).mean()))
        assert err <= TOL, (case, err)


# ------------------------------------------------------------------------------------------------ registry
def test_probabilities_come_through_the_backends_capability(tiny_checkpoint, hf_tokenizer, photos):
    """`output_attentions` and a hooked `attn.probs` ask the backend's probabilities capability (not the xla module
    directly): a backend that registers its own gets called, per layer, and its probabilities are returned; the
    `edit` it is handed is the `.probs` hook (applied before the value product)."""
    from qwen2vl_jax import hooks

    calls = {"decoder_probs": 0, "vision_probs": 0}

    def decoder_probs(q, k, v, mask, edit):
        calls["decoder_probs"] += 1
        return xla_attention.decoder_attention_probs(q, k, v, mask, lambda p: edit(p * 0.5))

    def vision_probs(q, k, v, rotary, segments, edit):
        calls["vision_probs"] += 1
        return xla_attention.vision_attention_probs(q, k, v, rotary, segments, edit)

    attention.register_attention("test_probs", decoder_fn=xla_attention.decoder_attention,
                                 decoder_probs_fn=decoder_probs, vision_probs_fn=vision_probs, overwrite=True)
    inputs = helpers.parity_inputs(hf_tokenizer, photos, "one_photo")
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="test_probs")
    out = model(**inputs, output_attentions=True)
    assert calls["decoder_probs"] == model.config.text_config.num_hidden_layers
    np.testing.assert_allclose(np.asarray(out.attentions[0]).sum(-1)[0, 0, -1], 0.5, rtol=1e-5)  # the halving
    _, cache = hooks.run_with_cache(model, ["vision.blocks.0.attn.probs"], **inputs)
    assert calls["vision_probs"] >= 1 and cache["vision.blocks.0.attn.probs"][0].shape[0] == 2  # [N, L, L]
    plain = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="xla")
    np.testing.assert_allclose(np.asarray(plain(**inputs, output_attentions=True).attentions[0]).sum(-1)[0, 0, -1],
                               1.0, rtol=1e-5)


def test_a_registered_backend_runs_in_every_layer(tiny_checkpoint, hf_tokenizer, photos):
    """A user's functions replace the attention (both kinds); the model's numbers are theirs."""
    calls = {"decoder": 0, "vision": 0}

    def decoder(q_BTNH, k_BSKH, v_BSKH, mask):
        calls["decoder"] += 1  # counted while tracing: once per layer per compile
        assert isinstance(mask, attention.DecoderMask) and mask.allowed_BTS.dtype == jnp.bool_
        return xla_attention.decoder_attention(q_BTNH, k_BSKH, v_BSKH, mask)

    def vision(q_PNH, k_PNH, v_PNH, rotary, segments):
        calls["vision"] += 1
        assert isinstance(segments, attention.VisionSegments) and isinstance(rotary, attention.VisionRotary)
        return xla_attention.vision_attention(q_PNH, k_PNH, v_PNH, rotary, segments)

    attention.register_attention("test_recording", decoder_fn=decoder, vision_fn=vision, overwrite=True)
    attention.register_attention("test_no_attention", decoder_fn=lambda q, k, v, mask: jnp.zeros_like(q),
                                 overwrite=True)
    inputs = helpers.parity_inputs(hf_tokenizer, photos, "one_photo")
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="test_recording")
    got = np.asarray(model(**inputs).logits)
    layers, depth = model.config.text_config.num_hidden_layers, model.config.vision_config.depth
    assert calls == {"decoder": layers, "vision": depth}
    model.set_attn_implementation("xla")
    assert model.config.attn_implementation == "xla"
    np.testing.assert_allclose(got, np.asarray(model(**inputs).logits), rtol=0, atol=0)
    assert calls == {"decoder": layers, "vision": depth}  # the xla backend no longer calls the user's functions

    model.set_attn_implementation("test_no_attention")  # zero attention output: different logits, vision kept
    changed = np.asarray(model(**inputs).logits)
    assert np.abs(changed - got).max() > 1e-3
    assert all(m.attn_implementation == "test_no_attention" for _, m in nnx.iter_modules(model)
               if hasattr(m, "attn_implementation"))


def test_probabilities_always_come_from_the_xla_formulation(tiny_checkpoint, hf_tokenizer, photos):
    calls = []
    attention.register_attention("test_counting", decoder_fn=lambda *a: calls.append(1) or
                                 xla_attention.decoder_attention(*a), overwrite=True)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="test_counting")
    inputs = helpers.parity_inputs(hf_tokenizer, photos, "one_photo")
    out = model(**inputs, output_attentions=True)
    assert not calls and len(out.attentions) == model.config.text_config.num_hidden_layers
    model(**inputs)
    assert calls


def test_unknown_or_unusable_backends_fail_by_name(tiny_checkpoint, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown attn_implementation 'flash'; registered: \['auto', 'cpu', 'jax', "
                                         r"'pallas',"):
        Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="flash")
    with pytest.raises(ValueError, match="already registered"):
        attention.register_attention("xla", decoder_fn=xla_attention.decoder_attention)
    with pytest.raises(ValueError, match="give decoder_fn, vision_fn or both"):
        attention.register_attention("nothing")
    with pytest.raises(TypeError, match="must be callable"):
        attention.register_attention("bad", decoder_fn="xla")
    monkeypatch.setattr(kernels.build, "_register", lambda: "turned off by QWEN2VL_JAX_CPU_KERNELS=0")
    assert not kernels.available() and attention.default_backend() == "auto"
    assert attention.platform_backend(None, "cpu") == "xla"  # what `auto` runs on a CPU without the kernels
    with pytest.raises(attention.AttentionBackendError, match="'cpu' cannot run here: turned off by QWEN2VL_JAX_CPU"):
        Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="cpu")


@pytest.mark.skipif(not kernels.available(), reason="needs the native CPU kernels")
def test_platform_default_and_the_kernels_in_the_compiled_model(tiny_checkpoint, hf_tokenizer, photos):
    """None means `auto`, which runs `cpu` on this host; the `xla` backend's fp32 program has no native call at all
    (the program an accelerator runs), the `cpu` and `auto` backends' have the fused vision kernel."""
    from qwen2vl_jax.modeling import programs

    assert attention.resolve(None) == "auto" and attention.platform_backend(None) == "cpu"
    assert {p: attention.platform_backend(None, p) for p in ("tpu", "cuda", "rocm", "gpu")} == {
        "tpu": "pallas", "cuda": "jax", "rocm": "xla", "gpu": "jax"}
    inputs = helpers.parity_inputs(hf_tokenizer, photos, "one_photo")
    for name, expected in (("xla", False), ("cpu", True), (None, True)):
        model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation=name)
        prep = model.prepare_inputs(**inputs)
        pixels, layout = prep.vision_pixels, prep.vision_layout
        hlo = programs.vision.lower(model.visual, pixels, layout.pos_hw_P2, layout.segments(),
                                    output_hidden_states=False).as_text()
        assert (kernels.build.ATTENTION_TARGET in hlo) is expected, name
        text_hlo = programs.forward.lower(model, prep.input_ids_BT, prep.attention_mask_BT,
                                          prep.position_ids_ZBT, None, None, None).as_text()
        assert "qwen2vl_jax_" not in text_hlo  # fp32 prefill: XLA ops only, whatever the backend


def test_pallas_decoder_uses_flash_only_where_queries_start_at_slot_zero():
    rng = np.random.default_rng(0)
    B, T, S, K, G, H = 2, 5, 9, 2, 2, 8
    q = jnp.asarray(rng.standard_normal((B, T, K * G, H)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, S, K, H)), jnp.float32) for _ in range(2))
    valid = np.ones((B, S), bool)
    valid[0, :2] = False  # left padding in row 0
    causal = np.arange(S)[None, :] <= np.arange(T)[:, None]
    mask = attention.DecoderMask(jnp.asarray(causal[None] & valid[:, None]), jnp.asarray(valid), 0)
    ref = np.asarray(xla_attention.decoder_attention(q, k, v, mask))
    pallas = attention.get_attention("pallas").decoder
    with jax.default_matmul_precision("highest"):
        got = np.asarray(pallas(q, k, v, mask))
    assert helpers.rel_err(got[0, 2:], ref[0, 2:]) <= 1e-6 and helpers.rel_err(got[1], ref[1]) <= 1e-6
    assert "pallas" in str(jax.make_jaxpr(pallas)(q, k, v, mask))
    traced_start = jax.make_jaxpr(lambda q, k, v, m, s: pallas(q, k, v, attention.DecoderMask(m, mask.key_valid_BS,
                                                                                               s)))
    assert "pallas" not in str(traced_start(q, k, v, mask.allowed_BTS, jnp.int32(0)))  # unknown start: xla


def _count_calls(jaxpr, primitive: str) -> int:
    """How many times `primitive` runs in a jaxpr, sub-jaxprs (jit, custom_vjp, ...) counted per call site."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == primitive
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    n += _count_calls(sub, primitive)
    return n


def test_pallas_runs_the_flash_kernel_inside_the_model(models, hf_tokenizer, photos):
    """The model's prefill builds its mask inside the trace with a static start: the flash kernel is in the
    program (vision and decoder), not the fallback: twice per layer, the TPU branch (Mosaic) and the CPU branch
    (interpret mode), one of which the lowering keeps."""
    from qwen2vl_jax.modeling import programs

    model = models("pallas")
    prep = model.prepare_inputs(**helpers.parity_inputs(hf_tokenizer, photos, "one_photo"))
    text_jaxpr = jax.make_jaxpr(programs._forward)(model, prep.input_ids_BT, prep.attention_mask_BT,
                                                          prep.position_ids_ZBT, None, None, None)
    assert _count_calls(text_jaxpr.jaxpr, "pallas_call") == 2 * model.config.text_config.num_hidden_layers
    layout = prep.vision_layout
    vision_jaxpr = jax.make_jaxpr(lambda v, x, p, s: programs._vision(v, x, p, s, output_hidden_states=False))(
        model.visual, prep.vision_pixels, layout.pos_hw_P2, layout.segments())
    assert _count_calls(vision_jaxpr.jaxpr, "pallas_call") == 2 * model.config.vision_config.depth


def _decoder_case(B=2, T=5, K=2, G=2, H=16, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((B, T, K * G, H)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((B, T, K, H)), jnp.float32) for _ in range(2))
    valid = np.ones((B, T), bool)
    valid[0, :2] = False  # left padding in row 0
    causal = np.arange(T)[None, :] <= np.arange(T)[:, None]
    return q, k, v, attention.DecoderMask(jnp.asarray(causal[None] & valid[:, None]), jnp.asarray(valid), 0)


@pytest.mark.parametrize("backend", [pytest.param(b, marks=_needs_kernels(b)) for b in ["cpu", "jax"]]
                         + [pytest.param("pallas", marks=pytest.mark.slow)])  # interpret-mode backward: 18 s
def test_backend_gradients_match_xla(backend):
    """Training differentiates through the chosen backend: same gradients as the `xla` formulation (decoder without
    a cache; vision over several segments with padding), real rows only."""
    from qwen2vl_jax.modeling import vision_layout as vision_lib

    fns = attention.get_attention(backend), attention.get_attention("xla")
    q, k, v, mask = _decoder_case()
    real = np.asarray(mask.key_valid_BS)[:, :, None, None]
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.where(real, jnp.sin(fn(q, k, v, mask)), 0))  # noqa: E731
    layout = vision_lib.vision_layout(np.array([[1, 4, 6], [2, 2, 4]]))
    rng = np.random.default_rng(1)
    P, n = layout.padded_patches, layout.num_patches
    qv, kv_, vv = (jnp.asarray(rng.standard_normal((P, 2, 16)), jnp.float32) for _ in range(3))
    angles = rng.uniform(0, 10, (P, 8))
    cos, sin = (jnp.asarray(f(np.concatenate([angles, angles], -1)), jnp.float32) for f in (np.cos, np.sin))
    rotary = attention.VisionRotary(cos, sin, apply_rotary)
    vloss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, rotary, layout.segments())[:n]))  # noqa: E731
    with jax.default_matmul_precision("highest"):
        got, ref = (jax.grad(loss(b.decoder), argnums=(0, 1, 2))(q, k, v) for b in fns)
        vgot, vref = (jax.grad(vloss(b.vision), argnums=(0, 1, 2))(qv, kv_, vv) for b in fns)
    for g, r in (*zip(got, ref), *zip(vgot, vref)):
        assert np.abs(np.asarray(r)).max() > 0 and helpers.rel_err(g, r) <= 1e-5
