"""The `pallas` backend: flash attention from `jax.experimental.pallas.ops.tpu` (the kernel MaxText and
jax-llm-examples use on TPU). On TPU it compiles with Mosaic; anywhere else it runs in Pallas' TPU interpret mode
(`pltpu.force_tpu_interpret_mode`), which is slow and meant for checking numbers on a CPU.

* decoder: queries and keys both start at slot 0 (a forward without a cache, a prefill into an empty cache, a
  training step): `causal=True` with segment ids 1 for real tokens and 0 for padding, so a real query sees exactly
  the real keys at or before it. Calls whose queries start elsewhere (decode steps, continuing a filled cache) use
  the `xla` formulation: the kernel's causal mask has no offset, and a one-token step gains nothing from tiling.
  Rows at padding positions attend to padding keys here (the `xla` backend spreads them over every slot): garbage
  in both, and neither is used.
* vision: each segment is a batch row (`[Q, N, L, H]`, gathered), its padding slots a segment id of their own.

GQA: kv heads are repeated to the query heads (the kernel wants equal head counts). Sequences are padded to the
kernel's 128-row blocks with segment ids no real row has. Head dims that are not a multiple of 128 are passed as
they are: correct in interpret mode, not checked on a TPU here. Off TPU the backward pass runs in interpret mode
too (a custom VJP re-enters the mode, since the backward is traced outside the forward's context).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .masks import DecoderMask, VisionRotary, VisionSegments
from .xla import decoder_attention as xla_decoder_attention
from .xla import rotate_qk

BLOCK = 128  # the kernel's default (and minimum) key block


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


def _flash_padded(q_BNTH, k_BNSH, v_BNSH, q_ids_BT, kv_ids_BS, causal: bool):
    from jax.experimental.pallas.ops.tpu.flash_attention import SegmentIds, flash_attention

    segment_ids = SegmentIds(q=_pad(q_ids_BT.astype(jnp.int32), 1, -2), kv=_pad(kv_ids_BS.astype(jnp.int32), 1, -3))
    o_BNTH = flash_attention(_pad(q_BNTH, 2), _pad(k_BNSH, 2), _pad(v_BNSH, 2), segment_ids=segment_ids,
                             causal=causal, sm_scale=q_BNTH.shape[-1] ** -0.5)
    return o_BNTH[:, :, : q_BNTH.shape[2]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _interpreted(q_BNTH, k_BNSH, v_BNSH, q_ids_BT, kv_ids_BS, causal):
    from jax.experimental.pallas import tpu as pltpu

    with pltpu.force_tpu_interpret_mode():
        return _flash_padded(q_BNTH, k_BNSH, v_BNSH, q_ids_BT, kv_ids_BS, causal)


def _interpreted_fwd(q, k, v, q_ids, kv_ids, causal):
    return _interpreted(q, k, v, q_ids, kv_ids, causal), (q, k, v, q_ids, kv_ids)


def _interpreted_bwd(causal, residuals, g):
    from jax.experimental.pallas import tpu as pltpu

    q, k, v, q_ids, kv_ids = residuals
    with pltpu.force_tpu_interpret_mode():
        _, pullback = jax.vjp(lambda q, k, v: _flash_padded(q, k, v, q_ids, kv_ids, causal), q, k, v)
        return (*pullback(g), None, None)


_interpreted.defvjp(_interpreted_fwd, _interpreted_bwd)


def _flash(q_BNTH, k_BNSH, v_BNSH, q_ids_BT, kv_ids_BS, *, causal: bool):
    if jax.default_backend() == "tpu":
        return _flash_padded(q_BNTH, k_BNSH, v_BNSH, q_ids_BT, kv_ids_BS, causal)
    return _interpreted(q_BNTH, k_BNSH, v_BNSH, q_ids_BT, kv_ids_BS, causal)


def decoder_attention(q_BTNH, k_BSKH, v_BSKH, mask: DecoderMask):
    T = q_BTNH.shape[1]
    if not isinstance(mask.query_start, int) or mask.query_start != 0 or T == 1:
        return xla_decoder_attention(q_BTNH, k_BSKH, v_BSKH, mask)
    dtype = q_BTNH.dtype
    G = q_BTNH.shape[2] // k_BSKH.shape[2]
    heads_major = lambda x: jnp.repeat(jnp.swapaxes(x.astype(dtype), 1, 2), G, axis=1)  # [B,S,K,H] -> [B,N,S,H]
    valid_BS = mask.key_valid_BS.astype(jnp.int32)
    o_BNTH = _flash(jnp.swapaxes(q_BTNH, 1, 2), heads_major(k_BSKH), heads_major(v_BSKH), valid_BS[:, :T],
                    valid_BS, causal=True)
    return jnp.swapaxes(o_BNTH, 1, 2).astype(dtype)


def vision_attention(q_PNH, k_PNH, v_PNH, rotary: VisionRotary | None, segments: VisionSegments):
    q_PNH, k_PNH = rotate_qk(q_PNH, k_PNH, rotary)
    rows_QL = segments.rows_QL
    to_QNLH = lambda x_PNH: jnp.swapaxes(x_PNH[rows_QL], 1, 2)
    ids_QL = segments.valid_QL.astype(jnp.int32)  # 1: the segment's rows, 0: its padding slots
    o_QNLH = _flash(to_QNLH(q_PNH), to_QNLH(k_PNH), to_QNLH(v_PNH), ids_QL, ids_QL, causal=False)
    N, H = q_PNH.shape[1:]
    return jnp.swapaxes(o_QNLH, 1, 2).reshape(-1, N, H)[segments.row_slot_P].astype(v_PNH.dtype)
