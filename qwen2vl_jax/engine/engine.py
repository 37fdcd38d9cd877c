"""`Engine`: continuous batching over a paged KV cache (JetStream's prefill / insert / generate over decode slots,
vLLM's scheduler over a page pool, in one loop).

    submit(request)  -> validated, positions and page hashes computed (host), queued
    step():
      admit          the oldest waiting requests, while a slot is free and the pool has their pages (the prompt
                     plus max_new_tokens, less the pages the prefix cache already holds)
      run            one device program (`step.py`): the next prefill chunk of the oldest prefilling sequence and
                     one token of every decoding slot, then each slot's next token
      finish         EOS, max_new_tokens, a stop string, or the caller's `should_stop`: the slot and its pages are
                     free for the next request at once

Vision features come from the vision cache or the tower, one image / video at a time. With the loop in a thread
(`start()`), a second thread encodes them while the loop goes on stepping (a request waits for its features, the
running streams do not); without one, `step()` encodes them when it admits the request.

Each slot has its own length, M-RoPE `rope_deltas`, settings, random key and stop conditions, so a request's
tokens are those `generation.generate` gives for it alone, whatever else runs (greedy: the same argmax; seeded
sampling: the same key and draw). A request the pool can never hold is refused when submitted; one that does not
fit now waits. `generate_many` is the offline batch API; `start()` runs the loop in a thread (the server).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..attention import PagedBatch
from ..generation.decoding import TextStreamer
from ..generation.sampling import GenerationConfig, Knobs
from ..generation.stops import StopMatcher
from ..modeling.buckets import pow2_bucket
from ..modeling.inputs import as_2d_ids, check_vision_inputs
from ..modeling.rope import get_rope_index
from .pages import NULL_PAGE, PagePool, cut_back, page_hashes
from .step import SlotSettings, compiles, set_row_jit, step_jit
from .vision_cache import VisionCache, media_hash

__all__ = ["Engine", "Request", "Result", "Handle", "EngineError"]

MAX_EOS_IDS = 8  # end-of-sequence ids per request (a fixed width: the step program's shape does not depend on it)
MIN_CHUNK = 16  # prefill chunks are padded to powers of two from this many tokens
COUNTERS = ("submitted", "steps", "tokens", "chunk_tokens", "prefix_hits", "prefix_cached_tokens", "vision_runs",
            "waited_for_pages", "failed", "finished_stop", "finished_length", "finished_abort")


class EngineError(ValueError):
    """A request the engine refuses (too long for the pool or the context, bad inputs or settings)."""


@dataclasses.dataclass
class Request:
    """One generation: the processor's outputs for one prompt (a single row, no padding), its settings and stops.

    `generation_config` None: the checkpoint's generation_config.json (as `generate`). `stop`: strings that end
    the answer (needs the engine's processor to read the text). `on_token(id)` is called from the engine's thread as
    each token is picked, `on_finish(handle)` once the request has its result or error (an exception raised in
    either fails this request only); `should_stop()` (e.g. "has the client gone?") is asked every step."""

    input_ids: Any
    pixel_values: Any = None
    image_grid_thw: Any = None
    pixel_values_videos: Any = None
    video_grid_thw: Any = None
    second_per_grid_ts: Any = None
    generation_config: GenerationConfig | None = None
    stop: Sequence[str] = ()
    on_token: Callable[[int], None] | None = None
    should_stop: Callable[[], bool] | None = None
    on_finish: Callable[[Handle], None] | None = None
    output_logits: bool = False


@dataclasses.dataclass
class Result:
    tokens: list[int]  # the new ids (the EOS id too when one ended it, as `generate` returns it)
    finish_reason: str  # "stop" (an EOS id or a stop string), "length" (max_new_tokens), "abort" (should_stop)
    prompt_tokens: int
    cached_tokens: int  # prompt tokens whose keys came from the prefix cache
    seconds_to_first_token: float  # from admission
    seconds: float  # from submission to the end
    logits: np.ndarray | None = None  # [new, V] raw fp32 logits of each pick, when asked for


class Handle:
    """A submitted request: `wait()` returns its `Result` (or raises what failed it). `request` is let go once it
    has finished, so finished handles hold no pixels."""

    def __init__(self, request: Request):
        self.request = request
        self.result: Result | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()

    def wait(self, timeout: float | None = None) -> Result:
        if not self.done.wait(timeout):
            raise TimeoutError("the request has not finished")
        if self.error is not None:
            raise self.error
        return self.result


@dataclasses.dataclass(eq=False)
class _Media:
    kind: str  # "image" | "video"
    pixels: np.ndarray
    grid: np.ndarray  # [1, 3]
    key: bytes  # the vision cache's key: pixels + grid
    span: tuple[int, int]  # its placeholder tokens [start, end) in the prompt


@dataclasses.dataclass(eq=False)
class _Sequence:
    handle: Handle
    ids: np.ndarray  # [T] int32
    positions: np.ndarray  # [3, T] int32
    rope_delta: int
    media: list[_Media]
    vision_index: np.ndarray  # [T] int32: row of `vision_rows` of each token, -1 for text
    hashes: list[bytes]  # prefix hash of each full prompt page
    config: GenerationConfig
    key_data: np.ndarray  # uint32 [2]
    pages_needed: int
    submitted: float
    vision_rows: np.ndarray | None = None
    slot: int = -1
    pages: list[int] = dataclasses.field(default_factory=list)
    cached_pages: int = 0
    prefilled: int = 0  # prompt tokens in the cache
    length: int = 0  # tokens in the cache
    generated: list[int] = dataclasses.field(default_factory=list)
    logits: list[np.ndarray] = dataclasses.field(default_factory=list)
    admitted: float = 0.0
    first_token: float = 0.0
    stopper: TextStreamer | None = None
    matcher: StopMatcher | None = None
    encoded: bool = False  # vision_rows are there (or there is no image / video)

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.ids)


class Engine:
    """Continuous batching of one model over `max_slots` decode slots and a paged KV cache (module docstring).

    `page_size` rows per page; `max_context` tokens per sequence at most (prompt + new; default the model's
    max_position_embeddings, at most 8192); `num_pages` in the pool (default: every slot at `max_context`);
    `max_chunk` prompt tokens per prefill chunk (chunks are padded to powers of two from 16); `vision_cache_bytes`
    bounds the vision-embedding cache (0: off); `prefix_cache` reuses the keys of prompt pages seen before; `lock`
    is held around every device call (the server shares it with whatever else runs the model)."""

    def __init__(self, model, processor=None, *, max_slots: int = 8, page_size: int = 16,
                 max_context: int | None = None, num_pages: int | None = None, max_chunk: int = 128,
                 vision_cache_bytes: int = 256 * 2**20, prefix_cache: bool = True, lock=None):
        cfg = model.config
        if getattr(model, "partitioning", None) is not None:
            raise EngineError("the serving engine runs a model on one device: its paged KV cache is not laid out on "
                              "a mesh yet (load the model without `mesh=`)")
        if max_slots < 1 or page_size < 1 or max_chunk < MIN_CHUNK:
            raise ValueError(f"max_slots and page_size must be >= 1 and max_chunk >= {MIN_CHUNK}")
        self.model, self.processor, self.cfg = model, processor, cfg
        self.max_slots, self.page_size = max_slots, page_size
        self.max_chunk = pow2_bucket(max_chunk, MIN_CHUNK)
        self.max_context = min(max_context or 8192, cfg.text_config.max_position_embeddings)
        self.max_pages_per_seq = -(-(self.max_context + self.max_chunk) // page_size)
        if num_pages is None:
            num_pages = 1 + max_slots * -(-self.max_context // page_size)
        self.pool = PagePool(num_pages, page_size)
        self.cache = model.init_paged_cache(num_pages, page_size)
        self.vocab = cfg.text_config.vocab_size
        self.seen = jnp.zeros((max_slots, self.vocab), bool)
        self.vision_cache = VisionCache(vision_cache_bytes)
        self.prefix_cache = prefix_cache
        self.base_config = GenerationConfig.from_pretrained(getattr(model, "source_dir", None))
        self.lock = lock if lock is not None else threading.Lock()
        self.slots: list[_Sequence | None] = [None] * max_slots
        self.waiting: collections.deque[_Sequence] = collections.deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.vision_thread: threading.Thread | None = None
        self.to_encode: collections.deque[_Sequence] = collections.deque()
        self.closed = False
        # every counter exists from the start: `stats()` (another thread) then never sees the dict change size
        self.counters = collections.Counter({k: 0 for k in COUNTERS})

    # -------------------------------------------------------------------------------------------- requests in
    def submit(self, request: Request) -> Handle:
        """Queue a request (thread-safe); raises `EngineError` at once for one the engine can never run."""
        handle = Handle(request)
        seq = self._prepare(request, handle)
        seq.encoded = not seq.media
        with self.cond:
            if self.closed:
                raise EngineError("the engine is closed")
            self.waiting.append(seq)
            if not seq.encoded and self.vision_thread is not None:
                self.to_encode.append(seq)
            self.counters["submitted"] += 1
            self.cond.notify_all()
        return handle

    def generate_many(self, requests: Sequence[Request]) -> list[Result]:
        """Run every request (continuously batched) and return their results in order: the offline batch API."""
        handles = [self.submit(r) for r in requests]
        if self.thread is None:
            while self.busy():
                self.step()
        return [h.wait() for h in handles]

    def _prepare(self, request: Request, handle: Handle) -> _Sequence:
        """Validate, and lay out on the host: positions, media, vision index, page hashes."""
        cfg = self.cfg
        try:
            ids = as_2d_ids(request.input_ids, self.vocab)
        except ValueError as e:
            raise EngineError(str(e)) from None
        if ids.shape[0] != 1:
            raise EngineError(f"a request is one prompt (input_ids [T] or [1, T]), got {ids.shape[0]} rows")
        config = request.generation_config or self.base_config
        if isinstance(config.eos_token_id, int):
            config = dataclasses.replace(config, eos_token_id=(config.eos_token_id,))
        try:
            config.validate(self.vocab)
            check_vision_inputs(ids, cfg, request.pixel_values, request.pixel_values_videos, False)
            pos, deltas = get_rope_index(ids, request.image_grid_thw, request.video_grid_thw, None, cfg,
                                         second_per_grid_ts=request.second_per_grid_ts)
        except ValueError as e:
            raise EngineError(str(e)) from None
        if len(config.eos_token_id) > MAX_EOS_IDS:
            raise EngineError(f"at most {MAX_EOS_IDS} eos_token_id values per request, got {len(config.eos_token_id)}")
        T = ids.shape[1]
        if T + config.max_new_tokens > self.max_context:
            raise EngineError(f"the prompt ({T} tokens) + max_new_tokens ({config.max_new_tokens}) exceeds the "
                              f"engine's context of {self.max_context} tokens")
        pages_needed = -(-(T + config.max_new_tokens) // self.page_size)
        if pages_needed > self.pool.usable:
            raise EngineError(f"the request needs {pages_needed} pages of {self.page_size} tokens, more than the "
                              f"engine's pool holds ({self.pool.usable})")
        if request.stop and self.processor is None:
            raise EngineError("stop strings need the engine's processor (to read the text)")
        ids = ids[0].astype(np.int32)
        media, vision_index = self._media(ids, request)
        content = ids.astype(np.int64)
        for m in media:
            tag = np.frombuffer(m.key[:8], np.int64)[0]
            content[m.span[0]:m.span[1]] = tag ^ np.arange(m.span[1] - m.span[0], dtype=np.int64)
        return _Sequence(handle=handle, ids=ids, positions=pos[:, 0].astype(np.int32), rope_delta=int(deltas[0, 0]),
                         media=media, vision_index=vision_index, hashes=page_hashes(content, self.page_size),
                         config=config, key_data=np.asarray(jax.random.key_data(jax.random.key(config.seed))),
                         pages_needed=pages_needed, submitted=time.perf_counter())

    def _media(self, ids: np.ndarray, request: Request) -> tuple[list[_Media], np.ndarray]:
        """Each image / video (its pixel rows, grid, cache key and placeholder span) and the feature row of every
        token: images' features first, then videos' (`modeling.inputs.prepare_inputs`' order)."""
        cfg = self.cfg
        merge2 = cfg.vision_config.spatial_merge_size ** 2
        media, index, offset = [], np.full(len(ids), -1, np.int32), 0
        seconds = request.second_per_grid_ts
        for kind, pv, grid, token in (("image", request.pixel_values, request.image_grid_thw, cfg.image_token_id),
                                      ("video", request.pixel_values_videos, request.video_grid_thw,
                                       cfg.video_token_id)):
            if pv is None:
                continue
            if grid is None:
                raise EngineError(f"{kind} pixel values were given without {kind}_grid_thw")
            pv, grid = np.asarray(pv), np.asarray(grid).reshape(-1, 3)
            where = np.flatnonzero(ids == token)
            counts = np.prod(grid, axis=-1) // merge2
            if counts.sum() != len(where) or np.prod(grid, axis=-1).sum() != pv.shape[0]:
                raise EngineError(f"{kind} placeholders ({len(where)}), features ({counts.sum()}) and pixel rows "
                                  f"({pv.shape[0]}) do not match the grids {grid.tolist()}")
            index[where] = offset + np.arange(len(where))
            offset += len(where)
            rows = np.concatenate([[0], np.cumsum(np.prod(grid, axis=-1))])
            first = np.concatenate([[0], np.cumsum(counts)])
            for i, g in enumerate(grid):
                extra = b""
                if kind == "video" and seconds is not None:
                    extra = np.float64(np.asarray(seconds, np.float64).reshape(-1)[i]).tobytes()
                pixels = pv[rows[i]:rows[i + 1]]
                span = (int(where[first[i]]), int(where[first[i + 1] - 1]) + 1)
                media.append(_Media(kind, pixels, g[None], media_hash(pixels, g, kind.encode() + extra), span))
        return media, index

    # ------------------------------------------------------------------------------------------------ the loop
    def busy(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def start(self) -> None:
        """Run the loop in a background thread until `close()`, and the vision encoding in another."""
        if self.thread is None:
            with self.cond:
                self.to_encode.extend(s for s in self.waiting if not s.encoded)
                self.vision_thread = threading.Thread(target=self._encode_loop, name="qwen2vl-jax-engine-vision",
                                                      daemon=True)
            self.vision_thread.start()
            self.thread = threading.Thread(target=self._serve, name="qwen2vl-jax-engine", daemon=True)
            self.thread.start()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        for thread in (self.thread, self.vision_thread):
            if thread is not None:
                thread.join(timeout=60)
        for seq in list(self.waiting) + [s for s in self.slots if s is not None]:
            self._fail(seq, EngineError("the engine is shutting down"))
        self.waiting.clear()

    def _serve(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self._runnable():
                    self.cond.wait()
                if self.closed:
                    return
            self.step()

    def _runnable(self) -> bool:
        return any(s is not None for s in self.slots) or any(s.encoded for s in self.waiting)

    def _encode_loop(self) -> None:
        """The vision thread: features for each waiting request that has images or videos, oldest first."""
        while True:
            with self.cond:
                while not self.closed and not self.to_encode:
                    self.cond.wait()
                if self.closed:
                    return
                seq = self.to_encode.popleft()
                if seq not in self.waiting:  # its client left while it waited
                    continue
            try:
                self._encode(seq)
            except Exception as e:
                with self.cond:
                    if seq in self.waiting:
                        self.waiting.remove(seq)
                self._fail(seq, e)
            with self.cond:
                self.cond.notify_all()

    def step(self) -> None:
        """Admit what fits, run one device step, hand out the tokens, finish what is done."""
        try:
            with self.cond:
                self._drop_abandoned_waiting()
                admitted = self._admit()
            for seq in admitted:
                self._start(seq)
            if any(s is not None for s in self.slots):
                self._run()
        except Exception as e:  # a bug or an out-of-memory: every running request fails, the engine goes on
            for seq in [s for s in self.slots if s is not None]:
                self._fail(seq, e)

    def _drop_abandoned_waiting(self) -> None:
        for seq in [s for s in self.waiting if s.handle.request.should_stop and s.handle.request.should_stop()]:
            self.waiting.remove(seq)
            self._deliver(seq, "abort")

    def _admit(self) -> list[_Sequence]:
        """FIFO: the oldest waiting requests while a slot is free and the pool holds their pages."""
        admitted = []
        threaded = self.vision_thread is not None
        while None in self.slots:
            seq = next((s for s in self.waiting if s.encoded or not threaded), None)  # oldest with its features
            if seq is None:
                break
            matched = self._prefix_pages(seq)
            reuse_free = sum(1 for p in matched if self.pool.refs[p] == 0)  # taking them uses evictable pages
            if self.pool.available() - reuse_free < seq.pages_needed - len(matched):
                self.counters["waited_for_pages"] += 1
                break
            self.waiting.remove(seq)
            self.pool.take(matched)
            seq.pages = matched + self.pool.allocate(seq.pages_needed - len(matched))
            seq.cached_pages = len(matched)
            seq.prefilled = seq.length = len(matched) * self.page_size
            seq.slot = self.slots.index(None)
            self.slots[seq.slot] = seq
            admitted.append(seq)
            self.counters["prefix_cached_tokens"] += seq.prefilled
            self.counters["prefix_hits"] += bool(matched)
        return admitted

    def _prefix_pages(self, seq: _Sequence) -> list[int]:
        if not self.prefix_cache:
            return []
        pages = self.pool.match(seq.hashes)
        spans = [m.span for m in seq.media]
        return pages[:cut_back(len(pages) * self.page_size, spans, len(seq.ids), self.page_size) // self.page_size]

    def _encode(self, seq: _Sequence) -> None:
        """The request's vision features, each image / video from the vision cache or the tower. Not under `lock`:
        in the vision thread this runs beside the decode steps."""
        rows = []
        for m in seq.media:
            features = self.vision_cache.get(m.key)
            if features is None:
                features = np.asarray(self.model.visual(m.pixels, m.grid))
                self.counters["vision_runs"] += 1
                self.vision_cache.put(m.key, features)
            rows.append((m.kind, features))
        if rows:  # images first, then videos (the vision index's order)
            ordered = [f for k, f in rows if k == "image"] + [f for k, f in rows if k == "video"]
            seq.vision_rows = np.concatenate(ordered)
        seq.encoded = True

    def _start(self, seq: _Sequence) -> None:
        """A new slot's vision features (when not encoded yet) and its repetition-penalty row."""
        seq.admitted = time.perf_counter()
        if not seq.encoded:
            self._encode(seq)
        row = np.zeros(self.vocab, bool)
        row[seq.ids] = True
        with self.lock:
            self.seen = set_row_jit(self.seen, jnp.int32(seq.slot), jnp.asarray(row))
        if seq.handle.request.stop:
            seq.matcher = StopMatcher(list(seq.handle.request.stop))
            seq.stopper = TextStreamer(self.processor, on_text=seq.matcher.feed)

    def _row_of(self, seq: _Sequence, position: int) -> int:
        return seq.pages[position // self.page_size] * self.page_size + position % self.page_size

    def _run(self) -> None:
        """One device step over every slot (module docstring)."""
        S, page = self.max_slots, self.page_size
        prefilling = [s for s in self.slots if s is not None and not s.decoding]
        chunk = min(prefilling, key=lambda s: s.admitted) if prefilling else None
        n = min(len(chunk.ids) - chunk.prefilled, self.max_chunk) if chunk else 0
        C = pow2_bucket(n, MIN_CHUNK) if chunk else 0
        offset = 1 if chunk else 0  # sequence index of slot 0's decode token
        T = C + S
        ids, pos = np.zeros(T, np.int32), np.zeros((3, T), np.int32)
        slot_T = np.full(T, NULL_PAGE * page, np.int32)
        kv_lens = np.ones(offset + S, np.int32)
        tables: list[list[int]] = [[] for _ in range(offset + S)]
        logit_rows, emit = np.zeros(S, np.int32), np.zeros(S, bool)
        vision_CD = vision_index_T = None
        if chunk:
            start = chunk.prefilled
            span = np.arange(start, start + n)
            ids[:n], pos[:, :n] = chunk.ids[span], chunk.positions[:, span]
            slot_T[:n] = [self._row_of(chunk, p) for p in span]
            kv_lens[0] = start + C
            tables[0] = chunk.pages
            vision_CD = np.zeros((C, self.cfg.text_config.hidden_size), np.dtype(self.model.dtype))
            vision_index_T = np.full(T, -1, np.int32)
            rows = chunk.vision_index[span]
            real = np.flatnonzero(rows >= 0)
            if real.size:
                vision_CD[real] = chunk.vision_rows[rows[real]]
                vision_index_T[real] = real
            if start + n == len(chunk.ids):  # the prompt ends here: its last token's logits pick token 0
                logit_rows[chunk.slot], emit[chunk.slot] = n - 1, True
        for s, seq in enumerate(self.slots):
            if seq is None or not seq.decoding:
                continue
            t = C + s
            ids[t] = seq.generated[-1]
            pos[:, t] = seq.length + seq.rope_delta
            slot_T[t] = self._row_of(seq, seq.length)
            kv_lens[offset + s] = seq.length + 1
            tables[offset + s] = seq.pages
            logit_rows[s], emit[s] = t, True
        width = max(-(-int(k) // page) for k in kv_lens)
        pps = min(pow2_bucket(width), pow2_bucket(self.max_pages_per_seq))
        table = np.zeros((offset + S, pps), np.int32)
        for i, pages in enumerate(tables):
            used = pages[:pps]
            table[i, :len(used)] = used
        groups = ((1, C), (S, 1)) if chunk else ((S, 1),)
        cu = np.concatenate([[0], np.cumsum([q for n_seqs, q in groups for _ in range(n_seqs)])]).astype(np.int32)
        batch = PagedBatch(jnp.asarray(slot_T), jnp.asarray(kv_lens), jnp.asarray(table), jnp.asarray(cu),
                           jnp.asarray([offset + S], jnp.int32), groups)
        keep_logits = any(s is not None and s.handle.request.output_logits for s in self.slots)
        with self.lock:
            token_S, self.seen, self.cache, logits_SV = step_jit(
                self.model, self.cache, self.seen, jnp.asarray(ids), jnp.asarray(pos),
                None if vision_CD is None else jnp.asarray(vision_CD),
                None if vision_index_T is None else jnp.asarray(vision_index_T), batch, jnp.asarray(logit_rows),
                jnp.asarray(emit), self._settings(), keep_logits=keep_logits)
            tokens = np.asarray(token_S)
        logits = np.asarray(logits_SV) if keep_logits else None
        self.counters["steps"] += 1
        self.counters["chunk_tokens"] += n
        if chunk:
            chunk.prefilled += n
            chunk.length = chunk.prefilled
            for p in range(chunk.cached_pages, chunk.prefilled // page):
                if self.prefix_cache and p < len(chunk.hashes):
                    self.pool.register(chunk.hashes[p], chunk.pages[p])
        for s in np.flatnonzero(emit):
            seq = self.slots[s]
            if seq.generated:  # a decode token was written to the cache
                seq.length += 1
            self._emit(seq, int(tokens[s]), None if logits is None else logits[s])

    def buckets(self) -> list[tuple[int, int]]:
        """Every (prefill chunk C, 0 for none; pages per sequence) the step program can be compiled for."""
        chunks = [0] + [c for c in (MIN_CHUNK << i for i in range(32)) if c <= self.max_chunk]
        pages = [p for p in (1 << i for i in range(32)) if p <= pow2_bucket(self.max_pages_per_seq)]
        return [(c, p) for c in chunks for p in pages]

    def warmup(self) -> int:
        """Compile the step program for every bucket (`buckets()`) now, on an idle engine, so serving never
        compiles: each runs once with every token on the null page. Returns the number of programs."""
        if self.busy():
            raise EngineError("warmup() needs an idle engine")
        S, D = self.max_slots, self.cfg.text_config.hidden_size
        for C, pps in self.buckets():
            groups = ((1, C), (S, 1)) if C else ((S, 1),)
            n_seqs = S + (1 if C else 0)
            cu = np.concatenate([[0], np.cumsum([q for n, q in groups for _ in range(n)])]).astype(np.int32)
            batch = PagedBatch(jnp.zeros(C + S, jnp.int32), jnp.ones(n_seqs, jnp.int32),
                               jnp.zeros((n_seqs, pps), jnp.int32), jnp.asarray(cu), jnp.asarray([n_seqs], jnp.int32),
                               groups)
            with self.lock:
                _, self.seen, self.cache, _ = step_jit(
                    self.model, self.cache, self.seen, jnp.zeros(C + S, jnp.int32), jnp.zeros((3, C + S), jnp.int32),
                    jnp.zeros((C, D), self.model.dtype) if C else None,
                    jnp.full(C + S, -1, jnp.int32) if C else None, batch, jnp.zeros(S, jnp.int32),
                    jnp.zeros(S, bool), self._settings(), keep_logits=False)
        jax.block_until_ready(self.cache)
        return len(self.buckets())

    def _settings(self) -> SlotSettings:
        S = self.max_slots
        configs = [s.config if s is not None else None for s in self.slots]
        get = lambda name, default, dtype: jnp.asarray([getattr(c, name) if c else default for c in configs], dtype)
        eos = np.zeros((S, MAX_EOS_IDS), np.int32)
        keys = np.zeros((S, 2), np.uint32)
        generated = np.zeros(S, np.int32)
        for s, seq in enumerate(self.slots):
            if seq is not None:
                e = list(seq.config.eos_token_id)
                eos[s] = e + [e[0]] * (MAX_EOS_IDS - len(e))
                keys[s], generated[s] = seq.key_data, len(seq.generated)
        knobs = Knobs(temperature=jnp.asarray([(c.temperature if c.do_sample else 1.0) if c else 1.0
                                                for c in configs], jnp.float32),
                      top_k=get("top_k", 0, jnp.int32), top_p=get("top_p", 1.0, jnp.float32),
                      repetition_penalty=get("repetition_penalty", 1.0, jnp.float32),
                      min_new_tokens=get("min_new_tokens", 0, jnp.int32),
                      max_new_tokens=get("max_new_tokens", 1, jnp.int32), eos_ids=jnp.asarray(eos),
                      pad_id=jnp.asarray([c.pad_id if c else 0 for c in configs], jnp.int32))
        return SlotSettings(knobs, get("do_sample", False, bool), jnp.asarray(keys), jnp.asarray(generated))

    # ---------------------------------------------------------------------------------------------- tokens out
    def _emit(self, seq: _Sequence, token: int, logits_V) -> None:
        if not seq.generated:
            seq.first_token = time.perf_counter()
        seq.generated.append(token)
        if logits_V is not None:
            seq.logits.append(logits_V)
        self.counters["tokens"] += 1
        request = seq.handle.request
        if request.on_token is not None:
            try:
                request.on_token(token)
            except Exception as e:  # the caller's callback: this request fails, the others go on
                self._fail(seq, e)
                return
        reason = None
        if token in seq.config.eos_token_id:
            reason = "stop"
        elif seq.stopper is not None:
            seq.stopper.put(np.asarray([token]))
            reason = "stop" if seq.matcher.stopped else None
        if reason is None and len(seq.generated) >= seq.config.max_new_tokens:
            reason = "length"
        if reason is None and request.should_stop is not None and request.should_stop():
            reason = "abort"
        if reason is not None:
            self._finish(seq, reason)

    def _finish(self, seq: _Sequence, reason: str) -> None:
        self.slots[seq.slot] = None
        self.pool.release(seq.pages)
        seq.pages = []
        self._deliver(seq, reason)
        with self.cond:
            self.cond.notify_all()

    def _deliver(self, seq: _Sequence, reason: str) -> None:
        now = time.perf_counter()
        self.counters[f"finished_{reason}"] += 1
        seq.handle.result = Result(tokens=list(seq.generated), finish_reason=reason, prompt_tokens=len(seq.ids),
                                   cached_tokens=seq.cached_pages * self.page_size,
                                   seconds_to_first_token=(seq.first_token - seq.admitted) if seq.generated else 0.0,
                                   seconds=now - seq.submitted,
                                   logits=np.stack(seq.logits) if seq.logits else None)
        self._done(seq.handle)

    def _done(self, handle: Handle) -> None:
        on_finish = handle.request.on_finish
        handle.request = None
        handle.done.set()
        if on_finish is not None:
            try:
                on_finish(handle)
            except Exception:  # nothing left to fail: the request has its result
                import traceback

                traceback.print_exc()

    def _fail(self, seq: _Sequence, error: BaseException) -> None:
        if seq.slot >= 0 and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
            self.pool.release(seq.pages)
            seq.pages = []
        self.counters["failed"] += 1
        seq.handle.error = error
        self._done(seq.handle)

    # ------------------------------------------------------------------------------------------------- metrics
    def stats(self) -> dict[str, Any]:
        """Counters and gauges: slots busy, pages free / cached, cache hits, tokens, steps, compiled programs."""
        out = {"slots_total": self.max_slots, "slots_busy": sum(s is not None for s in self.slots),
               "requests_waiting": len(self.waiting), **self.pool.stats(),
               "vision_cache_hits": self.vision_cache.hits, "vision_cache_misses": self.vision_cache.misses,
               "vision_cache_bytes": self.vision_cache.bytes, **dict(self.counters)}
        out.update({f"compiled_{k}": v for k, v in compiles().items()})
        return out
