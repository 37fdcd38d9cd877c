"""The activation store: shards equal `hooks.run_with_cache` bit for bit (row by row through the metadata), a
SIGKILLed run resumes to the same shards as an uninterrupted one, peak memory follows the shard size and not the
dataset, resuming with other settings is refused, and `batches` covers every row once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from activation_data import POINTS, write_prompts

from qwen2vl_jax import hooks
from qwen2vl_jax.activations import ActivationStore, StoreError, build_store
from qwen2vl_jax.checkpoints.safetensors_io import load_file
from qwen2vl_jax.evaluation import encode_prompt, read_items
from qwen2vl_jax.modeling.vision_layout import merge_order_positions

ROOT = Path(__file__).resolve().parents[2]


def _item_rows(store: ActivationStore, point: str, item: int) -> tuple[np.ndarray, dict]:
    rows, meta = [], []
    for x, m in store.iter_shards(point, metadata=True):
        keep = m["item"] == item
        rows.append(x[keep])
        meta.append({c: v[keep] for c, v in m.items()})
    return np.concatenate(rows), {c: np.concatenate([m[c] for m in meta]) for c in meta[0]}


def test_shards_equal_run_with_cache_row_by_row(tiny, prompts, small_store):
    model, processor = tiny
    store = ActivationStore(small_store.path)
    assert store.complete and len(store.shards) >= 3
    assert store.shape("text.layers.0.attn.head_out") == (4, 16) and store.points["vision.merger.out"]["size"] == 64
    cfg = model.config
    for item in read_items(prompts):
        inputs = encode_prompt(processor, item.messages)
        _, cache = hooks.run_with_cache(model, POINTS, **inputs)
        ids_T = inputs["input_ids"][0]
        position_ids_ZT = np.asarray(model.get_rope_index(inputs["input_ids"], inputs.get("image_grid_thw"))[0])[:, 0]
        for name in ["text.embed", "text.layers.1.resid_post", "text.layers.0.attn.head_out"]:
            rows, meta = _item_rows(store, name, item.index)
            np.testing.assert_array_equal(meta["position"], np.arange(len(ids_T)))  # in order, no gaps
            np.testing.assert_array_equal(rows, np.asarray(cache[name])[0].reshape(len(ids_T), -1))  # bit-identical
            np.testing.assert_array_equal(meta["input_ids"], ids_T)
            np.testing.assert_array_equal(meta["position_ids"], position_ids_ZT.T)
            np.testing.assert_array_equal(meta["is_image"], ids_T == cfg.image_token_id)
            assert not meta["is_video"].any()
        image_slots = np.nonzero(ids_T == cfg.image_token_id)[0]
        merged, meta = _item_rows(store, "vision.merger.out", item.index)
        patches, patch_meta = _item_rows(store, "vision.blocks.1.resid_post", item.index)
        if "pixel_values" not in inputs:
            assert len(merged) == len(patches) == 0 and "vision.merger.out" not in cache
            continue
        np.testing.assert_array_equal(merged, np.asarray(cache["vision.merger.out"]))
        np.testing.assert_array_equal(patches, np.asarray(cache["vision.blocks.1.resid_post"]))
        np.testing.assert_array_equal(meta["position"], image_slots)  # each merged token's placeholder
        np.testing.assert_array_equal(patch_meta["position"], np.repeat(image_slots, 4))
        grids = inputs["image_grid_thw"]
        np.testing.assert_array_equal(meta["media"], np.repeat(np.arange(len(grids)), grids.prod(-1) // 4))
        rc = np.concatenate([merge_order_positions(h, w, 2) for _, h, w in grids])
        np.testing.assert_array_equal(np.stack([patch_meta["row"], patch_meta["col"]], -1), rc)
        np.testing.assert_array_equal(np.stack([meta["row"], meta["col"]], -1), rc[::4] // 2)


def test_qwen25_patch_rows_are_in_the_processors_order(tiny25_checkpoint, prompts, tmp_path):
    """Qwen2.5-VL's blocks run in window order (the hook points see that order); the store gives the processor's
    order back: the oracle is the tower's own hidden states, which are in the processor's order."""
    from qwen2vl_jax import Qwen2VLForConditionalGeneration
    from qwen2vl_jax.processing.processor import Qwen2VLProcessor

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny25_checkpoint)
    processor = Qwen2VLProcessor.from_pretrained(tiny25_checkpoint, max_pixels=140 * 112)
    item = read_items(prompts)[1]
    store = build_store(model, processor, [item], tmp_path / "acts25", ["vision.blocks.*.resid_post",
                                                                         "vision.merger.out"], shard_tokens=10_000)
    inputs = encode_prompt(processor, item.messages)
    merged, hidden = model.visual(inputs["pixel_values"], inputs["image_grid_thw"], output_hidden_states=True)
    assert len(hidden) == model.config.vision_config.depth == 4
    for i, h in enumerate(hidden):
        np.testing.assert_allclose(store.read(f"vision.blocks.{i}.resid_post", 0), np.asarray(h), atol=1e-5)
    np.testing.assert_allclose(store.read("vision.merger.out", 0), np.asarray(merged), atol=1e-5)
    meta = store.metadata("patches")
    grid = inputs["image_grid_thw"][0]
    np.testing.assert_array_equal(np.stack([meta["row"], meta["col"]], -1), merge_order_positions(*grid[1:], 2))


def test_batches_cover_every_row_once_and_batched_padding_agrees(tiny, prompts, small_store, tmp_path):
    store = ActivationStore(small_store.path)
    point = "text.layers.1.resid_post"
    everything = np.concatenate(list(store.iter_shards(point)))
    meta = store.metadata(point)
    seen = []
    for x, m in store.batches(point, 50, shuffle=True, seed=3, metadata=True):
        assert x.shape[1] == 64 and len(x) <= 50
        seen.append(np.stack([m["item"], m["position"]], -1))
        # each row still sits beside its own metadata after the shuffle
        where = [np.nonzero((meta["item"] == i) & (meta["position"] == p))[0][0] for i, p in seen[-1]]
        np.testing.assert_array_equal(x, everything[where])
    seen = np.concatenate(seen)
    assert len(seen) == len(everything) == store.num_rows(point)
    assert len({tuple(r) for r in seen.tolist()}) == len(seen)  # no row twice
    assert not np.array_equal(seen, np.stack([meta["item"], meta["position"]], -1))  # shuffled
    assert sum(len(b) for b in store.batches(point, 50, shuffle=False, drop_last=True)) == len(everything) // 50 * 50

    # two items per forward, left-padded to a 64-token bucket: the same rows and metadata, equal up to rounding
    model, processor = tiny
    padded = build_store(model, processor, prompts, tmp_path / "padded", POINTS, shard_bytes="20KB", batch_size=2,
                         length_granule=64)
    for name in POINTS:
        a, b = small_store.metadata(name), padded.metadata(name)
        for c in a:
            np.testing.assert_array_equal(a[c], b[c], err_msg=f"{name} {c}")
        np.testing.assert_allclose(np.concatenate(list(padded.iter_shards(name))),
                                   np.concatenate(list(small_store.iter_shards(name))), atol=1e-5, rtol=1e-5)

    with pytest.raises(StoreError, match="changed: shard_bytes"):  # resuming with other settings is refused
        build_store(model, processor, prompts, tmp_path / "padded", POINTS, shard_bytes="40KB", batch_size=2,
                    length_granule=64)
    with pytest.raises(StoreError, match="no row axis"):
        build_store(model, processor, prompts, tmp_path / "probs", ["text.layers.0.attn.probs"])
    empty = build_store(model, processor, [], tmp_path / "empty", ["text.layers.0.attn.*"])  # a pattern skips them
    assert sorted(empty.points) == [f"text.layers.0.attn.{s}" for s in ("head_out", "k", "q", "v")]
    assert empty.complete and empty.shards == []


# ------------------------------------------------------------------------------- kills and memory (child processes)
CHILD = r"""
import json, re, sys, time
import jax
jax.config.update("jax_default_matmul_precision", "highest")   # as tests/conftest.py: the parent's numerics
from qwen2vl_jax.runtime import use_exact_cpu_fp32_matmuls
use_exact_cpu_fp32_matmuls()
from qwen2vl_jax import Qwen2VLForConditionalGeneration
from qwen2vl_jax.activations import build_store
from qwen2vl_jax.evaluation import read_items
from qwen2vl_jax.processing.processor import Qwen2VLProcessor

def kib(field):
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1))

checkpoint, data, out, pause, shard_bytes, points = json.loads(sys.argv[1])
model = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint)
processor = Qwen2VLProcessor.from_pretrained(checkpoint, max_pixels=140 * 112)
settings = dict(shard_bytes=shard_bytes, batch_size=2, length_granule=64)
if not pause:  # compile every program first (the first items have every shape), then measure from here
    build_store(model, processor, read_items(data)[:4], out + ".warmup", points, **settings)
    open("/proc/self/clear_refs", "w").write("5")   # resets the peak (VmHWM, ru_maxrss) to the current RSS
base, anon = kib("VmRSS"), [kib("RssAnon")]

def progress(done, total):  # after every forward: the anonymous memory (file pages may be reclaimed meanwhile)
    anon.append(kib("RssAnon"))
    time.sleep(pause)

build_store(model, processor, data, out, points, progress=progress, **settings)
print(json.dumps({"peak": kib("VmHWM") - base, "anon": max(anon) - anon[0]}))
"""
BIG_POINTS = ["text.layers.*.resid_pre", "text.layers.*.attn.q", "text.layers.*.attn.head_out", "text.layers.*.mlp.act",
              "text.layers.*.mlp_out", "text.layers.*.resid_post", "vision.blocks.*.mlp.act", "vision.merger.out"]
N = 12


def _child(checkpoint, data, out, *, pause=0.0, shard_bytes="1MB"):
    # glibc's sliding mmap threshold would keep freed NumPy buffers in the heap, adding ~10 MiB of noise to RSS
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "MALLOC_MMAP_THRESHOLD_": "131072",
           "MALLOC_ARENA_MAX": "2"}
    config = json.dumps([str(checkpoint), str(data), str(out), pause, shard_bytes, BIG_POINTS])
    return subprocess.Popen([sys.executable, "-c", CHILD, config], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _finish(proc) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _shards(path: Path) -> list[str]:
    manifest = path / "manifest.json"
    return json.loads(manifest.read_text())["shards"] if manifest.exists() else []


def test_sigkilled_run_resumes_to_the_same_shards_and_memory_follows_the_shard_size(tiny, tiny_checkpoint, photos,
                                                                                      tmp_path):
    # ~300-token prompts, every other one with a photo: ~1 MB of rows per item at BIG_POINTS, 1 MB shards
    specs = [(i % 2, f"Question {i}: what is shown? " + "Look closely at every detail. " * 40) for i in range(N)]
    small = write_prompts(tmp_path / "small", photos, specs)
    big = write_prompts(tmp_path / "big", photos, specs * 4)
    runs = {"small": _child(tiny_checkpoint, small, tmp_path / "small.acts"),
            "big": _child(tiny_checkpoint, big, tmp_path / "big.acts"),
            # the control: one shard for everything (the buffer holds the whole dataset) must show in the numbers
            "one_shard": _child(tiny_checkpoint, big, tmp_path / "one_shard.acts", shard_bytes="1GB")}
    killed = tmp_path / "killed.acts"
    victim = _child(tiny_checkpoint, big, killed, pause=0.1)
    deadline = time.monotonic() + 240
    while not _shards(killed) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.25)  # a few items into the next, unflushed buffer
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = json.loads((killed / "manifest.json").read_text())
    assert 1 <= len(done["shards"]) and done["items_done"] < 4 * N and not done["complete"]
    # MiB above the start of build_store: the peak RSS (VmHWM, as ru_maxrss) and the most anonymous memory seen
    # between forwards (immune to the page cache's file pages being reclaimed while other tests run)
    grew = {name: {k: v / 1024 for k, v in _finish(proc).items()} for name, proc in runs.items()}
    model, processor = tiny  # resumed here: the same checkpoint, settings and numerics as the children
    build_store(model, processor, big, killed, BIG_POINTS, shard_bytes="1MB", batch_size=2, length_granule=64)

    reference, resumed = ActivationStore(tmp_path / "big.acts"), ActivationStore(killed)
    assert resumed.complete and resumed.manifest == reference.manifest  # the same shards, items and rows
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in reference.path.iterdir())
    for shard in reference.shards:
        a, b = load_file(reference.path / shard["file"]), load_file(killed / shard["file"])
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{shard['file']} {name}")
    items = resumed.metadata("tokens")["item"]
    assert np.array_equal(np.unique(items), np.arange(4 * N)) and np.all(np.diff(items) >= 0)  # no gaps, no repeats

    stored = {name: sum(s["bytes"] for s in ActivationStore(tmp_path / f"{name}.acts").shards) / 2**20
              for name in grew}
    print("memory above the start of build_store: " + ", ".join(
        f"{name}: peak RSS +{grew[name]['peak']:.1f} MiB, anonymous +{grew[name]['anon']:.1f} MiB "
        f"({stored[name]:.1f} MiB stored)" for name in grew))
    extra = stored["big"] - stored["small"]
    assert extra > 30, stored
    for measure, bound in (("anon", 0.15), ("peak", 0.25)):
        assert grew["big"][measure] - grew["small"][measure] < bound * extra, (grew, stored)
    # the control: a buffer that holds the whole dataset does show (the peak also holds a forward's transients)
    assert grew["one_shard"]["anon"] - grew["big"]["anon"] > 0.6 * extra, (grew, stored)
    for directory in tmp_path.glob("*.acts*"):  # ~150 MB
        shutil.rmtree(directory)
