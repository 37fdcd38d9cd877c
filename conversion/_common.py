"""Arguments and error handling shared by the converter commands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from qwen2vl_jax.checkpoints.keymap import CheckpointError
from qwen2vl_jax.checkpoints.safetensors_io import SafetensorsError


def add_write_arguments(parser: argparse.ArgumentParser, default_shard_size: str) -> None:
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="cast every tensor to this dtype (default: keep the source dtype)")
    parser.add_argument("--max-shard-size", default=default_shard_size,
                        help=f"largest safetensors file, e.g. 2GB or 500MB (default {default_shard_size})")
    parser.add_argument("--force", action="store_true",
                        help="replace DST if it is an existing checkpoint (never other files)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def report(action: Callable[[], object]) -> int:
    """Run a conversion; print its summary line (exit 0) or a one-paragraph error (exit 2: a user error)."""
    try:
        summary = action()
    except (FileExistsError, FileNotFoundError, NotADirectoryError, CheckpointError, SafetensorsError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0
