"""`qwen2vl-jax convert`: checkpoints between the Hugging Face and our Flax layouts (the conversion itself is
`qwen2vl_jax.checkpoints.convert`).

    qwen2vl-jax convert hf-to-flax SRC [DST] [--dtype bfloat16|float32] [--max-shard-size 2GB] [--force] [--quiet]
                                   [--local-files-only] [--revision REV] [--quantize int8|int4 [--group-size N]]
    qwen2vl-jax convert flax-to-hf SRC DST [--dtype bfloat16|float32] [--max-shard-size 5GB] [--force] [--quiet]
                                   [--quantize int8|int4 [--group-size N]]

hf-to-flax: SRC is a local checkpoint directory (Hub or >= 4.52 key layout, one file or sharded) or a Hub model id;
DST defaults to weights/<SRC name>-flax. Safetensors only; the conversion streams one tensor at a time.
flax-to-hf: SRC is a directory written by hf-to-flax (any HF checkpoint works too, e.g. to rename >= 4.52 keys back
to the Hub layout); lm_head.weight is written only for untied models.
--quantize writes a quantized checkpoint (the text decoder's projections and the output projection as int8 per
channel or int4 in groups of --group-size, quantized as they stream through; config.json's quantization_config
names them), which `from_pretrained` and every command load as stored. A quantized SRC is copied as stored.

A conversion prints its summary line (exit 0) or one `error:` paragraph (exit 2).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .common import positive

COMPILES = False

# checkpoints.convert.DEFAULT_FLAX_SHARD_SIZE / DEFAULT_HF_SHARD_SIZE (not imported: building the parser imports no
# JAX; tests/cli/test_cli_structure.py checks they agree)
DEFAULT_FLAX_SHARD_SIZE = "2GB"
DEFAULT_HF_SHARD_SIZE = "5GB"

DIRECTIONS = {
    "hf-to-flax": "Convert a Hugging Face Qwen2-VL or Qwen2.5-VL checkpoint into the qwen2vl_jax format.",
    "flax-to-hf": "Export a qwen2vl_jax checkpoint as a Hugging Face one (Hub key layout) that transformers loads.",
}


def add_parser(subparsers):
    p = subparsers.add_parser("convert", help="convert checkpoints between the HF and our Flax layouts")
    directions = p.add_subparsers(dest="direction", required=True)
    add_hf_to_flax_arguments(directions.add_parser("hf-to-flax", help=DIRECTIONS["hf-to-flax"]))
    add_flax_to_hf_arguments(directions.add_parser("flax-to-hf", help=DIRECTIONS["flax-to-hf"]))
    return p


def add_write_arguments(parser: argparse.ArgumentParser, default_shard_size: str) -> None:
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="cast every tensor to this dtype (default: keep the source dtype)")
    parser.add_argument("--max-shard-size", default=default_shard_size,
                        help=f"largest safetensors file, e.g. 2GB or 500MB (default {default_shard_size})")
    parser.add_argument("--force", action="store_true",
                        help="replace DST if it is an existing checkpoint (never other files)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--quantize", choices=["int8", "int4"],
                        help="write a quantized checkpoint: the text decoder's projections and the output projection "
                             "as int8 (per output channel) or int4 (in groups of --group-size input columns)")
    parser.add_argument("--group-size", type=positive(int), metavar="N",
                        help="--quantize int4: input columns per scale (default 128)")


def add_hf_to_flax_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("src", help="HF checkpoint directory or Hub model id (e.g. Qwen/Qwen2-VL-2B-Instruct, "
                        "Qwen/Qwen2.5-VL-7B-Instruct)")
    parser.add_argument("dst", nargs="?", default=None, help="output directory (default: weights/<name>-flax)")
    add_write_arguments(parser, DEFAULT_FLAX_SHARD_SIZE)
    parser.add_argument("--local-files-only", action="store_true", default=None,
                        help="for a Hub id: use only the local Hugging Face cache (also: HF_HUB_OFFLINE=1)")
    parser.add_argument("--revision", default=None, help="for a Hub id: branch, tag or commit")
    parser.set_defaults(func=run)
    return parser


def add_flax_to_hf_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("src", help="qwen2vl_jax checkpoint directory")
    parser.add_argument("dst", help="output directory for the Hugging Face checkpoint")
    add_write_arguments(parser, DEFAULT_HF_SHARD_SIZE)
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    from ..checkpoints import convert

    if args.direction == "hf-to-flax":
        return report(lambda: convert.hf_to_flax(args.src, args.dst, dtype=args.dtype,
                                                 max_shard_size=args.max_shard_size, force=args.force,
                                                 progress=not args.quiet, local_files_only=args.local_files_only,
                                                 revision=args.revision, quantization=args.quantize,
                                                 group_size=args.group_size))
    return report(lambda: convert.flax_to_hf(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                             force=args.force, progress=not args.quiet, quantization=args.quantize,
                                             group_size=args.group_size))


def report(action: Callable[[], object]) -> int:
    """Run a conversion; print its summary line (exit 0) or a one-paragraph error (exit 2: a user error). Other
    errors (a full disk, a permission problem) reach `cli.main`'s error path."""
    from ..checkpoints.keymap import CheckpointError
    from ..checkpoints.safetensors_io import SafetensorsError

    try:
        summary = action()
    except (FileExistsError, FileNotFoundError, NotADirectoryError, CheckpointError, SafetensorsError,
            ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(summary)
    return 0
