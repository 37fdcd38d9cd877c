"""benchmarks/bench_gpu.py must not rot on machines without a GPU: its `--dry-run` runs the whole script (HF
PyTorch and ours, the table, the JSON) on the CPU with the tiny model, once on one device and once with our
parameters on a 2-device mesh (`--mesh model=2` over two virtual XLA:CPU devices)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_gpu.py"
FIGURES = ("vision s", "TTFT s", "decode tok/s")
FIGURE_KEYS = ("vision_s", "ttft_s", "decode_tok_s")
ROW = re.compile(r"^tiny\s+1\s+(vision s|TTFT s|decode tok/s)\s+(\S+)\s+(\S+)\s+(\S+)\s*$")


def _run(out: Path, *extra: str, devices: int = 1) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    if devices > 1:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        env["QWEN2VL_JAX_CPU_KERNELS"] = "0"  # the native CPU kernels have no partitioning rule
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _check_table_and_json(stdout: str, out: Path) -> dict:
    seen = {}
    for line in stdout.splitlines():
        m = ROW.match(line)
        if m:
            seen[m.group(1)] = tuple(float(v) for v in m.group(2, 3, 4))
    assert set(seen) == set(FIGURES), stdout
    for fig, values in seen.items():
        assert all(math.isfinite(v) and v > 0 for v in values), (fig, values)
    assert "our compile s" in stdout and "DRY RUN" in stdout

    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and len(rows) == 1
    row = rows[0]
    assert row["preset"] == "tiny" and row["batch"] == 1 and row["new_tokens"] == 4 and row["image_side"] == 56
    assert row["jax_backend"] == "cpu" and row["hf_device"] == "cpu"
    for key in FIGURE_KEYS:
        for side in ("ours", "hf"):
            v = row[f"{side}_{key}"]
            assert isinstance(v, float) and math.isfinite(v) and v > 0, (side, key, v)
    assert math.isfinite(row["ours_compile_s"]) and row["ours_compile_s"] > 0
    return row


def test_dry_run_one_device_then_mesh(tmp_path):
    out = tmp_path / "gpu.json"
    stdout = _run(out)
    row = _check_table_and_json(stdout, out)
    assert row["mesh"] is None
    assert row["param_devices"] == 1 and row["param_max_split"] == 1 and row["params_split"] == 0
    assert "ours: one cpu device" in stdout

    out2 = tmp_path / "gpu_mesh.json"
    stdout = _run(out2, "--mesh", "model=2", devices=2)
    row = _check_table_and_json(stdout, out2)
    assert row["mesh"] == {"data": 1, "fsdp": 1, "model": 2}
    # our parameters span both devices and (heads, MLP, vocabulary) are split in two; HF stays on one device
    assert row["param_devices"] == 2 and row["param_max_split"] == 2
    assert 0 < row["params_split"] < row["params_total"]
    assert "mesh model=2" in stdout and "HF: one cpu device" in stdout
