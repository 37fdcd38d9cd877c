"""Compile the C++ kernels (`csrc/`) on first use and register them with XLA:CPU as FFI targets.

Built with the system C++ compiler against jaxlib's FFI headers into ~/.cache/qwen2vl_jax/kernels (once per
source / jaxlib / compiler; the build is atomic, so concurrent processes never load half a library).
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

log = logging.getLogger(__name__)

GEMV_TARGET = "qwen2vl_jax_bf16_gemv"
MAX_ROWS = 4  # decode batches up to 4 rows (measured: faster than XLA's bf16 dot up to 3-4 rows, slower at 8)
ATTENTION_TARGET = "qwen2vl_jax_segment_attention"
DECODE_ATTENTION_TARGET = "qwen2vl_jax_decode_attention"
INT8_GEMV_TARGET = "qwen2vl_jax_int8_gemv"
INT4_GEMV_TARGET = "qwen2vl_jax_int4_gemv"
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = [_CSRC / name for name in ("bf16_gemv.cc", "segment_attention.cc", "decode_attention.cc",
                                        "quant_gemv.cc")]
_HEADERS = [_CSRC / "work_queue.h", _CSRC / "avx2_math.h"]  # the dispatch and the SIMD helpers the kernels share


def _cpu_has_avx2_fma() -> bool:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma"} <= set(flags.split())


def _build() -> tuple[Path | None, str]:
    """(the shared library, "") or (None, why not)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        return None, "no C++ compiler found (set CXX or install g++)"
    missing = [src.name for src in (*_SOURCES, *_HEADERS) if not src.is_file()]
    if missing:
        return None, f"kernel sources missing from the installed package: {missing}"
    include = jax.ffi.include_dir()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    sources = b"".join(src.read_bytes() for src in (*_SOURCES, *_HEADERS))
    key = hashlib.sha256(sources + repr((jax.__version__, version, include)).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("QWEN2VL_JAX_CACHE", Path.home() / ".cache" / "qwen2vl_jax")) / "kernels"
    lib = cache / f"cpu_kernels-{key}.so"
    if lib.is_file():
        return lib, ""
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        out = Path(tmp) / lib.name
        cmd = [compiler, "-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{include}",
               *map(str, _SOURCES), "-o", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            log.warning("CPU kernels not built (%s):\n%s", " ".join(cmd), result.stderr[-2000:])
            return None, f"the C++ build failed ({compiler}); see the warning logged above"
        os.replace(out, lib)  # atomic: concurrent builders never see half a library
    return lib, ""


@functools.cache
def _register() -> str:
    """Build and register the kernels once per process; returns "" on success, else why they are off."""
    if os.environ.get("QWEN2VL_JAX_CPU_KERNELS", "1") == "0":
        return "turned off by QWEN2VL_JAX_CPU_KERNELS=0"
    if jax.default_backend() != "cpu":
        return f"JAX's default backend is {jax.default_backend()!r}, not 'cpu'"
    if not _cpu_has_avx2_fma():
        return f"the host CPU ({platform.machine()}) is not x86-64 with AVX2 and FMA"
    try:
        lib, why = _build()
        if lib is None:
            return why
        handle = ctypes.cdll.LoadLibrary(str(lib))
        jax.ffi.register_ffi_target(GEMV_TARGET, jax.ffi.pycapsule(handle.Bf16Gemv), platform="cpu")
        jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(handle.SegmentAttention), platform="cpu")
        jax.ffi.register_ffi_target(DECODE_ATTENTION_TARGET, jax.ffi.pycapsule(handle.DecodeAttention),
                                    platform="cpu")
        jax.ffi.register_ffi_target(INT8_GEMV_TARGET, jax.ffi.pycapsule(handle.Int8Gemv), platform="cpu")
        jax.ffi.register_ffi_target(INT4_GEMV_TARGET, jax.ffi.pycapsule(handle.Int4Gemv), platform="cpu")
        return ""
    except Exception as e:  # never let an optional speed-up break the model
        log.warning("CPU kernels unavailable (%s: %s); using XLA's ops", type(e).__name__, e)
        return f"loading the kernels failed: {type(e).__name__}: {e}"


def available() -> bool:
    """Whether the kernels are built and registered with XLA:CPU (tried once per process).

    True only when JAX's default backend is the CPU (a GPU / TPU host never compiles them), the host is x86-64
    with AVX2 + FMA, a C++ compiler built them, and QWEN2VL_JAX_CPU_KERNELS is not "0".
    """
    return not _register()


def unavailable_reason() -> str:
    """Why `available()` is False ("" when it is True)."""
    return _register()
