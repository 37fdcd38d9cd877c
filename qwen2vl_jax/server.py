"""`qwen2vl-jax serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over one loaded model.

    POST /v1/chat/completions   OpenAI's Chat Completions (text + images; `stream` as server-sent events)
    GET  /v1/models             the one served model          GET /health   liveness and queue length

How requests run: the HTTP handlers parse and validate (server_api.py), decode images and tokenize (in a thread
pool), then put a `Job` in a bounded queue (`max_queue`; full -> 503). One worker thread owns the model: it takes
the oldest job plus every waiting job that may share its batch (same settings, deterministic decoding, not
streamed; up to `max_batch`) and runs them as one left-padded batch through `generation.generate`, holding
`Engine.lock` (anything else that runs the model, like the explorer, takes the same lock). Batches are padded to a
power-of-two number of rows by repeating a row, so at most log2(max_batch) + 1 batch shapes ever compile. A
streamed request runs alone and sends each text piece as it is decoded; a client that hangs up stops its decode at
the next token.

Sampling: `temperature` 0 is greedy; a `temperature` or `top_p` from the client samples with them and top_k=0 (the
Instruct checkpoints' generation_config.json has top_k=1, top_p=0.001, which would keep sampling greedy); with
neither, the checkpoint's generation_config applies. Sampled requests with a `seed` reproduce: they never share a
batch (one random key per batch would tie a row's text to its batch-mates).
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
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .generation import TextStreamer, generate
from .image_io import load_image as _load_image
from .sampling import GenerationConfig
from .server_api import (
    RequestError,
    StopCutter,
    chunk,
    completion,
    cut_at_stop,
    error_body,
    new_id,
    parse_request,
    sse,
    to_template_messages,
    usage,
    validation_message,
)

__all__ = ["Engine", "RequestError", "build_engine", "create_app"]

DEFAULT_MAX_TOKENS = 512  # a request without max_tokens: this many at most (and never past the context)


@dataclasses.dataclass(eq=False)
class Job:
    """One chat completion on its way through the queue; results reach the event loop thread-safely."""

    ids: np.ndarray  # [T] prompt token ids
    pixel_values: np.ndarray | None
    image_grid_thw: np.ndarray | None
    config: GenerationConfig  # max_new_tokens = this request's max_tokens
    stops: list[str]
    stream: bool
    include_usage: bool
    batch_key: tuple | None  # jobs with equal keys may share a batch; None: runs alone
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False

    def send(self, kind: str, payload: Any = None) -> None:
        if self.stream:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        else:
            self.loop.call_soon_threadsafe(_resolve, self.future, (kind, payload))


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():  # the client may have gone
        future.set_result(value)


class _JobQueue:
    """A bounded FIFO whose consumer takes a job together with the waiting jobs that can share its batch."""

    def __init__(self, capacity: int):
        self.capacity, self.items, self.closed = capacity, [], False
        self.cond = threading.Condition()

    def put(self, job: Job) -> None:
        with self.cond:
            if self.closed:
                raise RequestError(503, "the server is shutting down")
            if len(self.items) >= self.capacity:
                raise RequestError(503, f"the server is busy: {len(self.items)} requests are already waiting (the "
                                        f"queue holds {self.capacity}, --max-queue); retry later")
            self.items.append(job)
            self.cond.notify()

    def take(self, max_batch: int) -> list[Job] | None:
        with self.cond:
            while not self.items and not self.closed:
                self.cond.wait()
            if not self.items:
                return None
            batch = [self.items.pop(0)]
            key = batch[0].batch_key
            if key is not None:
                for job in [j for j in self.items if j.batch_key == key][:max_batch - 1]:
                    self.items.remove(job)
                    batch.append(job)
            return batch

    def __len__(self) -> int:
        return len(self.items)

    def close(self) -> list[Job]:
        with self.cond:
            self.closed, left, self.items = True, self.items, []
            self.cond.notify_all()
            return left


class _Abort(Exception):
    """Raised from the streamer to end a streamed decode early (a stop string, or the client left)."""


class _JobStreamer(TextStreamer):
    def __init__(self, processor, job: Job, cutter: StopCutter):
        super().__init__(processor, on_text=self._piece)
        self.job, self.cutter = job, cutter

    def put(self, tokens_B) -> None:
        if self.job.cancelled:
            raise _Abort
        super().put(tokens_B)

    def _piece(self, piece: str) -> None:
        out = self.cutter.feed(piece)
        if out:
            self.job.send("delta", out)
        if self.cutter.stopped:
            raise _Abort


class Engine:
    """One model, its processor, the request queue and the worker thread that runs every batch.

    Shared with the explorer (explorer.py): `model`, `processor`, `model_name`, `lock` (held by whatever runs the
    model), `hooks` (None or `{name or pattern: fn(value, ctx)}`, qwen2vl_jax.hooks; applied to every generation
    here and to the explorer's inspection runs), `load_image(url)`. `stats` counts requests and batch sizes.
    """

    def __init__(self, model, processor, *, model_name: str, hooks=None, max_batch: int = 8, max_queue: int = 64,
                 max_request_bytes: int = 20 * 2**20, max_images: int = 16,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS):
        self.model, self.processor, self.model_name, self.hooks = model, processor, model_name, hooks
        self.max_batch, self.max_request_bytes, self.max_images = max_batch, max_request_bytes, max_images
        self.default_max_tokens = default_max_tokens
        self.lock = threading.Lock()
        self.context = model.config.text_config.max_position_embeddings
        self.base_config = GenerationConfig.from_pretrained(getattr(model, "source_dir", None))
        self.stats: dict[str, Any] = {"requests": 0, "batches": 0, "streams": 0, "taken": 0, "batch_sizes": {}}
        self.queue = _JobQueue(max_queue)
        self.worker = threading.Thread(target=self._work, name="qwen2vl-jax-serve-worker", daemon=True)
        self.worker.start()

    # ------------------------------------------------------------------------------------------ requests in
    def load_image(self, url: str, where: str = "image"):
        """A data URL (`data:image/...;base64,...`), a local path or a `file://` URL -> PIL image; anything
        undecodable, missing or remote -> RequestError 400 naming the image."""
        try:
            return _load_image(url)
        except (ValueError, OSError) as e:
            raise RequestError(400, f"could not decode image {where}: {e}", param=where) from None

    def prepare(self, req, loop: asyncio.AbstractEventLoop) -> Job:
        """Validate one parsed request, decode its images and tokenize it (the CPU work before the queue)."""
        messages, urls = to_template_messages(req)
        if len(urls) > self.max_images:
            raise RequestError(400, f"too many images: {len(urls)} in one request, at most {self.max_images}")
        images = [self.load_image(url, where) for url, where in urls]
        try:
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            inputs = self.processor(text=[prompt], images=images or None)
        except ValueError as e:
            raise RequestError(400, f"cannot encode the messages: {e}") from None
        ids = np.asarray(inputs["input_ids"])[0]
        room = self.context - len(ids)
        asked = req.new_tokens()
        if room < 1 or (asked is not None and asked > room):
            raise RequestError(400, f"too many tokens: the prompt has {len(ids)} tokens and max_tokens is "
                                    f"{asked if asked is not None else 1}; together they exceed the model's context "
                                    f"of {self.context} tokens", param="max_tokens" if room >= 1 else "messages")
        config = self._sampling(req, asked if asked is not None else min(self.default_max_tokens, room))
        deterministic = not config.do_sample or config.top_k == 1
        key = None
        if deterministic and not req.stream:
            key = dataclasses.astuple(dataclasses.replace(config, max_new_tokens=1, seed=0))
        job = Job(ids=ids, pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                  config=config, stops=req.stop_strings(), stream=req.stream,
                  include_usage=bool(req.stream_options and req.stream_options.include_usage), batch_key=key,
                  loop=loop)
        return job

    def _sampling(self, req, max_new_tokens: int) -> GenerationConfig:
        kw: dict[str, Any] = {}
        if req.temperature == 0:
            kw["do_sample"] = False
        elif req.temperature is not None or req.top_p is not None:
            kw.update(do_sample=True, top_k=0, temperature=1.0 if req.temperature is None else req.temperature,
                      top_p=1.0 if req.top_p is None else req.top_p)
        seed = req.seed if req.seed is not None else secrets.randbits(31)  # OpenAI: no seed, no reproducibility
        config = dataclasses.replace(self.base_config, max_new_tokens=max_new_tokens, seed=seed, **kw)
        try:
            config.validate(self.model.config.text_config.vocab_size)
        except ValueError as e:
            raise RequestError(400, str(e)) from None
        return config

    def submit(self, job: Job) -> None:
        self.queue.put(job)  # RequestError 503 when full

    # ------------------------------------------------------------------------------------------- the worker
    def _work(self) -> None:
        while (jobs := self.queue.take(self.max_batch)) is not None:
            jobs = [j for j in jobs if not j.cancelled]
            if not jobs:
                continue
            self.stats["taken"] += len(jobs)
            try:
                with self.lock:
                    if jobs[0].stream:
                        self._run_stream(jobs[0])
                    else:
                        self._run_batch(jobs)
            except RequestError as e:
                for job in jobs:
                    job.send("error", e)
            except ValueError as e:  # generation settings the model refuses
                for job in jobs:
                    job.send("error", RequestError(400, str(e)))
            except Exception as e:  # a bug: the worker keeps serving, the clients get a 500 and the log a traceback
                traceback.print_exc()
                for job in jobs:
                    job.send("error", RequestError(500, f"internal error: {type(e).__name__}: {e}"))

    def _run_batch(self, jobs: list[Job]) -> None:
        rows = 1 << (len(jobs) - 1).bit_length()  # a power of two (repeating the last row): few batch shapes
        rows = max(min(rows, self.max_batch), len(jobs))
        filled = jobs + [jobs[-1]] * (rows - len(jobs))
        config = dataclasses.replace(jobs[0].config, max_new_tokens=max(j.config.max_new_tokens for j in jobs))
        length = max(len(j.ids) for j in filled)
        ids = np.full((rows, length), config.pad_id, np.int64)
        mask = np.zeros((rows, length), np.int64)
        for r, job in enumerate(filled):
            ids[r, length - len(job.ids):] = job.ids
            mask[r, length - len(job.ids):] = 1
        with_images = [j for j in filled if j.pixel_values is not None]
        pixels = np.concatenate([j.pixel_values for j in with_images]) if with_images else None
        grids = np.concatenate([j.image_grid_thw for j in with_images]) if with_images else None
        self.stats["batches"] += 1
        self.stats["requests"] += len(jobs)
        self.stats["batch_sizes"][len(jobs)] = self.stats["batch_sizes"].get(len(jobs), 0) + 1
        out = generate(self.model, ids, mask, pixels, grids, generation_config=config, hooks=self.hooks)
        new = np.asarray(out)[:, length:]
        eos = set(config.eos_token_id)
        for r, job in enumerate(jobs):
            row = new[r, :job.config.max_new_tokens].tolist()
            end = next((k for k, t in enumerate(row) if t in eos), None)
            tokens, count = (row, len(row)) if end is None else (row[:end], end + 1)
            text, stopped = cut_at_stop(self.processor.decode(tokens, skip_special_tokens=True), job.stops)
            finish = "stop" if stopped or end is not None else "length"
            job.send("ok", completion(self.model_name, text, finish, len(job.ids), count))

    def _run_stream(self, job: Job) -> None:
        self.stats["streams"] += 1
        self.stats["requests"] += 1
        cutter = StopCutter(job.stops)
        streamer = _JobStreamer(self.processor, job, cutter)
        try:
            generate(self.model, job.ids[None], None, job.pixel_values, job.image_grid_thw,
                     generation_config=job.config, hooks=self.hooks, streamer=streamer)
        except _Abort:
            pass
        if job.cancelled:
            return
        tail = cutter.flush()
        if tail:
            job.send("delta", tail)
        ended = bool(streamer.ids) and streamer.ids[-1] in set(job.config.eos_token_id)
        finish = "stop" if cutter.stopped or ended else "length"
        job.send("done", (finish, usage(len(job.ids), len(streamer.ids))))

    def close(self) -> None:
        """Stop the worker after its current batch; waiting requests get a 503."""
        for job in self.queue.close():
            job.send("error", RequestError(503, "the server is shutting down"))
        self.worker.join(timeout=60)


def build_engine(model_path, *, dtype: str = "float32", attn_implementation: str | None = None,
                 model_name: str | None = None, min_pixels: int | None = None, max_pixels: int | None = None,
                 **options) -> Engine:
    """Load a checkpoint (directory or Hub id) and its processor into an `Engine` (`options`: Engine's keywords)."""
    from .pretrained import Qwen2VLForConditionalGeneration
    from .processing import Qwen2VLProcessor

    model = Qwen2VLForConditionalGeneration.from_pretrained(model_path, dtype=dtype,
                                                            attn_implementation=attn_implementation, progress=False)
    pixels = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
    processor = Qwen2VLProcessor.from_pretrained(model_path, **pixels)
    return Engine(model, processor, model_name=model_name or os.fspath(model_path), **options)


# ------------------------------------------------------------------------------------------------- the app
async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (before it is all read when declared)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"the request body has {int(declared)} bytes, more than the server's limit of "
                                f"{limit} (--max-request-bytes)")
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise RequestError(413, f"the request body is larger than the server's limit of {limit} bytes "
                                    "(--max-request-bytes)")
        parts.append(part)
    return b"".join(parts)


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI app over `engine`: the OpenAI routes, OpenAI-style error bodies for every error (validation
    errors are 400s, as OpenAI answers them, not FastAPI's 422), and the explorer when its module is present."""
    app = FastAPI(title="qwen2vl_jax", description="OpenAI-compatible API over a Qwen2-VL / Qwen2.5-VL model")
    app.state.engine = engine

    @app.exception_handler(RequestError)
    async def request_error(_, e: RequestError):
        return JSONResponse(error_body(e.status, e.message, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        return JSONResponse(error_body(400, validation_message(e)), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return JSONResponse(error_body(e.status_code, str(e.detail)), status_code=e.status_code)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_name, "queued": len(engine.queue)}

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
        req = parse_request(await _read_body(request, engine.max_request_bytes))
        if req.model != engine.model_name:
            raise RequestError(404, f"the model {req.model!r} does not exist; this server serves "
                                    f"{engine.model_name!r}", param="model", code="model_not_found")
        loop = asyncio.get_running_loop()
        job = await run_in_threadpool(engine.prepare, req, loop)
        if req.stream:  # made here, on the event loop's thread, which alone touches them
            job.events = asyncio.Queue()
        else:
            job.future = loop.create_future()
        engine.submit(job)
        if req.stream:
            return StreamingResponse(_events(engine, job), media_type="text/event-stream")
        try:
            kind, payload = await job.future
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
    `[DONE]`. An error after the stream began travels as an `{"error": ...}` event, as OpenAI sends it."""
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
        yield sse("[DONE]")
    finally:
        job.cancelled = True  # the client hung up (or we are done): the decode stops at its next token
