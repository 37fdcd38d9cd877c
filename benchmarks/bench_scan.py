"""What `scan_layers=True` (stacked layers run by `jax.lax.scan`) changes against the default unrolled layer loop.

    python benchmarks/bench_scan.py                # both modes
    python benchmarks/bench_scan.py --compile [--presets 7b 72b] [--compile-rounds 3]
    python benchmarks/bench_scan.py --runtime [--rounds 3] [--repeats 3]

`--compile`: lowering and compile time of the jitted programs for the Qwen2-VL-7B and -72B shapes with abstract
weights (`checkpoints.load.abstract_model(Qwen2VL, config, bfloat16)`: nothing is allocated), scanned vs unrolled:
the text forward (`programs.forward.lower(...)` for a 128-token text prompt, no cache) and the vision tower
(`programs.vision.lower(...)` for one 448x448 image: 1024 patches, grid [1, 32, 32]). Times are
`.lower(...)` (trace + StableHLO) and `lowered.compile()` (XLA:CPU), plus the size of the compiled program's
text (`len(compiled.as_text())`), which shows the unrolling. Run with `attn_implementation="xla"` and
QWEN2VL_JAX_CPU_KERNELS=0 (the portable backend, so the figures are about the layer loop, not the native kernels).

`--runtime`: CPU speed of the real thing on the random-weight 2B checkpoint of benchmarks/common.py (bf16),
loaded with `from_pretrained(path, dtype="bfloat16", scan_layers=...)`: `model.generate` on a 256-token text
prompt with 32 forced greedy tokens, run once (compiles; its wall time is recorded) then `--repeats` times:
the medians of `prefill_seconds` (prefill + first token) and decode tok/s (31 / `decode_seconds`). The
attention backend is the platform's default (recorded; `cpu` where the native kernels build), as a CPU user
gets it. Load time and the child's peak RSS are recorded too.

Every measurement is a fresh subprocess with no compilation cache (QWEN2VL_JAX_COMPILE_CACHE=0, JAX's persistent
cache off), the two variants alternating (unrolled, scanned, unrolled, ...) since this machine is noisy; the table
reports medians over rounds and the scanned/unrolled ratio. A compile child that runs past `--compile-timeout`
(600 s) is stopped and reported as ">600 s". Prints a table and writes benchmarks/results/scan.json (running one
mode keeps the other mode's numbers already in the file).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results" / "scan.json"
VARIANTS = (("unrolled", False), ("scanned", True))

CHILD_COMPILE = r"""
import json, sys, time
import numpy as np, jax, jax.numpy as jnp
jax.config.update("jax_enable_compilation_cache", False)
from qwen2vl_jax.modeling import config as config_lib
from qwen2vl_jax.modeling.parameters import abstract_model
from qwen2vl_jax.modeling import programs
from qwen2vl_jax.modeling.model import Qwen2VL
preset, scan, tower = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
cfg = getattr(config_lib, f"qwen2_vl_{preset}")().replace(attn_implementation="xla", scan_layers=scan)
t = time.perf_counter()
model = abstract_model(Qwen2VL, cfg, jnp.bfloat16)
build = time.perf_counter() - t
if tower == "text":
    ids = (np.arange(128, dtype=np.int64) * 7919 % 150000 + 100)[None]
    prep = model.prepare_inputs(ids)
    t0 = time.perf_counter()
    lowered = programs.forward.lower(model, prep.input_ids_BT, prep.attention_mask_BT, prep.position_ids_ZBT,
                                 None, None, None, None)
else:
    pixels, layout = model.visual.prepare(np.zeros((1024, 1176), np.float32), np.array([[1, 32, 32]]))
    t0 = time.perf_counter()
    lowered = programs.vision.lower(model.visual, pixels, layout.pos_hw_P2, layout.segments())
t1 = time.perf_counter()
compiled = lowered.compile()
t2 = time.perf_counter()
print("RESULT " + json.dumps({"abstract_model_s": build, "lower_s": t1 - t0, "compile_s": t2 - t1,
                              "compiled_text_chars": len(compiled.as_text()),
                              "stablehlo_text_chars": len(lowered.as_text())}))
"""

CHILD_RUNTIME = r"""
import json, resource, sys, time
import numpy as np, jax
jax.config.update("jax_enable_compilation_cache", False)
from qwen2vl_jax import Qwen2VLForConditionalGeneration
from qwen2vl_jax.attention import resolve
path, scan, repeats, prompt, new = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
t = time.perf_counter()
model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype="bfloat16", scan_layers=scan)
load = time.perf_counter() - t
ids = (np.arange(prompt, dtype=np.int64) * 7919 % 150000 + 100)[None]
gen = lambda: model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, return_dict=True)
t = time.perf_counter()
first = gen()
first_s = time.perf_counter() - t
outs = [gen() for _ in range(repeats)]
print("RESULT " + json.dumps({
    "backend": resolve(model.config.attn_implementation), "scan_layers": bool(model.config.scan_layers),
    "load_s": load, "first_generate_s": first_s, "first_prefill_s": first.prefill_seconds,
    "first_decode_s": first.decode_seconds, "new_tokens": [int(o.new_tokens) for o in outs],
    "prefill_s": [o.prefill_seconds for o in outs], "decode_s": [o.decode_seconds for o in outs],
    "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def _env(**overrides) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "QWEN2VL_JAX_COMPILE_CACHE": "0"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env.pop("JAX_ENABLE_COMPILATION_CACHE", None)
    for k, v in overrides.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def _run(code: str, argv: list[str], env: dict, timeout: float) -> dict | None:
    """The child's RESULT dict, or None when it ran past `timeout` (killed)."""
    try:
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                              cwd=tempfile.gettempdir(), timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not line:
        raise RuntimeError(f"child {argv} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def run_compile(args) -> dict:
    env = _env(QWEN2VL_JAX_CPU_KERNELS="0")
    out = {"attn_implementation": "xla", "dtype": "bfloat16", "text_prompt_tokens": 128,
           "vision_grid_thw": [1, 32, 32], "vision_patches": 1024, "rounds": args.compile_rounds,
           "timeout_s": args.compile_timeout, "runs": {}}
    for preset in args.presets:
        for tower in ("text", "vision"):
            key = f"{preset}_{tower}"
            runs = out["runs"][key] = {name: [] for name, _ in VARIANTS}
            for r in range(args.compile_rounds):
                for name, scan in VARIANTS:
                    t0 = time.perf_counter()
                    res = _run(CHILD_COMPILE, [preset, "1" if scan else "0", tower], env, args.compile_timeout)
                    if res is None:
                        res = {"timed_out": True, "lower_s": None, "compile_s": None, "compiled_text_chars": None}
                    runs[name].append(res)
                    shown = (f"lower {res['lower_s']:.2f} s, compile {res['compile_s']:.2f} s, "
                             f"{res['compiled_text_chars']:,} chars" if not res.get("timed_out")
                             else f">{args.compile_timeout:.0f} s (stopped)")
                    print(f"compile {key} round {r} {name}: {shown} ({time.perf_counter() - t0:.0f} s wall)",
                          flush=True)
                    if res.get("timed_out"):
                        break  # one stopped compile is the answer for this variant; don't spend another 10 min
    return out


def run_runtime(args) -> dict:
    from benchmarks.common import default_2b_path, is_complete

    path = default_2b_path()
    if not is_complete(path):
        raise SystemExit(f"{path} is not built: python benchmarks/common.py")
    env = _env(QWEN2VL_JAX_CPU_KERNELS=None)  # the platform's default backend
    out = {"checkpoint": str(path), "dtype": "bfloat16", "prompt_tokens": args.prompt, "new_tokens": args.new,
           "rounds": args.rounds, "repeats": args.repeats, "runs": {name: [] for name, _ in VARIANTS}}
    for r in range(args.rounds):
        for name, scan in VARIANTS:
            t0 = time.perf_counter()
            res = _run(CHILD_RUNTIME, [str(path), "1" if scan else "0", str(args.repeats), str(args.prompt),
                                       str(args.new)], env, 3600)
            out["runs"][name].append(res)
            print(f"runtime round {r} {name} ({res['backend']}): load {res['load_s']:.1f} s, first generate "
                  f"{res['first_generate_s']:.1f} s, prefill {_median(res['prefill_s']):.2f} s, decode "
                  f"{(args.new - 1) / _median(res['decode_s']):.2f} tok/s ({time.perf_counter() - t0:.0f} s wall)",
                  flush=True)
    out["backend"] = sorted({res["backend"] for runs in out["runs"].values() for res in runs})
    return out


def summarize(results: dict) -> list[tuple]:
    """Rows (figure, unrolled, scanned, scanned/unrolled) from the raw runs; also stored in results['summary']."""
    rows = []
    comp = results.get("compile")
    if comp:
        for key, runs in comp["runs"].items():
            preset, tower = key.split("_")
            for field, label in (("lower_s", "lower s"), ("compile_s", "compile s"),
                                 ("compiled_text_chars", "compiled text chars")):
                vals = {}
                for name, _ in VARIANTS:
                    if any(r.get("timed_out") for r in runs[name]) and field != "lower_s":
                        vals[name] = f">{comp['timeout_s']:.0f}"
                    else:
                        vals[name] = _median(r[field] for r in runs[name])
                rows.append((f"{preset.upper()} {tower}: {label}", vals["unrolled"], vals["scanned"]))
    rt = results.get("runtime")
    if rt:
        new = rt["new_tokens"]
        per_child = {name: [{"load_s": r["load_s"], "first_generate_s": r["first_generate_s"],
                             "prefill_s": _median(r["prefill_s"]), "decode_tok_s": (new - 1) / _median(r["decode_s"]),
                             "peak_rss_gib": r["peak_rss_gib"]} for r in runs] for name, runs in rt["runs"].items()}
        rt["per_child"] = per_child
        tag = f"2B {rt['prompt_tokens']}-tok prompt [{'/'.join(rt['backend'])}]"
        for field, label in (("load_s", "load s"), ("first_generate_s", "first generate (compile) s"),
                             ("prefill_s", "prefill s"), ("decode_tok_s", f"decode tok/s ({new} forced)"),
                             ("peak_rss_gib", "peak RSS GiB")):
            rows.append((f"{tag}: {label}", _median(c[field] for c in per_child["unrolled"]),
                         _median(c[field] for c in per_child["scanned"])))
    out = []
    for label, u, s in rows:
        ratio = s / u if isinstance(u, (int, float)) and isinstance(s, (int, float)) and u else None
        out.append((label, u, s, ratio))
    results["summary"] = [{"figure": label, "unrolled": u, "scanned": s, "scanned_over_unrolled": ratio}
                          for label, u, s, ratio in out]
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if abs(v) >= 10000:
        return f"{v:,.0f}"
    return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile", action="store_true", help="lowering / compile time, 7B and 72B, abstract weights")
    ap.add_argument("--runtime", action="store_true", help="CPU prefill / decode of the random-weight 2B")
    ap.add_argument("--presets", nargs="+", default=["7b", "72b"], choices=["2b", "7b", "72b"])
    ap.add_argument("--compile-rounds", type=int, default=3)
    ap.add_argument("--compile-timeout", type=float, default=600.0)
    ap.add_argument("--rounds", type=int, default=3, help="runtime: alternating rounds")
    ap.add_argument("--repeats", type=int, default=3, help="runtime: timed generates per child")
    ap.add_argument("--prompt", type=int, default=256, help="runtime: prompt tokens")
    ap.add_argument("--new", type=int, default=32, help="runtime: forced new tokens")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not args.compile and not args.runtime:
        args.compile = args.runtime = True

    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.update({"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})
    if args.compile:
        results["compile"] = run_compile(args)
    if args.runtime:
        results["runtime"] = run_runtime(args)
    rows = summarize(results)

    print("\nscan_layers: medians over alternating fresh-process rounds (no compilation cache)")
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':{width}} {'unrolled':>12} {'scanned':>12} {'scanned/unrolled':>17}")
    for label, u, s, ratio in rows:
        print(f"{label:{width}} {_fmt(u):>12} {_fmt(s):>12} {_fmt(ratio):>17}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
