"""Per-device memory plan for a mesh (`qwen2vl-jax plan`): parameters, the KV cache and the largest activation,
in bytes, computed from the real shapes and `sharding`'s rules. No devices are needed: the model is abstract
(`nnx.eval_shape`) and the mesh is only its axis sizes (`partition_spec` reads nothing else).

    p = plan(qwen2_vl_72b(), {"data": 1, "fsdp": 1, "model": 8}, batch=8, context=32768, dtype="bfloat16")
    p.params.per_device, p.kv_cache.per_device, p.largest.name, p.total_per_device

* parameters: every parameter's shard shape (`partition_spec` of its logical axes) times its itemsize; what a
  `from_pretrained(..., mesh=mesh)` model holds on each device, byte for byte (tests/sharding/test_plan.py).
* KV cache: per layer keys and values `[B, S, K, H]` in the model dtype with `S = context` slots, placed by
  `partitioning.kv_cache_spec` (stacked `[L, B, S, K, H]` with `scan_layers`: the same bytes).
* activations (`ACTIVATIONS`): the main tensors of a prefill of `batch x context` tokens with the `xla` attention
  backend. The plan names the **largest single tensor** per device, not the peak: XLA keeps several alive at
  once, and the single-device peak is `qwen2vl_jax.generation.memory`'s estimate. The total is therefore a lower bound.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from ..attention import xla as attention_xla
from ..modeling import partitioning
from ..modeling.config import PRESETS, Qwen2VLConfig
from ..modeling.layers import in_row_blocks
from ..modeling.parameters import model_params, stacked_prefix
from ..modeling.text import Q_AXES, RESIDUAL_AXES
from .mesh import param_axes

DTYPES = ("bfloat16", "float32")
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class MeshShape:
    """A mesh as its axis sizes: all `partition_spec` / `shard_shape` read (`.shape`), so no devices are needed."""

    shape: Mapping[str, int]

    @property
    def size(self) -> int:
        return math.prod(self.shape.values())


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One planned tensor: its global shape, logical axes, dtype, PartitionSpec and bytes on one device."""

    name: str
    shape: tuple[int, ...]
    axes: tuple
    dtype: str
    spec: tuple
    per_device: int

    def as_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "spec": [list(s) if isinstance(s, tuple) else s for s in self.spec],
                "bytes_per_device": self.per_device}


def place(name: str, axes: tuple, shape: tuple[int, ...], dtype, mesh: MeshShape,
          rules: Mapping = partitioning.LOGICAL_RULES) -> Tensor:
    """`Tensor` for an array of `shape` with logical `axes`, by the same rule lookup the model uses."""
    spec = partitioning.partition_spec(axes, shape, mesh, rules)
    per_device = math.prod(partitioning.shard_shape(shape, spec, mesh)) * jnp.dtype(dtype).itemsize
    return Tensor(name, shape, axes, jnp.dtype(dtype).name, tuple(spec), per_device)


# ------------------------------------------------------------------------------------------------ parameters
@dataclasses.dataclass(frozen=True)
class ParamPlan:
    count: int  # parameters (elements)
    total: int  # bytes of the whole model
    per_device: int  # bytes one device holds
    replicated: int  # of those, bytes of parameters no mesh axis splits (every device holds them whole)
    stacked: bool  # the layers are stacked `[L, ...]` (scan_layers)


def param_plan(model, mesh: MeshShape, rules: Mapping = partitioning.LOGICAL_RULES) -> ParamPlan:
    count = total = per_device = replicated = 0
    stacked = False
    for path, p in model_params(model).items():
        t = place(path, param_axes(p), tuple(p.shape), p.dtype, mesh, rules)
        count += math.prod(t.shape)
        total += math.prod(t.shape) * jnp.dtype(p.dtype).itemsize
        per_device += t.per_device
        replicated += t.per_device if all(s is None for s in t.spec) else 0
        stacked = stacked or stacked_prefix(path) is not None
    return ParamPlan(count, total, per_device, replicated, stacked)


def abstract(config: Qwen2VLConfig, dtype: str, scan_layers: bool = False, quantization: str | None = None):
    """The model with shapes and dtypes only (nothing allocated); `quantization`: its text decoder's projections
    quantized ("int8" / "int4", `qwen2vl_jax.quantization`)."""
    from flax import nnx

    from ..modeling.model import Qwen2VL
    from ..modeling.parameters import abstract_model
    from ..quantization import quantize

    model = abstract_model(Qwen2VL, config.replace(scan_layers=scan_layers), jnp.dtype(dtype))
    return model if quantization is None else nnx.eval_shape(lambda m: quantize(m, quantization), model)


# ------------------------------------------------------------------------------------------------ KV cache
def kv_plan(config: Qwen2VLConfig, mesh: MeshShape, batch: int, context: int, dtype: str, *,
            stacked: bool = False, rules: Mapping = partitioning.LOGICAL_RULES) -> Tensor:
    """Keys + values of every layer, `context` slots per row (what `KVCache.init` makes under the mesh)."""
    t = config.text_config
    L, shape = t.num_hidden_layers, (batch, context, t.num_key_value_heads, t.head_dim)
    full = (L, *shape) if stacked else shape
    one = place("kv_cache", partitioning.KV_CACHE_AXES if not stacked else ("layers", *partitioning.KV_CACHE_AXES),
                full, dtype, mesh, rules)
    copies = 2 if stacked else 2 * L  # keys and values (per layer unless stacked)
    return dataclasses.replace(one, per_device=copies * one.per_device)


# ------------------------------------------------------------------------------------------------ activations
@dataclasses.dataclass(frozen=True)
class Dims:
    """The sizes a prefill of `B x T` tokens into a `S = T`-slot cache works on."""

    B: int
    T: int
    S: int
    D: int
    N: int
    H: int
    F: int
    V: int

    @property
    def mlp_rows(self) -> int:
        """Rows of one MLP product: all B*T, or one of `layers.in_row_blocks`' blocks (traced abstractly, so the
        real blocking rule decides)."""
        seen = []
        jax.eval_shape(lambda x: in_row_blocks(lambda a: seen.append(a.shape) or a, x),
                       jax.ShapeDtypeStruct((self.B * self.T, 1), jnp.int8))
        return math.prod(seen[0][:-1])

    @property
    def scores_TS(self) -> tuple[int, int]:
        """Query rows x key slots of the fp32 scores the `xla` decoder attention holds at once: the whole
        `[B, N, T, S]` below `CHUNK_ABOVE_BYTES`, else one query block x one key block (`chunked_attention`)."""
        if self.B * self.N * self.T * self.S * 4 > attention_xla.CHUNK_ABOVE_BYTES:
            return min(attention_xla.QUERY_BLOCK, self.T), min(attention_xla.KEY_BLOCK, self.S)
        return self.T, self.S


def _mlp(d: Dims) -> tuple[tuple[int, ...], tuple]:
    rows = d.mlp_rows
    if rows == d.B * d.T:
        return (d.B, d.T, d.F), ("batch", "seq", "mlp")
    # a row block mixes batch rows (B*T flattened): no batch split is planned for it, only the MLP width's
    return (rows, d.F), ("seq", "mlp")


# name, (shape, logical axes) from the dims, dtype ("model": the model's): residual [B, T, D], queries
# [B, T, N, H], the MLP product [B, T, F] or one row block [A, F], one chunk of scores [B, N, W, U], logits [B, 1, V]
ACTIVATIONS: tuple[tuple[str, Callable[[Dims], tuple[tuple[int, ...], tuple]], str], ...] = (
    ("residual stream", lambda d: ((d.B, d.T, d.D), RESIDUAL_AXES), "model"),
    ("queries", lambda d: ((d.B, d.T, d.N, d.H), Q_AXES), "model"),
    ("mlp product", _mlp, "model"),
    ("attention scores", lambda d: ((d.B, d.N, *d.scores_TS), ("batch", "q_heads", "seq", "slots")),
     "float32"),
    ("last-position logits", lambda d: ((d.B, 1, d.V), ("batch", "seq", "vocab")), "float32"),
)


def activation_plan(config: Qwen2VLConfig, mesh: MeshShape, batch: int, context: int, dtype: str,
                    rules: Mapping = partitioning.LOGICAL_RULES) -> list[Tensor]:
    t = config.text_config
    d = Dims(batch, context, context, t.hidden_size, t.num_attention_heads, t.head_dim, t.intermediate_size,
             t.vocab_size)
    out = []
    for name, shape_axes, kind in ACTIVATIONS:
        shape, axes = shape_axes(d)
        out.append(place(name, axes, shape, dtype if kind == "model" else kind, mesh, rules))
    return out


# ------------------------------------------------------------------------------------------------ the plan
@dataclasses.dataclass(frozen=True)
class Plan:
    model: str
    dtype: str
    mesh: dict[str, int]
    batch: int
    context: int
    params: ParamPlan
    kv_cache: Tensor
    activations: list[Tensor]

    @property
    def largest(self) -> Tensor:
        return max(self.activations, key=lambda a: a.per_device)

    @property
    def total_per_device(self) -> int:
        return self.params.per_device + self.kv_cache.per_device + self.largest.per_device

    def as_dict(self) -> dict:
        p = self.params
        return {
            "model": self.model, "dtype": self.dtype, "mesh": self.mesh, "devices": math.prod(self.mesh.values()),
            "batch": self.batch, "context": self.context, "scan_layers": p.stacked,
            "parameters": {"count": p.count, "bytes_total": p.total, "bytes_per_device": p.per_device,
                           "bytes_replicated_per_device": p.replicated},
            "kv_cache": self.kv_cache.as_dict(),
            "largest_activation": self.largest.as_dict(),
            "activations": [a.as_dict() for a in self.activations],
            "total_bytes_per_device": self.total_per_device,
        }

    def text(self) -> str:
        p, kv, big = self.params, self.kv_cache, self.largest
        mesh = " ".join(f"{k}={v}" for k, v in self.mesh.items())
        return "\n".join([
            f"plan         {self.model} {self.dtype}, mesh {mesh} ({math.prod(self.mesh.values())} devices), "
            f"batch {self.batch} x context {self.context}" + (" (stacked layers)" if p.stacked else ""),
            f"parameters   {_gib(p.per_device)} per device ({p.per_device:,} B; whole model {_gib(p.total)}; "
            f"{_gib(p.replicated)} of it replicated)",
            f"kv cache     {_gib(kv.per_device)} per device ({kv.per_device:,} B; keys + values {list(kv.shape)} "
            f"per {'model' if len(kv.shape) == 5 else 'layer'}, spec {_spec(kv.spec)})",
            f"activation   {_gib(big.per_device)} per device ({big.per_device:,} B; {big.name} = {list(big.shape)} "
            f"{big.dtype}, spec {_spec(big.spec)}; the largest single tensor, not the peak)",
            f"total        {_gib(self.total_per_device)} per device ({self.total_per_device:,} B)",
        ])


def plan(config: Qwen2VLConfig, mesh: Mapping[str, int], *, batch: int, context: int, dtype: str = "bfloat16",
         scan_layers: bool = False, name: str = "model", model=None,
         rules: Mapping = partitioning.LOGICAL_RULES, quantization: str | None = None) -> Plan:
    """The per-device plan of `config` on a mesh of these axis sizes (`parse_mesh`'s dict). `model`: an
    abstract model already built for this config and dtype (the table reuses one per preset). `quantization`:
    "int8" / "int4" weights for the text decoder's projections (their integers and scales are counted).

    `context` is at most the model's `max_position_embeddings` (generation refuses more), and every activation
    must be an array JAX can describe (at most 2**63 - 1 elements: `batch x context` rows of the widest one)."""
    t = config.text_config
    for name, value in (("batch", batch), ("context", context)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    batch, context = int(batch), int(context)  # Python ints: the byte counts below never overflow
    if context > t.max_position_embeddings:
        raise ValueError(f"context {context} is beyond the model's max_position_embeddings "
                         f"({t.max_position_embeddings})")
    width = max(t.hidden_size, t.intermediate_size, t.num_attention_heads * t.head_dim)  # [B, T, width]
    if batch * context * width > 2**63 - 1 or batch * t.vocab_size > 2**63 - 1:
        raise ValueError(f"batch {batch} x context {context} is too large to plan: its activations would hold more "
                         f"than 2**63 - 1 elements (at this context, batch {(2**63 - 1) // (context * width):,} at "
                         "most)")
    shape = MeshShape(dict(mesh))
    model = abstract(config, dtype, scan_layers, quantization) if model is None else model
    params = param_plan(model, shape, rules)
    return Plan(name, jnp.dtype(dtype).name, dict(mesh), batch, context, params,
                kv_plan(config, shape, batch, context, dtype, stacked=params.stacked, rules=rules),
                activation_plan(config, shape, batch, context, dtype, rules))


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def _spec(spec: tuple) -> str:
    return "(" + ", ".join("None" if s is None else "+".join(s) if isinstance(s, tuple) else s for s in spec) + ")"


# ------------------------------------------------------------------------------------------------ docs tables
# Common slices: (name, devices, memory per device in GiB, nominal).
SLICES = (("TPU v5e-8", 8, 16), ("TPU v5p-8", 4, 95), ("TPU v6e-8", 8, 32), ("8x H100", 8, 80), ("8x H200", 8, 141))
TABLE_BATCH, TABLE_CONTEXT, TABLE_DTYPE = 8, 32768, "bfloat16"


def slice_mesh(config: Qwen2VLConfig, devices: int) -> dict[str, int]:
    """The table's mesh: the largest "model" axis (8, 4, 2, 1) that divides the devices and both head counts (so
    no attention weight is replicated), the rest "data"."""
    t = config.text_config
    model = next(m for m in (8, 4, 2, 1) if devices % m == 0 and t.num_attention_heads % m == 0
                 and t.num_key_value_heads % m == 0)
    return {"data": devices // model, "fsdp": 1, "model": model}


def fits(used: float) -> str:
    """The table's verdict on a fraction of device memory: the total is a lower bound (the largest activation, not
    the peak), so above 80% it is only "tight"."""
    return "yes" if used <= 0.8 else "tight" if used <= 1 else "no"


def plan_table() -> str:
    """The markdown table of docs/SCALING.md: every preset of both families (bf16, batch 8 x context 32768) on
    common slices."""
    rows = ["| model | slice | memory / device | mesh | parameters | KV cache | largest activation | total | fits |",
            "|---|---|---|---|---|---|---|---|---|"]
    for key in PRESETS:
        config = PRESETS[key]()
        model = abstract(config, TABLE_DTYPE)
        for slice_name, devices, hbm in SLICES:
            mesh = slice_mesh(config, devices)
            p = plan(config, mesh, batch=TABLE_BATCH, context=TABLE_CONTEXT, dtype=TABLE_DTYPE, name=key,
                     model=model)
            used = p.total_per_device / (hbm * GiB)
            rows.append(f"| {key.upper()} | {slice_name} | {hbm} GiB | "
                        + ",".join(f"{k}={v}" for k, v in mesh.items())
                        + f" | {_gib(p.params.per_device)} | {_gib(p.kv_cache.per_device)} | "
                        f"{_gib(p.largest.per_device)} ({p.largest.name}) | "
                        f"{_gib(p.total_per_device)} | {fits(used)} ({used:.0%}) |")
    return "\n".join(rows)


def rules_table(rules: Mapping = partitioning.LOGICAL_RULES) -> str:
    """`LOGICAL_RULES` as a markdown table (docs/SCALING.md)."""
    rows = ["| logical axis | mesh axes |", "|---|---|"]
    for name, rule in rules.items():
        axes = () if rule is None else (rule,) if isinstance(rule, str) else tuple(rule)
        rows.append(f"| `{name}` | {', '.join(f'`{a}`' for a in axes) if axes else 'replicated'} |")
    return "\n".join(rows)
