"""The walk-through notebooks (notebooks/*.ipynb) run top to bottom on the tiny demo model within the time budget,
and are committed without outputs.

Each notebook is executed in memory with nbclient (kernel `python3`, working directory notebooks/, the committed
file is never written), with QWEN2VL_NOTEBOOK_MODEL=tiny (`demo.tiny_checkpoint()`, built once and cached under
~/.cache/qwen2vl_jax/demo, shared by every notebook) and MPLBACKEND=Agg. A failing cell raises nbclient's
`CellExecutionError` (the cell, its traceback and, as a note, the notebook's name). Notebooks are picked up by glob,
so a new one is tested as soon as it lands.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {"01_architecture_tour.ipynb", "02_mrope_positions.ipynb", "05_lora_finetune.ipynb"}
BUDGET_S = 90.0  # the wall-time budget per notebook on 2 CPU cores, kernel start and imports included
CELL_TIMEOUT_S = 90  # a hung cell fails the test instead of the run


@pytest.fixture
def kernel_env(monkeypatch):
    """The kernel inherits this process's environment: the tiny model, a non-interactive matplotlib, no Hub, and
    this checkout's package first on the path."""
    monkeypatch.setenv("QWEN2VL_NOTEBOOK_MODEL", "tiny")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))


def run_notebook(nb, name: str) -> float:
    """Execute `nb` in place (outputs land in the in-memory copy only); returns the wall time in seconds."""
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    t0 = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as e:
        e.add_note(f"in notebook {name}")
        raise
    return time.perf_counter() - t0


def test_expected_notebooks_present():
    assert EXPECTED <= set(NOTEBOOKS), f"missing notebooks: {sorted(EXPECTED - set(NOTEBOOKS))}"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_committed_clean(name):
    """Committed notebooks carry no outputs or execution counts, and follow the conventions (a markdown title cell;
    the first code cell reads the model from QWEN2VL_NOTEBOOK_MODEL)."""
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    dirty = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not dirty, (f"{name}: cells {dirty} carry outputs or execution counts; clear them before committing "
                       "(notebooks/README.md)")
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert "QWEN2VL_NOTEBOOK_MODEL" in code[0].source


def test_failing_cell_fails_the_run(kernel_env):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_code_cell("assert x == 2, 'the notebook broke'"),
                                         nbformat.v4.new_code_cell("never = True")])
    with pytest.raises(CellExecutionError, match="the notebook broke") as info:
        run_notebook(nb, "broken.ipynb")
    assert "in notebook broken.ipynb" in getattr(info.value, "__notes__", [])
    assert nb.cells[2].execution_count is None  # execution stops at the failing cell


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, kernel_env):
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    before = {p.name for p in NOTEBOOK_DIR.iterdir()}
    wall = run_notebook(nb, name)
    print(f"{name}: {wall:.1f} s")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)  # every cell ran
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    # (a new .ipynb is a notebook landing, not one this run wrote: the notebooks write under temp dirs only)
    left = sorted(n for n in {p.name for p in NOTEBOOK_DIR.iterdir()} - before if not n.endswith(".ipynb"))
    assert not left, f"{name} left files in notebooks/: {left}"
    assert wall < BUDGET_S, f"{name} took {wall:.1f} s, over the {BUDGET_S:.0f} s budget"
