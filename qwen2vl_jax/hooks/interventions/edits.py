"""Ready interventions built on the hook points: head ablation, activation patching, steering, the logit lens.

Each builder returns a hooks mapping for `hooks.run_with_hooks` / `generate(hooks=...)` (merge several with
`{**a, **b}`, or lists for one point). The arrays they carry are `jax.tree_util.Partial` arguments, so a sweep
over heads, positions or vectors reuses one compiled program per hooked point set.

    out = run_with_hooks(model, ablate_heads(model, {3: [0, 5]}), **inputs)               # text layer 3, heads 0, 5
    out = run_with_hooks(model, ablate_heads(model, {0: [1]}, tower="vision"), **inputs)   # a vision head
    _, clean = run_with_cache(model, "text.layers.*.resid_post", **clean_inputs)
    out = run_with_hooks(model, patch(clean, ["text.layers.2.resid_post"], positions=[7]), **corrupt_inputs)
    ids = run_with_hooks(model, steer({4: vector}, scale=8.0), generate=True, max_new_tokens=32, **inputs)
    lens = logit_lens(model, cache)     # final norm + LM head on every layer's residual stream
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from ...modeling.hook_points import HookError, hook_point_axes
from ..run import run_with_cache, run_with_hooks

__all__ = ["ablate_heads", "mean_head_outputs", "patch", "activation_patching", "steer", "logit_lens", "LogitLens"]


def _tower_prefix(tower: str) -> str:
    if tower not in ("text", "vision"):
        raise HookError(f"tower must be 'text' or 'vision', got {tower!r}")
    return "text.layers" if tower == "text" else "vision.blocks"


def _heads_by_layer(heads) -> dict[int, list[int]]:
    if isinstance(heads, Mapping):
        return {int(layer): sorted({int(h) for h in hs}) for layer, hs in heads.items()}
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        out.setdefault(int(layer), []).append(int(head))
    return {layer: sorted(set(hs)) for layer, hs in out.items()}


# ------------------------------------------------------------------------------------------------ head ablation
def _zero_heads(heads_N, value, ctx):
    """`head_out [..., N, H]` with the chosen heads' outputs set to zero (= zeroing the o_proj / attn.proj input
    columns they feed)."""
    return jnp.where(heads_N[:, None], jnp.zeros((), value.dtype), value)


def _mean_heads_here(heads_N, value, ctx):
    """The chosen heads' outputs replaced by their mean over this input's real rows (all batch rows and tokens)."""
    rows_AN_H = value.reshape(-1, *value.shape[-2:]).astype(jnp.float32)
    valid_A = ctx.valid.reshape(-1) if ctx.valid is not None else jnp.ones(rows_AN_H.shape[0], bool)
    mean_NH = jnp.sum(jnp.where(valid_A[:, None, None], rows_AN_H, 0), axis=0) / jnp.maximum(valid_A.sum(), 1)
    return jnp.where(heads_N[:, None], mean_NH.astype(value.dtype), value)


def _fixed_heads(heads_N, mean_NH, value, ctx):
    return jnp.where(heads_N[:, None], mean_NH.astype(value.dtype), value)


def ablate_heads(model, heads: Mapping[int, Iterable[int]] | Iterable[tuple[int, int]], *, tower: str = "text",
                 mode: str = "zero", means: Mapping[int, np.ndarray] | None = None) -> dict[str, Callable]:
    """Hooks that ablate attention heads at `{tower}.*.attn.head_out` (the head outputs before `o_proj` /
    `attn.proj`). `heads`: `{layer: [head, ...]}` or `[(layer, head), ...]`.

    `mode="zero"`: the head's output is zero (exactly transformers with the head's input columns of `o_proj.weight`
    (text) / `attn.proj.weight` (vision) zeroed). `mode="mean"`: replaced by its mean over the real rows of the
    input being run, or by `means[layer]` (`[N, H]`, e.g. from `mean_head_outputs` on reference inputs).
    """
    prefix = _tower_prefix(tower)
    cfg = model.config.text_config if tower == "text" else model.config.vision_config
    n_layers = cfg.num_hidden_layers if tower == "text" else cfg.depth
    n_heads = cfg.num_attention_heads if tower == "text" else cfg.num_heads
    if mode not in ("zero", "mean"):
        raise HookError(f"mode must be 'zero' or 'mean', got {mode!r}")
    out = {}
    for layer, hs in _heads_by_layer(heads).items():
        if not 0 <= layer < n_layers or any(not 0 <= h < n_heads for h in hs):
            raise HookError(f"{tower} layer {layer}, heads {hs}: this model has {n_layers} layers of {n_heads} heads")
        mask_N = jnp.zeros(n_heads, bool).at[jnp.asarray(hs)].set(True)
        if mode == "zero":
            fn = Partial(_zero_heads, mask_N)
        elif means is None:
            fn = Partial(_mean_heads_here, mask_N)
        else:
            if layer not in means:
                raise HookError(f"mode='mean' with means: no mean for {tower} layer {layer}")
            fn = Partial(_fixed_heads, mask_N, jnp.asarray(means[layer]))
        out[f"{prefix}.{layer}.attn.head_out"] = fn
    return out


def mean_head_outputs(model, layers: Iterable[int] | None = None, *, tower: str = "text", **inputs
                      ) -> dict[int, np.ndarray]:
    """`{layer: [N, H]}` mean head outputs over the real rows of `inputs` (for `ablate_heads(mode="mean")`)."""
    prefix = _tower_prefix(tower)
    names = [f"{prefix}.{i}.attn.head_out" for i in layers] if layers is not None else [f"{prefix}.*.attn.head_out"]
    _, cache = run_with_cache(model, names, **inputs)
    out = {}
    for name, value in cache.items():
        value = np.asarray(value, np.float32)
        if tower == "text":
            mask = np.asarray(inputs.get("attention_mask", np.ones(value.shape[:2])), bool)
            value = value[mask]
        out[int(name.split(".")[2])] = value.reshape(-1, *value.shape[-2:]).mean(axis=0)
    return out


# -------------------------------------------------------------------------------------------- activation patching
def _patch_rows(source, where_T, token_axis, value, ctx):
    """`value` with the rows marked in `where_T` (on its token / patch-row axis) taken from `source`."""
    if source.shape[:token_axis] + source.shape[token_axis + 1:] != value.shape[:token_axis] + value.shape[
            token_axis + 1:] or source.shape[token_axis] > value.shape[token_axis] or (
            token_axis == 1 and source.shape != value.shape):
        raise HookError(f"patch {ctx.name}: the source value has shape {source.shape}, this run's {value.shape} "
                        "(patch between inputs of one shape)")
    if source.shape[token_axis] < value.shape[token_axis]:  # vision records are cut to the real rows; pad back
        pad = [(0, 0)] * source.ndim
        pad[token_axis] = (0, value.shape[token_axis] - source.shape[token_axis])
        source = jnp.pad(source, pad)
        where_T = jnp.pad(where_T, (0, value.shape[token_axis] - where_T.shape[0]))
    shape = [1] * value.ndim
    shape[token_axis] = -1
    return jnp.where(where_T.reshape(shape), source.astype(value.dtype), value)


def _patch_tokens(source, where_T, value, ctx):  # text points: [B, T, ...]
    return _patch_rows(source, where_T, 1, value, ctx)


def _patch_patches(source, where_P, value, ctx):  # vision points: [P, ...] / [M, D]
    return _patch_rows(source, where_P, 0, value, ctx)


def _positions_mask(positions, length: int) -> jnp.ndarray:
    if positions is None:
        return jnp.ones(length, bool)
    positions = np.asarray(positions)
    if positions.dtype == bool:
        if positions.shape != (length,):
            raise HookError(f"a boolean positions mask must have shape ({length},), got {positions.shape}")
        return jnp.asarray(positions)
    positions = positions.astype(np.int64).reshape(-1)
    if ((positions < -length) | (positions >= length)).any():
        raise HookError(f"positions {positions.tolist()} out of range for {length} tokens")
    return jnp.zeros(length, bool).at[jnp.asarray(positions % length)].set(True)


def patch(source: Mapping[str, object], names: Iterable[str] | None = None, *, positions=None) -> dict[str, Callable]:
    """Hooks that replace the values at `names` (default: every name in `source`) with `source`'s (a cache from
    `run_with_cache` on another input of the same shape), at `positions` only (token indices, or a bool mask over
    the tokens / patch rows; default: all). Attention probabilities cannot be patched by position."""
    names = list(source) if names is None else list(names)
    out = {}
    for name in names:
        if name not in source:
            raise HookError(f"patch: {name!r} is not in the source cache (record it with run_with_cache)")
        if name.endswith("attn.probs"):
            raise HookError(f"patch: {name!r}: attention probabilities are not patched by position")
        value = jnp.asarray(source[name])
        text = name.startswith("text.") or name == "logits"
        mask = _positions_mask(positions, value.shape[1 if text else 0])
        out[name] = Partial(_patch_tokens if text else _patch_patches, value, mask)
    return out


def _default_metric(target_token: int):
    def metric(logits_BTV):
        return jax.nn.log_softmax(jnp.asarray(logits_BTV[0, -1], jnp.float32))[target_token]
    return metric


def activation_patching(model, source_inputs: Mapping, target_inputs: Mapping, *, point: str = "resid_post",
                        layers: Iterable[int] | None = None, positions: Iterable[int] | None = None,
                        metric: Callable | None = None) -> np.ndarray:
    """For every (layer, position): run `target_inputs` with `text.layers.{layer}.{point}` at that one position
    taken from the run on `source_inputs`, and measure `metric(logits [B, T, V]) -> scalar`. Returns
    `[len(layers), len(positions)]`. Default metric: the log-probability, at the last position of row 0, of the
    token the source run predicts there (1 = recovers the source's answer). Both inputs need the same shape (and,
    to be meaningful, the same M-RoPE positions: same image sizes at the same places)."""
    n_layers = model.config.text_config.num_hidden_layers
    layers = list(range(n_layers)) if layers is None else [int(x) for x in layers]
    src_ids, tgt_ids = np.asarray(source_inputs["input_ids"]), np.asarray(target_inputs["input_ids"])
    if src_ids.shape != tgt_ids.shape:
        raise HookError(f"activation patching needs inputs of one shape: source {src_ids.shape}, target "
                        f"{tgt_ids.shape}")
    T = src_ids.shape[-1]
    positions = list(range(T)) if positions is None else [int(p) for p in positions]
    names = [f"text.layers.{i}.{point}" for i in layers]
    source_out, source = run_with_cache(model, names, **source_inputs)
    if metric is None:
        metric = _default_metric(int(np.argmax(np.asarray(source_out.logits[0, -1]))))
    result = np.zeros((len(layers), len(positions)), np.float32)
    for li, name in enumerate(names):
        for pi, p in enumerate(positions):
            out = run_with_hooks(model, patch(source, [name], positions=[p]), **target_inputs)
            result[li, pi] = float(metric(out.logits))
    return result


# ---------------------------------------------------------------------------------------------------- steering
def _add_vector(vector_D, where_T, scale, value, ctx):
    slots = ctx.slots if ctx.slots is not None else jnp.arange(value.shape[1])
    here_T = jnp.where(slots < where_T.shape[0], where_T[jnp.clip(slots, 0, where_T.shape[0] - 1)], where_T[-1])
    add = (scale * vector_D.astype(jnp.float32))[None, None, :] * here_T[None, :, None]
    return (value.astype(jnp.float32) + add).astype(value.dtype)


def steer(vectors: Mapping[int, object], *, scale: float = 1.0, point: str = "resid_post",
          positions: Iterable[int] | None = None, max_tokens: int = 65536) -> dict[str, Callable]:
    """Hooks adding `scale * vectors[layer]` (`[D]`) to `text.layers.{layer}.{point}` (a residual stream point:
    resid_pre / resid_mid / resid_post) at every token, or only at `positions` (token indices of the caller's
    sequence; generated tokens beyond them keep the last entry's choice, so `positions=None` steers every prompt
    and generated token). Works for one forward and in every decode step of `generate`."""
    if point not in ("resid_pre", "resid_mid", "resid_post"):
        raise HookError(f"steer adds to a residual stream point (resid_pre / resid_mid / resid_post), got {point!r}")
    if positions is None:
        where = jnp.ones(1, bool)
    else:
        p = np.asarray(list(positions), np.int64)
        where = jnp.zeros(int(p.max()) + 2, bool).at[jnp.asarray(p)].set(True)
    return {f"text.layers.{int(layer)}.{point}": Partial(_add_vector, jnp.asarray(v), where, jnp.float32(scale))
            for layer, v in vectors.items()}


# --------------------------------------------------------------------------------------------------- logit lens
@dataclasses.dataclass
class LogitLens:
    """Logits read off the residual stream after each layer. `layers[i]` names row i ("embed", then
    "text.layers.{l}.resid_post"); `logits_LBPV` fp32 for `positions` (token indices); the last row equals the
    model's logits."""

    layers: list[str]
    positions: list[int]
    logits_LBPV: np.ndarray

    def top_k(self, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """(`ids [L, B, P, k]`, `probs [L, B, P, k]`), most probable first."""
        ids = np.argsort(-self.logits_LBPV, axis=-1)[..., :k]
        z = self.logits_LBPV - self.logits_LBPV.max(-1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        return ids, np.take_along_axis(probs, ids, axis=-1)


@jax.jit
def _unembed(model, h_XD):
    """transformers `Qwen2VLForConditionalGeneration`: lm_head(norm(h)) (the tied head reuses embed_tokens)."""
    h_XD = model.language_model.norm(h_XD)
    if model.lm_head is not None:
        return model.lm_head(h_XD).astype(jnp.float32)
    return model.language_model.embed_tokens.attend(h_XD).astype(jnp.float32)


def logit_lens(model, cache: Mapping[str, object] | None = None, *, positions: Iterable[int] | None = (-1,),
               **inputs) -> LogitLens:
    """The logit lens: the final RMSNorm and LM head applied to `text.embed` and each layer's `resid_post`.

    `cache` from `run_with_cache` holding those points (or give `inputs` and it is recorded). `positions`: token
    indices (default: the last; None: all)."""
    axes = hook_point_axes(model.config)
    n = model.config.text_config.num_hidden_layers
    names = ["text.embed"] + [f"text.layers.{i}.resid_post" for i in range(n)]
    if cache is None:
        _, cache = run_with_cache(model, names, **inputs)
    missing = [name for name in names if name not in cache]
    if missing:
        raise HookError(f"logit_lens needs {missing[:3]}{'...' if len(missing) > 3 else ''} in the cache: record "
                        "'text.embed' and 'text.layers.*.resid_post'")
    assert all(axes[name] == "BTD" for name in names)
    T = np.asarray(cache[names[0]]).shape[1]
    positions = list(range(T)) if positions is None else [int(p) % T for p in positions]
    rows = [_unembed(model, jnp.asarray(cache[name])[:, positions]) for name in names]
    return LogitLens(["embed"] + names[1:], positions, np.stack([np.asarray(r) for r in rows]))
