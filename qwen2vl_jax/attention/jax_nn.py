"""The `jax` backend: `jax.nn.dot_product_attention`, its implementation chosen by the platform a program is
lowered for (`jax.lax.platform_dependent`), not by the host that traces it:

* CUDA, bf16 / fp16 activations: cuDNN's fused kernel (`implementation="cudnn"`, a `__cudnn$fmha...` custom call),
  or XLA's formulation for what cuDNN refuses while tracing (the refusals are recorded: `cudnn_fallbacks`);
* every other platform and dtype: XLA's formulation (jax 0.10's `implementation=None` always is).

GQA is native (K kv heads shared by groups of G query heads).

Lowering for CUDA on a host without cuDNN (this CPU machine, `qwen2vl-jax export --platform cuda`): jax asks the
installed cuDNN for its version while tracing, and finds none. Inside `assume_cudnn(version)` that question is
answered with `version` (jax uses it only to refuse features newer cuDNNs add: multi-latent attention, compute
capability 10.3), and jax's other checks see no GPU, so they apply the pre-Hopper limits (head dim <= 128, a
multiple of 8). What cuDNN itself accepts is decided when XLA compiles the program on the GPU.

Numbers: fp32 scores and softmax as the reference, but jax's recipe for the value product (accumulated in the
activation dtype, bf16 dots with the BF16_BF16_F32 preset), so bf16 results differ from the `xla` backend's by bf16
rounding; fp32 results agree to fp32 rounding (tested against transformers).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp

from .masks import DecoderMask, VisionRotary, VisionSegments
from .platforms import platform_dependent
from .sharding import shard_mapped, shared_heads
from .xla import rotate_qk

ASSUMED_CUDNN_VERSION = 90800  # cuDNN 9.8, the oldest the jax[cuda12] wheels of jax 0.10 install
_ASSUMED: list[int] = []
_FALLBACKS: list[list[dict]] = []


@contextlib.contextmanager
def assume_cudnn(version: int = ASSUMED_CUDNN_VERSION):
    """While tracing inside: lower cuDNN attention for CUDA even where this host has no cuDNN, as `version`."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    real = cudnn_attention.check_cudnn_version

    def check_cudnn_version():
        try:
            return real()
        except RuntimeError:  # "cuDNN is not detected": no CUDA install on this host
            return _ASSUMED[-1]

    _ASSUMED.append(version)
    cudnn_attention.check_cudnn_version = check_cudnn_version
    try:
        yield
    finally:
        _ASSUMED.pop()
        cudnn_attention.check_cudnn_version = real


@contextlib.contextmanager
def cudnn_fallbacks():
    """Collect, while tracing inside, the calls whose CUDA branch cuDNN refused: a list of
    `{"q": shape, "k": shape, "dtype": str, "reason": str}` (each traced call once)."""
    found: list[dict] = []
    _FALLBACKS.append(found)
    try:
        yield found
    finally:
        _FALLBACKS.pop()


def _xla(q, k, v, *, heads, **kwargs):
    return jax.nn.dot_product_attention(q, k, v, **kwargs)


# logical axes of jax.nn.dot_product_attention's array arguments (`heads`: the heads axis, filled in per call)
_AXES = {"mask": ("batch", None, None, None), "query_seq_lengths": ("batch",), "key_value_seq_lengths": ("batch",)}


def _cudnn(q, k, v, *, heads, **kwargs):
    """cuDNN's kernel; on a mesh under `shard_map` (its partitioning rule is a Python callback, which an exported
    program cannot hold), rows split like the batch and heads like `heads` where query and kv heads split alike."""
    if q.dtype in (jnp.bfloat16, jnp.float16):
        arrays = sorted(name for name, x in kwargs.items() if isinstance(x, jax.Array))
        static = {name: x for name, x in kwargs.items() if name not in arrays}

        def kernel(q, k, v, *values):
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **dict(zip(arrays, values)),
                                                **static)

        rows_heads = ("batch", None, shared_heads(heads, q.shape[2], k.shape[2]), None)
        try:
            return shard_mapped(kernel, (q, k, v, *(kwargs[n] for n in arrays)),
                                (rows_heads,) * 3 + tuple(_AXES[n] for n in arrays), rows_heads)
        except (NotImplementedError, ValueError, TypeError, RuntimeError) as e:
            reason = f"{type(e).__name__}: {e}"  # a shape, dtype or mask cuDNN does not take: XLA's formulation
    else:
        reason = f"{q.dtype} activations (cuDNN's fused attention takes bf16 / fp16)"
    for found in _FALLBACKS:
        found.append({"q": list(q.shape), "k": list(k.shape), "dtype": str(q.dtype), "reason": reason[:300]})
    return _xla(q, k, v, heads=heads, **kwargs)


def _attend(q, k, v, **kwargs):
    arrays = {name: x for name, x in kwargs.items() if isinstance(x, jax.Array)}  # traced: branch arguments
    static = {name: x for name, x in kwargs.items() if name not in arrays}
    return platform_dependent(q, k, v, arrays, cuda=lambda q, k, v, a: _cudnn(q, k, v, **a, **static),
                              default=lambda q, k, v, a: _xla(q, k, v, **a, **static))


def _decoder(attend, q_BTNH, k_BSKH, v_BSKH, mask: DecoderMask):
    dtype = q_BTNH.dtype
    o_BTNH = attend(q_BTNH, k_BSKH.astype(dtype), v_BSKH.astype(dtype), mask=mask.allowed_BTS[:, None],
                    scale=q_BTNH.shape[-1] ** -0.5, heads="q_heads")
    return o_BTNH.astype(dtype)


def _vision(attend, q_PNH, k_PNH, v_PNH, rotary: VisionRotary | None, segments: VisionSegments):
    """Segments become batch rows (`[Q, L, N, H]`, gathered) with their lengths as sequence lengths. Where XLA's
    formulation runs, a segment's scores are one `[N, L, L]` buffer (the `xla` backend chunks the queries)."""
    q_PNH, k_PNH = rotate_qk(q_PNH, k_PNH, rotary)
    rows_QL = segments.rows_QL
    lengths_Q = segments.valid_QL.sum(axis=1).astype(jnp.int32)
    o_QLNH = attend(q_PNH[rows_QL], k_PNH[rows_QL], v_PNH[rows_QL], scale=q_PNH.shape[-1] ** -0.5,
                    query_seq_lengths=lengths_Q, key_value_seq_lengths=lengths_Q, heads="vis_heads")
    N, H = q_PNH.shape[1:]
    return o_QLNH.reshape(-1, N, H)[segments.row_slot_P].astype(v_PNH.dtype)


# the backend: chosen per platform when lowered
decoder_attention = functools.partial(_decoder, _attend)
vision_attention = functools.partial(_vision, _attend)
# its CUDA branch alone (the `auto` backend's choice on CUDA)
cuda_decoder_attention = functools.partial(_decoder, _cudnn)
cuda_vision_attention = functools.partial(_vision, _cudnn)
