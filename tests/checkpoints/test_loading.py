"""from_pretrained: every source and layout, completeness errors, security, streaming, tying, Hub ids offline."""

import json
import logging
import os
import pickle
import shutil
import socket
import weakref

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from qwen2vl_jax.checkpoints import keymap as params_lib
from qwen2vl_jax.checkpoints import load as checkpoint
from qwen2vl_jax.checkpoints import safetensors_io
from qwen2vl_jax.checkpoints.keymap import CheckpointError, canonical_hf_name, hf_to_ours, safetensors_files
from qwen2vl_jax.checkpoints.safetensors_io import SafetensorsFile, load_file, save_file
from qwen2vl_jax.modeling.parameters import model_params
from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

UP = "model.layers.0.mlp.up_proj.weight"  # [intermediate 96, hidden 64] in the tiny config


def hf_tensors(path) -> dict:
    """{our path: array in our layout} straight from an HF checkpoint's files."""
    out = {}
    for f in safetensors_files(path):
        for name, array in load_file(f).items():
            p = hf_to_ours(name)
            out[p] = array.reshape(array.shape[0], -1) if p == "visual.patch_embed.proj.weight" else array
    return out


def edited_copy(src, dst, edit):
    """A copy of a single-file checkpoint whose tensors dict went through `edit`."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    save_file(edit(tensors), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def set_tied_flag(path, tied: bool):
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = tied
    config.get("text_config", {})["tie_word_embeddings"] = tied
    (path / "config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------------------------- sources and layouts
@pytest.mark.parametrize("tied, layout, sharded", [(False, "hub", False), (True, "new", False),
                                                   (False, "hub", True), (False, "new", True)])
def test_every_parameter_equals_its_hf_tensor(checkpoint_factory, tied, layout, sharded):
    path = checkpoint_factory(tied=tied, layout=layout, sharded=sharded)
    if sharded:
        assert (path / "model.safetensors.index.json").is_file() and len(safetensors_files(path)) > 1
    names = {n for f in safetensors_files(path) for n in SafetensorsFile(f).keys()}
    assert any(n.startswith("model.language_model.") for n in names) == (layout == "new")
    model = Qwen2VLForConditionalGeneration.from_pretrained(path)
    params = {p: np.asarray(v[...]) for p, v in model_params(model).items()}
    files = hf_tensors(path)
    assert set(params) == set(files)  # every tensor mapped, every parameter filled
    assert ("lm_head.weight" in params) is not tied
    for p, array in files.items():
        assert params[p].dtype == np.float32 and np.array_equal(params[p], array), p


def test_bfloat16_and_auto_dtypes(tiny_checkpoint):
    import torch

    files = hf_tensors(tiny_checkpoint)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype="bfloat16")
    for p, v in model_params(model).items():
        assert v.dtype == jnp.bfloat16, p
        # our cast (ml_dtypes, round to nearest even) is torch's .to(torch.bfloat16)
        ref = torch.from_numpy(files[p]).to(torch.bfloat16).view(torch.int16).numpy()
        np.testing.assert_array_equal(np.asarray(v[...]).view(np.int16), ref, err_msg=p)
    auto = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype="auto")
    assert auto.dtype == jnp.float32  # the tiny checkpoint is stored in fp32
    with pytest.raises(ValueError, match="float16 is not supported"):
        Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, dtype="float16")


# ------------------------------------------------------------------------------------- completeness errors
def test_missing_tensor_is_named_with_its_shape(tiny_checkpoint, tmp_path):
    path = edited_copy(tiny_checkpoint, tmp_path / "ckpt", lambda t: {k: v for k, v in t.items() if k != UP})
    with pytest.raises(CheckpointError) as e:
        Qwen2VLForConditionalGeneration.from_pretrained(path)
    msg = str(e.value)
    assert "(1 problem: 1 missing)" in msg and f"missing: {UP} [96, 64]" in msg


def test_unexpected_tensor_is_named_with_its_shape(tiny_checkpoint, tmp_path):
    extra = "model.layers.0.mlp.extra_proj.weight"
    path = edited_copy(tiny_checkpoint, tmp_path / "ckpt", lambda t: {**t, extra: np.ones((3, 5), np.float32)})
    with pytest.raises(CheckpointError) as e:
        Qwen2VLForConditionalGeneration.from_pretrained(path)
    assert f"unexpected: {extra} [3, 5] is not a parameter of this model" in str(e.value)
    assert "1 problem" in str(e.value)


def test_wrong_shape_names_expected_and_found(tiny_checkpoint, tmp_path):
    path = edited_copy(tiny_checkpoint, tmp_path / "ckpt", lambda t: {**t, UP: t[UP][:95]})
    with pytest.raises(CheckpointError) as e:
        Qwen2VLForConditionalGeneration.from_pretrained(path)
    assert f"wrong shape: {UP} expected [96, 64], found [95, 64]" in str(e.value)


def test_several_problems_in_one_error_before_any_data_is_read(tiny_checkpoint, tmp_path, monkeypatch):
    conv = "visual.patch_embed.proj.weight"

    def edit(t):
        t = {k: v for k, v in t.items() if k != "model.norm.weight"}
        t["model.layers.1.self_attn.q_proj.bias"] = t["model.layers.1.self_attn.q_proj.bias"][:10]
        t[conv] = t[conv].reshape(32, -1)  # the flattened kernel is not the HF Conv3d layout
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
        t["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)  # o_proj has no bias
        t["model.language_model.layers.1.mlp.down_proj.weight"] = t["model.layers.1.mlp.down_proj.weight"]
        return t

    path = edited_copy(tiny_checkpoint, tmp_path / "ckpt", edit)
    reads = []
    monkeypatch.setattr(SafetensorsFile, "read", lambda self, name: reads.append(name))
    with pytest.raises(CheckpointError) as e:
        Qwen2VLForConditionalGeneration.from_pretrained(path)
    msg = str(e.value)
    assert "6 problems" in msg and msg.count("\n  - ") == 6
    for line in ("missing: model.norm.weight [64]",
                 "wrong shape: model.layers.1.self_attn.q_proj.bias expected [64], found [10]",
                 f"wrong shape: {conv} expected [32, 3, 2, 14, 14], found [32, 1176]",
                 "unexpected: model.layers.0.self_attn.rotary_emb.inv_freq [8]",
                 "unexpected: model.layers.0.self_attn.o_proj.bias [64]",
                 "duplicate: "):
        assert line in msg, line
    assert "model.language_model.layers.1.mlp.down_proj.weight" in msg
    assert reads == []  # headers only: a bad checkpoint fails before any tensor data is read


def test_pickle_checkpoints_are_refused_without_unpickling(tiny_checkpoint, tmp_path, monkeypatch):
    import torch

    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", d)
    torch.save({"model.norm.weight": torch.ones(64)}, d / "pytorch_model.bin")  # written only; never loaded

    def forbidden(*a, **k):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(CheckpointError) as e:
        Qwen2VLForConditionalGeneration.from_pretrained(d)
    msg = str(e.value)
    assert "pytorch_model.bin" in msg and "safetensors" in msg and "pickle" in msg
    # a sharded pickle checkpoint (what a Hub download filtered to *.json leaves: the index only)
    (d / "pytorch_model.bin").unlink()
    (d / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match="only pickle checkpoints.*safetensors"):
        Qwen2VLForConditionalGeneration.from_pretrained(d)


def test_truncated_and_corrupt_files_give_clear_errors(tiny_checkpoint, tmp_path):
    path = shutil.copytree(tiny_checkpoint, tmp_path / "truncated")
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"corrupt checkpoint file: .*model.safetensors: tensor .*truncated"):
        Qwen2VLForConditionalGeneration.from_pretrained(path)
    f.write_bytes(b"\x00" * 64)  # header size 0: not JSON
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        Qwen2VLForConditionalGeneration.from_pretrained(path)
    f.write_bytes(b"\xff" * 64)  # an absurd header size
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        Qwen2VLForConditionalGeneration.from_pretrained(path)
    f.write_bytes(data[:4])
    with pytest.raises(CheckpointError, match="too short|only 4 bytes"):
        Qwen2VLForConditionalGeneration.from_pretrained(path)


def test_missing_shard_and_empty_directory(tiny_checkpoint, checkpoint_factory, tmp_path):
    sharded = shutil.copytree(checkpoint_factory(sharded=True), tmp_path / "sharded")
    last = sorted(sharded.glob("model-*.safetensors"))[-1]
    last.unlink()
    with pytest.raises(CheckpointError, match=f"shard files that do not exist.*{last.name}"):
        Qwen2VLForConditionalGeneration.from_pretrained(sharded)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", empty)
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        Qwen2VLForConditionalGeneration.from_pretrained(empty)


# ------------------------------------------------------------------------------------------------ tying
def test_a_tied_flag_wins_over_a_stored_head_and_a_missing_head_ties(checkpoint_factory, tmp_path, caplog):
    """transformers ties when the config says so (the file's lm_head.weight is ignored): we do the same and say so.
    An untied config whose files hold no head can only be tied: we follow the tensors."""
    untied = shutil.copytree(checkpoint_factory(tied=False), tmp_path / "untied-says-tied")
    set_tied_flag(untied, True)
    with caplog.at_level(logging.WARNING, logger="qwen2vl_jax.checkpoints.load"):
        model = Qwen2VLForConditionalGeneration.from_pretrained(untied)
    assert "lm_head.weight is ignored because the config ties it" in caplog.text
    assert model.lm_head is None and model.config.tie_word_embeddings

    tied = shutil.copytree(checkpoint_factory(tied=True), tmp_path / "tied-says-untied")
    set_tied_flag(tied, False)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tied)
    assert model.lm_head is None and model.config.tie_word_embeddings


# ---------------------------------------------------------------------------------------------- streaming
def test_loading_streams_one_tensor_at_a_time(checkpoint_factory):
    """Every read is followed by its placement before the next read, and the loader keeps no host copy."""
    path = checkpoint_factory(sharded=True)
    events, host_copies = [], []
    real_mapped, real_view = SafetensorsFile.mapped, SafetensorsFile.view

    def mapped(self, name):
        assert all(r() is None for r in host_copies), "an earlier host array is still alive"
        events.append("read")
        return real_mapped(self, name)

    def view(self, name):
        assert all(r() is None for r in host_copies), "an earlier host array is still alive"
        events.append("read")
        return real_view(self, name)

    def place(path, array):
        events.append("place")
        host_copies.append(weakref.ref(array))
        # XLA:CPU may alias a NumPy buffer instead of copying it (then the parameter *is* that buffer); place a
        # copy so the weak reference watches only the loader's own host array
        return jax.device_put(array.copy())

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SafetensorsFile, "mapped", mapped)
        mp.setattr(SafetensorsFile, "view", view)
        mp.setattr(params_lib, "CHUNK_BYTES", 4096)  # the threaded copy runs on the tiny tensors too
        model = checkpoint.load_pretrained(Qwen2VLForConditionalGeneration, path, place=place)
    n = len(model_params(model))
    assert events == ["read", "place"] * n
    assert all(r() is None for r in host_copies)


def _with_data_start(src, dst, residue: int):
    """`src` (a single-file checkpoint) rewritten with its header padded so that data starts at `residue` mod 64."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})  # our writer: data 64-aligned
    f = dst / "model.safetensors"
    raw = f.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    pad = residue % 64 + (64 if residue % 64 < 8 else 0) if residue else 0
    f.write_bytes((size + pad).to_bytes(8, "little") + raw[8:8 + size] + b" " * pad + raw[8 + size:])
    sf = SafetensorsFile(f)
    assert sf.data_start % 64 == residue % 64
    return dst, sf


@pytest.mark.parametrize("residue", [0, 16, 8])
def test_aligned_tensors_are_adopted_from_the_file_and_unaligned_ones_copied(tiny_checkpoint, tmp_path, residue):
    """Same-dtype tensors 64-byte aligned in the file become the parameters without a copy (a view of the file's
    map); at the 8- or 16-byte offsets HF files often have, every tensor is copied into an aligned buffer. The
    values are the file's either way."""
    path, sf = _with_data_start(tiny_checkpoint, tmp_path / f"r{residue}", residue)
    views, maps = {}, []
    real_view, real_mapped = SafetensorsFile.view, SafetensorsFile.mapped

    def view(self, name):
        out = real_view(self, name)
        views[name] = out.ctypes.data
        return out

    def mapped(self, name):
        maps.append(name)
        return real_mapped(self, name)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SafetensorsFile, "view", view)
        mp.setattr(SafetensorsFile, "mapped", mapped)
        model = Qwen2VLForConditionalGeneration.from_pretrained(path)
    files = hf_tensors(path)
    aligned = {n for n in sf.keys() if sf.aligned(n)}
    assert (len(aligned) == len(sf.keys())) == (residue == 0)
    assert set(views) == aligned and set(maps) == set(sf.keys()) - aligned
    for name in sf.keys():
        p = hf_to_ours(name)
        v = model_params(model)[p].get_value()
        np.testing.assert_array_equal(np.asarray(v), files[p])
        assert v.unsafe_buffer_pointer() % safetensors_io.ALIGNMENT == 0
        if name in views:
            assert v.unsafe_buffer_pointer() == views[name], f"{name} was copied, not adopted"
    del model
    # a cast always copies (the fp32 file loaded as bf16), never maps the file for good
    views.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SafetensorsFile, "view", view)
        Qwen2VLForConditionalGeneration.from_pretrained(path, dtype="bfloat16")
    assert not views


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_file_truncated_after_its_header_was_read_is_a_checkpoint_error(tiny_checkpoint, tmp_path, dtype):
    """Between the header check and the data (zero-copy view or mapped copy): a CheckpointError naming the file,
    never a crash on a page past the end of the file."""
    path, _ = _with_data_start(tiny_checkpoint, tmp_path / "t", 0)
    f = path / "model.safetensors"
    real_match = params_lib.match_checkpoint

    def match_then_truncate(*a, **k):
        refs = real_match(*a, **k)
        os.truncate(f, f.stat().st_size - 1000)
        return refs

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(params_lib, "match_checkpoint", match_then_truncate)
        with pytest.raises(CheckpointError, match=r"corrupt checkpoint file: .*model.safetensors: short read"):
            Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=dtype)


def test_an_error_in_a_copy_thread_reaches_the_caller(tiny_checkpoint, monkeypatch):
    """The chunked copy's worker threads: the first error is raised by from_pretrained, after every chunk ended."""
    calls = []
    real = params_lib._cast_into

    def failing(out, src):
        calls.append(out.size)
        if len(calls) == 3:
            raise CheckpointError("corrupt checkpoint file: boom")
        real(out, src)

    monkeypatch.setattr(params_lib, "CHUNK_BYTES", 256)
    monkeypatch.setattr(params_lib, "_cast_into", failing)
    monkeypatch.setenv("QWEN2VL_JAX_LOAD_THREADS", "2")
    with pytest.raises(CheckpointError, match="boom"):
        Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)


# ----------------------------------------------------------------------------------------- source errors
def test_local_path_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "no" / "such" / "dir")
    with pytest.raises(NotADirectoryError, match="pass the checkpoint directory"):
        Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint / "config.json")


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("how", ["HF_HUB_OFFLINE", "local_files_only"])
def test_hub_id_offline_gives_an_actionable_error(monkeypatch, no_network, how):
    kwargs = {}
    if how == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        kwargs["local_files_only"] = True
    with pytest.raises(FileNotFoundError) as e:
        Qwen2VLForConditionalGeneration.from_pretrained("fake-org/not-a-model", **kwargs)
    msg = str(e.value)
    for part in ("'fake-org/not-a-model'", "no local directory", "local Hugging Face cache", "HF_HUB_OFFLINE",
                 "local_files_only", "local checkpoint directory"):
        assert part in msg, part


def test_hub_id_resolves_from_the_local_cache(tiny_checkpoint, tmp_path, monkeypatch, no_network):
    """A model id already in the Hugging Face cache loads offline (the layout snapshot_download reads)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--fake-org--tiny-qwen2-vl"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = checkpoint.load_pretrained(Qwen2VLForConditionalGeneration, "fake-org/tiny-qwen2-vl",
                                       cache_dir=tmp_path / "hub")
    assert model.source_dir == str(repo / "snapshots" / commit)
    files = hf_tensors(tiny_checkpoint)
    for p, v in model_params(model).items():
        np.testing.assert_array_equal(np.asarray(v[...]), files[p])


def test_future_format_version_is_refused(tiny_checkpoint, tmp_path):
    from qwen2vl_jax.checkpoints.convert import hf_to_flax

    dst = hf_to_flax(tiny_checkpoint, tmp_path / "flax", progress=False).destination
    marker = json.loads((dst / "qwen2vl_jax.json").read_text())
    (dst / "qwen2vl_jax.json").write_text(json.dumps({**marker, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        Qwen2VLForConditionalGeneration.from_pretrained(dst)


def test_name_maps_are_inverse_and_cover_both_layouts():
    from qwen2vl_jax.checkpoints.keymap import ours_to_hf

    for hub in ("model.layers.3.self_attn.q_proj.bias", "visual.merger.mlp.0.weight", "visual.blocks.7.attn.qkv.bias",
                "lm_head.weight", "model.embed_tokens.weight"):
        new = "model.visual." + hub[7:] if hub.startswith("visual.") else hub.replace("model.", "model.language_model.")
        if hub == "lm_head.weight":
            new = hub
        assert canonical_hf_name(new) == hub
        assert hf_to_ours(new) == hf_to_ours(hub) is not None
        assert ours_to_hf(hf_to_ours(hub)) == hub
    assert hf_to_ours("visual.merger.mlp.1.weight") is None  # the GELU has no parameters
    assert hf_to_ours("model.layers.0.self_attn.o_proj.bias") is None


def test_tensors_are_read_into_aligned_buffers_that_become_the_parameters(tiny_checkpoint):
    """The loader's host buffer is adopted by XLA:CPU (no second copy, no page faults for it): 64-byte aligned."""
    sf = SafetensorsFile(safetensors_files(tiny_checkpoint)[0])
    names = sorted(sf.keys(), key=lambda n: -sf.nbytes(n))[:8]
    for name in names:
        array = sf.read(name)
        assert array.ctypes.data % safetensors_io.ALIGNMENT == 0 and array.flags.c_contiguous, name
        placed = params_lib.place_on_default_device(name, array)
        assert placed.unsafe_buffer_pointer() == array.ctypes.data, f"{name} was copied, not adopted"
        np.testing.assert_array_equal(np.asarray(placed), array)
    for shape, dtype in [((0,), np.float32), ((3, 5), ml_dtypes.bfloat16), ((7,), np.uint8)]:
        out = safetensors_io.empty_aligned(shape, dtype)
        assert out.shape == shape and out.dtype == dtype
        assert out.size == 0 or out.ctypes.data % safetensors_io.ALIGNMENT == 0  # empty: no address


def test_cast_rounds_like_astype_into_an_aligned_buffer():
    from concurrent.futures import ThreadPoolExecutor

    x = np.random.default_rng(0).standard_normal((33, 17)).astype(np.float32) * 1e3
    x[0, :3] = [np.nan, np.inf, -0.0]
    with ThreadPoolExecutor(2) as pool, pytest.MonkeyPatch.context() as mp:
        for chunk in (params_lib.CHUNK_BYTES, 100):  # whole, and split over the threads in uneven chunks
            mp.setattr(params_lib, "CHUNK_BYTES", chunk)
            for dtype in (ml_dtypes.bfloat16, np.float32):
                for src in (x, x.astype(ml_dtypes.bfloat16)):
                    for p in (None, pool):
                        out = params_lib._cast(src, np.dtype(dtype), p)
                        if src.dtype == dtype:
                            assert out is src  # no copy when nothing changes
                        else:
                            assert out.dtype == dtype and out.ctypes.data % safetensors_io.ALIGNMENT == 0
                        np.testing.assert_array_equal(out.view(np.uint8), src.astype(dtype).view(np.uint8))
    # bf16 -> fp32 by shifting the bits is ml_dtypes' cast exactly, for all 65536 bf16 values (NaNs included)
    every = np.arange(1 << 16, dtype=np.uint16).view(ml_dtypes.bfloat16)
    out = np.empty(every.shape, np.float32)
    params_lib._cast_into(out, every)
    np.testing.assert_array_equal(out.view(np.uint32), every.astype(np.float32).view(np.uint32))


def test_our_writer_aligns_data_to_64_bytes(tmp_path):
    """Our files load zero-copy: the header is padded with spaces (as the reference writer pads to 8) to 64."""
    for n in range(1, 70, 7):
        path = tmp_path / f"x{n}.safetensors"
        save_file({"a" * n: np.arange(16, dtype=np.float32), "b": np.ones((4, 8), ml_dtypes.bfloat16)}, path)
        sf = SafetensorsFile(path)
        assert sf.data_start % 64 == 0 and all(sf.aligned(k) for k in sf.keys())
        np.testing.assert_array_equal(sf.read("a" * n), np.arange(16, dtype=np.float32))
        np.testing.assert_array_equal(sf.view("b"), np.ones((4, 8), ml_dtypes.bfloat16))
        with sf.mapped("a" * n) as v:
            np.testing.assert_array_equal(v, np.arange(16, dtype=np.float32))
