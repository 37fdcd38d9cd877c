"""`python -m qwen2vl_jax ...` is the `qwen2vl-jax` command."""

import sys

from .cli import main

sys.exit(main())
