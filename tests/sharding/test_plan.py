"""`qwen2vl-jax plan`: per-device bytes from the sharding rules, equal to what real sharded arrays hold.

The multi-device check runs on 8 virtual CPU devices (`--xla_force_host_platform_device_count`, set before JAX
starts), so it runs in a subprocess.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import jax.numpy as jnp

from qwen2vl_jax import cli
from qwen2vl_jax.modeling.config import qwen2_vl_72b
from qwen2vl_jax.modeling.model import Qwen2VL
from qwen2vl_jax.modeling.parameters import abstract_model

ROOT = Path(__file__).resolve().parents[2]
PLAN_72B = ["plan", "--model", "72b", "--mesh", "data=1,fsdp=1,model=8", "--batch", "8", "--context", "32768",
            "--dtype", "bfloat16", "--json"]


def _plan(argv, capsys) -> dict:
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_72b_on_model_8_matches_a_hand_count(capsys):
    out = _plan(PLAN_72B, capsys)
    total = abstract_model(Qwen2VL, qwen2_vl_72b(), jnp.bfloat16).num_params()["total"]
    p = out["parameters"]
    assert p["count"] == total and p["bytes_total"] == total * 2
    # model=8 splits every split tensor 8 ways: the rest (norms, the vision tower's fused qkv, ...) is whole
    whole = p["bytes_replicated_per_device"]
    assert p["bytes_per_device"] == whole + (p["bytes_total"] - whole) // 8
    assert total * 2 / 8 < p["bytes_per_device"] < 1.02 * total * 2 / 8
    # keys + values of 80 layers, [8, 32768, 8, 128] bf16, the 8 KV heads over 8 devices
    assert out["kv_cache"]["bytes_per_device"] == 2 * 80 * 8 * 32768 * 1 * 128 * 2
    # the residual stream [8, 32768, 8192] bf16 is replicated over "model" (Megatron): 4 GiB on every device
    assert out["largest_activation"]["name"] == "residual stream"
    assert out["largest_activation"]["bytes_per_device"] == 8 * 32768 * 8192 * 2
    assert out["total_bytes_per_device"] == p["bytes_per_device"] + 10 * 2**30 + 4 * 2**30
    one = _plan([*PLAN_72B[:4], "data=1,fsdp=1,model=1", *PLAN_72B[5:]], capsys)
    assert one["parameters"]["bytes_per_device"] == total * 2  # a single device holds the whole model


def test_scan_layers_gives_the_same_totals(capsys):
    args = ["plan", "--model", "2b", "--mesh", "data=2,model=4", "--batch", "4", "--context", "1024", "--json"]
    flat, stacked = _plan(args, capsys), _plan([*args, "--scan-layers"], capsys)
    for key in ("parameters", "largest_activation", "total_bytes_per_device"):
        assert {k: v for k, v in flat.items() if k != "scan_layers"}[key] == stacked[key]
    assert flat["kv_cache"]["bytes_per_device"] == stacked["kv_cache"]["bytes_per_device"]


def test_text_output_names_every_part(capsys):
    assert cli.main(PLAN_72B[:-1]) == 0
    text = capsys.readouterr().out
    for label in ("parameters   17.35 GiB", "kv cache     10.00 GiB", "activation   4.00 GiB per device",
                  "residual stream", "total        31.35 GiB"):
        assert label in text, text


def test_user_errors_are_one_line_exit_2(capsys, tmp_path):
    cases = [(["--model", "72b", "--mesh", "data=1,fsdp=x"], "bad mesh"),
             (["--model", "72b", "--mesh", "tensor=8"], "bad mesh"),
             (["--model", "73b"], "neither a preset"),
             (["--mesh", "model=8"], "plan needs --model"),
             (["--model", str(tmp_path)], "no config.json"),
             (["--model", "2b", "--batch", "0"], "must be > 0")]
    for argv, message in cases:
        try:
            code = cli.main(["plan", *argv])
        except SystemExit as e:  # argparse's own errors
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and message in err, (argv, err)


def _between(text: str, name: str) -> str:
    found = re.search(rf"<!-- {name}:begin -->\n(.*?)\n<!-- {name}:end -->", text, re.S)
    assert found, f"docs/SCALING.md has no {name} markers"
    return found.group(1).strip()


def test_scaling_doc_tables_are_the_commands_output(capsys):
    doc = (ROOT / "docs" / "SCALING.md").read_text()
    for flag, marker in (("--table", "plan-table"), ("--rules", "rules-table")):
        assert cli.main(["plan", flag]) == 0
        assert _between(doc, marker) == capsys.readouterr().out.strip(), \
            f"docs/SCALING.md is stale: paste `qwen2vl-jax plan {flag}` between the {marker} markers"


# --------------------------------------------------------------------------------- real arrays, 8 devices
CHECK = textwrap.dedent("""
    import json, math, sys
    import jax, numpy as np
    from jax.sharding import NamedSharding
    from qwen2vl_jax import sharding
    from qwen2vl_jax.sharding import plan as plan_lib
    from qwen2vl_jax.modeling.config import Qwen2VLConfig
    from qwen2vl_jax.modeling.config import PRESETS
    from qwen2vl_jax.modeling.parameters import model_params
    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration
    assert len(jax.devices()) == 8
    path, B, S = sys.argv[1], 8, 16
    report = {"cache_placed_by_test": False}

    def per_device(arrays):
        out = {d: 0 for d in jax.devices()}
        for a in arrays:
            for shard in a.addressable_shards:
                out[shard.device] += shard.data.nbytes
        return out

    def expected(sharding_, shape, dtype):
        return math.prod(sharding_.shard_shape(tuple(shape))) * np.dtype(dtype).itemsize

    config = Qwen2VLConfig.from_hf(path)
    three = {"data": 2, "fsdp": 2, "model": 2}
    for axes, scan in (({"data": 2, "model": 4}, False), ({"fsdp": 8}, False), (three, False), (three, True)):
        mesh = sharding.make_mesh(**axes)
        want = plan_lib.plan(config, sharding.parse_mesh(",".join(f"{k}={v}" for k, v in axes.items())),
                             batch=B, context=S, dtype="float32", scan_layers=scan)
        model = Qwen2VLForConditionalGeneration.from_pretrained(path, mesh=mesh, scan_layers=scan)
        assert want.params.stacked == scan
        got = per_device(p[...] for p in model_params(model).values())
        assert set(got.values()) == {want.params.per_device}, (axes, got, want.params)
        cache = model.init_cache(B, S)
        arrays = [*cache.keys, *cache.values] if isinstance(cache.keys, list) else [cache.keys, cache.values]
        if any(len(a.sharding.device_set) == 1 for a in arrays):  # not yet placed on the mesh by init_cache
            report["cache_placed_by_test"] = True
            arrays = [jax.device_put(a, NamedSharding(mesh, sharding.kv_cache_spec(a.shape, mesh))) for a in arrays]
        got = per_device(arrays)
        assert set(got.values()) == {want.kv_cache.per_device}, (axes, got, want.kv_cache)

    # full-size shapes: JAX's own shard shapes of every parameter, the cache and each activation
    for key in ("2b", "7b"):
        config = PRESETS[key]()
        model = plan_lib.abstract(config, "bfloat16")
        for axes in ({"data": 2, "model": 4}, {"fsdp": 8}, {"data": 2, "fsdp": 2, "model": 2}, {"model": 8}):
            mesh = sharding.make_mesh(**axes)
            want = plan_lib.plan(config, dict(mesh.shape), batch=8, context=4096, model=model)
            shardings = sharding.param_shardings(model, mesh)
            got = sum(expected(shardings[k], p.shape, p.dtype) for k, p in model_params(model).items())
            assert got == want.params.per_device, (key, axes, got, want.params)
            kv = want.kv_cache
            got = 2 * config.text_config.num_hidden_layers * expected(
                NamedSharding(mesh, sharding.kv_cache_spec(kv.shape, mesh)), kv.shape, kv.dtype)
            assert got == kv.per_device, (key, axes, got, kv)
            for a in want.activations:
                spec = sharding.partition_spec(a.axes, a.shape, mesh)
                assert expected(NamedSharding(mesh, spec), a.shape, a.dtype) == a.per_device, (key, axes, a)
    print(json.dumps(report))
""")


def test_plan_equals_the_bytes_of_sharded_arrays(tiny_checkpoint):
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"),
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", CHECK, str(tiny_checkpoint)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    print(json.loads(done.stdout.strip().splitlines()[-1]))  # whether init_cache placed the cache itself (-s)
