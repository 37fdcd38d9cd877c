"""Training: the causal-LM loss, what trains, the optimizer recipe and a jitted step (optax over `nnx.Optimizer`).

    loss, metrics = causal_lm_loss(model, input_ids, labels, pixel_values=..., image_grid_thw=...)   # host inputs
    optimizer = make_optimizer(model, default_recipe(lr=1e-4, steps=1000), trainable="lora")
    batch = prepare_batch(model, input_ids, labels, attention_mask, pixel_values, image_grid_thw)   # host, NumPy
    metrics = train_step(model, optimizer, batch)                                                    # jitted

The loss is transformers' `ForCausalLMLoss` (transformers 4.57 `loss/loss_utils.py`): logits in fp32, labels
shifted left by one (the last position predicts nothing), `-100` ignored, mean over the kept tokens. With gradient
accumulation the mean runs over the kept tokens of *all* micro-batches (transformers' `num_items_in_batch`), not a
mean of per-micro-batch means: `accumulate_step` sums per-micro-batch gradients of the summed loss and divides once.

What trains is a parameter filter (`trainable_filter`): the optimizer is built with it, so frozen parameters get
neither gradients (`nnx.DiffState` differentiates only the filtered state) nor optimizer state.

Everything host-side (rope positions, the vision layout, bucket padding) happens in `prepare_batch`, outside jit;
`train_step` / `grad_step` / `apply_gradients` are pure device math on a `Batch`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..attention import VisionSegments
from ..modeling.model import Qwen2VL
from ..modeling.parameters import LoRAParam, param_path

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------------- batches
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Batch:
    """One training batch, laid out on the host (`prepare_batch`); every leaf is an array (or None)."""

    input_ids_BT: np.ndarray | jax.Array  # int32
    attention_mask_BT: np.ndarray | jax.Array  # int32
    position_ids_ZBT: np.ndarray | jax.Array  # int32 [3, B, T]
    labels_BT: np.ndarray | jax.Array  # int32, IGNORE_INDEX where not trained
    pixels_PC: np.ndarray | jax.Array | None = None  # padded patch rows, images then videos
    pos_hw_P2: np.ndarray | jax.Array | None = None
    segments: VisionSegments | None = None
    vision_index_BT: np.ndarray | jax.Array | None = None  # row of the vision features per slot, -1 for text

    @property
    def shape(self) -> tuple[int, ...]:
        """(batch, tokens, padded patch rows): what decides a compile."""
        return (*self.input_ids_BT.shape, 0 if self.pixels_PC is None else self.pixels_PC.shape[0])


def prepare_batch(model: Qwen2VL, input_ids, labels, attention_mask=None, pixel_values=None, image_grid_thw=None,
                  pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None) -> Batch:
    """Validate and lay out a batch on the host (rope positions, vision layout, feature scatter index).
    `second_per_grid_ts`: Qwen2.5-VL's per-video time spacing (its processor's output, one per video in
    `video_grid_thw` order); it only moves the positions, and a Qwen2-VL model ignores it."""
    prep = model.prepare_inputs(input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                                video_grid_thw, second_per_grid_ts=second_per_grid_ts)
    labels = np.asarray(labels)
    if labels.ndim == 1:
        labels = labels[None]
    if labels.shape != prep.input_ids_BT.shape:
        raise ValueError(f"labels must have the shape of input_ids {prep.input_ids_BT.shape}, got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer token ids (or {IGNORE_INDEX}), got {labels.dtype}")
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= model.config.text_config.vocab_size))
    if bad.any():
        raise ValueError(f"labels must be token ids in [0, {model.config.text_config.vocab_size}) or {IGNORE_INDEX}; "
                         f"found {labels[bad][:5].tolist()}")
    batch = Batch(prep.input_ids_BT, prep.attention_mask_BT, prep.position_ids_ZBT, labels.astype(np.int32))
    if prep.vision_pixels is not None:
        layout = prep.vision_layout
        batch = dataclasses.replace(batch, pixels_PC=prep.vision_pixels, pos_hw_P2=layout.pos_hw_P2,
                                    segments=layout.segments(), vision_index_BT=prep.vision_index_BT)
    return batch


# ---------------------------------------------------------------------------------------------------- loss
def token_losses(logits_BTV: jax.Array, labels_BT: jax.Array):
    """Per-slot cross-entropy of the *shifted* labels (slot t predicts labels[t + 1]) in fp32, and the kept mask.

    transformers `ForCausalLMLoss`: logits.float(), labels padded with -100 on the right and shifted left by one,
    `cross_entropy(..., ignore_index=-100)`. Returns (nll_BT, kept_BT, correct_BT).
    """
    logits = logits_BTV.astype(jnp.float32)
    shifted_BT = jnp.concatenate([labels_BT[:, 1:], jnp.full_like(labels_BT[:, :1], IGNORE_INDEX)], axis=1)
    kept_BT = shifted_BT != IGNORE_INDEX
    target_BT = jnp.where(kept_BT, shifted_BT, 0)
    logz_BT = jax.nn.logsumexp(logits, axis=-1)
    picked_BT = jnp.take_along_axis(logits, target_BT[..., None], axis=-1)[..., 0]
    nll_BT = jnp.where(kept_BT, logz_BT - picked_BT, 0.0)
    correct_BT = kept_BT & (jnp.argmax(logits, axis=-1) == target_BT)
    return nll_BT, kept_BT, correct_BT


def batch_logits(model: Qwen2VL, batch: Batch) -> jax.Array:
    """The forward of a prepared batch, vision tower included, as one differentiable function: `[B, T, V]`."""
    vision_MD = None
    if batch.pixels_PC is not None:
        vision_MD, _ = model.visual.forward(batch.pixels_PC, batch.pos_hw_P2, batch.segments)
    return model.forward(batch.input_ids_BT, batch.attention_mask_BT, batch.position_ids_ZBT, vision_MD,
                         batch.vision_index_BT).logits


def loss_sums(model: Qwen2VL, batch: Batch):
    """(summed loss, {"loss_sum", "tokens", "correct"}): the additive pieces, so micro-batches can be combined."""
    nll_BT, kept_BT, correct_BT = token_losses(batch_logits(model, batch), batch.labels_BT)
    total = jnp.sum(nll_BT)
    return total, {"loss_sum": total, "tokens": jnp.sum(kept_BT).astype(jnp.int32),
                   "correct": jnp.sum(correct_BT).astype(jnp.int32)}


def finish_metrics(sums: dict) -> dict:
    """loss (mean over kept tokens), tokens, accuracy from summed pieces (0 kept tokens: loss 0, accuracy 0)."""
    n = jnp.maximum(sums["tokens"], 1).astype(jnp.float32)
    return {"loss": sums["loss_sum"] / n, "tokens": sums["tokens"], "accuracy": sums["correct"] / n}


def batch_loss(model: Qwen2VL, batch: Batch):
    """(mean loss, metrics) of a prepared batch; differentiable and jittable."""
    total, sums = loss_sums(model, batch)
    metrics = finish_metrics(sums)
    return total / jnp.maximum(sums["tokens"], 1).astype(jnp.float32), metrics


def causal_lm_loss(model: Qwen2VL, input_ids, labels, attention_mask=None, pixel_values=None, image_grid_thw=None,
                   pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None):
    """transformers' `Qwen2VLForConditionalGeneration(..., labels=labels).loss` and metrics
    `{"loss", "tokens", "accuracy"}` (accuracy: argmax == label over the kept tokens).

    Inputs are host arrays, as the processor returns them (the layout is computed on the host), so call it
    directly or under `nnx.grad` / `nnx.value_and_grad` (which differentiate the model only). Under `jit` use
    `prepare_batch` + `batch_loss` (or `train_step`).
    """
    batch = prepare_batch(model, input_ids, labels, attention_mask, pixel_values, image_grid_thw,
                          pixel_values_videos, video_grid_thw, second_per_grid_ts)
    return batch_loss(model, batch)


# ----------------------------------------------------------------------------------------- what trains
TRAINABLE_PRESETS = {
    # preset: regex over dotted parameter paths that trains ("lora": the adapter parameters, by variable type)
    "all": r".*",
    "language_model": r"^(language_model|lm_head)\.",
    "merger": r"^(language_model\.|lm_head\.|visual\.merger\.)",  # vision tower frozen, merger + decoder train
    "lora": None,
}


def trainable_filter(spec: str | Sequence[str] = "all"):
    """An `nnx` filter selecting the trainable parameters.

    `spec`: a preset — "all" (every parameter: base weights and adapters), "language_model" (decoder, embeddings,
    head), "merger" (the vision tower frozen except its merger), "lora" (adapter parameters only) — or regexes
    over dotted parameter paths (`re.search`), e.g. `[r"visual\\.merger\\.", r"layers\\.1[0-9]\\."]`. The same spec
    gives the same filter object, so optimizers built from it share one compiled step. A quantized model's integers
    and scales are never selected (QLoRA trains "lora" over them).
    """
    return _filter(spec if isinstance(spec, str) else tuple(spec))


@functools.cache
def _filter(spec: str | tuple[str, ...]):
    if spec == "lora":
        return LoRAParam
    patterns = [TRAINABLE_PRESETS.get(spec, spec)] if isinstance(spec, str) else list(spec)
    try:
        compiled = [re.compile(p) for p in patterns]
    except re.error as e:
        raise ValueError(f"trainable: {spec!r} is neither a preset {tuple(TRAINABLE_PRESETS)} nor a valid regex "
                         f"({e})") from None

    def selected(path, value) -> bool:
        return (isinstance(value, nnx.Param) and not _quantized(path, value)
                and any(r.search(param_path(path)) for r in compiled))

    return selected


def _quantized(path: tuple, value) -> bool:
    """A quantized Linear's integers or scales (`qwen2vl_jax.quantization`): frozen whatever the spec (integers have
    no gradient, and the scales belong to them)."""
    return path[-1] == "scale" or not jnp.issubdtype(value.dtype, jnp.floating)


def trainable_params(model: nnx.Module, spec="all") -> dict[str, nnx.Param]:
    """`{path: parameter}` of what `spec` trains (raises if it selects nothing)."""
    state = nnx.state(model, trainable_filter(spec))
    out = {param_path(p): v for p, v in nnx.to_flat_state(state)}
    if not out:
        raise ValueError(f"trainable={spec!r} selects no parameter of this model"
                         + (" (apply LoRA first: qwen2vl_jax.lora.apply_lora)" if spec == "lora" else ""))
    return out


# ---------------------------------------------------------------------------------------------- optimizer
def recipe_schedule(lr: float, steps: int, *, warmup_steps: int | None = None, warmup_ratio: float = 0.03,
                    end_lr: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps` (default: ceil(warmup_ratio * steps)), then cosine decay to
    `end_lr` at `steps` (transformers `get_cosine_schedule_with_warmup`)."""
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    warmup = int(np.ceil(warmup_ratio * steps)) if warmup_steps is None else int(warmup_steps)
    warmup = min(max(warmup, 0), steps)
    if warmup == steps:  # the warmup is the whole run (1 step with any ratio > 0): no decay steps are left, and
        # `_get_cosine_schedule_with_warmup_lr_lambda` is step / warmup at every update (0 at the first, as there)
        return optax.linear_schedule(0.0, lr, warmup)
    if warmup:
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, end_lr)
    return optax.cosine_decay_schedule(lr, steps, end_lr / lr if lr else 0.0)


def default_recipe(lr: float = 1e-4, steps: int = 1000, *, warmup_steps: int | None = None,
                   warmup_ratio: float = 0.03, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, end_lr: float = 0.0
                   ) -> optax.GradientTransformation:
    """AdamW on `recipe_schedule` (linear warmup + cosine decay) with global-norm clipping (transformers' Trainer
    defaults: `get_cosine_schedule_with_warmup`, `max_grad_norm=1.0`, betas (0.9, 0.999), eps 1e-8)."""
    schedule = recipe_schedule(lr, steps, warmup_steps=warmup_steps, warmup_ratio=warmup_ratio, end_lr=end_lr)
    adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return optax.chain(optax.clip_by_global_norm(max_grad_norm), adamw) if max_grad_norm else adamw


def make_optimizer(model: Qwen2VL, tx: optax.GradientTransformation, trainable="all") -> nnx.Optimizer:
    """An `nnx.Optimizer` over the trainable parameters only (frozen ones get no optimizer state)."""
    trainable_params(model, trainable)  # fails clearly when nothing would train
    return nnx.Optimizer(model, tx, wrt=trainable_filter(trainable))


# -------------------------------------------------------------------------------------------------- steps
# The steps are jitted in NNX's functional form: the model is split into the trainable parameters, the frozen ones
# and the other state (RNG streams), and only what changes goes out of the program. Frozen weights are inputs only:
# returning them (as `nnx.jit` returns a module's whole state) would make XLA copy every frozen weight on each step
# wherever donation is impossible (on the CPU, buffers adopted from the loader), doubling the weights' memory.
def _split(model: nnx.Module, wrt):
    """(graphdef, trainable, frozen params, other state) of `model`."""
    return nnx.split(model, wrt, nnx.Param, ...)


def train_step(model: Qwen2VL, optimizer: nnx.Optimizer, batch: Batch) -> dict:
    """One optimizer step on one batch (mean loss over its kept tokens), in place; returns the batch's metrics."""
    graphdef, trainable, frozen, rest = _split(model, optimizer.wrt)
    opt_def, opt_state = nnx.split(optimizer)
    trainable, rest, opt_state, metrics = _train_step(graphdef, opt_def, optimizer.wrt, trainable, rest, opt_state,
                                                      frozen, batch)
    nnx.update(model, trainable, rest)
    nnx.update(optimizer, opt_state)
    return metrics


@functools.partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3, 4, 5))
def _train_step(graphdef, opt_def, wrt, trainable, rest, opt_state, frozen, batch):
    model = nnx.merge(graphdef, trainable, frozen, rest)
    optimizer = nnx.merge(opt_def, opt_state)
    grad_fn = nnx.value_and_grad(batch_loss, argnums=nnx.DiffState(0, wrt), has_aux=True)
    (_, metrics), grads = grad_fn(model, batch)
    optimizer.update(model, grads)
    _, trainable, _, rest = _split(model, wrt)
    return trainable, rest, nnx.state(optimizer), metrics


def grad_step(model: Qwen2VL, batch: Batch, wrt) -> tuple[nnx.State, dict]:
    """Gradients of the *summed* token loss w.r.t. the `wrt` parameters, and the additive metric sums."""
    graphdef, trainable, frozen, rest = _split(model, wrt)
    grads, sums, rest = _grad_step(graphdef, wrt, trainable, rest, frozen, batch)
    nnx.update(model, rest)  # RNG streams advanced by dropout
    return grads, sums


@functools.partial(jax.jit, static_argnums=(0, 1))
def _grad_step(graphdef, wrt, trainable, rest, frozen, batch):
    model = nnx.merge(graphdef, trainable, frozen, rest)
    grads, sums = nnx.grad(loss_sums, argnums=nnx.DiffState(0, wrt), has_aux=True)(model, batch)
    return grads, sums, _split(model, wrt)[3]


def apply_gradients(model: Qwen2VL, optimizer: nnx.Optimizer, grads: nnx.State, tokens: jax.Array) -> None:
    """Divide summed gradients by the kept-token count of the whole step, then update (in place)."""
    graphdef, trainable, frozen, rest = _split(model, optimizer.wrt)
    opt_def, opt_state = nnx.split(optimizer)
    trainable, opt_state = _apply_gradients(graphdef, opt_def, trainable, opt_state, frozen, rest, grads, tokens)
    nnx.update(model, trainable)
    nnx.update(optimizer, opt_state)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3))
def _apply_gradients(graphdef, opt_def, trainable, opt_state, frozen, rest, grads, tokens):
    model = nnx.merge(graphdef, trainable, frozen, rest)
    optimizer = nnx.merge(opt_def, opt_state)
    scale = 1.0 / jnp.maximum(tokens, 1).astype(jnp.float32)
    optimizer.update(model, jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads))
    return nnx.state(model, optimizer.wrt), nnx.state(optimizer)


_add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=(0,))


def accumulate_step(model: Qwen2VL, optimizer: nnx.Optimizer, batches: Sequence[Batch]) -> dict:
    """One optimizer step over several micro-batches: the loss is the mean over every kept token of all of them
    (transformers' `num_items_in_batch`), so it equals `train_step` on their concatenation."""
    if not batches:
        raise ValueError("accumulate_step needs at least one batch")
    if len(batches) == 1:
        return train_step(model, optimizer, batches[0])
    grads = sums = None
    for batch in batches:
        g, s = grad_step(model, batch, optimizer.wrt)
        grads, sums = (g, s) if grads is None else (_add(grads, g), _add(sums, s))
    apply_gradients(model, optimizer, grads, sums["tokens"])
    return finish_metrics(sums)


def eval_step(model: Qwen2VL, batch: Batch) -> dict:
    """The additive metric sums of one batch (no gradient); combine batches with `finish_metrics`."""
    graphdef, state = nnx.split(model)
    return _eval_step(graphdef, state, batch)


@functools.partial(jax.jit, static_argnums=(0,))
def _eval_step(graphdef, state, batch):
    return loss_sums(nnx.merge(graphdef, state), batch)[1]


def compiles() -> dict[str, int]:
    """Programs per jitted step: the entries of its jit cache, one per argument signature met (batch shapes,
    shardings, the model's structure), so a run compiles once per batch bucket. `jax.clear_caches()` empties them."""
    return {"train_step": _train_step._cache_size(), "grad_step": _grad_step._cache_size(),
            "apply_gradients": _apply_gradients._cache_size(), "eval_step": _eval_step._cache_size()}


# ----------------------------------------------------------------------------------------------- meshes
def batch_axes(mesh: Mesh, batch_size: int) -> tuple[str, ...]:
    """Mesh axes the batch dimension is split over: "data" and "fsdp" when present and dividing the batch."""
    axes, ways = [], 1
    for name in ("data", "fsdp"):
        n = mesh.shape.get(name, 1)
        if n > 1 and batch_size % (ways * n) == 0:
            axes.append(name)
            ways *= n
    return tuple(axes)


def shard_batch(batch: Batch, mesh: Mesh) -> Batch:
    """Place a batch on `mesh`: rows split over the data-parallel axes, vision rows and layout replicated."""
    axes = batch_axes(mesh, batch.input_ids_BT.shape[0])
    rows = axes if axes else None
    put = lambda x, spec: None if x is None else jax.device_put(x, NamedSharding(mesh, spec))
    rep = lambda x: jax.tree.map(lambda a: put(a, PartitionSpec()), x)
    return Batch(put(batch.input_ids_BT, PartitionSpec(rows)), put(batch.attention_mask_BT, PartitionSpec(rows)),
                 put(batch.position_ids_ZBT, PartitionSpec(None, rows)), put(batch.labels_BT, PartitionSpec(rows)),
                 put(batch.pixels_PC, PartitionSpec()), put(batch.pos_hw_P2, PartitionSpec()), rep(batch.segments),
                 put(batch.vision_index_BT, PartitionSpec(rows)))
