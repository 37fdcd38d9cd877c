"""LoRA adapters on any `Linear`, in PEFT's format both ways.

    apply_lora(model, rank=16, alpha=32)                 # the decoder's q/k/v/o and gate/up/down (PEFT's names)
    optimizer = training.make_optimizer(model, tx, trainable="lora")
    ...
    save_adapter(model, "out/adapter")                   # adapter_config.json + adapter_model.safetensors
    merge_lora(model); model.save_pretrained("out/merged")

Mirrors peft 0.21 `tuners/lora/layer.py` `Linear`: `y = base(x) + lora_B(lora_A(dropout(x))) * scaling` with
`scaling = alpha / r` (`alpha / sqrt(r)` with rsLoRA), A `[r, in]` initialised as `nn.Linear`'s default
(kaiming-uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))) and B `[out, r]` zero, so a fresh adapter changes
nothing. The adapter lives on the `Linear` itself (`linear.lora`), so base parameter paths, the loader, the converter
and the sharding rules are untouched; adapter parameters are `layers.LoRAParam`, which checkpoints and
`model_params` leave out.

Module selection follows PEFT's `target_modules` on transformers 4.57's module names (`model.language_model.
layers.0.self_attn.q_proj`, `model.visual.blocks.0.attn.qkv`, `model.visual.merger.mlp.0`, `lm_head`): a list
matches a module whose name equals an entry or ends with "." + entry, a string is a regex that must match the
whole name. The same list therefore selects the same modules here and in PEFT.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .checkpoints.keymap import canonical_hf_name, hf_to_ours, ours_to_hf
from .checkpoints.safetensors_io import SafetensorsError, SafetensorsFile, save_file
from .modeling.config import ARCHITECTURES
from .modeling.layers import Linear, dense
from .modeling.model import Qwen2VL
from .modeling.parameters import LoRAParam, param, param_path

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The vision tower's Linears (blocks' attention and MLP); add them to DEFAULT_TARGETS to adapt the vision tower.
# Qwen2.5-VL's vision MLP is gate_proj / up_proj / down_proj, so DEFAULT_TARGETS already reach it there, as PEFT's
# suffix matching does on transformers' Qwen2_5_VLForConditionalGeneration.
VISION_TARGETS = ("qkv", "attn.proj", "fc1", "fc2")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
CONV_MODULE = "model.visual.patch_embed.proj"  # a Conv3d in transformers: not a Linear there


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """What an adapted model's adapters share (kept on the model as `model.lora_config`; hashable, static)."""

    r: int
    lora_alpha: float
    lora_dropout: float = 0.0
    use_rslora: bool = False
    target_modules: str | tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scaling(self) -> float:
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r


class LoRAError(ValueError):
    """An adapter that cannot be applied, saved or loaded; the message says why."""


class LoRA(nnx.Module):
    """The low-rank update of one Linear: `lora_B(lora_A(dropout(x))) * scaling`, computed in the adapter dtype."""

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float, *, dropout: float = 0.0,
                 axes: tuple[str, str] = (None, None), dtype=jnp.float32, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
        a = jax.random.uniform(rngs.params(), (rank, in_features), jnp.float32, -bound, bound).astype(dtype)
        self.lora_A = param(a, (None, axes[1]), LoRAParam)
        self.lora_B = param(jnp.zeros((out_features, rank), dtype), (axes[0], None), LoRAParam)
        self.rank, self.scaling, self.dropout_rate = rank, float(scaling), float(dropout)
        # deterministic until `set_lora_training(model, True)`: inference never drops
        self.dropout = nnx.data(nnx.Dropout(dropout, deterministic=True, rngs=rngs) if dropout > 0 else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.lora_A.dtype)
        if self.dropout is not None:
            x = self.dropout(x)
        return dense(dense(x, self.lora_A[...]), self.lora_B[...]) * jnp.asarray(self.scaling, x.dtype)


# --------------------------------------------------------------------------------------------- module names
def hf_module_name(path: str) -> str:
    """transformers 4.57's module name for one of our Linear paths (`language_model.layers.0.self_attn.q_proj` ->
    `model.language_model.layers.0.self_attn.q_proj`)."""
    hub = ours_to_hf(path + ".weight")[: -len(".weight")]
    if hub.startswith("visual."):
        return "model." + hub
    if hub.startswith("model."):
        return "model.language_model." + hub[len("model."):]
    return hub


def our_linear_path(module: str) -> str | None:
    """Our Linear path for a transformers module name (either key layout), or None."""
    path = hf_to_ours(canonical_hf_name(module) + ".weight")
    return None if path is None else path[: -len(".weight")]


def linears(model: nnx.Module) -> dict[str, Linear]:
    """`{our path: Linear}` for every Linear of the model."""
    return {param_path(path): m for path, m in nnx.iter_modules(model) if isinstance(m, Linear)}


def matches(target_modules: str | Sequence[str], name: str) -> bool:
    """PEFT's rule (`check_target_module_exists`): a regex string must match the whole name; a list matches
    names equal to an entry or ending with "." + entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def lora_modules(model: nnx.Module) -> dict[str, Linear]:
    """`{our path: Linear}` for the Linears that carry an adapter."""
    return {p: m for p, m in linears(model).items() if m.lora is not None}


# --------------------------------------------------------------------------------------------------- apply
def _check_unstacked(model) -> None:
    if getattr(model.config, "scan_layers", False):
        raise LoRAError("LoRA adapters attach to each layer's Linear; a scan_layers=True model stacks the layers: "
                        "load it with scan_layers=False to use LoRA")


def apply_lora(model: Qwen2VL, rank: int, alpha: float | None = None, target_modules=None, *, dropout: float = 0.0,
               use_rslora: bool = False, dtype=jnp.float32, seed: int = 0) -> dict[str, Linear]:
    """Add a LoRA adapter (A random, B zero: the model's output is unchanged) to each target Linear.

    `target_modules`: PEFT-style names or a regex over transformers' module names (module docstring); default
    `DEFAULT_TARGETS`, the decoder's attention and MLP projections. `alpha` defaults to `rank` (scaling 1).
    `dtype`: the adapters' dtype (fp32 by default, as PEFT autocasts adapters of bf16 models). Returns the adapted
    Linears by path.
    """
    if not isinstance(rank, int) or rank <= 0:
        raise LoRAError(f"rank must be a positive integer, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise LoRAError(f"dropout must be in [0, 1), got {dropout}")
    _check_unstacked(model)
    alpha = float(rank if alpha is None else alpha)
    targets = DEFAULT_TARGETS if target_modules is None else target_modules
    if not isinstance(targets, str):
        targets = tuple(targets)
    chosen = {}
    for path, lin in linears(model).items():
        name = hf_module_name(path)
        if not matches(targets, name):
            continue
        if name == CONV_MODULE:
            raise LoRAError("the patch embedding is a Conv3d in transformers; LoRA on it is not supported")
        if lin.lora is not None:
            raise LoRAError(f"{name} already has a LoRA adapter (merge_lora or remove_lora first)")
        chosen[path] = lin
    if not chosen:
        raise LoRAError(f"target_modules={targets!r} matches no Linear of this model; module names look like "
                        f"{hf_module_name('language_model.layers.0.self_attn.q_proj')!r}")
    scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    for lin in chosen.values():
        lin.lora = LoRA(lin.in_features, lin.out_features, rank, scaling, dropout=dropout, axes=lin.axes,
                        dtype=dtype, rngs=rngs)
    model.lora_config = LoRAConfig(rank, alpha, float(dropout), bool(use_rslora), targets)
    return chosen


def set_lora_training(model: nnx.Module, training: bool) -> None:
    """Turn the adapters' dropout on (training) or off (evaluation, generation)."""
    for _, m in nnx.iter_modules(model):
        if isinstance(m, LoRA) and m.dropout is not None:
            m.dropout.deterministic = not training


def merge_lora(model: Qwen2VL) -> int:
    """Fold every adapter into its base weight (`W += scaling * B @ A`, in fp32, stored in W's dtype) and remove
    it; returns how many were merged. peft `LoraLayer.merge` / `merge_and_unload`."""
    quantized = [p for p, lin in lora_modules(model).items() if lin.scale is not None]
    if quantized:
        raise LoRAError(f"cannot merge adapters into quantized weights ({quantized[0]} and {len(quantized) - 1} "
                        "more hold integers): save the adapter with save_adapter, or merge on a full-precision model")
    merged = 0
    for lin in lora_modules(model).values():
        lo = lin.lora
        delta = (lo.lora_B[...].astype(jnp.float32) @ lo.lora_A[...].astype(jnp.float32)) * lo.scaling
        w = lin.weight[...]
        lin.weight.set_value((w.astype(jnp.float32) + delta).astype(w.dtype))
        lin.lora = None
        merged += 1
    if hasattr(model, "lora_config"):
        del model.lora_config
    return merged


def remove_lora(model: Qwen2VL) -> int:
    """Drop every adapter without merging (the base model again)."""
    mods = lora_modules(model)
    for lin in mods.values():
        lin.lora = None
    if hasattr(model, "lora_config"):
        del model.lora_config
    return len(mods)


# -------------------------------------------------------------------------------------------- PEFT format
def peft_config(model: Qwen2VL, base_model_name_or_path: str | None = None) -> dict:
    """The `adapter_config.json` PEFT 0.21 writes for this adapter (every field, defaults where unused)."""
    cfg = getattr(model, "lora_config", None)
    if cfg is None or not lora_modules(model):
        raise LoRAError("this model has no LoRA adapter (apply_lora or load_adapter first)")
    family = model.config.model_type
    return {
        "alpha_pattern": {}, "auto_mapping": {"base_model_class": ARCHITECTURES[family],
                                              "parent_library": f"transformers.models.{family}.modeling_{family}"},
        "base_model_name_or_path": base_model_name_or_path, "bias": "none", "corda_config": None,
        "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
        "loftq_config": {}, "lora_alpha": cfg.lora_alpha, "lora_bias": False, "lora_dropout": cfg.lora_dropout,
        "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA",
        "r": cfg.r, "rank_pattern": {}, "revision": None,
        "target_modules": cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules),
        "task_type": None, "trainable_token_indices": None, "use_dora": False, "use_rslora": cfg.use_rslora,
    }


def save_adapter(model: Qwen2VL, out_dir: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                 force: bool = False) -> Path:
    """Write the adapters in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`, keys
    `base_model.model.<module>.lora_A.weight` / `lora_B.weight`), atomically: `PeftModel.from_pretrained(hf_model,
    out_dir)` loads it in PyTorch."""
    out = Path(out_dir)
    config = peft_config(model, base_model_name_or_path)
    tensors = {}
    for path, lin in lora_modules(model).items():
        key = PEFT_PREFIX + hf_module_name(path)
        tensors[key + ".lora_A.weight"] = np.asarray(jax.device_get(lin.lora.lora_A[...]))
        tensors[key + ".lora_B.weight"] = np.asarray(jax.device_get(lin.lora.lora_B[...]))
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} exists and is not empty; pass force=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(dict(sorted(tensors.items())), tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


_UNSUPPORTED = {"use_dora": (False, None), "bias": ("none", None), "modules_to_save": (None, [], ()),
                "fan_in_fan_out": (False, None), "layer_replication": (None,), "trainable_token_indices": (None,),
                "lora_bias": (False, None), "use_qalora": (False, None)}


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict:
    d = Path(adapter_dir)
    path = d / ADAPTER_CONFIG
    if not path.is_file():
        raise LoRAError(f"{d} is not a PEFT adapter directory: {ADAPTER_CONFIG} is missing")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LoRAError(f"{path} is not valid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise LoRAError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for key, allowed in _UNSUPPORTED.items():
        if cfg.get(key) not in allowed:
            raise LoRAError(f"{path}: {key}={cfg.get(key)!r} is not supported (plain LoRA only)")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise LoRAError(f"{path}: a per-module {key} is not supported")
    if not isinstance(cfg.get("r"), int) or isinstance(cfg["r"], bool) or cfg["r"] <= 0:
        raise LoRAError(f"{path}: r must be a positive integer, got {cfg.get('r')!r}")
    is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not is_number(cfg.get("lora_alpha", cfg["r"])):  # json reads NaN / Infinity too
        raise LoRAError(f"{path}: lora_alpha must be a finite number, got {cfg.get('lora_alpha')!r}")
    dropout = cfg.get("lora_dropout")
    if dropout is not None and not (is_number(dropout) and 0 <= dropout < 1):
        raise LoRAError(f"{path}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    if not isinstance(cfg.get("use_rslora", False), bool):
        raise LoRAError(f"{path}: use_rslora must be true or false, got {cfg.get('use_rslora')!r}")
    return cfg


def load_adapter(model: Qwen2VL, adapter_dir: str | os.PathLike, *, dtype=jnp.float32) -> dict[str, Linear]:
    """Load a PEFT LoRA adapter (written by PEFT or by `save_adapter`) onto `model`: every tensor is checked
    against the model before anything changes; returns the adapted Linears."""
    _check_unstacked(model)
    d = Path(adapter_dir)
    cfg = read_adapter_config(d)
    weights = d / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise LoRAError(f"{d}: {ADAPTER_WEIGHTS} is missing (only safetensors adapters are read, never pickle)")
    try:
        sf = SafetensorsFile(weights)
    except SafetensorsError as e:
        raise LoRAError(f"corrupt adapter file: {e}") from None
    rank = cfg["r"]
    targets = linears(model)
    found: dict[str, dict[str, str]] = {}
    base_weights: dict[str, str] = {}  # PEFT also saves an adapted lm_head's base weight (save_embedding_layers)
    problems = []
    for key in sf.keys():
        base = re.fullmatch(re.escape(PEFT_PREFIX) + r"(?P<module>.+)\.base_layer\.weight", key)
        if base is not None and our_linear_path(base["module"]) in targets:
            path = our_linear_path(base["module"])
            if sf.shape(key) != tuple(targets[path].weight.shape):
                problems.append(f"wrong shape: {key} expected {list(targets[path].weight.shape)}, "
                                f"found {list(sf.shape(key))}")
            base_weights[path] = key
            continue
        m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(?P<module>.+)\.(?P<ab>lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        path = None if m is None else our_linear_path(m["module"])
        if path is None or path not in targets:
            problems.append(f"unexpected: {key} is not a LoRA weight of a Linear of this model")
            continue
        lin = targets[path]
        want = (rank, lin.in_features) if m["ab"] == "lora_A" else (lin.out_features, rank)
        if sf.shape(key) != want:
            problems.append(f"wrong shape: {key} expected {list(want)}, found {list(sf.shape(key))}")
        found.setdefault(path, {})[m["ab"]] = key
    for path, ab in found.items():
        if len(ab) != 2:
            problems.append(f"incomplete: {hf_module_name(path)} has only {list(ab)}")
    for path, key in base_weights.items():
        if path not in found:
            problems.append(f"unexpected: {key} belongs to a module without LoRA weights")
    if not found and not problems:
        problems.append("no LoRA weights in the file")
    if problems:
        raise LoRAError(f"adapter {d} does not match the model:\n  - " + "\n  - ".join(problems[:50]))
    arrays = {}  # every weight read and checked before the model changes
    for key in [k for ab in found.values() for k in ab.values()] + list(base_weights.values()):
        if not jnp.issubdtype(sf.dtype(key), jnp.floating):
            problems.append(f"{key} is {sf.dtype(key).name}, not floating point")
            continue
        arrays[key] = sf.read(key).astype(np.float32)
        bad = int(arrays[key].size - np.count_nonzero(np.isfinite(arrays[key])))
        if bad:
            problems.append(f"{key} holds {bad} NaN or Inf values (in float32)")
    if problems:
        raise LoRAError(f"adapter {weights} has unusable weights: " + "; ".join(problems[:10]))
    alpha = float(cfg.get("lora_alpha", rank))
    use_rslora = bool(cfg.get("use_rslora", False))
    scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
    rngs = nnx.Rngs(params=0, dropout=1)
    adapted = {}
    for path, ab in found.items():
        lin = targets[path]
        if lin.lora is not None:
            raise LoRAError(f"{hf_module_name(path)} already has a LoRA adapter (merge_lora or remove_lora first)")
        lo = LoRA(lin.in_features, lin.out_features, rank, scaling, dropout=float(cfg.get("lora_dropout") or 0.0),
                  axes=lin.axes, dtype=dtype, rngs=rngs)
        lo.lora_A.set_value(jnp.asarray(arrays[ab["lora_A"]], dtype))
        lo.lora_B.set_value(jnp.asarray(arrays[ab["lora_B"]], dtype))
        lin.lora = lo
        adapted[path] = lin
        if path in base_weights:  # peft `set_peft_model_state_dict` loads it into the base layer: so do we
            w = lin.weight
            w.set_value(jnp.asarray(arrays[base_weights[path]], w.dtype))
    targets_cfg = cfg.get("target_modules")
    model.lora_config = LoRAConfig(rank, alpha, float(cfg.get("lora_dropout") or 0.0), use_rslora,
                                   targets_cfg if isinstance(targets_cfg, str) else tuple(sorted(targets_cfg or ())))
    return adapted
