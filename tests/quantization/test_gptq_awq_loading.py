"""`from_pretrained` of GPTQ and AWQ checkpoints (Qwen's `-GPTQ-Int4` / `-GPTQ-Int8` / `-AWQ` layouts).

No network and no reference package: the checkpoints are built here from the tiny random checkpoint, with an
integer quantization (round to nearest, per group of input columns) and a NumPy packer both written in this file
from the formats' definitions (`qwen2vl_jax.quantization.gptq` is not used to make them):

* GPTQ (AutoGPTQ v1, `checkpoint_format: gptq`): `qweight` int32 `[I * bits / 32, O]`, input row `r * (32 / bits)
  + j` in bits `[j * bits, (j + 1) * bits)` of word row r (lowest first); `qzeros` int32 `[G, O * bits / 32]` the same
  along the output axis, storing zero - 1; `scales` fp16 `[G, O]`; `g_idx` int32 `[I]` (input i is in group
  g_idx[i]); weight `[o, i] = (q[i, o] - zero[g, o]) * scales[g, o]`, `g = g_idx[i]`.
* AWQ (AutoAWQ GEMM): `qweight` int32 `[I, O / 8]` and `qzeros` int32 `[G, O / 8]`, eight outputs a word along the
  output axis, field k (bits `[4k, 4k + 4)`) of word c holding output `8c + [0, 2, 4, 6, 1, 3, 5, 7][k]`; zeros
  stored as they are; `scales` fp16 `[G, O]`; groups contiguous.

The decoder layers' seven projections are quantized (q/k/v keep their fp16 bias); every other tensor is stored in
fp16, as in Qwen's repos. The reference is the fp32 model loaded from a plain checkpoint holding the same fp16
tensors and, for each quantized Linear, this file's own dequantization `(q - z) * s` (exact in fp32): the loaded
GPTQ / AWQ model must equal it parameter for parameter (dequantized formats), or hold exactly the expected int4
integers and scales and give its logits within 1e-5 relative (GPTQ-Int4 -> our int4). The tiny model's widths (64,
96) take groups of 32, which config.json says and loading honours.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file as st_load
from safetensors.numpy import save_file as st_save

import helpers
from qwen2vl_jax import Qwen2VLForConditionalGeneration
from qwen2vl_jax.checkpoints.keymap import CheckpointError
from qwen2vl_jax.modeling.parameters import checkpoint_params
from qwen2vl_jax.quantization import QuantizationError, quantize, quantized_linears

GROUP = 32
PROJECTION = re.compile(r"layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight$")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # field k of a word holds output 8c + AWQ_ORDER[k]
TOL = 1e-5

# name: (method, bits, sym, act_order, source checkpoint (tied, layout))
CASES = {
    "gptq_int4": ("gptq", 4, True, False, (False, "hub")),  # Qwen's GPTQ-Int4: our int4, losslessly
    "gptq_int8": ("gptq", 8, True, False, (False, "hub")),  # Qwen's GPTQ-Int8: dequantized
    "gptq_int4_actorder": ("gptq", 4, False, True, (False, "hub")),  # asymmetric, desc_act: dequantized
    "awq": ("awq", 4, False, False, (True, "new")),  # Qwen's AWQ (tied like the 2B, >= 4.52 names): dequantized
}


# ------------------------------------------------------------------------------------------ the definition
def quantize_rtn(w: np.ndarray, bits: int, sym: bool, g_idx: np.ndarray, rng, zero_min: int = 1) -> dict:
    """Round-to-nearest integers of a `[O, I]` weight in the groups `g_idx` names: `q [O, I]`, `z [O, G]` (sym:
    2^(bits-1); asym: in [zero_min, 2^bits - 1], both ends included: GPTQ v1 stores zero - 1, so its zeros start at
    1, AWQ's at 0), fp16 `s [O, G]`, and the fp32 weight they encode."""
    maxq = 2**bits - 1
    w = w.astype(np.float64)
    G = int(g_idx.max()) + 1
    O = w.shape[0]
    z, s = np.zeros((O, G), np.int64), np.zeros((O, G), np.float16)
    for g in range(G):
        cols = w[:, g_idx == g]
        if sym:
            s[:, g] = np.abs(cols).max(1) / (2 ** (bits - 1) - 1)
            z[:, g] = 2 ** (bits - 1)
        else:
            lo, hi = np.minimum(cols.min(1), 0), np.maximum(cols.max(1), 0)
            s[:, g] = (hi - lo) / maxq
            z[:, g] = np.clip(np.round(-lo / s[:, g].astype(np.float64)), zero_min, maxq)
    if not sym:  # the extreme zero points too
        z[rng.integers(0, O, 3), rng.integers(0, G, 3)] = zero_min
        z[rng.integers(0, O, 3), rng.integers(0, G, 3)] = maxq
    s = np.where(s == 0, np.float16(1), s)
    sf = s.astype(np.float64)[:, g_idx]
    q = np.clip(np.round(w / sf) + z[:, g_idx], 0, maxq).astype(np.int64)
    q[:, rng.integers(0, q.shape[1], 4)] = rng.integers(0, maxq + 1, (O, 4))  # the extremes too
    deq = (q - z[:, g_idx]) * sf
    assert np.array_equal(deq.astype(np.float32).astype(np.float64), deq)  # exact in fp32
    return {"q": q, "z": z, "s": s, "g_idx": g_idx.astype(np.int32), "w": deq.astype(np.float32)}


def pack_along_rows(v: np.ndarray, bits: int) -> np.ndarray:
    """`[R, C]` unsigned values -> int32 `[R * bits / 32, C]`: row `r * n + j` in bits `[j * bits, (j + 1) * bits)`."""
    n = 32 // bits
    v = v.astype(np.uint32).reshape(v.shape[0] // n, n, v.shape[1])
    word = np.zeros((v.shape[0], v.shape[2]), np.uint32)
    for j in range(n):
        word |= v[:, j, :] << np.uint32(bits * j)
    return word.view(np.int32)


def pack_gptq(case: dict, bits: int) -> dict:
    mask = 2**bits - 1
    return {"qweight": pack_along_rows(case["q"].T, bits),  # q^T [I, O], packed along I
            "qzeros": np.ascontiguousarray(pack_along_rows((case["z"] - 1) & mask, bits).T),  # along O, zero - 1
            "scales": np.ascontiguousarray(case["s"].T), "g_idx": case["g_idx"]}


def pack_awq_columns(v: np.ndarray) -> np.ndarray:
    """`[R, C]` 4-bit values -> int32 `[R, C / 8]` in AWQ's interleaved order."""
    v = v.astype(np.uint32).reshape(v.shape[0], -1, 8)
    word = np.zeros(v.shape[:2], np.uint32)
    for k in range(8):
        word |= v[:, :, AWQ_ORDER[k]] << np.uint32(4 * k)
    return word.view(np.int32)


def int4_expected(case: dict) -> tuple[np.ndarray, np.ndarray]:
    """Our int4 of a symmetric 4-bit GPTQ Linear: signed `q - 8`, two a byte, low nibble first; fp32 scales."""
    signed = (case["q"] - 8).astype(np.int64) & 0xF
    return (signed[:, 0::2] | (signed[:, 1::2] << 4)).astype(np.uint8), case["s"].astype(np.float32)


def decoder_projections(config) -> set[str]:
    return {f"language_model.layers.{i}.{m}" for i in range(config.text_config.num_hidden_layers)
            for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def quantization_config(name: str) -> dict:
    method, bits, sym, act, _ = CASES[name]
    if method == "gptq":  # Qwen's GPTQ repos' entry, in its groups of 32
        return {"bits": bits, "damp_percent": 0.1, "dataset": None, "desc_act": act, "group_size": GROUP,
                "modules_in_block_to_quantize": None, "quant_method": "gptq", "sym": sym, "true_sequential": True}
    return {"bits": 4, "group_size": GROUP, "modules_to_not_convert": ["visual"], "quant_method": "awq",
            "version": "gemm", "zero_point": True}


def write(directory: Path, source: Path, tensors: dict, quantization: dict | None) -> Path:
    directory.mkdir(parents=True)
    st_save(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["torch_dtype"] = "float16"
    if quantization is not None:
        config["quantization_config"] = quantization
    (directory / "config.json").write_text(json.dumps(config))
    return directory


class Built:
    """One case: the GPTQ / AWQ checkpoint, the fp32-equivalent reference checkpoint, and the drawn integers per
    module (Hub / >= 4.52 names as the source stores them)."""

    def __init__(self, name: str, source: Path, root: Path):
        method, bits, sym, act, _ = CASES[name]
        rng = np.random.default_rng(sum(map(ord, name)))
        packed, reference, self.cases = {}, {}, {}
        for key, w in st_load(str(source / "model.safetensors")).items():
            if not PROJECTION.search(key):
                packed[key] = reference[key] = w.astype(np.float16)
                continue
            module = key[: -len(".weight")]
            g_idx = np.arange(w.shape[1]) // GROUP
            case = self.cases[module] = quantize_rtn(w, bits, sym, rng.permutation(g_idx) if act else g_idx, rng,
                                                     zero_min=1 if method == "gptq" else 0)
            if method == "gptq":
                stored = pack_gptq(case, bits)
            else:
                stored = {"qweight": pack_awq_columns(case["q"].T), "qzeros": pack_awq_columns(case["z"].T),
                          "scales": np.ascontiguousarray(case["s"].T)}
            packed.update({f"{module}.{k}": v for k, v in stored.items()})
            reference[key] = case["w"]
        assert len(self.cases) == 14
        if not sym:
            assert {int(min(c["z"].min() for c in self.cases.values())),
                    int(max(c["z"].max() for c in self.cases.values()))} == {1 if method == "gptq" else 0, 15}
        self.quantized = write(root / name, source, packed, quantization_config(name))
        self.reference = write(root / f"{name}-reference", source, reference, None)


@pytest.fixture(scope="module")
def built(checkpoint_factory, tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("gptq_awq"), {}

    def get(name: str) -> Built:
        if name not in cache:
            tied, layout = CASES[name][4]
            cache[name] = Built(name, checkpoint_factory(tied=tied, layout=layout), root)
        return cache[name]

    return get


def arrays(model) -> dict[str, np.ndarray]:
    """Every parameter per layer (a scan_layers model's stacked ones sliced), as NumPy."""
    return {path: np.asarray(p[...] if i is None else p[...][i]) for path, (p, i) in checkpoint_params(model).items()}


def assert_identical(got: dict, want: dict) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:5]
    for path in want:
        assert got[path].dtype == want[path].dtype, (path, got[path].dtype, want[path].dtype)
        assert np.array_equal(got[path], want[path]), path


def logits_rel(model, reference, inputs) -> float:
    mask = inputs["attention_mask"].astype(bool)  # pad slots hold garbage
    got, want = np.asarray(model(**inputs).logits)[mask], np.asarray(reference(**inputs).logits)[mask]
    return float(np.abs(got - want).max() / np.abs(want).max())


def ours(module: str) -> str:
    from qwen2vl_jax.checkpoints.keymap import hf_to_ours

    return hf_to_ours(module + ".weight")[: -len(".weight")]


# -------------------------------------------------------------------------------------------------- GPTQ-Int4
def test_gptq_int4_loads_as_our_int4_losslessly(built, two_rows, tmp_path):
    """Symmetric 4-bit GPTQ in contiguous groups: each quantized Linear holds exactly `q - 8` (packed) and the fp16
    scales in fp32, in the config's groups; everything else is the reference's; logits within 1e-5 of the fp32 model
    holding the dequantized weights; `quantization="int4"`, scan_layers, a sharded copy and the model saved as our
    own int4 checkpoint give the same arrays."""
    b = built("gptq_int4")
    model = Qwen2VLForConditionalGeneration.from_pretrained(b.quantized)
    reference = Qwen2VLForConditionalGeneration.from_pretrained(b.reference)
    got, want = arrays(model), arrays(reference)
    assert set(quantized_linears(model)) == decoder_projections(model.config)
    for module, case in b.cases.items():
        q, scale = int4_expected(case)
        path = ours(module)
        assert got[f"{path}.weight"].dtype == np.uint8 and got[f"{path}.scale"].dtype == np.float32
        assert np.array_equal(got.pop(f"{path}.weight"), q), module
        assert np.array_equal(got.pop(f"{path}.scale"), scale), module
        assert scale.shape == (q.shape[0], 2 * q.shape[1] // GROUP)  # the config's groups of 32
        del want[f"{path}.weight"]
    assert_identical(got, want)  # biases, norms, embeddings, head, vision tower: the stored fp16 values in fp32
    rel = logits_rel(model, reference, two_rows)
    helpers.record("gptq/int4-as-int4/one_photo", rel_err=rel)
    assert rel <= TOL, rel
    everything = arrays(model)
    assert_identical(arrays(Qwen2VLForConditionalGeneration.from_pretrained(b.quantized, quantization="int4")),
                     everything)
    assert_identical(arrays(Qwen2VLForConditionalGeneration.from_pretrained(b.quantized, scan_layers=True)),
                     everything)
    # sharded, each Linear's qweight in one file and the rest of it in the other
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(b.quantized / "config.json", sharded)
    tensors = st_load(str(b.quantized / "model.safetensors"))
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    weight_map = {k: names[0] if k.endswith(".qweight") else names[1] for k in tensors}
    for f in names:
        st_save({k: v for k, v in tensors.items() if weight_map[k] == f}, str(sharded / f), metadata={"format": "pt"})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_identical(arrays(Qwen2VLForConditionalGeneration.from_pretrained(sharded)), everything)
    # and the model saves as our own int4 checkpoint, which loads as stored
    model.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]["group_size"] == GROUP
    assert_identical(arrays(Qwen2VLForConditionalGeneration.from_pretrained(tmp_path / "ours")), everything)


# ---------------------------------------------------------------------------------------- dequantized formats
@pytest.mark.parametrize("name", ["gptq_int8", "gptq_int4_actorder", "awq"])
def test_other_formats_load_as_their_exact_weights(built, two_rows, name):
    """GPTQ-Int8, act-order asymmetric GPTQ and AWQ (a tied model in the >= 4.52 names): every parameter equals the
    reference's bit for bit (the dequantized weight is exact in fp32), so the logits do too."""
    b = built(name)
    model = Qwen2VLForConditionalGeneration.from_pretrained(b.quantized)
    reference = Qwen2VLForConditionalGeneration.from_pretrained(b.reference)
    assert not quantized_linears(model)
    got = arrays(model)
    assert_identical(got, arrays(reference))
    case = next(iter(b.cases.values()))  # and against this file's numbers directly
    assert np.array_equal(got[f"{ours(next(iter(b.cases)))}.weight"], case["w"])
    rel = logits_rel(model, reference, two_rows)
    helpers.record(f"gptq/{name}-dequantized/one_photo", rel_err=rel)
    assert rel <= TOL, rel
    if name == "awq":
        assert_identical(arrays(Qwen2VLForConditionalGeneration.from_pretrained(b.quantized, scan_layers=True)), got)


def test_bfloat16_rounds_the_exact_weights_once(built):
    b = built("gptq_int8")
    model = Qwen2VLForConditionalGeneration.from_pretrained(b.quantized, dtype="bfloat16")
    assert_identical(arrays(model), arrays(Qwen2VLForConditionalGeneration.from_pretrained(b.reference,
                                                                                          dtype="bfloat16")))
    module, case = next(iter(b.cases.items()))
    assert np.array_equal(arrays(model)[f"{ours(module)}.weight"], case["w"].astype(ml_dtypes.bfloat16))


# ---------------------------------------------------------------------------------------- quantized again
@pytest.mark.parametrize("name, mode", [("awq", "int8"), ("awq", "int4"), ("gptq_int4", "int8")])
def test_quantization_requantizes_the_exact_weights(built, caplog, name, mode):
    """`quantization=` that the stored integers cannot give exactly: the checkpoint's quantized Linears (only those)
    become ours, quantized from the exact fp32 weights (int4 in the config's groups) -- what `quantize` makes of
    the reference model -- with a warning that this is lossy; in bf16 too (the integers are the same), and with
    scan_layers (quantized after loading)."""
    b = built(name)
    with caplog.at_level(logging.WARNING, logger="qwen2vl_jax.checkpoints.load"):
        model = Qwen2VLForConditionalGeneration.from_pretrained(b.quantized, quantization=mode)
    assert "re-quantizing" in caplog.text and "lossy" in caplog.text
    paths = decoder_projections(model.config)
    assert set(quantized_linears(model)) == paths
    reference = Qwen2VLForConditionalGeneration.from_pretrained(b.reference)
    quantize(reference, mode, targets="^(" + "|".join(re.escape(p) for p in paths) + ")$", group=GROUP)
    got = arrays(model)
    assert_identical(got, arrays(reference))
    if name == "awq" and mode == "int4":
        bf16 = arrays(Qwen2VLForConditionalGeneration.from_pretrained(b.quantized, quantization=mode,
                                                                      dtype="bfloat16"))
        for path in paths:
            for kind in ("weight", "scale"):
                assert np.array_equal(bf16[f"{path}.{kind}"], got[f"{path}.{kind}"]), path
        assert bf16["language_model.norm.weight"].dtype == ml_dtypes.bfloat16
        stacked = Qwen2VLForConditionalGeneration.from_pretrained(b.quantized, quantization=mode, scan_layers=True)
        assert_identical(arrays(stacked), got)


# ------------------------------------------------------------------------------------------------------- a mesh
MESH_CHILD = """
import json, sys
import jax, numpy as np
from qwen2vl_jax import sharding
from qwen2vl_jax.modeling.parameters import model_params
from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration
assert len(jax.devices()) == 4
out = {}
for name, path, quantization in json.loads(sys.argv[1]):
    one = Qwen2VLForConditionalGeneration.from_pretrained(path, quantization=quantization)
    tp = Qwen2VLForConditionalGeneration.from_pretrained(path, quantization=quantization,
                                                         mesh=sharding.make_mesh(data=2, model=2))
    a, b = model_params(one), model_params(tp)
    up = tp.language_model.layers[0].mlp.up_proj
    out[name] = {
        "identical": sorted(a) == sorted(b) and all(
            a[k][...].dtype == b[k][...].dtype and np.array_equal(np.asarray(a[k][...]), np.asarray(b[k][...]))
            for k in a),
        "up_proj": [str(up.weight[...].dtype), list(up.weight[...].sharding.spec)],
        "quantized": up.scale is not None}
print(json.dumps(out))
"""


def test_gptq_and_awq_load_onto_a_mesh(built):
    """On 4 (virtual CPU) devices, data=2 x model=2: each Linear's tensors are read whole and the slices each
    device holds taken from them; the parameters equal one device's (int4 from GPTQ-Int4, dequantized AWQ, and AWQ
    quantized again after loading)."""
    jobs = [("gptq_int4", str(built("gptq_int4").quantized), None), ("awq", str(built("awq").quantized), None),
            ("awq_int8", str(built("awq").quantized), "int8")]
    env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-c", MESH_CHILD, json.dumps(jobs)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert all(v["identical"] for v in out.values()), out
    assert out["gptq_int4"]["up_proj"] == ["uint8", ["model", None]] and out["gptq_int4"]["quantized"]
    assert out["awq"]["up_proj"] == ["float32", ["model", None]] and not out["awq"]["quantized"]
    assert out["awq_int8"]["up_proj"] == ["int8", ["model", None]] and out["awq_int8"]["quantized"]


# ------------------------------------------------------------------------------------------------------- errors
Q = "model.layers.0.self_attn.q_proj"
UP = "model.layers.1.mlp.up_proj"
AWQ_Q = "model.language_model.layers.0.self_attn.q_proj"


def _permute_g_idx(t):
    t[f"{UP}.g_idx"] = np.random.default_rng(0).permutation(t[f"{UP}.g_idx"])


@pytest.mark.parametrize("name, tensors, config, kwargs, message", [
    ("gptq_int4", None, lambda c: c.update(bits=3), {},
     r"config\.json: quantization_config: GPTQ bits 3 is not one of \(2, 4, 8\)"),
    ("gptq_int4", None, lambda c: c.update(checkpoint_format="marlin"), {},
     r"GPTQ checkpoint_format 'marlin' is not one of"),
    ("awq", None, lambda c: c.update(version="gemv"), {}, r"AWQ version 'gemv' is not 'gemm'"),
    ("awq", None, lambda c: c.update(zero_point=False), {}, r"AWQ without zero points is not read"),
    ("gptq_int4", lambda t: t.pop(f"{Q}.qzeros"), None, {}, rf"missing: {Q}\.qzeros \[2, 8\]"),
    ("gptq_int4", lambda t: t.update({f"{UP}.scales": t[f"{UP}.scales"].astype(np.float32)}), None, {},
     rf"wrong dtype: {UP}\.scales is float32, expected float16"),
    ("gptq_int4", None, lambda c: c.update(group_size=16), {},
     rf"wrong shape: {Q}\.qzeros expected \[4, 8\], found \[2, 8\] \(from qweight \[8, 64\] and "
     r"quantization_config's bits 4, group_size 16\)"),
    ("awq", lambda t: t.update({f"{AWQ_Q}.g_idx": np.arange(64, dtype=np.int32)}), None, {},
     rf"unexpected: {AWQ_Q}\.g_idx \(AWQ Linears store qweight, qzeros, scales\)"),
    # the config vouches for symmetric zeros and contiguous groups; a Linear that has neither is named
    ("gptq_int4_actorder", None, lambda c: c.update(sym=True, desc_act=False), {},
     r"model\.layers\.\d\.[a-z_.]+: qzeros hold zero points other than 8, although quantization_config says "
     r"sym: true"),
    ("gptq_int4", _permute_g_idx, None, {},
     rf"{UP}: g_idx is not i // 32 \(act-order groups\), although quantization_config says desc_act: false"),
    ("gptq_int4", None, None, {"dtype": "auto"}, r"dtype='auto' is float16 for .*pass dtype='bfloat16' or "
     r"'float32'"),
    ("gptq_int4", None, None, {"quantization": "int3"}, r"unknown quantization 'int3'"),
], ids=["bits_3", "marlin", "awq_gemv", "awq_without_zero_point", "missing_qzeros", "fp32_scales",
        "group_size_not_the_tensors", "awq_with_g_idx", "sym_but_zeros_not_8", "no_desc_act_but_act_order",
        "auto_dtype_is_fp16", "unknown_mode"])
def test_bad_gptq_awq_checkpoints_fail_by_name(built, tmp_path, name, tensors, config, kwargs, message):
    src = built(name).quantized
    d = tmp_path / "bad"
    shutil.copytree(src, d)
    if tensors is not None:
        t = st_load(str(d / "model.safetensors"))
        tensors(t)
        st_save(t, str(d / "model.safetensors"))
    if config is not None:
        cfg = json.loads((d / "config.json").read_text())
        config(cfg["quantization_config"])
        (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((CheckpointError, QuantizationError, ValueError), match=message):
        Qwen2VLForConditionalGeneration.from_pretrained(d, **kwargs)


def test_no_quantized_tensors_and_convert_are_refused(built, tmp_path):
    from qwen2vl_jax.checkpoints.convert import convert

    b = built("gptq_int4")
    d = tmp_path / "plain-with-gptq-config"
    shutil.copytree(b.reference, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = quantization_config("gptq_int4")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"quant_method 'gptq', but no tensor is a quantized Linear's"):
        Qwen2VLForConditionalGeneration.from_pretrained(d)
    with pytest.raises(QuantizationError, match=r"is a GPTQ 4-bit \(sym, groups of 32\) checkpoint, whose tensors "
                                                r"convert does not rewrite"):
        convert(b.quantized, tmp_path / "out", format="flax", progress=False)
    assert not (tmp_path / "out").exists()
