"""Where checkpoints come from and how a model is built from one (`from_pretrained`).

Sources: a local Hugging Face checkpoint directory (Hub or >= 4.52 key layout, one file or sharded), a directory
written by our converter (`checkpoints/convert.py`: parameter paths as tensor names, marked by `qwen2vl_jax.json`),
or a Hub model id (resolved with huggingface_hub, only the files needed; `local_files_only` / HF_HUB_OFFLINE
honoured, so an offline machine fails at once with a message instead of hanging on the network).

Only safetensors are read (never pickle), and never through torch.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..attention import resolve as resolve_attention
from ..hub import resolve_source
from ..modeling.config import Qwen2VLConfig
from ..modeling.parameters import abstract_model
from . import keymap as params_lib
from .safetensors_io import SafetensorsFile

log = logging.getLogger(__name__)

OURS_MARKER = "qwen2vl_jax.json"
FORMAT_NAME = "qwen2vl_jax"
FORMAT_VERSION = 1
# Files that travel with the weights through conversions (whichever exist).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "added_tokens.json", "preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json",
              "chat_template.jinja", "generation_config.json")

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


def resolve_dtype(dtype, files: list | None = None):
    """`None` -> float32 (transformers' default too), "bfloat16" / "float32", or "auto": the checkpoint's dtype."""
    if dtype is None:
        return jnp.float32
    if isinstance(dtype, str):
        if dtype == "auto":
            return checkpoint_dtype(files)
        if dtype in ("float16", "fp16", "half"):
            raise ValueError("float16 is not supported: Qwen2-VL produces garbage in fp16 (transformers #33294); "
                             "use bfloat16 or float32")
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use 'float32', 'bfloat16' or 'auto'")
        return _DTYPES[dtype]
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float16:
        return resolve_dtype("float16")
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"unsupported parameter dtype {dtype}; use float32 or bfloat16")
    return dtype


def checkpoint_dtype(files: list) -> np.dtype:
    """The dtype that holds most of a checkpoint's bytes (headers only)."""
    by_dtype: dict[np.dtype, int] = {}
    for sf in params_lib.open_files(files):
        for name in sf.keys():
            by_dtype[sf.dtype(name)] = by_dtype.get(sf.dtype(name), 0) + sf.nbytes(name)
    return jnp.dtype(max(by_dtype, key=by_dtype.get))


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# -------------------------------------------------------------------------------------------------- opening
@dataclass
class Checkpoint:
    """An opened checkpoint directory: its format, effective config and tensor headers (no data read yet)."""

    directory: Path
    format: str  # "hf" or FORMAT_NAME
    config: Qwen2VLConfig  # tie_word_embeddings: the flag, or tied when an untied config lacks lm_head.weight
    files: list[SafetensorsFile]
    layout: params_lib.KeyLayout
    marker: dict | None = None
    ignore: frozenset[str] = frozenset()  # stored tensors not loaded (a tied config's lm_head.weight)

    def match(self, expected: dict[str, tuple[int, ...]]) -> dict[str, params_lib.TensorRef]:
        """`{our path: TensorRef}` for every expected parameter, or one CheckpointError listing every problem."""
        return params_lib.match_checkpoint(expected, self.files, self.layout, where=self.directory,
                                           ignore=self.ignore)

    @property
    def total_bytes(self) -> int:
        return sum(sf.nbytes(n) for sf in self.files for n in sf.keys())


def is_ours(directory: Path) -> bool:
    return (Path(directory) / OURS_MARKER).is_file()


def _read_marker(directory: Path) -> dict:
    marker = read_json(directory / OURS_MARKER)
    if marker.get("format") != FORMAT_NAME or not isinstance(marker.get("format_version"), int):
        raise params_lib.CheckpointError(f"{directory / OURS_MARKER} is not a qwen2vl_jax marker file")
    if marker["format_version"] > FORMAT_VERSION:
        raise params_lib.CheckpointError(
            f"{directory} was written in qwen2vl_jax format version {marker['format_version']}; this version "
            f"reads up to {FORMAT_VERSION}. Upgrade qwen2vl_jax or convert again from the HF checkpoint.")
    return marker


def open_checkpoint(source, *, local_files_only: bool | None = None, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None) -> Checkpoint:
    """Resolve `source`, read its config and every tensor header, and decide tying from the tensors."""
    directory = resolve_source(source, local_files_only=local_files_only, revision=revision, cache_dir=cache_dir)
    config = Qwen2VLConfig.from_hf(directory)
    files = params_lib.open_files(params_lib.safetensors_files(directory))
    if is_ours(directory):
        fmt, marker, layout = FORMAT_NAME, _read_marker(directory), params_lib.OURS_LAYOUT
    else:
        fmt, marker, layout = "hf", None, params_lib.hf_layout(config.vision_config)
    # A tied config with a stored lm_head.weight: transformers 4.57 ties anyway (`PreTrainedModel.tie_weights`
    # points lm_head at embed_tokens after loading, so the file's head is never used); we do the same and say so.
    # An untied config without a head: follow the tensors (tie; transformers would leave a random head).
    has_head = any(layout.to_path(n) == "lm_head.weight" for n in params_lib.tensor_names(files))
    ignore = frozenset()
    if has_head and config.tie_word_embeddings:
        log.warning("checkpoint %s: the stored lm_head.weight is ignored because the config ties it "
                    "(tie_word_embeddings=true: the head is embed_tokens, as in transformers)", directory)
        ignore = frozenset({"lm_head.weight"})
    elif not has_head and not config.tie_word_embeddings:
        log.warning("checkpoint %s: tie_word_embeddings=false but lm_head.weight is absent; following the tensors "
                    "(tied)", directory)
        config = config.replace(tie_word_embeddings=True)
    return Checkpoint(directory, fmt, config, files, layout, marker, ignore)


def _unfilled(model) -> list[str]:
    return [params_lib.param_path(p) for p, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Variable) and isinstance(v.get_value(), jax.ShapeDtypeStruct)]


def load_pretrained(cls, source, *, dtype=None, attn_implementation: str | None = None,
                    local_files_only: bool | None = None, revision: str | None = None, progress: bool = False,
                    cache_dir: str | os.PathLike | None = None, place=None, mesh=None, sharding_rules=None,
                    scan_layers: bool = False, quantization: str | None = None):
    """Build `cls` from a checkpoint (any source `open_checkpoint` accepts), streaming tensor by tensor.

    The model is created abstract (`nnx.eval_shape`), so the only weight memory is the loaded parameters plus
    one tensor in flight. `dtype`: None / "float32", "bfloat16", or "auto" (the checkpoint's dtype). `place`:
    optional `(path, array) -> jax.Array` to place each tensor. `mesh` (a `jax.sharding.Mesh`, e.g.
    `sharding.make_mesh(data=2, model=4)`): each parameter is assembled from the slices its devices hold, read from
    the files by the processes that hold them (`keymap.load_sharded`; multi-host jobs read only their slices), per
    `sharding.LOGICAL_RULES` (or `sharding_rules`), and the model constrains its activations and KV cache by the
    same rules. `scan_layers`: stack each tower's layers (`config.scan_layers`). `attn_implementation`: the
    attention backend (`qwen2vl_jax.attention`). `quantization` ("int8" / "int4", `qwen2vl_jax.quantization`):
    the text decoder's projections are quantized as they stream in (the full-precision model never exists); with
    a mesh or stacked layers they are quantized after loading.
    """
    if attn_implementation is not None:  # a bad name fails here, before anything is read
        resolve_attention(attn_implementation)
    ckpt = open_checkpoint(source, local_files_only=local_files_only, revision=revision, cache_dir=cache_dir)
    param_dtype = resolve_dtype(dtype, ckpt.files)
    config = ckpt.config.replace(attn_implementation=attn_implementation, scan_layers=bool(scan_layers))
    model = abstract_model(cls, config, param_dtype)
    if mesh is not None and place is not None:
        raise ValueError("pass either `place` or `mesh`, not both")
    if scan_layers and place is not None:
        raise ValueError("`place` loads tensor by tensor; a scan_layers=True model is loaded by slices (use `mesh`)")
    finish = None
    if quantization is not None and mesh is None and not scan_layers:
        from ..quantization import quantizing_placer

        place, finish = quantizing_placer(model, quantization, place or params_lib.place_on_default_device)
    elif quantization is not None:
        from ..quantization import MODES, QuantizationError

        if quantization not in MODES:  # before anything is read
            raise QuantizationError(f"unknown quantization {quantization!r}; choose one of {MODES}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=ckpt.total_bytes, unit="B", unit_scale=True, desc=f"loading {ckpt.directory.name}")
    try:
        update = bar.update if bar else None
        if mesh is not None or scan_layers:
            from ..sharding.mesh import LOGICAL_RULES, Partitioning, param_shardings, set_partitioning

            if mesh is not None:
                rules = LOGICAL_RULES if sharding_rules is None else sharding_rules
                shardings = param_shardings(model, mesh, rules)
            else:
                device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
                shardings = {path: device for path in params_lib.model_params(model)}
            params_lib.load_sharded(model, ckpt.files, ckpt.layout, shardings, progress=update, ignore=ckpt.ignore)
            if mesh is not None:
                set_partitioning(model, Partitioning.of(mesh, rules))
        else:
            kwargs = {} if place is None else {"place": place}
            params_lib.load_into(model, ckpt.files, ckpt.layout, progress=update, ignore=ckpt.ignore, **kwargs)
    finally:
        if bar is not None:
            bar.close()
    left = _unfilled(model)
    if left:  # a model attribute that is neither a parameter nor computed at init (should never happen)
        raise params_lib.CheckpointError(f"model state not filled by the checkpoint: {left}")
    if finish is not None:
        finish()
    elif quantization is not None:
        from ..quantization import quantize

        quantize(model, quantization)
    model.source_dir = str(ckpt.directory)
    return model
