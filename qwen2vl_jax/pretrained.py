"""`Qwen2VLForConditionalGeneration`: the model with transformers' methods (`from_pretrained`, `save_pretrained`,
`generate`) for users who think in Hugging Face names.

The math lives in `model.Qwen2VL`, which imports nothing from loading, conversion or generation; this subclass
sits above all three, so imports point one way (modeling <- checkpoints / generation <- pretrained <- cli).
Code that builds on the model (generation, training, hooks) takes any `Qwen2VL`.
"""

from __future__ import annotations

import os

from .checkpoints.convert import save_pretrained
from .checkpoints.load import load_pretrained
from .generation.decoding import generate
from .modeling.model import Qwen2VL

__all__ = ["Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"]


class Qwen2VLForConditionalGeneration(Qwen2VL):
    """`Qwen2VL` plus the HF-style loading, saving and generation entry points."""

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *, dtype=None, attn_implementation: str | None = None,
                        local_files_only: bool | None = None, revision: str | None = None, progress: bool = False,
                        cache_dir=None, place=None, mesh=None, sharding_rules=None,
                        scan_layers: bool = False, quantization: str | None = None) -> Qwen2VLForConditionalGeneration:
        """Load an HF checkpoint directory (Hub or >= 4.52 key layout, single file or sharded), a directory
        written by our converter, or a Hub model id. `dtype`: None / "float32" (default, like transformers),
        "bfloat16", or "auto" (the checkpoint's own dtype). `attn_implementation`: the attention backend
        (`qwen2vl_jax.attention`: "auto", "xla", "cpu", "jax", "pallas" or a registered name; None: "auto", each
        platform's own kernels). `mesh` (`sharding.make_mesh(data=, fsdp=, model=)`): each process reads the
        slices of every parameter its devices hold, and activations / the KV cache are constrained by the same rules
        (`qwen2vl_jax.sharding`); `place(path, array)`: any other placement. `scan_layers`: stack each tower's
        layers and run them with `jax.lax.scan` (one compiled block; same checkpoints, same logits).
        `quantization`: "int8" / "int4" weight-only quantization of the text decoder's projections
        (`qwen2vl_jax.quantization`), done as the weights stream in; None: the weights as stored (a quantized
        checkpoint, from `save_pretrained` of a quantized model or `convert --quantize`, loads quantized as stored,
        nothing quantized again; asking it for another mode is a `QuantizationError`).

        GPTQ / AWQ checkpoints (Qwen's `-GPTQ-Int4`, `-GPTQ-Int8` and `-AWQ` repos; `quantization.gptq`) load too;
        only the Linears they quantized (Qwen's: the decoder layers' projections) are affected, every other tensor
        loads as usual. Symmetric 4-bit GPTQ without act-order (GPTQ-Int4), with `quantization` None or "int4":
        our int4 Linears in the checkpoint's groups, losslessly (same weights, bit for bit). Every other format
        (GPTQ-Int8, AWQ, act-order or asymmetric GPTQ), with None: the exact dequantized weights `(q - zero) *
        scale` (exact in float32, rounded once in bfloat16). `quantization="int8"` / `"int4"` where the stored
        integers cannot give it exactly (including "int8" on GPTQ-Int4): those weights quantized again into ours
        (int4 in the checkpoint's group size), which is lossy and logged as a warning. `dtype` defaults to
        float32 as for any checkpoint (the stored float16 is no dtype Qwen2-VL runs in, so `dtype="auto"` is
        refused); `mesh` and `scan_layers` work as usual (each Linear's packed tensors are read whole, then
        sliced)."""
        return load_pretrained(cls, source, dtype=dtype, attn_implementation=attn_implementation,
                               local_files_only=local_files_only, revision=revision, progress=progress,
                               cache_dir=cache_dir, place=place, mesh=mesh, sharding_rules=sharding_rules,
                               scan_layers=scan_layers, quantization=quantization)

    def save_pretrained(self, out_dir, **kwargs):
        """Write this model as an HF checkpoint (`format="hf"`, default) or in our format (`format="flax"`);
        research edits made in JAX then load in transformers. A quantized model writes a quantized checkpoint
        (`from_pretrained` loads it as stored). See `qwen2vl_jax.checkpoints.convert.save_pretrained`."""
        return save_pretrained(self, out_dir, **kwargs)

    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, *, second_per_grid_ts=None, **kwargs):
        """transformers-style generation; see `qwen2vl_jax.generation.decoding.generate` for the arguments
        (`second_per_grid_ts`: Qwen2.5-VL's per-video time spacing, from its processor; ignored by Qwen2-VL)."""
        return generate(self, input_ids, attention_mask, pixel_values, image_grid_thw, pixel_values_videos,
                        video_grid_thw, second_per_grid_ts=second_per_grid_ts, **kwargs)


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """The same class under transformers' Qwen2.5-VL name: `Qwen2VL` runs both families (the config's
    `model_type` picks the vision blocks and the video positions). Loading a Qwen2-VL checkpoint with it is refused,
    as transformers refuses a checkpoint of another model type."""

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, **kwargs) -> Qwen2_5_VLForConditionalGeneration:
        model = super().from_pretrained(source, **kwargs)
        if model.config.model_type != "qwen2_5_vl":
            raise ValueError(f"{source} is a {model.config.model_type} checkpoint, not Qwen2.5-VL: load it with "
                             "Qwen2VLForConditionalGeneration (which takes either family)")
        return model
