"""The mesh of the forward being traced, for kernels XLA cannot partition.

XLA's partitioner splits XLA ops over a mesh by itself; a Mosaic kernel (the `pallas` backend on TPU) is opaque to
it, so on a mesh of more than one device it must run under `jax.shard_map`, one kernel call per device on that
device's rows and heads. The model makes its partitioning current while it traces a tower
(`modeling.partitioning.active`: anything with a `.mesh` and a `.spec(logical_axes, shape)`), and `shard_mapped`
reads it: the kernel's operands are split by the same logical axes as the activations around it ("batch" rows over
"data" / "fsdp", heads over "model" where they divide, else whole on every device).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import jax

_ACTIVE: list = [None]


@contextlib.contextmanager
def active(partitioning):
    """While tracing a tower's forward: kernels that need it run under `shard_map` over `partitioning.mesh`."""
    _ACTIVE.append(partitioning)
    try:
        yield
    finally:
        _ACTIVE.pop()


def shared_heads(name: str, *counts: int) -> str | None:
    """`name` (a heads logical axis) where every one of the head `counts` splits the same way on the current mesh
    (GQA: query and kv heads must split alike for each device's groups to line up), else None (whole heads)."""
    part = _ACTIVE[-1]
    if part is None:
        return name
    specs = {tuple(part.spec((name,), (n,))) for n in counts}
    return name if len(specs) == 1 else None


def shard_mapped(fn: Callable, args: Sequence[jax.Array], axes: Sequence[tuple], out_axes: tuple):
    """`fn(*args)`, one call per device under `jax.shard_map` when a mesh of several devices is current (each
    argument split by its logical `axes`, the result by `out_axes`, taken with the first argument's shape); a plain
    call otherwise."""
    part = _ACTIVE[-1]
    if part is None or part.mesh.size == 1:
        return fn(*args)
    in_specs = tuple(part.spec(a, x.shape) for a, x in zip(axes, args))
    out_spec = part.spec(out_axes, args[0].shape)
    return jax.shard_map(fn, mesh=part.mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)(*args)
