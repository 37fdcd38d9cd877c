"""Sparse autoencoders on hook points: train one on an activation store, splice it into the model, read its features.

    store = ActivationStore("acts/")
    sae, history = train_sae(store, "text.layers.1.resid_post", d_sae=4096, k=32, steps=20_000, batch_size=4096)
    save_sae(sae, "sae.safetensors", point="text.layers.1.resid_post")
    out = run_with_hooks(model, splice_sae(sae, "text.layers.1.resid_post", error_term=True), **inputs)
    out, features_BTF = sae_features(model, sae, "text.layers.1.resid_post", **inputs)

The SAE (SAELens' conventions and parameter names; OpenAI's "Scaling and evaluating sparse autoencoders" for TopK):

    encode(x) = act((x - b_dec) @ W_enc + b_enc)        act: ReLU, or TopK(k) (ReLU of the k largest, 0 elsewhere)
    decode(f) = f @ W_dec + b_dec

Layout (as SAELens stores them): `W_enc [D, F]`, `b_enc [F]`, `W_dec [F, D]`, `b_dec [D]`, where here D is the
point's row width (the store's `size`: trailing axes flattened, e.g. N * H for `attn.head_out`) and F the number of
features (`d_sae`). Feature j's decoder direction is the row `W_dec[j]` (a column of the math's [D, F] decoder),
kept at unit norm during training. Everything runs in float32.

Training (`train_sae`): Adam (optax) on the summed-over-D, mean-over-batch squared error, plus for ReLU an L1
penalty `l1 * sum_j |f_j|` (with unit-norm decoder rows this is SAELens' and Anthropic's "Towards Monosemanticity"
decoder-norm-weighted L1); TopK has no penalty, k is the sparsity. After every step the decoder rows are put back
on the unit sphere, and before it the gradient's component along each row is removed (Anthropic's "Towards
Monosemanticity"; OpenAI's TopK paper; SAELens' `normalize_sae_decoder` / `remove_gradient_parallel_to_decoder_
directions`). Initialisation as in OpenAI's TopK paper: random unit decoder rows, the encoder their transpose,
`b_enc = 0`, `b_dec` the first batch's mean (SAELens' `b_dec_init_method="mean"`; the paper uses the geometric
median). Not done: dead-feature resampling or TopK's auxiliary loss (AuxK), input normalisation.

Splicing (`splice_sae`): a hook replacing the point's value by `decode(encode(x))`, or with `error_term=True` by
`decode(encode(x)) + (x - decode(encode(x)))` (SAELens' `use_error_term`): the model then computes what it did
without the SAE, up to one float rounding of that sum, while the features sit on the path. The hook carries the
SAE as a `jax.tree_util.Partial` argument, so another SAE of the same shapes (and k) reuses the compiled program.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.tree_util import Partial

from ..checkpoints.safetensors_io import SafetensorsFile, save_file
from ..hooks import HookError, run_with_cache
from .store import ActivationStore

__all__ = ["SAE", "init_sae", "train_sae", "save_sae", "load_sae", "splice_sae", "sae_features"]

SAE_FORMAT = "qwen2vl_jax.sae/1"


@dataclasses.dataclass(frozen=True)
class SAE:
    """A sparse autoencoder (module docstring): arrays `W_enc [D, F]`, `b_enc [F]`, `W_dec [F, D]`, `b_dec [D]`;
    `k` (static: part of a jit's key) None for ReLU, else TopK's k. A pytree: pass it to `jax.jit`, optax, or a
    `Partial`. `x` may have any leading axes: `encode` maps `[..., D]` to `[..., F]`."""

    W_enc: jax.Array
    b_enc: jax.Array
    W_dec: jax.Array
    b_dec: jax.Array
    k: int | None = None

    @property
    def d_in(self) -> int:
        return int(self.W_enc.shape[0])

    @property
    def d_sae(self) -> int:
        return int(self.W_enc.shape[1])

    def encode(self, x_AD) -> jax.Array:
        """Feature activations `[..., F]` (float32; at most k non-zero per row with TopK)."""
        pre_AF = (jnp.asarray(x_AD, jnp.float32) - self.b_dec) @ self.W_enc + self.b_enc
        if self.k is None:
            return jax.nn.relu(pre_AF)
        values_AK, index_AK = jax.lax.top_k(pre_AF, self.k)
        return jnp.put_along_axis(jnp.zeros_like(pre_AF), index_AK, jax.nn.relu(values_AK), axis=-1, inplace=False)

    def decode(self, f_AF) -> jax.Array:
        """The reconstruction `[..., D]` (float32)."""
        return jnp.asarray(f_AF, jnp.float32) @ self.W_dec + self.b_dec

    def __call__(self, x_AD) -> jax.Array:
        return self.decode(self.encode(x_AD))


jax.tree_util.register_dataclass(SAE, data_fields=["W_enc", "b_enc", "W_dec", "b_dec"], meta_fields=["k"])


def init_sae(d_in: int, d_sae: int, *, k: int | None = None, seed: int = 0, b_dec=None) -> SAE:
    """OpenAI's TopK paper's initialisation: unit-norm random decoder rows, `W_enc = W_dec.T`, `b_enc = 0`;
    `b_dec` given (e.g. the data's mean) or 0."""
    if k is not None and not 1 <= k <= d_sae:
        raise ValueError(f"k must be in [1, d_sae={d_sae}], got {k}")
    W_dec_FD = jax.random.normal(jax.random.key(seed), (d_sae, d_in), jnp.float32)
    W_dec_FD = W_dec_FD / jnp.linalg.norm(W_dec_FD, axis=1, keepdims=True)
    b_dec_D = jnp.zeros(d_in, jnp.float32) if b_dec is None else jnp.asarray(b_dec, jnp.float32).reshape(d_in)
    return SAE(W_enc=W_dec_FD.T, b_enc=jnp.zeros(d_sae, jnp.float32), W_dec=W_dec_FD, b_dec=b_dec_D, k=k)


# ---------------------------------------------------------------------------------------------------- training
def _losses(sae: SAE, x_AD, l1):
    f_AF = sae.encode(x_AD)
    error_AD = sae.decode(f_AF) - x_AD
    mse = jnp.mean(jnp.sum(error_AD * error_AD, axis=-1))
    sparsity = jnp.mean(jnp.sum(jnp.abs(f_AF), axis=-1))
    loss = mse if sae.k is not None else mse + l1 * sparsity
    return loss, {"loss": loss, "mse": mse, "l1": sparsity, "l0": jnp.mean(jnp.sum(f_AF > 0, axis=-1))}


def _unit_rows(W_FD):
    return W_FD / jnp.maximum(jnp.linalg.norm(W_FD, axis=1, keepdims=True), 1e-12)


def _make_step(optimizer):
    @jax.jit
    def step(sae: SAE, opt_state, x_AD, l1):
        grads, metrics = jax.grad(_losses, has_aux=True)(sae, x_AD, l1)
        # drop the part of each decoder row's gradient along the row (it would only change the norm)
        along_F1 = jnp.sum(grads.W_dec * sae.W_dec, axis=1, keepdims=True)
        grads = dataclasses.replace(grads, W_dec=grads.W_dec - along_F1 * sae.W_dec)
        updates, opt_state = optimizer.update(grads, opt_state, sae)
        sae = optax.apply_updates(sae, updates)
        return dataclasses.replace(sae, W_dec=_unit_rows(sae.W_dec)), opt_state, metrics
    return step


def _stream(source, point: str | None, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Batches `[batch_size, D]` forever from a store (an epoch per seed: seed, seed + 1, ...), or once through an
    iterable of arrays (again from the start if it can be restarted)."""
    if isinstance(source, str | os.PathLike):
        source = ActivationStore(source)
    if isinstance(source, ActivationStore):
        if point is None:
            raise ValueError("train_sae on a store needs the point to train on")
        epoch = 0
        while True:
            n = 0
            for x in source.batches(point, batch_size, shuffle=True, seed=seed + epoch, drop_last=True):
                n += 1
                yield x
            if n == 0:
                raise ValueError(f"{point}: the store has fewer than batch_size={batch_size} rows")
            epoch += 1
    restartable = not isinstance(source, Iterator)
    while True:
        n = 0
        for x in source:
            n += 1
            yield np.asarray(x)
        if not restartable or n == 0:
            return


def train_sae(source: ActivationStore | str | os.PathLike | Iterable, point: str | None = None, *, d_sae: int,
              k: int | None = None, l1: float = 1e-3, lr: float = 1e-3, steps: int = 1000, batch_size: int = 4096,
              seed: int = 0, log: Callable[[int, dict], None] | None = None) -> tuple[SAE, dict[str, np.ndarray]]:
    """Train an SAE (module docstring) on `point`'s rows in an `ActivationStore` (or its path), or on an iterable
    of `[batch, D]` arrays. ReLU with an L1 penalty `l1` when `k` is None, else TopK(k) with none. Returns the SAE
    and its history `{"loss", "mse", "l1", "l0"}`, one float per step (fewer steps when a one-shot iterator runs
    dry). `log(step, metrics)` is called every step (metrics as floats)."""
    batches = _stream(source, point, batch_size, seed)
    first = next(batches, None)
    if first is None:
        raise ValueError("train_sae: the source yielded no batch")
    first = np.asarray(first, np.float32)
    sae = init_sae(first.shape[-1], d_sae, k=k, seed=seed, b_dec=first.mean(axis=0))
    optimizer = optax.adam(lr)
    opt_state = optimizer.init(sae)
    step = _make_step(optimizer)
    history: dict[str, list] = {"loss": [], "mse": [], "l1": [], "l0": []}
    x = first
    for i in range(steps):
        if i:
            x = next(batches, None)
            if x is None:
                break
        sae, opt_state, metrics = step(sae, opt_state, jnp.asarray(x, jnp.float32), jnp.float32(l1))
        metrics = {name: float(v) for name, v in metrics.items()}
        for name, v in metrics.items():
            history[name].append(v)
        if log is not None:
            log(i, metrics)
    return sae, {name: np.asarray(v, np.float32) for name, v in history.items()}


# ---------------------------------------------------------------------------------------------------- files
def save_sae(sae: SAE, path: str | os.PathLike, *, point: str | None = None,
             metadata: Mapping[str, str] | None = None) -> None:
    """Write the SAE as one safetensors file (SAELens' tensor names `W_enc`, `b_enc`, `W_dec`, `b_dec`; float32),
    with `k`, the widths, the hook point and `metadata` in its header (`SafetensorsFile(path).metadata`)."""
    info = {"format": SAE_FORMAT, "activation": "relu" if sae.k is None else "topk", "k": "" if sae.k is None
            else str(sae.k), "d_in": str(sae.d_in), "d_sae": str(sae.d_sae), "point": point or "",
            **{str(key): str(v) for key, v in (metadata or {}).items()}}
    save_file({name: np.asarray(getattr(sae, name), np.float32) for name in ("W_enc", "b_enc", "W_dec", "b_dec")},
              path, info)


def load_sae(path: str | os.PathLike) -> SAE:
    """An SAE written by `save_sae`."""
    f = SafetensorsFile(path)
    if f.metadata.get("format") != SAE_FORMAT:
        raise ValueError(f"{path}: not an SAE file (format {f.metadata.get('format')!r}, expected {SAE_FORMAT!r})")
    k = f.metadata.get("k") or None
    return SAE(**{name: jnp.asarray(f.read(name)) for name in ("W_enc", "b_enc", "W_dec", "b_dec")},
               k=int(k) if k else None)


# ---------------------------------------------------------------------------------------------------- the model
def _lead(shape: tuple[int, ...], d_in: int, name: str) -> int:
    """How many leading axes of a value of `shape` are rows (the trailing ones flatten to `d_in`)."""
    for j in reversed(range(len(shape))):  # the fewest trailing axes: [1, 5, 64] with d_in 64 is 5 rows
        if math.prod(shape[j:]) == d_in:
            return j
    raise HookError(f"{name}: a value of shape {tuple(shape)} has no trailing axes of size {d_in} (the SAE's d_in)")


def _spliced(sae: SAE, error_term: bool, value):
    j = _lead(value.shape, sae.d_in, "splice_sae")
    x_AD = value.reshape(*value.shape[:j], sae.d_in).astype(jnp.float32)
    recon_AD = sae.decode(sae.encode(x_AD))
    if error_term:  # SAELens' hook_sae_error: what the SAE misses, added back
        recon_AD = recon_AD + (x_AD - recon_AD)
    return recon_AD.reshape(value.shape)


def _splice(sae: SAE, value, ctx):
    return _spliced(sae, False, value)


def _splice_with_error(sae: SAE, value, ctx):
    return _spliced(sae, True, value)


def splice_sae(sae: SAE, point: str, *, error_term: bool = False) -> dict[str, Callable]:
    """`{point: hook}` for `hooks.run_with_hooks` / `generate(hooks=...)` (or `make_hookset` for the model's
    `hooks=`): the value at `point` (a name or glob pattern) becomes `decode(encode(x))`, plus the error term
    `x - decode(encode(x))` when `error_term` (module docstring). Merge with other hooks by `{**a, **b}`."""
    return {point: Partial(_splice_with_error if error_term else _splice, sae)}


def sae_features(model, sae: SAE, point: str, *, hooks: Mapping[str, Callable] | None = None, **inputs
                 ) -> tuple[object, jax.Array]:
    """Run the model (with `hooks`, e.g. other splices, changing it) and return `(output, features)`: the SAE's
    feature activations on the value at `point`, `[B, T, F]` for a text point, `[rows, F]` for a vision one. The
    value is the one leaving the point, after any hook on the point itself (a splice with the error term leaves
    it as it was, up to rounding, so its features are the ones on the path)."""
    out, cache = run_with_cache(model, [point], hooks=hooks, **inputs)
    if point not in cache:
        raise HookError(f"sae_features needs one exact hook point name, got {point!r}")
    value = cache[point]
    j = _lead(value.shape, sae.d_in, point)
    return out, sae.encode(value.reshape(*value.shape[:j], sae.d_in))
