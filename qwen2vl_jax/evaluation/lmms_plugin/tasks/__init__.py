"""Task configs of the lmms-eval plugin (none yet).

With LMMS_EVAL_PLUGINS set, lmms-eval 0.7.3's `__main__` adds this package's directory to the task include path
(`importlib.util.find_spec("qwen2vl_jax.evaluation.lmms_plugin.tasks").submodule_search_locations[0]`), so the
package must exist. A task YAML put here (with its `utils.py`, as in lmms-eval's own lmms_eval/tasks/<name>/) would
be found by `--tasks <name>` like lmms-eval's own tasks; any other directory can be added with `--include_path`.
"""
