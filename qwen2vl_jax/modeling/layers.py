"""Building blocks shared by both towers: Linear, Embed, LayerNorm, RMSNorm, and the one dot recipe they use.

Why a shared file: the vision tower and the decoder use the same Linear, and how a dot is issued decides speed on
XLA:CPU (see docs/BENCHMARKS.md), so that recipe lives in one place:

* weights are stored like PyTorch's nn.Linear, `[out, in]`, and contracted on their minor axis (`x @ w.T`): the
  fastest matrix-vector layout on XLA:CPU, and HF conversion is a plain copy;
* bf16 weights are fed to the dot as bf16 with `preferred_element_type=float32`: a bf16-result dot makes XLA:CPU
  materialise an fp32 copy of the weight on every call;
* decode-sized dots with bf16 weights go to a native kernel on x86 CPUs (`kernels.matmul`); on the CPU elsewhere a
  single bf16 row is padded to two rows so the fast library (YNNPACK, which refuses vectors) takes the gemv.

Their parameters are made by `parameters.param`, with logical axis names (`modeling.partitioning`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from .. import kernels
from .parameters import param
from .partitioning import gathered_weight


def dense(x: jax.Array, w_OI: jax.Array, b_O: jax.Array | None = None) -> jax.Array:
    """`x[..., I] @ w[O, I]^T + b[O]`, accumulated in fp32, returned in x's dtype (`kernels.matmul` issues the
    dot: XLA's, or the native bf16 gemv for decode-sized products on the CPU)."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    y_AO = kernels.matmul(x.reshape(-1, n_in), w_OI)
    if b_O is not None:
        y_AO = y_AO + b_O.astype(jnp.float32)
    return y_AO.astype(x.dtype).reshape(*lead, w_OI.shape[0])


def unpack_int4(packed_OK: jax.Array) -> jax.Array:
    """Two signed 4-bit integers per byte (low nibble first) -> int8 values in [-8, 7], `[..., O, 2K]`."""
    u = packed_OK.astype(jnp.int32)
    low, high = u & 0xF, (u >> 4) & 0xF
    signed = lambda n: jnp.where(n >= 8, n - 16, n)
    return jnp.stack([signed(low), signed(high)], axis=-1).reshape(*packed_OK.shape[:-1], -1).astype(jnp.int8)


def _quantized_matmul_xla(x_AI: jax.Array, q_OI: jax.Array, scale: jax.Array) -> jax.Array:
    """`quantized_dense`'s product `f32[A, O]` as XLA ops (every platform; `kernels.quantized_matmul`'s reference)."""
    if scale.ndim == 1:  # int8, one scale per output channel
        return kernels.matmul(x_AI, q_OI.astype(x_AI.dtype)) * scale.astype(jnp.float32)
    # int4 groups
    q_OI = unpack_int4(q_OI)
    O, G = scale.shape
    x_GAK = jnp.swapaxes(x_AI.reshape(x_AI.shape[0], G, -1), 0, 1)
    q_GOK = jnp.swapaxes(q_OI.reshape(O, G, -1).astype(x_AI.dtype), 0, 1)
    y_GAO = jax.lax.dot_general(x_GAK, q_GOK, (((2,), (2,)), ((0,), (0,))), preferred_element_type=jnp.float32)
    return jnp.einsum("gao,og->ao", y_GAO, scale.astype(jnp.float32))


def quantized_dense(x: jax.Array, q_OI: jax.Array, scale: jax.Array, b_O: jax.Array | None = None) -> jax.Array:
    """`x @ (q * scale)^T + b` for weight-only quantized weights, in x's dtype, without the dequantized weight:

    * int8 per output channel: `q[O, I]` int8, `scale[O]`: `y = (x @ q^T) * scale`;
    * int4 in groups of g input columns: `q[O, I/2]` packed uint8, `scale[O, I/g]`:
      `y[o] = sum over groups G of (x[G] @ q[o, G]^T) * scale[o, G]`.

    The integers enter the dot in x's dtype (exact: |q| <= 127 is exact in bf16), products accumulate in fp32 and
    the scales multiply the fp32 partial sums (transformers has no such layer; the arithmetic is the definition of
    `dequantize(q, scale)` moved past the dot). `kernels.quantized_matmul` issues the product: the native int8 /
    int4 gemv for decode-sized products on the CPU, `_quantized_matmul_xla` otherwise."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    y_AO = kernels.quantized_matmul(x.reshape(-1, n_in), q_OI, scale, reference=_quantized_matmul_xla)
    if b_O is not None:
        y_AO = y_AO + b_O.astype(jnp.float32)
    return y_AO.astype(x.dtype).reshape(*lead, q_OI.shape[0])


def dequantized(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """The weight `q * scale` in `dtype` (computed in fp32): int8 `q[..., I]` with `scale[...]` (one per row), or
    int4 `q[..., I/2]` packed with `scale[..., G]` (one per group of I/G columns)."""
    if q.dtype == jnp.int8:
        return (q.astype(jnp.float32) * scale.astype(jnp.float32)[..., None]).astype(dtype)
    values = unpack_int4(q).astype(jnp.float32)
    *lead, I = values.shape
    G = scale.shape[-1]
    w = values.reshape(*lead, G, I // G) * scale.astype(jnp.float32)[..., None]
    return w.reshape(*lead, I).astype(dtype)


MLP_ROW_BLOCK = 2048  # long inputs run the MLPs in row blocks: their [rows, F] products are the largest tensors


def in_row_blocks(fn, x: jax.Array, block: int | None = None) -> jax.Array:
    """`fn(x)` for a row-wise `fn` (every leading axis of `x` is a row), computed in near-equal blocks of at most
    `block` rows (default MLP_ROW_BLOCK), one after the other (`lax.map`), when there are more than 2 x block rows:
    then only one block's intermediates exist at a time (a 16k-token prefill's fp32 `[rows, F]` MLP products are
    2 x 0.59 GB on the 2B). Each row's numbers are the whole call's."""
    block = MLP_ROW_BLOCK if block is None else block
    *lead, D = x.shape
    rows = math.prod(lead)
    if rows <= 2 * block:
        return fn(x)
    n = -(-rows // block)
    size = (-(-rows // n) + 7) // 8 * 8  # n near-equal blocks, 8-row aligned: padding under n x 8 rows
    x_NCD = jnp.pad(x.reshape(rows, D), ((0, n * size - rows), (0, 0))).reshape(n, size, D)
    y_NCO = jax.lax.map(fn, x_NCD)
    return y_NCO.reshape(n * size, -1)[:rows].reshape(*lead, y_NCO.shape[-1])


def rowwise(mlp, x: jax.Array) -> jax.Array:
    """`mlp(x)` for a row-wise block (an MLP), in row blocks (`in_row_blocks`) when it allows it
    (`mlp.row_blockable()`: nothing needs the whole call at once)."""
    return in_row_blocks(mlp, x) if mlp.row_blockable() else mlp(x)


class Linear(nnx.Module):
    """nn.Linear with the PyTorch weight layout `[out, in]` (so the HF key map is a copy, not a transpose)."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, axes: tuple[str, str],
                 param_dtype=jnp.float32, rngs: nnx.Rngs, init_std: float = 0.02):
        self.in_features, self.out_features = in_features, out_features
        self.weight = param(init_std * jax.random.normal(rngs.params(), (out_features, in_features), param_dtype),
                            axes)
        self.bias = param(jnp.zeros((out_features,), param_dtype), (axes[0],)) if use_bias else None
        self.axes = axes
        self.lora = nnx.data(None)  # a low-rank adapter, set by `qwen2vl_jax.lora.apply_lora` (None: plain nn.Linear)
        self.scale = nnx.data(None)  # weight-only quantization's scales (`qwen2vl_jax.quantization`; None: none)
        self.weight_axes = axes  # the stored weight's axes (int4 packs two input columns a byte)

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        if self.scale is None:
            y = dense(x, gathered_weight(self.weight[...], self.axes), bias)
        else:  # `weight` holds the integers
            scale_axes = self.axes[:1] + (None,) * (self.scale.ndim - 1)
            y = quantized_dense(x, gathered_weight(self.weight[...], self.weight_axes),
                                gathered_weight(self.scale[...], scale_axes), bias)
        if self.lora is not None:
            # peft `lora.Linear.forward`: base result + B(A(dropout(x))) * scaling computed in the adapter's dtype,
            # the sum cast back to the base result's dtype.
            y = (y.astype(jnp.float32) + self.lora(x).astype(jnp.float32)).astype(y.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding `[V, D]`; `attend` reuses it as a tied output projection (2B).

    Quantized (`qwen2vl_jax.quantization`, a tied model's lm_head), `weight` holds the integers and `scale` their
    scales: the lookup dequantizes the rows it reads (`dequantized`), `attend` is `quantized_dense`."""

    def __init__(self, num_embeddings: int, features: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 init_std: float = 0.02):
        self.weight = param(init_std * jax.random.normal(rngs.params(), (num_embeddings, features), param_dtype),
                            ("vocab", "embed"))
        self.in_features, self.out_features = features, num_embeddings  # as the tied lm_head sees it
        self.dtype = jnp.dtype(param_dtype)  # the embeddings' dtype (a quantized `weight` holds integers)
        self.axes = self.weight_axes = ("vocab", "embed")
        self.scale = nnx.data(None)  # weight-only quantization's scales (None: none)

    def __call__(self, ids_BT: jax.Array) -> jax.Array:
        if self.scale is None:
            return jnp.take(self.weight[...], ids_BT, axis=0)
        return dequantized(jnp.take(self.weight[...], ids_BT, axis=0), jnp.take(self.scale[...], ids_BT, axis=0),
                           self.dtype)

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        if self.scale is None:
            return dense(x_BTD, gathered_weight(self.weight[...], self.axes))
        scale_axes = self.axes[:1] + (None,) * (self.scale.ndim - 1)
        return quantized_dense(x_BTD, gathered_weight(self.weight[...], self.weight_axes),
                               gathered_weight(self.scale[...], scale_axes))


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm (biased variance, eps inside the sqrt), computed in fp32 and cast back."""

    def __init__(self, features: int, *, eps: float, axis_name: str, param_dtype=jnp.float32):
        self.eps, self.axis_name = eps, axis_name
        self.weight = param(jnp.ones((features,), param_dtype), (axis_name,))
        self.bias = param(jnp.zeros((features,), param_dtype), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        w, b = (gathered_weight(p[...], (self.axis_name,)) for p in (self.weight, self.bias))
        y = y * w.astype(jnp.float32) + b.astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """Qwen2RMSNorm: normalise in fp32, cast back to the input dtype, *then* multiply by the weight (transformers
    `Qwen2RMSNorm.forward`)."""

    def __init__(self, features: int, *, eps: float, axis_name: str = "embed", param_dtype=jnp.float32):
        self.eps, self.axis_name = eps, axis_name
        self.weight = param(jnp.ones((features,), param_dtype), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return gathered_weight(self.weight[...], (self.axis_name,)) * x32.astype(x.dtype)
