"""The shape of the code: imports point one way, every module imports on its own, files hold one concern,
docs/ARCHITECTURE.md names what is there, and the whole parity path runs without the native CPU kernels."""

import ast
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qwen2vl_jax"
MAX_LINES = 650  # not a cap to split at (DEVELOPERS: split along a real seam, never with a shim): a flag to look again

# Model math: builds nothing on generation, training, interventions, conversion, loading or the CLI. (`memory`, the
# request-size estimate that generation and the CLI consult, sits here for the same rule: it reads config and buckets;
# `partitioning`, the logical axis rules, too: the towers constrain their activations and KV cache by them.)
MODEL_MATH = ["layers", "vision", "vision_layout", "text", "model", "config", "presets", "rope_index", "buckets",
              "attention", "kernels", "hook_points", "memory", "partitioning"]
ABOVE_THE_MODEL = ["generation", "training", "lora", "data", "finetune", "finetune_checkpoint", "cli_finetune", "hooks",
                   "interventions", "geometry", "demo",
                   "convert", "checkpoint", "params", "safetensors_io", "hub", "pretrained", "cli", "cli_common",
                   "cli_chat", "selfcheck", "sharding", "plan", "processing", "sampling", "server",
                   "server_api", "server_guard", "server_media", "explorer"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """Package modules `name` imports, function-level imports included (a module a `from` names counts too)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and c != name}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) - {"qwen2vl_jax"} for name, path in modules.items()}


def _reaches(graph, start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in graph[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def test_no_import_cycles():
    graph = _graph()
    assert len(graph) > 30  # the walk really sees the package
    cycles = [name for name in graph if name in _reaches(graph, name)]
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_model_math_imports_nothing_built_on_it():
    graph = _graph()
    below = [m for m in graph if any(m == f"qwen2vl_jax.{p}" or m.startswith(f"qwen2vl_jax.{p}.") for p in MODEL_MATH)]
    assert "qwen2vl_jax.attention.xla" in below and "qwen2vl_jax.kernels.glue" in below
    for module in below:
        bad = {m for m in _reaches(graph, module) if m.split(".")[1] in ABOVE_THE_MODEL}
        assert not bad, f"{module} reaches {sorted(bad)}"
    # and the facade does sit above all three
    assert {"qwen2vl_jax.checkpoints.load", "qwen2vl_jax.checkpoints.convert", "qwen2vl_jax.generation.decoding"} <= graph[
        "qwen2vl_jax.pretrained"]


def test_every_module_imports_in_a_fresh_interpreter():
    names = [n for n in _modules() if not n.endswith("__main__")]  # __main__ runs the CLI

    def run(name):
        done = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)
        return name, done.returncode, done.stderr[-800:]

    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [(n, err) for n, rc, err in pool.map(run, names) if rc]
    assert not failures, failures


def test_files_hold_one_concern():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) >
            MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_architecture_doc_names_every_module_and_only_existing_ones():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:[a-z_]+/)*[a-z_0-9]+\.(?:py|cc|h))`", doc))
    files = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*") if p.suffix in (".py", ".cc", ".h")}
    missing = {f for f in files if f not in named and not f.endswith("__main__.py")}
    assert not missing, f"docs/ARCHITECTURE.md does not describe {sorted(missing)}"
    stale = {f for f in named if f not in files and not (ROOT / f).exists()}
    assert not stale, f"docs/ARCHITECTURE.md names files that do not exist: {sorted(stale)}"


def test_code_comments_cite_nothing_outside_the_repository():
    pattern = re.compile(r"\.\./shared|reference §|TF457", re.IGNORECASE)
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.cc"),
                                                          *(ROOT / "tests").glob("*.py")]
                 if p.name != "test_structure.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


# The parity path an accelerator runs, end to end, with the native kernels off: the `xla` attention and XLA's own
# dots for every product (the bf16 decode gemv included). A representative subset of the parity suite (the logits,
# vision, generation and bf16 files) in a child process, since the kernels are chosen once per process.
XLA_PATH_TESTS = ["tests/test_model.py", "tests/test_vision.py", "tests/test_generation.py", "tests/test_bf16.py"]


def test_parity_suite_passes_without_the_native_kernels():
    out = ROOT / "parity_results_xla.json"  # beside parity_results.json: docs/make_parity.py reads both
    env = {**os.environ, "QWEN2VL_JAX_CPU_KERNELS": "0", "QWEN2VL_JAX_PARITY_JSON": str(out)}
    # compile-count tests do not depend on the kernels: they run once, in the parent
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *XLA_PATH_TESTS,
                           "-k", "not compiles"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=1800)
    assert out.is_file(), done.stdout[-4000:] + done.stderr[-2000:]
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert re.search(r"\d+ passed", summary) and "failed" not in summary, summary
    recorded = json.loads(out.read_text())
    assert recorded["cpu_kernels"] is False and recorded["attention_default"] == "xla"
    logits = [r for r in recorded["records"] if r["test"].startswith("logits/")]
    assert len(logits) >= 8 and all(r["rel_err"] <= 1e-5 for r in logits)
    assert any(r["test"].startswith("generate/greedy") and r["identical"] for r in recorded["records"])
