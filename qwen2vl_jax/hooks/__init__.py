"""Hooks and interventions: read or change any named value inside the model (the hook points of
`modeling.hook_points`), TransformerLens-style.

* `run.py`: `run_with_cache`, `run_with_hooks`, `list_hook_points`, `stack_layers`.
* `interventions/`: ablation, activation patching, steering, the logit lens; gradients at hook points and
  attribution patching; direct logit attribution (also `qwen2vl_jax.interventions`).
* `geometry.py`: vision tokens on the photo (also `qwen2vl_jax.geometry`).
"""

from ..modeling.hook_points import HookContext, HookError, HookSet, hook_point_axes, make_hookset
from .run import list_hook_points, run_with_cache, run_with_hooks, stack_layers

__all__ = ["HookContext", "HookError", "HookSet", "hook_point_axes", "list_hook_points", "make_hookset",
           "run_with_cache", "run_with_hooks", "stack_layers"]
