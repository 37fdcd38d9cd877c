"""The vision tower of both families: patch embed, 2-D rotary ViT blocks with block-diagonal attention, the merger.

Reference: transformers 4.57 `models/qwen2_vl/modeling_qwen2_vl.py` `Qwen2VisionTransformerPretrainedModel` and
`models/qwen2_5_vl/modeling_qwen2_5_vl.py` `Qwen2_5_VisionTransformerPretrainedModel`.

    pixel_values [P, C=1176]  --patch_embed-->  x [P, E=1280]  --32 blocks-->  [P, E]  --merger-->  [P/4, D]

Everything that depends on `grid_thw` (rotary positions in 2x2 merge order, which rows form an attention segment)
is computed on the host in NumPy (`vision_layout.py`); the device side is pure jitted math on padded, static shapes:
patch rows are padded to a bucket (buckets.py) and the attention segments (one temporal slice of one image or
video each) are described both as a `[Q, L]` segment-major gather and as (first row, length) bounds
(`attention.VisionSegments`), so attention never crosses images or frames and a new image size only recompiles when
it leaves its bucket. The attention itself is the backend's (`qwen2vl_jax.attention`): on x86 CPUs one fused native
kernel does the rotary and a flash attention per segment.

Qwen2.5-VL (`config.model_type == "qwen2_5_vl"`) changes three things on the same modules: RMSNorm instead of
LayerNorm, a SwiGLU MLP (gate / up / down, with biases), and window attention. As in the reference, the rows are
put in window order on the host (`window_index`: each frame's merged tokens grouped into windows of
`window_size` px, partial at the right / bottom edges), so that both a window and a whole frame are contiguous rows:
window blocks attend within `WindowedSegments.windows`, the blocks in `fullatt_block_indexes` within
`WindowedSegments.full` (one segment per frame), and the merged tokens are put back in prompt order at the end
(`restore_M`). Hook points see the rows in that window order; `__call__`'s hidden states are given back in the
processor's row order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..attention import VisionRotary, VisionSegments, get_attention
from . import programs
from .config import Qwen2VLVisionConfig
from .hook_points import HookError, active, point, recording, set_call
from .layers import LayerNorm, Linear, RMSNorm, rowwise
from .module import Block, MLPBlock, checkpointed
from .parameters import heads_axis, stack_modules
from .partitioning import Partitioning, constrain
from .partitioning import active as use_partitioning
from .rope import apply_rotary, vision_cos_sin
from .vision_layout import VisionLayout, WindowedSegments, prepare_pixels, trim_records

ROWS_AXES = ("vis_rows", "act_embed")  # [P, E]: patch rows, replicated width (Megatron)
HEADS_AXES = ("vis_rows", "vis_heads", "vis_head_dim")  # [P, N, H]


def residual(x_PE):
    """The residual stream as the mesh lays it out (rows, replicated width) wherever a norm reads it (see
    `text.residual`). No mesh, no op."""
    return constrain(x_PE, ROWS_AXES)


class VisionAttention(Block):
    """Multi-head attention within segments (transformers `VisionAttention.forward`):

        q, k, v = split(W_qkv x + b_qkv)              (features [q | k | v], each head-major)
        o = softmax(rot(q) rot(k)^T / sqrt(H)) v       within each segment (one frame of one image or video)
        out = W_proj o + b_proj

    The 2-D rotary `rot` goes to the backend with q and k (`attention.VisionRotary`), which may fuse it. Hook points
    `{name}.q / .k` (after the rotary) `/ .v / .probs / .head_out`."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, param_dtype, rngs: nnx.Rngs, name: str, layer: int,
                 attn_implementation: str | None = None):
        self.place(name, layer)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.attn_implementation = attn_implementation
        E, N, H = cfg.embed_dim, cfg.num_heads, cfg.head_dim
        heads = heads_axis("vis_heads", N, "vis_head_dim", H)
        # qkv rows are [3, N, H]: a contiguous split would cut q from k, so they stay whole (`sharding` docstring)
        self.qkv = Linear(E, 3 * E, use_bias=True, axes=((("vis_qkv", 3), *heads), "vis_embed"),
                          param_dtype=param_dtype, rngs=rngs)
        self.proj = Linear(E, E, use_bias=True, axes=("vis_embed", heads), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_PE, rotary: VisionRotary, segments: VisionSegments):
        q_PNH, k_PNH, v_PNH = self.split_heads(self.qkv(x_PE))
        if self.hooked("q", "k", "v", "probs"):  # hooks read q and k as attended: rotate them here
            q_PNH, k_PNH, rotary = rotary(q_PNH), rotary(k_PNH), None
        q_PNH, k_PNH, v_PNH = self.hook("q", q_PNH), self.hook("k", k_PNH), self.hook("v", v_PNH)
        o_PNH = self.attend(q_PNH, k_PNH, v_PNH, rotary, segments)
        return self.proj(self.hook("head_out", o_PNH).reshape(x_PE.shape[0], -1))

    def split_heads(self, qkv_PF):
        """q, k, v `[P, N, H]` from the fused projection's `[P, 3 * N * H]` ([q | k | v], each head-major)."""
        qkv_P3NH = qkv_PF.reshape(qkv_PF.shape[0], 3, self.num_heads, self.head_dim)
        return tuple(constrain(qkv_P3NH[:, i], HEADS_AXES) for i in range(3))

    def attend(self, q_PNH, k_PNH, v_PNH, rotary: VisionRotary | None, segments: VisionSegments):
        """The backend's attention within segments (`rotary`: still to apply to q and k, or None); its
        probabilities capability when `.probs` is hooked or recorded."""
        backend = get_attention(self.attn_implementation)
        if self.hooked("probs"):
            o_PNH, _ = backend.vision_probs(q_PNH, k_PNH, v_PNH, rotary, segments, lambda p: self.hook("probs", p))
        else:
            o_PNH = backend.vision(q_PNH, k_PNH, v_PNH, rotary, segments)
        return constrain(o_PNH, HEADS_AXES)


class VisionMLP(MLPBlock):
    """Qwen2-VL's `VisionMlp`: fc2(QuickGELU(fc1(x))). Hook point `{name}.act` (fed to fc2)."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, param_dtype, rngs: nnx.Rngs, name: str, layer: int):
        self.place(name, layer)
        kw = dict(use_bias=True, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(cfg.embed_dim, cfg.mlp_dim, axes=("vis_mlp", "vis_embed"), **kw)
        self.fc2 = Linear(cfg.mlp_dim, cfg.embed_dim, axes=("vis_embed", "vis_mlp"), **kw)

    def __call__(self, x_PE):
        h_PF = self.fc1(x_PE)
        act_PF = self.hook("act", h_PF * jax.nn.sigmoid(1.702 * h_PF))  # QuickGELU (transformers `activations`)
        return self.fc2(act_PF)

    def projections(self) -> tuple:  # a 65k-patch image's fp32 [P, 5120] products are 1.3 GB: row blocks
        return self.fc1, self.fc2


class VisionGatedMLP(MLPBlock):
    """Qwen2.5-VL's `Qwen2_5_VLMLP(config, bias=True)`: down_proj(silu(gate_proj(x)) * up_proj(x)), every
    projection with a bias. Hook point `{name}.act` (fed to down_proj)."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, param_dtype, rngs: nnx.Rngs, name: str, layer: int):
        self.place(name, layer)
        E, F = cfg.embed_dim, cfg.mlp_dim
        kw = dict(use_bias=True, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(E, F, axes=("vis_mlp", "vis_embed"), **kw)
        self.up_proj = Linear(E, F, axes=("vis_mlp", "vis_embed"), **kw)
        self.down_proj = Linear(F, E, axes=("vis_embed", "vis_mlp"), **kw)

    def __call__(self, x_PE):
        act_PF = self.hook("act", jax.nn.silu(self.gate_proj(x_PE)) * self.up_proj(x_PE))
        return self.down_proj(act_PF)

    def projections(self) -> tuple:
        return self.gate_proj, self.up_proj, self.down_proj


def _norm(cfg: Qwen2VLVisionConfig, param_dtype):
    """The blocks' and the merger's norm: Qwen2RMSNorm (Qwen2.5-VL) or LayerNorm (Qwen2-VL), eps 1e-6 both."""
    if cfg.rms_norm:
        return RMSNorm(cfg.embed_dim, eps=cfg.layer_norm_eps, axis_name="vis_embed", param_dtype=param_dtype)
    return LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps, axis_name="vis_embed", param_dtype=param_dtype)


class VisionBlock(Block):
    """Pre-norm ViT block (transformers `Qwen2VLVisionBlock` / `Qwen2_5_VLVisionBlock`). Hook points
    `vision.blocks.{i}.resid_pre / attn_out / resid_mid / mlp_out / resid_post` (+ the attention's and the MLP's)."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, param_dtype, rngs: nnx.Rngs, layer: int,
                 attn_implementation: str | None = None):
        self.place(f"vision.blocks.{layer}", layer)
        self.norm1 = _norm(cfg, param_dtype)
        self.norm2 = _norm(cfg, param_dtype)
        self.attn = VisionAttention(cfg, param_dtype=param_dtype, rngs=rngs, name=f"{self.name}.attn", layer=layer,
                                    attn_implementation=attn_implementation)
        mlp = VisionGatedMLP if cfg.gated_mlp else VisionMLP
        self.mlp = mlp(cfg, param_dtype=param_dtype, rngs=rngs, name=f"{self.name}.mlp", layer=layer)

    def __call__(self, x_PE, rotary: VisionRotary, segments: VisionSegments):
        """x = x + attn(norm1(x));  x = x + mlp(norm2(x))."""
        x_PE = self.hook("resid_pre", x_PE)
        attn_PE = self.hook("attn_out", self.attn(self.norm1(x_PE), rotary, segments))
        x_PE = self.hook("resid_mid", residual(x_PE + attn_PE))
        mlp_PE = self.hook("mlp_out", rowwise(self.mlp, self.norm2(x_PE)))
        x_PE = self.hook("resid_post", x_PE + mlp_PE)
        return residual(x_PE)


class PatchEmbed(nnx.Module):
    """Conv3d(3, E, kernel=stride=(2,14,14), no bias) == a matmul over the (C, T, P, P)-ordered patch rows."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, param_dtype, rngs: nnx.Rngs):
        self.proj = Linear(cfg.patch_dim, cfg.embed_dim, use_bias=False, axes=("vis_embed", "vis_patch"),
                           param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixels_PC):
        return self.proj(pixels_PC)


class PatchMerger(nnx.Module):
    """Norm (LayerNorm; Qwen2.5-VL: RMSNorm), concatenate each 2x2 block (4 consecutive rows), Linear, exact GELU,
    Linear to the LM width."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, param_dtype, rngs: nnx.Rngs):
        M = cfg.merge_dim
        self.ln_q = _norm(cfg, param_dtype)
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

    # ------------------------------------------------------------------------------------------------ the math
    def forward(self, pixels_PC, pos_hw_P2, segments: VisionSegments | WindowedSegments, *,
                output_hidden_states=False):
        """features = merger(block_depth(... block_1(patch_embed(pixels)))), each block's attention rotating q / k
        by the 2-D rotary of the patch positions, within frames (or, in Qwen2.5-VL's window blocks, windows).

        Pure math on padded inputs (rows in the layout's order): merged features `[P_pad/4, D]` in prompt order, and
        with `output_hidden_states` each block's output (rows in the layout's order)."""
        with use_partitioning(self.partitioning):
            full, windows, restore_M = self._block_segments(segments)
            rotary = VisionRotary(*vision_cos_sin(pos_hw_P2, self.config), apply_rotary)
            if active():  # what hooks are told: the real patch rows (padding rows belong to no segment)
                valid_P = jnp.zeros(pixels_PC.shape[0], bool).at[full.rows_QL].max(full.valid_QL)
                set_call("vision", valid=valid_P, position_ids=pos_hw_P2)
            x_PE = point("vision.patch_embed", constrain(self.patch_embed(pixels_PC.astype(self.dtype)), ROWS_AXES))
            run_blocks = self._scan if self.scan_layers else self._loop
            x_PE, hidden = run_blocks(x_PE, rotary, full, windows, output_hidden_states)
            merged_MD = self.merger(x_PE)
            if restore_M is not None:  # window order -> prompt order (transformers: [argsort(window_index)])
                merged_MD = merged_MD[restore_M]
            return point("vision.merger.out", merged_MD), hidden

    def _block_segments(self, segments) -> tuple[VisionSegments, VisionSegments | None, jax.Array | None]:
        """(full-frame segments, window segments or None, restore_M or None), checked against the config."""
        if isinstance(segments, WindowedSegments):
            if self.config.window_size is None:
                raise ValueError("window segments were given to a vision tower without window attention")
            return segments.full, segments.windows, segments.restore_M
        if self.config.window_size is not None:
            raise ValueError("this vision tower attends in windows (Qwen2.5-VL): pass the layout's "
                             "`segments()` (WindowedSegments) from `vision_layout(..., window_tokens=...)`")
        return segments, None, None

    def _run_block(self, block, x_PE, rotary, segments):
        if self.remat is not None and not recording():  # jax.checkpoint per block (training)
            return checkpointed(self.remat)(block, x_PE, rotary, segments)
        return block(x_PE, rotary, segments)

    def _loop(self, x_PE, rotary, full, windows, output_hidden_states):
        """The blocks one after the other (unrolled inside the jit)."""
        hidden = []
        for i, block in enumerate(self.blocks):
            segments = windows if self.config.attends_in_windows(i) else full  # transformers: cu_seqlens_now
            x_PE = self._run_block(block, x_PE, rotary, segments)
            if output_hidden_states:
                hidden.append(x_PE)
        return x_PE, tuple(hidden)

    def _scan(self, x_PE, rotary, full, windows, output_hidden_states):
        """The blocks as one `jax.lax.scan` over the stacked parameters; hidden states come back stacked. With
        window attention each step picks its grouping with `lax.cond` on the block's `fullatt_block_indexes` flag."""
        if active():
            raise HookError("hook points name each block, and a scan_layers=True model runs one block for all of "
                            "them: load with scan_layers=False to use hooks")
        graphdef, params = nnx.split(self.blocks)
        in_windows_L = jnp.asarray([self.config.attends_in_windows(i) for i in range(self.config.depth)])

        def body(x, step):
            block_params, in_windows = step
            block = nnx.merge(graphdef, block_params)
            if windows is None:
                y = self._run_block(block, x, rotary, full)
            else:
                y = jax.lax.cond(in_windows, lambda: self._run_block(block, x, rotary, windows),
                                 lambda: self._run_block(block, x, rotary, full))
            return y, (y if output_hidden_states else None)

        x_PE, hidden_L = jax.lax.scan(body, x_PE, (params, in_windows_L))
        return x_PE, (tuple(hidden_L) if output_hidden_states else ())

    # ------------------------------------------------------------------------------ host entry points
    def prepare(self, pixel_values, grid_thw):
        """`vision_layout.prepare_pixels` for this tower's config: (validated rows padded to their bucket, layout)."""
        return prepare_pixels(self.config, pixel_values, grid_thw)

    def encode_padded(self, pixel_values, grid_thw, *, output_hidden_states: bool = False):
        """Jitted encode on bucketed shapes: (features `[P_pad/4, D]`, hidden states, layout); rows past
        `layout.num_merged` are padding."""
        pixels, layout = self.prepare(pixel_values, grid_thw)
        merged, hidden = self.run_padded(pixels, layout, output_hidden_states=output_hidden_states)
        return merged, hidden, layout

    def run_padded(self, pixels, layout: VisionLayout, *, output_hidden_states: bool = False):
        """Run the compiled tower (`programs.vision`) on already padded rows (from `prepare`): (features, hidden
        states)."""
        merged, hidden, _ = programs.vision(self, pixels, layout.pos_hw_P2, layout.segments(),
                                            output_hidden_states=output_hidden_states)
        return merged, hidden

    def run_hooked(self, pixels, layout: VisionLayout, hooks):
        """`run_padded` with a `hook_points.HookSet` active: (padded features, {name: value}) with the recorded
        values cut to the real rows (`vision_layout.trim_records`)."""
        merged, _, records = programs.vision(self, pixels, layout.pos_hw_P2, layout.segments(), hooks)
        return merged, trim_records(records, layout, self.config)

    def __call__(self, pixel_values, grid_thw, *, output_hidden_states: bool = False):
        """Merged vision features `[sum(t*h*w)/4, D]` (a jax Array), like the reference's `model.visual`.

        With `output_hidden_states=True`, returns `(features, hidden_states)` where hidden_states holds each
        block's output `[sum(t*h*w), E]`, rows in the processor's order (Qwen2.5-VL's blocks run in window order;
        `VisionLayout.to_prompt_order`).
        """
        merged, hidden, layout = self.encode_padded(pixel_values, grid_thw, output_hidden_states=output_hidden_states)
        merged = merged[: layout.num_merged]
        if output_hidden_states:
            return merged, tuple(layout.to_prompt_order(h[: layout.num_patches]) for h in hidden)
        return merged
