"""Named hook points: the places inside the model where a value may be read or replaced (the model side of
`qwen2vl_jax.hooks`, in the spirit of TransformerLens' `HookPoint`).

The model calls `point(name, value)` at every named place. Outside a hooked run that returns `value` at once, so a
point with no hook adds nothing to the compiled program (the graph is the one without hooks). Inside a jitted
function that entered `install(hookset)` while tracing, a point looks up its name: a hook `fn(value, ctx)` replaces
the value, and a name asked for is recorded and handed back by the caller. Hooks are resolved on the host to exact
names, so the set of hooked names is static: it is part of the `HookSet` pytree's structure and of the compile
key, while arrays that hooks carry (`jax.tree_util.Partial` arguments) are ordinary traced inputs, so a new
steering vector or patch source reuses the compiled program.

Names (dimension letters: the package docstring's key; vision rows are in the processor's 2x2 merge order):

    vision.patch_embed                    [P, E]
    vision.blocks.{i}.resid_pre           [P, E]      .attn.q / .attn.k  [P, N, H] (after the 2-D rotary)
    vision.blocks.{i}.attn.v              [P, N, H]   .attn.probs        [Q, N, L, L] (per segment, padded)
    vision.blocks.{i}.attn.head_out       [P, N, H]   (before attn.proj)
    vision.blocks.{i}.attn_out / resid_mid / mlp_out / resid_post   [P, E]       .mlp.act  [P, F]
    vision.merger.out                     [M, D]
    text.embed                            [B, T, D]   (vision features already scattered in)
    text.layers.{i}.resid_pre             [B, T, D]   .attn.q [B, T, N, H]   .attn.k / .attn.v [B, T, K, H]
    text.layers.{i}.attn.probs            [B, N, T, S] (fp32)                .attn.head_out [B, T, N, H]
    text.layers.{i}.attn_out / resid_mid / mlp_out / resid_post     [B, T, D]    .mlp.act  [B, T, F]
    text.final_norm                       [B, T, D]
    logits                                [B, T, V]

q and k come after the rotary (M-RoPE in the decoder); `attn.probs` are the softmax in fp32 before the value
product (transformers 4.57 `eager_attention_forward`); hooking or recording them, or a vision block's q / k / v,
runs that attention in the `xla` formulation, the only one that materialises them.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

# Suffix -> axes of the value a hook sees (the token axis "T" and slot axis "S" matter to generation's records).
VISION_BLOCK_POINTS = {"resid_pre": "PE", "attn.q": "PNH", "attn.k": "PNH", "attn.v": "PNH", "attn.probs": "QNLL",
                       "attn.head_out": "PNH", "attn_out": "PE", "resid_mid": "PE", "mlp.act": "PF", "mlp_out": "PE",
                       "resid_post": "PE"}
TEXT_LAYER_POINTS = {"resid_pre": "BTD", "attn.q": "BTNH", "attn.k": "BTKH", "attn.v": "BTKH", "attn.probs": "BNTS",
                     "attn.head_out": "BTNH", "attn_out": "BTD", "resid_mid": "BTD", "mlp.act": "BTF",
                     "mlp_out": "BTD", "resid_post": "BTD"}


def hook_point_axes(config) -> dict[str, str]:
    """`{name: axes}` for every hook point of a model with this `Qwen2VLConfig`, in execution order."""
    out = {"vision.patch_embed": "PE"}
    for i in range(config.vision_config.depth):
        out.update({f"vision.blocks.{i}.{s}": a for s, a in VISION_BLOCK_POINTS.items()})
    out["vision.merger.out"] = "MD"
    out["text.embed"] = "BTD"
    for i in range(config.text_config.num_hidden_layers):
        out.update({f"text.layers.{i}.{s}": a for s, a in TEXT_LAYER_POINTS.items()})
    out["text.final_norm"] = "BTD"
    out["logits"] = "BTV"
    return out


class HookError(ValueError):
    """A hook name or pattern that names no point, or a hook that returned something unusable."""


def resolve_names(patterns: Iterable[str], available: Iterable[str], what: str = "hook") -> list[str]:
    """Exact names for names or glob patterns (`text.layers.*.resid_post`, `vision.blocks.[01].attn.probs`);
    a pattern matching nothing raises one error naming it (and close names)."""
    available = list(available)
    out: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise HookError(f"{what} names must be strings, got {type(pattern).__name__}")
        hits = [pattern] if pattern in available else fnmatch.filter(available, pattern)
        if not hits:  # suggest the most similar names (difflib's ratio), else those sharing the first part
            close = difflib.get_close_matches(pattern.strip(), available, n=6, cutoff=0.6)
            stem = re.split(r"[.*?\[]", pattern)[0]
            close = close or ([n for n in available if n.startswith(stem)][:6] if stem else [])
            hint = f"; close: {close}" if close else "; see hooks.list_hook_points(model)"
            raise HookError(f"{what} name {pattern!r} matches no hook point of this model{hint}")
        out.extend(h for h in hits if h not in out)
    return out


@dataclasses.dataclass(frozen=True)
class HookContext:
    """What a hook is told besides the value.

    `step`: new tokens generated before this forward (0 for a forward or a prefill; k in the decode step that
    produces token k), traced. `valid`: which rows hold real data (text `[B, T]`: this call's attention mask;
    vision `[P]` real patch rows; merger `[M]`). `position_ids`: text `[3, B, T]` M-RoPE positions, vision `[P, 2]`
    (row, col) of each patch. `slots`: text `[T]`, the index of each query token in the caller's sequence (a
    forward: 0..T-1; generation: the prompt's columns, then prompt length + k for the k-th fed-back token).
    """

    name: str
    layer: int | None
    step: jax.Array | int = 0
    valid: jax.Array | None = None
    position_ids: jax.Array | None = None
    slots: jax.Array | None = None


@jax.tree_util.register_pytree_node_class
class HookSet:
    """Hooks by exact name plus the names to record. The names are static (the pytree's structure); each hook is a
    `jax.tree_util.Partial`, so arrays passed as its arguments are traced inputs, not constants."""

    def __init__(self, hooks: Mapping[str, Callable] | None = None, record: Iterable[str] = ()):
        hooks = dict(hooks or {})
        for name, fn in hooks.items():
            if not callable(fn):
                raise HookError(f"the hook for {name!r} must be callable fn(value, ctx) -> value, "
                                f"got {type(fn).__name__}")
        self.hooks = {n: fn if isinstance(fn, Partial) else Partial(fn) for n, fn in sorted(hooks.items())}
        self.record = tuple(sorted(set(record)))

    def __bool__(self) -> bool:
        return bool(self.hooks or self.record)

    def only(self, prefix: str, *, keep: bool = True) -> HookSet:
        """The hooks and records whose names start with `prefix` (`keep=False`: all the others): one tower's
        share, so the other tower's compiled program does not change."""
        return HookSet({n: f for n, f in self.hooks.items() if n.startswith(prefix) == keep},
                       [n for n in self.record if n.startswith(prefix) == keep])

    def tree_flatten(self):
        names = tuple(self.hooks)
        return (tuple(self.hooks[n] for n in names),), (names, self.record)

    @classmethod
    def tree_unflatten(cls, aux, children):
        out = object.__new__(cls)
        out.hooks, out.record = dict(zip(aux[0], children[0])), aux[1]
        return out


class _Run:
    def __init__(self, hooks: HookSet, step, offset):
        self.hooks, self.step, self.offset = hooks, step, offset
        self.records: dict[str, jax.Array] = {}
        self.call: dict[str, dict] = {}  # per tower ("text" / "vision"): valid, position_ids, slots


_ACTIVE: contextvars.ContextVar[_Run | None] = contextvars.ContextVar("qwen2vl_jax_hooks", default=None)


@contextlib.contextmanager
def install(hooks: HookSet | None, *, step=0, offset=0):
    """Activate `hooks` for the model code traced inside the block; yields the run whose `.records` holds the
    recorded values once the block ends. `hooks=None` (or an empty set) activates nothing. `step`: tokens generated
    so far; `offset`: cache slots before the caller's first token (generation's bucket padding), so `ctx.slots`
    are token indices of the caller's sequence."""
    if not hooks:
        yield _Run(HookSet(), step, offset)
        return
    run = _Run(hooks, step, offset)
    token = _ACTIVE.set(run)
    try:
        yield run
    finally:
        _ACTIVE.reset(token)


def active() -> bool:
    return _ACTIVE.get() is not None


def recording() -> bool:
    """True while tracing a run that records values (per-layer remat must step aside: values would leak out)."""
    run = _ACTIVE.get()
    return run is not None and bool(run.hooks.record)


def wants(name: str) -> bool:
    """Whether `name` is hooked or recorded in the current run (so a value that costs something to produce, like
    attention probabilities, is produced only then)."""
    run = _ACTIVE.get()
    return run is not None and (name in run.hooks.hooks or name in run.hooks.record)


def set_call(tower: str, **values) -> None:
    """Per-call facts hooks may read (`HookContext` fields) for one tower; a no-op outside a hooked run."""
    run = _ACTIVE.get()
    if run is not None:
        run.call[tower] = values


def point(name: str, value: jax.Array, layer: int | None = None) -> jax.Array:
    """The hook point `name`: `value` itself unless the current run hooks or records it."""
    run = _ACTIVE.get()
    if run is None:
        return value
    fn = run.hooks.hooks.get(name)
    if fn is not None:
        tower = "vision" if name.startswith("vision.") else "text"
        call = dict(run.call.get(tower, {}))
        if name == "vision.merger.out" and call.get("valid") is not None:
            call["valid"] = call["valid"].reshape(-1, 4)[:, 0]
        if call.get("slots") is not None:
            call["slots"] = call["slots"] - run.offset
        ctx = HookContext(name=name, layer=layer, step=run.step, **call)
        new = fn(value, ctx)
        if new is None:
            raise HookError(f"the hook for {name!r} returned None: return the value (edited or not)")
        new = jnp.asarray(new)
        if new.shape != value.shape:
            raise HookError(f"the hook for {name!r} returned shape {new.shape}, the point's value has {value.shape}")
        value = new.astype(value.dtype)
    if name in run.hooks.record:
        run.records[name] = value
    return value


def _chain(fns, value, ctx):
    for fn in fns:
        value = fn(value, ctx)
    return value


def make_hookset(config, hooks: Mapping[str, Callable | Iterable[Callable]] | HookSet | None = None,
                 record: Iterable[str] | str | None = ()) -> HookSet:
    """A `HookSet` for a model with this config from `{name or glob pattern: fn or [fns]}` and names / patterns to
    record (`record=None`: every point). Several hooks on one point run in the order given."""
    if isinstance(hooks, HookSet):
        if record:
            raise HookError("pass names to record together with a mapping of hooks, not with a built HookSet")
        return hooks
    available = hook_point_axes(config)
    if isinstance(record, str):
        record = [record]
    names = list(available) if record is None else resolve_names(record, available, "cache")
    by_name: dict[str, list] = {}
    if hooks is not None and not isinstance(hooks, Mapping):
        raise HookError(f"hooks must map hook point names (or patterns) to fn(value, ctx), got {type(hooks).__name__}")
    for pattern, fns in (hooks or {}).items():
        fns = list(fns) if isinstance(fns, list | tuple) else [fns]
        for fn in fns:
            if not callable(fn):
                raise HookError(f"the hook for {pattern!r} must be callable fn(value, ctx) -> value, "
                                f"got {type(fn).__name__}")
        for name in resolve_names([pattern], available):
            by_name.setdefault(name, []).extend(fns)
    chained = {n: fns[0] if len(fns) == 1 else Partial(_chain, tuple(f if isinstance(f, Partial) else Partial(f)
                                                                       for f in fns))
               for n, fns in by_name.items()}
    return HookSet(chained, names)
