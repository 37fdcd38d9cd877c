"""Native CPU kernels for XLA:CPU, compiled on first use: a bf16 matrix-vector product and two fused attentions.

Why, bf16 gemv (`csrc/bf16_gemv.cc`): a decode step is a chain of matrix-vector products, bound by how fast the
weights stream from memory. On CPUs without AVX512-BF16, XLA:CPU has no fast bf16 gemv (its library emulates bf16;
the fallback materialises an fp32 copy of the weight every call), so bf16 decode ran slower than fp32 decode
although it reads half the bytes. The kernel streams the bf16 weight once, widens it to fp32 in registers (exact)
and accumulates with FMA, split over XLA's intra-op threads; each thread reads its rows as 4 concurrent streams
from distant pages (one sequential stream per core left it 20-30% below XLA's own fp32 gemv bandwidth).
`layers.dense` uses it for dots with bf16 weights and at most `MAX_ROWS` activation rows on the CPU platform;
everything else keeps XLA's own dots.

Why, segment attention (`csrc/segment_attention.cc`): the vision tower's block-diagonal attention (16 heads of 80
over 1024-4096 patches) written as XLA ops ran at 35-57 GFLOP/s here, a third of the encoder's time at 448x448.
The kernel is flash attention (scores stay in cache, online softmax, fp32) at ~95-135 GFLOP/s, with the q/k rotary
fused in; `vision.rotary_segment_attention` uses it on the CPU platform and keeps the XLA formulation for other
platforms and for gradients.

Why, decode attention (`csrc/decode_attention.cc`): one decode step's attention over the KV cache is ~1 M
multiply-adds per layer, but as XLA ops it is ~10 small ops (cache copies into a dot layout, two library dots, the
softmax pieces), ~0.45 ms per layer of dispatch and copies; the kernel does it in one call that reads the cache in
place (`text.decode_attention`).

Built with the system C++ compiler against jaxlib's FFI headers into ~/.cache/qwen2vl_jax (once per source /
jaxlib / compiler). Off when the machine is not x86-64 with AVX2 + FMA, when no compiler is found, or when
QWEN2VL_JAX_CPU_KERNELS=0; the model then uses XLA's ops (same numbers up to fp32 rounding).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

TARGET = "qwen2vl_jax_bf16_gemv"
MAX_ROWS = 4  # decode batches up to 4 rows (measured: faster than XLA's bf16 dot up to 3-4 rows, slower at 8)
ATTENTION_TARGET = "qwen2vl_jax_segment_attention"
DECODE_ATTENTION_TARGET = "qwen2vl_jax_decode_attention"
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / name for name in ("bf16_gemv.cc", "segment_attention.cc", "decode_attention.cc")]
_HEADERS = [_CSRC / "work_queue.h", _CSRC / "avx2_math.h"]  # the dispatch and the SIMD helpers the kernels share


def _cpu_has_avx2_fma() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma"} <= set(flags.split())


def _build() -> Path | None:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None or not all(src.is_file() for src in (*_SOURCES, *_HEADERS)):
        return None
    include = jax.ffi.include_dir()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    sources = b"".join(src.read_bytes() for src in (*_SOURCES, *_HEADERS))
    key = hashlib.sha256(sources + repr((jax.__version__, version, include)).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("QWEN2VL_JAX_CACHE", Path.home() / ".cache" / "qwen2vl_jax")) / "kernels"
    lib = cache / f"cpu_kernels-{key}.so"
    if lib.is_file():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / lib.name
        cmd = [compiler, "-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{include}",
               *map(str, _SOURCES), "-o", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            log.warning("CPU kernels not built (%s); using XLA's dots:\n%s", " ".join(cmd), result.stderr[-2000:])
            return None
        os.replace(out, lib)  # atomic: concurrent builders never see half a library
    return lib


@functools.cache
def available() -> bool:
    """Whether the bf16 gemv kernel is built and registered with XLA (tried once per process)."""
    if os.environ.get("QWEN2VL_JAX_CPU_KERNELS", "1") == "0" or not _cpu_has_avx2_fma():
        return False
    try:
        lib = _build()
        if lib is None:
            return False
        handle = ctypes.cdll.LoadLibrary(str(lib))
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handle.Bf16Gemv), platform="cpu")
        jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(handle.SegmentAttention), platform="cpu")
        jax.ffi.register_ffi_target(DECODE_ATTENTION_TARGET, jax.ffi.pycapsule(handle.DecodeAttention),
                                    platform="cpu")
        return True
    except Exception as e:  # never let an optional speed-up break the model
        log.warning("CPU kernels unavailable (%s: %s); using XLA's dots", type(e).__name__, e)
        return False


def bf16_gemv(x_MK: jax.Array, w_NK: jax.Array) -> jax.Array:
    """`x[M, K] (f32) @ w[N, K]^T (bf16) -> f32[M, N]` on the CPU (call only when `available()`)."""
    out = jax.ShapeDtypeStruct((x_MK.shape[0], w_NK.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x_MK.astype(jnp.float32), w_NK)


def segment_attention(q_PNH: jax.Array, k_PNH: jax.Array, v_PNH: jax.Array, seg_S2: jax.Array, scale: float,
                      cos_PH: jax.Array | None = None, sin_PH: jax.Array | None = None) -> jax.Array:
    """Softmax attention within row segments, fp32, rows `[P, N, H]` (call only when `available()`).

    `seg_S2[s] = (first row, length)`: rows of segment s attend to each other only; a length-0 segment is
    padding; rows outside every segment come out 0. H must be a multiple of 8. With `cos_PH` / `sin_PH`, q and k
    are rotated first (`x * cos + rotate_half(x) * sin`, the vision rotary) inside the kernel.
    """
    out = jax.ShapeDtypeStruct(q_PNH.shape, jnp.float32)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    rotate = cos_PH is not None
    if not rotate:
        cos_PH = sin_PH = jnp.zeros((0, q_PNH.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(ATTENTION_TARGET, out)(f32(q_PNH), f32(k_PNH), f32(v_PNH), f32(cos_PH), f32(sin_PH),
                                                   seg_S2.astype(jnp.int32), scale=np.float32(scale), rotate=rotate)


def decode_attention(q_BNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, valid_BS: jax.Array, scale: float,
                     probs_bf16: bool) -> jax.Array:
    """One query per row and head against the KV cache (GQA: head n reads kv head n // (N / K)); fp32 out.

    The cache may be f32 or bf16 (read in place); `valid_BS` marks the slots a query may see; probabilities are
    rounded to bf16 before the value product when `probs_bf16` (call only when `available()`).
    """
    out = jax.ShapeDtypeStruct(q_BNH.shape, jnp.float32)
    return jax.ffi.ffi_call(DECODE_ATTENTION_TARGET, out)(q_BNH.astype(jnp.float32), k_BSKH, v_BSKH,
                                                          valid_BS.astype(jnp.bool_), scale=np.float32(scale),
                                                          probs_bf16=bool(probs_bf16))
