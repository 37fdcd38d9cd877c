"""Soak (slow suite): 300 mixed requests through one loaded model. Once every bucket has been seen, compiles stop
and the process's memory stays flat (no per-request growth: caches, records, compiled programs)."""

import itertools

import numpy as np
import psutil
import pytest

import helpers
from qwen2vl_jax.generation import decoding as gen
from qwen2vl_jax.modeling import programs
from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

pytestmark = pytest.mark.slow

N_REQUESTS = 300


def _compiles() -> int:
    return sum(gen.compiles().values()) + programs.compiles()["vision"]


def _rss() -> int:
    return psutil.Process().memory_info().rss


def test_300_mixed_requests_keep_compiles_and_memory_flat(tiny_checkpoint, proc, photos):
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    media = {
        "text": ([], []),
        "small_image": ([photos["coffee"].resize((224, 168))], []),
        "large_image": ([photos["astronaut"].resize((448, 392))], []),
        "video": ([], [helpers.video_frames(4, size=(112, 140))]),
    }
    prompts = ["Describe it.", "Tell me everything you notice, in order, with as many details as you can: " * 4]
    batches, budgets = (1, 2), (4, 24)
    kinds = list(itertools.product(media, prompts, batches, budgets))

    def request(kind, seed):
        name, text, batch, new = kind
        images, videos = media[name]
        messages = [[{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos)
                      + [{"type": "text", "text": text + " " * (b % 2)}]}] for b in range(batch)]
        rendered = [proc.apply_chat_template(m, add_generation_prompt=True) for m in messages]
        inputs = proc(text=rendered, images=images * batch or None, videos=videos * batch or None)
        out = model.generate(**inputs, max_new_tokens=new, do_sample=seed % 2 == 1, temperature=0.7, top_k=20,
                             seed=seed, return_dict=True)
        assert out.sequences.shape[0] == batch and 1 <= out.new_tokens <= new

    for i, kind in enumerate(kinds):  # warm-up: every bucket once (greedy and sampled programs)
        request(kind, i)
        request(kind, i + 1)
    compiles, rss0 = _compiles(), _rss()
    rng = np.random.default_rng(0)
    samples = []
    for i in range(N_REQUESTS):
        request(kinds[rng.integers(len(kinds))], 1000 + i)
        if i % 50 == 49:
            samples.append(_rss())
    helpers.record("soak", requests=N_REQUESTS, kinds=len(kinds), compiles_after_warmup=_compiles() - compiles,
                   rss_after_warmup_mb=rss0 / 2**20, rss_samples_mb=[s / 2**20 for s in samples])
    assert _compiles() == compiles  # every bucket was seen in the warm-up: nothing new compiled
    assert max(samples) < 1.05 * rss0, (rss0, samples)
