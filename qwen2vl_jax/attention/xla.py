"""The `xla` backend: the reference attention written in XLA ops. Every platform runs it; it is the other
backends' fallback and the CPU kernels' gradient, and the only formulation that materialises probabilities.

Mirrors transformers 4.57 `models/qwen2_vl/modeling_qwen2_vl.py`: `eager_attention_forward` with `repeat_kv`
(decoder) and `VisionAttention.forward` with `apply_rotary_pos_emb_vision` (vision): scores and softmax in fp32,
probabilities cast to the activation dtype before the value product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .masks import DecoderMask, VisionRotary, VisionSegments

# Vision queries attend in chunks of this many rows: the [heads, chunk, keys] scores then stay in cache for the
# softmax passes (1.5x faster attention than one [heads, L, L] buffer for a 1024-patch image), and memory stays
# bounded. `modeling.vision_layout` pads long segments to a multiple of it.
QUERY_CHUNK = 256


# ---------------------------------------------------------------------------------------------------- decoder
def decoder_probs(q_BTNH, k_BSKH, allowed_BTS):
    """Masked GQA softmax probabilities `[B, N, T, S]` in fp32. Query head n uses kv head n // G (transformers
    `repeat_kv`), so N splits into (K, G). A query with no allowed slot (a padding row) gets a uniform
    distribution, as the reference's finfo.min mask gives."""
    B, T, N, H = q_BTNH.shape
    K = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
    s_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH.astype(q_BTNH.dtype),
                         preferred_element_type=jnp.float32) * (H**-0.5)
    s_BKGTS = jnp.where(allowed_BTS[:, None, None], s_BKGTS, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(s_BKGTS, axis=-1).reshape(B, N, T, -1)


def probs_times_values(p_BNTS, v_BSKH, dtype):
    """`o [B, T, N, H]` in `dtype`: probabilities cast to the activation dtype, then the value product."""
    B, N, T, S = p_BNTS.shape
    K = v_BSKH.shape[2]
    p_BKGTS = p_BNTS.reshape(B, K, N // K, T, S)
    o_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", p_BKGTS.astype(dtype), v_BSKH.astype(dtype),
                         preferred_element_type=jnp.float32).astype(dtype)
    return o_BTKGH.reshape(B, T, N, -1)


def attention_with_probs(q_BTNH, k_BSKH, v_BSKH, allowed_BTS):
    """Masked GQA softmax attention; returns (o [B, T, N, H] in q's dtype, probabilities [B, N, T, S] fp32)."""
    p_BNTS = decoder_probs(q_BTNH, k_BSKH, allowed_BTS)
    return probs_times_values(p_BNTS, v_BSKH, q_BTNH.dtype), p_BNTS


# Above this many bytes of fp32 scores ([B, N, T, S]), a decoder call attends in chunks (`chunked_attention`):
# a long prefill then needs memory linear in the prompt, not quadratic (a 16k-token prompt on the 2B would hold
# 12 x 16k x 16k x 4 B = 12.9 GB of scores, twice with the softmax). Below it, one softmax over whole rows.
CHUNK_ABOVE_BYTES = 256 * 2**20
QUERY_BLOCK = 512  # query rows per chunk
KEY_BLOCK = 1024  # key slots per step of the online softmax


def masked_attention(q_BTNH, k_BSKH, v_BSKH, allowed_BTS):
    """`attention_with_probs` without the probabilities (the CPU decode kernel's reference and gradient); long
    calls go through `chunked_attention` (same numbers to float rounding, bounded memory)."""
    B, T, N, _ = q_BTNH.shape
    if B * N * T * k_BSKH.shape[1] * 4 > CHUNK_ABOVE_BYTES:
        return chunked_attention(q_BTNH, k_BSKH, v_BSKH, allowed_BTS)
    return attention_with_probs(q_BTNH, k_BSKH, v_BSKH, allowed_BTS)[0]


def chunked_attention(q_BTNH, k_BSKH, v_BSKH, allowed_BTS, *, query_block=QUERY_BLOCK, key_block=KEY_BLOCK):
    """Masked GQA attention in query blocks, each over key blocks with an online softmax (flash attention's
    recurrence, in XLA ops): peak memory `[B, K, G, query_block, key_block]` scores instead of `[B, N, T, S]`.

    Same numbers as `attention_with_probs` up to float rounding: scores and the running max / sum in fp32, the
    exponentials cast to the activation dtype before the value product (as the reference casts probabilities),
    fp32 accumulation, one division at the end. Masked-out slots score finfo.min like the reference's mask, so a
    query with no allowed slot averages all real slots (a padding row); slots added to fill the last key block
    score -inf and get no weight.
    """
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G, dtype = N // K, q_BTNH.dtype
    Wq, Wk = min(query_block, T), min(key_block, S)
    Tp, Sp = -(-T // Wq) * Wq, -(-S // Wk) * Wk
    q_BTKGH = jnp.pad(q_BTNH, ((0, 0), (0, Tp - T), (0, 0), (0, 0))).reshape(B, Tp, K, G, H)
    k_BSKH = jnp.pad(k_BSKH.astype(dtype), ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
    v_BSKH = jnp.pad(v_BSKH.astype(dtype), ((0, 0), (0, Sp - S), (0, 0), (0, 0)))
    allowed_BTS = jnp.pad(allowed_BTS, ((0, 0), (0, Tp - T), (0, Sp - S)))
    real_S = jnp.arange(Sp) < S
    lowest = jnp.finfo(jnp.float32).min

    def query_block_out(i):
        q_BWKGH = jax.lax.dynamic_slice_in_dim(q_BTKGH, i * Wq, Wq, axis=1)
        allowed_BWS = jax.lax.dynamic_slice_in_dim(allowed_BTS, i * Wq, Wq, axis=1)

        def step(carry, j):
            m_BKGW, l_BKGW, acc_BKGWH = carry
            k_BUKH = jax.lax.dynamic_slice_in_dim(k_BSKH, j * Wk, Wk, axis=1)
            v_BUKH = jax.lax.dynamic_slice_in_dim(v_BSKH, j * Wk, Wk, axis=1)
            allowed_BWU = jax.lax.dynamic_slice_in_dim(allowed_BWS, j * Wk, Wk, axis=2)
            real_U = jax.lax.dynamic_slice_in_dim(real_S, j * Wk, Wk)
            s_BKGWU = jnp.einsum("BWKGH,BUKH->BKGWU", q_BWKGH, k_BUKH, preferred_element_type=jnp.float32) * (H**-0.5)
            s_BKGWU = jnp.where(allowed_BWU[:, None, None], s_BKGWU, lowest)
            s_BKGWU = jnp.where(real_U, s_BKGWU, -jnp.inf)
            m_new = jnp.maximum(m_BKGW, s_BKGWU.max(-1))
            p_BKGWU = jnp.exp(s_BKGWU - m_new[..., None])
            scale_BKGW = jnp.exp(m_BKGW - m_new)
            l_BKGW = l_BKGW * scale_BKGW + p_BKGWU.sum(-1)
            pv_BKGWH = jnp.einsum("BKGWU,BUKH->BKGWH", p_BKGWU.astype(dtype), v_BUKH,
                                  preferred_element_type=jnp.float32)
            return (m_new, l_BKGW, acc_BKGWH * scale_BKGW[..., None] + pv_BKGWH), None

        init = (jnp.full((B, K, G, Wq), lowest, jnp.float32), jnp.zeros((B, K, G, Wq), jnp.float32),
                jnp.zeros((B, K, G, Wq, H), jnp.float32))
        (_, l_BKGW, acc_BKGWH), _ = jax.lax.scan(step, init, jnp.arange(Sp // Wk))
        return (acc_BKGWH / l_BKGW[..., None]).astype(dtype)

    o_QBKGWH = jax.lax.map(query_block_out, jnp.arange(Tp // Wq))
    o_BTNH = jnp.moveaxis(o_QBKGWH, 0, 1).transpose(0, 1, 4, 2, 3, 5)  # [B, Q, W, K, G, H]
    return o_BTNH.reshape(B, Tp, N, H)[:, :T]


def decoder_attention(q_BTNH, k_BSKH, v_BSKH, mask: DecoderMask):
    return masked_attention(q_BTNH, k_BSKH, v_BSKH, mask.allowed_BTS)


def decoder_attention_probs(q_BTNH, k_BSKH, v_BSKH, mask: DecoderMask, edit=lambda p: p):
    """The probabilities capability: `(o, p)` with `p = edit(softmax(...))` `[B, N, T, S]` (fp32) used for the value
    product, so a hook that edits the pattern changes the output (transformers `eager_attention_forward`)."""
    p_BNTS = edit(decoder_probs(q_BTNH, k_BSKH, mask.allowed_BTS))
    return probs_times_values(p_BNTS, v_BSKH, q_BTNH.dtype), p_BNTS


# ----------------------------------------------------------------------------------------------------- vision
def rotate_qk(q_PNH, k_PNH, rotary: VisionRotary | None):
    """The vision rotary on q and k (transformers `apply_rotary_pos_emb_vision`: fp32 inside, cast back); None:
    they arrive rotated."""
    return (q_PNH, k_PNH) if rotary is None else (rotary(q_PNH), rotary(k_PNH))


def segment_attention(q_PNH, k_PNH, v_PNH, segments: VisionSegments):
    """Non-causal softmax attention inside each segment only (the reference's per-`cu_seqlens` chunks): gather
    each segment to `[L, N, H]`, attend in query chunks, scatter back."""
    seg_rows_QL, seg_valid_QL = segments.rows_QL, segments.valid_QL
    P, N, H = q_PNH.shape
    L = seg_rows_QL.shape[1]
    scale = H**-0.5
    chunk = L if L <= QUERY_CHUNK or L % QUERY_CHUNK else QUERY_CHUNK

    def attend_chunk(q_WNH, k_LNH, v_LNH, valid_L):
        s_NWL = jnp.einsum("WNH,LNH->NWL", q_WNH, k_LNH, preferred_element_type=jnp.float32) * scale
        s_NWL = jnp.where(valid_L[None, None, :], s_NWL, jnp.finfo(jnp.float32).min)
        p_NWL = jax.nn.softmax(s_NWL, axis=-1).astype(v_LNH.dtype)  # softmax in fp32, probs in the act. dtype
        return jnp.einsum("NWL,LNH->WNH", p_NWL, v_LNH, preferred_element_type=jnp.float32).astype(v_LNH.dtype)

    def attend_segment(segment):
        rows_L, valid_L = segment
        q_LNH, k_LNH, v_LNH = q_PNH[rows_L], k_PNH[rows_L], v_PNH[rows_L]
        if chunk == L:
            return attend_chunk(q_LNH, k_LNH, v_LNH, valid_L)
        q_chunks = q_LNH.reshape(L // chunk, chunk, N, H)
        out = jax.lax.map(lambda q_WNH: attend_chunk(q_WNH, k_LNH, v_LNH, valid_L), q_chunks)
        return out.reshape(L, N, H)

    def maybe_attend(segment):  # padded segments (no valid slot) are skipped
        return jax.lax.cond(segment[1][0], attend_segment, lambda s: jnp.zeros((L, N, H), v_PNH.dtype), segment)

    if seg_rows_QL.shape[0] == 1:  # one image: no loop over segments (the loop and its cond cost ~20%)
        o_QLNH = attend_segment((seg_rows_QL[0], seg_valid_QL[0]))[None]
    else:
        o_QLNH = jax.lax.map(maybe_attend, (seg_rows_QL, seg_valid_QL))
    return o_QLNH.reshape(-1, N, H)[segments.row_slot_P]


def segment_probs(q_PNH, k_PNH, segments: VisionSegments):
    """Every segment's probabilities at once, `[Q, N, L, L]` fp32 (padded slots get no weight; padded query rows
    are junk). Same numbers as `segment_attention`, which never holds them all."""
    q_QLNH, k_QLNH = q_PNH[segments.rows_QL], k_PNH[segments.rows_QL]
    s_QNLL = jnp.einsum("QLNH,QMNH->QNLM", q_QLNH, k_QLNH, preferred_element_type=jnp.float32)
    s_QNLL = s_QNLL * (q_PNH.shape[-1] ** -0.5)
    s_QNLL = jnp.where(segments.valid_QL[:, None, None, :], s_QNLL, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(s_QNLL, axis=-1)


def segment_probs_times_values(p_QNLL, v_PNH, segments: VisionSegments):
    """`o [P, N, H]` from per-segment probabilities (cast to v's dtype, as the reference) and the values."""
    v_QLNH = v_PNH[segments.rows_QL]
    o_QLNH = jnp.einsum("QNLM,QMNH->QLNH", p_QNLL.astype(v_PNH.dtype), v_QLNH,
                        preferred_element_type=jnp.float32).astype(v_PNH.dtype)
    N, H = v_PNH.shape[1:]
    return o_QLNH.reshape(-1, N, H)[segments.row_slot_P]


def vision_attention(q_PNH, k_PNH, v_PNH, rotary: VisionRotary | None, segments: VisionSegments):
    q_PNH, k_PNH = rotate_qk(q_PNH, k_PNH, rotary)
    return segment_attention(q_PNH, k_PNH, v_PNH, segments)


def vision_attention_probs(q_PNH, k_PNH, v_PNH, rotary: VisionRotary | None, segments: VisionSegments,
                           edit=lambda p: p):
    """The probabilities capability: `(o, p)` with `p = edit(...)` the per-segment probabilities `[Q, N, L, L]`."""
    q_PNH, k_PNH = rotate_qk(q_PNH, k_PNH, rotary)
    p_QNLL = edit(segment_probs(q_PNH, k_PNH, segments))
    return segment_probs_times_values(p_QNLL, v_PNH, segments), p_QNLL
