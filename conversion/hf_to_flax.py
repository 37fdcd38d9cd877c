"""Convert a Hugging Face Qwen2-VL or Qwen2.5-VL checkpoint into the qwen2vl_jax format.

    python -m conversion.hf_to_flax SRC [DST]

SRC: a local checkpoint directory (Hub or >= 4.52 key layout, one file or sharded) or a Hub model id. DST
defaults to weights/<SRC name>-flax. Safetensors only; the conversion streams one tensor at a time.
"""

from __future__ import annotations

import argparse
import sys

from qwen2vl_jax.checkpoints.convert import DEFAULT_FLAX_SHARD_SIZE, hf_to_flax

from ._common import add_write_arguments, report


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("src", help="HF checkpoint directory or Hub model id (e.g. Qwen/Qwen2-VL-2B-Instruct, "
                        "Qwen/Qwen2.5-VL-7B-Instruct)")
    parser.add_argument("dst", nargs="?", default=None, help="output directory (default: weights/<name>-flax)")
    add_write_arguments(parser, DEFAULT_FLAX_SHARD_SIZE)
    parser.add_argument("--local-files-only", action="store_true", default=None,
                        help="for a Hub id: use only the local Hugging Face cache (also: HF_HUB_OFFLINE=1)")
    parser.add_argument("--revision", default=None, help="for a Hub id: branch, tag or commit")
    return parser


def run(args: argparse.Namespace) -> int:
    return report(lambda: hf_to_flax(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                     force=args.force, progress=not args.quiet,
                                     local_files_only=args.local_files_only, revision=args.revision))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conversion.hf_to_flax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
