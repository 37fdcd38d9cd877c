"""`qwen2vl-jax chat`: an interactive multi-turn session (/image PATH, /video PATH, /reset, /exit).

A session never ends on a bad turn: a missing file, unreadable media, a turn too long for the context or for the
memory is reported on stderr and the session goes on. When the whole history no longer fits the model's context
(`max_position_embeddings`, prompt + `--max-new-tokens`), the oldest turns are dropped, with a note on screen, until
it does, as a chat UI's sliding window would.
"""

from __future__ import annotations

import sys

from .common import (
    UserError,
    add_generation_args,
    add_mesh_args,
    add_model_args,
    add_quantize_arg,
    check_memory,
    choose_dtype,
    encode,
    load_model,
    load_processor,
    media,
    messages_for,
    resolve_model,
    run_generation,
    say,
    summary_line,
    user_error_message,
)

COMPILES = True  # runs the model: takes --no-compile-cache


def add_parser(subparsers):
    p = subparsers.add_parser("chat", help="interactive multi-turn chat (/image PATH, /video PATH, /reset, /exit)")
    add_model_args(p)
    add_quantize_arg(p)
    add_mesh_args(p)
    add_generation_args(p)
    p.set_defaults(func=run)
    return p


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def fit_history(history: list[dict], encode, budget: int) -> tuple[list[dict], object, int]:
    """Drop the oldest user/assistant turns of `history` (a system message stays) until `encode(history)` holds
    at most `budget` tokens. Returns (kept history, its encoding, turns dropped); raises UserError when even the
    newest turn alone is too long."""
    dropped = 0
    while True:
        inputs = encode(history)
        if inputs["input_ids"].shape[1] <= budget:
            return history, inputs, dropped
        first = 1 if history and history[0]["role"] == "system" else 0
        turns = [i for i, m in enumerate(history) if m["role"] == "user"]
        if len(turns) <= 1:  # only the new turn is left
            raise UserError(f"this message needs {inputs['input_ids'].shape[1]} tokens but the context holds "
                            f"{budget} besides the answer (max_position_embeddings minus --max-new-tokens): "
                            "send a shorter message, a smaller image (--max-pixels) or lower --max-new-tokens")
        end = turns[1]  # the oldest turn: its user message and every reply up to the next user message
        history = history[:first] + history[end:]
        dropped += 1


def run(args) -> int:
    from ..modeling.config import Qwen2VLConfig

    directory = resolve_model(args)
    dtype = choose_dtype(args, directory)
    processor = load_processor(args, directory)
    model = load_model(args, directory, dtype)
    limit = Qwen2VLConfig.from_hf(directory).text_config.max_position_embeddings
    budget = limit - args.max_new_tokens
    if budget < 1:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's context "
                        f"of {limit} tokens")
    interactive = sys.stdin.isatty()
    history: list[dict] = []
    pending_images: list[str] = []
    pending_videos: list[str] = []
    say(args, "chat: /image PATH, /video PATH attach media to your next message; /reset clears; /exit quits.")
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history, pending_images, pending_videos = [], [], []
            print("(history cleared)", flush=True)
            continue
        if line.startswith(("/image ", "/video ")):
            kind, path = line[1:6], line[7:].strip()
            try:
                (pending_images if kind == "image" else pending_videos).extend(media([path], kind))
                print(f"({kind} attached: {path})", flush=True)
            except UserError as e:  # a typo in a path must not end the session
                _error(str(e))
            continue
        if line.startswith("/"):
            _error(f"unknown command {line.split()[0]} (use /image, /video, /reset, /exit)")
            continue
        messages = messages_for(line, pending_images, pending_videos, args.system, history)
        pending_images, pending_videos = [], []
        try:
            messages, inputs, dropped = fit_history(messages, lambda m: encode(processor, m, args), budget)
            if dropped:
                print(f"(context full: dropped the {dropped} oldest turn{'s' * (dropped > 1)} to fit "
                      f"{limit} tokens)", flush=True)
            check_memory(args, directory, dtype, inputs)
            answer, stats = run_generation(args, model, processor, inputs, True,
                                            lambda piece: print(piece, end="", flush=True))
        except Exception as e:  # a bad turn is reported; the session and its history go on
            message = user_error_message(e)
            if message is None:
                raise
            _error(message)
            continue
        print(flush=True)
        say(args, summary_line(stats))
        history = messages + [{"role": "assistant", "content": answer}]
    return 0
