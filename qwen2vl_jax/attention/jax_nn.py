"""The `jax` backend: `jax.nn.dot_product_attention`. On a GPU with bf16 / fp16 activations it asks for cuDNN's
fused kernel (`implementation="cudnn"`) and falls back to XLA's formulation for what cuDNN refuses while tracing;
everywhere else it is XLA's formulation (jax 0.10's `implementation=None` always is). GQA is native (K kv heads
shared by groups of G query heads).

Numbers: fp32 scores and softmax as the reference, but jax's recipe for the value product (accumulated in the
activation dtype, bf16 dots with the BF16_BF16_F32 preset), so bf16 results differ from the `xla` backend's by bf16
rounding; fp32 results agree to fp32 rounding (tested against transformers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .masks import DecoderMask, VisionRotary, VisionSegments
from .xla import rotate_qk


def _attend(q, k, v, **kwargs):
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kwargs)
        except (NotImplementedError, ValueError, TypeError, RuntimeError):
            pass  # a shape, dtype or mask this cuDNN build does not take: XLA's formulation below
    return jax.nn.dot_product_attention(q, k, v, **kwargs)


def decoder_attention(q_BTNH, k_BSKH, v_BSKH, mask: DecoderMask):
    dtype = q_BTNH.dtype
    o_BTNH = _attend(q_BTNH, k_BSKH.astype(dtype), v_BSKH.astype(dtype), mask=mask.allowed_BTS[:, None],
                     scale=q_BTNH.shape[-1] ** -0.5)
    return o_BTNH.astype(dtype)


def vision_attention(q_PNH, k_PNH, v_PNH, rotary: VisionRotary | None, segments: VisionSegments):
    """Segments become batch rows (`[Q, L, N, H]`, gathered) with their lengths as sequence lengths. Where XLA's
    formulation runs, a segment's scores are one `[N, L, L]` buffer (the `xla` backend chunks the queries)."""
    q_PNH, k_PNH = rotate_qk(q_PNH, k_PNH, rotary)
    rows_QL = segments.rows_QL
    lengths_Q = segments.valid_QL.sum(axis=1).astype(jnp.int32)
    o_QLNH = _attend(q_PNH[rows_QL], k_PNH[rows_QL], v_PNH[rows_QL], scale=q_PNH.shape[-1] ** -0.5,
                     query_seq_lengths=lengths_Q, key_value_seq_lengths=lengths_Q)
    N, H = q_PNH.shape[1:]
    return o_QLNH.reshape(-1, N, H)[segments.row_slot_P].astype(v_PNH.dtype)
