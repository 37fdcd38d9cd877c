"""The `auto` backend (what `attn_implementation=None` means): each platform's own kernels, chosen when a program
is lowered (`jax.lax.platform_dependent`), so one program exported for `("tpu", "cuda", "cpu")` carries all three:

* TPU: the `pallas` backend's Mosaic flash attention (`xla` for decode steps);
* CUDA: the `jax` backend's cuDNN fused attention (XLA's formulation where cuDNN refuses the shape) for the
  vision tower and calls whose queries start at slot 0 (prefill, training forwards); `xla` for decode steps, as on
  TPU (a one-token query gains nothing from a fused kernel, and cuDNN's support for it varies by version);
* CPU: the `cpu` backend (the native kernels where this host built them, else the `xla` formulation);
* anything else (ROCm): the `xla` formulation.

The serving engine's paged attention: Pallas `ragged_paged_attention` on TPU, the `cpu` backend's on the CPU (the
fused decode kernel for one-token slots), the `xla` formulation elsewhere.

A program lowered for one platform contains only that platform's branch (`compiled for the CPU` is the `cpu`
backend's program, op for op).
"""

from __future__ import annotations

import qwen2vl_jax.attention.cpu as cpu  # by full name: `from . import` would read the package __init__
import qwen2vl_jax.attention.jax_nn as jax_nn
import qwen2vl_jax.attention.paged as paged
import qwen2vl_jax.attention.pallas as pallas
import qwen2vl_jax.attention.pallas_paged as pallas_paged
import qwen2vl_jax.attention.xla as xla

from .masks import DecoderMask, PagedBatch, VisionRotary, VisionSegments
from .platforms import platform_dependent


def _cuda_decoder_attention(q_BTNH, k_BSKH, v_BSKH, mask: DecoderMask):
    if not pallas.starts_at_zero(q_BTNH, mask):
        return xla.decoder_attention(q_BTNH, k_BSKH, v_BSKH, mask)
    return jax_nn.cuda_decoder_attention(q_BTNH, k_BSKH, v_BSKH, mask)


def decoder_attention(q_BTNH, k_BSKH, v_BSKH, mask: DecoderMask):
    return platform_dependent(q_BTNH, k_BSKH, v_BSKH, mask, tpu=pallas.tpu_decoder_attention,
                              cuda=_cuda_decoder_attention, cpu=cpu.decoder_attention, default=xla.decoder_attention)


def vision_attention(q_PNH, k_PNH, v_PNH, rotary: VisionRotary | None, segments: VisionSegments):
    return platform_dependent(q_PNH, k_PNH, v_PNH, rotary, segments, tpu=pallas.tpu_vision_attention,
                              cuda=jax_nn.cuda_vision_attention, cpu=cpu.vision_attention, default=xla.vision_attention)


def paged_attention(q_TNH, kv_PRCH, batch: PagedBatch):
    """The serving engine's paged attention: Pallas `ragged_paged_attention` on TPU, the `cpu` backend's (the
    fused decode kernel for the decode slots) on the CPU, the `xla` formulation elsewhere. Shapes or dtypes the TPU
    kernel does not take (`pallas_paged.check_supported`) run the `xla` formulation on TPU too."""
    try:
        pallas_paged.check_supported(q_TNH, kv_PRCH)
        tpu = pallas_paged.tpu_paged_attention
    except ValueError:
        tpu = paged.paged_attention
    return platform_dependent(q_TNH, kv_PRCH, batch, tpu=tpu, cpu=cpu.paged_attention, default=paged.paged_attention)


def platform_backend(platform: str) -> str:
    """The built-in backend `auto` runs on `platform` ("tpu", "cuda", "rocm", "cpu")."""
    from .. import kernels

    return {"tpu": "pallas", "cuda": "jax", "cpu": "cpu" if kernels.available() else "xla"}.get(platform, "xla")
