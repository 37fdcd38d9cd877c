"""`attention.platforms.platform_dependent`: the choice is made when a program is lowered, each branch lowered for
its own platforms only; it runs eagerly, under jit, vmap and grad like `jax.lax.platform_dependent`. And the TPU
kernel's head-dim padding changes no number (checked in interpret mode, the same kernel body)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2vl_jax.attention import pallas
from qwen2vl_jax.attention.platforms import platform_dependent


def _choose(x):
    return platform_dependent(x, tpu=lambda x: x + 1.0, cuda=lambda x: x * 3.0, default=lambda x: jnp.sin(x))


def test_the_cpu_branch_runs_here_eagerly_jitted_and_vmapped():
    x = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)
    want = np.sin(np.asarray(x))
    assert np.allclose(_choose(x), want) and np.allclose(jax.jit(_choose)(x), want)
    assert np.allclose(jax.vmap(_choose)(x), want) and np.allclose(jax.vmap(_choose, in_axes=1, out_axes=1)(x), want)


def test_gradients_are_the_branchs_own():
    x = jnp.linspace(-1.0, 1.0, 5)
    g = jax.grad(lambda x: _choose(x).sum())(x)
    assert np.allclose(g, np.cos(np.asarray(x)))


def test_one_export_for_three_platforms_keeps_each_branch_for_its_own():
    """A branch only one platform can lower (a Mosaic kernel) does not stop the others: the TPU branch here is a
    Pallas TPU kernel, and the program lowered for TPU, CUDA and CPU runs its CPU branch on this host."""
    from jax.experimental import pallas as pl

    def mosaic_double(x):
        def kernel(x_ref, o_ref):
            o_ref[...] = x_ref[...] * 2.0

        return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)

    f = lambda x: platform_dependent(x, tpu=mosaic_double, default=lambda x: x - 1.0)
    x = jnp.arange(8 * 128, dtype=jnp.float32).reshape(8, 128)
    exported = jax.export.export(jax.jit(f), platforms=("tpu", "cuda", "cpu"))(x)
    assert "tpu_custom_call" in exported.mlir_module()
    assert np.array_equal(exported.call(x), np.asarray(x) - 1.0)
    with pytest.raises(Exception, match="[Oo]nly interpret mode"):  # jax's own switch lowers every branch everywhere
        jax.export.export(jax.jit(lambda x: jax.lax.platform_dependent(x, tpu=mosaic_double, default=lambda x: x)),
                          platforms=("tpu", "cpu"))(x)


def test_the_tpu_head_dim_padding_changes_no_number():
    from jax.experimental.pallas import tpu as pltpu

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 2, 128, 80)), jnp.float32) for _ in range(3))
    ids = jnp.ones((1, 128), jnp.int32).at[0, :5].set(0)  # left padding: its own segment
    with pltpu.force_tpu_interpret_mode(True), jax.default_matmul_precision("highest"):
        plain = pallas._flash_padded(q, k, v, ids, ids, True, 1)
        padded = pallas._flash_padded(q, k, v, ids, ids, True, pallas.LANES)  # 80 -> 128 zero columns
    assert padded.shape == plain.shape == q.shape
    assert np.abs(np.asarray(padded) - np.asarray(plain)).max() <= 1e-6
