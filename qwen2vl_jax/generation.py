"""Generation: a jitted prefill, a static KV cache, and a decode loop that stays on the device.

    host:    pad the prompt on the left to a length bucket; positions (get_rope_index), vision layout
    device:  vision tower once -> prefill (writes the cache, picks token 0)
             -> jax.lax.while_loop { one-token forward (position = slot + rope_delta[b]) -> logits processors
                                     -> pick a token } until max_new_tokens or every row has hit EOS
    host:    trim, return [B, prompt + new] ids like transformers' `generate`

Logits processing follows transformers 4.57 `_get_logits_processor` order: repetition penalty (over every id in
the row so far, prompt and its pads included, as transformers' `RepetitionPenaltyLogitsProcessor`), min_new_tokens
(EOS masked), then only when sampling: temperature, top-k, top-p; greedy is the argmax. Finished rows emit
`pad_token_id`, like HF.

Compiles: the prompt length, the cache length and the number of new tokens are bucketed (buckets.py); the actual
`max_new_tokens` and every sampling knob are traced values, so changing them never recompiles. `TRACE_COUNTS`
counts compiles per jitted function for tests and logs. Streaming runs the same jitted step once per token from
a Python loop, so streamed and non-streamed outputs are identical.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from .buckets import bucket, pow2_bucket
from .hook_points import HookSet, hook_point_axes, install, make_hookset
from .model import PreparedInputs, Qwen2VL, as_attention_mask
from .text import KVCache

TRACE_COUNTS: dict[str, int] = {"prefill": 0, "decode_loop": 0, "decode_step": 0}

PROMPT_GRANULE = 64  # prompt lengths are padded (on the left) to buckets of this granule, x1.25 growth
MIN_NEW_TOKENS_BUCKET = 32  # the new-token budget is a power of two >= this


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings, named like transformers' GenerationConfig (and read from generation_config.json)."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # transformers' default; 0 disables
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: tuple[int, ...] = (151645,)
    pad_token_id: int | None = None
    seed: int = 0

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike | None, **overrides) -> GenerationConfig:
        """Defaults from the checkpoint's generation_config.json (Instruct: greedy-like sampling with top_k=1 and
        repetition_penalty 1.05), then `overrides`."""
        values = {}
        path = Path(directory) / "generation_config.json" if directory else None
        if path is not None and path.is_file():
            raw = json.loads(path.read_text())
            for f in dataclasses.fields(cls):
                if f.name in raw and raw[f.name] is not None:
                    values[f.name] = raw[f.name]
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("eos_token_id"), int):
            values["eos_token_id"] = (values["eos_token_id"],)
        if "eos_token_id" in values:
            values["eos_token_id"] = tuple(values["eos_token_id"])
        return cls(**values)

    def __post_init__(self):
        # NumPy scalars (np.int64(4), np.float32(0.7), np.bool_) become Python numbers, so they validate, hash
        # and bucket like the Python values; anything else is left for `validate` to name.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.bool_):
                value = bool(value)
            elif isinstance(value, np.integer):
                value = int(value)
            elif isinstance(value, np.floating):
                value = float(value)
            if f.name == "eos_token_id" and isinstance(value, int) and not isinstance(value, bool):
                value = (value,)
            elif f.name == "eos_token_id" and isinstance(value, (list, tuple, np.ndarray)):
                value = tuple(np.asarray(value).ravel().tolist())
            object.__setattr__(self, f.name, value)

    def validate(self, vocab_size: int) -> None:
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN

        eos = self.eos_token_id if isinstance(self.eos_token_id, tuple) else ()
        pad = self.pad_token_id
        checks = [
            (is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens",
             f"must be an integer >= 1, got {self.max_new_tokens!r}"),
            (is_int(self.min_new_tokens) and self.min_new_tokens >= 0, "min_new_tokens",
             f"must be an integer >= 0, got {self.min_new_tokens!r}"),
            (isinstance(self.do_sample, bool), "do_sample", f"must be True or False, got {self.do_sample!r}"),
            (is_num(self.temperature) and self.temperature >= 0, "temperature",
             f"must be a number >= 0, got {self.temperature!r}"),
            (not (self.do_sample and self.temperature == 0), "temperature",
             "must be > 0 when sampling (use do_sample=False for greedy decoding)"),
            (is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}"),
            (is_int(self.top_k) and self.top_k >= 0, "top_k", f"must be an integer >= 0, got {self.top_k!r}"),
            (is_num(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
             f"must be > 0, got {self.repetition_penalty!r}"),
            (len(eos) > 0 and all(is_int(e) and 0 <= e < vocab_size for e in eos), "eos_token_id",
             f"needs at least one id, each in [0, {vocab_size}), got {self.eos_token_id!r}"),
            (pad is None or (is_int(pad) and 0 <= pad < vocab_size), "pad_token_id",
             f"must be None or an id in [0, {vocab_size}), got {pad!r}"),
            (is_int(self.seed), "seed", f"must be an integer, got {self.seed!r}"),
        ]
        for ok, name, message in checks:
            if not ok:
                raise ValueError(f"invalid generation parameter `{name}`: {message}")

    @property
    def pad_id(self) -> int:
        return self.pad_token_id if self.pad_token_id is not None else self.eos_token_id[0]  # HF's fallback


@dataclasses.dataclass
class GenerateOutput:
    sequences: np.ndarray  # [B, prompt + new] int64
    logits: np.ndarray | None = None  # [B, new, V] raw fp32 logits of each step, when asked for
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    new_tokens: int = 0
    records: dict | None = None  # values recorded at hook points (`cache_names=`), by name; see `generate`


# ------------------------------------------------------------------------------------------ logits processors
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Knobs:
    """Per-call sampling values, traced (changing them never recompiles)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    repetition_penalty: jax.Array
    min_new_tokens: jax.Array
    max_new_tokens: jax.Array
    eos_ids: jax.Array  # [E]
    pad_id: jax.Array


def process_logits(logits_BV, seen_BV, n_generated, knobs: Knobs, *, do_sample: bool):
    """transformers 4.57's processor chain on fp32 logits (see module docstring for the order)."""
    neg_inf = jnp.float32(-jnp.inf)
    p = knobs.repetition_penalty
    penalised = jnp.where(logits_BV < 0, logits_BV * p, logits_BV / p)
    scores = jnp.where(seen_BV, penalised, logits_BV)
    is_eos_V = jnp.zeros(scores.shape[-1], bool).at[knobs.eos_ids].set(True)
    scores = jnp.where((n_generated < knobs.min_new_tokens) & is_eos_V[None], neg_inf, scores)
    if not do_sample:
        return scores
    scores = scores / knobs.temperature
    # One descending sort serves top-k and top-p (TopKLogitsWarper, TopPLogitsWarper, min_tokens_to_keep=1).
    sorted_desc = -jnp.sort(-scores, axis=-1)
    V = scores.shape[-1]
    k = jnp.where(knobs.top_k > 0, jnp.minimum(knobs.top_k, V), V)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[None, None].repeat(scores.shape[0], 0), axis=-1)
    scores = jnp.where(scores < kth, neg_inf, scores)
    # top-p on the (top-k filtered) scores: drop the low tail whose total probability is <= 1 - top_p.
    sorted_asc = jnp.sort(scores, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_asc, axis=-1), axis=-1)
    remove_sorted = (cum <= 1 - knobs.top_p).at[:, -1].set(False)
    # the threshold: the largest removed value; everything <= it goes (ties removed together, like a scatter)
    cutoff = jnp.max(jnp.where(remove_sorted, sorted_asc, neg_inf), axis=-1, keepdims=True)
    apply = knobs.top_p < 1.0
    return jnp.where(apply & (scores <= cutoff) & jnp.any(remove_sorted, -1, keepdims=True), neg_inf, scores)


def pick_token(scores_BV, rng, *, do_sample: bool):
    if do_sample:
        return jax.random.categorical(rng, scores_BV, axis=-1).astype(jnp.int32)
    return jnp.argmax(scores_BV, axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------- decode state
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    cache: KVCache
    tokens_BR: jax.Array  # int32 [B, R] (R: the max_new_tokens bucket) generated ids (pad after EOS)
    last_B: jax.Array  # int32, the token to feed next
    seen_BV: jax.Array  # bool, ids already in each row (repetition penalty)
    finished_B: jax.Array  # bool
    step: jax.Array  # int32 scalar: tokens generated so far
    rng: jax.Array
    logits_BRV: jax.Array | None  # optional raw logits of every step
    records: dict | None = None  # hook point name -> [R, *value of one decode step]: what decode steps recorded
    offset: jax.Array | int = 0  # int32: cache slots before the caller's first token (our bucket's left padding)


def _select(state: DecodeState, logits_BV, knobs: Knobs, *, do_sample: bool) -> DecodeState:
    """Process logits, pick, record, and mark finished rows (HF: finished rows emit pad_token_id)."""
    logits_BV = logits_BV.astype(jnp.float32)
    scores = process_logits(logits_BV, state.seen_BV, state.step, knobs, do_sample=do_sample)
    token = pick_token(scores, jax.random.fold_in(state.rng, state.step), do_sample=do_sample)
    token = jnp.where(state.finished_B, knobs.pad_id, token)
    B = token.shape[0]
    logits_BRV = state.logits_BRV
    if logits_BRV is not None:
        logits_BRV = jax.lax.dynamic_update_slice(logits_BRV, logits_BV[:, None], (0, state.step, 0))
    return dataclasses.replace(
        state,
        tokens_BR=jax.lax.dynamic_update_slice(state.tokens_BR, token[:, None], (0, state.step)),
        last_B=token,
        seen_BV=state.seen_BV.at[jnp.arange(B), token].set(True),
        finished_B=state.finished_B | jnp.isin(token, knobs.eos_ids),
        step=state.step + 1,
        logits_BRV=logits_BRV,
    )


def _step_logits(model: Qwen2VL, state: DecodeState, hooks: HookSet | None = None):
    """One-token forward: the new token sits at slot `cache.length`, position slot + rope_delta (transformers 4.57
    `Qwen2VLModel.forward`). Hooks see `ctx.step` = tokens generated so far; recorded values go to row step - 1
    of `state.records`."""
    cache = state.cache
    B = state.last_B.shape[0]
    pos_B = cache.length + cache.rope_deltas_B
    pos_ZB1 = jnp.broadcast_to(pos_B[None, :, None], (3, B, 1))
    with install(hooks, step=state.step, offset=state.offset) as run:
        logits, cache, _, _ = model.forward(state.last_B[:, None], jnp.ones((B, 1), jnp.int32), pos_ZB1, cache=cache)
    records = state.records
    if records:
        records = {n: jax.lax.dynamic_update_slice(buf, run.records[n][None].astype(buf.dtype),
                                                   (state.step - 1,) + (0,) * (buf.ndim - 1))
                   for n, buf in records.items()}
    return logits[:, -1], dataclasses.replace(state, cache=cache, records=records)


def _prefill(model, ids, mask, pos, vision, vision_index, cache, seen, rng, knobs, hooks=None, offset=0, *, do_sample,
             keep_logits, n_bucket):
    TRACE_COUNTS["prefill"] += 1
    with install(hooks, offset=offset) as run:
        logits, cache, _, _ = model.forward(ids, mask, pos, vision, vision_index, cache, last_only=True,
                                            cache_empty=True)
    B, V = seen.shape
    axes = hook_point_axes(model.config)
    # a decode step's value of each recorded point: the prefill's with one token on the token axis
    step_buffers = {n: jnp.zeros((n_bucket, *(1 if a == "T" else d for a, d in zip(axes[n], v.shape))), v.dtype)
                    for n, v in run.records.items()}
    state = DecodeState(cache=cache, tokens_BR=jnp.zeros((B, n_bucket), jnp.int32), last_B=jnp.zeros((B,), jnp.int32),
                        seen_BV=seen, finished_B=jnp.zeros((B,), bool), step=jnp.zeros((), jnp.int32), rng=rng,
                        logits_BRV=jnp.zeros((B, n_bucket, V), jnp.float32) if keep_logits else None,
                        records=step_buffers or None, offset=offset)
    return _select(state, logits[:, -1], knobs, do_sample=do_sample), run.records


def _decode_loop(model, state: DecodeState, knobs: Knobs, hooks=None, *, do_sample):
    TRACE_COUNTS["decode_loop"] += 1

    def keep_going(s: DecodeState):
        return (s.step < knobs.max_new_tokens) & ~jnp.all(s.finished_B)

    def body(s: DecodeState):
        logits, s = _step_logits(model, s, hooks)
        return _select(s, logits, knobs, do_sample=do_sample)

    return jax.lax.while_loop(keep_going, body, state)


def _decode_step(model, state: DecodeState, knobs: Knobs, hooks=None, *, do_sample):
    TRACE_COUNTS["decode_step"] += 1
    logits, state = _step_logits(model, state, hooks)
    return _select(state, logits, knobs, do_sample=do_sample)


def _join_records(axes: dict[str, str], prefill: dict, steps: dict | None, extra: int, prompt_slots: int,
                  n: int) -> dict:
    """One array per recorded text point over the prompt and the fed-back tokens, as one forward over the final
    sequence (without its last token) would record it: our bucket padding dropped from the token and slot axes,
    the n - 1 decode steps appended on the token axis. `logits` holds the n rows that picked the new tokens."""
    out = {}
    for name, first in prefill.items():
        a = axes[name]
        t = a.index("T")
        first = np.asarray(first)
        if first.shape[t] > 1 or name != "logits":
            first = np.take(first, np.arange(extra, first.shape[t]), axis=t)
        if steps and n > 1:  # one device-to-host copy of the used steps, stepped axis onto the token axis
            fed_R = np.moveaxis(np.asarray(steps[name][: n - 1]), 0, t)  # [..., n-1, 1, ...]
            first = np.concatenate([first, fed_R.reshape(*fed_R.shape[:t], n - 1, *fed_R.shape[t + 2:])], axis=t)
        value = first
        if "S" in a:  # cache slots -> token positions of the final sequence
            value = np.take(value, np.arange(extra, prompt_slots + n - 1), axis=a.index("S"))
        out[name] = value
    return out


_prefill_jit = jax.jit(_prefill, static_argnames=("do_sample", "keep_logits", "n_bucket"), donate_argnames=("cache",))
_decode_loop_jit = jax.jit(_decode_loop, static_argnames=("do_sample",), donate_argnames=("state",))
_decode_step_jit = jax.jit(_decode_step, static_argnames=("do_sample",), donate_argnames=("state",))


# ----------------------------------------------------------------------------------------------- the driver
def left_pad(input_ids, attention_mask, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Extra left padding up to `length` (the bucket); refuses right-padded rows (generation appends on the right)."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    mask = np.ones_like(ids) if attention_mask is None else as_attention_mask(attention_mask, ids.shape)
    if not mask.any(axis=1).all():
        raise ValueError("every row needs at least one token with attention_mask == 1")
    if (np.diff(mask.astype(np.int8), axis=1) < 0).any():
        raise ValueError("right padding detected in attention_mask: generation needs left padding "
                         "(processor padding_side='left')")
    extra = length - ids.shape[1]
    ids = np.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id)
    mask = np.pad(mask, ((0, 0), (extra, 0)), constant_values=0)
    return ids, mask


def generate(model: Qwen2VL, input_ids, attention_mask=None, pixel_values=None,
             image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None, *,
             generation_config: GenerationConfig | None = None, streamer=None, output_logits: bool = False,
             return_dict: bool = False, hooks=None, cache_names=None, **kwargs):
    """transformers-style `generate`: returns `[B, prompt + new]` token ids (or a `GenerateOutput`).

    Settings come from `generation_config` (default: the checkpoint's generation_config.json when the model was
    loaded from a directory holding one), overridden by keyword arguments (`max_new_tokens`, `do_sample`,
    `temperature`, `top_k`, `top_p`, `repetition_penalty`, `min_new_tokens`, `eos_token_id`, `pad_token_id`,
    `seed`). `streamer` gets `put(tokens_B)` after each step and `end()` at the end.

    `hooks` (`{name or pattern: fn(value, ctx)}`, see `qwen2vl_jax.hooks`) run in the prefill and in every decode
    step (`ctx.step`: tokens generated so far). `cache_names` records points: `GenerateOutput.records[name]`
    holds text values over the prompt and every fed-back token (what one forward over the output sequence minus
    its last token records; `logits` holds the rows that picked each new token) and vision values once.
    """
    import time

    unknown = set(kwargs) - {f.name for f in dataclasses.fields(GenerationConfig)}
    if unknown:
        raise TypeError(f"unexpected generation arguments: {sorted(unknown)}")
    if generation_config is None:
        generation_config = GenerationConfig.from_pretrained(getattr(model, "source_dir", None), **kwargs)
    elif kwargs:
        generation_config = dataclasses.replace(generation_config, **{k: v for k, v in kwargs.items() if v is not None})
    gc = generation_config
    if isinstance(gc.eos_token_id, int):
        gc = dataclasses.replace(gc, eos_token_id=(gc.eos_token_id,))
    cfg = model.config
    gc.validate(cfg.text_config.vocab_size)

    ids0 = np.asarray(input_ids)
    ids0 = ids0[None] if ids0.ndim == 1 else ids0
    B, T = ids0.shape
    limit = cfg.text_config.max_position_embeddings
    if T + gc.max_new_tokens > limit:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({gc.max_new_tokens}) exceeds the model's "
                         f"max_position_embeddings ({limit})")
    T_pad = bucket(T, PROMPT_GRANULE)
    n_bucket = pow2_bucket(gc.max_new_tokens, MIN_NEW_TOKENS_BUCKET)
    ids, mask = left_pad(ids0, attention_mask, T_pad, gc.pad_id)
    t0 = time.perf_counter()
    prep: PreparedInputs = model.prepare_inputs(ids, mask, pixel_values, image_grid_thw, pixel_values_videos,
                                                video_grid_thw)
    hookset = make_hookset(cfg, hooks, cache_names or ()) if hooks or cache_names else None
    vision, vision_records = None, {}
    if prep.vision_pixels is not None:
        if hookset and hookset.only("vision."):
            vision, vision_records = model.visual.run_hooked(prep.vision_pixels, prep.vision_layout,
                                                             hookset.only("vision."))
        else:
            vision, _ = model.visual.run_padded(prep.vision_pixels, prep.vision_layout)
    text_hooks = (hookset.only("vision.", keep=False) or None) if hookset else None

    # Repetition penalty sees the caller's ids (their pads too, as transformers 4.57), never our bucket padding.
    seen = np.zeros((B, cfg.text_config.vocab_size), bool)
    seen[np.repeat(np.arange(B), T), ids0.reshape(-1)] = True
    cache = model.init_cache(B, T_pad + n_bucket)
    cache = dataclasses.replace(cache, rope_deltas_B=jnp.asarray(prep.rope_deltas_B1[:, 0], jnp.int32))
    knobs = Knobs(
        temperature=jnp.float32(gc.temperature if gc.do_sample else 1.0), top_k=jnp.int32(gc.top_k),
        top_p=jnp.float32(gc.top_p), repetition_penalty=jnp.float32(gc.repetition_penalty),
        min_new_tokens=jnp.int32(gc.min_new_tokens), max_new_tokens=jnp.int32(gc.max_new_tokens),
        eos_ids=jnp.asarray(gc.eos_token_id, jnp.int32), pad_id=jnp.int32(gc.pad_id))
    state, prefill_records = _prefill_jit(
        model, prep.input_ids_BT, prep.attention_mask_BT, prep.position_ids_ZBT, vision, prep.vision_index_BT, cache,
        jnp.asarray(seen), jax.random.key(gc.seed), knobs, text_hooks, jnp.int32(T_pad - T), do_sample=gc.do_sample,
        keep_logits=output_logits, n_bucket=n_bucket)
    first = np.asarray(state.last_B)  # waits for the prefill
    t1 = time.perf_counter()
    if streamer is not None:
        streamer.put(first)
        while int(state.step) < gc.max_new_tokens and not bool(np.all(np.asarray(state.finished_B))):
            state = _decode_step_jit(model, state, knobs, text_hooks, do_sample=gc.do_sample)
            streamer.put(np.asarray(state.last_B))
        streamer.end()
    else:
        state = _decode_loop_jit(model, state, knobs, text_hooks, do_sample=gc.do_sample)
    n = int(state.step)
    new = np.asarray(state.tokens_BR)[:, :n].astype(np.int64)
    t2 = time.perf_counter()
    sequences = np.concatenate([ids0.astype(np.int64), new], axis=1)
    records = None
    if hookset is not None and hookset.record:
        records = {**vision_records, **_join_records(hook_point_axes(cfg), prefill_records, state.records,
                                                      T_pad - T, T_pad, n)}
    if not return_dict and not output_logits and records is None:
        return sequences
    logits = np.asarray(state.logits_BRV)[:, :n] if output_logits else None
    return GenerateOutput(sequences=sequences, logits=logits, prefill_seconds=t1 - t0, decode_seconds=t2 - t1,
                          new_tokens=n, records=records)


# ------------------------------------------------------------------------------------------------ streaming
class TextStreamer:
    """Turns streamed token ids (batch 1) into text pieces, holding back incomplete UTF-8 sequences.

    `tokenizer` is anything with `decode(ids, skip_special_tokens=...)` (our Qwen2VLProcessor or its tokenizer).
    Pieces go to `on_text` (default: collected in `.pieces`); `skip_prompt` is implicit: only new ids are seen.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None = None, skip_special_tokens: bool = True):
        self.tokenizer, self.on_text = tokenizer, on_text
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.emitted = 0
        self.pieces: list[str] = []

    def put(self, tokens_B) -> None:
        tokens = np.asarray(tokens_B).reshape(-1)
        if tokens.size != 1:
            raise ValueError("TextStreamer streams one sequence; generate with batch size 1")
        self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        if text.endswith("\ufffd"):  # a multi-byte character is still incomplete: wait for its next bytes
            return
        self._emit(text[self.emitted:])
        self.emitted = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)
        self._emit(text[self.emitted:])
        self.emitted = len(text)

    def _emit(self, piece: str) -> None:
        if piece:
            self.pieces.append(piece)
            if self.on_text is not None:
                self.on_text(piece)


def stream_generate(model, tokenizer, input_ids, **kwargs) -> Iterator[str]:
    """Yield text pieces as they are decoded (batch 1). Runs generation in a background thread."""
    import queue
    import threading

    pieces: queue.Queue = queue.Queue()
    done = object()
    errors: list[BaseException] = []

    def run():
        try:
            generate(model, input_ids, streamer=TextStreamer(tokenizer, on_text=pieces.put), **kwargs)
        except BaseException as e:  # re-raised in the consumer
            errors.append(e)
        finally:
            pieces.put(done)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while (item := pieces.get()) is not done:
        yield item
    thread.join()
    if errors:
        raise errors[0]
