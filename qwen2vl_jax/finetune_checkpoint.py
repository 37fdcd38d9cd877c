"""Fine-tuning checkpoints: the train state of a run, written and read with orbax-checkpoint.

A checkpoint (`<out>/checkpoints/<step>/`) holds the trainable parameters (`nnx.state(model, optimizer.wrt)`), the
optimizer state, the model's RNG streams (LoRA dropout), and JSON metadata (step, loader position, config, which
parts it holds), so a resumed run continues bit for bit. Frozen base weights are not saved: they come from the
base checkpoint. Typed PRNG keys are stored as their uint32 key data and rewrapped on restore.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

CHECKPOINTS = "checkpoints"


class FinetuneError(ValueError):
    """A setting, an output directory or a checkpoint the user can fix; the message says what."""


def _is_key(x) -> bool:
    return jnp.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)


def _arrays(state) -> dict:
    """A nested dict of plain arrays (typed PRNG keys as their uint32 data, which orbax stores)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, nnx.to_pure_dict(state))


def train_state(model, optimizer) -> dict:
    """What a checkpoint holds besides the metadata; an empty part (no RNG streams without dropout) is left out."""
    parts = {"params": nnx.state(model, optimizer.wrt), "optimizer": nnx.state(optimizer),
             "rng": nnx.state(model, nnx.RngState)}
    return {k: v for k, v in parts.items() if jax.tree.leaves(v)}


def checkpoint_manager(directory, keep: int = 2, *, read_only: bool = False):
    """Synchronous orbax `CheckpointManager`: each save is written to a temporary directory and renamed when
    complete (orbax's atomic commit), so a killed run leaves only whole checkpoints; a writer removes stale
    temporaries, a reader (`read_only`) touches nothing, so it may read a directory a live run writes to."""
    import orbax.checkpoint as ocp

    mode = {"save_interval_steps": 0, "max_to_keep": None, "create": False} if read_only else {
        "max_to_keep": keep, "cleanup_tmp_directories": True}
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, read_only=read_only, **mode)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def save_checkpoint(manager, step: int, model, optimizer, meta: dict) -> None:
    import orbax.checkpoint as ocp

    items = {k: ocp.args.StandardSave(_arrays(v)) for k, v in train_state(model, optimizer).items()}
    manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items), force=True)
    manager.wait_until_finished()


def read_meta(manager, step: int) -> dict:
    """A checkpoint's metadata: step, loader state, config, which parts it holds."""
    import orbax.checkpoint as ocp

    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_checkpoint(manager, model, optimizer, step: int | None = None) -> dict:
    """Load a checkpoint (default: the latest) into `model` and `optimizer` in place; returns its metadata."""
    import orbax.checkpoint as ocp

    step = manager.latest_step() if step is None else step
    meta = read_meta(manager, step)
    states = train_state(model, optimizer)
    if sorted(states) != sorted(meta.get("parts", [])):
        raise FinetuneError(f"checkpoint {step} holds {meta.get('parts')}, this run needs {sorted(states)}")
    args = {k: ocp.args.StandardRestore(_arrays(v)) for k, v in states.items()}
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    for name, state in states.items():
        template = nnx.to_pure_dict(state)
        pure = jax.tree.map(lambda r, t: jax.random.wrap_key_data(jnp.asarray(r), impl=jax.random.key_impl(t))
                            if _is_key(t) else r, restored[name], template)
        nnx.replace_by_pure_dict(state, pure)
        nnx.update(optimizer if name == "optimizer" else model, state)
    return meta


def read_checkpoint(out_dir, step: int | None = None) -> dict:
    """A run's checkpoint as saved (`{"meta", "params", "optimizer", "rng"}` of NumPy / JAX arrays, no model
    needed): for inspection and for comparing runs."""
    import orbax.checkpoint as ocp

    manager = checkpoint_manager(Path(out_dir) / CHECKPOINTS, read_only=True)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FinetuneError(f"no checkpoint in {Path(out_dir) / CHECKPOINTS}")
    meta = read_meta(manager, step)
    parts = manager.restore(step, args=ocp.args.Composite(**{k: ocp.args.StandardRestore() for k in meta["parts"]}))
    return {"meta": meta, **{k: parts[k] for k in meta["parts"]}}
