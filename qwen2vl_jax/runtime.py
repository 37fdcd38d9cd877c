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

import logging
import os

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
