"""`quantize`: the model transformation (which Linears, and their new parameters)."""

from __future__ import annotations

import re

from flax import nnx

from ..modeling.layers import Linear
from ..modeling.parameters import param, param_path
from .formats import INT4_GROUP, MODES, quantize_weight

# the text decoder's projections (our paths); the vision tower and the merger stay in full precision by default
DEFAULT_TARGETS = r"^language_model\.layers\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


def quantized_linears(model: nnx.Module) -> dict[str, Linear]:
    """`{our path: Linear}` of the quantized Linears."""
    return {param_path(p): m for p, m in nnx.iter_modules(model) if isinstance(m, Linear) and m.scale is not None}


def quantize(model: nnx.Module, mode: str, *, targets: str = DEFAULT_TARGETS, group: int = INT4_GROUP) -> nnx.Module:
    """Quantize, in place, every Linear whose path matches the regex `targets` (`re.search`; default: the text
    decoder's attention and MLP projections) to `mode` ("int8" or "int4"); returns the model. Already quantized
    Linears are refused, as are Linears whose input width int4's groups (`group` columns) do not divide."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {MODES}")
    pattern = re.compile(targets)
    chosen = {p: m for p, m in nnx.iter_modules(model) if isinstance(m, Linear) and pattern.search(param_path(p))}
    if not chosen:
        raise ValueError(f"targets={targets!r} matches no Linear of this model")
    for path, lin in chosen.items():
        if lin.scale is not None:
            raise ValueError(f"{param_path(path)} is already quantized")
        if mode == "int4" and lin.in_features % group:
            raise ValueError(f"{param_path(path)}: int4 groups of {group} need an input width that is a "
                             f"multiple of it, got {lin.in_features}")
    for lin in chosen.values():
        w = lin.weight
        axes = tuple(w.get_metadata()["logical_axes"])
        q, scale = quantize_weight(w[...], mode, group)
        lin.weight = param(q, axes)
        lin.scale = param(scale, axes[:-1] + ((None,) if mode == "int4" else ()))
    return model
