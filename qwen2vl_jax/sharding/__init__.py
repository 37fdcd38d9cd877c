"""Sharding: the device mesh, where every parameter, activation and KV cache slot goes on it (`mesh.py`), and the
per-device memory plan of a mesh (`plan.py`, `qwen2vl-jax plan`). The logical axis rules themselves live with the
model math (`modeling.partitioning`), which constrains its activations by them."""

from ..modeling.partitioning import (
    KV_CACHE_AXES,
    LOGICAL_RULES,
    MESH_AXES,
    Partitioning,
    constrain,
    kv_cache_spec,
    partition_spec,
    shard_shape,
)
from .mesh import make_mesh, param_axes, param_shardings, parse_mesh, placer, set_partitioning, shard_model

__all__ = ["KV_CACHE_AXES", "LOGICAL_RULES", "MESH_AXES", "Partitioning", "constrain", "kv_cache_spec",
           "make_mesh", "param_axes", "param_shardings", "parse_mesh", "partition_spec", "placer",
           "set_partitioning", "shard_model", "shard_shape"]
