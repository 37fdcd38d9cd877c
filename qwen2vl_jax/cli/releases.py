"""Which released checkpoint a config is: `weights/manifest.json` (written by `weights/make_manifest.py` from
`qwen2vl_jax.modeling.config.PRESETS`) and the comparison `qwen2vl-jax info` prints as its `release` line.

A config matches a release when every identifying field (`identifying_fields`) is equal. Otherwise the closest
release of the same family (fewest differing fields) is named with its differences when at most `NEAR_FIELDS`
fields differ (a checkpoint cut to fewer layers, an extended vocabulary); past that it matches no released
checkpoint. Standard library only: the manifest is JSON and a config is read with `Qwen2VLConfig`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT_VERSION = 1
NEAR_FIELDS = 3  # at most this many differing fields (same family): "closest", else "matches no released checkpoint"

# The fields that tell the releases apart and pin their shapes, by the name `info` prints: the top-level ones, then
# `text.<Qwen2VLTextConfig field>` and `vision.<Qwen2VLVisionConfig field>` (transformers' Qwen2-VL names; for
# Qwen2.5-VL, transformers' vision `hidden_size` is our `embed_dim` and its `out_hidden_size` our `hidden_size`).
# `vision.mlp_dim` is the vision MLP width (Qwen2-VL: embed_dim x mlp_ratio; Qwen2.5-VL: intermediate_size).
TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "max_position_embeddings", "rope_theta", "rms_norm_eps", "mrope_section")
VISION_FIELDS = ("depth", "embed_dim", "num_heads", "mlp_dim", "hidden_size", "patch_size", "spatial_merge_size",
                 "temporal_patch_size", "window_size", "fullatt_block_indexes", "tokens_per_second")


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def identifying_fields(config) -> dict:
    """`{"family", "tie_word_embeddings", "text": {...}, "vision": {...}}` of a `Qwen2VLConfig`: JSON values."""
    t, v = config.text_config, config.vision_config
    return {
        "family": config.model_type,
        "tie_word_embeddings": config.tie_word_embeddings,
        "text": {name: _plain(getattr(t, name)) for name in TEXT_FIELDS},
        "vision": {name: _plain(getattr(v, name)) for name in VISION_FIELDS},
    }


def flatten(fields: dict) -> dict:
    """`{"family": ..., "text.hidden_size": ..., ...}`: one level, dotted names."""
    out = {}
    for key, value in fields.items():
        if isinstance(value, dict):
            out.update({f"{key}.{name}": v for name, v in value.items()})
        else:
            out[key] = value
    return out


def manifest_candidates() -> list[Path]:
    """Where the manifest is looked for: the source checkout's `weights/` (an editable install), then the copy
    setup.py installs under `<prefix>/share/qwen2vl_jax/`."""
    return [Path(__file__).resolve().parents[2] / "weights" / MANIFEST_NAME,
            Path(sys.prefix) / "share" / "qwen2vl_jax" / MANIFEST_NAME]


def load_manifest(path: str | Path | None = None) -> tuple[dict, Path] | None:
    """(the manifest, its path), or None when no manifest is found (`path`: that file only)."""
    for candidate in [Path(path)] if path is not None else manifest_candidates():
        if candidate.is_file():
            with open(candidate, encoding="utf-8") as f:
                manifest = json.load(f)
            if manifest.get("format_version") != MANIFEST_FORMAT_VERSION or not isinstance(
                    manifest.get("releases"), list):
                raise ValueError(f"{candidate} is not a qwen2vl_jax release manifest (format_version "
                                 f"{MANIFEST_FORMAT_VERSION})")
            return manifest, candidate
    return None


@dataclass
class ReleaseMatch:
    status: str  # "match", "closest", "none" or "unknown" (no manifest)
    hub_id: str | None = None
    release: dict | None = None
    differences: dict = field(default_factory=dict)  # {field: {"config": ours, "release": theirs}}
    manifest: str | None = None
    problem: str | None = None  # "unknown": why

    def line(self) -> str:
        """The one line `info` prints (after `release      `)."""
        if self.status == "match":
            r = self.release
            return f"matches {self.hub_id} ({r['family']} {r['size']}, {r['parameters']['total']:,} parameters)"
        if self.status == "closest":
            diffs = ", ".join(f"{name} {d['config']} (release: {d['release']})" for name, d in self.differences.items())
            return f"no exact match; closest {self.hub_id}, which differs in {diffs}"
        if self.status == "none":
            return "matches no released checkpoint"
        return f"cannot check: {self.problem or 'weights/manifest.json not found (a source checkout has it)'}"

    def as_dict(self) -> dict:
        r = self.release or {}
        return {"status": self.status, "hub_id": self.hub_id, "size": r.get("size"),
                "parameters": (r.get("parameters") or {}).get("total"), "differences": self.differences,
                "manifest": self.manifest, "line": self.line()}


def check_release(config, path: str | Path | None = None) -> ReleaseMatch:
    """`match_release` against the manifest `load_manifest` finds; an unreadable manifest is reported in the line
    (status "unknown"), never an error: the rest of `info` does not depend on it."""
    try:
        found = load_manifest(path)
    except (OSError, ValueError) as e:
        return ReleaseMatch("unknown", problem=f"the release manifest is unreadable ({e})")
    return match_release(config, *(found or (None, None)))


def match_release(config, manifest: dict | None, where: str | Path | None = None) -> ReleaseMatch:
    """Compare a `Qwen2VLConfig` with every release of `manifest` (None: no manifest found)."""
    if manifest is None:
        return ReleaseMatch("unknown")
    mine = flatten(identifying_fields(config))
    best = None
    for release in manifest["releases"]:
        theirs = flatten({k: release[k] for k in ("family", "tie_word_embeddings", "text", "vision")})
        differences = {name: {"config": mine.get(name), "release": theirs.get(name)}
                       for name in dict.fromkeys([*theirs, *mine]) if mine.get(name) != theirs.get(name)}
        if not differences:
            return ReleaseMatch("match", release["hub_id"], release, {}, str(where) if where else None)
        if "family" in differences:
            continue
        if best is None or len(differences) < len(best[1]):
            best = (release, differences)
    if best is not None and len(best[1]) <= NEAR_FIELDS:
        return ReleaseMatch("closest", best[0]["hub_id"], best[0], best[1], str(where) if where else None)
    return ReleaseMatch("none", manifest=str(where) if where else None)
