"""Sharded loading reads only the slices a process's devices hold (`params.load_sharded`, `read_slice`), and a
two-process `jax.distributed` job on localhost loads the tiny checkpoint with each process reading about half of it
and computes the one-device logits.

Multi-device runs need `--xla_force_host_platform_device_count` before JAX starts, so they run in subprocesses
(`multihost_worker.py` is one process of the multi-process job).
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

import helpers
from qwen2vl_jax.checkpoints import keymap as params_lib
from qwen2vl_jax.checkpoints.load import open_checkpoint
from qwen2vl_jax.checkpoints.safetensors_io import SafetensorsError, SafetensorsFile, save_file
from qwen2vl_jax.modeling.parameters import abstract_model
from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

TESTS = Path(__file__).resolve().parents[1]  # tests/: helpers and workers
ROOT = TESTS.parent


def _env(devices: int) -> dict:
    flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    path = os.pathsep.join(filter(None, [str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]))
    return dict(os.environ, XLA_FLAGS=flags, PYTHONPATH=path, QWEN2VL_JAX_CPU_KERNELS="0")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------- read_slice
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_read_slice_reads_exactly_the_slice(tmp_path, dtype):
    rng = np.random.default_rng(0)
    tensors = {"m": rng.standard_normal((12, 10)), "v": rng.standard_normal(9), "t": rng.standard_normal((4, 6, 5))}
    tensors = {k: v.astype(dtype) for k, v in tensors.items()}
    save_file(tensors, tmp_path / "x.safetensors")
    sf = SafetensorsFile(tmp_path / "x.safetensors")
    cases = [
        ("m", (slice(3, 9), slice(None))),  # leading rows: one read
        ("m", (slice(None), slice(2, 7))),  # columns: a read per row
        ("m", (slice(4, 5), slice(0, 3))),
        ("m", ()),
        ("v", (slice(2, 8),)),
        ("t", (slice(1, 3), slice(None), slice(None))),
        ("t", (slice(None), slice(2, 4), slice(None))),
        ("t", (slice(1, 4), slice(0, 6), slice(1, 5))),
        ("t", (slice(2, 2), slice(None), slice(None))),  # empty
    ]
    for name, index in cases:
        before = sf.bytes_read
        got = sf.read_slice(name, index)
        want = tensors[name][index]
        assert got.dtype == np.dtype(dtype) and got.shape == want.shape and np.array_equal(got, want), (name, index)
        assert got.flags.c_contiguous
        assert sf.bytes_read - before == want.nbytes, (name, index)  # the slice's bytes, not the tensor's


def test_read_slice_of_a_truncated_file_names_it(tmp_path):
    save_file({"a": np.arange(64, dtype=np.float32).reshape(8, 8)}, tmp_path / "x.safetensors")
    sf = SafetensorsFile(tmp_path / "x.safetensors")
    os.truncate(tmp_path / "x.safetensors", os.path.getsize(tmp_path / "x.safetensors") - 40)
    assert np.array_equal(sf.read_slice("a", (slice(0, 2),)), np.arange(16, dtype=np.float32).reshape(2, 8))
    with pytest.raises(SafetensorsError, match="x.safetensors.*truncated"):
        sf.read_slice("a", (slice(6, 8),))


def test_load_sharded_of_a_truncated_checkpoint_raises_checkpoint_error(tiny_checkpoint, tmp_path):
    ckpt_dir = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    ckpt = open_checkpoint(ckpt_dir)
    model = abstract_model(Qwen2VLForConditionalGeneration, ckpt.config)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = {path: device for path in params_lib.model_params(model)}
    f = ckpt.files[-1].path
    os.truncate(f, os.path.getsize(f) // 2)  # after the headers were read and checked
    with pytest.raises(params_lib.CheckpointError, match=f"corrupt checkpoint file: {re.escape(str(f))}.*truncated"):
        params_lib.load_sharded(model, ckpt.files, ckpt.layout, shardings, ignore=ckpt.ignore)


# ------------------------------------------------------------------------------------- one process, 4 devices
def test_sharded_load_matches_one_device_and_reads_each_shard_once(tiny_checkpoint):
    code = textwrap.dedent(f"""
        import json, math
        import jax, jax.numpy as jnp, ml_dtypes, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from qwen2vl_jax import sharding
        from qwen2vl_jax.checkpoints import keymap as params_lib
        from qwen2vl_jax.checkpoints.load import open_checkpoint
        from qwen2vl_jax.modeling.parameters import abstract_model
        from qwen2vl_jax.modeling.parameters import checkpoint_params
        from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration as M
        from qwen2vl_jax.checkpoints.safetensors_io import SafetensorsFile
        assert len(jax.devices()) == 4
        CONV = "visual.patch_embed.proj.weight"
        reports, reads = [], []
        load_sharded, read_slice = params_lib.load_sharded, SafetensorsFile.read_slice
        def counting(*a, **k):
            reports.append(load_sharded(*a, **k))
            return reports[-1]
        def logged(self, name, index):
            out = read_slice(self, name, index)
            reads.append((name, out.nbytes, self.nbytes(name)))
            return out
        params_lib.load_sharded, SafetensorsFile.read_slice = counting, logged

        def distinct_bytes(path, p, sharding, itemsize, row_bytes):
            # bytes of the distinct shards; a conv kernel split along its flattened axis reads whole rows
            total = 0
            for index in {{str(i): i for i in sharding.devices_indices_map(tuple(p.shape)).values()}}.values():
                n = [len(range(*s.indices(d))) for s, d in zip(index, p.shape)]
                total += n[0] * row_bytes if path == CONV and n[1] < p.shape[1] else math.prod(n) * itemsize
            return total

        one = M.from_pretrained({str(tiny_checkpoint)!r})
        ref = params_lib.model_params(one)
        out = {{}}

        # 1. the mesh load of from_pretrained: tensor parallel over 4 devices
        tp = M.from_pretrained({str(tiny_checkpoint)!r}, mesh=sharding.make_mesh(model=4))
        got = params_lib.model_params(tp)
        out["equal"] = all(np.array_equal(np.asarray(ref[k][...]), np.asarray(got[k][...])) for k in ref)
        out["bytes_read"] = reports[-1].bytes_read
        out["expected"] = sum(distinct_bytes(k, p, p[...].sharding, 4, 0) for k, p in got.items())
        ckpt = open_checkpoint({str(tiny_checkpoint)!r})
        out["file_bytes"] = ckpt.total_bytes
        embed = [(n, full) for name, n, full in reads if name == "model.embed_tokens.weight"]
        out["embed_reads"] = embed
        out["embed_split"] = list(got["language_model.embed_tokens.weight"][...].sharding.spec)

        # 2. stacked layers (scan_layers), bf16, the layer axis and columns split, the conv kernel's flat axis split
        reads.clear()
        model = abstract_model(M, ckpt.config.replace(scan_layers=True), jnp.bfloat16)
        mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ("a", "b"))
        def spec(path, shape):
            if path == CONV:
                return P(None, ("a", "b"))
            if len(shape) >= 2 and shape[0] % 2 == 0 and shape[1] % 2 == 0:
                return P("a", "b")
            return P("b") if shape[0] % 2 == 0 else P()
        params = params_lib.model_params(model)
        shardings = {{k: NamedSharding(mesh, spec(k, tuple(p.shape))) for k, p in params.items()}}
        steps = []
        report = params_lib.load_sharded(model, ckpt.files, ckpt.layout, shardings, ignore=ckpt.ignore,
                                         progress=steps.append)
        out["progress_ok"] = len(steps) == len(params) and sum(steps) == report.bytes_read
        row_bytes = ref[CONV].shape[1] * 4
        out["scan_bytes_read"] = report.bytes_read
        out["scan_expected"] = sum(distinct_bytes(k, p, shardings[k], 4, row_bytes) for k, p in params.items())
        out["scan_stacked"] = sum(i is not None for _, i in checkpoint_params(model).values())
        bad = []
        for path, (p, layer) in checkpoint_params(model).items():
            value = np.asarray(p[...])
            value = value if layer is None else value[layer]
            want = np.asarray(ref[path][...]).astype(ml_dtypes.bfloat16)
            if value.dtype != want.dtype or not np.array_equal(value, want):
                bad.append(path)
        out["scan_bad"] = bad
        out["scan_conv_shards"] = len(params[CONV][...].addressable_shards)
        print(json.dumps(out))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env(4),
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["equal"]
    # Every shard is read once: replicated tensors once for all 4 devices, split ones a quarter per device.
    assert out["bytes_read"] == out["expected"] == out["file_bytes"], out
    assert out["embed_split"] == ["model", None]
    assert len(out["embed_reads"]) == 4 and all(n * 4 == full for n, full in out["embed_reads"]), out["embed_reads"]
    assert out["scan_bad"] == [] and out["scan_stacked"] > 0 and out["progress_ok"]
    assert out["scan_bytes_read"] == out["scan_expected"], out
    helpers.record("multihost/one-process-4-devices", bytes_read=out["bytes_read"], file_bytes=out["file_bytes"],
                   scan_bytes_read=out["scan_bytes_read"])


# ----------------------------------------------------------------------------- two processes x 2 devices each
def _worker(checkpoint, out_dir, pid, nproc, port, devices, model_axis):
    cmd = [sys.executable, str(TESTS / "multihost_worker.py"), str(checkpoint), str(out_dir), str(pid), str(nproc),
           str(port), str(devices), str(model_axis)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(1), cwd=ROOT)


def test_two_processes_each_read_half_and_match_one_device(tiny_checkpoint, tmp_path):
    port = _free_port()
    procs = [_worker(tiny_checkpoint, tmp_path, i, 2, port, 2, 4) for i in range(2)]
    procs.append(_worker(tiny_checkpoint, tmp_path, 9, 1, 0, 1, 0))  # the one-process, one-device reference
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    reports = [json.loads((tmp_path / f"report_{i}.json").read_text()) for i in range(2)]
    file_bytes = open_checkpoint(tiny_checkpoint).total_bytes
    ref = np.load(tmp_path / "logits_9.npy")
    rel = [helpers.rel_err(np.load(tmp_path / f"logits_{i}.npy"), ref) for i in range(2)]
    fractions = [r["bytes_read"] / file_bytes for r in reports]
    rchar = [r["rchar"] / file_bytes for r in reports]
    helpers.record("multihost/2-processes-x-2-devices", max_rel=max(rel), read_fraction_0=fractions[0],
                   read_fraction_1=fractions[1], rchar_fraction_0=rchar[0], rchar_fraction_1=rchar[1],
                   file_bytes=file_bytes)
    assert all(r["devices"] == 4 and r["up_proj_spec"] == ["model", "None"] for r in reports), reports
    assert all(r["up_proj_local_rows"] == [24, 24] for r in reports), reports  # 96 MLP rows over 4 devices
    assert all(0.35 <= f <= 0.75 for f in fractions), fractions
    assert sum(fractions) < 1.5, fractions
    # The OS agrees (rchar counts every read syscall: headers, config, Python sources too, so a little more).
    assert all(0.35 <= f <= 0.8 for f in rchar), rchar
    assert max(rel) <= 1e-6, rel
    # and generation under the two-process mesh picks one device's greedy tokens (12 prompt ids + 6 new)
    tokens = [np.load(tmp_path / f"tokens_{i}.npy") for i in (0, 1, 9)]
    assert tokens[0].shape[1] == 12 + 6 and all(np.array_equal(t, tokens[2]) for t in tokens[:2]), tokens
