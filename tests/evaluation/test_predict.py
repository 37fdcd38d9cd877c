"""`qwen2vl-jax predict`: one output line per input line in input order with the input's "id"; a run killed with
SIGKILL mid-way (and a torn last line) resumes to the same bytes as an uninterrupted run; two processes splitting the
data give the same file as one; resuming with other settings is refused. Plus `RunOutput`'s rules in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen2vl_jax.evaluation.predict import read_items
from qwen2vl_jax.evaluation.runs import RunError, RunOutput

ROOT = Path(__file__).resolve().parents[2]
N_ITEMS = 24


@pytest.fixture(scope="module")
def dataset(photos, tmp_path_factory) -> Path:
    """24 prompts, two in three with a photo (paths relative to the file), of varied lengths; ids on most."""
    root = tmp_path_factory.mktemp("predict_data")
    (root / "img").mkdir()
    names = sorted(photos)
    for name in names:
        photos[name].resize((140, 112)).save(root / "img" / f"{name}.png")
    lines = []
    for i in range(N_ITEMS):
        content = [{"type": "image", "image": f"img/{names[i % len(names)]}.png"}] if i % 3 else []
        content.append({"type": "text", "text": f"Question {i}: what is shown?" + " Think." * (i % 5)})
        line = {"messages": [{"role": "user", "content": content}], "answers": [f"a{i}"]}
        if i != 5:
            line["id"] = f"item-{i}"
        lines.append(json.dumps(line))
    path = root / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _command(model, data, out, *extra):
    return [sys.executable, "-m", "qwen2vl_jax", "predict", "--model", str(model), "--data", str(data), "--out",
            str(out), "--max-new-tokens", "10", "--greedy", "--max-pixels", "40000", "--dtype", "float32",
            "--max-slots", "4", "--exact-fp32", "--no-compile-cache", *extra]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def _start(cmd):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return err


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_predict_resumes_after_sigkill_and_splits_across_processes(tiny_checkpoint, dataset, tmp_path):
    whole, killed, split = tmp_path / "whole.jsonl", tmp_path / "killed.jsonl", tmp_path / "split.jsonl"
    reference = _start(_command(tiny_checkpoint, dataset, whole))
    victim = _start(_command(tiny_checkpoint, dataset, killed))
    deadline = time.monotonic() + 240
    while _lines(killed) < 2 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    written = _lines(killed)
    assert 2 <= written < N_ITEMS
    with open(killed, "ab") as f:  # what a kill inside a write leaves: a torn last line
        f.write(b'{"index": 99, "answ')
    _finish(reference)
    resumed = _finish(_start(_command(tiny_checkpoint, dataset, killed)))
    assert f"resuming after {written}" in resumed
    parts = [_start(_command(tiny_checkpoint, dataset, split, "--process-count", "2", "--process-index", str(k)))
             for k in (0, 1)]
    errs = [_finish(p) for p in parts]

    rows = [json.loads(line) for line in whole.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(N_ITEMS))
    assert [r.get("id") for r in rows] == [None if i == 5 else f"item-{i}" for i in range(N_ITEMS)]
    assert all(r["new_tokens"] == 10 and r["finish_reason"] == "length" and r["answer"] for r in rows)
    assert len({r["answer"] for r in rows}) > 1  # the prompts differ, so do the answers
    assert killed.read_bytes() == whole.read_bytes()
    assert split.read_bytes() == whole.read_bytes()
    assert sum("wrote " + str(split) in e for e in errs) >= 1  # the last process to finish merged the parts
    for k in (0, 1):
        part = tmp_path / f"split.jsonl.part-{k:05d}-of-00002"
        assert [json.loads(x)["index"] for x in part.read_text().splitlines()] == list(range(k, N_ITEMS, 2))

    # other settings on the same output: refused, naming what changed (nothing is loaded or written)
    changed = subprocess.run(_command(tiny_checkpoint, dataset, whole)[:-1] + ["--seed", "3"], capture_output=True,
                             text=True, env=_env(), timeout=120)
    assert changed.returncode == 2 and "changed: seed" in changed.stderr, changed.stderr
    assert whole.read_bytes() == killed.read_bytes()


def test_run_output_rules(tmp_path, dataset):
    out = tmp_path / "p.jsonl"
    fp = {"data_sha256": "x", "seed": 0}
    run = RunOutput(out, indices=range(4), fingerprint=fp)
    assert run.remaining() == [0, 1, 2, 3]
    run.append({"index": 0, "answer": "a"})
    with pytest.raises(RunError, match="out of order"):
        run.append({"index": 2, "answer": "c"})
    run.append({"index": 1, "answer": "b"})
    run.close()
    out.write_bytes(out.read_bytes() + b'{"index": 2, "ans')  # a torn line is cut when resuming
    again = RunOutput(out, indices=range(4), fingerprint=fp)
    assert again.remaining() == [2, 3] and out.read_bytes().count(b"\n") == 2 and out.read_bytes().endswith(b"\n")
    with pytest.raises(RunError, match="changed: seed"):
        RunOutput(out, indices=range(4), fingerprint={**fp, "seed": 1})
    out.write_text('{"index": 0}\n{"index": 3}\n')  # not a prefix of this run's order
    with pytest.raises(RunError, match="holds item 3, expected 1"):
        RunOutput(out, indices=range(4), fingerprint=fp)
    stray = tmp_path / "stray.jsonl"
    stray.write_text("something else\n")
    with pytest.raises(RunError, match="does not"):
        RunOutput(stray, indices=range(2), fingerprint=fp)
    # two shares of five items: each writes its own part, and the second to finish merges them in index order
    shared = tmp_path / "s.jsonl"
    a, b = (RunOutput(shared, indices=range(5), fingerprint=fp, process_index=k, process_count=2) for k in (0, 1))
    assert a.remaining() == [0, 2, 4] and b.remaining() == [1, 3]
    for i in a.remaining():
        a.append({"index": i})
    assert not a.finish() and not shared.exists()
    for i in b.remaining():
        b.append({"index": i})
    assert b.finish()
    assert [json.loads(x)["index"] for x in shared.read_text().splitlines()] == [0, 1, 2, 3, 4]

    items = read_items(dataset)
    assert len(items) == N_ITEMS and items[5].id is None and items[0].record["answers"] == ["a0"]
    assert items[1].messages[0]["content"][0]["image"].startswith(str(dataset.parent))
