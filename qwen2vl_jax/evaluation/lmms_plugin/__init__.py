"""lmms-eval's model plugin for qwen2vl_jax: run lmms-eval's benchmarks (its task configs, prompts, metrics and
sample logs) on this implementation.

    LMMS_EVAL_PLUGINS=qwen2vl_jax.evaluation.lmms_plugin python -m lmms_eval --model qwen2vl_jax \\
        --model_args pretrained=Qwen/Qwen2-VL-2B-Instruct,max_pixels=602112 --tasks mmmu_val --log_samples \\
        --output_path results/

lmms-eval (0.7.3: lmms_eval/models/__init__.py `_merge_legacy_plugin_models`) imports `{plugin}.models` for every
name in LMMS_EVAL_PLUGINS, reads its `AVAILABLE_MODELS` ({model name: class name}) and loads the class from
`{plugin}.models.{name}.{class}`; its `__main__` also adds the plugin's `tasks` package directory to the task
include path (`importlib.util.find_spec(f"{plugin}.tasks")`), which is why `tasks/` exists (empty: lmms-eval's own
task configs are used as they are). The model class is `models/qwen2vl_jax.py`'s `Qwen2VLJax`.

lmms-eval 0.7.3 marks LMMS_EVAL_PLUGINS deprecated in favour of the entry-point group "lmms_eval.models", whose
entries are a `ModelManifest` or a function returning one (lmms_eval/models/registry_v2.py
`load_entrypoint_manifests`). `manifest` below is that function: with
`"lmms_eval.models": ["qwen2vl_jax = qwen2vl_jax.evaluation.lmms_plugin:manifest"]` in the package's entry points,
`--model qwen2vl_jax` works in an installed checkout without the environment variable.

lmms-eval imports this package (and `models/__init__.py`) while it builds its model registry, on every run and for
any `--model`, so neither imports lmms-eval or torch; importing them does run `qwen2vl_jax.evaluation`'s own
`__init__`, which imports JAX (about 2 s), and the class module loads only when `--model qwen2vl_jax` is asked for.
"""

from __future__ import annotations

MODEL_NAME = "qwen2vl_jax"
CLASS_PATH = "qwen2vl_jax.evaluation.lmms_plugin.models.qwen2vl_jax.Qwen2VLJax"

__all__ = ["MODEL_NAME", "CLASS_PATH", "manifest"]


def manifest():
    """The "lmms_eval.models" entry point: the model's `ModelManifest` (a "simple" model: lmms-eval passes it the
    task's prompt text and `doc_to_visual`, not chat messages)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=CLASS_PATH)
