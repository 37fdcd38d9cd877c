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

from .attention import resolve as resolve_attention
from .config import Qwen2VLConfig
from .hook_points import HookSet, install, point
from .layers import Linear, model_params, remat_policy
from .partitioning import active as use_partitioning
from .partitioning import constrain
from .rope_index import get_rope_index
from .text import KVCache, TextModel
from .vision import VisionLayout, VisionTransformer

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


@dataclasses.dataclass
class PreparedInputs:
    """Host-side NumPy inputs of one forward / prefill."""

    input_ids_BT: np.ndarray  # int32
    attention_mask_BT: np.ndarray  # int32
    position_ids_ZBT: np.ndarray  # int32
    rope_deltas_B1: np.ndarray  # int64
    vision_pixels: np.ndarray | None = None  # padded patch rows, images then videos
    vision_layout: VisionLayout | None = None
    vision_index_BT: np.ndarray | None = None  # int32: row of the vision features for each slot, -1 for text


def _as_2d_ids(input_ids, vocab_size: int) -> np.ndarray:
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be a non-empty integer array [batch, seq], got {ids.dtype} {ids.shape}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, {vocab_size}), found min {ids.min()} max {ids.max()}")
    return ids


def as_attention_mask(attention_mask, shape: tuple[int, int]) -> np.ndarray:
    """`attention_mask` as a [B, T] array, the shape of input_ids (one 1-D row is accepted, like `input_ids`)."""
    mask = np.asarray(attention_mask)
    if mask.ndim == 1 and shape[0] == 1:
        mask = mask[None]
    if mask.shape != tuple(shape):
        raise ValueError(f"attention_mask must have the shape of input_ids [B, T] = {list(shape)}, "
                         f"got {list(mask.shape)}")
    return mask


def _check_vision_inputs(ids: np.ndarray, config: Qwen2VLConfig, pixel_values, pixel_values_videos,
                         decoding: bool) -> None:
    """Placeholders need pixels, and pixels must be finite. transformers 4.57 `Qwen2VLModel.forward` only checks
    the placeholder count when pixels are given (`get_placeholder_mask`); without pixels it would embed the
    placeholder ids as text, silently. We refuse instead, in `get_placeholder_mask`'s wording."""
    for kind, pv, token, noun in (("image", pixel_values, config.image_token_id, "Image features and image"),
                                  ("video", pixel_values_videos, config.video_token_id, "Videos features and video")):
        n_tokens = int((ids == token).sum())  # placeholder count, as get_placeholder_mask
        if pv is None and n_tokens and not decoding:
            raise ValueError(f"{noun} tokens do not match: tokens: {n_tokens}, features 0 (input_ids hold "
                             f"{n_tokens} {kind} placeholder token(s) but no pixel values were given: pass "
                             f"`{'pixel_values' if kind == 'image' else 'pixel_values_videos'}` and `{kind}_grid_thw` "
                             f"from the processor)")
        if pv is not None:
            arr = np.asarray(pv)
            if not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
                name = "pixel_values" if kind == "image" else "pixel_values_videos"
                what = f"dtype {arr.dtype}" if not np.issubdtype(arr.dtype, np.number) else "NaN or inf values"
                raise ValueError(f"`{name}` must be finite numbers, got {what}")


class Qwen2VL(nnx.Module):
    """Qwen2-VL's math: `visual` (the vision tower), `language_model` (the decoder) and `lm_head` (None when tied),
    with the host-side input preparation and the forward (transformers 4.57 `Qwen2VLForConditionalGeneration`).

    Loading, saving and `generate` are not here: `Qwen2VLForConditionalGeneration` (`qwen2vl_jax.pretrained`) adds
    them as HF-style methods; `qwen2vl_jax.generation.generate(model, ...)` takes any `Qwen2VL`.
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
        """Validate and lay out everything on the host: rope positions, vision layout, feature scatter index.
        `decoding`: these are tokens fed back after a prefill (generated ids need no pixels, as in HF).
        `second_per_grid_ts`: Qwen2.5-VL's seconds per temporal patch of each video (from its processor)."""
        cfg = self.config
        ids = _as_2d_ids(input_ids, cfg.text_config.vocab_size)
        mask = np.ones_like(ids) if attention_mask is None else as_attention_mask(attention_mask, ids.shape)
        _check_vision_inputs(ids, cfg, pixel_values, pixel_values_videos, decoding)
        if position_ids is None:
            pos, deltas = get_rope_index(ids, image_grid_thw, video_grid_thw, mask, cfg,
                                         second_per_grid_ts=second_per_grid_ts)
        else:
            pos = np.asarray(position_ids)
            if pos.ndim == 2:  # 1-D positions for all three axes
                pos = np.broadcast_to(pos, (3, *pos.shape))
            if pos.shape != (3, *ids.shape):
                raise ValueError(f"position_ids must be [3, {ids.shape[0]}, {ids.shape[1]}], got {pos.shape}")
            deltas = pos.max(axis=(0, 2))[:, None] + 1 - ids.shape[1]
        prep = PreparedInputs(ids.astype(np.int32), mask.astype(np.int32), pos.astype(np.int32), deltas)

        merge2 = cfg.vision_config.spatial_merge_size ** 2
        pixels, grids = [], []
        index = np.full(ids.shape, -1, np.int64)
        offset = 0
        for kind, pv, grid, token in (("Image", pixel_values, image_grid_thw, cfg.image_token_id),
                                      ("Video", pixel_values_videos, video_grid_thw, cfg.video_token_id)):
            if pv is None:
                continue
            if grid is None:
                raise ValueError(f"{kind.lower()} pixel values were given without {kind.lower()}_grid_thw")
            grid = np.asarray(grid).reshape(-1, 3)
            n_features = int((np.prod(grid, axis=-1) // merge2).sum())
            slots = ids == token
            n_tokens = int(slots.sum())
            if n_tokens != n_features:  # the reference's get_placeholder_mask check, same wording
                noun = "Image features and image" if kind == "Image" else "Videos features and video"
                raise ValueError(f"{noun} tokens do not match: tokens: {n_tokens}, features {n_features}")
            index[slots] = offset + np.arange(n_tokens)  # row-major over (B, T): masked_scatter order
            offset += n_features
            pixels.append(np.asarray(pv))
            grids.append(grid)
        if pixels:
            prep.vision_pixels, prep.vision_layout = self.visual.prepare(np.concatenate(pixels), np.concatenate(grids))
            prep.vision_index_BT = index.astype(np.int32)
        return prep

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
            ids = _as_2d_ids(input_ids, self.config.text_config.vocab_size)
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
