"""Sharding: the logical-axis table places every parameter, and a tensor-parallel model computes what one device does.

Multi-device runs use 4 virtual CPU devices (`--xla_force_host_platform_device_count`), which must be set before
JAX starts, so they run in a subprocess.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

import helpers
from qwen2vl_jax import sharding
from qwen2vl_jax.modeling.config import qwen2_vl_2b, qwen2_vl_72b
from qwen2vl_jax.modeling.parameters import model_params
from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration


class _FakeMesh:  # partition_spec only reads mesh.shape
    shape = {"data": 1, "fsdp": 1, "model": 4}


class _FakeMesh8:
    shape = {"data": 1, "fsdp": 1, "model": 8}


def test_partition_spec_splits_whole_heads_and_replicates_the_rest():
    mesh = _FakeMesh()
    assert sharding.partition_spec(("mlp", "embed"), (8960, 1536), mesh) == PartitionSpec("model", None)
    q_rows = (("q_heads", 12), ("head_dim", 128))
    kv_rows = (("kv_heads", 2), ("head_dim", 128))
    assert sharding.partition_spec(("embed", q_rows), (1536, 1536), mesh) == PartitionSpec(None, "model")
    # the 2B's k_proj has 2 KV heads of 128 = 256 rows: 4 devices would hold half a head each -> replicated
    assert sharding.partition_spec((kv_rows, "embed"), (256, 1536), mesh) == PartitionSpec(None, None)
    assert sharding.partition_spec((kv_rows, "embed"), (256, 1536), _FakeMesh2()) == PartitionSpec("model", None)
    # the 7B's 28 query heads on 8 devices: replicated; its MLP (18944) splits
    q7 = (("q_heads", 28), ("head_dim", 128))
    assert sharding.partition_spec((q7, "embed"), (3584, 3584), _FakeMesh8()) == PartitionSpec(None, None)
    assert sharding.partition_spec(("mlp", "embed"), (18944, 3584), _FakeMesh8()) == PartitionSpec("model", None)
    # the vision tower's fused qkv rows [3, heads, head_dim]: a contiguous split would cut q from k
    qkv = (("vis_qkv", 3), ("vis_heads", 16), ("vis_head_dim", 80))
    assert sharding.partition_spec((qkv, "vis_embed"), (3840, 1280), mesh) == PartitionSpec(None, None)
    # FSDP splits the residual width; size-1 mesh axes are left out; a batch over data and fsdp where they divide
    fsdp = type("M", (), {"shape": {"data": 2, "fsdp": 4, "model": 1}})()
    assert sharding.partition_spec(("mlp", "embed"), (8960, 1536), fsdp) == PartitionSpec(None, "fsdp")
    assert sharding.partition_spec(("batch", "seq"), (8, 5), fsdp) == PartitionSpec(("data", "fsdp"), None)
    assert sharding.partition_spec(("batch", "seq"), (2, 5), fsdp) == PartitionSpec("data", None)
    assert sharding.partition_spec(("batch", "seq"), (3, 5), fsdp) == PartitionSpec(None, None)
    with pytest.raises(ValueError, match="multiply"):
        sharding.partition_spec(((("q_heads", 3), ("head_dim", 4)),), (13,), mesh)
    with pytest.raises(ValueError, match="'nonsense'"):
        sharding.partition_spec(("nonsense", "embed"), (8, 8), mesh)
    with pytest.raises(ValueError, match="'tensor'"):
        sharding.partition_spec(("mlp",), (8,), mesh, rules={"mlp": "tensor"})


class _FakeMesh2:
    shape = {"data": 1, "fsdp": 1, "model": 2}


def test_make_mesh_and_parse_mesh():
    import jax

    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data", "fsdp", "model") and mesh.devices.shape == (1, 1, 1)
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh(data=2, fsdp=2, model=4, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="positive integer"):
        sharding.make_mesh(model=0)
    assert sharding.parse_mesh("data=2, model=4") == {"data": 2, "fsdp": 1, "model": 4}
    for bad in ("data=0", "tensor=2", "model=two"):
        with pytest.raises(ValueError, match="bad mesh"):
            sharding.parse_mesh(bad)


def test_every_parameter_of_the_presets_has_a_rule():

    mesh = sharding.make_mesh()
    for preset in (qwen2_vl_2b(), qwen2_vl_72b()):
        abstract = nnx.eval_shape(lambda c=preset: Qwen2VLForConditionalGeneration(c, rngs=nnx.Rngs(0)))
        shardings = sharding.param_shardings(abstract, mesh)
        assert shardings.keys() == model_params(abstract).keys()
        # tensor parallel at 8 devices: every 72B projection's output or input axis is split
        spec8 = {p: sharding.partition_spec(sharding.param_axes(v), tuple(v.shape), _FakeMesh8())
                 for p, v in model_params(abstract).items() if v.ndim == 2 and p.startswith("language_model")}
        if preset.text_config.hidden_size == 8192:
            assert all("model" in tuple(s) for s in spec8.values()), [p for p, s in spec8.items() if "model" not in s]


def test_tensor_parallel_model_matches_one_device(tiny_checkpoint, hf_tokenizer, photos, tmp_path):
    inputs = helpers.hf_inputs(hf_tokenizer, [helpers.chat("What is in this picture? Answer in detail.", 1)],
                               images=[photos["astronaut"]])
    np.savez(tmp_path / "inputs.npz", **{k: np.asarray(v) for k, v in inputs.items()})
    code = textwrap.dedent(f"""
        import json, sys
        import jax, numpy as np
        sys.path.insert(0, {str(helpers.__file__.rsplit("/", 1)[0])!r})
        from qwen2vl_jax.runtime import use_exact_cpu_fp32_matmuls
        use_exact_cpu_fp32_matmuls()
        jax.config.update("jax_default_matmul_precision", "highest")
        from qwen2vl_jax import sharding
        from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration
        assert len(jax.devices()) == 4
        x = dict(np.load({str(tmp_path / "inputs.npz")!r}))
        one = Qwen2VLForConditionalGeneration.from_pretrained({str(tiny_checkpoint)!r})
        mesh = sharding.make_mesh(model=4)
        tp = Qwen2VLForConditionalGeneration.from_pretrained({str(tiny_checkpoint)!r}, mesh=mesh)
        up = tp.language_model.layers[0].mlp.up_proj.weight[...]
        specs = {{"up_proj": list(up.sharding.spec), "devices": len(up.sharding.device_set),
                  "shard_rows": up.addressable_shards[0].data.shape[0], "rows": up.shape[0]}}
        ref = np.asarray(one(**x).logits)
        got = np.asarray(tp(**x).logits)
        g1 = np.asarray(one.generate(**x, max_new_tokens=8, do_sample=False))
        g4 = np.asarray(tp.generate(**x, max_new_tokens=8, do_sample=False))
        print(json.dumps({{"specs": specs, "rel": float(np.abs(got - ref).max() / np.abs(ref).max()),
                          "same_tokens": bool((g1 == g4).all()), "new": int(g1.shape[1] - x["input_ids"].shape[1])}}))
    """)
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["specs"]["up_proj"] == ["model", None] and out["specs"]["devices"] == 4
    assert out["specs"]["shard_rows"] * 4 == out["specs"]["rows"]
    helpers.record("sharding/tensor-parallel-4", max_rel=out["rel"])
    assert out["rel"] <= 1e-5
    assert out["same_tokens"] and out["new"] == 8
