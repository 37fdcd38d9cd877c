"""Generation vs transformers 4.57 `generate` (fp32, tiny random models, the real tokenizer)."""

import jax
import numpy as np
import pytest
import torch

import helpers
from qwen2vl_jax.generation import decoding as gen
from qwen2vl_jax.generation.decoding import TextStreamer
from qwen2vl_jax.generation.sampling import GenerationConfig
from qwen2vl_jax.modeling import programs
from qwen2vl_jax.modeling.buckets import bucket
from qwen2vl_jax.modeling.vision_layout import vision_layout
from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration
from qwen2vl_jax.processing.processor import Qwen2VLProcessor

N_NEW = 32


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint), helpers.load_hf_model(tiny_checkpoint)


def _inputs(tok, photos, case):
    f = helpers.hf_inputs
    return {
        "text": lambda: f(tok, [helpers.chat("Write a haiku about the sea.")]),
        "one_photo": lambda: f(tok, [helpers.chat("What is in this picture?", 1)], images=[photos["astronaut"]]),
        "three_images": lambda: f(tok, [helpers.chat("Compare them.", 3)],
                                  images=[photos["coffee"], photos["chelsea"], photos["grace_hopper"]]),
        "video": lambda: f(tok, [helpers.chat("What happens?", 0, 1)], videos=[helpers.video_frames(6)]),
        "image_and_video": lambda: f(tok, [helpers.chat("Relate them.", 1, 1)], images=[photos["rocket"]],
                                     videos=[helpers.video_frames(4, size=(112, 196))]),
        "left_padded_batch": lambda: f(
            tok, [helpers.chat("Describe the image.", 1), helpers.chat("Hi!"),
                  helpers.chat("And this clip, what is shown in it over time?", 0, 1)],
            images=[photos["coffee"]], videos=[helpers.video_frames(4, size=(112, 140))]),
    }[case]()


def _hf_generate(hf, inputs, **kw):
    with torch.no_grad():
        out = hf.generate(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}, **kw)
    return out.numpy()


CASES = ["text", "one_photo", "three_images", "video", "image_and_video", "left_padded_batch"]


def test_prefill_compiles_per_prompt_bucket_not_per_max_new_tokens(pair):
    """(prompt bucket x max_new_tokens) pairs: the prefill compiles once per prompt bucket (it used to compile per
    pair, ~3 s and ~6.6 MB each on this model), the decode loop once per cache bucket however many segments it
    runs in. The jit caches are emptied first, so every bucket is new and must add exactly one program (a count
    that never moved would fail)."""
    ours, _ = pair
    jax.clear_caches()
    assert set(gen.compiles().values()) == {0}
    rng = np.random.default_rng(3)
    prompts, caches, pairs = set(), set(), set()
    for T in (30, 200):
        ids = rng.integers(1000, 100000, size=(1, T))
        for n in (5, 100):  # two new-token budgets that were two power-of-two buckets
            out = ours.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, return_dict=True)
            assert out.new_tokens == n
            prompt, cache = bucket(T, gen.PROMPT_GRANULE), bucket(bucket(T, gen.PROMPT_GRANULE) + n, gen.PROMPT_GRANULE)
            prompts.add(prompt)
            caches.add(cache)
            pairs.add((prompt, cache))
            if (T, n) == (30, 5):  # the first call: one program each, no streaming step
                assert gen.compiles() == {"prefill": 1, "start": 1, "decode_loop": 1, "decode_step": 0}
    counts = gen.compiles()
    assert counts["prefill"] == len(prompts) == 2
    assert counts["decode_loop"] == len(caches) and counts["start"] == len(pairs)


@pytest.mark.parametrize("penalty", [1.0, 1.05])
@pytest.mark.parametrize("case", CASES)
def test_greedy_tokens_identical(pair, hf_tokenizer, photos, case, penalty):
    ours, hf = pair
    inputs = _inputs(hf_tokenizer, photos, case)
    kw = dict(max_new_tokens=N_NEW, min_new_tokens=N_NEW, do_sample=False, repetition_penalty=penalty)
    got = ours.generate(**inputs, **kw)
    ref = _hf_generate(hf, inputs, **kw)
    assert got.shape == ref.shape == (inputs["input_ids"].shape[0], inputs["input_ids"].shape[1] + N_NEW)
    helpers.record(f"generate/greedy/{case}/penalty{penalty}", tokens_compared=int(ref.shape[0] * N_NEW),
                   identical=bool((got == ref).all()))
    np.testing.assert_array_equal(got, ref)


def test_eos_stops_rows_and_pads_like_reference(pair, hf_tokenizer, photos):
    """Make a token the model emits early the EOS: rows stop there, finished rows get pad, like HF."""
    ours, hf = pair
    inputs = _inputs(hf_tokenizer, photos, "left_padded_batch")
    free = _hf_generate(hf, inputs, max_new_tokens=12, do_sample=False)
    eos = int(free[0, -12 + 4])  # row 0's 5th new token
    kw = dict(max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=151643)
    ref = _hf_generate(hf, inputs, **kw)
    got = ours.generate(**inputs, **kw)
    np.testing.assert_array_equal(got, ref)
    assert (got[0, inputs["input_ids"].shape[1]:] == eos).any()


def test_checkpoint_generation_config_defaults_match_reference(pair, hf_tokenizer, photos):
    """generation_config.json of the Instruct models: do_sample with top_k=1, top_p=0.001, repetition 1.05."""
    ours, hf = pair
    inputs = _inputs(hf_tokenizer, photos, "one_photo")
    cfg = GenerationConfig.from_pretrained(ours.source_dir, max_new_tokens=16)
    assert (cfg.do_sample, cfg.top_k, cfg.top_p, cfg.repetition_penalty) == (True, 1, 0.001, 1.05)
    assert cfg.eos_token_id == (151645, 151643) and cfg.pad_token_id == 151643
    np.testing.assert_array_equal(ours.generate(**inputs, max_new_tokens=16),
                                  _hf_generate(hf, inputs, max_new_tokens=16))


def test_first_decode_steps_equal_full_forward(pair, hf_tokenizer, photos):
    ours, _ = pair
    inputs = _inputs(hf_tokenizer, photos, "left_padded_batch")
    out = ours.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, output_logits=True)
    for step in range(3):  # step 0 comes from the prefill, steps 1, 2 from the cached decode loop
        ids = out.sequences[:, : inputs["input_ids"].shape[1] + step]
        mask = np.concatenate([inputs["attention_mask"], np.ones((ids.shape[0], step), np.int64)], axis=1)
        full = np.asarray(ours(**{**inputs, "input_ids": ids, "attention_mask": mask}).logits)[:, -1]
        err = helpers.rel_err(out.logits[:, step], full)
        helpers.record(f"generate/step{step}_logits_vs_full_forward", rel_err=err)
        assert err <= 1e-5, (step, err)


def test_compiles_only_per_bucket(pair, photos):
    """10 prompt lengths x 5 image sizes: at most one compile per bucket touched, none for max_new_tokens."""
    ours, _ = pair
    proc_sizes = [(224, 280), (196, 308), (252, 252), (280, 196), (224, 336)]  # 5 image sizes (h, w), pixels
    before = gen.compiles(), programs.compiles()["vision"]
    prompt_buckets, vision_buckets = set(), set()
    rng = np.random.default_rng(0)
    for i in range(10):
        h, w = proc_sizes[i % 5]
        grid = np.array([[1, h // 14, w // 14]])
        n_img = int(np.prod(grid)) // 4
        text = list(rng.integers(1000, 100000, size=20 + 37 * i))
        ids = np.array([text + [151652] + [151655] * n_img + [151653, 198]])
        pixels = rng.standard_normal((int(np.prod(grid)), 1176)).astype(np.float32)
        ours.generate(ids, pixel_values=pixels, image_grid_thw=grid, max_new_tokens=4 + i, min_new_tokens=1,
                      do_sample=False, repetition_penalty=1.0)
        prompt_buckets.add(bucket(ids.shape[1], gen.PROMPT_GRANULE))
        layout = vision_layout(grid, 2)
        vision_buckets.add((layout.padded_patches, layout.seg_rows_QL.shape))
    prefill = gen.compiles()["prefill"] - before[0]["prefill"]
    loops = gen.compiles()["decode_loop"] - before[0]["decode_loop"]
    vis = programs.compiles()["vision"] - before[1]
    helpers.record("generate/compiles", prompts=10, image_sizes=5, prompt_buckets=len(prompt_buckets),
                   vision_buckets=len(vision_buckets), prefill_compiles=prefill, decode_compiles=loops,
                   vision_compiles=vis)
    assert len(prompt_buckets) < 10 and len(vision_buckets) < 5  # the test really shares buckets
    assert prefill <= len(prompt_buckets)
    assert vis <= len(vision_buckets)
    assert loops <= len(prompt_buckets)  # one cache length per prompt bucket (same new-token bucket)


def test_sampling_is_reproducible_per_seed(pair, hf_tokenizer, photos):
    ours, _ = pair
    inputs = _inputs(hf_tokenizer, photos, "left_padded_batch")
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=True, temperature=1.5, top_k=50, top_p=0.95,
              repetition_penalty=1.0)
    a = ours.generate(**inputs, seed=7, **kw)
    b = ours.generate(**inputs, seed=7, **kw)
    c = ours.generate(**inputs, seed=8, **kw)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    greedy = ours.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False, repetition_penalty=1.0)
    top1 = ours.generate(**inputs, seed=3, **{**kw, "top_k": 1})
    np.testing.assert_array_equal(top1, greedy)


def test_sampling_filters_follow_transformers_warpers():
    """process_logits vs transformers' RepetitionPenalty, MinNewTokens, Temperature, TopK, TopP processors."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    rng = np.random.default_rng(0)
    V, prompt_len = 400, 5
    logits = (rng.standard_normal((3, V)) * 3).astype(np.float32)
    ids = rng.integers(0, V, (3, prompt_len + 2))
    seen = np.zeros((3, V), bool)
    seen[np.repeat(np.arange(3), ids.shape[1]), ids.reshape(-1)] = True
    for temp, k, p, pen in [(0.7, 20, 0.9, 1.3), (1.3, 0, 0.5, 1.0), (1.0, 5, 1.0, 0.8), (0.5, 400, 0.3, 1.05)]:
        procs = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(pen),
                                     MinNewTokensLengthLogitsProcessor(prompt_len, 4, [7, 11]),
                                     TemperatureLogitsWarper(temp)] + ([TopKLogitsWarper(k)] if k else []) + (
                                         [TopPLogitsWarper(p)] if p < 1 else []))
        ref = procs(torch.from_numpy(ids), torch.from_numpy(logits.copy())).numpy()
        knobs = gen.Knobs(temperature=np.float32(temp), top_k=np.int32(k), top_p=np.float32(p),
                          repetition_penalty=np.float32(pen), min_new_tokens=np.int32(4), max_new_tokens=np.int32(9),
                          eos_ids=np.array([7, 11], np.int32), pad_id=np.int32(0))
        got = np.asarray(gen.process_logits(logits, seen, np.int32(2), knobs, do_sample=True))
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))
        np.testing.assert_allclose(got[~np.isneginf(got)], ref[~np.isneginf(ref)], rtol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=32768), "max_position_embeddings"),
])
def test_invalid_parameters_raise(pair, bad, match):
    ours, _ = pair
    with pytest.raises(ValueError, match=match):
        ours.generate(np.array([[1, 2, 3]]), **{"max_new_tokens": 4, **bad})


def test_right_padding_is_refused(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="left padding"):
        ours.generate(np.array([[1, 2, 3], [4, 5, 0]]), attention_mask=np.array([[1, 1, 1], [1, 1, 0]]),
                      max_new_tokens=2)


def test_streamer_holds_back_split_utf8(tokenizer_dir):
    proc = Qwen2VLProcessor.from_pretrained(tokenizer_dir)
    text = "ok 🦜🧬 ꙮ 𝔘𝔫𝔦 done"
    ids = proc.tokenizer.encode(text)
    assert any("\ufffd" in proc.tokenizer.decode([i]) for i in ids)  # some characters span several tokens
    streamer = TextStreamer(proc.tokenizer)
    for i in ids:
        streamer.put(np.array([i]))
    streamer.end()
    assert "".join(streamer.pieces) == text
    assert all("\ufffd" not in piece for piece in streamer.pieces)


def test_streamed_generation_equals_plain_generation(pair, hf_tokenizer, photos, tokenizer_dir):
    ours, _ = pair
    proc = Qwen2VLProcessor.from_pretrained(tokenizer_dir)
    inputs = _inputs(hf_tokenizer, photos, "one_photo")
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    plain = ours.generate(**inputs, **kw)
    pieces = list(gen.stream_generate(ours, proc.tokenizer, **inputs, **kw))
    new = plain[0, inputs["input_ids"].shape[1]:]
    assert "".join(pieces) == proc.tokenizer.decode(new.tolist(), skip_special_tokens=True)
    assert len(pieces) >= 2
