"""Generation speed on small checkpoints: prefill time and decode ms/token, ours vs transformers, same inputs.

Models: the tiny random test model and a real-width 2-layer slice of Qwen2-VL-2B (both built with transformers
and cached under ~/.cache/qwen2vl_jax_bench). Input: a real photo (astronaut, 448x448 -> 256 vision tokens) in
the Instruct chat template. 32 forced new tokens (min_new_tokens = max_new_tokens), greedy, fp32.
Compile time is reported separately from steady state; steady-state numbers are medians of `--repeats` runs.

    python benchmarks/bench_generation.py [--repeats 3] [--models tiny,2b-slice]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from qwen2vl_jax.runtime import use_exact_cpu_fp32_matmuls  # noqa: E402

use_exact_cpu_fp32_matmuls()

import numpy as np  # noqa: E402

CACHE = Path(os.environ.get("QWEN2VL_JAX_BENCH_CACHE", Path.home() / ".cache" / "qwen2vl_jax_bench"))
N_NEW = 32


def _checkpoint(name: str) -> Path:
    import helpers
    import qwen_tokenizer_files

    tok = CACHE / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        qwen_tokenizer_files.write_tokenizer_files(tok)
    path = CACHE / f"gen-{name}"
    if not (path / "config.json").is_file():
        text, vision = {"tiny": (helpers.TINY_TEXT, helpers.TINY_VISION),
                        "2b-slice": (helpers.SLICE_2B_TEXT, helpers.SLICE_2B_VISION)}[name]
        helpers.build_checkpoint(path, text=text, vision=vision, tied=name == "2b-slice", tokenizer_dir=tok)
    return path


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def bench(name: str, repeats: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    import helpers
    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

    torch.set_num_threads(2)
    path = _checkpoint(name)
    tok = AutoTokenizer.from_pretrained(path)
    inputs = helpers.hf_inputs(tok, [helpers.chat("Describe this picture in detail.", 1)],
                               images=[helpers.photo("astronaut")],
                               image_processor=helpers.hf_image_processor(max_pixels=448 * 448))
    kw = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, repetition_penalty=1.0)
    row = {"model": name, "prompt_tokens": int(inputs["input_ids"].shape[1])}

    ours = Qwen2VLForConditionalGeneration.from_pretrained(path)
    t = time.perf_counter()
    first = ours.generate(**inputs, return_dict=True, **kw)
    row["ours_first_call_s"] = time.perf_counter() - t  # includes compiles
    runs = [ours.generate(**inputs, return_dict=True, **kw) for _ in range(repeats)]
    assert all(r.new_tokens == N_NEW for r in runs)
    row["ours_prefill_s"] = float(np.median([r.prefill_seconds for r in runs]))
    row["ours_decode_ms_per_token"] = float(np.median([r.decode_seconds / (N_NEW - 1) * 1e3 for r in runs]))
    steady = row["ours_prefill_s"] + row["ours_decode_ms_per_token"] * (N_NEW - 1) / 1e3
    row["ours_compile_s"] = row["ours_first_call_s"] - steady  # first call minus a steady-state call

    hf = helpers.load_hf_model(path, attn="sdpa")
    t_inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        hf.generate(**t_inputs, **kw)  # warm-up
        row["hf_prefill_s"] = _median_time(lambda: hf(**t_inputs), repeats)
        total = _median_time(lambda: hf.generate(**t_inputs, **kw), repeats)
    row["hf_decode_ms_per_token"] = (total - row["hf_prefill_s"]) / (N_NEW - 1) * 1e3
    same = np.array_equal(first.sequences, hf.generate(**t_inputs, **kw).numpy())
    row["tokens_identical"] = bool(same)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="tiny,2b-slice")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generation.json"))
    args = ap.parse_args(argv)
    rows = [bench(m, args.repeats) for m in args.models.split(",")]
    header = ("model", "prompt", "ours prefill s", "HF prefill s", "ours decode ms/tok", "HF decode ms/tok",
              "ours compile s", "same tokens")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join([r["model"], str(r["prompt_tokens"]), f"{r['ours_prefill_s']:.3f}", f"{r['hf_prefill_s']:.3f}",
                          f"{r['ours_decode_ms_per_token']:.2f}", f"{r['hf_decode_ms_per_token']:.2f}",
                          f"{r['ours_compile_s']:.1f}", str(r["tokens_identical"])]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
