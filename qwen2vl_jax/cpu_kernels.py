"""A native bf16 matrix-vector kernel for XLA:CPU, compiled on first use (decode with bf16 weights on AVX2).

Why: a decode step is a chain of matrix-vector products, bound by how fast the weights stream from memory. On CPUs
without AVX512-BF16, XLA:CPU has no fast bf16 gemv (its library emulates bf16; the fallback materialises an fp32
copy of the weight every call), so bf16 decode ran slower than fp32 decode although it reads half the bytes.
`csrc/bf16_gemv.cc` streams the bf16 weight once, widens it to fp32 in registers (exact) and accumulates with FMA,
split over XLA's intra-op threads. It is called through `jax.ffi` and used by `layers.dense` for dots with bf16
weights and at most `MAX_ROWS` activation rows on the CPU platform; everything else keeps XLA's own dots.

Built with the system C++ compiler against jaxlib's FFI headers into ~/.cache/qwen2vl_jax (once per source /
jaxlib / compiler). Off when the machine is not x86-64 with AVX2 + FMA, when no compiler is found, or when
QWEN2VL_JAX_CPU_KERNELS=0; the model then uses XLA's path (same numbers up to fp32 summation order).
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

log = logging.getLogger(__name__)

TARGET = "qwen2vl_jax_bf16_gemv"
MAX_ROWS = 4  # decode batches up to 4 rows (measured: faster than XLA's bf16 dot up to 3-4 rows, slower at 8)
_SOURCE = Path(__file__).with_name("csrc") / "bf16_gemv.cc"


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
    if compiler is None or not _SOURCE.is_file():
        return None
    include = jax.ffi.include_dir()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(_SOURCE.read_bytes() + repr((jax.__version__, version, include)).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("QWEN2VL_JAX_CACHE", Path.home() / ".cache" / "qwen2vl_jax")) / "kernels"
    lib = cache / f"bf16_gemv-{key}.so"
    if lib.is_file():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / lib.name
        cmd = [compiler, "-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{include}",
               str(_SOURCE), "-o", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            log.warning("bf16 CPU kernel not built (%s); using XLA's dots:\n%s", " ".join(cmd), result.stderr[-2000:])
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
        return True
    except Exception as e:  # never let an optional speed-up break the model
        log.warning("bf16 CPU kernel unavailable (%s: %s); using XLA's dots", type(e).__name__, e)
        return False


def bf16_gemv(x_MK: jax.Array, w_NK: jax.Array) -> jax.Array:
    """`x[M, K] (f32) @ w[N, K]^T (bf16) -> f32[M, N]` on the CPU (call only when `available()`)."""
    out = jax.ShapeDtypeStruct((x_MK.shape[0], w_NK.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x_MK.astype(jnp.float32), w_NK)
