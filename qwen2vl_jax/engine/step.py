"""The engine's one device program per step: a forward over a paged cache, then each slot's next token.

    tokens:  [prefill chunk of one sequence: C tokens, padded] [one token per decode slot: S]   (one flat axis)
    device:  forward_paged (k / v into the pages, each sequence attends over its own) -> logits of S rows
             (slot s: the chunk's last real token when its prompt ends in this chunk, else its decode token)
             -> each slot's logits processors and pick (transformers 4.57's order, `sampling.process_logits`),
                with that slot's settings, its own generated-token count and its own random key

A slot's token is what `generation.generate` picks for that request alone: the same processors on a batch of one,
the same key (`jax.random.key(seed)` folded with the tokens generated so far) on a `[1, V]` row. Sampling costs
only in steps where a slot samples, and the vocabulary sort of top-k / top-p only where a slot truncates with
other than the Instruct checkpoints' top_k 1 (a sort of 151936 scores is ~28 ms a row on a 2-core CPU).

Compiles: one program per (chunk bucket C, or none; pages-per-sequence bucket); the slot count is fixed. Every
setting and length is a traced value.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..attention import PagedBatch
from ..generation.sampling import Knobs, process_logits
from ..modeling.paged_cache import PagedKVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotSettings:
    """Each slot's sampling settings `[S]` (`Knobs` per slot) and whether it samples."""

    knobs: Knobs  # every field [S] (eos_ids [S, E], padded with repeats of the first id)
    do_sample_S: jax.Array  # bool
    key_data_S2: jax.Array  # uint32 [S, 2]: jax.random.key(seed) of each slot's request
    generated_S: jax.Array  # int32: tokens the slot's request has generated so far


def _pick(logits_SV, seen_SV, settings: SlotSettings):
    """Each slot's token: `process_logits` + argmax (greedy) or a categorical draw (sampling) on its own `[1, V]`
    row, as `generation.decoding._select` on a batch of one."""
    knobs, do_sample_S = settings.knobs, settings.do_sample_S

    def one(logits_V, seen_V, knobs, generated, do_sample, truncate=True):
        return process_logits(logits_V[None], seen_V[None], generated, knobs, do_sample=do_sample,
                              truncate=truncate)[0]

    def each(fn):
        return jax.vmap(fn)(logits_SV, seen_SV, knobs, settings.generated_S)

    greedy_S = jnp.argmax(each(lambda *a: one(*a, False)), axis=-1).astype(jnp.int32)

    def draw(scores_SV):
        def one_draw(scores_V, key_data, generated):
            key = jax.random.fold_in(jax.random.wrap_key_data(key_data), generated)
            return jax.random.categorical(key, scores_V[None], axis=-1)[0].astype(jnp.int32)

        drawn_S = jax.vmap(one_draw)(scores_SV, settings.key_data_S2, settings.generated_S)
        return jnp.where(do_sample_S, drawn_S, greedy_S)

    def sampled(_):
        # top-k / top-p sort the vocabulary (slow on a CPU). Without them (top_k 0, top_p 1) they change nothing;
        # with top_k 1 and one largest score they keep exactly that score (top-p then removes nothing): the
        # scores the sort would give, without it. Any other truncating slot takes the sort.
        scores_SV = each(lambda *a: one(*a, True, False))
        top_S = scores_SV.max(axis=-1, keepdims=True)
        top1_S = knobs.top_k == 1
        plain = (knobs.top_k == 0) & (knobs.top_p >= 1.0)
        unique = (scores_SV == top_S).sum(-1) == 1
        cheap = jnp.all(~do_sample_S | plain | (top1_S & unique))
        return jax.lax.cond(cheap, lambda: jnp.where(top1_S[:, None] & (scores_SV < top_S), -jnp.inf, scores_SV),
                            lambda: each(lambda *a: one(*a, True, True)))

    # only steps where some slot samples pay for sampling
    return jax.lax.cond(jnp.any(do_sample_S), lambda: draw(sampled(None)), lambda: greedy_S)


def _step(model, cache: PagedKVCache, seen_SV, ids_T, pos_ZT, vision_CD, vision_index_T, batch: PagedBatch,
          logit_rows_S, emit_S, settings: SlotSettings, *, keep_logits: bool):
    """One engine step: (tokens `[S]`, seen, cache, raw fp32 logits `[S, V]` when `keep_logits`)."""
    logits_SV, cache = model.forward_paged(ids_T[None], pos_ZT[:, None], vision_CD,
                                           None if vision_CD is None else vision_index_T[None], cache, batch,
                                           logit_rows_S)
    logits_SV = logits_SV.astype(jnp.float32)
    token_S = _pick(logits_SV, seen_SV, settings)
    S = token_S.shape[0]
    seen_SV = seen_SV.at[jnp.arange(S), token_S].set(seen_SV[jnp.arange(S), token_S] | emit_S)
    return token_S, seen_SV, cache, (logits_SV if keep_logits else None)


def _set_row(seen_SV, slot, row_V):
    return seen_SV.at[slot].set(row_V)


step_jit = jax.jit(_step, static_argnames=("keep_logits",), donate_argnames=("cache", "seen_SV"))
set_row_jit = jax.jit(_set_row, donate_argnames=("seen_SV",))


def compiles() -> dict[str, int]:
    """Programs compiled so far: the step's (one per chunk / pages bucket met) and the admission's row update."""
    return {"step": step_jit._cache_size(), "set_row": set_row_jit._cache_size()}
