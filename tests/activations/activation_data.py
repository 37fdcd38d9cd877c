"""What the activation tests share: the prompts file writer and the points the small store records (a module of
its own: a test cannot import `conftest` by name without meeting the other conftest.py files)."""

from __future__ import annotations

import json
from pathlib import Path

MAX_PIXELS = 140 * 112  # a 140x112 photo: a 10x8 patch grid, 20 merged tokens


def write_prompts(root: Path, photos: dict, specs: list[tuple[int, str]]) -> Path:
    """`data.jsonl` under `root`: one line per (number of photos, text), photos saved as PNGs beside it."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    names = sorted(photos)
    for name in names:
        if not (root / "img" / f"{name}.png").exists():
            photos[name].resize((140, 112)).save(root / "img" / f"{name}.png")
    lines = []
    for i, (n_photos, text) in enumerate(specs):
        content = [{"type": "image", "image": f"img/{names[(i + j) % len(names)]}.png"} for j in range(n_photos)]
        content.append({"type": "text", "text": text})
        lines.append(json.dumps({"id": f"item-{i}", "messages": [{"role": "user", "content": content}]}))
    path = root / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# what the small store (conftest.py) records
POINTS = ["text.embed", "text.layers.1.resid_post", "text.layers.0.attn.head_out", "vision.blocks.1.resid_post",
          "vision.merger.out"]
