"""Image preprocessing speed: qwen2vl_jax's processor vs transformers' slow (PIL) Qwen2VLImageProcessor.

Both run the same pipeline (smart_resize, Pillow BICUBIC, rescale, CLIP normalize, patchify) on real photos from
scikit-image / matplotlib, with the Qwen2-VL-Instruct pixel bounds (3136 .. 12845056). Reported: median wall
time of N runs per photo (after one warm-up), the output size, and max |ours - HF| of `pixel_values`.

    python benchmarks/bench_processor.py [--runs 7]

Prints a table and writes benchmarks/results/processor.json. CPU only; torch/transformers are imported only for
the HF side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from qwen2vl_jax.processing.image import Qwen2VLImageProcessor

MIN_PIXELS, MAX_PIXELS = 3136, 12845056
RESULTS = Path(__file__).parent / "results" / "processor.json"


def photos() -> dict[str, Image.Image]:
    import matplotlib
    import skimage.data

    grace = Image.open(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg").convert("RGB")
    return {
        "hubble_deep_field": Image.fromarray(skimage.data.hubble_deep_field()),  # 1000x872, ~0.87 MP
        "retina": Image.fromarray(skimage.data.retina()),  # 1411x1411, ~2 MP
        "astronaut": Image.fromarray(skimage.data.astronaut()),  # 512x512
        "grace_hopper": grace,  # 512x600
    }


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up (imports, allocator)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per photo (median reported; >= 5)")
    args = parser.parse_args()
    if args.runs < 5:
        parser.error("--runs must be >= 5")

    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as HFSlow

    ours = Qwen2VLImageProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    hf = HFSlow(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    rows = []
    for name, image in photos().items():
        out = ours(images=[image])
        ref = hf(images=[image], return_tensors="np")
        assert np.array_equal(out["image_grid_thw"], ref["image_grid_thw"]), name
        max_abs = float(np.max(np.abs(out["pixel_values"] - ref["pixel_values"])))
        ours_ms = median_ms(lambda image=image: ours(images=[image]), args.runs)
        hf_ms = median_ms(lambda image=image: hf(images=[image], return_tensors="np"), args.runs)
        rows.append({
            "photo": name, "width": image.size[0], "height": image.size[1],
            "megapixels": round(image.size[0] * image.size[1] / 1e6, 3),
            "grid_thw": out["image_grid_thw"][0].tolist(), "rows": int(out["pixel_values"].shape[0]),
            "ours_ms": round(ours_ms, 2), "hf_slow_ms": round(hf_ms, 2), "speedup": round(hf_ms / ours_ms, 2),
            "max_abs_diff": max_abs,
        })

    header = f"{'photo':<18} {'size':>10} {'MP':>5} {'grid_thw':>14} {'ours ms':>8} {'HF ms':>8} {'x':>5} {'max|d|':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        size = f"{r['width']}x{r['height']}"
        print(f"{r['photo']:<18} {size:>10} {r['megapixels']:>5.2f} {str(r['grid_thw']):>14} {r['ours_ms']:>8.1f} "
              f"{r['hf_slow_ms']:>8.1f} {r['speedup']:>5.2f} {r['max_abs_diff']:>7.1e}")

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "image preprocessing, one photo per call (pixel_values + image_grid_thw)",
        "reference": "transformers 4.57 slow Qwen2VLImageProcessor (PIL path)",
        "pixel_bounds": [MIN_PIXELS, MAX_PIXELS],
        "runs": args.runs, "statistic": "median",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "results": rows,
    }, indent=2) + "\n")
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
