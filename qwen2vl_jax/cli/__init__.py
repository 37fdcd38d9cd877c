"""The `qwen2vl-jax` command (`python -m qwen2vl_jax`): `app.py` builds the parser and dispatches; each command is
its own module (`generate`, `chat`, `convert`, `info`, `plan`, `serve`, `selfcheck`, `finetune`: `add_parser` and
`run`); `common.py` holds what they share."""

from .app import build_parser, main
from .common import EXIT_USER_ERROR, USER_ERROR_TYPES, UserError
from .serve import API_KEY_ENV

__all__ = ["main", "build_parser", "UserError", "EXIT_USER_ERROR", "USER_ERROR_TYPES", "API_KEY_ENV"]
