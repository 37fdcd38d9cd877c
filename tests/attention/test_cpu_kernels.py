"""The native CPU kernels (`qwen2vl_jax.kernels`) against float64 and XLA's own ops: the bf16 gemv (decode with
bf16 weights on AVX2 CPUs), the fused block-diagonal attention of the vision tower and the decode-step attention,
through the raw FFI calls and through the `cpu` attention backend."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from qwen2vl_jax import kernels
from qwen2vl_jax.attention import VisionRotary
from qwen2vl_jax.attention import cpu as cpu_attention
from qwen2vl_jax.attention import xla as xla_attention
from qwen2vl_jax.kernels import build, ffi
from qwen2vl_jax.kernels.glue import xla_matmul
from qwen2vl_jax.modeling import vision_layout as vision
from qwen2vl_jax.modeling.layers import dense
from qwen2vl_jax.modeling.rope import apply_rotary
from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs x86-64 AVX2+FMA and a C++ compiler")


def _cpu_decode(q, k, v, allowed):
    """The decode-step attention as the `cpu` backend calls it (kernel when it applies, else XLA)."""
    return kernels.decode_attention(q, k, v, allowed, reference=xla_attention.masked_attention)


@pytest.mark.parametrize("M, N, K", [(1, 1031, 37), (1, 8960, 1536), (2, 1536, 8960), (3, 100, 1000), (4, 64, 32)])
def test_bf16_gemv_matches_float64(M, N, K):
    rng = np.random.default_rng(M * N + K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((N, K)).astype(np.float32)).astype(jnp.bfloat16)
    ref = x.astype(np.float64) @ np.asarray(w.astype(jnp.float32), np.float64).T  # bf16 weights are exact in f64
    got = np.asarray(jax.jit(ffi.bf16_gemv)(x, w))
    assert got.shape == (M, N) and got.dtype == np.float32
    assert helpers.rel_err(got, ref) <= 1e-6
    # XLA's bf16 dot rounds the activations to bf16 first: the same products once the kernel gets those values
    x16 = jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)
    xla = np.asarray(jax.jit(xla_matmul)(x16, w))
    assert helpers.rel_err(np.asarray(jax.jit(ffi.bf16_gemv)(x16, w)), xla) <= 1e-6


def test_rows_are_batch_invariant():
    """Row m of a batch gets the same bits as that row alone: the same summation order for every batch size,
    although 1-2 rows read the weights as 4 streams and 3-4 rows as 2 (N = 701 and K = 1539 leave odd rows and a
    K % 8 tail)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 1539)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((701, 1539)).astype(np.float32)).astype(jnp.bfloat16)
    gemv = jax.jit(ffi.bf16_gemv)
    alone = np.concatenate([np.asarray(gemv(x[m:m + 1], w)) for m in range(4)])
    for M in (2, 3, 4):
        np.testing.assert_array_equal(np.asarray(gemv(x[:M], w)), alone[:M])


def test_many_concurrent_calls_finish():
    """XLA may run independent kernel calls at once on its pool threads (q/k/v projections are independent);
    a kernel that waited there for work it had queued to the same pool deadlocked. Run in a subprocess so a
    regression fails on the timeout instead of hanging the suite."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from qwen2vl_jax import kernels
        from qwen2vl_jax.kernels import ffi
        assert kernels.available()
        ws = [jnp.full((2048, 256), i, jnp.bfloat16) for i in range(24)]
        f = jax.jit(lambda x, ws: [ffi.bf16_gemv(x, w) for w in ws])
        for _ in range(20):
            out = jax.block_until_ready(f(jnp.ones((1, 256), jnp.float32), ws))
        assert all(float(o[0, 0]) == 256.0 * i for i, o in enumerate(out))
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_dense_uses_the_kernel_for_decode_rows_only():
    w = jnp.ones((256, 64), jnp.bfloat16)
    for rows, expected in ((1, True), (4, True), (5, False)):
        hlo = jax.jit(dense).lower(jnp.ones((rows, 64), jnp.bfloat16), w).as_text()
        assert (build.GEMV_TARGET in hlo) is expected, rows
    assert build.GEMV_TARGET not in jax.jit(dense).lower(jnp.ones((1, 64)), jnp.ones((256, 64))).as_text()


def test_bf16_decode_steps_agree_with_the_bf16_full_forward(tiny_checkpoint, hf_tokenizer, photos):
    ours = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype="bfloat16")
    inputs = helpers.hf_inputs(hf_tokenizer, [helpers.chat("What is this?", 1)], images=[photos["coffee"]])
    out = ours.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True)
    for step in (1, 2):  # decode steps (one row: the kernel) vs a bf16 forward over the whole sequence (XLA dots)
        ids = out.sequences[:, : inputs["input_ids"].shape[1] + step]
        full = ours(**{**inputs, "input_ids": ids, "attention_mask": np.ones_like(ids)}).logits[:, -1]
        full = np.asarray(full.astype(jnp.float32))
        assert helpers.rel_err(out.logits[:, step], full) <= 2e-2  # bf16 activations: ~1e-2 noise either way
        assert (out.logits[:, step].argmax(-1) == full.argmax(-1)).all()


# ------------------------------------------------------------------------------------------ segment attention
def _attention_f64(q, k, v, seg):
    """float64 softmax attention inside each (first, length) segment; rows outside every segment are 0."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = np.zeros_like(q)
    for first, length in np.asarray(seg).tolist():
        if length == 0:  # a padded segment slot
            continue
        rows = slice(first, first + length)
        s = np.einsum("lnh,mnh->nlm", q[rows], k[rows]) / np.sqrt(q.shape[-1])
        p = np.exp(s - s.max(-1, keepdims=True))
        out[rows] = np.einsum("nlm,mnh->lnh", p / p.sum(-1, keepdims=True), v[rows])
    return out


def _kernel_pnh(q, k, v, seg):
    return ffi.segment_attention(q, k, v, jnp.asarray(seg, jnp.int32), q.shape[-1] ** -0.5)


@pytest.mark.parametrize("lengths, N, H", [
    ([1024], 16, 80),  # a 448x448 image: 4 key blocks of 256, 21 full query blocks + one of 16
    ([4096], 2, 80),  # an 896x896 image
    ([77, 300, 5, 1, 0, 0], 3, 16),  # several images / frames of odd lengths, then two padded segments
    ([259], 2, 8),  # one key past a block boundary
])
def test_segment_attention_matches_float64(lengths, N, H):
    rng = np.random.default_rng(sum(lengths) + N + H)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    seg = np.stack([np.where(np.asarray(lengths) > 0, starts, 0), lengths], axis=1)
    P = sum(lengths) + 13  # padded rows after the last segment
    q = (3 * rng.standard_normal((P, N, H))).astype(np.float32)  # large scores: the softmax max matters
    k, v = (rng.standard_normal((P, N, H)).astype(np.float32) for _ in range(2))
    got = np.asarray(jax.jit(_kernel_pnh)(q, k, v, seg))
    assert got.shape == (P, N, H) and got.dtype == np.float32
    ref = _attention_f64(q, k, v, seg)
    assert helpers.rel_err(got, ref) <= 3e-6
    assert not got[sum(lengths):].any()  # rows outside every segment are 0


def _rotate_f64(x_PNH, cos_PH, sin_PH):
    x, c, s = (np.asarray(a, np.float64) for a in (x_PNH, cos_PH, sin_PH))
    half = x.shape[-1] // 2
    return x * c[:, None] + np.concatenate([-x[..., half:], x[..., :half]], -1) * s[:, None]


def _rotary_tables(P, H, rng):
    angles = rng.uniform(0, 30, (P, H // 2))
    angles = np.concatenate([angles, angles], -1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def test_segment_attention_applies_the_rotary_when_given():
    rng = np.random.default_rng(9)
    P, N, H = 150, 3, 16
    q, k, v = (rng.standard_normal((P, N, H)).astype(np.float32) for _ in range(3))
    cos, sin = _rotary_tables(P, H, rng)
    seg = np.array([[0, 100], [100, 50]])
    got = np.asarray(jax.jit(ffi.segment_attention, static_argnums=4)(
        q, k, v, jnp.asarray(seg, jnp.int32), H**-0.5, cos, sin))
    ref = _attention_f64(_rotate_f64(q, cos, sin), _rotate_f64(k, cos, sin), v, seg)
    assert helpers.rel_err(got, ref) <= 3e-6
    assert helpers.rel_err(got, _attention_f64(q, k, v, seg)) > 1e-2  # the rotation is really applied


def test_vision_attention_uses_the_kernel_and_agrees_with_xla():
    """The `cpu` backend's vision attention on the vision layout: the kernel on CPU, same numbers as the `xla`
    backend (video frames as separate segments, padded segment slots, padded rows)."""
    layout = vision.vision_layout(np.array([[1, 6, 4], [3, 4, 8], [1, 2, 2]]))
    rng = np.random.default_rng(3)
    P = layout.padded_patches
    q, k, v = (jnp.asarray(rng.standard_normal((P, 4, 16)).astype(np.float32)) for _ in range(3))
    cos, sin = _rotary_tables(P, 16, rng)
    args = (q, k, v, VisionRotary(cos, sin, apply_rotary), layout.segments())
    assert build.ATTENTION_TARGET in jax.jit(cpu_attention.vision_attention).lower(*args).as_text()
    with jax.default_matmul_precision("highest"):
        xla = np.asarray(jax.jit(xla_attention.vision_attention)(*args))[: layout.num_patches]
    got = np.asarray(jax.jit(cpu_attention.vision_attention)(*args))[: layout.num_patches]
    assert helpers.rel_err(got, xla) <= 2e-6
    seg = np.stack([layout.seg_rows_QL[:, 0], layout.seg_valid_QL.sum(1)], 1)
    ref = _attention_f64(_rotate_f64(q, cos, sin), _rotate_f64(k, cos, sin), v, seg)
    assert helpers.rel_err(got, ref[: layout.num_patches]) <= 2e-6


def test_vision_attention_gradient_goes_through_the_xla_formulation():
    layout = vision.vision_layout(np.array([[2, 4, 4]]))
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal((layout.padded_patches, 2, 8)).astype(np.float32)) for _ in range(3))
    rest = (VisionRotary(*_rotary_tables(layout.padded_patches, 8, rng), apply_rotary), layout.segments())
    n = layout.num_patches
    loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, *rest)[:n]))  # noqa: E731
    with jax.default_matmul_precision("highest"):
        got = jax.grad(loss(cpu_attention.vision_attention), argnums=(0, 1, 2))(q, k, v)
        ref = jax.grad(loss(xla_attention.vision_attention), argnums=(0, 1, 2))(q, k, v)
    for g, r in zip(got, ref):
        assert np.abs(np.asarray(r)).max() > 0
        assert helpers.rel_err(g, r) <= 1e-5


def test_segment_attention_rejects_bad_shapes():
    q = jnp.ones((8, 2, 12), jnp.float32)  # head dim 12: not a multiple of 8
    with pytest.raises(Exception, match="multiple of 8"):
        jax.block_until_ready(ffi.segment_attention(q, q, q, jnp.asarray([[0, 8]], jnp.int32), 1.0))
    q, bad = jnp.ones((8, 2, 16), jnp.float32), jnp.ones((7, 16), jnp.float32)  # rotary tables for 7 rows, not 8
    with pytest.raises(Exception, match="cos and sin"):
        jax.block_until_ready(ffi.segment_attention(q, q, q, jnp.asarray([[0, 8]], jnp.int32), 1.0, bad, bad))
    q = jnp.ones((2, 8, 16), jnp.float32)
    with pytest.raises(Exception, match="outside the rows"):
        jax.block_until_ready(ffi.segment_attention(q, q, q, jnp.asarray([[4, 8]], jnp.int32), 1.0))
    # the model never sends such a head dim to the kernel: the XLA formulation takes it
    layout = vision.vision_layout(np.array([[1, 2, 4]]))
    x = jnp.ones((layout.padded_patches, 2, 12), jnp.float32)
    cs = jnp.ones((layout.padded_patches, 12), jnp.float32)
    rotary = VisionRotary(cs, cs, apply_rotary)
    lowered = jax.jit(cpu_attention.vision_attention).lower(x, x, x, rotary, layout.segments())
    assert build.ATTENTION_TARGET not in lowered.as_text()


def test_concurrent_attention_calls_finish():
    """Several independent attention calls in one jit may run at once on XLA's pool (see the gemv test)."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from qwen2vl_jax import kernels
        from qwen2vl_jax.kernels import ffi
        assert kernels.available()
        xs = [jnp.full((300, 4, 16), 0.01 * i, jnp.float32) for i in range(12)]
        seg = jnp.asarray([[0, 300]], jnp.int32)
        f = jax.jit(lambda xs: [ffi.segment_attention(x, x, x, seg, 0.25) for x in xs])
        for _ in range(10):
            out = jax.block_until_ready(f(xs))
        assert all(np.allclose(np.asarray(o), 0.01 * i) for i, o in enumerate(out))
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# ------------------------------------------------------------------------------------------- decode attention
def _decode_attention_f64(q_BNH, k_BSKH, v_BSKH, valid_BS, probs_bf16=False):
    """float64 GQA attention of one query per row and head over the valid cache slots (probabilities rounded to
    bf16 first when asked, as the bf16 model does)."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q_BNH, k_BSKH, v_BSKH))
    B, N, H = q.shape
    G = N // k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for n in range(N):
            s = k[b, :, n // G] @ q[b, n] / np.sqrt(H)
            s = np.where(valid_BS[b], s, -np.inf)
            p = np.exp(s - s.max())
            p = p / p.sum()
            if probs_bf16:
                p = np.asarray(jnp.asarray(p, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32), np.float64)
            out[b, n] = p @ v[b, :, n // G]
    return out


@pytest.mark.parametrize("B, S, K, G, H", [
    (1, 352, 2, 6, 128),  # the 2B decode step (GQA 6) at the benchmark's cache length
    (3, 37, 4, 7, 64),  # the 7B's GQA ratio; a cache length with a tail past the 8-lane blocks
    (2, 300, 1, 9, 16),  # more query heads per kv head than one register pass (8)
    (2, 20, 3, 1, 8),  # no GQA
])
def test_decode_attention_matches_float64(B, S, K, G, H):
    rng = np.random.default_rng(B * S + K * G + H)
    q = (3 * rng.standard_normal((B, K * G, H))).astype(np.float32)  # large scores: the softmax max matters
    k, v = (rng.standard_normal((B, S, K, H)).astype(np.float32) for _ in range(2))
    valid = rng.random((B, S)) < 0.8  # scattered holes, like left padding and masked rows
    valid[:, 0] = True
    got = np.asarray(jax.jit(ffi.decode_attention, static_argnums=(4, 5))(q, k, v, valid, H**-0.5, False))
    assert got.shape == q.shape and got.dtype == np.float32
    assert helpers.rel_err(got, _decode_attention_f64(q, k, v, valid)) <= 2e-6


def test_decode_attention_rounds_probabilities_to_bf16_when_asked():
    rng = np.random.default_rng(11)
    q = jnp.asarray(2 * rng.standard_normal((2, 12, 64)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.standard_normal((2, 90, 2, 64)), jnp.bfloat16) for _ in range(2))
    valid = np.ones((2, 90), bool)
    fn = jax.jit(ffi.decode_attention, static_argnums=(4, 5))
    rounded, exact = (np.asarray(fn(q, k, v, valid, 0.125, flag)) for flag in (True, False))
    assert helpers.rel_err(rounded, _decode_attention_f64(q, k, v, valid, probs_bf16=True)) <= 2e-6
    assert helpers.rel_err(exact, _decode_attention_f64(q, k, v, valid)) <= 2e-6
    assert helpers.rel_err(rounded, exact) > 1e-4  # the rounding is really there


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_attention_in_the_layer_agrees_with_xla(dtype):
    """The `cpu` backend's decode attention (the kernel on CPU) vs the `xla` formulation used for prefill: same
    numbers for an fp32 and a bf16 cache (bf16: probabilities rounded to bf16 before the value product, exactly
    like the XLA ops), a row with no valid slot (both average every slot), and gradients through XLA."""
    rng = np.random.default_rng(7)
    B, S, K, G, H = 3, 70, 2, 6, 32
    q = jnp.asarray(2 * rng.standard_normal((B, 1, K * G, H)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((B, S, K, H)), dtype) for _ in range(2))
    mask = rng.random((B, 1, S)) < 0.6
    mask[2] = False  # a row with nothing to attend to
    mask = jnp.asarray(mask)
    assert build.DECODE_ATTENTION_TARGET in jax.jit(_cpu_decode).lower(q, k, v, mask).as_text()
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(xla_attention.masked_attention)(q, k, v, mask)
        got = jax.jit(_cpu_decode)(q, k, v, mask)
        assert got.dtype == dtype
        got, ref = (np.asarray(x.astype(jnp.float32)) for x in (got, ref))
        if dtype == jnp.float32:
            assert helpers.rel_err(got, ref) <= 2e-6
        else:  # bf16 output rounding: equal or one bf16 step apart
            assert np.abs(got - ref).max() <= 2**-7 * np.abs(ref).max()
        assert np.allclose(got[2, 0], np.asarray(v.astype(jnp.float32))[2].mean(0).repeat(G, 0), atol=2e-2)
        loss = lambda fn: lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask).astype(jnp.float32)))  # noqa: E731
        g_got = jax.grad(loss(_cpu_decode), argnums=(0, 1, 2))(q, k, v)
        g_ref = jax.grad(loss(xla_attention.masked_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g_got, g_ref):
        a, b = (np.asarray(x.astype(jnp.float32)) for x in (a, b))
        assert np.abs(b).max() > 0 and helpers.rel_err(a, b) <= (1e-5 if dtype == jnp.float32 else 2e-2)


def test_decode_attention_is_used_only_for_single_token_steps():
    rng = np.random.default_rng(1)
    k = jnp.asarray(rng.standard_normal((1, 16, 2, 8)), jnp.float32)
    for T, expected in ((1, True), (2, False)):
        q = jnp.ones((1, T, 4, 8), jnp.float32)
        mask = jnp.ones((1, T, 16), bool)
        hlo = jax.jit(_cpu_decode).lower(q, k, k, mask).as_text()
        assert (build.DECODE_ATTENTION_TARGET in hlo) is expected, T
    # a bf16 query over an fp32 cache would round the keys first in XLA: the kernel is not used there
    hlo = jax.jit(_cpu_decode).lower(jnp.ones((1, 1, 4, 8), jnp.bfloat16), k, k, mask[:, :1]).as_text()
    assert build.DECODE_ATTENTION_TARGET not in hlo


def test_decode_attention_rejects_bad_shapes():
    q = jnp.ones((1, 4, 12), jnp.float32)  # head dim 12: not a multiple of 8
    k = jnp.ones((1, 5, 2, 12), jnp.float32)
    with pytest.raises(Exception, match="multiple of 8"):
        jax.block_until_ready(ffi.decode_attention(q, k, k, jnp.ones((1, 5), bool), 1.0, False))
    q, k = jnp.ones((1, 5, 8), jnp.float32), jnp.ones((1, 5, 2, 8), jnp.float32)  # 5 heads over 2 kv heads
    with pytest.raises(Exception, match="multiple of K"):
        jax.block_until_ready(ffi.decode_attention(q, k, k, jnp.ones((1, 5), bool), 1.0, False))
    with pytest.raises(Exception, match="dtypes differ"):
        jax.block_until_ready(ffi.decode_attention(jnp.ones((1, 4, 8)), k, k.astype(jnp.bfloat16),
                                                           jnp.ones((1, 5), bool), 1.0, False))
