"""Conversion HF <-> qwen2vl_jax format: byte-exact round trips, transformers loads the export, research edits
survive, converted directories load identically, and the converter commands are safe (no overwrite, no debris)."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

import helpers
from qwen2vl_jax import cli
from qwen2vl_jax.checkpoints import convert, safetensors_io
from qwen2vl_jax.checkpoints.keymap import CheckpointError, canonical_hf_name, safetensors_files
from qwen2vl_jax.checkpoints.load import OURS_MARKER, SIDE_FILES
from qwen2vl_jax.checkpoints.safetensors_io import SafetensorsFile, TensorSpec, load_file, parse_size, plan_shards
from qwen2vl_jax.modeling.config import Qwen2VLConfig
from qwen2vl_jax.modeling.parameters import model_params
from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

O_PROJ = "language_model.layers.0.self_attn.o_proj.weight"


def tensors_of(path) -> dict:
    """{name: array} over every file of a checkpoint (tiny checkpoints only)."""
    return {name: a for f in safetensors_files(path) for name, a in load_file(f).items()}


def assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.fixture(scope="module")
def inputs(hf_tokenizer, photos):
    """A real tokenized chat prompt with one photograph."""
    return helpers.hf_inputs(hf_tokenizer, [helpers.chat("What is in this picture?", 1)], images=[photos["astronaut"]])


def hf_logits(model, inputs) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}).logits.float().numpy()


def load_hf_strict(path, dtype="float32"):
    """transformers' model and an assertion that no key was missing, unexpected or mis-shaped."""
    from transformers import Qwen2VLForConditionalGeneration as HFModel

    model, info = HFModel.from_pretrained(path, dtype=getattr(torch, dtype), attn_implementation="eager",
                                          output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == [], info
    return model.eval()


# --------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("tied, layout, sharded", [(False, "hub", False), (True, "hub", False),
                                                   (True, "new", False), (False, "new", True), (False, "hub", True)])
def test_hf_flax_hf_round_trip_is_byte_identical(checkpoint_factory, tmp_path, tied, layout, sharded):
    src = checkpoint_factory(tied=tied, layout=layout, sharded=sharded)
    shard = "10MB" if sharded else "2GB"
    flax = convert.hf_to_flax(src, tmp_path / "flax", max_shard_size=shard, progress=False)
    back = convert.flax_to_hf(flax.destination, tmp_path / "hf", max_shard_size=shard, progress=False)

    original = {canonical_hf_name(k): v for k, v in tensors_of(src).items()}
    exported = tensors_of(back.destination)
    assert all(canonical_hf_name(k) == k for k in exported)  # written in the Hub key layout
    assert ("lm_head.weight" in exported) is not tied
    assert_identical(original, exported)
    assert flax.tensors == back.tensors == len(original) and flax.bytes == back.bytes

    # the converted directory: our names, marker, HF config, side files; sharded like the source when asked
    ours = tensors_of(flax.destination)
    assert "language_model.embed_tokens.weight" in ours and ours["visual.patch_embed.proj.weight"].ndim == 2
    assert ((flax.destination / "model.safetensors.index.json").is_file() and flax.files > 1) is sharded
    marker = json.loads((flax.destination / OURS_MARKER).read_text())
    assert marker["format_version"] == 1 and marker["dtype"] == "float32" and marker["source"] == str(src)
    assert marker["num_parameters"] == sum(a.size for a in ours.values())
    config = Qwen2VLConfig.from_hf(flax.destination)
    assert config == Qwen2VLConfig.from_hf(back.destination) and config.tie_word_embeddings is tied
    copied = [n for n in SIDE_FILES if (src / n).is_file()]
    assert "tokenizer.json" in copied
    for name in copied:
        assert (flax.destination / name).read_bytes() == (src / name).read_bytes() == \
            (back.destination / name).read_bytes()
    assert not list(tmp_path.glob(".*"))  # no temporary folders left behind


def test_bfloat16_conversion_matches_torch_and_round_trips(tiny_checkpoint, tmp_path):
    flax = convert.hf_to_flax(tiny_checkpoint, tmp_path / "flax-bf16", dtype="bfloat16", progress=False)
    hf_bf16 = convert.flax_to_hf(flax.destination, tmp_path / "hf-bf16", progress=False).destination
    # our fp32 -> bf16 cast is torch's (round to nearest even), bit for bit
    state = load_hf_strict(tiny_checkpoint).to(torch.bfloat16).state_dict()
    reference = {canonical_hf_name(k): v for k, v in state.items()}  # in memory, transformers uses >= 4.52 names
    exported = tensors_of(hf_bf16)
    assert set(exported) == set(reference)
    for name, a in exported.items():
        assert str(a.dtype) == "bfloat16"
        np.testing.assert_array_equal(a.view(np.int16), reference[name].view(torch.int16).numpy(), err_msg=name)
    assert json.loads((hf_bf16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # a bf16 checkpoint round-trips bit for bit
    again = convert.flax_to_hf(convert.hf_to_flax(hf_bf16, tmp_path / "flax2", progress=False).destination,
                               tmp_path / "hf2", progress=False).destination
    assert_identical(exported, tensors_of(again))
    load_hf_strict(again, "bfloat16")


# ------------------------------------------------------------------------------------ transformers loads it
@pytest.mark.parametrize("tied", [False, True])
def test_transformers_loads_the_export_with_identical_logits(checkpoint_factory, tmp_path, inputs, tied):
    src = checkpoint_factory(tied=tied, layout="new" if tied else "hub")
    flax = convert.hf_to_flax(src, tmp_path / "flax", progress=False).destination
    exported = load_hf_strict(convert.flax_to_hf(flax, tmp_path / "hf", progress=False).destination)
    original = load_hf_strict(src)
    assert exported.config.tie_word_embeddings is tied
    a, b = hf_logits(original, inputs), hf_logits(exported, inputs)
    assert np.max(np.abs(a - b)) == 0.0


def test_a_research_edit_survives_export_to_pytorch(tiny_checkpoint, tmp_path, inputs):
    ours = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    o_proj = model_params(ours)[O_PROJ]
    o_proj.set_value(o_proj[...] * 1.5)
    edited = np.asarray(ours(**inputs).logits)

    out = convert.save_pretrained(ours, tmp_path / "edited-hf")
    assert out.tensors == len(model_params(ours))
    assert (out.destination / "tokenizer.json").is_file()  # side files follow from the loaded directory
    hf_edited = hf_logits(load_hf_strict(out.destination), inputs)
    hf_original = hf_logits(load_hf_strict(tiny_checkpoint), inputs)
    assert helpers.rel_err(hf_edited, edited) <= 1e-5
    assert helpers.rel_err(hf_original, edited) > 1e-3  # the edit changed the model

    # the same edit through our own format
    mine = convert.save_pretrained(ours, tmp_path / "edited-flax", format="flax").destination
    reloaded = Qwen2VLForConditionalGeneration.from_pretrained(mine)
    np.testing.assert_array_equal(np.asarray(model_params(reloaded)[O_PROJ][...]), np.asarray(o_proj[...]))
    np.testing.assert_array_equal(np.asarray(reloaded(**inputs).logits), edited)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_converted_directory_loads_identically(checkpoint_factory, tmp_path, inputs, dtype):
    src = checkpoint_factory(sharded=True)
    flax = convert.hf_to_flax(src, tmp_path / "flax", max_shard_size="30MB", progress=False).destination
    from_hf = Qwen2VLForConditionalGeneration.from_pretrained(src, dtype=dtype)
    from_flax = Qwen2VLForConditionalGeneration.from_pretrained(flax, dtype=dtype)
    a, b = model_params(from_hf), model_params(from_flax)
    assert a.keys() == b.keys()
    for p in a:
        assert a[p].dtype == b[p].dtype and np.array_equal(np.asarray(a[p][...]), np.asarray(b[p][...])), p
    np.testing.assert_array_equal(np.asarray(from_hf(**inputs).logits), np.asarray(from_flax(**inputs).logits))


# ------------------------------------------------------------------------------------------------- commands
def test_command_refuses_to_overwrite_unless_forced(tiny_checkpoint, tmp_path, capsys):
    dst = tmp_path / "out"
    assert cli.main(["convert", "hf-to-flax", str(tiny_checkpoint), str(dst), "--quiet"]) == 0
    out = capsys.readouterr()
    assert "wrote 58 tensors" in out.out and str(dst) in out.out and out.err == ""
    stamp = (dst / OURS_MARKER).stat().st_mtime_ns

    assert cli.main(["convert", "hf-to-flax", str(tiny_checkpoint), str(dst), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (dst / OURS_MARKER).stat().st_mtime_ns == stamp  # untouched

    assert cli.main(["convert", "hf-to-flax", str(tiny_checkpoint), str(dst), "--force", "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr()
    assert "writing out" in out.err  # the progress bar, on stderr
    assert json.loads((dst / OURS_MARKER).read_text())["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the replaced copy was removed

    hf = tmp_path / "hf"
    assert cli.main(["convert", "flax-to-hf", str(dst), str(hf), "--quiet", "--max-shard-size", "20MB"]) == 0
    assert len(list(hf.glob("model-*-of-*.safetensors"))) > 1
    # a checkpoint never replaces its own source, even with --force
    assert cli.main(["convert", "flax-to-hf", str(dst), str(dst), "--force", "--quiet"]) == 2
    assert "would replace the source" in capsys.readouterr().err
    assert (dst / OURS_MARKER).is_file()


def test_default_destination_is_under_weights(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["convert", "hf-to-flax", str(tiny_checkpoint), "--quiet"]) == 0
    dst = tmp_path / "weights" / f"{tiny_checkpoint.name}-flax"
    assert (dst / OURS_MARKER).is_file() and (dst / "config.json").is_file()
    hub_default = convert.default_destination("Qwen/Qwen2-VL-2B-Instruct")
    assert hub_default == convert.WEIGHTS_ROOT / "Qwen2-VL-2B-Instruct-flax"


def crashed(argv, crash):
    """Run the command while a write fails with `crash`: a bug keeps its traceback; Ctrl-C is `interrupted`, 130."""
    if isinstance(crash, KeyboardInterrupt):
        assert cli.main(argv) == 130
    else:
        with pytest.raises(type(crash)):
            cli.main(argv)


@pytest.mark.parametrize("crash", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_crash_mid_write_leaves_nothing_behind(checkpoint_factory, tmp_path, monkeypatch, crash):
    src = checkpoint_factory(sharded=True)
    calls = []
    real_write = safetensors_io.write_file

    def failing_write(path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # the first shard is complete on disk when the second one fails
            raise crash
        return real_write(path, *a, **k)

    monkeypatch.setattr(safetensors_io, "write_file", failing_write)
    dst = tmp_path / "out"
    crashed(["convert", "hf-to-flax", str(src), str(dst), "--quiet", "--max-shard-size", "10MB"], crash)
    assert len(calls) == 2 and os.path.exists(calls[0]) is False  # it had written a shard, now removed
    assert list(tmp_path.iterdir()) == []  # neither the destination nor a temporary folder

    # over an existing destination with --force: the old checkpoint survives the crash untouched
    monkeypatch.setattr(safetensors_io, "write_file", real_write)
    assert cli.main(["convert", "hf-to-flax", str(src), str(dst), "--quiet"]) == 0
    before = tensors_of(dst)
    calls.clear()
    monkeypatch.setattr(safetensors_io, "write_file", failing_write)
    crashed(["convert", "hf-to-flax", str(src), str(dst), "--quiet", "--force", "--max-shard-size", "10MB"], crash)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert_identical(before, tensors_of(dst))


def test_an_invalid_source_is_reported_and_writes_nothing(tiny_checkpoint, tmp_path, capsys):
    bad = shutil.copytree(tiny_checkpoint, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.norm.weight"]
    safetensors_io.save_file(tensors, bad / "model.safetensors")
    assert cli.main(["convert", "hf-to-flax", str(bad), str(tmp_path / "out"), "--quiet"]) == 2
    assert "missing: model.norm.weight [64]" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]
    with pytest.raises(CheckpointError):
        convert.flax_to_hf(bad, tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------------------------- plumbing
def test_sizes_and_shard_planning():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("10MB") == 10**7 and parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("500M") == 5 * 10**8 and parse_size(1234) == 1234
    with pytest.raises(ValueError, match="cannot parse size"):
        parse_size("lots")
    specs = [TensorSpec(str(i), np.dtype(np.float32), (n,)) for i, n in enumerate([10, 10, 30, 5, 5])]
    shards = plan_shards(specs, 80)  # bytes: 40 40 | 120 (alone: larger than the limit) | 20 20
    assert [[s.name for s in shard] for shard in shards] == [["0", "1"], ["2"], ["3", "4"]]
    assert safetensors_io.shard_file_names(3)[0] == "model-00001-of-00003.safetensors"


def test_writer_output_is_readable_by_the_reference_library(tmp_path):
    from safetensors.numpy import load_file as reference_load

    rng = np.random.default_rng(0)
    tensors = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": np.arange(7, dtype=np.int64),
               "empty": np.zeros((0, 3), np.float32)}
    safetensors_io.save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    assert_identical(tensors, reference_load(tmp_path / "x.safetensors"))
    assert SafetensorsFile(tmp_path / "x.safetensors").metadata == {"format": "pt"}
