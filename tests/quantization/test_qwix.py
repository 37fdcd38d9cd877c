"""qwix (Google's JAX quantization library) against our weight-only quantization, on the tiny model.

How qwix is used: `qwix.quantize_model(model, qwix.PtqProvider(rules), *forward_args, methods=("forward",))`.
`forward` (the device math, called eagerly) is the method qwix must intercept: its NNX PTQ replaces a weight by
`setattr` on the module that issued the dot (`providers/ptq.py::create_quantized_param`) during that first call,
and `Qwen2VL.__call__` runs the math inside `jax.jit` on a flattened copy of the model, so intercepting `__call__`
quantizes that copy only: the model keeps its fp32 weights and re-quantizes them inside every compiled call.

qwix's definition is not ours: `scale = absmax / (qmax + 0.5)` (`core/numerics.py::get_symmetric_bound`: 127.5 for
int8, 7.5 for int4), the integers saturated to [qmin, qmax] (int8: [-128, 127]); ours is `absmax / qmax`, [-127,
127]. So the logits of the two quantized models differ by quantization noise (2e-2 relative here), and the exact
check is of the machinery instead: our Linear given qwix's integers and scales reproduces qwix's logits.
Needs qwix (0.1.8 tested: it requires jax, jaxlib, flax >= 0.12, numpy, opt_einsum, absl-py); skipped without it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from qwen2vl_jax import Qwen2VLForConditionalGeneration, kernels
from qwen2vl_jax.quantization import quantize, quantized_linears

qwix = pytest.importorskip("qwix")

# The text decoder's projections and the output projection: our DEFAULT_TARGETS without the embedding table (a
# gather; qwix intercepts dots only). The same set as qwix sees it: '/'-joined NNX paths, matched with re.fullmatch.
OUR_TARGETS = r"^language_model\.layers\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$|^lm_head$"
QWIX_PATHS = r"language_model/layers/\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)|lm_head"
GROUP = 32  # the tiny model's widths (64, 96) are multiples of 32, not of 128
BACKENDS = ["xla"] + (["cpu"] if kernels.available() else [])

# Our Linear given qwix's integers computes `(x @ q^T) * s` (scale after the dot, fp32 accumulation); qwix's
# `_slow_dot_general` computes `x @ (q * s)^T` (dequantize, then the dot). Same products, fp32 rounding in another
# order: each dot's relative difference is a few fp32 ulps times sqrt(width) (measured: 7e-7 int8, 7e-7 int4, also
# across the 2 layers and the 151936-wide head); 1e-5 is the bound the repository's other quantization tests use.
MACHINERY_RTOL = 1e-5


@pytest.fixture(scope="module")
def inputs(hf_tokenizer, photos):
    return {case: helpers.parity_inputs(hf_tokenizer, photos, case) for case in ("text_only", "one_photo")}


def forward_args(model, x):
    p = model.prepare_inputs(x["input_ids"], x["attention_mask"])
    return jnp.asarray(p.input_ids_BT), jnp.asarray(p.attention_mask_BT), jnp.asarray(p.position_ids_ZBT)


def qwix_ptq(path, attn, x, qtype, tile_size=None):
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, attn_implementation=attn)
    provider = qwix.PtqProvider([qwix.QuantizationRule(module_path=QWIX_PATHS, weight_qtype=qtype,
                                                       tile_size=tile_size)])
    quantized = qwix.quantize_model(model, provider, *forward_args(model, x), methods=("forward",))
    assert provider.get_unused_rules() == []
    return model, quantized


def qwix_weights(model) -> dict[str, object]:
    """`{our module path: qwix QArray}` of the weights qwix replaced (`ptq.WithAux`)."""
    return {".".join(map(str, p)): m.weight.array for p, m in nnx.iter_modules(model)
            if type(getattr(m, "weight", None)).__name__ == "WithAux"}


def state_bytes(model) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("attn", BACKENDS)
def test_qwix_int8_ptq_is_per_channel_absmax_over_127_5_and_our_linear_reproduces_it(tiny_checkpoint, inputs, attn):
    fp32, q = qwix_ptq(tiny_checkpoint, attn, inputs["text_only"], jnp.int8)
    weights = qwix_weights(q)
    ours = quantize(Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation=attn),
                    "int8", targets=OUR_TARGETS)
    assert set(weights) == set(quantized_linears(ours))  # the same 15 Linears, held as int8 + scales
    originals = {".".join(map(str, p)): m.weight[...] for p, m in nnx.iter_modules(fp32)
                 if isinstance(getattr(m, "weight", None), nnx.Param)}

    # the definition, on every weight: per output row, scale = absmax / 127.5, q = round-half-even(w / scale)
    # saturated to [-128, 127]. The row's absmax element lands exactly on the tie 127.5, where the last bit of XLA's
    # fp32 division decides the rounding: a mismatch is allowed only within 1e-4 of a tie, and by one step.
    for p, arr in weights.items():
        w = np.asarray(originals[p], np.float32)
        qv, scale = np.asarray(arr.qvalue[...]), np.asarray(arr.scale[...])
        assert qv.dtype == np.int8 and scale.shape == (w.shape[0], 1), (p, qv.dtype, scale.shape)
        np.testing.assert_allclose(scale, np.abs(w).max(-1, keepdims=True) / np.float32(127.5), rtol=1e-6)
        t = w / scale
        want = np.clip(np.round(t), -128, 127)
        off = qv != want
        assert np.all(np.abs(qv - want) <= 1), p
        assert np.all(np.abs(np.abs(t[off] - np.trunc(t[off])) - 0.5) < 1e-4), p

    # bytes: qwix's int8 + fp32 [O, 1] scales are exactly ours (int8 + fp32 [O] scales)
    assert state_bytes(q) == state_bytes(ours) < 0.65 * state_bytes(fp32)

    # the machinery: our Linear given qwix's integers and scales = qwix's quantized model
    for p, lin in quantized_linears(ours).items():
        lin.weight.set_value(weights[p].qvalue[...])
        lin.scale.set_value(weights[p].scale[...][:, 0])
    x = inputs["one_photo"]
    got, want = np.asarray(ours(**x).logits), np.asarray(q(**x).logits)
    assert rel(got, want) <= MACHINERY_RTOL, rel(got, want)
    # and it is a quantized model: the fp32 logits are further away
    assert rel(np.asarray(fp32(**x).logits), want) > 1e-3
    # generation runs through qwix's interception (the decode step calls `forward`): same greedy tokens
    a = q.generate(**x, max_new_tokens=6, do_sample=False)
    b = ours.generate(**x, max_new_tokens=6, do_sample=False)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_qwix_int4_subchannel_ptq_matches_our_packed_int4_given_its_integers(tiny_checkpoint, inputs):
    """qwix int4 with tile_size=GROUP (`jnp.int4` values, one scale per row and group of GROUP input columns):
    scales absmax / 7.5; its integers packed into our format (two per byte, low nibble first) reproduce its
    logits."""
    fp32, q = qwix_ptq(tiny_checkpoint, "xla", inputs["text_only"], jnp.int4, tile_size=GROUP)
    weights = qwix_weights(q)
    ours = quantize(Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="xla"),
                    "int4", targets=OUR_TARGETS, group=GROUP)
    assert set(weights) == set(quantized_linears(ours))
    originals = {".".join(map(str, p)): m.weight[...] for p, m in nnx.iter_modules(fp32)
                 if isinstance(getattr(m, "weight", None), nnx.Param)}
    for p, lin in quantized_linears(ours).items():
        qv, scale = np.asarray(weights[p].qvalue[...]).astype(np.int32), np.asarray(weights[p].scale[...])
        w = np.asarray(originals[p])
        O, I = w.shape
        assert weights[p].qvalue[...].dtype == jnp.int4 and scale.shape == (O, I // GROUP)
        np.testing.assert_allclose(scale, np.abs(w.reshape(O, I // GROUP, GROUP)).max(-1) / np.float32(7.5),
                                   rtol=1e-6)
        assert qv.min() >= -8 and qv.max() <= 7
        pairs = qv.reshape(O, I // 2, 2)
        lin.weight.set_value(jnp.asarray(((pairs[..., 0] & 0xF) | ((pairs[..., 1] & 0xF) << 4)).astype(np.uint8)))
        lin.scale.set_value(jnp.asarray(scale))
    x = inputs["one_photo"]
    got, want = np.asarray(ours(**x).logits), np.asarray(q(**x).logits)
    assert rel(got, want) <= MACHINERY_RTOL, rel(got, want)
