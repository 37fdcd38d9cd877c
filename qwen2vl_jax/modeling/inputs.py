"""Host-side input preparation (NumPy, before anything is traced): validate ids, masks and pixels, compute the
M-RoPE positions (`rope.get_rope_index`), lay out the vision rows (`vision_layout`) and the index that scatters
vision features into the placeholder slots (transformers 4.57 `Qwen2VLModel.forward`'s `get_placeholder_mask` +
`masked_scatter`, as an index)."""

from __future__ import annotations

import dataclasses

import numpy as np

from .config import Qwen2VLConfig
from .rope import get_rope_index
from .vision_layout import VisionLayout, prepare_pixels


@dataclasses.dataclass
class PreparedInputs:
    """Host-side NumPy inputs of one forward / prefill."""

    input_ids_BT: np.ndarray  # int32
    attention_mask_BT: np.ndarray  # int32
    position_ids_ZBT: np.ndarray  # int32
    rope_deltas_B1: np.ndarray  # int64
    vision_pixels: np.ndarray | None = None  # padded patch rows, images then videos
    vision_layout: VisionLayout | None = None
    vision_index_BT: np.ndarray | None = None  # int32: row of the vision features for each slot, -1 for text


def as_2d_ids(input_ids, vocab_size: int) -> np.ndarray:
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be a non-empty integer array [batch, seq], got {ids.dtype} {ids.shape}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, {vocab_size}), found min {ids.min()} max {ids.max()}")
    return ids


def as_attention_mask(attention_mask, shape: tuple[int, int]) -> np.ndarray:
    """`attention_mask` as a [B, T] array, the shape of input_ids (one 1-D row is accepted, like `input_ids`)."""
    mask = np.asarray(attention_mask)
    if mask.ndim == 1 and shape[0] == 1:
        mask = mask[None]
    if mask.shape != tuple(shape):
        raise ValueError(f"attention_mask must have the shape of input_ids [B, T] = {list(shape)}, "
                         f"got {list(mask.shape)}")
    return mask


def check_vision_inputs(ids: np.ndarray, config: Qwen2VLConfig, pixel_values, pixel_values_videos,
                         decoding: bool) -> None:
    """Placeholders need pixels, and pixels must be finite. transformers 4.57 `Qwen2VLModel.forward` only checks
    the placeholder count when pixels are given (`get_placeholder_mask`); without pixels it would embed the
    placeholder ids as text, silently. We refuse instead, in `get_placeholder_mask`'s wording."""
    for kind, pv, token, noun in (("image", pixel_values, config.image_token_id, "Image features and image"),
                                  ("video", pixel_values_videos, config.video_token_id, "Videos features and video")):
        n_tokens = int((ids == token).sum())  # placeholder count, as get_placeholder_mask
        if pv is None and n_tokens and not decoding:
            raise ValueError(f"{noun} tokens do not match: tokens: {n_tokens}, features 0 (input_ids hold "
                             f"{n_tokens} {kind} placeholder token(s) but no pixel values were given: pass "
                             f"`{'pixel_values' if kind == 'image' else 'pixel_values_videos'}` and `{kind}_grid_thw` "
                             f"from the processor)")
        if pv is not None:
            arr = np.asarray(pv)
            if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
                name = "pixel_values" if kind == "image" else "pixel_values_videos"
                what = f"dtype {arr.dtype}" if not np.issubdtype(arr.dtype, np.number) else "NaN or inf values"
                raise ValueError(f"`{name}` must be finite numbers, got {what}")


def prepare_inputs(config: Qwen2VLConfig, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                   pixel_values_videos=None, video_grid_thw=None, position_ids=None, *, decoding: bool = False,
                   second_per_grid_ts=None) -> PreparedInputs:
    """Validate and lay out everything on the host: rope positions, vision layout, feature scatter index.
`decoding`: these are tokens fed back after a prefill (generated ids need no pixels, as in HF).
`second_per_grid_ts`: Qwen2.5-VL's seconds per temporal patch of each video (from its processor)."""
    cfg = config
    ids = as_2d_ids(input_ids, cfg.text_config.vocab_size)
    mask = np.ones_like(ids) if attention_mask is None else as_attention_mask(attention_mask, ids.shape)
    check_vision_inputs(ids, cfg, pixel_values, pixel_values_videos, decoding)
    if position_ids is None:
        pos, deltas = get_rope_index(ids, image_grid_thw, video_grid_thw, mask, cfg,
                                     second_per_grid_ts=second_per_grid_ts)
    else:
        pos = np.asarray(position_ids)
        if pos.ndim == 2:  # 1-D positions for all three axes
            pos = np.broadcast_to(pos, (3, *pos.shape))
        if pos.shape != (3, *ids.shape):
            raise ValueError(f"position_ids must be [3, {ids.shape[0]}, {ids.shape[1]}], got {pos.shape}")
        deltas = pos.max(axis=(0, 2))[:, None] + 1 - ids.shape[1]
    prep = PreparedInputs(ids.astype(np.int32), mask.astype(np.int32), pos.astype(np.int32), deltas)

    merge2 = cfg.vision_config.spatial_merge_size ** 2
    pixels, grids = [], []
    index = np.full(ids.shape, -1, np.int64)
    offset = 0
    for kind, pv, grid, token in (("Image", pixel_values, image_grid_thw, cfg.image_token_id),
                                  ("Video", pixel_values_videos, video_grid_thw, cfg.video_token_id)):
        if pv is None:
            continue
        if grid is None:
            raise ValueError(f"{kind.lower()} pixel values were given without {kind.lower()}_grid_thw")
        grid = np.asarray(grid).reshape(-1, 3)
        n_features = int((np.prod(grid, axis=-1) // merge2).sum())
        slots = ids == token
        n_tokens = int(slots.sum())
        if n_tokens != n_features:  # the reference's get_placeholder_mask check, same wording
            noun = "Image features and image" if kind == "Image" else "Videos features and video"
            raise ValueError(f"{noun} tokens do not match: tokens: {n_tokens}, features {n_features}")
        index[slots] = offset + np.arange(n_tokens)  # row-major over (B, T): masked_scatter order
        offset += n_features
        pixels.append(np.asarray(pv))
        grids.append(grid)
    if pixels:
        prep.vision_pixels, prep.vision_layout = prepare_pixels(cfg.vision_config, np.concatenate(pixels),
                                                                np.concatenate(grids))
        prep.vision_index_BT = index.astype(np.int32)
    return prep
