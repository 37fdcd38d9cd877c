"""Generation: a jitted prefill, a static KV cache, and a decode loop that stays on the device.

    host:    pad the prompt on the left to a length bucket; positions (get_rope_index), vision layout
    device:  vision tower once -> prefill (writes a prompt-sized cache) -> grow the cache, pick token 0
             -> jax.lax.while_loop { one-token forward (position = slot + rope_delta[b]) -> logits processors
                                     -> pick a token } until max_new_tokens or every row has hit EOS, entered
                                     in segments of ~0.5 s so the host can stop it (Ctrl-C)
    host:    trim, return [B, prompt + new] ids like transformers' `generate`

Settings and logits processors (transformers 4.57's order) live in sampling.py (`GenerationConfig`).
Finished rows emit `pad_token_id`, like HF.

Compiles: the prompt length and the cache length (prompt bucket + `max_new_tokens`) are bucketed (buckets.py). The
prefill's program depends on the prompt bucket only (it fills a prompt-sized cache that a small model-free
program grows), the decode loop's on the cache bucket only; the actual `max_new_tokens` and every sampling knob are
traced values, so changing them never recompiles. `compiles()` counts the compiled programs of each jitted
function (for tests and logs). Streaming runs the same jitted step once per token from a Python loop, so streamed and
non-streamed outputs are identical.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from ..modeling import partitioning as partitioning_lib
from ..modeling.buckets import bucket, pow2_bucket
from ..modeling.hook_points import HookSet, hook_point_axes, install, make_hookset
from ..modeling.inputs import PreparedInputs, as_attention_mask
from ..modeling.kv_cache import KVCache
from ..modeling.model import Qwen2VL
from .sampling import GenerationConfig, Knobs, pick_token, process_logits

PROMPT_GRANULE = 64  # prompt lengths are padded (on the left) to buckets of this granule, x1.25 growth
MIN_NEW_TOKENS_BUCKET = 32  # recorded logits / hook values: a power of two >= this many rows
SEGMENT_SECONDS = 0.5  # non-streaming decode returns to the host about this often (Ctrl-C is handled there)


@dataclasses.dataclass
class GenerateOutput:
    sequences: np.ndarray  # [B, prompt + new] int64
    logits: np.ndarray | None = None  # [B, new, V] raw fp32 logits of each step, when asked for
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    new_tokens: int = 0
    records: dict | None = None  # values recorded at hook points (`cache_names=`), by name; see `generate`


# --------------------------------------------------------------------------------------------- decode state
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    cache: KVCache
    tokens_BR: jax.Array  # int32 [B, R] (R: the cache length, more than enough) generated ids (pad after EOS)
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
        out = model.forward(state.last_B[:, None], jnp.ones((B, 1), jnp.int32), pos_ZB1, cache=cache)
        logits, cache = out.logits, out.cache
    records = state.records
    if records:
        records = {n: jax.lax.dynamic_update_slice(buf, run.records[n][None].astype(buf.dtype),
                                                   (state.step - 1,) + (0,) * (buf.ndim - 1))
                   for n, buf in records.items()}
    return logits[:, -1], dataclasses.replace(state, cache=cache, records=records)


def _prefill(model, ids, mask, pos, vision, vision_index, cache, hooks=None, offset=0):
    """The prompt's forward into a prompt-sized cache: its compile depends on the prompt bucket only, never on
    `max_new_tokens` (`_start` grows the cache)."""
    with install(hooks, offset=offset) as run:
        out = model.forward(ids, mask, pos, vision, vision_index, cache, logits_to_keep=1, cache_empty=True)
    return out.logits[:, -1], out.cache, run.records


def _start(logits_BV, cache: KVCache, seen, rng, knobs, offset, *, do_sample, keep_logits, cache_length, n_bucket,
           record_shapes=(), partitioning=None):
    """Grow the prefilled cache to `cache_length` slots, set up the decode state and pick the first token. No model
    inside: this small program is the only one compiled per (prompt bucket, cache bucket) pair."""
    with partitioning_lib.active(partitioning):  # the grown cache keeps the model's KV cache sharding
        cache = cache.grown(cache_length - cache.max_length)
    B, V = seen.shape
    # a decode step's value of each recorded point: the prefill's with one token on the token axis
    step_buffers = {n: jnp.zeros((n_bucket, *shape), dtype) for n, shape, dtype in record_shapes}
    state = DecodeState(cache=cache, tokens_BR=jnp.zeros((B, cache_length), jnp.int32),
                        last_B=jnp.zeros((B,), jnp.int32), seen_BV=seen, finished_B=jnp.zeros((B,), bool),
                        step=jnp.zeros((), jnp.int32), rng=rng,
                        logits_BRV=jnp.zeros((B, n_bucket, V), jnp.float32) if keep_logits else None,
                        records=step_buffers or None, offset=offset)
    return _select(state, logits_BV, knobs, do_sample=do_sample)


def _decode_loop(model, state: DecodeState, knobs: Knobs, stop_at, hooks=None, *, do_sample):
    """Decode on the device until `stop_at` tokens (traced), `max_new_tokens` or every row's EOS. The host runs it
    in segments of about `SEGMENT_SECONDS`, so Ctrl-C is seen between segments."""
    def keep_going(s: DecodeState):
        return (s.step < jnp.minimum(stop_at, knobs.max_new_tokens)) & ~jnp.all(s.finished_B)

    def body(s: DecodeState):
        logits, s = _step_logits(model, s, hooks)
        return _select(s, logits, knobs, do_sample=do_sample)

    return jax.lax.while_loop(keep_going, body, state)


def _decode_step(model, state: DecodeState, knobs: Knobs, hooks=None, *, do_sample):
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
            fed = fed_R.reshape(*fed_R.shape[:t], n - 1, *fed_R.shape[t + 2:])
            if "S" in a:  # the prefill ran on the prompt-sized cache: its probabilities of later slots are 0
                grow = [(0, fed.shape[i] - first.shape[i]) if c == "S" else (0, 0) for i, c in enumerate(a)]
                first = np.pad(first, grow)
            first = np.concatenate([first, fed], axis=t)
        value = first
        if "S" in a:  # cache slots -> token positions of the final sequence
            value = np.take(value, np.arange(extra, prompt_slots + n - 1), axis=a.index("S"))
        out[name] = value
    return out


_prefill_jit = jax.jit(_prefill, donate_argnames=("cache",))
_start_jit = jax.jit(_start, static_argnames=("do_sample", "keep_logits", "cache_length", "n_bucket", "record_shapes",
                                             "partitioning"))
_decode_loop_jit = jax.jit(_decode_loop, static_argnames=("do_sample",), donate_argnames=("state",))
_decode_step_jit = jax.jit(_decode_step, static_argnames=("do_sample",), donate_argnames=("state",))


def compiles() -> dict[str, int]:
    """Programs per jitted function: the entries of its jit cache, one per argument signature met (shapes, dtypes,
    shardings, static arguments), so each new prompt / cache bucket or static setting adds one. `jax.clear_caches()`
    empties them."""
    return {"prefill": _prefill_jit._cache_size(), "start": _start_jit._cache_size(),
            "decode_loop": _decode_loop_jit._cache_size(), "decode_step": _decode_step_jit._cache_size()}


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
             return_dict: bool = False, hooks=None, cache_names=None, second_per_grid_ts=None,
             should_stop: Callable[[], bool] | None = None, **kwargs):
    """transformers-style `generate`: returns `[B, prompt + new]` token ids (or a `GenerateOutput`).

    Settings come from `generation_config` (default: the checkpoint's generation_config.json when the model was
    loaded from a directory holding one), overridden by keyword arguments (`max_new_tokens`, `do_sample`,
    `temperature`, `top_k`, `top_p`, `repetition_penalty`, `min_new_tokens`, `eos_token_id`, `pad_token_id`,
    `seed`). `streamer` gets `put(tokens_B)` after each step and `end()` at the end. `second_per_grid_ts`
    (Qwen2.5-VL's processor output for videos: seconds per temporal grid step, one per video) spaces the video
    positions in time; a Qwen2-VL model ignores it. So `generate(model, **processor_outputs)` works for both.

    `hooks` (`{name or pattern: fn(value, ctx)}`, see `qwen2vl_jax.hooks`) run in the prefill and in every decode
    step (`ctx.step`: tokens generated so far). `cache_names` records points: `GenerateOutput.records[name]`
    holds text values over the prompt and every fed-back token (what one forward over the output sequence minus
    its last token records; `logits` holds the rows that picked each new token) and vision values once.

    `should_stop` (a callable, e.g. "has the client gone?") is asked between decode segments (each token when
    streaming): when it answers True, generation ends there and returns the tokens made so far.
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
    cache_length = bucket(T_pad + gc.max_new_tokens, PROMPT_GRANULE)  # the decode programs depend on this only
    n_bucket = pow2_bucket(gc.max_new_tokens, MIN_NEW_TOKENS_BUCKET)
    ids, mask = left_pad(ids0, attention_mask, T_pad, gc.pad_id)
    t0 = time.perf_counter()
    prep: PreparedInputs = model.prepare_inputs(ids, mask, pixel_values, image_grid_thw, pixel_values_videos,
                                                video_grid_thw, second_per_grid_ts=second_per_grid_ts)
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
    cache = model.init_cache(B, T_pad)
    cache = dataclasses.replace(cache, rope_deltas_B=jnp.asarray(prep.rope_deltas_B1[:, 0], jnp.int32))
    knobs = Knobs(
        temperature=jnp.float32(gc.temperature if gc.do_sample else 1.0), top_k=jnp.int32(gc.top_k),
        top_p=jnp.float32(gc.top_p), repetition_penalty=jnp.float32(gc.repetition_penalty),
        min_new_tokens=jnp.int32(gc.min_new_tokens), max_new_tokens=jnp.int32(gc.max_new_tokens),
        eos_ids=jnp.asarray(gc.eos_token_id, jnp.int32), pad_id=jnp.int32(gc.pad_id))
    offset = jnp.int32(T_pad - T)
    last_logits, cache, prefill_records = _prefill_jit(
        model, prep.input_ids_BT, prep.attention_mask_BT, prep.position_ids_ZBT, vision, prep.vision_index_BT, cache,
        text_hooks, offset)
    axes = hook_point_axes(cfg)
    # a decode step's value of each recorded point: the prefill's with one token, over the decode cache's slots
    record_shapes = tuple((name, tuple({"T": 1, "S": cache_length}.get(a, d) for a, d in zip(axes[name], v.shape)),
                           str(v.dtype)) for name, v in prefill_records.items())
    state = _start_jit(last_logits, cache, jnp.asarray(seen), jax.random.key(gc.seed), knobs, offset,
                       do_sample=gc.do_sample, keep_logits=output_logits, cache_length=cache_length,
                       n_bucket=n_bucket, record_shapes=record_shapes, partitioning=model.partitioning)
    del cache, last_logits  # the prompt-sized cache: freed once `_start` has copied it
    first = np.asarray(state.last_B)  # waits for the prefill
    t1 = time.perf_counter()
    if streamer is not None:
        streamer.put(first)
        while (int(state.step) < gc.max_new_tokens and not bool(np.all(np.asarray(state.finished_B)))
               and not (should_stop is not None and should_stop())):
            state = _decode_step_jit(model, state, knobs, text_hooks, do_sample=gc.do_sample)
            streamer.put(np.asarray(state.last_B))
        streamer.end()
    else:
        state = _decode_in_segments(model, state, knobs, text_hooks, gc, should_stop)
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


def _decode_in_segments(model, state: DecodeState, knobs: Knobs, hooks, gc: GenerationConfig,
                        should_stop: Callable[[], bool] | None = None) -> DecodeState:
    """The on-device decode loop, entered once per segment of about SEGMENT_SECONDS: the host regains control
    between segments, so a KeyboardInterrupt (or `should_stop()` answering True) stops generation within a
    segment (one compile: `stop_at` is traced). Segments double from 8 tokens while they take less than
    SEGMENT_SECONDS."""
    import time

    tokens = 8
    step = int(state.step)
    while step < gc.max_new_tokens and not bool(np.all(np.asarray(state.finished_B))):
        if should_stop is not None and should_stop():
            break
        t0 = time.perf_counter()
        state = _decode_loop_jit(model, state, knobs, jnp.int32(step + tokens), hooks, do_sample=gc.do_sample)
        step = int(state.step)  # waits for the segment
        if time.perf_counter() - t0 < SEGMENT_SECONDS / 2:
            tokens = min(2 * tokens, 1 << 16)
    return state


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
