"""Training-step benchmark: qwen2vl_jax vs transformers + PEFT (PyTorch CPU), LoRA on the random-weight 2B.

    python benchmarks/bench_train.py                            # fp32 and bf16, no remat and remat, 2 rounds:
                                                                # ~2 h on 2 cores (estimate; HF bf16 is most of it)
    python benchmarks/bench_train.py --dtypes float32 --rounds 1
    python benchmarks/bench_train.py --remat none,nothing_saveable,dots_saveable
    python benchmarks/bench_train.py --dry-run                  # tiny checkpoint, every code path: ~2 min alone

Same run, same batch: the random-weight Qwen2-VL-2B checkpoint of benchmarks/common.py (built once, reused), one
448x448 photo (scikit-image `astronaut`, 256 image tokens) + 128 text tokens: a system prompt, a user turn with the
image and a question, an assistant answer ending in <|im_end|>; labels on the answer (and its <|im_end|>) only.
Batch 1. LoRA r=16, alpha 32, no dropout, on the decoder's q/k/v/o/gate/up/down projections (PEFT's
`target_modules` names; the vision tower and the merger are frozen, only the adapters train); base weights in the
dtype measured, adapters fp32 in both (PEFT autocasts adapters of bf16 models to fp32; `apply_lora` defaults to fp32).

One training step = forward + loss + backward + global-norm clipping (1.0) + AdamW (lr 1e-4, betas 0.9/0.999,
eps 1e-8, no weight decay) on a warmup-cosine schedule, identical on both sides:
- ours: `prepare_batch` (host layout) + jitted `training.train_step` (`make_optimizer(..., default_recipe(lr),
  trainable="lora")`), timed until its metrics are ready. Remat: `model.set_remat(policy)`.
- HF: `model(**inputs, labels=labels).loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW` over the
  trainable parameters, `get_cosine_schedule_with_warmup`, `zero_grad`. Remat: `gradient_checkpointing_enable`
  (non-reentrant checkpoints: with the reentrant kind no gradient reaches the adapters of a frozen-embedding model).
  `model.train()`; attention "sdpa" (transformers' default, as bench_cpu.py) unless `--hf-attn eager`.

The parent preprocesses the batch once with our processor (bit-identical to HF's) into an .npz both sides read,
then runs every (dtype, remat, implementation) configuration in its own fresh subprocess, so peak RSS is per
configuration; within a round ours and HF alternate, and the order flips every round. PyTorch runs with 2 threads,
XLA with its defaults (no XLA_FLAGS set here), as in bench_cpu.py. Per process: load time, the first step (ours:
compile included; the XLA compile time is also summed from jax.monitoring), the median of `--steps` timed steps
after `--warmup` steps, peak RSS (VmHWM: the whole process, load included) and the training-phase peak (the
peak after the high-water mark is reset once the model is loaded, where the kernel allows it). Across `--rounds`
the medians of the per-process figures are reported, with ours/HF ratios and the targets: fp32 step <= 0.8x HF,
bf16 step <= 0.5x HF, peak RSS <= HF. The step-1 loss of both is printed as a sanity check (the adapters' B is zero,
so the first loss is the base model's: equal in fp32 up to rounding, whatever the random A).
Prints the table, writes benchmarks/results/train.json (the dry run: train_dryrun.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LORA_R, LORA_ALPHA = 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT_TOKENS = 128
REMAT_CHOICES = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")
STEP_TARGETS = {"float32": 0.8, "bfloat16": 0.5}  # ours step / HF step, same dtype and remat mode
QUESTION = "What is the person in this photo wearing, and where might the picture have been taken?"
ANSWER = ("The person in the photo is an astronaut wearing a white spacesuit with the flag of the United States on "
          "the shoulder and several patches on the chest. She is holding a helmet with a gold visor under one arm. "
          "Behind her there is a model of a space shuttle and a dark background, so the picture was most likely "
          "taken in a studio or at a space centre, probably as an official portrait before a mission. The lighting "
          "is soft and even, which is typical of such portraits, and her smile suggests a relaxed moment before "
          "the work of training and launch preparations.")


def _median(xs):
    return float(np.median(xs)) if len(xs) else None


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# ------------------------------------------------------------------------------------------------- memory
def _status_gb(field: str) -> float | None:
    """A /proc/self/status figure (VmRSS, VmHWM) in GB, None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    return None


def _maxrss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_gb() -> float:
    """This process's peak RSS: the kernel's high-water mark of its own address space (VmHWM). Not ru_maxrss on
    Linux: that one carries over the parent's peak across fork + exec, a floor of the parent's size."""
    hwm = _status_gb("VmHWM")
    return hwm if hwm is not None else _maxrss_gb()


def _memory_phases(res: dict, loaded: bool) -> None:
    """Record the load-phase figures (loaded=False: just after the load) or the training-phase ones."""
    if not loaded:
        res["rss_after_load_gb"] = _status_gb("VmRSS")
        res["peak_rss_load_gb"] = _peak_gb()
        res["peak_reset"] = _status_gb("VmHWM") is not None and _reset_peak_rss()
        return
    res["peak_rss_train_gb"] = _peak_gb() if res["peak_reset"] else None
    res["peak_rss_gb"] = max(res["peak_rss_load_gb"], _peak_gb())


# ------------------------------------------------------------------------------------------------- inputs
def make_inputs(ckpt: Path, out: Path, side: int) -> dict:
    """The batch both implementations train on (our processor; identical to HF's), saved as .npz."""
    from PIL import Image

    from qwen2vl_jax.processing.processor import Qwen2VLProcessor

    sys.path.insert(0, str(ROOT / "tests"))
    import helpers

    proc = Qwen2VLProcessor.from_pretrained(ckpt)
    image = helpers.photo("astronaut").resize((side, side), Image.BICUBIC)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    enc = proc(text=prompt, images=[image])
    assert enc["image_grid_thw"][0].tolist() == [1, side // 14, side // 14], enc["image_grid_thw"]
    prompt_ids = enc["input_ids"][0].astype(np.int64)
    n_image = int((prompt_ids == proc.image_token_id).sum())
    im_end = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    n_answer = TEXT_TOKENS - (len(prompt_ids) - n_image) - 1  # the rest of the 128 text tokens, then <|im_end|>
    answer_ids = proc.tokenizer.encode(ANSWER)
    assert len(answer_ids) >= n_answer > 0, (len(answer_ids), n_answer)
    answer = np.array(answer_ids[:n_answer] + [im_end], np.int64)
    ids = np.concatenate([prompt_ids, answer])[None]
    labels = np.concatenate([np.full(len(prompt_ids), -100, np.int64), answer])[None]
    np.savez(out, input_ids=ids, labels=labels, attention_mask=np.ones_like(ids),
             pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"])
    return {"tokens": int(ids.shape[1]), "image_tokens": n_image, "text_tokens": int(ids.shape[1]) - n_image,
            "labelled_tokens": int((labels != -100).sum()), "image_side": side,
            "patches": int(enc["pixel_values"].shape[0])}


def load_inputs(path: Path) -> dict:
    raw = np.load(path)
    return {k: raw[k] for k in raw.files}


# ------------------------------------------------------------------------------------------------ workers
def worker_ours(ckpt: Path, dtype: str, remat: str, x: dict, steps: int, warmup: int, lr: float) -> dict:
    import flax
    import jax
    import jax.monitoring

    from qwen2vl_jax import training
    from qwen2vl_jax.lora import apply_lora
    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

    compile_s = [0.0]

    def on_event(event: str, duration: float, **_) -> None:
        if event.startswith("/jax/core/compile/"):  # tracing, lowering and XLA compile of every jit
            compile_s[0] += duration

    jax.monitoring.register_event_duration_secs_listener(on_event)
    res = {"impl": "ours", "dtype": dtype, "remat": remat, "jax": jax.__version__, "flax": flax.__version__,
           "xla_flags": os.environ.get("XLA_FLAGS", "")}
    t0 = time.perf_counter()
    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=dtype)
    apply_lora(model, LORA_R, LORA_ALPHA, TARGETS)  # fp32 adapters
    if remat != "none":
        model.set_remat(remat)
    optimizer = training.make_optimizer(model, training.default_recipe(lr=lr, steps=1000), trainable="lora")
    res["load_s"] = time.perf_counter() - t0
    res["trainable_params"] = int(sum(np.prod(p.shape) for p in training.trainable_params(model, "lora").values()))
    _memory_phases(res, loaded=False)

    def step():
        batch = training.prepare_batch(model, x["input_ids"], x["labels"], x["attention_mask"], x["pixel_values"],
                                       x["image_grid_thw"])
        return jax.block_until_ready(training.train_step(model, optimizer, batch))

    times, losses, compiled = [], [], []
    for _ in range(warmup + steps):
        before = compile_s[0]
        t, metrics = _timed(step)
        times.append(t)
        compiled.append(compile_s[0] - before)
        losses.append(float(metrics["loss"]))
    res["compile_s"] = compiled[0]  # the first step's tracing + lowering + XLA compile
    res["compile_after_first_s"] = sum(compiled[1:])  # 0 unless a later step recompiled
    _fill_steps(res, times, losses, warmup, int(metrics["tokens"]))
    _memory_phases(res, loaded=True)
    return res


def worker_hf(ckpt: Path, dtype: str, remat: str, x: dict, steps: int, warmup: int, lr: float, attn: str) -> dict:
    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLForConditionalGeneration, get_cosine_schedule_with_warmup

    torch.set_num_threads(2)
    torch.manual_seed(0)
    res = {"impl": "hf", "dtype": dtype, "remat": remat, "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__, "attn_implementation": attn,
           "threads": torch.get_num_threads()}
    t0 = time.perf_counter()
    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=getattr(torch, dtype),
                                                            attn_implementation=attn)
    if remat != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        res["gradient_checkpointing"] = "non-reentrant"
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                             target_modules=TARGETS, bias="none"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    res["trainable_params"] = int(sum(p.numel() for p in params))
    res["adapter_dtypes"] = sorted({str(p.dtype) for p in params})
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(opt, 30, 1000)  # default_recipe(steps=1000): 3% warmup
    res["load_s"] = time.perf_counter() - t0
    _memory_phases(res, loaded=False)
    inputs = {k: torch.from_numpy(v) for k, v in x.items()}

    def step():
        out = model(**inputs, use_cache=False)  # labels included: transformers' ForCausalLMLoss
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()

    times, losses = [], []
    for _ in range(warmup + steps):
        t, loss = _timed(step)
        times.append(t)
        losses.append(loss)
    _fill_steps(res, times, losses, warmup, int((x["labels"][:, 1:] != -100).sum()))
    _memory_phases(res, loaded=True)
    return res


def _fill_steps(res: dict, times: list[float], losses: list[float], warmup: int, tokens: int) -> None:
    res["step_times_s"] = times
    res["losses"] = losses
    res["first_step_s"] = times[0]
    res["step_s"] = _median(times[warmup:])
    res["loss_tokens"] = tokens


# ------------------------------------------------------------------------------------------------- report
def _fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def _pair(summary: dict, dtype: str, remat: str) -> tuple[dict, dict]:
    ours = summary.get(dtype, {}).get(remat, {}).get("ours", {})
    hf = summary.get(dtype, {}).get("none" if remat == "none" else "ckpt", {}).get("hf", {})
    return ours, hf


def summarize(runs: list[dict]) -> dict:
    """{dtype: {mode: {impl: medians over rounds + per-round lists}}}; HF's remat mode is "ckpt" for any policy."""
    groups: dict = {}
    for r in runs:
        if "error" in r:
            continue
        mode = r["remat"] if r["impl"] == "ours" else ("none" if r["remat"] == "none" else "ckpt")
        groups.setdefault(r["dtype"], {}).setdefault(mode, {}).setdefault(r["impl"], []).append(r)
    out: dict = {}
    for dtype, modes in groups.items():
        for mode, impls in modes.items():
            for impl, rs in impls.items():
                s = {key: _median([r[key] for r in rs if r.get(key) is not None])
                     for key in ("step_s", "first_step_s", "compile_s", "load_s", "peak_rss_gb", "peak_rss_train_gb",
                                 "rss_after_load_gb")}
                s["rounds"] = {key: [r.get(key) for r in rs] for key in ("step_s", "peak_rss_gb")}
                s["loss_step1"] = rs[0]["losses"][0]
                s["trainable_params"] = rs[0]["trainable_params"]
                out.setdefault(dtype, {}).setdefault(mode, {})[impl] = s
    return out


def report(summary: dict, dtypes: list[str], remats: list[str], hf_attn: str) -> tuple[list[str], list[dict]]:
    lines, verdicts = [], []
    header = f"{'figure':<30} {'dtype':<9} {'remat':<17} {'ours':>9} {'HF':>9} {'ours/HF':>8}  {'runs ours | HF':<24}"
    lines += [header, "-" * len(header)]
    for dtype in dtypes:
        for remat in remats:
            ours, hf = _pair(summary, dtype, remat)
            if not ours and not hf:
                continue
            label = remat if remat == "none" else f"{remat[:17]}"
            rows = [("step s (fwd+bwd+AdamW)", "step_s"), ("first step s", "first_step_s"),
                    ("our compile s (XLA)", "compile_s"), ("load + LoRA s", "load_s"),
                    ("peak RSS GB (process)", "peak_rss_gb"), ("peak RSS GB (training)", "peak_rss_train_gb"),
                    ("RSS after load GB", "rss_after_load_gb")]
            for name, key in rows:
                a, b = ours.get(key), hf.get(key)
                if a is None and b is None:
                    continue
                ratio = f"{a / b:.2f}" if a is not None and b else "-"
                runs = ""
                if key in ("step_s", "peak_rss_gb"):
                    fa = "/".join(_fmt(v) for v in ours.get("rounds", {}).get(key, []))
                    fb = "/".join(_fmt(v) for v in hf.get("rounds", {}).get(key, []))
                    runs = f"{fa or '-'} | {fb or '-'}"
                lines.append(f"{name:<30} {dtype:<9} {label:<17} {_fmt(a):>9} {_fmt(b):>9} {ratio:>8}  {runs}")
            la, lb = ours.get("loss_step1"), hf.get("loss_step1")
            lines.append(f"{'step-1 loss':<30} {dtype:<9} {label:<17} {_fmt(la, '.5f'):>9} {_fmt(lb, '.5f'):>9}")
            for key, limit, what in (("step_s", STEP_TARGETS.get(dtype), "step"), ("peak_rss_gb", 1.0, "peak RSS")):
                a, b = ours.get(key), hf.get(key)
                if limit is None or a is None or not b:
                    continue
                met = a / b <= limit
                verdicts.append({"dtype": dtype, "remat": remat, "figure": what, "ratio": a / b, "target": limit,
                                 "met": met})
    if verdicts:
        lines.append("targets (ours/HF, same dtype; remat rows against HF with gradient checkpointing):")
        for v in verdicts:
            lines.append(f"  {v['figure']:<9} {v['dtype']:<9} remat {v['remat']:<17} {v['ratio']:.2f} <= "
                         f"{v['target']:.1f}: {'met' if v['met'] else 'MISSED'}")
    params = {impl: s.get("trainable_params") for modes in summary.values() for m in modes.values()
              for impl, s in m.items()}
    lines.append(f"trainable params: {params}; HF attention: {hf_attn}")
    return lines, verdicts


def _cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    field = lambda key: next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith(key)), "")
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in field("flags").split()]
    return f"{field('model name')} (family {field('cpu family')} model {field('model')}; {' '.join(simd)})"


# ---------------------------------------------------------------------------------------------- driver
def _run_worker(args, ckpt: Path, impl: str, dtype: str, remat: str, inputs: Path, out: Path, t_start: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--worker-dtype", dtype, "--worker-remat", remat,
           "--ckpt", str(ckpt), "--inputs", str(inputs), "--out", str(out), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--lr", str(args.lr), "--hf-attn", args.hf_attn]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if impl == "ours":
        env.setdefault("JAX_PLATFORMS", "cpu")
    print(f"== {impl} {dtype} remat={remat} (t+{time.time() - t_start:.0f} s)", flush=True)
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0 or not out.is_file():  # e.g. killed for memory: keep going, report it
        print(f"   FAILED (exit status {rc})", flush=True)
        return {"impl": impl, "dtype": dtype, "remat": remat, "error": f"exit status {rc}"}
    r = json.loads(out.read_text())
    print(f"   step {r['step_s']:.2f} s (first {r['first_step_s']:.2f} s), load {r['load_s']:.1f} s, "
          f"peak RSS {r['peak_rss_gb']:.2f} GB, losses {[round(v, 4) for v in r['losses']]}", flush=True)
    return r


def plan(impls: list[str], dtypes: list[str], remats: list[str], rounds: int) -> list[tuple[str, str, str]]:
    """(impl, dtype, remat) per process: ours and HF alternate, the order flips every round; HF runs one
    checkpointed configuration for all remat policies."""
    jobs = []
    hf_modes = ["none"] if "none" in remats else []
    hf_modes += [next(r for r in remats if r != "none")] if any(r != "none" for r in remats) else []
    for rnd in range(rounds):
        order = impls if rnd % 2 == 0 else impls[::-1]
        for dtype in dtypes:
            for remat in remats:
                for impl in order:
                    if impl == "hf" and remat not in hf_modes:
                        continue
                    jobs.append((impl, dtype, remat))
    return jobs


def _dry_run_checkpoint(tmp: Path) -> Path:
    """A tiny random checkpoint written by transformers, with the real tokenizer (tests/helpers.py)."""
    from benchmarks.common import _write_tokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    import helpers

    path = helpers.build_checkpoint(tmp / "tiny", text=helpers.TINY_TEXT, vision=helpers.TINY_VISION)
    _write_tokenizer(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--impls", default="ours,hf")
    ap.add_argument("--remat", default="none,nothing_saveable",
                    help=f"comma-separated, of {', '.join(REMAT_CHOICES)}; any policy: HF gradient checkpointing")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps (ours: the compile)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny random checkpoint, 224x224 photo, 1 round, 1+2 steps: checks every code path")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train.json)")
    ap.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-dtype", help=argparse.SUPPRESS)
    ap.add_argument("--worker-remat", help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--inputs", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        x = load_inputs(Path(args.inputs))
        if args.worker == "ours":
            result = worker_ours(Path(args.ckpt), args.worker_dtype, args.worker_remat, x, args.steps, args.warmup,
                                 args.lr)
        else:
            result = worker_hf(Path(args.ckpt), args.worker_dtype, args.worker_remat, x, args.steps, args.warmup,
                               args.lr, args.hf_attn)
        Path(args.out).write_text(json.dumps(result))
        return 0

    dtypes, impls, remats = (s.split(",") for s in (args.dtypes, args.impls, args.remat))
    for r in remats:
        if r not in REMAT_CHOICES:
            ap.error(f"--remat {r!r}: use {', '.join(REMAT_CHOICES)}")
    if set(impls) - {"ours", "hf"} or set(dtypes) - {"float32", "bfloat16"}:
        ap.error("--impls: ours,hf; --dtypes: float32,bfloat16")
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps >= 1, --warmup >= 0")
    if args.dry_run:
        args.rounds, args.steps, args.warmup = 1, 2, 1
    name = "train_dryrun.json" if args.dry_run else "train.json"
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / name
    work = out.parent
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        if args.dry_run:
            ckpt, side = _dry_run_checkpoint(Path(tmp)), 224
        else:
            from benchmarks.common import build_random_2b_checkpoint, default_2b_path, is_complete

            ckpt, side = default_2b_path(), 448
            if not is_complete(ckpt):
                build_random_2b_checkpoint(ckpt)
        inputs = work / ("train_inputs_dryrun.npz" if args.dry_run else "train_inputs.npz")
        batch = make_inputs(ckpt, inputs, side)
        print(f"batch: {batch}", flush=True)
        runs = []
        jobs = plan(impls, dtypes, remats, args.rounds)
        print(f"{len(jobs)} processes: {', '.join('/'.join(j) for j in jobs)}", flush=True)
        for i, (impl, dtype, remat) in enumerate(jobs):
            runs.append(_run_worker(args, ckpt, impl, dtype, remat, inputs, Path(tmp) / f"run{i}.json", t_start))
            out.write_text(json.dumps({"partial": True, "runs": runs}, indent=1))  # survives an interrupted run
    summary = summarize(runs)
    lines, verdicts = report(summary, dtypes, remats, args.hf_attn)
    machine = {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d %H:%M"), "wall_s": round(time.time() - t_start),
               "xla_flags": os.environ.get("XLA_FLAGS", ""), "dry_run": args.dry_run}
    settings = {"dtypes": dtypes, "impls": impls, "remat": remats, "rounds": args.rounds, "steps": args.steps,
                "warmup": args.warmup, "lr": args.lr, "hf_attn": args.hf_attn, "lora": {"r": LORA_R,
                "alpha": LORA_ALPHA, "targets": TARGETS}, "checkpoint": str(ckpt), "batch": batch}
    failed = [f"{r['impl']}/{r['dtype']}/{r['remat']}: {r['error']}" for r in runs if "error" in r]
    lines += [f"FAILED: {f}" for f in failed]
    if args.dry_run:
        lines.append("dry run: tiny random model, 224x224 photo, 2 steps -- a code-path check, not a measurement")
    print("\n".join(lines))
    print(f"wall {machine['wall_s']} s")
    out.write_text(json.dumps({"machine": machine, "settings": settings, "summary": summary, "targets": verdicts,
                               "runs": runs, "table": lines}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
