"""`quantize`: the model transformation (which Linears, and their new parameters)."""

from __future__ import annotations

import re

import jax.numpy as jnp
from flax import nnx

from ..modeling.layers import Linear
from ..modeling.parameters import param, param_path
from .formats import INT4_GROUP, MODES, QuantizationError, quantize_weight

# the text decoder's projections (our paths); the vision tower and the merger stay in full precision by default
DEFAULT_TARGETS = r"^language_model\.layers\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


def quantized_linears(model: nnx.Module) -> dict[str, Linear]:
    """`{our path: Linear}` of the quantized Linears."""
    return {param_path(p): m for p, m in nnx.iter_modules(model) if isinstance(m, Linear) and m.scale is not None}


def quantize(model: nnx.Module, mode: str, *, targets: str = DEFAULT_TARGETS, group: int = INT4_GROUP) -> nnx.Module:
    """Quantize, in place, every Linear whose path matches the regex `targets` (`re.search`; default: the text
    decoder's attention and MLP projections) to `mode` ("int8" or "int4"); returns the model. Already quantized
    Linears are refused, as are Linears whose input width int4's groups (`group` columns) do not divide."""
    for lin in _chosen(model, mode, targets, group).values():
        q, scale = quantize_weight(lin.weight[...], mode, group)
        _set(lin, q, scale)
    return model


def _chosen(model: nnx.Module, mode: str, targets: str, group: int) -> dict[str, Linear]:
    """The Linears `targets` names, checked (before anything changes)."""
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization {mode!r}; choose one of {MODES}")
    pattern = re.compile(targets)
    chosen = {param_path(p): m for p, m in nnx.iter_modules(model)
              if isinstance(m, Linear) and pattern.search(param_path(p))}
    if not chosen:
        raise QuantizationError(f"targets={targets!r} matches no Linear of this model")
    for path, lin in chosen.items():
        if lin.scale is not None:
            raise QuantizationError(f"{path} is already quantized")
        if mode == "int4" and lin.in_features % group:
            raise QuantizationError(f"{path}: int4 groups of {group} need an input width that is a multiple of it, got "
                             f"{lin.in_features}")
    return chosen


def _set(lin: Linear, q, scale) -> None:
    """The Linear's integers in `weight` (same logical axes) and its scales beside them (the output axis's)."""
    axes = tuple(lin.weight.get_metadata()["logical_axes"])  # with "layers" first when stacked
    packed = q.dtype == jnp.uint8
    lin.weight = param(q, _packed(axes) if packed else axes)
    lin.scale = param(scale, axes[:-1] + ((None,) if scale.ndim == len(axes) else ()))
    lin.weight_axes = _packed(lin.axes) if packed else lin.axes  # one layer's, as the Linear's dot sees it


def _packed(axes: tuple) -> tuple:
    """The logical axes of an int4 weight packed two input columns a byte: a flattened heads axis
    `((heads, N), (head_dim, H))` becomes `((heads, N), (head_dim, H / 2))` (splits stay between whole heads)."""
    last = axes[-1]
    if last is not None and not isinstance(last, str):
        last = (*last[:-1], (last[-1][0], last[-1][1] // 2))
    return axes[:-1] + (last,)


def quantizing_placer(model: nnx.Module, mode: str, place, *, targets: str = DEFAULT_TARGETS,
                      group: int = INT4_GROUP):
    """Quantize while a checkpoint streams in (`checkpoints.keymap.load_into`'s `place(path, array)`): each
    targeted weight is quantized as it arrives, so the full-precision model never exists (memory: the quantized
    weights plus one tensor in flight). Returns `(place, finish)`: load with `place`, then `finish()` turns the
    targeted Linears into quantized ones."""
    chosen = _chosen(model, mode, targets, group)
    weights = {f"{path}.weight": path for path in chosen}
    scales: dict[str, object] = {}

    def quantizing_place(path: str, array):
        if path not in weights:
            return place(path, array)
        q, scales[path] = quantize_weight(place(path, array), mode, group)
        return q

    def finish() -> None:
        missing = set(weights) - set(scales)
        if missing:
            raise QuantizationError(f"the checkpoint did not fill {sorted(missing)[:3]}")
        for name, path in weights.items():
            _set(chosen[path], chosen[path].weight[...], scales[name])

    return quantizing_place, finish
