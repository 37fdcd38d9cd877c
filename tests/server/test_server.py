"""`qwen2vl-jax serve`: the official `openai` client against a real uvicorn server (in this process) on the tiny
checkpoint. Answers equal the Python `generate` path; errors are OpenAI-style bodies with the right statuses; the
engine batches concurrent requests continuously; memory stays flat across rounds of concurrent requests; a short
request is not held up by a long one; /metrics speaks Prometheus."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest
import uvicorn

from qwen2vl_jax import cli
from qwen2vl_jax.generation.decoding import generate
from qwen2vl_jax.server.app import Engine, build_engine, create_app
from qwen2vl_jax.server.guard import uvicorn_config

NAME = "tiny-qwen2vl"


def _serve(engine: Engine, **app_options):
    """A live uvicorn server on a free loopback port over `engine` (`app_options`: create_app's keywords)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(engine, **app_options)
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    # no retries: the client would otherwise retry 503s and hide them
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    return SimpleNamespace(engine=engine, url=url, client=client, server=server, thread=thread, app=app)


def _stop(served) -> None:
    served.server.should_exit = True
    served.thread.join(timeout=30)
    served.engine.close()


@pytest.fixture(scope="module")
def served(tiny_checkpoint):
    s = _serve(build_engine(tiny_checkpoint, model_name=NAME, max_batch=8, max_queue=64))
    yield s
    _stop(s)


@pytest.fixture(scope="module")
def small(served):
    """A second server over the same model: a queue of one, 4 KiB bodies."""
    e = served.engine
    s = _serve(Engine(e.model, e.processor, model_name=NAME, max_queue=1, max_request_bytes=4096))
    yield s
    _stop(s)


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def reference(engine, content, max_new_tokens: int, images=None) -> str:
    """The Python path: chat template + processor + greedy `generate`, decoded like the server's answer."""
    prompt = engine.processor.apply_chat_template([{"role": "user", "content": content}])
    inputs = engine.processor(text=[prompt], images=images)
    with engine.lock:
        out = generate(engine.model, **inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return engine.processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def ask(served, text: str, max_tokens: int = 6, **kw):
    return served.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": text}],
                                                 max_tokens=max_tokens, **kw)


# ------------------------------------------------------------------------------------------------ answers
def test_text_completion_equals_generate(served):
    r = ask(served, "Describe a cat.", max_tokens=8, temperature=0)
    expected = reference(served.engine, "Describe a cat.", 8)
    assert r.object == "chat.completion" and r.model == NAME and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected and expected
    assert r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.completion_tokens <= 8 and u.prompt_tokens > 5 and u.total_tokens == u.prompt_tokens + u.completion_tokens
    if r.choices[0].finish_reason == "length":
        assert u.completion_tokens == 8


def test_video_requests_equal_generate(served, video_file, tmp_path, photos):
    """A `video_url` part naming a file in the allowed media directory, and a `video` part holding frames as data
    URLs, each answer what `generate` gives on the processor's inputs for the same frames (qwen-vl-utils'
    sampling, `processing.video.fetch_video`)."""
    import shutil

    import numpy as np

    from qwen2vl_jax.processing.video import fetch_video
    from qwen2vl_jax.server.media import MediaPolicy

    media_dir = tmp_path / "media"
    media_dir.mkdir()
    shutil.copy(video_file, media_dir / "clip.mp4")
    e = served.engine
    s = _serve(Engine(e.model, e.processor, model_name=NAME, media=MediaPolicy(media_dir)))
    frames = [photos["coffee"].resize((112, 84)), photos["rocket"].resize((112, 84))]
    try:
        for part, video in (({"type": "video_url", "video_url": {"url": "clip.mp4", "max_frames": 4}},
                             fetch_video(str(media_dir / "clip.mp4"), max_frames=4)[0]),
                            ({"type": "video", "video": [data_url(f) for f in frames], "fps": 1.0},
                             fetch_video(frames)[0])):
            body = {"model": NAME, "max_tokens": 5, "temperature": 0,
                    "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What happens?"}]}]}
            r = httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text[:300]
            content = [{"type": "video"}, {"type": "text", "text": "What happens?"}]
            prompt = e.processor.apply_chat_template([{"role": "user", "content": content}])
            inputs = e.processor(text=[prompt], videos=[np.asarray(video)])
            assert inputs["video_grid_thw"][0][0] >= 1
            with e.lock:
                out = generate(e.model, **inputs, max_new_tokens=5, do_sample=False)
            expected = e.processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            assert r.json()["choices"][0]["message"]["content"] == expected and expected
            assert r.json()["usage"]["prompt_tokens"] == inputs["input_ids"].shape[1]
        outside = {"model": NAME, "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": str(video_file)}}]}]}
        assert httpx.post(f"{s.url}/v1/chat/completions", json=outside, timeout=60).status_code == 403
    finally:
        _stop(s)


def test_a_qwen2_5_server_times_video_frames_by_their_fps(tiny25_checkpoint, photos):
    """Qwen2.5-VL: a `video` part's fps reaches `second_per_grid_ts` (temporal_patch_size / fps), and the answer is
    `generate`'s with those seconds."""
    import asyncio
    import json

    import numpy as np

    from qwen2vl_jax.processing.video import fetch_video
    from qwen2vl_jax.server.api import parse_request

    s = _serve(build_engine(tiny25_checkpoint, model_name=NAME, max_batch=2))
    e = s.engine
    frames = [photos[n].resize((112, 84)) for n in ("coffee", "rocket", "chelsea", "astronaut")]
    try:
        for fps in (1.0, 4.0):
            part = {"type": "video", "video": [data_url(f) for f in frames], "fps": fps}
            body = {"model": NAME, "max_tokens": 5, "temperature": 0,
                    "messages": [{"role": "user", "content": [part, {"type": "text", "text": "What happens?"}]}]}
            job = e.prepare(parse_request(json.dumps(body).encode()), asyncio.new_event_loop())
            assert job.second_per_grid_ts.tolist() == [2 / fps]
            r = httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text[:300]
            content = [{"type": "video"}, {"type": "text", "text": "What happens?"}]
            prompt = e.processor.apply_chat_template([{"role": "user", "content": content}])
            inputs = e.processor(text=[prompt], videos=[np.asarray(fetch_video(frames)[0])], fps=fps)
            assert inputs["second_per_grid_ts"].tolist() == [2 / fps]
            with e.lock:
                out = generate(e.model, **inputs, max_new_tokens=5, do_sample=False)
            expected = e.processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            assert r.json()["choices"][0]["message"]["content"] == expected and expected
    finally:
        _stop(s)


def test_stream_deltas_equal_the_answer(served):
    whole = ask(served, "Tell me a story.", max_tokens=8, temperature=0)
    events = list(ask(served, "Tell me a story.", max_tokens=8, temperature=0, stream=True,
                      stream_options={"include_usage": True}))
    chunks = [e for e in events if e.choices]
    assert all(e.object == "chat.completion.chunk" for e in events)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert events[-1].usage.completion_tokens == whole.usage.completion_tokens
    # the raw stream ends with OpenAI's terminator
    body = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True}
    raw = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=60)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_image_request_equals_generate(served, photos):
    photo = photos["coffee"]
    content = [{"type": "image_url", "image_url": {"url": data_url(photo)}},
               {"type": "text", "text": "What is in the picture?"}]
    r = served.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}],
                                              max_tokens=6, temperature=0)
    expected = reference(served.engine, [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}], 6,
                         images=[photo])
    assert r.choices[0].message.content == expected
    vision = photo.width * photo.height // (28 * 28)  # roughly: one token per 28x28 pixels
    assert r.usage.prompt_tokens > vision // 2


def test_image_from_a_file_url_and_the_string_form(served, photos, tmp_path):
    """Local files are read only inside the allowed directory (tests/server/test_server_security.py: the refusals)."""
    from qwen2vl_jax.server.media import MediaPolicy

    path = tmp_path / "rocket.png"
    photos["rocket"].save(path)
    body = {"model": NAME, "max_tokens": 3, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": f"file://{path}"}, {"type": "text", "text": "What?"}]}]}
    before = served.engine.media
    served.engine.media = MediaPolicy(tmp_path)
    try:
        r = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        body["messages"][0]["content"][0] = {"type": "image_url", "image_url": {"url": str(path)}}
        again = httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=60)
    finally:
        served.engine.media = before
    assert again.json()["choices"][0]["message"]["content"] == r.json()["choices"][0]["message"]["content"]
    body["messages"][0]["content"][1]["text"] = "What??"
    assert httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=60).status_code == 403


def test_models_and_health(served):
    models = served.client.models.list()
    assert [m.id for m in models.data] == [NAME] and models.data[0].owned_by == "qwen2vl_jax"
    raw = httpx.get(f"{served.url}/v1/models").json()
    assert raw["object"] == "list" and raw["data"][0]["object"] == "model" and raw["data"][0]["created"] > 0
    assert httpx.get(f"{served.url}/health").json()["status"] == "ok"


def test_stop_strings(served):
    base = ask(served, "Count to ten.", max_tokens=8, temperature=0).choices[0].message.content
    assert len(base) >= 3
    stop = base[2:4] if base[2:4].strip() else base[1:3]
    expected = base[:base.find(stop)]
    r = ask(served, "Count to ten.", max_tokens=8, temperature=0, stop=[stop, "never-appears"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    streamed = ask(served, "Count to ten.", max_tokens=8, temperature=0, stop=stop, stream=True)
    pieces = [e.choices[0] for e in streamed if e.choices]
    assert "".join(c.delta.content or "" for c in pieces) == expected and pieces[-1].finish_reason == "stop"


def test_seed_reproduces_sampling(served):
    def sample(seed):
        r = ask(served, "Say something.", max_tokens=6, temperature=1.0, top_p=1.0, seed=seed)
        return r.choices[0].message.content

    assert sample(7) == sample(7)
    assert len({sample(s) for s in (1, 2, 3)}) > 1  # top_k=0: really sampled over the (random) vocabulary


# ------------------------------------------------------------------------------------------------- errors
def test_bad_json_is_400(served):
    r = httpx.post(f"{served.url}/v1/chat/completions", content=b'{"model": "x", messages: [',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert "not valid JSON" in error["message"] and error["type"] == "invalid_request_error"
    r = httpx.post(f"{served.url}/v1/chat/completions", json={"model": NAME, "messages": [{"role": "robot"}]})
    assert r.status_code == 400 and "messages.0.role" in r.json()["error"]["message"]


def test_unknown_model_is_404(served):
    with pytest.raises(openai.NotFoundError) as e:
        served.client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert "gpt-4o" in str(e.value) and NAME in str(e.value)
    assert e.value.body["code"] == "model_not_found"


def test_corrupt_image_is_400(served):
    garbage = "data:image/png;base64," + base64.b64encode(b"\x89PNG not really an image" * 10).decode()
    content = [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": garbage}}]
    with pytest.raises(openai.BadRequestError) as e:
        served.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}])
    assert "could not decode image messages[0].content[1]" in e.value.message


def test_too_many_tokens_is_400(served):
    with pytest.raises(openai.BadRequestError) as e:
        ask(served, "hi", max_tokens=10**6)
    assert "--max-tokens" in e.value.message and "4096" in e.value.message  # the server's cap
    with pytest.raises(openai.BadRequestError) as e:
        ask(served, "word " * 29000, max_tokens=4000)
    assert "too many tokens" in e.value.message and "32768" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        ask(served, "word " * 40000, max_tokens=1)
    assert "too many tokens" in e.value.message
    with pytest.raises(openai.BadRequestError):
        ask(served, "hi", n=2)


def test_full_queue_is_503_and_large_bodies_413(small):
    engine = small.engine
    big = {"model": NAME, "messages": [{"role": "user", "content": "x" * 5000}]}
    r = httpx.post(f"{small.url}/v1/chat/completions", json=big)
    assert r.status_code == 413 and "4096" in r.json()["error"]["message"]

    with ThreadPoolExecutor(2) as pool:
        with engine.lock:  # the engine admits the first request into a slot, then waits for the model
            first = pool.submit(ask, small, "one", 2, temperature=0)
            _wait(lambda: engine.core.stats()["slots_busy"] == 1)
            second = pool.submit(ask, small, "two", 2, temperature=0)  # fills the queue of one
            _wait(lambda: len(engine.core.waiting) == 1)
            with pytest.raises(openai.InternalServerError) as e:
                ask(small, "three", 2, temperature=0)
            assert e.value.status_code == 503 and "busy" in e.value.message
        assert first.result().choices[0].message.content is not None
        assert second.result().choices[0].message.content is not None


def _wait(condition, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------- concurrency
def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_fifty_concurrent_requests_batch_and_keep_memory_flat(served):
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(5)]
    expected = {p: reference(served.engine, p, 4) for p in prompts}

    def one(i):
        r = ask(served, prompts[i % len(prompts)], max_tokens=4, temperature=0)
        return prompts[i % len(prompts)], r

    def round_of_50():
        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(one, range(50)))
        for prompt, r in results:
            assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 4
            assert r.choices[0].message.content == expected[prompt]
        return _rss()

    counters = served.engine.core.counters
    steps, tokens = counters["steps"], counters["tokens"]
    round_of_50()  # warm-up: compiles the step's buckets
    assert counters["tokens"] - tokens >= 50 and counters["steps"] - steps < counters["tokens"] - tokens  # shared steps
    first = round_of_50()
    second = round_of_50()
    assert abs(second - first) <= 0.05 * first, (first, second)
    assert ask(served, "Still there?", max_tokens=2, temperature=0).choices[0].message.content is not None


def test_a_short_request_finishes_long_before_a_long_answer(served):
    """Continuous batching: a 2-token request sent while a 400-token answer is being generated starts at the next
    step and finishes long before it (the round-2 server ran it after the whole long answer)."""
    done = {}

    def timed(name, content, max_tokens):
        r = ask(served, content, max_tokens=max_tokens, temperature=0)
        done[name] = (time.perf_counter(), r.usage.completion_tokens)

    ask(served, "warm up", max_tokens=2, temperature=0)
    with ThreadPoolExecutor(2) as pool:
        long = pool.submit(timed, "long", "Write a very long story about the sea.", 400)
        _wait(lambda: served.engine.core.stats()["slots_busy"] >= 1)
        start = time.perf_counter()
        _wait(lambda: served.engine.core.counters["tokens"] > 0)
        short = pool.submit(timed, "short", "Hi", 2)
        short.result()
        long.result()
    assert done["long"][1] > 100, "the long answer ended early: nothing to overtake"
    assert done["short"][0] < done["long"][0]
    short_took, long_took = done["short"][0] - start, done["long"][0] - start
    assert short_took < 0.5 * long_took, (short_took, long_took)


def test_metrics_are_prometheus_text_and_move_with_requests(served):
    before = httpx.get(f"{served.url}/metrics")
    assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
    ask(served, "Count to three.", max_tokens=3, temperature=0)
    after = httpx.get(f"{served.url}/metrics").text

    def values(text):
        out, types = {}, {}
        for line in text.splitlines():
            if line.startswith("# TYPE"):
                _, _, name, kind = line.split()
                types[name] = kind
            elif line and not line.startswith("#"):
                name, value = line.split()
                out[name] = float(value)
        assert set(out) == set(types)  # every sample has its TYPE line
        return out, types

    old, _ = values(before.text)
    new, types = values(after)
    for gauge in ("qwen2vl_jax_slots_busy", "qwen2vl_jax_pages_free", "qwen2vl_jax_slots_total"):
        assert types[gauge] == "gauge"
    assert types["qwen2vl_jax_tokens_total"] == "counter"
    assert new["qwen2vl_jax_tokens_total"] >= old["qwen2vl_jax_tokens_total"] + 1
    assert new["qwen2vl_jax_server_requests_total"] == old["qwen2vl_jax_server_requests_total"] + 1
    assert new["qwen2vl_jax_slots_total"] == served.engine.max_batch
    assert new["qwen2vl_jax_pages_free"] + new["qwen2vl_jax_pages_evictable"] == new["qwen2vl_jax_pages_total"]


# ---------------------------------------------------------------------------------------------------- cli
def test_cli_serve_help_and_bad_model(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        cli.main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--host", "--port", "--max-batch", "--max-queue", "--max-request-bytes", "--dtype"):
        assert flag in out
    assert cli.main(["serve", "--model", str(tmp_path / "missing"), "--offline"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "missing" in err

