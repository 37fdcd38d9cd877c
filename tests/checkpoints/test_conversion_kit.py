"""conversion/: the verification kit a user runs on real checkpoints (verify.py, inspect_checkpoint.py), here on
tiny random checkpoints written by transformers. It is not a package: the CLI converts (`qwen2vl-jax convert`), the
kit checks."""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import helpers
from qwen2vl_jax import cli
from qwen2vl_jax.checkpoints import safetensors_io

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / "conversion"


def _script(name: str):
    """conversion/<name>.py as a module (loaded from its file: the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"conversion_kit_{name}", KIT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def verify():
    return _script("verify")


@pytest.fixture(scope="module")
def inspect_script():
    return _script("inspect_checkpoint")


def test_the_kit_is_scripts_not_a_package():
    assert not (KIT / "__init__.py").exists()
    assert sorted(p.name for p in KIT.iterdir() if p.suffix in (".py", ".md")) == ["README.md", "inspect_checkpoint.py",
                                                                                  "verify.py"]
    packages = re.search(r"packages=find_packages\(include=\[(.*?)\]\)", (ROOT / "setup.py").read_text()).group(1)
    assert "conversion" not in packages and "qwen2vl_jax" in packages
    readme = (KIT / "README.md").read_text()
    for script in ("verify", "inspect_checkpoint"):  # each documents its command lines; the README shows them
        doc = _script(script).__doc__
        assert f"python conversion/{script}.py" in doc and f"python conversion/{script}.py" in readme


def test_verify_round_trip_and_logits(verify, checkpoint_factory, tmp_path, capsys):
    src = checkpoint_factory(tied=True, layout="new", sharded=True)  # the >= 4.52 layout, tied, two shards
    out = tmp_path / "verify.json"
    assert verify.main([str(src), "--json", str(out), "--quiet", "--workdir", str(tmp_path / "work")]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    n = len(result["tensors"])
    assert n == 57 and result["passed"] and all(result["checks"].values())
    assert all(r["ours_identical"] and r["hf_identical"] for r in result["tensors"])
    assert result["transformers_loading"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    lg = result["logits"]
    assert lg["max_rel_diff"] <= 1e-5 and lg["top1_agreement"] == 1.0 and lg["vision_tokens"] > 0
    assert lg["tolerance"] == 1e-4 and lg["image"].startswith("scikit-image astronaut")
    assert f"{n}/{n} bit-identical (Hub key layout)" in text and text.rstrip().endswith("RESULT: PASS")
    assert f"max|Δ|/max|ref| {lg['max_rel_diff']:.3e} (tolerance 0.0001)" in text
    assert list((tmp_path / "work").iterdir()) == []  # the temporary copies are gone
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the JSON was renamed into place


def test_verify_fails_past_the_tolerance_and_refuses_bad_input(verify, tokenizer_dir, tmp_path, photos, capsys):
    src = helpers.build_checkpoint_25(tmp_path / "tiny-2.5", tokenizer_dir=tokenizer_dir)
    photo = tmp_path / "coffee.png"
    photos["coffee"].save(photo)
    code = verify.main([str(src), "--quiet", "--image", str(photo), "--prompt", "Colours?", "--tol", "1e-12"])
    text = capsys.readouterr().out
    assert code == 1 and text.rstrip().endswith("RESULT: FAIL")
    rows = dict(re.findall(r"^  (HF -> ours, every tensor|ours -> HF, every tensor|logits \(float32\))\s+(\S+)",
                           text, re.M))
    assert rows == {"HF -> ours, every tensor": "ok", "ours -> HF, every tensor": "ok", "logits (float32)": "FAIL"}
    assert "(qwen2_5_vl, 81 tensors)" in text and "coffee.png, 'Colours?'" in text

    assert verify.main([str(tmp_path / "missing"), "--quiet"]) == 2
    assert "not found" in capsys.readouterr().err
    assert verify.main([str(src), "--image", str(tmp_path / "nope.jpg")]) == 2
    assert "cannot read --image" in capsys.readouterr().err


def test_inspect_lists_layout_keys_and_problems(inspect_script, checkpoint_factory, tmp_path, capsys):
    hub = checkpoint_factory(tied=False)
    assert inspect_script.main([str(hub)]) == 0
    out = capsys.readouterr().out
    assert "layout       HF, Hub key layout" in out and "files        1 safetensors file" in out
    assert re.search(r"^  model\.layers\.1\.self_attn\.q_proj\.weight\s+float32\s+\[64, 64\]$", out, re.M)
    assert re.search(r"^  visual\.patch_embed\.proj\.weight\s+float32\s+\[32, 3, 2, 14, 14\]$", out, re.M)
    assert "58 parameters expected" in out and out.rstrip().endswith("RESULT: OK, every parameter present once "
                                                                     "with the expected shape")

    new = checkpoint_factory(tied=True, layout="new", sharded=True)
    assert inspect_script.main([str(new), "--no-keys"]) == 0
    out = capsys.readouterr().out
    assert "transformers >= 4.52 key layout" in out and "2 safetensors files" in out
    assert "model.language_model.embed_tokens" not in out  # --no-keys

    ours = tmp_path / "ours"
    assert cli.main(["convert", "hf-to-flax", str(hub), str(ours), "--quiet"]) == 0
    capsys.readouterr()
    assert inspect_script.main([str(ours)]) == 0
    out = capsys.readouterr().out
    assert "qwen2vl_jax format" in out and re.search(r"^  visual\.patch_embed\.proj\.weight\s+float32\s+\[32, 1176\]$",
                                                      out, re.M)

    # against a preset: the tiny model is no 2B (and a stored head is ignored for the tied 2B, as the loader does)
    assert inspect_script.main([str(hub), "--preset", "2b", "--no-keys"]) == 1
    out = capsys.readouterr().out
    assert "against      preset 2b: qwen2_vl, 28 layers x 1536" in out
    assert "missing (672):\n  model.layers.2.input_layernorm.weight [1536]\n" in out  # with the expected shape
    assert "  ... and 472 more" in out  # 200 listed per kind, as the loader's report
    assert "  model.embed_tokens.weight [151936, 64], expected [151936, 1536]" in out
    assert re.search(r"^ignored \(1\):\n  lm_head\.weight ", out, re.M)
    assert "RESULT: MISMATCH" in out and "wrong shape" in out.splitlines()[-1]


def test_inspect_reports_each_kind_of_problem(inspect_script, tiny_checkpoint, tmp_path, capsys):
    bad = shutil.copytree(tiny_checkpoint, tmp_path / "bad")
    tensors = safetensors_io.load_file(bad / "model.safetensors")
    del tensors["model.norm.weight"]
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:, :32].copy()
    tensors["model.layers.9.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"]
    safetensors_io.save_file(tensors, bad / "model.safetensors")
    assert inspect_script.main([str(bad), "--no-keys"]) == 1
    out = capsys.readouterr().out
    assert "unexpected (1):\n  model.layers.9.mlp.up_proj.weight [64, 96]" in out
    assert "wrong shape (1):\n  model.layers.0.mlp.up_proj.weight [96, 32], expected [96, 64]" in out
    assert "missing (1):\n  model.norm.weight [64]" in out
    assert out.splitlines()[-1] == "RESULT: MISMATCH, 1 unexpected, 1 wrong shape, 1 missing"

    assert inspect_script.main([str(tmp_path / "nowhere")]) == 2
    assert inspect_script.main([str(tiny_checkpoint), "--preset", "9b"]) == 2
    assert "unknown preset '9b'" in capsys.readouterr().err


def test_scripts_run_standalone(tiny_checkpoint):
    """As a user runs them: `python conversion/inspect_checkpoint.py` from any directory (the folder Python puts
    first on sys.path, here the kit's own)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = str(KIT / "inspect_checkpoint.py")
    run = subprocess.run([sys.executable, script, str(tiny_checkpoint), "--no-keys"], cwd=KIT,
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.rstrip().endswith("RESULT: OK, every parameter present once with the expected shape")
    for script in ("verify", "inspect_checkpoint"):
        run = subprocess.run([sys.executable, str(KIT / f"{script}.py"), "--help"], capture_output=True, text=True,
                             timeout=120, env=env)
        assert run.returncode == 0 and f"python conversion/{script}.py" in run.stdout, run.stderr
