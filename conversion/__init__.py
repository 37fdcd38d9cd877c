"""Command-line checkpoint converters (thin argparse wrappers over `qwen2vl_jax.checkpoints.convert`).

    python -m conversion.hf_to_flax SRC [DST] [--dtype bfloat16|float32] [--max-shard-size 2GB] [--force] [--quiet]
    python -m conversion.flax_to_hf SRC DST [--dtype ...] [--max-shard-size 5GB] [--force] [--quiet]

Each module has `add_arguments(parser)`, `run(args) -> int` and `main(argv=None) -> int`, so a larger CLI can
mount them as subcommands.
"""
