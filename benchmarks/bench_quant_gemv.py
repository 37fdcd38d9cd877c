"""CPU micro-benchmark: the decode step's matrix-vector products over bf16, int8 and int4 weights, one row.

    python benchmarks/bench_quant_gemv.py                  # every shape and implementation, then the decode chain
    python benchmarks/bench_quant_gemv.py --repeats 21 --no-chain
    python benchmarks/bench_quant_gemv.py --impls bf16,int8,int4 --shapes q,down

Implementations (x is one fp32 row, or bf16 for the XLA formulations, as a bf16 model's activations):
  bf16      the native bf16 gemv (`kernels/csrc/bf16_gemv.cc`), bf16 weights
  bf16-xla  XLA's bf16 dot (`kernels.glue.xla_matmul`: what bf16 runs without the kernels)
  int8      the native int8 gemv (`kernels/csrc/quant_gemv.cc`): int8 weights, one fp32 scale per output
  int8-xla  `layers.quantized_dense`'s XLA formulation: the integers cast to bf16, the dot, the scales
  int4      the native int4 gemv: packed int4 weights, one fp32 scale per 128 input columns
  int4-xla  the XLA formulation: unpack, grouped dot_general, the scales

Shapes are Qwen2-VL-2B's decode projections (K -> N): q/o 1536 -> 1536, k/v 1536 -> 256, gate/up 1536 -> 8960,
down 8960 -> 1536, lm_head 1536 -> 151936. Each measurement is one jitted chain of calls over distinct copies of
the weight (each call's input depends on the previous call's output, as in a decode step, so they run one after
another), timed after the caches were flushed by reading a 1 GiB buffer: the weights come from memory, not from
this host's large L3. Medians of `--repeats` runs; the implementations alternate within each round, so a noisy
spell (other processes) spreads over all of them. GB/s = weight bytes read per call (integers + scales) / time.

`--chain` (default on) also times a whole decode step's 197 products (28 layers x q, k, v, o, gate, up, down, then
lm_head) per weight format: the bandwidth the decode step gets.

Prints the tables and writes benchmarks/results/quant_gemv.json. No assertions: a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"q": (1536, 1536), "k": (1536, 256), "gate": (1536, 8960), "down": (8960, 1536),
          "lm_head": (1536, 151936)}  # name: (K, N); o is q's shape, v is k's, up is gate's
LAYER = ["q", "k", "k", "q", "gate", "gate", "down"]  # q, k, v, o, gate, up, down
LAYERS = 28
IMPLS = ["bf16", "bf16-xla", "int8", "int8-xla", "int4", "int4-xla"]
GROUP = 128
CHAIN_BYTES = 256 << 20  # weight bytes per per-shape chain (at most 32 copies, at least 1)
FLUSH_BYTES = 1 << 30


def _median(xs):
    return float(np.median(xs))


def rows_of(K: int) -> dict:
    """One activation row of width K (fp32, standard normal), keyed by its width."""
    import jax.numpy as jnp

    return {str(K): jnp.asarray(np.random.default_rng(K).standard_normal((1, K)).astype(np.float32))}


def weights(impl: str, K: int, N: int, rng) -> tuple:
    """One random weight in `impl`'s format (integers drawn directly: bf16 ones are small integers, no denormals)."""
    import jax.numpy as jnp

    q = rng.integers(-127, 128, (N, K), dtype=np.int8)
    if impl.startswith("bf16"):
        return (jnp.asarray(q).astype(jnp.bfloat16),)
    if impl.startswith("int8"):
        return jnp.asarray(q), jnp.asarray(rng.uniform(1e-3, 1e-2, N).astype(np.float32))
    packed = rng.integers(0, 256, (N, K // 2), dtype=np.uint8)
    return jnp.asarray(packed), jnp.asarray(rng.uniform(1e-3, 1e-2, (N, K // GROUP)).astype(np.float32))


def product(impl: str):
    """`f(x, *weight) -> f32[1, N]` for `impl`."""
    import jax.numpy as jnp

    from qwen2vl_jax.kernels import ffi
    from qwen2vl_jax.kernels.glue import xla_matmul
    from qwen2vl_jax.modeling.layers import _quantized_matmul_xla

    return {"bf16": ffi.bf16_gemv, "bf16-xla": lambda x, w: xla_matmul(x.astype(jnp.bfloat16), w),
            "int8": ffi.int8_gemv, "int4": ffi.int4_gemv,
            "int8-xla": lambda x, q, s: _quantized_matmul_xla(x.astype(jnp.bfloat16), q, s),
            "int4-xla": lambda x, q, s: _quantized_matmul_xla(x.astype(jnp.bfloat16), q, s)}[impl]


def chain(fn, widths: list[int]):
    """One jitted program calling fn(x of width widths[i], *weights[i]) in order, each call's input depending on
    the previous call's output (`xs[str(K)]` is the input row of width K)."""
    import jax

    def run(xs, weights):
        dep = 0.0
        for K, w in zip(widths, weights):
            y = fn(xs[str(K)] + 1e-30 * dep, *w)  # a data dependency: the calls cannot overlap
            dep = y[0, 0]
        return dep

    return jax.jit(run)


class Flusher:
    """Reads a 1 GiB buffer: evicts the weights from every cache level (this host's L3 is hundreds of MB). Reading,
    not writing: evicting dirty lines would spend write bandwidth during the next measurement (writing the buffer
    instead halved the per-shape numbers)."""

    def __init__(self):
        self.buf = np.ones(FLUSH_BYTES, np.uint8)

    def __call__(self):
        return int(self.buf.max())


def time_chains(cases: dict, repeats: int, flush: Flusher) -> dict:
    """`cases[name] = (program, x, weights)` -> {name: [seconds per run]}, alternating the cases in each round."""
    import jax

    times = {name: [] for name in cases}
    for program, x, ws in cases.values():
        jax.block_until_ready(program(x, ws))  # compile + warm up
    for _ in range(repeats):
        for name, (program, x, ws) in cases.items():
            flush()
            t = time.perf_counter()
            jax.block_until_ready(program(x, ws))
            times[name].append(time.perf_counter() - t)
    return times


def per_shape(shapes: list[str], impls: list[str], repeats: int, flush: Flusher, rng) -> list[dict]:

    rows = []
    for shape in shapes:
        K, N = SHAPES[shape]
        cases, info = {}, {}
        for impl in impls:
            one = weights(impl, K, N, rng)
            nbytes = sum(a.nbytes for a in one)
            copies = int(max(1, min(32, CHAIN_BYTES // nbytes)))
            ws = [one] + [weights(impl, K, N, rng) for _ in range(copies - 1)]
            cases[impl] = (chain(product(impl), [K] * copies), rows_of(K), ws)
            info[impl] = (copies, nbytes)
        times = time_chains(cases, repeats, flush)
        for impl in impls:
            copies, nbytes = info[impl]
            t = [s / copies for s in times[impl]]
            rows.append({"shape": shape, "K": K, "N": N, "impl": impl, "calls_per_chain": copies,
                         "weight_bytes": nbytes, "ms": _median(t) * 1e3, "ms_min": min(t) * 1e3,
                         "gb_s": nbytes / _median(t) / 1e9, "runs_s": times[impl]})
        cases.clear()
    return rows


def decode_chain(impls: list[str], repeats: int, flush: Flusher, rng) -> list[dict]:
    """Each format's 197 products of a 2B decode step, weights in that format, timed one format after another in
    alternating rounds (all formats' weights are held at once: ~5.5 GB for bf16 + int8 + int4)."""

    cases, info = {}, {}
    for impl in impls:
        names = LAYER * LAYERS + ["lm_head"]
        ws = [weights(impl, *SHAPES[n], rng) for n in names]
        cases[impl] = (chain(product(impl), [SHAPES[n][0] for n in names]), {**rows_of(1536), **rows_of(8960)}, ws)
        info[impl] = (len(names), sum(a.nbytes for w in ws for a in w))
    times = time_chains(cases, repeats, flush)
    rows = []
    for impl in impls:
        calls, nbytes = info[impl]
        rows.append({"impl": impl, "calls": calls, "weight_bytes": nbytes, "ms": _median(times[impl]) * 1e3,
                     "ms_min": min(times[impl]) * 1e3, "gb_s": nbytes / _median(times[impl]) / 1e9,
                     "runs_s": times[impl]})
    return rows


def report(shape_rows: list[dict], chain_rows: list[dict]) -> list[str]:
    lines = [f"{'shape':<8} {'K -> N':>14} {'impl':<9} {'calls':>5} {'MB/call':>8} {'ms':>9} {'min ms':>9} "
             f"{'GB/s':>6}  {'x bf16':>6}"] if shape_rows else []
    bf16 = {r["shape"]: r for r in shape_rows if r["impl"] == "bf16"}
    for r in shape_rows:
        base = bf16.get(r["shape"])
        speed = f"{base['ms'] / r['ms']:6.2f}" if base else ""
        lines.append(f"{r['shape']:<8} {r['K']:>6} -> {r['N']:<6} {r['impl']:<9} {r['calls_per_chain']:>5} "
                     f"{r['weight_bytes'] / 1e6:>8.2f} {r['ms']:>9.3f} {r['ms_min']:>9.3f} {r['gb_s']:>6.1f}  {speed}")
    if chain_rows:
        lines += [""] * bool(lines) + ["decode step chain (28 layers x 7 products + lm_head), one row:",
                  f"{'impl':<9} {'calls':>5} {'GB':>6} {'ms':>9} {'min ms':>9} {'GB/s':>6}  {'x bf16':>6}"]
        base = next((r for r in chain_rows if r["impl"] == "bf16"), None)
        for r in chain_rows:
            speed = f"{base['ms'] / r['ms']:6.2f}" if base else ""
            lines.append(f"{r['impl']:<9} {r['calls']:>5} {r['weight_bytes'] / 1e9:>6.3f} {r['ms']:>9.2f} "
                         f"{r['ms_min']:>9.2f} {r['gb_s']:>6.1f}  {speed}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15, help="timed runs per case (median reported)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {list(SHAPES)}")
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated, of {IMPLS}")
    ap.add_argument("--chain", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the whole decode step's products per format (kernels only)")
    ap.add_argument("--chain-repeats", type=int, default=7)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quant_gemv.json"))
    args = ap.parse_args(argv)

    import jax

    from qwen2vl_jax import kernels

    impls = [i for i in args.impls.split(",") if i]
    if not kernels.available():
        print(f"the native kernels are unavailable ({kernels.unavailable_reason()}): timing XLA only",
              file=sys.stderr)
        impls = [i for i in impls if i.endswith("-xla")]
    rng = np.random.default_rng(0)
    flush = Flusher()
    t0 = time.perf_counter()
    shape_rows = per_shape([s for s in args.shapes.split(",") if s], impls, args.repeats, flush, rng)
    chain_impls = [i for i in impls if not i.endswith("-xla")]
    chain_rows = decode_chain(chain_impls, args.chain_repeats, flush, rng) if args.chain and chain_impls else []
    lines = report(shape_rows, chain_rows)
    print("\n".join(lines))
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor(),
                          "cpus": os.cpu_count(), "jax": jax.__version__,
                          "load_average": os.getloadavg()},
              "kernels": kernels.available(), "repeats": args.repeats, "seconds": time.perf_counter() - t0,
              "shapes": shape_rows, "decode_chain": chain_rows, "table": lines}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
