"""Native CPU kernels for XLA:CPU: the C++ sources (`csrc/`), their build and FFI registration (`build`), the raw
FFI calls (`ffi`), and the glue the model calls (`glue`: platform dispatch, gradients through the reference).

These are an optimisation of one platform. Everything works without them: they are used only when
`jax.default_backend() == "cpu"`, the host is x86-64 with AVX2 + FMA, a C++ compiler built them, and
QWEN2VL_JAX_CPU_KERNELS is not "0" (`available()`); GPU and TPU hosts never compile them.

Why, bf16 gemv (`csrc/bf16_gemv.cc`): a decode step is a chain of matrix-vector products, bound by how fast the
weights stream from memory. On CPUs without AVX512-BF16, XLA:CPU has no fast bf16 gemv (its library emulates bf16;
the fallback materialises an fp32 copy of the weight every call), so bf16 decode ran slower than fp32 decode
although it reads half the bytes. The kernel streams the bf16 weight once, widens it to fp32 in registers (exact)
and accumulates with FMA, split over XLA's intra-op threads; each thread reads its rows as 4 concurrent streams
from distant pages (one sequential stream per core left it 20-30% below XLA's own fp32 gemv bandwidth).
`glue.matmul` (what `layers.dense` calls) uses it for dots with bf16 weights and at most `MAX_ROWS` rows.

Why, segment attention (`csrc/segment_attention.cc`): the vision tower's block-diagonal attention (16 heads of 80
over 1024-4096 patches) written as XLA ops ran at 35-57 GFLOP/s here, a third of the encoder's time at 448x448.
The kernel is flash attention (scores stay in cache, online softmax, fp32) at ~95-135 GFLOP/s, with the q/k rotary
fused in; the `cpu` attention backend (`attention/cpu.py`) calls it through `glue.rotary_segment_attention`.

Why, decode attention (`csrc/decode_attention.cc`): one decode step's attention over the KV cache is ~1 M
multiply-adds per layer, but as XLA ops it is ~10 small ops (cache copies into a dot layout, two library dots, the
softmax pieces), ~0.45 ms per layer of dispatch and copies; the kernel does it in one call that reads the cache in
place (`glue.decode_attention`, used by the `cpu` backend for one-token steps).
"""

from __future__ import annotations

from .build import MAX_ROWS, available, unavailable_reason
from .glue import decode_attention, matmul, rotary_segment_attention

__all__ = ["MAX_ROWS", "available", "unavailable_reason", "matmul", "rotary_segment_attention",
           "decode_attention"]
