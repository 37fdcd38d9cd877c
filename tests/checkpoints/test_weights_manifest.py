"""weights/manifest.json (the released checkpoints) is what weights/make_manifest.py derives from the presets, its
README table agrees with it, and `qwen2vl-jax info` names the release a config.json matches, the closest one with
the fields that differ, or none."""

import dataclasses
import importlib.util
import json
import math
import struct
from pathlib import Path

import pytest

from qwen2vl_jax import cli
from qwen2vl_jax.checkpoints.keymap import hf_layout
from qwen2vl_jax.cli import releases
from qwen2vl_jax.modeling.config import PRESETS
from qwen2vl_jax.modeling.model import Qwen2VL
from qwen2vl_jax.modeling.parameters import abstract_model, checkpoint_shapes

WEIGHTS = Path(__file__).resolve().parents[2] / "weights"
RELEASE_IDS = ["Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2-VL-7B-Instruct", "Qwen/Qwen2-VL-72B-Instruct",
               "Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-32B-Instruct",
               "Qwen/Qwen2.5-VL-72B-Instruct"]


def _make_manifest_module():
    spec = importlib.util.spec_from_file_location("make_manifest", WEIGHTS / "make_manifest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((WEIGHTS / "manifest.json").read_text())


def test_manifest_is_what_the_presets_give(manifest, tmp_path, monkeypatch):
    make = _make_manifest_module()
    built = make.build_manifest()  # the seven abstract models: once
    assert make.render(built) == (WEIGHTS / "manifest.json").read_text()
    assert [r["hub_id"] for r in manifest["releases"]] == RELEASE_IDS
    # the published sizes (the model cards' parameter counts)
    totals = {r["hub_id"]: r["parameters"]["total"] for r in manifest["releases"]}
    assert totals["Qwen/Qwen2-VL-2B-Instruct"] == 2_208_985_600
    assert totals["Qwen/Qwen2-VL-7B-Instruct"] == 8_291_375_616
    assert totals["Qwen/Qwen2.5-VL-7B-Instruct"] == 8_292_166_656
    assert totals["Qwen/Qwen2.5-VL-3B-Instruct"] == 3_754_622_976
    for r in manifest["releases"]:
        p = r["parameters"]
        assert p["total"] == p["visual"] + p["language_model"] + p["lm_head"]
        assert (p["lm_head"] == 0) is r["tie_word_embeddings"]
        assert r["family"] == ("qwen2_5_vl" if "2.5" in r["hub_id"] else "qwen2_vl")
        assert r["size"] in r["hub_id"] and PRESETS[r["preset"]]().model_type == r["family"]
    # --check: 0 on the committed file, 1 on a stale one; writing is atomic (no temporary left behind)
    monkeypatch.setattr(make, "build_manifest", lambda: built)
    assert make.main(["--check"]) == 0
    stale = tmp_path / "manifest.json"
    stale.write_text("{}\n")
    assert make.main(["--check", "--out", str(stale)]) == 1
    assert make.main(["--out", str(stale)]) == 0 and make.main(["--check", "--out", str(stale)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_readme_table_agrees_with_the_manifest(manifest):
    rows = [line for line in (WEIGHTS / "README.md").read_text().splitlines() if line.startswith("| Qwen/")]
    assert len(rows) == len(manifest["releases"])
    for row, r in zip(rows, manifest["releases"]):
        cells = [c.strip() for c in row.strip("|").split("|")]
        t, v = r["text"], r["vision"]
        assert cells == [r["hub_id"], r["family"], r["size"], f"{r['parameters']['total']:,}",
                         "yes" if r["tie_word_embeddings"] else "no",
                         f"{t['num_hidden_layers']} x {t['hidden_size']}, {t['num_attention_heads']} / "
                         f"{t['num_key_value_heads']}, {t['intermediate_size']}",
                         f"{v['depth']} x {v['embed_dim']}, {v['mlp_dim']}"], row


def test_release_matching(manifest, tmp_path):
    for r in manifest["releases"]:  # every preset is its release, not the other family's of the same size
        m = releases.match_release(PRESETS[r["preset"]](), manifest)
        assert (m.status, m.hub_id, m.differences) == ("match", r["hub_id"], {})
    two_b = PRESETS["2b"]()
    wide_vocab = two_b.replace(text_config=dataclasses.replace(two_b.text_config, vocab_size=151937))
    m = releases.match_release(wide_vocab, manifest)
    assert m.status == "closest" and m.hub_id == "Qwen/Qwen2-VL-2B-Instruct"
    assert m.differences == {"text.vocab_size": {"config": 151937, "release": 151936}}
    assert m.line() == ("no exact match; closest Qwen/Qwen2-VL-2B-Instruct, which differs in text.vocab_size 151937 "
                        "(release: 151936)")
    m = releases.match_release(PRESETS["2.5-32b"]().with_layers(2, 2), manifest)
    assert m.status == "closest" and m.hub_id == "Qwen/Qwen2.5-VL-32B-Instruct"
    assert set(m.differences) == {"text.num_hidden_layers", "vision.depth"}
    far = PRESETS["72b"]().with_layers(2, 2).replace(tie_word_embeddings=True)  # 4 fields from the 72B
    far = far.replace(text_config=dataclasses.replace(far.text_config, vocab_size=151936))
    m = releases.match_release(far, manifest)
    assert (m.status, m.hub_id, m.line()) == ("none", None, "matches no released checkpoint")
    assert releases.match_release(PRESETS["2b"](), None).status == "unknown"
    broken = tmp_path / "manifest.json"
    broken.write_text('{"format_version": 1, "releases": [')
    m = releases.check_release(PRESETS["2b"](), broken)
    assert m.status == "unknown" and m.line().startswith("cannot check: the release manifest is unreadable")


def sparse_checkpoint(directory: Path, config) -> Path:
    """config.json and a bfloat16 model.safetensors whose header lists every tensor of `config` (Hub key layout,
    the loader's own names and shapes) and whose data is a hole: `info` reads headers only, so a 2B costs nothing."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict()))
    layout = hf_layout(config.vision_config)
    header, offset = {}, 0
    for path, shape in checkpoint_shapes(abstract_model(Qwen2VL, config)).items():
        stored = list(layout.file_shape(path, shape))
        size = 2 * math.prod(stored)
        header[layout.to_name(path)] = {"dtype": "BF16", "shape": stored, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return directory


def _info(directory, capsys, *extra):
    assert cli.main(["info", "--model", str(directory), "--quiet", *extra]) == 0
    return capsys.readouterr().out


def test_info_names_the_release(tmp_path, capsys, tiny_checkpoint):
    released = sparse_checkpoint(tmp_path / "2b", PRESETS["2b"]())
    out = _info(released, capsys)
    lines = out.splitlines()
    assert lines[0].startswith("model ") and lines[2].startswith("checkpoint   bfloat16, 4.42 GB")
    assert lines[1] == "release      matches Qwen/Qwen2-VL-2B-Instruct (qwen2_vl 2B, 2,208,985,600 parameters)"
    assert "parameters   2,208,985,600 total" in out
    data = json.loads(_info(released, capsys, "--json"))
    assert data["release"]["status"] == "match" and data["release"]["hub_id"] == "Qwen/Qwen2-VL-2B-Instruct"
    assert data["release"]["parameters"] == data["parameters"]["total"] == 2_208_985_600
    assert data["release"]["line"] == lines[1][len("release      "):]

    cut = sparse_checkpoint(tmp_path / "2b-1layer", PRESETS["2b"]().with_layers(1, 1))
    line = _info(cut, capsys).splitlines()[1]
    assert line == ("release      no exact match; closest Qwen/Qwen2-VL-2B-Instruct, which differs in "
                    "text.num_hidden_layers 1 (release: 28), vision.depth 1 (release: 32)")
    data = json.loads(_info(cut, capsys, "--json"))["release"]
    assert data["status"] == "closest" and data["differences"] == {
        "text.num_hidden_layers": {"config": 1, "release": 28}, "vision.depth": {"config": 1, "release": 32}}

    assert _info(tiny_checkpoint, capsys).splitlines()[1] == "release      matches no released checkpoint"
    data = json.loads(_info(tiny_checkpoint, capsys, "--json"))["release"]
    assert (data["status"], data["hub_id"], data["differences"]) == ("none", None, {})
