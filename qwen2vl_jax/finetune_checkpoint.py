"""Fine-tuning checkpoints: the train state of a run, written and read with orbax-checkpoint.

A checkpoint (`<out>/checkpoints/<step>/`) holds the trainable parameters (`nnx.state(model, optimizer.wrt)`), the
optimizer state, the model's RNG streams (LoRA dropout), and JSON metadata (step, loader position, config, which
parts it holds), so a resumed run continues bit for bit. Frozen base weights are not saved: they come from the
base checkpoint. Typed PRNG keys are stored as their uint32 key data and rewrapped on restore.
"""

from __future__ import annotations

import logging
import sys
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


def _meta_problem(meta, step: int) -> str | None:
    """What is wrong with a checkpoint's metadata as read (None: the fields a resume reads are there)."""
    if not isinstance(meta, dict):
        return f"its metadata is a {type(meta).__name__}, not an object"
    for key, kind in (("step", int), ("loader", dict), ("config", dict), ("parts", list)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            return f"its metadata has no valid {key!r}"
    if meta["step"] != step:
        return f"its metadata says step {meta['step']}"
    return None


def _reason(e: BaseException) -> str:
    """A one-line reason from a reader's exception (orbax / tensorstore messages run to pages)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _drop_stray_reports(directory: Path) -> None:
    """orbax reads a checkpoint's arrays in an asyncio loop that it closes when one read fails; tensorstore's other
    reads of that checkpoint finish later, and each then meets the closed loop ("Event loop is closed" through
    `sys.unraisablehook`) or leaves a failed future nobody awaits ("Future exception was never retrieved" on the
    asyncio logger, naming the checkpoint's files): a traceback per read, after the damaged checkpoint was already
    reported in one line. Drop just those reports (process-wide, as the reads outlive the call); pass every other
    one on."""
    previous = sys.unraisablehook
    if not getattr(previous, "drops_closed_loop_reports", False):
        def hook(unraisable):
            e = unraisable.exc_value
            if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
                previous(unraisable)

        hook.drops_closed_loop_reports = True
        sys.unraisablehook = hook
    asyncio_log = logging.getLogger("asyncio")
    where = str(directory)
    if not any(getattr(f, "checkpoints", None) == where for f in asyncio_log.filters):
        def stray(record: logging.LogRecord) -> bool:
            text = record.getMessage()
            return not ("exception was never retrieved" in text  # a Future's or a Task's
                        and where in text + str(record.exc_info and record.exc_info[1]))

        stray.checkpoints = where
        asyncio_log.addFilter(stray)


def restore_intact(manager, model, optimizer, accept=None) -> tuple[int, dict]:
    """Restore the newest checkpoint that reads whole into `model` and `optimizer`; returns (step, metadata).

    A damaged checkpoint (a part missing, metadata unreadable, arrays that do not decode) is passed over for the
    one before it, with a one-line warning on stderr naming the step and why; once an intact one is restored, the
    damaged newer ones are moved to `<checkpoints>-damaged/` (the resumed run writes those steps again). No intact
    checkpoint: `FinetuneError` naming each and why, nothing moved. `accept(meta)` checks an intact checkpoint's
    metadata against the run before its arrays are read; its `FinetuneError` (settings that differ) propagates."""
    directory = Path(manager.directory)
    steps = sorted(manager.all_steps(), reverse=True)
    if not steps:
        raise FinetuneError(f"resume: no checkpoint in {directory} to resume from")
    damaged: list[tuple[int, str]] = []
    _drop_stray_reports(directory)
    for step in steps:
        meta = None
        if not (directory / str(step) / "meta").is_dir():  # each part is a folder named after it
            problem = "its metadata folder meta/ is missing"
        else:
            try:
                meta = read_meta(manager, step)
                problem = _meta_problem(meta, step)
            except Exception as e:  # noqa: BLE001  (whatever the reader raises, the checkpoint does not read)
                problem = f"its metadata does not read: {_reason(e)}"
        if problem is None:
            if accept is not None:
                accept(meta)
            try:
                restore_checkpoint(manager, model, optimizer, step)
            except FinetuneError:
                raise
            except Exception as e:  # noqa: BLE001
                problem = f"its arrays do not read: {_reason(e)}"
        if problem is not None:
            damaged.append((step, problem))
            continue
        aside = directory.parent / f"{directory.name}-damaged"
        for bad, why in damaged:
            target = aside / str(bad)
            n = 1
            while target.exists():
                target, n = aside / f"{bad}.{n}", n + 1
            aside.mkdir(parents=True, exist_ok=True)
            (directory / str(bad)).rename(target)
            print(f"warning: resume: checkpoint {bad} is damaged ({why}); resuming from step {step} (the damaged "
                  f"checkpoint is moved to {target})", file=sys.stderr, flush=True)
        if damaged:
            manager.reload()
        return step, meta
    raise FinetuneError(f"resume: no intact checkpoint in {directory}: " + "; ".join(
        f"checkpoint {bad}: {why}" for bad, why in damaged))


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
