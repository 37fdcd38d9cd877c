"""What an attention backend is told: which keys each query may see (`DecoderMask`, `VisionSegments`), and the
vision rotary still to apply to q and k (`VisionRotary`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class DecoderMask:
    """The decoder's mask: causal over absolute key slots, padding slots excluded.

    `allowed_BTS` is the whole truth (query t may see slot s); the other fields say the same thing in the forms
    fused kernels take: which slots hold real tokens, and the slot of the first query (this call's queries sit at
    slots `query_start + t`). `query_start` is a Python int when it is known while tracing (a forward without a
    cache, or a prefill into an empty cache: 0), else a traced int32 scalar (a decode step).
    """

    allowed_BTS: jax.Array  # bool
    key_valid_BS: jax.Array  # bool
    query_start: int | jax.Array

    # A Python-int start is static pytree data, so it stays known through jit / vmap boundaries.
    def tree_flatten(self):
        if isinstance(self.query_start, int):
            return (self.allowed_BTS, self.key_valid_BS), self.query_start
        return (self.allowed_BTS, self.key_valid_BS, self.query_start), None

    @classmethod
    def tree_unflatten(cls, start, leaves):
        return cls(*leaves) if start is None else cls(*leaves, start)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionSegments:
    """Which rows of a vision call attend to each other (built on the host by `modeling.vision_layout`).

    Rows (patches, padded to a bucket) are grouped in segments, one per temporal slice of each image or video. Two
    views of the same grouping, for the two ways backends attend:

    * gathered: segment q's rows are `rows_QL[q, :]` where `valid_QL` (a `[Q, L]` segment-major layout), and row p
      sits at `row_slot_P[p]` of the flattened `[Q * L]` layout (scatter back);
    * in place: `bounds_Q2[q] = (first row, length)` (length 0 for padding segments): rows of a segment are
      contiguous.
    """

    rows_QL: jax.Array  # int32
    valid_QL: jax.Array  # bool
    row_slot_P: jax.Array  # int32
    bounds_Q2: jax.Array  # int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionRotary:
    """The vision tower's 2-D rotary, handed to a backend still to be applied to q and k: cos / sin `[P, H]` (fp32)
    and the rotation itself (`modeling.rope.apply_rotary`, passed in by the model, so this package imports nothing
    of it). A backend fuses it into its kernel (reading `cos_PH` / `sin_PH`) or applies it first: `rotary(q_PNH)`."""

    cos_PH: jax.Array
    sin_PH: jax.Array
    rotate: Callable = dataclasses.field(metadata=dict(static=True))

    def __call__(self, x_PNH: jax.Array) -> jax.Array:
        return self.rotate(x_PNH, self.cos_PH, self.sin_PH)


@jax.tree_util.register_pytree_with_keys_class
@dataclasses.dataclass(frozen=True)
class PagedBatch:
    """One call of the serving engine (`qwen2vl_jax.engine`) over a paged KV cache: the queries of several
    sequences in one flat token axis, each sequence's keys in pages of a shared pool.

    The T query tokens come in `groups`, a static tuple of `(sequences, queries_each)`: group g holds
    `sequences` sequences of `queries_each` tokens, one after the other (the engine's step: one prefill chunk of C
    tokens, then one token for each decode slot: `((1, C), (S, 1))`). Sequence i (in group order) has `kv_lens_S[i]`
    keys once this call's tokens are written, its queries being the last `queries_each` of them, and its keys live
    in pages `page_indices_SP[i]` (key j at page `j // page_size`, row `j % page_size`). Query t of a sequence sees
    its keys 0 .. kv_len - queries_each + t (causal). `slot_T` is the flat cache row (`page * page_size + row`)
    each token's key / value is written to. A group's trailing queries may be padding: they write to the null page
    (page 0, never a sequence's) and read what they read; nothing uses their outputs.

    `cu_q_lens_S1` and `num_seqs` say the same layout as JAX's `ragged_paged_attention` takes it (the Pallas TPU
    kernel; `cu_q_lens[i]` is sequence i's first query)."""

    slot_T: jax.Array  # int32 [T]
    kv_lens_S: jax.Array  # int32 [S]
    page_indices_SP: jax.Array  # int32 [S, pages per sequence]
    cu_q_lens_S1: jax.Array  # int32 [S + 1]
    num_seqs: jax.Array  # int32 [1]
    groups: tuple[tuple[int, int], ...]  # static: (sequences, queries each) per group

    _LEAVES = ("slot_T", "kv_lens_S", "page_indices_SP", "cu_q_lens_S1", "num_seqs")

    def tree_flatten_with_keys(self):  # named leaves: an exported program's arguments read `batch.slot_T`, ...
        return [(jax.tree_util.GetAttrKey(n), getattr(self, n)) for n in self._LEAVES], self.groups

    @classmethod
    def tree_unflatten(cls, groups, leaves):
        return cls(*leaves, groups)

    query_start = None  # no single first slot: a `DecoderMask` field the layer loop passes along
