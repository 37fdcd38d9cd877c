"""Rotary position embeddings, all of them: the decoder's multimodal rotary (M-RoPE), the vision tower's 2-D
rotary, and the M-RoPE position ids (`get_rope_index`). Read top to bottom, with the reference's formulas
(transformers 4.57 `models/qwen2_vl/modeling_qwen2_vl.py`).

1. Frequencies and the rotation (`Qwen2VLRotaryEmbedding`, `rotate_half`, `apply_multimodal_rotary_pos_emb`,
   `apply_rotary_pos_emb_vision`). For a head of dim H, slot j < H/2 turns at

       inv_freq_j = 1 / theta^(2j / H)

   and a vector x at angle a (pairs j, j + H/2, the non-interleaved layout) becomes

       rotate_half(x) = cat(-x[H/2:], x[:H/2])
       x' = x * cos(a) + rotate_half(x) * sin(a)          (in fp32, cast back)

2. The decoder's M-RoPE (`mrope_cos_sin`). Positions have three axes (temporal, height, width):
   `position_ids [3, B, T]`. `mrope_section = [s0, s1, s2]` (sum H/2) splits the frequency slots in chunks:
   slot j takes its position from the temporal axis if j < s0, height if j < s0 + s1, else width:

       a[b, t, j] = position_ids[axis(j), b, t] * inv_freq_j,     a[..., j + H/2] = a[..., j]

3. The vision 2-D rotary (`vision_cos_sin`). Each patch has a (row, col) position in its image (in 2x2 merge
   order); the first half of the slots turn with the row, the second with the column (inv_freq over H/2):

       a[p] = cat(row_p * inv_freq, col_p * inv_freq),            a[..., j + H/2] = a[..., j]

4. The position ids themselves (`get_rope_index`, host NumPy, with the semantics of transformers 4.57
   `Qwen2VLModel.get_rope_index`), computed before anything is traced:

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

import jax
import jax.numpy as jnp
import numpy as np

from .config import Qwen2VLTextConfig, Qwen2VLVisionConfig


# ------------------------------------------------------------------------------------- 1. frequencies, rotation
def rope_inv_freq(dim: int, theta: float):
    """1 / theta^(2i/dim), i < dim/2, in fp32 as the reference computes it (host NumPy, a constant under jit)."""
    exponent = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
    """cat(-x2, x1) over the last axis: the non-interleaved rotary layout of the reference (pairs j, j + H/2)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x_XNH: jax.Array, cos_XH: jax.Array, sin_XH: jax.Array) -> jax.Array:
    """`x * cos + rotate_half(x) * sin` in fp32, cast back; cos/sin broadcast over the heads axis. The decoder's
    M-RoPE (`[B, T, N, H]` with `[B, T, H]`) and the vision rotary (`[P, N, H]` with `[P, H]`) alike (transformers
    `apply_multimodal_rotary_pos_emb` / `apply_rotary_pos_emb_vision`)."""
    x32 = x_XNH.astype(jnp.float32)
    out = x32 * cos_XH[..., None, :] + rotate_half(x32) * sin_XH[..., None, :]
    return out.astype(x_XNH.dtype)


# ------------------------------------------------------------------------------------- 2. the decoder's M-RoPE
def mrope_cos_sin(position_ids_ZBT, cfg: Qwen2VLTextConfig):
    """cos/sin `[B, T, head_dim]` in fp32 for 3-axis positions `[3, B, T]`.

    Frequency slot j (of head_dim/2) takes its position from the temporal axis if j < s0, the height axis if
    j < s0 + s1, else the width axis (mrope_section [s0, s1, s2], chunked, not interleaved); slot j + head_dim/2
    repeats slot j for rotate_half. Same numbers as transformers `apply_multimodal_rotary_pos_emb`'s split/cat.
    """
    inv_freq_J = jnp.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta))
    axis_of_slot = np.repeat(np.arange(3), cfg.mrope_section)  # [head_dim/2] static
    pos_BTJ = jnp.moveaxis(position_ids_ZBT, 0, -1)[..., axis_of_slot].astype(jnp.float32)
    angles_BTJ = pos_BTJ * inv_freq_J
    emb_BTH = jnp.concatenate([angles_BTJ, angles_BTJ], axis=-1)
    return jnp.cos(emb_BTH), jnp.sin(emb_BTH)


# ------------------------------------------------------------------------------------- 3. the vision 2-D rotary
def vision_cos_sin(pos_hw_P2, cfg: Qwen2VLVisionConfig):
    """cos/sin `[P, head_dim]` (fp32) for patch positions `[P, 2]` (row, col): angles [h * inv_freq |
    w * inv_freq], duplicated for rotate_half (transformers `VisionRotaryEmbedding` + `rot_pos_emb`)."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg.head_dim // 2, cfg.rope_theta))
    pos = pos_hw_P2.astype(jnp.float32)
    angles = jnp.concatenate([pos[:, :1] * inv_freq, pos[:, 1:] * inv_freq], axis=-1)
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


# ------------------------------------------------------------------------------------- 4. position ids (host)
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
