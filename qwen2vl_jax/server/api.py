"""The OpenAI wire format of `qwen2vl-jax serve` (app.py): request schemas, error bodies, response objects and
the bounds on stop strings (matching them: `generation.stops`). No model, no HTTP server: plain data in, plain
data out.

Mirrors OpenAI's Chat Completions API (`POST /v1/chat/completions`):

* request: `model`, `messages` (`content` a string or a list of `{"type": "text", "text"}` /
  `{"type": "image_url", "image_url": {"url"}}` parts; `image_url` may also be the bare URL string; videos as vLLM
  and Qwen's API send them: `{"type": "video_url", "video_url": {"url"}}` (or the bare URL string) and
  `{"type": "video", "video": [frame image URLs] or URL}`, optionally with `fps`, `nframes`, `max_frames` on the
  part or in `video_url`; video_input.py loads them), `max_tokens` /
  `max_completion_tokens`, `temperature`, `top_p`, `seed`, `stop`, `stream`, `stream_options.include_usage`, `n`.
  Other OpenAI fields (`user`, `presence_penalty`, ...) are accepted and ignored, as OpenAI-compatible servers do.
* errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP status (400 invalid_request_error,
  404 not_found_error, 413 request_too_large, 503 server_overloaded, 500 server_error).
* responses: a `chat.completion` object, or `chat.completion.chunk` server-sent events ending with `data: [DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["RequestError", "ChatRequest", "VideoRequest", "error_body", "validation_message", "parse_request",
           "to_template_messages", "completion", "chunk", "sse", "parse_json_object"]

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 415: "invalid_request_error",
               421: "invalid_request_error", 503: "server_overloaded", 500: "server_error"}
MAX_STOP_CHARS = 1024  # characters per stop string (OpenAI allows 4 stop strings; their length is ours to bound)
SEED_RANGE = (-(2**63), 2**63 - 1)  # OpenAI's `seed` is a 64-bit integer


class RequestError(Exception):
    """A request the server refuses: HTTP `status` and a message for the client (the OpenAI error body)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


# ------------------------------------------------------------------------------------------------- request
class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str
    detail: str | None = None


Rate = Annotated[float, Field(gt=0, allow_inf_nan=False)]  # frames per second
FrameCount = Annotated[int, Field(ge=1, strict=True)]


class _VideoOptions(_Lenient):
    fps: Rate | None = None
    nframes: FrameCount | None = None
    max_frames: FrameCount | None = None


class VideoURL(_VideoOptions):
    url: str


class ContentPart(_VideoOptions):
    type: Literal["text", "image_url", "video_url", "video"]
    text: str | None = None
    image_url: ImageURL | str | None = None
    video_url: VideoURL | str | None = None
    video: list[str] | str | None = None


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatRequest(_Lenient):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def validation_message(err) -> str:
    """Pydantic's (or FastAPI's) validation errors as one readable line: `messages.0.role: Input should be ...`."""
    parts = []
    for e in list(err.errors())[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()))
        parts.append(f"{where}: {e['msg']}" if where else e["msg"])
    return "invalid request: " + "; ".join(parts)


def parse_request(body: bytes) -> ChatRequest:
    """Bytes -> ChatRequest, or a 400 naming what is wrong (the JSON syntax, or the field)."""
    data = parse_json_object(body)
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        raise RequestError(400, validation_message(e)) from None
    except RecursionError:
        raise RequestError(400, "the request body is nested too deeply") from None
    if req.n != 1:
        raise RequestError(400, f"n must be 1 (one choice per request), got {req.n}", param="n")
    if len(req.stop_strings()) > 4:  # OpenAI's limit
        raise RequestError(400, "stop takes at most 4 strings", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in req.stop_strings()):
        raise RequestError(400, f"a stop string may have at most {MAX_STOP_CHARS} characters", param="stop")
    return req


def parse_json_object(body: bytes) -> dict:
    """Bytes -> a JSON object, or a 400: not JSON, not an object, nested too deeply for the parser (json's C
    scanner raises RecursionError), or holding a string that is not valid Unicode (a lone surrogate like
    "\\ud800", which no tokenizer can encode)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError(400, "the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    _check_strings(data)
    return data


def _check_strings(data) -> None:
    """Every string (keys too) must encode as UTF-8: JSON's `\\ud800` escapes decode to lone surrogates."""
    stack = [(data, "body")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(400, f"{where} holds an unpaired UTF-16 surrogate (e.g. \\ud800): not valid "
                                        "Unicode text", param=where) from None
        elif isinstance(value, dict):
            stack.extend((k, where) for k in value)
            stack.extend((v, f"{where}.{k}" if where != "body" else str(k)) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(value))


@dataclass(frozen=True)
class VideoRequest:
    """One video of a request, as sent: `source` a URL / path string or a list of frame image URLs, `where` it
    came from (`messages[1].content[0]`), and the part's sampling options (None: the server's defaults). The
    server loads it with video_input.py `load_video(v.source, policy, v.where, fps=v.fps, nframes=v.nframes,
    max_frames=v.max_frames)`."""

    source: str | list[str]
    where: str
    fps: float | None = None
    nframes: int | None = None
    max_frames: int | None = None


def to_template_messages(req: ChatRequest):
    """OpenAI messages -> the chat template's (`{"type": "image"}` / `{"type": "video"}` placeholders,
    qwen2vl_jax/processing), the image URLs in prompt order, each with where it came from
    (`messages[1].content[0]`) for error messages, and a `VideoRequest` per video part in prompt order:
    `(messages, images, videos)`."""
    messages, images, videos = [], [], []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role  # OpenAI's newer name for the system role
        if m.content is None or isinstance(m.content, str):
            messages.append({"role": role, "content": m.content or ""})
            continue
        content = []
        for j, part in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text":
                if part.text is None:
                    raise RequestError(400, f"{where}: a text part needs `text`", param=where)
                content.append({"type": "text", "text": part.text})
            elif part.type == "image_url":
                url = part.image_url.url if isinstance(part.image_url, ImageURL) else part.image_url
                if not url:
                    raise RequestError(400, f"{where}: an image_url part needs `image_url.url`", param=where)
                content.append({"type": "image"})
                images.append((url, where))
            else:
                videos.append(_video_request(part, where))
                content.append({"type": "video"})
        messages.append({"role": role, "content": content})
    return messages, images, videos


def _video_request(part: ContentPart, where: str) -> VideoRequest:
    """A `video_url` or `video` part -> VideoRequest; options on the part win over those inside `video_url`."""
    inner = part.video_url if isinstance(part.video_url, VideoURL) else None
    if part.type == "video_url":
        source = inner.url if inner is not None else part.video_url
        if not source:
            raise RequestError(400, f"{where}: a video_url part needs `video_url.url`", param=where)
    else:
        source = part.video
        if not source:
            raise RequestError(400, f"{where}: a video part needs `video`: a list of image URLs (one per frame) or "
                                    "a video URL", param=where)

    def option(name: str):
        value = getattr(part, name)
        return value if value is not None or inner is None else getattr(inner, name)

    return VideoRequest(source=source, where=where, fps=option("fps"), nframes=option("nframes"),
                        max_frames=option("max_frames"))


# ------------------------------------------------------------------------------------------------ response
def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's `chat.completion` object (one choice)."""
    return {"id": new_id(), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
          usage_: dict | None = None) -> dict:
    """OpenAI's `chat.completion.chunk`; the usage-only chunk (stream_options.include_usage) has no choices."""
    out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model}
    out["choices"] = [] if usage_ is not None else [{"index": 0, "delta": delta, "logprobs": None,
                                                     "finish_reason": finish_reason}]
    if usage_ is not None:
        out["usage"] = usage_
    return out


def sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"

