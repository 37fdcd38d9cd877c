"""Hugging Face <-> qwen2vl_jax parameter names, and streaming checkpoint loading into an NNX model.

One table (`KEY_MAP`) names every tensor: Hub name template -> our parameter path. `{i}` is a layer index and `{p}`
is `weight` / `bias`. Linear weights keep PyTorch's `[out, in]` layout, so every mapping is a copy except the
patch-embedding Conv3d kernel `[E, C, T, P, P]`, which is flattened to `[E, C*T*P*P]` (same numbers, reference
§2.2). Names written by transformers >= 4.52 (`model.language_model.*`, `model.visual.*`) are folded into the Hub
names first (`canonical_hf_name`), like transformers' own `_checkpoint_conversion_mapping`.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .safetensors_io import SafetensorsError, SafetensorsFile

log = logging.getLogger(__name__)

KEY_MAP: list[tuple[str, str]] = [
    # vision tower
    ("visual.patch_embed.proj.weight", "visual.patch_embed.proj.weight"),
    ("visual.blocks.{i}.norm1.{p}", "visual.blocks.{i}.norm1.{p}"),
    ("visual.blocks.{i}.norm2.{p}", "visual.blocks.{i}.norm2.{p}"),
    ("visual.blocks.{i}.attn.qkv.{p}", "visual.blocks.{i}.attn.qkv.{p}"),
    ("visual.blocks.{i}.attn.proj.{p}", "visual.blocks.{i}.attn.proj.{p}"),
    ("visual.blocks.{i}.mlp.fc1.{p}", "visual.blocks.{i}.mlp.fc1.{p}"),
    ("visual.blocks.{i}.mlp.fc2.{p}", "visual.blocks.{i}.mlp.fc2.{p}"),
    ("visual.merger.ln_q.{p}", "visual.merger.ln_q.{p}"),
    ("visual.merger.mlp.0.{p}", "visual.merger.fc1.{p}"),  # mlp.1 is the GELU (no parameters)
    ("visual.merger.mlp.2.{p}", "visual.merger.fc2.{p}"),
    # decoder
    ("model.embed_tokens.weight", "language_model.embed_tokens.weight"),
    ("model.layers.{i}.input_layernorm.weight", "language_model.layers.{i}.input_layernorm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "language_model.layers.{i}.post_attention_layernorm.weight"),
    ("model.layers.{i}.self_attn.q_proj.{p}", "language_model.layers.{i}.self_attn.q_proj.{p}"),
    ("model.layers.{i}.self_attn.k_proj.{p}", "language_model.layers.{i}.self_attn.k_proj.{p}"),
    ("model.layers.{i}.self_attn.v_proj.{p}", "language_model.layers.{i}.self_attn.v_proj.{p}"),
    ("model.layers.{i}.self_attn.o_proj.weight", "language_model.layers.{i}.self_attn.o_proj.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "language_model.layers.{i}.mlp.gate_proj.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "language_model.layers.{i}.mlp.up_proj.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "language_model.layers.{i}.mlp.down_proj.weight"),
    ("model.norm.weight", "language_model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]

CONV_KEY = "visual.patch_embed.proj.weight"


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern + r"\Z")


_HF_TO_OURS = [(_template_regex(hf), ours) for hf, ours in KEY_MAP]
_OURS_TO_HF = [(_template_regex(ours), hf) for hf, ours in KEY_MAP]


def canonical_hf_name(name: str) -> str:
    """Fold the transformers >= 4.52 names into the Hub names (TF457 `_checkpoint_conversion_mapping`, inverted)."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def _apply(table, name: str) -> str | None:
    for regex, template in table:
        m = regex.match(name)
        if m:
            return template.format(**{k: v for k, v in m.groupdict().items() if v is not None})
    return None


def hf_to_ours(name: str) -> str | None:
    """Our parameter path for an HF tensor name (either layout), or None if it is not a Qwen2-VL parameter."""
    return _apply(_HF_TO_OURS, canonical_hf_name(name))


def ours_to_hf(path: str) -> str:
    """The Hub-layout HF name for one of our parameter paths."""
    name = _apply(_OURS_TO_HF, path)
    if name is None:
        raise KeyError(f"no HF name for parameter {path}")
    return name


def to_ours_layout(path: str, array: np.ndarray) -> np.ndarray:
    """HF tensor -> our layout (only the Conv3d kernel changes shape)."""
    return array.reshape(array.shape[0], -1) if path == CONV_KEY else array


def to_hf_layout(path: str, array: np.ndarray, conv_shape: tuple[int, ...] | None = None) -> np.ndarray:
    return array.reshape(conv_shape) if path == CONV_KEY else array


def conv_kernel_shape(vision_cfg) -> tuple[int, ...]:
    v = vision_cfg
    return (v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)


# ------------------------------------------------------------------------------------------- model parameters
def param_path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def model_params(model: nnx.Module) -> dict[str, nnx.Param]:
    """`{dotted path: nnx.Param}` for every parameter of `model` (works on `nnx.eval_shape` models too)."""
    return {param_path(path): node for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Param)}


# --------------------------------------------------------------------------------------------- checkpoints
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message lists every problem found."""


def safetensors_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory (via the index when sharded); refuses pickle files."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {d}")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [d / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard files that do not exist: {missing}")
        return files
    files = sorted(d.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(str(p.name) for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{d} holds only pickle checkpoints ({', '.join(pickles)}). qwen2vl_jax never unpickles weights "
            "(pickle can run arbitrary code); convert them to safetensors first, e.g. with transformers: "
            "`Qwen2VLForConditionalGeneration.from_pretrained(src).save_pretrained(dst, safe_serialization=True)`.")
    raise CheckpointError(f"no *.safetensors files in {d}")


@dataclass
class LoadReport:
    tensors: int = 0
    bytes_read: int = 0


def iter_checkpoint(files: list[Path], name_map: Callable[[str], str | None]) -> Iterator[tuple[str, str,
                                                                                                SafetensorsFile]]:
    """(file tensor name, our path or None, file) for every tensor of every file."""
    for f in files:
        sf = SafetensorsFile(f)
        for name in sf.keys():
            yield name, name_map(name), sf


def load_into(model: nnx.Module, files: list[Path], *, dtype=None, name_map: Callable[[str], str | None] = hf_to_ours,
              transform: Callable[[str, np.ndarray], np.ndarray] = to_ours_layout, progress=None) -> LoadReport:
    """Fill every parameter of an abstract (`nnx.eval_shape`) model from safetensors files, tensor by tensor.

    Each tensor is read, reshaped, cast to `dtype` (default: the parameter's dtype) and placed on the device
    before the next one is read, so the host never holds more than one tensor in flight. All problems (unknown,
    duplicate, mis-shaped and missing tensors) are collected and raised together as one `CheckpointError`.
    """
    params = model_params(model)
    filled: set[str] = set()
    problems: list[str] = []
    report = LoadReport()
    try:
        entries = list(iter_checkpoint(files, name_map))
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    for name, path, sf in entries:
        if path is None or path not in params:
            problems.append(f"unexpected tensor {name} {list(sf.shape(name))}: not a parameter of this model")
            continue
        if path in filled:
            problems.append(f"duplicate tensor for {path} ({name})")
            continue
        target = params[path]
        expected = tuple(target.shape)
        found = sf.shape(name)
        if int(np.prod(found)) != int(np.prod(expected)) or (path != CONV_KEY and found != expected):
            problems.append(f"wrong shape for {name}: expected {list(expected)}, found {list(found)}")
            continue
        if problems:  # keep scanning for the full error report, but stop reading data
            filled.add(path)
            continue
        array = transform(path, sf.read(name))
        target_dtype = dtype if dtype is not None else target.dtype
        target.set_value(jax.device_put(jnp.asarray(array, dtype=target_dtype)))
        del array
        filled.add(path)
        report.tensors += 1
        report.bytes_read += sf.nbytes(name)
        if progress is not None:
            progress.update(sf.nbytes(name))
    missing = [p for p in params if p not in filled]
    for p in missing:
        problems.append(f"missing tensor for {p} {list(params[p].shape)}")
    if problems:
        raise CheckpointError(f"checkpoint {files[0].parent} does not match the model ({len(problems)} problem"
                              f"{'s' if len(problems) > 1 else ''}):\n  - " + "\n  - ".join(problems))
    return report


def checkpoint_has(files: list[Path], hf_name: str) -> bool:
    """Whether any file holds `hf_name` (either key layout)."""
    for f in files:
        if any(canonical_hf_name(k) == hf_name for k in SafetensorsFile(f).keys()):
            return True
    return False
