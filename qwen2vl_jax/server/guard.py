"""The HTTP-level checks `qwen2vl-jax serve` makes before any handler runs (an ASGI middleware), and the bounded
body reader the handlers share.

Every request but `GET /health` passes, in order:

1. **Host**: the `Host` header must name the address the server is bound to (for a loopback bind: `127.0.0.1`,
   `localhost`, `[::1]`) or one given with `--allowed-host`. A web page cannot then reach the server through a DNS
   name it controls (DNS rebinding). A wildcard bind (`0.0.0.0`, `::`) accepts any host unless `--allowed-host`
   lists some; such a server needs an API key anyway (cli/serve.py refuses to start it without one).
2. **API key** (`--api-key` / `QWEN2VL_JAX_API_KEY`): `Authorization: Bearer KEY`, compared in constant time
   (`hmac.compare_digest`); 401 with an OpenAI error body otherwise.
3. **Content type**: a POST must say `Content-Type: application/json` (a browser sends `text/plain`, form and
   multipart bodies to any origin without asking first; a JSON body it can only send after a CORS preflight,
   which this server never grants). 415 otherwise.

Refusals are OpenAI error bodies (`api.error_body`), answered without reading the request body.

`bounded_send_protocol()` is the HTTP protocol uvicorn runs (`uvicorn_config`): the same as uvicorn's, with each
connection's kernel send buffer and asyncio write buffer kept small (`SEND_BUFFER_BYTES`). Linux lets a loopback
socket buffer ~4 MB unsent: a streamed answer (~250 bytes a token) would then never block on a client that stopped
reading, and the server could not tell it from one that reads. With small buffers, such a client blocks the
stream's writes within a few hundred tokens, and the worker drops it (app.py, `STALL_SECONDS`).
"""

from __future__ import annotations

import hmac
import ipaddress
import json

from .api import RequestError, error_body

__all__ = ["Guard", "is_loopback", "read_body", "OPEN_PATHS", "bounded_send_protocol", "uvicorn_config"]

OPEN_PATHS = ("/health",)  # liveness probes need no key
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
SEND_BUFFER_BYTES = 8 * 1024  # per connection: SO_SNDBUF (the kernel doubles it) and asyncio's high-water mark


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine (`localhost`, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """`Host` header -> host name without port, lower case (`[::1]:8000` -> `::1`)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class Guard:
    """ASGI middleware: Host, API key and content type, as the module docstring says."""

    def __init__(self, app, *, bind_host: str = "127.0.0.1", api_key: str | None = None,
                 allowed_hosts: tuple[str, ...] | list[str] = ()):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        names = {h.strip("[]").lower() for h in allowed_hosts if h}
        bind = bind_host.strip("[]").lower()
        if bind in WILDCARD_HOSTS:
            self.hosts = names or None  # None: any host
        else:
            names.add(bind)
            if is_loopback(bind):
                names.update(LOOPBACK_NAMES)
            self.hosts = names

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = {}
        for key, value in scope.get("headers", ()):
            headers.setdefault(key.decode("latin-1").lower(), value.decode("latin-1"))
        refusal = self.check(scope["method"], headers)
        if refusal is not None:
            status, message, extra = refusal
            body = json.dumps(error_body(status, message, code=extra.get("code"))).encode()
            response_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            if status == 401:
                response_headers.append((b"www-authenticate", b'Bearer realm="qwen2vl_jax"'))
            await send({"type": "http.response.start", "status": status, "headers": response_headers})
            await send({"type": "http.response.body", "body": body})
            return None
        return await self.app(scope, receive, send)

    def check(self, method: str, headers: dict[str, str]):
        """None, or (status, message, extra) for the first check this request fails."""
        if self.hosts is not None and _host_name(headers.get("host", "")) not in self.hosts:
            return 421, "the Host header names no address this server answers for (--allowed-host adds one)", {
                "code": "invalid_host"}
        if self.api_key is not None:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
                return 401, ("a valid API key is needed: send the header 'Authorization: Bearer KEY' (the key the "
                             "server was started with, --api-key or QWEN2VL_JAX_API_KEY)"), {"code": "invalid_api_key"}
        if method == "POST":
            kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if kind != "application/json":
                return 415, (f"the request body must be JSON, sent with 'Content-Type: application/json' (got "
                             f"{kind or 'no content type'!r})"), {"code": "unsupported_media_type"}
        return None


async def read_body(request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes: at once when the declared length is larger,
    else while it streams in (a chunked upload is never held past the limit)."""
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


def bounded_send_protocol():
    """uvicorn's HTTP protocol class with small send buffers per connection (see the module docstring)."""
    import socket

    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class BoundedSendProtocol(AutoHTTPProtocol):
        def connection_made(self, transport):
            sock = transport.get_extra_info("socket")
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER_BYTES)
                except OSError:  # not a TCP socket (a Unix socket in a test): its default applies
                    pass
            transport.set_write_buffer_limits(high=SEND_BUFFER_BYTES)
            super().connection_made(transport)

    return BoundedSendProtocol


def uvicorn_config(app, *, host: str, port: int, **options):
    """`uvicorn.Config` for `qwen2vl-jax serve` (and the tests' live servers): `bounded_send_protocol()`."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, http=bounded_send_protocol(), **options)
