"""Inspect a checkpoint directory: its files, every tensor (name, dtype, shape, file), its key layout, and which
tensors are missing, unexpected or mis-shaped for a model, all from the safetensors headers (no tensor is read).

    python conversion/inspect_checkpoint.py PATH                      # against the checkpoint's own config.json
    python conversion/inspect_checkpoint.py PATH --preset 2b          # against a released model (PRESETS: 2b, 7b, 72b,
                                                           # 2.5-3b, 2.5-7b, 2.5-32b, 2.5-72b)
    python conversion/inspect_checkpoint.py PATH --no-keys            # the summary and the problems only

PATH: an HF checkpoint directory (the Hub key layout `model.*` / `visual.*`, or the transformers >= 4.52 layout
`model.language_model.*` / `model.visual.*`; one file or sharded) or a directory written by `qwen2vl-jax convert
hf-to-flax` (our parameter paths, marked by qwen2vl_jax.json), or a Hub model id already in the local cache.

Prints the layout, the shard files, a dtype summary, one line per tensor (unless --no-keys), then the comparison
with the model the config (or preset) describes: the tensors the loader would refuse (unexpected, duplicate, wrong
shape, wrong dtype), the parameters it would miss, and a stored lm_head.weight a tied config ignores. The key
mapping and shapes are the loader's own (`qwen2vl_jax.checkpoints.keymap`, `.load`); nothing is re-implemented.
Exit status: 0 when the checkpoint loads as the model, 1 when it does not, 2 on a bad PATH or config.
"""

from __future__ import annotations

import os
import sys

# a source checkout's qwen2vl_jax, as benchmarks/ do (an installed one works too)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402

EXIT_PROBLEMS = 1
EXIT_USAGE = 2
MAX_LISTED = 200  # problems listed per kind (as the loader's own report, keymap.MAX_LISTED_PROBLEMS)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python conversion/inspect_checkpoint.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", metavar="PATH", help="checkpoint directory (HF or qwen2vl_jax format)")
    parser.add_argument("--preset", metavar="NAME",
                        help="compare with this released model instead of the checkpoint's config.json "
                             "(2b, 7b, 72b, 2.5-3b, 2.5-7b, 2.5-32b, 2.5-72b)")
    parser.add_argument("--no-keys", action="store_true", help="leave out the one-line-per-tensor listing")
    return parser.parse_args(argv)


def key_layout(names: list[str], ours: bool) -> str:
    """Which naming the tensors use: ours (the marker file decides, as for the loader), the Hub layout or the
    transformers >= 4.52 one (told apart by the prefixes only they use), or a mix."""
    if ours:
        return "qwen2vl_jax format (our parameter paths; qwen2vl_jax.json marker)"
    new = sum(n.startswith(("model.language_model.", "model.visual.")) for n in names)
    hub = sum(n.startswith("model.") and not n.startswith(("model.language_model.", "model.visual.")) for n in names)
    if new and hub:
        return f"MIXED: {hub} tensors in the Hub key layout, {new} in the transformers >= 4.52 layout"
    if new:
        return "HF, transformers >= 4.52 key layout (model.language_model.*, model.visual.*)"
    return "HF, Hub key layout (model.*, visual.*, lm_head.*)"


def compare(files, layout, expected: dict[str, tuple[int, ...]], ignore: frozenset[str]) -> dict[str, list[str]]:
    """The loader's checks (`keymap.match_checkpoint`), every problem kept by kind instead of raised."""
    import numpy as np

    found: dict[str, str] = {}
    problems: dict[str, list[str]] = {"unexpected": [], "duplicate": [], "wrong shape": [], "wrong dtype": [],
                                      "missing": [], "ignored": []}
    for sf in files:
        for name in sorted(sf.keys(), key=sf.offset):
            path, shape = layout.to_path(name), sf.shape(name)
            if path in ignore:
                problems["ignored"].append(f"{name} (tie_word_embeddings=true: the head is embed_tokens, as in "
                                           "transformers)")
            elif path is None or path not in expected:
                problems["unexpected"].append(f"{name} {list(shape)}")
            elif path in found:
                problems["duplicate"].append(f"{name} and {found[path]} are both {path}")
            elif shape != tuple(layout.file_shape(path, expected[path])):
                problems["wrong shape"].append(f"{name} {list(shape)}, expected "
                                               f"{list(layout.file_shape(path, expected[path]))}")
            elif not np.issubdtype(sf.dtype(name), np.floating) and sf.dtype(name).name != "bfloat16":
                problems["wrong dtype"].append(f"{name} {sf.dtype(name)}, expected floating point")
            if path in expected:
                found.setdefault(path, name)
    for path, shape in expected.items():
        if path not in found and path not in ignore:
            problems["missing"].append(f"{layout.to_name(path)} {list(layout.file_shape(path, shape))}")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from qwen2vl_jax.checkpoints.keymap import (
        OURS_LAYOUT,
        CheckpointError,
        hf_layout,
        open_files,
        safetensors_files,
    )
    from qwen2vl_jax.checkpoints.load import OURS_MARKER, is_ours, read_json
    from qwen2vl_jax.hub import resolve_source
    from qwen2vl_jax.modeling.config import PRESETS, Qwen2VLConfig
    from qwen2vl_jax.modeling.model import Qwen2VL
    from qwen2vl_jax.modeling.parameters import abstract_model, checkpoint_shapes

    try:
        directory = resolve_source(args.path, local_files_only=True)
        files = open_files(safetensors_files(directory))
        ours = is_ours(directory)
        marker = read_json(directory / OURS_MARKER) if ours else None
        if args.preset is not None:
            if args.preset.lower() not in PRESETS:
                raise ValueError(f"unknown preset {args.preset!r}; one of: {', '.join(PRESETS)}")
            config, against = PRESETS[args.preset.lower()](), f"preset {args.preset.lower()}"
        else:
            config, against = Qwen2VLConfig.from_hf(directory), f"its config.json ({directory / 'config.json'})"
    except (FileNotFoundError, NotADirectoryError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE

    layout = OURS_LAYOUT if ours else hf_layout(config.vision_config)
    names = [n for sf in files for n in sf.keys()]
    stored_head = any(layout.to_path(n) == "lm_head.weight" for n in names)
    # As the loader (`load.open_checkpoint`): a tied config ignores a stored head; an untied one without a head ties.
    ignore = frozenset({"lm_head.weight"}) if stored_head and config.tie_word_embeddings else frozenset()
    tied = config.tie_word_embeddings  # as the config says (printed below)
    notes = []
    if not stored_head and not config.tie_word_embeddings:
        notes.append("lm_head.weight is absent although tie_word_embeddings=false: the loader ties the head to "
                     "embed_tokens (with a warning); transformers would leave it random")
        config = config.replace(tie_word_embeddings=True)
    expected = checkpoint_shapes(abstract_model(Qwen2VL, config))

    by_dtype: dict[str, list[int]] = {}
    for sf in files:
        for n in sf.keys():
            count = by_dtype.setdefault(str(sf.dtype(n)), [0, 0])
            count[0] += 1
            count[1] += sf.nbytes(n)
    total_bytes = sum(b for _, b in by_dtype.values())
    print(f"checkpoint   {directory}")
    print(f"layout       {key_layout(names, ours)}"
          + (f", format_version {marker['format_version']}" if marker else ""))
    print(f"files        {len(files)} safetensors file{'s' * (len(files) != 1)}, {total_bytes / 1e9:.3f} GB")
    for sf in files:
        nbytes = sum(sf.nbytes(n) for n in sf.keys())
        print(f"  {sf.path.name}  {len(sf.keys())} tensors, {nbytes / 1e9:.3f} GB")
    print(f"tensors      {len(names)}: " + ", ".join(f"{d} {c} ({b / 1e9:.3f} GB)" for d, (c, b) in
                                                     sorted(by_dtype.items())))
    if not args.no_keys:
        width = max((len(n) for n in names), default=0)
        shape_width = max((len(str(list(sf.shape(n)))) for sf in files for n in sf.keys()), default=0)
        for i, sf in enumerate(files):
            for n in sorted(sf.keys(), key=sf.offset):
                shard = f"  file {i + 1}/{len(files)}" if len(files) > 1 else ""
                print(f"  {n:<{width}}  {str(sf.dtype(n)):<8}  {str(list(sf.shape(n))):<{shape_width}}{shard}".rstrip())

    problems = compare(files, layout, expected, ignore)
    problems["note"] = notes
    t, v = config.text_config, config.vision_config
    print(f"against      {against}: {config.model_type}, {t.num_hidden_layers} layers x {t.hidden_size}, vision "
          f"{v.depth} x {v.embed_dim}, {'tied' if tied else 'untied'} head; "
          f"{len(expected)} parameters expected")
    failing = {k: p for k, p in problems.items() if p and k not in ("ignored", "note")}
    for kind, items in problems.items():
        if items:
            print(f"{kind} ({len(items)}):")
            for item in items[:MAX_LISTED]:
                print(f"  {item}")
            if len(items) > MAX_LISTED:
                print(f"  ... and {len(items) - MAX_LISTED} more")
    if not failing:
        print("RESULT: OK, every parameter present once with the expected shape")
        return 0
    print("RESULT: MISMATCH, " + ", ".join(f"{len(p)} {k}" for k, p in failing.items()))
    return EXIT_PROBLEMS


if __name__ == "__main__":
    sys.exit(main())
