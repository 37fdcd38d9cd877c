"""What a quantized checkpoint says about its quantization (`StoredQuantization`, config.json's
`quantization_config`) and the abstract quantized model its integers and scales stream into (`quantize_abstract`).

A quantized checkpoint (`checkpoints/convert.py` writes it, `checkpoints/load.py` reads it) holds each quantized
module's integers under the weight's own name (int8 `[O, I]`, or int4 packed `[O, I/2]` uint8) and its fp32 scales
beside them (`<module>.weight_scale` in the Hugging Face layout, like compressed-tensors and fbgemm-fp8 name theirs;
`<module>.scale`, the parameter path, in ours), and config.json says which modules those are:

    "quantization_config": {"quant_method": "qwen2vl_jax", "version": 1, "mode": "int8" | "int4",
                            "group_size": null (int8: a scale per output channel) | 128 (int4), "modules": [...]}

`modules` are the checkpoint's own module names (the layout's), one per layer, so a checkpoint quantized with custom
`targets` reloads exactly as it was written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from ..modeling.parameters import param_path, stacked_prefix
from .apply import DEFAULT_TARGETS, QUANTIZABLE, chosen_modules, quantized_linears, set_quantized
from .formats import INT4_GROUP, MODES, QuantizationError

QUANT_METHOD = "qwen2vl_jax"
STORED_VERSION = 1


@dataclass(frozen=True)
class StoredQuantization:
    """A quantized checkpoint's `quantization_config`: the mode, int4's group size (None for int8) and exactly which
    modules hold integers (our per-layer module paths, `language_model.layers.0.self_attn.q_proj`)."""

    mode: str
    group_size: int | None
    modules: tuple[str, ...]

    def to_config(self, name: Callable[[str], str] = str) -> dict:
        """The config.json entry; `name` maps our module paths to the checkpoint layout's module names."""
        return {"quant_method": QUANT_METHOD, "version": STORED_VERSION, "mode": self.mode,
                "group_size": self.group_size, "modules": [name(m) for m in self.modules]}

    @classmethod
    def from_config(cls, raw, path: Callable[[str], str | None] = str) -> StoredQuantization:
        """Read (and check) a config.json entry; `path` maps the layout's module names to ours (None: not a module
        name). Raises one `QuantizationError` naming the field at fault."""
        if not isinstance(raw, dict):
            raise QuantizationError(f"quantization_config must be an object, got {type(raw).__name__}")
        method = raw.get("quant_method")
        if method != QUANT_METHOD:
            raise QuantizationError(f"quantization_config: quant_method {method!r} is not {QUANT_METHOD!r}; "
                                    "qwen2vl_jax loads full-precision checkpoints, its own int8 / int4 ones, and "
                                    "(from_pretrained only) GPTQ / AWQ ones (`quantization.gptq`)")
        version = raw.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise QuantizationError(f"quantization_config: version must be a positive integer, got {version!r}")
        if version > STORED_VERSION:
            raise QuantizationError(f"quantization_config: version {version} was written by a newer qwen2vl_jax "
                                    f"(this one reads version {STORED_VERSION}); upgrade qwen2vl_jax")
        mode = raw.get("mode")
        if mode not in MODES:
            raise QuantizationError(f"quantization_config: unknown mode {mode!r}; expected one of {MODES}")
        group = raw.get("group_size")
        if mode == "int8" and group is not None:
            raise QuantizationError(f"quantization_config: int8 has one scale per output channel, so group_size "
                                    f"must be null, got {group!r}")
        if mode == "int4" and (not isinstance(group, int) or isinstance(group, bool) or group < 2 or group % 2):
            raise QuantizationError(f"quantization_config: int4 needs group_size, a positive even number of input "
                                    f"columns per scale, got {group!r}")
        names = raw.get("modules")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise QuantizationError(f"quantization_config: modules must be a non-empty list of module names, got "
                                    f"{names!r:.80}")
        paths = [path(n) for n in names]
        unknown = [n for n, p in zip(names, paths) if p is None]
        if unknown:
            raise QuantizationError(f"quantization_config: modules names {unknown[:3]}, which are not modules of "
                                    "a Qwen2-VL checkpoint")
        repeated = sorted({p for p in paths if paths.count(p) > 1})
        if repeated:
            raise QuantizationError(f"quantization_config: modules lists {repeated[:3]} more than once")
        return cls(mode, group, tuple(paths))


def _per_layer(model: nnx.Module) -> dict[str, tuple[str, int | None]]:
    """`{per-layer module path: (module path, layer)}` of the quantizable modules (a `scan_layers` model's stacked
    `language_model.layers.self_attn.q_proj` is `language_model.layers.{i}.self_attn.q_proj`, layer i)."""
    out = {}
    for p, m in nnx.iter_modules(model):
        if not isinstance(m, QUANTIZABLE):
            continue
        path = param_path(p)
        prefix = stacked_prefix(path)
        if prefix is None:
            out[path] = (path, None)
        else:
            out.update({f"{prefix}{i}.{path[len(prefix):]}": (path, i) for i in range(m.weight.shape[0])})
    return out


def stored_quantization(model: nnx.Module) -> StoredQuantization | None:
    """What a checkpoint of this model says about its quantization (None: nothing is quantized). One mode and one
    int4 group size per model (a checkpoint says one); modules are listed per layer."""
    quantized = quantized_linears(model)
    if not quantized:
        return None
    kinds = {}
    for path, m in quantized.items():
        mode = "int8" if m.weight.dtype == jnp.int8 else "int4"
        kinds.setdefault((mode, None if mode == "int8" else m.in_features // m.scale.shape[-1]), path)
    if len(kinds) > 1:
        shown = ", ".join(f"{p} is {mode}" + (f" in groups of {g}" if g else "") for (mode, g), p in kinds.items())
        raise QuantizationError(f"a checkpoint holds one quantization, but this model mixes them ({shown})")
    ((mode, group),) = kinds
    return StoredQuantization(mode, group, _in_order(name for name, (path, _) in _per_layer(model).items()
                                                     if path in quantized))


def _in_order(names) -> tuple[str, ...]:
    """Module paths in one order whatever the model's layout (layer 2 before layer 10; stacked or not)."""
    return tuple(sorted(names, key=lambda n: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in n.split(".")]))


def plan_quantization(model: nnx.Module, mode: str, *, targets: str = DEFAULT_TARGETS,
                      group: int = INT4_GROUP) -> StoredQuantization:
    """What `quantize(model, mode, targets=targets, group=group)` would quantize, checked the same way, as a
    checkpoint says it; the model is not changed (`convert --quantize` plans the checkpoint it writes with it)."""
    chosen = chosen_modules(model, mode, targets, group)
    modules = _in_order(name for name, (path, _) in _per_layer(model).items() if path in chosen)
    return StoredQuantization(mode, group if mode == "int4" else None, modules)


def module_paths(model: nnx.Module, names) -> tuple[str, ...]:
    """The model's quantizable modules that hold the per-layer module `names` (`language_model.layers.0.mlp.up_proj`):
    the modules themselves, or a `scan_layers` model's stacked module, which must then be named for every one of its
    layers. Raises `QuantizationError` naming a module this model has no quantizable Linear (or embedding) for."""
    per_layer = _per_layer(model)
    unknown = [name for name in names if name not in per_layer]
    if unknown:
        raise QuantizationError(f"quantization_config names {unknown[:3]}, which this model has no quantizable "
                                "Linear or embedding for")
    modules = {param_path(p): m for p, m in nnx.iter_modules(model) if isinstance(m, QUANTIZABLE)}
    layers: dict[str, set] = {}
    for name in names:
        path, layer = per_layer[name]
        layers.setdefault(path, set()).add(layer)
    for path, chosen in layers.items():
        if None not in chosen and len(chosen) != modules[path].weight.shape[0]:
            raise QuantizationError(f"{path}: the checkpoint quantized layers {sorted(chosen)} of "
                                    f"{modules[path].weight.shape[0]}; a scan_layers model stacks them, so load it "
                                    "with scan_layers=False")
    return tuple(layers)


def quantize_abstract(model: nnx.Module, stored: StoredQuantization) -> nnx.Module:
    """Turn the modules `stored` names into quantized ones holding placeholders (`jax.ShapeDtypeStruct`: int8
    `[..., O, I]` or packed uint8 `[..., O, I/2]`, fp32 scales `[..., O]` / `[..., O, I/group]`), in place, on an
    abstract model (`parameters.abstract_model`): what a quantized checkpoint's integers and scales stream into, so
    no full-precision weight is built and nothing is quantized again. A `scan_layers` model quantizes a stacked
    module when the checkpoint quantized every one of its layers (some only: `QuantizationError`)."""
    modules = {param_path(p): m for p, m in nnx.iter_modules(model) if isinstance(m, QUANTIZABLE)}
    for path in module_paths(model, stored.modules):
        m = modules[path]
        if m.scale is not None:
            raise QuantizationError(f"{path} is already quantized")
        *lead, n_in = m.weight.shape
        if stored.mode == "int8":
            q, scale = (*lead, n_in), tuple(lead)
        elif n_in % stored.group_size:
            raise QuantizationError(f"{path}: int4 groups of {stored.group_size} need an input width that is a "
                                    f"multiple of it, got {n_in}")
        else:
            q, scale = (*lead, n_in // 2), (*lead, n_in // stored.group_size)
        dtype = jnp.int8 if stored.mode == "int8" else jnp.uint8
        set_quantized(m, jax.ShapeDtypeStruct(q, dtype), jax.ShapeDtypeStruct(scale, jnp.float32))
    return model
