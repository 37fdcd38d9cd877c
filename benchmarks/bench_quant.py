"""Weight-only quantization on the real Qwen2-VL-2B shapes: decode speed, load memory and quality, bf16 vs int8 / int4.

    python benchmarks/bench_quant.py                  # 3 rounds of (bf16, int8, int4) processes: ~15 min here
    python benchmarks/bench_quant.py --rounds 5 --repeats 3

One random-weight 2B checkpoint in bf16 (benchmarks/common.py, built once). Every measurement runs in a fresh
subprocess; the three modes alternate (bf16, int8, int4, then int8, int4, bf16, ...) for `--rounds` rounds, and the
table shows medians over rounds, so a slow phase of this noisy machine hits every mode alike. Each process:

* loads `from_pretrained(ckpt, dtype="bfloat16", quantization=mode)`: int8 / int4 quantize each weight as it
  streams in (the decoder's projections and the tied embedding, `quantization.DEFAULT_TARGETS`). Peak RSS growth
  of that call (the kernel's high-water mark minus the RSS after imports) against the issue's bound,
  quantized parameter bytes + 1.5 GB;
* decodes 32 forced tokens after the 448x448 photo + 20 text tokens (bench_cpu.py's `img448` prompt), `--repeats`
  times: tokens/s of the decode steps (`GenerateOutput.decode_seconds`), and the percent of the streaming roofline
  for the bytes a decode step reads (the decoder's weights and the output projection, as stored: integers plus
  scales), with the read bandwidth measured by bench_cpu.py's roofline worker once per round (median);
* (first round) the logits of one teacher-forced sequence (the same prompt and 32 fixed text tokens) at the last
  33 positions, from which the parent computes the KL divergence KL(bf16 || mode) and the top-1 agreement with the
  bf16 model. The weights are random, so these are not a quality claim about the real model (docs/PARITY.md).

Prints a table, writes benchmarks/results/quant.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_cpu import N_NEW, TEXT_20, _cpu_name, load_inputs, make_inputs  # noqa: E402

MODES = ("bfloat16", "int8", "int4")
RSS_SLACK = 1.5e9  # the bound: peak growth <= quantized bytes + 1.5 GB
KEEP = N_NEW + 1  # teacher-forced positions compared


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def decode_bytes(model) -> int:
    """Bytes one decode step reads from the weights: every decoder layer's parameters and the output projection
    (lm_head, or the tied embedding), as stored; the embedding lookup of an untied model reads one row."""
    from qwen2vl_jax.modeling.parameters import model_params

    total = 0
    for path, p in model_params(model).items():
        if path.startswith(("language_model.layers.", "language_model.norm.", "lm_head.")) or (
                path.startswith("language_model.embed_tokens.") and model.config.tie_word_embeddings):
            total += p[...].nbytes
    return total


def worker(ckpt: Path, mode: str, inputs_path: Path, repeats: int, logits_out: str | None) -> dict:
    import jax
    import jax.numpy as jnp
    import psutil

    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

    jax.block_until_ready(jnp.zeros(8) + 1)
    baseline = psutil.Process().memory_info().rss
    t = time.perf_counter()
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        ckpt, dtype="bfloat16", quantization=None if mode == "bfloat16" else mode)
    load_s = time.perf_counter() - t
    peak_load = _peak_rss()
    from qwen2vl_jax.modeling.parameters import model_params

    param_bytes = sum(p[...].nbytes for p in model_params(model).values())
    res = {"mode": mode, "load_s": load_s, "load_rss_growth": peak_load - baseline, "param_bytes": param_bytes,
           "decode_bytes": decode_bytes(model), "backend": jax.default_backend()}
    x = load_inputs(inputs_path)["img448"]
    kw = dict(do_sample=False, repetition_penalty=1.0, return_dict=True)
    run = lambda: model.generate(**x, max_new_tokens=N_NEW, min_new_tokens=N_NEW, **kw)  # noqa: E731
    first = run()
    outs = [run() for _ in range(repeats)]
    res["decode_tok_s"] = [(N_NEW - 1) / o.decode_seconds for o in outs]
    res["decode_compile_s"] = first.decode_seconds - float(np.median([o.decode_seconds for o in outs]))
    res["tokens"] = np.asarray(outs[-1].sequences[0, -N_NEW:]).tolist()
    if logits_out:
        ids = np.concatenate([x["input_ids"], forced_tokens(ckpt)[None]], axis=1)
        logits = model(input_ids=ids, attention_mask=np.ones_like(ids), pixel_values=x["pixel_values"],
                       image_grid_thw=x["image_grid_thw"]).logits
        np.save(logits_out, np.asarray(logits[0, -KEEP:], np.float32))
    res["peak_rss"] = _peak_rss()
    return res


def forced_tokens(ckpt: Path) -> np.ndarray:
    """The 32 text tokens appended to the prompt for the teacher-forced logits."""
    from qwen2vl_jax.processing.processor import Qwen2VLProcessor

    ids = Qwen2VLProcessor.from_pretrained(ckpt).tokenizer.encode((TEXT_20 + " ") * 3)
    return np.asarray(ids[20:20 + N_NEW], np.int64)


def quality(reference: np.ndarray, other: np.ndarray) -> dict:
    """KL(reference || other) per position (nats, float64 softmax) and top-1 agreement."""
    def log_softmax(z):
        z = z.astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(reference), log_softmax(other)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1_agreement": float((reference.argmax(-1) == other.argmax(-1)).mean()),
            "positions": int(len(kl))}


def _run(args, cmd_extra: list[str], out: Path) -> dict:
    cmd = [sys.executable, __file__, "--out", str(out), *cmd_extra]
    subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return json.loads(out.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="processes per mode, alternating (default 3)")
    ap.add_argument("--repeats", type=int, default=3, help="timed 32-token decodes per process (default 3)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quant.json"))
    ap.add_argument("--worker", choices=[*MODES, "roofline"], help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--logits", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from benchmarks.common import build_random_2b_checkpoint, default_2b_path

    ckpt = build_random_2b_checkpoint(default_2b_path())
    if args.worker == "roofline":
        from benchmarks.bench_cpu import worker_roofline

        Path(args.out).write_text(json.dumps(worker_roofline(5)))
        return 0
    if args.worker:
        result = worker(ckpt, args.worker, Path(args.inputs), args.repeats, args.logits)
        Path(args.out).write_text(json.dumps(result))
        return 0

    work = Path(args.out).parent
    work.mkdir(parents=True, exist_ok=True)
    inputs = work / "quant_inputs.npz"
    make_inputs(ckpt, inputs)
    t0 = time.time()
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    roofs: list[dict] = []
    logits: dict[str, np.ndarray] = {}
    for r in range(args.rounds):
        print(f"== round {r + 1}: roofline", flush=True)  # every round: the machine's speed moves with its load
        roofs.append(_run(args, ["--worker", "roofline"], work / "quant_roofline.json"))
        order = MODES[r % 3:] + MODES[:r % 3]
        for mode in order:
            print(f"== round {r + 1}: {mode}", flush=True)
            extra = ["--worker", mode, "--inputs", str(inputs), "--repeats", str(args.repeats)]
            lpath = work / f"quant_logits_{mode}.npy"
            if r == 0:
                extra += ["--logits", str(lpath)]
            runs[mode].append(_run(args, extra, work / f"quant_{mode}.json"))
            if r == 0:
                logits[mode] = np.load(lpath)
                lpath.unlink()

    roof = {key: float(np.median([x[key] for x in roofs])) for key in roofs[0]}
    roof["read_gb_s_per_round"] = [x["read_gb_s"] for x in roofs]
    summary = {}
    for mode, rs in runs.items():
        rates = [float(np.median(x["decode_tok_s"])) for x in rs]
        tok_s = float(np.median(rates))
        growth = float(np.median([x["load_rss_growth"] for x in rs]))
        summary[mode] = {
            "decode_tok_s": tok_s, "decode_tok_s_per_round": rates, "decode_bytes": rs[0]["decode_bytes"],
            "param_bytes": rs[0]["param_bytes"], "load_s": float(np.median([x["load_s"] for x in rs])),
            "load_rss_growth": growth, "peak_rss": float(np.median([x["peak_rss"] for x in rs])),
            "roofline_fraction": tok_s * rs[0]["decode_bytes"] / (roof["read_gb_s"] * 1e9),
            "tokens_same_as_bf16": rs[0]["tokens"] == runs["bfloat16"][0]["tokens"]}
    base = summary["bfloat16"]["decode_tok_s"]
    for mode in MODES:
        s = summary[mode]
        s["speedup_vs_bf16"] = s["decode_tok_s"] / base
        s["rss_bound"] = s["param_bytes"] + RSS_SLACK
        if mode != "bfloat16":
            s.update(quality(logits["bfloat16"], logits[mode]))

    gb = 1e9
    lines = [f"Qwen2-VL-2B (random weights) decode, 32 forced tokens after a 448x448 photo + 20 tokens; "
             f"{args.rounds} alternating processes per mode x {args.repeats} decodes; medians. Streaming read "
             f"bandwidth (fp32 gemv over 1.1 GB, once per round, median): {roof['read_gb_s']:.1f} GB/s",
             f"{'':22}" + "".join(f"{m:>12}" for m in MODES)]

    def row(name, fn):
        lines.append(f"{name:22}" + "".join(f"{fn(summary[m]):>12}" for m in MODES))

    row("decode tok/s", lambda s: f"{s['decode_tok_s']:.2f}")
    row("  x bf16", lambda s: f"{s['speedup_vs_bf16']:.2f}x")
    row("GB read / token", lambda s: f"{s['decode_bytes'] / gb:.3f}")
    row("% of roofline", lambda s: f"{s['roofline_fraction']:.0%}")
    row("parameters GB", lambda s: f"{s['param_bytes'] / gb:.2f}")
    row("load s", lambda s: f"{s['load_s']:.1f}")
    row("load RSS growth GB", lambda s: f"{s['load_rss_growth'] / gb:.2f}")
    row("  bound (params+1.5)", lambda s: f"{s['rss_bound'] / gb:.2f}")
    row("peak RSS GB", lambda s: f"{s['peak_rss'] / gb:.2f}")
    row("KL(bf16||q) mean", lambda s: f"{s['kl_mean']:.2e}" if "kl_mean" in s else "-")
    row("top-1 agreement", lambda s: f"{s['top1_agreement']:.1%}" if "top1_agreement" in s else "-")
    row("greedy = bf16's", lambda s: str(s["tokens_same_as_bf16"]))
    print("\n".join(lines))
    machine = {"cpu": _cpu_name(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"),
               "wall_s": round(time.time() - t0)}
    Path(args.out).write_text(json.dumps({"machine": machine, "roofline": roof, "summary": summary, "runs": runs,
                                          "table": lines}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
