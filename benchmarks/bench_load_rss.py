"""Peak host memory (RSS) of `from_pretrained` on the real Qwen2-VL-2B shapes, and conversion timings.

    python benchmarks/bench_load_rss.py [--dtypes bfloat16 float32] [--no-convert]
    python benchmarks/bench_load_rss.py --vs-hf 3     # only load times: ours vs transformers, alternating processes

Uses the random-weight 2B checkpoint of benchmarks/common.py (bf16, Hub layout, 2 shards; built once into
~/.cache/qwen2vl_jax_bench). Each measurement runs in a fresh subprocess that imports jax / flax / qwen2vl_jax,
initialises the backend, records its RSS (the baseline), then only calls
`Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=...)`. Peak RSS is the kernel's high-water mark
(`getrusage(RUSAGE_SELF).ru_maxrss`); the growth is peak - baseline. The target for streaming loading is

    growth < 1.15 x (parameter bytes in the requested dtype) + 1 GB

i.e. the weights once, plus at most one tensor in flight and allocator slack, never a second copy of the model.
Files are memory-mapped one tensor at a time and unmapped after the copy, except tensors adopted zero-copy (no
cast, 64-byte aligned in the file), whose mapped pages are the parameters themselves; so the peak counts the
weights once either way, and warm and cold page caches measure the same memory; only the time differs. Also
times HF -> Flax -> HF conversion of the same checkpoint (with its peak RSS growth, and a byte comparison of the
round trip) and the load from the converted directory (our writer aligns data to 64 bytes: it loads zero-copy, so
its growth at load time is near 0; the pages join the RSS as the model first reads them). Prints a table and
writes benchmarks/results/load_rss.json (`--vs-hf`: load_vs_hf.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import CACHE_ROOT, build_random_2b_checkpoint, default_2b_path, weight_bytes  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "load_rss.json"
GB = 1e9


def _rss_baseline():
    """Imports and backend up, then the process's RSS: what the measured call is compared against."""
    import jax
    import jax.numpy as jnp
    import psutil

    import qwen2vl_jax.checkpoints.convert  # noqa: F401  (imports the model modules too)

    jax.block_until_ready(jnp.zeros(8) + 1)  # the backend (and its allocator) is up before the baseline
    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child_load(path: str, dtype: str) -> None:
    """Runs in the measured subprocess: baseline after imports, then one from_pretrained."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

    baseline = _rss_baseline()
    start = time.perf_counter()
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
    seconds = time.perf_counter() - start
    counts = model.num_params()
    param_bytes = counts["total"] * np.dtype(jnp.dtype(dtype)).itemsize
    print(json.dumps({"baseline": baseline, "peak": _peak_rss(), "seconds": seconds, "parameters": counts["total"],
                      "param_bytes": param_bytes, "backend": jax.default_backend()}))


def child_convert(src: str, dst: str, fmt: str) -> None:
    """Runs in the measured subprocess: baseline after imports, then one conversion."""
    from qwen2vl_jax.checkpoints import convert

    baseline = _rss_baseline()
    s = convert.convert(src, dst, format=fmt, force=True, progress=False)
    print(json.dumps({"baseline": baseline, "peak": _peak_rss(), "seconds": s.seconds, "bytes": s.bytes,
                      "tensors": s.tensors, "files": s.files}))


def child_hf_load(path: str, dtype: str) -> None:
    """transformers' `from_pretrained` timed the same way (imports and torch's start-up before the clock)."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    torch.set_num_threads(2)
    torch.zeros(8).add_(1)
    start = time.perf_counter()
    Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    print(json.dumps({"seconds": time.perf_counter() - start, "peak": _peak_rss(), "baseline": 0}))


def load_vs_hf(path: Path, dtypes: list[str], rounds: int) -> dict:
    """Load seconds of ours and transformers, alternating fresh processes, `rounds` each; medians and ratios."""
    import statistics

    out = {}
    for dtype in dtypes:
        times: dict[str, list[float]] = {"ours": [], "hf": []}
        for _ in range(rounds):
            times["ours"].append(_run_child("load", str(path), dtype)["seconds"])
            times["hf"].append(_run_child("hfload", str(path), dtype)["seconds"])
        med = {k: statistics.median(v) for k, v in times.items()}
        out[dtype] = {"runs": times, "median": med, "ratio": med["ours"] / med["hf"]}
        print(f"load {dtype:<9} ours {med['ours']:6.2f} s  HF {med['hf']:6.2f} s  ours/HF {out[dtype]['ratio']:.2f}  "
              f"(runs: ours {', '.join(f'{t:.2f}' for t in times['ours'])}; "
              f"HF {', '.join(f'{t:.2f}' for t in times['hf'])})", flush=True)
    return out


def _run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"child failed:\n{out.stderr[-4000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["growth"] = r["peak"] - r["baseline"]
    return r


def measure(path: Path, dtype: str) -> dict:
    r = _run_child("load", str(path), dtype)
    r["target"] = 1.15 * r["param_bytes"] + 1 * GB
    r["ok"] = r["growth"] < r["target"]
    r["dtype"] = dtype
    r["source"] = str(path)
    return r


def machine() -> dict:
    import flax
    import jax
    import psutil

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "os": platform.platform(), "python": platform.python_version(), "jax": jax.__version__,
            "flax": flax.__version__}


def identical(a: Path, b: Path) -> bool:
    """Same tensor names (after folding >= 4.52 names), dtypes and bytes, compared one tensor at a time."""
    from qwen2vl_jax.checkpoints.keymap import canonical_hf_name, open_files, safetensors_files

    def index(path):
        return {canonical_hf_name(n): (sf, n) for sf in open_files(safetensors_files(path)) for n in sf.keys()}

    left, right = index(a), index(b)
    if left.keys() != right.keys():
        return False
    for name, (sf, n) in left.items():
        other, m = right[name]
        if sf.dtype(n) != other.dtype(m) or sf.read(n).tobytes() != other.read(m).tobytes():
            return False
    return True


def timed_conversions(src: Path) -> dict:
    """HF -> Flax (keep bf16) and Flax -> HF of the 2B checkpoint into the benchmark cache, each in a fresh
    subprocess (peak RSS growth: streaming keeps it near one tensor, not the model), then a byte comparison."""
    flax_dir, hf_dir = CACHE_ROOT / "qwen2vl-2b-random-flax", CACHE_ROOT / "qwen2vl-2b-random-roundtrip-hf"
    out = {"hf_to_flax": _run_child("convert", str(src), str(flax_dir), "flax"),
           "flax_to_hf": _run_child("convert", str(flax_dir), str(hf_dir), "hf"),
           "flax_dir": str(flax_dir), "hf_dir": str(hf_dir)}
    out["round_trip_identical"] = identical(src, hf_dir)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--no-convert", action="store_true", help="skip the conversion timings")
    parser.add_argument("--vs-hf", type=int, metavar="ROUNDS", default=0,
                        help="only time loading, ours vs transformers, ROUNDS alternating processes per dtype")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        {"load": child_load, "convert": child_convert, "hfload": child_hf_load}[args.child[0]](*args.child[1:])
        return

    path = build_random_2b_checkpoint(default_2b_path())
    if args.vs_hf:
        times = load_vs_hf(path, args.dtypes, args.vs_hf)
        out = RESULTS.with_name("load_vs_hf.json")
        out.write_text(json.dumps({"checkpoint": str(path), "machine": machine(), "loads": times}, indent=1) + "\n")
        print(f"wrote {out}")
        return
    conversions = None if args.no_convert else timed_conversions(path)
    runs = [measure(path, dtype) for dtype in args.dtypes]
    if conversions is not None:  # the converted directory loads with the same memory bound
        runs.append({**measure(Path(conversions["flax_dir"]), "bfloat16"), "converted": True})

    print(f"checkpoint: {path} ({weight_bytes(path) / GB:.2f} GB of bf16 tensors on disk)")
    print(f"{'source':<10} {'dtype':<9} {'params GB':>9} {'baseline':>9} {'peak':>8} {'growth':>8} {'target':>8} "
          f"{'growth/params':>13} {'load s':>7}  ok")
    for r in runs:
        print(f"{'converted' if r.get('converted') else 'HF':<10} {r['dtype']:<9} {r['param_bytes'] / GB:9.2f} "
              f"{r['baseline'] / GB:9.2f} {r['peak'] / GB:8.2f} {r['growth'] / GB:8.2f} {r['target'] / GB:8.2f} "
              f"{r['growth'] / r['param_bytes']:13.3f} {r['seconds']:7.1f}  {'yes' if r['ok'] else 'NO'}")
    if conversions is not None:
        for k in ("hf_to_flax", "flax_to_hf"):
            c = conversions[k]
            print(f"{k}: {c['tensors']} tensors, {c['bytes'] / GB:.2f} GB, {c['files']} files, {c['seconds']:.1f} s "
                  f"({c['bytes'] / GB / c['seconds']:.2f} GB/s), peak RSS growth {c['growth'] / GB:.2f} GB")
        print(f"round trip HF -> Flax -> HF byte-identical: {conversions['round_trip_identical']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"checkpoint": str(path), "checkpoint_bytes": weight_bytes(path),
                                   "machine": machine(), "loads": runs, "conversions": conversions}, indent=1) + "\n")
    print(f"wrote {RESULTS}")
    if not all(r["ok"] for r in runs) or (conversions is not None and not conversions["round_trip_identical"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
