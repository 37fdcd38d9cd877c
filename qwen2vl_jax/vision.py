"""The Qwen2-VL vision tower: patch embed, 2-D rotary ViT blocks with block-diagonal attention, and the merger.

Reference: TF457 `modeling_qwen2_vl.py` `Qwen2VisionTransformerPretrainedModel` (reference §3).

    pixel_values [P, C=1176]  --patch_embed-->  x [P, E=1280]  --32 blocks-->  [P, E]  --merger-->  [P/4, D]

Everything that depends on `grid_thw` (rotary positions in 2x2 merge order, which rows form an attention segment)
is computed on the host in NumPy (`VisionLayout`); the device side is pure jitted math on padded, static shapes:
patch rows are padded to a bucket (buckets.py) and each attention segment (one temporal slice of one image or
video) is gathered into a `[Q, L]` segment-major layout, so attention never crosses images or frames and a new
image size only recompiles when it leaves its bucket. On x86 CPUs the rotary and the attention run in one fused
native kernel (`cpu_kernels.segment_attention`, flash-attention style) that reads only each segment's (first row,
length).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import cpu_kernels
from .buckets import bucket, pow2_bucket
from .config import Qwen2VLVisionConfig
from .layers import LayerNorm, Linear, rope_inv_freq, rotate_half, sow

# Queries attend in chunks of this many rows: the [heads, chunk, keys] scores then stay in cache for the softmax
# passes (1.5x faster attention than one [heads, L, L] buffer for a 1024-patch image), and memory stays bounded.
_QUERY_CHUNK = 256

# Trace counter: the body of a jitted function runs in Python once per compile, so tests can count compiles.
TRACE_COUNTS: dict[str, int] = {"vision": 0}


# ---------------------------------------------------------------------------------------------- host layout
@dataclasses.dataclass(frozen=True)
class VisionLayout:
    """Host-side (NumPy) description of one vision call: positions, attention segments and padding."""

    grid_thw: np.ndarray  # [n, 3] (t, h, w) in patches
    num_patches: int  # P: real patch rows
    pos_hw_P2: np.ndarray  # int32 [P_pad, 2]: (row, col) of each patch, 2x2 merge-block order
    seg_rows_QL: np.ndarray  # int32 [Q_pad, L_pad]: patch row of each slot of each segment
    seg_valid_QL: np.ndarray  # bool  [Q_pad, L_pad]
    row_slot_P: np.ndarray  # int32 [P_pad]: flat slot (q * L_pad + l) holding each patch row

    @property
    def padded_patches(self) -> int:
        return self.pos_hw_P2.shape[0]

    @property
    def num_merged(self) -> int:
        return self.num_patches // 4

    def device_arrays(self) -> tuple[np.ndarray, ...]:
        return self.pos_hw_P2, self.seg_rows_QL, self.seg_valid_QL, self.row_slot_P


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
    """`[h*w, 2]` (row, col) of each patch in the processor's 2x2 block order (reference §3 step 2)."""
    hpos = np.broadcast_to(np.arange(h)[:, None], (h, w))
    wpos = np.broadcast_to(np.arange(w)[None, :], (h, w))
    reorder = lambda a: a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
    return np.stack([reorder(hpos), reorder(wpos)], axis=-1)


def vision_layout(grid_thw, merge: int = 2, *, patch_bucket=bucket, segment_bucket=bucket,
                  segments_bucket=pow2_bucket) -> VisionLayout:
    grid = check_grid(grid_thw, merge)
    pos = np.concatenate([np.tile(merge_order_positions(h, w, merge), (t, 1)) for t, h, w in grid.tolist()])
    P = pos.shape[0]
    # One attention segment per temporal slice of each image / video (TF457 cu_seqlens = repeat(h*w, t)).
    seg_len = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    seg_start = np.concatenate([[0], np.cumsum(seg_len)[:-1]])
    P_pad = patch_bucket(P)
    L_pad = segment_bucket(int(seg_len.max()))
    if L_pad > _QUERY_CHUNK:
        L_pad = -(-L_pad // _QUERY_CHUNK) * _QUERY_CHUNK
    Q_pad = segments_bucket(len(seg_len))
    offsets = np.arange(L_pad)
    seg_valid = np.zeros((Q_pad, L_pad), bool)
    seg_valid[: len(seg_len)] = offsets[None, :] < seg_len[:, None]
    seg_rows = np.zeros((Q_pad, L_pad), np.int64)
    seg_rows[: len(seg_len)] = seg_start[:, None] + offsets[None, :]
    seg_rows = np.where(seg_valid, seg_rows, 0)
    row_slot = np.zeros(P_pad, np.int64)
    seg_of_row = np.repeat(np.arange(len(seg_len)), seg_len)
    row_slot[:P] = seg_of_row * L_pad + (np.arange(P) - seg_start[seg_of_row])
    pos_pad = np.zeros((P_pad, 2), np.int32)
    pos_pad[:P] = pos
    return VisionLayout(grid, P, pos_pad, seg_rows.astype(np.int32), seg_valid, row_slot.astype(np.int32))


# ------------------------------------------------------------------------------------------------- modules
def xla_segment_attention(q_PNH, k_PNH, v_PNH, seg_rows_QL, seg_valid_QL, row_slot_P):
    """Non-causal softmax attention inside each segment only (the reference's per-`cu_seqlens` chunks), in XLA ops:
    every platform's path, and the CPU kernel's reference and gradient."""
    P, N, H = q_PNH.shape
    L = seg_rows_QL.shape[1]
    scale = H**-0.5
    chunk = L if L <= _QUERY_CHUNK or L % _QUERY_CHUNK else _QUERY_CHUNK

    def attend_chunk(q_CNH, k_LNH, v_LNH, valid_L):
        s_NCL = jnp.einsum("CNH,LNH->NCL", q_CNH, k_LNH, preferred_element_type=jnp.float32) * scale
        s_NCL = jnp.where(valid_L[None, None, :], s_NCL, jnp.finfo(jnp.float32).min)
        p_NCL = jax.nn.softmax(s_NCL, axis=-1).astype(v_LNH.dtype)  # softmax in fp32, probs in the act. dtype
        return jnp.einsum("NCL,LNH->CNH", p_NCL, v_LNH, preferred_element_type=jnp.float32).astype(v_LNH.dtype)

    def attend_segment(segment):
        rows_L, valid_L = segment
        q_LNH, k_LNH, v_LNH = q_PNH[rows_L], k_PNH[rows_L], v_PNH[rows_L]
        if chunk == L:
            return attend_chunk(q_LNH, k_LNH, v_LNH, valid_L)
        q_chunks = q_LNH.reshape(L // chunk, chunk, N, H)
        out = jax.lax.map(lambda q_CNH: attend_chunk(q_CNH, k_LNH, v_LNH, valid_L), q_chunks)
        return out.reshape(L, N, H)

    def maybe_attend(segment):  # padded segments (no valid slot) are skipped
        return jax.lax.cond(segment[1][0], attend_segment, lambda s: jnp.zeros((L, N, H), v_PNH.dtype), segment)

    if seg_rows_QL.shape[0] == 1:  # one image: no loop over segments (the loop and its cond cost ~20%)
        o_QLNH = attend_segment((seg_rows_QL[0], seg_valid_QL[0]))[None]
    else:
        o_QLNH = jax.lax.map(maybe_attend, (seg_rows_QL, seg_valid_QL))
    return o_QLNH.reshape(-1, N, H)[row_slot_P]


def apply_vision_rotary(x_PNH, cos_PH, sin_PH):
    """q/k rotation in fp32, cast back (TF457 apply_rotary_pos_emb_vision)."""
    x32 = x_PNH.astype(jnp.float32)
    out = x32 * cos_PH[:, None, :] + rotate_half(x32) * sin_PH[:, None, :]
    return out.astype(x_PNH.dtype)


def xla_rotary_attention(q_PNH, k_PNH, v_PNH, cos_PH, sin_PH, seg_rows_QL, seg_valid_QL, row_slot_P):
    """Rotary on q and k, then attention inside each segment, in XLA ops (the kernel's reference and gradient)."""
    q_PNH, k_PNH = apply_vision_rotary(q_PNH, cos_PH, sin_PH), apply_vision_rotary(k_PNH, cos_PH, sin_PH)
    return xla_segment_attention(q_PNH, k_PNH, v_PNH, seg_rows_QL, seg_valid_QL, row_slot_P)


@jax.custom_vjp
def _kernel_rotary_attention(q_PNH, k_PNH, v_PNH, cos_PH, sin_PH, seg_rows_QL, seg_valid_QL, row_slot_P):
    """The fused CPU kernel (`csrc/segment_attention.cc`: rotary, then attention, fp32 inside) on the segments."""
    seg_Q2 = jnp.stack([seg_rows_QL[:, 0], seg_valid_QL.sum(axis=1)], axis=1)  # (first row, length); 0 = padding
    o_PNH = cpu_kernels.segment_attention(q_PNH, k_PNH, v_PNH, seg_Q2, q_PNH.shape[-1] ** -0.5, cos_PH, sin_PH)
    return o_PNH.astype(v_PNH.dtype)


def _kernel_fwd(*args):
    return _kernel_rotary_attention(*args), args


def _kernel_bwd(args, g_PNH):  # gradients through the XLA formulation (the kernel is inference-only)
    _, pullback = jax.vjp(lambda q, k, v: xla_rotary_attention(q, k, v, *args[3:]), *args[:3])
    return (*pullback(g_PNH), None, None, None, None, None)


_kernel_rotary_attention.defvjp(_kernel_fwd, _kernel_bwd)


def rotary_segment_attention(q_PNH, k_PNH, v_PNH, cos_PH, sin_PH, seg_rows_QL, seg_valid_QL, row_slot_P):
    """Rotary on q and k, then softmax attention inside each segment only: one fused kernel on x86 CPUs (2.2x
    the XLA ops, docs/BENCHMARKS.md), the XLA formulation elsewhere. Same math; the kernel stays in fp32 (a bf16
    model's rotated q and k are not rounded back to bf16 there)."""
    args = (q_PNH, k_PNH, v_PNH, cos_PH, sin_PH, seg_rows_QL, seg_valid_QL, row_slot_P)
    if q_PNH.shape[-1] % 8 or not cpu_kernels.available():
        return xla_rotary_attention(*args)
    return jax.lax.platform_dependent(*args, cpu=_kernel_rotary_attention, default=xla_rotary_attention)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: Qwen2VLVisionConfig, *, param_dtype, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        E = cfg.embed_dim
        self.qkv = Linear(E, 3 * E, use_bias=True, axes=("vis_qkv", "vis_embed"), param_dtype=param_dtype, rngs=rngs)
        self.proj = Linear(E, E, use_bias=True, axes=("vis_embed", "vis_heads"), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_PE, cos_PH, sin_PH, seg_rows_QL, seg_valid_QL, row_slot_P):
        P = x_PE.shape[0]
        # qkv output features are [q | k | v], each head-major (reference §3 step 5).
        qkv_P3NH = self.qkv(x_PE).reshape(P, 3, self.num_heads, self.head_dim)
        q_PNH, k_PNH, v_PNH = qkv_P3NH[:, 0], qkv_P3NH[:, 1], qkv_P3NH[:, 2]
        o_PNH = rotary_segment_attention(q_PNH, k_PNH, v_PNH, cos_PH, sin_PH, seg_rows_QL, seg_valid_QL, row_slot_P)
        return self.proj(o_PNH.reshape(P, -1))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: Qwen2VLVisionConfig, *, param_dtype, rngs: nnx.Rngs):
        E, F = cfg.embed_dim, cfg.mlp_dim
        self.fc1 = Linear(E, F, use_bias=True, axes=("vis_mlp", "vis_embed"), param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Linear(F, E, use_bias=True, axes=("vis_embed", "vis_mlp"), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_PE):
        h = self.fc1(x_PE)
        h = h * jax.nn.sigmoid(1.702 * h)  # QuickGELU (TF457 activations.QuickGELUActivation)
        return self.fc2(h)


class VisionBlock(nnx.Module):
    """Pre-LN ViT block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, param_dtype, rngs: nnx.Rngs):
        E, eps = cfg.embed_dim, cfg.layer_norm_eps
        self.norm1 = LayerNorm(E, eps=eps, axis_name="vis_embed", param_dtype=param_dtype)
        self.norm2 = LayerNorm(E, eps=eps, axis_name="vis_embed", param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.mlp = VisionMLP(cfg, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_PE, cos_PH, sin_PH, seg_rows_QL, seg_valid_QL, row_slot_P):
        x_PE = x_PE + self.attn(self.norm1(x_PE), cos_PH, sin_PH, seg_rows_QL, seg_valid_QL, row_slot_P)
        x_PE = x_PE + self.mlp(self.norm2(x_PE))
        sow(self, "hidden", x_PE)
        return x_PE


class PatchEmbed(nnx.Module):
    """Conv3d(3, E, kernel=stride=(2,14,14), no bias) == a matmul over the (C, T, P, P)-ordered patch rows."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, param_dtype, rngs: nnx.Rngs):
        self.proj = Linear(cfg.patch_dim, cfg.embed_dim, use_bias=False, axes=("vis_embed", "vis_patch"),
                           param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixels_PC):
        return self.proj(pixels_PC)


class PatchMerger(nnx.Module):
    """LayerNorm, concatenate each 2x2 block (4 consecutive rows), Linear, exact GELU, Linear to the LM width."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, param_dtype, rngs: nnx.Rngs):
        M = cfg.merge_dim
        self.ln_q = LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps, axis_name="vis_embed", param_dtype=param_dtype)
        self.fc1 = Linear(M, M, use_bias=True, axes=("vis_merge", "vis_merge_in"), param_dtype=param_dtype,
                          rngs=rngs)
        self.fc2 = Linear(M, cfg.hidden_size, use_bias=True, axes=("embed", "vis_merge"), param_dtype=param_dtype,
                          rngs=rngs)
        self.merge_dim = M

    def __call__(self, x_PE):
        x = self.ln_q(x_PE).reshape(-1, self.merge_dim)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTransformer(nnx.Module):
    """`Qwen2VisionTransformerPretrainedModel`: call it with `(pixel_values, grid_thw)` like `model.visual`."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg, param_dtype=param_dtype, rngs=rngs)
        self.blocks = nnx.List([VisionBlock(cfg, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, param_dtype=param_dtype, rngs=rngs)

    @property
    def dtype(self):
        return self.patch_embed.proj.weight.dtype

    def rotary(self, pos_hw_P2):
        """cos/sin `[P, head_dim]` (fp32): angles [h * inv_freq | w * inv_freq], duplicated for rotate_half."""
        inv_freq = jnp.asarray(rope_inv_freq(self.config.head_dim // 2, self.config.rope_theta))
        pos = pos_hw_P2.astype(jnp.float32)
        angles = jnp.concatenate([pos[:, :1] * inv_freq, pos[:, 1:] * inv_freq], axis=-1)
        emb = jnp.concatenate([angles, angles], axis=-1)
        return jnp.cos(emb), jnp.sin(emb)

    def forward(self, pixels_PC, pos_hw_P2, seg_rows_QL, seg_valid_QL, row_slot_P, *, output_hidden_states=False):
        """The pure math on padded inputs: merged features `[P_pad/4, D]` (+ per-block hidden states)."""
        cos_PH, sin_PH = self.rotary(pos_hw_P2)
        x_PE = self.patch_embed(pixels_PC.astype(self.dtype))
        hidden = []
        for block in self.blocks:
            x_PE = block(x_PE, cos_PH, sin_PH, seg_rows_QL, seg_valid_QL, row_slot_P)
            if output_hidden_states:
                hidden.append(x_PE)
        return self.merger(x_PE), tuple(hidden)

    def prepare(self, pixel_values, grid_thw) -> tuple[np.ndarray, VisionLayout]:
        """Validate on the host and pad the patch rows to their bucket."""
        cfg = self.config
        layout = vision_layout(grid_thw, cfg.spatial_merge_size)
        shape = tuple(getattr(pixel_values, "shape", ()))
        if len(shape) != 2 or shape[1] != cfg.patch_dim:
            raise ValueError(f"pixel_values must be [num_patches, {cfg.patch_dim}] (C*T*P*P = {cfg.in_channels}*"
                             f"{cfg.temporal_patch_size}*{cfg.patch_size}*{cfg.patch_size}), got shape {shape}")
        if shape[0] != layout.num_patches:
            raise ValueError(f"pixel_values has {shape[0]} rows but grid_thw {layout.grid_thw.tolist()} "
                             f"describes sum(t*h*w) = {layout.num_patches} patches")
        pixels = np.asarray(pixel_values)
        padded = np.zeros((layout.padded_patches, cfg.patch_dim), pixels.dtype)
        padded[: layout.num_patches] = pixels
        return padded, layout

    def encode_padded(self, pixel_values, grid_thw, *, output_hidden_states: bool = False):
        """Jitted encode on bucketed shapes: (features `[P_pad/4, D]`, hidden states, layout); rows past
        `layout.num_merged` are padding."""
        pixels, layout = self.prepare(pixel_values, grid_thw)
        merged, hidden = self.run_padded(pixels, layout, output_hidden_states=output_hidden_states)
        return merged, hidden, layout

    def run_padded(self, pixels, layout: VisionLayout, *, output_hidden_states: bool = False,
                   capture: bool | None = None):
        """Run the jitted tower on already padded rows (from `prepare`)."""
        if capture is None:
            capture = getattr(self, "__captures__", None) is not None
        fn = _vision_capture if capture else _vision_jit
        return fn(self, pixels, *layout.device_arrays(), output_hidden_states=output_hidden_states)

    def __call__(self, pixel_values, grid_thw, *, output_hidden_states: bool = False):
        """Merged vision features `[sum(t*h*w)/4, D]` (a jax Array), like the reference's `model.visual`.

        With `output_hidden_states=True`, returns `(features, hidden_states)` where hidden_states holds each
        block's output `[sum(t*h*w), E]`.
        """
        merged, hidden, layout = self.encode_padded(pixel_values, grid_thw, output_hidden_states=output_hidden_states)
        merged = merged[: layout.num_merged]
        if output_hidden_states:
            return merged, tuple(h[: layout.num_patches] for h in hidden)
        return merged


def _vision_apply(visual: VisionTransformer, pixels, pos, seg_rows, seg_valid, row_slot, *, output_hidden_states):
    TRACE_COUNTS["vision"] += 1  # runs once per compile
    return visual.forward(pixels, pos, seg_rows, seg_valid, row_slot, output_hidden_states=output_hidden_states)


_vision_jit = jax.jit(_vision_apply, static_argnames=("output_hidden_states",))
# Under nnx.capture, nnx.jit carries the sown intermediates back out (jax.jit would drop them).
_vision_capture = nnx.jit(functools.partial(_vision_apply), static_argnames=("output_hidden_states",))
