"""The `cpu` backend: the native kernels of `qwen2vl_jax.kernels` (x86 CPUs with AVX2 + FMA), falling back to the
`xla` formulation wherever a kernel does not apply. Gradients are the `xla` formulation's."""

from __future__ import annotations

import functools

import qwen2vl_jax.attention.paged as paged  # by full name: `from . import` reads the package __init__

from .. import kernels
from .masks import DecoderMask, PagedBatch, VisionRotary, VisionSegments
from .xla import masked_attention
from .xla import vision_attention as xla_vision_attention


def decoder_attention(q_BTNH, k_BSKH, v_BSKH, mask: DecoderMask):
    """One-token steps: the fused decode kernel (one call per layer reading the cache in place, instead of ~10
    small XLA ops); prefill and training forwards: the `xla` formulation (XLA's dots are as fast here)."""
    return kernels.decode_attention(q_BTNH, k_BSKH, v_BSKH, mask.allowed_BTS, reference=masked_attention)


def _decode_or_reference(q_BTNH, k_BSKH, v_BSKH, allowed_BTS):
    return kernels.decode_attention(q_BTNH, k_BSKH, v_BSKH, allowed_BTS, reference=masked_attention)


def paged_attention(q_TNH, kv_PRCH, batch: PagedBatch):
    """The serving engine's attention over pages: each group's pages gathered (`paged.paged_attention`), its
    one-token decode slots through the fused decode kernel, a prefill chunk through the `xla` formulation."""
    return paged.paged_attention(q_TNH, kv_PRCH, batch, attend=_decode_or_reference)


def vision_attention(q_PNH, k_PNH, v_PNH, rotary: VisionRotary | None, segments: VisionSegments):
    """The fused rotary + flash-attention kernel over each segment's (first row, length): 2.2x the XLA ops. q and
    k that arrive rotated (hooks read them) take the `xla` formulation."""
    if rotary is None:
        return xla_vision_attention(q_PNH, k_PNH, v_PNH, None, segments)
    return kernels.rotary_segment_attention(q_PNH, k_PNH, v_PNH, rotary.cos_PH, rotary.sin_PH, segments,
                                            reference=_vision_reference(rotary.rotate))


@functools.cache
def _vision_reference(rotate):
    """The kernel's reference in the glue's signature `(q, k, v, cos, sin, segments)`: one function per rotation
    (the same object every call, so what the glue and JAX cache by function stays cached across blocks)."""

    def reference(q_PNH, k_PNH, v_PNH, cos_PH, sin_PH, segments):
        return xla_vision_attention(q_PNH, k_PNH, v_PNH, VisionRotary(cos_PH, sin_PH, rotate), segments)

    return reference
