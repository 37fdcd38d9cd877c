"""The `pallas` backend: flash attention from `jax.experimental.pallas.ops.tpu` (the kernel MaxText and
jax-llm-examples use on TPU), chosen by the platform a program is lowered for (`jax.lax.platform_dependent`), not
by the host that traces it:

* TPU: the kernel compiled by Mosaic (a `tpu_custom_call` in the program). Head dims that are not a multiple of
  128 (the vision tower's 80) are zero-padded to the next multiple (lane-aligned blocks; q.k and the value
  product are unchanged by zero columns, which are sliced off); the scale stays the real head dim's.
* CPU: the same kernel in Pallas' interpret mode (`interpret=True`: the kernel body as XLA ops; slow, for checking
  numbers), unpadded.
* GPUs (and any other platform): the `jax` backend (`jax.nn.dot_product_attention`: cuDNN's fused kernel where
  it takes the shape); Pallas' TPU kernels do not run there.

* decoder: queries and keys both start at slot 0 (a forward without a cache, a prefill into an empty cache, a
  training step): `causal=True` with segment ids 1 for real tokens and 0 for padding, so a real query sees exactly
  the real keys at or before it. Calls whose queries start elsewhere (decode steps, continuing a filled cache) use
  the `xla` formulation: the kernel's causal mask has no offset, and a one-token step gains nothing from tiling.
  Rows at padding positions attend to padding keys here (the `xla` backend spreads them over every slot): garbage
  in both, and neither is used.
* vision: each segment is a batch row (`[Q, N, L, H]`, gathered), its padding slots a segment id of their own.

GQA: kv heads are repeated to the query heads (the kernel wants equal head counts). Sequences are padded to the
kernel's 128-row blocks with segment ids no real row has. In interpret mode the backward pass is interpreted too
(a custom VJP re-enters the mode, since the backward is traced outside the forward's context).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import qwen2vl_jax.attention.jax_nn as jax_nn  # by full name: `from . import` reads the package __init__

from .masks import DecoderMask, VisionRotary, VisionSegments
from .platforms import platform_dependent
from .sharding import shard_mapped
from .xla import decoder_attention as xla_decoder_attention
from .xla import rotate_qk

BLOCK = 128  # the kernel's default (and minimum) key block
LANES = 128  # a TPU vector register's lanes: head dims are padded to a multiple of this on TPU


def unavailable_reason() -> str:
    try:
        from jax.experimental.pallas import tpu as pltpu  # noqa: F401
        from jax.experimental.pallas.ops.tpu import flash_attention  # noqa: F401
    except Exception as e:  # an install without Pallas' TPU ops
        return f"jax.experimental.pallas.ops.tpu.flash_attention does not import ({type(e).__name__}: {e})"
    return ""


def _pad(x, axis: int, value=0):
    extra = -x.shape[axis] % BLOCK
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _flash_padded(q_BNTH, k_BNSH, v_BNSH, q_ids_BT, kv_ids_BS, causal: bool, lanes: int = 1):
    """The kernel on sequences padded to whole blocks and head dims padded to a multiple of `lanes`."""
    from jax.experimental.pallas.ops.tpu.flash_attention import SegmentIds, flash_attention

    T, H = q_BNTH.shape[2:]
    pad_H = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, -H % lanes),)) if H % lanes else x
    segment_ids = SegmentIds(q=_pad(q_ids_BT.astype(jnp.int32), 1, -2), kv=_pad(kv_ids_BS.astype(jnp.int32), 1, -3))
    o_BNTH = flash_attention(*(pad_H(_pad(x, 2)) for x in (q_BNTH, k_BNSH, v_BNSH)), segment_ids=segment_ids,
                             causal=causal, sm_scale=H ** -0.5)
    return o_BNTH[:, :, :T, :H]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _interpreted(q_BNTH, k_BNSH, v_BNSH, q_ids_BT, kv_ids_BS, causal):
    from jax.experimental.pallas import tpu as pltpu

    with pltpu.force_tpu_interpret_mode(True):
        return _flash_padded(q_BNTH, k_BNSH, v_BNSH, q_ids_BT, kv_ids_BS, causal)


def _interpreted_fwd(q, k, v, q_ids, kv_ids, causal):
    return _interpreted(q, k, v, q_ids, kv_ids, causal), (q, k, v, q_ids, kv_ids)


def _interpreted_bwd(causal, residuals, g):
    from jax.experimental.pallas import tpu as pltpu

    q, k, v, q_ids, kv_ids = residuals
    with pltpu.force_tpu_interpret_mode(True):
        _, pullback = jax.vjp(lambda q, k, v: _flash_padded(q, k, v, q_ids, kv_ids, causal), q, k, v)
        return (*pullback(g), None, None)


_interpreted.defvjp(_interpreted_fwd, _interpreted_bwd)


def _flash(q_BNTH, k_BNSH, v_BNSH, q_ids_BT, kv_ids_BS, *, causal: bool, on_tpu: bool, heads: str):
    """On TPU the Mosaic kernel, under `shard_map` on a mesh (XLA cannot partition it): rows split like the batch,
    heads like the `heads` logical axis. In interpret mode the kernel is XLA ops, which XLA partitions itself."""
    if on_tpu:
        kernel = functools.partial(_flash_padded, causal=causal, lanes=LANES)
        rows_heads = ("batch", heads, None, None)
        return shard_mapped(kernel, (q_BNTH, k_BNSH, v_BNSH, q_ids_BT, kv_ids_BS),
                            (rows_heads,) * 3 + (("batch", None),) * 2, rows_heads)
    return _interpreted(q_BNTH, k_BNSH, v_BNSH, q_ids_BT, kv_ids_BS, causal)


def starts_at_zero(q_BTNH, mask: DecoderMask) -> bool:
    """Queries and keys both start at slot 0 (more than one query): what a causal flash kernel takes."""
    return isinstance(mask.query_start, int) and mask.query_start == 0 and q_BTNH.shape[1] > 1


def decoder_attention(q_BTNH, k_BSKH, v_BSKH, mask: DecoderMask):
    """Mosaic on TPU, interpret mode on the CPU, the `jax` backend elsewhere (chosen when lowered)."""
    if not starts_at_zero(q_BTNH, mask):
        return xla_decoder_attention(q_BTNH, k_BSKH, v_BSKH, mask)
    return platform_dependent(q_BTNH, k_BSKH, v_BSKH, mask, tpu=_decoder_tpu, cpu=_decoder_interpreted,
                              default=jax_nn.decoder_attention)


def tpu_decoder_attention(q_BTNH, k_BSKH, v_BSKH, mask: DecoderMask):
    """The TPU branch alone (the `auto` backend's choice on TPU): Mosaic flash attention, `xla` for decode steps."""
    if not starts_at_zero(q_BTNH, mask):
        return xla_decoder_attention(q_BTNH, k_BSKH, v_BSKH, mask)
    return _decoder_tpu(q_BTNH, k_BSKH, v_BSKH, mask)


def _decoder_flash(q_BTNH, k_BSKH, v_BSKH, mask: DecoderMask, *, on_tpu: bool):
    T = q_BTNH.shape[1]
    dtype = q_BTNH.dtype
    G = q_BTNH.shape[2] // k_BSKH.shape[2]
    heads_major = lambda x: jnp.repeat(jnp.swapaxes(x.astype(dtype), 1, 2), G, axis=1)  # [B,S,K,H] -> [B,N,S,H]
    valid_BS = mask.key_valid_BS.astype(jnp.int32)
    o_BNTH = _flash(jnp.swapaxes(q_BTNH, 1, 2), heads_major(k_BSKH), heads_major(v_BSKH), valid_BS[:, :T],
                    valid_BS, causal=True, on_tpu=on_tpu, heads="q_heads")
    return jnp.swapaxes(o_BNTH, 1, 2).astype(dtype)


_decoder_tpu = functools.partial(_decoder_flash, on_tpu=True)
_decoder_interpreted = functools.partial(_decoder_flash, on_tpu=False)


def vision_attention(q_PNH, k_PNH, v_PNH, rotary: VisionRotary | None, segments: VisionSegments):
    """Mosaic on TPU, interpret mode on the CPU, the `jax` backend elsewhere (chosen when lowered)."""
    return platform_dependent(q_PNH, k_PNH, v_PNH, rotary, segments, tpu=_vision_tpu, cpu=_vision_interpreted,
                              default=jax_nn.vision_attention)


def _vision_flash(q_PNH, k_PNH, v_PNH, rotary: VisionRotary | None, segments: VisionSegments, *, on_tpu: bool):
    q_PNH, k_PNH = rotate_qk(q_PNH, k_PNH, rotary)
    rows_QL = segments.rows_QL
    to_QNLH = lambda x_PNH: jnp.swapaxes(x_PNH[rows_QL], 1, 2)
    ids_QL = segments.valid_QL.astype(jnp.int32)  # 1: the segment's rows, 0: its padding slots
    o_QNLH = _flash(to_QNLH(q_PNH), to_QNLH(k_PNH), to_QNLH(v_PNH), ids_QL, ids_QL, causal=False, on_tpu=on_tpu,
                    heads="vis_heads")
    N, H = q_PNH.shape[1:]
    return jnp.swapaxes(o_QNLH, 1, 2).reshape(-1, N, H)[segments.row_slot_P].astype(v_PNH.dtype)


_vision_tpu = tpu_vision_attention = functools.partial(_vision_flash, on_tpu=True)
_vision_interpreted = functools.partial(_vision_flash, on_tpu=False)
