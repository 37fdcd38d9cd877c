"""The `pallas` backend: flash attention from `jax.experimental.pallas.ops.tpu` (the kernel MaxText and
jax-llm-examples use on TPU). On TPU it compiles with Mosaic; anywhere else it runs in Pallas' TPU interpret mode
(`pltpu.force_tpu_interpret_mode`), which is slow and meant for checking numbers on a CPU.

* decoder: queries and keys both start at slot 0 (a forward without a cache, a prefill into an empty cache, a
  training step): `causal=True` with segment ids 1 for real tokens and 0 for padding, so a real query sees exactly
  the real keys at or before it. Calls whose queries start elsewhere (decode steps, continuing a filled cache) use
  the `xla` formulation: the kernel's causal mask has no offset, and a one-token step gains nothing from tiling.
* vision: non-causal, segment ids = the rows' segments (padding rows in their own segment).

GQA: kv heads are repeated to the query heads (the kernel wants equal head counts). Sequences are padded to the
kernel's 128-row blocks and the padding is given a segment no real row has. Head dims that are not a multiple of
128 are passed as they are: correct in interpret mode, not checked on a TPU here.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from .masks import DecoderMask, VisionSegments
from .xla import apply_vision_rotary
from .xla import decoder_attention as xla_decoder_attention

BLOCK = 128  # the kernel's default (and minimum) key block


def unavailable_reason() -> str:
    try:
        from jax.experimental.pallas import tpu as pltpu  # noqa: F401
        from jax.experimental.pallas.ops.tpu import flash_attention  # noqa: F401
    except Exception as e:  # an install without Pallas' TPU ops
        return f"jax.experimental.pallas.ops.tpu.flash_attention does not import ({type(e).__name__}: {e})"
    return ""


def _mode():
    from jax.experimental.pallas import tpu as pltpu

    return contextlib.nullcontext() if jax.default_backend() == "tpu" else pltpu.force_tpu_interpret_mode()


def _pad_to_block(x, axis: int, value=0):
    n = x.shape[axis]
    extra = -n % BLOCK
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _flash(q_BNTH, k_BNSH, v_BNSH, q_ids_BT, kv_ids_BS, *, causal: bool):
    from jax.experimental.pallas.ops.tpu.flash_attention import SegmentIds, flash_attention

    T = q_BNTH.shape[2]
    pad = lambda x, value=0: _pad_to_block(x, x.ndim - 1 if x.ndim == 2 else 2, value)
    segment_ids = SegmentIds(q=pad(q_ids_BT.astype(jnp.int32), -2), kv=pad(kv_ids_BS.astype(jnp.int32), -3))
    with _mode():
        o_BNTH = flash_attention(pad(q_BNTH), pad(k_BNSH), pad(v_BNSH), segment_ids=segment_ids, causal=causal,
                                 sm_scale=q_BNTH.shape[-1] ** -0.5)
    return o_BNTH[:, :, :T]


def decoder_attention(q_BTNH, k_BSKH, v_BSKH, mask: DecoderMask):
    T = q_BTNH.shape[1]
    if not isinstance(mask.query_start, int) or mask.query_start != 0 or T == 1:
        return xla_decoder_attention(q_BTNH, k_BSKH, v_BSKH, mask)
    dtype = q_BTNH.dtype
    G = q_BTNH.shape[2] // k_BSKH.shape[2]
    heads_major = lambda x: jnp.repeat(jnp.swapaxes(x.astype(dtype), 1, 2), G, axis=1)  # [B, S, K, H] -> [B, N, S, H]
    valid_BS = mask.key_valid_BS.astype(jnp.int32)
    o_BNTH = _flash(jnp.swapaxes(q_BTNH, 1, 2), heads_major(k_BSKH), heads_major(v_BSKH), valid_BS[:, :T],
                    valid_BS, causal=True)
    return jnp.swapaxes(o_BNTH, 1, 2).astype(dtype)


def vision_attention(q_PNH, k_PNH, v_PNH, cos_PH, sin_PH, segments: VisionSegments):
    q_PNH = apply_vision_rotary(q_PNH, cos_PH, sin_PH)
    k_PNH = apply_vision_rotary(k_PNH, cos_PH, sin_PH)
    to_1NPH = lambda x: jnp.swapaxes(x, 0, 1)[None]
    ids_1P = segments.segment_ids_P[None]
    o_1NPH = _flash(to_1NPH(q_PNH), to_1NPH(k_PNH), to_1NPH(v_PNH), ids_1P, ids_1P, causal=False)
    return jnp.swapaxes(o_1NPH[0], 0, 1).astype(v_PNH.dtype)
