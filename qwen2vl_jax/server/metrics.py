"""The server's /metrics: numbers in Prometheus' text exposition format (version 0.0.4), what vLLM, TGI and
JetStream expose for scrapers. Counters (monotonic totals) and gauges (levels now) of the serving engine and the
server, each with its HELP and TYPE lines, names prefixed `qwen2vl_jax_`."""

from __future__ import annotations

import math
import re

__all__ = ["prometheus_text", "GAUGES"]

PREFIX = "qwen2vl_jax_"
# Levels that go up and down; every other number is a counter (a total since the server started).
GAUGES = {
    "slots_total": "decode slots of the engine",
    "slots_busy": "slots running a request now",
    "requests_waiting": "requests waiting for a slot",
    "pages_total": "pages of the KV pool (page 0, the null page, left out)",
    "pages_free": "pages on the free list",
    "pages_cached": "pages the prefix cache names",
    "pages_evictable": "cached pages no request holds (free when needed)",
    "pages_in_use": "pages some request holds",
    "vision_cache_bytes": "bytes of vision features in the vision cache",
    "compiled_step": "step programs compiled (one per chunk / pages bucket met)",
    "compiled_set_row": "admission programs compiled",
}
HELP = {
    "submitted": "requests submitted to the engine",
    "steps": "engine steps (device programs run)",
    "tokens": "tokens generated",
    "chunk_tokens": "prompt tokens prefilled",
    "prefix_hits": "requests that reused cached prompt pages",
    "prefix_cached_tokens": "prompt tokens whose keys came from the prefix cache",
    "vision_runs": "images and videos run through the vision tower",
    "vision_cache_hits": "images and videos served from the vision cache",
    "vision_cache_misses": "images and videos not in the vision cache",
    "waited_for_pages": "admissions deferred for lack of free pages",
    "failed": "requests that failed",
}


def _name(key: str) -> str:
    return PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", key)


def prometheus_text(values: dict) -> str:
    """`{name: number}` -> the exposition text; non-numeric values are left out, counters end in `_total`."""
    lines = []
    for key in sorted(values):
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        gauge = key in GAUGES
        name = _name(key) if gauge else _name(key) + "_total"
        what = GAUGES.get(key) or HELP.get(key) or key.replace("_", " ")
        lines += [f"# HELP {name} {what}", f"# TYPE {name} {'gauge' if gauge else 'counter'}", f"{name} {value}"]
    return "\n".join(lines) + "\n"
