"""Interventions and attributions built on the hook points (also `qwen2vl_jax.interventions`).

    edits.py              change values: head ablation, activation patching, steering; and the logit lens
    gradients.py          gradients_at (d metric / d value at any hook points, one forward + one backward),
                          attribution_patching (gradient x (clean - corrupt)) and patch_each (real patching)
    logit_attribution.py  direct_logit_attribution (the logit split into embed, each layer's attention and MLP, each
                          head and each key token), image_token_heatmap (its image tokens on the photo)
"""

from .edits import LogitLens, ablate_heads, activation_patching, logit_lens, mean_head_outputs, patch, steer
from .gradients import PER, attribution_patching, compiles, gradients_at, patch_each, reduce_per
from .logit_attribution import (
    ImageHeatmap,
    attribution_points,
    decompose_resid,
    direct_logit_attribution,
    image_token_heatmap,
    source_attribution,
)

__all__ = ["LogitLens", "ablate_heads", "activation_patching", "logit_lens", "mean_head_outputs", "patch", "steer",
           "PER", "attribution_patching", "compiles", "gradients_at", "patch_each", "reduce_per",
           "ImageHeatmap", "attribution_points", "decompose_resid", "direct_logit_attribution", "image_token_heatmap",
           "source_attribution"]
