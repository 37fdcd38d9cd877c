"""The `qwen2vl-jax` command line: the parser and the dispatch. Each command is its own module with
`add_parser(subparsers)` (its flags; returns its parser) and `run(args) -> int`, and says with `COMPILES` whether it
runs the model (then it takes `--no-compile-cache`): generate, chat, predict, eval, convert, info, plan, export,
serve, selfcheck, finetune. What several share is `common.py`.

Building the parser imports no JAX: a command module imports its heavy dependencies inside `run`.

User errors (a missing file, an unreadable image, a corrupt checkpoint, an invalid config.json, an unknown model id
while offline, too little memory, a bad flag) print one line and exit with status 2, through one path: `main`
catches the library's user-error types (`common.USER_ERROR_TYPES`) and `UserError`. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys

# the command modules by their own names (not `from . import`, which reads the package `__init__` that imports
# this module)
import qwen2vl_jax.cli.chat as chat
import qwen2vl_jax.cli.convert as convert
import qwen2vl_jax.cli.eval as eval_  # the `eval` command (the module's name is the command's)
import qwen2vl_jax.cli.export as export
import qwen2vl_jax.cli.finetune as finetune
import qwen2vl_jax.cli.generate as generate
import qwen2vl_jax.cli.info as info
import qwen2vl_jax.cli.plan as plan
import qwen2vl_jax.cli.predict as predict
import qwen2vl_jax.cli.selfcheck as selfcheck
import qwen2vl_jax.cli.serve as serve

from ..runtime import COMPILE_CACHE_ENV  # stdlib only: importing it changes nothing
from .common import EXIT_USER_ERROR, Parser, user_error_message

__all__ = ["main", "build_parser", "COMMANDS"]

# In the order `--help` lists them.
COMMANDS = (generate, chat, predict, eval_, convert, info, plan, export, serve, selfcheck, finetune)
COMPILING_COMMANDS = tuple(m.__name__.rsplit(".", 1)[1] for m in COMMANDS if m.COMPILES)  # use the compile cache


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="qwen2vl-jax", description="Qwen2-VL and Qwen2.5-VL in JAX: generate, chat, convert.")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        p = command.add_parser(sub)
        if command.COMPILES:  # the commands that compile programs share the persistent cache's opt-out
            p.add_argument("--no-compile-cache", action="store_true",
                           help=f"don't read or write the persistent XLA compilation cache "
                                f"(default: $XDG_CACHE_HOME/qwen2vl_jax/xla_cache; "
                                f"{COMPILE_CACHE_ENV}=0 also turns it off, =DIR moves it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in COMPILING_COMMANDS and not args.no_compile_cache:
        from ..runtime import enable_compilation_cache

        enable_compilation_cache()  # before anything compiles; warns and carries on when the directory is unusable
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as e:  # the one error path of every command
        message = user_error_message(e)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
