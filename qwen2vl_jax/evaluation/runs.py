"""A prediction run's output file: resumable after any kill, shared between processes, in a deterministic order.

    out = RunOutput("preds.jsonl", indices=[0, 1, ..., 999], fingerprint={...}, process_index=0, process_count=1)
    for row in predictor.run(items[i] for i in out.remaining()):
        out.append(row)
    out.finish()              # the last process to finish merges the parts into preds.jsonl

One JSON object per line, one line per input item, in input order. Each process takes the items whose index is
`process_index` modulo `process_count` (`jax.process_index()` / `jax.process_count()` on a multi-host run) and
writes them, in order, to its part (`preds.jsonl.part-00001-of-00004`; with one process the part is `preds.jsonl`
itself). A row is written with one `write` of the whole line as soon as it and every row before it are done, so a
kill (SIGKILL, a lost host) leaves a prefix of the part, perhaps with a torn last line. On the next start the part is
read back, a torn last line is cut off, and the run goes on from the first missing index: nothing is lost and
nothing is written twice, and the finished file is byte-identical to one from an uninterrupted run (the rows hold
no timings, and every item's seed is its own: `predict.py`).

`preds.jsonl.run.json` records what produced the rows (the data file's SHA-256, the model, the settings, the
process count); resuming with anything different is refused, naming what changed, since mixing rows of two settings
would silently corrupt a benchmark number. When a process finishes its part it checks the others; if every part is
complete it merges them, in index order, into `preds.jsonl` (written to a temporary file, then renamed: readers
never see half a file; two processes finishing at once write the same bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["RunError", "RunOutput", "file_sha256", "part_path", "atomic_write"]


class RunError(ValueError):
    """An output that cannot be resumed (written by another run, or damaged beyond its last line)."""


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def part_path(out: Path, process_index: int, process_count: int) -> Path:
    if process_count == 1:
        return out
    return out.with_name(f"{out.name}.part-{process_index:05d}-of-{process_count:05d}")


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _shard(indices: Sequence[int], process_index: int, process_count: int) -> list[int]:
    return [i for i in indices if i % process_count == process_index]


def _read_rows(path: Path, expected: Sequence[int], *, repair: bool) -> list[bytes]:
    """The complete lines of `path` (a part), checked to be rows for `expected[:n]` in order; with `repair`, a torn
    last line (no newline, or not JSON) is cut off the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # `tail` is b"" when the file ends with a newline
    good = []
    for n, line in enumerate(complete):
        try:
            row = json.loads(line)
            index = row["index"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            if n == len(complete) - 1 and not tail:
                break  # a last line torn inside a multi-byte write: treat like a tail
            raise RunError(f"{path} line {n + 1} is not a row of this run; delete the file to start again") from None
        if n >= len(expected) or index != expected[n]:
            want = expected[n] if n < len(expected) else "nothing (the part is complete)"
            raise RunError(f"{path} line {n + 1} holds item {index}, expected {want}: the file was written by a "
                           "different run; delete it or choose another --out")
        good.append(line + b"\n")
    if repair and sum(map(len, good)) != len(data):
        with open(path, "r+b") as f:
            f.truncate(sum(map(len, good)))
    return good


class RunOutput:
    """One process's share of a prediction run's output (module docstring). `indices`: every item's index, in the
    data's order; `fingerprint`: what produced the rows (JSON-serialisable)."""

    def __init__(self, out: str | os.PathLike, *, indices: Sequence[int], fingerprint: Mapping[str, Any],
                 process_index: int = 0, process_count: int = 1):
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
        self.out = Path(out)
        self.indices = list(indices)
        self.process_index, self.process_count = process_index, process_count
        self.mine = _shard(self.indices, process_index, process_count)
        self.path = part_path(self.out, process_index, process_count)
        self.fingerprint = {**fingerprint, "process_count": process_count, "items": len(self.indices)}
        self._check_fingerprint()
        self.done = len(_read_rows(self.path, self.mine, repair=True))
        self._file = None

    def _check_fingerprint(self) -> None:
        meta = self.out.with_name(self.out.name + ".run.json")
        wanted = json.dumps(self.fingerprint, sort_keys=True, indent=1).encode()
        if meta.exists():
            try:
                found = json.loads(meta.read_bytes())
            except json.JSONDecodeError:
                found = None
            if found != json.loads(wanted):
                changed = sorted(k for k in set(found or {}) | set(self.fingerprint)
                                 if (found or {}).get(k) != self.fingerprint.get(k))
                raise RunError(f"{self.out} belongs to a run with other settings (changed: {', '.join(changed)}; "
                               f"see {meta}); delete both to start again, or choose another --out")
            return
        has_rows = self.path.exists() and self.path.stat().st_size > 0
        if has_rows:
            raise RunError(f"{self.path} exists but {meta} (what produced it) does not; delete it or choose another "
                           "--out")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(meta, wanted)

    def remaining(self) -> list[int]:
        """The indices this process still has to write, in order."""
        return self.mine[self.done:]

    def append(self, row: Mapping[str, Any]) -> None:
        """Write the next row (its "index" must be the next of `remaining()`), as one write of the whole line."""
        if self.done >= len(self.mine) or row.get("index") != self.mine[self.done]:
            raise RunError(f"row {row.get('index')} out of order: expected {self.remaining()[:1] or 'no more rows'}")
        if self._file is None:
            self._file = open(self.path, "ab", buffering=0)
        line = (json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n").encode()
        written = self._file.write(line)
        if written != len(line):  # a raw file may write less; finish the line before going on
            self._file.write(line[written:])
        self.done += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def complete(self) -> bool:
        return self.done == len(self.mine)

    def finish(self) -> bool:
        """Close; if every process's part is complete, merge them into `out` (True when `out` is complete)."""
        self.close()
        if self.process_count == 1:
            return self.complete
        parts = []
        for k in range(self.process_count):
            rows = _read_rows(part_path(self.out, k, self.process_count),
                              _shard(self.indices, k, self.process_count), repair=False)
            if len(rows) != len(_shard(self.indices, k, self.process_count)):
                return False
            parts.append(rows)
        taken, merged = [0] * self.process_count, []
        for i in self.indices:  # each part holds its share in data order: interleave them back
            k = i % self.process_count
            merged.append(parts[k][taken[k]])
            taken[k] += 1
        atomic_write(self.out, b"".join(merged))
        return True
