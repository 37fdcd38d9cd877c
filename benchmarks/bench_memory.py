"""Memory estimate (`qwen2vl_jax.generation.memory.estimate_request`) against the measured peak RSS of real requests.

Each case runs in a fresh child process: imports and backend init, then the baseline RSS; a random-weight model
is built in-process (the tiny test config, or a Qwen2-VL-2B-width slice: real widths, 2 decoder layers and 2
vision blocks, or the full 2B with `--full-2b`); the peak-RSS mark is reset (`/proc/self/clear_refs`, so building
the model does not count) and one `generation.generate` request runs (text only, or one image of P patches);
the child reports the high-water mark (VmHWM). Printed: the estimate's parts and total against the measured
peak, absolute and above the baseline, and their ratio. Results: benchmarks/results/memory.json.

    python benchmarks/bench_memory.py                 # the default grid (~30 min on 2 cores)
    python benchmarks/bench_memory.py --quick         # tiny model + 1k text on the slice
    python benchmarks/bench_memory.py --only slice-text-16384-bfloat16
    python benchmarks/bench_memory.py --full-2b       # the 16k-token bf16 prompt on the full 2B (long)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "memory.json"
MB = 2**20


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


# ----------------------------------------------------------------------------------------------------- child
def child(spec: dict) -> dict:
    import gc

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from qwen2vl_jax import kernels
    from qwen2vl_jax.generation import decoding as generation
    from qwen2vl_jax.modeling import config as config_lib
    from qwen2vl_jax.modeling.model import Qwen2VL
    from qwen2vl_jax.testing import demo

    jnp.zeros(1).block_until_ready()
    kernels.available()
    gc.collect()
    baseline = _status_kb("VmRSS")

    if spec["model"] == "tiny":
        cfg = config_lib.Qwen2VLConfig.from_hf(demo.TINY_HF_CONFIG)
    elif spec["model"] == "2b":
        cfg = config_lib.qwen2_vl_2b()
    else:
        cfg = config_lib.qwen2_vl_2b().with_layers(2, 2)
    cfg = cfg.replace(attn_implementation=spec["attn"])
    dtype = jnp.dtype(spec["dtype"])
    model = Qwen2VL(cfg, param_dtype=dtype, rngs=nnx.Rngs(0))
    jax.block_until_ready(nnx.state(model))
    gc.collect()
    after_model = _status_kb("VmRSS")
    _reset_peak()

    rng = np.random.default_rng(0)
    P = spec["patches"]
    text = spec["prompt_tokens"] - P // 4 - (2 if P else 0)
    ids = rng.integers(0, 150000, size=(spec["batch"], max(text, 1))).astype(np.int64)
    kw = {}
    if P:
        side = int(round(P**0.5))
        assert side * side == P and side % 2 == 0, P
        vision = [cfg.vision_start_token_id] + [cfg.image_token_id] * (P // 4) + [cfg.vision_end_token_id]
        ids = np.concatenate([np.tile(np.asarray(vision), (spec["batch"], 1)), ids], axis=1)
        kw = dict(pixel_values=rng.standard_normal((P * spec["batch"], cfg.vision_config.patch_dim), np.float32),
                  image_grid_thw=np.tile([[1, side, side]], (spec["batch"], 1)))
    t0 = time.perf_counter()
    out = generation.generate(model, ids, attention_mask=np.ones_like(ids), max_new_tokens=spec["new_tokens"],
                              do_sample=False, **kw)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    assert out.shape[1] == ids.shape[1] + spec["new_tokens"] or out.shape[1] <= ids.shape[1] + spec["new_tokens"]
    return {"baseline": baseline, "weights_rss": after_model - baseline, "peak": peak,
            "peak_above_baseline": peak - baseline, "seconds": round(seconds, 1), "prompt_tokens": ids.shape[1],
            "attn_default": None}


# ---------------------------------------------------------------------------------------------------- parent
def cases(args) -> list[dict]:
    def case(name, model, dtype, prompt, patches=0, attn=None, batch=1, new=4):
        return dict(name=name, model=model, dtype=dtype, prompt_tokens=prompt, patches=patches, attn=attn,
                    batch=batch, new_tokens=new)

    out = []
    for dtype in ("float32", "bfloat16"):
        out.append(case(f"tiny-text-512-{dtype}", "tiny", dtype, 512))
        out.append(case(f"tiny-image-4096-{dtype}", "tiny", dtype, 1100, patches=4096))
    for dtype in ("bfloat16", "float32"):
        for t in (1024, 4096, 8192, 16384):
            out.append(case(f"slice-text-{t}-{dtype}", "slice", dtype, t))
    for p in (16384, 4096, 1024):
        for attn in ("cpu", "xla"):
            for dtype in ("float32", "bfloat16"):
                out.append(case(f"slice-image-{p}-{attn}-{dtype}", "slice", dtype, p // 4 + 34, patches=p, attn=attn))
    out.append(case("full2b-text-16384-bfloat16", "2b", "bfloat16", 16384))
    if args.only:
        return [c for c in out if c["name"] in args.only]
    if args.full_2b:
        return [c for c in out if c["model"] == "2b"]
    out = [c for c in out if c["model"] != "2b"]
    if args.quick:
        return [c for c in out if c["model"] == "tiny" or c["name"] == "slice-text-1024-float32"]
    return out


def estimate_for(c: dict):
    from qwen2vl_jax.generation import memory
    from qwen2vl_jax.modeling import config as config_lib
    from qwen2vl_jax.testing import demo

    if c["model"] == "tiny":
        cfg = config_lib.Qwen2VLConfig.from_hf(demo.TINY_HF_CONFIG)
    elif c["model"] == "2b":
        cfg = config_lib.qwen2_vl_2b()
    else:
        cfg = config_lib.qwen2_vl_2b().with_layers(2, 2)
    P = c["patches"]
    return memory.estimate_request(cfg, batch=c["batch"], prompt_tokens=c["prompt_tokens"],
                                   new_tokens=c["new_tokens"], vision_patches=P * c["batch"],
                                   largest_segment_patches=P, dtype=c["dtype"], attn_implementation=c["attn"])


HEADER = (f"{'case':38s} {'weights':>8s} {'kv':>7s} {'vision':>7s} {'prefill':>7s} {'est.tot':>8s} "
          f"{'meas.':>8s} {'ratio':>6s} {'est-bl':>8s} {'meas-bl':>8s} {'ratio':>6s} {'s':>6s}")


def report(c: dict, m: dict) -> dict:
    """One table row: the estimate's parts and total against the measured peak (absolute, and above the
    process's baseline after imports: the estimate minus that same baseline)."""
    e = estimate_for(c)
    est_above = e.total - m["baseline"]
    row = {**c, **m, "estimate": {"weights": e.weights, "kv_cache": e.kv_cache, "vision_peak": e.vision_peak,
                                  "prefill_peak": e.prefill_peak, "total": e.total},
           "ratio_total": e.total / m["peak"], "ratio_above_baseline": est_above / m["peak_above_baseline"]}
    print(f"{c['name']:38s} {e.weights / MB:8.0f} {e.kv_cache / MB:7.0f} {e.vision_peak / MB:7.0f} "
          f"{e.prefill_peak / MB:7.0f} {e.total / MB:8.0f} {m['peak'] / MB:8.0f} {row['ratio_total']:6.2f} "
          f"{est_above / MB:8.0f} {m['peak_above_baseline'] / MB:8.0f} {row['ratio_above_baseline']:6.2f} "
          f"{m['seconds']:6.1f}", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--full-2b", action="store_true")
    p.add_argument("--only", nargs="*")
    p.add_argument("--report", action="store_true", help="re-estimate the stored measurements, run nothing")
    p.add_argument("--timeout", type=int, default=1800)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0

    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"cases": {}}
    rows = previous.get("cases", {})
    print(HEADER)
    if args.report:
        for name, row in rows.items():
            rows[name] = report(row, {k: row[k] for k in ("baseline", "weights_rss", "peak", "peak_above_baseline",
                                                          "seconds")})
        RESULTS.write_text(json.dumps({"units": "bytes (MiB in the printed table)", "cases": rows}, indent=1))
        return 0
    for c in cases(args):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        try:
            done = subprocess.run([sys.executable, __file__, "--child", json.dumps(c)], capture_output=True,
                                  text=True, env=env, timeout=args.timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            print(f"{c['name']:38s} timed out after {args.timeout} s")
            continue
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode or not lines:
            print(f"{c['name']:38s} failed (rc {done.returncode}): {done.stderr.strip()[-600:]}")
            continue
        rows[c["name"]] = report(c, json.loads(lines[-1][7:]))
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"units": "bytes (MiB in the printed table)", "cases": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
