"""A soak of the serving engine: 300 random requests (text of random lengths, photos, greedy and sampled, short and
long answers) arriving while others run. After `warmup()` nothing compiles; the page pool comes back full; the
process's memory stays flat."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from qwen2vl_jax.engine import Engine, Request
from qwen2vl_jax.engine.step import compiles as step_compiles
from qwen2vl_jax.generation.sampling import GenerationConfig
from qwen2vl_jax.modeling import programs

WORDS = "the robot walks to a red door and opens it slowly while counting birds in the quiet morning".split()


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def all_compiles() -> dict:
    return {**step_compiles(), "vision": programs.compiles()["vision"]}


@pytest.fixture(scope="module")
def soak_model(tiny_checkpoint):
    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration
    from qwen2vl_jax.processing.processor import Qwen2VLProcessor

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="xla")
    return model, Qwen2VLProcessor.from_pretrained(tiny_checkpoint, max_pixels=64 * 28 * 28)


def random_request(rng, proc, photos) -> Request:
    text = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 90))))
    images = [photos[int(rng.integers(len(photos)))]] if rng.random() < 0.3 else []
    content = [*({"type": "image"} for _ in images), {"type": "text", "text": text}]
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    x = proc(text=[prompt], images=images or None)
    sampled = rng.random() < 0.4
    truncated = sampled and rng.random() < 0.1  # top-k / top-p: a sort of the vocabulary per step (slow on a CPU)
    config = GenerationConfig(max_new_tokens=int(rng.integers(1, 24)), do_sample=sampled,
                              seed=int(rng.integers(2**31)), top_k=int(rng.integers(1, 50)) if truncated else 0,
                              top_p=0.9 if truncated else 1.0, repetition_penalty=float(rng.choice([1.0, 1.05])))
    return Request(input_ids=np.asarray(x["input_ids"]), pixel_values=x.get("pixel_values"),
                   image_grid_thw=x.get("image_grid_thw"), generation_config=config)


@pytest.mark.slow  # ~3.5 min on 2 cores: `pytest -m slow` (test_engine.py's sixteen staggered requests stay default)
def test_three_hundred_random_requests_compile_nothing_after_warmup_and_return_every_page(soak_model, photos):
    model, proc = soak_model
    rng = np.random.default_rng(0)
    pics = [photos[n].resize((224, 224)) for n in ("astronaut", "coffee", "rocket")]
    engine = Engine(model, proc, max_slots=6, page_size=16, max_chunk=64, max_context=256, vision_cache_bytes=2**20)
    before = all_compiles()
    assert engine.warmup() == len(engine.buckets())
    warm = random_request(np.random.default_rng(1), proc, pics[:1])
    photo = proc(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[pics[0]])
    engine.generate_many([warm, Request(input_ids=np.asarray(photo["input_ids"]), pixel_values=photo["pixel_values"],
                                        image_grid_thw=photo["image_grid_thw"])])  # the photo's tower program
    warmed = all_compiles()
    assert warmed["step"] > before["step"]  # the counter does move (the tower's may be warm from other tests)
    handles, asked, rss = [], [], []
    while len(handles) < 300 or engine.busy():
        for _ in range(int(rng.poisson(0.8)) if len(handles) < 300 else 0):
            r = random_request(rng, proc, pics)
            asked.append(r.generation_config.max_new_tokens)
            handles.append(engine.submit(r))
            del r
        engine.step()
        if len(handles) in (100, 300) and len(rss) < (1 if len(handles) == 100 else 2):
            gc.collect()
            rss.append(rss_bytes())
    results = [h.wait() for h in handles]
    assert all_compiles() == warmed, "something compiled after warm-up"
    assert all(1 <= len(r.tokens) <= n for r, n in zip(results, asked))
    assert all(h.request is None for h in handles)  # finished: no pixels held
    assert {r.finish_reason for r in results} <= {"stop", "length"}
    stats = engine.stats()
    assert stats["slots_busy"] == 0 and stats["pages_in_use"] == 0
    assert engine.pool.available() == engine.pool.usable  # every page free or evictable
    assert stats["vision_cache_hits"] > 0 and stats["prefix_hits"] > 0
    assert rss[1] <= 1.05 * rss[0], f"RSS grew from {rss[0] / 2**20:.0f} MiB to {rss[1] / 2**20:.0f} MiB"
