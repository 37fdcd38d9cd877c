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

Why, int8/int4 gemv (`csrc/quant_gemv.cc`): weight-only quantization (`qwen2vl_jax.quantization`) halves (int8)
or nearly quarters (int4 with its group scales) the bytes a decode step streams, but XLA's formulation of
`layers.quantized_dense` gave that back: it converts the integers to a bf16 copy of the weight on every call and
int4's grouped dot_general is a batched product over 128-column groups; measured on the 2B decode shapes, one row,
int8 0.8-1.7 GB/s of weights and int4 0.2-0.4, 4-20x slower than the bf16 kernel reading 2-4x the bytes. The
kernel is the bf16 gemv's sibling (the same row chunks over the pool, concurrent row streams, up to `MAX_ROWS`
rows per pass, one summation order for every batch size): the integers are widened in registers (int4: each
nibble shifted to the top of a 32-bit lane and converted exactly as n * 2^28, the 2^28 taken back from each
group's partial sum), products accumulate with FMA in fp32, the scales multiply fp32 partial sums, and software
prefetch keeps memory busy while the int4 loop, bound by instructions, computes. Measured here
(`benchmarks/bench_quant_gemv.py`; a shared 2-core host whose speed moves ~2x with its load: ratios are within one
run of alternating rounds), the 197 products of a 2B decode step, three runs at load ~3: bf16 kernel 253-257 ms
(12 GB/s), int8 110-113 ms (2.25-2.30x faster, 14 GB/s: bf16's bandwidth), int4 87-89 ms (2.86-2.92x, 9.3 GB/s);
in a quieter hour (an earlier build) 132 / 63 / 56 ms, 23 / 25 / 15 GB/s. One core reads ~10 GB/s of packed int4
where it streams ~12.5 GB/s of bf16. `glue.quantized_matmul` (what `layers.quantized_dense` calls) uses it for at
most `MAX_ROWS` rows.

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
from .glue import decode_attention, matmul, quantized_matmul, rotary_segment_attention

__all__ = ["MAX_ROWS", "available", "unavailable_reason", "matmul", "quantized_matmul", "rotary_segment_attention",
           "decode_attention"]
