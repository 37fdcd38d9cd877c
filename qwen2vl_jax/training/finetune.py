"""Fine-tuning: the training loop behind `qwen2vl-jax finetune`, and the same from Python.

    cfg = FinetuneConfig(model="Qwen/Qwen2-VL-2B-Instruct", data="train.jsonl", out="runs/a", lora_rank=16, steps=500)
    result = finetune(cfg)          # {"loss", "eval", "paths", "compiles", ...}; runs/a/adapter in PEFT's format

What trains: LoRA adapters (`lora_rank`: PEFT's default targets, the decoder's q/k/v/o and gate/up/down), or every
weight (full fine-tuning; `freeze_vision`: the vision tower frozen except its merger). QLoRA (`quantize="int8"` /
"int4" with `lora_rank`, or a quantized base checkpoint): the adapters train over the frozen integers of a base
quantized as it loads (`qwen2vl_jax.quantization`); the adapter is saved in PEFT's format as always. Each optimizer
step takes `grad_accum` micro-batches from the `data.Loader` (`training.accumulate_step`: the loss is the mean over
the kept tokens of all of them). Batches are padded to shape buckets, so a run compiles once per bucket it meets.

Written to `out/`: `metrics.jsonl` (a line per step, plus eval lines), `finetune_config.json`, `checkpoints/<step>`
(orbax-checkpoint, atomic: written to a temporary directory, then renamed; the last `keep_checkpoints` kept): the
trainable weights, optimizer state, RNG streams (LoRA dropout), loader position and config, so `resume=True`
continues bit for bit; at the end `adapter/` (LoRA, PEFT format) or `model/` (full: HF checkpoint + tokenizer).


Fine-tuning checkpoints: the train state of a run, written and read with orbax-checkpoint.

A checkpoint (`<out>/checkpoints/<step>/`) holds the trainable parameters (`nnx.state(model, optimizer.wrt)`), the
optimizer state, the model's RNG streams (LoRA dropout), and JSON metadata (step, loader position, config, which
parts it holds), so a resumed run continues bit for bit. Frozen base weights are not saved: they come from the
base checkpoint. Typed PRNG keys are stored as their uint32 key data and rewrapped on restore.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from .. import lora as lora_lib
from ..attention import AttentionBackendError
from ..checkpoints.keymap import CheckpointError
from ..generation.sampling import seed_problem
from ..modeling.config import REMAT_POLICIES
from ..quantization.apply import quantized_linears
from ..quantization.formats import QuantizationError
from . import steps as training
from .data import IGNORE_INDEX, Loader, collate, encode_conversation, read_jsonl

METRICS, CONFIG_FILE = "metrics.jsonl", "finetune_config.json"
DEFAULT_LR = {"lora": 2e-4, "full": 1e-5}  # the usual LoRA / full fine-tuning rates for Qwen2-VL
# Settings a resumed run may change; any other difference would not fit the saved state.
RESUMABLE_CHANGES = {"resume", "save_every", "eval_every", "eval_data", "steps", "epochs", "out", "keep_checkpoints"}


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run. `lora_rank=None` means full fine-tuning. `lr=None`: 2e-4 with LoRA, 1e-5 full.
    `lora_alpha=None`: 2 x rank. `steps` or `epochs` (neither: one epoch). `remat`: a `layers.REMAT_POLICIES` name."""

    model: str
    data: str
    out: str
    eval_data: str | None = None
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | str | None = None
    vision_lora: bool = False
    freeze_vision: bool = False
    lr: float | None = None
    steps: int | None = None
    epochs: float | None = None
    batch_size: int = 1
    grad_accum: int = 1
    max_length: int | None = None
    save_every: int | None = None
    eval_every: int | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    remat: str | None = None
    dtype: str = "float32"
    resume: bool = False
    attn_implementation: str | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    keep_checkpoints: int = 2
    quantize: str | None = None  # QLoRA: the base's text decoder projections and output projection, int8 / int4

    def __post_init__(self):
        for name in ("model", "data", "out", "eval_data"):  # paths as strings: the config is saved as JSON
            if getattr(self, name) is not None:
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        if self.lora_targets is not None and not isinstance(self.lora_targets, str):
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        self.validate()

    @property
    def lora(self) -> bool:
        return self.lora_rank is not None

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR["lora" if self.lora else "full"]

    def validate(self) -> None:
        def need(ok: bool, message: str):
            if not ok:
                raise FinetuneError(message)

        for name in ("model", "data", "out", "eval_data"):  # "" would be the current folder
            value = getattr(self, name)
            need(value is None and name == "eval_data" or isinstance(value, str) and value.strip() != "",
                 f"{name} must name a {dict(model='model', out='directory').get(name, 'file')}, got an empty "
                 f"path {value!r}")
        for name in ("batch_size", "grad_accum", "max_length", "save_every", "eval_every", "steps",
                     "keep_checkpoints", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and value >= 1), f"{name} must be a positive integer, "
                 f"got {value!r}")
        need(self.steps is None or self.epochs is None, "give steps or epochs, not both")
        need(self.epochs is None or self.epochs > 0, f"epochs must be positive, got {self.epochs}")
        need(self.lr is None or self.lr > 0, f"lr must be positive, got {self.lr}")
        need(0.0 <= self.warmup_ratio <= 1.0, f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(seed_problem(self.seed) is None, f"seed {seed_problem(self.seed)}")
        mgn = self.max_grad_norm
        need(mgn is None or (isinstance(mgn, (int, float)) and not isinstance(mgn, bool) and 0 < mgn < math.inf),
             f"max_grad_norm must be a finite number > 0 (None: no clipping), got {mgn!r}")
        need(self.dtype in ("float32", "bfloat16"), f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        need(self.remat is None or self.remat in REMAT_POLICIES, f"unknown remat policy {self.remat!r}; use one "
             f"of {', '.join(REMAT_POLICIES)}")
        need(self.eval_every is None or self.eval_data is not None, "eval_every needs eval_data")
        need(self.lora_rank is None or (isinstance(self.lora_rank, int) and self.lora_rank >= 1),
             f"lora_rank must be a positive integer, got {self.lora_rank!r}")
        need(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora:
            used = [n for n in ("lora_alpha", "lora_targets") if getattr(self, n) is not None]
            used += [n for n in ("lora_dropout", "vision_lora") if getattr(self, n)]
            need(not used, f"{', '.join(used)} only apply to LoRA: give lora_rank (--lora-rank)")
        need(not (self.freeze_vision and self.vision_lora), "freeze_vision and vision_lora contradict each other")
        need(self.quantize in (None, "int8", "int4"), f"quantize must be int8 or int4, got {self.quantize!r}")
        need(self.quantize is None or self.lora, "quantize trains LoRA adapters over frozen quantized weights "
             "(QLoRA): give lora_rank (--lora-rank); full fine-tuning cannot train integers")

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["lora_targets"] = list(self.lora_targets) if isinstance(self.lora_targets, tuple) else self.lora_targets
        return out


# ---------------------------------------------------------------------------------------------- the run
def _lr_at(cfg: FinetuneConfig, steps: int, update: int) -> float:
    """The rate of optimizer update `update` (0-based): `training.default_recipe`'s own schedule."""
    return float(training.recipe_schedule(cfg.learning_rate, steps, warmup_ratio=cfg.warmup_ratio)(update))


def _load(cfg: FinetuneConfig):
    """(processor, model) from `cfg.model`, user errors as `FinetuneError`."""
    from ..hub import resolve_source
    from ..pretrained import Qwen2VLForConditionalGeneration
    from ..processing.processor import Qwen2VLProcessor

    try:
        directory = resolve_source(cfg.model)
        overrides = {k: v for k, v in (("min_pixels", cfg.min_pixels), ("max_pixels", cfg.max_pixels)) if v}
        processor = Qwen2VLProcessor.from_pretrained(directory, **overrides)
        # QLoRA: each targeted weight is quantized as it streams in (the full-precision base never exists); a
        # quantized checkpoint loads as stored
        model = Qwen2VLForConditionalGeneration.from_pretrained(directory, dtype=cfg.dtype,
                                                                attn_implementation=cfg.attn_implementation,
                                                                quantization=cfg.quantize)
    except (FileNotFoundError, NotADirectoryError, CheckpointError, AttentionBackendError,
            QuantizationError) as e:
        raise FinetuneError(f"cannot load the model {cfg.model}: {e}") from None
    except ValueError as e:  # processor files
        raise FinetuneError(f"cannot load the processor of {cfg.model}: {e}") from None
    return processor, model


def _setup_trainable(cfg: FinetuneConfig, model) -> str:
    """Adapters or the trainable preset; returns the `training.trainable_filter` spec."""
    if not cfg.lora:
        quantized = quantized_linears(model)
        if quantized:  # a quantized base checkpoint
            raise FinetuneError(f"{cfg.model} holds quantized weights ({len(quantized)} modules, e.g. "
                                f"{next(iter(quantized))}), which full fine-tuning cannot train: train LoRA adapters "
                                "over them (lora_rank, --lora-rank) or fine-tune the full-precision checkpoint")
        return "merger" if cfg.freeze_vision else "all"
    targets = cfg.lora_targets
    if targets is None:
        targets = lora_lib.DEFAULT_TARGETS + (lora_lib.VISION_TARGETS if cfg.vision_lora else ())
    elif cfg.vision_lora and not isinstance(targets, str):
        targets = tuple(targets) + lora_lib.VISION_TARGETS
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2.0 * cfg.lora_rank
    lora_lib.apply_lora(model, cfg.lora_rank, alpha, targets, dropout=cfg.lora_dropout, seed=cfg.seed)
    if cfg.lora_dropout > 0:
        lora_lib.set_lora_training(model, True)
    return "lora"


def _eval_batches(cfg: FinetuneConfig, processor, model, conversations):
    """The eval set as prepared batches of `batch_size` rows, encoded lazily on each pass (holding every eval
    image's pixels between evals would cost memory in proportion to the eval set). The last batch is filled with
    copies of its first example whose labels are all -100: same shape as the others, no extra tokens counted."""
    pad = Loader(conversations, processor, batch_size=1).pad_token_id

    def batches():
        for i in range(0, len(conversations), cfg.batch_size):
            chunk = [encode_conversation(processor, c.messages, max_length=cfg.max_length, line=c.line,
                                         source=c.source) for c in conversations[i:i + cfg.batch_size]]
            filler = dataclasses.replace(chunk[0], labels=np.full_like(chunk[0].labels, IGNORE_INDEX))
            chunk += [filler] * (cfg.batch_size - len(chunk))
            yield training.prepare_batch(model, **collate(chunk, pad_token_id=pad))

    return batches


def evaluate(model, batches, *, dropout: bool = False) -> dict:
    """Loss, tokens and accuracy over all `batches` (an iterable of `training.Batch`, or a function returning one;
    sums over every batch, then one mean), adapters' dropout off."""
    batches = batches() if callable(batches) else batches
    if dropout:
        lora_lib.set_lora_training(model, False)
    try:
        sums = None
        for batch in batches:
            s = jax.device_get(training.eval_step(model, batch))
            sums = s if sums is None else {k: sums[k] + s[k] for k in s}
    finally:
        if dropout:
            lora_lib.set_lora_training(model, True)
    return {k: float(v) if k != "tokens" else int(v) for k, v in training.finish_metrics(sums).items()}


def _prepare_out(cfg: FinetuneConfig, manager) -> int | None:
    """The step to resume from (None: a fresh run); refuses to mix a new run into an old one."""
    latest = manager.latest_step()
    if cfg.resume and latest is None:
        raise FinetuneError(f"resume: no checkpoint in {Path(cfg.out) / CHECKPOINTS} to resume from")
    if not cfg.resume and latest is not None:
        raise FinetuneError(f"{cfg.out} already holds checkpoints (latest: step {latest}); resume it (--resume) or "
                            "choose another output directory")
    return latest


def _check_resumable(cfg: FinetuneConfig, saved: dict) -> None:
    now = cfg.to_dict()
    changed = sorted(k for k in set(now) | set(saved) if k not in RESUMABLE_CHANGES and now.get(k) != saved.get(k))
    if changed:
        raise FinetuneError("cannot resume with different settings: " + ", ".join(
            f"{k} was {saved.get(k)!r}, now {now.get(k)!r}" for k in changed))


def finetune(cfg: FinetuneConfig, *, progress: bool = True) -> dict:
    """Run (or resume) one fine-tuning run; returns the final metrics, the eval metrics, the paths written, the
    compile counts (`steps.compiles()` deltas) and the distinct batch shapes met.

    User errors raise before the first step: `FinetuneError` (settings, output directory, model),
    `data.DataError` (a bad line, a missing image), `lora.LoRAError` (targets)."""
    t_start, compiles0 = time.perf_counter(), training.compiles()
    out = Path(cfg.out)
    train_data = read_jsonl(cfg.data)  # every line and media file checked before anything is loaded or written
    eval_data = read_jsonl(cfg.eval_data) if cfg.eval_data else None
    manager = checkpoint_manager(out / CHECKPOINTS, cfg.keep_checkpoints)
    resume_from = _prepare_out(cfg, manager)

    processor, model = _load(cfg)
    if cfg.remat:
        model.set_remat(cfg.remat)
    spec = _setup_trainable(cfg, model)
    loader = Loader(train_data, processor, batch_size=cfg.batch_size, max_length=cfg.max_length, seed=cfg.seed)
    steps = cfg.steps or max(1, math.ceil((cfg.epochs or 1) * loader.batches_per_epoch / cfg.grad_accum))
    tx = training.default_recipe(cfg.learning_rate, steps, warmup_ratio=cfg.warmup_ratio,
                                 weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm)
    optimizer = training.make_optimizer(model, tx, spec)

    start = 0
    if resume_from is not None:  # the newest intact checkpoint (a damaged one is passed over, with a warning)
        resume_from, saved = restore_intact(manager, model, optimizer,
                                            accept=lambda meta: _check_resumable(cfg, meta["config"]))
        try:
            loader.load_state_dict(saved["loader"])
        except ValueError as e:
            raise FinetuneError(f"resume: checkpoint {resume_from}: {e}") from None
        start = int(saved["step"])
        if start > steps:
            raise FinetuneError(f"the checkpoint is at step {start}, past this run's {steps} steps")
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps({**cfg.to_dict(), "resolved": {
        "lr": cfg.learning_rate, "steps": steps, "trainable": spec}}, indent=1) + "\n")
    log_path = out / METRICS
    _truncate_log(log_path, start)
    eval_batches = _eval_batches(cfg, processor, model, eval_data) if eval_data else None
    dropout = cfg.lora and cfg.lora_dropout > 0

    shapes, batches, last, final_eval, saved_step = set(), iter(loader), {}, None, resume_from
    bar = tqdm(total=steps, initial=start, desc="finetune", unit="step", file=sys.stderr, disable=not progress)
    pending = None  # (step, device metrics, input tokens): fetched after the next step is dispatched
    t_last = time.perf_counter()

    def flush():
        nonlocal pending, t_last, last
        if pending is None:
            return
        step, metrics, n_in = pending
        pending = None
        m = jax.device_get(metrics)
        now = time.perf_counter()
        seconds, t_last = now - t_last, now
        last = {"step": step, "loss": float(m["loss"]), "tokens": int(m["tokens"]),
                "accuracy": float(m["accuracy"]), "lr": _lr_at(cfg, steps, step - 1), "seconds": round(seconds, 4)}
        _append(log_path, last)
        bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{n_in / max(seconds, 1e-9):.0f}", refresh=False)
        bar.update(1)

    def checkpoint(step):
        nonlocal saved_step
        flush()
        meta = {"step": step, "loader": loader.state_dict(), "config": cfg.to_dict(), "steps": steps,
                "parts": sorted(train_state(model, optimizer))}
        save_checkpoint(manager, step, model, optimizer, meta)
        saved_step = step

    try:
        for step in range(start + 1, steps + 1):
            micro = [training.prepare_batch(model, **next(batches)[0]) for _ in range(cfg.grad_accum)]
            shapes.update(b.shape for b in micro)
            n_in = int(sum(np.asarray(b.attention_mask_BT).sum() for b in micro))
            metrics = training.accumulate_step(model, optimizer, micro)
            flush()
            pending = (step, metrics, n_in)
            if cfg.save_every and step % cfg.save_every == 0:
                checkpoint(step)
            if eval_batches and cfg.eval_every and step % cfg.eval_every == 0 and step != steps:
                flush()
                _append(log_path, {"step": step, **_prefixed(evaluate(model, eval_batches, dropout=dropout))})
        flush()
        if saved_step != steps:
            checkpoint(steps)
    finally:
        bar.close()
    if eval_batches:
        final_eval = evaluate(model, eval_batches, dropout=dropout)
        _append(log_path, {"step": steps, **_prefixed(final_eval)})

    paths = {"out": str(out), "metrics": str(log_path), "config": str(out / CONFIG_FILE),
             "checkpoints": str(out / CHECKPOINTS)}
    if cfg.lora:
        paths["adapter"] = str(lora_lib.save_adapter(model, out / "adapter", base_model_name_or_path=cfg.model,
                                                     force=True))
    else:
        model.save_pretrained(out / "model", force=True)
        paths["model"] = str(out / "model")
    return {"steps": steps, "resumed_from": resume_from, "loss": last.get("loss"), "accuracy": last.get("accuracy"),
            "tokens": last.get("tokens"), "eval": final_eval, "paths": paths,
            "compiles": {k: n - compiles0.get(k, 0) for k, n in training.compiles().items()},
            "batch_shapes": sorted(shapes), "seconds": round(time.perf_counter() - t_start, 2)}


_prefixed = lambda metrics: {f"eval_{k}": v for k, v in metrics.items()}


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past `step` (a resumed run redoes the steps after its checkpoint) or all (a fresh run)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines()
            if step and line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


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
