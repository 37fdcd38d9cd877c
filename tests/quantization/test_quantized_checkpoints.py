"""Quantized checkpoints (`save_pretrained` of a quantized model, `convert --quantize`, `from_pretrained` of the
result), `info --quantize` and QLoRA (`finetune --quantize`).

The oracles are independent of the code under test: the stored files are read with the `safetensors` package's own
NumPy reader, int8 / int4 are dequantized by a NumPy function written here from the format's definition (int8:
`q[o, i] * scale[o]`; int4: two signed nibbles a byte, low first, `q[o, i] * scale[o, i // group]`), and the QLoRA
adapter is checked in PEFT over transformers' model holding those dequantized weights.

The tiny model's widths (64, 96) are multiples of 32, not of int4's default 128: its int4 checkpoints use groups of
32, which config.json stores (`group_size`) and loading honours.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as st_load_file

import helpers
from qwen2vl_jax import Qwen2VLForConditionalGeneration, cli
from qwen2vl_jax.checkpoints.keymap import CheckpointError
from qwen2vl_jax.checkpoints.safetensors_io import load_file, save_file
from qwen2vl_jax.modeling.parameters import model_params
from qwen2vl_jax.quantization import DEFAULT_TARGETS, QuantizationError, quantize, quantized_linears

GROUP = {"int8": None, "int4": 32}  # int4 in groups of 32 on the tiny model
TOL = 1e-5


# ------------------------------------------------------------------------------------------ the definition
def dequantize_reference(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The fp32 weight a stored tensor pair means, from the format's definition (NumPy, written here)."""
    scale = np.asarray(scale, np.float32)
    if q.dtype == np.int8:
        return q.astype(np.float32) * scale[:, None]
    assert q.dtype == np.uint8
    low, high = (q & 0xF).astype(np.int16), (q >> 4).astype(np.int16)
    low, high = np.where(low >= 8, low - 16, low), np.where(high >= 8, high - 16, high)
    values = np.stack([low, high], axis=-1).reshape(q.shape[0], -1).astype(np.float32)  # low nibble first
    O, I = values.shape
    G = scale.shape[1]
    return (values.reshape(O, G, I // G) * scale[:, :, None]).reshape(O, I)


def arrays(model) -> dict[str, np.ndarray]:
    return {path: np.asarray(p[...]) for path, p in model_params(model).items()}


def assert_identical(got: dict, want: dict) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:5]
    for path in want:
        assert got[path].dtype == want[path].dtype, (path, got[path].dtype, want[path].dtype)
        assert np.array_equal(got[path], want[path]), path


def unstacked(model) -> dict[str, np.ndarray]:
    """A `scan_layers` model's arrays under per-layer paths (`layers.self_attn...[i]` -> `layers.{i}.self_attn...`)."""
    from qwen2vl_jax.modeling.parameters import checkpoint_params

    return {path: np.asarray(p[...] if i is None else p[...][i]) for path, (p, i) in checkpoint_params(model).items()}


def config_of(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def quantized(tiny_checkpoint):
    """The tiny model quantized in memory, per mode (int4 in groups of 32)."""
    return {mode: quantize(Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint), mode,
                           group=GROUP[mode] or 128) for mode in ("int8", "int4")}


@pytest.fixture(scope="module")
def saved(quantized, tmp_path_factory):
    """`save_pretrained` of each quantized model in each format: `saved[mode, fmt]`."""
    root = tmp_path_factory.mktemp("quantized_checkpoints")
    out = {}
    for mode, model in quantized.items():
        for fmt in ("hf", "flax"):
            out[mode, fmt] = root / f"{mode}-{fmt}"
            model.save_pretrained(out[mode, fmt], format=fmt)
    return out


def masked(logits, inputs) -> np.ndarray:
    return np.asarray(logits)[np.asarray(inputs["attention_mask"]).astype(bool)]  # pad slots hold garbage


# ------------------------------------------------------------------------------------- the stored format
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("fmt", ["hf", "flax"])
def test_the_stored_format(saved, quantized, mode, fmt):
    """Integers under the weight's own name (I8, or U8 for packed int4), fp32 scales beside them
    (`<module>.weight_scale` in the HF layout, `<module>.scale` in ours), and a quantization_config naming exactly
    the quantized modules in the layout's own names; every other tensor as it was."""
    d = saved[mode, fmt]
    cfg = config_of(d)["quantization_config"]
    n_layers = quantized[mode].config.text_config.num_hidden_layers
    hf = fmt == "hf"
    decoder = [f"{'model' if hf else 'language_model'}.layers.{i}.{kind}" for i in range(n_layers)
               for kind in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj",
                            "self_attn.q_proj", "self_attn.v_proj")]
    heads = ["lm_head", "model.embed_tokens" if hf else "language_model.embed_tokens"]
    assert cfg["quant_method"] == "qwen2vl_jax" and cfg["version"] == 1 and cfg["mode"] == mode
    assert cfg["group_size"] == GROUP[mode]
    assert sorted(cfg["modules"]) == sorted(decoder + heads)
    assert config_of(d)["torch_dtype"] == "float32"  # the float tensors' dtype (not "mixed")
    tensors = st_load_file(str(d / "model.safetensors"))
    for module in cfg["modules"]:
        q, scale = tensors[f"{module}.weight"], tensors[f"{module}.weight_scale" if hf else f"{module}.scale"]
        assert q.dtype == (np.int8 if mode == "int8" else np.uint8) and scale.dtype == np.float32, module
        O, stored_in = q.shape
        I = stored_in if mode == "int8" else 2 * stored_in
        assert scale.shape == ((O,) if mode == "int8" else (O, I // GROUP[mode])), module
    scales = [k for k in tensors if k.endswith(("weight_scale", ".scale"))]
    assert len(scales) == len(cfg["modules"])
    floats = {k for k, v in tensors.items() if v.dtype == np.float32} - set(scales)
    assert floats and not any(k.endswith(".weight") and k[: -len(".weight")] in cfg["modules"] for k in floats)
    assert f"{'model' if hf else 'language_model'}.layers.0.self_attn.q_proj.bias" in floats  # biases stay float


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("fmt", ["hf", "flax"])
def test_a_quantized_checkpoint_reloads_to_identical_arrays(saved, quantized, two_rows, mode, fmt):
    """Every parameter identical (dtypes included), one device and scan_layers; the reloaded model's logits are the
    in-memory quantized model's."""
    want = arrays(quantized[mode])
    model = Qwen2VLForConditionalGeneration.from_pretrained(saved[mode, fmt])
    assert_identical(arrays(model), want)
    assert set(quantized_linears(model)) == set(quantized_linears(quantized[mode]))
    ref = np.asarray(quantized[mode](**two_rows).logits)
    got = np.asarray(model(**two_rows).logits)
    assert np.array_equal(masked(got, two_rows), masked(ref, two_rows))
    stacked = Qwen2VLForConditionalGeneration.from_pretrained(saved[mode, fmt], scan_layers=True)
    assert_identical(unstacked(stacked), want)
    assert len(quantized_linears(stacked)) == 7 + 2  # the stacked decoder projections, lm_head, embed_tokens
    err = helpers.rel_err(masked(stacked(**two_rows).logits, two_rows), masked(ref, two_rows))
    helpers.record(f"quantized/{mode}/{fmt}/reload-scan-logits", rel_err=err)
    assert err <= TOL, err
    # and a scan_layers model saves per layer, to the same checkpoint
    again = Path(str(saved[mode, fmt]) + "-from-scan")
    stacked.save_pretrained(again, format=fmt)
    assert config_of(again)["quantization_config"] == config_of(saved[mode, fmt])["quantization_config"]
    assert_identical(arrays(Qwen2VLForConditionalGeneration.from_pretrained(again)), want)


MESH_CHILD = """
import json, sys
import jax, numpy as np
from qwen2vl_jax.runtime import use_exact_cpu_fp32_matmuls
use_exact_cpu_fp32_matmuls()
jax.config.update("jax_default_matmul_precision", "highest")
from qwen2vl_jax import sharding
from qwen2vl_jax.modeling.parameters import model_params
from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration
assert len(jax.devices()) == 4
args = json.loads(sys.argv[1])
x = dict(np.load(args["inputs"]))
out = {}
for name, path in args["checkpoints"].items():
    one = Qwen2VLForConditionalGeneration.from_pretrained(path)
    for axes in ({"model": 4}, {"data": 2, "model": 2}):
        tp = Qwen2VLForConditionalGeneration.from_pretrained(path, mesh=sharding.make_mesh(**axes))
        a, b = model_params(one), model_params(tp)
        up = tp.language_model.layers[0].mlp.up_proj
        mask = x["attention_mask"].astype(bool)
        ref, got = np.asarray(one(**x).logits)[mask], np.asarray(tp(**x).logits)[mask]
        out[f"{name}/{axes}"] = {
            "identical": sorted(a) == sorted(b) and all(
                a[k][...].dtype == b[k][...].dtype and np.array_equal(np.asarray(a[k][...]), np.asarray(b[k][...]))
                for k in a),
            "weight_spec": list(up.weight[...].sharding.spec), "scale_spec": list(up.scale[...].sharding.spec),
            "scale_rows_per_device": up.scale[...].addressable_shards[0].data.shape[0],
            "rel": float(np.abs(got - ref).max() / np.abs(ref).max())}
print(json.dumps(out))
"""


def test_a_quantized_checkpoint_loads_onto_a_mesh(saved, two_rows, tmp_path):
    """On 4 (virtual CPU) devices: the same integers and scales as one device, each scale sharded with its
    weight's output axis, and the same logits."""
    import os
    import subprocess
    import sys

    np.savez(tmp_path / "inputs.npz", **two_rows)
    args = {"inputs": str(tmp_path / "inputs.npz"),
            "checkpoints": {"int8-hf": str(saved["int8", "hf"]), "int4-flax": str(saved["int4", "flax"])}}
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
    done = subprocess.run([sys.executable, "-c", MESH_CHILD, json.dumps(args)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(out) == 4
    for case, r in out.items():
        assert r["identical"], case
        assert r["weight_spec"][0] == r["scale_spec"][0] == "model", (case, r)
        model_axis = 4 if "'data'" not in case else 2
        assert r["scale_rows_per_device"] * model_axis == 96, (case, r)  # the tiny MLP's 96 rows, split
        helpers.record(f"quantized/mesh/{case}", max_rel=r["rel"])
        assert r["rel"] <= TOL, (case, r)


def test_int4_on_real_widths_round_trips(slice_2b_checkpoint, tmp_path):
    """int4 in its default groups of 128 on the real 2B widths (tied: the embedding is the head), quantized as it
    loads, saved and reloaded identical."""
    model = Qwen2VLForConditionalGeneration.from_pretrained(slice_2b_checkpoint, quantization="int4")
    model.save_pretrained(tmp_path / "q", format="flax")
    cfg = config_of(tmp_path / "q")["quantization_config"]
    assert cfg["group_size"] == 128 and "language_model.embed_tokens" in cfg["modules"] and "lm_head" not in cfg[
        "modules"]
    assert_identical(arrays(Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "q")), arrays(model))


def test_loading_quantizes_nothing_and_reads_the_stored_integers(saved, monkeypatch):
    """No re-quantization: with every quantizing function patched to raise, a quantized checkpoint loads (one
    device, scan_layers, and with `quantization=` repeating its mode), and the loaded integers and scales are the
    file's bytes (read by the safetensors package)."""
    import qwen2vl_jax.checkpoints.convert as convert_mod
    import qwen2vl_jax.quantization.apply as apply_mod
    import qwen2vl_jax.quantization.formats as formats_mod
    from qwen2vl_jax.lora import our_linear_path

    def refuse(*args, **kwargs):
        raise AssertionError("a stored checkpoint was quantized again")

    for module, names in ((formats_mod, ("quantize_weight", "quantize_int8", "quantize_int4")),
                          (apply_mod, ("quantize_weight",)), (convert_mod, ("quantize_weight",))):
        for name in names:
            monkeypatch.setattr(module, name, refuse)
    for mode in ("int8", "int4"):
        d = saved[mode, "hf"]
        stored = st_load_file(str(d / "model.safetensors"))
        for kwargs in ({}, {"quantization": mode}, {"scan_layers": True}):
            model = Qwen2VLForConditionalGeneration.from_pretrained(d, **kwargs)
            got = unstacked(model) if kwargs.get("scan_layers") else arrays(model)
            for module in config_of(d)["quantization_config"]["modules"]:
                path = our_linear_path(module)
                for ours, theirs in ((f"{path}.weight", f"{module}.weight"), (f"{path}.scale",
                                                                              f"{module}.weight_scale")):
                    assert got[ours].dtype == stored[theirs].dtype and np.array_equal(got[ours], stored[theirs])
        # a copy between layouts copies the integers as stored, too
        out = convert_mod.convert(d, d.parent / f"{mode}-copied", format="flax", progress=False)
        assert out.quantization is not None and out.quantization.mode == mode


def test_bfloat16_applies_to_the_float_tensors_only(saved, quantized, tmp_path):
    """`dtype="bfloat16"` when loading, or when saving: the integers and the fp32 scales stay as stored."""
    want = arrays(quantized["int8"])
    model = Qwen2VLForConditionalGeneration.from_pretrained(saved["int8", "hf"], dtype="bfloat16")
    got = arrays(model)
    assert set(got) == set(want)
    for path, value in got.items():
        if path.endswith(".scale") or value.dtype == np.int8:
            assert value.dtype == want[path].dtype and np.array_equal(value, want[path]), path
        else:
            assert value.dtype == jnp.bfloat16 and np.array_equal(value, want[path].astype(jnp.bfloat16)), path
    assert model.dtype == jnp.bfloat16
    quantized["int8"].save_pretrained(tmp_path / "bf16", dtype="bfloat16")
    stored = load_file(tmp_path / "bf16" / "model.safetensors")
    kinds = {str(v.dtype) for k, v in stored.items() if not k.endswith("weight_scale") and v.dtype != np.int8}
    assert kinds == {"bfloat16"}
    assert all(v.dtype == np.float32 for k, v in stored.items() if k.endswith("weight_scale"))
    assert config_of(tmp_path / "bf16")["torch_dtype"] == "bfloat16"
    assert_identical(arrays(Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "bf16", dtype="bfloat16")),
                     got)


# --------------------------------------------------------------------------------------- convert --quantize
def test_convert_quantize_through_the_cli(tiny_checkpoint, tmp_path, capsys):
    """`convert hf-to-flax --quantize int8`: config.json's quantization_config, and its output loads to the arrays of
    `from_pretrained(src, quantization="int8")`; copying it to the HF layout keeps them; int4 with `--group-size`;
    another mode than stored, or a group size for int8, is one `error:` line."""
    int8 = tmp_path / "int8"
    assert cli.main(["convert", "hf-to-flax", str(tiny_checkpoint), str(int8), "--quantize", "int8", "--quiet"]) == 0
    assert "(16 modules in int8)" in capsys.readouterr().out
    cfg = config_of(int8)["quantization_config"]
    assert cfg["mode"] == "int8" and cfg["group_size"] is None and len(cfg["modules"]) == 16
    want = arrays(Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, quantization="int8"))
    assert_identical(arrays(Qwen2VLForConditionalGeneration.from_pretrained(int8)), want)
    assert json.loads((int8 / "qwen2vl_jax.json").read_text())["quantization"] == "int8"
    assert (int8 / "tokenizer.json").is_file()

    hf = tmp_path / "int8-hf"
    assert cli.main(["convert", "flax-to-hf", str(int8), str(hf), "--quiet"]) == 0  # copied as stored
    assert config_of(hf)["quantization_config"]["modules"][0].startswith(("model.", "lm_head"))
    assert_identical(arrays(Qwen2VLForConditionalGeneration.from_pretrained(hf)), want)
    capsys.readouterr()

    int4 = tmp_path / "int4"
    assert cli.main(["convert", "flax-to-hf", str(tiny_checkpoint), str(int4), "--quantize", "int4", "--group-size",
                     "32", "--quiet"]) == 0
    assert config_of(int4)["quantization_config"]["group_size"] == 32
    assert_identical(arrays(Qwen2VLForConditionalGeneration.from_pretrained(int4)),
                     arrays(quantize(Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint), "int4",
                                     group=32)))
    capsys.readouterr()

    for argv, message in (
            (["flax-to-hf", str(int8), str(tmp_path / "x"), "--quantize", "int4"],
             "is stored quantized to int8; it cannot be loaded as int4"),
            (["hf-to-flax", str(tiny_checkpoint), str(tmp_path / "y"), "--quantize", "int8", "--group-size", "32"],
             "group_size=32 applies to int4 only"),
            (["hf-to-flax", str(tiny_checkpoint), str(tmp_path / "z"), "--quantize", "int4"],
             "int4 groups of 128 need an input width that is a multiple of it, got 64")):
        assert cli.main(["convert", *argv, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert not any((tmp_path / n).exists() for n in "xyz")


def test_convert_quantizes_the_cast_weight(tiny_checkpoint, tmp_path):
    """`--dtype bfloat16 --quantize int8` quantizes the bf16 weight, as `from_pretrained(dtype="bfloat16",
    quantization="int8")` does, and writes the other tensors in bf16."""
    from qwen2vl_jax.checkpoints.convert import hf_to_flax

    hf_to_flax(tiny_checkpoint, tmp_path / "q", dtype="bfloat16", quantization="int8", progress=False)
    want = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype="bfloat16", quantization="int8")
    assert_identical(arrays(Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "q", dtype="bfloat16")),
                     arrays(want))


# ------------------------------------------------------------------------------------------- bad requests
def test_another_mode_than_stored_is_one_clear_error(saved, capsys):
    with pytest.raises(QuantizationError, match=r"int8-hf is stored quantized to int8; it cannot be loaded as int4"):
        Qwen2VLForConditionalGeneration.from_pretrained(saved["int8", "hf"], quantization="int4")
    assert cli.main(["generate", "--model", str(saved["int8", "hf"]), "--prompt", "Hi", "--max-new-tokens", "2",
                     "--quantize", "int4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "is stored quantized to int8; it cannot be loaded as int4" in err and len(err.splitlines()) == 1


def _corrupt(src: Path, dst: Path, tensors=None, config=None) -> Path:
    shutil.copytree(src, dst)
    if tensors is not None:
        data = load_file(dst / "model.safetensors")
        save_file(tensors(data) or data, dst / "model.safetensors")
    if config is not None:
        cfg = config_of(dst)
        config(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


Q = "model.layers.0.self_attn.q_proj"
UP = "model.layers.1.mlp.up_proj"


@pytest.mark.parametrize("mode, tensors, config, message", [
    ("int8", lambda t: t.pop(f"{Q}.weight_scale") is None, None,
     rf"missing: {Q}\.weight_scale \[64\]"),
    ("int8", lambda t: t.update({f"{UP}.weight": t[f"{UP}.weight"].astype(np.float32)}), None,
     rf"wrong dtype: {UP}\.weight is float32, expected int8 \(the integers of a quantized module\)"),
    ("int4", lambda t: t.update({f"{UP}.weight_scale": t[f"{UP}.weight_scale"].astype(np.float16)}), None,
     rf"wrong dtype: {UP}\.weight_scale is float16, expected float32 \(the scales of a quantized module\)"),
    ("int4", lambda t: t.update({f"{Q}.weight_scale": t[f"{Q}.weight_scale"][:, :1].copy()}), None,
     rf"wrong shape: {Q}\.weight_scale expected \[64, 2\], found \[64, 1\]"),
    ("int4", lambda t: t.update({f"{Q}.weight": np.zeros((64, 64), np.uint8)}), None,
     rf"wrong shape: {Q}\.weight expected \[64, 32\], found \[64, 64\]"),
    ("int8", None, lambda c: c.update(mode="int3"), r"unknown mode 'int3'"),
    ("int8", None, lambda c: c.update(version=2), r"version 2 was written by a newer qwen2vl_jax"),
    ("int8", None, lambda c: c.update(quant_method="fp8"), r"quant_method 'fp8' is not 'qwen2vl_jax'"),
    ("int8", None, lambda c: c.update(quant_method="gptq"),  # read as GPTQ's quantization_config: no group_size
     r"config\.json: quantization_config: group_size must be a positive integer or -1, got None"),
    ("int4", None, lambda c: c.update(group_size=None), r"int4 needs group_size"),
    ("int8", None, lambda c: c["modules"].remove(Q), rf"unexpected: {Q}\.weight_scale"),
    ("int8", None, lambda c: c["modules"].append("model.layers.7.mlp.up_proj"),
     r"config\.json: quantization_config names \['language_model\.layers\.7\.mlp\.up_proj'\], which this model "
     r"has no quantizable Linear"),
])
def test_a_corrupted_quantized_checkpoint_fails_by_name(saved, tmp_path, mode, tensors, config, message):
    d = _corrupt(saved[mode, "hf"], tmp_path / "bad", tensors, config)
    with pytest.raises((CheckpointError, QuantizationError), match=message) as info:
        Qwen2VLForConditionalGeneration.from_pretrained(d)
    # the problem alone (listed problems: a header line, then one line each; a module dropped from the config
    # leaves its scales unexpected and its integers not floating point)
    assert len(str(info.value).splitlines()) <= 3


# ----------------------------------------------------------------------------------------------------- info
def _targeted_weights(checkpoint: Path) -> tuple[dict[str, tuple[int, int]], int]:
    """({Hub name: [O, I]} of the weights DEFAULT_TARGETS names, the checkpoint's parameter count)."""
    from qwen2vl_jax.checkpoints.keymap import hf_to_ours

    tensors = st_load_file(str(checkpoint / "model.safetensors"))
    pattern = re.compile(DEFAULT_TARGETS)
    return {k: v.shape for k, v in tensors.items() if k.endswith(".weight") and pattern.search(
        hf_to_ours(k)[: -len(".weight")])}, sum(v.size for v in tensors.values())


def test_info_shows_the_quantized_bytes(tiny_checkpoint, saved, capsys):
    targeted, total = _targeted_weights(tiny_checkpoint)
    weights = sum(o * i for o, i in targeted.values())
    int8_bytes = sum(o * i + 4 * o for o, i in targeted.values())
    int4_bytes = sum(o * i // 2 + 4 * o * (i // 32) for o, i in targeted.values())
    assert cli.main(["info", "--model", str(tiny_checkpoint), "--quantize", "int8", "--json"]) == 0
    q = json.loads(capsys.readouterr().out)["quantization"]
    assert q == {"mode": "int8", "group_size": None, "stored": False, "modules": 16, "quantized_weights": weights,
                 "quantized_bytes": int8_bytes, "bytes_float32": int8_bytes + 4 * (total - weights),
                 "bytes_bfloat16": int8_bytes + 2 * (total - weights)}
    assert cli.main(["info", "--model", str(tiny_checkpoint), "--quantize", "int8"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("quantized"))
    assert f"int8 (--quantize): 16 modules, {weights:,} weights in {int8_bytes / 1e9:.3g} GB" in line
    # a stored int4 checkpoint: its own quantization, groups of 32
    assert cli.main(["info", "--model", str(saved["int4", "hf"]), "--json"]) == 0
    q = json.loads(capsys.readouterr().out)["quantization"]
    assert (q["mode"], q["group_size"], q["stored"], q["quantized_bytes"]) == ("int4", 32, True, int4_bytes)
    assert cli.main(["info", "--model", str(saved["int4", "hf"]), "--quantize", "int8"]) == 2
    assert "stored quantized to int4" in capsys.readouterr().err
    assert cli.main(["info", "--model", str(tiny_checkpoint), "--json"]) == 0  # no quantization: no entry
    assert "quantization" not in json.loads(capsys.readouterr().out)
    # `plan` counts a stored checkpoint as stored, and `--dtype auto`'s memory check its integers as stored
    from qwen2vl_jax.cli.common import weight_elements

    assert cli.main(["plan", "--model", str(saved["int4", "hf"]), "--context", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"]["bytes_total"] == q["bytes_bfloat16"]
    assert weight_elements(saved["int4", "hf"]) == (total - weights, int4_bytes)


# ---------------------------------------------------------------------------------------------------- QLoRA
def test_finetune_quantize_trains_lora_over_a_quantized_base(tiny_checkpoint, photos, tmp_path, capsys, monkeypatch):
    """`finetune --quantize int8`: the base loads quantized as it streams (from_pretrained's quantization=), a
    couple of steps train the adapters only (B moves off zero), and the adapter is written in PEFT's format; full
    fine-tuning with --quantize is one error line."""
    from qwen2vl_jax import lora
    from qwen2vl_jax.checkpoints.safetensors_io import SafetensorsFile

    photos["rocket"].save(tmp_path / "rocket.png")
    row = {"messages": [{"role": "user", "content": [{"type": "image", "image": "rocket.png"},
                                                     {"type": "text", "text": "Describe the image."}]},
                        {"role": "assistant", "content": [{"type": "text", "text": "A red rocket."}]}]}
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(row) + "\n")
    loads = []
    original = Qwen2VLForConditionalGeneration.from_pretrained.__func__

    def spy(cls, source, **kwargs):
        model = original(cls, source, **kwargs)
        loads.append((kwargs.get("quantization"), len(quantized_linears(model))))
        return model

    monkeypatch.setattr(Qwen2VLForConditionalGeneration, "from_pretrained", classmethod(spy))
    out = tmp_path / "run"
    assert cli.main(["finetune", "--model", str(tiny_checkpoint), "--data", str(data), "--out", str(out),
                     "--lora-rank", "2", "--steps", "2", "--lr", "1e-3", "--warmup-ratio", "0", "--quantize", "int8",
                     "--max-pixels", str(16 * 28 * 28), "--quiet", "--json"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert loads == [("int8", 16)] and result["steps"] == 2
    assert json.loads((out / "finetune_config.json").read_text())["quantize"] == "int8"
    adapter = SafetensorsFile(out / "adapter" / lora.ADAPTER_WEIGHTS)
    b = [adapter.read(k) for k in adapter.keys() if "lora_B" in k]
    assert len(b) == 2 * 7 and all(np.abs(x).max() > 0 for x in b)
    monkeypatch.undo()
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, quantization="int8")
    assert len(lora.load_adapter(model, out / "adapter")) == 2 * 7
    assert cli.main(["finetune", "--model", str(tiny_checkpoint), "--data", str(data), "--out", str(tmp_path / "f"),
                     "--full", "--steps", "1", "--quantize", "int8", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "quantize trains LoRA adapters over frozen quantized weights" in err and len(err.splitlines()) == 1


def test_trainable_filters_never_select_integers_or_scales(quantized):
    from qwen2vl_jax.training import trainable_params

    for spec in ("all", "language_model", [r"q_proj"]):
        chosen = trainable_params(quantized["int4"], spec)
        assert chosen and not any(p.endswith(".scale") or not jnp.issubdtype(v.dtype, jnp.floating)
                                  for p, v in chosen.items()), spec
    assert "language_model.layers.0.self_attn.q_proj.bias" in trainable_params(quantized["int4"], [r"q_proj"])


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_adapter_loads_in_peft_over_the_dequantized_model(tiny_checkpoint, tmp_path, two_rows, mode):
    """The acceptance check: LoRA adapters (B non-zero) over our quantized model, saved with `save_adapter`, load
    with `peft.PeftModel.from_pretrained` over transformers' model whose quantized weights are replaced by the
    dequantized stored integers (NumPy, from the definition), and its logits equal ours within 1e-5 relative
    (fp32, eager attention); the same over the reloaded quantized checkpoint."""
    from peft import PeftModel

    from qwen2vl_jax import lora

    model = quantize(Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint), mode, group=GROUP[mode] or 128)
    model.save_pretrained(tmp_path / "base")  # the quantized base, HF layout
    key = jax.random.key(5)
    for lin in lora.apply_lora(model, 4, 8, seed=1).values():
        key, sub = jax.random.split(key)
        lin.lora.lora_B.set_value(0.05 * jax.random.normal(sub, lin.lora.lora_B.shape, jnp.float32))
    adapter = lora.save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    ours = masked(model(**two_rows).logits, two_rows)

    reloaded = Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "base")
    lora.load_adapter(reloaded, adapter)
    assert np.array_equal(masked(reloaded(**two_rows).logits, two_rows), ours)

    hf = helpers.load_hf_model(tiny_checkpoint)
    stored = st_load_file(str(tmp_path / "base" / "model.safetensors"))
    modules = config_of(tmp_path / "base")["quantization_config"]["modules"]
    changed = 0.0
    with torch.no_grad():
        for name in modules:
            w = dequantize_reference(stored[f"{name}.weight"], stored[f"{name}.weight_scale"])
            target = hf.get_submodule(lora.hf_module_name(lora.our_linear_path(name))).weight
            changed = max(changed, float(np.abs(target.numpy() - w).max()))
            target.copy_(torch.from_numpy(w))
    assert len(modules) == 16 and changed > 1e-4  # the quantization is not a no-op
    peft = PeftModel.from_pretrained(hf, str(adapter)).eval()
    with torch.no_grad():
        theirs = masked(peft(**{k: torch.from_numpy(v) for k, v in two_rows.items()}).logits.numpy(), two_rows)
    err = helpers.rel_err(ours, theirs)
    helpers.record(f"quantized/{mode}/qlora-adapter-in-peft", rel_err=err)
    assert err <= TOL, err
    # and the adapters do change the output
    bare = masked(Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "base")(**two_rows).logits, two_rows)
    assert helpers.rel_err(bare, theirs) > 1e-3
