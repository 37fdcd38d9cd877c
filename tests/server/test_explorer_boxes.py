"""The attention explorer's boxes (qwen2vl_jax/server/explorer.py `Explorer.boxes`): an answer holding boxes ends its
NDJSON stream with a done event carrying them in the photo's original pixels, for either family.

A random model never writes boxes, so `generate` is replaced by one that streams a chosen answer (token ids of the
real tokenizer, special tokens included) through the explorer's own streamer; the route, the session, the processor,
the decoding and the reading of the boxes are the real ones. The engine is a stand-in holding a released config
preset (no weights): nothing here runs a model.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

PHOTO_SIZE = (300, 200)  # (W, H); Qwen2.5-VL's resized input: 308 x 196


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _client(monkeypatch, processor, config, answer: str):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from qwen2vl_jax.processing.image_io import load_image
    from qwen2vl_jax.server import explorer

    answer_ids = processor.tokenizer.encode(answer, add_special_tokens=False) + [
        processor.tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def fake_generate(model, input_ids, *, streamer, max_new_tokens, **_):
        for token in answer_ids[:max_new_tokens]:
            streamer.put(np.array([token]))
        new = np.asarray(answer_ids[:max_new_tokens], np.int64)
        return SimpleNamespace(sequences=np.concatenate([np.asarray(input_ids)[0], new])[None])

    monkeypatch.setattr(explorer, "generate", fake_generate)
    engine = SimpleNamespace(processor=processor, model=SimpleNamespace(config=config), model_name="stand-in",
                             lock=threading.Lock(), hooks=None, max_request_bytes=2**22,
                             load_image=lambda url, where: load_image(url), check_memory=lambda **_: None)
    app = FastAPI()
    explorer.mount_explorer(app, engine)
    return TestClient(app)


def _done(client, image=True) -> dict:
    body = {"question": "Where is the cat?", "max_new_tokens": 256,
            "image": _data_url(Image.new("RGB", PHOTO_SIZE, (90, 120, 150))) if image else None}
    res = client.post("/explorer/api/generate", json=body)
    assert res.status_code == 200, res.text
    events = [json.loads(line) for line in res.text.splitlines() if line.strip()]
    assert events[-1]["type"] == "done", events[-1]
    return events[-1]


@pytest.fixture(scope="module")
def configs():
    from qwen2vl_jax.modeling.config import PRESETS

    return {"qwen2_vl": PRESETS["2b"](), "qwen2_5_vl": PRESETS["2.5-3b"]()}


def test_qwen2_vl_boxes_in_the_done_event(monkeypatch, proc, configs):
    answer = ("<|object_ref_start|>the cat<|object_ref_end|><|box_start|>(100,250),(500,1000)<|box_end|>"
              "<|box_start|>(0,0),(1000,1000)<|box_end|> and <|box_start|>(5,5),(2000,6)<|box_end|>")
    done = _done(_client(monkeypatch, proc, configs["qwen2_vl"], answer))
    assert done["boxes"] == [{"label": "the cat", "xyxy": [30.0, 50.0, 150.0, 200.0]},
                             {"label": "the cat", "xyxy": [0.0, 0.0, 300.0, 200.0]}]
    assert done["points"] == [] and [p["kind"] for p in done["box_problems"]] == ["range"]


def test_qwen2_5_vl_boxes_and_points_in_the_done_event(monkeypatch, proc, configs):
    from qwen2vl_jax.processing.processor import Qwen2_5_VLProcessor

    proc25 = Qwen2_5_VLProcessor(proc.image_processor, proc.tokenizer)
    answer = ('```json\n[\n\t{"bbox_2d": [154, 98, 308, 196], "label": "cat"},\n'
              '\t{"point_2d": [154, 98], "label": "eye"}\n]\n```')
    done = _done(_client(monkeypatch, proc25, configs["qwen2_5_vl"], answer))
    assert done["boxes"] == [{"label": "cat", "xyxy": [150.0, 100.0, 300.0, 200.0]}]
    assert done["points"] == [{"label": "eye", "xy": [150.0, 100.0]}] and done["box_problems"] == []


def test_no_boxes_no_keys(monkeypatch, proc, configs):
    done = _done(_client(monkeypatch, proc, configs["qwen2_vl"], "A cat on a mat."))
    assert not {"boxes", "points", "box_problems"} & set(done)
    # no photo: nothing to put the boxes on
    done = _done(_client(monkeypatch, proc, configs["qwen2_vl"], "<|box_start|>(1,2),(3,4)<|box_end|>"), image=False)
    assert "boxes" not in done
