"""The serving engine's KV cache (`qwen2vl_jax.engine`): per layer one pool of fixed-size pages shared by every
sequence, keys and values interleaved on the head axis (`attention.paged`: the layout of JAX's Pallas
`ragged_paged_attention`). Which pages hold which sequence, and which row each token goes to, is the engine's
business (`attention.PagedBatch`); this is only the arrays. Page 0 is the null page: padding tokens write there and
no sequence owns it.

transformers has no paged cache; the attention it feeds is transformers 4.57 `eager_attention_forward`'s."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..attention.paged import storage_dtype
from .config import Qwen2VLTextConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKVCache:
    """Per layer `kv_PRCH` `[pages, page_size, 2K, H]` (a list of L arrays, or one stacked `[L, ...]` array for a
    `scan_layers=True` model): key head k at 2k, value head k at 2k + 1. A 16-bit cache holds its values' bits as
    `uint16` (`attention.paged.storage_dtype`: XLA:CPU writes integer rows in place, bf16 ones by converting the
    whole pool)."""

    pages: list[jax.Array] | jax.Array

    @classmethod
    def init(cls, cfg: Qwen2VLTextConfig, num_pages: int, page_size: int, dtype=jnp.float32, *,
             stacked: bool = False) -> PagedKVCache:
        if num_pages < 2 or page_size < 1:
            raise ValueError(f"a paged cache needs at least 2 pages (page 0 is the null page) of >= 1 rows, got "
                             f"{num_pages} pages of {page_size}")
        shape = (num_pages, page_size, 2 * cfg.num_key_value_heads, cfg.head_dim)
        L, stored = cfg.num_hidden_layers, storage_dtype(dtype)
        if stacked:
            return cls(jnp.zeros((L, *shape), stored))
        return cls([jnp.zeros(shape, stored) for _ in range(L)])

    @property
    def num_pages(self) -> int:
        first = self.pages if not isinstance(self.pages, list) else self.pages[0]
        return first.shape[-4]

    @property
    def page_size(self) -> int:
        first = self.pages if not isinstance(self.pages, list) else self.pages[0]
        return first.shape[-3]

    def nbytes(self) -> int:
        return sum(p.nbytes for p in (self.pages if isinstance(self.pages, list) else [self.pages]))
