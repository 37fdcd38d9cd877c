"""How the model calls the kernels: shape checks, platform dispatch, and gradients through the reference.

Each entry point takes the XLA formulation it replaces (`reference`) and falls back to it whenever the kernel does
not apply: the kernels are off (`available()`), the shapes or dtypes are ones the kernel does not take, or the
computation is lowered for another platform (`jax.lax.platform_dependent`). The kernels are forward-only, so their
gradients are the reference's (`jax.custom_vjp`): training through the `cpu` backend differentiates the same math.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from .build import MAX_ROWS, available
from .ffi import bf16_gemv, int4_gemv, int8_gemv
from .ffi import decode_attention as ffi_decode_attention
from .ffi import segment_attention as ffi_segment_attention

# lax.dot_general dimension numbers for x[A, I] . w[O, I]^T (the PyTorch Linear layout).
_CONTRACT_MINOR = (((1,), (1,)), ((), ()))


@functools.cache
def _with_reference_gradient(kernel: Callable, reference: Callable, n_diff: int) -> Callable:
    """`kernel` forward, `reference`'s gradient for the first `n_diff` arguments (the rest get none)."""

    @jax.custom_vjp
    def fn(*args):
        return kernel(*args)

    def fwd(*args):
        return fn(*args), args

    def bwd(args, g):
        _, pullback = jax.vjp(lambda *diff: reference(*diff, *args[n_diff:]), *args[:n_diff])
        return (*pullback(g), *(None,) * (len(args) - n_diff))

    fn.defvjp(fwd, bwd)
    return fn


def _on_cpu(kernel: Callable, reference: Callable, n_diff: int, *args):
    """The kernel when lowering for the CPU, the reference for any other platform."""
    return jax.lax.platform_dependent(*args, cpu=_with_reference_gradient(kernel, reference, n_diff),
                                      default=reference)


# --------------------------------------------------------------------------------------------------- matmul
def _pad_single_row(x_AI, w_OI):
    # YNNPACK (XLA:CPU's fast library) rejects m == 1 for bf16; two rows are as cheap as one and 10x faster than
    # the fallback. A CPU-only concern: other platforms take one row as it is.
    return jax.lax.dot_general(jnp.pad(x_AI, ((0, 1), (0, 0))), w_OI, _CONTRACT_MINOR,
                               preferred_element_type=jnp.float32)[:1]


def xla_matmul(x_AI: jax.Array, w_OI: jax.Array) -> jax.Array:
    """`x[A, I] @ w[O, I]^T` as one XLA dot, fp32 accumulation and result.

    Low-precision weights are fed as they are with `preferred_element_type=float32` (a bf16-result dot makes
    XLA:CPU materialise an fp32 copy of the weight on every call); x is cast to the weight's dtype, and so is the
    gradient in the backward pass (`_low_precision_dot`).
    """
    if w_OI.dtype != jnp.float32:
        x_AI = x_AI.astype(w_OI.dtype)
        if x_AI.shape[0] == 1:
            plain = lambda x, w: jax.lax.dot_general(x, w, _CONTRACT_MINOR, preferred_element_type=jnp.float32)
            return jax.lax.platform_dependent(x_AI, w_OI, cpu=_pad_single_row, default=plain)
        return _low_precision_dot(x_AI, w_OI)
    return jax.lax.dot_general(x_AI, w_OI, _CONTRACT_MINOR, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _low_precision_dot(x_AI: jax.Array, w_OI: jax.Array) -> jax.Array:
    """A bf16 x bf16 -> fp32 dot whose backward dots are bf16 x bf16 -> fp32 too (torch's bf16 autograd). JAX's own
    transpose rule contracts the fp32 cotangent with the bf16 weight, which upcasts every weight to an fp32 copy:
    twice the weights' memory in a training step."""
    return jax.lax.dot_general(x_AI, w_OI, _CONTRACT_MINOR, preferred_element_type=jnp.float32)


def _low_precision_dot_fwd(x_AI, w_OI):
    return _low_precision_dot(x_AI, w_OI), (x_AI, w_OI)


def _low_precision_dot_bwd(res, g_AO):
    x_AI, w_OI = res
    g_AO = g_AO.astype(w_OI.dtype)
    dx_AI = jax.lax.dot_general(g_AO, w_OI, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    dw_OI = jax.lax.dot_general(g_AO, x_AI, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dx_AI.astype(x_AI.dtype), dw_OI.astype(w_OI.dtype)


_low_precision_dot.defvjp(_low_precision_dot_fwd, _low_precision_dot_bwd)


def matmul(x_AI: jax.Array, w_OI: jax.Array) -> jax.Array:
    """`x[A, I] @ w[O, I]^T -> f32[A, O]`: the native bf16 gemv for decode-sized products with bf16 weights
    (at most `MAX_ROWS` rows) when the kernels are available, `xla_matmul` otherwise."""
    if w_OI.dtype == jnp.bfloat16 and x_AI.shape[0] <= MAX_ROWS and available():
        return _on_cpu(bf16_gemv, xla_matmul, 2, x_AI, w_OI)
    return xla_matmul(x_AI, w_OI)


# -------------------------------------------------------------------------------------- quantized matmul
def _quantized_kernel(x_AI, q_OI, scale):
    return int8_gemv(x_AI, q_OI, scale) if scale.ndim == 1 else int4_gemv(x_AI, q_OI, scale)


def _quantized_kernel_applies(x_AI, q_OI, scale) -> bool:
    """The shapes and dtypes `csrc/quant_gemv.cc` takes: int8 `q[O, I]` with `scale[O]`, or int4 `q[O, I/2]` (uint8)
    with `scale[O, G]` and groups of I/G columns, a multiple of 16; x in a dtype fp32 holds exactly."""
    if x_AI.ndim != 2 or q_OI.ndim != 2 or x_AI.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        return False
    (_, n_in), (n_out, width) = x_AI.shape, q_OI.shape
    if q_OI.dtype == jnp.int8 and scale.shape == (n_out,):
        return width == n_in
    if q_OI.dtype == jnp.uint8 and scale.ndim == 2 and scale.shape[0] == n_out and scale.shape[1] > 0:
        groups = scale.shape[1]
        return 2 * width == n_in and n_in % groups == 0 and (n_in // groups) % 16 == 0
    return False


def quantized_matmul(x_AI: jax.Array, q_OI: jax.Array, scale: jax.Array, *, reference: Callable) -> jax.Array:
    """`x[A, I] @ (q * scale)[O, I]^T -> f32[A, O]` for weight-only quantized weights: int8 `q[O, I]` with one scale
    per output channel `scale[O]`, or int4 packed `q[O, I/2]` (uint8, low nibble first) with `scale[O, G]`, one per
    group of I/G input columns. The native int8 / int4 gemv (`csrc/quant_gemv.cc`: the integers widened in
    registers, fp32 accumulation, the scales applied to fp32 partial sums) for decode-sized products (at most
    `MAX_ROWS` rows) when the kernels are available.

    `reference(x, q, scale)` is the same math in XLA ops: used off the CPU, for more rows, for shapes the kernel
    does not take (int4 groups not a multiple of 16 columns), and for gradients: x's is the reference's; the
    integers and scales get none (a frozen quantized base: QLoRA trains adapters beside it).
    """
    if x_AI.shape[0] <= MAX_ROWS and _quantized_kernel_applies(x_AI, q_OI, scale) and available():
        return _on_cpu(_quantized_kernel, reference, 1, x_AI, q_OI, scale)
    return reference(x_AI, q_OI, scale)


# ------------------------------------------------------------------------------------------------ attention
def _segment_kernel(q_PNH, k_PNH, v_PNH, cos_PH, sin_PH, segments):
    o_PNH = ffi_segment_attention(q_PNH, k_PNH, v_PNH, segments.bounds_Q2, q_PNH.shape[-1] ** -0.5, cos_PH, sin_PH)
    return o_PNH.astype(v_PNH.dtype)


def rotary_segment_attention(q_PNH, k_PNH, v_PNH, cos_PH, sin_PH, segments, *, reference: Callable):
    """The vision rotary on q and k, then softmax attention inside each segment, in one fused kernel that reads
    `segments.bounds_Q2[q] = (first row, length)` (fp32 inside: a bf16 model's rotated q and k are not rounded
    back to bf16).

    `reference(q, k, v, cos, sin, segments)` is the same math in XLA ops: used off the CPU, for head dims that are
    not a multiple of 8, and for gradients.
    """
    args = (q_PNH, k_PNH, v_PNH, cos_PH, sin_PH, segments)
    if q_PNH.shape[-1] % 8 or not available():
        return reference(*args)
    return _on_cpu(_segment_kernel, reference, 3, *args)


def _decode_kernel(q_B1NH, k_BSKH, v_BSKH, allowed_B1S):
    o_BNH = ffi_decode_attention(q_B1NH[:, 0], k_BSKH, v_BSKH, allowed_B1S[:, 0], q_B1NH.shape[-1] ** -0.5,
                                 probs_bf16=q_B1NH.dtype == jnp.bfloat16)
    return o_BNH[:, None].astype(q_B1NH.dtype)


def decode_attention(q_B1NH, k_BSKH, v_BSKH, allowed_B1S, *, reference: Callable):
    """Attention of one new token per row over the KV cache in one call per layer (reads the cache in place).

    `reference(q, k, v, allowed)` is the same math in XLA ops: used off the CPU, when there is more than one query,
    for head dims not a multiple of 8, dtypes other than f32 / bf16 or a cache in another dtype, and for gradients.
    """
    args = (q_B1NH, k_BSKH, v_BSKH, allowed_B1S)
    dtype = q_B1NH.dtype
    if (q_B1NH.shape[1] != 1 or q_B1NH.shape[-1] % 8 or k_BSKH.dtype != dtype or v_BSKH.dtype != dtype
            or dtype not in (jnp.float32, jnp.bfloat16) or not available()):
        return reference(*args)
    return _on_cpu(_decode_kernel, reference, 3, *args)
