"""`qwen2vl-jax serve`: the official `openai` client against a real uvicorn server (in this process) on the tiny
checkpoint. Answers equal the Python `generate` path; errors are OpenAI-style bodies with the right statuses; the
worker batches concurrent requests; memory stays flat across rounds of concurrent requests."""

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
        with engine.lock:  # the worker takes the first request, then waits for the model
            first = pool.submit(ask, small, "one", 2, temperature=0)
            _wait(lambda: engine.stats["taken"] == 1)
            second = pool.submit(ask, small, "two", 2, temperature=0)  # fills the queue of one
            _wait(lambda: len(engine.queue) == 1)
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

    before = dict(served.engine.stats["batch_sizes"])
    round_of_50()  # warm-up: compiles every batch shape
    assert max(served.engine.stats["batch_sizes"]) > 1, served.engine.stats
    assert sum(served.engine.stats["batch_sizes"].values()) < sum(before.values()) + 50  # fewer batches than requests
    first = round_of_50()
    second = round_of_50()
    assert abs(second - first) <= 0.05 * first, (first, second)
    assert ask(served, "Still there?", max_tokens=2, temperature=0).choices[0].message.content is not None


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

