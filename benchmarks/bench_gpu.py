"""GPU benchmark: qwen2vl_jax vs Hugging Face PyTorch on one GPU, bf16, Qwen2-VL-2B and -7B shapes, batch 1 and 8.

    python benchmarks/bench_gpu.py                       # both presets, batch 1 and 8 (about 6 minutes on an H100)
    python benchmarks/bench_gpu.py --presets 2b --batches 1

Weights are random (transformers' own init, bf16, built on the GPU), copied tensor by tensor into our model through
the same HF -> ours key map the loader uses, so both sides hold identical weights. Inputs: a 448x448 synthetic
photo + 20 text tokens per row (the batch repeats it). Measured in the same process, one implementation after the
other: vision encoder time, prefill time (time to first token), decode tokens/s over 32 forced new tokens (greedy,
min_new_tokens = max_new_tokens), our compile time separately. Medians of `--repeats`. Prints a table with ours/HF
ratios and writes benchmarks/results/gpu.json. Needs: CUDA JAX, torch with CUDA, transformers (4.57 or 5.x).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
N_NEW = 32


def _median_time(fn, repeats, sync):
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _inputs(batch: int):
    from qwen2vl_jax.image_processing import Qwen2VLImageProcessor

    y, x = np.mgrid[0:448, 0:448]
    photo = np.stack([x * 255 // 448, y * 255 // 448, (x * y) % 251], -1).astype(np.uint8)
    vis = Qwen2VLImageProcessor(max_pixels=448 * 448)(images=[photo] * batch)
    n = int(np.prod(vis["image_grid_thw"][0])) // 4
    row = [151652] + [151655] * n + [151653] + list(range(9000, 9020))
    ids = np.array([row] * batch, np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), **vis}


def _copy_weights(hf_model, ours) -> None:
    """Fill our (abstract) model with the HF model's tensors through the loader's key map."""
    import jax.numpy as jnp
    import torch

    from qwen2vl_jax import params as P

    targets = P.model_params(ours)
    filled = set()
    for name, tensor in hf_model.state_dict().items():
        path = P.hf_to_ours(name)
        if path is None or path not in targets or path in filled:
            continue
        arr = tensor.detach().to(torch.float32).cpu().numpy()
        arr = arr.reshape(targets[path].shape)
        targets[path].set_value(jnp.asarray(arr, dtype=jnp.bfloat16))
        filled.add(path)
    missing = set(targets) - filled
    assert not missing, f"unfilled parameters: {sorted(missing)[:5]}"


def bench_preset(preset: str, batches: list[int], repeats: int, layers: int | None) -> list[dict]:
    import jax
    import torch
    from flax import nnx
    from transformers import Qwen2VLConfig as HFConfig
    from transformers import Qwen2VLForConditionalGeneration as HFModel

    from qwen2vl_jax.config import PRESETS
    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

    cfg = PRESETS[preset]()
    if layers:
        cfg = cfg.with_layers(layers)
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = HFModel._from_config(HFConfig(**cfg.to_hf_dict()), dtype=torch.bfloat16,
                                  attn_implementation="sdpa").eval()
    ours = nnx.eval_shape(lambda: Qwen2VLForConditionalGeneration(cfg, param_dtype=jax.numpy.bfloat16,
                                                                  rngs=nnx.Rngs(0)))
    _copy_weights(hf, ours)
    sync_t = torch.cuda.synchronize
    rows = []
    for batch in batches:
        x = _inputs(batch)
        tx = {k: torch.from_numpy(v).cuda() for k, v in x.items()}
        kw = dict(do_sample=False, repetition_penalty=1.0)
        row = {"preset": preset, "batch": batch, "layers": cfg.text_config.num_hidden_layers}
        with torch.inference_mode():
            hf.generate(**tx, max_new_tokens=2, **kw)  # warm-up
            row["hf_vision_s"] = _median_time(lambda: hf.model.visual(tx["pixel_values"].bfloat16(),
                                                                      tx["image_grid_thw"]), repeats, sync_t)
            row["hf_ttft_s"] = _median_time(lambda: hf.generate(**tx, max_new_tokens=1, **kw), repeats, sync_t)
            total = _median_time(lambda: hf.generate(**tx, max_new_tokens=N_NEW, min_new_tokens=N_NEW, **kw),
                                 repeats, sync_t)
            row["hf_decode_tok_s"] = batch * (N_NEW - 1) / (total - row["hf_ttft_s"])
        sync_j = lambda: None  # noqa: E731  (our calls return host arrays, so they are synchronous)

        def vision():
            pixels, layout = ours.visual.prepare(x["pixel_values"], x["image_grid_thw"])
            jax.block_until_ready(ours.visual.run_padded(pixels, layout)[0])
        t = time.perf_counter()
        first = ours.generate(**x, max_new_tokens=N_NEW, min_new_tokens=N_NEW, return_dict=True, **kw)
        first_s = time.perf_counter() - t
        vision()
        row["ours_vision_s"] = _median_time(vision, repeats, sync_j)
        outs = [ours.generate(**x, max_new_tokens=N_NEW, min_new_tokens=N_NEW, return_dict=True, **kw)
                for _ in range(repeats)]
        row["ours_ttft_s"] = float(np.median([o.prefill_seconds for o in outs]))
        row["ours_decode_tok_s"] = float(np.median([batch * (N_NEW - 1) / o.decode_seconds for o in outs]))
        row["ours_compile_s"] = first_s - row["ours_ttft_s"] - batch * (N_NEW - 1) / row["ours_decode_tok_s"]
        assert first.new_tokens == N_NEW
        rows.append(row)
        print(json.dumps(row), flush=True)
    hf = None  # free the PyTorch copy before the next preset
    torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="2b,7b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None, help="keep only this many decoder layers (quick runs)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    args = ap.parse_args(argv)
    import jax

    print(f"devices: {jax.devices()}", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for preset in args.presets.split(","):
        rows += bench_preset(preset, batches, args.repeats, args.layers)
    header = f"{'preset':<6} {'batch':>5} {'figure':<18} {'ours':>10} {'HF':>10} {'ours/HF':>8}"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        for fig, key in (("vision s", "vision_s"), ("TTFT s", "ttft_s"), ("decode tok/s", "decode_tok_s")):
            o, h = r[f"ours_{key}"], r[f"hf_{key}"]
            print(f"{r['preset']:<6} {r['batch']:>5} {fig:<18} {o:>10.3f} {h:>10.3f} {o / h:>8.2f}")
        print(f"{r['preset']:<6} {r['batch']:>5} {'our compile s':<18} {r['ours_compile_s']:>10.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
