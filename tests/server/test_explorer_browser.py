"""The attention explorer (qwen2vl_jax/server/explorer.py + server/static/): its inspection API through FastAPI's
TestClient, and the page itself in a headless Chromium (Playwright driving Debian's `chromium` package).

Both run the tiny checkpoint with `engine.hooks` forcing every text attention row onto one chosen image token (merged
cell FORCED = (row 1, col 2), not at a corner), so the right answer is known: the heatmap's brightest cell must be
that cell, in the JSON and in the canvas pixels the browser drew.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

ROOT = Path(__file__).resolve().parents[2]
FORCED = (1, 2)  # merged-grid (row, col) every attention row is forced onto
PHOTO_SIZE = (224, 168)  # (W, H) -> a 6 x 8 merged grid: not square, so a transposed map would show
QUESTION = "What is in this photo?"


def _force_onto(slot, value, ctx):
    """text.layers.{i}.attn.probs [B, N, T, S]: every query row puts all its probability on key column `slot`."""
    return jnp.broadcast_to(jax.nn.one_hot(slot, value.shape[-1], dtype=value.dtype), value.shape)


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def photo(photos):
    return photos["astronaut"].resize(PHOTO_SIZE)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, photo):
    """The server's engine over the tiny checkpoint, with a hook forcing every attention row onto one vision token;
    `.geometry` and `.inputs` (the page's prompt, encoded here) are the test's own."""
    from qwen2vl_jax.hooks import geometry
    from qwen2vl_jax.server.app import build_engine

    engine = build_engine(tiny_checkpoint, model_name="tiny-qwen2-vl", max_request_bytes=2 * 2**20)
    model, processor = engine.model, engine.processor
    # The forced key slot: the k-th <|image_pad|> of the prompt the page sends (the image comes before the question,
    # so its columns do not depend on the question's text).
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    engine.inputs = processor(text=[processor.apply_chat_template(messages)], images=[photo])
    engine.geometry = geometry.vision_token_geometry(engine.inputs["input_ids"], engine.inputs["image_grid_thw"],
                                                     image_sizes=[photo], config=model.config, processor=processor)[0]
    _, rows, cols = engine.geometry.merged_grid
    assert (rows, cols) == (6, 8)
    slot = int(engine.geometry.token_index_M[FORCED[0] * cols + FORCED[1]])
    engine.hooks = {"text.layers.*.attn.probs": Partial(_force_onto, jnp.int32(slot))}
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def app(engine):
    from qwen2vl_jax.server.app import create_app

    return create_app(engine)


def _decode(a) -> np.ndarray:
    return np.frombuffer(base64.b64decode(a["f16"]), "<f2").astype(np.float32).reshape(a["shape"])


def _generate(client, photo, n=4):
    res = client.post("/explorer/api/generate", json={"question": QUESTION, "image": _data_url(photo),
                                                      "max_new_tokens": n})
    assert res.status_code == 200, res.text
    events = [json.loads(line) for line in res.text.splitlines() if line.strip()]
    assert events[0]["type"] == "session" and events[-1]["type"] == "done", events[-1]
    return events[0], [e for e in events if e["type"] == "token"]


def test_inspection_api(app, engine, photo):
    from fastapi.testclient import TestClient

    from qwen2vl_jax import hooks
    from qwen2vl_jax.hooks import interventions

    cfg = engine.model.config.text_config
    L, N = cfg.num_hidden_layers, cfg.num_attention_heads
    client = TestClient(app, base_url="http://127.0.0.1")  # the Host a loopback server answers for
    assert client.get("/explorer").status_code == 200 and "explorer.js" in client.get("/explorer").text
    assert client.get("/explorer/static/explorer.js").status_code == 200
    too_big = client.post("/explorer/api/generate", json={"question": "?", "image": "data:," + "A" * (3 * 2**20)})
    assert too_big.status_code == 413 and "--max-request-bytes" in too_big.json()["error"]["message"]
    header, tokens = _generate(client, photo)
    assert [t["index"] for t in tokens] == list(range(len(tokens))) and 1 <= len(tokens) <= 4
    assert header["grid"]["rows"] == 6 and header["grid"]["cols"] == 8
    sid, P = header["session"], header["prompt_tokens"]

    k = len(tokens) - 1
    res = client.get(f"/explorer/api/sessions/{sid}/tokens/{k}")
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["id"] == tokens[k]["id"] and body["query_column"] == P - 1 + k
    att = _decode(body["vision"]["attention"])
    assert att.shape == (L, N, 6, 8)
    for name, reduce in [("mean", (0, 1)), ("mean_layers", 0), ("mean_heads", 1)]:
        np.testing.assert_allclose(_decode(body["vision"][name]), att.mean(reduce), atol=1e-3)
    mean = _decode(body["vision"]["mean"])
    assert np.unravel_index(np.argmax(mean), mean.shape) == FORCED and mean[FORCED] == pytest.approx(1, abs=1e-3)
    assert body["vision"]["share"] == pytest.approx(1, abs=1e-3)

    geom = engine.geometry
    assert body["grid"]["positions"] == geom.positions_M3.tolist() and body["grid"]["thw"] == geom.thw_M3.tolist()
    np.testing.assert_allclose(body["grid"]["boxes"], geom.boxes_M4, atol=0.01)

    text = body["text"]
    X = len(text["columns"])
    assert _decode(text["attention"]).shape == (L, N, X) and len(text["tokens"]) == X
    assert text["columns"][-1] == P - 1 + k and not set(text["columns"]) & set(geom.token_index_M.tolist())
    assert np.abs(_decode(text["attention"])).max() < 1e-3  # every row was forced onto the image

    # The logit lens: embed + one row per layer, top-5 most probable first, equal to interventions.logit_lens on
    # the same hooked forward.
    lens_rows = body["logit_lens"]
    assert [r["layer"] for r in lens_rows] == ["embed"] + [f"layer {i}" for i in range(L)]
    seq = np.concatenate([engine.inputs["input_ids"][0], [t["id"] for t in tokens]])[None, :-1]
    inputs = dict(engine.inputs, input_ids=seq, attention_mask=np.ones_like(seq))
    _, cache = hooks.run_with_cache(engine.model, ["text.embed", "text.layers.*.resid_post"], hooks=engine.hooks,
                                    **inputs)
    ids, probs = interventions.logit_lens(engine.model, cache, positions=[P - 1 + k]).top_k(5)
    for row, ids_K, probs_K in zip(lens_rows, ids[:, 0, 0], probs[:, 0, 0]):
        assert [t["id"] for t in row["top"]] == ids_K.tolist()
        np.testing.assert_allclose([t["p"] for t in row["top"]], probs_K, atol=2e-5)
        assert all(isinstance(t["text"], str) for t in row["top"])

    assert client.get(f"/explorer/api/sessions/{sid}/tokens/{len(tokens)}").status_code == 404
    assert client.get("/explorer/api/sessions/nope/tokens/0").status_code == 404
    assert client.post("/explorer/api/generate", json={"question": ""}).status_code == 400
    bad = client.post("/explorer/api/generate", json={"question": "hi", "image": "data:image/png;base64,AAAA"})
    assert bad.status_code == 400, bad.text


# ------------------------------------------------------------------------------------------------------ browser
@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium (never `playwright install`, which downloads from a CDN): found on PATH, else installed
    from the Debian registry with apt-get when running as root."""
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
        done = subprocess.run(install, capture_output=True, text=True, timeout=900, env=env)
        if done.returncode:  # a fresh container has no package lists yet
            subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=600, env=env)
            done = subprocess.run(install, capture_output=True, text=True, timeout=900, env=env)
        found = shutil.which("chromium")
        if not found:
            pytest.skip(f"chromium is not installed and `apt-get install chromium` failed: {done.stderr[-300:]}")
    if not found:
        pytest.skip("chromium is not installed (apt-get install chromium) and this user cannot install it")
    return found


@pytest.fixture(scope="module")
def server_url(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@contextlib.contextmanager
def _explorer_page(chromium, server_url, photo, tmp_path, route=None):
    """A headless Chromium page on the explorer with the photo uploaded and selected: (page, page errors)."""
    from playwright.sync_api import sync_playwright

    photo_path = tmp_path / "astronaut.png"
    photo.save(photo_path)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            if route is not None:
                page.route(*route)
            page.goto(f"{server_url}/explorer")
            page.set_input_files("#image-input", str(photo_path))
            page.wait_for_selector("#gallery img.selected")
            yield page, errors
        finally:
            browser.close()


def test_explorer_page_in_browser(chromium, server_url, engine, photo, tmp_path):
    from PIL import Image

    with _explorer_page(chromium, server_url, photo, tmp_path) as (page, errors):
        page.fill("#question", QUESTION)
        page.fill("#max-tokens", "6")
        page.click("#run")
        page.wait_for_selector('#answer[data-done="1"]', timeout=60_000)
        assert page.locator("#answer .token").count() >= 1
        page.locator("#answer .token").first.click()
        page.wait_for_selector('#stage[data-ready="0"]', timeout=60_000)
        canvas = page.evaluate("""() => {
            const c = document.getElementById('heatmap');
            return {url: c.toDataURL('image/png'), width: c.width, height: c.height};
        }""")
        # hover the forced cell: the tooltip shows its M-RoPE position (and the screenshot shows the tooltip)
        geom = engine.geometry
        m = FORCED[0] * geom.merged_grid[2] + FORCED[1]
        x0, y0, x1, y1 = geom.boxes_M4[m]
        scale = canvas["width"] / photo.width
        box = page.locator("#grid").bounding_box()
        page.mouse.move(box["x"] + (x0 + x1) / 2 * scale, box["y"] + (y0 + y1) / 2 * scale)
        t, h, w = geom.positions_M3[m]
        assert f"({t}, {h}, {w})" in page.inner_text("#tooltip")
        assert page.locator("#logit-lens tr").count() == engine.model.config.text_config.num_hidden_layers + 2
        assert page.locator("#text-attention span").count() > 3
        shot = tmp_path / "explorer.png"
        page.screenshot(path=str(shot), full_page=True)
        assert not errors, errors
    if os.environ.get("QWEN2VL_JAX_WRITE_SCREENSHOT") == "1":
        (ROOT / "docs" / "images").mkdir(exist_ok=True)
        shutil.copyfile(shot, ROOT / "docs" / "images" / "explorer.png")

    # The canvas pixels, mapped back to merged cells through the grid's boxes (original pixels x canvas scale).
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(canvas["url"].split(",", 1)[1]))).convert("RGB"),
                        np.float64)
    assert pixels.shape[:2] == (canvas["height"], canvas["width"])
    assert pixels.std() > 10, "the heatmap canvas is uniform"
    brightness = np.zeros(geom.merged_grid[1:])
    for (x0, y0, x1, y1), (_, r, c) in zip(geom.boxes_M4 * scale, geom.thw_M3):
        inner = pixels[int(np.ceil(y0)) + 1:int(y1) - 1, int(np.ceil(x0)) + 1:int(x1) - 1]  # away from the edges
        brightness[r, c] = inner.mean()
    assert np.unravel_index(np.argmax(brightness), brightness.shape) == FORCED, brightness.round(1)


BOXES = [{"label": "cat", "xyxy": [20.0, 30.0, 120.0, 110.0]}, {"label": "dog", "xyxy": [130.0, 10.0, 220.0, 160.0]}]
BOX_COLOURS = [(225, 87, 89), (78, 121, 167)]  # the page's palette, one per label in order: #e15759, #4e79a7


def test_explorer_draws_the_answers_boxes(chromium, server_url, photo, tmp_path):
    """The done event's boxes (original photo pixels) are drawn over the photo, each edge in its label's colour,
    nothing inside, and listed; unticking "boxes" clears them. A random model writes no boxes, so the server's real
    answer to the page's request gets two in its done line (tests/server/test_explorer_boxes.py covers the server's
    own reading of them)."""
    from PIL import Image

    def add_boxes(route):
        response = route.fetch()
        lines = response.text().splitlines()
        done = json.loads(lines[-1])
        assert done["type"] == "done", done
        lines[-1] = json.dumps({**done, "boxes": BOXES, "points": [], "box_problems": []})
        route.fulfill(response=response, body="\n".join(lines) + "\n")

    read_canvas = """() => { const c = document.getElementById('boxes');
                             return {url: c.toDataURL('image/png'), width: c.width}; }"""
    with _explorer_page(chromium, server_url, photo, tmp_path, ("**/explorer/api/generate", add_boxes)) as (page,
                                                                                                          errors):
        page.fill("#max-tokens", "2")
        page.click("#run")
        page.wait_for_selector('#stage[data-boxes="2"]', timeout=60_000)
        drawn = page.evaluate(read_canvas)
        listed = page.inner_text("#box-list")
        page.uncheck("#show-boxes")
        cleared = page.evaluate(read_canvas)
        assert not errors, errors
    assert "cat: (20, 30, 120, 110)" in listed and "dog: (130, 10, 220, 160)" in listed

    def rgba(canvas):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(canvas["url"].split(",", 1)[1]))).convert("RGBA"))

    pixels, s = rgba(drawn), drawn["width"] / photo.width
    for (x1, y1, x2, y2), colour in zip((b["xyxy"] for b in BOXES), BOX_COLOURS):
        mid_x, mid_y = int((x1 + x2) / 2 * s), int((y1 + y2) / 2 * s)
        # the 2-px strokes cover [x1 s, x1 s + 2] and [x2 s - 2, x2 s]: a whole pixel of each
        edges = [(x1 * s, mid_y), (x2 * s - 2, mid_y), (mid_x, y2 * s - 2)]
        for x, y in ((int(np.ceil(x)), int(np.ceil(y))) for x, y in edges):
            assert pixels[y, x, 3] == 255 and np.abs(pixels[y, x, :3].astype(int) - colour).max() <= 2, (x, y)
        assert pixels[mid_y, mid_x, 3] == 0  # the photo shows through inside the box
    assert rgba(cleared)[..., 3].max() == 0
