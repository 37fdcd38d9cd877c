"""Small pieces shared by the preprocessing modules: `BatchFeature` and a JSON config reader.

No JAX, no model code, no torch: only the standard library.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["BatchFeature", "read_json"]


class BatchFeature(dict):
    """A dict (HF key order kept) whose entries are also attributes: `out["input_ids"]` or `out.input_ids`.

    The NumPy-only subset of transformers 4.57 feature_extraction_utils.py `BatchFeature`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def read_json(path: Path) -> dict | None:
    """The parsed JSON file at `path`, or None if there is no such file; invalid JSON raises ValueError."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
