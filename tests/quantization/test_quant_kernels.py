"""The native int8 / int4 weight-only gemv (`kernels/csrc/quant_gemv.cc`, `kernels.quantized_matmul`) against a
NumPy float64 reference written here from the formats' definition (int8: `q * scale[o]`; int4: two values per byte,
low nibble first, 4-bit two's complement, `* scale[o, group]`), not against the code under test; its dispatch
(decode-sized products on the CPU only, the XLA reference for more rows, other shapes, other platforms and
gradients) and the fallback when the kernels are off."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2vl_jax import Qwen2VLForConditionalGeneration, kernels
from qwen2vl_jax.kernels import build, ffi
from qwen2vl_jax.modeling import layers
from qwen2vl_jax.quantization import quantize

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="needs x86-64 AVX2+FMA and a C++ compiler")
TARGETS = (build.INT8_GEMV_TARGET, build.INT4_GEMV_TARGET)


# ----------------------------------------------------------------------------------------- the definition
def weights_int8(rng, N, K):
    q = rng.integers(-127, 128, (N, K), dtype=np.int8)
    scale = rng.uniform(0.5, 2.0, N).astype(np.float32) / 127
    return q, scale


def weights_int4(rng, N, K, G):
    """Random values in [-8, 7] (every nibble occurs), packed two per byte, low nibble first."""
    values = rng.integers(-8, 8, (N, K))
    packed = ((values[:, 0::2] & 0xF) | ((values[:, 1::2] & 0xF) << 4)).astype(np.uint8)
    scale = rng.uniform(0.5, 2.0, (N, G)).astype(np.float32) / 7
    return packed, scale


def dequantized_f64(q, scale):
    """The weight `q * scale` in float64, from the definition."""
    scale = np.asarray(scale, np.float64)
    if q.dtype == np.int8:
        return q.astype(np.float64) * scale[:, None]
    low, high = (q & 0xF).astype(np.int64), (q >> 4).astype(np.int64)
    values = np.stack([low, high], axis=-1).reshape(q.shape[0], -1)  # column 2p: low nibble of byte p
    values = np.where(values >= 8, values - 16, values)  # 4-bit two's complement
    N, K = values.shape
    G = scale.shape[1]
    return (values.reshape(N, G, K // G) * scale[:, :, None]).reshape(N, K)


def activations(rng, M, K, bf16_valued):
    x = rng.standard_normal((M, K)).astype(np.float32)
    return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)) if bf16_valued else x


def assert_fp32_close(got, x, w64):
    """|got - x.w| within fp32 rounding of the products' magnitudes: <= 2^-20 * sum_k |x[m, k]| |w[n, k]| per output
    (one product missing or misplaced is ~1/K of that sum, far above 2^-20 of it)."""
    x64 = np.asarray(x, np.float64)
    ref, bound = x64 @ w64.T, np.abs(x64) @ np.abs(w64).T
    got = np.asarray(got)
    assert got.shape == ref.shape and got.dtype == np.float32
    excess = np.abs(got - ref) - 2.0 ** -20 * bound
    assert excess.max() <= 0, (np.abs(got - ref).max(), bound.max())


def _xla_reference(x_AI, q_OI, scale):
    return layers._quantized_matmul_xla(x_AI, q_OI, scale)


# -------------------------------------------------------------------------------------------- the kernels
@needs_kernels
@pytest.mark.parametrize("bf16_valued", [False, True])
@pytest.mark.parametrize("M, N, K", [(1, 37, 37), (2, 1031, 1539), (3, 8960, 1536), (4, 1536, 8960), (4, 64, 8),
                                     (6, 300, 1539)])
def test_int8_gemv_matches_float64(M, N, K, bf16_valued):
    """K = 37 and 1539 leave a K % 8 tail; N = 1031 and 8960 run on the pool in several chunks, with odd rows left
    over for a single stream; 6 rows take two passes (4 + 2: the glue sends at most 4, the kernel takes any)."""
    rng = np.random.default_rng(M * N + K)
    q, scale = weights_int8(rng, N, K)
    x = activations(rng, M, K, bf16_valued)
    assert_fp32_close(jax.jit(ffi.int8_gemv)(x, q, scale), x, dequantized_f64(q, scale))


@needs_kernels
@pytest.mark.parametrize("bf16_valued", [False, True])
@pytest.mark.parametrize("M, N, K, G", [
    (1, 1536, 1536, 12),  # groups of 128 (the format's default)
    (2, 701, 1536, 96),  # groups of 16, the smallest
    (3, 40, 96, 3),  # groups of 32 (the tiny test model's)
    (4, 8960, 1024, 2),  # groups of 512: several 256-column spans per group
    (1, 1031, 800, 2),  # groups of 400: a 144-column span; 72 bytes = 2 x 32 + 8
    (2, 33, 48, 1),  # one group of 48: bytes 24 = 3 x 8
    (4, 1536, 8960, 70),
    (6, 300, 1536, 12),  # two passes over the weights, 4 rows then 2
])
def test_int4_gemv_matches_float64(M, N, K, G, bf16_valued):
    rng = np.random.default_rng(M * N + K + G)
    q, scale = weights_int4(rng, N, K, G)
    x = activations(rng, M, K, bf16_valued)
    assert_fp32_close(jax.jit(ffi.int4_gemv)(x, q, scale), x, dequantized_f64(q, scale))


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_rows_are_batch_invariant(mode):
    """Row m of a batch gets the same bits as that row alone: the summation order is the same for every batch size,
    although 1-2 rows read the weights as 4 streams and 3-4 rows as 2 (N = 4099 runs on the pool and leaves rows
    over for one stream; int8's K = 1539 leaves a tail)."""
    rng = np.random.default_rng(11)
    N = 4099
    if mode == "int8":
        K = 1539
        q, scale = weights_int8(rng, N, K)
        gemv = jax.jit(ffi.int8_gemv)
    else:
        K = 1536
        q, scale = weights_int4(rng, N, K, 12)
        gemv = jax.jit(ffi.int4_gemv)
    x = rng.standard_normal((4, K)).astype(np.float32)
    alone = np.concatenate([np.asarray(gemv(x[m:m + 1], q, scale)) for m in range(4)])
    for M in (2, 3, 4):
        np.testing.assert_array_equal(np.asarray(gemv(x[:M], q, scale)), alone[:M])


@needs_kernels
def test_int4_rows_of_huge_activations_stay_finite_and_exact():
    """The int4 kernel accumulates the nibbles times 2^28 (exact in fp32); a row whose activations could overflow
    that (1e29 here: partial sums ~1e31, times 2^28 past fp32's 3.4e38) is scaled down before the products instead.
    Its outputs are finite and match the definition, tiny activations (1e-30) too, and every row keeps the bits it
    gets alone."""
    rng = np.random.default_rng(13)
    K, N, G = 1536, 300, 12
    q, scale = weights_int4(rng, N, K, G)
    x = rng.standard_normal((3, K)).astype(np.float32)
    x[1] *= np.float32(1e29)
    x[2] *= np.float32(1e-30)
    got = np.asarray(jax.jit(ffi.int4_gemv)(x, q, scale))
    assert np.isfinite(got).all()
    assert_fp32_close(got, x, dequantized_f64(q, scale))
    alone = np.concatenate([np.asarray(ffi.int4_gemv(x[m:m + 1], q, scale)) for m in range(3)])
    np.testing.assert_array_equal(got, alone)


@needs_kernels
def test_bad_shapes_are_refused():
    x = jnp.ones((1, 96), jnp.float32)
    q4 = jnp.zeros((8, 48), jnp.uint8)
    with pytest.raises(Exception, match="multiple of 16"):  # groups of 24 columns
        jax.block_until_ready(ffi.int4_gemv(x, q4, jnp.ones((8, 4), jnp.float32)))
    with pytest.raises(Exception, match=r"q\[N, K / 2\] and scale\[N, G\]"):
        jax.block_until_ready(ffi.int4_gemv(x, q4, jnp.ones((7, 3), jnp.float32)))
    with pytest.raises(Exception, match=r"q\[N, K\] and scale\[N\]"):
        jax.block_until_ready(ffi.int8_gemv(x, jnp.zeros((8, 96), jnp.int8), jnp.ones((9,), jnp.float32)))


def test_many_concurrent_calls_finish():
    """Independent quantized projections may run at once on XLA's pool threads (as in test_cpu_kernels for the
    bf16 gemv): in a subprocess, so a deadlock fails on the timeout instead of hanging the suite."""
    if not kernels.available():
        pytest.skip("needs the native CPU kernels")
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from qwen2vl_jax import kernels
        from qwen2vl_jax.kernels import ffi
        assert kernels.available()
        q8 = [jnp.full((2048, 256), 1, jnp.int8) for _ in range(12)]
        q4 = [jnp.full((2048, 128), 0x11, jnp.uint8) for _ in range(12)]
        s8, s4 = jnp.ones((2048,)), jnp.ones((2048, 2))
        f = jax.jit(lambda x, q8, q4: [ffi.int8_gemv(x, q, s8 * (i + 1)) for i, q in enumerate(q8)]
                    + [ffi.int4_gemv(x, q, s4 * (i + 1)) for i, q in enumerate(q4)])
        for _ in range(20):
            out = jax.block_until_ready(f(jnp.ones((1, 256), jnp.float32), q8, q4))
        assert all(float(o[0, 0]) == 256.0 * (i % 12 + 1) for i, o in enumerate(out)), [o[0, 0] for o in out]
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# ----------------------------------------------------------------------------------------------- dispatch
@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_matmul_uses_the_kernel_for_decode_rows_only(mode):
    """1-4 rows: the kernel; 5 rows and int4 groups that are not a multiple of 16 columns: the XLA reference, the
    same numbers either way."""
    rng = np.random.default_rng(3)
    K, N = 96, 300
    q, scale = weights_int8(rng, N, K) if mode == "int8" else weights_int4(rng, N, K, 3)
    target = build.INT8_GEMV_TARGET if mode == "int8" else build.INT4_GEMV_TARGET
    f = jax.jit(lambda x, q, s: kernels.quantized_matmul(x, q, s, reference=_xla_reference))
    for rows, expected in ((1, True), (4, True), (5, False)):
        x = activations(rng, rows, K, bf16_valued=False)
        assert (target in f.lower(x, q, scale).as_text()) is expected, rows
        assert_fp32_close(f(x, q, scale), x, dequantized_f64(q, scale))
    if mode == "int4":  # groups of 24 columns: the kernel does not take them
        q24, scale24 = weights_int4(rng, N, K, 4)
        x = activations(rng, 1, K, bf16_valued=False)
        assert target not in f.lower(x, q24, scale24).as_text()
        assert_fp32_close(f(x, q24, scale24), x, dequantized_f64(q24, scale24))


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_gradient_is_the_references(mode):
    """d/dx through the kernel equals d/dx through the XLA reference (the kernel is forward-only; QLoRA needs the
    gradient with respect to the activations), for f32 and bf16 activations."""
    rng = np.random.default_rng(5)
    K, N = 256, 160
    q, scale = weights_int8(rng, N, K) if mode == "int8" else weights_int4(rng, N, K, 2)
    target = build.INT8_GEMV_TARGET if mode == "int8" else build.INT4_GEMV_TARGET
    cotangent = jnp.asarray(rng.standard_normal((3, N)).astype(np.float32))
    kernel = lambda x, q, s: kernels.quantized_matmul(x, q, s, reference=_xla_reference)
    grad_kernel = jax.jit(jax.grad(lambda x: jnp.sum(kernel(x, q, scale) * cotangent)))
    grad_reference = jax.jit(jax.grad(lambda x: jnp.sum(_xla_reference(x, q, scale) * cotangent)))
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(rng.standard_normal((3, K)).astype(np.float32)).astype(dtype)
        assert target in jax.jit(kernel).lower(x, q, scale).as_text()  # the forward runs the kernel
        g_kernel, g_reference = grad_kernel(x), grad_reference(x)
        assert g_kernel.dtype == dtype
        np.testing.assert_array_equal(np.asarray(g_kernel.astype(jnp.float32)),
                                      np.asarray(g_reference.astype(jnp.float32)))
        # and that gradient is the definition's: cotangent @ (q * scale)
        want = np.asarray(cotangent, np.float64) @ dequantized_f64(q, scale)
        tol = 1e-6 if dtype == jnp.float32 else 1e-2
        assert np.abs(np.asarray(g_kernel.astype(jnp.float32)) - want).max() <= tol * np.abs(want).max()


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_dense_matches_the_dequantized_weight(mode):
    """`layers.quantized_dense` (kernel path: 1 row with leading axes, bias) = x @ (q * scale)^T + b, cast to x's
    dtype."""
    rng = np.random.default_rng(9)
    K, N = 128, 96
    q, scale = weights_int8(rng, N, K) if mode == "int8" else weights_int4(rng, N, K, 4)
    b = rng.standard_normal(N).astype(np.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(rng.standard_normal((1, 1, K)).astype(np.float32)).astype(dtype)
        f = jax.jit(layers.quantized_dense)
        got = f(x, q, scale, b)
        assert got.shape == (1, 1, N) and got.dtype == dtype
        assert any(t in f.lower(x, q, scale, b).as_text() for t in TARGETS)
        want = np.asarray(x.astype(jnp.float32), np.float64)[0] @ dequantized_f64(q, scale).T + b
        tol = 2e-6 if dtype == jnp.float32 else 2 ** -8  # the bf16 result's own rounding
        assert np.abs(np.asarray(got.astype(jnp.float32))[0] - want).max() <= tol * np.abs(want).max()


@needs_kernels
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compiled_model_calls_the_kernel_on_cpu_only(tiny_checkpoint, mode):
    """A jitted one-token forward of a quantized model: the CPU program calls the int8 / int4 kernel; the same
    function exported for TPU or CUDA has no native call (it runs the XLA reference)."""
    model = quantize(Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint), mode, group=32)
    prep = model.prepare_inputs(np.array([[1]]))
    args = (model, prep.input_ids_BT, prep.attention_mask_BT, prep.position_ids_ZBT)
    forward = jax.jit(lambda model, ids, mask, pos: model.forward(ids, mask, pos).logits)
    target = build.INT8_GEMV_TARGET if mode == "int8" else build.INT4_GEMV_TARGET
    assert target in forward.lower(*args).compile().as_text()
    for platform in ("tpu", "cuda"):
        exported = jax.export.export(forward, platforms=(platform,))(*args)
        assert not any(t in exported.mlir_module() for t in TARGETS), platform
    # the same export for the CPU does hold the native call (so the checks above can fail)
    allow = [jax.export.DisabledSafetyCheck.custom_call(t) for t in (*TARGETS, build.GEMV_TARGET,
                                                                     build.DECODE_ATTENTION_TARGET)]
    exported = jax.export.export(forward, platforms=("cpu",), disabled_checks=allow)(*args)
    assert target in exported.mlir_module()


# ------------------------------------------------------------------------------------------------ fallback
_FALLBACK = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from qwen2vl_jax import kernels
from qwen2vl_jax.modeling import layers
case = np.load(sys.argv[1])
out = {}
for mode in ("int8", "int4"):
    for rows in (1, 3, 6):
        x, q, s = case[f"{mode}_x"][:rows], case[f"{mode}_q"], case[f"{mode}_s"]
        f = jax.jit(layers.quantized_dense)
        text = f.lower(x, q, s).as_text()
        out[f"{mode}/{rows}"] = {"y": np.asarray(f(x, q, s)).tolist(), "native": "qwen2vl_jax_int" in text}
print(json.dumps({"available": kernels.available(), "out": out}))
"""


def _run_fallback(path, env) -> dict:
    done = subprocess.run([sys.executable, "-c", _FALLBACK, str(path)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_kernels_off_give_the_same_numbers(tmp_path):
    """QWEN2VL_JAX_CPU_KERNELS=0 (what a host without AVX2 or a compiler gets): `quantized_dense` runs the XLA
    reference, no native call, and both match the float64 definition within fp32 rounding (and each other, where
    the kernels are available here)."""
    rng = np.random.default_rng(2)
    K, N = 256, 1100
    q8, s8 = weights_int8(rng, N, K)
    q4, s4 = weights_int4(rng, N, K, 2)
    case = {"int8_x": rng.standard_normal((6, K)).astype(np.float32), "int8_q": q8, "int8_s": s8,
            "int4_x": rng.standard_normal((6, K)).astype(np.float32), "int4_q": q4, "int4_s": s4}
    np.savez(tmp_path / "case.npz", **case)
    off = _run_fallback(tmp_path / "case.npz", {**os.environ, "QWEN2VL_JAX_CPU_KERNELS": "0"})
    assert off["available"] is False
    on = _run_fallback(tmp_path / "case.npz", dict(os.environ)) if kernels.available() else None
    for mode, q, s in (("int8", q8, s8), ("int4", q4, s4)):
        w64 = dequantized_f64(q, s)
        for rows in (1, 3, 6):
            x = case[f"{mode}_x"][:rows]
            result = off["out"][f"{mode}/{rows}"]
            assert result["native"] is False
            assert_fp32_close(np.asarray(result["y"], np.float32), x, w64)
            if on is not None:
                assert on["out"][f"{mode}/{rows}"]["native"] is (rows <= kernels.MAX_ROWS)
                assert_fp32_close(np.asarray(on["out"][f"{mode}/{rows}"]["y"], np.float32), x, w64)
