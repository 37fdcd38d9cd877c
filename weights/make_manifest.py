"""Write weights/manifest.json: the released Qwen2-VL and Qwen2.5-VL Instruct checkpoints, with their Hub ids,
family, size, exact parameter counts and the config fields that identify them.

    python weights/make_manifest.py            # (re)write weights/manifest.json
    python weights/make_manifest.py --check    # exit 1 when the file is not what the presets give now

Every number comes from the presets in `qwen2vl_jax.modeling.config` (`PRESETS`, whose values are the released
config.json files): the fields through `qwen2vl_jax.cli.releases.identifying_fields` (what `qwen2vl-jax info`
compares a checkpoint's config.json with), the parameters counted on the abstract `Qwen2VL` of each preset
(`nnx.eval_shape`: shapes only, nothing allocated, no weights downloaded). tests/checkpoints/test_weights_manifest.py
regenerates the file and compares.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the source checkout's qwen2vl_jax, as benchmarks/ do

MANIFEST = HERE / "manifest.json"

# (preset, Hub id, size in the release's name)
RELEASES = (
    ("2b", "Qwen/Qwen2-VL-2B-Instruct", "2B"),
    ("7b", "Qwen/Qwen2-VL-7B-Instruct", "7B"),
    ("72b", "Qwen/Qwen2-VL-72B-Instruct", "72B"),
    ("2.5-3b", "Qwen/Qwen2.5-VL-3B-Instruct", "3B"),
    ("2.5-7b", "Qwen/Qwen2.5-VL-7B-Instruct", "7B"),
    ("2.5-32b", "Qwen/Qwen2.5-VL-32B-Instruct", "32B"),
    ("2.5-72b", "Qwen/Qwen2.5-VL-72B-Instruct", "72B"),
)


def build_manifest() -> dict:
    from qwen2vl_jax.cli.releases import MANIFEST_FORMAT_VERSION, TEXT_FIELDS, VISION_FIELDS, identifying_fields
    from qwen2vl_jax.modeling.config import PRESETS
    from qwen2vl_jax.modeling.model import Qwen2VL
    from qwen2vl_jax.modeling.parameters import abstract_model

    releases = []
    for preset, hub_id, size in RELEASES:
        config = PRESETS[preset]()
        fields = identifying_fields(config)
        counts = abstract_model(Qwen2VL, config).num_params()  # nnx.eval_shape: exact, nothing allocated
        releases.append({"hub_id": hub_id, "family": fields["family"], "size": size, "preset": preset,
                         "parameters": counts, "tie_word_embeddings": fields["tie_word_embeddings"],
                         "text": fields["text"], "vision": fields["vision"]})
    return {
        "format_version": MANIFEST_FORMAT_VERSION,
        "generated_by": "weights/make_manifest.py from qwen2vl_jax.modeling.config.PRESETS (do not edit by hand)",
        "identifying_fields": ["family", "tie_word_embeddings", *(f"text.{f}" for f in TEXT_FIELDS),
                               *(f"vision.{f}" for f in VISION_FIELDS)],
        "releases": releases,
    }


def render(manifest: dict) -> str:
    return json.dumps(manifest, indent=1) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write beside `path`, then rename over it: a reader sees the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python weights/make_manifest.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the file instead of writing it")
    parser.add_argument("--out", type=Path, default=MANIFEST, help=f"where to write (default {MANIFEST})")
    args = parser.parse_args(argv)
    text = render(build_manifest())
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
        if current != text:
            print(f"{args.out} is stale: run python weights/make_manifest.py", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    write_atomic(args.out, text)
    print(f"wrote {args.out} ({len(RELEASES)} releases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
