"""The attention explorer: a browser page over a served model that streams an answer about a photo token by token,
then shows, for any generated token, where it looked (attention over the photo's merged-token grid and over the
text), the grid with each cell's M-RoPE (t, h, w) position, and the logit lens (top-5 tokens after every layer).

`server.create_app(engine)` calls `mount_explorer(app, engine)`; the page is `GET /explorer` (plain HTML, JS and
canvas from `static/`: no build step, nothing fetched from elsewhere). JSON endpoints:

    GET  /explorer/api/info                      model name, layers, heads
    POST /explorer/api/generate                  {"question", "image": data URL or null, "max_new_tokens"}
                                                 -> NDJSON lines: {"type": "session", ...geometry},
                                                    {"type": "token", index, id, text} per token, {"type": "done"}
                                                    (+ "boxes", "points", "box_problems" if the answer has boxes)
    GET  /explorer/api/sessions/{sid}/tokens/{k} the inspection of generated token k (see `_inspect`)

Which query is inspected: generated token k is *chosen* by the logits of input column P - 1 + k (P: prompt length),
so its attention and logit lens are read at that column: what the model looked at, and believed layer by layer,
when it produced token k. The first click runs the prompt's first P - 1 tokens into a KV cache, then the n columns
that chose the n generated tokens as one more chunk, recording only that chunk's attention rows and residuals
(with `engine.hooks`, which the generation uses too): [L, N, n, P - 1 + n] probabilities, never the [L, N, T, T]
of a whole forward (5,063 prompt tokens on the 2B: 1.4 GB per layer). Its memory is estimated first and a run that
cannot fit is refused. Later clicks cost a slice and one small unembedding.

Requests get the API's scrutiny (app.py): the body limit while it streams in, JSON without lone surrogates or
runaway nesting, images through `engine.load_image` (data URLs; local files only inside the allowed directory;
headers checked before decoding), the memory estimate; a client that goes away stops its generation.

Arrays travel as {"shape", "f16": base64 little-endian float16} to keep a 28-layer x 12-head payload small.

Boxes in an answer (Qwen2-VL's box tokens, Qwen2.5-VL's JSON: qwen2vl_jax.grounding) come with the done event in the
photo's original pixels, read from the answer decoded with its special tokens, in the served processor's family and
pixel bounds; the page draws them over the photo.
"""

import base64
import collections
import dataclasses
import json
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from ..generation.decoding import generate
from ..generation.memory import vision_sizes
from ..grounding import has_boxes, parse_boxes, settings_for
from ..hooks import geometry, interventions
from ..modeling.hook_points import make_hookset
from .api import RequestError, parse_json_object
from .guard import read_body

__all__ = ["mount_explorer", "STATIC_DIR"]

STATIC_DIR = Path(__file__).with_name("static")
RECORD = ["text.embed", "text.layers.*.attn.probs", "text.layers.*.resid_post"]
MAX_SESSIONS = 8  # oldest dropped: each holds its generated tokens' attention rows
MAX_NEW_TOKENS = 256
TOP_K = 5


class ExplorerError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclasses.dataclass
class Session:
    id: str
    inputs: dict  # the processor's outputs (numpy), batch 1
    prompt_len: int
    image_size: tuple[int, int] | None  # (height, width) of the original photo
    geometry: geometry.VisionTokens | None
    new_ids: list[int] = dataclasses.field(default_factory=list)
    done: bool = False
    error: str | None = None
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)  # one inspection run at a time
    probs_LNnS: np.ndarray | None = None  # float16: the generated tokens' query rows of every layer's attention
    resid: dict | None = None  # logit lens inputs: {name: [1, n, D]} at the generated tokens' query columns


def _f16(array) -> dict:
    a = np.ascontiguousarray(np.asarray(array, np.float32).astype("<f2"))
    return {"shape": list(a.shape), "f16": base64.b64encode(a.tobytes()).decode("ascii")}


def _token_text(processor, token_id: int) -> str:
    return processor.decode([int(token_id)], skip_special_tokens=False)


class _Streamer:
    """generate's streamer: each new token id with its text piece (incremental decode, so a character split over
    byte-level tokens appears whole on the token that completes it) goes to `emit`."""

    def __init__(self, processor, emit):
        self.processor, self.emit = processor, emit
        self.ids: list[int] = []
        self.text = ""

    def put(self, tokens_B) -> None:
        token = int(np.asarray(tokens_B).reshape(-1)[0])
        self.ids.append(token)
        text = self.processor.decode(self.ids, skip_special_tokens=False)
        if text.startswith(self.text) and not text.endswith("\ufffd"):
            piece, self.text = text[len(self.text):], text
        else:
            piece = _token_text(self.processor, token)
        self.emit({"type": "token", "index": len(self.ids) - 1, "id": token, "text": piece})

    def end(self) -> None:
        pass


class Explorer:
    """The sessions and the two model runs (streamed generation, cached inspection) behind the endpoints."""

    def __init__(self, engine):
        self.engine = engine
        self.sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()
        self.sessions_lock = threading.Lock()

    @property
    def text_config(self):
        return self.engine.model.config.text_config

    def info(self) -> dict:
        return {"model": str(getattr(self.engine, "model_name", "model")), "layers": self.text_config.num_hidden_layers,
                "heads": self.text_config.num_attention_heads, "max_new_tokens": MAX_NEW_TOKENS}

    # ------------------------------------------------------------------------------------------------ generation
    def start(self, body: dict) -> Session:
        question = body.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ExplorerError(400, "question must be a non-empty string")
        image_url = body.get("image")
        image = None
        if image_url is not None:
            if not isinstance(image_url, str):
                raise ExplorerError(400, "image must be a data URL string or null")
            try:
                image = self.engine.load_image(image_url, "image").convert("RGB")
            except RequestError as e:  # refused by the media policy, or undecodable
                raise ExplorerError(e.status, e.message) from None
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
        processor = self.engine.processor
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        try:
            inputs = dict(processor(text=[prompt], images=[image] if image is not None else None))
        except ValueError as e:  # e.g. an image too small or too oddly shaped for the patch grid
            raise ExplorerError(400, f"cannot encode the request: {e}") from None
        inputs = {k: np.asarray(v) for k, v in inputs.items()}
        patches, largest = vision_sizes(inputs.get("image_grid_thw"))
        try:
            self.engine.check_memory(rows=1, prompt_tokens=int(inputs["input_ids"].shape[1]),
                                     new_tokens=int(body.get("max_new_tokens", 24)), vision_patches=patches,
                                     largest_segment=largest)
        except RequestError as e:
            raise ExplorerError(e.status, e.message) from None
        geom = None
        if image is not None:
            geom = geometry.vision_token_geometry(inputs["input_ids"], inputs["image_grid_thw"],
                                                  image_sizes=[(image.height, image.width)],
                                                  config=self.engine.model.config, processor=processor)[0]
        session = Session(id=uuid.uuid4().hex[:12], inputs=inputs, prompt_len=int(inputs["input_ids"].shape[1]),
                          image_size=None if image is None else (image.height, image.width), geometry=geom)
        with self.sessions_lock:
            self.sessions[session.id] = session
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
        return session

    def stream(self, session: Session, max_new_tokens: int):
        """NDJSON lines for the session: its header, each token as generate produces it, then done / error. The
        model runs in its own thread under the engine lock, so a client that goes away cannot leave it held."""
        events: queue.Queue = queue.Queue()
        left = threading.Event()  # the client went away: the generation stops at its next token

        def run():
            t0 = time.perf_counter()
            try:
                with self.engine.lock:
                    # engine.hooks as in the API's generation: the tokens shown are the served (hooked) model's
                    out = generate(self.engine.model, **session.inputs, streamer=_Streamer(self.engine.processor,
                                                                                          events.put),
                                   max_new_tokens=max_new_tokens, do_sample=False, return_dict=True,
                                   hooks=self.engine.hooks or None, should_stop=left.is_set)
                session.new_ids = [int(t) for t in out.sequences[0, session.prompt_len:]]
                session.done = True
                events.put({"type": "done", "tokens": len(session.new_ids),
                            "seconds": round(time.perf_counter() - t0, 3), **self.boxes(session)})
            except Exception as e:  # reported in the stream: the HTTP status is already sent
                session.error = f"{type(e).__name__}: {e}"
                events.put({"type": "error", "message": session.error})
            finally:
                events.put(None)

        try:
            yield json.dumps(self._header(session)) + "\n"
            threading.Thread(target=run, daemon=True, name=f"explorer-{session.id}").start()
            while (event := events.get()) is not None:
                yield json.dumps(event) + "\n"
        finally:  # also when the response is closed early (the client hung up)
            left.set()

    def boxes(self, session: Session) -> dict:
        """The done event's box keys: {} without a photo or with nothing box-like in the answer, else "boxes"
        [{"label", "xyxy"}], "points" [{"label", "xy"}] and "box_problems" [{"kind", "message", "text"}], in the
        photo's original pixels (qwen2vl_jax.grounding `Boxes.as_json`). The answer is decoded with its special
        tokens, so Qwen2-VL's <|object_ref_start|> / <|box_start|> tags are there to read."""
        if session.image_size is None:
            return {}
        processor = self.engine.processor
        text = processor.decode(session.new_ids, skip_special_tokens=False)
        if not has_boxes(text):
            return {}
        height, width = session.image_size
        return parse_boxes(text, image_size=(width, height), **settings_for(processor)).as_json()

    def _header(self, session: Session) -> dict:
        return {"type": "session", "session": session.id, "prompt_tokens": session.prompt_len,
                "image": None if session.image_size is None else {"height": session.image_size[0],
                                                                  "width": session.image_size[1]},
                "grid": self._grid(session.geometry), **self.info()}

    @staticmethod
    def _grid(geom: geometry.VisionTokens | None) -> dict | None:
        if geom is None:
            return None
        t, gh, gw = geom.merged_grid
        return {"t": t, "rows": gh, "cols": gw, "boxes": np.round(geom.boxes_M4, 2).tolist(),
                "positions": geom.positions_M3.tolist(), "thw": geom.thw_M3.tolist(),
                "columns": geom.token_index_M.tolist(), "resized": list(geom.resized_size)}

    # ------------------------------------------------------------------------------------------------ inspection
    def session(self, sid: str) -> Session:
        with self.sessions_lock:
            session = self.sessions.get(sid)
        if session is None:
            raise ExplorerError(404, f"no session {sid!r} (sessions are kept for the last {MAX_SESSIONS} runs)")
        if session.error:
            raise ExplorerError(409, f"session {sid} failed: {session.error}")
        if not session.done:
            raise ExplorerError(409, f"session {sid} is still generating")
        return session

    def _record(self, session: Session) -> None:
        """The prompt's first P - 1 tokens into a KV cache, then the n columns that chose the n generated tokens
        (the last prompt token and the first n - 1 generated ones; positions continue from the cache as in
        decoding) as one chunk, recording its attention rows and residuals: what one forward over prompt +
        generated tokens records at those columns, at a fraction of the memory. Refused when it cannot fit."""
        model, n, P = self.engine.model, len(session.new_ids), session.prompt_len
        seq = np.concatenate([session.inputs["input_ids"][0], np.asarray(session.new_ids, np.int64)])
        self._check_record_memory(session, n)
        L = self.text_config.num_hidden_layers
        names = ["text.embed"] + [f"text.layers.{i}.resid_post" for i in range(L)]
        probs = [f"text.layers.{i}.attn.probs" for i in range(L)]
        engine_hooks = self.engine.hooks or None
        media = {k: v for k, v in session.inputs.items() if k in ("pixel_values", "image_grid_thw")}
        with self.engine.lock:
            cache = model.init_cache(1, P - 1 + n)
            prefix = seq[None, :P - 1]
            out = model(prefix, np.ones_like(prefix), **media, cache=cache, logits_to_keep=1,
                        hooks=make_hookset(model.config, engine_hooks) if engine_hooks else None)
            chunk = seq[None, P - 1:P - 1 + n]
            out = model(chunk, np.ones_like(chunk), cache=out.cache,
                        hooks=make_hookset(model.config, engine_hooks, names + probs))
            records = out.records
            del out
        session.probs_LNnS = np.stack([np.asarray(records[name])[0] for name in probs]).astype(np.float16)
        session.resid = {name: np.asarray(records[name]) for name in names}

    def _check_record_memory(self, session: Session, n: int) -> None:
        """The inspection's peak: a prefill of the prompt (memory.estimate_request, as the API checks requests)
        plus the recorded chunk ([L, N, n, P - 1 + n] fp32 probabilities and [L + 1, n, D] residuals)."""
        t, P = self.text_config, session.prompt_len
        estimate = self.engine.memory_estimate(1, P + n, 1, *vision_sizes(session.inputs.get("image_grid_thw")))
        recorded = 4 * t.num_hidden_layers * n * (t.num_attention_heads * (P - 1 + n) + t.hidden_size) * 2
        limit = self.engine.memory_limit(estimate)
        if estimate.total + recorded > limit:
            raise ExplorerError(413, f"inspecting this session needs about {(estimate.total + recorded) / 1e9:.2f} GB "
                                     f"({recorded / 1e9:.2f} GB of recorded attention), more than the "
                                     f"{limit / 1e9:.2f} GB available; ask with a smaller photo or fewer tokens")

    def inspect(self, sid: str, k: int) -> dict:
        session = self.session(sid)
        n = len(session.new_ids)
        if not 0 <= k < n:
            raise ExplorerError(404, f"session {sid} generated {n} tokens; no token {k}")
        with session.lock:
            if session.probs_LNnS is None:
                self._record(session)
        return self._inspect(session, k)

    def _inspect(self, session: Session, k: int) -> dict:
        """Generated token k, read at the column that chose it (q = P - 1 + k):
        `vision.attention` [L, N, rows, cols] over the merged grid (+ `mean_layers` [N, ...], `mean_heads`
        [L, ...], `mean` [...]); `text.attention` [L, N, X] over the text columns 0..q (vision pads left out) with
        their token strings; `logit_lens`: per layer (embed, then each layer's resid_post) the top-5 tokens and
        probabilities; `grid`: cell boxes in the photo's pixels and (t, h, w) positions."""
        processor, P = self.engine.processor, session.prompt_len
        q = P - 1 + k
        seq = np.concatenate([session.inputs["input_ids"][0], np.asarray(session.new_ids, np.int64)])
        probs_LNS = session.probs_LNnS[:, :, k].astype(np.float32)  # keys: columns 0..T-1 of the forward
        out: dict[str, Any] = {"session": session.id, "index": k, "id": session.new_ids[k],
                               "text": _token_text(processor, seq[P + k]),
                               "query_column": q, "layers": probs_LNS.shape[0], "heads": probs_LNS.shape[1]}
        vision_cols = np.zeros(probs_LNS.shape[-1], bool)
        cfg = self.engine.model.config
        vision_cols |= np.isin(seq[:probs_LNS.shape[-1]], [cfg.image_token_id, cfg.video_token_id])
        geom = session.geometry
        if geom is not None:
            # attention_to_vision takes [L, B, N, T, S]: the kept rows are the T axis (row k = column q)
            grid = geometry.attention_to_vision(session.probs_LNnS[:, None].astype(np.float32), geom, query=k,
                                                reduce=None)[:, :, 0]  # [L, N, rows, cols] (an image: t = 1)
            out["vision"] = {"attention": _f16(grid), "mean_layers": _f16(grid.mean(0)),
                             "mean_heads": _f16(grid.mean(1)), "mean": _f16(grid.mean((0, 1))),
                             "share": round(float(probs_LNS[:, :, vision_cols].sum(-1).mean()), 4)}
            out["grid"] = self._grid(geom)
        text_cols = np.flatnonzero(~vision_cols[:q + 1])
        text_att = probs_LNS[:, :, text_cols]
        out["text"] = {"columns": text_cols.tolist(), "tokens": [_token_text(processor, t) for t in seq[text_cols]],
                       "prompt_tokens": P, "attention": _f16(text_att), "mean": _f16(text_att.mean((0, 1)))}
        lens_cache = {name: value[:, k:k + 1] for name, value in session.resid.items()}
        lens = interventions.logit_lens(self.engine.model, lens_cache, positions=[0])
        ids_LK, p_LK = (a[:, 0, 0] for a in lens.top_k(TOP_K))
        out["logit_lens"] = [{"layer": "embed" if name == "embed" else f"layer {name.split('.')[2]}",
                              "top": [{"id": int(i), "text": _token_text(processor, i), "p": round(float(p), 5)}
                                      for i, p in zip(ids, ps)]}
                             for name, ids, ps in zip(lens.layers, ids_LK, p_LK)]
        return out


def mount_explorer(app, engine) -> Explorer:
    """Add the explorer page (`/explorer`), its static files and its JSON API (`/explorer/api/...`) to `app`."""
    # FastAPI reads the handlers' annotations at runtime: this module must not use postponed annotations.
    from fastapi import APIRouter, Request
    from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, StreamingResponse
    from fastapi.staticfiles import StaticFiles

    explorer = Explorer(engine)
    router = APIRouter(prefix="/explorer")

    def error(e: ExplorerError) -> JSONResponse:
        headers = {"Connection": "close"} if e.status == 413 else None  # a refused upload: stop the client sending
        return JSONResponse({"error": {"message": e.message, "type": "explorer_error"}}, status_code=e.status,
                            headers=headers)

    @router.get("", include_in_schema=False)
    def page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @router.get("/", include_in_schema=False)
    def page_slash():
        return RedirectResponse("/explorer")

    @router.get("/api/info")
    def info():
        return explorer.info()

    @router.post("/api/generate")
    async def start(request: Request):
        # the API's body limit applies here too, while the body streams in (a photo arrives as a data URL)
        try:
            body = parse_json_object(await read_body(request, engine.max_request_bytes))
        except RequestError as e:
            return error(ExplorerError(e.status, e.message))
        n = body.get("max_new_tokens", 24)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_NEW_TOKENS:
            return error(ExplorerError(400, f"max_new_tokens must be an integer in 1..{MAX_NEW_TOKENS}"))
        try:
            # the processor and image decoding are host work: off the event loop
            from starlette.concurrency import run_in_threadpool

            session = await run_in_threadpool(explorer.start, body)
        except ExplorerError as e:
            return error(e)
        return StreamingResponse(explorer.stream(session, n), media_type="application/x-ndjson",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @router.get("/api/sessions/{sid}/tokens/{k}")
    def inspect(sid: str, k: int):
        try:
            return explorer.inspect(sid, k)
        except ExplorerError as e:
            return error(e)

    app.include_router(router)
    app.mount("/explorer/static", StaticFiles(directory=STATIC_DIR), name="explorer-static")
    app.state.explorer = explorer
    return explorer
