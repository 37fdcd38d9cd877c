"""The `qwen2vl-jax` command (`python -m qwen2vl_jax`): `app.py` builds the parser and dispatches; each
command's code is its own module."""

from .app import main

__all__ = ["main"]
