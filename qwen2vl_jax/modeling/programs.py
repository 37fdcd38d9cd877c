"""The compiled programs: the model's math under `jax.jit`, with a hook set installed while tracing.

Two programs serve the HF-style calls (`Qwen2VL.__call__`, `VisionTransformer.run_padded`) and the
interpretability runs: `vision` (the vision tower on padded rows; generation runs it too) and `forward`
(embeddings + decoder + logits). Generation compiles its own prefill and decode programs around `Qwen2VL.forward`
(`generation/decoding.py`).
A hook set is a traced argument whose names are static (`hook_points.HookSet`), so without hooks the program is the
plain math's, and a new steering vector reuses the compiled program. `compiles()` counts compiled programs from the
jit caches themselves (a test that expects one compile per shape bucket reads it).
"""

from __future__ import annotations

import dataclasses

import jax

from .hook_points import install


def _vision(visual, pixels_PC, pos_hw_P2, segments, hooks=None, *, output_hidden_states=False):
    """`VisionTransformer.forward` with `hooks` installed: (merged features, hidden states, recorded values)."""
    with install(hooks) as run:
        merged_MD, hidden = visual.forward(pixels_PC, pos_hw_P2, segments, output_hidden_states=output_hidden_states)
    return merged_MD, hidden, run.records


def _forward(model, input_ids_BT, attention_mask_BT, position_ids_ZBT, vision_MD, vision_index_BT, cache, hooks=None,
             *, output_hidden_states=False, output_attentions=False, logits_to_keep=0, cache_empty=False):
    """`Qwen2VL.forward` with `hooks` installed: its `ForwardOutput`, the recorded values in `.records`."""
    with install(hooks) as run:
        out = model.forward(input_ids_BT, attention_mask_BT, position_ids_ZBT, vision_MD, vision_index_BT, cache,
                            output_hidden_states=output_hidden_states, output_attentions=output_attentions,
                            logits_to_keep=logits_to_keep, cache_empty=cache_empty)
    return dataclasses.replace(out, records=run.records)


vision = jax.jit(_vision, static_argnames=("output_hidden_states",))
forward = jax.jit(_forward, static_argnames=("output_hidden_states", "output_attentions", "logits_to_keep",
                                             "cache_empty"), donate_argnames=("cache",))


def compiles() -> dict[str, int]:
    """Programs compiled so far, per program (the jit caches' sizes: one entry per distinct shapes / statics)."""
    return {"vision": vision._cache_size(), "forward": forward._cache_size()}
