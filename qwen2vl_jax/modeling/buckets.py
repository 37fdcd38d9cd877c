"""Shape buckets: pad dynamic sizes (patch rows, prompt lengths) to a small set so jit compiles once per bucket.

Buckets are multiples of a granule that grow geometrically (x1.25 by default), plus the powers of two (common
image sides give power-of-two patch counts: 448x448 -> 1024, 896x896 -> 4096): at most ~25% padding, and the
number of distinct shapes (compiles) grows with the log of the size range, not linearly.
"""

from __future__ import annotations

import functools


@functools.cache
def _ladder(granule: int, growth: float, limit: int) -> tuple[int, ...]:
    sizes = [granule]
    while sizes[-1] < limit:
        # x growth rounded *down* to the granule (never below one granule more): waste stays under `growth`.
        sizes.append(max(sizes[-1] + granule, int(sizes[-1] * growth) // granule * granule))
    powers = [1 << i for i in range(granule.bit_length(), limit.bit_length() + 1) if (1 << i) % granule == 0]
    return tuple(sorted(set(sizes) | set(powers)))


def bucket(n: int, granule: int = 256, growth: float = 1.25) -> int:
    """The smallest bucket >= n (buckets: granule, then x`growth`, each rounded up to the granule)."""
    if n <= 0:
        return granule
    for size in _ladder(granule, growth, 1 << 30):
        if size >= n:
            return size
    raise ValueError(f"size {n} is beyond the largest bucket")


def pow2_bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    size = max(minimum, 1)
    while size < n:
        size *= 2
    return size
