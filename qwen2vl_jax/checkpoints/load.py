"""Where checkpoints come from and how a model is built from one (`from_pretrained`).

Sources: a local Hugging Face checkpoint directory (Hub or >= 4.52 key layout, one file or sharded), a directory
written by our converter (`checkpoints/convert.py`: parameter paths as tensor names, marked by `qwen2vl_jax.json`),
or a Hub model id (resolved with huggingface_hub, only the files needed; `local_files_only` / HF_HUB_OFFLINE
honoured, so an offline machine fails at once with a message instead of hanging on the network).

Only safetensors are read (never pickle), and never through torch. A quantized checkpoint (config.json's
`quantization_config`, `qwen2vl_jax.quantization.StoredQuantization`) loads as stored: the abstract model is made
quantized first (`quantize_abstract`), and its integers and scales stream in like any tensor, never cast. A GPTQ or
AWQ checkpoint (Qwen's `-GPTQ-Int4` / `-GPTQ-Int8` / `-AWQ` repos, `quantization.gptq`) is read as files that hold
what our model wants (`external_model`: our int4 Linears, losslessly, or the exact dequantized weights).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..attention import resolve as resolve_attention
from ..hub import resolve_source
from ..modeling.config import Qwen2VLConfig
from ..modeling.parameters import abstract_model, checkpoint_params, param_path
from ..quantization.apply import DEFAULT_TARGETS, QUANTIZABLE
from ..quantization.formats import INT4_GROUP, MODES, QuantizationError
from ..quantization.gptq import ExternalQuantization
from ..quantization.stored import StoredQuantization, module_paths, quantize_abstract
from . import keymap as params_lib
from .safetensors_io import Derived, SafetensorsFile, derive

log = logging.getLogger(__name__)

OURS_MARKER = "qwen2vl_jax.json"
FORMAT_NAME = "qwen2vl_jax"
FORMAT_VERSION = 1
# Files that travel with the weights through conversions (whichever exist).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "added_tokens.json", "preprocessor_config.json", "video_preprocessor_config.json", "chat_template.json",
              "chat_template.jinja", "generation_config.json")

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16}


def resolve_dtype(dtype, files: list | None = None):
    """`None` -> float32 (transformers' default too), "bfloat16" / "float32", or "auto": the checkpoint's dtype."""
    if dtype is None:
        return jnp.float32
    if isinstance(dtype, str):
        if dtype == "auto":
            return checkpoint_dtype(files)
        if dtype in ("float16", "fp16", "half"):
            raise ValueError("float16 is not supported: Qwen2-VL produces garbage in fp16 (transformers #33294); "
                             "use bfloat16 or float32")
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use 'float32', 'bfloat16' or 'auto'")
        return _DTYPES[dtype]
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float16:
        return resolve_dtype("float16")
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"unsupported parameter dtype {dtype}; use float32 or bfloat16")
    return dtype


def checkpoint_dtype(files: list) -> np.dtype:
    """The floating-point dtype that holds most of a checkpoint's bytes (headers only; a quantized checkpoint's
    integers and fp32 scales are not what its other tensors are in)."""
    by_dtype: dict[np.dtype, int] = {}
    for sf in params_lib.open_files(files):
        for name in sf.keys():
            dtype = sf.dtype(name)
            if (np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16") and not name.endswith(
                    (params_lib.HF_SCALE_SUFFIX, params_lib.SCALE_SUFFIX)):
                by_dtype[dtype] = by_dtype.get(dtype, 0) + sf.nbytes(name)
    return jnp.dtype(max(by_dtype, key=by_dtype.get)) if by_dtype else jnp.dtype(jnp.float32)


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# -------------------------------------------------------------------------------------------------- opening
@dataclass
class Checkpoint:
    """An opened checkpoint directory: its format, effective config and tensor headers (no data read yet)."""

    directory: Path
    format: str  # "hf" or FORMAT_NAME
    config: Qwen2VLConfig  # tie_word_embeddings: the flag, or tied when an untied config lacks lm_head.weight
    files: list[SafetensorsFile]
    layout: params_lib.KeyLayout
    marker: dict | None = None
    ignore: frozenset[str] = frozenset()  # stored tensors not loaded (a tied config's lm_head.weight)
    quantization: StoredQuantization | None = None  # config.json's quantization_config (None: full precision)
    external: ExternalQuantization | None = None  # ... when it is a GPTQ / AWQ one (`quantization` is then None)

    def match(self, expected: dict[str, tuple[int, ...]], dtypes: dict | None = None
              ) -> dict[str, params_lib.TensorRef]:
        """`{our path: TensorRef}` for every expected parameter, or one CheckpointError listing every problem
        (`dtypes`: the exact dtypes of a quantized checkpoint's integers and scales)."""
        return params_lib.match_checkpoint(expected, self.files, self.layout, where=self.directory,
                                           ignore=self.ignore, dtypes=dtypes)

    @property
    def total_bytes(self) -> int:
        return sum(sf.nbytes(n) for sf in self.files for n in sf.keys())


def is_ours(directory: Path) -> bool:
    return (Path(directory) / OURS_MARKER).is_file()


def _read_marker(directory: Path) -> dict:
    marker = read_json(directory / OURS_MARKER)
    if marker.get("format") != FORMAT_NAME or not isinstance(marker.get("format_version"), int):
        raise params_lib.CheckpointError(f"{directory / OURS_MARKER} is not a qwen2vl_jax marker file")
    if marker["format_version"] > FORMAT_VERSION:
        raise params_lib.CheckpointError(
            f"{directory} was written in qwen2vl_jax format version {marker['format_version']}; this version "
            f"reads up to {FORMAT_VERSION}. Upgrade qwen2vl_jax or convert again from the HF checkpoint.")
    return marker


def open_checkpoint(source, *, local_files_only: bool | None = None, revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None) -> Checkpoint:
    """Resolve `source`, read its config and every tensor header, and decide tying from the tensors."""
    directory = resolve_source(source, local_files_only=local_files_only, revision=revision, cache_dir=cache_dir)
    config = Qwen2VLConfig.from_hf(directory)
    files = params_lib.open_files(params_lib.safetensors_files(directory))
    if is_ours(directory):
        fmt, marker, layout = FORMAT_NAME, _read_marker(directory), params_lib.OURS_LAYOUT
    else:
        fmt, marker, layout = "hf", None, params_lib.hf_layout(config.vision_config)
    # A tied config with a stored lm_head.weight: transformers 4.57 ties anyway (`PreTrainedModel.tie_weights`
    # points lm_head at embed_tokens after loading, so the file's head is never used); we do the same and say so.
    # An untied config without a head: follow the tensors (tie; transformers would leave a random head).
    external = read_external_quantization(directory)
    names = params_lib.tensor_names(files)
    if external is not None:  # a GPTQ / AWQ Linear's weight is its `qweight` (and the rest)
        names = {n[: -len("qweight")] + "weight" if n.endswith(".qweight") else n for n in names}
    has_head = any(layout.to_path(n) == "lm_head.weight" for n in names)
    ignore = frozenset()
    if has_head and config.tie_word_embeddings:
        log.warning("checkpoint %s: the stored lm_head.weight is ignored because the config ties it "
                    "(tie_word_embeddings=true: the head is embed_tokens, as in transformers)", directory)
        ignore = frozenset({"lm_head.weight"})
    elif not has_head and not config.tie_word_embeddings:
        log.warning("checkpoint %s: tie_word_embeddings=false but lm_head.weight is absent; following the tensors "
                    "(tied)", directory)
        config = config.replace(tie_word_embeddings=True)
    quantization = None if external is not None else read_quantization(directory, layout)
    if quantization is not None and ignore:  # the ignored head's scales go with it
        ignore = ignore | {"lm_head.scale"}
        quantization = dataclasses.replace(quantization, modules=tuple(m for m in quantization.modules
                                                                       if m != "lm_head"))
    return Checkpoint(directory, fmt, config, files, layout, marker, ignore, quantization, external)


def read_quantization(directory: Path, layout: params_lib.KeyLayout) -> StoredQuantization | None:
    """config.json's `quantization_config` (None: a full-precision checkpoint); a bad one is one CheckpointError
    naming the field."""
    raw = read_json(Path(directory) / "config.json").get("quantization_config")
    if raw is None:
        return None
    try:
        return StoredQuantization.from_config(raw, lambda name: params_lib.module_path(layout, name))
    except QuantizationError as e:
        raise params_lib.CheckpointError(f"{Path(directory) / 'config.json'}: {e}") from None


def quantized_model(model, ckpt: Checkpoint, quantization: str | None):
    """The abstract `model` made quantized as `ckpt` stores it (a full-precision checkpoint: unchanged), and the
    layout its tensors are read with. `quantization` ("int8" / "int4") must be the stored mode: a quantized
    checkpoint is never quantized again."""
    stored = ckpt.quantization
    if stored is None:
        return model, ckpt.layout
    if quantization is not None and quantization not in MODES:
        raise QuantizationError(f"unknown quantization {quantization!r}; choose one of {MODES}")
    if quantization is not None and quantization != stored.mode:
        raise QuantizationError(f"{ckpt.directory} is stored quantized to {stored.mode}; it cannot be loaded as "
                                f"{quantization} (load it as stored, or quantize its full-precision source)")
    try:
        quantize_abstract(model, stored)
    except QuantizationError as e:  # config.json names modules this model does not have as it says
        raise params_lib.CheckpointError(f"{ckpt.directory / 'config.json'}: {e}") from None
    return model, params_lib.stored_as_is(ckpt.layout, params_lib.quantized_dtypes(model))


# ------------------------------------------------------------------------------------- GPTQ / AWQ checkpoints
# Qwen's GPTQ / AWQ repos (AutoGPTQ's `QuantLinear`, AutoAWQ's `WQLinear_GEMM`; `quantization.gptq` has the formats)
# store each quantized Linear as `<module>.qweight`, `.qzeros`, `.scales` (and GPTQ's `.g_idx`) instead of
# `<module>.weight`; its bias and every other tensor are ordinary (fp16). Which Linears are quantized is read off the
# tensors (Qwen's: the decoder layers' q/k/v/o/gate/up/down projections). Each one's tensors are read together into
# what the model wants (`safetensors_io.derive`), so the loaders stream (and slice, onto a mesh) them unchanged and
# memory holds one module in flight.
EXTERNAL_METHODS = ("gptq", "awq")


def read_external_quantization(directory: Path) -> ExternalQuantization | None:
    """config.json's `quantization_config` when it is a GPTQ or AWQ one (else None), checked: a setting these
    readers do not honour is one CheckpointError naming the field."""
    raw = read_json(Path(directory) / "config.json").get("quantization_config")
    if not isinstance(raw, dict) or raw.get("quant_method") not in EXTERNAL_METHODS:
        return None
    try:
        return ExternalQuantization.from_config(raw)
    except QuantizationError as e:
        raise params_lib.CheckpointError(f"{Path(directory) / 'config.json'}: {e}") from None


def external_modules(ckpt: Checkpoint, expected) -> dict[str, dict[str, params_lib.TensorRef]]:
    """`{stored module name: {suffix: TensorRef}}` of every quantized Linear of a GPTQ / AWQ checkpoint, checked from
    the headers against the config (shapes from `qweight`'s and the group size, dtypes) and against `expected` (our
    per-layer parameter paths): every problem in one CheckpointError."""
    ext = ckpt.external
    found: dict[str, dict[str, params_lib.TensorRef]] = {}
    for sf in ckpt.files:
        for name in sf.keys():
            module, _, suffix = name.rpartition(".")
            if suffix in ("qweight", "qzeros", "scales", "g_idx"):
                found.setdefault(module, {})[suffix] = params_lib.TensorRef(sf, name)
    if not found:
        raise params_lib.CheckpointError(f"{ckpt.directory}: config.json's quantization_config says quant_method "
                                         f"{ext.method!r}, but no tensor is a quantized Linear's (<module>.qweight)")
    problems = []
    for module, refs in found.items():
        path = params_lib.module_path(ckpt.layout, module)
        if "qweight" not in refs:
            problems += [f"unexpected: {module}.{s} without {module}.qweight" for s in refs]
            continue
        if path is None or f"{path}.weight" not in expected:
            problems.append(f"unexpected: {module}.qweight is not a Linear of this model")
            continue
        problems += [f"unexpected: {module}.{s} ({ext.method.upper()} Linears store {', '.join(ext.tensors)})"
                     for s in refs if s not in ext.tensors]
        qweight = refs["qweight"]
        if qweight.dtype != np.int32 or len(qweight.shape) != 2:
            problems.append(f"wrong dtype: {module}.qweight is {qweight.dtype} {list(qweight.shape)}, expected "
                            "int32 [rows, columns]")
            continue
        try:
            want = ext.tensor_shapes(*ext.features(qweight.shape))
        except QuantizationError as e:
            problems.append(f"wrong shape: {module}.qweight {list(qweight.shape)} ({e})")
            continue
        for suffix, (shape, dtype) in want.items():
            ref = refs.get(suffix)
            if ref is None:
                if suffix != "g_idx":  # absent: contiguous groups
                    problems.append(f"missing: {module}.{suffix} {list(shape)}")
            elif ref.shape != shape:
                problems.append(f"wrong shape: {module}.{suffix} expected {list(shape)}, found {list(ref.shape)} "
                                f"(from qweight {list(qweight.shape)} and quantization_config's bits {ext.bits}, "
                                f"group_size {ext.group_size})")
            elif ref.dtype != dtype:
                problems.append(f"wrong dtype: {module}.{suffix} is {ref.dtype}, expected {dtype}")
    if problems:
        raise params_lib.CheckpointError(params_lib.problem_report(ckpt.directory, problems))
    return found


def external_model(model, ckpt: Checkpoint, quantization: str | None):
    """The abstract `model` and the files to fill it from, for a GPTQ / AWQ checkpoint, and `(targets, group)` of a
    re-quantization still to do (None: none). Per `quantization`:

    * an exact-int4 checkpoint (symmetric 4-bit GPTQ without act-order, Qwen's GPTQ-Int4) with None or "int4": the
      quantized Linears become our int4 Linears in the checkpoint's groups, losslessly (`ExternalQuantization
      .to_int4`): the integers are GPTQ's minus 8, the scales its fp16 scales in fp32;
    * any other checkpoint (GPTQ-Int8, AWQ, act-order or asymmetric GPTQ) with None: each Linear's exact fp32 weight
      (`dequantize`), cast to the model's dtype like any tensor (exact in fp32; bf16 rounds it);
    * "int8" / "int4" otherwise (including "int8" on GPTQ-Int4): our format quantized again, from the exact fp32
      weight, in the checkpoint's group size (int4; 128 where it has none) -- lossy (our formats are symmetric
      absmax, per channel for int8), so it is logged as a warning.

    Only the checkpoint's quantized Linears are affected: lm_head, the embeddings and the vision tower load as
    stored (as in the checkpoint's own runtime)."""
    ext = ckpt.external
    if quantization is not None and quantization not in MODES:
        raise QuantizationError(f"unknown quantization {quantization!r}; choose one of {MODES}")
    modules = external_modules(ckpt, checkpoint_params(model))
    ours = {name: params_lib.module_path(ckpt.layout, name) for name in modules}
    ours = {name: path for name, path in ours.items() if f"{path}.weight" not in ckpt.ignore}  # a tied model's head
    lossless = ext.exact_int4 and quantization in (None, "int4")
    try:
        if lossless:
            quantize_abstract(model, StoredQuantization("int4", ext.group_size, tuple(ours.values())))
        paths = module_paths(model, ours.values())
    except QuantizationError as e:
        raise params_lib.CheckpointError(f"{ckpt.directory}: {e}") from None
    derived = {}
    for name, refs in modules.items():
        I, O = ext.features(refs["qweight"].shape)
        sources = (refs["qweight"].name, *(r.name for s, r in refs.items() if s != "qweight"))
        suffixes = {r.name: s for s, r in refs.items()}
        if lossless and name in ours:  # (a tied model's stored head is ignored: its weight is never read)
            derived[f"{name}.weight"] = Derived(np.dtype(np.uint8), (O, I // 2), sources,
                                                _converter(ckpt, name, suffixes, lambda t: ext.to_int4(t)[0]))
            derived[f"{name}.weight_scale"] = Derived(
                np.dtype(np.float32), (O, I // ext.group_size), (refs["scales"].name,),
                _converter(ckpt, name, suffixes, lambda t: np.ascontiguousarray(t["scales"].T.astype(np.float32))))
        else:
            derived[f"{name}.weight"] = Derived(np.dtype(np.float32), (O, I), sources,
                                                _converter(ckpt, name, suffixes, ext.dequantize))
    requantize = None
    if quantization is not None and not lossless:
        by_path = {param_path(p): m for p, m in nnx.iter_modules(model) if isinstance(m, QUANTIZABLE)}
        for path in paths:  # quantized again from the exact fp32 weight, whatever the model's dtype
            weight = by_path[path].weight
            weight.set_value(jax.ShapeDtypeStruct(weight.shape, jnp.float32))
        group = ext.group_size if ext.group_size > 0 and ext.group_size % 2 == 0 else INT4_GROUP
        log.warning("checkpoint %s: re-quantizing its %d %s Linears to %s from their exact weights, which is lossy "
                    "(quantization=None keeps them exact: %s)", ckpt.directory, len(ours), ext.describe(),
                    quantization if quantization == "int8" else f"int4 in groups of {group}",
                    "our int4" if ext.exact_int4 else "dequantized")
        requantize = ("^(?:" + "|".join(re.escape(p) for p in paths) + ")$", group)
    return model, derive(ckpt.files, derived), requantize


def _converter(ckpt: Checkpoint, module: str, suffixes: dict[str, str], convert):
    """`Derived.compute` for one module: `{stored name: array}` -> `convert({suffix: array})`; a module whose data
    contradicts the config fails naming it."""
    def compute(arrays: dict) -> np.ndarray:
        try:
            return convert({suffixes[name]: a for name, a in arrays.items()})
        except QuantizationError as e:
            raise params_lib.CheckpointError(f"{ckpt.directory}: {module}: {e}") from None
    return compute


def _unfilled(model) -> list[str]:
    return [param_path(p) for p, v in nnx.iter_graph(model)
            if isinstance(v, nnx.Variable) and isinstance(v.get_value(), jax.ShapeDtypeStruct)]


def load_pretrained(cls, source, *, dtype=None, attn_implementation: str | None = None,
                    local_files_only: bool | None = None, revision: str | None = None, progress: bool = False,
                    cache_dir: str | os.PathLike | None = None, place=None, mesh=None, sharding_rules=None,
                    scan_layers: bool = False, quantization: str | None = None):
    """Build `cls` from a checkpoint (any source `open_checkpoint` accepts), streaming tensor by tensor.

    The model is created abstract (`nnx.eval_shape`), so the only weight memory is the loaded parameters plus
    one tensor in flight. `dtype`: None / "float32", "bfloat16", or "auto" (the checkpoint's dtype). `place`:
    optional `(path, array) -> jax.Array` to place each tensor. `mesh` (a `jax.sharding.Mesh`, e.g.
    `sharding.make_mesh(data=2, model=4)`): each parameter is assembled from the slices its devices hold, read from
    the files by the processes that hold them (`keymap.load_sharded`; multi-host jobs read only their slices), per
    `sharding.LOGICAL_RULES` (or `sharding_rules`), and the model constrains its activations and KV cache by the
    same rules. `scan_layers`: stack each tower's layers (`config.scan_layers`). `attn_implementation`: the
    attention backend (`qwen2vl_jax.attention`). `quantization` ("int8" / "int4", `qwen2vl_jax.quantization`):
    the text decoder's projections are quantized as they stream in (the full-precision model never exists); with
    a mesh or stacked layers they are quantized after loading. A quantized checkpoint loads as stored (its
    integers and scales stream into a quantized abstract model; `dtype` applies to its other tensors);
    `quantization` may only repeat its mode. A GPTQ / AWQ checkpoint: see `external_model` (GPTQ-Int4 as our int4,
    losslessly; the others dequantized exactly, or with `quantization` quantized again, lossily); `dtype="auto"`
    would be its float16 and is refused.
    """
    if attn_implementation is not None:  # a bad name fails here, before anything is read
        resolve_attention(attn_implementation)
    ckpt = open_checkpoint(source, local_files_only=local_files_only, revision=revision, cache_dir=cache_dir)
    param_dtype = resolve_dtype(dtype, ckpt.files)
    if ckpt.external is not None and param_dtype == jnp.float16:
        raise ValueError(f"dtype={dtype!r} is float16 for {ckpt.directory} (its tensors' dtype), and Qwen2-VL "
                         "produces garbage in fp16 (transformers #33294); pass dtype='bfloat16' or 'float32'")
    config = ckpt.config.replace(attn_implementation=attn_implementation, scan_layers=bool(scan_layers))
    model = abstract_model(cls, config, param_dtype)
    files, targets, group = ckpt.files, DEFAULT_TARGETS, INT4_GROUP
    if ckpt.external is not None:  # GPTQ / AWQ: as our int4, dequantized, or quantized again (`external_model`)
        model, files, requantize = external_model(model, ckpt, quantization)
        layout = ckpt.layout
        if requantize is None:
            quantization = None
        else:
            targets, group = requantize
    else:
        model, layout = quantized_model(model, ckpt, quantization)
        if ckpt.quantization is not None:
            quantization = None  # loaded as stored
    if mesh is not None and place is not None:
        raise ValueError("pass either `place` or `mesh`, not both")
    if scan_layers and place is not None:
        raise ValueError("`place` loads tensor by tensor; a scan_layers=True model is loaded by slices (use `mesh`)")
    finish = None
    if quantization is not None and mesh is None and not scan_layers:
        from ..quantization import quantizing_placer

        place, finish = quantizing_placer(model, quantization, place or params_lib.place_on_default_device,
                                          targets=targets, group=group)
    elif quantization is not None:
        if quantization not in MODES:  # before anything is read
            raise QuantizationError(f"unknown quantization {quantization!r}; choose one of {MODES}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=ckpt.total_bytes, unit="B", unit_scale=True, desc=f"loading {ckpt.directory.name}")
    try:
        update = bar.update if bar else None
        if mesh is not None or scan_layers:
            from ..sharding.mesh import LOGICAL_RULES, Partitioning, param_shardings, set_partitioning

            if mesh is not None:
                rules = LOGICAL_RULES if sharding_rules is None else sharding_rules
                shardings = param_shardings(model, mesh, rules)
            else:
                device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
                shardings = {path: device for path in params_lib.model_params(model)}
            params_lib.load_sharded(model, files, layout, shardings, progress=update, ignore=ckpt.ignore)
            if mesh is not None:
                set_partitioning(model, Partitioning.of(mesh, rules))
        else:
            kwargs = {} if place is None else {"place": place}
            params_lib.load_into(model, files, layout, progress=update, ignore=ckpt.ignore, **kwargs)
    finally:
        if bar is not None:
            bar.close()
    left = _unfilled(model)
    if left:  # a model attribute that is neither a parameter nor computed at init (should never happen)
        raise params_lib.CheckpointError(f"model state not filled by the checkpoint: {left}")
    if finish is not None:
        finish()
    elif quantization is not None:
        from ..quantization import quantize

        quantize(model, quantization, targets=targets, group=group)
    model.source_dir = str(ckpt.directory)
    return model
