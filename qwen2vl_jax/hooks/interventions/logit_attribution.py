"""Direct logit attribution: how much each part of the model wrote into one token's logit, down to the heads and,
through the attention pattern, the key tokens (an image's tokens on the photo). TransformerLens'
`ActivationCache.decompose_resid`, `stack_head_results`, `apply_ln_to_stack` and `logit_attrs`, for this model.

    attr = direct_logit_attribution(model, token_id, **inputs)          # {component: contribution}, batch row 0
    attr["embed"], attr["text.layers.3.attn_out"], attr["text.layers.3.attn.head.5"], attr["text.layers.3.mlp_out"]
    diff = direct_logit_attribution(model, (yes_id, no_id), **inputs)    # logit(yes) - logit(no)
    per_key = source_attribution(model, token_id, layer=3, head=5, **inputs)              # [S]: per key token
    heat = image_token_heatmap(model, token_id, layer=3, head=5, image_sizes=[photo], processor=processor, **inputs)
    heat.plot(photo)                                                       # which image tokens wrote the logit

`inputs` are the processor's outputs; everything is read from one forward (`run_with_cache`), or from `cache=` (a
`run_with_cache` dict holding `attribution_points(model, ...)`), so several calls can share one forward.

The decomposition (dimension key: the package docstring). The decoder only ever adds to its residual stream, so
the final residual at the query position is a sum of components, `text.layers.{L-1}.resid_post`:

    x = e + sum_i (a_i + m_i)      e: text.embed (the token's embedding, or the vision feature scattered into its
                                   slot), a_i / m_i: text.layers.{i}.attn_out / mlp_out
    logit = u . (w * x / r)        u: the unembedding row, lm_head.weight[token] (tied: embed_tokens.weight[token]);
                                   w: the final RMSNorm's weight; r = sqrt(mean(x^2) + eps) (transformers' Qwen2RMSNorm)

Freezing the norm's scale 1 / r at its value for the whole x (`apply_ln_to_stack`) makes the logit linear in the
components: component c contributes `c . d` with `d = w * u / r`, and the contributions of `embed`, every
`attn_out` and every `mlp_out` sum to the model's logit up to float rounding. A component's contribution is its
*direct* effect only: what it writes into the logit itself, not what it does through later layers.

Heads (`stack_head_results`): attention's output is o_proj over the concatenated heads, so with head n's output
`z_n = attn.head_out[.., n, :]` and `W_O[:, nH:(n+1)H]` its block of o_proj's columns, `a_i = sum_n W_O_n z_n`
(+ o_proj's bias): head n contributes `z_n . (W_O_n^T d)`, and the heads sum to `attn_out`'s term. Qwen2's o_proj
has no bias; a model whose o_proj has one gets one more entry, `text.layers.{i}.attn.bias`, so that heads + bias
sum to `attn_out`. The weights are the ones the forward multiplies by: dequantized when weight-only quantized
(`layers.dequantized`), with a LoRA adapter's `scaling * B @ A` added (the adapter is linear in its input).

Key positions: head n's output at query q is `z_n[q] = sum_s p_n[q, s] v_{n // G}[s]` (`attn.probs`, `attn.v`;
grouped-query attention: query head n reads kv head n // G, transformers' `repeat_kv`), so its contribution splits
over the key positions s as `p_n[q, s] * (v_{n // G}[s] . W_O_n^T d)`, summing to the head's term (v's bias is
inside v and the probabilities of a row sum to one). `image_token_heatmap` lays one image's share of that on its
merged token grid (`geometry.vision_token_geometry`), ready to draw on the photo.

The logit of a difference: `token_id=(a, b)` uses `u = W_U[a] - W_U[b]` (the contributions then sum to
logit(a) - logit(b)); `direction=` takes any `[D]` vector u in the space the LM head reads (after the final norm),
e.g. a probe's direction, for the "logit" `u . final_norm(x)`.

Precision: the values come from the forward in the model's dtype; the decomposition runs in float64 on the host.
An fp32 model's components sum to its logit within fp32 rounding (the tests: 1e-5 relative); a bf16 model adds
its residual stream in bf16, so the sum then matches within bf16 rounding only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from ...modeling.hook_points import HookError
from ...modeling.layers import dequantized
from ..geometry import VisionTokens, axes_or_new, heatmap_on_image, image_array, vision_token_geometry
from ..run import run_with_cache

__all__ = ["direct_logit_attribution", "source_attribution", "image_token_heatmap", "decompose_resid",
           "attribution_points", "ImageHeatmap"]


# ----------------------------------------------------------------------------------------------- what is read
def attribution_points(model, source_layers: Iterable[int] = ()) -> list[str]:
    """The hook point names this module reads: `text.embed`, every layer's `attn_out`, `mlp_out` and
    `attn.head_out`, the last layer's `resid_post` (the final residual), and for each of `source_layers` its
    `attn.probs` and `attn.v` (the per-key-position split). Record them with `run_with_cache` and pass the dict as
    `cache=` to share one forward between calls."""
    L = model.config.text_config.num_hidden_layers
    names = ["text.embed"]
    for i in range(L):
        names += [f"text.layers.{i}.attn_out", f"text.layers.{i}.attn.head_out", f"text.layers.{i}.mlp_out"]
    names.append(f"text.layers.{L - 1}.resid_post")
    for i in _layers(model, source_layers):
        names += [f"text.layers.{i}.attn.probs", f"text.layers.{i}.attn.v"]
    return names


def _layers(model, layers) -> list[int]:
    L = model.config.text_config.num_hidden_layers
    out = sorted({int(i) for i in layers})
    if any(not 0 <= i < L for i in out):
        raise HookError(f"layers {out}: this model has {L} decoder layers (0..{L - 1})")
    return out


def _values(model, names: list[str], cache: Mapping | None, inputs: dict) -> Mapping:
    """`cache` when given (it must hold `names`), else one forward recording them."""
    if cache is None:
        return run_with_cache(model, names, **inputs)[1]
    missing = [n for n in names if n not in cache]
    if missing:
        raise HookError(f"the cache lacks {missing[:3]}{'...' if len(missing) > 3 else ''}: record "
                        "attribution_points(model, ...) with run_with_cache")
    return cache


def _position(values: Mapping, position: int, inputs: Mapping) -> int:
    """`position` as a token index of batch row 0 (negative: from the end), checked to be a real token."""
    T = np.shape(values["text.embed"])[1]
    if not -T <= int(position) < T:
        raise HookError(f"position {position} out of range for {T} tokens")
    position = int(position) % T
    mask = inputs.get("attention_mask")
    if mask is not None and not np.asarray(mask)[0, position]:
        raise HookError(f"position {position} of row 0 is padding (attention_mask 0)")
    return position


def _at(values: Mapping, name: str, position: int) -> np.ndarray:
    """`values[name]` of batch row 0 at token `position`, float64."""
    return np.asarray(values[name][0, position], np.float64)


# ------------------------------------------------------------------------------------------ weights, direction
def _weight(module, rows=None) -> np.ndarray:
    """The float64 weight `[O, I]` (or its `rows`) a Linear / Embed multiplies by: dequantized when quantized, plus
    a LoRA adapter's `scaling * B @ A` (peft `LoraLayer.get_delta_weight`)."""
    w = module.weight[...]
    scale = None if module.scale is None else module.scale[...]
    if rows is not None:
        w, scale = w[rows], None if scale is None else scale[rows]
    w_OI = np.asarray(w if scale is None else dequantized(w, scale), np.float64)
    lora = getattr(module, "lora", None)
    if lora is not None:
        b_OR = np.asarray(lora.lora_B[...], np.float64)
        w_OI = w_OI + lora.scaling * (b_OR if rows is None else b_OR[rows]) @ np.asarray(lora.lora_A[...], np.float64)
    return w_OI


def _unembedding(model, token_id, direction) -> np.ndarray:
    """u `[D]` float64: the LM head's row of `token_id`, the difference of two rows for a pair, or `direction`."""
    D, V = model.config.text_config.hidden_size, model.config.text_config.vocab_size
    if (token_id is None) == (direction is None):
        raise HookError("give exactly one of token_id (a token id, or a pair (a, b) for logit(a) - logit(b)) and "
                        "direction (a [D] vector the LM head reads)")
    if direction is not None:
        u_D = np.asarray(direction, np.float64)
        if u_D.shape != (D,):
            raise HookError(f"direction must have shape ({D},), got {u_D.shape}")
        return u_D
    ids = np.asarray(token_id).reshape(-1)
    if ids.size not in (1, 2) or not np.issubdtype(ids.dtype, np.integer):
        raise HookError(f"token_id must be a token id or a pair of ids (a, b), got {token_id!r}")
    if ((ids < 0) | (ids >= V)).any():
        raise HookError(f"token ids {ids.tolist()} out of range for a vocabulary of {V}")
    head = model.lm_head if model.lm_head is not None else model.language_model.embed_tokens  # tied: the embedding
    rows_XD = _weight(head, ids)
    return rows_XD[0] if ids.size == 1 else rows_XD[0] - rows_XD[1]


def _logit_direction(model, values: Mapping, position: int, token_id, direction) -> np.ndarray:
    """d `[D]` float64: the residual-stream direction whose dot product with a component is its contribution,
    `d = w * u / r` with the final RMSNorm's scale frozen at its value for the whole final residual."""
    L = model.config.text_config.num_hidden_layers
    norm = model.language_model.norm
    x_D = _at(values, f"text.layers.{L - 1}.resid_post", position)
    r = np.sqrt(np.mean(x_D * x_D) + norm.eps)  # transformers Qwen2RMSNorm: x * rsqrt(mean(x^2) + eps) * weight
    return np.asarray(norm.weight[...], np.float64) * _unembedding(model, token_id, direction) / r


def _o_proj_NHD(model, layer: int) -> np.ndarray:
    """o_proj's weight `[D, N * H]` of `layer` as per-head blocks `[N, H, D]` (W_O_n^T)."""
    attn = model.language_model.layers[layer].self_attn
    w_DX = _weight(attn.o_proj)
    return w_DX.T.reshape(attn.num_heads, attn.head_dim, -1)


def _o_proj_bias(model, layer: int) -> np.ndarray | None:
    bias = model.language_model.layers[layer].self_attn.o_proj.bias
    return None if bias is None else np.asarray(bias[...], np.float64)


# -------------------------------------------------------------------------------------------------- residual
def decompose_resid(model, position: int = -1, *, cache: Mapping | None = None, **inputs
                    ) -> tuple[list[str], np.ndarray]:
    """The final residual stream of batch row 0 at `position` as its components (TransformerLens
    `decompose_resid`): `(names, components [C, D] float64)` with names `"embed"`, then per layer
    `"text.layers.{i}.attn_out"`, `"text.layers.{i}.mlp_out"`. They sum to `text.layers.{L-1}.resid_post`, and the
    first 1 + 2(i + 1) of them to the residual after layer i."""
    L = model.config.text_config.num_hidden_layers
    names = ["text.embed"] + [f"text.layers.{i}.{part}" for i in range(L) for part in ("attn_out", "mlp_out")]
    values = _values(model, names + [f"text.layers.{L - 1}.resid_post"], cache, inputs)
    position = _position(values, position, inputs)
    return ["embed"] + names[1:], np.stack([_at(values, name, position) for name in names])


def direct_logit_attribution(model, token_id=None, position: int = -1, *, direction=None,
                             cache: Mapping | None = None, **inputs) -> dict[str, float]:
    """Direct logit attribution for batch row 0 at token `position` (default: the last, whose logits predict the
    next token): `{component: contribution}` in the model's order.

    Components: `"embed"`, and per layer `"text.layers.{i}.attn_out"`, its heads `"text.layers.{i}.attn.head.{n}"`
    (+ `"text.layers.{i}.attn.bias"` if o_proj has a bias), `"text.layers.{i}.mlp_out"`. `embed` and the
    `attn_out` / `mlp_out` terms sum to the logit; a layer's head terms (+ bias) sum to its `attn_out` term.

    What is attributed: `token_id` (an id: its logit; a pair `(a, b)`: logit(a) - logit(b)), or `direction` (a
    `[D]` vector u in the LM head's input space: `u . final_norm(x)`). `cache`: a `run_with_cache` dict holding
    `attribution_points(model)` (else `inputs`, the processor's outputs, are run once)."""
    L = model.config.text_config.num_hidden_layers
    values = _values(model, attribution_points(model), cache, inputs)
    position = _position(values, position, inputs)
    d_D = _logit_direction(model, values, position, token_id, direction)
    out = {"embed": float(_at(values, "text.embed", position) @ d_D)}
    for i in range(L):
        prefix = f"text.layers.{i}"
        out[f"{prefix}.attn_out"] = float(_at(values, f"{prefix}.attn_out", position) @ d_D)
        z_NH = _at(values, f"{prefix}.attn.head_out", position)
        head_N = np.einsum("nh,nhd,d->n", z_NH, _o_proj_NHD(model, i), d_D)
        out.update({f"{prefix}.attn.head.{n}": float(v) for n, v in enumerate(head_N)})
        bias_D = _o_proj_bias(model, i)
        if bias_D is not None:
            out[f"{prefix}.attn.bias"] = float(bias_D @ d_D)
        out[f"{prefix}.mlp_out"] = float(_at(values, f"{prefix}.mlp_out", position) @ d_D)
    return out


# ---------------------------------------------------------------------------------------------- key positions
def _source_NS(model, values: Mapping, layer: int, position: int, d_D: np.ndarray) -> np.ndarray:
    """`[N, S]`: head n's contribution through key position s, `p_n[q, s] * (v_{n // G}[s] . W_O_n^T d)`."""
    prefix = f"text.layers.{layer}.attn"
    probs_NS = np.asarray(values[f"{prefix}.probs"][0, :, position], np.float64)
    v_SKH = np.asarray(values[f"{prefix}.v"][0], np.float64)
    N, K = probs_NS.shape[0], v_SKH.shape[1]
    v_SNH = np.repeat(v_SKH, N // K, axis=1)  # query head n reads kv head n // G (transformers `repeat_kv`)
    written_NH = np.einsum("nhd,d->nh", _o_proj_NHD(model, layer), d_D)  # W_O_n^T d
    return probs_NS * np.einsum("snh,nh->ns", v_SNH, written_NH)


def _component_name(layer, head) -> str:
    if layer is None:
        return "text.layers.*.attn"
    return f"text.layers.{layer}.attn" + ("" if head is None else f".head.{head}")


def source_attribution(model, token_id=None, position: int = -1, *, layer: int | None = None,
                       head: int | None = None, direction=None, cache: Mapping | None = None, **inputs
                       ) -> np.ndarray:
    """Per key position `[S]` (float64, S = the prompt's tokens): the contribution to the logit at `position` of
    batch row 0 (`token_id` / `direction` as in `direct_logit_attribution`) that attention head `head` of `layer`
    moved from each key token (head=None: every head of the layer; layer=None: every head of every layer). The
    entries sum to that head's `direct_logit_attribution` term (a layer: its `attn_out` term, less o_proj's bias
    if it has one). `cache` needs `attribution_points(model, [layer])` (or the layer's `attn.probs` / `attn.v`,
    `text.embed` and the last `resid_post`)."""
    L, N = model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    if layer is None and head is not None:
        raise HookError("head needs a layer (layer=None sums every head of every layer)")
    if head is not None and not 0 <= int(head) < N:
        raise HookError(f"head {head}: this model has {N} heads per layer")
    layers = list(range(L)) if layer is None else _layers(model, [layer])
    names = ["text.embed", f"text.layers.{L - 1}.resid_post"] + [
        f"text.layers.{i}.attn.{part}" for i in layers for part in ("probs", "v")]
    values = _values(model, names, cache, inputs)
    position = _position(values, position, inputs)
    d_D = _logit_direction(model, values, position, token_id, direction)
    if head is not None:
        return _source_NS(model, values, layers[0], position, d_D)[int(head)]
    return sum(_source_NS(model, values, i, position, d_D).sum(0) for i in layers)


# ------------------------------------------------------------------------------------------------- on the photo
@dataclasses.dataclass
class ImageHeatmap:
    """One image's (or video's) share of `source_attribution`, on its merged token grid."""

    grid: np.ndarray  # float64 [t, h2, w2] (`geometry.merged_grid`): each token's contribution to the logit
    geometry: VisionTokens  # where those tokens sit in the photo
    component: str  # what moved them: "text.layers.{i}.attn.head.{n}", "text.layers.{i}.attn" or all layers'

    @property
    def total(self) -> float:
        """The image tokens' summed contribution."""
        return float(self.grid.sum())

    def on_image(self, frame: int = 0) -> np.ndarray:
        """The grid painted on the original photo, float64 `[H0, W0]` (`geometry.heatmap_on_image`)."""
        return heatmap_on_image(self.grid, self.geometry, frame=frame)

    def plot(self, image, *, ax=None, frame: int = 0, alpha: float = 0.6, cmap: str = "RdBu_r",
             title: str | None = None, colorbar: bool = True):
        """The photo (a video: its frame) with the contributions overlaid (`geometry.plot_attention`'s drawing,
        with a diverging colour map centred on zero: red raised the logit, blue lowered it); returns the Axes."""
        array = image_array(image, self.geometry)
        H0, W0 = self.geometry.original_size
        ax = axes_or_new(ax)
        extent = (0, W0, H0, 0)
        ax.imshow(array, extent=extent)
        limit = max(float(np.abs(self.grid).max()), 1e-30)
        shown = ax.imshow(self.on_image(frame), extent=extent, alpha=alpha, cmap=cmap, vmin=-limit, vmax=limit,
                          interpolation="nearest")
        if colorbar:
            ax.figure.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="contribution to the logit")
        ax.set_xlim(0, W0)
        ax.set_ylim(H0, 0)
        ax.set_title(self.component if title is None else title)
        ax.set_axis_off()
        return ax


def image_token_heatmap(model, token_id=None, position: int = -1, *, layer: int | None = None,
                        head: int | None = None, direction=None, image: int = 0,
                        geometry: VisionTokens | None = None, image_sizes: Sequence | None = None, processor=None,
                        cache: Mapping | None = None, **inputs) -> ImageHeatmap:
    """`source_attribution` over the tokens of one image, laid out on its merged token grid: which image tokens
    the chosen head(s) (`layer`, `head`: as in `source_attribution`) read to write the logit of `token_id` (or the
    difference / `direction`) at `position` of batch row 0. Returns an `ImageHeatmap` (`.grid` `[t, h2, w2]`,
    `.plot(photo)`); its sum is those tokens' total contribution.

    Which tokens: `geometry` (a `VisionTokens` from `geometry.vision_token_geometry`, an image's or a video's), or
    row 0's image number `image`, located from `inputs` with `image_sizes` (the original photos or their
    (height, width), flat over the batch; None: boxes in resized pixels) and `processor` (its pixel bounds)."""
    if geometry is None:
        if "input_ids" not in inputs:
            raise HookError("image_token_heatmap needs the processor's outputs (input_ids, image_grid_thw) or "
                            "geometry= to find the image tokens")
        found = [g for g in vision_token_geometry(
            inputs["input_ids"], inputs.get("image_grid_thw"), image_sizes, inputs.get("video_grid_thw"),
            config=model.config, attention_mask=inputs.get("attention_mask"), processor=processor,
            second_per_grid_ts=inputs.get("second_per_grid_ts")) if g.kind == "image"]
        if not -len(found) <= image < len(found):
            raise HookError(f"image {image}: batch row 0 has {len(found)} images")
        geometry = found[image]
    per_key_S = source_attribution(model, token_id, position, layer=layer, head=head, direction=direction,
                                   cache=cache, **inputs)
    if int(geometry.token_index_M.max()) >= per_key_S.shape[0]:
        raise HookError(f"{geometry.kind} {geometry.index}'s tokens reach column {int(geometry.token_index_M.max())}"
                        f" but the prompt has {per_key_S.shape[0]} tokens (geometry from another prompt?)")
    grid = per_key_S[geometry.token_index_M].reshape(geometry.merged_grid)
    return ImageHeatmap(grid, geometry, _component_name(layer, head))
