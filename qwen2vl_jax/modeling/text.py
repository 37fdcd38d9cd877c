"""The Qwen2 decoder with multimodal rotary embeddings (M-RoPE), and its static KV cache.

Reference: transformers 4.57 `models/qwen2_vl/modeling_qwen2_vl.py` `Qwen2VLTextModel` / `Qwen2VLDecoderLayer` /
`Qwen2VLAttention`. One decoder layer:

    h = h + o_proj(attn(mrope(q_proj(rms(h))), mrope(k_proj(rms(h))), v_proj(rms(h))))
    h = h + down_proj(silu(gate_proj(rms(h))) * up_proj(rms(h)))

Attention scores and softmax are accumulated in fp32 whatever the weight dtype; rotary and norms run in fp32 too.
The layer loop is a Python loop inside one jit (unrolled), the default. `scan_layers=True` stacks the layers and runs
them with `lax.scan` (one compiled block: the 72B's text forward compiles in 1.2 s instead of 9.6 s on the CPU), but
on XLA:CPU a scanned bf16 model decodes at a third of the speed (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ..attention import DecoderMask, get_attention
from ..attention import xla as attention_xla
from . import kv_cache
from .config import Qwen2VLTextConfig
from .hook_points import HookError, active, point, recording, set_call, wants
from .kv_cache import KVCache
from .layers import Embed, Linear, RMSNorm, in_row_blocks
from .parameters import heads_axis, remat_policy, stack_modules
from .partitioning import constrain
from .rope import apply_rotary, mrope_cos_sin

# Logical axes of the activations (`partitioning.LOGICAL_RULES` maps them to mesh axes).
RESIDUAL_AXES = ("batch", "seq", "act_embed")  # [B, T, D]
Q_AXES = ("batch", "seq", "q_heads", "head_dim")  # [B, T, N, H]
KV_AXES = ("batch", "seq", "kv_heads", "head_dim")  # [B, T, K, H]


# ------------------------------------------------------------------------------------------------- modules
class Attention(nnx.Module):
    """GQA self-attention with M-RoPE. The attention itself goes through the backend named by
    `attn_implementation` (`qwen2vl_jax.attention`; None: the platform default). Hook points `{name}.q / .k / .v /
    .probs / .head_out` (`qwen2vl_jax.modeling.hook_points`)."""

    def __init__(self, cfg: Qwen2VLTextConfig, *, param_dtype, rngs: nnx.Rngs, attn_implementation: str | None = None,
                 name: str = "text.layers.0.attn", layer: int = 0):
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = N, K, H
        self.attn_implementation = attn_implementation
        self.name, self.layer = name, layer
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        q_rows, kv_rows = heads_axis("q_heads", N, "head_dim", H), heads_axis("kv_heads", K, "head_dim", H)
        self.q_proj = Linear(D, N * H, use_bias=True, axes=(q_rows, "embed"), **kw)
        self.k_proj = Linear(D, K * H, use_bias=True, axes=(kv_rows, "embed"), **kw)
        self.v_proj = Linear(D, K * H, use_bias=True, axes=(kv_rows, "embed"), **kw)
        self.o_proj = Linear(N * H, D, use_bias=False, axes=("embed", q_rows), **kw)

    def __call__(self, x_BTD, cos_BTH, sin_BTH, mask: DecoderMask, kv=None, start=None, *, output_attentions=False):
        """Causal GQA attention; with `kv = (keys_BSKH, values_BSKH)` the new k/v are written at `start` first.

        Probabilities (`output_attentions`, or `.probs` hooked / recorded) come only from the `xla` formulation, so
        asking for them runs that one whatever the backend.
        """
        B, T, _ = x_BTD.shape
        N, K, H = self.num_heads, self.num_kv_heads, self.head_dim
        at = lambda suffix, value: point(f"{self.name}.{suffix}", value, self.layer)
        q_BTNH = at("q", apply_rotary(constrain(self.q_proj(x_BTD).reshape(B, T, N, H), Q_AXES), cos_BTH, sin_BTH))
        k_BTKH = at("k", apply_rotary(constrain(self.k_proj(x_BTD).reshape(B, T, K, H), KV_AXES), cos_BTH, sin_BTH))
        v_BTKH = at("v", constrain(self.v_proj(x_BTD).reshape(B, T, K, H), KV_AXES))
        if kv is None:
            k_BSKH, v_BSKH = k_BTKH, v_BTKH
        else:
            k_BSKH, v_BSKH = kv_cache.write(kv, k_BTKH, v_BTKH, start)
        probs_BNTS = None
        if output_attentions or wants(f"{self.name}.probs"):
            probs_BNTS = at("probs", attention_xla.decoder_probs(q_BTNH, k_BSKH, mask.allowed_BTS))
            o_BTNH = attention_xla.probs_times_values(probs_BNTS, v_BSKH, q_BTNH.dtype)
        else:
            o_BTNH = get_attention(self.attn_implementation).decoder(q_BTNH, k_BSKH, v_BSKH, mask)
        o_BTNH = constrain(o_BTNH, Q_AXES)
        out = self.o_proj(at("head_out", o_BTNH).reshape(B, T, N * H))
        return out, (k_BSKH, v_BSKH), probs_BNTS if output_attentions else None


class MLP(nnx.Module):
    """`Qwen2MLP`: down(silu(gate(x)) * up(x)). A long prefill runs in row blocks (`layers.in_row_blocks`); not
    when a hook wants the whole `mlp.act`, or with a LoRA adapter (its dropout draws per call)."""

    def __init__(self, cfg: Qwen2VLTextConfig, *, param_dtype, rngs: nnx.Rngs, name: str = "text.layers.0.mlp",
                 layer: int = 0):
        D, F = cfg.hidden_size, cfg.intermediate_size
        self.name, self.layer = name, layer
        kw = dict(use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(D, F, axes=("mlp", "embed"), **kw)
        self.up_proj = Linear(D, F, axes=("mlp", "embed"), **kw)
        self.down_proj = Linear(F, D, axes=("embed", "mlp"), **kw)

    def _act(self, x_AD):
        act_AF = jax.nn.silu(self.gate_proj(x_AD)) * self.up_proj(x_AD)
        return constrain(act_AF, ("batch", "seq", "mlp")) if act_AF.ndim == 3 else act_AF  # 2-D: a row block

    def _rows(self, x_AD):
        return self.down_proj(self._act(x_AD))

    def __call__(self, x_BTD):
        adapted = any(p.lora is not None for p in (self.gate_proj, self.up_proj, self.down_proj))
        if not adapted and not wants(f"{self.name}.act"):
            return in_row_blocks(self._rows, x_BTD)
        return self.down_proj(point(f"{self.name}.act", self._act(x_BTD), self.layer))


class DecoderLayer(nnx.Module):
    """Hook points `text.layers.{i}.resid_pre / attn_out / resid_mid / mlp_out / resid_post` (+ attention's, MLP's)."""

    def __init__(self, cfg: Qwen2VLTextConfig, *, param_dtype, rngs: nnx.Rngs, attn_implementation: str | None = None,
                 layer: int = 0):
        self.name, self.layer = f"text.layers.{layer}", layer
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, param_dtype=param_dtype, rngs=rngs, attn_implementation=attn_implementation,
                                   name=f"{self.name}.attn", layer=layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, param_dtype=param_dtype, rngs=rngs, name=f"{self.name}.mlp", layer=layer)

    def __call__(self, x_BTD, cos_BTH, sin_BTH, mask: DecoderMask, kv=None, start=None, *, output_attentions=False):
        at = lambda suffix, value: point(f"{self.name}.{suffix}", value, self.layer)
        x_BTD = at("resid_pre", x_BTD)
        attn_out, kv, probs = self.self_attn(self.input_layernorm(x_BTD), cos_BTH, sin_BTH, mask, kv, start,
                                             output_attentions=output_attentions)
        x_BTD = at("resid_mid", constrain(x_BTD + at("attn_out", attn_out), RESIDUAL_AXES))
        x_BTD = at("resid_post", x_BTD + at("mlp_out", self.mlp(self.post_attention_layernorm(x_BTD))))
        return constrain(x_BTD, RESIDUAL_AXES), kv, probs


class TextModel(nnx.Module):
    """`Qwen2VLTextModel`: embeddings, decoder layers, final RMSNorm (the LM head lives on the top model)."""

    def __init__(self, cfg: Qwen2VLTextConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs,
                 attn_implementation: str | None = None, scan_layers: bool = False):
        self.config = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype, rngs=rngs)
        layers = [DecoderLayer(cfg, param_dtype=param_dtype, rngs=rngs, attn_implementation=attn_implementation,
                               layer=i) for i in range(cfg.num_hidden_layers)]
        # scan_layers: one DecoderLayer whose parameters are stacked [L, ...] (run by `jax.lax.scan`)
        self.layers = stack_modules(layers) if scan_layers else nnx.List(layers)
        self.scan_layers = scan_layers
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.remat: str | None = None  # a `config.REMAT_POLICIES` name: rematerialise each layer (training)

    def __call__(self, x_BTD, position_ids_ZBT, attention_mask_BT, cache: KVCache | None = None, *,
                 output_hidden_states=False, output_attentions=False, cache_empty=False):
        """Run the decoder on embeddings. Returns (normed hidden [B,T,D], cache, hidden_states, attentions).

        Without a cache, keys are this call's tokens. With a cache, this call's k/v are written at slots
        [cache.length, cache.length + T) and the queries attend to every filled, unmasked slot up to their own.
        `cache_empty=True` promises the cache holds nothing yet (a prefill), so the queries' first slot is known
        while tracing (0), which lets an attention backend use a causal kernel.
        """
        B, T, _ = x_BTD.shape
        cos_BTH, sin_BTH = mrope_cos_sin(position_ids_ZBT, self.config)
        valid_BT = attention_mask_BT.astype(bool)
        if cache is None:
            start = 0
            key_valid_BS, S = valid_BT, T
        else:
            start = 0 if cache_empty else cache.length
            key_valid_BS = jax.lax.dynamic_update_slice(cache.mask_BS, valid_BT, (0, start))
            S = cache.max_length
        # Causal over absolute slots: query t sits at slot start + t and sees slots <= its own.
        query_slot_T = start + jnp.arange(T)
        causal_TS = jnp.arange(S)[None, :] <= query_slot_T[:, None]
        mask = DecoderMask(allowed_BTS=causal_TS[None] & key_valid_BS[:, None, :], key_valid_BS=key_valid_BS,
                           query_start=start)
        set_call("text", valid=valid_BT, position_ids=position_ids_ZBT, slots=query_slot_T)
        x_BTD = point("text.embed", constrain(x_BTD, RESIDUAL_AXES))

        if self.scan_layers:
            x_BTD, (new_keys, new_values), hidden_states, attentions = self._scan(
                x_BTD, cos_BTH, sin_BTH, mask, cache, start, output_hidden_states, output_attentions)
            return self._finish(x_BTD, cache, new_keys, new_values, key_valid_BS, T, hidden_states, attentions,
                                output_hidden_states)
        hidden_states, attentions, new_keys, new_values = [], [], [], []
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden_states.append(x_BTD)
            if self.remat is not None and cache is None and not output_attentions and not recording():
                # jax.checkpoint per layer: the backward pass recomputes what the policy did not keep.
                x_BTD = _remat_layer(self.remat)(layer, x_BTD, cos_BTH, sin_BTH, mask)
                continue
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x_BTD, (k, v), probs = layer(x_BTD, cos_BTH, sin_BTH, mask, kv, start,
                                         output_attentions=output_attentions)
            new_keys.append(k)
            new_values.append(v)
            if output_attentions:
                attentions.append(probs)
        return self._finish(x_BTD, cache, new_keys, new_values, key_valid_BS, T, hidden_states, attentions,
                            output_hidden_states)

    def _scan(self, x_BTD, cos_BTH, sin_BTH, mask, cache, start, output_hidden_states, output_attentions):
        """The layers as one `jax.lax.scan` over the stacked parameters (and the stacked cache): one compiled
        block. Per-layer outputs (keys / values, hidden states, probabilities) come back stacked `[L, ...]`."""
        if active():
            raise HookError("hook points name each layer, and a scan_layers=True model runs one block for all of "
                            "them: load with scan_layers=False to use hooks")
        graphdef, params = nnx.split(self.layers)
        remat = self.remat is not None and cache is None and not output_attentions

        def body(x, xs):
            layer_params, kv = xs
            layer = nnx.merge(graphdef, layer_params)
            if remat:
                y = _remat_layer(self.remat)(layer, x, cos_BTH, sin_BTH, mask)
                return y, (None, None, x if output_hidden_states else None)
            y, (k, v), probs = layer(x, cos_BTH, sin_BTH, mask, kv, start, output_attentions=output_attentions)
            # without a cache, this call's k / v are not kept (stacking them would hold every layer's)
            return y, ((k, v) if kv is not None else None, probs, x if output_hidden_states else None)

        kv_L = None if cache is None else (cache.keys, cache.values)
        x_BTD, (kv_L, probs_L, hidden_L) = jax.lax.scan(body, x_BTD, (params, kv_L))
        hidden = [] if hidden_L is None else list(hidden_L)
        attentions = [] if probs_L is None else list(probs_L)
        return x_BTD, (kv_L if kv_L is not None else (None, None)), hidden, attentions

    def _finish(self, x_BTD, cache, new_keys, new_values, key_valid_BS, T, hidden_states, attentions,
                output_hidden_states):
        x_BTD = point("text.final_norm", self.norm(x_BTD))
        if output_hidden_states:
            hidden_states.append(x_BTD)  # like HF: the last entry is after the final norm
        if cache is not None:
            cache = dataclasses.replace(cache, keys=new_keys, values=new_values, mask_BS=key_valid_BS,
                                        length=cache.length + T)
        return x_BTD, cache, tuple(hidden_states), tuple(attentions)


@functools.cache
def _remat_layer(policy: str):
    """A decoder layer's residual stream output under `nnx.remat` with the named policy (no cache, no probs)."""
    return nnx.remat(lambda layer, x, cos, sin, mask: layer(x, cos, sin, mask)[0], policy=remat_policy(policy))
