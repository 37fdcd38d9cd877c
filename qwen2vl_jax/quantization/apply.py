"""`quantize`: the model transformation (which Linears, and their new parameters), in memory or as a checkpoint
streams in (`quantizing_placer`)."""

from __future__ import annotations

import re

import jax.numpy as jnp
from flax import nnx

from ..modeling.layers import Embed, Linear
from ..modeling.parameters import param, param_path
from .formats import INT4_GROUP, MODES, QuantizationError, quantize_weight

# The text decoder's projections and the output projection (our paths): `lm_head`, or in a tied model (the 2B) the
# embedding it shares (its lookup then dequantizes the rows it reads). Together they are what a decode step reads:
# the 2B's tied embedding is 15% of its decoder's bytes, so int8 without it would read 0.58x bf16's bytes, not 0.5x.
# The vision tower and the merger stay in full precision by default (`targets` can name them).
DEFAULT_TARGETS = (r"^language_model\.layers\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
                   r"|^lm_head$|^language_model\.embed_tokens$")
QUANTIZABLE = (Linear, Embed)  # modules with a `scale` slot and a `[out, in]` weight


def quantized_linears(model: nnx.Module) -> dict[str, Linear | Embed]:
    """`{our path: module}` of the quantized Linears (and a quantized tied embedding)."""
    return {param_path(p): m for p, m in nnx.iter_modules(model) if isinstance(m, QUANTIZABLE) and m.scale is not None}


def quantize(model: nnx.Module, mode: str, *, targets: str = DEFAULT_TARGETS, group: int = INT4_GROUP) -> nnx.Module:
    """Quantize, in place, every Linear (or Embed) whose path matches the regex `targets` (`re.search`; default:
    the text decoder's attention and MLP projections and the output projection) to `mode` ("int8" or "int4");
    returns the model. Already quantized
    Linears are refused, as are Linears whose input width int4's groups (`group` columns) do not divide."""
    for lin in chosen_modules(model, mode, targets, group).values():
        q, scale = quantize_weight(lin.weight[...], mode, group)
        set_quantized(lin, q, scale)
    return model


def chosen_modules(model: nnx.Module, mode: str, targets: str, group: int) -> dict[str, Linear | Embed]:
    """The Linears `targets` names, checked (before anything changes)."""
    if mode not in MODES:
        raise QuantizationError(f"unknown quantization {mode!r}; choose one of {MODES}")
    pattern = re.compile(targets)
    chosen = {param_path(p): m for p, m in nnx.iter_modules(model)
              if isinstance(m, QUANTIZABLE) and pattern.search(param_path(p))}
    if not chosen:
        raise QuantizationError(f"targets={targets!r} matches no Linear of this model")
    for path, lin in chosen.items():
        if lin.scale is not None:
            raise QuantizationError(f"{path} is already quantized")
        if mode == "int4" and lin.in_features % group:
            raise QuantizationError(f"{path}: int4 groups of {group} need an input width that is a multiple of it, got "
                             f"{lin.in_features}")
    return chosen


def set_quantized(lin: Linear | Embed, q, scale) -> None:
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
    chosen = chosen_modules(model, mode, targets, group)
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
            set_quantized(chosen[path], chosen[path].weight[...], scales[name])

    return quantizing_place, finish
