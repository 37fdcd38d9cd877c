"""Attention over a paged KV cache (the serving engine's, `qwen2vl_jax.engine`), and the cache write.

A layer's cache is one array `kv_PRCH` `[pages, page_size, 2K, H]`: keys at even heads, values at odd ones (the
layout JAX's Pallas `ragged_paged_attention` reads, so the TPU kernel needs no copy). `PagedBatch` says which
sequences the call's tokens belong to and where their pages are.

* `write(kv_PRCH, k_TKH, v_TKH, batch)`: this call's keys / values scattered to their rows (`batch.slot_T`).
* `paged_attention(q_TNH, kv_PRCH, batch)`: the `xla` formulation, every platform: each group of equal-length
  sequences gathers its pages to `[sequences, pages * page_size, K, H]` and attends with the reference's numbers
  (`xla.masked_attention`: transformers 4.57 `eager_attention_forward`, fp32 scores and softmax, probabilities cast
  to the activation dtype), causally from each sequence's `kv_len - queries_each`.
* `pallas_paged_attention`: JAX's `ragged_paged_attention` (`jax.experimental.pallas.ops.tpu`), Mosaic-compiled in
  programs lowered for TPU, Pallas' interpret mode in programs lowered for the CPU, the `xla` formulation on GPUs.
"""

from __future__ import annotations

import jax.numpy as jnp

from .masks import PagedBatch
from .xla import masked_attention


def interleave(k_TKH, v_TKH):
    """`[T, 2K, H]`: key head k at 2k, value head k at 2k + 1."""
    T, K, H = k_TKH.shape
    return jnp.stack([k_TKH, v_TKH.astype(k_TKH.dtype)], axis=2).reshape(T, 2 * K, H)


def write(kv_PRCH, k_TKH, v_TKH, batch: PagedBatch):
    """The cache with this call's keys and values in their rows (`batch.slot_T`)."""
    P, R, C, H = kv_PRCH.shape
    rows = interleave(k_TKH, v_TKH).astype(kv_PRCH.dtype)
    return kv_PRCH.reshape(P * R, C, H).at[batch.slot_T].set(rows, mode="drop").reshape(P, R, C, H)


def paged_attention(q_TNH, kv_PRCH, batch: PagedBatch, attend=masked_attention):
    """`o [T, N, H]` (q's dtype): each group's sequences attend over their own pages (module docstring), through
    `attend(q_BTNH, k_BSKH, v_BSKH, allowed_BTS)` (the `xla` formulation; the `cpu` backend's decode kernel)."""
    _, R, C, H = kv_PRCH.shape
    outputs, t, s = [], 0, 0
    for n_seqs, q_len in batch.groups:
        q_BTNH = q_TNH[t:t + n_seqs * q_len].reshape(n_seqs, q_len, *q_TNH.shape[1:])
        pages_BPRCH = kv_PRCH[batch.page_indices_SP[s:s + n_seqs]]
        kv_BSCH = pages_BPRCH.reshape(n_seqs, -1, C, H)  # key j of the sequence at row j
        k_BSKH, v_BSKH = kv_BSCH[:, :, 0::2], kv_BSCH[:, :, 1::2]
        kv_len_B = batch.kv_lens_S[s:s + n_seqs]
        last_BT = kv_len_B[:, None] - q_len + jnp.arange(q_len)[None, :]  # each query's own (last visible) key
        allowed_BTS = jnp.arange(kv_BSCH.shape[1])[None, None, :] <= last_BT[:, :, None]
        o_BTNH = attend(q_BTNH, k_BSKH, v_BSKH, allowed_BTS)
        outputs.append(o_BTNH.reshape(n_seqs * q_len, *q_TNH.shape[1:]))
        t, s = t + n_seqs * q_len, s + n_seqs
    return jnp.concatenate(outputs, axis=0) if len(outputs) > 1 else outputs[0]
