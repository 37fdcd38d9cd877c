"""`Qwen2VL`: vision tower + decoder + LM head, the host-side input preparation and the embedding merge. One class
for both families: `config.model_type` "qwen2_5_vl" (Qwen2.5-VL, transformers `Qwen2_5_VLForConditionalGeneration`)
changes only the vision blocks (`vision.py`) and the video positions (`rope.get_rope_index`).

Data flow of one forward (transformers 4.57 `Qwen2VLModel.forward`), host steps in NumPy, device steps jitted:

    host:   input_ids [B,T] -> get_rope_index -> position_ids [3,B,T], rope_deltas [B,1]
            image/video grids -> VisionLayout (positions, segments, bucket padding); token -> feature index
            (`inputs.prepare_inputs`)
    device: visual(pixels) -> features [M,D]; embed(ids) with features scattered into the <|image_pad|> /
            <|video_pad|> slots in order -> decoder with M-RoPE -> final norm -> lm_head -> logits [B,T,V]
            (`Qwen2VL.forward`, compiled by `programs.py`)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..attention import PagedBatch
from ..attention import resolve as resolve_attention
from . import programs
from .config import Qwen2VLConfig
from .hook_points import HookSet, point
from .inputs import PreparedInputs, as_2d_ids, prepare_inputs
from .kv_cache import KVCache
from .layers import Linear
from .module import remat_policy
from .paged_cache import PagedKVCache
from .parameters import model_params
from .partitioning import active as use_partitioning
from .partitioning import constrain
from .rope import get_rope_index
from .text import TextModel
from .vision import VisionTransformer


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ForwardOutput:
    """What the device forward returns (`Qwen2VL.forward`; the compiled program adds `records`)."""

    logits: jax.Array  # [B, T, V] (T: the last `logits_to_keep` positions when given)
    cache: KVCache | None = None
    hidden_states: tuple[jax.Array, ...] = ()  # embeddings, each layer's output, final norm (HF order)
    attentions: tuple[jax.Array, ...] = ()  # per layer [B, N, T, S]
    records: dict[str, jax.Array] = dataclasses.field(default_factory=dict)  # values recorded at hook points


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
        return self.language_model.embed_tokens.dtype

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
        """M-RoPE positions `[3, B, S]` and rope deltas `[B, 1]` (`rope.get_rope_index`); Qwen2.5-VL spaces
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
                logits_to_keep: int = 0, cache_empty=False) -> ForwardOutput:
        """logits = lm_head(decoder(embed(ids) with the vision features in the placeholder slots)).

        Pure device math (transformers 4.57 `Qwen2VLForConditionalGeneration.forward`): logits of the last
        `logits_to_keep` positions (0: all). `vision_MD`: merged vision features, `vision_index_BT` the feature row
        of each slot (-1: text). `cache_empty`: the cache holds nothing yet (a prefill; see `TextModel.__call__`)."""
        with use_partitioning(self.partitioning):
            x_BTD = self.embed(input_ids_BT, vision_MD, vision_index_BT)
            out = self.language_model(x_BTD, position_ids_ZBT, attention_mask_BT, cache,
                                      output_hidden_states=output_hidden_states,
                                      output_attentions=output_attentions, cache_empty=cache_empty)
            logits_BTV = point("logits", self.logits(out.last_hidden_state, logits_to_keep))
        return ForwardOutput(logits_BTV, out.cache, out.hidden_states, out.attentions)

    def forward_paged(self, input_ids_BT, position_ids_ZBT, vision_MD, vision_index_BT, cache: PagedKVCache,
                      batch: PagedBatch, logit_rows_R):
        """The serving engine's forward (`qwen2vl_jax.engine`): several sequences' tokens on one flat token axis
        (B = 1), keys and values in a paged cache (`TextModel.paged`), logits of the rows `logit_rows_R` only.
        Same math as `forward`: logits = lm_head(decoder(embed(ids) with the vision features in their slots)).
        Returns (logits `[R, V]`, the cache)."""
        with use_partitioning(self.partitioning):
            x_BTD = self.embed(input_ids_BT, vision_MD, vision_index_BT)
            h_BTD, cache = self.language_model.paged(x_BTD, position_ids_ZBT, cache, batch)
            logits_BRV = self.logits(h_BTD[:, logit_rows_R])
        return logits_BRV[0], cache

    def init_paged_cache(self, num_pages: int, page_size: int, dtype=None) -> PagedKVCache:
        """An empty paged cache for the serving engine (page 0: the null page)."""
        return PagedKVCache.init(self.config.text_config, num_pages, page_size, dtype or self.dtype,
                                 stacked=self.config.scan_layers)

    def embed(self, input_ids_BT, vision_MD=None, vision_index_BT=None):
        """Token embeddings `[B, T, D]`, the vision features scattered into their slots in order (transformers
        `get_placeholder_mask` + `masked_scatter`, as an index computed on the host)."""
        x_BTD = self.language_model.embed_tokens(input_ids_BT)
        if vision_MD is None:
            return x_BTD
        features_BTD = vision_MD.astype(x_BTD.dtype)[jnp.maximum(vision_index_BT, 0)]
        return jnp.where(vision_index_BT[..., None] >= 0, features_BTD, x_BTD)

    def logits(self, h_BTD, logits_to_keep: int = 0):
        """`lm_head(h)` of the last `logits_to_keep` positions (generation needs one row, not `[T, V]`); the tied
        embedding when there is no head."""
        if logits_to_keep:
            h_BTD = h_BTD[:, -logits_to_keep:]
        logits_BTV = self.lm_head(h_BTD) if self.lm_head is not None else self.language_model.embed_tokens.attend(h_BTD)
        return constrain(logits_BTV, ("batch", "seq", "vocab"))

    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, position_ids=None, cache: KVCache | None = None,
                 *, output_hidden_states: bool = False, output_attentions: bool = False,
                 hooks: HookSet | None = None, second_per_grid_ts=None, logits_to_keep: int = 0) -> Qwen2VLOutput:
        """HF-style forward. With `cache`, this call's tokens are appended to it (prefill when it is empty,
        then one or more decode tokens whose positions continue from the cache: slot + rope_delta).

        `hooks`: a `hook_points.HookSet` (exact names; `qwen2vl_jax.hooks` builds them from patterns): its hooks
        edit values inside the jitted forward and the names it records come back in `.records` (vision values
        cut to the real rows, `vision_layout.trim_records`). `second_per_grid_ts`: Qwen2.5-VL's seconds per temporal
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
        out = programs.forward(
            self, prep.input_ids_BT, prep.attention_mask_BT, prep.position_ids_ZBT, vision, prep.vision_index_BT,
            cache, text_hooks or None, output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            logits_to_keep=logits_to_keep, cache_empty=cache is not None and not decoding)
        return Qwen2VLOutput(logits=out.logits, rope_deltas=prep.rope_deltas_B1, cache=out.cache,
                             hidden_states=out.hidden_states if output_hidden_states else None,
                             attentions=out.attentions if output_attentions else None,
                             records={**records, **out.records} if hooks is not None else None)
