"""An activation store: a dataset run through the model, chosen hook points written to disk one row per token, in
shards, resumable after any kill, read back as shuffled batches (for sparse autoencoders: `activations.sae`).

    store = build_store(model, processor, "prompts.jsonl", "acts/", ["text.layers.1.resid_post", "vision.merger.out"],
                        shard_bytes="256MB")
    for x_AD in store.batches("text.layers.1.resid_post", 4096, shuffle=True, seed=0):
        ...                                              # NumPy [4096, D], a few shards in memory at a time
    acts_AD, meta = next(store.iter_shards("text.layers.1.resid_post", metadata=True))
    meta["item"], meta["position"], meta["input_ids"], meta["is_image"]     # one entry per row

Data: prompts in the fine-tuning JSONL format (`evaluation.read_items`: a trailing assistant turn is left out, media
paths relative to the file), rendered as `generate` renders them (`evaluation.encode_prompt`). Each forward is the
one `hooks.run_with_cache` runs (the same `HookSet`, the model's own `__call__`), with `logits_to_keep=1` unless
"logits" itself is stored, so a 151k-word vocabulary costs nothing; the values are those of `run_with_cache` on the
same inputs (tests/activations). `batch_size=1` and `length_granule=None` (the defaults) run every item alone at its
own length: one compile per distinct length. `length_granule=64` left-pads to a length bucket (attention mask 0, as
batched generation; padding rows are never stored) and `batch_size=B` runs B items per forward: few compiles, and
values equal to the unpadded ones up to float rounding.

Points (names or glob patterns, `hooks.list_hook_points(model)`) fall into three row groups, each with its own
metadata columns (stored beside the activations in every shard as `{group}.{column}`):

    tokens   text points ([B, T, ...]: text.embed, text.layers.{i}.*, text.final_norm, logits), one row per real
             token: item, position (index in its sequence, 0 = first real token), position_ids [N, 3] (the M-RoPE
             (temporal, height, width) positions), input_ids, is_image, is_video (the token is an <|image_pad|> /
             <|video_pad|> slot: it holds a vision feature)
    patches  vision patch points ([P, ...]: vision.patch_embed, vision.blocks.{i}.*), one row per patch in the
             processor's order (2x2 merge blocks; Qwen2.5-VL's window order is undone): item, media (which image /
             video of the item, counted per kind), is_video, frame (temporal patch), row, col (the patch in its
             grid), position and position_ids (those of the placeholder token its 2x2 block becomes)
    merged   vision.merger.out ([M, D]), one row per merged vision token: item, media, is_video, frame, row, col
             (in the merged grid: patch // 2), position, position_ids (of the placeholder token it fills)

Activations are stored `[N, prod(rest)]` (a point with several trailing axes, e.g. `attn.head_out [B, T, N, H]`,
is flattened; the manifest's `shape` gives them back). Attention probabilities have no row axis: a glob pattern
passes over them, naming one is refused.

On disk: `manifest.json` plus `shard-00000.safetensors`, ... (`checkpoints.safetensors_io`; no pickle). Rows are
collected in a buffer and written when it reaches `shard_tokens` rows (of its largest group) or `shard_bytes`, and
only between items, so an item's rows never straddle two shards and a shard may pass the bound by one batch of
items. A shard is written to a temporary file and renamed; then the manifest (its shards, the items they cover,
`items_done`) is replaced the same way. A kill (SIGKILL) therefore loses at most the unflushed buffer: the next
`build_store` on that directory deletes what no manifest entry names (a half-written temporary file, a shard renamed
just before the kill) and recomputes from `items_done`, so the finished store is identical, shard for shard, to
one from an uninterrupted run (shard boundaries depend only on the settings and the data). The manifest's
`fingerprint` (the data's SHA-256, the model's config and a sample of its weights, the processor's settings, the
points and the shard settings) must match to resume; anything else is refused, naming what changed, as
`evaluation.runs` does for predictions. Memory: the buffer, one batch's values and one shard being written, whatever
the dataset's size.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ..checkpoints.safetensors_io import DTYPE_NAMES, DTYPES, SafetensorsFile, TensorSpec, parse_size, write_file
from ..evaluation.predict import Item, read_items
from ..evaluation.runs import atomic_write, file_sha256
from ..evaluation.scoring import encode_prompt
from ..hooks import hook_point_axes, make_hookset
from ..hooks.run import MODEL_INPUTS
from ..modeling.buckets import bucket
from ..modeling.hook_points import resolve_names
from ..modeling.parameters import model_params
from ..modeling.vision_layout import merge_order_positions, vision_layout

__all__ = ["StoreError", "ActivationStore", "build_store", "GROUPS", "MANIFEST"]

FORMAT = "qwen2vl_jax.activations/1"
MANIFEST = "manifest.json"
_VISION_COLUMNS = {"item": (np.int64, ()), "media": (np.int32, ()), "is_video": (np.bool_, ()),
                   "frame": (np.int32, ()), "row": (np.int32, ()), "col": (np.int32, ()),
                   "position": (np.int32, ()), "position_ids": (np.int32, (3,))}
# group -> {column: (dtype, trailing shape)}
GROUPS = {
    "tokens": {"item": (np.int64, ()), "position": (np.int32, ()), "position_ids": (np.int32, (3,)),
               "input_ids": (np.int32, ()), "is_image": (np.bool_, ()), "is_video": (np.bool_, ())},
    "patches": _VISION_COLUMNS,
    "merged": _VISION_COLUMNS,
}


class StoreError(ValueError):
    """A store that cannot be written or resumed (other settings, files of another run), or a point that has no
    row axis."""


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _group(axes: str) -> str | None:
    """The row group of a point with these axes, None for one without a row axis (attention probabilities)."""
    if axes.startswith("BT"):
        return "tokens"
    if axes.startswith("P"):
        return "patches"
    return "merged" if axes == "MD" else None


def _resolve_points(patterns: list[str], axes: Mapping[str, str]) -> dict[str, str]:
    """`{name: group}` for names and glob patterns; a pattern passes over the points that cannot be stored
    (attention probabilities: no row axis), a name of one is refused."""
    names: dict[str, str] = {}
    for pattern in patterns:
        hits = resolve_names([pattern], axes, "store")
        refused = [n for n in hits if _group(axes[n]) is None]
        if refused and (pattern in axes or len(refused) == len(hits)):
            raise StoreError(f"{refused[0]} ({axes[refused[0]]}) has no row axis to store (attention probabilities "
                             "cannot be stored; record them with hooks.run_with_cache)")
        names.update({n: _group(axes[n]) for n in hits if n not in names and n not in refused})
    return names


# ------------------------------------------------------------------------------------------------ fingerprints
def _digest(value: Any) -> str:
    """SHA-256 of a JSON rendering; images and arrays count by their bytes (an in-memory prompt's media)."""
    def encode(obj):
        if hasattr(obj, "tobytes"):
            return {"bytes": hashlib.sha256(obj.tobytes()).hexdigest(), "shape": list(getattr(obj, "shape", ())
                                                                                       or getattr(obj, "size", ()))}
        return repr(obj)
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=encode).encode()).hexdigest()


@jax.jit
def _heads(values):
    return [v.reshape(-1)[:64] for v in values]


def model_fingerprint(model) -> dict:
    """The model's config and a sample of its weights (the first 64 values of every parameter, the shape and dtype
    of each): two checkpoints, or one at two dtypes, differ here, at a cost of kilobytes read from the device."""
    params = sorted(model_params(model, adapters=True).items())
    values = [p.get_value() for _, p in params]
    heads = _heads(values)
    digest = hashlib.sha256()
    for (path, _), v, head in zip(params, values, heads):
        digest.update(f"{path}:{v.dtype}:{tuple(v.shape)}:".encode())
        digest.update(np.asarray(head).tobytes())
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else repr(model.config)
    return {"config_sha256": _digest(config), "weights_sample_sha256": digest.hexdigest(),
            "source": str(getattr(model, "source_dir", None))}


def processor_fingerprint(processor) -> str:
    """The processor's settings (pixels bounds, means, patch sizes, chat template, vocabulary size)."""
    def plain(obj):
        return {k: v for k, v in sorted(vars(obj).items())
                if isinstance(v, int | float | str | bool | type(None) | list | tuple)} if obj is not None else None
    tokenizer = getattr(processor, "tokenizer", None)
    return _digest({"class": type(processor).__name__, "chat_template": getattr(processor, "chat_template", None),
                    "image": plain(getattr(processor, "image_processor", None)),
                    "video": plain(getattr(processor, "video_processor", None)),
                    "vocab": len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else None})


def _items(data) -> tuple[list[Item], str]:
    """(items, digest of the data): a JSONL path (its SHA-256), or Items / mappings with "messages"."""
    if isinstance(data, str | os.PathLike):
        return read_items(data), file_sha256(data)
    items = []
    for position, item in enumerate(data):
        if not isinstance(item, Item):
            record = {k: v for k, v in item.items() if k not in ("messages", "index")}
            item = Item(item.get("index", position), list(item["messages"]), None, record)
        items.append(item)
    return items, _digest([[it.index, it.messages] for it in items])


# ------------------------------------------------------------------------------------------------ one batch
def _batch_inputs(encoded: list[dict], rows: int, granule: int | None, pad_id: int) -> dict:
    """The model's inputs for encoded items: one item as it is, or left-padded rows (to a bucket of `granule` when
    given), plus all-padding filler rows up to `rows` (each attends to one padding token, as `scoring` does)."""
    if rows == 1 and granule is None:
        out = {k: v for k, v in encoded[0].items() if k in MODEL_INPUTS}
        out.setdefault("attention_mask", np.ones_like(out["input_ids"]))
        return out
    longest = max(e["input_ids"].shape[1] for e in encoded)
    T = bucket(longest, granule) if granule else longest
    ids_BT = np.full((rows, T), pad_id, np.int64)
    mask_BT = np.zeros((rows, T), np.int64)
    for b, e in enumerate(encoded):
        n = e["input_ids"].shape[1]
        ids_BT[b, T - n:], mask_BT[b, T - n:] = e["input_ids"][0], 1
    mask_BT[len(encoded):, -1] = 1
    out = {"input_ids": ids_BT, "attention_mask": mask_BT}
    for key in MODEL_INPUTS[2:]:
        parts = [e[key] for e in encoded if e.get(key) is not None]
        if parts:
            out[key] = np.concatenate(parts)
    return out


def _token_meta(config, inputs: dict, items: Sequence[int], position_ids_ZBT: np.ndarray) -> tuple[dict, list]:
    """`tokens` columns for the real rows of a batch, and each row's real-token mask."""
    ids_BT, mask_BT = np.asarray(inputs["input_ids"]), np.asarray(inputs["attention_mask"]).astype(bool)
    cols: dict[str, list] = {c: [] for c in GROUPS["tokens"]}
    real = []
    for b, item in enumerate(items):
        keep_T = mask_BT[b]
        n = int(keep_T.sum())
        real.append(keep_T)
        ids = ids_BT[b, keep_T]
        cols["item"].append(np.full(n, item, np.int64))
        cols["position"].append(np.arange(n, dtype=np.int32))
        cols["position_ids"].append(position_ids_ZBT[:, b, keep_T].T.astype(np.int32))
        cols["input_ids"].append(ids.astype(np.int32))
        cols["is_image"].append(ids == config.image_token_id)
        cols["is_video"].append(ids == config.video_token_id)
    return {c: np.concatenate(v) for c, v in cols.items()}, real


def _vision_meta(config, inputs: dict, items: Sequence[int], position_ids_ZBT: np.ndarray) -> dict[str, dict]:
    """`patches` and `merged` columns: images (all rows, in order), then videos, as the tower runs them."""
    merge = config.vision_config.spatial_merge_size
    unit = merge * merge
    ids_BT, mask_BT = np.asarray(inputs["input_ids"]), np.asarray(inputs["attention_mask"]).astype(bool)
    first_B = np.argmax(mask_BT, axis=1)
    out = {"patches": {c: [] for c in _VISION_COLUMNS}, "merged": {c: [] for c in _VISION_COLUMNS}}
    for is_video, key, token in ((False, "image_grid_thw", config.image_token_id),
                                 (True, "video_grid_thw", config.video_token_id)):
        if inputs.get(key) is None:
            continue
        slot_b, slot_t = np.nonzero(ids_BT == token)  # placeholders in row-major order: the merged rows' order
        taken, counts = 0, {}
        for t, h, w in np.asarray(inputs[key]).reshape(-1, 3).tolist():
            m = t * h * w // unit
            b_M, t_M = slot_b[taken: taken + m], slot_t[taken: taken + m]
            taken += m
            b = int(b_M[0])
            media = counts.get(b, 0)
            counts[b] = media + 1
            rc_P2 = np.tile(merge_order_positions(h, w, merge), (t, 1))
            frame_P = np.repeat(np.arange(t), h * w)
            pos_M, pid_M3 = t_M - first_B[b], position_ids_ZBT[:, b, t_M].T
            for group, rows, rc, frame, pos, pid in (
                    ("patches", t * h * w, rc_P2, frame_P, np.repeat(pos_M, unit), np.repeat(pid_M3, unit, axis=0)),
                    ("merged", m, rc_P2[::unit] // merge, frame_P[::unit], pos_M, pid_M3)):
                cols = out[group]
                cols["item"].append(np.full(rows, items[b], np.int64))
                cols["media"].append(np.full(rows, media, np.int32))
                cols["is_video"].append(np.full(rows, is_video))
                cols["frame"].append(frame.astype(np.int32))
                cols["row"].append(rc[:, 0].astype(np.int32))
                cols["col"].append(rc[:, 1].astype(np.int32))
                cols["position"].append(pos.astype(np.int32))
                cols["position_ids"].append(pid.astype(np.int32))
    return {g: {c: np.concatenate(v) if v else np.zeros((0, *GROUPS[g][c][1]), GROUPS[g][c][0])
                for c, v in cols.items()} for g, cols in out.items()}


def _run_batch(model, processor, batch: list[Item], names: Mapping[str, str], hookset, *, rows: int,
               granule: int | None, pad_id: int, dtype) -> tuple[dict[str, np.ndarray], dict[str, tuple]]:
    """One forward over `batch`: (`{tensor name: rows}` for every point with rows here and every metadata column
    of the groups used, `{point: the value's shape after its row axes}`)."""
    encoded = []
    for item in batch:
        try:
            encoded.append(encode_prompt(processor, item.messages))
        except (ValueError, OSError) as e:
            raise StoreError(f"item {item.index}: cannot encode the prompt: {e}") from e
    inputs = _batch_inputs(encoded, rows, granule, pad_id)
    keep = 0 if "logits" in names else 1
    out = model(**inputs, hooks=hookset, logits_to_keep=keep)  # hooks.run_with_cache's forward, fewer logits
    records = out.records
    position_ids_ZBT, _ = model.get_rope_index(inputs["input_ids"], inputs.get("image_grid_thw"),
                                               inputs.get("video_grid_thw"), inputs["attention_mask"],
                                               second_per_grid_ts=inputs.get("second_per_grid_ts"))
    position_ids_ZBT = np.asarray(position_ids_ZBT)
    indices = [item.index for item in batch]
    groups = set(names.values())
    tensors: dict[str, np.ndarray] = {}
    shapes: dict[str, tuple] = {}
    tokens, real = _token_meta(model.config, inputs, indices, position_ids_ZBT)
    if "tokens" in groups:
        tensors.update({f"tokens.{c}": v for c, v in tokens.items()})
    if groups & {"patches", "merged"}:
        vision = _vision_meta(model.config, inputs, indices, position_ids_ZBT)
        for g in groups & {"patches", "merged"}:
            tensors.update({f"{g}.{c}": v for c, v in vision[g].items()})
    window_rows = None
    if "patches" in groups and inputs.get("pixel_values", inputs.get("pixel_values_videos")) is not None:
        window = model.config.vision_config.window_tokens
        if window is not None:
            grids = [np.asarray(inputs[k]).reshape(-1, 3) for k in ("image_grid_thw", "video_grid_thw")
                     if inputs.get(k) is not None]
            window_rows = vision_layout(np.concatenate(grids), model.config.vision_config.spatial_merge_size,
                                        window_tokens=window).window_rows_P
    for name, group in names.items():
        if group == "tokens":
            value = np.asarray(records[name])
            value = np.concatenate([value[b][real[b]] for b in range(len(batch))])
        elif name not in records:  # no image or video in this batch: the tower did not run
            continue
        else:
            value = np.asarray(records[name])
            if group == "patches" and window_rows is not None:
                value = value[np.argsort(window_rows)]  # window order -> the processor's order
            if value.shape[0] != len(tensors[f"{group}.item"]):
                raise StoreError(f"{name}: {value.shape[0]} rows recorded, {len(tensors[f'{group}.item'])} "
                                 "described by the grids")
        shapes[name] = tuple(int(d) for d in value.shape[1:])
        value = value.reshape(value.shape[0], -1)
        tensors[name] = value.astype(dtype) if dtype is not None else value
    return tensors, shapes


# ------------------------------------------------------------------------------------------------ the writer
@dataclasses.dataclass
class _Buffer:
    """Rows waiting for the next shard: `{tensor name: [arrays]}`, counted in rows per group and bytes."""

    parts: dict[str, list] = dataclasses.field(default_factory=dict)
    rows: dict[str, int] = dataclasses.field(default_factory=dict)
    nbytes: int = 0
    items: int = 0

    def add(self, tensors: Mapping[str, np.ndarray], items: int) -> None:
        for name, value in tensors.items():
            self.parts.setdefault(name, []).append(value)
            self.nbytes += value.nbytes
            if name.endswith(".item"):
                group = name.split(".")[0]
                self.rows[group] = self.rows.get(group, 0) + len(value)
        self.items += items


def _check_points(manifest: dict, tensors: Mapping[str, np.ndarray], shapes: Mapping[str, tuple]) -> None:
    """The first rows of a point fix its dtype and shape; later batches (and a resumed run) must agree."""
    for name, shape in shapes.items():
        info = {"dtype": DTYPE_NAMES[np.dtype(tensors[name].dtype)], "shape": list(shape),
                "size": int(tensors[name].shape[1])}
        known = manifest["points"][name]
        if "dtype" not in known:
            known.update(info)
        elif {k: known[k] for k in info} != info:
            raise StoreError(f"{name}: this run gives {info}, the store holds {known}")


def _write_shard(directory: Path, k: int, buffer: _Buffer, manifest: dict) -> dict:
    """Write the buffer as shard `k` (temporary file, fsync, rename); returns its manifest entry."""
    specs = []
    for name, info in manifest["points"].items():  # a point with no rows in this shard is stored [0, D]
        rows = sum(len(p) for p in buffer.parts.get(name, []))
        specs.append(TensorSpec(name, DTYPES[info.get("dtype", "F32")], (rows, info.get("size", 0))))
    for name, parts in buffer.parts.items():
        if name not in manifest["points"]:
            specs.append(TensorSpec(name, np.dtype(parts[0].dtype), (sum(len(p) for p in parts),
                                                                      *parts[0].shape[1:])))

    def read(name):  # one tensor at a time: the buffer plus one concatenated tensor at most
        parts = buffer.parts.get(name, [])
        if not parts:
            spec = next(s for s in specs if s.name == name)
            return np.zeros(spec.shape, spec.dtype)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    path = directory / shard_name(k)
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    size = write_file(tmp, specs, read, {"format": FORMAT})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"file": path.name, "rows": dict(sorted(buffer.rows.items())), "bytes": size}


def _save_manifest(directory: Path, manifest: dict) -> None:
    atomic_write(directory / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())


def _open_manifest(directory: Path, fingerprint: dict, names: Mapping[str, str], axes: Mapping[str, str],
                   n_items: int) -> dict:
    """The manifest to go on from (checked against `fingerprint`), or a fresh one; removes files it does not name."""
    path = directory / MANIFEST
    if path.exists():
        try:
            manifest = json.loads(path.read_bytes())
        except json.JSONDecodeError as e:
            raise StoreError(f"{path} is not JSON ({e}); delete the directory to start again") from None
        found = manifest.get("fingerprint", {})
        if manifest.get("format") != FORMAT or found != fingerprint:
            changed = sorted(k for k in set(found) | set(fingerprint) if found.get(k) != fingerprint.get(k))
            raise StoreError(f"{directory} holds a store written with other settings (changed: "
                             f"{', '.join(changed) or 'format'}); delete it to start again, or choose another path")
    else:
        if directory.exists() and any(directory.glob("shard-*.safetensors")):
            raise StoreError(f"{directory} holds shards but no {MANIFEST}; delete them or choose another path")
        directory.mkdir(parents=True, exist_ok=True)
        manifest = {"format": FORMAT, "fingerprint": fingerprint,
                    "points": {n: {"group": g, "axes": axes[n]} for n, g in names.items()},
                    "groups": {g: {c: {"dtype": DTYPE_NAMES[np.dtype(d)], "shape": list(s)}
                                   for c, (d, s) in GROUPS[g].items()} for g in sorted(set(names.values()))},
                    "items_total": n_items, "items_done": 0, "complete": n_items == 0, "shards": []}
        _save_manifest(directory, manifest)
    listed = {s["file"] for s in manifest["shards"]}
    for stray in [*directory.glob("shard-*.safetensors"), *directory.glob(".shard-*.tmp"),
                  *directory.glob(f".{MANIFEST}.*.tmp")]:
        if stray.name not in listed:  # what a kill left: a temporary file, or a shard renamed before its manifest
            stray.unlink()
    return manifest


def build_store(model, processor, data: str | os.PathLike | Iterable[Item | Mapping], path: str | os.PathLike,
                points: Iterable[str] | str, *, shard_tokens: int | None = None,
                shard_bytes: int | str | None = "256MB", batch_size: int = 1, length_granule: int | None = None,
                dtype=None, progress: Callable[[int, int], None] | None = None) -> ActivationStore:
    """Run `data` (a prompts JSONL path, or `evaluation.Item`s) through `model` and write the hook points `points`
    (names or glob patterns) under `path`, or resume a killed run there (module docstring). A shard is written
    when the buffer holds `shard_tokens` rows (of its largest group) or `shard_bytes` bytes (either may be None,
    not both). `batch_size` items per forward, left-padded to a bucket of `length_granule` tokens when given;
    `dtype`: the stored dtype (default: each point's own). `progress(items_done, items_total)` is called after
    every forward. Returns the finished `ActivationStore`."""
    if shard_tokens is None and shard_bytes is None:
        raise ValueError("give shard_tokens or shard_bytes (the bound on a shard, and on the writer's memory)")
    if batch_size < 1 or (shard_tokens is not None and shard_tokens < 1):
        raise ValueError(f"batch_size and shard_tokens must be >= 1, got {batch_size}, {shard_tokens}")
    max_bytes = parse_size(shard_bytes) if shard_bytes is not None else None
    dtype = np.dtype(dtype) if dtype is not None else None
    axes = hook_point_axes(model.config)
    names = _resolve_points([points] if isinstance(points, str) else list(points), axes)
    items, data_digest = _items(data)
    fingerprint = {"data_sha256": data_digest, "items": len(items), "model": model_fingerprint(model),
                   "processor_sha256": processor_fingerprint(processor), "points": sorted(names),
                   "dtype": None if dtype is None else str(dtype), "shard_tokens": shard_tokens,
                   "shard_bytes": max_bytes, "batch_size": batch_size, "length_granule": length_granule}
    directory = Path(path)
    manifest = _open_manifest(directory, fingerprint, names, axes, len(items))
    hookset = make_hookset(model.config, None, list(names))
    tokenizer = getattr(processor, "tokenizer", None)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    buffer, start = _Buffer(), manifest["items_done"]
    for first in range(start, len(items), batch_size):
        batch = items[first: first + batch_size]
        tensors, shapes = _run_batch(model, processor, batch, names, hookset, rows=batch_size if
                                     (batch_size > 1 or length_granule) else 1, granule=length_granule,
                                     pad_id=pad_id, dtype=dtype)
        _check_points(manifest, tensors, shapes)
        buffer.add(tensors, len(batch))
        done = first + len(batch)
        full = (max_bytes is not None and buffer.nbytes >= max_bytes) or (
            shard_tokens is not None and max(buffer.rows.values(), default=0) >= shard_tokens)
        if full or done == len(items):
            entry = _write_shard(directory, len(manifest["shards"]), buffer, manifest)
            manifest["shards"].append({**entry, "items": [manifest["items_done"], done]})
            manifest["items_done"], manifest["complete"] = done, done == len(items)
            _save_manifest(directory, manifest)
            buffer = _Buffer()
        if progress is not None:
            progress(done, len(items))
    return ActivationStore(directory)


# ------------------------------------------------------------------------------------------------ the reader
class ActivationStore:
    """A store written by `build_store` (module docstring), read one shard at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.manifest = json.loads((self.path / MANIFEST).read_bytes())
        except FileNotFoundError:
            raise StoreError(f"{self.path} is not an activation store (no {MANIFEST})") from None
        if self.manifest.get("format") != FORMAT:
            raise StoreError(f"{self.path / MANIFEST}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")

    @property
    def points(self) -> dict[str, dict]:
        """`{name: {"group", "axes", "dtype", "shape", "size"}}` (dtype, shape and size (the stored row width)
        once a row has been written)."""
        return self.manifest["points"]

    @property
    def shards(self) -> list[dict]:
        """`[{"file", "rows": {group: n}, "bytes", "items": [first, stop)}]` (items: positions in the data)."""
        return self.manifest["shards"]

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def group(self, point: str) -> str:
        """The row group ("tokens", "patches", "merged") of a point, or the group itself."""
        if point in GROUPS:
            return point
        if point not in self.points:
            raise KeyError(f"{point!r} is not in this store (points: {sorted(self.points)})")
        return self.points[point]["group"]

    def shape(self, point: str) -> tuple[int, ...]:
        """The point's value shape after its row axes (`[D]`; `[N, H]` for `attn.head_out`, stored as `[N * H]`)."""
        return tuple(self.points[point]["shape"])

    def num_rows(self, point: str) -> int:
        group = self.group(point)
        return sum(s["rows"].get(group, 0) for s in self.shards)

    def _file(self, shard: int) -> SafetensorsFile:
        return SafetensorsFile(self.path / self.shards[shard]["file"])

    def read(self, point: str, shard: int) -> np.ndarray:
        """The point's rows `[n, D]` in shard `shard`."""
        self.group(point)
        rows = self._file(shard).read(point)
        if not len(rows) and "dtype" in self.points[point]:  # written before the point's width was known
            return np.zeros((0, self.points[point]["size"]), DTYPES[self.points[point]["dtype"]])
        return rows

    def metadata(self, point_or_group: str, shard: int | None = None) -> dict[str, np.ndarray]:
        """`{column: [n, ...]}` for the rows of a point's group, in one shard or (None) all shards concatenated."""
        group = self.group(point_or_group)
        shards = range(len(self.shards)) if shard is None else [shard]
        out: dict[str, list] = {c: [] for c in GROUPS[group]}
        for k in shards:
            f = self._file(k)
            for c in out:
                out[c].append(f.read(f"{group}.{c}"))
        return {c: np.concatenate(v) if v else np.zeros((0, *GROUPS[group][c][1]), GROUPS[group][c][0])
                for c, v in out.items()}

    def iter_shards(self, point: str, *, metadata: bool = False) -> Iterator:
        """Per shard, in order: the point's rows `[n, D]` (with `metadata=True`: `(rows, {column: values})`)."""
        for k in range(len(self.shards)):
            rows = self.read(point, k)
            yield (rows, self.metadata(point, k)) if metadata else rows

    def batches(self, point: str, batch_size: int, *, shuffle: bool = True, seed: int = 0, shards_in_memory: int = 2,
                drop_last: bool = False, metadata: bool = False, as_jax: bool = False) -> Iterator:
        """One pass over the point's rows in batches `[batch_size, D]` (NumPy; `as_jax`: jnp), with `metadata=True`
        `(batch, {column: values})`. Shuffled: the shards in a random order, `shards_in_memory` at a time, rows
        permuted within that window (the rows left over carry into the next), as SAELens' activation store mixes
        a buffer of several batches: a local shuffle whose reach grows with `shards_in_memory`. Memory: that many
        shards. The last, smaller batch is yielded unless `drop_last`."""
        if batch_size < 1 or shards_in_memory < 1:
            raise ValueError(f"batch_size and shards_in_memory must be >= 1, got {batch_size}, {shards_in_memory}")
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self.shards)) if shuffle else np.arange(len(self.shards))
        if as_jax:
            import jax.numpy as jnp
        convert = jnp.asarray if as_jax else (lambda a: a)
        carry: dict[str, np.ndarray] | None = None

        def emit(window: dict[str, np.ndarray], lo: int, hi: int):
            x = convert(window["x"][lo:hi])
            return (x, {c: v[lo:hi] for c, v in window.items() if c != "x"}) if metadata else x

        for w in range(0, len(order), shards_in_memory):
            parts = [] if carry is None else [carry]
            for k in order[w: w + shards_in_memory]:
                part = {"x": self.read(point, int(k))}
                if metadata:
                    part.update(self.metadata(point, int(k)))
                parts.append(part)
            window = {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
            del parts
            if shuffle:
                perm = rng.permutation(len(window["x"]))
                window = {c: v[perm] for c, v in window.items()}
            full = len(window["x"]) // batch_size * batch_size
            for lo in range(0, full, batch_size):
                yield emit(window, lo, lo + batch_size)
            carry = {c: v[full:] for c, v in window.items()}
        if carry is not None and len(carry["x"]) and not drop_last:
            yield emit(carry, 0, len(carry["x"]))
