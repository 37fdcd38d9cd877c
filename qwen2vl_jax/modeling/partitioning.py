"""Logical axes -> mesh axes: the rules, the mesh, and the constraints the model math applies (no model imports).

The towers name the logical axes of what they make (`constrain(x, ("batch", "seq", "act_embed"))`), and each layer
uses its weight through `gathered_weight`; both do nothing until a `Partitioning` (a mesh and its rules) is
active, which `Qwen2VL.forward` (the decoder) and `VisionTransformer.forward` make it while tracing when the model
holds one (`sharding.set_partitioning`). `sharding` (above the model) places the parameters and explains the policy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Mapping

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..attention import sharding as attention_sharding

MESH_AXES = ("data", "fsdp", "model")

# logical axis -> mesh axis, a tuple of mesh axes (each used in turn where it divides), or None (replicated).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters: decoder
    "layers": None,  # the stacked layer axis of `scan_layers=True` models
    "vocab": "model",  # embed_tokens / lm_head rows
    "embed": "fsdp",  # residual width of the weights: FSDP splits it, tensor parallelism keeps it whole
    "q_heads": "model",
    "kv_heads": "model",
    "head_dim": None,
    "mlp": "model",
    # parameters: vision tower
    "vis_patch": None,
    "vis_embed": "fsdp",
    "vis_qkv": None,  # the q | k | v factor of the fused qkv rows
    "vis_heads": "model",
    "vis_head_dim": None,
    "vis_mlp": "model",
    "vis_merge_in": "fsdp",
    "vis_merge": "model",
    # activations and the KV cache
    "batch": ("data", "fsdp"),
    "seq": None,  # tokens of a call
    "slots": None,  # KV cache slots
    "act_embed": None,  # the residual stream is replicated over "model" (Megatron)
    "vis_rows": None,  # vision patch rows
}

# A logical axis entry: a name, None, or a flattened dimension's factors ((name, size), ...) in row-major order.
Axis = str | None | tuple[tuple[str, int], ...]


def _mesh_axes(rule) -> tuple[str, ...]:
    return () if rule is None else (rule,) if isinstance(rule, str) else tuple(rule)


def _lookup(name: str, rules: Mapping, mesh_shape: Mapping[str, int]) -> tuple[str, ...]:
    if name not in rules:
        raise ValueError(f"logical axis {name!r} has no entry in the sharding rules")
    axes = _mesh_axes(rules[name])
    for a in axes:
        if a not in mesh_shape:
            raise ValueError(f"sharding rule {name!r} -> {a!r}: the mesh has axes {tuple(mesh_shape)}")
    return axes


def _split(size: int, axes: tuple[str, ...], mesh_shape: Mapping[str, int], used: set[str]) -> tuple[str, ...]:
    """The mesh axes (of `axes`, in order) that split a dimension of `size`: each one that still divides what is
    left and is not used by another dimension; axes of size 1 are left out."""
    out, ways = [], 1
    for a in axes:
        n = mesh_shape[a]
        if n > 1 and a not in used and size % (ways * n) == 0:
            out.append(a)
            ways *= n
    return tuple(out)


def partition_spec(axes: tuple[Axis, ...], shape: tuple[int, ...], mesh,
                   rules: Mapping = LOGICAL_RULES) -> PartitionSpec:
    """The PartitionSpec of an array with logical `axes` (one entry per dimension; `mesh` needs only `.shape`).

    A dimension is split over its rule's mesh axes where they divide it, else replicated. A flattened dimension
    `((name, size), ...)` is split over the rule of its leading factor that has one, and only when every factor
    before it has size 1 (a contiguous split then falls between whole units: whole heads) and the mesh axes divide
    that factor's size; otherwise it is replicated.
    """
    mesh_shape = dict(mesh.shape)
    spec, used = [], set()
    for entry, size in zip(axes, shape, strict=True):
        chosen: tuple[str, ...] = ()
        if isinstance(entry, str):
            chosen = _split(size, _lookup(entry, rules, mesh_shape), mesh_shape, used)
        elif entry is not None:
            if math.prod(n for _, n in entry) != size:
                raise ValueError(f"flattened axis {entry} does not multiply to the dimension's size {size}")
            for i, (name, n) in enumerate(entry):
                mesh_axes = _lookup(name, rules, mesh_shape)
                if mesh_axes:
                    if all(m == 1 for _, m in entry[:i]):
                        chosen = _split(n, mesh_axes, mesh_shape, used)
                    break
        used.update(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return PartitionSpec(*spec)


def shard_shape(shape: tuple[int, ...], spec: PartitionSpec, mesh) -> tuple[int, ...]:
    """The per-device shape of an array of `shape` placed with `spec` (every split divides exactly)."""
    out = []
    for i, size in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        ways = math.prod(mesh.shape[a] for a in _mesh_axes(entry))
        out.append(size // ways)
    return tuple(out)


# ------------------------------------------------------------------------------------- activations, KV cache
@dataclasses.dataclass(frozen=True)
class Partitioning:
    """A mesh and its rules, held by the model (a static, hashable attribute: compiled programs depend on it)."""

    mesh: Mesh
    rules: tuple[tuple[str, object], ...]

    @classmethod
    def of(cls, mesh: Mesh, rules: Mapping = LOGICAL_RULES) -> Partitioning:
        return cls(mesh, tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in rules.items()))

    def spec(self, axes: tuple[Axis, ...], shape) -> PartitionSpec:
        return partition_spec(axes, tuple(shape), self.mesh, dict(self.rules))

    def sharding(self, axes: tuple[Axis, ...], shape) -> NamedSharding:
        return NamedSharding(self.mesh, self.spec(axes, shape))


_ACTIVE: list[Partitioning | None] = [None]


@contextlib.contextmanager
def active(partitioning: Partitioning | None):
    """While tracing a tower's forward: `constrain` applies `partitioning` (None: does nothing), and the attention
    kernels XLA cannot partition run under `shard_map` over its mesh (`attention.sharding`)."""
    _ACTIVE.append(partitioning)
    try:
        with attention_sharding.active(partitioning):
            yield
    finally:
        _ACTIVE.pop()


def constrain(x: jax.Array, axes: tuple[Axis, ...]) -> jax.Array:
    """`x` with the sharding its logical `axes` get under the active partitioning (a no-op without one): the
    compiler's choices for activations and the KV cache are ours (MaxText's `with_logical_constraint`)."""
    part = _ACTIVE[-1]
    if part is None:
        return x
    return jax.lax.with_sharding_constraint(x, part.sharding(axes, x.shape))


def gathered_weight(w: jax.Array, axes: tuple[Axis, ...]) -> jax.Array:
    """A weight as its layer uses it: whole over "fsdp" (ZeRO-3: gathered where used, and so the same dot as on
    one device; left to itself XLA may instead contract the split width and add partial sums, which rounds
    differently), still split over "model". Its gradient goes back to the weight's own sharding (a reduce-scatter
    over "fsdp"), so gradients and optimizer state stay split like the weights."""
    part = _ACTIVE[-1]
    if part is None or part.mesh.shape.get("fsdp", 1) == 1:
        return w
    rules = dict(part.rules)
    whole = {k: tuple(a for a in _mesh_axes(v) if a != "fsdp") or None for k, v in rules.items()}
    used = NamedSharding(part.mesh, partition_spec(axes, w.shape, part.mesh, whole))
    stored = NamedSharding(part.mesh, partition_spec(axes, w.shape, part.mesh, rules))
    return _gather(w, used, stored)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _gather(w, used, stored):
    return jax.lax.with_sharding_constraint(w, used)


def _gather_fwd(w, used, stored):
    return jax.lax.with_sharding_constraint(w, used), None


def _gather_bwd(used, stored, _, g):
    return (jax.lax.with_sharding_constraint(g, stored),)


_gather.defvjp(_gather_fwd, _gather_bwd)


# Logical axes of the activations and the cache, by shape-suffix letter (the package docstring's key).
KV_CACHE_AXES = ("batch", "slots", "kv_heads", "head_dim")  # keys / values [B, S, K, H]


def kv_cache_axes(ndim: int) -> tuple[str, ...]:
    """The logical axes of one layer's keys or values `[B, S, K, H]` (ndim 4) or a stacked `[L, B, S, K, H]`."""
    return KV_CACHE_AXES if ndim == 4 else ("layers", *KV_CACHE_AXES)


def kv_cache_spec(shape: tuple[int, ...], mesh, rules: Mapping = LOGICAL_RULES) -> PartitionSpec:
    """The PartitionSpec of one layer's keys or values `[B, S, K, H]` (or stacked `[L, B, S, K, H]`)."""
    return partition_spec(kv_cache_axes(len(shape)), shape, mesh, rules)
