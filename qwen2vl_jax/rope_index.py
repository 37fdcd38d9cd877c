"""M-RoPE position ids (host NumPy): `get_rope_index`, with the transformers 4.57 semantics
(`models/qwen2_vl/modeling_qwen2_vl.py` `Qwen2VLModel.get_rope_index`).

Text tokens advance all three axes (t, h, w) together. A vision block of `t x h x w` merged tokens (h, w already
divided by spatial_merge_size) gets `start + (t_idx, h_idx, w_idx)`, and the text after it restarts at
`max(all previous ids) + 1`. Qwen2-VL's video temporal ids count temporal patches. Qwen2.5-VL spaces them in time
(transformers 4.57 models/qwen2_5_vl/modeling_qwen2_5_vl.py `Qwen2_5_VLModel.get_rope_index`): temporal patch t gets
`t * second_per_grid_t * tokens_per_second`, where `second_per_grid_ts[v] = temporal_patch_size / fps` comes from
the processor (1.0 when not given), and an image's temporal id is 0. The reference converts `second_per_grid_t` to
the integer dtype of its `arange` before multiplying, so it is truncated first: fps 4 (0.5 s per temporal patch)
gives every frame temporal id 0, fps 1 (2.0 s) gives 0, 2 * tps, 4 * tps, ... We do the same.

Left padding is skipped: positions are computed on the unpadded tokens and pad slots hold 1, as in
transformers 4.57. `rope_deltas[b] = max(pos[b]) + 1 - S` (S = padded length), so the next decoded token sits at
`S + rope_deltas[b]` on all three axes.

Note: transformers 5.x rewrote this and advances text after a video by max(h, w) only (ignoring grid_t); that
diverges for videos with grid_t > max(h, w) / 2. We keep the original (transformers 4.57 / Qwen) semantics and
test that case.
"""

from __future__ import annotations

import numpy as np

__all__ = ["get_rope_index", "vision_block_positions"]


def vision_block_positions(t: int, h: int, w: int) -> np.ndarray:
    """`[3, t*h*w]` (t, h, w) ids of one merged vision block in row-major (t, h, w) order, starting at 0."""
    t_idx, h_idx, w_idx = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([t_idx.ravel(), h_idx.ravel(), w_idx.ravel()]).astype(np.int64)


def _temporal_step(kind: str, index: int, second_per_grid_ts, tokens_per_second: int | None) -> int | None:
    """The temporal id step between temporal patches: None for Qwen2-VL (ids count patches); Qwen2.5-VL: 0 for an
    image, `int(second_per_grid_t) * tokens_per_second` for a video (the reference's truncation)."""
    if tokens_per_second is None:
        return None
    if kind == "image":
        return 0
    seconds = 1.0 if second_per_grid_ts is None else float(second_per_grid_ts[index])
    return int(seconds) * tokens_per_second  # torch.as_tensor(seconds, dtype=int64) truncates toward zero


def _row_positions(ids: np.ndarray, image_grids, video_grids, image_index: int, video_index: int, *,
                   image_token_id: int, video_token_id: int, vision_start_token_id: int, merge: int,
                   second_per_grid_ts=None, tokens_per_second: int | None = None):
    """Positions `[3, len(ids)]` of one unpadded row; returns them and the advanced global image/video counters."""
    starts = np.flatnonzero(ids == vision_start_token_id)
    following = ids[starts[starts + 1 < len(ids)] + 1]
    n_images = int(np.sum(following == image_token_id))
    n_videos = int(np.sum(following == video_token_id))
    tokens = ids.tolist()
    chunks: list[np.ndarray] = []
    next_pos = 0  # max(previous ids) + 1
    st = 0
    remain_images, remain_videos = n_images, n_videos
    for _ in range(n_images + n_videos):
        # The reference looks for the next image / video *pad token* (not the vision_start) from `st`.
        ed_image = _index(tokens, image_token_id, st) if remain_images > 0 else len(tokens) + 1
        ed_video = _index(tokens, video_token_id, st) if remain_videos > 0 else len(tokens) + 1
        if ed_image < ed_video:
            grids, index, ed = image_grids, image_index, ed_image
            image_index, remain_images = image_index + 1, remain_images - 1
        else:
            grids, index, ed = video_grids, video_index, ed_video
            video_index, remain_videos = video_index + 1, remain_videos - 1
        if grids is None or index >= len(grids):
            kind = "image" if grids is image_grids else "video"
            raise ValueError(f"the prompt has more {kind} blocks than {kind}_grid_thw rows "
                             f"({0 if grids is None else len(grids)})")
        t, h, w = (int(x) for x in grids[index])
        lt, lh, lw = t, h // merge, w // merge
        text_len = ed - st
        chunks.append(np.broadcast_to(np.arange(text_len) + next_pos, (3, text_len)))
        block = vision_block_positions(lt, lh, lw)
        step = _temporal_step("image" if grids is image_grids else "video", index, second_per_grid_ts,
                              tokens_per_second)
        if step is not None:
            block[0] *= step
        block = block + text_len + next_pos
        chunks.append(block)
        next_pos = int(block.max()) + 1 if block.size else next_pos + text_len
        st = ed + lt * lh * lw
    if st < len(tokens):
        text_len = len(tokens) - st
        chunks.append(np.broadcast_to(np.arange(text_len) + next_pos, (3, text_len)))
    positions = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int64)
    return positions, image_index, video_index


def _index(tokens: list[int], value: int, start: int) -> int:
    try:
        return tokens.index(value, start)
    except ValueError:
        return len(tokens) + 1


def get_rope_index(input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None, config=None, *,
                   second_per_grid_ts=None, image_token_id: int = 151655, video_token_id: int = 151656,
                   vision_start_token_id: int = 151652, spatial_merge_size: int = 2,
                   tokens_per_second: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """3-D rotary positions for a (left-padded) batch.

    Args:
      input_ids: `[B, S]` token ids.
      image_grid_thw / video_grid_thw: `[n, 3]` patch grids, flat over the whole batch in prompt order.
      attention_mask: `[B, S]` 1 for real tokens, 0 for padding (default: all ones).
      config: a `Qwen2VLConfig` (token ids, merge size and Qwen2.5-VL's `tokens_per_second` are read from it);
        the keyword values are used otherwise (`tokens_per_second=None`: Qwen2-VL, no time spacing).
      second_per_grid_ts: Qwen2.5-VL: seconds per temporal patch of each video (the processor's
        `second_per_grid_ts`, flat over the batch); ignored for Qwen2-VL.

    Returns:
      `position_ids [3, B, S]` (int64) and `rope_deltas [B, 1]` (int64).
    """
    if config is not None:
        image_token_id, video_token_id = config.image_token_id, config.video_token_id
        vision_start_token_id = config.vision_start_token_id
        spatial_merge_size = config.vision_config.spatial_merge_size
        tokens_per_second = config.vision_config.tokens_per_second
    ids_BS = np.asarray(input_ids)
    if ids_BS.ndim != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {ids_BS.shape}")
    B, S = ids_BS.shape
    image_grids = None if image_grid_thw is None else np.asarray(image_grid_thw).reshape(-1, 3)
    video_grids = None if video_grid_thw is None else np.asarray(video_grid_thw).reshape(-1, 3)
    if second_per_grid_ts is not None and tokens_per_second is not None:
        second_per_grid_ts = np.asarray(second_per_grid_ts, np.float64).reshape(-1)
        n_videos = 0 if video_grids is None else len(video_grids)
        if len(second_per_grid_ts) != n_videos:
            raise ValueError(f"second_per_grid_ts has {len(second_per_grid_ts)} entries but video_grid_thw has "
                             f"{n_videos} rows: give one per video (the processor's `second_per_grid_ts`)")
    mask_BS = None if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask_BS is not None and mask_BS.shape != ids_BS.shape:
        raise ValueError(f"attention_mask shape {mask_BS.shape} does not match input_ids {ids_BS.shape}")

    if image_grids is None and video_grids is None:  # text only: ordinary 1-D positions on all three axes
        if mask_BS is None:
            pos_BS = np.broadcast_to(np.arange(S), (B, S)).astype(np.int64)
            return np.broadcast_to(pos_BS, (3, B, S)).copy(), np.zeros((B, 1), np.int64)
        pos_BS = np.cumsum(mask_BS, axis=-1).astype(np.int64) - 1
        pos_BS[~mask_BS] = 1
        deltas = pos_BS.max(axis=-1, keepdims=True) + 1 - S
        return np.broadcast_to(pos_BS, (3, B, S)).copy(), deltas.astype(np.int64)

    if mask_BS is None:
        mask_BS = np.ones((B, S), bool)
    position_ids = np.ones((3, B, S), np.int64)  # pad slots keep 1, as transformers 4.57
    deltas = np.zeros((B, 1), np.int64)
    image_index = video_index = 0  # global across rows: grids are flat over the batch
    for b in range(B):
        pos, image_index, video_index = _row_positions(
            ids_BS[b][mask_BS[b]], image_grids, video_grids, image_index, video_index,
            image_token_id=image_token_id, video_token_id=video_token_id,
            vision_start_token_id=vision_start_token_id, merge=spatial_merge_size,
            second_per_grid_ts=second_per_grid_ts, tokens_per_second=tokens_per_second)
        position_ids[:, b, mask_BS[b]] = pos
        deltas[b, 0] = (int(pos.max()) + 1 if pos.size else 0) - S
    return position_ids, deltas
