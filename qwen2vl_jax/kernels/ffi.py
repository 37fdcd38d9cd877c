"""The raw FFI calls into the C++ kernels: shapes in, shapes out, no dispatch (call only when `available()`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .build import ATTENTION_TARGET, DECODE_ATTENTION_TARGET, GEMV_TARGET, INT4_GEMV_TARGET, INT8_GEMV_TARGET


def bf16_gemv(x_AI: jax.Array, w_OI: jax.Array) -> jax.Array:
    """`x[A, I] (f32) @ w[O, I]^T (bf16) -> f32[A, O]` (`csrc/bf16_gemv.cc`)."""
    out = jax.ShapeDtypeStruct((x_AI.shape[0], w_OI.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(GEMV_TARGET, out)(x_AI.astype(jnp.float32), w_OI)


def int8_gemv(x_AI: jax.Array, q_OI: jax.Array, scale_O: jax.Array) -> jax.Array:
    """`(x[A, I] (f32) @ q[O, I]^T (int8)) * scale[O] -> f32[A, O]` (`csrc/quant_gemv.cc`)."""
    out = jax.ShapeDtypeStruct((x_AI.shape[0], q_OI.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(INT8_GEMV_TARGET, out)(x_AI.astype(jnp.float32), q_OI, scale_O.astype(jnp.float32))


def int4_gemv(x_AI: jax.Array, q_OP: jax.Array, scale_OG: jax.Array) -> jax.Array:
    """`y[a, o] = sum_g scale[o, g] * (x[a, group g] @ q[o, group g])` for int4 `q[O, I / 2]` (uint8, two values per
    byte, low nibble first, in [-8, 7]) and `scale[O, G]` (groups of I / G columns, a multiple of 16) -> f32[A, O]
    (`csrc/quant_gemv.cc`)."""
    out = jax.ShapeDtypeStruct((x_AI.shape[0], q_OP.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(INT4_GEMV_TARGET, out)(x_AI.astype(jnp.float32), q_OP, scale_OG.astype(jnp.float32))


def segment_attention(q_PNH: jax.Array, k_PNH: jax.Array, v_PNH: jax.Array, bounds_Q2: jax.Array, scale: float,
                      cos_PH: jax.Array | None = None, sin_PH: jax.Array | None = None) -> jax.Array:
    """Softmax attention within row segments, fp32, rows `[P, N, H]` (`csrc/segment_attention.cc`).

    `bounds_Q2[q] = (first row, length)`: rows of segment q attend to each other only; a length-0 segment is
    padding; rows outside every segment come out 0. H must be a multiple of 8. With `cos_PH` / `sin_PH`, q and k
    are rotated first (`x * cos + rotate_half(x) * sin`, the vision rotary) inside the kernel.
    """
    out = jax.ShapeDtypeStruct(q_PNH.shape, jnp.float32)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    rotate = cos_PH is not None
    if not rotate:
        cos_PH = sin_PH = jnp.zeros((0, q_PNH.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(ATTENTION_TARGET, out)(f32(q_PNH), f32(k_PNH), f32(v_PNH), f32(cos_PH), f32(sin_PH),
                                                   bounds_Q2.astype(jnp.int32), scale=np.float32(scale),
                                                   rotate=rotate)


def decode_attention(q_BNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, valid_BS: jax.Array, scale: float,
                     probs_bf16: bool) -> jax.Array:
    """One query per row and head against the KV cache (GQA: head n reads kv head n // (N / K)); fp32 out
    (`csrc/decode_attention.cc`).

    The cache may be f32 or bf16 (read in place); `valid_BS` marks the slots a query may see; probabilities are
    rounded to bf16 before the value product when `probs_bf16`.
    """
    out = jax.ShapeDtypeStruct(q_BNH.shape, jnp.float32)
    return jax.ffi.ffi_call(DECODE_ATTENTION_TARGET, out)(q_BNH.astype(jnp.float32), k_BSKH, v_BSKH,
                                                          valid_BS.astype(jnp.bool_), scale=np.float32(scale),
                                                          probs_bf16=bool(probs_bf16))
