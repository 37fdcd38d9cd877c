"""Where checkpoints come from and how a model is built from one (`from_pretrained`).

Sources: a local Hugging Face checkpoint directory (Hub or >= 4.52 key layout, one file or sharded), a directory
written by our converter (`conversion/`, parameter paths as tensor names, marked by `qwen2vl_jax.json`), or a Hub
model id (resolved with huggingface_hub, only the files needed; `local_files_only` / HF_HUB_OFFLINE honoured).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from . import params as params_lib
from .config import Qwen2VLConfig

log = logging.getLogger(__name__)

OURS_MARKER = "qwen2vl_jax.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


def resolve_dtype(dtype, files: list[Path] | None = None):
    if dtype is None:
        return jnp.float32  # transformers' default too (unless torch_dtype="auto")
    if isinstance(dtype, str):
        if dtype == "auto":
            from .safetensors_io import SafetensorsFile

            f = SafetensorsFile(files[0])
            return jnp.dtype(f.dtype(f.keys()[0]))
        if dtype in ("float16", "fp16", "half"):
            raise ValueError("float16 is not supported: Qwen2-VL produces garbage in fp16 (transformers #33294); "
                             "use bfloat16 or float32")
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use 'float32', 'bfloat16' or 'auto'")
        return _DTYPES[dtype]
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float16:
        return resolve_dtype("float16")
    return dtype


def resolve_source(source: str | os.PathLike, *, local_files_only: bool | None = None,
                   revision: str | None = None) -> Path:
    """A local directory for `source` (downloading a Hub snapshot when it is a model id)."""
    path = Path(os.fspath(source)).expanduser()
    if path.is_dir():
        return path
    text = os.fspath(source)
    if path.exists():
        raise NotADirectoryError(f"{text} is a file; pass the checkpoint directory that holds config.json")
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"checkpoint directory not found: {text}")
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, revision=revision, allow_patterns=HUB_PATTERNS,
                                      local_files_only=local_files_only))
    except Exception as e:  # huggingface_hub raises many types; all mean "not available here"
        how = ("it is not in the local Hugging Face cache and downloads are off (local_files_only / "
               "HF_HUB_OFFLINE=1)" if local_files_only else f"the download failed ({type(e).__name__}: {e})")
        raise FileNotFoundError(
            f"cannot load model id {text!r}: {how}. Pass a local checkpoint directory instead, or allow "
            "downloads (unset HF_HUB_OFFLINE) on a machine with Hugging Face Hub access.") from None


def is_ours(directory: Path) -> bool:
    return (directory / OURS_MARKER).is_file()


def load_pretrained(cls, source, *, dtype=None, local_files_only=None, revision=None, progress=False):
    directory = resolve_source(source, local_files_only=local_files_only, revision=revision)
    config = Qwen2VLConfig.from_hf(directory)
    files = params_lib.safetensors_files(directory)
    ours = is_ours(directory)
    # Follow the tensors, not only the flag (reference §10, mlx-vlm #459): an lm_head present means untied.
    has_head = params_lib.checkpoint_has(files, "lm_head.weight") if not ours else any(
        "lm_head.weight" in params_lib.SafetensorsFile(f).keys() for f in files)
    if has_head == config.tie_word_embeddings:
        log.warning("checkpoint %s: tie_word_embeddings=%s but lm_head.weight is %s; following the tensors",
                    directory, config.tie_word_embeddings, "present" if has_head else "absent")
        config = config.replace(tie_word_embeddings=not has_head)
    param_dtype = resolve_dtype(dtype, files)
    model = nnx.eval_shape(lambda: cls(config, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = sum(f.stat().st_size for f in files)
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {directory.name}")
    try:
        if ours:
            params_lib.load_into(model, files, dtype=param_dtype, name_map=lambda n: n,
                                 transform=lambda p, a: a, progress=bar)
        else:
            params_lib.load_into(model, files, dtype=param_dtype, progress=bar)
    finally:
        if bar is not None:
            bar.close()
    model.source_dir = str(directory)
    return model


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
