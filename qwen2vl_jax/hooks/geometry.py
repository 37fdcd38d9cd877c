"""Image geometry of the vision tokens (host NumPy): where each merged token of a prompt sits in the original
photo, its M-RoPE position, and a generated token's attention over an image drawn as a heatmap on the photo.

    geoms = geometry.vision_token_geometry(inputs["input_ids"], inputs["image_grid_thw"], image_sizes=[photo],
                                           config=model.config, processor=processor)
    out, cache = hooks.run_with_cache(model, ["text.layers.*.attn.probs"], **inputs)
    grid = geometry.attention_to_vision(cache, geoms[0], query=-1)        # [t, h/2, w/2]
    geometry.plot_attention(photo, grid, geoms[0])

The mapping. The image processor resizes the whole image (H0, W0) to (H1, W1) = `smart_resize(H0, W0)` (both
multiples of patch_size * merge_size = 28; the aspect ratio is kept only approximately: transformers 4.57
models/qwen2_vl/image_processing_qwen2_vl.py `smart_resize`, here `processing.image.smart_resize`), then cuts
14 x 14 patches: `grid_thw = (t, H1 / 14, W1 / 14)`. The merger joins 2 x 2 patch blocks, so merged token (i, j)
covers resized rows [28 i, 28 i + 28) and columns [28 j, 28 j + 28), and the `<|image_pad|>` tokens appear in
input_ids t-major, then merged row, then merged column (the patchify / merger order). In original pixels that box
is x in [28 j * W0 / W1, 28 (j + 1) * W0 / W1), y likewise with H0 / H1: Pillow's resize maps the centre of
resized pixel u to (u + 0.5) * W0 / W1, so an original pixel x belongs to the token whose resized box holds
(x + 0.5) * W1 / W0. A video's frames are resized the same way and temporal patch t covers frames 2t, 2t + 1 of
the sampled clip (the last frame repeated to an even count).

M-RoPE positions come from `modeling.rope.get_rope_index` (transformers 4.57 models/qwen2_vl/modeling_qwen2_vl.py
`Qwen2VLModel.get_rope_index`): a vision block gets `start + (t, row, col)` on the merged grid (Qwen2.5-VL: the
video t scaled by `second_per_grid_ts` and `tokens_per_second`, `modeling/rope.py`'s docstring).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..modeling.rope import get_rope_index
from ..processing.image import smart_resize

__all__ = ["VisionTokens", "vision_token_geometry", "attention_to_vision", "heatmap_on_image", "plot_attention",
           "plot_token_grid", "image_array", "axes_or_new"]

DEFAULT_MIN_PIXELS = 56 * 56  # transformers 4.57 `Qwen2VLImageProcessor` class defaults
DEFAULT_MAX_PIXELS = 28 * 28 * 1280


@dataclasses.dataclass(frozen=True)
class VisionTokens:
    """Geometry of one image's or video's merged tokens, in the order the model sees them."""

    kind: str  # "image" or "video"
    index: int  # row of image_grid_thw / video_grid_thw (prompt order over the batch, counted per kind)
    original_size: tuple[int, int]  # (height, width) of the original image / frames
    resized_size: tuple[int, int]  # (H1, W1) after smart_resize
    grid_thw: tuple[int, int, int]  # in patches
    boxes_M4: np.ndarray  # float64 [M, 4] (x0, y0, x1, y1) in original pixels, x1 / y1 exclusive
    resized_boxes_M4: np.ndarray  # int64 [M, 4] (x0, y0, x1, y1) in resized pixels
    thw_M3: np.ndarray  # int64 [M, 3] (t, row, col) on the merged grid
    positions_M3: np.ndarray  # int64 [M, 3] M-RoPE (temporal, height, width) position ids
    token_index_M: np.ndarray  # int64 [M] column of each token in input_ids
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2

    @property
    def num_tokens(self) -> int:
        return int(self.token_index_M.shape[0])

    @property
    def merged_grid(self) -> tuple[int, int, int]:
        """(t, h / merge, w / merge): the token grid `attention_to_vision` returns."""
        t, h, w = self.grid_thw
        return t, h // self.merge_size, w // self.merge_size

    def box(self, m: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of token m in original pixels."""
        return tuple(float(v) for v in self.boxes_M4[self._check(m)])

    def frames(self, m: int) -> tuple[int, ...]:
        """The frames of the sampled clip token m sees: (2t, 2t + 1) for a video, (0,) for an image."""
        if self.kind == "image":
            self._check(m)
            return (0,)
        t = int(self.thw_M3[self._check(m), 0])
        return tuple(range(t * self.temporal_patch_size, (t + 1) * self.temporal_patch_size))

    def _check(self, m: int) -> int:
        if not -self.num_tokens <= m < self.num_tokens:
            raise IndexError(f"token {m} out of range for {self.kind} {self.index} with {self.num_tokens} tokens")
        return m % self.num_tokens


def _size_of(item: Any, kind: str, n: int) -> tuple[int, int]:
    """(height, width) of an image / video given as a size, a PIL image, an array or (images) a path."""
    if isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) == 2 and all(
            isinstance(v, (int, np.integer)) for v in item):
        return int(item[0]), int(item[1])
    if kind == "video":
        if isinstance(item, np.ndarray) and item.ndim == 4:  # [T, H, W, C]
            return int(item.shape[1]), int(item.shape[2])
        if isinstance(item, (list, tuple)) and item:
            return _size_of(item[0], "image", n)
        raise ValueError(f"video {n}: give its size as (height, width) of the frames passed to the processor, a "
                         f"[T, H, W, C] array or a list of frames (got {type(item).__name__})")
    if hasattr(item, "size") and hasattr(item, "mode"):  # PIL image
        return int(item.size[1]), int(item.size[0])
    if isinstance(item, (str, os.PathLike, bytes)):
        from ..processing.image_io import load_image

        return _size_of(load_image(item, exif_transpose=True), kind, n)
    array = np.asarray(item)
    # Channel axis located as processing.image._as_hwc does: first if it has 1 or 3 entries, else last.
    if array.ndim == 2 or (array.ndim == 3 and array.shape[0] not in (1, 3)):
        return int(array.shape[0]), int(array.shape[1])
    if array.ndim == 3:
        return int(array.shape[1]), int(array.shape[2])
    raise ValueError(f"image {n}: cannot read a size from {type(item).__name__} of shape {array.shape}; pass "
                     "(height, width), a PIL image or an [H, W, C] array")


def _pixel_bounds(processor, kind: str, min_pixels, max_pixels) -> tuple[int, int]:
    sub = None
    if processor is not None:  # a Qwen2VLProcessor (image + video processors) or a Qwen2VLImageProcessor
        sub = getattr(processor, "video_processor" if kind == "video" else "image_processor", processor)
    lo = min_pixels if min_pixels is not None else getattr(sub, "min_pixels", DEFAULT_MIN_PIXELS)
    hi = max_pixels if max_pixels is not None else getattr(sub, "max_pixels", DEFAULT_MAX_PIXELS)
    return int(lo), int(hi)


def _blocks(ids: np.ndarray, image_id: int, video_id: int, start_id: int) -> list[tuple[str, int]]:
    """(kind, first token column) of each vision block of one row: a vision_start followed by a pad token."""
    starts = np.flatnonzero(ids[:-1] == start_id)
    out = []
    for s in starts:
        nxt = ids[s + 1]
        if nxt in (image_id, video_id):
            out.append(("image" if nxt == image_id else "video", int(s + 1)))
    return out


def vision_token_geometry(input_ids, image_grid_thw=None, image_sizes=None, video_grid_thw=None, video_sizes=None,
                          *, config, attention_mask=None, row: int = 0, min_pixels: int | None = None,
                          max_pixels: int | None = None, processor=None,
                          second_per_grid_ts=None) -> list[VisionTokens]:
    """The `VisionTokens` of every image and video in batch row `row`, in prompt order.

    Args:
      input_ids: `[B, S]` (or `[S]`) token ids from the processor; attention_mask: `[B, S]` (left padding).
      image_grid_thw / video_grid_thw: the processor's `[n, 3]` grids, flat over the batch.
      image_sizes / video_sizes: per grid row, the original (height, width), or the PIL images / arrays
        themselves (a video: its [T, H, W, C] frames or frame list), flat over the batch like the grids. None:
        boxes are given in resized pixels. Each size is checked against the grid through `smart_resize`.
      config: a `Qwen2VLConfig` (token ids, patch / merge / temporal patch sizes).
      min_pixels / max_pixels: the bounds the processor used (default: `processor`'s, else 56*56 / 28*28*1280).
      processor: a `Qwen2VLProcessor` or `Qwen2VLImageProcessor` to read those bounds from (videos use its
        video processor's).
      second_per_grid_ts: Qwen2.5-VL's per-video seconds per temporal patch (its processor's output), which
        spaces the videos' temporal positions.
    """
    ids_BS = np.asarray(input_ids)
    if ids_BS.ndim == 1:
        ids_BS = ids_BS[None]
    if ids_BS.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids_BS.shape}")
    if not 0 <= row < ids_BS.shape[0]:
        raise ValueError(f"row {row} out of range for a batch of {ids_BS.shape[0]}")
    mask_BS = None if attention_mask is None else np.asarray(attention_mask).reshape(ids_BS.shape)
    vcfg = config.vision_config
    patch, merge, tps = vcfg.patch_size, vcfg.spatial_merge_size, vcfg.temporal_patch_size
    factor = patch * merge
    grids = {"image": None if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3),
             "video": None if video_grid_thw is None else np.asarray(video_grid_thw).reshape(-1, 3)}
    sizes = {"image": image_sizes, "video": video_sizes}
    for kind in ("image", "video"):
        if sizes[kind] is not None and (grids[kind] is None or len(sizes[kind]) != len(grids[kind])):
            raise ValueError(f"{kind}_sizes has {len(sizes[kind])} entries but {kind}_grid_thw has "
                             f"{0 if grids[kind] is None else len(grids[kind])} rows (one size per {kind})")
    position_ids, _ = get_rope_index(ids_BS, grids["image"], grids["video"], mask_BS, config,
                                     second_per_grid_ts=second_per_grid_ts)
    ids = {"image": config.image_token_id, "video": config.video_token_id}

    counters = {"image": 0, "video": 0}  # grids are flat over the batch: skip earlier rows' blocks
    for b in range(row):
        valid = ids_BS[b] if mask_BS is None else ids_BS[b][mask_BS[b].astype(bool)]
        for kind, _ in _blocks(valid, ids["image"], ids["video"], config.vision_start_token_id):
            counters[kind] += 1
    out = []
    for kind, col in _blocks(ids_BS[row], ids["image"], ids["video"], config.vision_start_token_id):
        if mask_BS is not None and not mask_BS[row, col]:
            continue
        index = counters[kind]
        counters[kind] += 1
        if grids[kind] is None or index >= len(grids[kind]):
            raise ValueError(f"the prompt has more {kind} blocks than {kind}_grid_thw rows")
        t, h, w = (int(v) for v in grids[kind][index])
        t2, h2, w2 = t, h // merge, w // merge
        n = t2 * h2 * w2
        token_index_M = np.arange(col, col + n, dtype=np.int64)
        if col + n > ids_BS.shape[1] or np.any(ids_BS[row, col:col + n] != ids[kind]):
            raise ValueError(f"{kind} {index}: expected {n} consecutive {kind} pad tokens (grid {(t, h, w)}) from "
                             f"column {col}; input_ids and {kind}_grid_thw do not match")
        resized = (h * patch, w * patch)
        if sizes[kind] is None:
            original = resized
        else:
            original = _size_of(sizes[kind][index], kind, index)
            lo, hi = _pixel_bounds(processor, kind, min_pixels, max_pixels)
            expected = smart_resize(original[0], original[1], factor=factor, min_pixels=lo, max_pixels=hi)
            if tuple(expected) != resized:
                raise ValueError(
                    f"{kind} {index}: original size {original[0]}x{original[1]} (HxW) resizes to "
                    f"{expected[0]}x{expected[1]} with min_pixels={lo}, max_pixels={hi}, but its grid {(t, h, w)} "
                    f"means {resized[0]}x{resized[1]}; pass the original {kind} (its size) and the processor's "
                    "min_pixels / max_pixels (or processor=)")
        t_idx, r_idx, c_idx = np.meshgrid(np.arange(t2), np.arange(h2), np.arange(w2), indexing="ij")
        thw_M3 = np.stack([t_idx.ravel(), r_idx.ravel(), c_idx.ravel()], axis=1).astype(np.int64)
        unit = patch * merge
        resized_boxes_M4 = np.stack([thw_M3[:, 2] * unit, thw_M3[:, 1] * unit, (thw_M3[:, 2] + 1) * unit,
                                     (thw_M3[:, 1] + 1) * unit], axis=1).astype(np.int64)
        # x * W0 / W1 with an integer numerator: exact wherever the true value is representable (edges included).
        scale = np.array([original[1], original[0]] * 2, np.int64)
        div = np.array([resized[1], resized[0]] * 2, np.int64)
        boxes_M4 = (resized_boxes_M4 * scale) / div
        out.append(VisionTokens(kind=kind, index=index, original_size=original, resized_size=resized,
                                grid_thw=(t, h, w), boxes_M4=boxes_M4, resized_boxes_M4=resized_boxes_M4,
                                thw_M3=thw_M3, positions_M3=position_ids[:, row, token_index_M].T.copy(),
                                token_index_M=token_index_M, patch_size=patch, merge_size=merge,
                                temporal_patch_size=tps))
    return out


_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _stack_probs(probs) -> tuple[np.ndarray, list[int]]:
    """probs as ([L, B, N, T, S], layer numbers): a run_with_cache dict, a stacked array or one layer's array."""
    if isinstance(probs, Mapping):
        found = {}
        for name, value in probs.items():
            match = _LAYER_KEY.search(name)
            if match and name.endswith("attn.probs") and name.startswith("text."):
                found[int(match.group(1))] = value
        if not found:
            raise ValueError("no text.layers.{i}.attn.probs in the cache; record them with "
                             "hooks.run_with_cache(model, ['text.layers.*.attn.probs'], ...)")
        numbers = sorted(found)
        return np.stack([np.asarray(found[i]) for i in numbers]), numbers
    array = np.asarray(probs)
    if array.ndim == 4:
        array = array[None]
    if array.ndim != 5:
        raise ValueError(f"attention probs must be [L, B, N, T, S] or [B, N, T, S], got shape {array.shape}")
    return array, list(range(array.shape[0]))


def _pick(requested, available: list[int], what: str) -> list[int]:
    """Positions along an axis for `requested` (None: all; ints naming entries of `available`, or negative ones
    counting from the end)."""
    if requested is None:
        return list(range(len(available)))
    items = [requested] if isinstance(requested, (int, np.integer)) else list(requested)
    out = []
    for item in items:
        item = int(item)
        if -len(available) <= item < 0:
            out.append(item % len(available))
        elif item in available:
            out.append(available.index(item))
        else:
            raise ValueError(f"{what} {item} not available (have {available[0]}..{available[-1]})"
                             if available else f"{what} {item} not available")
    return out


def attention_to_vision(probs, geometry: VisionTokens, query: int, *, layers=None, heads=None, row: int = 0,
                        reduce: str | None = "mean") -> np.ndarray:
    """The attention of query column `query` (any token; negative counts from the end) over the tokens of
    `geometry`, as `[t, h2, w2]` on the merged grid.

    `probs`: `run_with_cache`'s dict (`text.layers.{i}.attn.probs` [B, N, T, S]; `layers` are then layer numbers),
    or an array `[L, B, N, T, S]` / `[B, N, T, S]` (`layers` index its first axis). Keys are input_ids columns.
    `reduce`: "mean" / "sum" / "max" over the chosen layers and heads, or None for `[nL, nN, t, h2, w2]`.
    """
    probs_LBNTS, numbers = _stack_probs(probs)
    L, B, N, T, S = probs_LBNTS.shape
    if not 0 <= row < B:
        raise ValueError(f"row {row} out of range for a batch of {B}")
    if not -T <= query < T:
        raise ValueError(f"query {query} out of range for {T} query tokens")
    if geometry.num_tokens and int(geometry.token_index_M.max()) >= S:
        raise ValueError(f"{geometry.kind} {geometry.index} has tokens up to column {int(geometry.token_index_M.max())}"
                         f" but the attention has only {S} key columns (geometry from another prompt?)")
    layer_idx = _pick(layers, numbers, "layer")
    head_idx = _pick(heads, list(range(N)), "head")
    picked = probs_LBNTS[np.ix_(layer_idx, [row], head_idx, [query % T], geometry.token_index_M)]
    grid = picked[:, 0, :, 0, :].astype(np.float64).reshape(len(layer_idx), len(head_idx), *geometry.merged_grid)
    if reduce is None:
        return grid
    ops = {"mean": np.mean, "sum": np.sum, "max": np.max}
    if reduce not in ops:
        raise ValueError(f"reduce must be 'mean', 'sum', 'max' or None, got {reduce!r}")
    return ops[reduce](grid, axis=(0, 1))


def _grid_values(values, geometry: VisionTokens) -> np.ndarray:
    """values as [t, h2, w2]: from [M], [t, h2, w2] or (one temporal slice) [h2, w2]."""
    array = np.asarray(values, dtype=np.float64)
    t2, h2, w2 = geometry.merged_grid
    if array.shape == (geometry.num_tokens,):
        return array.reshape(t2, h2, w2)
    if array.shape == (t2, h2, w2):
        return array
    if t2 == 1 and array.shape == (h2, w2):
        return array[None]
    raise ValueError(f"values of shape {array.shape} do not fit {geometry.kind} {geometry.index}: expected "
                     f"[{geometry.num_tokens}] or {[t2, h2, w2]}")


def heatmap_on_image(values, geometry: VisionTokens, *, frame: int = 0) -> np.ndarray:
    """Per-token `values` ([M] or [t, h2, w2]) painted on the original image: float64 [H0, W0], each pixel holding
    the value of the token whose box contains its centre. `frame`: the temporal token index (frames 2t, 2t+1)."""
    grid = _grid_values(values, geometry)
    if not -grid.shape[0] <= frame < grid.shape[0]:
        raise ValueError(f"frame {frame} out of range for {grid.shape[0]} temporal token slices")
    (H0, W0), (H1, W1) = geometry.original_size, geometry.resized_size
    unit = geometry.patch_size * geometry.merge_size
    # floor((x + 0.5) * W1 / W0 / unit) in integers: (2x + 1) * W1 // (2 * W0 * unit).
    rows = (2 * np.arange(H0, dtype=np.int64) + 1) * H1 // (2 * H0 * unit)
    cols = (2 * np.arange(W0, dtype=np.int64) + 1) * W1 // (2 * W0 * unit)
    return grid[frame][np.ix_(rows, cols)]


def image_array(image, geometry: VisionTokens) -> np.ndarray:
    """The photo as an [H, W, C] array, checked to be the original size the geometry was computed for."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.shape[:2] != tuple(geometry.original_size):
        raise ValueError(f"image of size {array.shape[:2]} (HxW) is not {geometry.kind} {geometry.index}'s original "
                         f"size {geometry.original_size}")
    return array


def axes_or_new(ax):
    """`ax`, or a new matplotlib figure's axes when it is None."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    return plt.subplots()[1]


def plot_attention(image, values, geometry: VisionTokens, *, ax=None, alpha: float = 0.55, cmap: str = "inferno",
                   title: str | None = None, grid: bool = False, frame: int = 0):
    """The photo (for a video: a frame) with `values` ([M] or [t, h2, w2]) overlaid as a heatmap; returns the Axes.
    `grid=True` also draws the token boxes."""
    array = image_array(image, geometry)
    H0, W0 = geometry.original_size
    ax = axes_or_new(ax)
    extent = (0, W0, H0, 0)
    ax.imshow(array, extent=extent)
    ax.imshow(heatmap_on_image(values, geometry, frame=frame), extent=extent, alpha=alpha, cmap=cmap,
              interpolation="nearest")
    if grid:
        _draw_boxes(ax, geometry, frame)
    ax.set_xlim(0, W0)
    ax.set_ylim(H0, 0)
    if title is not None:
        ax.set_title(title)
    ax.set_axis_off()
    return ax


def _draw_boxes(ax, geometry: VisionTokens, frame: int) -> np.ndarray:
    from matplotlib.collections import PolyCollection

    t2 = geometry.merged_grid[0]
    chosen = np.flatnonzero(geometry.thw_M3[:, 0] == frame % t2)
    x0, y0, x1, y1 = geometry.boxes_M4[chosen].T
    verts = np.stack([np.stack([x0, y0], 1), np.stack([x1, y0], 1), np.stack([x1, y1], 1), np.stack([x0, y1], 1)], 1)
    ax.add_collection(PolyCollection(verts, facecolors="none", edgecolors="white", linewidths=0.5, alpha=0.8))
    return chosen


def plot_token_grid(image, geometry: VisionTokens, *, ax=None, label: str | None = "position", frame: int = 0):
    """The merged-token boxes drawn on the photo, labelled with their M-RoPE (t, h, w) ids (`"position"`), their
    input_ids column (`"index"`), or nothing (None); returns the Axes."""
    if label not in ("position", "index", None):
        raise ValueError(f"label must be 'position', 'index' or None, got {label!r}")
    array = image_array(image, geometry)
    H0, W0 = geometry.original_size
    ax = axes_or_new(ax)
    ax.imshow(array, extent=(0, W0, H0, 0))
    chosen = _draw_boxes(ax, geometry, frame)
    if label is not None:
        size = max(3.0, min(8.0, 600.0 / max(geometry.merged_grid[1:]) / 4))
        for m in chosen:
            x0, y0, x1, y1 = geometry.boxes_M4[m]
            text = ",".join(str(v) for v in geometry.positions_M3[m]) if label == "position" else \
                str(geometry.token_index_M[m])
            ax.text((x0 + x1) / 2, (y0 + y1) / 2, text, ha="center", va="center", fontsize=size, color="white")
    ax.set_xlim(0, W0)
    ax.set_ylim(H0, 0)
    ax.set_axis_off()
    return ax
