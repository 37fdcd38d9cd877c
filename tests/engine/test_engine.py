"""The serving engine (`qwen2vl_jax.engine`) against `generate` alone: continuous batching changes nothing a
request gets (greedy: the same tokens; seeded sampling: the same draws), on both families, with photos, videos,
staggered arrivals, chunked prefill, stop strings, the vision cache and the prefix cache."""

from __future__ import annotations

import numpy as np
import pytest

import helpers
from qwen2vl_jax.engine import Engine, EngineError, Request
from qwen2vl_jax.generation.decoding import generate
from qwen2vl_jax.generation.sampling import GenerationConfig

GREEDY = dict(do_sample=False, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration
    from qwen2vl_jax.processing.processor import Qwen2VLProcessor

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="xla")
    return model, Qwen2VLProcessor.from_pretrained(tiny_checkpoint, max_pixels=64 * 28 * 28)


@pytest.fixture(scope="module")
def tiny25(tiny25_checkpoint):
    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration
    from qwen2vl_jax.processing.processor import Qwen2VLProcessor

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny25_checkpoint, attn_implementation="xla")
    return model, Qwen2VLProcessor.from_pretrained(tiny25_checkpoint, max_pixels=64 * 28 * 28)


def inputs(proc, text, images=(), videos=(), fps=None) -> dict:
    content = [*({"type": "image"} for _ in images), *({"type": "video"} for _ in videos),
               {"type": "text", "text": text}]
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    kw = {"fps": fps} if fps is not None else {}
    out = proc(text=[prompt], images=list(images) or None, videos=list(videos) or None, **kw)
    return {k: np.asarray(v) for k, v in out.items() if k != "attention_mask"}


def request(x: dict, config: GenerationConfig, **kw) -> Request:
    return Request(input_ids=x["input_ids"], pixel_values=x.get("pixel_values"), image_grid_thw=x.get("image_grid_thw"),
                   pixel_values_videos=x.get("pixel_values_videos"), video_grid_thw=x.get("video_grid_thw"),
                   second_per_grid_ts=x.get("second_per_grid_ts"), generation_config=config, **kw)


def alone(model, x: dict, config: GenerationConfig) -> list[int]:
    """What `generate` gives this request by itself."""
    out = generate(model, x["input_ids"], None, x.get("pixel_values"), x.get("image_grid_thw"),
                   x.get("pixel_values_videos"), x.get("video_grid_thw"),
                   second_per_grid_ts=x.get("second_per_grid_ts"), generation_config=config)
    return np.asarray(out)[0, x["input_ids"].shape[1]:].tolist()


def run_staggered(engine: Engine, arrivals: list[tuple[int, Request]]):
    """Submit each request at its step (the engine stepping in between, others mid-flight), run to the end."""
    handles, step = {}, 0
    pending = sorted(range(len(arrivals)), key=lambda i: arrivals[i][0])
    while pending or engine.busy():
        while pending and arrivals[pending[0]][0] <= step:
            i = pending.pop(0)
            handles[i] = engine.submit(arrivals[i][1])
        engine.step()
        step += 1
    return [handles[i].wait() for i in range(len(arrivals))]


def test_sixteen_staggered_requests_each_get_what_generate_gives_them_alone(tiny, photos):
    model, proc = tiny
    frames = helpers.video_frames(6)
    small = proc.image_processor  # two photos of different sizes: the coffee one smaller
    x = {
        "text": inputs(proc, "Count from one to twenty, slowly, and explain each number. " * 4),
        "photo": inputs(proc, "What is in this picture?", [photos["astronaut"]]),
        "two": inputs(proc, "Compare these.", [photos["coffee"].resize((200, 140)), photos["rocket"]]),
        "video": inputs(proc, "What happens in the video?", videos=[frames]),
        "short": inputs(proc, "Hi"),
        "both": inputs(proc, "Photo then video.", [photos["chelsea"]], [frames]),
    }
    assert small is not None and x["two"]["image_grid_thw"][0].tolist() != x["two"]["image_grid_thw"][1].tolist()
    greedy = lambda n, **kw: GenerationConfig(max_new_tokens=n, **{**GREEDY, **kw})
    sample = lambda n, seed, **kw: GenerationConfig(max_new_tokens=n, do_sample=True, seed=seed, **{"top_k": 0, **kw})
    plan = [  # (arrival step, inputs, settings, stop strings)
        (0, "text", greedy(40), ()), (0, "photo", greedy(12), ()), (0, "short", greedy(3), ()),
        (1, "video", greedy(10), ()), (2, "two", sample(9, 7), ()), (3, "short", sample(6, 11, temperature=0.7), ()),
        (3, "photo", greedy(24, repetition_penalty=1.1), ()), (5, "both", greedy(8), ()),
        (6, "text", sample(30, 5, top_p=0.9), ()), (8, "short", greedy(2), ()), (9, "two", greedy(16), ()),
        (12, "video", sample(7, 3, top_k=40), ()), (14, "photo", greedy(5, min_new_tokens=5), ()),
        (15, "text", greedy(40), "stop"), (20, "both", sample(20, 9), "stop"),
        (21, "text", sample(12, 13, top_k=1, top_p=0.001, temperature=0.1), ()),  # the Instruct checkpoints' settings
    ]
    expected = [alone(model, x[name], config) for _, name, config, _ in plan]
    stops = []
    for (_, _, _, stop), tokens in zip(plan, expected):  # a stop string the answer does reach
        text = proc.decode(tokens, skip_special_tokens=True)
        stops.append([text[len(text) // 2: len(text) // 2 + 3]] if stop and len(text) > 6 else [])
    engine = Engine(model, proc, max_slots=4, page_size=16, max_chunk=64, max_context=640)
    results = run_staggered(engine, [(step, request(x[name], config, stop=stop))
                                     for (step, name, config, _), stop in zip(plan, stops)])
    for (step, name, config, _), stop, want, got in zip(plan, stops, expected, results):
        if stop:  # ends at the token that completes the stop string
            assert got.finish_reason == "stop" and got.tokens == want[:len(got.tokens)], (name, stop)
            assert stop[0] in proc.decode(got.tokens, skip_special_tokens=True)
            assert stop[0] not in proc.decode(got.tokens[:-1], skip_special_tokens=True)
        else:
            assert got.tokens == want, (step, name, config)
    assert any(s for s in stops), "no stop string was exercised"
    stats = engine.stats()
    assert stats["slots_busy"] == 0 and stats["pages_free"] + stats["pages_evictable"] == stats["pages_total"]
    assert stats["chunk_tokens"] > 0 and stats["vision_cache_hits"] > 0 and stats["prefix_hits"] > 0


def test_qwen2_5_video_with_fps_and_photos_match_generate_alone(tiny25, photos):
    model, proc = tiny25
    frames = helpers.video_frames(6)
    x = {"video1": inputs(proc, "What happens?", videos=[frames], fps=1.0),
         "video4": inputs(proc, "What happens?", videos=[frames], fps=4.0),
         "photo": inputs(proc, "Describe.", [photos["grace_hopper"]]),
         "text": inputs(proc, "Tell me a story about a robot. " * 6)}
    assert x["video1"]["second_per_grid_ts"][0] != x["video4"]["second_per_grid_ts"][0]
    plan = [(0, "video1", GenerationConfig(max_new_tokens=12, **GREEDY)),
            (0, "text", GenerationConfig(max_new_tokens=30, do_sample=True, seed=1, top_k=0)),
            (2, "video4", GenerationConfig(max_new_tokens=12, **GREEDY)),
            (4, "photo", GenerationConfig(max_new_tokens=10, **GREEDY)),
            (5, "video1", GenerationConfig(max_new_tokens=6, do_sample=True, seed=2, top_k=0))]
    expected = [alone(model, x[name], config) for _, name, config in plan]
    engine = Engine(model, proc, max_slots=3, page_size=8, max_chunk=32, max_context=512)
    results = run_staggered(engine, [(step, request(x[name], config)) for step, name, config in plan])
    for (step, name, _), want, got in zip(plan, expected, results):
        assert got.tokens == want, (step, name)
    # the same video at another fps has other positions: its keys are not the first one's
    assert results[2].cached_tokens <= x["video4"]["input_ids"].tolist()[0].index(model.config.video_token_id)


def test_a_repeated_photo_skips_the_vision_tower_and_gives_identical_logits(tiny, photos):
    model, proc = tiny
    x = inputs(proc, "What is in this picture?", [photos["astronaut"]])
    config = GenerationConfig(max_new_tokens=4, **GREEDY)
    uncached = Engine(model, proc, max_slots=2, vision_cache_bytes=0, prefix_cache=False, max_context=256)
    first = uncached.generate_many([request(x, config, output_logits=True)])[0]
    engine = Engine(model, proc, max_slots=2, prefix_cache=False, max_context=256)
    engine.generate_many([request(x, config)])
    runs = engine.stats()["vision_runs"]
    again = engine.generate_many([request(x, config, output_logits=True)])[0]
    assert engine.stats()["vision_runs"] == runs == 1  # the tower ran zero times for the repeat
    assert engine.stats()["vision_cache_hits"] == 1
    np.testing.assert_array_equal(again.logits, first.logits)


def test_two_photos_with_the_same_grid_never_share_a_prefix_entry(tiny, photos):
    model, proc = tiny
    a = inputs(proc, "What is in this picture?", [photos["coffee"].resize((224, 224))])
    b = inputs(proc, "What is in this picture?", [photos["chelsea"].resize((224, 224))])
    assert (a["input_ids"] == b["input_ids"]).all() and (a["image_grid_thw"] == b["image_grid_thw"]).all()
    config = GenerationConfig(max_new_tokens=3, **GREEDY)
    engine = Engine(model, proc, max_slots=2, page_size=4, max_context=256)
    ra = engine.generate_many([request(a, config)])[0]
    rb = engine.generate_many([request(b, config)])[0]
    ra2 = engine.generate_many([request(a, config)])[0]
    image_start = a["input_ids"][0].tolist().index(model.config.image_token_id)
    assert ra.cached_tokens == 0
    assert rb.cached_tokens <= image_start  # only the text before the photo
    assert ra2.cached_tokens > image_start  # the same photo again: its keys are reused
    assert rb.tokens == alone(model, b, config) and ra2.tokens == ra.tokens == alone(model, a, config)


def test_prefix_matches_are_cut_back_to_the_start_of_a_vision_span():
    from qwen2vl_jax.engine.pages import cut_back

    spans = [(10, 30), (40, 44)]
    assert cut_back(32, spans, 100, 4) == 32  # after the first image
    assert cut_back(24, spans, 100, 4) == 8  # inside it: back to its start (10), then to a page (8)
    assert cut_back(44, spans, 100, 4) == 44
    assert cut_back(48, spans, 48, 4) == 44  # one prompt token must run: 47 -> a page boundary
    assert cut_back(42, [(10, 30), (41, 44)], 100, 2) == 40


def test_admission_waits_for_pages_and_refuses_what_can_never_fit(tiny):
    model, proc = tiny
    x = inputs(proc, "Count to ten, please, one number per line. " * 3)
    T = x["input_ids"].shape[1]
    config = GenerationConfig(max_new_tokens=8, **GREEDY)
    per_request = -(-(T + 8) // 8)
    engine = Engine(model, proc, max_slots=4, page_size=8, num_pages=1 + per_request + 2, prefix_cache=False,
                    max_context=512)
    results = engine.generate_many([request(x, config) for _ in range(3)])  # one at a time: the pool holds one
    assert engine.stats()["waited_for_pages"] > 0
    assert all(r.tokens == results[0].tokens for r in results)
    assert engine.stats()["pages_free"] == engine.stats()["pages_total"]
    with pytest.raises(EngineError, match="pages"):
        engine.submit(request(x, GenerationConfig(max_new_tokens=40, **GREEDY)))
    with pytest.raises(EngineError, match="context"):
        engine.submit(request(x, GenerationConfig(max_new_tokens=600, **GREEDY)))
    with pytest.raises(EngineError, match="input_ids"):
        engine.submit(Request(input_ids=np.array([[1, 2], [3, 4]])))


def test_a_running_stream_gets_a_token_every_step_while_a_long_prompt_is_prefilled(tiny):
    """Chunked prefill: a 500+-token prompt is prefilled 64 tokens a step, each step also decoding the running
    request, which so gains one token per step; both answers are generate's."""
    model, proc = tiny
    running = inputs(proc, "Tell me a long story.")
    long = inputs(proc, "Here is a long document about birds, trees and rivers. " * 50 + "Summarise it.")
    assert long["input_ids"].shape[1] >= 500
    config = GenerationConfig(max_new_tokens=40, **GREEDY)
    engine = Engine(model, proc, max_slots=2, page_size=16, max_chunk=64, max_context=1024)
    tokens = []
    a = engine.submit(request(running, config, on_token=tokens.append))
    while len(tokens) < 3:
        engine.step()
    b_tokens = []
    b = engine.submit(request(long, GenerationConfig(max_new_tokens=4, **GREEDY), on_token=b_tokens.append))
    before, steps = len(tokens), 0
    while not b_tokens:
        engine.step()
        steps += 1
    assert steps == -(-long["input_ids"].shape[1] // 64)  # one chunk a step
    assert len(tokens) - before == steps  # ... and a token for the running request in every one of them
    while engine.busy():
        engine.step()
    assert a.wait().tokens == alone(model, running, config)
    assert b.wait().tokens == alone(model, long, GenerationConfig(max_new_tokens=4, **GREEDY))


def test_decoding_goes_on_while_the_vision_thread_encodes_a_photo(tiny, photos, monkeypatch):
    """With the loop in a thread, a new photo is encoded beside it: the running request keeps getting tokens while
    the vision tower is (held) busy, and the photo's answer is still generate's."""
    import threading
    import time

    from qwen2vl_jax.modeling.vision import VisionTransformer

    model, proc = tiny
    entered, release = threading.Event(), threading.Event()
    original = VisionTransformer.__call__

    def held(self, *args, **kwargs):
        entered.set()
        assert release.wait(60)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(VisionTransformer, "__call__", held)
    running = inputs(proc, "Tell me a long story.")
    photo = inputs(proc, "What is in this picture?", [photos["rocket"]])
    engine = Engine(model, proc, max_slots=2, max_context=512)
    engine.start()
    try:
        tokens = []
        a = engine.submit(request(running, GenerationConfig(max_new_tokens=200, **GREEDY), on_token=tokens.append))
        deadline = time.time() + 60
        while len(tokens) < 2:
            assert time.time() < deadline
            time.sleep(0.01)
        b = engine.submit(request(photo, GenerationConfig(max_new_tokens=5, **GREEDY)))
        assert entered.wait(60)
        held_at = len(tokens)
        while len(tokens) < held_at + 10:  # the tower is held: only the loop can make these
            assert time.time() < deadline and not a.done.is_set()
            time.sleep(0.01)
        release.set()
        assert b.wait(60).tokens == alone(model, photo, GenerationConfig(max_new_tokens=5, **GREEDY))
        a.wait(120)
    finally:
        release.set()
        engine.close()


@pytest.mark.parametrize("load", [dict(scan_layers=True), dict(quantization="int8"), dict(dtype="bfloat16")],
                         ids=["scan_layers", "int8", "bfloat16"])
def test_scanned_quantized_and_bf16_models_run_in_the_engine_as_in_generate(tiny_checkpoint, tiny, photos, load):
    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

    _, proc = tiny
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, **load)
    xs = [inputs(proc, "Hello there, count to ten please."), inputs(proc, "What is this?", [photos["coffee"]])]
    config = GenerationConfig(max_new_tokens=10, **GREEDY)
    engine = Engine(model, proc, max_slots=2, page_size=8, max_chunk=32, max_context=256)
    results = engine.generate_many([request(x, config) for x in xs])
    assert [r.tokens for r in results] == [alone(model, x, config) for x in xs]
