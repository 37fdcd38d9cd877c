"""GPU benchmark: qwen2vl_jax vs Hugging Face PyTorch on one GPU, bf16, Qwen2-VL-2B and -7B shapes, batch 1 and 8.

    python benchmarks/bench_gpu.py                       # both presets, batch 1 and 8 (about 6 minutes on an H100)
    python benchmarks/bench_gpu.py --presets 2b --batches 1
    python benchmarks/bench_gpu.py --mesh model=8        # our parameters on an 8-device mesh; HF on one device
    python benchmarks/bench_gpu.py --no-hf               # our side only (TPU hosts: chosen when torch has no CUDA)
    python benchmarks/bench_gpu.py --dry-run             # every code path on the CPU: tiny model, ~20 s

Weights are random (transformers' own init, bf16, built on the GPU), copied tensor by tensor into our model through
the same HF -> ours key map the loader uses, so both sides hold identical weights. Inputs: a 448x448 synthetic
photo + 20 text tokens per row (the batch repeats it). Measured in the same process, one implementation after the
other: vision encoder time, prefill time (time to first token), decode tokens/s over 32 forced new tokens (greedy,
min_new_tokens = max_new_tokens), our compile time separately. Medians of `--repeats`. Prints a table with ours/HF
ratios and writes benchmarks/results/gpu.json. Needs: CUDA JAX, torch with CUDA, transformers (4.57 or 5.x).

`--mesh data=1,fsdp=1,model=8` (multi-GPU / TPU hosts): after the copy, our parameters are placed on that mesh
(`qwen2vl_jax.sharding.shard_model`: heads, MLP width and vocabulary over "model", FSDP over "fsdp", batch rows
over "data" and "fsdp"); the HF model still runs on one device (the table header says so). Each JSON row records
the mesh, JAX's platform (`jax.default_backend()`) and how many ways our parameters were split.

TPU: the same script runs our side on a TPU host (`--no-hf`; chosen automatically when torch has no CUDA). Our
weights are then drawn at random directly in JAX (placed on the mesh as they are made), no PyTorch needed; the HF
columns read "-".

`--dry-run` runs the whole path on the CPU (JAX and PyTorch both): the tiny config of `qwen2vl_jax.demo` (2 layers,
widths 64/32, the real vocabulary), a 56x56 photo, batch 1, 1 repeat, 4 new tokens; every number comes from the
same functions as a real run. It writes benchmarks/results/gpu_dryrun.json unless `--out` is given. With
`XLA_FLAGS=--xla_force_host_platform_device_count=2` it can exercise `--mesh model=2` too (set
QWEN2VL_JAX_CPU_KERNELS=0 there: the native CPU kernels have no partitioning rule).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
N_NEW = 32
SIDE = 448
FIGURES = (("vision s", "vision_s"), ("TTFT s", "ttft_s"), ("decode tok/s", "decode_tok_s"))


def _median_time(fn, repeats, sync):
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _inputs(batch: int, side: int = SIDE):
    from qwen2vl_jax.processing.image import Qwen2VLImageProcessor

    y, x = np.mgrid[0:side, 0:side]
    photo = np.stack([x * 255 // side, y * 255 // side, (x * y) % 251], -1).astype(np.uint8)
    vis = Qwen2VLImageProcessor(max_pixels=side * side)(images=[photo] * batch)
    n = int(np.prod(vis["image_grid_thw"][0])) // 4
    row = [151652] + [151655] * n + [151653] + list(range(9000, 9020))
    ids = np.array([row] * batch, np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), **vis}


def _config(preset: str):
    """A preset's config; "tiny" is the demo checkpoint's (2 layers, widths 64 / 32, the real vocabulary)."""
    from qwen2vl_jax.modeling.config import PRESETS, Qwen2VLConfig

    if preset == "tiny":
        from qwen2vl_jax.testing.demo import TINY_HF_CONFIG

        return Qwen2VLConfig.from_hf(TINY_HF_CONFIG)
    return PRESETS[preset]()


def _copy_weights(hf_model, ours, place=None, dtype="bfloat16") -> None:
    """Fill our (abstract) model with the HF model's tensors through the loader's key map, cast to `dtype` on the
    host; `place(path, array)` (a mesh's `sharding.placer`) sends each tensor straight to its shards."""
    import jax.numpy as jnp
    import torch

    from qwen2vl_jax.checkpoints import keymap as P

    targets = P.model_params(ours)
    filled = set()
    for name, tensor in hf_model.state_dict().items():
        path = P.hf_to_ours(name)
        if path is None or path not in targets or path in filled:
            continue
        arr = tensor.detach().to(torch.float32).cpu().numpy()
        arr = arr.reshape(targets[path].shape)
        if place is None:
            targets[path].set_value(jnp.asarray(arr, dtype=dtype))
        else:
            targets[path].set_value(place(path, arr.astype(dtype)))
        filled.add(path)
    missing = set(targets) - filled
    assert not missing, f"unfilled parameters: {sorted(missing)[:5]}"


def _random_weights(ours, mesh=None, seed: int = 0) -> None:
    """Fill our (abstract) model with random bf16 values drawn in JAX (no PyTorch: `--no-hf`), each parameter made
    directly with its mesh sharding (a 7B never sits whole on one device): norm weights around 1, the rest
    N(0, 0.02^2)."""
    import jax
    import jax.numpy as jnp

    from qwen2vl_jax.checkpoints import keymap as P
    from qwen2vl_jax.sharding.mesh import param_shardings

    shardings = param_shardings(ours, mesh) if mesh is not None else {}
    key = jax.random.key(seed)
    makers = {}
    for i, (path, p) in enumerate(sorted(P.model_params(ours).items())):
        centre = 1.0 if "norm" in path and path.endswith("weight") else 0.0
        sig = (tuple(p.shape), centre, shardings.get(path))
        if sig not in makers:
            shape = sig[0]
            makers[sig] = jax.jit(
                lambda k, shape=shape, centre=centre: (centre + 0.02 * jax.random.normal(k, shape, jnp.float32)
                                                       ).astype(jnp.bfloat16),
                out_shardings=sig[2])
        p.set_value(makers[sig](jax.random.fold_in(key, i)))


def _split_stats(ours) -> dict:
    """How our parameters are spread: the most ways any one is split (distinct shards), how many are split."""
    from qwen2vl_jax.checkpoints import keymap as P

    ways = []
    for p in P.model_params(ours).values():
        arr = p[...]
        ways.append(len({tuple((s.start, s.stop) for s in sh.index) for sh in arr.addressable_shards}))
    devices = set()
    for p in P.model_params(ours).values():
        devices |= set(p[...].sharding.device_set)
    return {"param_devices": len(devices), "param_max_split": max(ways),
            "params_split": sum(w > 1 for w in ways), "params_total": len(ways)}


def bench_preset(preset: str, batches: list[int], repeats: int, layers: int | None, *, n_new: int = N_NEW,
                 side: int = SIDE, torch_device: str = "cuda", mesh_axes: dict | None = None,
                 hf_side: bool = True) -> list[dict]:
    import jax
    from flax import nnx

    from qwen2vl_jax import sharding
    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

    cfg = _config(preset)
    if layers:
        cfg = cfg.with_layers(layers)
    mesh = sharding.make_mesh(**mesh_axes) if mesh_axes else None
    ours = nnx.eval_shape(lambda: Qwen2VLForConditionalGeneration(cfg, param_dtype=jax.numpy.bfloat16,
                                                                  rngs=nnx.Rngs(0)))
    hf = torch = None
    if hf_side:
        import torch
        from transformers import Qwen2VLConfig as HFConfig
        from transformers import Qwen2VLForConditionalGeneration as HFModel

        torch.manual_seed(0)
        with torch.device(torch_device):
            hf = HFModel._from_config(HFConfig(**cfg.to_hf_dict()), dtype=torch.bfloat16,
                                      attn_implementation="sdpa").eval()
        _copy_weights(hf, ours, sharding.placer(ours, mesh) if mesh is not None else None)
    else:
        _random_weights(ours, mesh)
    if mesh is not None:
        sharding.shard_model(ours, mesh)
    split = _split_stats(ours)
    on_cuda = torch is not None and torch_device.startswith("cuda")
    sync_t = torch.cuda.synchronize if on_cuda else (lambda: None)
    rows = []
    for batch in batches:
        x = _inputs(batch, side)
        kw = dict(do_sample=False, repetition_penalty=1.0)
        row = {"preset": preset, "batch": batch, "layers": cfg.text_config.num_hidden_layers,
               "jax_backend": jax.default_backend(), "mesh": mesh_axes, **split,
               "hf_device": torch_device if hf_side else None, "new_tokens": n_new, "image_side": side}
        if hf_side:
            tx = {k: torch.from_numpy(v).to(torch_device) for k, v in x.items()}
            with torch.inference_mode():
                hf.generate(**tx, max_new_tokens=2, **kw)  # warm-up
                row["hf_vision_s"] = _median_time(lambda: hf.model.visual(tx["pixel_values"].bfloat16(),
                                                                          tx["image_grid_thw"]), repeats, sync_t)
                row["hf_ttft_s"] = _median_time(lambda: hf.generate(**tx, max_new_tokens=1, **kw), repeats, sync_t)
                total = _median_time(lambda: hf.generate(**tx, max_new_tokens=n_new, min_new_tokens=n_new, **kw),
                                     repeats, sync_t)
                row["hf_decode_tok_s"] = batch * (n_new - 1) / (total - row["hf_ttft_s"])
        sync_j = lambda: None  # noqa: E731  (our calls return host arrays, so they are synchronous)

        def vision():
            pixels, layout = ours.visual.prepare(x["pixel_values"], x["image_grid_thw"])
            jax.block_until_ready(ours.visual.run_padded(pixels, layout)[0])
        t = time.perf_counter()
        first = ours.generate(**x, max_new_tokens=n_new, min_new_tokens=n_new, return_dict=True, **kw)
        first_s = time.perf_counter() - t
        vision()
        row["ours_vision_s"] = _median_time(vision, repeats, sync_j)
        outs = [ours.generate(**x, max_new_tokens=n_new, min_new_tokens=n_new, return_dict=True, **kw)
                for _ in range(repeats)]
        row["ours_ttft_s"] = float(np.median([o.prefill_seconds for o in outs]))
        row["ours_decode_tok_s"] = float(np.median([batch * (n_new - 1) / o.decode_seconds for o in outs]))
        row["ours_compile_s"] = first_s - row["ours_ttft_s"] - batch * (n_new - 1) / row["ours_decode_tok_s"]
        assert first.new_tokens == n_new
        rows.append(row)
        print(json.dumps(row), flush=True)
    hf = None  # free the PyTorch copy before the next preset
    if on_cuda:
        torch.cuda.empty_cache()
    return rows


def _torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def format_table(rows: list[dict], header_note: str = "") -> str:
    """The printed table: ours vs HF per figure (HF columns "-" without the PyTorch side)."""
    header = f"{'preset':<6} {'batch':>5} {'figure':<18} {'ours':>10} {'HF':>10} {'ours/HF':>8}"
    lines = ([header_note] if header_note else []) + [header, "-" * len(header)]
    for r in rows:
        for fig, key in FIGURES:
            o, h = r[f"ours_{key}"], r.get(f"hf_{key}")
            hf_txt, ratio = ("-", "-") if h is None else (f"{h:.3f}", f"{o / h:.2f}")
            lines.append(f"{r['preset']:<6} {r['batch']:>5} {fig:<18} {o:>10.3f} {hf_txt:>10} {ratio:>8}")
        lines.append(f"{r['preset']:<6} {r['batch']:>5} {'our compile s':<18} {r['ours_compile_s']:>10.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=None, help="comma-separated: 2b, 7b, 72b, tiny (default 2b,7b; dry run: tiny)")
    ap.add_argument("--batches", default=None, help="default 1,8 (dry run: 1)")
    ap.add_argument("--repeats", type=int, default=None, help="default 3 (dry run: 1)")
    ap.add_argument("--layers", type=int, default=None, help="keep only this many decoder layers (quick runs)")
    ap.add_argument("--new-tokens", type=int, default=None, help=f"forced new tokens (default {N_NEW}; dry run: 4)")
    ap.add_argument("--image-side", type=int, default=None, help=f"photo side in pixels (default {SIDE}; dry run: 56)")
    ap.add_argument("--mesh", default=None, help="place our parameters on a mesh, e.g. data=1,fsdp=1,model=8 "
                    "(default: one device); HF stays on one device")
    ap.add_argument("--no-hf", action="store_true", help="skip the PyTorch side (TPU hosts; automatic when torch "
                    "has no CUDA, except in the dry run)")
    ap.add_argument("--dry-run", action="store_true", help="every code path on the CPU: tiny model, small inputs")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gpu.json; dry run: "
                    "gpu_dryrun.json)")
    args = ap.parse_args(argv)
    dry = args.dry_run
    if dry:
        os.environ["JAX_PLATFORMS"] = "cpu"  # before JAX starts: the dry run is CPU-only even on a GPU host
    import jax

    from qwen2vl_jax.sharding.mesh import parse_mesh

    pick = lambda value, real, dry_value: value if value is not None else (dry_value if dry else real)  # noqa: E731
    presets = pick(args.presets, "2b,7b", "tiny").split(",")
    batches = [int(b) for b in pick(args.batches, "1,8", "1").split(",")]
    repeats = pick(args.repeats, 3, 1)
    n_new = pick(args.new_tokens, N_NEW, 4)
    side = pick(args.image_side, SIDE, 56)
    out = Path(pick(args.out, str(ROOT / "benchmarks" / "results" / "gpu.json"),
                    str(ROOT / "benchmarks" / "results" / "gpu_dryrun.json")))
    mesh_axes = parse_mesh(args.mesh) if args.mesh else None
    torch_device = "cpu" if dry else "cuda"
    hf_side = not args.no_hf and (dry or _torch_has_cuda())
    if not args.no_hf and not hf_side:
        print("torch has no CUDA here: running our side only (--no-hf)", flush=True)

    backend = jax.default_backend()
    print(f"platform: {backend}; devices: {jax.devices()}", flush=True)
    rows = []
    for preset in presets:
        rows += bench_preset(preset, batches, repeats, args.layers, n_new=n_new, side=side,
                             torch_device=torch_device, mesh_axes=mesh_axes, hf_side=hf_side)
    where = (f"mesh {args.mesh} ({rows[0]['param_devices']} {backend} devices, parameters split up to "
             f"{rows[0]['param_max_split']} ways)" if mesh_axes else f"one {backend} device")
    hf_where = f"HF: one {torch_device} device" if hf_side else "HF: skipped (--no-hf)"
    note = (f"{'DRY RUN (tiny model, CPU) - ' if dry else ''}ours: {where}; {hf_where}; bf16; "
            f"{n_new} new tokens; {side}x{side} photo; medians of {repeats}")
    print(format_table(rows, note))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
