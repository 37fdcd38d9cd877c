"""The Qwen2 decoder with multimodal rotary embeddings (M-RoPE).

Reference: transformers 4.57 `models/qwen2_vl/modeling_qwen2_vl.py` `Qwen2VLTextModel` / `Qwen2VLDecoderLayer` /
`Qwen2VLAttention` / `Qwen2MLP`. One decoder layer:

    x = x + o_proj(attention(mrope(q_proj(rms(x))), mrope(k_proj(rms(x))), v_proj(rms(x))))
    x = x + down_proj(silu(gate_proj(rms(x))) * up_proj(rms(x)))

Attention scores and softmax are accumulated in fp32 whatever the weight dtype; rotary and norms run in fp32 too
(`rope.py`, `layers.py`). The layers run as a Python loop inside one jit (unrolled), the default, or, with
`scan_layers=True`, stacked and run by `lax.scan` (one compiled block: the 72B's text forward compiles in 1.2 s
instead of 9.6 s on the CPU; on XLA:CPU a scanned bf16 model decodes at a third of the speed, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

import qwen2vl_jax.attention.paged as paged

from ..attention import DecoderMask, PagedBatch, get_attention
from . import kv_cache
from .config import Qwen2VLTextConfig
from .hook_points import HookError, active, point, recording, set_call
from .kv_cache import KVCache
from .layers import Embed, Linear, RMSNorm, rowwise
from .module import Block, MLPBlock, checkpointed
from .paged_cache import PagedKVCache
from .parameters import heads_axis, stack_modules
from .partitioning import constrain
from .rope import apply_rotary, mrope_cos_sin

# Logical axes of the activations (`partitioning.LOGICAL_RULES` maps them to mesh axes).
RESIDUAL_AXES = ("batch", "seq", "act_embed")  # [B, T, D]
Q_AXES = ("batch", "seq", "q_heads", "head_dim")  # [B, T, N, H]
KV_AXES = ("batch", "seq", "kv_heads", "head_dim")  # [B, T, K, H]
MLP_AXES = ("batch", "seq", "mlp")  # [B, T, F]


def residual(x_BTD):
    """The residual stream as the mesh lays it out (replicated over "model", batch over the data axes) wherever a
    norm reads it. Under FSDP the o_proj / down_proj outputs arrive split along D (their weights are); left so, the
    RMSNorm after them would sum its squares across shards in another order (8-device FSDP: 9.9e-7 from one device
    instead of bit-identical). No mesh, no op."""
    return constrain(x_BTD, RESIDUAL_AXES)


class Attention(Block):
    """GQA self-attention with M-RoPE (transformers `Qwen2VLAttention.forward`), N query heads over K kv heads:

        q = mrope(W_q x + b_q)        k = mrope(W_k x + b_k)        v = W_v x + b_v
        k, v = the cache's slots, this call's k / v written at `start`          (with a KV cache)
        o = softmax(q k^T / sqrt(H) + mask) v                                  (query head n reads kv head n // G)
        out = W_o o

    The attention is the backend's (`attn_implementation`, `qwen2vl_jax.attention`; None: the platform default).
    With the serving engine's paged cache (`mask` a `PagedBatch`, `kv` this layer's pages), k / v go to their pages
    and each sequence attends over its own (the backend's `paged` function; one flat token axis, B = 1).
    Hook points `{name}.q / .k` (after M-RoPE) `/ .v / .probs / .head_out`."""

    def __init__(self, cfg: Qwen2VLTextConfig, *, param_dtype, rngs: nnx.Rngs, name: str, layer: int,
                 attn_implementation: str | None = None):
        self.place(name, layer)
        D, N, K, H = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = N, K, H
        self.attn_implementation = attn_implementation
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        q_rows, kv_rows = heads_axis("q_heads", N, "head_dim", H), heads_axis("kv_heads", K, "head_dim", H)
        self.q_proj = Linear(D, N * H, use_bias=True, axes=(q_rows, "embed"), **kw)
        self.k_proj = Linear(D, K * H, use_bias=True, axes=(kv_rows, "embed"), **kw)
        self.v_proj = Linear(D, K * H, use_bias=True, axes=(kv_rows, "embed"), **kw)
        self.o_proj = Linear(N * H, D, use_bias=False, axes=("embed", q_rows), **kw)

    def __call__(self, x_BTD, cos_BTH, sin_BTH, mask: DecoderMask, kv=None, start=None, *, output_attentions=False):
        """(out `[B, T, D]`, this layer's keys / values `[B, S, K, H]`, probabilities `[B, N, T, S]` when
        `output_attentions` else None). With `kv = (keys, values)` of the cache, this call's k / v are written at
        slot `start` first."""
        q_BTNH = self.hook("q", apply_rotary(self.heads(self.q_proj, x_BTD, Q_AXES), cos_BTH, sin_BTH))
        k_BTKH = self.hook("k", apply_rotary(self.heads(self.k_proj, x_BTD, KV_AXES), cos_BTH, sin_BTH))
        v_BTKH = self.hook("v", self.heads(self.v_proj, x_BTD, KV_AXES))
        if isinstance(mask, PagedBatch):
            kv = paged.write(kv, k_BTKH[0], v_BTKH[0], mask)
            o_BTNH, probs_BNTS = self.attend_pages(q_BTNH, kv, mask), None
        else:
            k_BSKH, v_BSKH = (k_BTKH, v_BTKH) if kv is None else kv_cache.write(kv, k_BTKH, v_BTKH, start)
            o_BTNH, probs_BNTS = self.attend(q_BTNH, k_BSKH, v_BSKH, mask, output_attentions)
            kv = (k_BSKH, v_BSKH)
        out_BTD = self.o_proj(self.hook("head_out", o_BTNH).reshape(*x_BTD.shape[:2], -1))
        return out_BTD, kv, probs_BNTS

    def heads(self, proj: Linear, x_BTD, axes):
        """`proj(x)` as heads `[B, T, heads, H]`, constrained to `axes`."""
        return constrain(proj(x_BTD).reshape(*x_BTD.shape[:2], -1, self.head_dim), axes)

    def attend(self, q_BTNH, k_BSKH, v_BSKH, mask: DecoderMask, output_attentions: bool):
        """The backend's attention: `o [B, T, N, H]`, and the probabilities (through the backend's probabilities
        capability, the `.probs` hook applied before the value product) when they are returned or hooked."""
        backend = get_attention(self.attn_implementation)
        if output_attentions or self.hooked("probs"):
            o_BTNH, probs_BNTS = backend.decoder_probs(q_BTNH, k_BSKH, v_BSKH, mask, lambda p: self.hook("probs", p))
        else:
            o_BTNH, probs_BNTS = backend.decoder(q_BTNH, k_BSKH, v_BSKH, mask), None
        return constrain(o_BTNH, Q_AXES), probs_BNTS if output_attentions else None

    def attend_pages(self, q_BTNH, kv_PRCH, batch: PagedBatch):
        """The backend's paged attention over the flat token axis (B = 1): `o [1, T, N, H]`."""
        return get_attention(self.attn_implementation).paged(q_BTNH[0], kv_PRCH, batch)[None]


class MLP(MLPBlock):
    """`Qwen2MLP`: down_proj(silu(gate_proj(x)) * up_proj(x)). Hook point `{name}.act` (the product)."""

    def __init__(self, cfg: Qwen2VLTextConfig, *, param_dtype, rngs: nnx.Rngs, name: str, layer: int):
        self.place(name, layer)
        D, F = cfg.hidden_size, cfg.intermediate_size
        kw = dict(use_bias=False, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(D, F, axes=("mlp", "embed"), **kw)
        self.up_proj = Linear(D, F, axes=("mlp", "embed"), **kw)
        self.down_proj = Linear(F, D, axes=("embed", "mlp"), **kw)

    def __call__(self, x_AD):
        act_AF = jax.nn.silu(self.gate_proj(x_AD)) * self.up_proj(x_AD)
        act_AF = self.hook("act", constrain(act_AF, MLP_AXES) if act_AF.ndim == 3 else act_AF)  # 2-D: a row block
        return self.down_proj(act_AF)

    def projections(self) -> tuple:
        return self.gate_proj, self.up_proj, self.down_proj


class DecoderLayer(Block):
    """`Qwen2VLDecoderLayer`: pre-norm attention, then pre-norm MLP, each added to the residual stream. Hook points
    `text.layers.{i}.resid_pre / attn_out / resid_mid / mlp_out / resid_post` (+ the attention's and the MLP's)."""

    def __init__(self, cfg: Qwen2VLTextConfig, *, param_dtype, rngs: nnx.Rngs, layer: int,
                 attn_implementation: str | None = None):
        self.place(f"text.layers.{layer}", layer)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, param_dtype=param_dtype, rngs=rngs, name=f"{self.name}.attn", layer=layer,
                                   attn_implementation=attn_implementation)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, param_dtype=param_dtype, rngs=rngs, name=f"{self.name}.mlp", layer=layer)

    def __call__(self, x_BTD, cos_BTH, sin_BTH, mask: DecoderMask, kv=None, start=None, *, output_attentions=False):
        """x = x + attn(rms(x));  x = x + mlp(rms(x)). Returns (x, this layer's keys / values, probabilities)."""
        x_BTD = self.hook("resid_pre", x_BTD)
        attn_BTD, kv, probs_BNTS = self.self_attn(self.input_layernorm(x_BTD), cos_BTH, sin_BTH, mask, kv, start,
                                                  output_attentions=output_attentions)
        attn_BTD = self.hook("attn_out", attn_BTD)
        x_BTD = self.hook("resid_mid", residual(x_BTD + attn_BTD))
        mlp_BTD = self.hook("mlp_out", rowwise(self.mlp, self.post_attention_layernorm(x_BTD)))
        x_BTD = self.hook("resid_post", x_BTD + mlp_BTD)
        return residual(x_BTD), kv, probs_BNTS


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TextOutput:
    """What the decoder returns (transformers `BaseModelOutputWithPast` names)."""

    last_hidden_state: jax.Array  # [B, T, D], after the final norm
    cache: KVCache | None
    hidden_states: tuple[jax.Array, ...] = ()  # embeddings, each layer's output, the final norm's (HF order)
    attentions: tuple[jax.Array, ...] = ()  # per layer [B, N, T, S]


@dataclasses.dataclass
class _PerLayer:
    """What the layer loop / scan collects: each layer's keys and values (a list, or stacked `[L, ...]`), inputs
    (for `hidden_states`) and probabilities."""

    keys: list | jax.Array | None
    values: list | jax.Array | None
    hidden_states: list
    attentions: list


def decoder_mask(attention_mask_BT, cache: KVCache | None, cache_empty: bool, T: int):
    """The mask of this call's T queries: causal over absolute slots (query t sits at slot start + t and sees slots
    <= its own), padding slots excluded. Returns (mask, this call's real tokens `[B, T]`, the queries' slots `[T]`)."""
    valid_BT = attention_mask_BT.astype(bool)
    if cache is None:
        start = 0
        key_valid_BS, S = valid_BT, T
    else:
        start = 0 if cache_empty else cache.length
        key_valid_BS = jax.lax.dynamic_update_slice(cache.mask_BS, valid_BT, (0, start))
        S = cache.max_length
    query_slot_T = start + jnp.arange(T)
    causal_TS = jnp.arange(S)[None, :] <= query_slot_T[:, None]
    mask = DecoderMask(allowed_BTS=causal_TS[None] & key_valid_BS[:, None, :], key_valid_BS=key_valid_BS,
                       query_start=start)
    return mask, valid_BT, query_slot_T


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
                 output_hidden_states=False, output_attentions=False, cache_empty=False) -> TextOutput:
        """h = norm(layer_L(... layer_1(x))), every layer rotating q / k by the M-RoPE angles of `position_ids`.

        Without a cache, keys are this call's tokens. With a cache, this call's k / v are written at slots
        [cache.length, cache.length + T) and the queries attend to every filled, unmasked slot up to their own.
        `cache_empty=True` promises the cache holds nothing yet (a prefill), so the queries' first slot is known
        while tracing (0), which lets an attention backend use a causal kernel.
        """
        T = x_BTD.shape[1]
        cos_BTH, sin_BTH = mrope_cos_sin(position_ids_ZBT, self.config)
        mask, valid_BT, query_slot_T = decoder_mask(attention_mask_BT, cache, cache_empty, T)
        set_call("text", valid=valid_BT, position_ids=position_ids_ZBT, slots=query_slot_T)
        x_BTD = point("text.embed", constrain(x_BTD, RESIDUAL_AXES))
        run_layers = self._scan if self.scan_layers else self._loop
        x_BTD, per_layer = run_layers(x_BTD, cos_BTH, sin_BTH, mask, cache, output_hidden_states, output_attentions)
        x_BTD = point("text.final_norm", self.norm(x_BTD))
        if cache is not None:
            cache = cache.appended(per_layer.keys, per_layer.values, mask.key_valid_BS, T)
        hidden = (*per_layer.hidden_states, x_BTD) if output_hidden_states else ()  # HF: the last is after the norm
        return TextOutput(x_BTD, cache, hidden, tuple(per_layer.attentions))

    def paged(self, x_BTD, position_ids_ZBT, cache: PagedKVCache, batch: PagedBatch):
        """h = norm(layer_L(... layer_1(x))) over the serving engine's flat token axis (B = 1: several sequences'
        tokens, `batch` says whose), each layer writing its k / v to the paged cache and every sequence attending
        over its own pages. Returns (h `[1, T, D]`, the cache)."""
        cos_BTH, sin_BTH = mrope_cos_sin(position_ids_ZBT, self.config)
        x_BTD = constrain(x_BTD, RESIDUAL_AXES)
        if self.scan_layers:
            graphdef, params = nnx.split(self.layers)

            def body(x, xs):
                layer_params, kv = xs
                y, kv, _ = nnx.merge(graphdef, layer_params)(x, cos_BTH, sin_BTH, batch, kv)
                return y, kv

            x_BTD, pages = jax.lax.scan(body, x_BTD, (params, cache.pages))
        else:
            pages = []
            for layer, kv in zip(self.layers, cache.pages):
                x_BTD, kv, _ = layer(x_BTD, cos_BTH, sin_BTH, batch, kv)
                pages.append(kv)
        return self.norm(x_BTD), PagedKVCache(pages)

    def _remat(self, cache, output_attentions) -> str | None:
        """The remat policy this call runs each layer under: training forwards only (no cache, no probabilities,
        nothing recorded: values would leak out of the rematerialised function)."""
        plain = cache is None and not output_attentions and not recording()
        return self.remat if plain else None

    def _loop(self, x_BTD, cos_BTH, sin_BTH, mask, cache, output_hidden_states, output_attentions):
        """The layers one after the other (unrolled inside the jit)."""
        remat = self._remat(cache, output_attentions)
        out = _PerLayer([], [], [], [])
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                out.hidden_states.append(x_BTD)
            if remat is not None:
                x_BTD = checkpointed(remat)(layer, x_BTD, cos_BTH, sin_BTH, mask)[0]
                continue
            kv = None if cache is None else (cache.keys[i], cache.values[i])
            x_BTD, (k, v), probs = layer(x_BTD, cos_BTH, sin_BTH, mask, kv, mask.query_start,
                                         output_attentions=output_attentions)
            out.keys.append(k)
            out.values.append(v)
            if output_attentions:
                out.attentions.append(probs)
        return x_BTD, out

    def _scan(self, x_BTD, cos_BTH, sin_BTH, mask, cache, output_hidden_states, output_attentions):
        """The layers as one `jax.lax.scan` over the stacked parameters (and the stacked cache): one compiled
        block. Per-layer outputs (keys / values, hidden states, probabilities) come back stacked `[L, ...]`."""
        if active():
            raise HookError("hook points name each layer, and a scan_layers=True model runs one block for all of "
                            "them: load with scan_layers=False to use hooks")
        graphdef, params = nnx.split(self.layers)
        remat = self._remat(cache, output_attentions)

        def body(x, xs):
            layer_params, kv = xs
            layer = nnx.merge(graphdef, layer_params)
            if remat is not None:
                y = checkpointed(remat)(layer, x, cos_BTH, sin_BTH, mask)[0]
                return y, (None, None, x if output_hidden_states else None)
            y, (k, v), probs = layer(x, cos_BTH, sin_BTH, mask, kv, mask.query_start,
                                     output_attentions=output_attentions)
            # without a cache, this call's k / v are not kept (stacking them would hold every layer's)
            return y, ((k, v) if kv is not None else None, probs, x if output_hidden_states else None)

        kv_L = None if cache is None else (cache.keys, cache.values)
        x_BTD, (kv_L, probs_L, hidden_L) = jax.lax.scan(body, x_BTD, (params, kv_L))
        keys, values = kv_L if kv_L is not None else (None, None)
        return x_BTD, _PerLayer(keys, values, [] if hidden_L is None else list(hidden_L),
                                [] if probs_L is None else list(probs_L))
