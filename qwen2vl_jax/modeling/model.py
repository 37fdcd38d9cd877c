"""`Qwen2VL`: vision tower + decoder + LM head, the host-side input preparation and the embedding merge. One class
for both families: `config.model_type` "qwen2_5_vl" (Qwen2.5-VL, transformers `Qwen2_5_VLForConditionalGeneration`)
changes only the vision blocks (`vision.py`) and the video positions (`rope_index.py`).

Data flow of one forward (transformers 4.57 `Qwen2VLModel.forward`), host steps in NumPy, device steps jitted:

    host:   input_ids [B,T] -> get_rope_index -> position_ids [3,B,T], rope_deltas [B,1]
            image/video grids -> VisionLayout (positions, segments, bucket padding); token -> feature index
    device: visual(pixels) -> features [M,D]; embed(ids) with features scattered into the <|image_pad|> /
            <|video_pad|> slots in order -> decoder with M-RoPE -> final norm -> lm_head -> logits [B,T,V]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..attention import resolve as resolve_attention
from .config import Qwen2VLConfig
from .hook_points import HookSet, install, point
from .inputs import PreparedInputs, as_2d_ids, prepare_inputs
from .kv_cache import KVCache
from .layers import Linear
from .parameters import model_params, remat_policy
from .partitioning import active as use_partitioning
from .partitioning import constrain
from .rope import get_rope_index
from .text import TextModel
from .vision import VisionTransformer

TRACE_COUNTS: dict[str, int] = {"forward": 0}


@dataclasses.dataclass
class Qwen2VLOutput:
    """What a forward returns (HF `Qwen2VLCausalLMOutputWithPast` names)."""

    logits: jax.Array  # [B, T, V]
    rope_deltas: np.ndarray  # [B, 1]
    cache: KVCache | None = None
    hidden_states: tuple[jax.Array, ...] | None = None  # embeddings, each layer's output, final norm (HF order)
    attentions: tuple[jax.Array, ...] | None = None  # per layer [B, N, T, S]
    records: dict[str, jax.Array] | None = None  # values recorded at hook points (`hooks=`), by name


class Qwen2VL(nnx.Module):
    """Qwen2-VL's math: `visual` (the vision tower), `language_model` (the decoder) and `lm_head` (None when tied),
    with the host-side input preparation and the forward (transformers 4.57 `Qwen2VLForConditionalGeneration`).

    Loading, saving and `generate` are not here: `Qwen2VLForConditionalGeneration` (`qwen2vl_jax.pretrained`) adds
    them as HF-style methods; `qwen2vl_jax.generation.decoding.generate(model, ...)` takes any `Qwen2VL`.
    """

    def __init__(self, config: Qwen2VLConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        if config.attn_implementation is not None:  # an unknown or unusable backend fails here, by name
            resolve_attention(config.attn_implementation)
        self.config = config
        attn = config.attn_implementation
        self.visual = VisionTransformer(config.vision_config, param_dtype=param_dtype, rngs=rngs,
                                        attn_implementation=attn, scan_layers=config.scan_layers)
        self.language_model = TextModel(config.text_config, param_dtype=param_dtype, rngs=rngs,
                                        attn_implementation=attn, scan_layers=config.scan_layers)
        t = config.text_config
        self.lm_head = None if config.tie_word_embeddings else Linear(
            t.hidden_size, t.vocab_size, use_bias=False, axes=("vocab", "embed"), param_dtype=param_dtype, rngs=rngs)
        # a mesh and its rules (`sharding.set_partitioning`): activations and the KV cache are constrained by them
        self.partitioning = None

    @property
    def dtype(self):
        return self.language_model.embed_tokens.weight.dtype

    def set_attn_implementation(self, name: str | None) -> None:
        """Switch the attention backend of every layer (`qwen2vl_jax.attention`; None: the platform default).
        The next call compiles anew for the new backend."""
        if name is not None:
            resolve_attention(name)
        self.config = self.config.replace(attn_implementation=name)
        for _, module in nnx.iter_modules(self):
            if hasattr(module, "attn_implementation"):
                module.attn_implementation = name

    def set_remat(self, policy: str | None = "nothing_saveable", *, vision: bool = True, text: bool = True) -> None:
        """Rematerialise each decoder layer and/or vision block in the backward pass (`jax.checkpoint` under the
        named `config.REMAT_POLICIES` policy; None turns it off). Forward values are unchanged; only forward
        passes without a KV cache or attention probabilities are rematerialised (training)."""
        if policy is not None:
            remat_policy(policy)  # validates the name
        if text:
            self.language_model.remat = policy
        if vision:
            self.visual.remat = policy

    def init_cache(self, batch: int, max_length: int, dtype=None) -> KVCache:
        """An empty cache (stacked for a `scan_layers=True` model; on its shards under a mesh)."""
        return KVCache.init(self.config.text_config, batch, max_length, dtype or self.dtype,
                            stacked=self.config.scan_layers, partitioning=self.partitioning)

    def num_params(self) -> dict[str, int]:
        counts = {"visual": 0, "language_model": 0, "lm_head": 0}
        for path, p in model_params(self).items():
            counts[path.split(".")[0]] += int(np.prod(p.shape))
        counts["total"] = sum(counts.values())
        return counts

    # --------------------------------------------------------------------------------------- host inputs
    def get_rope_index(self, input_ids, image_grid_thw=None, video_grid_thw=None, attention_mask=None, *,
                       second_per_grid_ts=None):
        """M-RoPE positions `[3, B, S]` and rope deltas `[B, 1]` (`rope_index.get_rope_index`); Qwen2.5-VL spaces
        video positions by `second_per_grid_ts` (the processor's), Qwen2-VL ignores it."""
        return get_rope_index(input_ids, image_grid_thw, video_grid_thw, attention_mask, self.config,
                              second_per_grid_ts=second_per_grid_ts)

    def prepare_inputs(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                       pixel_values_videos=None, video_grid_thw=None, position_ids=None, *,
                       decoding: bool = False, second_per_grid_ts=None) -> PreparedInputs:
        """`inputs.prepare_inputs` for this model's config: everything laid out on the host."""
        return prepare_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw,
                              pixel_values_videos, video_grid_thw, position_ids, decoding=decoding,
                              second_per_grid_ts=second_per_grid_ts)

    # ---------------------------------------------------------------------------------------- the math
    def forward(self, input_ids_BT, attention_mask_BT, position_ids_ZBT, vision_MD=None, vision_index_BT=None,
                cache: KVCache | None = None, *, output_hidden_states=False, output_attentions=False,
                logits_to_keep: int = 0, cache_empty=False):
        """Pure device math: embeddings (+ scattered vision features), decoder, logits (of the last
        `logits_to_keep` positions; 0: all, as transformers 4.57 `Qwen2VLForConditionalGeneration.forward`).
        `cache_empty`: the cache holds nothing yet (a prefill; see `TextModel.__call__`)."""
        with use_partitioning(self.partitioning):
            return self._forward(input_ids_BT, attention_mask_BT, position_ids_ZBT, vision_MD, vision_index_BT, cache,
                                 output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                                 logits_to_keep=logits_to_keep, cache_empty=cache_empty)

    def _forward(self, input_ids_BT, attention_mask_BT, position_ids_ZBT, vision_MD, vision_index_BT, cache, *,
                 output_hidden_states, output_attentions, logits_to_keep, cache_empty):
        x_BTD = self.language_model.embed_tokens(input_ids_BT)
        if vision_MD is not None:
            features_BTD = vision_MD.astype(x_BTD.dtype)[jnp.maximum(vision_index_BT, 0)]
            x_BTD = jnp.where(vision_index_BT[..., None] >= 0, features_BTD, x_BTD)
        h_BTD, cache, hidden, attentions = self.language_model(
            x_BTD, position_ids_ZBT, attention_mask_BT, cache, output_hidden_states=output_hidden_states,
            output_attentions=output_attentions, cache_empty=cache_empty)
        if logits_to_keep:  # generation needs one row of logits, not [T, V]
            h_BTD = h_BTD[:, -logits_to_keep:]
        logits_BTV = self.lm_head(h_BTD) if self.lm_head is not None else self.language_model.embed_tokens.attend(h_BTD)
        logits_BTV = point("logits", constrain(logits_BTV, ("batch", "seq", "vocab")))
        return logits_BTV, cache, hidden, attentions

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, position_ids=None, cache: KVCache | None = None,
                 *, output_hidden_states: bool = False, output_attentions: bool = False,
                 hooks: HookSet | None = None, second_per_grid_ts=None, logits_to_keep: int = 0) -> Qwen2VLOutput:
        """HF-style forward. With `cache`, this call's tokens are appended to it (prefill when it is empty,
        then one or more decode tokens whose positions continue from the cache: slot + rope_delta).

        `hooks`: a `hook_points.HookSet` (exact names; `qwen2vl_jax.hooks` builds them from patterns): its hooks
        edit values inside the jitted forward and the names it records come back in `.records` (vision values
        cut to the real rows, `vision.trim_records`). `second_per_grid_ts`: Qwen2.5-VL's seconds per temporal
        patch of each video, from its processor (time-aligned video positions); Qwen2-VL ignores it.
        `logits_to_keep`: logits of the last this-many positions only (0: all; transformers 4.57's argument), so
        a long prefill into a cache need not hold [T, vocab] logits."""
        if not isinstance(logits_to_keep, int) or isinstance(logits_to_keep, bool) or logits_to_keep < 0:
            raise ValueError(f"logits_to_keep must be an integer >= 0, got {logits_to_keep!r}")
        decoding = cache is not None and int(cache.length) > 0
        if decoding and position_ids is None:
            ids = as_2d_ids(input_ids, self.config.text_config.vocab_size)
            slots = int(cache.length) + np.arange(ids.shape[1])
            deltas = np.asarray(cache.rope_deltas_B)[:, None]
            position_ids = np.broadcast_to(slots[None, :] + deltas, (3, *ids.shape))
        prep = self.prepare_inputs(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                                   video_grid_thw, position_ids, decoding=decoding,
                                   second_per_grid_ts=second_per_grid_ts)
        if cache is not None and not decoding:
            cache = dataclasses.replace(cache, rope_deltas_B=jnp.asarray(prep.rope_deltas_B1[:, 0], jnp.int32))
        vision, records = None, {}
        if prep.vision_pixels is not None:
            if hooks and hooks.only("vision."):
                vision, records = self.visual.run_hooked(prep.vision_pixels, prep.vision_layout, hooks.only("vision."))
            else:
                vision, _ = self.visual.run_padded(prep.vision_pixels, prep.vision_layout)
        text_hooks = hooks.only("vision.", keep=False) if hooks else None
        logits, cache, hidden, attentions, text_records = _forward_jit(
            self, prep.input_ids_BT, prep.attention_mask_BT, prep.position_ids_ZBT, vision, prep.vision_index_BT,
            cache, text_hooks or None, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            logits_to_keep=logits_to_keep, cache_empty=cache is not None and not decoding)
        return Qwen2VLOutput(logits=logits, rope_deltas=prep.rope_deltas_B1, cache=cache,
                             hidden_states=hidden if output_hidden_states else None,
                             attentions=attentions if output_attentions else None,
                             records={**records, **text_records} if hooks is not None else None)


def _forward_apply(model: Qwen2VL, ids, mask, pos, vision, vision_index, cache, hooks=None, *,
                   output_hidden_states=False, output_attentions=False, logits_to_keep=0, cache_empty=False):
    TRACE_COUNTS["forward"] += 1  # runs once per compile
    with install(hooks) as run:
        out = model.forward(ids, mask, pos, vision, vision_index, cache, output_hidden_states=output_hidden_states,
                            output_attentions=output_attentions, logits_to_keep=logits_to_keep,
                            cache_empty=cache_empty)
    return (*out, run.records)


_STATIC = ("output_hidden_states", "output_attentions", "logits_to_keep", "cache_empty")
_forward_jit = jax.jit(_forward_apply, static_argnames=_STATIC, donate_argnames=("cache",))
