"""Sharding: one table from logical axis names to mesh axes, and the two ways to apply it.

Every parameter carries logical axis names (`layers.param`, e.g. `("mlp", "embed")` for `down_proj`), so how the
model is split over devices is decided here, by `LOGICAL_RULES`, and nowhere else (the jax-llm-examples pattern).
The default is Megatron-style tensor parallelism over a mesh axis "model": attention heads, MLP width and the
vocabulary are split, the residual width is replicated; a mesh axis "data" is left for the batch. XLA's SPMD
partitioner derives the activations' shardings and the collectives from the parameters' under `jit`.

    mesh = make_mesh(model=4)                                             # 4 devices, tensor parallel
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype="bfloat16", mesh=mesh)  # streamed in place
    model = shard_model(model, mesh)                                      # or: re-place a loaded model

The rules split a projection's flattened `[heads * head_dim]` rows, not whole heads: the 2B's k_proj (2 KV heads
x 128 = 256 rows) over 4 devices puts 64 rows, half a head, on each, and XLA's partitioner adds the collectives the
attention then needs (correct, not head-aware). A dimension that a mesh axis does not divide (the 7B's 4 x 128 KV
rows over 3 devices, say) stays replicated rather than failing. On a multi-device *CPU* mesh, the native kernels
(`qwen2vl_jax.kernels`: bf16 decode gemv, vision and decode attention) have no partitioning rule, so XLA gathers
their operands first (correct, not fast); use `attn_implementation="xla"` and QWEN2VL_JAX_CPU_KERNELS=0 there.
GPU and TPU hosts never build them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .layers import model_params

# logical axis (see the Linear/Embed/Norm definitions) -> mesh axis name, or None for replicated.
LOGICAL_RULES: dict[str, str | None] = {
    # decoder
    "vocab": "model",  # embed_tokens / lm_head rows
    "embed": None,  # residual width: replicated, so norms and the residual add need no communication
    "q_heads": "model",
    "kv_heads": "model",
    "mlp": "model",
    # vision tower
    "vis_patch": None,
    "vis_embed": None,
    "vis_qkv": "model",
    "vis_heads": "model",
    "vis_mlp": "model",
    "vis_merge_in": None,
    "vis_merge": "model",
}


# Fully sharded data parallel (ZeRO-3 style) on top of the tensor-parallel table: the residual-width axis of every
# weight is split over the mesh axis "fsdp" as well (XLA gathers each weight where it is used, and reduce-scatters
# its gradient); the batch is split over "data" and "fsdp" (`training.shard_batch`).
FSDP_RULES: dict[str, str | None] = {**LOGICAL_RULES, "embed": "fsdp", "vis_embed": "fsdp", "vis_merge_in": "fsdp"}


def make_mesh(model: int = 1, data: int = 1, devices=None, *, fsdp: int = 1) -> Mesh:
    """A `("data", "model")` mesh over the first `data * model` devices, or `("data", "fsdp", "model")` when
    `fsdp > 1` (use `FSDP_RULES` with it)."""
    devices = jax.devices() if devices is None else list(devices)
    n = data * fsdp * model
    if n > len(devices):
        raise ValueError(f"a mesh of data={data} x fsdp={fsdp} x model={model} needs {n} devices; "
                         f"{len(devices)} are available")
    if fsdp > 1:
        return Mesh(np.array(devices[:n]).reshape(data, fsdp, model), ("data", "fsdp", "model"))
    return Mesh(np.array(devices[:n]).reshape(data, model), ("data", "model"))


def partition_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh,
                   rules: Mapping[str, str | None] = LOGICAL_RULES) -> PartitionSpec:
    """The PartitionSpec for a parameter with logical `axes`; dims a mesh axis does not divide stay replicated."""
    spec = []
    for name, size in zip(axes, shape, strict=True):
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no entry in the sharding rules")
        mesh_axis = None if name is None else rules[name]
        if mesh_axis is not None and mesh_axis not in mesh.shape:
            raise ValueError(f"sharding rule {name!r} -> {mesh_axis!r}: the mesh has axes {tuple(mesh.shape)}")
        if mesh_axis is not None and (size % mesh.shape[mesh_axis] or mesh_axis in spec):
            mesh_axis = None
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def param_shardings(model: nnx.Module, mesh: Mesh, rules: Mapping[str, str | None] = LOGICAL_RULES, *,
                    adapters: bool = False) -> dict[str, NamedSharding]:
    """`{parameter path: NamedSharding}` for every parameter (abstract `nnx.eval_shape` models too); with
    `adapters=True` the LoRA parameters as well."""
    return {path: NamedSharding(mesh, partition_spec(p.get_metadata()["out_sharding"], tuple(p.shape), mesh, rules))
            for path, p in model_params(model, adapters=adapters).items()}


def placer(model: nnx.Module, mesh: Mesh, rules: Mapping[str, str | None] = LOGICAL_RULES
           ) -> Callable[[str, np.ndarray], jax.Array]:
    """A `place(path, array)` for `params.load_into`: each tensor goes straight to its shards as it streams in."""
    shardings = param_shardings(model, mesh, rules)
    return lambda path, array: jax.device_put(array, shardings[path])


def shard_model(model: nnx.Module, mesh: Mesh, rules: Mapping[str, str | None] = LOGICAL_RULES) -> nnx.Module:
    """Re-place every parameter of a loaded model (LoRA adapters included) with its sharding (in place; returns
    the model). Build the optimizer after this, so its state takes the same shardings."""
    shardings = param_shardings(model, mesh, rules, adapters=True)
    for path, p in model_params(model, adapters=True).items():
        p.set_value(jax.device_put(p[...], shardings[path]))
    return model
