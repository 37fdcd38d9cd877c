"""The engine's page pool and prefix cache (host side; the pages themselves are `modeling.PagedKVCache`).

Pages of `page_size` rows; page 0 is the null page (padding writes land there) and is never handed out. A
sequence owns a page table (its pages in order, key j at page `j // page_size`). Pages are reference-counted:

* `allocate(n)` takes free pages (evicting cached pages nobody uses, least recently used first);
* `release(pages)` drops one reference each; a page nobody holds goes back to the free list, unless the prefix
  cache names it, in which case it stays, evictable, until its space is needed.

Prefix cache (vLLM's automatic prefix caching, per full page): page i of a prompt is named by a hash chained over
every token up to its end, `h_i = sha256(h_{i-1} | content of page i)`, where a token's content is its id, except for
image and video placeholder tokens, whose content is (a hash of the pixels and grid of the image or video they
belong to, their index inside it) (lmdeploy keys on an image-content hash the same way): two different photos
with the same placeholder count never match. `match` finds the longest run of cached pages, then cuts it back so
that it never ends inside an image's or video's tokens and leaves at least one prompt token to run (its logits
pick the first new token).
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np

NULL_PAGE = 0


def page_hashes(content: np.ndarray, page_size: int) -> list[bytes]:
    """The chained hash of every full page of a prompt whose tokens' contents are `content` `[T]` (int64)."""
    out, previous = [], b""
    for p in range(len(content) // page_size):
        previous = hashlib.sha256(previous + content[p * page_size:(p + 1) * page_size].tobytes()).digest()
        out.append(previous)
    return out


def cut_back(matched: int, spans: list[tuple[int, int]], prompt_tokens: int, page_size: int) -> int:
    """The longest usable prefix <= `matched` tokens: a whole number of pages, ending neither inside a vision span
    (`[start, end)`, its placeholder tokens) nor at the prompt's end (one token must run)."""
    matched = min(matched, (prompt_tokens - 1) // page_size * page_size)
    while True:
        inside = [start for start, end in spans if start < matched < end]
        if not inside:
            return matched
        matched = min(inside) // page_size * page_size


class PagePool:
    """Free list, reference counts and the prefix cache over pages 1 .. num_pages - 1."""

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"the page pool needs at least 2 pages (page 0 is the null page), got {num_pages}")
        self.num_pages, self.page_size = num_pages, page_size
        self.free = list(range(num_pages - 1, 0, -1))  # pop() hands out low pages first
        self.refs = np.zeros(num_pages, np.int64)
        self.cached: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # hash -> page, LRU first
        self.hash_of: dict[int, bytes] = {}
        self.evictable = 0  # cached pages nobody holds

    @property
    def usable(self) -> int:
        return self.num_pages - 1

    def available(self) -> int:
        """Pages `allocate` can hand out now."""
        return len(self.free) + self.evictable

    def allocate(self, n: int) -> list[int]:
        if n > self.available():
            raise RuntimeError(f"allocate({n}) with {self.available()} pages available")  # callers check first
        while len(self.free) < n:
            self._evict_one()
        pages = [self.free.pop() for _ in range(n)]
        self.refs[pages] += 1
        return pages

    def _evict_one(self) -> None:
        for h, page in self.cached.items():  # least recently used first
            if self.refs[page] == 0:
                del self.cached[h], self.hash_of[page]
                self.evictable -= 1
                self.free.append(page)
                return
        raise RuntimeError("no evictable page")

    def release(self, pages: list[int]) -> None:
        for page in pages:
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if page in self.hash_of:
                    self.evictable += 1
                else:
                    self.free.append(page)

    def match(self, hashes: list[bytes]) -> list[int]:
        """The cached pages of the longest run of leading `hashes` (not yet referenced: `take` them)."""
        pages = []
        for h in hashes:
            page = self.cached.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def take(self, pages: list[int]) -> None:
        """Reference cached pages a new sequence reuses (and mark them recently used)."""
        for page in pages:
            if self.refs[page] == 0:
                self.evictable -= 1
            self.refs[page] += 1
            self.cached.move_to_end(self.hash_of[page])

    def register(self, h: bytes, page: int) -> None:
        """Name a full page of prompt keys by its prefix hash (a page already cached under `h` stays the one)."""
        if h in self.cached or page in self.hash_of:
            return
        self.cached[h] = page
        self.hash_of[page] = h

    def stats(self) -> dict[str, int]:
        return {"pages_total": self.usable, "pages_free": len(self.free), "pages_cached": len(self.cached),
                "pages_evictable": self.evictable, "pages_in_use": int((self.refs > 0).sum())}
