"""The `pallas` backend's paged attention: JAX's `ragged_paged_attention` (`jax.experimental.pallas.ops.tpu`, the
kernel vLLM's TPU backend runs), chosen by the platform a program is lowered for (`platforms.platform_dependent`),
not by the host that traces it:

* TPU: the kernel compiled by Mosaic (a `tpu_custom_call` in the program), reading the cache in place: `kv_PRCH`
  is already its `kv_pages` layout (keys at even heads, values at odd), and `PagedBatch` carries its `kv_lens`,
  `page_indices`, `cu_q_lens` and `num_seqs`. Scores, the online softmax and the value product accumulate in fp32
  with the scale H**-0.5; in bf16 the probabilities are not cast to bf16 before the value product (the reference
  casts them), a difference within bf16's rounding. Its dots carry no precision: fp32 ones run at Mosaic's default,
  whatever `jax_default_matmul_precision` says.
* CPU and GPUs: the `xla` formulation (`paged.paged_attention`). jax 0.10.2's Pallas interpreters cannot run this
  kernel: the HLO interpreter (`interpret=True`) fails on its masked stores into `ref.at[head]` (the discharge
  rule reads `.shape` of the integer index: "'TypedInt' object has no attribute 'shape'"), the TPU interpreter
  (`InterpretParams`) on its reshaped refs ("'ReshapeTransform' object has no attribute 'indices'"). The TPU
  branch's arguments are checked on the CPU against the kernel's own reference (`ref_ragged_paged_attention`,
  tests/attention/test_paged_attention.py); a strict expected failure there runs the kernel interpreted and turns
  into a failure the day that works.

The kernel's constraints (jax 0.10.2 `ragged_paged_attention/kernel.py`):

* head dim a multiple of 128: its running max / sum live in 128-lane rows tiled across the head dim (an assert
  in the kernel body, interpret mode included; JAX tests only 128). Other head dims are zero-padded on the TPU
  (q.k and the value product are unchanged by zero columns, which are sliced off; the scale stays the real head
  dim's). Padding the cache copies it on every call: allocate it with a padded head dim where that matters
  (Qwen2-VL's decoder head dim is 128, never padded).
* q and the cache float32 or bfloat16, the same dtype (the kernel takes fp8 / int caches only with scales, which
  this cache has not). A bf16 cache is stored as its `uint16` bits (`paged.storage_dtype`: in-place writes on the
  CPU) and handed to the kernel reinterpreted as bf16, a same-width `bitcast_convert` of the pool.
* query heads a multiple of kv heads, and the 2K combined kv heads tileable by XLA: 2K / p in (1, 2, 4, 8) or a
  multiple of 8, p = 1 for float32, 2 for bfloat16 (fp32: K in (1, 2, 4) or a multiple of 4; bf16: K in (1, 2, 4,
  8) or a multiple of 8). Anything else is a ValueError here, on every platform: `platform_dependent` traces the
  TPU branch wherever the program is traced. (JAX's own tests skip 12 query / 2 kv heads, the 2B's, noting it
  fails with libtpu builds after 2025-07-21: b/434082000.)
* every one of the first `num_seqs` sequences has kv_len >= its queries (`dynamic_validate_inputs`; a sequence
  with no keys among them makes the kernel's double-buffered prefetch hand the next sequence the wrong pages):
  padding sequences read at least one key (the null page) or come last, outside `num_seqs`. Keys a query may not
  see but that lie below kv_len (a padded prefill chunk's unwritten rows) are masked by adding -0.7 * fp32 max,
  not selected away, so they must be finite (the cache starts at zero and holds only written keys).
* no page-size constraint in the wrapper (JAX's tests use 16).

Lowering for TPU needs to know the TPU: jax 0.10.2's Mosaic lowering of the kernel's integer divisions asks
`tpu_info` for the chip (of the current abstract mesh's device, else the default device's) and raises
"Unsupported TPU device kind: cpu" on any other host. A program exported for TPU elsewhere is traced and lowered
under `for_tpu_lowering()`: JAX's `use_abstract_mesh` with an abstract TPU device (the generation changes nothing in
this kernel's lowering). On a mesh of several devices that is not enough yet: `sharding.shard_mapped` hands
`shard_map` the concrete mesh, which must then equal the context's abstract one ("The context mesh ... should match
the mesh passed to shard_map"); handing it `jax.sharding.get_abstract_mesh()` when that has the mesh's axes (under
`for_tpu_lowering(mesh)`) exports one kernel per device.

Block sizes: on a TPU host the kernel's tuned table; elsewhere (a program exported for TPU on a CPU host) its
TPU v4 defaults, 32 queries and 512 key rows a block. On a mesh of several devices the kernel runs under
`shard_map` (XLA cannot partition it): query heads and the combined kv heads split alike over the heads axis,
whole where they do not divide alike, the pool and the batch's tables whole on every device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import AbstractDevice, AbstractMesh

import qwen2vl_jax.attention.paged as paged  # by full name: `from . import` reads the package __init__

from .masks import PagedBatch
from .platforms import platform_dependent
from .sharding import shard_mapped, shared_heads

LANES = 128  # the kernel's head dim granularity (its 128-lane max / sum rows)
QUERY_BLOCK = 32  # queries a block off a TPU host (the kernel's untuned TPU v4 default)
KEY_ROWS_BLOCK = 512  # key rows a block off a TPU host (v4's 32 pages of 16)


def unavailable_reason() -> str:
    try:
        from jax.experimental.pallas import tpu as pltpu  # noqa: F401
        from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention  # noqa: F401
    except Exception as e:  # an install without Pallas' TPU ops
        return f"jax.experimental.pallas.ops.tpu.ragged_paged_attention does not import ({type(e).__name__}: {e})"
    return ""


def for_tpu_lowering(mesh=None, device_kind: str = "TPU v5 lite"):
    """A context to trace and lower a program for TPU in, on a host without one (`jax.export(...,
    platforms=("tpu", ...))`): an abstract mesh shaped like `mesh` (default: one device) whose device is a TPU
    (module docstring: a mesh of several devices also needs `shard_mapped` to use it)."""
    device = AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
    if mesh is None:
        return jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("tpu",), abstract_device=device))
    return jax.sharding.use_abstract_mesh(AbstractMesh(mesh.axis_sizes, mesh.axis_names, mesh.axis_types,
                                                       abstract_device=device))


def check_supported(q_TNH, kv_PRCH) -> None:
    """A ValueError naming the kernel's constraint a shape or dtype breaks (module docstring)."""
    N, C = q_TNH.shape[1], kv_PRCH.shape[2]
    dtypes = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
    if jnp.dtype(q_TNH.dtype) not in dtypes or _values_dtype(kv_PRCH, q_TNH) != q_TNH.dtype:
        raise ValueError(f"pallas paged attention: q and the cache must both be float32 or both bfloat16, got q "
                         f"{q_TNH.dtype}, cache {kv_PRCH.dtype}")
    if C < 2 or C % 2 or N % (C // 2):
        raise ValueError(f"pallas paged attention: {N} query heads must be a multiple of the {C // 2} kv heads "
                         f"(the cache's {C} interleaved key / value heads)")
    packing = 4 // jnp.dtype(_values_dtype(kv_PRCH, q_TNH)).itemsize
    tiles = C // packing
    if C % packing or not (tiles in (1, 2, 4, 8) or tiles % 8 == 0):
        raise ValueError(f"pallas paged attention: ragged_paged_attention needs the 2K = {C} interleaved kv heads "
                         f"tileable by XLA in {kv_PRCH.dtype} (2K / {packing} in 1, 2, 4, 8 or a multiple of 8)")


def _values_dtype(kv_PRCH, q_TNH):
    """The dtype of the cache's values: a 16-bit cache is stored as `uint16` bits (`paged.storage_dtype`)."""
    if kv_PRCH.dtype == jnp.uint16 and jnp.dtype(q_TNH.dtype).itemsize == 2:
        return jnp.dtype(q_TNH.dtype)
    return jnp.dtype(kv_PRCH.dtype)


def block_sizes(q_TNH, kv_PRCH, batch: PagedBatch) -> dict:
    """The kernel's tuned table on a TPU host (None: it looks its own up), fixed sizes elsewhere (its table
    queries the host's TPU version and raises without one)."""
    if jax.default_backend() == "tpu":
        return dict(num_kv_pages_per_block=None, num_queries_per_block=None)
    pages = batch.page_indices_SP.shape[1]
    return dict(num_kv_pages_per_block=max(1, min(pages, KEY_ROWS_BLOCK // kv_PRCH.shape[1])),
                num_queries_per_block=min(q_TNH.shape[0], QUERY_BLOCK))


def kernel_arguments(q_TNH, kv_PRCH, batch: PagedBatch, lanes: int = LANES):
    """`(positional arguments, sm_scale)` of `ragged_paged_attention` (and of its `ref_ragged_paged_attention`):
    head dims zero-padded to a multiple of `lanes`, the scale the real head dim's."""
    H = q_TNH.shape[-1]
    pad_H = lambda x: jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, -H % lanes),)) if H % lanes else x
    i32 = lambda x: jnp.asarray(x).astype(jnp.int32)
    args = (pad_H(q_TNH), pad_H(paged.as_values(kv_PRCH, q_TNH.dtype)), i32(batch.kv_lens_S),
            i32(batch.page_indices_SP),
            i32(batch.cu_q_lens_S1), i32(batch.num_seqs))
    return args, H ** -0.5


def _kernel(q_TNH, kv_PRCH, kv_lens_S, page_indices_SP, cu_q_lens_S1, num_seqs, *, sm_scale: float, blocks: dict):
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

    return ragged_paged_attention(q_TNH, kv_PRCH, kv_lens_S, page_indices_SP, cu_q_lens_S1, num_seqs,
                                  sm_scale=sm_scale, **blocks)


def tpu_paged_attention(q_TNH, kv_PRCH, batch: PagedBatch):
    """The TPU branch alone: the Mosaic kernel, under `shard_map` on a mesh (heads split like the `q_heads`
    logical axis where query and kv heads split alike)."""
    check_supported(q_TNH, kv_PRCH)
    N, H = q_TNH.shape[1:]
    args, sm_scale = kernel_arguments(q_TNH, kv_PRCH, batch)
    blocks = block_sizes(q_TNH, kv_PRCH, batch)
    heads = shared_heads("q_heads", N, kv_PRCH.shape[2] // 2, kv_PRCH.shape[2])
    axes = ((None, heads, None), (None, None, heads, None), (None,), (None, None), (None,), (None,))
    kernel = lambda *a: _kernel(*a, sm_scale=sm_scale, blocks=blocks)
    o_TNH = shard_mapped(kernel, args, axes, (None, heads, None))
    return o_TNH[:, :, :H].astype(q_TNH.dtype)


def pallas_paged_attention(q_TNH, kv_PRCH, batch: PagedBatch):
    """`o [T, N, H]` (q's dtype): Mosaic on TPU, the `xla` formulation elsewhere (chosen when lowered)."""
    return platform_dependent(q_TNH, kv_PRCH, batch, tpu=tpu_paged_attention, default=paged.paged_attention)
