"""The decoder's static KV cache (transformers 4.57 `StaticCache`'s role): per layer keys and values in
preallocated slots, one write index, and the rope deltas that place decoded tokens."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from .config import Qwen2VLTextConfig
from .partitioning import KV_CACHE_AXES, Partitioning, constrain, kv_cache_axes


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """A static, preallocated cache: per layer `[B, S, K, H]` keys and values (a list of L arrays, or one stacked
    `[L, B, S, K, H]` array each for a `scan_layers=True` model).

    All rows share one write index (`length`): batches are left-padded, and `mask_BS` marks which slots hold
    real tokens. `rope_deltas_B` (per row, from `get_rope_index`) places decoded tokens: position of the token
    written at slot `s` is `s + rope_deltas[b]` on all three M-RoPE axes.
    """

    keys: list[jax.Array] | jax.Array
    values: list[jax.Array] | jax.Array
    mask_BS: jax.Array  # bool
    length: jax.Array  # int32 scalar: slots filled so far
    rope_deltas_B: jax.Array  # int32

    @classmethod
    def init(cls, cfg: Qwen2VLTextConfig, batch: int, max_length: int, dtype=jnp.float32, *, stacked: bool = False,
             partitioning: Partitioning | None = None) -> KVCache:
        """Zeros; with `partitioning`, each layer's keys / values are made in place on their shards
        (`partitioning.KV_CACHE_AXES`: batch over the data axes, KV heads over "model" where they divide)."""
        L = cfg.num_hidden_layers
        shape = (batch, max_length, cfg.num_key_value_heads, cfg.head_dim)
        full = (L, *shape) if stacked else shape
        device = None if partitioning is None else partitioning.sharding(kv_cache_axes(len(full)), full)
        zeros = lambda: jnp.zeros(full, dtype, device=device)
        return cls(
            keys=zeros() if stacked else [zeros() for _ in range(L)],
            values=zeros() if stacked else [zeros() for _ in range(L)],
            mask_BS=jnp.zeros((batch, max_length), bool),
            length=jnp.zeros((), jnp.int32),
            rope_deltas_B=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def max_length(self) -> int:
        return self.mask_BS.shape[1]

    def appended(self, keys, values, mask_BS: jax.Array, T: int) -> KVCache:
        """The cache after a call of T tokens: every layer's keys / values with the call's written, its slots
        marked in `mask_BS`, the write index moved on by T."""
        return dataclasses.replace(self, keys=keys, values=values, mask_BS=mask_BS, length=self.length + T)

    def grown(self, slots: int) -> KVCache:
        """The cache with `slots` more empty slots at the end (inside jit: generation's `_start`)."""
        pad = lambda a: constrain(jnp.pad(a, [(0, 0)] * (a.ndim - 3) + [(0, slots), (0, 0), (0, 0)]),
                                  kv_cache_axes(a.ndim))
        grow = (lambda a: [pad(x) for x in a]) if isinstance(self.keys, list) else pad
        return dataclasses.replace(self, keys=grow(self.keys), values=grow(self.values),
                                   mask_BS=jnp.pad(self.mask_BS, ((0, 0), (0, slots))))


def write(kv: tuple[jax.Array, jax.Array], k_BTKH: jax.Array, v_BTKH: jax.Array, start) -> tuple[jax.Array, jax.Array]:
    """One layer's cache `(keys_BSKH, values_BSKH)` with this call's k / v written at slot `start`."""
    k_BSKH = jax.lax.dynamic_update_slice(kv[0], k_BTKH.astype(kv[0].dtype), (0, start, 0, 0))
    v_BSKH = jax.lax.dynamic_update_slice(kv[1], v_BTKH.astype(kv[1].dtype), (0, start, 0, 0))
    return constrain(k_BSKH, KV_CACHE_AXES), constrain(v_BSKH, KV_CACHE_AXES)
