"""Minimal safetensors reading and writing on NumPy (bf16 through ml_dtypes), one tensor at a time.

Why not `safetensors.numpy`: it cannot represent bfloat16 (every Qwen2-VL checkpoint is bf16), and `safe_open`
memory-maps the whole file for as long as it is open, so every touched page stays in the loader's RSS. Here the
loader either maps one tensor at a time (`mapped`: a copy or cast reads it, then it is unmapped) or, when a tensor
needs no cast and sits on a 64-byte boundary, hands XLA a view of a private map of the file (`view`: the file's
page-cache pages become the parameter, nothing is copied); a sharded load reads just a slice of a tensor
(`read_slice`: positioned reads of the slice's bytes only). The writer asks for one tensor at a time and pads the
header so that data starts on a 64-byte boundary, which makes our own files zero-copy. Nothing here can execute
code from a file: the format is a JSON header plus raw bytes (https://github.com/huggingface/safetensors): an
8-byte little-endian header size, a JSON header `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__":
{...}}`, then the raw little-endian bytes, offsets relative to the end of the header.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import mmap
import os
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsError(ValueError):
    """A file that is not valid safetensors (corrupt header, truncated data, unsupported dtype)."""


class TensorSpec(NamedTuple):
    """What a writer needs to know about a tensor before seeing its data."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


# -------------------------------------------------------------------------------------------------- reading
class SafetensorsFile:
    """Random access to the tensors of one `.safetensors` file without mapping it.

    The constructor reads and validates only the header, so listing names, shapes and dtypes of a whole
    checkpoint costs a few kilobytes of I/O; `read` then fetches one tensor.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise SafetensorsError(f"{self.path}: not a safetensors file (only {len(head)} bytes)")
            (size,) = struct.unpack("<Q", head)
            if size > _MAX_HEADER:
                raise SafetensorsError(f"{self.path}: not a safetensors file (header size {size} is implausible)")
            raw = f.read(size)
        if len(raw) != size:
            raise SafetensorsError(f"{self.path}: truncated header ({len(raw)} of {size} bytes)")
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{self.path}: not a safetensors file (header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: not a safetensors file (header is not a JSON object)")
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.data_start = 8 + size
        self.entries: dict[str, dict] = header
        self._validate(self.path.stat().st_size - self.data_start)
        self._map: mmap.mmap | None = None  # the whole-file map behind `view`, made on first use
        self.bytes_read = 0  # bytes fetched by `read` / `read_slice` (a sharded load's per-process I/O)

    def _validate(self, data_size: int) -> None:
        for name, e in self.entries.items():
            where = f"{self.path}: tensor {name}"
            if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
                raise SafetensorsError(f"{where}: malformed header entry {e!r}")
            if e["dtype"] not in DTYPES:
                raise SafetensorsError(f"{where}: unsupported dtype {e['dtype']!r}")
            shape, offsets = e["shape"], e["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise SafetensorsError(f"{where}: malformed shape {shape!r}")
            if len(offsets) != 2 or not all(isinstance(o, int) for o in offsets) or not 0 <= offsets[0] <= offsets[1]:
                raise SafetensorsError(f"{where}: malformed data_offsets {offsets!r}")
            begin, end = offsets
            expected = int(np.prod(shape, dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
            if end - begin != expected:
                raise SafetensorsError(f"{where}: {end - begin} bytes for shape {shape} {e['dtype']} "
                                       f"(needs {expected})")
            if end > data_size:
                raise SafetensorsError(f"{where}: data ends at byte {end} but the file holds only {data_size} "
                                       "bytes of data (truncated file?)")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self.entries[name]["dtype"]]

    def offset(self, name: str) -> int:
        return self.entries[name]["data_offsets"][0]

    def nbytes(self, name: str) -> int:
        begin, end = self.entries[name]["data_offsets"]
        return end - begin

    def spec(self, name: str) -> TensorSpec:
        return TensorSpec(name, self.dtype(name), self.shape(name))

    def read(self, name: str) -> np.ndarray:
        """One tensor, read straight into a fresh 64-byte-aligned array (no intermediate bytes object)."""
        e = self.entries[name]
        begin, end = e["data_offsets"]
        out = empty_aligned(e["shape"], DTYPES[e["dtype"]])
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            n = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if n != end - begin:
            raise SafetensorsError(f"{self.path}: short read for {name} ({n} of {end - begin} bytes; "
                                   "was the file truncated while reading?)")
        self.bytes_read += n
        return out

    def read_slice(self, name: str, index: tuple) -> np.ndarray:
        """`tensor[index]` for a tuple of unit-step slices (missing trailing ones mean whole axes), reading only
        the bytes of that hyper-rectangle (with `os.preadv` straight into a fresh 64-byte-aligned array).

        The stored tensor is row-major, so the selection is one contiguous run per combination of the indices
        before its last partial axis: a block of leading rows is a single read, a column block one read per row.
        """
        e = self.entries[name]
        shape, dtype = tuple(e["shape"]), DTYPES[e["dtype"]]
        bounds = _slice_bounds(index, shape, f"{self.path}: tensor {name}")
        out = empty_aligned(tuple(b - a for a, b in bounds), dtype)
        if out.size == 0:
            return out
        # `k`: the last axis not taken whole; axes after it are whole, so each run spans axis k's range x them.
        k = max((i for i, (a, b) in enumerate(bounds) if (a, b) != (0, shape[i])), default=0)
        strides = [dtype.itemsize * math.prod(shape[i + 1:]) for i in range(len(shape))]
        run = (bounds[k][1] - bounds[k][0]) * strides[k] if shape else dtype.itemsize
        base = self.data_start + e["data_offsets"][0] + sum(a * st for (a, _), st in zip(bounds, strides))
        buf = memoryview(out.reshape(-1).view(np.uint8))
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for j, lead in enumerate(itertools.product(*(range(b - a) for a, b in bounds[:k]))):
                offset = base + sum(i * st for i, st in zip(lead, strides))
                self._pread_into(fd, buf[j * run:(j + 1) * run], offset, name)
        finally:
            os.close(fd)
        self.bytes_read += out.nbytes
        return out

    def _pread_into(self, fd: int, buf: memoryview, offset: int, name: str) -> None:
        done = 0
        while done < len(buf):  # a single read returns at most ~2 GiB on Linux
            n = os.preadv(fd, [buf[done:]], offset + done)
            if n == 0:
                raise SafetensorsError(f"{self.path}: short read for {name} (the file ends at byte "
                                       f"{offset + done}; was the file truncated while reading?)")
            done += n


    # ------------------------------------------------------------------------------------------ memory maps
    def _check_size(self, f, name: str, end: int) -> None:
        """The file still holds the tensor's bytes (checked before mapping: touching a mapped page past the end of
        a file that shrank since its header was read would kill the process with SIGBUS instead of raising)."""
        size = os.fstat(f.fileno()).st_size
        if size < self.data_start + end:
            raise SafetensorsError(f"{self.path}: short read for {name} (the file holds {size} bytes, the tensor "
                                   f"ends at byte {self.data_start + end}; was the file truncated while reading?)")

    def aligned(self, name: str, alignment: int | None = None) -> bool:
        """Whether the tensor's data starts on an `alignment`-byte boundary of the file, hence of any map of it
        (maps start on page boundaries). Safetensors only aligns data to 8 bytes, so HF files often are not."""
        return (self.data_start + self.offset(name)) % (alignment or ALIGNMENT) == 0

    def view(self, name: str) -> np.ndarray:
        """The tensor as a view of one private (copy-on-write) map of the whole file, made on first use.

        Nothing is read until a page is touched, and then only from the page cache. The map lives as long as any
        view of it (an XLA buffer that adopted a view keeps it alive); writes to a view stay in this process. The
        file must not be truncated while views are alive (like any memory map, e.g. transformers'): our writers
        never rewrite a file in place.
        """
        e = self.entries[name]
        begin, end = e["data_offsets"]
        if begin == end:
            return np.empty(e["shape"], DTYPES[e["dtype"]])
        if self._map is None:
            with open(self.path, "rb") as f:
                self._check_size(f, name, max(x["data_offsets"][1] for x in self.entries.values()))
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return np.frombuffer(self._map, DTYPES[e["dtype"]], count=(end - begin) // DTYPES[e["dtype"]].itemsize,
                             offset=self.data_start + begin).reshape(e["shape"])

    @contextlib.contextmanager
    def mapped(self, name: str) -> Iterator[np.ndarray]:
        """A read-only view of one tensor in a map of just its pages, unmapped on exit (so its pages leave the
        process's RSS again): the source of a copy or a cast. Do not keep the view past the `with` block."""
        e = self.entries[name]
        begin, end = e["data_offsets"]
        dtype = DTYPES[e["dtype"]]
        if begin == end:
            yield np.empty(e["shape"], dtype)
            return
        start = (self.data_start + begin) // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            self._check_size(f, name, end)
            m = mmap.mmap(f.fileno(), self.data_start + end - start, access=mmap.ACCESS_READ, offset=start)
        try:
            yield np.frombuffer(m, dtype, count=(end - begin) // dtype.itemsize,
                                offset=self.data_start + begin - start).reshape(e["shape"])
        finally:
            try:
                m.close()
            except BufferError:  # the caller kept a view: the map goes when the last view does
                pass


# ------------------------------------------------------------------------------------------- derived tensors
@dataclass(frozen=True)
class Derived:
    """A tensor a set of files does not store but computes from tensors it does (`derive`), e.g. a GPTQ Linear's
    weight from its `qweight`, `qzeros`, `scales` and `g_idx` (`checkpoints/load.py`)."""

    dtype: np.dtype
    shape: tuple[int, ...]
    sources: tuple[str, ...]  # the stored tensors it is computed from; the first places it in its file's order
    compute: Callable[[dict[str, np.ndarray]], np.ndarray]  # {source name: array} -> the tensor


class _DerivedSet:
    """What the files of one `derive` call share: where each stored tensor is, and the last derived tensor
    computed (a sharded load reads several slices of one parameter in a row: it is computed once, and memory holds
    one derived tensor at a time)."""

    def __init__(self):
        self.where: dict[str, SafetensorsFile] = {}
        self.last: tuple[str, np.ndarray] | None = None

    def tensor(self, owner: SafetensorsFile, name: str, d: Derived) -> np.ndarray:
        if self.last is None or self.last[0] != name:
            self.last = None  # the previous one goes before the next is computed
            arrays = {s: SafetensorsFile.read(self.where[s], s) for s in d.sources}
            read = sum(a.nbytes for a in arrays.values())
            for s in d.sources:  # counted where the derived tensor is listed (a sharded load's progress)
                self.where[s].bytes_read -= arrays[s].nbytes
            owner.bytes_read += read
            out = d.compute(arrays)
            del arrays
            if np.dtype(out.dtype) != np.dtype(d.dtype) or tuple(out.shape) != tuple(d.shape):
                raise SafetensorsError(f"{owner.path}: derived tensor {name} came out {out.dtype} {list(out.shape)}, "
                                       f"not {np.dtype(d.dtype)} {list(d.shape)}")
            self.last = (name, out)
        return self.last[1]


class DerivedFile(SafetensorsFile):
    """One file of a set (`derive`) read as if it stored the derived tensors whose first source it holds, and not
    their sources: names, shapes, dtypes, `read`, `read_slice` and `mapped` work on derived tensors like on stored
    ones (so the loaders stream and slice them unchanged); `nbytes` and `offset` are their sources' (the bytes read
    from disk, and where they start). A derived tensor is never aligned, so it is never a `view`."""

    def __init__(self, path: str | os.PathLike, derived: dict[str, Derived], hidden: frozenset[str],
                 shared: _DerivedSet):
        super().__init__(path)
        self.derived, self.hidden, self._shared = derived, hidden, shared

    def keys(self) -> list[str]:
        return [n for n in self.entries if n not in self.hidden] + list(self.derived)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.derived[name].shape) if name in self.derived else super().shape(name)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self.derived[name].dtype) if name in self.derived else super().dtype(name)

    def offset(self, name: str) -> int:
        return super().offset(self.derived[name].sources[0]) if name in self.derived else super().offset(name)

    def nbytes(self, name: str) -> int:
        if name in self.derived:
            return sum(self._shared.where[s].nbytes(s) for s in self.derived[name].sources)
        return super().nbytes(name)

    def read(self, name: str) -> np.ndarray:
        if name not in self.derived:
            return super().read(name)
        out = empty_aligned(self.shape(name), self.dtype(name))
        out[...] = self._shared.tensor(self, name, self.derived[name])
        return out

    def read_slice(self, name: str, index: tuple) -> np.ndarray:
        if name not in self.derived:
            return super().read_slice(name, index)
        bounds = _slice_bounds(index, self.shape(name), f"{self.path}: tensor {name}")
        src = self._shared.tensor(self, name, self.derived[name])[tuple(slice(a, b) for a, b in bounds)]
        out = empty_aligned(src.shape, src.dtype)
        out[...] = src
        return out

    def aligned(self, name: str, alignment: int | None = None) -> bool:
        return False if name in self.derived else super().aligned(name, alignment)

    def view(self, name: str) -> np.ndarray:
        if name in self.derived:
            raise SafetensorsError(f"{self.path}: {name} is derived, not stored: it has no view")
        return super().view(name)

    @contextlib.contextmanager
    def mapped(self, name: str) -> Iterator[np.ndarray]:
        if name not in self.derived:
            with super().mapped(name) as array:
                yield array
            return
        yield self._shared.tensor(self, name, self.derived[name])


def derive(files: list[SafetensorsFile], derived: dict[str, Derived]) -> list[DerivedFile]:
    """`files` read as a set that holds `derived` (`{name: Derived}`) instead of those tensors' sources (which may
    sit in any of the files). Each derived tensor is listed by the file holding its first source."""
    shared = _DerivedSet()
    out = [DerivedFile(f.path, {}, frozenset(), shared) for f in files]
    for f in out:
        shared.where.update({name: f for name in f.entries})
    missing = sorted({s for d in derived.values() for s in d.sources} - shared.where.keys())
    if missing:
        raise SafetensorsError(f"derived tensors need {missing[:3]}, which no file of the set stores")
    hidden = frozenset(s for d in derived.values() for s in d.sources)
    for f in out:
        f.hidden = hidden
    for name, d in derived.items():
        shared.where[d.sources[0]].derived[name] = d
    return out


def _slice_bounds(index: tuple, shape: tuple[int, ...], where: str) -> list[tuple[int, int]]:
    """`[(start, stop)]` per axis for an index of unit-step slices (what `jax.make_array_from_callback` passes)."""
    index = tuple(index) if isinstance(index, tuple) else (index,)
    if len(index) > len(shape) or not all(isinstance(s, slice) for s in index):
        raise IndexError(f"{where}: index {index!r} is not a tuple of at most {len(shape)} slices")
    out = []
    for i, size in enumerate(shape):
        start, stop, step = (index[i] if i < len(index) else slice(None)).indices(size)
        if step != 1:
            raise IndexError(f"{where}: only unit-step slices can be read, got {index[i]!r}")
        out.append((start, max(start, stop)))
    return out


ALIGNMENT = 64  # bytes: XLA:CPU adopts a NumPy buffer aligned like this instead of copying it (jax.device_put)


def empty_aligned(shape, dtype) -> np.ndarray:
    """`np.empty` whose data starts on an `ALIGNMENT`-byte boundary (NumPy itself aligns to 16).

    Why: `jax.device_put` of an aligned, contiguous array on the CPU aliases its memory (measured: 0.02 s for
    1.1 GB) where an unaligned one is copied into fresh XLA memory (2.7 s for 1.1 GB here: the copy's page faults
    dominate). The loader reads every tensor into such a buffer, so the buffer becomes the parameter.
    """
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start: start + n].view(dtype).reshape(shape)


def load_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a (small) file; for tests and tools. Loaders should use `SafetensorsFile.read`."""
    f = SafetensorsFile(path)
    return {name: f.read(name) for name in f.keys()}


# -------------------------------------------------------------------------------------------------- writing
def write_file(path: str | os.PathLike, specs: list[TensorSpec], read: Callable[[str], np.ndarray],
               metadata: dict[str, str] | None = None, on_tensor: Callable[[TensorSpec], None] | None = None) -> int:
    """Write one safetensors file, fetching each tensor's data with `read(name)` only when it is written.

    The header (which needs every shape and dtype) comes from `specs`, so a whole checkpoint can be written
    while holding a single tensor. Each array `read` returns must match its spec. Returns the bytes written.
    """
    header, offset = {}, 0
    for s in specs:
        dtype = np.dtype(s.dtype)
        if dtype not in DTYPE_NAMES:
            raise SafetensorsError(f"cannot store dtype {dtype} for {s.name}")
        header[s.name] = {"dtype": DTYPE_NAMES[dtype], "shape": [int(d) for d in s.shape],
                          "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    # The reference writer pads the header with spaces to 8 bytes; we pad to 64, so that every tensor whose
    # predecessors' sizes are multiples of 64 bytes (all of Qwen2-VL's) starts 64-byte aligned and loads zero-copy.
    blob += b" " * (-(8 + len(blob)) % ALIGNMENT)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for s in specs:
            array = read(s.name)
            if np.dtype(array.dtype) != np.dtype(s.dtype) or tuple(array.shape) != tuple(s.shape):
                raise SafetensorsError(f"{s.name}: got {array.dtype} {list(array.shape)}, the header says "
                                       f"{np.dtype(s.dtype)} {list(s.shape)}")
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
            del array
            if on_tensor is not None:
                on_tensor(s)
    return 8 + len(blob) + offset


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> int:
    """Write in-memory `tensors` (NumPy, any dtype in DTYPES) as one safetensors file."""
    specs = [TensorSpec(name, np.dtype(a.dtype), tuple(a.shape)) for name, a in tensors.items()]
    return write_file(path, specs, tensors.__getitem__, metadata)


# --------------------------------------------------------------------------------------- sharded checkpoints
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes for `2GB` / `500MB` / `1.5GiB` / an int (decimal units like transformers' `max_shard_size`)."""
    if isinstance(size, int):
        return size
    m = _SIZE.match(size)
    unit = m.group(2).upper() if m else None
    if unit is not None and unit not in _UNITS and unit + "B" in _UNITS:
        unit += "B"  # "2G" means 2GB
    if m is None or unit not in _UNITS:
        raise ValueError(f"cannot parse size {size!r}; use e.g. '2GB', '500MB' or a number of bytes")
    return int(float(m.group(1)) * _UNITS[unit])


def plan_shards(specs: Iterable[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor gets its own shard)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def shard_file_names(n: int) -> list[str]:
    """transformers' names: `model.safetensors`, or `model-00001-of-00003.safetensors`, ... plus an index."""
    return [SINGLE_FILE] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def write_checkpoint(directory: str | os.PathLike, specs: list[TensorSpec], read: Callable[[str], np.ndarray], *,
                     max_shard_size: int | str = "2GB", metadata: dict[str, str] | None = None,
                     on_tensor: Callable[[TensorSpec], None] | None = None) -> list[Path]:
    """Write tensors as `model.safetensors`, or as shards + `model.safetensors.index.json` when they exceed
    `max_shard_size`, streaming one tensor at a time. Returns the files written."""
    directory = Path(directory)
    shards = plan_shards(specs, parse_size(max_shard_size))
    names = shard_file_names(len(shards))
    for shard, name in zip(shards, names):
        write_file(directory / name, shard, read, metadata, on_tensor)
    files = [directory / n for n in names]
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(s.nbytes for s in specs),
                         "total_parameters": sum(int(np.prod(s.shape, dtype=np.int64)) for s in specs)},
            "weight_map": {s.name: name for shard, name in zip(shards, names) for s in shard},
        }
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        files.append(directory / INDEX_FILE)
    return files
