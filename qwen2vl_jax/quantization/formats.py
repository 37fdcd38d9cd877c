"""The weight formats: symmetric absmax quantization of a `[..., O, I]` weight (PyTorch layout), and back.

* int8 per output channel: `scale[o] = max_i |w[o, i]| / 127`, `q = round(w / scale)` in [-127, 127] (int8);
* int4 in groups of `group` input columns: `scale[o, G] = max over the group |w| / 7`, `q = round(w / scale)`
  clipped to [-8, 7], two per byte (low nibble first: `layers.unpack_int4`), `[..., O, I / 2]` uint8.

A row (group) of zeros gets scale 1 (q = 0). Rounding is half to even (NumPy's and XLA's `round`). The math runs in
fp32 whatever the weight's dtype, with correctly rounded divisions (`_divide`: NumPy's fp32 `round(w / scale)` to
the bit); scales are stored in fp32. `dequantize(*quantize(w)) ` is the weight the quantized
model computes with (`layers.quantized_dense`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..modeling.layers import dequantized

MODES = ("int8", "int4")


class QuantizationError(ValueError):
    """A quantization that cannot be done: an unknown mode, a width int4's groups do not divide, nothing to do."""


INT4_GROUP = 128  # input columns per int4 scale (what GPTQ / AWQ checkpoints and qwix's tile_size use)


def _divide(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a / b` correctly rounded, `b` broadcast to `a`'s shape. XLA rewrites a division by a broadcast into a
    multiplication by the broadcast reciprocal, one ulp off for ~10% of quotients, and an ulp flips a round-half-
    to-even tie (measured: 8 of the 9.7 M weights of a 151936-row head quantized one step off the definition). A
    divisor selected per element is not a broadcast, so the true division stays, fused in the same loop."""
    return a / jnp.where(a == a, b, 1.0)


def _scaled(w, levels: int):
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, _divide(amax, jnp.float32(levels)), 1.0)
    return w32, scale


@jax.jit  # one fused pass: eagerly, each step would materialise an fp32 copy of the weight
def quantize_int8(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`(q[..., O, I] int8, scale[..., O] fp32)`."""
    w32, scale = _scaled(w, 127)
    return jnp.clip(jnp.round(_divide(w32, scale)), -127, 127).astype(jnp.int8), scale[..., 0]


@functools.partial(jax.jit, static_argnames="group")
def quantize_int4(w: jax.Array, group: int = INT4_GROUP) -> tuple[jax.Array, jax.Array]:
    """`(q[..., O, I/2] uint8 (packed), scale[..., O, I/group] fp32)`; I must be a multiple of `group`."""
    *lead, O, I = w.shape
    if I % group or group % 2:
        raise QuantizationError(f"int4 groups of {group} columns need the input width ({I}) to be a multiple of it")
    w32, scale = _scaled(w.reshape(*lead, O, I // group, group), 7)
    q = jnp.clip(jnp.round(_divide(w32, scale)), -8, 7).astype(jnp.int32).reshape(*lead, O, I // 2, 2)
    packed = (q[..., 0] & 0xF) | ((q[..., 1] & 0xF) << 4)
    return packed.astype(jnp.uint8), scale[..., 0]


def quantize_weight(w: jax.Array, mode: str, group: int = INT4_GROUP) -> tuple[jax.Array, jax.Array]:
    if mode == "int8":
        return quantize_int8(w)
    if mode == "int4":
        return quantize_int4(w, group)
    raise QuantizationError(f"unknown quantization {mode!r}; choose one of {MODES}")


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
    """The fp32 weight `q * scale` (int8: scale per row; int4: packed q, scale per group)."""
    return dequantized(q, scale, jnp.float32)
