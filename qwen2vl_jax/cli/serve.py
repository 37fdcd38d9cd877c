"""`qwen2vl-jax serve`: an OpenAI-compatible HTTP API (/v1/chat/completions) over one model (`qwen2vl_jax.server`;
FastAPI and uvicorn are the optional `serve` extra, imported only when the command runs)."""

from __future__ import annotations

from .common import (
    UserError,
    add_model_args,
    add_quantize_arg,
    byte_size,
    choose_dtype,
    load_model,
    load_processor,
    port,
    positive,
    resolve_model,
)

COMPILES = True  # runs the model: takes --no-compile-cache
API_KEY_ENV = "QWEN2VL_JAX_API_KEY"  # serve's --api-key, from the environment (kept out of `ps` listings)


def add_parser(subparsers):
    from ..server.media import DEFAULT_MAX_IMAGE_PIXELS  # Pillow and the standard library only

    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP API (/v1/chat/completions) over one model")
    add_model_args(p)
    add_quantize_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=8000, help="TCP port, 0..65535 (default 8000)")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the `model` clients send (default: the checkpoint folder's name, or the Hub id)")
    p.add_argument("--api-key", metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every request but /health (also from "
                        f"{API_KEY_ENV}, which keeps it out of process listings)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="serve a non-loopback --host without an API key (refused otherwise)")
    p.add_argument("--allowed-local-media-path", metavar="DIR",
                   help="let clients name image files (paths or file:// URLs) inside DIR; without it only data URLs "
                        "are accepted")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="another name clients may send in the Host header (repeatable; default: the bound address, "
                        "and localhost for a loopback bind)")
    p.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json (off by default)")
    p.add_argument("--max-batch", type=positive(int), default=8,
                   help="decode slots: requests the engine runs at once (continuous batching)")
    p.add_argument("--kv-cache-tokens", type=positive(int), metavar="N",
                   help="size of the paged KV cache in tokens, all slots together (default 4096 per slot, at most "
                        "the context each); a request whose prompt + max_tokens exceeds it is refused")
    p.add_argument("--max-queue", type=positive(int), default=64,
                   help="requests waiting at most; more are refused with 503")
    p.add_argument("--max-request-bytes", type=byte_size, default=20 * 2**20, metavar="SIZE",
                   help="largest request body (default 20MiB; larger: 413)")
    p.add_argument("--max-images", type=positive(int), default=16, help="images per request at most")
    p.add_argument("--max-image-pixels", type=positive(int), default=DEFAULT_MAX_IMAGE_PIXELS, metavar="N",
                   help=f"largest image decoded, width x height from its header (default {DEFAULT_MAX_IMAGE_PIXELS} "
                        "= 8192 x 8192)")
    p.add_argument("--max-tokens", type=positive(int), default=4096,
                   help="the most new tokens a request may ask for (default 4096; more: 400)")
    p.add_argument("--default-max-tokens", type=positive(int), default=512,
                   help="new tokens for a request without max_tokens (never past the context or --max-tokens)")
    p.add_argument("--max-memory", type=byte_size, metavar="SIZE",
                   help="memory the server may use in all, weights included (e.g. 12GB; default: what it holds "
                        "plus what the machine has available); a request whose estimate does not fit: 400")
    p.add_argument("--min-pixels", type=positive(int), help="lower bound on pixels per image (processor)")
    p.add_argument("--max-pixels", type=positive(int), help="upper bound on pixels per image (processor)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter in PEFT's format (e.g. finetune's out/adapter)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import os

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_serve_exposure(args.host, api_key, args.allow_unauthenticated)  # before anything is loaded
    try:  # the optional extra: `pip install 'qwen2vl_jax[serve]'`
        import uvicorn

        from ..server.app import Engine, create_app, served_name
        from ..server.guard import uvicorn_config
        from ..server.media import MediaPolicy
    except ImportError as e:
        raise UserError(f"serve needs FastAPI and uvicorn ({e}); install them with: pip install "
                        f"'qwen2vl_jax[serve]'") from None
    try:
        media = MediaPolicy(args.allowed_local_media_path, max_pixels=args.max_image_pixels,
                            max_bytes=args.max_request_bytes)
    except ValueError as e:
        raise UserError(str(e)) from None
    directory = resolve_model(args)
    dtype = choose_dtype(args, directory)
    processor = load_processor(args, directory)
    model = load_model(args, directory, dtype)
    engine = Engine(model, processor, model_name=args.served_model_name or served_name(args.model),
                    max_batch=args.max_batch, max_queue=args.max_queue, max_request_bytes=args.max_request_bytes,
                    max_images=args.max_images, default_max_tokens=args.default_max_tokens,
                    max_tokens=args.max_tokens, media=media, max_memory=args.max_memory,
                    kv_cache_tokens=args.kv_cache_tokens)
    app = create_app(engine, api_key=api_key, bind_host=args.host, allowed_hosts=args.allowed_host, docs=args.docs)
    url = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    print(f"serving {engine.model_name} ({dtype}) at {url}/v1 (OpenAI API: /v1/chat/completions, /v1/models)"
          f"{'; API key required' if api_key else ''}", flush=True)
    if any(getattr(r, "path", "").startswith("/explorer") for r in app.routes):
        print(f"explorer at {url}/explorer", flush=True)
    try:
        uvicorn.Server(uvicorn_config(app, host=args.host, port=args.port,
                                      log_level="warning" if args.quiet else "info")).run()
    finally:
        engine.close()
    return 0


def check_serve_exposure(host: str, api_key: str | None, allow_unauthenticated: bool) -> None:
    """Refuse to bind an address other machines can reach without an API key, unless the operator says so."""
    from ..server.guard import is_loopback

    if not is_loopback(host) and not api_key and not allow_unauthenticated:
        raise UserError(f"refusing to serve on {host} without an API key: anyone who can reach it could use the "
                        f"model; set --api-key KEY (or {API_KEY_ENV}), bind 127.0.0.1, or pass "
                        "--allow-unauthenticated if you mean it")
