"""`qwen2vl-jax serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over one loaded model.

    POST /v1/chat/completions   OpenAI's Chat Completions (text, images, videos; `stream` as server-sent events)
    GET  /v1/models             the one served model          GET /health   liveness and queue length
    GET  /metrics               the engine's gauges and counters in Prometheus' text format

How requests run: the HTTP handlers parse and validate (api.py), decode images and videos and tokenize (in a
thread pool), then submit the request to the serving engine (`qwen2vl_jax.engine.Engine`): continuous batching over
`--max-batch` decode slots and a paged KV cache, long prompts prefilled in chunks between decode steps, repeated
photos served from the vision cache and repeated prompt prefixes from the prefix cache. A request that arrives while
others decode starts at the next step; nothing waits for a batch to end. At most `--max-queue` requests wait for a
slot (more: 503). Every device call holds `Engine.lock` (anything else that runs the model, like the explorer,
takes the same lock). A streamed request sends each text piece as it is decoded; a client that hangs up (or,
streaming, stops reading for `STALL_SECONDS` while its answer waits to be sent) frees its slot at the next step.

With `hooks` set (steering a served model), requests run one at a time through `generation.generate`, which
applies them; the paged engine has no hook points.

Safety (a server trusts no client): images and videos are data URLs, or local files only inside
`--allowed-local-media-path` (media.py, video_input.py), their headers checked against pixel budgets before
anything is decoded; `Host`, API key and content type are checked before a handler runs (guard.py); bodies, stop
strings and `max_tokens` (`--max-tokens`) are bounded; each request's memory is estimated
(memory.estimate_request) and refused with the estimate when it cannot fit, and one the KV pool could never hold
is refused with the pool's size.

Sampling: `temperature` 0 is greedy; a `temperature` or `top_p` from the client samples with them and top_k=0 (the
Instruct checkpoints' generation_config.json has top_k=1, top_p=0.001, which would keep sampling greedy); with
neither, the checkpoint's generation_config applies. Every request has its own random key (its `seed`, or a random
one), so a seeded request gives the same answer whatever else runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import threading
import time
import traceback
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .. import engine as serving
from ..generation import memory
from ..generation.decoding import TextStreamer, generate
from ..generation.sampling import GenerationConfig
from ..generation.stops import StopMatcher, cut_at_stop
from .api import (
    RequestError,
    chunk,
    completion,
    error_body,
    new_id,
    parse_request,
    sse,
    to_template_messages,
    usage,
    validation_message,
)
from .guard import Guard, read_body
from .media import MediaError, MediaPolicy, open_image, shrink_for_processor
from .metrics import prometheus_text
from .video_input import load_video, processor_video_inputs

__all__ = ["Engine", "build_engine", "create_app", "served_name"]

DEFAULT_MAX_TOKENS = 512  # a request without max_tokens: this many at most (and never past the context)
MAX_TOKENS_CAP = 4096  # --max-tokens: the most any request may ask for
DEFAULT_KV_TOKENS_PER_SLOT = 4096  # the KV pool's default size: this many tokens per slot (--kv-cache-tokens)
STALL_SECONDS = 0.5  # a streamed answer whose client has taken nothing for this long, with text waiting, is dropped
DISCONNECT_POLL_SECONDS = 0.2  # how often a waiting non-streamed request checks that its client is still there


@dataclasses.dataclass(eq=False)
class Job:
    """One chat completion on its way through the engine; results reach the event loop thread-safely."""

    ids: np.ndarray  # [T] prompt token ids
    pixel_values: np.ndarray | None
    image_grid_thw: np.ndarray | None
    config: GenerationConfig  # max_new_tokens = this request's max_tokens
    stops: list[str]
    stream: bool
    include_usage: bool
    loop: asyncio.AbstractEventLoop
    pixel_values_videos: np.ndarray | None = None
    video_grid_thw: np.ndarray | None = None
    second_per_grid_ts: np.ndarray | None = None
    future: asyncio.Future | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False
    vision_patches: int = 0  # sum of t*h*w over the images' and videos' grids (the memory estimate's)
    largest_segment: int = 0  # h*w of the largest image or video frame
    produced: int = 0  # streamed events sent by the engine ...
    consumed: int = 0  # ... and those the client's connection has taken
    waiting_since: float = 0.0  # since when the oldest event not yet taken has waited (or the client last took one)

    def send(self, kind: str, payload: Any = None) -> None:
        if self.stream:
            if self.produced == self.consumed:
                self.waiting_since = time.monotonic()
            self.produced += 1
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        else:
            self.loop.call_soon_threadsafe(_resolve, self.future, (kind, payload))

    def gone(self) -> bool:
        """The client left, or (streaming) has taken nothing for STALL_SECONDS while text waits for it."""
        if not self.cancelled and self.stream and self.produced > self.consumed:
            if time.monotonic() - self.waiting_since > STALL_SECONDS:
                self.cancelled = True
        return self.cancelled


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():  # the client may have gone
        future.set_result(value)


class _Abort(Exception):
    """Raised from the streamer to end a streamed decode early (a stop string, or the client left)."""


class _JobStreamer(TextStreamer):
    """Token ids -> text pieces -> the stop matcher -> `delta` events of a streamed job."""

    def __init__(self, processor, job: Job, cutter: StopMatcher, abort: bool = True):
        super().__init__(processor, on_text=self._piece)
        self.job, self.cutter, self.abort = job, cutter, abort

    def put(self, tokens_B) -> None:
        if self.abort and self.job.gone():
            raise _Abort
        super().put(tokens_B)

    def _piece(self, piece: str) -> None:
        out = self.cutter.feed(piece)
        if out:
            self.job.send("delta", out)
        if self.abort and self.cutter.stopped:
            raise _Abort


class Engine:
    """One model, its processor and the serving engine that runs every request.

    Shared with the explorer (explorer.py): `model`, `processor`, `model_name`, `lock` (held by whatever runs the
    model), `hooks` (None or `{name or pattern: fn(value, ctx)}`, qwen2vl_jax.hooks; applied to every generation
    here and to the explorer's inspection runs), `load_image(url)`, `check_memory(...)`. `stats` counts requests,
    streams and requests stopped because their client went away (`abandoned`); `core` is the
    `qwen2vl_jax.engine.Engine` (its `stats()`: slots, pages, caches; all on /metrics).

    `media`: the `MediaPolicy` for images and videos (default: data URLs only); `max_tokens`: the most new tokens a
    request may ask for; `max_memory`: bytes this process may use in all (weights included; default: what it holds
    now plus what the machine has available); `max_batch`: decode slots; `max_queue`: requests waiting for a slot;
    `kv_cache_tokens`: the KV pool's size in tokens (default 4096 per slot, at most the context).
    """

    def __init__(self, model, processor, *, model_name: str, hooks=None, max_batch: int = 8, max_queue: int = 64,
                 max_request_bytes: int = 20 * 2**20, max_images: int = 16,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS, max_tokens: int = MAX_TOKENS_CAP,
                 media: MediaPolicy | None = None, max_memory: int | None = None,
                 kv_cache_tokens: int | None = None, page_size: int = 16, max_chunk: int = 128):
        self.model, self.processor, self.model_name, self.hooks = model, processor, model_name, hooks
        self.max_batch, self.max_request_bytes, self.max_images = max_batch, max_request_bytes, max_images
        self.max_queue = max_queue
        self.max_tokens = max_tokens
        self.default_max_tokens = min(default_max_tokens, max_tokens)
        self.media = media if media is not None else MediaPolicy(max_bytes=max_request_bytes)
        self.max_memory = max_memory
        self.lock = threading.Lock()
        self.context = model.config.text_config.max_position_embeddings
        self.base_config = GenerationConfig.from_pretrained(getattr(model, "source_dir", None))
        self.stats: dict[str, Any] = {"requests": 0, "streams": 0, "abandoned": 0, "hooked": 0}
        tokens = kv_cache_tokens or max_batch * min(DEFAULT_KV_TOKENS_PER_SLOT, self.context)
        self.core = serving.Engine(model, processor, max_slots=max_batch, page_size=page_size,
                                   max_context=self.context, num_pages=1 + -(-tokens // page_size),
                                   max_chunk=max_chunk, lock=self.lock)
        self.closed = False
        self.core.start()

    # ------------------------------------------------------------------------------------------ requests in
    def load_image(self, url: str, where: str = "image"):
        """A data URL (`data:image/...;base64,...`), or a local path / `file://` URL inside the allowed media
        directory -> PIL image, its header checked against the pixel budget before decoding. Anything else ->
        RequestError (400, or 403 for a path the policy forbids) naming the image."""
        try:
            return open_image(self.media.image_bytes(url, where), self.media, where)
        except MediaError as e:
            raise RequestError(e.status, e.message, param=where) from None

    def check_memory(self, *, rows: int, prompt_tokens: int, new_tokens: int, vision_patches: int = 0,
                     largest_segment: int = 0) -> None:
        """Refuse (RequestError 400, with the estimate) a generation of `rows` rows that cannot fit in memory
        (memory.estimate_request, as the CLI's check; the weights are already resident)."""
        estimate = self.memory_estimate(rows, prompt_tokens, new_tokens, vision_patches, largest_segment)
        limit = self.memory_limit(estimate)
        if estimate.total > limit:
            raise RequestError(400, f"this request cannot fit in the server's memory: it needs about "
                                    f"{estimate.describe()}, and {limit / 1e9:.2f} GB are available"
                                    f"{' (--max-memory)' if self.max_memory else ''}; send fewer or smaller "
                                    f"images, a shorter prompt or a smaller max_tokens")

    def memory_estimate(self, rows, prompt_tokens, new_tokens, vision_patches=0, largest_segment=0):
        return memory.estimate_request(
            self.model.config, batch=rows, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
            vision_patches=vision_patches, largest_segment_patches=largest_segment,
            dtype=str(np.dtype(self.model.dtype)), attn_implementation=self._backend())

    def memory_limit(self, estimate) -> int:
        return self.max_memory if self.max_memory else memory.available_bytes() + estimate.weights

    def _backend(self) -> str | None:
        from ..attention import platform_backend

        try:
            return platform_backend(self.model.config.attn_implementation)
        except Exception:  # an estimate for the worse backend is still an upper bound
            return None

    def prepare(self, req, loop: asyncio.AbstractEventLoop) -> Job:
        """Validate one parsed request, decode its images and videos and tokenize it (the CPU work before the
        engine). Each image is brought to the size the processor will use as soon as it is decoded, so a request
        holds one full-size decode at a time."""
        messages, urls, video_parts = to_template_messages(req)
        if len(urls) > self.max_images:
            raise RequestError(400, f"too many images: {len(urls)} in one request, at most {self.max_images}")
        if len(video_parts) > self.media.max_videos:
            raise RequestError(400, f"too many videos: {len(video_parts)} in one request, at most "
                                    f"{self.media.max_videos}")
        asked = req.new_tokens()
        if asked is not None and asked > self.max_tokens:
            raise RequestError(400, f"max_tokens is {asked}, more than this server allows ({self.max_tokens}, "
                                    "--max-tokens)", param="max_tokens")
        images = []
        for url, where in urls:
            image = self.load_image(url, where)
            try:
                images.append(shrink_for_processor(image, self.processor.image_processor))
            except ValueError as e:  # smart_resize: too small, or too extreme an aspect ratio
                raise RequestError(400, f"cannot use image {where}: {e}", param=where) from None
            del image
        videos = []
        for v in video_parts:
            try:
                videos.append(load_video(v.source, self.media, v.where, fps=v.fps, nframes=v.nframes,
                                         max_frames=v.max_frames))
            except MediaError as e:
                raise RequestError(e.status, e.message, param=v.where) from None
        try:
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = self.processor(text=[prompt], images=images or None,
                                    **processor_video_inputs(self.processor, videos))
        except ValueError as e:
            raise RequestError(400, f"cannot encode the messages: {e}") from None
        del images, videos
        ids = np.asarray(inputs["input_ids"])[0]
        room = self.context - len(ids)
        if room < 1 or (asked is not None and asked > room):
            raise RequestError(400, f"too many tokens: the prompt has {len(ids)} tokens and max_tokens is "
                                    f"{asked if asked is not None else 1}; together they exceed the model's context "
                                    f"of {self.context} tokens", param="max_tokens" if room >= 1 else "messages")
        new_tokens = asked if asked is not None else min(self.default_max_tokens, room)
        patches, largest = memory.vision_sizes(inputs.get("image_grid_thw"), inputs.get("video_grid_thw"))
        self.check_memory(rows=1, prompt_tokens=len(ids), new_tokens=new_tokens, vision_patches=patches,
                          largest_segment=largest)
        config = self._sampling(req, new_tokens)
        return Job(ids=ids, pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                   config=config, stops=req.stop_strings(), stream=req.stream,
                   include_usage=bool(req.stream_options and req.stream_options.include_usage), loop=loop,
                   pixel_values_videos=inputs.get("pixel_values_videos"), video_grid_thw=inputs.get("video_grid_thw"),
                   second_per_grid_ts=inputs.get("second_per_grid_ts"), vision_patches=patches,
                   largest_segment=largest)

    def _sampling(self, req, max_new_tokens: int) -> GenerationConfig:
        kw: dict[str, Any] = {}
        if req.temperature == 0:
            kw["do_sample"] = False
        elif req.temperature is not None or req.top_p is not None:
            kw.update(do_sample=True, top_k=0, temperature=1.0 if req.temperature is None else req.temperature,
                      top_p=1.0 if req.top_p is None else req.top_p)
        # OpenAI: no seed, no reproducibility. Its seeds are int64; ours 0..2**63-1 (negative ones wrap around)
        seed = req.seed % 2**63 if req.seed is not None else secrets.randbits(31)
        config = dataclasses.replace(self.base_config, max_new_tokens=max_new_tokens, seed=seed, **kw)
        try:
            config.validate(self.model.config.text_config.vocab_size)
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        return config

    def submit(self, job: Job) -> None:
        """Hand a job to the engine (RequestError 503 when `max_queue` requests already wait, 400 for one the KV
        pool can never hold); its answer reaches `job` from the engine's thread."""
        if self.closed:
            raise RequestError(503, "the server is shutting down")
        self.stats["requests"] += 1
        self.stats["streams"] += job.stream
        if self.hooks:
            self.stats["hooked"] += 1
            threading.Thread(target=self._run_hooked, args=(job,), daemon=True).start()
            return
        if len(self.core.waiting) >= self.max_queue:
            raise RequestError(503, f"the server is busy: {len(self.core.waiting)} requests are already waiting "
                                    f"(--max-queue {self.max_queue}); retry later")
        streamer = _JobStreamer(self.processor, job, StopMatcher(job.stops), abort=False) if job.stream else None
        request = serving.Request(
            input_ids=job.ids, pixel_values=job.pixel_values, image_grid_thw=job.image_grid_thw,
            pixel_values_videos=job.pixel_values_videos, video_grid_thw=job.video_grid_thw,
            second_per_grid_ts=job.second_per_grid_ts, generation_config=job.config, stop=job.stops,
            on_token=(lambda token: streamer.put(np.asarray([token]))) if streamer else None,
            should_stop=job.gone, on_finish=lambda handle: self._finished(job, handle, streamer))
        try:
            self.core.submit(request)
        except serving.EngineError as e:
            raise RequestError(400, str(e)) from None

    # ------------------------------------------------------------------------------------------- answers out
    def _finished(self, job: Job, handle: serving.Handle, streamer: _JobStreamer | None) -> None:
        """The engine's result -> the client's answer (called in the engine's thread)."""
        if handle.error is not None:
            error = handle.error
            if isinstance(error, serving.EngineError):  # the engine is shutting down
                error = RequestError(503, str(error))
            elif not isinstance(error, RequestError):
                error = RequestError(500, f"internal error: {type(error).__name__}: {error}")
            job.send("error", error)
            return
        result = handle.result
        if result.finish_reason == "abort" or job.cancelled:
            self.stats["abandoned"] += 1
            return
        ended = bool(result.tokens) and result.tokens[-1] in set(job.config.eos_token_id)
        if streamer is not None:
            tail = streamer.cutter.flush()
            if tail:
                job.send("delta", tail)
            finish = "stop" if streamer.cutter.stopped or ended else "length"
            job.send("done", (finish, usage(len(job.ids), len(result.tokens))))
            return
        tokens = result.tokens[:-1] if ended else result.tokens
        text, stopped = cut_at_stop(self.processor.decode(tokens, skip_special_tokens=True), job.stops)
        finish = "stop" if stopped or ended else "length"
        job.send("ok", completion(self.model_name, text, finish, len(job.ids), len(result.tokens)))

    def _run_hooked(self, job: Job) -> None:
        """A request of a server with `hooks`: alone, through `generate` (which applies them), holding the lock."""
        try:
            with self.lock:
                cutter = StopMatcher(job.stops)
                streamer = _JobStreamer(self.processor, job, cutter) if job.stream else None
                try:
                    out = generate(self.model, job.ids[None], None, job.pixel_values, job.image_grid_thw,
                                   job.pixel_values_videos, job.video_grid_thw,
                                   second_per_grid_ts=job.second_per_grid_ts, generation_config=job.config,
                                   hooks=self.hooks, streamer=streamer, should_stop=job.gone)
                except _Abort:
                    out = None
            if job.gone():
                self.stats["abandoned"] += 1
                return
            tokens = streamer.ids if streamer is not None else np.asarray(out)[0, len(job.ids):].tolist()
            eos = set(job.config.eos_token_id)
            end = next((k for k, t in enumerate(tokens) if t in eos), None)
            count = len(tokens) if end is None else end + 1
            if streamer is not None:
                tail = cutter.flush()
                if tail:
                    job.send("delta", tail)
                finish = "stop" if cutter.stopped or end is not None else "length"
                job.send("done", (finish, usage(len(job.ids), count)))
                return
            text, stopped = cut_at_stop(self.processor.decode(tokens[:end], skip_special_tokens=True), job.stops)
            finish = "stop" if stopped or end is not None else "length"
            job.send("ok", completion(self.model_name, text, finish, len(job.ids), count))
        except Exception as e:  # a bug: the client gets a 500 and the log a traceback
            traceback.print_exc()
            job.send("error", RequestError(500, f"internal error: {type(e).__name__}: {e}"))

    def metrics(self) -> str:
        """/metrics: the engine's gauges and counters and the server's, in Prometheus' text format."""
        return prometheus_text({**self.core.stats(), **{f"server_{k}": v for k, v in self.stats.items()}})

    def close(self) -> None:
        """Stop the engine after its current step; waiting and running requests get a 503."""
        self.closed = True
        self.core.close()


def served_name(model_path) -> str:
    """The model id clients see: a local checkpoint's folder name (never the server's filesystem path), or the
    Hub id as given."""
    text = os.fspath(model_path)
    if os.path.exists(text):  # a local checkpoint
        return os.path.basename(os.path.normpath(os.path.abspath(text)))
    return text


def build_engine(model_path, *, dtype: str = "float32", attn_implementation: str | None = None,
                 model_name: str | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
                 **options) -> Engine:
    """Load a checkpoint (directory or Hub id) and its processor into an `Engine` (`options`: Engine's keywords)."""
    from ..pretrained import Qwen2VLForConditionalGeneration
    from ..processing.processor import Qwen2VLProcessor

    model = Qwen2VLForConditionalGeneration.from_pretrained(model_path, dtype=dtype,
                                                            attn_implementation=attn_implementation, progress=False)
    pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    processor = Qwen2VLProcessor.from_pretrained(model_path, **pixels)
    return Engine(model, processor, model_name=model_name or served_name(model_path), **options)


# ------------------------------------------------------------------------------------------------- the app
def create_app(engine: Engine, *, api_key: str | None = None, bind_host: str = "127.0.0.1",
               allowed_hosts: tuple[str, ...] | list[str] = (), docs: bool = False) -> FastAPI:
    """The FastAPI app over `engine`: the OpenAI routes, OpenAI-style error bodies for every error (validation
    errors are 400s, as OpenAI answers them, not FastAPI's 422), and the explorer when its module is present.

    `guard.Guard` checks every request but /health first (`Host` against `bind_host` and `allowed_hosts`,
    `Authorization: Bearer api_key` when a key is set, JSON content type on POST). `docs`: serve /docs and
    /openapi.json (off by default: they describe the server to anyone who asks)."""
    app = FastAPI(title="qwen2vl_jax", description="OpenAI-compatible API over a Qwen2-VL / Qwen2.5-VL model",
                  docs_url="/docs" if docs else None, redoc_url=None, openapi_url="/openapi.json" if docs else None)
    app.state.engine = engine
    app.add_middleware(Guard, bind_host=bind_host, api_key=api_key, allowed_hosts=tuple(allowed_hosts))

    @app.exception_handler(RequestError)
    async def request_error(_, e: RequestError):
        # a refused upload ends the connection: the client stops sending a body nobody reads
        headers = {"Connection": "close"} if e.status == 413 else None
        return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        return JSONResponse(error_body(400, validation_message(e)), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def bug(_, e: Exception):  # a bug: an OpenAI error body for the client, the traceback in the log
        traceback.print_exception(e)
        return JSONResponse(error_body(500, f"internal error: {type(e).__name__}"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_name, "queued": len(engine.core.waiting)}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card() -> dict:
        return {"id": engine.model_name, "object": "model", "created": created, "owned_by": "qwen2vl_jax"}

    created = int(time.time())

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != engine.model_name:
            raise RequestError(404, f"the model {model_id!r} does not exist; this server serves "
                                    f"{engine.model_name!r}", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_body(request, engine.max_request_bytes)
        req = await run_in_threadpool(parse_request, body)
        del body
        if req.model != engine.model_name:
            raise RequestError(404, f"the model {req.model!r} does not exist; this server serves "
                                    f"{engine.model_name!r}", param="model", code="model_not_found")
        loop = asyncio.get_running_loop()
        job = await run_in_threadpool(engine.prepare, req, loop)
        if req.stream:  # made here, on the event loop's thread, which alone touches them
            job.events = asyncio.Queue()
        else:
            job.future = loop.create_future()
        await run_in_threadpool(engine.submit, job)  # hashing pixels and laying out positions: off the event loop
        if req.stream:
            return StreamingResponse(_events(engine, job), media_type="text/event-stream")
        try:
            while True:  # wait for the answer, noticing a client that hangs up (its decode then stops)
                done, _ = await asyncio.wait({job.future}, timeout=DISCONNECT_POLL_SECONDS)
                if done:
                    break
                if await request.is_disconnected():
                    job.cancelled = True
                    return Response(status_code=499)  # nobody reads it (nginx's "client closed request")
            kind, payload = job.future.result()
        finally:
            job.cancelled = True  # a client that left before its turn is skipped (a no-op once answered)
        if kind == "error":
            raise payload
        return JSONResponse(payload)

    try:
        from .explorer import mount_explorer
    except ImportError:  # the explorer is optional: the API works without it
        mount_explorer = None
    if mount_explorer is not None:
        mount_explorer(app, engine)
    return app


async def _events(engine: Engine, job: Job):
    """`chat.completion.chunk` events: the role, each text piece, the finish reason (and usage when asked), then
    `[DONE]`. An error after the stream began travels as an `{"error": ...}` event, as OpenAI sends it. Each time
    the connection has taken an event, `job.consumed` / `job.waiting_since` move (the worker's stall check)."""
    cid, created, name = new_id(), int(time.time()), engine.model_name
    try:
        yield sse(chunk(cid, created, name, {"role": "assistant", "content": ""}))
        while True:
            kind, payload = await job.events.get()
            if kind == "delta":
                yield sse(chunk(cid, created, name, {"content": payload}))
            elif kind == "done":
                finish, counts = payload
                yield sse(chunk(cid, created, name, {}, finish))
                if job.include_usage:
                    yield sse(chunk(cid, created, name, {}, usage_=counts))
                break
            else:
                yield sse(error_body(payload.status, payload.message, payload.param, payload.code))
                break
            job.waiting_since = time.monotonic()  # taken: what still waits, waits from now
            job.consumed += 1
        yield sse("[DONE]")
    finally:
        job.cancelled = True  # the client hung up (or we are done): the decode stops at its next token
