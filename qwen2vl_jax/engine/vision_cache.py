"""The engine's vision-embedding cache: the merged vision features of an image or video, keyed by a hash of its
pixels and grid, least recently used evicted first, bounded in bytes (mlx-vlm's vision cache; a repeated photo
then runs the vision tower zero times)."""

from __future__ import annotations

import collections
import hashlib

import numpy as np


def media_hash(pixels: np.ndarray, grid_thw, extra: bytes = b"") -> bytes:
    """sha256 of the patch rows (dtype, shape and bytes), the grid and `extra`."""
    pixels = np.ascontiguousarray(pixels)
    h = hashlib.sha256()
    h.update(f"{pixels.dtype.str}{pixels.shape}{np.asarray(grid_thw).tolist()}".encode())
    h.update(pixels.tobytes())
    h.update(extra)
    return h.digest()


class VisionCache:
    """features by media hash; at most `max_bytes` of them (0: nothing is kept)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.entries: collections.OrderedDict[bytes, np.ndarray] = collections.OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key: bytes) -> np.ndarray | None:
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return value

    def put(self, key: bytes, features: np.ndarray) -> None:
        if key in self.entries or features.nbytes > self.max_bytes:
            return
        self.entries[key] = features
        self.bytes += features.nbytes
        while self.bytes > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.nbytes
