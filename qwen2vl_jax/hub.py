"""Where a checkpoint directory comes from: a local path, or a Hugging Face Hub model id (no JAX here, so the
processor can use it too).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# What a Hub snapshot needs: config, weights, tokenizer / processor / chat / generation files. Never *.bin.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_source(source: str | os.PathLike, *, local_files_only: bool | None = None,
                   revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                   patterns: list[str] | None = None) -> Path:
    """A local directory for `source`: the directory itself, or the Hub snapshot of a model id.

    For a model id, only config / safetensors / tokenizer files are fetched. `local_files_only` (default: on
    when HF_HUB_OFFLINE is set) uses the local Hugging Face cache only, so an offline run never waits on the
    network; a miss raises FileNotFoundError that says what to do.
    """
    path = Path(os.fspath(source)).expanduser()
    if path.is_dir():
        return path
    text = os.fspath(source)
    if path.exists():
        raise NotADirectoryError(f"{text} is a file; pass the checkpoint directory that holds config.json")
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"checkpoint directory not found: {text}")
    if local_files_only is None:
        local_files_only = _offline_env()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, revision=revision, allow_patterns=patterns or HUB_PATTERNS,
                                      cache_dir=cache_dir,
                                      local_files_only=local_files_only))
    except Exception as e:  # huggingface_hub raises many types; all mean "not available here"
        if local_files_only:
            why = ("it is not in the local Hugging Face cache and downloads are off (local_files_only=True or "
                   "HF_HUB_OFFLINE=1)")
            fix = ("download it once on a machine with Hub access (e.g. `huggingface-cli download "
                   f"{text}`) and copy the cache, or unset HF_HUB_OFFLINE / pass local_files_only=False")
        else:
            why = f"the download failed ({type(e).__name__}: {e})"
            fix = "check the model id and your network access, or set HF_HUB_OFFLINE=1 to use only the local cache"
        raise FileNotFoundError(
            f"cannot load {text!r}: no local directory by that name, and as a Hugging Face model id {why}. "
            f"Pass the path of a local checkpoint directory instead, or {fix}.") from None
