"""The serving engine: continuous batching over a paged KV cache, chunked prefill, a vision-embedding cache and a
prefix cache (`engine.Engine`; the server runs on it, `Engine.generate_many` is the offline batch API).

    engine.py        the scheduler: requests, slots, admission by free pages, the step loop
    step.py          the one device program per step (paged forward + each slot's pick)
    pages.py         the page pool (free list, reference counts) and the prefix cache's page hashes
    vision_cache.py  merged vision features by content hash, LRU, bounded in bytes
"""

from .engine import Engine, EngineError, Handle, Request, Result

__all__ = ["Engine", "EngineError", "Handle", "Request", "Result"]
