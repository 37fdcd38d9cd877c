"""The `jax` backend: `jax.nn.dot_product_attention`, which takes cuDNN's fused kernel on GPUs where it applies
(else XLA's own formulation, as on CPU and TPU). Same math as the reference: fp32 scores and softmax,
probabilities in the activation dtype; GQA is native (K kv heads shared by groups of G query heads)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .masks import DecoderMask, VisionSegments
from .xla import apply_vision_rotary


def decoder_attention(q_BTNH, k_BSKH, v_BSKH, mask: DecoderMask):
    dtype = q_BTNH.dtype
    o_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BSKH.astype(dtype), v_BSKH.astype(dtype),
                                          mask=mask.allowed_BTS[:, None], scale=q_BTNH.shape[-1] ** -0.5)
    return o_BTNH.astype(dtype)


def vision_attention(q_PNH, k_PNH, v_PNH, cos_PH, sin_PH, segments: VisionSegments):
    """Segments become batch rows (`[Q, L, N, H]`, gathered) with their lengths as sequence lengths. The scores of
    a whole segment are one buffer `[Q, N, L, L]` where XLA's formulation runs (not on cuDNN)."""
    q_PNH = apply_vision_rotary(q_PNH, cos_PH, sin_PH)
    k_PNH = apply_vision_rotary(k_PNH, cos_PH, sin_PH)
    rows_QL = segments.rows_QL
    lengths_Q = segments.valid_QL.sum(axis=1).astype(jnp.int32)
    o_QLNH = jax.nn.dot_product_attention(q_PNH[rows_QL], k_PNH[rows_QL], v_PNH[rows_QL],
                                          scale=q_PNH.shape[-1] ** -0.5, query_seq_lengths=lengths_Q,
                                          key_value_seq_lengths=lengths_Q)
    N, H = q_PNH.shape[1:]
    return o_QLNH.reshape(-1, N, H)[segments.row_slot_P].astype(v_PNH.dtype)
