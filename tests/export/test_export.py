"""Every program lowered for TPU and CUDA on this CPU host (`qwen2vl_jax.export`), and what each lowering proves.

Lowering only (no XLA compile, no weights): the 2B and 7B presets in bf16, abstract, on one device (in process)
and on 8 virtual devices (a subprocess started with `--xla_force_host_platform_device_count=8`: `data=2,model=4`,
`fsdp=8`, the 7B's 28 heads on `model=8`), plus the 72B and Qwen2.5-72B prefill with `scan_layers=True`. Each
(preset, program, platform, mesh) axis is covered in the default run; `-m slow` runs their full product.

What is asserted, per lowering: TPU vision / prefill / train programs carry the Mosaic flash attention
(`tpu_custom_call`), under `shard_map` on a mesh (XLA cannot partition a Mosaic kernel), and no interpret-mode
loops or host callbacks; CUDA ones carry cuDNN's fused attention (`__cudnn$fmha*`, its backward in the train step)
and say which calls fell back; no program holds the native CPU kernels unless it targets the CPU; bf16 programs
never hold an fp32 copy of a bf16 weight. Then the round trip: a CPU artifact, serialized, deserialized and called,
gives the live model's numbers (prefill logits and cache, vision features), also from one module lowered for TPU,
CUDA and CPU at once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qwen2vl_jax import Qwen2VLForConditionalGeneration, cli
from qwen2vl_jax.export import Shapes, export_program, flatten, load_artifact

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORKER = HERE / "export_worker.py"
_spec = importlib.util.spec_from_file_location("export_worker", WORKER)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

BOTH = ["tpu", "cuda"]
MESHES = {"data2_model4": {"data": 2, "model": 4}, "fsdp8": {"fsdp": 8}}
CPU_KERNELS = ("qwen2vl_jax_bf16_gemv", "qwen2vl_jax_segment_attention", "qwen2vl_jax_decode_attention")


def _inference_jobs(models, meshes):
    return [{"model": m, "program": p, "platforms": BOTH, **({"mesh": MESHES[k]} if k else {})}
            for m in models for k in meshes for p in ("vision", "prefill", "decode")]


def _train_jobs(pairs):
    """(model, mesh key or None, platform): the train step exports for one platform at a time."""
    return [{"model": m, "program": "train", "platforms": [p], **({"mesh": MESHES[k]} if k else {})}
            for m, k, p in pairs]


# int8 / int4 weights (qwen2vl_jax.quantization): a decode step on one device, the prefill and a decode step on meshes
QUANTIZED = [{"model": "2b", "program": "decode", "platforms": BOTH, "shapes": {"quantization": "int8"}}]
QUANTIZED_MESH = [{"model": "2b", "program": "prefill", "platforms": BOTH, "mesh": MESHES["fsdp8"],
                   "shapes": {"quantization": "int4"}},
                  {"model": "7b", "program": "decode", "platforms": BOTH, "mesh": MESHES["data2_model4"],
                   "shapes": {"quantization": "int8"}}]
# the serving engine's step (paged KV cache): Mosaic's ragged_paged_attention on TPU
ENGINE = [{"model": m, "program": "engine_step", "platforms": BOTH, "shapes": {"batch": 8, "prompt_len": 128}}
          for m in ("2b", "7b")]
ONE_DEVICE = _inference_jobs(["2b", "7b"], [None]) + _train_jobs([("2b", None, "tpu")]) + QUANTIZED + ENGINE
MESH_JOBS = (_inference_jobs(["2b", "7b"], ["data2_model4", "fsdp8"])
             + _train_jobs([("2b", "data2_model4", "cuda"), ("7b", "fsdp8", "tpu")])
             + [{"model": "7b", "program": p, "platforms": ["tpu"], "mesh": {"model": 8}}
                for p in ("vision", "prefill")]
             + [{"model": m, "program": "prefill", "platforms": BOTH, "mesh": {"fsdp": 2, "model": 4},
                 "scan_layers": True, "shapes": {"prompt_len": 960}} for m in ("72b", "2.5-72b")]
             + QUANTIZED_MESH)
SLOW_MESH_JOBS = _train_jobs([(m, k, p) for m in ("2b", "7b") for k in MESHES for p in BOTH
                              if (m, k, p) not in (("2b", "data2_model4", "cuda"), ("7b", "fsdp8", "tpu"))])
SLOW_ONE_DEVICE = _train_jobs([("2b", None, "cuda"), ("7b", None, "tpu"), ("7b", None, "cuda")])


def _check(row: dict) -> None:
    """What every lowering must show (see the module docstring)."""
    name = f"{row['model']} {row['program']} {row['platforms']} {row.get('mesh')}"
    calls = row["custom_calls"]
    assert row["platforms"] == row["asked_platforms"] and not row["callbacks"], name
    assert not set(calls) & set(CPU_KERNELS), name  # no CPU lowering, so none of the native CPU kernels
    assert row["bf16_weights"] > 0 and row["f32_weight_copies"] == [], name
    assert row["nr_devices"] == (int(np.prod(list(row["mesh"].values()))) if row.get("mesh") else 1), name
    attends = row["program"] in ("vision", "prefill", "train")  # the decode step attends with the xla formulation
    if "tpu" in row["platforms"]:  # the engine's step attends over pages with the ragged paged attention kernel
        assert ("tpu_custom_call" in calls) is (attends or row["program"] == "engine_step"), name
        if row["program"] == "engine_step":
            assert row["ragged_paged_kernels"] == row["layers"], name  # one per decoder layer
        # the model has no loops but the layer scan; interpret mode would add one per kernel call
        assert row["while_loops"] == (1 if row.get("scan_layers") else 0), name
        if attends and row.get("mesh"):
            assert row["shard_maps"] > 0, row  # the Mosaic kernel runs under shard_map on a mesh
    if "cuda" in row["platforms"]:
        cudnn = [c for c in calls if c.startswith("__cudnn$fmha")]
        assert bool(cudnn) is attends, name
        assert row["cudnn_fallbacks"] == [], (name, row["cudnn_fallbacks"])
        if row["program"] == "train":
            assert any(c.endswith("Backward") for c in cudnn), name
    if row.get("mesh"):
        assert row["sharded_arguments"] > 0, name
    quantization = row.get("shapes", {}).get("quantization")
    integers = {"int8": "int8", "int4": "uint8"}.get(quantization)
    assert (row["integer_weights"] > 0) is (integers is not None), name
    if integers:  # 7 projections per layer and the output projection (the 2B: its tied embedding; else lm_head and
        # the embedding table) hold integers, each with its fp32 scales
        outputs = 1 if row["model"] == "2b" else 2
        assert row["integer_weights"] == 7 * row["layers"] + outputs and row["integer_dtype"] == integers, name


@pytest.fixture(scope="module")
def one_device_rows():
    return [worker.run_job(job) for job in ONE_DEVICE]


def test_one_device_exports_for_tpu_and_cuda(one_device_rows):
    for row in one_device_rows:
        _check(row)
    by = {(r["model"], r["program"]): r for r in one_device_rows}
    # the 7B's weights are more bytes per device than the 2B's, and one module is a few hundred kB, not weights
    assert by["7b", "prefill"]["memory_plan_bytes_per_device"] > by["2b", "prefill"]["memory_plan_bytes_per_device"]
    assert all(r["module_bytes"] < 2_000_000 for r in one_device_rows)
    print(json.dumps([{k: r[k] for k in ("model", "program", "platforms", "custom_calls", "module_bytes",
                                         "export_seconds")} for r in one_device_rows]))


def _in_subprocess(jobs: list[dict], devices: int = 8) -> list[dict]:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path,
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}")
    done = subprocess.run([sys.executable, str(WORKER), json.dumps(jobs)], capture_output=True, text=True,
                          timeout=900, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_mesh_exports_for_tpu_and_cuda(one_device_rows):
    rows = _in_subprocess(MESH_JOBS)
    assert len(rows) == len(MESH_JOBS)
    for row in rows:
        _check(row)
    one = {(r["model"], r["program"]): r["memory_plan_bytes_per_device"] for r in one_device_rows}
    for row in rows:  # a mesh holds fewer bytes per device than one device does
        if (row["model"], row["program"]) in one:
            assert row["memory_plan_bytes_per_device"] < one[row["model"], row["program"]], row
    print(json.dumps([{k: r.get(k) for k in ("model", "program", "platforms", "mesh", "custom_calls", "shard_maps",
                                             "module_bytes", "export_seconds")} for r in rows]))


@pytest.mark.slow
def test_every_train_export():
    for row in [worker.run_job(job) for job in SLOW_ONE_DEVICE] + _in_subprocess(SLOW_MESH_JOBS):
        _check(row)


def test_the_train_step_on_several_platforms_at_once_is_refused_clearly(tiny_checkpoint):
    with pytest.raises(ValueError, match="the train step exports for one platform at a time"):
        export_program(str(tiny_checkpoint), "train", platforms=("tpu", "cuda"), shapes=Shapes(prompt_len=64))


# ------------------------------------------------------------------------------------------------ round trip
@pytest.fixture(scope="module")
def live(tiny_checkpoint):
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    return model, {"prefill": flatten(nnx.state(model)), "vision": flatten(nnx.state(model.visual))}


def _prefill_inputs(config, B=2, T=64, M=16, seed=0):
    from qwen2vl_jax.modeling.kv_cache import KVCache

    rng = np.random.default_rng(seed)
    mask = np.ones((B, T), np.int32)
    mask[0, :7] = 0  # left padding
    index = -np.ones((B, T), np.int32)
    index[:, 10:10 + M] = np.arange(M)
    positions = np.broadcast_to(np.arange(T, dtype=np.int32)[None, None], (3, B, T)).copy()
    return {"input_ids": rng.integers(0, 5000, (B, T)).astype(np.int32), "attention_mask": mask,
            "offset": np.int32(7), "position_ids": positions,
            "cache": KVCache.init(config.text_config, B, T, jnp.float32),
            "vision": rng.standard_normal((M, config.text_config.hidden_size)).astype(np.float32),
            "vision_index": index}


@pytest.mark.parametrize("platforms", [("cpu",), ("tpu", "cuda", "cpu")])
def test_a_cpu_artifact_gives_the_live_models_numbers(live, tiny_checkpoint, tmp_path, platforms):
    """Serialized, deserialized and called: the live prefill's logits and cache, and the live vision tower's
    features, within 1e-6 (the same program; from one module lowered for three platforms too, whose CPU branch
    runs here)."""
    from qwen2vl_jax.generation import decoding
    from qwen2vl_jax.modeling import programs
    from qwen2vl_jax.modeling.vision_layout import vision_layout

    model, weights = live
    shapes = Shapes(batch=2, prompt_len=64, vision_grid=(1, 8, 8))
    for program in ("prefill", "vision"):
        art = export_program(str(tiny_checkpoint), program, platforms=platforms, dtype="float32", shapes=shapes)
        assert art.manifest["platforms"] == list(platforms) and art.manifest["argument_groups"] == ["weights",
                                                                                                    "inputs"]
        if "tpu" in platforms:  # each platform's own attention in one module: Mosaic for the TPU; in fp32 cuDNN
            # refuses (bf16 / fp16 only), so the CUDA branch is XLA's formulation, and the manifest says so
            assert "tpu_custom_call" in art.manifest["custom_calls"], art.manifest["custom_calls"]
            assert art.manifest["cudnn_fallbacks"] and all("float32 activations" in f["reason"]
                                                           for f in art.manifest["cudnn_fallbacks"])
        art.save(tmp_path / program)
        assert sorted(p.name for p in (tmp_path / program).iterdir()) == ["manifest.json", "program.jax_exported"]
        art = load_artifact(tmp_path / program)
        if program == "prefill":
            inputs = _prefill_inputs(model.config)
            got = art.call(weights["prefill"], flatten(inputs))
            ref_logits, ref_cache, _ = decoding._prefill_jit(
                model, inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"], inputs["vision"],
                inputs["vision_index"], _prefill_inputs(model.config)["cache"], None, inputs["offset"])
            assert np.abs(np.asarray(got["logits"]) - np.asarray(ref_logits)).max() <= 1e-6
            assert np.abs(np.asarray(ref_logits)).max() > 1e-2  # not two zero arrays
            for name, value in flatten({"cache": ref_cache}).items():
                assert np.abs(np.asarray(got[name], np.float32) - np.asarray(value, np.float32)).max() <= 1e-6, name
        else:
            v = model.config.vision_config
            layout = vision_layout(np.asarray([shapes.vision_grid]), v.spatial_merge_size)
            pixels = np.random.default_rng(1).standard_normal((layout.padded_patches, v.patch_dim)).astype(np.float32)
            got = art.call(weights["vision"], flatten({"pixels": pixels, "pos_hw": layout.pos_hw_P2,
                                             "segments": layout.segments()}))
            ref, _, _ = programs.vision(model.visual, pixels, layout.pos_hw_P2, layout.segments())
            assert np.abs(np.asarray(got["features"]) - np.asarray(ref)).max() <= 1e-6
            assert np.abs(np.asarray(ref)).max() > 1e-2


@pytest.mark.parametrize("platforms", [("cpu",), ("tpu", "cuda", "cpu")])
def test_the_engine_step_artifact_gives_the_live_engines_tokens_and_cache(live, tiny_checkpoint, tmp_path,
                                                                          platforms):
    """The serving engine's step exported, serialized, loaded and called on this host: the live step's tokens,
    cache and repetition-penalty table for a prefill chunk (partly padding) beside two decoding slots."""
    from qwen2vl_jax.attention import PagedBatch
    from qwen2vl_jax.engine import step
    from qwen2vl_jax.generation.sampling import Knobs

    model, weights = live
    S, C, P, page = 3, 16, 6, 16
    shapes = Shapes(batch=S, prompt_len=C, cache_len=P * page // S)
    art = export_program(str(tiny_checkpoint), "engine_step", platforms=platforms, dtype="float32", shapes=shapes)
    if "tpu" in platforms:
        assert "tpu_custom_call" in art.manifest["custom_calls"]
    art.save(tmp_path / "step")
    art = load_artifact(tmp_path / "step")
    rng = np.random.default_rng(0)
    cfg = model.config.text_config
    per_seq = art.manifest["arguments"]["inputs/batch.page_indices_SP"]["shape"][1]
    pages = model.init_paged_cache(1 + P, page)
    pages = type(pages)([jnp.asarray(rng.standard_normal(p.shape), jnp.float32) for p in pages.pages])
    table = np.zeros((S + 1, per_seq), np.int32)
    table[0, :2], table[1, :1], table[2, :2] = [3, 1], [5], [2, 6]  # the chunk's sequence, two decoding slots
    kv_lens = np.array([20, 9, 30, 1], np.int32)  # the chunk: 4 cached + 16 (12 real); slot 2 idle
    slots = np.zeros(C + S, np.int32)
    slots[:12] = [3 * page + 4 + i for i in range(12)]
    slots[C:C + 2] = [5 * page + 8, 6 * page + 13]
    batch = PagedBatch(slots, kv_lens, table, np.array([0, C, C + 1, C + 2, C + 3], np.int32),
                       np.array([S + 1], np.int32), ((1, C), (S, 1)))
    vision = np.zeros((C, cfg.hidden_size), np.float32)
    vision[:4] = rng.standard_normal((4, cfg.hidden_size))
    index = np.full(C + S, -1, np.int32)
    index[2:6] = np.arange(2, 6)
    inputs = {"ids": rng.integers(0, 5000, C + S).astype(np.int32),
              "positions": np.tile(rng.integers(0, 40, C + S).astype(np.int32), (3, 1)), "vision": vision,
              "vision_index": index, "batch": batch, "logit_rows": np.array([11, C, C + 1], np.int32),
              "emit": np.array([True, True, False])}
    settings = step.SlotSettings(
        Knobs(temperature=np.ones(S, np.float32), top_k=np.zeros(S, np.int32), top_p=np.ones(S, np.float32),
              repetition_penalty=np.full(S, 1.1, np.float32), min_new_tokens=np.zeros(S, np.int32),
              max_new_tokens=np.full(S, 9, np.int32), eos_ids=np.zeros((S, 8), np.int32), pad_id=np.zeros(S, np.int32)),
        np.array([False, True, False]), np.asarray(jax.random.key_data(jax.random.key(3)))[None].repeat(S, 0),
        np.array([0, 4, 0], np.int32))
    seen = rng.random((S, cfg.vocab_size)) < 0.01
    got_out, got_state = art.call(weights["prefill"], flatten({"cache": pages, "seen": seen}), flatten(inputs),
                                  flatten(settings))
    tokens, ref_seen, ref_cache, _ = step.step_jit(model, pages, jnp.asarray(seen), inputs["ids"],
                                                   inputs["positions"], vision, index, batch, inputs["logit_rows"],
                                                   inputs["emit"], settings, keep_logits=False)
    assert np.asarray(got_out["tokens"]).tolist() == np.asarray(tokens).tolist()
    assert (np.asarray(got_state["seen"]) == np.asarray(ref_seen)).all()
    for name, value in flatten({"cache": ref_cache}).items():
        assert np.abs(np.asarray(got_state[name]) - np.asarray(value)).max() <= 1e-6, name


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_export_writes_the_artifact(tmp_path, capsys):
    out = tmp_path / "tpu"
    assert cli.main(["export", "--model", "2b", "--program", "prefill", "--platform", "tpu",
                     "--attn-implementation", "pallas", "--prompt-len", "512", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = json.loads((out / "manifest.json").read_text())
    assert printed["custom_calls"] == manifest["custom_calls"] and "tpu_custom_call" in manifest["custom_calls"]
    assert manifest["platforms"] == ["tpu"] and manifest["program"] == "prefill"
    assert manifest["arguments"]["inputs/input_ids"]["shape"] == [1, 512]
    assert manifest["module_bytes"] == len(load_artifact(out).exported.mlir_module_serialized)
    assert manifest["memory_plan_bytes_per_device"] > 4e9  # the 2B's bf16 weights alone are 4.4 GB

    out = tmp_path / "cuda"
    assert cli.main(["export", "--model", "2b", "--program", "vision", "--platform", "cuda", "--attn-implementation",
                     "jax", "--vision-grid", "1,16,16", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["custom_calls"] == ["__cudnn$fmhaSoftmax"] and manifest["cudnn_fallbacks"] == []
    assert manifest["arguments"]["inputs/pixels"]["shape"][0] == 256  # 16 x 16 patches
    capsys.readouterr()


@pytest.mark.parametrize("argv, needle", [
    (["--vision-grid", "1,16"], "--vision-grid '1,16': give t,h,w"),
    (["--platform", "tpu,metal"], "platforms must be among"),
    (["--prompt-len", "64"], "cannot hold the vision grid's 256 feature rows"),
    (["--mesh", "data=0"], "bad mesh"),
    (["--model", "nope"], "neither a preset"),
    (["--prompt-len", "40000"], "prompt_len 40000 is beyond the model's max_position_embeddings (32768)"),
    (["--batch", str(2**70), "--vision-grid", "none"], "too large to plan"),
    (["--vision-grid", "1,100000,100000"], "more than any prompt holds"),
    (["--mesh", "data=100000"], "at most 1024 virtual CPU devices"),
])
def test_cli_export_bad_input_is_one_line(argv, needle, tmp_path, capsys):
    base = {"--model": "2b", "--program": "prefill", "--platform": "tpu", "--out": str(tmp_path / "x")}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    assert cli.main(["export", *[x for kv in base.items() for x in kv]]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x").exists()



def test_export_api_refuses_bad_requests_by_name():
    """The library entry point (not only the CLI's flags) checks what it is asked before tracing anything."""
    cases = [
        (dict(shapes=Shapes(batch=0)), "batch must be a positive integer, got 0"),
        (dict(shapes=Shapes(vision_grid=(1, 16))), "vision_grid must be three positive integers"),
        (dict(shapes=Shapes(quantization="int3")), "unknown quantization 'int3'"),
        (dict(mesh={"tensor": 2}), "mesh axes are data, fsdp and model; got ['tensor']"),
        (dict(dtype="float16x"), "dtype must be float32 or bfloat16"),
        (dict(platforms=("metal",)), "platforms must be among"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(ValueError, match=re.escape(needle)):
            export_program("2b", "prefill", **kwargs)
