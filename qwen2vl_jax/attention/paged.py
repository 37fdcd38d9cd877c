"""Attention over a paged KV cache (the serving engine's, `qwen2vl_jax.engine`), and the cache write.

A layer's cache is one array `kv_PRCH` `[pages, page_size, 2K, H]`: keys at even heads, values at odd ones (the
layout JAX's Pallas `ragged_paged_attention` reads, so the TPU kernel needs no copy). `PagedBatch` says which
sequences the call's tokens belong to and where their pages are.

16-bit caches are stored as their bits, `uint16` (`storage_dtype`): XLA:CPU scatters bf16 by converting the whole
operand to fp32 and back, a read and a write of the pool per layer and step (33.5 MB a layer for the 2B's default
pool: 35 ms, so 1 s a step), where an integer scatter writes its rows in place (0.01 ms). Only the rows written
and the pages read are reinterpreted (`as_values`).

* `write(kv_PRCH, k_TKH, v_TKH, batch)`: this call's keys / values scattered to their rows (`batch.slot_T`).
* `paged_attention(q_TNH, kv_PRCH, batch)`: the `xla` formulation, every platform: each group of equal-length
  sequences gathers its pages to `[sequences, pages * page_size, K, H]` and attends with the reference's numbers
  (`xla.masked_attention`: transformers 4.57 `eager_attention_forward`, fp32 scores and softmax, probabilities cast
  to the activation dtype), causally from each sequence's `kv_len - queries_each`.
* `pallas_paged_attention`: JAX's `ragged_paged_attention` (`jax.experimental.pallas.ops.tpu`), Mosaic-compiled in
  programs lowered for TPU, Pallas' interpret mode in programs lowered for the CPU, the `xla` formulation on GPUs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .masks import PagedBatch
from .xla import masked_attention


def storage_dtype(dtype):
    """What a cache of `dtype` values is stored as: its bits for 16-bit floats (module docstring), else itself."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize == 2 else dtype


def as_values(x, dtype):
    """Stored cache rows `x` as `dtype` values (a reinterpretation of `uint16` bits, else a cast)."""
    if x.dtype == jnp.uint16 and jnp.dtype(dtype).itemsize == 2:
        return jax.lax.bitcast_convert_type(x, dtype)
    return x.astype(dtype)


def interleave(k_TKH, v_TKH):
    """`[T, 2K, H]`: key head k at 2k, value head k at 2k + 1."""
    T, K, H = k_TKH.shape
    return jnp.stack([k_TKH, v_TKH.astype(k_TKH.dtype)], axis=2).reshape(T, 2 * K, H)


def write(kv_PRCH, k_TKH, v_TKH, batch: PagedBatch):
    """The cache with this call's keys and values in their rows (`batch.slot_T`)."""
    P, R, C, H = kv_PRCH.shape
    rows = interleave(k_TKH, v_TKH)
    if kv_PRCH.dtype == jnp.uint16:
        rows = jax.lax.bitcast_convert_type(rows.astype(_float16_of(rows.dtype)), jnp.uint16)
    rows = rows.astype(kv_PRCH.dtype)
    return kv_PRCH.reshape(P * R, C, H).at[batch.slot_T].set(rows, mode="drop").reshape(P, R, C, H)


def _float16_of(dtype):
    """The 16-bit float a `uint16` cache holds rows of dtype `dtype` as (bf16 unless they are fp16)."""
    return jnp.float16 if jnp.dtype(dtype) == jnp.float16 else jnp.bfloat16


def paged_attention(q_TNH, kv_PRCH, batch: PagedBatch, attend=masked_attention):
    """`o [T, N, H]` (q's dtype): each group's sequences attend over their own pages (module docstring), through
    `attend(q_BTNH, k_BSKH, v_BSKH, allowed_BTS)` (the `xla` formulation; the `cpu` backend's decode kernel)."""
    _, R, C, H = kv_PRCH.shape
    outputs, t, s = [], 0, 0
    for n_seqs, q_len in batch.groups:
        q_BTNH = q_TNH[t:t + n_seqs * q_len].reshape(n_seqs, q_len, *q_TNH.shape[1:])
        pages_BPRCH = as_values(kv_PRCH[batch.page_indices_SP[s:s + n_seqs]], q_TNH.dtype)
        kv_BSCH = pages_BPRCH.reshape(n_seqs, -1, C, H)  # key j of the sequence at row j
        k_BSKH, v_BSKH = kv_BSCH[:, :, 0::2], kv_BSCH[:, :, 1::2]
        kv_len_B = batch.kv_lens_S[s:s + n_seqs]
        last_BT = kv_len_B[:, None] - q_len + jnp.arange(q_len)[None, :]  # each query's own (last visible) key
        allowed_BTS = jnp.arange(kv_BSCH.shape[1])[None, None, :] <= last_BT[:, :, None]
        o_BTNH = attend(q_BTNH, k_BSKH, v_BSKH, allowed_BTS)
        outputs.append(o_BTNH.reshape(n_seqs * q_len, *q_TNH.shape[1:]))
        t, s = t + n_seqs * q_len, s + n_seqs
    return jnp.concatenate(outputs, axis=0) if len(outputs) > 1 else outputs[0]
