"""Minimal safetensors reading and writing on NumPy (bf16 through ml_dtypes), one tensor at a time.

Why not `safetensors.numpy`: it cannot represent bfloat16 (every Qwen2-VL checkpoint is bf16), and `safe_open`
memory-maps the whole file, whose touched pages then count in the loader's RSS. Here each tensor is read with one
positioned read into a fresh buffer and released after it is placed, so loading holds one tensor in flight.
The format (https://github.com/huggingface/safetensors): 8-byte little-endian header size, a JSON header
`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    pass


class SafetensorsFile:
    """Random access to the tensors of one `.safetensors` file without mapping it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise SafetensorsError(f"{self.path}: not a safetensors file (too short)")
            (size,) = struct.unpack("<Q", head)
            if size > _MAX_HEADER:
                raise SafetensorsError(f"{self.path}: not a safetensors file (header size {size})")
            try:
                header = json.loads(f.read(size))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SafetensorsError(f"{self.path}: not a safetensors file ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.data_start = 8 + size
        self.entries = header
        file_size = self.path.stat().st_size
        for name, e in self.entries.items():
            if e.get("dtype") not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {name} has unsupported dtype {e.get('dtype')!r}")
            begin, end = e["data_offsets"]
            expected = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
            if end - begin != expected or self.data_start + end > file_size:
                raise SafetensorsError(f"{self.path}: tensor {name} is truncated or malformed")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self.entries[name]["dtype"]]

    def nbytes(self, name: str) -> int:
        begin, end = self.entries[name]["data_offsets"]
        return end - begin

    def read(self, name: str) -> np.ndarray:
        e = self.entries[name]
        begin, end = e["data_offsets"]
        out = np.empty(e["shape"], DTYPES[e["dtype"]])
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            n = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if n != end - begin:
            raise SafetensorsError(f"{self.path}: short read for {name}")
        return out


def iter_tensors(paths: list[Path]) -> Iterator[tuple[str, SafetensorsFile]]:
    for p in paths:
        f = SafetensorsFile(p)
        for name in f.keys():
            yield name, f


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None):
    """Write `tensors` (NumPy, any dtype in DTYPES) as one safetensors file, streaming tensor by tensor."""
    header, offset = {}, 0
    for name, arr in tensors.items():
        dtype = np.dtype(arr.dtype)
        if dtype not in DTYPE_NAMES:
            raise SafetensorsError(f"cannot store dtype {dtype} for {name}")
        nbytes = int(arr.size) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(arr.shape), "data_offsets": [offset,
                                                                                               offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the reference writer pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data)
