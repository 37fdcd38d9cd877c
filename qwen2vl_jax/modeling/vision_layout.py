"""Host-side (NumPy) layout of one vision call: rotary positions in 2x2 merge order, the attention segments (one per
frame; Qwen2.5-VL also one per window, rows in window order) and the bucket padding.

Everything here depends on `grid_thw` only and runs on the host before the jitted tower (`vision.py`), so the device
side sees padded, static shapes. References: transformers 4.57 `models/qwen2_vl/modeling_qwen2_vl.py`
`Qwen2VisionTransformerPretrainedModel.rot_pos_emb` and `models/qwen2_5_vl/modeling_qwen2_5_vl.py`
`Qwen2_5_VisionTransformerPretrainedModel.get_window_index`.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from ..attention import VisionSegments
from ..attention import xla as attention_xla
from .buckets import bucket, pow2_bucket
from .config import Qwen2VLVisionConfig

__all__ = ["VisionLayout", "WindowedSegments", "check_grid", "merge_order_positions", "prepare_pixels", "trim_records",
           "vision_layout", "window_index"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WindowedSegments:
    """The two attention groupings of a Qwen2.5-VL vision call, rows in window order: `full` (one segment per
    frame: transformers `cu_seqlens`) for the blocks in `fullatt_block_indexes`, `windows` (one per window:
    `cu_window_seqlens`) for the others; `restore_M[m]` is the window-order row of prompt-order merged token m
    (transformers `argsort(window_index)`), padding rows map to themselves."""

    full: VisionSegments
    windows: VisionSegments
    restore_M: jax.Array  # int32 [P_pad / 4]


@dataclasses.dataclass(frozen=True)
class VisionLayout:
    """Host-side (NumPy) description of one vision call: positions, attention segments and padding."""

    grid_thw: np.ndarray  # [n, 3] (t, h, w) in patches
    num_patches: int  # P: real patch rows
    pos_hw_P2: np.ndarray  # int32 [P_pad, 2]: (row, col) of each patch, 2x2 merge-block order
    seg_rows_QL: np.ndarray  # int32 [Q_pad, L_pad]: patch row of each slot of each segment
    seg_valid_QL: np.ndarray  # bool  [Q_pad, L_pad]
    row_slot_P: np.ndarray  # int32 [P_pad]: flat slot (q * L_pad + l) holding each patch row
    bounds_Q2: np.ndarray  # int32 [Q_pad, 2]: (first row, length) of each segment; length 0 for padding
    # Qwen2.5-VL window attention (None for Qwen2-VL): rows are in window order
    window_rows_P: np.ndarray | None = None  # int64 [P]: prompt-order row of each window-order row
    windows: VisionSegments | None = None  # one segment per window (NumPy leaves)
    restore_M: np.ndarray | None = None  # int32 [P_pad / 4]

    @property
    def padded_patches(self) -> int:
        return self.pos_hw_P2.shape[0]

    @property
    def num_merged(self) -> int:
        return self.num_patches // 4

    def segments(self) -> VisionSegments | WindowedSegments:
        """The segments as the attention backends take them (NumPy leaves; jit moves them to the device); with
        window attention, both groupings (`WindowedSegments`)."""
        full = VisionSegments(rows_QL=self.seg_rows_QL, valid_QL=self.seg_valid_QL, row_slot_P=self.row_slot_P,
                              bounds_Q2=self.bounds_Q2)
        if self.windows is None:
            return full
        return WindowedSegments(full=full, windows=self.windows, restore_M=self.restore_M)

    def to_prompt_order(self, rows_P):
        """Patch rows `[P, ...]` from window order back to the processor's order (identity without windows)."""
        if self.window_rows_P is None:
            return rows_P
        return rows_P[np.argsort(self.window_rows_P)]


def check_grid(grid_thw, merge: int, name: str = "grid_thw") -> np.ndarray:
    grid = np.asarray(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise ValueError(f"{name} must be [num_images, 3] (t, h, w), got shape {grid.shape}")
    grid = grid.astype(np.int64)
    if (grid <= 0).any():
        raise ValueError(f"{name} entries must be positive, got {grid.tolist()}")
    odd = [row for row in grid.tolist() if row[1] % merge or row[2] % merge]
    if odd:
        raise ValueError(f"{name}: h and w must be multiples of spatial_merge_size={merge}, got {odd}")
    return grid


def merge_order_positions(h: int, w: int, merge: int) -> np.ndarray:
    """`[h*w, 2]` (row, col) of each patch in the processor's 2x2 block order (transformers
    `Qwen2VisionTransformerPretrainedModel.rot_pos_emb`)."""
    hpos = np.broadcast_to(np.arange(h)[:, None], (h, w))
    wpos = np.broadcast_to(np.arange(w)[None, :], (h, w))
    reorder = lambda a: a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([reorder(hpos), reorder(wpos)], axis=-1)


def window_index(grid_thw, merge: int, window_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL's window order (transformers 4.57 `Qwen2_5_VisionTransformerPretrainedModel.get_window_index`).

    Each frame's `h/merge x w/merge` merged tokens are cut into windows of `window_tokens x window_tokens`, partial
    at the bottom / right edges (the reference pads with -100 and drops the padding); windows are taken row-major
    and the tokens within a window row-major. Returns `(index_M, lengths_W)`: the merged token at each window-order
    position, and the number of merged tokens in each (non-empty) window.
    """
    grid = check_grid(grid_thw, merge)
    index, lengths, offset = [], [], 0
    for t, h, w in grid.tolist():
        gh, gw = h // merge, w // merge
        nwh, nww = -(-gh // window_tokens), -(-gw // window_tokens)
        padded = np.full((t, nwh * window_tokens, nww * window_tokens), -1, np.int64)
        padded[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
        windows = padded.reshape(t, nwh, window_tokens, nww, window_tokens).transpose(0, 1, 3, 2, 4)
        windows = windows.reshape(t * nwh * nww, window_tokens * window_tokens)
        for win in windows:
            real = win[win >= 0]
            if real.size:  # the reference's unique_consecutive drops empty windows
                index.append(real + offset)
                lengths.append(real.size)
        offset += t * gh * gw
    return np.concatenate(index), np.asarray(lengths, np.int64)


def _segments(seg_len: np.ndarray, num_rows: int, padded_rows: int, segment_bucket, segments_bucket):
    """(rows_QL, valid_QL, row_slot_P, bounds_Q2) of contiguous segments of the given lengths."""
    seg_start = np.concatenate([[0], np.cumsum(seg_len)[:-1]])
    L_pad = segment_bucket(int(seg_len.max()))
    if L_pad > attention_xla.QUERY_CHUNK:  # the xla backend attends in query chunks
        L_pad = -(-L_pad // attention_xla.QUERY_CHUNK) * attention_xla.QUERY_CHUNK
    Q_pad = segments_bucket(len(seg_len))
    offsets = np.arange(L_pad)
    seg_valid = np.zeros((Q_pad, L_pad), bool)
    seg_valid[: len(seg_len)] = offsets[None, :] < seg_len[:, None]
    seg_rows = np.zeros((Q_pad, L_pad), np.int64)
    seg_rows[: len(seg_len)] = seg_start[:, None] + offsets[None, :]
    seg_rows = np.where(seg_valid, seg_rows, 0)
    row_slot = np.zeros(padded_rows, np.int64)
    seg_of_row = np.repeat(np.arange(len(seg_len)), seg_len)
    row_slot[:num_rows] = seg_of_row * L_pad + (np.arange(num_rows) - seg_start[seg_of_row])
    bounds = np.zeros((Q_pad, 2), np.int32)
    bounds[: len(seg_len), 0], bounds[: len(seg_len), 1] = seg_start, seg_len
    return seg_rows.astype(np.int32), seg_valid, row_slot.astype(np.int32), bounds


def vision_layout(grid_thw, merge: int = 2, *, window_tokens: int | None = None, patch_bucket=bucket,
                  segment_bucket=bucket, segments_bucket=pow2_bucket) -> VisionLayout:
    """The layout of one vision call; `window_tokens` (Qwen2.5-VL: `config.window_tokens`) puts the rows in window
    order and adds the window segments."""
    grid = check_grid(grid_thw, merge)
    pos = np.concatenate([np.tile(merge_order_positions(h, w, merge), (t, 1)) for t, h, w in grid.tolist()])
    P = pos.shape[0]
    P_pad = patch_bucket(P)
    # One attention segment per temporal slice of each image / video (transformers `cu_seqlens` = repeat(h*w, t)).
    # Window order keeps each frame's rows together, so these stay contiguous.
    seg_len = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    full = _segments(seg_len, P, P_pad, segment_bucket, segments_bucket)
    window_rows = windows = restore = None
    if window_tokens is not None:
        unit = merge * merge
        index_M, lengths_W = window_index(grid, merge, window_tokens)
        window_rows = (index_M[:, None] * unit + np.arange(unit)).reshape(-1)
        pos = pos[window_rows]
        # a window holds at most window_tokens**2 merged tokens: that is its padded length, not a 256-row bucket
        # (the xla / jax / pallas backends attend over the whole padded [L, L])
        full_window = window_tokens * window_tokens * unit
        windows = VisionSegments(*_segments(lengths_W * unit, P, P_pad, lambda n: full_window, segments_bucket))
        restore = np.arange(P_pad // unit, dtype=np.int32)
        restore[: len(index_M)] = np.argsort(index_M)
    pos_pad = np.zeros((P_pad, 2), np.int32)
    pos_pad[:P] = pos
    return VisionLayout(grid, P, pos_pad, *full, window_rows_P=window_rows, windows=windows, restore_M=restore)


def prepare_pixels(cfg: Qwen2VLVisionConfig, pixel_values, grid_thw) -> tuple[np.ndarray, VisionLayout]:
    """`pixel_values` `[P, C]` validated against `grid_thw`, put in the layout's row order (window order for
    Qwen2.5-VL) and padded to the bucket: (padded rows, layout)."""
    layout = vision_layout(grid_thw, cfg.spatial_merge_size, window_tokens=cfg.window_tokens)
    shape = tuple(getattr(pixel_values, "shape", ()))
    if len(shape) != 2 or shape[1] != cfg.patch_dim:
        raise ValueError(f"pixel_values must be [num_patches, {cfg.patch_dim}] (C*T*P*P = {cfg.in_channels}*"
                         f"{cfg.temporal_patch_size}*{cfg.patch_size}*{cfg.patch_size}), got shape {shape}")
    if shape[0] != layout.num_patches:
        raise ValueError(f"pixel_values has {shape[0]} rows but grid_thw {layout.grid_thw.tolist()} "
                         f"describes sum(t*h*w) = {layout.num_patches} patches")
    pixels = np.asarray(pixel_values)
    padded = np.zeros((layout.padded_patches, cfg.patch_dim), pixels.dtype)
    padded[: layout.num_patches] = pixels if layout.window_rows_P is None else pixels[layout.window_rows_P]
    return padded, layout


def trim_records(records: dict, layout: VisionLayout, config: Qwen2VLVisionConfig | None = None) -> dict:
    """Recorded vision values without the bucket padding: patch rows `[:P]` (in the layout's row order: window
    order for Qwen2.5-VL), merged rows `[:M]`, and attention probabilities as one `[N, L, L]` array per segment
    (its real rows and keys, in row order; per window in Qwen2.5-VL's window blocks)."""
    out = {}
    for name, value in records.items():
        if name.endswith(".attn.probs"):
            bounds = layout.bounds_Q2
            if layout.windows is not None and config is not None and config.attends_in_windows(
                    int(name.split(".")[2])):
                bounds = layout.windows.bounds_Q2
            out[name] = tuple(value[q, :, :n, :n] for q, n in enumerate(bounds[:, 1]) if n > 0)
        elif name == "vision.merger.out":
            out[name] = value[: layout.num_merged]
        else:
            out[name] = value[: layout.num_patches]
    return out
