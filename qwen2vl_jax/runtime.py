"""Process-wide XLA settings that must be chosen before JAX starts its CPU backend.

Why this exists: on XLA:CPU (jaxlib 0.10) fp32 matmuls with more than one row go to YNNPACK, which accumulates
the whole contraction sequentially in fp32 registers. Its error grows with depth: 1.5e-6 relative on a
[1024, 5120] x [5120, 1280] product, 4x what OpenBLAS / MKL (and PyTorch) give (3.7e-7), enough to move logits of
a real-width 2-layer Qwen2-VL slice 1.5e-5 away from PyTorch. With the flag below the same dots go to Eigen
(blocked accumulation, 3.4e-7), which is as accurate as PyTorch but slower for short, wide products (a 128-token
2B prefill took 2.4x longer on the project's CPU) and loses YNNPACK's bf16 kernels. So it is opt-in: the parity
tests, `selfcheck` and `qwen2vl-jax --exact-fp32` use it; the default favours speed. Numbers: docs/PARITY.md.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

EXACT_FP32_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # an older / newer JAX without the helper: assume the worst
        return True


def use_exact_cpu_fp32_matmuls() -> bool:
    """Route XLA:CPU matmuls to Eigen (exact fp32 accumulation). Returns whether the setting is in effect.

    Call it before the first JAX computation. It has no effect on GPU / TPU, and none if XLA_FLAGS already
    chooses a YNNPACK fusion type.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return EXACT_FP32_FLAG in flags.split()
    if backends_initialized():
        log.warning("JAX is already initialised; exact fp32 CPU matmuls must be chosen before the first computation")
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {EXACT_FP32_FLAG}".strip()
    return True


# ------------------------------------------------------------------------------ persistent compilation cache
# JAX's own persistent cache (jax/_src/compilation_cache.py + lru_cache.py, checked in jax 0.10.2). What we found
# about concurrent processes sharing the directory: entries are keyed by a hash of the program, the compile
# options, the jaxlib version, the devices and XLA_FLAGS, so different settings never collide. LRUCache.put() is
# NOT atomic by itself: it checks `exists()` and then `Path.write_bytes()` in place, so without a size limit a
# second process could read a half-written entry (JAX then warns and recompiles; cache errors are non-fatal since
# jax_persistent_cache_raise_errors defaults to False), and two writers of one key could interleave. With
# jax_compilation_cache_max_size set (>= 0) every get/put holds a `filelock.FileLock` on `<dir>/.lockfile`, which
# serialises readers and writers across processes; so we always set a size limit (which also bounds a cache that
# is on by default) when filelock is importable, as it is here through huggingface_hub.
COMPILE_CACHE_ENV = "QWEN2VL_JAX_COMPILE_CACHE"
COMPILE_CACHE_MAX_BYTES = 4 << 30  # least recently used entries are evicted beyond 4 GiB
_OFF_VALUES = {"0", "off", "false", "no"}
_warned_unusable: set[str] = set()


def compilation_cache_dir(path: str | os.PathLike | None = None) -> Path | None:
    """Where `enable_compilation_cache` would put the cache, or None when the environment turns it off.

    An explicit `path` wins; then $QWEN2VL_JAX_COMPILE_CACHE (0 / off / false / no: disabled; any other non-empty
    value: the directory); then $XDG_CACHE_HOME (or ~/.cache) / qwen2vl_jax / xla_cache. Pure: changes nothing.
    """
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(COMPILE_CACHE_ENV, "").strip()
    if env.lower() in _OFF_VALUES:
        return None
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or Path.home() / ".cache"
    return Path(base).expanduser() / "qwen2vl_jax" / "xla_cache"


def _usable(directory: Path) -> str | None:
    """None when `directory` exists (created if needed) and takes a new file, else the reason."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path | None:
    """Turn on JAX's persistent XLA compilation cache so a later process skips compiling the same programs.

    Returns the cache directory, or None when it is disabled ($QWEN2VL_JAX_COMPILE_CACHE=0) or unusable (then one
    warning goes to stderr and JAX runs without the cache). Process-wide: it changes `jax.config`, so importing
    `qwen2vl_jax` never calls it; the CLI does, and library users may. Call it before the first compilation.
    """
    directory = compilation_cache_dir(path)
    if directory is None:
        return None
    reason = _usable(directory)
    if reason is not None:
        if str(directory) not in _warned_unusable:
            _warned_unusable.add(str(directory))
            print(f"warning: compilation cache disabled, cannot write to {directory}: {reason}",
                  file=sys.stderr, flush=True)
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", str(directory))
    # Cache every program, not only those that compiled for more than 1 s (the default): ours are many mid-sized
    # programs (vision, prefill buckets, decode step) whose compile times add up, and reading one back is cheaper
    # than compiling it. -1 means "no minimum entry size, and no filesystem-specific override" (0 would let JAX
    # substitute its own minimum).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    if importlib.util.find_spec("filelock") is not None:  # see the comment above: locking needs a size limit
        jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_MAX_BYTES)
    return directory
