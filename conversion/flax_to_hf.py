"""Export a qwen2vl_jax checkpoint as a Hugging Face one (Hub key layout) that transformers loads.

    python -m conversion.flax_to_hf SRC DST

SRC: a directory written by conversion.hf_to_flax / qwen2vl_jax.checkpoints.convert.save_pretrained (any HF checkpoint works
too, e.g. to rename >= 4.52 keys back to the Hub layout). lm_head.weight is written only for untied models.
"""

from __future__ import annotations

import argparse
import sys

from qwen2vl_jax.checkpoints.convert import DEFAULT_HF_SHARD_SIZE, flax_to_hf

from ._common import add_write_arguments, report


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("src", help="qwen2vl_jax checkpoint directory")
    parser.add_argument("dst", help="output directory for the Hugging Face checkpoint")
    add_write_arguments(parser, DEFAULT_HF_SHARD_SIZE)
    return parser


def run(args: argparse.Namespace) -> int:
    return report(lambda: flax_to_hf(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                     force=args.force, progress=not args.quiet))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conversion.flax_to_hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
