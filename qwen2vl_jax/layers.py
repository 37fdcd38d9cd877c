"""Building blocks shared by both towers: Linear, Embed, LayerNorm, RMSNorm, and the one dot recipe they use.

Why a shared file: the vision tower and the decoder use the same Linear, and how a dot is issued decides speed on
XLA:CPU (see docs/BENCHMARKS.md), so that recipe lives in one place:

* weights are stored like PyTorch's nn.Linear, `[out, in]`, and contracted on their minor axis (`x @ w.T`): the
  fastest matrix-vector layout on XLA:CPU, and HF conversion is a plain copy;
* bf16 weights are fed to the dot as bf16 with `preferred_element_type=float32`: a bf16-result dot makes XLA:CPU
  materialise an fp32 copy of the weight on every call;
* decode-sized dots with bf16 weights go to a native kernel on x86 CPUs (`kernels.matmul`); on the CPU elsewhere a
  single bf16 row is padded to two rows so the fast library (YNNPACK, which refuses vectors) takes the gemv.

Every parameter carries logical axis names (`out_sharding=(...)`, flax's metadata for `nnx.get_partition_spec`);
`sharding.LOGICAL_RULES` maps them to a device mesh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from . import kernels
from .config import REMAT_POLICIES
from .partitioning import gathered_weight


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


def remat_policy(name: str):
    """The `jax.checkpoint` policy named by one of `config.REMAT_POLICIES`."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; use one of {REMAT_POLICIES}")
    return getattr(jax.checkpoint_policies, name)


def dense(x: jax.Array, w_OI: jax.Array, b_O: jax.Array | None = None) -> jax.Array:
    """`x[..., I] @ w[O, I]^T + b[O]`, accumulated in fp32, returned in x's dtype (`kernels.matmul` issues the
    dot: XLA's, or the native bf16 gemv for decode-sized products on the CPU)."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    y_AO = kernels.matmul(x.reshape(-1, n_in), w_OI)
    if b_O is not None:
        y_AO = y_AO + b_O.astype(jnp.float32)
    return y_AO.astype(x.dtype).reshape(*lead, w_OI.shape[0])


MLP_ROW_BLOCK = 2048  # long inputs run the MLPs in row blocks: their [rows, F] products are the largest tensors


def in_row_blocks(fn, x: jax.Array, block: int | None = None) -> jax.Array:
    """`fn(x)` for a row-wise `fn` (every leading axis of `x` is a row), computed in near-equal blocks of at most
    `block` rows (default MLP_ROW_BLOCK), one after the other (`lax.map`), when there are more than 2 x block rows:
    then only one block's intermediates exist at a time (a 16k-token prefill's fp32 `[rows, F]` MLP products are
    2 x 0.59 GB on the 2B). Each row's numbers are the whole call's."""
    block = MLP_ROW_BLOCK if block is None else block
    *lead, D = x.shape
    rows = math.prod(lead)
    if rows <= 2 * block:
        return fn(x)
    n = -(-rows // block)
    size = (-(-rows // n) + 7) // 8 * 8  # n near-equal blocks, 8-row aligned: padding under n x 8 rows
    x_NCD = jnp.pad(x.reshape(rows, D), ((0, n * size - rows), (0, 0))).reshape(n, size, D)
    y_NCO = jax.lax.map(fn, x_NCD)
    return y_NCO.reshape(n * size, -1)[:rows].reshape(*lead, y_NCO.shape[-1])


class Linear(nnx.Module):
    """nn.Linear with the PyTorch weight layout `[out, in]` (so the HF key map is a copy, not a transpose)."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, axes: tuple[str, str],
                 param_dtype=jnp.float32, rngs: nnx.Rngs, init_std: float = 0.02):
        self.in_features, self.out_features = in_features, out_features
        self.weight = param(init_std * jax.random.normal(rngs.params(), (out_features, in_features), param_dtype),
                            axes)
        self.bias = param(jnp.zeros((out_features,), param_dtype), (axes[0],)) if use_bias else None
        self.axes = axes
        self.lora = nnx.data(None)  # a low-rank adapter, set by `qwen2vl_jax.lora.apply_lora` (None: plain nn.Linear)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = dense(x, gathered_weight(self.weight[...], self.axes), None if self.bias is None else self.bias[...])
        if self.lora is not None:
            # peft `lora.Linear.forward`: base result + B(A(dropout(x))) * scaling computed in the adapter's dtype,
            # the sum cast back to the base result's dtype.
            y = (y.astype(jnp.float32) + self.lora(x).astype(jnp.float32)).astype(y.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding `[V, D]`; `attend` reuses it as a tied output projection (2B)."""

    def __init__(self, num_embeddings: int, features: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 init_std: float = 0.02):
        self.weight = param(init_std * jax.random.normal(rngs.params(), (num_embeddings, features), param_dtype),
                            ("vocab", "embed"))

    def __call__(self, ids_BT: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids_BT, axis=0)

    def attend(self, x_BTD: jax.Array) -> jax.Array:
        return dense(x_BTD, gathered_weight(self.weight[...], ("vocab", "embed")))


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm (biased variance, eps inside the sqrt), computed in fp32 and cast back."""

    def __init__(self, features: int, *, eps: float, axis_name: str, param_dtype=jnp.float32):
        self.eps, self.axis_name = eps, axis_name
        self.weight = param(jnp.ones((features,), param_dtype), (axis_name,))
        self.bias = param(jnp.zeros((features,), param_dtype), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        w, b = (gathered_weight(p[...], (self.axis_name,)) for p in (self.weight, self.bias))
        y = y * w.astype(jnp.float32) + b.astype(jnp.float32)
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """Qwen2RMSNorm: normalise in fp32, cast back to the input dtype, *then* multiply by the weight (transformers
    `Qwen2RMSNorm.forward`)."""

    def __init__(self, features: int, *, eps: float, axis_name: str = "embed", param_dtype=jnp.float32):
        self.eps, self.axis_name = eps, axis_name
        self.weight = param(jnp.ones((features,), param_dtype), (axis_name,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return gathered_weight(self.weight[...], (self.axis_name,)) * x32.astype(x.dtype)


def apply_rotary(x_XNH: jax.Array, cos_XH: jax.Array, sin_XH: jax.Array) -> jax.Array:
    """`x * cos + rotate_half(x) * sin` in fp32, cast back; cos/sin broadcast over the heads axis. The decoder's
    M-RoPE (`[B, T, N, H]` with `[B, T, H]`) and the vision rotary (`[P, N, H]` with `[P, H]`) alike (transformers
    `apply_multimodal_rotary_pos_emb` / `apply_rotary_pos_emb_vision`)."""
    x32 = x_XNH.astype(jnp.float32)
    out = x32 * cos_XH[..., None, :] + rotate_half(x32) * sin_XH[..., None, :]
    return out.astype(x_XNH.dtype)


def rotate_half(x: jax.Array) -> jax.Array:
    """cat(-x2, x1) over the last axis: the non-interleaved rotary layout of the reference (pairs j, j + H/2)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def rope_inv_freq(dim: int, theta: float):
    """1 / theta^(2i/dim), i < dim/2, in fp32 as the reference computes it (host NumPy, a constant under jit)."""
    import numpy as np

    exponent = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
