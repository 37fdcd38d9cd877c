"""The native bf16 gemv kernel (decode with bf16 weights on AVX2 CPUs) against float64 and XLA's own dot."""

import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from qwen2vl_jax import cpu_kernels
from qwen2vl_jax.layers import _xla_dot, dense
from qwen2vl_jax.model import Qwen2VLForConditionalGeneration

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="needs x86-64 AVX2+FMA and a C++ compiler")


@pytest.mark.parametrize("M, N, K", [(1, 1031, 37), (1, 8960, 1536), (2, 1536, 8960), (3, 100, 1000), (4, 64, 32)])
def test_bf16_gemv_matches_float64(M, N, K):
    rng = np.random.default_rng(M * N + K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((N, K)).astype(np.float32)).astype(jnp.bfloat16)
    ref = x.astype(np.float64) @ np.asarray(w.astype(jnp.float32), np.float64).T  # bf16 weights are exact in f64
    got = np.asarray(jax.jit(cpu_kernels.bf16_gemv)(x, w))
    assert got.shape == (M, N) and got.dtype == np.float32
    assert helpers.rel_err(got, ref) <= 1e-6
    # XLA's bf16 dot rounds the activations to bf16 first: the same products once the kernel gets those values
    x16 = jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32)
    xla = np.asarray(jax.jit(_xla_dot)(x16, w))
    assert helpers.rel_err(np.asarray(jax.jit(cpu_kernels.bf16_gemv)(x16, w)), xla) <= 1e-6


def test_rows_are_batch_invariant():
    """Row m of a batch gets the same bits as that row alone (same FMA chains for every batch size)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 1536)).astype(np.float32)
    w = jnp.asarray(rng.standard_normal((700, 1536)).astype(np.float32)).astype(jnp.bfloat16)
    gemv = jax.jit(cpu_kernels.bf16_gemv)
    alone = np.concatenate([np.asarray(gemv(x[m:m + 1], w)) for m in range(4)])
    for M in (2, 3, 4):
        np.testing.assert_array_equal(np.asarray(gemv(x[:M], w)), alone[:M])


def test_many_concurrent_calls_finish():
    """XLA may run independent kernel calls at once on its pool threads (q/k/v projections are independent);
    a kernel that waited there for work it had queued to the same pool deadlocked. Run in a subprocess so a
    regression fails on the timeout instead of hanging the suite."""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from qwen2vl_jax import cpu_kernels
        assert cpu_kernels.available()
        ws = [jnp.full((2048, 256), i, jnp.bfloat16) for i in range(24)]
        f = jax.jit(lambda x, ws: [cpu_kernels.bf16_gemv(x, w) for w in ws])
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
        assert (cpu_kernels.TARGET in hlo) is expected, rows
    assert cpu_kernels.TARGET not in jax.jit(dense).lower(jnp.ones((1, 64)), jnp.ones((256, 64))).as_text()


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
