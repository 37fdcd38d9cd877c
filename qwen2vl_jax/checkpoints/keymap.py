"""Hugging Face <-> qwen2vl_jax parameter names, and streaming checkpoint loading into an NNX model.

One table (`KEY_MAP`) names every tensor of both families (Qwen2.5-VL uses the same names, plus its vision MLP's
gate / up / down projections): Hub name template -> our parameter path. `{i}` is a layer index and `{p}`
is `weight` / `bias`. Linear weights keep PyTorch's `[out, in]` layout, so every mapping is a copy except the
patch-embedding Conv3d kernel `[E, C, T, P, P]`, which is flattened to `[E, C*T*P*P]` (same numbers: transformers
`PatchEmbed.forward` applies it to whole `[C, T, P, P]` patches, a matmul). Names written by transformers >= 4.52
(`model.language_model.*`, `model.visual.*`) are folded into the Hub names first (`canonical_hf_name`), like
transformers' own `_checkpoint_conversion_mapping`. A quantized module's scales (`qwen2vl_jax.quantization`) are
`<module>.weight_scale` there and `<module>.scale` here, beside the integers under the weight's own name.

Loading has two phases. `match_checkpoint` reads only the safetensors headers and pairs every tensor with a
parameter, collecting every problem (unknown, duplicate, mis-shaped, missing tensors) into one `CheckpointError`
before any data is read. `load_into` then streams: map one tensor, reshape, copy / cast it into an aligned buffer
(threads share the work), place it on the device, drop the host copy, next tensor; on the CPU a tensor that needs
no cast and is 64-byte aligned in its file is not copied at all (the file's memory map becomes the parameter).
`load_sharded` (a mesh, or stacked layers) instead builds each parameter from the slices this process's devices
hold, reading only their bytes, so each host of a multi-host job reads its share of the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from ..modeling.parameters import checkpoint_params, checkpoint_shapes, model_params
from .safetensors_io import INDEX_FILE, SafetensorsError, SafetensorsFile, empty_aligned

KEY_MAP: list[tuple[str, str]] = [
    # vision tower
    ("visual.patch_embed.proj.weight", "visual.patch_embed.proj.weight"),
    ("visual.blocks.{i}.norm1.{p}", "visual.blocks.{i}.norm1.{p}"),
    ("visual.blocks.{i}.norm2.{p}", "visual.blocks.{i}.norm2.{p}"),
    ("visual.blocks.{i}.attn.qkv.{p}", "visual.blocks.{i}.attn.qkv.{p}"),
    ("visual.blocks.{i}.attn.proj.{p}", "visual.blocks.{i}.attn.proj.{p}"),
    ("visual.blocks.{i}.mlp.fc1.{p}", "visual.blocks.{i}.mlp.fc1.{p}"),
    ("visual.blocks.{i}.mlp.fc2.{p}", "visual.blocks.{i}.mlp.fc2.{p}"),
    # Qwen2.5-VL's SwiGLU vision MLP (its norms are RMSNorms: weight only, same names)
    ("visual.blocks.{i}.mlp.gate_proj.{p}", "visual.blocks.{i}.mlp.gate_proj.{p}"),
    ("visual.blocks.{i}.mlp.up_proj.{p}", "visual.blocks.{i}.mlp.up_proj.{p}"),
    ("visual.blocks.{i}.mlp.down_proj.{p}", "visual.blocks.{i}.mlp.down_proj.{p}"),
    ("visual.merger.ln_q.{p}", "visual.merger.ln_q.{p}"),
    ("visual.merger.mlp.0.{p}", "visual.merger.fc1.{p}"),  # mlp.1 is the GELU (no parameters)
    ("visual.merger.mlp.2.{p}", "visual.merger.fc2.{p}"),
    # decoder
    ("model.embed_tokens.weight", "language_model.embed_tokens.weight"),
    ("model.layers.{i}.input_layernorm.weight", "language_model.layers.{i}.input_layernorm.weight"),
    ("model.layers.{i}.post_attention_layernorm.weight", "language_model.layers.{i}.post_attention_layernorm.weight"),
    ("model.layers.{i}.self_attn.q_proj.{p}", "language_model.layers.{i}.self_attn.q_proj.{p}"),
    ("model.layers.{i}.self_attn.k_proj.{p}", "language_model.layers.{i}.self_attn.k_proj.{p}"),
    ("model.layers.{i}.self_attn.v_proj.{p}", "language_model.layers.{i}.self_attn.v_proj.{p}"),
    ("model.layers.{i}.self_attn.o_proj.weight", "language_model.layers.{i}.self_attn.o_proj.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "language_model.layers.{i}.mlp.gate_proj.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "language_model.layers.{i}.mlp.up_proj.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "language_model.layers.{i}.mlp.down_proj.weight"),
    ("model.norm.weight", "language_model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]

CONV_KEY = "visual.patch_embed.proj.weight"


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile(pattern + r"\Z")


_HF_TO_OURS = [(_template_regex(hf), ours) for hf, ours in KEY_MAP]
_OURS_TO_HF = [(_template_regex(ours), hf) for hf, ours in KEY_MAP]


def canonical_hf_name(name: str) -> str:
    """Fold the transformers >= 4.52 names into the Hub names (transformers 4.57 `_checkpoint_conversion_mapping`,
    inverted)."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def _apply(table, name: str) -> str | None:
    for regex, template in table:
        m = regex.match(name)
        if m:
            return template.format(**{k: v for k, v in m.groupdict().items() if v is not None})
    return None


# A quantized module's scales (`qwen2vl_jax.quantization`): our parameter `<module>.scale`, in the Hugging Face layout
# `<module>.weight_scale` beside the integers stored under `<module>.weight` (compressed-tensors' and fbgemm-fp8's
# name for a weight's scales in transformers checkpoints).
HF_SCALE_SUFFIX, SCALE_SUFFIX = ".weight_scale", ".scale"


def hf_to_ours(name: str) -> str | None:
    """Our parameter path for an HF tensor name (either layout), or None if it is not a Qwen2-VL parameter."""
    if name.endswith(HF_SCALE_SUFFIX):
        weight = _apply(_HF_TO_OURS, canonical_hf_name(name[: -len("_scale")]))
        return None if weight is None or not weight.endswith(".weight") else weight[: -len(".weight")] + SCALE_SUFFIX
    return _apply(_HF_TO_OURS, canonical_hf_name(name))


def ours_to_hf(path: str) -> str:
    """The Hub-layout HF name for one of our parameter paths."""
    if path.endswith(SCALE_SUFFIX):
        return ours_to_hf(path[: -len(SCALE_SUFFIX)] + ".weight") + "_scale"
    name = _apply(_OURS_TO_HF, path)
    if name is None:
        raise KeyError(f"no HF name for parameter {path}")
    return name


def to_ours_layout(path: str, array: np.ndarray) -> np.ndarray:
    """HF tensor -> our layout (only the Conv3d kernel changes shape)."""
    return array.reshape(array.shape[0], -1) if path == CONV_KEY else array


def to_hf_layout(path: str, array: np.ndarray, conv_shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Our layout -> HF tensor (the flattened patch-embedding kernel goes back to its Conv3d shape)."""
    return array.reshape(conv_shape) if path == CONV_KEY else array


def conv_kernel_shape(vision_cfg) -> tuple[int, ...]:
    """The HF Conv3d patch-embedding kernel shape `[E, C, T, P, P]`."""
    v = vision_cfg
    return (v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)


@dataclass(frozen=True)
class KeyLayout:
    """How a checkpoint names and shapes its tensors, relative to our parameter paths and shapes."""

    name: str
    to_path: Callable[[str], str | None]  # tensor name in a file -> our parameter path (None: not ours)
    to_name: Callable[[str], str]  # our parameter path -> the name this layout writes
    file_shape: Callable[[str, tuple], tuple]  # (path, our shape) -> the shape stored in files
    to_ours: Callable[[str, np.ndarray], np.ndarray]  # (path, stored array) -> our layout (a view, no copy)
    to_file: Callable[[str, np.ndarray], np.ndarray]  # (path, our array) -> the stored layout (a view)


def hf_layout(vision_cfg) -> KeyLayout:
    """Hugging Face names (either key layout when reading, the Hub layout when writing) and shapes."""
    conv_shape = conv_kernel_shape(vision_cfg)
    return KeyLayout(
        name="hf",
        to_path=hf_to_ours,
        to_name=ours_to_hf,
        file_shape=lambda path, shape: conv_shape if path == CONV_KEY else tuple(shape),
        to_ours=to_ours_layout,
        to_file=lambda path, array: to_hf_layout(path, array, conv_shape),
    )


# Our converted format: tensors named by parameter path, stored exactly as the parameters are.
OURS_LAYOUT = KeyLayout(
    name="qwen2vl_jax",
    to_path=lambda name: name,
    to_name=lambda path: path,
    file_shape=lambda path, shape: tuple(shape),
    to_ours=lambda path, array: array,
    to_file=lambda path, array: array,
)


def stored_as_is(layout: KeyLayout, paths) -> KeyLayout:
    """`layout`, except that the tensors at `paths` (a quantized module's integers and scales) are stored exactly as
    the parameters are: a quantized patch-embedding kernel keeps our `[E, C*T*P*P]` (int4: packed) shape."""
    if CONV_KEY not in paths:
        return layout
    return KeyLayout(
        name=layout.name,
        to_path=layout.to_path,
        to_name=layout.to_name,
        file_shape=lambda path, shape: tuple(shape) if path == CONV_KEY else layout.file_shape(path, shape),
        to_ours=lambda path, array: array if path == CONV_KEY else layout.to_ours(path, array),
        to_file=lambda path, array: array if path == CONV_KEY else layout.to_file(path, array),
    )


def module_name(layout: KeyLayout, path: str) -> str:
    """The layout's name for one of our module paths (`language_model.layers.0.mlp.up_proj` ->
    `model.layers.0.mlp.up_proj` in the Hugging Face layout): how a quantized checkpoint's config names them."""
    return layout.to_name(path + ".weight")[: -len(".weight")]


def module_path(layout: KeyLayout, name: str) -> str | None:
    """Our module path for a layout's module name (None: not a module of Qwen2-VL)."""
    path = layout.to_path(name + ".weight") if isinstance(name, str) else None
    return path[: -len(".weight")] if path is not None and path.endswith(".weight") else None


def quantized_dtypes(model: nnx.Module) -> dict[str, np.dtype]:
    """`{checkpoint path: dtype}` of a quantized model's integers and scales (per layer): a checkpoint must store
    exactly these dtypes (nothing is cast: an integer cast is no quantization, and the scales are fp32)."""
    entries = checkpoint_params(model)
    out = {}
    for path, (p, _) in entries.items():
        if path.endswith(SCALE_SUFFIX):
            weight = path[: -len(SCALE_SUFFIX)] + ".weight"
            out[path], out[weight] = np.dtype(p.dtype), np.dtype(entries[weight][0].dtype)
    return out


# --------------------------------------------------------------------------------------------- checkpoints
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
PICKLE_INDEXES = ("pytorch_model.bin.index.json",)
MAX_LISTED_PROBLEMS = 200  # a wholly wrong checkpoint (another architecture) would otherwise print thousands


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message lists every problem found."""


def _pickle_refusal(d: Path, names: list[str]) -> CheckpointError:
    return CheckpointError(
        f"{d} holds only pickle checkpoints ({', '.join(names)}). qwen2vl_jax loads safetensors only and never "
        "unpickles weights (unpickling can run arbitrary code). Convert them to safetensors first in a trusted "
        "environment, e.g. with transformers: `Qwen2VLForConditionalGeneration.from_pretrained(src)"
        ".save_pretrained(dst, safe_serialization=True)`.")


def safetensors_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory (via the index when sharded); refuses pickle files."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {d}")
    index = d / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index ({type(e).__name__}: {e})") from None
        files = [d / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard files that do not exist: {missing}")
        return files
    if (d / "model.safetensors").is_file():
        return [d / "model.safetensors"]
    files = sorted(d.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES or p.name in PICKLE_INDEXES)
    if pickles:
        raise _pickle_refusal(d, pickles)
    raise CheckpointError(f"no *.safetensors files in {d} (a checkpoint directory holds config.json and "
                          "model.safetensors or model-*-of-*.safetensors shards)")


def open_files(files: list[Path]) -> list[SafetensorsFile]:
    """Parse every header up front, so a corrupt or truncated file fails before any data is read."""
    try:
        return [f if isinstance(f, SafetensorsFile) else SafetensorsFile(f) for f in files]
    except SafetensorsError as e:
        raise CheckpointError(f"corrupt checkpoint file: {e}") from None


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: a file and its name there. Reading it is deferred until it is needed."""

    file: SafetensorsFile
    name: str

    @property
    def shape(self) -> tuple[int, ...]:
        return self.file.shape(self.name)

    @property
    def dtype(self) -> np.dtype:
        return self.file.dtype(self.name)

    @property
    def nbytes(self) -> int:
        return self.file.nbytes(self.name)

    def read(self) -> np.ndarray:
        return self.file.read(self.name)


def problem_report(where, problems: list[str]) -> str:
    """One message for every problem found (`kind: detail` each), counted by kind and listed (at most
    MAX_LISTED_PROBLEMS)."""
    kinds: dict[str, int] = {}
    for p in problems:
        kind = p.split(":")[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    counts = ", ".join(f"{n} {k}" for k, n in kinds.items())
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(shown)
    tail = f"\n  ... and {more} more" if more else ""
    return (f"checkpoint {where} does not match the model ({len(problems)} problem{'s' if len(problems) > 1 else ''}"
            f": {counts}):\n  - " + "\n  - ".join(shown) + tail)


def match_checkpoint(expected: dict[str, tuple[int, ...]], files: list, layout: KeyLayout,
                     where: str | os.PathLike | None = None, ignore: frozenset[str] = frozenset(),
                     dtypes: dict[str, np.dtype] | None = None) -> dict[str, TensorRef]:
    """Pair every expected parameter (`{path: our shape}`) with exactly one tensor of the checkpoint.

    Reads headers only. Every problem is collected and raised as one `CheckpointError`:
    `unexpected` (a tensor that is no parameter of this model), `duplicate` (two tensors for one parameter),
    `wrong shape`, `wrong dtype` (not floating point; for the paths in `dtypes`, a quantized checkpoint's
    integers and scales, not exactly that dtype) and `missing`. Returns `{path: TensorRef}` in file order,
    so streaming through it reads each file front to back. Tensors whose path is in `ignore` are skipped (a
    stored lm_head.weight of a tied config, which transformers ties over).
    """
    dtypes = dtypes or {}
    opened = open_files(files)
    where = where if where is not None else (opened[0].path.parent if opened else "?")
    refs: dict[str, TensorRef] = {}
    problems: list[str] = []
    for sf in opened:
        for name in sorted(sf.keys(), key=sf.offset):
            path = layout.to_path(name)
            if path in ignore:
                continue
            found = sf.shape(name)
            if path is None or path not in expected:
                problems.append(f"unexpected: {name} {list(found)} is not a parameter of this model")
                continue
            if path in refs:
                problems.append(f"duplicate: {name} and {refs[path].name} ({refs[path].file.path.name}) are both "
                                f"{path}")
                continue
            want = layout.file_shape(path, expected[path])
            if found != tuple(want):
                problems.append(f"wrong shape: {name} expected {list(want)}, found {list(found)}")
            elif path in dtypes:
                if sf.dtype(name) != dtypes[path]:
                    problems.append(f"wrong dtype: {name} is {sf.dtype(name)}, expected {dtypes[path]} (the "
                                    f"{'scales' if path.endswith(SCALE_SUFFIX) else 'integers'} of a quantized "
                                    "module)")
            elif not np.issubdtype(sf.dtype(name), np.floating) and sf.dtype(name).name != "bfloat16":
                problems.append(f"wrong dtype: {name} is {sf.dtype(name)}, expected a floating-point tensor")
            refs[path] = TensorRef(sf, name)
    for path, shape in expected.items():
        if path not in refs:
            problems.append(f"missing: {layout.to_name(path)} {list(layout.file_shape(path, shape))}")
    if problems:
        raise CheckpointError(problem_report(where, problems))
    return refs


@dataclass
class LoadReport:
    tensors: int = 0
    bytes_read: int = 0


CHUNK_BYTES = 32 << 20  # a copy or cast larger than this is split over the worker threads


def _cast_into(out: np.ndarray, src: np.ndarray) -> None:
    """`out[...] = src` (same shape), converting the dtype with ml_dtypes' round-to-nearest-even cast (bf16 ->
    fp32 is exact). Measured against a uint16 -> uint32 shift for bf16 -> fp32: ml_dtypes' loop is 1.5x faster."""
    np.copyto(out, src, casting="unsafe")


def _fill(out: np.ndarray, src: np.ndarray, pool: ThreadPoolExecutor | None = None) -> None:
    """`out[...] = src` for C-contiguous arrays of one size, cast as needed, split over `pool`'s threads in chunks
    of CHUNK_BYTES (both cores take the page faults of the fresh output, the larger cost on a VM)."""
    out_flat, src_flat = out.reshape(-1), src.reshape(-1)
    n = out_flat.size
    step = max(1, CHUNK_BYTES // max(out.itemsize, src.itemsize))
    if pool is None or n <= step:
        _cast_into(out_flat, src_flat)
        return
    jobs = [pool.submit(_cast_into, out_flat[i:i + step], src_flat[i:i + step]) for i in range(0, n, step)]
    wait(jobs)  # every chunk has finished (none still reads a map the caller is about to close) ...
    for job in jobs:
        job.result()  # ... before a worker's exception is re-raised here


def _cast(array: np.ndarray, dtype, pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """`array` in `dtype`, in a 64-byte-aligned buffer when a conversion is needed (ml_dtypes casts round to
    nearest even, like torch's `.to(torch.bfloat16)`)."""
    if array.dtype == dtype:
        return array
    out = empty_aligned(array.shape, dtype)
    _fill(out, np.ascontiguousarray(array), pool)
    return out


def load_workers() -> int:
    """Threads that copy / cast tensors while loading: $QWEN2VL_JAX_LOAD_THREADS, else the cores (at most 4)."""
    env = os.environ.get("QWEN2VL_JAX_LOAD_THREADS", "").strip()
    return max(1, int(env)) if env.isdigit() else max(1, min(4, os.cpu_count() or 1))


def host_tensor(ref: TensorRef, path: str, layout: KeyLayout, dtype, *, zero_copy: bool = False,
                pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """One tensor in our layout and `dtype`, as an array XLA:CPU can adopt (C-contiguous, 64-byte aligned).

    `zero_copy` and a tensor that needs no cast and starts 64-byte aligned in its file: a view of the file's
    private memory map (`SafetensorsFile.view`), no copy at all. Otherwise the tensor's pages are mapped, copied
    (cast) into a fresh aligned buffer by `pool`'s threads, and unmapped again. A file that became shorter than its
    header says raises a `CheckpointError` naming it.
    """
    sf, name = ref.file, ref.name
    dtype = np.dtype(dtype)
    try:
        if zero_copy and sf.dtype(name) == dtype and sf.aligned(name):
            return layout.to_ours(path, sf.view(name))
        with sf.mapped(name) as src:
            src = layout.to_ours(path, src)
            out = empty_aligned(src.shape, dtype)
            _fill(out, src, pool)
            del src
        return out
    except SafetensorsError as e:
        raise CheckpointError(f"corrupt checkpoint file: {e}") from None


def place_on_default_device(path: str, array: np.ndarray) -> jax.Array:
    return jax.device_put(array)


def load_into(model: nnx.Module, files: list, layout: KeyLayout | None = None, *,
              place: Callable[[str, np.ndarray], jax.Array] = place_on_default_device,
              progress: Callable[[int], object] | None = None, ignore: frozenset[str] = frozenset()) -> LoadReport:
    """Fill every parameter of an abstract (`nnx.eval_shape`) model from safetensors files, tensor by tensor.

    All headers are checked first (`match_checkpoint`: one error listing every problem, before any data is
    read). Then each tensor is read, reshaped to our layout, cast to its parameter's dtype and placed with
    `place(path, array)` (default: the default device; pass a function to place each tensor with its
    sharding), and the host copy is dropped before the next read. Host memory therefore holds the placed
    parameters plus one tensor in flight. `layout` defaults to Hugging Face names for `model.config`.
    """
    params = model_params(model)
    layout = layout if layout is not None else hf_layout(model.config.vision_config)
    refs = match_checkpoint({p: tuple(v.shape) for p, v in params.items()}, files, layout, ignore=ignore,
                            dtypes=quantized_dtypes(model))
    report = LoadReport()
    # Zero-copy only where the buffer is adopted, not copied: the default placement on the CPU. Elsewhere (an
    # accelerator, a `place` callback) the mapped tensor is copied and unmapped, so file pages never pile up in RSS.
    zero_copy = place is place_on_default_device and jax.default_backend() == "cpu"
    workers = load_workers()
    with ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for path, ref in refs.items():
            param = params[path]
            array = host_tensor(ref, path, layout, param.dtype, zero_copy=zero_copy, pool=pool)
            placed = place(path, array)
            # On the CPU, device_put adopts the aligned buffer (no copy: the array *becomes* the parameter);
            # elsewhere it copies asynchronously and keeps `array` alive until it finishes: waiting here is what
            # keeps a single tensor in flight on the host (otherwise reads could run ahead of slow transfers).
            jax.block_until_ready(placed)
            param.set_value(placed)
            del array, placed
            report.tensors += 1
            report.bytes_read += ref.nbytes
            if progress is not None:
                progress(ref.nbytes)
    return report


def _stored_slice(ref: TensorRef, path: str, layout: KeyLayout, shape: tuple, index: tuple) -> np.ndarray:
    """`layout.to_ours(tensor)[index]` for one checkpoint tensor whose parameter (slice) has `shape`, reading
    only the selected bytes where the stored and our shapes agree."""
    sf, name = ref.file, ref.name
    stored = sf.shape(name)
    if stored == tuple(shape):
        return sf.read_slice(name, index)
    if stored[:1] == tuple(shape[:1]):
        # A reshaped tensor keeps its leading axis (the Conv3d kernel [E, C, T, P, P] is ours [E, C*T*P*P]): the
        # selected rows are read whole and cut after reshaping, which reads exactly the slice when the trailing
        # axis is taken whole (the only split `sharding.LOGICAL_RULES` can give it) and whole rows otherwise.
        return layout.to_ours(path, sf.read_slice(name, index[:1]))[(slice(None), *index[1:])]
    return layout.to_ours(path, sf.read_slice(name, ()))[index]


def load_sharded(model: nnx.Module, files: list, layout: KeyLayout | None, shardings: dict, *,
                 progress: Callable[[int], object] | None = None,
                 ignore: frozenset[str] = frozenset()) -> LoadReport:
    """Fill every parameter of an abstract model from safetensors files, reading only the slices this process's
    devices hold: each parameter is `jax.make_array_from_callback(shape, shardings[path], ...)`, whose callback
    (called for this process's addressable devices only) reads `param[index]` from the files (`read_slice`:
    just those bytes), cast to the parameter's dtype. Shards repeated on several local devices are read once.

    Handles the stacked `[L, ...]` parameters of `scan_layers=True` models (`layers.checkpoint_params`): the
    leading slice picks layers, each read from its own tensor. All headers are checked first, as in
    `load_into`. `progress(nbytes)` follows each parameter; the report counts the bytes this process read.
    """
    layout = layout if layout is not None else hf_layout(model.config.vision_config)
    refs = match_checkpoint(checkpoint_shapes(model), files, layout, ignore=ignore, dtypes=quantized_dtypes(model))
    opened = list({id(r.file): r.file for r in refs.values()}.values())
    params = model_params(model)
    path_of = {id(p): path for path, p in params.items()}
    sources: dict[str, dict[int | None, str]] = {}  # parameter path -> {layer: checkpoint path}, in file order
    entries = checkpoint_params(model)
    for ckpt_path in refs:
        param, layer = entries[ckpt_path]
        sources.setdefault(path_of[id(param)], {})[layer] = ckpt_path
    report = LoadReport()
    workers = load_workers()
    with ThreadPoolExecutor(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for path, by_layer in sources.items():
            param = params[path]
            shape, dtype = tuple(param.shape), np.dtype(param.dtype)

            def read(index: tuple, by_layer=by_layer, shape=shape, dtype=dtype) -> np.ndarray:
                index = tuple(index) + (slice(None),) * (len(shape) - len(index))
                if None in by_layer:
                    src = _stored_slice(refs[by_layer[None]], by_layer[None], layout, shape, index)
                    if src.dtype == dtype and src.flags.c_contiguous:
                        return src
                    out = empty_aligned(src.shape, dtype)
                    _fill(out, np.ascontiguousarray(src), pool)
                    return out
                first, stop, _ = index[0].indices(shape[0])
                rest = tuple(len(range(*s.indices(n))) for s, n in zip(index[1:], shape[1:]))
                out = empty_aligned((len(range(first, stop)), *rest), dtype)
                for j, layer in enumerate(range(first, stop)):
                    src = _stored_slice(refs[by_layer[layer]], by_layer[layer], layout, shape[1:], index[1:])
                    _fill(out[j], np.ascontiguousarray(src), pool)
                return out

            cache: dict[tuple, np.ndarray] = {}

            def callback(index: tuple, read=read, cache=cache) -> np.ndarray:
                key = tuple((s.start, s.stop, s.step) for s in index)  # slices are unhashable before Python 3.12
                if key not in cache:
                    cache[key] = read(index)
                return cache[key]

            before = sum(sf.bytes_read for sf in opened)
            try:
                array = jax.make_array_from_callback(shape, shardings[path], callback, dtype=dtype)
            except SafetensorsError as e:
                raise CheckpointError(f"corrupt checkpoint file: {e}") from None
            jax.block_until_ready(array)  # the host slices are in place before the next parameter is read
            param.set_value(array)
            del array, cache
            nbytes = sum(sf.bytes_read for sf in opened) - before
            report.tensors += len(by_layer)
            report.bytes_read += nbytes
            if progress is not None:
                progress(nbytes)
    return report


def tensor_names(files: list) -> set[str]:
    """Every tensor name stored in `files` (headers only)."""
    return {name for sf in open_files(files) for name in sf.keys()}
