"""The Qwen2-VL vision tower: patch embed, 2-D rotary ViT blocks with block-diagonal attention, and the merger.

Reference: transformers 4.57 `models/qwen2_vl/modeling_qwen2_vl.py` `Qwen2VisionTransformerPretrainedModel`.

    pixel_values [P, C=1176]  --patch_embed-->  x [P, E=1280]  --32 blocks-->  [P, E]  --merger-->  [P/4, D]

Everything that depends on `grid_thw` (rotary positions in 2x2 merge order, which rows form an attention segment)
is computed on the host in NumPy (`VisionLayout`); the device side is pure jitted math on padded, static shapes:
patch rows are padded to a bucket (buckets.py) and the attention segments (one temporal slice of one image or
video each) are described both as a `[Q, L]` segment-major gather and as (first row, length) bounds
(`attention.VisionSegments`), so attention never crosses images or frames and a new image size only recompiles when
it leaves its bucket. The attention itself is the backend's (`qwen2vl_jax.attention`): on x86 CPUs one fused native
kernel does the rotary and a flash attention per segment.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import VisionSegments, get_attention
from .attention import xla as attention_xla
from .buckets import bucket, pow2_bucket
from .config import Qwen2VLVisionConfig
from .hook_points import HookError, active, install, point, recording, set_call, wants
from .layers import LayerNorm, Linear, heads_axis, in_row_blocks, remat_policy, rope_inv_freq, stack_modules
from .partitioning import Partitioning, constrain
from .partitioning import active as use_partitioning

ROWS_AXES = ("vis_rows", "act_embed")  # [P, E]: patch rows, replicated width (Megatron)
HEADS_AXES = ("vis_rows", "vis_heads", "vis_head_dim")  # [P, N, H]

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
    bounds_Q2: np.ndarray  # int32 [Q_pad, 2]: (first row, length) of each segment; length 0 for padding

    @property
    def padded_patches(self) -> int:
        return self.pos_hw_P2.shape[0]

    @property
    def num_merged(self) -> int:
        return self.num_patches // 4

    def segments(self) -> VisionSegments:
        """The segments as the attention backends take them (NumPy leaves; jit moves them to the device)."""
        return VisionSegments(rows_QL=self.seg_rows_QL, valid_QL=self.seg_valid_QL, row_slot_P=self.row_slot_P,
                              bounds_Q2=self.bounds_Q2)


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


def vision_layout(grid_thw, merge: int = 2, *, patch_bucket=bucket, segment_bucket=bucket,
                  segments_bucket=pow2_bucket) -> VisionLayout:
    grid = check_grid(grid_thw, merge)
    pos = np.concatenate([np.tile(merge_order_positions(h, w, merge), (t, 1)) for t, h, w in grid.tolist()])
    P = pos.shape[0]
    # One attention segment per temporal slice of each image / video (transformers `cu_seqlens` = repeat(h*w, t)).
    seg_len = np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0])
    seg_start = np.concatenate([[0], np.cumsum(seg_len)[:-1]])
    P_pad = patch_bucket(P)
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
    row_slot = np.zeros(P_pad, np.int64)
    seg_of_row = np.repeat(np.arange(len(seg_len)), seg_len)
    row_slot[:P] = seg_of_row * L_pad + (np.arange(P) - seg_start[seg_of_row])
    pos_pad = np.zeros((P_pad, 2), np.int32)
    pos_pad[:P] = pos
    bounds = np.zeros((Q_pad, 2), np.int32)
    bounds[: len(seg_len), 0], bounds[: len(seg_len), 1] = seg_start, seg_len
    return VisionLayout(grid, P, pos_pad, seg_rows.astype(np.int32), seg_valid, row_slot.astype(np.int32), bounds)


# ------------------------------------------------------------------------------------------------- modules
class VisionAttention(nnx.Module):
    """Multi-head attention within segments; q and k get the 2-D rotary inside the backend (which may fuse it).
    Hook points `{name}.q / .k / .v / .probs / .head_out` (`qwen2vl_jax.hook_points`)."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, param_dtype, rngs: nnx.Rngs,
                 attn_implementation: str | None = None, name: str = "vision.blocks.0.attn", layer: int = 0):
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.attn_implementation = attn_implementation
        self.name, self.layer = name, layer
        E, N, H = cfg.embed_dim, cfg.num_heads, cfg.head_dim
        heads = heads_axis("vis_heads", N, "vis_head_dim", H)
        # qkv rows are [3, N, H]: a contiguous split would cut q from k, so they stay whole (`sharding` docstring)
        self.qkv = Linear(E, 3 * E, use_bias=True, axes=((("vis_qkv", 3), *heads), "vis_embed"),
                          param_dtype=param_dtype, rngs=rngs)
        self.proj = Linear(E, E, use_bias=True, axes=("vis_embed", heads), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_PE, cos_PH, sin_PH, segments: VisionSegments):
        P = x_PE.shape[0]
        at = lambda suffix, value: point(f"{self.name}.{suffix}", value, self.layer)
        # qkv output features are [q | k | v], each head-major (transformers `VisionAttention.forward`).
        qkv_P3NH = self.qkv(x_PE).reshape(P, 3, self.num_heads, self.head_dim)
        q_PNH, k_PNH, v_PNH = (constrain(qkv_P3NH[:, i], HEADS_AXES) for i in range(3))
        if any(wants(f"{self.name}.{s}") for s in ("q", "k", "v", "probs")):  # the xla formulation, in the open
            q_PNH, k_PNH = attention_xla.rotate_qk(q_PNH, k_PNH, cos_PH, sin_PH)
            q_PNH, k_PNH, v_PNH = at("q", q_PNH), at("k", k_PNH), at("v", v_PNH)
            if wants(f"{self.name}.probs"):
                probs_QNLL = at("probs", attention_xla.segment_probs(q_PNH, k_PNH, segments))
                o_PNH = attention_xla.segment_probs_times_values(probs_QNLL, v_PNH, segments)
            else:
                o_PNH = attention_xla.segment_attention(q_PNH, k_PNH, v_PNH, segments)
        else:
            o_PNH = get_attention(self.attn_implementation).vision(q_PNH, k_PNH, v_PNH, cos_PH, sin_PH, segments)
        return self.proj(at("head_out", constrain(o_PNH, HEADS_AXES)).reshape(P, -1))


class VisionMLP(nnx.Module):
    def __init__(self, cfg: Qwen2VLVisionConfig, *, param_dtype, rngs: nnx.Rngs, name: str = "vision.blocks.0.mlp",
                 layer: int = 0):
        E, F = cfg.embed_dim, cfg.mlp_dim
        self.name, self.layer = name, layer
        self.fc1 = Linear(E, F, use_bias=True, axes=("vis_mlp", "vis_embed"), param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Linear(F, E, use_bias=True, axes=("vis_embed", "vis_mlp"), param_dtype=param_dtype, rngs=rngs)

    def _act(self, x_PE):
        h = self.fc1(x_PE)
        return h * jax.nn.sigmoid(1.702 * h)  # QuickGELU (transformers `activations.QuickGELUActivation`)

    def __call__(self, x_PE):
        # a large image (65k patches: fp32 [P, 5120] products of 1.3 GB) runs in row blocks (`in_row_blocks`)
        if self.fc1.lora is None and self.fc2.lora is None and not wants(f"{self.name}.act"):
            return in_row_blocks(lambda x: self.fc2(self._act(x)), x_PE)
        return self.fc2(point(f"{self.name}.act", self._act(x_PE), self.layer))


class VisionBlock(nnx.Module):
    """Pre-LN ViT block: x + attn(norm1(x)), then x + mlp(norm2(x)). Hook points `vision.blocks.{i}.resid_pre /
    attn_out / resid_mid / mlp_out / resid_post` (+ the attention's and the MLP's)."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, param_dtype, rngs: nnx.Rngs,
                 attn_implementation: str | None = None, layer: int = 0):
        E, eps = cfg.embed_dim, cfg.layer_norm_eps
        self.name, self.layer = f"vision.blocks.{layer}", layer
        self.norm1 = LayerNorm(E, eps=eps, axis_name="vis_embed", param_dtype=param_dtype)
        self.norm2 = LayerNorm(E, eps=eps, axis_name="vis_embed", param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, param_dtype=param_dtype, rngs=rngs, attn_implementation=attn_implementation,
                                    name=f"{self.name}.attn", layer=layer)
        self.mlp = VisionMLP(cfg, param_dtype=param_dtype, rngs=rngs, name=f"{self.name}.mlp", layer=layer)

    def __call__(self, x_PE, cos_PH, sin_PH, segments: VisionSegments):
        at = lambda suffix, value: point(f"{self.name}.{suffix}", value, self.layer)
        x_PE = at("resid_pre", x_PE)
        attn_out = self.attn(self.norm1(x_PE), cos_PH, sin_PH, segments)
        x_PE = at("resid_mid", constrain(x_PE + at("attn_out", attn_out), ROWS_AXES))
        return constrain(at("resid_post", x_PE + at("mlp_out", self.mlp(self.norm2(x_PE)))), ROWS_AXES)


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
        x = constrain(self.ln_q(x_PE).reshape(-1, self.merge_dim), ("vis_rows", "act_embed"))
        return constrain(self.fc2(jax.nn.gelu(self.fc1(x), approximate=False)), ("vis_rows", "act_embed"))


class VisionTransformer(nnx.Module):
    """`Qwen2VisionTransformerPretrainedModel`: call it with `(pixel_values, grid_thw)` like `model.visual`."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 attn_implementation: str | None = None, scan_layers: bool = False):
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg, param_dtype=param_dtype, rngs=rngs)
        blocks = [VisionBlock(cfg, param_dtype=param_dtype, rngs=rngs, attn_implementation=attn_implementation,
                              layer=i) for i in range(cfg.depth)]
        # scan_layers: one VisionBlock whose parameters are stacked [depth, ...] (run by `jax.lax.scan`)
        self.blocks = stack_modules(blocks) if scan_layers else nnx.List(blocks)
        self.scan_layers = scan_layers
        self.merger = PatchMerger(cfg, param_dtype=param_dtype, rngs=rngs)
        self.remat: str | None = None  # a `config.REMAT_POLICIES` name: rematerialise each block (training)
        self.partitioning: Partitioning | None = None  # set by `sharding.set_partitioning`

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

    def forward(self, pixels_PC, pos_hw_P2, segments: VisionSegments, *, output_hidden_states=False):
        """The pure math on padded inputs: merged features `[P_pad/4, D]` (+ per-block hidden states)."""
        with use_partitioning(self.partitioning):
            return self._forward(pixels_PC, pos_hw_P2, segments, output_hidden_states)

    def _forward(self, pixels_PC, pos_hw_P2, segments: VisionSegments, output_hidden_states):
        cos_PH, sin_PH = self.rotary(pos_hw_P2)
        if active():  # what hooks are told: the real patch rows (padding rows belong to no segment)
            valid_P = jnp.zeros(pixels_PC.shape[0], bool).at[segments.rows_QL].max(segments.valid_QL)
            set_call("vision", valid=valid_P, position_ids=pos_hw_P2)
        x_PE = point("vision.patch_embed", constrain(self.patch_embed(pixels_PC.astype(self.dtype)), ROWS_AXES))
        if self.scan_layers:
            x_PE, hidden = self._scan(x_PE, cos_PH, sin_PH, segments, output_hidden_states)
            return point("vision.merger.out", self.merger(x_PE)), hidden
        hidden = []
        for block in self.blocks:
            if self.remat is not None and not recording():  # jax.checkpoint per block (training)
                x_PE = _remat_block(self.remat)(block, x_PE, cos_PH, sin_PH, segments)
            else:
                x_PE = block(x_PE, cos_PH, sin_PH, segments)
            if output_hidden_states:
                hidden.append(x_PE)
        return point("vision.merger.out", self.merger(x_PE)), tuple(hidden)

    def _scan(self, x_PE, cos_PH, sin_PH, segments, output_hidden_states):
        """The blocks as one `jax.lax.scan` over the stacked parameters; hidden states come back stacked."""
        if active():
            raise HookError("hook points name each block, and a scan_layers=True model runs one block for all of "
                            "them: load with scan_layers=False to use hooks")
        graphdef, params = nnx.split(self.blocks)

        def body(x, block_params):
            block = nnx.merge(graphdef, block_params)
            if self.remat is not None:
                y = _remat_block(self.remat)(block, x, cos_PH, sin_PH, segments)
            else:
                y = block(x, cos_PH, sin_PH, segments)
            return y, (y if output_hidden_states else None)

        x_PE, hidden_L = jax.lax.scan(body, x_PE, params)
        return x_PE, (tuple(hidden_L) if output_hidden_states else ())

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

    def run_padded(self, pixels, layout: VisionLayout, *, output_hidden_states: bool = False):
        """Run the jitted tower on already padded rows (from `prepare`): (features, hidden states)."""
        merged, hidden, _ = _vision_jit(self, pixels, layout.pos_hw_P2, layout.segments(),
                                        output_hidden_states=output_hidden_states)
        return merged, hidden

    def run_hooked(self, pixels, layout: VisionLayout, hooks):
        """`run_padded` with a `hook_points.HookSet` active: (padded features, {name: value}) with the recorded
        values cut to the real rows (`trim_records`)."""
        merged, _, records = _vision_jit(self, pixels, layout.pos_hw_P2, layout.segments(), hooks)
        return merged, trim_records(records, layout)

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


@functools.cache
def _remat_block(policy: str):
    return nnx.remat(lambda block, x, cos, sin, segments: block(x, cos, sin, segments), policy=remat_policy(policy))


def trim_records(records: dict, layout: VisionLayout) -> dict:
    """Recorded vision values without the bucket padding: patch rows `[:P]`, merged rows `[:M]`, and attention
    probabilities as one `[N, L, L]` array per segment (its real rows and keys, in row order)."""
    out = {}
    for name, value in records.items():
        if name.endswith(".attn.probs"):
            out[name] = tuple(value[q, :, :n, :n] for q, n in enumerate(layout.bounds_Q2[:, 1]) if n > 0)
        elif name == "vision.merger.out":
            out[name] = value[: layout.num_merged]
        else:
            out[name] = value[: layout.num_patches]
    return out


def _vision_apply(visual: VisionTransformer, pixels, pos, segments, hooks=None, *, output_hidden_states=False):
    TRACE_COUNTS["vision"] += 1  # runs once per compile
    with install(hooks) as run:
        merged, hidden = visual.forward(pixels, pos, segments, output_hidden_states=output_hidden_states)
    return merged, hidden, run.records


_vision_jit = jax.jit(_vision_apply, static_argnames=("output_hidden_states",))
