"""What the hook points cost: the forward with no hooks against the code before them, and hooked runs' overhead.

    python benchmarks/bench_hooks.py [--base-ref 44ef744] [--model 2b|tiny] [--dtypes bfloat16 float32]
                                     [--rounds 3] [--repeats 5]

The code before the hook points is checked out at `--base-ref` into a temporary git worktree. Each measurement is
a fresh subprocess importing one tree (PYTHONPATH), loading the model (the random-weight 2B checkpoint of
benchmarks/common.py, or the tiny demo checkpoint), processing one photo (`--max-pixels`, default 224²) + prompt,
compiling, then timing
`--repeats` forwards (`model(**inputs).logits`, blocked until ready): its median. The two trees alternate
(base, head, base, head, ...) for `--rounds` rounds, since this machine is noisy; the table reports the median
over rounds and the head/base ratio, and whether the optimised HLO of the vision tower and the forward is the same
text in both trees (names and source locations aside). In the head tree it also times a run with identity hooks on every
residual-stream point (`run_with_hooks`) and a `run_with_cache` of every layer's `resid_post`.
No PyTorch column: this compares our code with itself (the forward's speed against transformers is in
docs/BENCHMARKS.md). Prints a table and writes benchmarks/results/hooks.json.
"""

from __future__ import annotations

import argparse
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

RESULTS = REPO / "benchmarks" / "results" / "hooks.json"

CHILD = r"""
import json, statistics, sys, time
import numpy as np, jax
from PIL import Image
path, dtype, repeats, hooked, max_pixels = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", \
    int(sys.argv[5])
from qwen2vl_jax import Qwen2VLForConditionalGeneration, Qwen2VLProcessor
import skimage.data
model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
processor = Qwen2VLProcessor.from_pretrained(path)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
photo = Image.fromarray(skimage.data.astronaut())
inputs = dict(processor(text=[processor.apply_chat_template(messages)], images=[photo], max_pixels=max_pixels))

def timed(fn):
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter(); jax.block_until_ready(fn()); times.append(time.perf_counter() - t)
    return statistics.median(times)

out = {"forward": timed(lambda: model(**inputs).logits), "tokens": int(inputs["input_ids"].shape[1])}
if hooked:
    from qwen2vl_jax import hooks
    names = [n for n in hooks.list_hook_points(model) if n.endswith(("resid_pre", "resid_mid", "resid_post"))]
    ident = {n: (lambda v, ctx: v) for n in names}
    out["identity_hooks"] = timed(lambda: hooks.run_with_hooks(model, ident, **inputs).logits)
    out["cache_resid_post"] = timed(lambda: hooks.run_with_cache(model, "text.layers.*.resid_post", **inputs))
    out["hooked_points"] = len(names)
print("RESULT " + json.dumps(out))
"""


# The compiled programs themselves: optimised HLO of every program the forward compiles (the vision tower and the
# forward), dumped by XLA while the child runs `model(**inputs)` through the public API (so any tree works),
# compared with names, metadata and source locations stripped (`compare_programs.normalized_hlo`): the same text in
# both trees means any timing difference is noise.
CHILD_HLO = r"""
import sys
from PIL import Image
import skimage.data
from qwen2vl_jax import Qwen2VLForConditionalGeneration, Qwen2VLProcessor
path, dtype, max_pixels = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
pr = Qwen2VLProcessor.from_pretrained(path)
msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
inp = pr(text=[pr.apply_chat_template(msgs)], images=[Image.fromarray(skimage.data.astronaut())],
         max_pixels=max_pixels)
m(**inp).logits.block_until_ready()
"""


def _hlo(tree: Path, path: Path, dtype: str, max_pixels: int) -> str:
    from benchmarks.compare_programs import normalized_hlo

    with tempfile.TemporaryDirectory() as dump:
        env = {**os.environ, "PYTHONPATH": str(tree), "QWEN2VL_JAX_COMPILE_CACHE": "0",
               "XLA_FLAGS": f"--xla_dump_to={dump} --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$"}
        done = subprocess.run([sys.executable, "-c", CHILD_HLO, str(path), dtype, str(max_pixels)],
                              capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=1800)
        if done.returncode:
            raise RuntimeError(f"HLO child in {tree} failed:\n{done.stderr[-3000:]}")
        return "\n".join(normalized_hlo(f.read_text())
                         for f in sorted(Path(dump).glob("*.cpu_after_optimizations.txt")))


def _child(tree: Path, path: Path, dtype: str, repeats: int, hooked: bool, max_pixels: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), dtype, str(repeats), "1" if hooked else "0",
                           str(max_pixels)],
                          capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=3600)
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    if done.returncode or not line:
        raise RuntimeError(f"child in {tree} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(line[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-ref", default="44ef744", help="commit before the hook points")
    ap.add_argument("--model", choices=["2b", "tiny"], default="2b")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-pixels", type=int, default=224 * 224, help="the photo's processor max_pixels")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()

    if args.model == "2b":
        from benchmarks.common import build_random_2b_checkpoint, default_2b_path

        path = default_2b_path()
        build_random_2b_checkpoint(path)
    else:
        from qwen2vl_jax.testing import demo

        path = demo.tiny_checkpoint()
    results = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "model": args.model,
               "base_ref": args.base_ref, "repeats": args.repeats, "rounds": args.rounds,
               "max_pixels": args.max_pixels, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base_ref], cwd=REPO, check=True,
                       capture_output=True)
        try:
            for dtype in args.dtypes:
                runs = {"base": [], "head": []}
                for r in range(args.rounds):
                    for name, tree in (("base", base), ("head", REPO)):
                        t0 = time.perf_counter()
                        res = _child(tree, path, dtype, args.repeats, hooked=name == "head", max_pixels=args.max_pixels)
                        runs[name].append(res)
                        print(f"{dtype} round {r} {name}: forward {res['forward']:.3f} s "
                              f"({time.perf_counter() - t0:.0f} s with load)", flush=True)
                results["runs"][dtype] = runs
                same = _hlo(base, path, dtype, args.max_pixels) == _hlo(REPO, path, dtype, args.max_pixels)
                results[f"same_compiled_program_{dtype}"] = same
                print(f"{dtype}: compiled vision + forward programs identical to the base tree's: {same}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, capture_output=True)

    rows = []
    for dtype, runs in results["runs"].items():
        med = lambda side, key: statistics.median(r[key] for r in runs[side])
        base_t, head_t = med("base", "forward"), med("head", "forward")
        rows.append((dtype, base_t, head_t, head_t / base_t, med("head", "identity_hooks"),
                     med("head", "cache_resid_post")))
        results[f"summary_{dtype}"] = {"base_forward_s": base_t, "head_forward_s": head_t,
                                       "head_over_base": head_t / base_t,
                                       "identity_hooks_s": rows[-1][4], "cache_resid_post_s": rows[-1][5],
                                       "per_round_ratio": [h["forward"] / b["forward"]
                                                           for b, h in zip(runs["base"], runs["head"])]}
    print(f"\nforward, {args.model}, one photo + prompt ({results['runs'][args.dtypes[0]]['head'][0]['tokens']} "
          f"tokens); medians of {args.repeats} inside each process, median over {args.rounds} alternating rounds")
    print(f"{'dtype':10} {'before (s)':>11} {'no hooks (s)':>13} {'ratio':>7} {'identity hooks':>15} "
          f"{'cache resid':>12}")
    for dtype, b, h, ratio, ident, cache in rows:
        print(f"{dtype:10} {b:11.3f} {h:13.3f} {ratio:7.3f} {ident:15.3f} {cache:12.3f}   same program: "
              f"{results[f'same_compiled_program_{dtype}']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
