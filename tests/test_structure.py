"""The shape of the code: packages stack in layers and imports point down them, no module or package sits on an
import cycle, every module imports on its own, a module re-exports nothing (only a package's `__init__` may), the
top level stays small, docs/ARCHITECTURE.md names what is there, and the whole parity path runs without the native
CPU kernels. Every rule is checked on the real import graph (function-level imports included), and each detector is
first shown to catch a planted violation, so none of them can pass by seeing nothing."""

import ast
import functools
import json
import os
import re
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "qwen2vl_jax"
LONG_FILE = 650  # not a cap to split at (DEVELOPERS: split along a real seam, never with a shim): a note to look again
MAX_TOP_LEVEL_MODULES = 10  # .py files directly in qwen2vl_jax/, `__init__` and `__main__` included

# The layers, bottom up. A node is a package under qwen2vl_jax (a top-level module is its own node; "qwen2vl_jax" is
# the package's own `__init__`, the lazy facade). A node imports only nodes of the layers below its own: never one
# beside it, never one above. Every node must be placed here.
LAYERS = [
    # the Hub's file resolution; process-wide XLA settings; the native CPU kernels: nothing of the package
    {"hub", "runtime", "kernels"},
    # images, videos, tokenizer, processor (NumPy, no JAX: PROCESSING_MAY_NOT_IMPORT); the attention backends
    {"processing", "attention"},
    # boxes in the answers: both families' formats, their coordinates <-> the original image's pixels (NumPy + PIL)
    {"grounding"},
    # the model math: config, layers, rope, vision, text, model, hook points, partitioning (kernels and attention)
    {"modeling"},
    # the mesh, parameter placement and memory plans; decoding, sampling, request memory
    # weight-only int8 / int4 Linears (the model transformation and the formats)
    {"quantization"},
    {"sharding", "generation"},
    # the serving engine: continuous batching over a paged KV cache, its page pool and caches
    {"engine"},
    # the HF key map, safetensors, loading (onto a mesh too), converting
    {"checkpoints"},
    # LoRA adapters; the HF-style facade; run_with_cache / hooks / interventions; the tiny demo checkpoint
    {"lora", "pretrained", "hooks", "testing"},
    # the loss, steps and fine-tuning loop; the OpenAI-compatible server and the explorer; the lazy package facade
    {"training", "server", "qwen2vl_jax"},
    # predictions over a dataset (on the engine), the benchmarks' metrics, log-likelihood scoring, lmms-eval's plugin
    {"evaluation"},
    # activations of a dataset stored to disk in shards; sparse autoencoders trained on them and spliced back
    {"activations"},
    # programs lowered for TPU, CUDA and CPU with jax.export: artifacts and their manifests
    {"export"},
    # the command line
    {"cli"},
    # `python -m qwen2vl_jax`
    {"__main__"},
]
# What the bottom of the stack may reach at all (itself aside), directly or through anything it imports: the model
# math builds on the attention backends and the kernels only; processing on the Hub's file resolution only.
REACHES_ONLY = {"hub": set(), "runtime": set(), "kernels": set(), "attention": {"kernels"},
                "modeling": {"kernels", "attention"}, "processing": {"hub"},
                "grounding": {"processing", "hub"}}
PROCESSING_MAY_NOT_IMPORT = {"jax", "jaxlib", "flax", "optax", "orbax", "torch", "torchvision", "transformers"}


# ------------------------------------------------------------------------------------------------ the import graph
@functools.cache
def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _facade_exports() -> dict[str, str]:
    """Names the package's `__init__` serves lazily (`{name: ".module"}` dicts), as absolute module names."""
    out = {}
    for node in ast.parse((PACKAGE / "__init__.py").read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            for key, value in zip(node.value.keys, node.value.values):
                if (isinstance(key, ast.Constant) and isinstance(value, ast.Constant) and isinstance(value.value, str)
                        and value.value.startswith(".")):
                    out[key.value] = "qwen2vl_jax" + value.value
    return out


def _imports(name: str, path: Path, modules: dict, facade: dict) -> dict[str, int]:
    """Package modules `name` imports, function-level imports included (a module a `from` names counts too; a name
    of the lazy facade counts as the module that defines it), each with the line of its first import."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
            # `from . import a, b` needs the submodules only; a name the package itself defines needs its __init__
            candidates = submodules + ([base] if len(submodules) < len(node.names) else [])
            if base == "qwen2vl_jax":
                candidates += [facade[alias.name] for alias in node.names if alias.name in facade]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for c in candidates:
            if c in modules and c != name and c != "qwen2vl_jax":
                found.setdefault(c, node.lineno)
    return found


@functools.cache
def _graph() -> dict[str, dict[str, int]]:
    modules, facade = _modules(), _facade_exports()
    graph = {name: _imports(name, path, modules, facade) for name, path in modules.items()}
    graph["qwen2vl_jax"] = {m: 0 for m in facade.values() if m in modules}  # the facade's lazy imports
    return graph


def _node(module: str) -> str:
    """The package a module belongs to (its first component under qwen2vl_jax); a top-level module is its own."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _package_graph(graph) -> dict[str, dict[str, list[str]]]:
    """{package: {package it imports: ["path:line imports module", ...]}}."""
    out = {_node(m): {} for m in graph}
    for module, targets in graph.items():
        for target, line in targets.items():
            if _node(target) != _node(module):
                out[_node(module)].setdefault(_node(target), []).append(f"{_where(module)}:{line} imports {target}")
    return out


def _where(module: str) -> str:
    path = _modules()[module]
    return str(path.relative_to(ROOT))


def _reaches(graph, start: str) -> set[str]:
    seen, stack = set(), [start]
    while stack:
        for nxt in graph[stack.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _on_cycles(graph) -> list[str]:
    return sorted(name for name in graph if name in _reaches(graph, name))


def _layer_violations(packages: dict[str, dict[str, list[str]]], layers: list[set[str]]) -> list[str]:
    level = {node: i for i, layer in enumerate(layers) for node in layer}
    out = []
    for node, targets in sorted(packages.items()):
        for target, lines in sorted(targets.items()):
            if level[target] >= level[node]:
                where = "beside it" if level[target] == level[node] else "above it"
                out += [f"{line} ({node} may not import {target}: {where})" for line in lines]
    return out


# ------------------------------------------------------------------------------------------------ shims
def _module_level(body):
    """Statements run at import: the module's body, into if / try / with blocks, not into defs or classes."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in (node.body, getattr(node, "orelse", []), getattr(node, "finalbody", []),
                          *[h.body for h in getattr(node, "handlers", [])]):
                yield from _module_level(block)


def _shim_findings(source: str, package_prefix: str = "qwen2vl_jax") -> list[str]:
    """What a (non-`__init__`) module re-exports: names it imports from the package at module level and never uses
    (a name listed in `__all__` is not a use), and names in its `__all__` that it imports or never defines."""
    tree = ast.parse(source)
    from_package, imported, defined, exported = {}, set(), set(), []
    for node in _module_level(tree.body):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            ours = (isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(package_prefix))
                    or isinstance(node, ast.Import) and any(a.name.startswith(package_prefix) for a in node.names))
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                if not (isinstance(node, ast.ImportFrom) and node.module == "__future__"):
                    imported.add(bound)
                if ours:
                    from_package.setdefault(bound, node.lineno)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                defined |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
            if any(isinstance(t, ast.Name) and t.id == "__all__"
                   for t in (node.targets if isinstance(node, ast.Assign) else [node.target])):
                exported += [e.value for e in ast.walk(node.value)
                             if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            defined |= {n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    for node in ast.walk(tree):  # quoted annotations ("Qwen2VL | None") use names too
        for annotation in (getattr(node, "annotation", None), getattr(node, "returns", None)):
            if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
                used |= set(re.findall(r"[A-Za-z_]\w*", annotation.value))
    out = [f"line {line}: imports {name} from the package and never uses it"
           for name, line in sorted(from_package.items(), key=lambda kv: kv[1]) if name not in used]
    out += [f"__all__ lists {name}, which it imports" for name in exported if name in imported and name not in defined]
    out += [f"__all__ lists {name}, which it does not define" for name in exported
            if name not in imported and name not in defined]
    return out


# ------------------------------------------------------------------------------------------------ the detectors
def test_the_detectors_catch_planted_violations():
    assert _on_cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == ["a", "b", "c"]
    assert _on_cycles({"a": {"b": 1}, "b": {}}) == []
    planted = {"modeling": {"training": ["x.py:3 imports qwen2vl_jax.training.steps"]}, "training": {},
               "generation": {"sharding": ["y.py:4 imports qwen2vl_jax.sharding.mesh"]}, "sharding": {}}
    found = _layer_violations(planted, [{"modeling"}, {"generation", "sharding"}, {"training"}])
    assert found == ["y.py:4 imports qwen2vl_jax.sharding.mesh (generation may not import sharding: beside it)",
                     "x.py:3 imports qwen2vl_jax.training.steps (modeling may not import training: above it)"]
    shim = ("from __future__ import annotations\nfrom ..modeling.model import Qwen2VL\nfrom .mesh import make_mesh\n"
            "from .plan import plan as plan\nimport numpy as np\nfrom typing import Any\n"
            "__all__ = ['make_mesh', 'f', 'Any', 'gone']\n"
            "def f(m: 'Qwen2VL') -> Any:\n    return np.zeros(1)\n")
    assert _shim_findings(shim) == ["line 3: imports make_mesh from the package and never uses it",
                                    "line 4: imports plan from the package and never uses it",
                                    "__all__ lists make_mesh, which it imports", "__all__ lists Any, which it imports",
                                    "__all__ lists gone, which it does not define"]
    clean = ("from .mesh import make_mesh\nif True:\n    from .x import y\nCONST = 1\n__all__ = ['g', 'CONST']\n"
             "def g():\n    return make_mesh(y)\n")
    assert _shim_findings(clean) == []


# ------------------------------------------------------------------------------------------------ the rules
def test_the_walk_sees_the_package():
    graph = _graph()
    assert len(graph) > 40, sorted(graph)
    edges = {(m, t) for m, targets in graph.items() for t in targets}
    assert ("qwen2vl_jax.modeling.layers", "qwen2vl_jax.kernels") in edges
    assert any(m == "qwen2vl_jax.modeling.text" and _node(t) == "attention" for m, t in edges)
    assert ("qwen2vl_jax.processing.processor", "qwen2vl_jax.hub") in edges
    assert ("qwen2vl_jax.__main__", "qwen2vl_jax.cli") in edges
    assert {"qwen2vl_jax.checkpoints.load", "qwen2vl_jax.generation.decoding"} <= set(graph["qwen2vl_jax.pretrained"])
    # a function-level import (the fine-tuning loop loads its model on demand) and the facade's lazy ones
    assert "qwen2vl_jax.pretrained" in graph["qwen2vl_jax.training.finetune"]
    assert {"qwen2vl_jax.pretrained", "qwen2vl_jax.processing.processor"} <= set(graph["qwen2vl_jax"])
    packages = _package_graph(graph)
    assert {"kernels", "attention", "modeling", "processing", "cli", "server", "training"} <= set(packages)
    assert "attention" in packages["modeling"] and "server" in packages["cli"]


def test_no_module_is_on_an_import_cycle():
    graph = _graph()
    cycles = _on_cycles(graph)
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_no_package_is_on_an_import_cycle():
    packages = _package_graph(_graph())
    cycles = _on_cycles(packages)
    lines = [line for p in cycles for t, ls in sorted(packages[p].items()) if t in cycles for line in ls]
    assert not cycles, f"packages on an import cycle: {cycles}; their imports of each other:\n" + "\n".join(lines)


def test_packages_import_only_the_layers_below_them():
    packages = _package_graph(_graph())
    placed = [node for layer in LAYERS for node in layer]
    assert len(placed) == len(set(placed)), "a node is in two layers"
    assert not set(packages) - set(placed), f"place these in LAYERS: {sorted(set(packages) - set(placed))}"
    assert not set(placed) - set(packages), f"LAYERS names what does not exist: {sorted(set(placed) - set(packages))}"
    bad = _layer_violations(packages, LAYERS)
    assert not bad, "imports against the layers:\n" + "\n".join(bad)
    graph = _graph()
    for node, may in REACHES_ONLY.items():
        reached = {_node(t) for m in graph if _node(m) == node for t in _reaches(graph, m)} - {node}
        assert reached <= may, f"{node} reaches {sorted(reached - may)}: " + "; ".join(
            line for t in sorted(reached - may) for line in packages[node].get(t, []))
    assert {"attention", "kernels"} <= {_node(t) for m in graph if _node(m) == "modeling" for t in graph[m]}
    above = {node for layer in LAYERS[LAYERS.index({"cli"}):] for node in layer}
    importers = {p for p, targets in packages.items() if {"cli", "server"} & set(targets)}
    assert importers <= above, f"only the command line and `python -m` may import cli / server: {importers - above}"


def test_processing_never_imports_jax_or_torch():
    graph = _graph()
    reached = {m for m in graph if _node(m) == "processing"}
    reached |= {t for m in list(reached) for t in _reaches(graph, m)}
    assert "qwen2vl_jax.processing.processor" in reached and "qwen2vl_jax.hub" in reached
    found = []
    for module in sorted(reached):
        for node in ast.walk(ast.parse(_modules()[module].read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and not node.level and node.module else [])
            found += [f"{_where(module)}:{node.lineno} imports {n}" for n in names
                      if n.split(".")[0] in PROCESSING_MAY_NOT_IMPORT]
    assert not found, found
    # and at run time, through whatever the third-party packages import in turn
    code = ("import sys, qwen2vl_jax.processing.processor, qwen2vl_jax.processing.video, "
            "qwen2vl_jax.processing.image_io; "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(PROCESSING_MAY_NOT_IMPORT)!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout


def test_modules_re_export_nothing():
    """Only a package's `__init__` gathers names from its modules; a module holds what it defines (no shims)."""
    found = {}
    for path in _modules().values():
        if path.name != "__init__.py" and (problems := _shim_findings(path.read_text())):
            found[str(path.relative_to(ROOT))] = problems
    assert not found, found


def test_the_top_level_stays_small():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert "__init__.py" in top and len(top) <= MAX_TOP_LEVEL_MODULES, top
    namespace = [str(d.relative_to(ROOT)) for d in PACKAGE.rglob("*") if d.is_dir() and any(d.glob("*.py"))
                 and not (d / "__init__.py").is_file()]
    assert not namespace, f"directories of modules without an __init__.py: {namespace}"


def test_every_module_imports_in_a_fresh_interpreter():
    names = [n for n in _modules() if not n.endswith("__main__")]  # __main__ runs the CLI
    assert len(names) > 40

    def run(name):
        done = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)
        return name, done.returncode, done.stderr[-800:]

    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [(n, err) for n, rc, err in pool.map(run, names) if rc]
    assert not failures, failures


def test_long_files_are_noted():
    """Files over LONG_FILE lines are reported (a warning), not failed: a flag to look for a real seam."""
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert len(sizes) > 40
    long = {path: n for path, n in sorted(sizes.items()) if n > LONG_FILE}
    if long:
        warnings.warn(f"files over {LONG_FILE} lines (look for a real seam; never split with a shim): {long}",
                      stacklevel=1)


def test_architecture_doc_names_every_module_and_only_existing_ones():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:[a-z_]+/)*[a-z_0-9]+\.(?:py|cc|h))`", doc))
    files = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*") if p.suffix in (".py", ".cc", ".h")}
    assert len(files) > 40
    missing = {f for f in files if f not in named and not f.endswith("__main__.py")}
    assert not missing, f"docs/ARCHITECTURE.md does not describe {sorted(missing)}"
    stale = {f for f in named if f not in files and not (ROOT / f).exists()}
    assert not stale, f"docs/ARCHITECTURE.md names files that do not exist: {sorted(stale)}"


def test_code_comments_cite_nothing_outside_the_repository():
    pattern = re.compile(r"\.\./shared|reference §|TF457", re.IGNORECASE)
    assert pattern.search("see ../shared/notes") and pattern.search("Reference § 3")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.cc"),
                                                          *(ROOT / "tests").rglob("*.py")]
                 if p.name != "test_structure.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders


# The parity path an accelerator runs, end to end, with the native kernels off: the `xla` attention and XLA's own
# dots for every product (the bf16 decode gemv included). A representative subset of the parity suite (the logits,
# vision, generation and bf16 files) in a child process, since the kernels are chosen once per process.
XLA_PATH_TESTS = ["tests/modeling/test_model.py", "tests/modeling/test_vision.py",
                  "tests/generation/test_generation.py", "tests/modeling/test_bf16.py"]


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
