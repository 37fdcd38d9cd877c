"""CPU benchmark: qwen2vl_jax vs Hugging Face PyTorch on one random-weight Qwen2-VL-2B checkpoint, same inputs.

    python benchmarks/bench_cpu.py                 # fp32 and bf16, medians of 3: ~2 hours on 2 cores (HF bf16 is slow
                                                   # where the CPU has no bf16 instructions)
    python benchmarks/bench_cpu.py --quick         # skip the 896x896 input
    python benchmarks/bench_cpu.py --dtypes bfloat16 --repeats 5
    python benchmarks/bench_cpu.py --repeats-896 1 # one run of the 896x896 case (HF bf16 takes minutes per run)
    python benchmarks/bench_cpu.py --cold-start-only --dtypes float32   # only the cold-start rows (below)

One checkpoint (benchmarks/common.py, built once with transformers, reused). The parent process preprocesses the
inputs once (our processor, identical to HF's) and every (implementation, dtype) pair runs in its own fresh
subprocess, so memory, threads and caches never mix. PyTorch runs with 2 threads and SDPA attention (its default).
Measured per pair: load time, vision encoder time, prefill latency (448x448 photo + 20 text tokens; 896x896 + 20;
text-only 128 tokens), time to first token, decode tok/s over 32 forced tokens (min_new_tokens = max_new_tokens),
our compile time (first call minus steady state), peak RSS. Steady-state figures are medians of `--repeats` runs.
A roofline worker measures this machine's streaming read bandwidth and matmul rate in the same run.
Cold start (`--cold-start-only` runs just these; `--no-cold-start` skips them): process start -> first token, i.e.
from spawning a fresh process until `generate(max_new_tokens=1)` returns, imports, load, image preprocessing (each
side's own image processor on the 448x448 photo, saved as PNG), compile, vision and prefill included; ours with an
EMPTY persistent XLA compile cache (a fresh directory per run) and with a WARM one (filled by the first empty run),
HF once (PyTorch has no compile cache: its cold and warm are the same); processes alternate, medians of
`--repeats`, with a per-phase breakdown (ours: trace / lower / XLA compile / cache reads inside the first call).
Prints the table with ours/HF ratios, writes benchmarks/results/cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_NEW = 32
TEXT_20 = ("Please describe everything you can see in this picture, including the colours and the people there. "
           "Then tell me what you think is happening.")


def _median(xs):
    return float(np.median(xs))


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# ------------------------------------------------------------------------------------------------- inputs
def make_inputs(ckpt: Path, out: Path, image: Path | None = None) -> dict:
    """Processed inputs shared by both implementations, saved as .npz (and the 448x448 photo as `image`, PNG)."""
    from PIL import Image

    from qwen2vl_jax.processing.processor import Qwen2VLProcessor

    sys.path.insert(0, str(ROOT / "tests"))
    import helpers

    proc = Qwen2VLProcessor.from_pretrained(ckpt)
    text_ids = proc.tokenizer.encode(TEXT_20)[:20]
    assert len(text_ids) == 20
    photo, out_image = helpers.photo("astronaut"), image
    saved = {}
    for side in (448, 896):
        image = photo.resize((side, side), Image.BICUBIC)
        if side == 448 and out_image is not None:
            image.save(out_image)
        vis = proc.image_processor(images=[image])
        assert vis["image_grid_thw"][0].tolist() == [1, side // 14, side // 14]
        n = int(np.prod(vis["image_grid_thw"][0])) // 4
        ids = np.array([[151652] + [151655] * n + [151653] + text_ids], np.int64)
        saved[f"img{side}_input_ids"] = ids
        saved[f"img{side}_pixel_values"] = vis["pixel_values"]
        saved[f"img{side}_image_grid_thw"] = vis["image_grid_thw"]
    words = (TEXT_20 + " ") * 12
    saved["text128_input_ids"] = np.array([proc.tokenizer.encode(words)[:128]], np.int64)
    np.savez(out, **saved)
    return {k: v.shape for k, v in saved.items()}


def load_inputs(path: Path) -> dict[str, dict]:
    raw = np.load(path)
    cases = {}
    for key in raw.files:
        case, name = key.split("_", 1)
        cases.setdefault(case, {})[name] = raw[key]
    for c in cases.values():
        c["attention_mask"] = np.ones_like(c["input_ids"])
    return cases


# ------------------------------------------------------------------------------------------------ workers
def worker_ours(ckpt: Path, dtype: str, inputs_path: Path, repeats: int, cases: list[str], big_repeats: int) -> dict:
    import jax

    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

    res = {"impl": "ours", "dtype": dtype, "jax": jax.__version__}
    t, model = _timed(lambda: Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=dtype))
    res["load_s"] = t
    inputs = load_inputs(inputs_path)
    gen_kw = dict(do_sample=False, repetition_penalty=1.0)
    for case in cases:
        x = inputs[case]
        r = {"repeats": (reps := big_repeats if case == "img896" else repeats)}
        if "pixel_values" in x:
            def vision():
                pixels, layout = model.visual.prepare(x["pixel_values"], x["image_grid_thw"])
                return jax.block_until_ready(model.visual.run_padded(pixels, layout)[0])
            first, _ = _timed(vision)
            r["vision_s"] = _median([_timed(vision)[0] for _ in range(reps)])
            r["vision_compile_s"] = first - r["vision_s"]

        def prefill():
            return model.generate(**x, max_new_tokens=1, return_dict=True, **gen_kw)
        first, _ = _timed(prefill)
        runs = [_timed(prefill) for _ in range(reps)]
        r["prefill_s"] = _median([o.prefill_seconds for _, o in runs])  # vision + LM prefill + first token pick
        r["ttft_s"] = _median([t for t, _ in runs])  # the whole generate(max_new_tokens=1) call
        r["compile_s"] = first - r["ttft_s"]
        if case == "img448":
            def decode():
                return model.generate(**x, max_new_tokens=N_NEW, min_new_tokens=N_NEW, return_dict=True, **gen_kw)
            first, out = _timed(decode)
            assert out.new_tokens == N_NEW
            r["decode_compile_s"] = first - out.prefill_seconds - out.decode_seconds
            outs = [decode() for _ in range(reps)]
            r["decode_tok_s"] = _median([(N_NEW - 1) / o.decode_seconds for o in outs])
            r["tokens"] = outs[-1].sequences[0, -N_NEW:].tolist()
        res[case] = r
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return res


class _StepClock:
    """A transformers streamer that timestamps every put(): the prompt, then one call per new token."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def worker_hf(ckpt: Path, dtype: str, inputs_path: Path, repeats: int, cases: list[str], big_repeats: int) -> dict:
    import torch
    import transformers
    from transformers import Qwen2VLForConditionalGeneration

    torch.set_num_threads(2)
    res = {"impl": "hf", "dtype": dtype, "torch": torch.__version__, "transformers": transformers.__version__}
    t, model = _timed(lambda: Qwen2VLForConditionalGeneration.from_pretrained(
        ckpt, dtype=getattr(torch, dtype), attn_implementation="sdpa").eval())
    res["load_s"] = t
    inputs = load_inputs(inputs_path)
    gen_kw = dict(do_sample=False, repetition_penalty=1.0)
    for case in cases:
        x = {k: torch.from_numpy(v) for k, v in inputs[case].items()}
        r = {"repeats": (reps := big_repeats if case == "img896" else repeats)}
        with torch.inference_mode():
            small = case != "img896"  # PyTorch needs no compile; skip its warm-up where one run takes minutes
            if "pixel_values" in x:
                vision = lambda: model.model.visual(x["pixel_values"].to(model.dtype), x["image_grid_thw"])  # noqa: E731
                if small:
                    vision()
                r["vision_s"] = _median([_timed(vision)[0] for _ in range(reps)])
            if small:
                model(**x)
            r["prefill_s"] = _median([_timed(lambda: model(**x))[0] for _ in range(reps)])  # a full forward
            r["ttft_s"] = _median([_timed(lambda: model.generate(**x, max_new_tokens=1, **gen_kw))[0]
                                   for _ in range(reps)]) if small else None
            if case == "img448":
                rates = []
                for _ in range(reps):  # time the decode steps themselves: prefill noise would swamp them
                    clock = _StepClock()
                    out = model.generate(**x, max_new_tokens=N_NEW, min_new_tokens=N_NEW, streamer=clock, **gen_kw)
                    rates.append((N_NEW - 1) / (clock.stamps[-1] - clock.stamps[1]))
                r["decode_tok_s"] = _median(rates)
                r["tokens"] = out[0, -N_NEW:].tolist()
        res[case] = r
    res["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return res


def worker_roofline(repeats: int) -> dict:
    """This machine, now: streaming read bandwidth (fp32 gemv over 1 GB of weights, L3-proof) and matmul rates."""
    import jax
    import jax.numpy as jnp

    nk = (((1,), (1,)), ((), ()))
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.standard_normal((8960, 1536), np.float32)) for _ in range(20)]  # 1.1 GB
    x = jnp.ones((1, 1536), jnp.float32)
    gemv = jax.jit(lambda x, ws: [jax.lax.dot_general(x, w, nk) for w in ws])
    jax.block_until_ready(gemv(x, ws))
    t = _median([_timed(lambda: jax.block_until_ready(gemv(x, ws)))[0] for _ in range(repeats + 2)])
    out = {"read_gb_s": sum(w.nbytes for w in ws) / t / 1e9}
    ws.clear()  # free the 1.1 GB before the matmul measurements
    a = jnp.asarray(rng.standard_normal((1024, 1280), np.float32))
    b = jnp.asarray(rng.standard_normal((5120, 1280), np.float32))
    for name, dt in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16)):
        mm = jax.jit(lambda a, b: jax.lax.dot_general(a, b, nk, preferred_element_type=jnp.float32))
        aa, bb = a.astype(dt), b.astype(dt)
        jax.block_until_ready(mm(aa, bb))
        t = _median([_timed(lambda: jax.block_until_ready(mm(aa, bb)))[0] for _ in range(repeats + 2)])
        out[f"matmul_gflop_s_{name}"] = 2 * 1024 * 1280 * 5120 / t / 1e9
    return out


# --------------------------------------------------------------------------------------------- cold start
def _cold_inputs(inputs_path: Path, vis: dict) -> dict:
    """The 448 case's token ids (precomputed text) around this process's own pixel rows."""
    ids = load_inputs(inputs_path)["img448"]["input_ids"]
    n = int(np.prod(np.asarray(vis["image_grid_thw"])[0])) // 4
    assert ids.shape[1] == n + 22, "the image processor's grid differs from the precomputed input"
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "pixel_values": vis["pixel_values"],
            "image_grid_thw": vis["image_grid_thw"]}


def worker_cold_ours(ckpt: Path, dtype: str, inputs_path: Path, image: Path, cache_dir: str) -> dict:
    stamps = {"start": time.time()}  # the interpreter is up (the parent measures from spawning it)
    import jax
    from PIL import Image

    from qwen2vl_jax import runtime
    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration
    from qwen2vl_jax.processing.image import Qwen2VLImageProcessor

    phases: dict[str, float] = {}

    def listen(event: str, seconds: float, **_) -> None:  # JAX's own timers: where the first call's time goes
        for key, name in (("backend_compile", "xla_compile"), ("cache_retrieval", "cache_read"),
                          ("jaxpr_trace", "trace"), ("jaxpr_to_mlir", "lower")):
            if key in event:
                phases[name] = phases.get(name, 0.0) + seconds

    jax.monitoring.register_event_duration_secs_listener(listen)
    assert runtime.enable_compilation_cache(cache_dir) is not None
    stamps["imports"] = time.time()
    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=dtype)
    stamps["load"] = time.time()
    proc = Qwen2VLImageProcessor.from_dict(json.loads((ckpt / "preprocessor_config.json").read_text()))
    x = _cold_inputs(inputs_path, proc(images=[Image.open(image).convert("RGB")]))
    stamps["preprocess"] = time.time()
    out = model.generate(**x, max_new_tokens=1, do_sample=False, return_dict=True)
    stamps["first_token"] = time.time()
    return {"stamps": stamps, "jax_phases": phases, "token": int(out.sequences[0, -1])}


def worker_cold_hf(ckpt: Path, dtype: str, inputs_path: Path, image: Path) -> dict:
    stamps = {"start": time.time()}
    import torch
    from PIL import Image
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor
    torch.set_num_threads(2)
    stamps["imports"] = time.time()
    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=getattr(torch, dtype),
                                                            attn_implementation="sdpa").eval()
    stamps["load"] = time.time()
    vis = Qwen2VLImageProcessor.from_pretrained(ckpt)(images=[Image.open(image).convert("RGB")], return_tensors="np")
    x = {k: torch.from_numpy(np.asarray(v)) for k, v in _cold_inputs(inputs_path, vis).items()}
    stamps["preprocess"] = time.time()
    with torch.inference_mode():
        out = model.generate(**x, max_new_tokens=1, do_sample=False, repetition_penalty=1.0)
        stamps["first_token"] = time.time()
    return {"stamps": stamps, "token": int(out[0, -1])}


def _cold_run(args, impl: str, dtype: str, inputs: Path, image: Path, out: Path, cache: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--dtype-worker", dtype, "--inputs", str(inputs),
           "--image", str(image), "--out", str(out)] + (["--cache-dir", str(cache)] if cache else [])
    spawned = time.time()
    subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1"))
    r = json.loads(out.read_text())
    st = r["stamps"]
    r["total_s"] = st["first_token"] - spawned
    r["phases_s"] = {"interpreter": st["start"] - spawned, "imports": st["imports"] - st["start"],
                     "load": st["load"] - st["imports"], "preprocess": st["preprocess"] - st["load"],
                     "first_call": st["first_token"] - st["preprocess"], **r.get("jax_phases", {})}
    print(f"   {impl:<10} {dtype:<9} {r['total_s']:7.2f} s  " + " ".join(
        f"{k} {v:.2f}" for k, v in r["phases_s"].items()), flush=True)
    return r


def cold_start(args, work: Path, inputs: Path, image: Path) -> dict:
    """Alternating processes per dtype: ours with an empty cache, ours with a warm cache, HF; `--repeats` rounds.
    The first empty-cache run's directory becomes the warm cache (copied once, before any warm run)."""
    import shutil
    import tempfile
    results: dict = {}
    for dtype in args.dtypes.split(","):
        warm = Path(tempfile.mkdtemp(prefix=f"qwen2vl_cold_warm_{dtype}_"))
        runs: dict[str, list] = {"ours_empty": [], "ours_warm": [], "hf": []}
        for i in range(args.repeats):
            empty = Path(tempfile.mkdtemp(prefix=f"qwen2vl_cold_empty_{dtype}_"))
            runs["ours_empty"].append(_cold_run(args, "cold-ours", dtype, inputs, image, work / "cold.json", empty))
            if i == 0:
                shutil.copytree(empty, warm, dirs_exist_ok=True)
            shutil.rmtree(empty, ignore_errors=True)
            runs["ours_warm"].append(_cold_run(args, "cold-ours", dtype, inputs, image, work / "cold.json", warm))
            if "hf" in args.impls.split(","):
                runs["hf"].append(_cold_run(args, "cold-hf", dtype, inputs, image, work / "cold.json", None))
        shutil.rmtree(warm, ignore_errors=True)
        results[dtype] = {k: {"runs": v, "total_s": _median([r["total_s"] for r in v]) if v else None,
                              "phases_s": {p: _median([r["phases_s"].get(p, 0.0) for r in v])
                                           for p in (v[0]["phases_s"] if v else {})}}
                          for k, v in runs.items()}
    return results


def cold_report(cold: dict) -> list[str]:
    lines = []
    for dtype, r in cold.items():
        hf = r["hf"]["total_s"]
        for key, label, target in (("ours_empty", "empty XLA cache", 1.0), ("ours_warm", "warm XLA cache", 0.5)):
            ours = r[key]["total_s"]
            ratio = f"{ours / hf:.2f}" if hf else "-"
            lines.append(f"{'cold start s (' + label + ')':<34} {dtype:<9} {_fmt(ours):>10} {_fmt(hf):>10} "
                         f"{ratio:>8}  (target <= {target})")
        for key in ("ours_empty", "ours_warm", "hf"):
            if r[key]["phases_s"]:
                lines.append(f"  phases {key} {dtype} (medians, s): " + ", ".join(
                    f"{k} {v:.2f}" for k, v in r[key]["phases_s"].items()))
    return lines


# ------------------------------------------------------------------------------------------------- report
def model_costs(ckpt: Path) -> dict:
    """Decode bytes per token and vision FLOPs, from the config."""
    from qwen2vl_jax.modeling.config import Qwen2VLConfig

    cfg = Qwen2VLConfig.from_hf(ckpt)
    t, v = cfg.text_config, cfg.vision_config
    D, F, H = t.hidden_size, t.intermediate_size, t.head_dim
    layer = D * (t.num_attention_heads * H) * 2 + D * (t.num_key_value_heads * H) * 2 + 3 * D * F
    lm_params = t.num_hidden_layers * layer + t.vocab_size * D  # the tied embedding is read once, as lm_head

    def vision_flops(patches: int) -> float:
        E, M = v.embed_dim, v.mlp_dim
        per_block = 2 * patches * (3 * E * E + E * E + 2 * E * M) + 4 * patches * patches * E
        merger = 2 * (patches // 4) * (v.merge_dim * v.merge_dim + v.merge_dim * t.hidden_size)
        return v.depth * per_block + merger + 2 * patches * v.patch_dim * E

    return {"lm_params_per_token": lm_params, "vision_flops": {"img448": vision_flops(1024),
                                                               "img896": vision_flops(4096)}}


def _fmt(x, unit=""):
    return "-" if x is None else f"{x:.2f}{unit}"


def report(results: dict, costs: dict, roof: dict) -> list[str]:
    lines = []
    header = f"{'figure':<34} {'dtype':<9} {'ours':>10} {'HF':>10} {'ours/HF':>8}"
    lines += [header, "-" * len(header)]
    for dtype in results:
        ours, hf = results[dtype].get("ours", {}), results[dtype].get("hf", {})
        rows = [("load s", ours.get("load_s"), hf.get("load_s"))]
        for case, label in (("img448", "448² photo + 20 tok"), ("img896", "896² photo + 20 tok"),
                            ("text128", "text-only 128 tok")):
            if case not in ours:
                continue
            o, h = ours[case], hf.get(case, {})
            if "vision_s" in o:
                rows.append((f"vision encoder s ({label[:4]})", o["vision_s"], h.get("vision_s")))
            rows.append((f"prefill s ({label})", o["prefill_s"], h.get("prefill_s")))
            if h.get("ttft_s") is not None:
                rows.append((f"TTFT s ({label})", o["ttft_s"], h.get("ttft_s")))
            rows.append((f"our compile s ({label})", o["compile_s"], None))
        if "img448" in ours and "decode_tok_s" in ours["img448"]:
            rows.append(("decode tok/s (32 forced)", ours["img448"]["decode_tok_s"], hf.get("img448", {}).get(
                "decode_tok_s")))
        rows.append(("peak RSS GB", ours.get("peak_rss_gb"), hf.get("peak_rss_gb")))
        for name, a, b in rows:
            ratio = f"{a / b:.2f}" if a is not None and b else "-"
            lines.append(f"{name:<34} {dtype:<9} {_fmt(a):>10} {_fmt(b):>10} {ratio:>8}")
        # roofline
        bytes_tok = costs["lm_params_per_token"] * (4 if dtype == "float32" else 2)
        bound = roof["read_gb_s"] * 1e9 / bytes_tok
        for impl, r in (("ours", ours), ("HF", hf)):
            rate = r.get("img448", {}).get("decode_tok_s")
            if rate:
                lines.append(f"  roofline decode {dtype}: {bytes_tok / 1e9:.2f} GB/token at {roof['read_gb_s']:.1f} "
                             f"GB/s -> <= {bound:.2f} tok/s; {impl} reaches {rate / bound:.0%}")
        mm = roof[f"matmul_gflop_s_{dtype}"]
        for case in ("img448", "img896"):
            if case in ours and "vision_s" in ours[case]:
                lb = costs["vision_flops"][case] / (mm * 1e9)
                frac = [f"{impl} {lb / r[case]['vision_s']:.0%}" for impl, r in (("ours", ours), ("HF", hf))
                        if case in r and r[case].get("vision_s")]
                lines.append(f"  roofline vision {case} {dtype}: {costs['vision_flops'][case] / 1e12:.2f} TFLOP at "
                             f"{mm:.0f} GFLOP/s -> >= {lb:.2f} s; reached: {', '.join(frac)}")
        o_tok, h_tok = ours.get("img448", {}).get("tokens"), hf.get("img448", {}).get("tokens")
        if o_tok and h_tok:
            lines.append(f"  greedy tokens ours vs HF ({dtype}): {sum(a == b for a, b in zip(o_tok, h_tok))}/{N_NEW} "
                         "identical")
    return lines


def _cpu_name() -> str:
    """Model name and the SIMD extensions that decide the dot paths (AVX-512 / AVX512-BF16 or not)."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    field = lambda key: next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith(key)), "")  # noqa: E731
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in field("flags").split()]
    return f"{field('model name')} (family {field('cpu family')} model {field('model')}; {' '.join(simd)})"


def _run_worker(args, impl: str, dtype: str, inputs: Path, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--dtype-worker", dtype, "--inputs", str(inputs),
           "--out", str(out), "--repeats", str(args.repeats), "--repeats-896", str(args.repeats_896),
           "--cases", args.cases]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    print(f"== {impl} {dtype}", flush=True)
    subprocess.run(cmd, check=True, env=env)
    return json.loads(out.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--impls", default="hf,ours")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-896", type=int, default=None,
                    help="runs of the 896x896 case (default: --repeats); an HF bf16 run takes minutes here")
    ap.add_argument("--quick", action="store_true", help="skip the 896x896 input")
    ap.add_argument("--cases", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cold-start-only", action="store_true", help="run only the process start -> first token rows")
    ap.add_argument("--no-cold-start", action="store_true", help="skip the process start -> first token rows")
    ap.add_argument("--worker", choices=["ours", "hf", "roofline", "cold-ours", "cold-hf"], help=argparse.SUPPRESS)
    ap.add_argument("--image", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", help=argparse.SUPPRESS)
    ap.add_argument("--dtype-worker", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="results JSON (default: benchmarks/results/cpu.json, or "
                    "cpu_cold_start.json with --cold-start-only)")
    args = ap.parse_args(argv)
    args.out = args.out or str(ROOT / "benchmarks" / "results" / (
        "cpu_cold_start.json" if args.cold_start_only else "cpu.json"))
    args.repeats_896 = args.repeats_896 or args.repeats
    from benchmarks.common import build_random_2b_checkpoint, default_2b_path

    if args.worker in ("cold-ours", "cold-hf"):  # the parent built the checkpoint (building imports torch)
        ckpt = default_2b_path()
        result = worker_cold_ours(ckpt, args.dtype_worker, Path(args.inputs), Path(args.image), args.cache_dir) \
            if args.worker == "cold-ours" else worker_cold_hf(ckpt, args.dtype_worker, Path(args.inputs),
                                                               Path(args.image))
        Path(args.out).write_text(json.dumps(result))
        return 0
    ckpt = build_random_2b_checkpoint(default_2b_path())
    if args.worker:
        cases = args.cases.split(",") if args.cases else []
        fn = {"ours": worker_ours, "hf": worker_hf}.get(args.worker)
        result = worker_roofline(args.repeats) if args.worker == "roofline" else fn(
            ckpt, args.dtype_worker, Path(args.inputs), args.repeats, cases, args.repeats_896)
        Path(args.out).write_text(json.dumps(result))
        return 0

    args.cases = args.cases or ("img448,text128" if args.quick else "img448,img896,text128")
    work = Path(args.out).parent
    work.mkdir(parents=True, exist_ok=True)
    inputs = work / "cpu_inputs.npz"
    make_inputs(ckpt, inputs, image=work / "cpu_photo448.png")
    t0 = time.time()
    machine = {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()}
    cold = None if args.no_cold_start else cold_start(args, work, inputs, work / "cpu_photo448.png")
    if args.cold_start_only:
        lines = cold_report(cold)
        machine.update(date=time.strftime("%Y-%m-%d %H:%M"), wall_s=round(time.time() - t0))
        print("\n".join(lines))
        Path(args.out).write_text(json.dumps({"machine": machine, "cold_start": cold, "table": lines}, indent=1))
        print(f"wrote {args.out}")
        return 0
    roof = _run_worker(args, "roofline", "float32", inputs, work / "cpu_roofline.json")
    results: dict = {}
    for dtype in args.dtypes.split(","):
        for impl in args.impls.split(","):
            out = work / f"cpu_{impl}_{dtype}.json"
            results.setdefault(dtype, {})[impl] = _run_worker(args, impl, dtype, inputs, out)
    costs = model_costs(ckpt)
    lines = report(results, costs, roof) + (cold_report(cold) if cold else [])
    machine.update(date=time.strftime("%Y-%m-%d %H:%M"), wall_s=round(time.time() - t0))
    print("\n".join(lines))
    Path(args.out).write_text(json.dumps({"machine": machine, "roofline": roof, "costs": costs, "results": results,
                                          "cold_start": cold, "table": lines}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
