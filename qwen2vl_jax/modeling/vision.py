"""The vision tower of both families: patch embed, 2-D rotary ViT blocks with block-diagonal attention, the merger.

Reference: transformers 4.57 `models/qwen2_vl/modeling_qwen2_vl.py` `Qwen2VisionTransformerPretrainedModel` and
`models/qwen2_5_vl/modeling_qwen2_5_vl.py` `Qwen2_5_VisionTransformerPretrainedModel`.

    pixel_values [P, C=1176]  --patch_embed-->  x [P, E=1280]  --32 blocks-->  [P, E]  --merger-->  [P/4, D]

Everything that depends on `grid_thw` (rotary positions in 2x2 merge order, which rows form an attention segment)
is computed on the host in NumPy (`VisionLayout`); the device side is pure jitted math on padded, static shapes:
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

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..attention import VisionSegments, get_attention
from ..attention import xla as attention_xla
from .config import Qwen2VLVisionConfig
from .hook_points import HookError, active, install, point, recording, set_call, wants
from .layers import LayerNorm, Linear, RMSNorm, in_row_blocks
from .parameters import heads_axis, remat_policy, stack_modules
from .partitioning import Partitioning, constrain
from .partitioning import active as use_partitioning
from .rope import vision_cos_sin
from .vision_layout import VisionLayout, WindowedSegments, prepare_pixels

ROWS_AXES = ("vis_rows", "act_embed")  # [P, E]: patch rows, replicated width (Megatron)
HEADS_AXES = ("vis_rows", "vis_heads", "vis_head_dim")  # [P, N, H]

# Trace counter: the body of a jitted function runs in Python once per compile, so tests can count compiles.
TRACE_COUNTS: dict[str, int] = {"vision": 0}


# ------------------------------------------------------------------------------------------------- modules
class VisionAttention(nnx.Module):
    """Multi-head attention within segments; q and k get the 2-D rotary inside the backend (which may fuse it).
    Hook points `{name}.q / .k / .v / .probs / .head_out` (`qwen2vl_jax.modeling.hook_points`)."""

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
    """Qwen2-VL: fc2(QuickGELU(fc1(x))) (transformers `VisionMlp`); Qwen2.5-VL: down_proj(silu(gate_proj(x)) *
    up_proj(x)), every projection with a bias (`Qwen2_5_VLMLP(config, bias=True)`). Hook point `{name}.act`: the
    product fed to the last projection."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, param_dtype, rngs: nnx.Rngs, name: str = "vision.blocks.0.mlp",
                 layer: int = 0):
        E, F = cfg.embed_dim, cfg.mlp_dim
        self.name, self.layer = name, layer
        self.gated = cfg.gated_mlp
        up, down = dict(axes=("vis_mlp", "vis_embed")), dict(axes=("vis_embed", "vis_mlp"))
        if self.gated:
            self.gate_proj = Linear(E, F, use_bias=True, **up, param_dtype=param_dtype, rngs=rngs)
            self.up_proj = Linear(E, F, use_bias=True, **up, param_dtype=param_dtype, rngs=rngs)
            self.down_proj = Linear(F, E, use_bias=True, **down, param_dtype=param_dtype, rngs=rngs)
        else:
            self.fc1 = Linear(E, F, use_bias=True, **up, param_dtype=param_dtype, rngs=rngs)
            self.fc2 = Linear(F, E, use_bias=True, **down, param_dtype=param_dtype, rngs=rngs)

    def _linears(self):
        return (self.gate_proj, self.up_proj, self.down_proj) if self.gated else (self.fc1, self.fc2)

    def _act(self, x_PE):
        if self.gated:
            return jax.nn.silu(self.gate_proj(x_PE)) * self.up_proj(x_PE)
        h = self.fc1(x_PE)
        return h * jax.nn.sigmoid(1.702 * h)  # QuickGELU (transformers `activations.QuickGELUActivation`)

    def _out(self, act_PF):
        return self.down_proj(act_PF) if self.gated else self.fc2(act_PF)

    def __call__(self, x_PE):
        # a large image (65k patches: fp32 [P, 5120] products of 1.3 GB) runs in row blocks (`in_row_blocks`)
        if all(lin.lora is None for lin in self._linears()) and not wants(f"{self.name}.act"):
            return in_row_blocks(lambda x: self._out(self._act(x)), x_PE)
        return self._out(point(f"{self.name}.act", self._act(x_PE), self.layer))


def _norm(cfg: Qwen2VLVisionConfig, param_dtype):
    """The blocks' and the merger's norm: Qwen2RMSNorm (Qwen2.5-VL) or LayerNorm (Qwen2-VL), eps 1e-6 both."""
    if cfg.rms_norm:
        return RMSNorm(cfg.embed_dim, eps=cfg.layer_norm_eps, axis_name="vis_embed", param_dtype=param_dtype)
    return LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps, axis_name="vis_embed", param_dtype=param_dtype)


class VisionBlock(nnx.Module):
    """Pre-norm ViT block: x + attn(norm1(x)), then x + mlp(norm2(x)). Hook points `vision.blocks.{i}.resid_pre /
    attn_out / resid_mid / mlp_out / resid_post` (+ the attention's and the MLP's)."""

    def __init__(self, cfg: Qwen2VLVisionConfig, *, param_dtype, rngs: nnx.Rngs,
                 attn_implementation: str | None = None, layer: int = 0):
        self.name, self.layer = f"vision.blocks.{layer}", layer
        self.norm1 = _norm(cfg, param_dtype)
        self.norm2 = _norm(cfg, param_dtype)
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

    def forward(self, pixels_PC, pos_hw_P2, segments: VisionSegments | WindowedSegments, *,
                output_hidden_states=False):
        """The pure math on padded inputs (rows in the layout's order): merged features `[P_pad/4, D]` in prompt
        order (+ per-block hidden states, rows in the layout's order)."""
        with use_partitioning(self.partitioning):
            return self._forward(pixels_PC, pos_hw_P2, segments, output_hidden_states)

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

    def _forward(self, pixels_PC, pos_hw_P2, segments, output_hidden_states):
        full, windows, restore_M = self._block_segments(segments)
        cos_PH, sin_PH = vision_cos_sin(pos_hw_P2, self.config)
        if active():  # what hooks are told: the real patch rows (padding rows belong to no segment)
            valid_P = jnp.zeros(pixels_PC.shape[0], bool).at[full.rows_QL].max(full.valid_QL)
            set_call("vision", valid=valid_P, position_ids=pos_hw_P2)
        x_PE = point("vision.patch_embed", constrain(self.patch_embed(pixels_PC.astype(self.dtype)), ROWS_AXES))
        if self.scan_layers:
            x_PE, hidden = self._scan(x_PE, cos_PH, sin_PH, full, windows, output_hidden_states)
        else:
            hidden = []
            for i, block in enumerate(self.blocks):
                segs = windows if self.config.attends_in_windows(i) else full  # transformers: cu_seqlens_now
                if self.remat is not None and not recording():  # jax.checkpoint per block (training)
                    x_PE = _remat_block(self.remat)(block, x_PE, cos_PH, sin_PH, segs)
                else:
                    x_PE = block(x_PE, cos_PH, sin_PH, segs)
                if output_hidden_states:
                    hidden.append(x_PE)
            hidden = tuple(hidden)
        merged_MD = self.merger(x_PE)
        if restore_M is not None:  # window order -> prompt order (transformers: hidden_states[argsort(window_index)])
            merged_MD = merged_MD[restore_M]
        return point("vision.merger.out", merged_MD), hidden

    def _scan(self, x_PE, cos_PH, sin_PH, full, windows, output_hidden_states):
        """The blocks as one `jax.lax.scan` over the stacked parameters; hidden states come back stacked. With
        window attention each step picks its grouping with `lax.cond` on the block's `fullatt_block_indexes` flag."""
        if active():
            raise HookError("hook points name each block, and a scan_layers=True model runs one block for all of "
                            "them: load with scan_layers=False to use hooks")
        graphdef, params = nnx.split(self.blocks)
        in_windows_L = jnp.asarray([self.config.attends_in_windows(i) for i in range(self.config.depth)])

        def run(block, x, segs):
            if self.remat is not None:
                return _remat_block(self.remat)(block, x, cos_PH, sin_PH, segs)
            return block(x, cos_PH, sin_PH, segs)

        def body(x, step):
            block_params, in_windows = step
            block = nnx.merge(graphdef, block_params)
            if windows is None:
                y = run(block, x, full)
            else:
                y = jax.lax.cond(in_windows, lambda: run(block, x, windows), lambda: run(block, x, full))
            return y, (y if output_hidden_states else None)

        x_PE, hidden_L = jax.lax.scan(body, x_PE, (params, in_windows_L))
        return x_PE, (tuple(hidden_L) if output_hidden_states else ())

    def prepare(self, pixel_values, grid_thw) -> tuple[np.ndarray, VisionLayout]:
        """`vision_layout.prepare_pixels` for this tower's config: validated rows padded to their bucket."""
        return prepare_pixels(self.config, pixel_values, grid_thw)

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


@functools.cache
def _remat_block(policy: str):
    return nnx.remat(lambda block, x, cos, sin, segments: block(x, cos, sin, segments), policy=remat_policy(policy))


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


def _vision_apply(visual: VisionTransformer, pixels, pos, segments, hooks=None, *, output_hidden_states=False):
    TRACE_COUNTS["vision"] += 1  # runs once per compile
    with install(hooks) as run:
        merged, hidden = visual.forward(pixels, pos, segments, output_hidden_states=output_hidden_states)
    return merged, hidden, run.records


_vision_jit = jax.jit(_vision_apply, static_argnames=("output_hidden_states",))
