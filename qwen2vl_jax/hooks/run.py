"""Read and change the model's internals at named hook points, under jit (TransformerLens' `run_with_cache` /
`run_with_hooks` for a vision-language model with M-RoPE and per-image attention).

    from qwen2vl_jax import hooks

    logits_out, cache = hooks.run_with_cache(model, ["text.layers.*.resid_post", "vision.merger.out"], **inputs)
    cache["text.layers.1.resid_post"]            # [B, T, D]

    def zero_head_2(value, ctx):                 # value: text.layers.{i}.attn.head_out [B, T, N, H]
        return value.at[:, :, 2].set(0)
    out = hooks.run_with_hooks(model, {"text.layers.0.attn.head_out": zero_head_2}, **inputs)
    ids = hooks.run_with_hooks(model, {...}, generate=True, max_new_tokens=16, **inputs)   # every decode step

`inputs` are the processor's outputs (`input_ids`, `attention_mask`, `pixel_values`, `image_grid_thw`,
`pixel_values_videos`, `video_grid_thw`, and Qwen2.5-VL's `second_per_grid_ts`). Hook names and their shapes:
`modeling.hook_points` (the model side) and `list_hook_points(model)`. A hook is `fn(value, ctx) -> value` with
`ctx` a `HookContext` (name, layer, `step` = tokens generated so far, `valid` rows, `position_ids`, `slots`); it
must return the value's shape (the dtype is cast back). Keys may be glob patterns (`text.layers.*.attn.head_out`);
several hooks on one point run in order (give a list).

Inside `generate`, a hook sees each call as the model runs it: the prefill with the prompt left-padded to its
length bucket (`ctx.valid` marks real tokens; `ctx.slots` are token indices of the caller's prompt, negative on that
padding), then one token per decode step (`ctx.step` = tokens generated so far, `ctx.slots` = its index). What
`run_with_cache(..., generate=True)` returns has that padding removed.

Compiles: the hooked names are part of the compile key, and so is each hook function's identity. Arrays a hook
needs are best passed as `jax.tree_util.Partial(fn, array, ...)` arguments (the ready interventions in
`qwen2vl_jax.interventions` do): they are traced inputs, so a new vector or patch reuses the compiled program,
where a new closure or lambda compiles again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np

from ..modeling.hook_points import HookError, HookSet, hook_point_axes, make_hookset

MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                "video_grid_thw", "position_ids", "second_per_grid_ts")


def list_hook_points(model) -> list[str]:
    """Every hook point name of `model`, in execution order (vision tower, then decoder, then `logits`)."""
    return list(hook_point_axes(model.config))


def _split(inputs: dict) -> tuple[dict, dict]:
    model_inputs = {k: v for k, v in inputs.items() if k in MODEL_INPUTS}
    return model_inputs, {k: v for k, v in inputs.items() if k not in MODEL_INPUTS}


def _run(model, hookset: HookSet, generate: bool, inputs: dict):
    model_inputs, rest = _split(inputs)
    if "input_ids" not in model_inputs:
        raise TypeError("run_with_cache / run_with_hooks need input_ids (pass the processor's outputs as keywords)")
    if generate:
        from ..generation.decoding import generate as generate_fn

        out = generate_fn(model, hooks=hookset, return_dict=True, **model_inputs, **rest)
        return out, out.records or {}
    if rest:
        raise TypeError(f"unexpected inputs {sorted(rest)}; a forward takes {list(MODEL_INPUTS)} "
                        "(generation settings need generate=True)")
    out = model(**model_inputs, hooks=hookset)
    records = out.records or {}
    out.records = None
    return out, records


def run_with_cache(model, names: Iterable[str] | str | None = None, *,
                   hooks: Mapping[str, Callable] | None = None, generate: bool = False, **inputs):
    """Run the model and record the hook points `names` (names or glob patterns; None: every point).

    Returns `(output, {name: value})`. A forward gives a `Qwen2VLOutput` (`.logits` [B, T, V]); vision values are
    cut to the real rows (`vision.blocks.{i}.attn.probs` is a tuple with one `[N, L, L]` array per segment: one
    temporal slice of one image or video). With `generate=True` (and generation settings such as
    `max_new_tokens` among the keywords) it runs `generation.generate` and returns its `GenerateOutput`; text
    values then cover the prompt and every fed-back token (see `generate`). `hooks` run at the same time.
    """
    hookset = make_hookset(model.config, hooks, names)
    return _run(model, hookset, generate, inputs)


def run_with_hooks(model, hooks: Mapping[str, Callable] | HookSet, *, generate: bool = False, **inputs):
    """Run the model with `hooks` (`{name or pattern: fn(value, ctx) -> value}`) changing values inside the
    jitted forward; returns a `Qwen2VLOutput`, or with `generate=True` the `GenerateOutput` of `generate` (hooks
    run in the prefill and in every decode step; `ctx.step` tells which)."""
    if not hooks:
        raise HookError("run_with_hooks needs at least one hook (use the model directly for a plain run)")
    return _run(model, make_hookset(model.config, hooks), generate, inputs)[0]


def stack_layers(cache: Mapping[str, object], pattern: str) -> np.ndarray:
    """`cache` values of `pattern` with `{i}` standing for the layer (e.g. `text.layers.{i}.resid_post`) stacked
    on a new leading layer axis, layers in order."""
    values, i = [], 0
    while pattern.format(i=i) in cache:
        values.append(np.asarray(cache[pattern.format(i=i)]))
        i += 1
    if not values:
        raise KeyError(f"no recorded value for {pattern.format(i=0)!r}; record it with run_with_cache")
    return np.stack(values)
