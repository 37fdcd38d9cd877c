"""The models lmms-eval finds in this plugin: {`--model` name: class name in `models/<name>.py`} (lmms-eval 0.7.3
lmms_eval/models/__init__.py `_merge_legacy_plugin_models` reads `AVAILABLE_MODELS` and imports the class from
`qwen2vl_jax.evaluation.lmms_plugin.models.<name>.<class>` only when that model is asked for)."""

AVAILABLE_MODELS = {"qwen2vl_jax": "Qwen2VLJax"}
