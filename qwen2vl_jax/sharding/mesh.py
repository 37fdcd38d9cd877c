"""Sharding: one table from logical axis names to mesh axes, applied to parameters, activations and the KV cache.

The mesh has three axes (`make_mesh`): "data" (batch rows), "fsdp" (batch rows, and every weight's residual-width
axis: ZeRO-3 style, XLA gathers a weight where it is used) and "model" (Megatron tensor parallelism: attention
heads, MLP width and the vocabulary). Every parameter carries logical axis names per dimension (`parameters.param`),
activations and the KV cache name theirs where they are made (`constrain`), and `LOGICAL_RULES` maps both to mesh
axes: how the model is split is decided here and nowhere else (MaxText's logical axis rules; jax-llm-examples'
per-dimension names).

    mesh = make_mesh(data=2, model=4)                                     # 8 devices
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype="bfloat16", mesh=mesh)  # slices streamed in
    model.generate(**inputs)                                              # batch over "data", heads over "model"

Heads, not rows. A projection keeps PyTorch's flattened `[heads * head_dim, in]` layout (a copy of the checkpoint,
the fast layout on XLA:CPU), but its logical axis names both factors, `(("q_heads", N), ("head_dim", H))`, and the
rows are split only where the split falls between whole heads: the mesh axis must divide the head count. The
policy where it does not (`partition_spec`): **that dimension is replicated**. So

* KV heads fewer than (or not divisible by) the "model" axis are replicated on every device (the 2B's 2 and the
  7B's 4 KV heads on 8 devices; jax-llm-examples' choice), each device computing the k/v projections it reads;
* query heads that do not divide (the 7B's 28 on 8 devices) replicate the attention (q/k/v/o projections), while
  the MLP and the vocabulary, which divide, stay split; `qwen2vl-jax plan` prints the bytes this costs;
* the vision tower's fused `qkv` rows are `[3, heads, head_dim]`: a contiguous split of them would cut q from k, so
  `qkv` stays replicated and the attention after it is split by heads (a sharding constraint on q/k/v).

A dimension whose mesh axis has size 1 is left unnamed in the PartitionSpec (the same placement, easier to read).
On a multi-device *CPU* mesh, the native kernels (`qwen2vl_jax.kernels`) have no partitioning rule, so XLA gathers
their operands first (correct, not fast); use `attn_implementation="xla"` and QWEN2VL_JAX_CPU_KERNELS=0 there.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from ..modeling.parameters import model_params
from ..modeling.partitioning import (
    LOGICAL_RULES,
    MESH_AXES,
    Axis,
    Partitioning,
    partition_spec,
)


def make_mesh(data: int = 1, fsdp: int = 1, model: int = 1, devices=None) -> Mesh:
    """A `("data", "fsdp", "model")` mesh over the first `data * fsdp * model` devices (all processes' devices in
    a multi-host job, so a process holds consecutive positions of the last axes)."""
    for name, n in (("data", data), ("fsdp", fsdp), ("model", model)):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"mesh axis {name} must be a positive integer, got {n!r}")
    devices = jax.devices() if devices is None else list(devices)
    n = data * fsdp * model
    if n > len(devices):
        raise ValueError(f"a mesh of data={data} x fsdp={fsdp} x model={model} needs {n} devices; "
                         f"{len(devices)} are available")
    return Mesh(np.array(devices[:n]).reshape(data, fsdp, model), MESH_AXES)


def parse_mesh(text: str) -> dict[str, int]:
    """"data=1,fsdp=1,model=8" -> {"data": 1, "fsdp": 1, "model": 8} (axes left out are 1; each axis at most once,
    at least one)."""
    out = {"data": 1, "fsdp": 1, "model": 1}
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"bad mesh {text!r}: it is empty; use data=N,fsdp=N,model=N with positive integers")
    seen = set()
    for part in parts:
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in out or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"bad mesh {text!r}: use data=N,fsdp=N,model=N with positive integers")
        if name in seen:
            raise ValueError(f"bad mesh {text!r}: it names {name} twice")
        seen.add(name)
        out[name] = int(value)
    return out


# ------------------------------------------------------------------------------------------------ parameters
def param_axes(p) -> tuple[Axis, ...]:
    """A parameter's logical axes (`modeling.parameters.param` metadata)."""
    meta = p.get_metadata()
    return tuple(meta.get("logical_axes", meta.get("out_sharding")))


def param_shardings(model, mesh: Mesh, rules: Mapping = LOGICAL_RULES, *,
                    adapters: bool = False) -> dict[str, NamedSharding]:
    """`{parameter path: NamedSharding}` for every parameter (abstract `nnx.eval_shape` models too); with
    `adapters=True` the LoRA parameters as well."""
    return {path: NamedSharding(mesh, partition_spec(param_axes(p), tuple(p.shape), mesh, rules))
            for path, p in model_params(model, adapters=adapters).items()}


def placer(model, mesh: Mesh, rules: Mapping = LOGICAL_RULES) -> Callable[[str, np.ndarray], jax.Array]:
    """A `place(path, array)` for `params.load_into`: each whole tensor goes to its shards as it streams in."""
    shardings = param_shardings(model, mesh, rules)
    return lambda path, array: jax.device_put(array, shardings[path])


def shard_model(model, mesh: Mesh, rules: Mapping = LOGICAL_RULES):
    """Re-place every parameter of a loaded model (LoRA adapters included) with its sharding, and constrain its
    activations and KV cache by the same rules (in place; returns the model). Build the optimizer after this, so
    its state takes the same shardings."""
    shardings = param_shardings(model, mesh, rules, adapters=True)
    for path, p in model_params(model, adapters=True).items():
        p.set_value(jax.device_put(p[...], shardings[path]))
    set_partitioning(model, Partitioning.of(mesh, rules))
    return model


def set_partitioning(model, partitioning: Partitioning | None) -> None:
    """Make `model`'s towers constrain activations and the KV cache by `partitioning` (None: no constraints)."""
    # `Qwen2VL.forward` applies it to the decoder; the vision tower also runs on its own (`run_padded`, training)
    model.partitioning = model.visual.partitioning = partitioning


