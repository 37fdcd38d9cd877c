"""Gradients of a metric with respect to the values at hook points, and attribution patching (TransformerLens /
nnsight style, for a vision-language model: vision points and text points in one differentiated function).

    def logit_diff(out):                                   # any scalar of the output (`.logits` [B, T, V])
        return out.logits[0, -1, yes_id] - out.logits[0, -1, no_id]

    value, grads = gradients_at(model, ["text.layers.*.resid_post", "vision.blocks.0.resid_post"], logit_diff,
                                **inputs)
    grads["text.layers.1.resid_post"]                      # [B, T, D], d logit_diff / d resid_post
    estimates = attribution_patching(model, clean_inputs, corrupt_inputs, logit_diff, "text.layers.*.resid_post")
    estimates["text.layers.1.resid_post"]                  # [T]: the estimated effect of patching each position
    effects = patch_each(model, clean_inputs, corrupt_inputs, logit_diff, "text.layers.*.resid_post")   # the real one

How (nnsight's and TransformerLens' trick): every named point gets a hook `value + delta` whose `delta` (zeros of
the value's shape) is a traced argument (`jax.tree_util.Partial`), and `jax.value_and_grad` differentiates
`metric(forward(deltas))` at deltas = 0; the gradient with respect to `delta` is the gradient with respect to the
value there. The HF-style `model(...)` runs the vision tower and the decoder as two compiled programs
(`programs.vision`, then `programs.forward`); here the host-side preparation (`Qwen2VL.prepare_inputs`: rope
positions, the vision layout, the scatter index) runs once outside, and the two towers run inside one jitted,
differentiated function, as the training step does (`training.steps.batch_logits`). Vision gradients come back in
the rows `run_with_cache` records (`vision_layout.trim_records`: the real rows, in the layout's order).

Attention backends: nothing is switched. Every built-in backend is differentiable, as training relies on: the
native CPU kernels are forward-only and carry the `xla` formulation's gradient (`kernels.glue`, a
`jax.custom_vjp`), the Pallas kernels their own. A registered backend without gradients: run the model on `xla`
(`model.set_attn_implementation("xla")`) for the call. Per-block remat (`Qwen2VL.set_remat`, for training) is off
inside these programs; the model's setting is left as it is.

Compiles: one program per (hook names, input shapes, model, metric function); arrays a metric needs are best given
as `jax.tree_util.Partial(fn, array, ...)` (traced arguments, as for hooks), so a new target token reuses the
program where a new lambda compiles again. `compiles()` counts the programs.

Attribution patching (Neel Nanda's "Attribution Patching"; TransformerLens' demo of it): the effect of patching the
clean run's value into the corrupt run at a point is estimated, to first order, by
`(clean_value - corrupt_value) · d metric / d value`, the gradient taken on the corrupt run: one forward and one
backward on the corrupt input (`gradients_at`) and one cached clean run (`run_with_cache`) for every point at once,
where real activation patching (`patch_each`) runs the model once per point and position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.tree_util import Partial

from ...modeling import programs
from ...modeling.hook_points import HookError, HookSet, hook_point_axes, resolve_names
from ...modeling.model import Qwen2VLOutput
from ...modeling.vision_layout import trim_records
from ..run import MODEL_INPUTS, run_with_cache, run_with_hooks

__all__ = ["gradients_at", "attribution_patching", "patch_each", "reduce_per", "compiles", "PER"]

# How an elementwise estimate is reduced (`reduce_per`): which axes of the point's value are kept, all others
# summed. Position axes: T (text tokens; the query axis of `attn.probs`), P (vision patch rows), M (merged rows);
# head axes: N (query heads), K (key / value heads of `attn.k` / `attn.v`).
PER = {"position": "TPM", "head": "NK", "position_head": "TPMNK"}


def _names(model, names: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(names, str):
        names = [names]
    return tuple(resolve_names(names, hook_point_axes(model.config), "gradient"))


def _model_inputs(inputs: Mapping) -> dict:
    unknown = sorted(set(inputs) - set(MODEL_INPUTS))
    if unknown:
        raise TypeError(f"unexpected inputs {unknown}; a forward takes {list(MODEL_INPUTS)}")
    if "input_ids" not in inputs:
        raise TypeError("gradients need input_ids (pass the processor's outputs as keywords)")
    return dict(inputs)


# ------------------------------------------------------------------------------------------------- gradients
def _add_delta(delta, value, ctx):
    """The hook at a differentiated point: `value + delta` (delta = 0, so the forward is unchanged)."""
    return value + delta.astype(value.dtype)


def _towers(model, hookset: HookSet, ids_BT, mask_BT, position_ids_ZBT, pixels_PC, pos_hw_P2, segments,
            vision_index_BT):
    """The vision tower then the decoder (`programs._vision` + `programs._forward`, what `Qwen2VL.__call__` runs as
    two programs) with `hookset` in both: (logits `[B, T, V]`, the recorded values, vision rows padded)."""
    vision_MD, records = None, {}
    if pixels_PC is not None:
        vision_MD, _, records = programs._vision(model.visual, pixels_PC, pos_hw_P2, segments,
                                                 hookset.only("vision.") or None)
    out = programs._forward(model, ids_BT, mask_BT, position_ids_ZBT, vision_MD, vision_index_BT, None,
                            hookset.only("vision.", keep=False) or None)
    return out.logits, {**records, **out.records}


def _value_and_grads(graphdef, state, metric, ids_BT, mask_BT, position_ids_ZBT, rope_deltas_B1, pixels_PC, pos_hw_P2,
                     segments, vision_index_BT, *, names, with_values):
    """(metric value, {name: d metric / d value}, {name: value} or {}) in one program; values padded. The model
    comes in split (`nnx.split`) and is merged inside the differentiated function, as the training step does.
    Per-block remat (`Qwen2VL.set_remat`, a training setting) is off in that copy: the hooks carry traced deltas
    into every block, which a rematerialised block does not take (the model's own setting is left as it is)."""
    arrays = (ids_BT, mask_BT, position_ids_ZBT, pixels_PC, pos_hw_P2, segments, vision_index_BT)
    # the points' shapes and dtypes, found while tracing (no compute): a recording run under eval_shape
    shapes = jax.eval_shape(
        lambda state: _towers(nnx.merge(graphdef, state, copy=True), HookSet(record=names), *arrays)[1], state)
    deltas = {n: jnp.zeros(s.shape, s.dtype) for n, s in shapes.items()}

    def objective(deltas, state):
        hookset = HookSet({n: Partial(_add_delta, d) for n, d in deltas.items()}, names if with_values else ())
        model = nnx.merge(graphdef, state, copy=True)  # fresh Variables at this trace level
        model.visual.remat = model.language_model.remat = None  # no per-block remat (see the docstring)
        logits_BTV, records = _towers(model, hookset, *arrays)
        value = jnp.asarray(metric(Qwen2VLOutput(logits=logits_BTV, rope_deltas=rope_deltas_B1)))
        if value.shape != () or not jnp.issubdtype(value.dtype, jnp.floating):
            raise HookError(f"the metric must return a real scalar, got {value.dtype} {value.shape}")
        return value, records

    (value, records), grads = jax.value_and_grad(objective, has_aux=True)(deltas, state)
    return value, grads, records


_program = jax.jit(_value_and_grads, static_argnames=("graphdef", "names", "with_values"))


def compiles() -> dict[str, int]:
    """Programs compiled so far by `gradients_at` / `attribution_patching` (entries of the jit cache)."""
    return {"gradients": _program._cache_size()}


def _run(model, names: tuple[str, ...], metric: Callable, inputs: Mapping, with_values: bool):
    prep = model.prepare_inputs(**_model_inputs(inputs))
    layout = prep.vision_layout
    vision = (None, None, None) if layout is None else (prep.vision_pixels, layout.pos_hw_P2, layout.segments())
    metric = metric if isinstance(metric, Partial) else Partial(metric)
    graphdef, state = nnx.split(model)
    value, grads, values = _program(graphdef, state, metric, prep.input_ids_BT, prep.attention_mask_BT,
                                    prep.position_ids_ZBT, prep.rope_deltas_B1, *vision, prep.vision_index_BT,
                                    names=names, with_values=with_values)
    if layout is not None:  # vision rows as run_with_cache records them: the real rows only
        trim = lambda d: {**d, **trim_records({n: v for n, v in d.items() if n.startswith("vision.")}, layout,
                                              model.config.vision_config)}
        grads, values = trim(grads), trim(values)
    order = lambda d: {n: d[n] for n in names if n in d}
    return value, order(grads), order(values)


def gradients_at(model, names: Iterable[str] | str, metric: Callable, **inputs) -> tuple[jax.Array, dict]:
    """`(metric(output), {name: d metric / d value at name})` for one forward on `inputs` (the processor's outputs).

    `names`: hook point names or glob patterns (as `run_with_cache` takes them; `list_hook_points(model)`), text
    (`text.*`, `logits`) and vision (`vision.*`) alike. `metric(output) -> scalar`: `output` has the forward's
    `.logits` `[B, T, V]` (and `.rope_deltas`), the whole batch (a left-padded batch of several prompts works; the
    metric decides which rows and positions count). Each gradient has the shape `run_with_cache` records for the
    name: text `[B, T, ...]`, vision rows cut to the real rows (`vision.blocks.{i}.attn.probs`: a tuple of one
    `[N, L, L]` per segment). The model's attention backend is used as it is (see the module docstring)."""
    value, grads, _ = _run(model, _names(model, names), metric, inputs, with_values=False)
    return value, grads


# ------------------------------------------------------------------------------------------------ reductions
def reduce_per(model, name: str, value, per: str | None = "position"):
    """An elementwise array at hook point `name` (an attribution estimate, a gradient) summed down to `per`:

    * "position": `[T]` for text points (summed over the batch and the features; `attn.probs` by query token),
      `[P]` / `[M]` for vision rows;
    * "head": `[N]` for points with a head axis (`attn.q`, `attn.head_out`, `attn.probs`; `[K]` for `attn.k` /
      `attn.v`), summed over the batch, positions and the head dim;
    * "position_head": `[T, N]` (vision `[P, N]`);
    * None: the value as it is.

    Summing over the batch matches patching: `interventions.patch(..., positions=[t])` replaces token t in every
    row, so its effect is the sum of the rows' first-order effects. Vision `attn.probs` (one array per segment)
    reduce only per "head"."""
    if per is None:
        return value
    if per not in PER:
        raise HookError(f"per must be one of {list(PER)} or None, got {per!r}")
    axes = hook_point_axes(model.config)[name]
    if isinstance(value, tuple):  # vision attn.probs: one [N, L, L] per segment
        if per != "head":
            raise HookError(f"{name}: vision attention probabilities reduce per 'head' only (or per=None)")
        return sum(np.asarray(v, np.float64).sum(axis=(1, 2)) for v in value)
    keep = [i for i, a in enumerate(axes) if a in PER[per]]
    if per != "position" and not any(axes[i] in PER["head"] for i in keep):
        raise HookError(f"{name} ({axes}) has no head axis to reduce per {per!r}")
    out = np.asarray(value, np.float64).sum(axis=tuple(i for i in range(len(axes)) if i not in keep))
    if len(keep) == 2 and axes[keep[0]] in PER["head"]:  # attn.probs [B, N, T, S]: put the position first
        out = out.T
    return out


# -------------------------------------------------------------------------------------- attribution patching
def _check_pair(clean_inputs: Mapping, corrupt_inputs: Mapping) -> None:
    for key in ("input_ids", "image_grid_thw", "video_grid_thw"):
        a, b = clean_inputs.get(key), corrupt_inputs.get(key)
        if (a is None) != (b is None) or (a is not None and np.asarray(a).shape != np.asarray(b).shape) or (
                a is not None and key != "input_ids" and not np.array_equal(a, b)):
            raise HookError(f"patching needs clean and corrupt inputs of one shape: {key} differs "
                            f"({None if a is None else np.asarray(a).shape} vs "
                            f"{None if b is None else np.asarray(b).shape})")


def attribution_patching(model, clean_inputs: Mapping, corrupt_inputs: Mapping, metric: Callable,
                         names: Iterable[str] | str, *, per: str | None = "position") -> dict:
    """Attribution patching: `{name: estimate}` of `metric(corrupt run with the clean value patched in at name)
    - metric(corrupt run)`, to first order: `(clean_value - corrupt_value) * d metric / d value` on the corrupt
    run, elementwise, then summed down by `reduce_per(per)` ("position": `[T]`, "head": `[N]`, "position_head":
    `[T, N]`, None: the elementwise product in the value's shape). One forward + backward on `corrupt_inputs` and
    one cached forward on `clean_inputs` (of the same shape) for every name. `patch_each` measures the real
    effects on the same grid."""
    _check_pair(clean_inputs, corrupt_inputs)
    names = _names(model, names)
    _, grads, corrupt = _run(model, names, metric, corrupt_inputs, with_values=True)
    _, clean = run_with_cache(model, list(names), **clean_inputs)
    out = {}
    for name in names:
        g, c, x = grads[name], clean[name], corrupt[name]
        if isinstance(g, tuple):
            product = tuple(np.asarray(gi, np.float32) * (np.asarray(ci, np.float32) - np.asarray(xi, np.float32))
                            for gi, ci, xi in zip(g, c, x, strict=True))
        else:
            product = np.asarray(g, np.float32) * (np.asarray(c, np.float32) - np.asarray(x, np.float32))
        out[name] = reduce_per(model, name, product, per)
    return out


def _patch_masked(source, where, value, ctx):
    """`value` with the cells marked in `where` (broadcast against it) taken from `source`; vision sources (cut to
    the real rows by `run_with_cache`) are padded back to the bucket first."""
    if source.shape[0] < value.shape[0]:
        source = jnp.pad(source, [(0, value.shape[0] - source.shape[0])] + [(0, 0)] * (source.ndim - 1))
        if where.shape[0] > 1:
            where = jnp.pad(where, [(0, value.shape[0] - where.shape[0])] + [(0, 0)] * (where.ndim - 1))
    return jnp.where(where, source.astype(value.dtype), value)


def patch_each(model, clean_inputs: Mapping, corrupt_inputs: Mapping, metric: Callable,
               names: Iterable[str] | str, *, per: str = "position") -> dict:
    """Real activation patching over the grid `attribution_patching(per=per)` estimates: `{name: effects}` with
    effects[cell] = metric(corrupt run with the clean value at `name` patched in at that cell) - metric(corrupt
    run). Cells: each position ("position": token t in every batch row, like `interventions.patch`; vision: each
    real row), each head over all positions ("head") or each (position, head) ("position_head"). One run per cell;
    one compile per name (the patch source and mask are traced `Partial` arguments)."""
    if per not in PER:
        raise HookError(f"per must be one of {list(PER)}, got {per!r}")
    _check_pair(clean_inputs, corrupt_inputs)
    names = _names(model, names)
    axes_by_name = hook_point_axes(model.config)
    _, clean = run_with_cache(model, list(names), **clean_inputs)
    base = float(metric(model(**corrupt_inputs)))
    out = {}
    for name in names:
        axes, source = axes_by_name[name], clean[name]
        if isinstance(source, tuple):
            raise HookError(f"patch_each: {name!r}: vision attention probabilities are not patched by cell")
        keep = [i for i, a in enumerate(axes) if a in PER[per]]
        if per != "position" and not any(axes[i] in PER["head"] for i in keep):
            raise HookError(f"{name} ({axes}) has no head axis to patch per {per!r}")
        mask_shape = [source.shape[i] if i in keep else 1 for i in range(len(axes))]
        grid = [source.shape[i] for i in keep]
        source = jnp.asarray(source)
        effects = np.zeros(grid, np.float64)
        for cell in np.ndindex(*grid):
            where = np.zeros(mask_shape, bool)
            index = [0] * len(axes)
            for i, c in zip(keep, cell, strict=True):
                index[i] = c
            where[tuple(index)] = True
            patched = run_with_hooks(model, {name: Partial(_patch_masked, source, jnp.asarray(where))},
                                     **corrupt_inputs)
            effects[cell] = float(metric(patched)) - base
        if len(keep) == 2 and axes[keep[0]] in PER["head"]:  # position first, as reduce_per
            effects = effects.T
        out[name] = effects
    return out
