"""Checkpoint conversion: Hugging Face <-> qwen2vl_jax format, and exporting an in-memory model.

* `hf_to_flax(src, dst)`: any checkpoint `from_pretrained` accepts -> our format: tensors named by our parameter
  paths in our layouts, `config.json` (4.x Hub layout), the marker `qwen2vl_jax.json`, and the tokenizer /
  processor / chat-template / generation files copied through.
* `flax_to_hf(src, dst)`: any checkpoint -> Hugging Face Hub key layout (`model.*`, `visual.*`, `lm_head.weight`
  only when untied), which transformers 4.x and 5.x load with no missing or unexpected keys. Also folds the
  >= 4.52 names (`model.language_model.*`) back into the Hub names.
* `save_pretrained(model, dst, format="hf"|"flax")`: the same, from a model in memory (e.g. after a research
  edit in JAX), one parameter at a time.

Quantized checkpoints (`qwen2vl_jax.quantization`): `convert(..., quantization="int8" | "int4")` quantizes each
targeted weight as it streams through (memory: one tensor in flight), and `save_pretrained` of a quantized model
writes its integers and scales. Either way the integers go under the weight's name (I8, or U8 for int4's packed
pairs), the fp32 scales beside them (`<module>.weight_scale` in the HF layout, `<module>.scale` in ours), and
config.json gets a `quantization_config` naming the quantized modules (`StoredQuantization`). Integers and scales
are never cast (`dtype` applies to the other tensors); a quantized source is copied as stored.

Every writer streams (headers are planned from shapes, then one tensor is read, cast, written and dropped at a
time), writes into a temporary folder beside the destination and renames it at the end, so a crash never
leaves a half-written checkpoint, and refuses to replace an existing destination unless `force=True`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ..modeling.config import Qwen2VLConfig
from ..modeling.model import Qwen2VL
from ..modeling.parameters import checkpoint_params
from ..quantization.formats import INT4_GROUP, QuantizationError, quantize_weight
from ..quantization.stored import StoredQuantization, plan_quantization, quantize_abstract, stored_quantization
from . import keymap as params_lib
from .load import (
    FORMAT_NAME,
    FORMAT_VERSION,
    OURS_MARKER,
    SIDE_FILES,
    Checkpoint,
    abstract_model,
    open_checkpoint,
    quantized_model,
    resolve_dtype,
)
from .safetensors_io import TensorSpec, write_checkpoint

logger = logging.getLogger(__name__)

DEFAULT_FLAX_SHARD_SIZE = "2GB"
DEFAULT_HF_SHARD_SIZE = "5GB"  # transformers' save_pretrained default
WEIGHTS_ROOT = Path("weights")
FORMATS = ("hf", "flax")


class DestinationNotWritableError(PermissionError, ValueError):
    """The destination (or its parent folder) cannot be written. A PermissionError, and a ValueError so that the
    converter commands report it in one line like the other user errors."""

    def __init__(self, message: str):
        super().__init__(message)


@dataclass
class ConversionSummary:
    destination: Path
    tensors: int
    bytes: int
    files: int
    seconds: float
    quantization: StoredQuantization | None = None

    def __str__(self) -> str:
        q = self.quantization
        quantized = "" if q is None else (f" ({len(q.modules)} modules in {q.mode}"
                                          + (f", groups of {q.group_size}" if q.group_size else "") + ")")
        return (f"wrote {self.tensors} tensors{quantized}, {self.bytes / 1e9:.3f} GB in {self.files} safetensors "
                f"file{'s' if self.files != 1 else ''} to {self.destination} in {self.seconds:.1f} s")


def default_destination(source: str | os.PathLike, root: str | os.PathLike = WEIGHTS_ROOT) -> Path:
    """`weights/<source name>-flax`; a Hub id `Qwen/Qwen2-VL-2B-Instruct` gives `weights/Qwen2-VL-2B-Instruct-flax`."""
    name = Path(os.fspath(source).rstrip("/\\")).expanduser().name or "checkpoint"
    return Path(root) / f"{name}-flax"


def _output_dtype(dtype) -> np.dtype | None:
    """None keeps each tensor's dtype; otherwise the one dtype every tensor is cast to."""
    return None if dtype is None or dtype == "auto" else np.dtype(resolve_dtype(dtype))


# ----------------------------------------------------------------------------------------- what to write
@dataclass
class _Tensors:
    """The tensors to write, in the destination's names and layout, and how to fetch one of them."""

    specs: list[TensorSpec]
    read: Callable[[str], np.ndarray]
    quantization: StoredQuantization | None = None  # what the written tensors hold (None: full precision)
    quantized: frozenset[str] = frozenset()  # names of the integers and scales written (never cast)

    @property
    def num_parameters(self) -> int:
        return sum(int(np.prod(s.shape, dtype=np.int64)) for s in self.specs)


def _from_checkpoint(ckpt: Checkpoint, out: params_lib.KeyLayout, dtype: np.dtype | None,
                     quantization: str | None = None, group_size: int | None = None) -> _Tensors:
    """Every parameter of `ckpt` (validated against the model its config describes), renamed for `out`.
    `quantization`: quantize the default targets (`quantization.DEFAULT_TARGETS`) of a full-precision checkpoint
    as they stream through; a quantized checkpoint is copied as stored (asking another mode or group: refused)."""
    if ckpt.external is not None:
        raise QuantizationError(f"{ckpt.directory} is a {ckpt.external.describe()} checkpoint, whose tensors convert "
                                "does not rewrite: load it with from_pretrained (GPTQ-Int4 as int4, the others "
                                "dequantized, or quantization=...) and save_pretrained the model")
    model = abstract_model(Qwen2VL, ckpt.config)
    model, layout = quantized_model(model, ckpt, quantization)  # a quantized source: its integers and scales
    stored = ckpt.quantization
    if stored is not None and group_size is not None and group_size != stored.group_size:
        raise QuantizationError(f"{ckpt.directory} is stored in {stored.mode}" + (
            f" in groups of {stored.group_size}" if stored.group_size else " (one scale per output channel)")
            + f"; it cannot be converted to groups of {group_size} (quantize its full-precision source)")
    params = params_lib.model_params(model)
    expected = {p: tuple(v.shape) for p, v in params.items()}
    # one CheckpointError listing every problem, before anything is written
    refs = params_lib.match_checkpoint(expected, ckpt.files, layout, where=ckpt.directory, ignore=ckpt.ignore,
                                       dtypes=params_lib.quantized_dtypes(model))
    quantizing = {}
    if stored is None and quantization is not None:
        stored = plan_quantization(model, quantization, group=INT4_GROUP if group_size is None else group_size)
        quantize_abstract(model, stored)
        quantizing = {f"{m}.weight": f"{m}{params_lib.SCALE_SUFFIX}" for m in stored.modules}
        params = params_lib.model_params(model)
    exact = params_lib.quantized_dtypes(model)
    out = params_lib.stored_as_is(out, exact)
    specs, sources = [], {}
    for path, ref in refs.items():
        for p in (path, quantizing.get(path)):  # a weight quantized on the way: its scales right after it
            if p is not None:
                spec = TensorSpec(out.to_name(p), exact.get(p) or dtype or ref.dtype,
                                  tuple(out.file_shape(p, params[p].shape)))
                specs.append(spec)
                sources[spec.name] = (p, ref, spec.dtype)
    scales: dict[str, np.ndarray] = {}  # the scales of the weight just quantized, written next
    weight_of = {scale: weight for weight, scale in quantizing.items()}

    def quantized(weight: str, ref: params_lib.TensorRef) -> tuple[np.ndarray, np.ndarray]:
        # cast first, as `from_pretrained(src, dtype=..., quantization=...)` quantizes the weight it loaded
        array = layout.to_ours(weight, ref.read()).astype(dtype or ref.dtype, copy=False)
        q, scale = quantize_weight(jnp.asarray(array), stored.mode, stored.group_size or INT4_GROUP)
        return np.asarray(q), np.asarray(scale)

    def read(name: str) -> np.ndarray:
        path, ref, dt = sources[name]
        if path in weight_of:  # the scales of the weight written just before (quantized again if asked alone)
            return scales.pop(path) if path in scales else quantized(weight_of[path], ref)[1]
        if path in quantizing:
            q, scales[quantizing[path]] = quantized(path, ref)
            return out.to_file(path, q)
        return out.to_file(path, layout.to_ours(path, ref.read())).astype(dt, copy=False)

    names = {out.to_name(p) for p in exact}
    return _Tensors(specs, read, stored, frozenset(names))


def _from_model(model, out: params_lib.KeyLayout, dtype: np.dtype | None) -> _Tensors:
    """Every parameter of an in-memory model, fetched to the host one at a time (a quantized model's integers and
    scales as they are)."""
    stored = stored_quantization(model)
    exact = params_lib.quantized_dtypes(model)
    out = params_lib.stored_as_is(out, exact)
    specs, sources = [], {}
    for path, (p, layer) in checkpoint_params(model).items():  # a scan_layers model's stacked params, per layer
        shape = p.shape if layer is None else p.shape[1:]
        spec = TensorSpec(out.to_name(path), exact.get(path) or dtype or np.dtype(p.dtype),
                          tuple(out.file_shape(path, shape)))
        specs.append(spec)
        sources[spec.name] = (path, p, layer, spec.dtype)

    def read(name: str) -> np.ndarray:
        path, p, layer, dt = sources[name]
        value = p.get_value() if layer is None else p.get_value()[layer]
        return out.to_file(path, np.asarray(jax.device_get(value))).astype(dt, copy=False)

    return _Tensors(specs, read, stored, frozenset(out.to_name(p) for p in exact))


def _layout_for(fmt: str, config: Qwen2VLConfig) -> params_lib.KeyLayout:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use 'hf' or 'flax'")
    return params_lib.hf_layout(config.vision_config) if fmt == "hf" else params_lib.OURS_LAYOUT


# ------------------------------------------------------------------------------------------------ writing
def _is_checkpoint_or_empty(directory: Path) -> bool:
    entries = list(directory.iterdir())
    return not entries or ((directory / "config.json").is_file()
                           and any(e.suffix == ".safetensors" and e.is_file() for e in entries))


# What a checkpoint folder holds, so what `--force` may replace: the files a conversion writes (config.json, the
# marker, weights and their index, the side files), weights in the other formats transformers writes, and a Hub
# repository's own files. Anything else (a folder, notes) is the user's: a destination holding it is refused.
CHECKPOINT_FILES = {"config.json", OURS_MARKER, *SIDE_FILES, "README.md", "LICENSE", ".gitattributes"}
CHECKPOINT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json", ".msgpack")


def _foreign_entries(directory: Path) -> list[str]:
    """Entries of a checkpoint folder that are not checkpoint files (folders end with "/")."""
    out = []
    for e in sorted(directory.iterdir(), key=lambda e: e.name):
        if e.is_dir() and not e.is_symlink():
            out.append(e.name + "/")
        elif e.name not in CHECKPOINT_FILES and not e.name.endswith(CHECKPOINT_SUFFIXES):
            out.append(e.name)
    return out


def _check_destination(dst: Path, force: bool, protect: Path | None) -> None:
    out = dst.resolve()
    if protect is not None:  # converting a checkpoint onto itself (or its parent folder) is surely a mistake
        src = protect.resolve()
        if src == out or out in src.parents:
            raise ValueError(f"destination {dst} would replace the source checkpoint {protect}; choose another")
    if not dst.exists() and not dst.is_symlink():
        return
    if not force:
        raise FileExistsError(f"{dst} already exists; pass --force (force=True) to replace it")
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise ValueError(f"refusing to replace {dst}: it is the current directory or one of its parents; "
                         "choose a new folder for the checkpoint")
    if not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a directory; --force only replaces a checkpoint "
                              "directory, so choose another destination or remove it yourself")
    try:
        replaceable = _is_checkpoint_or_empty(dst)
    except PermissionError as err:
        raise DestinationNotWritableError(f"cannot inspect the existing destination {dst}: permission denied") \
            from err
    if not replaceable:
        raise FileExistsError(f"{dst} is not a checkpoint directory (no config.json and *.safetensors files); "
                              "--force only replaces a checkpoint or an empty directory, so choose another "
                              "destination or remove it yourself")
    foreign = _foreign_entries(dst)
    if foreign:
        shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
        raise FileExistsError(f"{dst} also holds {shown}, which are not checkpoint files; --force only replaces "
                              "checkpoints, so move them out or choose another destination")


TMP_INFIX = ".tmp-"
STALE_UNNAMED_TMP_SECONDS = 24 * 3600  # temporary folders of older versions carry no process id


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    except OSError:
        return True  # cannot tell: keep its folder
    return True


def _remove_stale_temporaries(dst: Path) -> None:
    """Delete `.NAME.tmp-PID-*` folders beside `dst` whose process is gone (a conversion that was killed before
    it could clean up), and `.NAME.tmp-XXXXXXXX` folders of older versions untouched for a day. A folder of a
    live process is left alone: that conversion is still writing it."""
    prefix = f".{dst.name}{TMP_INFIX}"
    try:
        entries = [e for e in dst.parent.iterdir() if e.name.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        if entry.is_symlink() or not entry.is_dir():
            continue
        tail = entry.name[len(prefix):]
        pid_text, sep, _ = tail.partition("-")
        if sep and pid_text.isdigit():
            pid = int(pid_text)
            if _process_alive(pid):
                continue
            why = f"its process {pid} is gone"
        else:
            try:
                age = time.time() - entry.stat().st_mtime
            except OSError:
                continue
            if age < STALE_UNNAMED_TMP_SECONDS:
                continue
            why = f"untouched for {age / 3600:.0f} h"
        shutil.rmtree(entry, ignore_errors=True)
        if entry.exists():
            logger.warning("could not remove the stale temporary folder %s of an interrupted conversion", entry)
        else:
            logger.warning("removed the stale temporary folder %s left by an interrupted conversion (%s)", entry, why)


def _make_temporary(dst: Path) -> Path:
    """An empty folder beside `dst` (same file system, so the final rename is atomic), named after this process so
    a later conversion can tell whether it is still in use. `os.mkdir` applies the umask (tempfile.mkdtemp would
    make it 0o700, and the rename would keep that mode for the checkpoint)."""
    for _ in range(100):
        tmp = dst.parent / f".{dst.name}{TMP_INFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"could not create a temporary folder beside {dst}")


def _replace(tmp: Path, dst: Path) -> None:
    """Move the finished `tmp` to `dst`; an existing `dst` is moved aside first and deleted after."""
    if not dst.exists() and not dst.is_symlink():
        os.replace(tmp, dst)
        return
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old, dst)  # put the previous checkpoint back
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def _main_dtype(specs: list[TensorSpec], quantized: frozenset[str] = frozenset()) -> str:
    """The one dtype of the tensors (a quantized checkpoint's integers and scales aside), or "mixed"."""
    dtypes = {np.dtype(s.dtype).name for s in specs if s.name not in quantized}
    return dtypes.pop() if len(dtypes) == 1 else "mixed"


def _write(dst: str | os.PathLike, fmt: str, config: Qwen2VLConfig, tensors: _Tensors, *, source: str,
           source_dir: Path | None, max_shard_size, force: bool, progress: bool,
           protect: Path | None = None) -> ConversionSummary:
    """Write tensors, config, marker and side files into a temporary folder, then rename it to `dst`."""
    dst = Path(dst).expanduser()
    _check_destination(dst, force, protect)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(dst)
        tmp = _make_temporary(dst)
    except PermissionError as err:
        where = err.filename or dst.parent
        raise DestinationNotWritableError(f"cannot write the checkpoint to {dst}: permission denied on {where}") \
            from err
    start = time.perf_counter()
    total = sum(s.nbytes for s in tensors.specs)
    from tqdm.auto import tqdm  # imported when writing: in a Jupyter kernel without ipywidgets it warns at import

    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {dst.name}", disable=not progress)
    try:
        files = write_checkpoint(tmp, tensors.specs, tensors.read, max_shard_size=max_shard_size,
                                 metadata={"format": "pt" if fmt == "hf" else "flax"},
                                 on_tensor=lambda s: bar.update(s.nbytes))
        dtype = _main_dtype(tensors.specs, tensors.quantized)
        hf_config = config.to_hf_dict()
        if dtype != "mixed":
            hf_config["torch_dtype"] = dtype  # what transformers' torch_dtype="auto" reads, like Hub files
        if tensors.quantization is not None:  # the modules in the names this layout gives them
            layout = _layout_for(fmt, config)
            hf_config["quantization_config"] = tensors.quantization.to_config(
                lambda module: params_lib.module_name(layout, module))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if fmt == "flax":
            marker = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "dtype": dtype,
                "num_parameters": tensors.num_parameters,
                "num_tensors": len(tensors.specs),
                "tie_word_embeddings": config.tie_word_embeddings,
                "quantization": tensors.quantization.mode if tensors.quantization is not None else None,
                "source": source,
                "tensor_names": "qwen2vl_jax parameter paths; Linear weights [out, in] as in PyTorch, "
                                "visual.patch_embed.proj.weight flattened to [embed_dim, C*T*P*P]",
            }
            (tmp / OURS_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if source_dir is not None:
            for name in SIDE_FILES:
                if (source_dir / name).is_file():
                    shutil.copyfile(source_dir / name, tmp / name)
        try:
            _replace(tmp, dst)
        except PermissionError as err:
            raise DestinationNotWritableError(f"cannot move the finished checkpoint into place at {dst}: "
                                              f"permission denied on {err.filename or dst}") from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    n_files = sum(1 for f in files if f.suffix == ".safetensors")
    return ConversionSummary(dst, len(tensors.specs), total, n_files, time.perf_counter() - start,
                             tensors.quantization)


# ------------------------------------------------------------------------------------------------- public
def convert(source, destination, *, format: str, dtype=None, max_shard_size=None, force: bool = False,
            progress: bool = True, local_files_only: bool | None = None, revision: str | None = None,
            quantization: str | None = None, group_size: int | None = None) -> ConversionSummary:
    """Re-write any checkpoint `from_pretrained` accepts as `format` ("hf" or "flax") at `destination`.
    `quantization` ("int8" / "int4"): write a quantized checkpoint, each targeted weight (the text decoder's
    projections and the output projection, `quantization.DEFAULT_TARGETS`) quantized as it streams through;
    `group_size`: int4's input columns per scale (default 128). A quantized source is copied as stored."""
    ckpt = open_checkpoint(source, local_files_only=local_files_only, revision=revision)
    if group_size is not None and (quantization or (ckpt.quantization and ckpt.quantization.mode)) != "int4":
        raise QuantizationError(f"group_size={group_size} applies to int4 only (int8 has one scale per output "
                                "channel)")
    tensors = _from_checkpoint(ckpt, _layout_for(format, ckpt.config), _output_dtype(dtype), quantization,
                               group_size)
    shard = max_shard_size or (DEFAULT_HF_SHARD_SIZE if format == "hf" else DEFAULT_FLAX_SHARD_SIZE)
    return _write(destination, format, ckpt.config, tensors, source=os.fspath(source), source_dir=ckpt.directory,
                  max_shard_size=shard, force=force, progress=progress, protect=ckpt.directory)


def hf_to_flax(source, destination=None, *, dtype=None, max_shard_size=DEFAULT_FLAX_SHARD_SIZE, force: bool = False,
               progress: bool = True, local_files_only: bool | None = None, revision: str | None = None,
               quantization: str | None = None, group_size: int | None = None) -> ConversionSummary:
    """HF checkpoint (local dir, either key layout, or Hub id) -> our format at `destination`
    (default `weights/<name>-flax`). `dtype`: None keeps the source dtype, or "bfloat16" / "float32".
    `quantization` / `group_size`: see `convert`."""
    destination = destination if destination is not None else default_destination(source)
    return convert(source, destination, format="flax", dtype=dtype, max_shard_size=max_shard_size, force=force,
                   progress=progress, local_files_only=local_files_only, revision=revision,
                   quantization=quantization, group_size=group_size)


def flax_to_hf(source, destination, *, dtype=None, max_shard_size=DEFAULT_HF_SHARD_SIZE, force: bool = False,
               progress: bool = True, quantization: str | None = None,
               group_size: int | None = None) -> ConversionSummary:
    """Our format (or any HF checkpoint) -> the Hugging Face Hub key layout at `destination`. `quantization` /
    `group_size`: see `convert` (transformers does not load the quantized layout: qwen2vl_jax does)."""
    return convert(source, destination, format="hf", dtype=dtype, max_shard_size=max_shard_size, force=force,
                   progress=progress, quantization=quantization, group_size=group_size)


def save_pretrained(model, destination, *, format: str = "hf", dtype=None, max_shard_size=None, force: bool = False,
                    progress: bool = False, side_files_from: str | os.PathLike | None = None) -> ConversionSummary:
    """Write an in-memory model as a Hugging Face ("hf", loadable by transformers) or qwen2vl_jax ("flax")
    checkpoint, one parameter at a time. Tokenizer / processor files are copied from `side_files_from`
    (default: the directory the model was loaded from, when known). A model with LoRA adapters is refused:
    `lora.merge_lora(model)` first, or `lora.save_adapter` for the adapters alone. A quantized model writes a
    quantized checkpoint (its integers and scales as they are; `dtype` casts the other tensors only), which
    `from_pretrained` loads as stored."""
    adapters = len(params_lib.model_params(model, adapters=True)) - len(params_lib.model_params(model))
    if adapters:
        quantized = any(path.endswith(params_lib.SCALE_SUFFIX) for path in params_lib.model_params(model))
        raise ValueError(f"the model carries {adapters // 2} unmerged LoRA adapters, which a base checkpoint cannot "
                         "hold: " + ("save them with qwen2vl_jax.lora.save_adapter (adapters cannot be merged into "
                                     "quantized weights)" if quantized else "call qwen2vl_jax.lora.merge_lora(model) "
                                     "first (or lora.save_adapter for the adapters)"))
    tensors = _from_model(model, _layout_for(format, model.config), _output_dtype(dtype))
    source_dir = side_files_from if side_files_from is not None else getattr(model, "source_dir", None)
    source_dir = Path(source_dir) if source_dir is not None and Path(source_dir).is_dir() else None
    shard = max_shard_size or (DEFAULT_HF_SHARD_SIZE if format == "hf" else DEFAULT_FLAX_SHARD_SIZE)
    return _write(destination, format, model.config, tensors, source="in-memory model"
                  + (f" loaded from {source_dir}" if source_dir else ""), source_dir=source_dir,
                  max_shard_size=shard, force=force, progress=progress)
