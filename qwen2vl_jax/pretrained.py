"""`Qwen2VLForConditionalGeneration`: the model with transformers' methods (`from_pretrained`, `save_pretrained`,
`generate`) for users who think in Hugging Face names.

The math lives in `model.Qwen2VL`, which imports nothing from loading, conversion or generation; this subclass
sits above all three, so imports point one way (model <- checkpoint / convert / generation <- pretrained <- cli).
Code that builds on the model (generation, training, hooks) takes any `Qwen2VL`.
"""

from __future__ import annotations

import os

from .checkpoint import load_pretrained
from .convert import save_pretrained
from .generation import generate
from .model import Qwen2VL

__all__ = ["Qwen2VLForConditionalGeneration"]


class Qwen2VLForConditionalGeneration(Qwen2VL):
    """`Qwen2VL` plus the HF-style loading, saving and generation entry points."""

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *, dtype=None, attn_implementation: str | None = None,
                        local_files_only: bool | None = None, revision: str | None = None, progress: bool = False,
                        cache_dir=None, place=None, mesh=None, sharding_rules=None,
                        scan_layers: bool = False) -> Qwen2VLForConditionalGeneration:
        """Load an HF checkpoint directory (Hub or >= 4.52 key layout, single file or sharded), a directory
        written by our converter, or a Hub model id. `dtype`: None / "float32" (default, like transformers),
        "bfloat16", or "auto" (the checkpoint's own dtype). `attn_implementation`: the attention backend
        (`qwen2vl_jax.attention`: "xla", "cpu", "jax", "pallas" or a registered name; None: the platform's
        default). `mesh` (`sharding.make_mesh(data=, fsdp=, model=)`): each process reads the slices of every
        parameter its devices hold, and activations / the KV cache are constrained by the same rules
        (`qwen2vl_jax.sharding`); `place(path, array)`: any other placement. `scan_layers`: stack each tower's
        layers and run them with `jax.lax.scan` (one compiled block; same checkpoints, same logits)."""
        return load_pretrained(cls, source, dtype=dtype, attn_implementation=attn_implementation,
                               local_files_only=local_files_only, revision=revision, progress=progress,
                               cache_dir=cache_dir, place=place, mesh=mesh, sharding_rules=sharding_rules,
                               scan_layers=scan_layers)

    def save_pretrained(self, out_dir, **kwargs):
        """Write this model as an HF checkpoint (`format="hf"`, default) or in our format (`format="flax"`);
        research edits made in JAX then load in transformers. See `qwen2vl_jax.convert.save_pretrained`."""
        return save_pretrained(self, out_dir, **kwargs)

    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, *, second_per_grid_ts=None, **kwargs):
        """transformers-style generation; see `qwen2vl_jax.generation.generate` for the arguments
        (`second_per_grid_ts`: Qwen2.5-VL's per-video time spacing, from its processor; ignored by Qwen2-VL)."""
        return generate(self, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                        video_grid_thw, second_per_grid_ts=second_per_grid_ts, **kwargs)
