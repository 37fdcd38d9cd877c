"""The memory estimate (`generation/memory.py`): its layout constants match the code that runs the request, the KV
cache and weight bytes are exact, it grows with every input, its refusals are one line, sizes parse, and it bounds
the measured peak RSS of a real (tiny) request."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from qwen2vl_jax.generation import memory
from qwen2vl_jax.modeling import config as config_lib
from qwen2vl_jax.modeling import config as presets
from qwen2vl_jax.testing import demo

ROOT = Path(__file__).resolve().parents[2]
TINY = config_lib.Qwen2VLConfig.from_hf(demo.TINY_HF_CONFIG)
TWO_B = presets.qwen2_vl_2b()


def test_layout_constants_match_their_sources():
    from qwen2vl_jax.attention import xla
    from qwen2vl_jax.generation import decoding as generation
    from qwen2vl_jax.modeling import layers

    assert memory.PROMPT_GRANULE == generation.PROMPT_GRANULE
    assert memory.VISION_QUERY_CHUNK == xla.QUERY_CHUNK
    assert memory.CHUNK_ABOVE_BYTES == xla.CHUNK_ABOVE_BYTES
    assert (memory.QUERY_BLOCK, memory.KEY_BLOCK) == (xla.QUERY_BLOCK, xla.KEY_BLOCK)
    assert memory.MLP_ROW_BLOCK == layers.MLP_ROW_BLOCK


def test_importing_memory_starts_no_jax():
    code = ("import sys, qwen2vl_jax.generation.memory; "
            "print(any(m == 'jax' or m.startswith('jax.') for m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.stdout.strip() == "False", done.stderr[-2000:]


def test_parameter_count_and_kv_cache_bytes_are_exact():
    from flax import nnx

    from qwen2vl_jax.modeling.model import Qwen2VL

    model = Qwen2VL(TINY, rngs=nnx.Rngs(0))
    assert memory.parameter_count(TINY) == model.num_params()["total"]
    abstract = nnx.eval_shape(lambda: Qwen2VL(TWO_B, rngs=nnx.Rngs(0)))
    assert memory.parameter_count(TWO_B) == abstract.num_params()["total"] == 2_208_985_600
    for dtype in ("float32", "bfloat16"):
        for batch, prompt, new in ((1, 10, 5), (3, 100, 40)):
            _, slots = memory.padded_lengths(prompt, new)
            cache = model.init_cache(batch, slots, dtype=jax.numpy.dtype(dtype))
            nbytes = sum(x.nbytes for x in jax.tree.leaves(cache))
            est = memory.estimate_request(TINY, batch=batch, prompt_tokens=prompt, new_tokens=new, dtype=dtype)
            assert est.kv_cache == nbytes == memory.kv_cache_bytes(TINY, batch, slots, dtype)
            assert est.weights == memory.parameter_count(TINY) * memory.dtype_bytes(dtype)


BASE = dict(batch=1, prompt_tokens=2000, new_tokens=100, vision_patches=4096, largest_segment_patches=1024)


@pytest.mark.parametrize("attn", [None, "cpu", "xla", "jax"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_estimate_grows_with_every_input(attn, dtype):
    ladders = {
        "batch": [1, 2, 3, 4, 8],
        "prompt_tokens": [1, 63, 64, 65, 500, 1024, 1500, 2000, 2200, 2400, 3000, 4096, 8192, 16384, 32768],
        "new_tokens": [1, 31, 32, 33, 64, 100, 1000, 4096],
        "vision_patches": [0, 4, 256, 1024, 1100, 4096, 5000, 16384, 65536],
        "largest_segment_patches": [4, 256, 1000, 1024, 1500, 2048, 3000, 4096],
    }
    for name, values in ladders.items():
        totals, parts = [], []
        for value in values:
            kw = {**BASE, name: value, "dtype": dtype, "attn_implementation": attn}
            if name == "vision_patches":
                kw["largest_segment_patches"] = min(value, kw["largest_segment_patches"])
            e = memory.estimate_request(TWO_B, **kw)
            totals.append(e.total)
            parts.append((e.kv_cache, e.vision_peak, e.prefill_peak))
        assert totals == sorted(totals), (name, values, totals)
        for i in range(3):
            assert [p[i] for p in parts] == sorted(p[i] for p in parts), (name, i, parts)
    fp32 = memory.estimate_request(TWO_B, **BASE, dtype="float32", attn_implementation=attn)
    bf16 = memory.estimate_request(TWO_B, **BASE, dtype="bfloat16", attn_implementation=attn)
    assert bf16.total < fp32.total and bf16.weights * 2 == fp32.weights


def test_estimate_parts_follow_the_layout():
    e = memory.estimate_request(TWO_B, batch=1, prompt_tokens=16000, new_tokens=100, dtype="bfloat16")
    T_pad, slots = memory.padded_lengths(16000, 100)
    assert T_pad == 16384 and slots == memory.bucket(16484, 64) >= 16484
    assert e.kv_cache == 28 * 2 * slots * 2 * 128 * 2 + slots + 8
    assert e.vision_peak == 0 and e.total == e.weights + e.kv_cache + e.prefill_peak + memory.RUNTIME_OVERHEAD
    # the default backend (None) is the worse of `cpu` and `xla`
    kw = dict(batch=1, prompt_tokens=5000, new_tokens=10, vision_patches=16384, largest_segment_patches=16384)
    peaks = {a: memory.estimate_request(TWO_B, **kw, attn_implementation=a).vision_peak for a in (None, "cpu", "xla")}
    assert peaks[None] == max(peaks["cpu"], peaks["xla"])
    assert memory.estimate_request(TWO_B, **kw, attn_implementation="jax").vision_peak > peaks["xla"]
    text = e.describe()
    assert text.startswith("needs ~") and "weights 4.4 GB" in text and "KV cache" in text and "\n" not in text


def test_parse_bytes():
    assert memory.parse_bytes("12GB") == memory.parse_bytes("12G") == memory.parse_bytes("12 gb") == 12 * 10**9
    assert memory.parse_bytes("800MB") == 800 * 10**6
    assert memory.parse_bytes("1.5GiB") == 3 * 2**29
    assert memory.parse_bytes("4096") == memory.parse_bytes("4096b") == 4096
    assert memory.parse_bytes("512KiB") == 512 * 1024 and memory.parse_bytes(".5TB") == 5 * 10**11
    for bad in ("", "GB", "12 parsecs", "-1GB", "1e9", "twelve", "0", "1.2.3G", "12 G B"):
        with pytest.raises(ValueError, match="invalid size"):
            memory.parse_bytes(bad)


def test_check_fits_refuses_in_one_line_with_the_numbers_and_hints():
    e = memory.estimate_request(TWO_B, batch=1, prompt_tokens=16384, new_tokens=128, vision_patches=65536,
                                largest_segment_patches=65536, dtype="float32", attn_implementation="xla")
    memory.check_fits(e, limit=e.total)  # exactly enough: fits
    with pytest.raises(memory.InsufficientMemory) as info:
        memory.check_fits(e, limit=8 * 10**9, hints=["--max-pixels", "fewer frames", "--dtype bfloat16"])
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, MemoryError)
    assert f"{e.total / 1e9:.1f} GB" in message and "8.0 GB is available" in message
    assert "--max-pixels, fewer frames or --dtype bfloat16" in message
    assert info.value.estimate is e and info.value.limit == 8 * 10**9
    with pytest.raises(memory.InsufficientMemory, match=r"try a shorter prompt$"):
        memory.check_fits(e, limit=1, hints=["a shorter prompt"])
    assert 0 < memory.available_bytes()


# A real request on the tiny model in a fresh process: the peak RSS (VmHWM, reset after building the model so only
# the request and the process counts) stays under the estimate.
_MEASURE = textwrap.dedent("""
    import gc, json, sys
    from pathlib import Path
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from qwen2vl_jax import demo
    from qwen2vl_jax.generation import decoding as generation
    from qwen2vl_jax.modeling import config as C
    from qwen2vl_jax.modeling.model import Qwen2VL

    def status(field):
        line = [x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":")][0]
        return int(line.split()[1]) * 1024

    jnp.zeros(1).block_until_ready()
    cfg = C.Qwen2VLConfig.from_hf(demo.TINY_HF_CONFIG)
    baseline = status("VmRSS")
    model = Qwen2VL(cfg, rngs=nnx.Rngs(0))
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    P, text = 64 * 64, 300
    ids = np.concatenate([[cfg.vision_start_token_id], [cfg.image_token_id] * (P // 4), [cfg.vision_end_token_id],
                          np.random.default_rng(0).integers(0, 150000, text)])[None]
    pixels = np.random.default_rng(1).standard_normal((P, cfg.vision_config.patch_dim), np.float32)
    generation.generate(model, ids, pixel_values=pixels, image_grid_thw=[[1, 64, 64]], max_new_tokens=8)
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "prompt": ids.shape[1], "patches": P}))
""")


def test_estimate_bounds_the_measured_peak_of_a_tiny_request():
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak-RSS mark")
    done = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    m = json.loads(done.stdout.strip().splitlines()[-1])
    e = memory.estimate_request(TINY, batch=1, prompt_tokens=m["prompt"], new_tokens=8,
                                vision_patches=m["patches"], largest_segment_patches=m["patches"])
    assert m["peak"] <= e.total, (m, e)
    assert m["peak"] - m["baseline"] <= e.total - m["baseline"]
    assert e.total <= 4 * m["peak"]  # an upper bound, not a blanket refusal


def test_padded_lengths_are_the_ones_generate_uses(monkeypatch):
    """The decode cache `generate` builds (and the prompt-sized prefill cache) has the slots the estimate counts."""
    from flax import nnx

    from qwen2vl_jax.generation import decoding as generation
    from qwen2vl_jax.modeling.model import Qwen2VL

    seen = []
    real = generation._start_jit

    def spy(logits, cache, *args, **kwargs):
        seen.append((cache.max_length, kwargs["cache_length"]))
        return real(logits, cache, *args, **kwargs)

    monkeypatch.setattr(generation, "_start_jit", spy)
    model = Qwen2VL(TINY, rngs=nnx.Rngs(0))
    for prompt, new in ((5, 3), (70, 40)):
        ids = np.random.default_rng(prompt).integers(0, 150000, (2, prompt))
        generation.generate(model, ids, max_new_tokens=new)
        assert seen[-1] == memory.padded_lengths(prompt, new)
