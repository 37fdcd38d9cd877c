"""lmms-eval's own pipeline (`python -m lmms_eval`, 0.7.3) runs the plugin (`qwen2vl_jax.evaluation.lmms_plugin`,
`--model qwen2vl_jax`) offline on two synthetic tasks written here: a `generate_until` task (exact_match) and a
`multiple_choice` task (acc, through `loglikelihood`), 8 documents each (drawn shapes; some with two images, some
with none), read from a local JSONL by `dataset_path: json`, with `doc_to_visual` / `doc_to_text` / ... from a
`utils.py` beside the YAMLs. Its logged samples must be what the library gives for the same chat messages:
`Predictor.run` (and `qwen2vl-jax predict` on a JSONL of the same prompts) for the generations, `score` for the
options' log-likelihoods (returned as losses, so lmms-eval's argmin picks the likeliest option, which its
per-document `acc` must show). `generate_until_multi_round` and the `loglikelihood` sign modes are checked
in-process on hand-made `Instance`s.

Needs lmms-eval in the running environment (skipped otherwise); the tiny random checkpoint answers nonsense, which
is all the comparison needs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install lmms-eval==0.7.3)")

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "qwen2vl_jax.evaluation.lmms_plugin"
N_DOCS = 8
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112  # a few vision tokens per image: fast on CPU
COLORS = ["red", "green", "blue", "yellow"]
GEN_KWARGS = {"max_new_tokens": 8, "temperature": 0, "do_sample": False, "until": ["\n"]}

UTILS = '''
from PIL import Image

CHOICES = ["red", "green", "blue", "yellow"]


def doc_to_visual(doc):
    out = []
    for path in doc["images"]:
        with Image.open(path) as im:
            out.append(im.convert("RGB"))
    return out


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return f"What color is the {doc['shape']}? Answer with one word."


def doc_to_text_mc(doc, lmms_eval_specific_kwargs=None):
    return f"What color is the {doc['shape']}?"


def doc_to_target(doc):
    return doc["color"]


def doc_to_choice(doc):
    return CHOICES


def doc_to_answer_index(doc):
    return doc["answer"]
'''

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: {output_type}
doc_to_visual: !function utils.doc_to_visual
{body}metric_list:
  - metric: {metric}
    aggregation: mean
    higher_is_better: true
"""
GEN_BODY = """doc_to_text: !function utils.doc_to_text
doc_to_target: !function utils.doc_to_target
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
  do_sample: false
  until: ["\\n"]
"""
MC_BODY = """doc_to_text: !function utils.doc_to_text_mc
doc_to_choice: !function utils.doc_to_choice
doc_to_target: !function utils.doc_to_answer_index
"""


def _draw(shape: str, color: str, width: int) -> Image.Image:
    image = Image.new("RGB", (width, 56), "white")
    draw = ImageDraw.Draw(image)
    (draw.rectangle if shape == "square" else draw.ellipse)((8, 8, 48, 48), fill=color)
    return image


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """tasks/ (two YAMLs + utils.py) and data/ (docs.jsonl + PNGs): doc i has 1 image, 2 when i % 4 == 2, none
    when i % 4 == 3."""
    root = tmp_path_factory.mktemp("lmms_task")
    (root / "data").mkdir()
    (root / "tasks").mkdir()
    docs = []
    for i in range(N_DOCS):
        shape, color = ("square", "circle")[i % 2], COLORS[(i * 3) % 4]
        images = []
        for k in range({2: 2, 3: 0}.get(i % 4, 1)):
            path = root / "data" / f"doc{i}_{k}.png"
            _draw(shape, color, 56 + 28 * ((i + k) % 3)).save(path)
            images.append(str(path))
        docs.append({"id": f"doc-{i}", "images": images, "shape": shape, "color": color,
                     "answer": COLORS.index(color)})
    data = root / "data" / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "tasks" / "utils.py").write_text(UTILS)
    for name, output_type, body, metric in (("synth_gen", "generate_until", GEN_BODY, "exact_match"),
                                            ("synth_mc", "multiple_choice", MC_BODY, "acc")):
        (root / "tasks" / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=data, output_type=output_type,
                                                                      body=body, metric=metric))
    return root


@pytest.fixture(scope="module")
def task_utils(task_dir):
    """The tasks' utils.py, imported: the test builds its messages with the same functions lmms-eval calls."""
    spec = importlib.util.spec_from_file_location("synth_task_utils", task_dir / "tasks" / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def docs(task_dir) -> list[dict]:
    return [json.loads(line) for line in (task_dir / "data" / "docs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def lmms_run(tiny_checkpoint, task_dir, tmp_path_factory) -> dict:
    """`python -m lmms_eval` on both tasks, offline: {"results": results.json, task: samples sorted by doc_id}."""
    out = tmp_path_factory.mktemp("lmms_out")
    model_args = (f"pretrained={tiny_checkpoint},dtype=float32,min_pixels={MIN_PIXELS},max_pixels={MAX_PIXELS},"
                  "exact_fp32=true,compile_cache=false")
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "qwen2vl_jax", "--model_args", model_args,
           "--tasks", "synth_gen,synth_mc", "--include_path", str(task_dir / "tasks"), "--log_samples",
           "--output_path", str(out / "results"), "--verbosity", "WARNING"]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path,
           "LMMS_EVAL_PLUGINS": PLUGIN, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(out / "hf"), "JAX_PLATFORMS": "cpu", "QWEN2VL_JAX_COMPILE_CACHE": "0",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=out)
    log = f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    # lmms-eval 0.7.3 logs an evaluation error and exits 0: the files are the evidence it ran
    results = sorted((out / "results").rglob("*_results.json"))
    assert proc.returncode == 0 and len(results) == 1, log
    run = {"results": json.loads(results[0].read_text())}
    for task in ("synth_gen", "synth_mc"):
        [path] = (out / "results").rglob(f"*_samples_{task}.jsonl")
        run[task] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
    return run


@pytest.fixture(scope="module")
def model_processor(tiny_checkpoint):
    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration
    from qwen2vl_jax.processing.processor import Qwen2VLProcessor

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype="float32")
    return model, Qwen2VLProcessor.from_pretrained(tiny_checkpoint, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def _messages(images, text) -> list[dict]:
    """The plugin's prompt: one user turn, the images first (lmms-eval's Qwen2-VL class's order)."""
    return [{"role": "user", "content": [{"type": "image", "image": im} for im in images]
             + [{"type": "text", "text": text}]}]


def _predict(model, processor, items) -> list[dict]:
    from qwen2vl_jax.evaluation import Predictor

    with Predictor(model, processor, max_slots=8) as predictor:
        return list(predictor.run(items))


def test_lmms_eval_ran_both_tasks(lmms_run):
    results = lmms_run["results"]
    assert results["n-samples"] == {"synth_gen": {"original": N_DOCS, "effective": N_DOCS},
                                    "synth_mc": {"original": N_DOCS, "effective": N_DOCS}}
    assert [s["doc_id"] for s in lmms_run["synth_gen"]] == list(range(N_DOCS))
    assert [s["doc_id"] for s in lmms_run["synth_mc"]] == list(range(N_DOCS))
    assert "exact_match,none" in results["results"]["synth_gen"]
    mean_acc = sum(s["acc"] for s in lmms_run["synth_mc"]) / N_DOCS
    assert results["results"]["synth_mc"]["acc,none"] == pytest.approx(mean_acc)


def test_generate_until_equals_predictor(lmms_run, model_processor, docs, task_utils):
    """Each logged generation is `Predictor.run`'s answer (stripped) for the same messages and settings."""
    model, processor = model_processor
    items = [{"index": i, "messages": _messages(task_utils.doc_to_visual(d), task_utils.doc_to_text(d)),
              "generation": {"max_new_tokens": 8, "temperature": 0.0, "stop": ["\n"]}} for i, d in enumerate(docs)]
    rows = _predict(model, processor, items)
    assert all("error" not in r for r in rows), rows
    assert any(r["finish_reason"] == "stop" for r in rows), "no answer met the stop string: `until` goes untested"
    assert [s["filtered_resps"] for s in lmms_run["synth_gen"]] == [r["answer"].strip() for r in rows]
    counts = [s["token_counts"][0] for s in lmms_run["synth_gen"]]
    assert counts == [{"input_tokens": r["prompt_tokens"], "output_tokens": r["new_tokens"]} for r in rows]


def test_generate_until_equals_predict_cli(lmms_run, tiny_checkpoint, task_dir, docs, task_utils):
    """... and `qwen2vl-jax predict`'s on a JSONL of the same prompts (image paths relative to the file)."""
    data = task_dir / "data" / "predict.jsonl"
    lines = []
    for d in docs:
        content = [{"type": "image", "image": Path(p).name} for p in d["images"]]
        content.append({"type": "text", "text": task_utils.doc_to_text(d)})
        lines.append({"id": d["id"], "messages": [{"role": "user", "content": content}],
                      "generation": {"stop": ["\n"]}})
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = task_dir / "preds.jsonl"
    cmd = [sys.executable, "-m", "qwen2vl_jax", "predict", "--model", str(tiny_checkpoint), "--data", str(data),
           "--out", str(out), "--max-new-tokens", "8", "--greedy", "--min-pixels", str(MIN_PIXELS), "--max-pixels",
           str(MAX_PIXELS), "--dtype", "float32", "--exact-fp32", "--no-compile-cache", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [d["id"] for d in docs]
    assert [s["filtered_resps"] for s in lmms_run["synth_gen"]] == [r["answer"].strip() for r in rows]


def test_multiple_choice_equals_score(lmms_run, model_processor, docs, task_utils):
    """Each option's logged value is -`score(...)`.logprob of " <option>" after the prompt; lmms-eval's `acc`
    (argmin of the losses) is whether the likeliest option is the answer."""
    from qwen2vl_jax.evaluation import score

    model, processor = model_processor
    prompts, options = [], []
    for d in docs:
        for choice in task_utils.doc_to_choice(d):
            prompts.append(_messages(task_utils.doc_to_visual(d), task_utils.doc_to_text_mc(d)))
            options.append(f" {choice}")  # lmms-eval's default target_delimiter
    scores = score(model, processor, prompts, options)
    n = len(COLORS)
    for i, (d, sample) in enumerate(zip(docs, lmms_run["synth_mc"])):
        ours = scores[i * n:(i + 1) * n]
        logged = [(float(value), greedy in (True, "True")) for value, greedy in sample["filtered_resps"]]
        assert [v for v, _ in logged] == pytest.approx([-s.logprob for s in ours], rel=1e-5, abs=1e-5), i
        assert [g for _, g in logged] == [s.is_greedy for s in ours], i
        best = max(range(n), key=lambda j: ours[j].logprob)
        assert sample["acc"] == float(best == d["answer"]), i


@pytest.fixture(scope="module")
def plugin(tiny_checkpoint, docs):
    from qwen2vl_jax.evaluation.lmms_plugin.models.qwen2vl_jax import Qwen2VLJax

    lm = Qwen2VLJax(pretrained=str(tiny_checkpoint), dtype="float32", min_pixels=str(MIN_PIXELS),
                    max_pixels=MAX_PIXELS, max_new_tokens="4", compile_cache=False, batch_size=1, device="cpu")
    lm.task_dict = {"t": {"test": docs}}
    yield lm
    lm.clean()


def _instance(request_type, args, doc_id):
    from lmms_eval.api.instance import Instance

    return Instance(request_type=request_type, arguments=args, idx=0,
                    metadata={"task": "t", "doc_id": doc_id, "repeats": 1})


def test_multi_round(plugin, model_processor, docs, task_utils):
    """Doc 0 goes three rounds (round 1 with its images again), doc 1 stops after round 0; every round's answer is
    the Predictor's for that round's single-turn prompt."""
    rounds = {0: 3, 1: 1}
    seen = []

    def doc_to_text(doc, previous_output=None, round_idx=0, previous_round_info=None):
        seen.append((doc["id"], round_idx, list(previous_output), previous_round_info))
        if round_idx >= rounds[docs.index(doc)]:
            return None, None, True, previous_output, previous_round_info
        visuals = task_utils.doc_to_visual(doc) if round_idx == 1 else None
        return visuals, f"Round {round_idx}: go on.", False, previous_output, {"round": round_idx}

    requests = [_instance("generate_until_multi_round", (task_utils.doc_to_text(docs[i]), {"until": ["\n\n"]},
                                                         task_utils.doc_to_visual, doc_to_text, i, "t", "test"), i)
                for i in rounds]
    out = plugin.generate_until_multi_round(requests)
    assert [len(answers) for answers in out] == [3, 1]
    model, processor = model_processor
    prompts = [_messages(task_utils.doc_to_visual(docs[0]), task_utils.doc_to_text(docs[0])),
               _messages(task_utils.doc_to_visual(docs[0]), "Round 1: go on."),
               _messages([], "Round 2: go on."),
               _messages(task_utils.doc_to_visual(docs[1]), task_utils.doc_to_text(docs[1]))]
    rows = _predict(model, processor, [{"messages": m, "generation": {"max_new_tokens": 4, "temperature": 0.0}}
                                       for m in prompts])
    assert out == [[r["answer"].strip() for r in rows[:3]], [rows[3]["answer"].strip()]]
    assert seen[0] == ("doc-0", 1, out[0][:1], None) and seen[-1][:2] == ("doc-0", 3)
    assert seen[-1][3] == {"round": 2}


def test_loglikelihood_signs(plugin, docs, task_utils):
    """"auto": an option given as text comes back as a loss, a task's doc_to_target as a log-probability (lmms-eval's
    perplexity); "logprob" / "nll" force one sign. The mutual-information form ("", option) needs no document."""
    text = _instance("loglikelihood", (task_utils.doc_to_text_mc(docs[0]), " red", task_utils.doc_to_visual, 0,
                                       "t", "test"), 0)
    target = _instance("loglikelihood", (task_utils.doc_to_text_mc(docs[0]), lambda doc: f" {doc['color']}",
                                         task_utils.doc_to_visual, 0, "t", "test"), 0)
    bare = _instance("loglikelihood", ("", " red"), 0)
    values = {}
    for mode in ("auto", "logprob", "nll"):
        plugin.loglikelihood_mode = mode
        values[mode] = [r.text if hasattr(r, "text") else r for r in plugin.loglikelihood([text, target, bare])]
    plugin.loglikelihood_mode = "auto"
    logprobs = [v for v, _ in values["logprob"]]
    assert all(v < 0 for v in logprobs)
    assert [v for v, _ in values["nll"]] == [-v for v in logprobs]
    assert [v for v, _ in values["auto"]] == [-logprobs[0], logprobs[1], -logprobs[2]]
    assert docs[0]["color"] == "red" and logprobs[0] == pytest.approx(logprobs[1], rel=1e-6)


def test_registration():
    """LMMS_EVAL_PLUGINS reads `models.AVAILABLE_MODELS`; the "lmms_eval.models" entry point returns a manifest;
    unknown model args are refused."""
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    from qwen2vl_jax.evaluation.lmms_plugin import manifest
    from qwen2vl_jax.evaluation.lmms_plugin.models import AVAILABLE_MODELS
    from qwen2vl_jax.evaluation.lmms_plugin.models.qwen2vl_jax import Qwen2VLJax

    assert AVAILABLE_MODELS == {"qwen2vl_jax": "Qwen2VLJax"}
    registry = ModelRegistryV2()
    registry.register_manifest(manifest(), overwrite=False)
    assert registry.get_model_class("qwen2vl_jax") is Qwen2VLJax
    with pytest.raises(TypeError, match="unknown model_args"):
        Qwen2VLJax(pretrained="unused", max_pixel=10)
