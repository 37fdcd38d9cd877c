"""The parameter tree: parameters annotated with logical axes, walking a model's parameters by checkpoint path,
stacking layers for `scan_layers`, and the abstract model
(shapes and dtypes, nothing allocated) that loading fills and plans measure.

Every parameter carries logical axis names (`out_sharding=(...)`, flax's metadata for `nnx.get_partition_spec`);
`modeling.partitioning.LOGICAL_RULES` maps them to a device mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class LoRAParam(nnx.Param):
    """A low-rank adapter's parameter (`qwen2vl_jax.lora`): trainable on its own, never part of a base checkpoint."""


def param(value, axes: tuple, kind: type[nnx.Param] = nnx.Param) -> nnx.Param:
    """A parameter annotated with logical axis names, one entry per dimension (placed on a mesh by `sharding`): a
    name, None, or a flattened dimension's factors `((name, size), ...)`, e.g. q_proj's rows `(("q_heads", N),
    ("head_dim", H))`. flax's `out_sharding` metadata gets each dimension's leading name."""
    flat = tuple(a if a is None or isinstance(a, str) else a[0][0] for a in axes)
    return kind(value, out_sharding=flat, logical_axes=tuple(axes), eager_sharding=False)


def heads_axis(heads: str, n: int, head_dim: str, h: int) -> tuple[tuple[str, int], tuple[str, int]]:
    """The logical axis of a flattened `[n * h]` heads dimension: whole heads are the unit of any split."""
    return ((heads, n), (head_dim, h))


def param_path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def model_params(model: nnx.Module, *, adapters: bool = False) -> dict[str, nnx.Param]:
    """`{dotted path: nnx.Param}` for every base parameter of `model` (works on `nnx.eval_shape` models too): what
    a checkpoint holds. `adapters=True` adds the LoRA parameters (`LoRAParam`)."""
    return {param_path(path): node for path, node in nnx.iter_graph(model)
            if isinstance(node, nnx.Param) and (adapters or not isinstance(node, LoRAParam))}


# `scan_layers=True` models stack each tower's layers: one parameter `[L, ...]` per layer parameter, under these
# prefixes (`language_model.layers.self_attn.q_proj.weight` holds every `language_model.layers.{i}.self_attn...`).
STACKED_PREFIXES = ("language_model.layers.", "visual.blocks.")


def stacked_prefix(path: str) -> str | None:
    """The stacking prefix of a stacked parameter's path (None for a per-layer or unstacked path)."""
    for prefix in STACKED_PREFIXES:
        if path.startswith(prefix) and not path[len(prefix):].split(".", 1)[0].isdigit():
            return prefix
    return None


def checkpoint_params(model: nnx.Module) -> dict[str, tuple[nnx.Param, int | None]]:
    """`{checkpoint path: (parameter, layer)}`: what a checkpoint holds, per layer. Unstacked parameters map to
    themselves (layer None); a stacked `[L, ...]` parameter of a `scan_layers=True` model maps from each of its L
    per-layer paths (`language_model.layers.{i}...`), with `layer` = i (the slice `param[i]`)."""
    out: dict[str, tuple[nnx.Param, int | None]] = {}
    for path, p in model_params(model).items():
        prefix = stacked_prefix(path)
        if prefix is None:
            out[path] = (p, None)
        else:
            rest = path[len(prefix):]
            for i in range(p.shape[0]):
                out[f"{prefix}{i}.{rest}"] = (p, i)
    return out


def checkpoint_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """`{checkpoint path: shape}` (per layer; see `checkpoint_params`)."""
    return {path: tuple(p.shape[1:] if i is not None else p.shape) for path, (p, i) in checkpoint_params(model).items()}


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """One module of `modules[0]`'s structure whose parameters are the L modules' stacked on a new leading axis
    (logical axis "layers"): what `jax.lax.scan` runs over (`scan_layers=True`). The modules' static attributes
    (a layer's name and index) are the first's."""
    graphdef, _ = nnx.split(modules[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(m) for m in modules])
    module = nnx.merge(graphdef, stacked)
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.Param):
            meta = node.get_metadata()
            node.set_metadata(out_sharding=("layers", *meta["out_sharding"]),
                              logical_axes=("layers", *meta["logical_axes"]))
    return module


class _FixedKey:
    """Stands in for `nnx.Rngs` while building the abstract model: every initializer gets the same key.

    Why: under `nnx.eval_shape`, each `nnx.Rngs` draw updates its counter variable inside the trace, and flax
    asks the traced value for its `.sharding`, which makes JAX build an error message that walks the whole
    trace so far (quadratic): 4.9 s of a 2B load here, 0.7 s with a fixed key. Values are never computed.
    """

    def params(self):
        return jax.random.key(0)


def abstract_model(cls, config, param_dtype=jnp.float32):
    """The model with shapes and dtypes but no values (`nnx.eval_shape`): nothing is allocated."""
    return nnx.eval_shape(lambda: cls(config, param_dtype=param_dtype, rngs=_FixedKey()))
