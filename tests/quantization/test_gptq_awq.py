"""`qwen2vl_jax.quantization.gptq` against a reference implementation of the GPTQ and AWQ formats.

The oracle is GPTQModel (the maintained successor of AutoGPTQ, which wrote Qwen's GPTQ checkpoints): its CPU torch
kernel `TorchQuantLinear` (GPTQ) and `AwqGEMMQuantLinear` + AutoAWQ's `dequantize_gemm` (AWQ, vendored by GPTQModel
verbatim). The packed tensors are made BY the oracle's own packing code, not ours: the test draws random integers,
zero points, fp16 scales (and act-order `g_idx`), builds the float weight they encode, and the oracle packs it
(`pack_original`, GPTQModel's default packer, then its v2 -> v1 conversion, as it saves a `checkpoint_format: gptq`
checkpoint; AWQ: `AwqGEMMQuantLinear.pack`, AutoAWQ's `WQLinear_GEMM.from_linear` packing). The oracle then reads
those tensors back as it loads a checkpoint (v1 -> v2, `dequantize_weight`; `dequantize_gemm`), and our NumPy
dequantization must agree.

Tolerance: none. Our fp32 weight is `(q - zero) * scale` exactly (<= 8-bit integer times an fp16 scale: <= 19
significant bits, exact in fp32), checked bit for bit against the integers drawn here; the oracle computes the same
product in fp16 (torch rounds an fp16 product once, correctly), so our weight cast to fp16 must equal its output bit
for bit -- including scales small enough to give fp16 subnormals.

GPTQModel imports heavy machinery (thread pools, a safetensors monkeypatch), so it runs in a subprocess, once per
module; the test is skipped when it is not installed. Install it without touching the pinned packages:
    BUILD_CUDA_EXT=0 pip install --no-deps --no-build-isolation gptqmodel==5.6.12 pypcre==0.6.4 logbar==0.4.15 \\
        tokenicer==0.0.14 device-smi==0.5.7 threadpoolctl==3.8.0
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qwen2vl_jax.quantization.formats import QuantizationError
from qwen2vl_jax.quantization.gptq import (
    AWQ_ORDER,
    ExternalQuantization,
    dequantize_awq,
    dequantize_gptq,
    gptq_to_int4,
    packed_shapes,
    unpack_awq,
    unpack_gptq_weight,
    unpack_gptq_zeros,
)

# (name, bits, I, O, group, symmetric, act_order)
GPTQ_CASES = [
    ("int4_sym", 4, 256, 64, 128, True, False),  # Qwen's GPTQ-Int4
    ("int8_sym", 8, 256, 64, 128, True, False),  # Qwen's GPTQ-Int8
    ("int4_asym_actorder", 4, 384, 96, 128, False, True),
    ("int8_asym_actorder", 8, 384, 160, 128, False, True),
    ("int2_sym_g64", 2, 256, 64, 64, True, False),
]  # (the reference packers need O % 32 == 0)
# (name, I, O, group)
AWQ_CASES = [
    ("g128", 256, 64, 128),  # Qwen's AWQ
    ("g64", 384, 160, 64),
]


def _scales(rng, shape) -> np.ndarray:
    """Positive fp16 scales over a wide range of magnitudes (2^-20 .. 2^-2: products reach fp16 subnormals)."""
    return (rng.uniform(1, 2, shape) * 2.0 ** rng.integers(-20, -2, shape)).astype(np.float16)


def _gptq_case(seed, bits, I, O, group, sym, act_order):
    rng = np.random.default_rng(seed)
    maxq, G = 2**bits - 1, I // group
    q = rng.integers(0, maxq + 1, (O, I))
    # v1 stores zero - 1: a zero of 0 has no v1 form (AutoGPTQ and GPTQModel read it differently), so zeros >= 1
    z = np.full((O, G), 2 ** (bits - 1)) if sym else rng.integers(1, maxq + 1, (O, G))
    g_idx = np.arange(I) // group
    if act_order:
        g_idx = rng.permutation(g_idx)
    return {"q": q, "z": z, "s": _scales(rng, (O, G)), "g_idx": g_idx.astype(np.int32)}


def _awq_case(seed, I, O, group):
    rng = np.random.default_rng(seed)
    G = I // group
    return {"q": rng.integers(0, 16, (O, I)), "z": rng.integers(0, 16, (O, G)), "s": _scales(rng, (O, G))}


def _truth(case, g_idx) -> np.ndarray:
    """The fp32 weight `[O, I]` the drawn integers encode (float64 arithmetic, exact, then fp32: exact too)."""
    w = (case["q"] - case["z"][:, g_idx]) * case["s"].astype(np.float64)[:, g_idx]
    assert np.array_equal(w.astype(np.float32).astype(np.float64), w)
    return w.astype(np.float32)


ORACLE = textwrap.dedent(r"""
    import os, sys
    os.environ["GPTQMODEL_DISABLE_PACK_EXT"] = "1"  # the pure-torch packers, no JIT-compiled extension
    from types import SimpleNamespace
    import numpy as np, torch
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear
    from gptqmodel.nn_modules.qlinear.torch import TorchQuantLinear
    from gptqmodel.nn_modules.qlinear.gemm_awq import AwqGEMMQuantLinear
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module, convert_gptq_v2_to_v1_format_module

    inp = np.load(sys.argv[1])
    out = {}
    names = sorted({k.split("/")[0] for k in inp.files})
    for name in names:
        a = {k.split("/")[1]: inp[k] for k in inp.files if k.startswith(name + "/")}
        bits, group = int(a["bits"]), int(a["group"])
        q, z, s = a["q"], a["z"], a["s"]
        O, I = q.shape
        if name.startswith("gptq"):
            g = a["g_idx"].astype(np.int64)
            w = (q - z[:, g]) * s.astype(np.float32)[:, g]  # exact in fp32
            lin = torch.nn.Linear(I, O, bias=False)
            lin.weight.data = torch.from_numpy(w.astype(np.float32))
            m = TorchQuantLinear(bits=bits, group_size=group, sym=bool(a["sym"]), desc_act=bool(a["act_order"]),
                                 in_features=I, out_features=O, bias=False)
            m.pack_original(lin, torch.from_numpy(s.astype(np.float32)), torch.from_numpy(z.astype(np.int32)),
                            torch.from_numpy(a["g_idx"]))
            convert_gptq_v2_to_v1_format_module(m, SimpleNamespace(bits=bits))  # as saved: checkpoint_format gptq
            for k in ("qweight", "qzeros", "scales", "g_idx"):
                out[f"{name}/{k}"] = getattr(m, k).numpy().copy()
            convert_gptq_v1_to_v2_format_module(m, bits, torch.int32)  # as loaded
            PackableQuantLinear.post_init(m)  # its unpacking buffers (TorchQuantLinear.post_init would torch.compile)
            ref = m.dequantize_weight()  # [I, O] fp16
        else:
            lin = torch.nn.Linear(I, O, bias=False)
            lin.weight.data = torch.from_numpy(
                ((q - np.repeat(z, group, 1)) * np.repeat(s.astype(np.float32), group, 1)).astype(np.float32))
            m = AwqGEMMQuantLinear(bits=bits, group_size=group, sym=False, desc_act=False, in_features=I,
                                   out_features=O, bias=False, register_buffers=True)
            m.pack(lin, torch.from_numpy(s.astype(np.float32)), torch.from_numpy(z.astype(np.int32)))
            for k in ("qweight", "qzeros", "scales"):
                out[f"{name}/{k}"] = getattr(m, k).numpy().copy()
            ref = dequantize_gemm(m.qweight, m.qzeros, m.scales, bits, group)  # [I, O] fp16
        assert ref.dtype == torch.float16, ref.dtype
        out[f"{name}/ref"] = ref.numpy()
    np.savez(sys.argv[2], **out)
""")


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    if importlib.util.find_spec("gptqmodel") is None:
        pytest.skip("gptqmodel (the GPTQ / AWQ reference implementation) is not installed")
    d = tmp_path_factory.mktemp("gptq_oracle")
    cases, inputs = {}, {}
    for seed, (name, bits, I, O, group, sym, act) in enumerate(GPTQ_CASES):
        case = _gptq_case(seed, bits, I, O, group, sym, act)
        cases["gptq_" + name] = case
        inputs.update({f"gptq_{name}/{k}": v for k, v in case.items()})
        inputs.update({f"gptq_{name}/bits": bits, f"gptq_{name}/group": group, f"gptq_{name}/sym": sym,
                       f"gptq_{name}/act_order": act})
    for seed, (name, I, O, group) in enumerate(AWQ_CASES, start=100):
        case = _awq_case(seed, I, O, group)
        cases["awq_" + name] = case
        inputs.update({f"awq_{name}/{k}": v for k, v in case.items()})
        inputs.update({f"awq_{name}/bits": 4, f"awq_{name}/group": group})
    np.savez(d / "in.npz", **inputs)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), CUDA_VISIBLE_DEVICES="")
    r = subprocess.run([sys.executable, "-c", ORACLE, str(d / "in.npz"), str(d / "out.npz")], env=env, cwd=d,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    with np.load(d / "out.npz") as f:
        out = {k: f[k] for k in f.files}
    return cases, out


def _stored(out, name):
    return {k.split("/")[1]: v for k, v in out.items() if k.startswith(name + "/")}


def _assert_matches_oracle(ours: np.ndarray, truth: np.ndarray, ref_IO: np.ndarray) -> None:
    assert ours.dtype == np.float32 and ours.shape == truth.shape
    np.testing.assert_array_equal(ours.view(np.uint32), truth.view(np.uint32))  # exact, bit for bit
    assert ref_IO.dtype == np.float16 and ref_IO.shape == truth.shape[::-1]
    np.testing.assert_array_equal(ours.T.astype(np.float16).view(np.uint16), ref_IO.view(np.uint16))


@pytest.mark.parametrize("case", GPTQ_CASES, ids=[c[0] for c in GPTQ_CASES])
def test_gptq_dequantization_matches_reference(oracle, case):
    name, bits, I, O, group, sym, act = case
    cases, out = oracle
    drawn, stored = cases["gptq_" + name], _stored(out, "gptq_" + name)
    expected = packed_shapes("gptq", bits, I, O, group)
    assert {k: (v.shape, v.dtype) for k, v in stored.items() if k != "ref"} == expected
    # the oracle's packing, read back: the integers, the zero points (v1: stored zero - 1), the groups
    np.testing.assert_array_equal(unpack_gptq_weight(stored["qweight"], bits), drawn["q"].T)
    np.testing.assert_array_equal(unpack_gptq_zeros(stored["qzeros"], bits), drawn["z"].T)
    np.testing.assert_array_equal(stored["g_idx"], drawn["g_idx"])
    if sym:  # Qwen's symmetric checkpoints: every stored zero field is 2**(bits-1) - 1 (0x77777777 / 0x7f7f7f7f)
        word = sum((2 ** (bits - 1) - 1) << (bits * j) for j in range(32 // bits))
        assert np.all(stored["qzeros"].view(np.uint32) == word)
    ours = dequantize_gptq(stored["qweight"], stored["qzeros"], stored["scales"], stored["g_idx"], bits=bits)
    _assert_matches_oracle(ours, _truth(drawn, drawn["g_idx"]), stored["ref"])
    if not act:  # contiguous groups: g_idx may be left out
        again = dequantize_gptq(stored["qweight"], stored["qzeros"], stored["scales"], bits=bits)
        np.testing.assert_array_equal(again, ours)


@pytest.mark.parametrize("case", AWQ_CASES, ids=[c[0] for c in AWQ_CASES])
def test_awq_dequantization_matches_reference(oracle, case):
    name, I, O, group = case
    cases, out = oracle
    drawn, stored = cases["awq_" + name], _stored(out, "awq_" + name)
    assert {k: (v.shape, v.dtype) for k, v in stored.items() if k != "ref"} == packed_shapes("awq", 4, I, O, group)
    np.testing.assert_array_equal(unpack_awq(stored["qweight"]), drawn["q"].T)
    np.testing.assert_array_equal(unpack_awq(stored["qzeros"]), drawn["z"].T)
    ours = dequantize_awq(stored["qweight"], stored["qzeros"], stored["scales"], group_size=group)
    _assert_matches_oracle(ours, _truth(drawn, np.arange(I) // group), stored["ref"])


def test_gptq_int4_maps_onto_our_int4_losslessly(oracle):
    from qwen2vl_jax.quantization.formats import dequantize

    cases, out = oracle
    stored = _stored(out, "gptq_int4_sym")
    args = stored["qweight"], stored["qzeros"], stored["scales"], stored["g_idx"]
    packed, scale, group = gptq_to_int4(*args)
    assert packed.dtype == np.uint8 and packed.shape == (64, 128) and scale.dtype == np.float32
    assert scale.shape == (64, 2) and group == 128
    w = np.asarray(dequantize(packed, scale))
    np.testing.assert_array_equal(w.view(np.uint32), dequantize_gptq(*args, bits=4).view(np.uint32))
    # what has no exact int4 form is refused, not approximated
    for name, bits in (("gptq_int4_asym_actorder", 4), ("gptq_int8_sym", 8)):
        s = _stored(out, name)
        with pytest.raises(QuantizationError):
            gptq_to_int4(s["qweight"], s["qzeros"], s["scales"], s["g_idx"], bits=bits)


def test_awq_order_and_v1_zeros_by_hand():
    """The two layouts' bit positions, checked on hand-made words (no oracle needed)."""
    # AWQ: field k of a word holds output AWQ_ORDER[k]; outputs 0..7 with values 1..8 (8 -> stored 8)
    values = np.arange(1, 9)
    word = sum(int(values[AWQ_ORDER[k]]) << (4 * k) for k in range(8))
    np.testing.assert_array_equal(unpack_awq(np.array([[word]], np.uint32).view(np.int32)), [values])
    # GPTQ: qweight packs rows (inputs) lowest bits first; v1 qzeros store zero - 1, field by field
    np.testing.assert_array_equal(unpack_gptq_weight(np.array([[0x76543210]], np.int32), 4).ravel(), range(8))
    np.testing.assert_array_equal(unpack_gptq_zeros(np.array([[0x77777777]], np.int32), 4), [[8] * 8])
    np.testing.assert_array_equal(unpack_gptq_zeros(np.array([[0x7F7F7F7F]], np.int32), 8), [[128] * 4])
    np.testing.assert_array_equal(unpack_gptq_zeros(np.array([[0x7F7F7F7F]], np.int32), 8, "gptq_v2"), [[127] * 4])


def test_qwen_configs():
    """Qwen's published quantization_config entries (Qwen2-VL-*-Instruct-GPTQ-Int4 / -AWQ) are read; others refused."""
    gptq = ExternalQuantization.from_config({"bits": 4, "damp_percent": 0.1, "dataset": None, "desc_act": False,
                                             "group_size": 128, "modules_in_block_to_quantize": None,
                                             "quant_method": "gptq", "sym": True, "true_sequential": True})
    assert (gptq.method, gptq.bits, gptq.group_size, gptq.sym, gptq.checkpoint_format) == ("gptq", 4, 128, True, "gptq")
    assert gptq.tensor_shapes(3584, 18944)["qweight"] == ((448, 18944), np.dtype(np.int32))
    assert gptq.features((448, 18944)) == (3584, 18944) and gptq.exact_int4  # GPTQ-Int4 loads as our int4
    int8 = ExternalQuantization.from_config({"bits": 8, "desc_act": False, "group_size": 128, "quant_method": "gptq",
                                             "sym": True})
    assert not int8.exact_int4 and int8.features((896, 18944)) == (3584, 18944)
    awq = ExternalQuantization.from_config({"bits": 4, "group_size": 128, "modules_to_not_convert": ["visual"],
                                            "quant_method": "awq", "version": "gemm", "zero_point": True})
    assert (awq.method, awq.skip) == ("awq", ("visual",)) and not awq.exact_int4
    assert awq.features((18944, 448)) == (18944, 3584)
    assert awq.tensor_shapes(18944, 3584) == {"qweight": ((18944, 448), np.dtype(np.int32)),
                                              "qzeros": ((148, 448), np.dtype(np.int32)),
                                              "scales": ((148, 3584), np.dtype(np.float16))}
    for bad in ({"quant_method": "gptq", "bits": 3, "group_size": 128},
                {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"},
                {"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"},
                {"quant_method": "gptq", "bits": 4, "group_size": 128, "is_marlin_format": True},
                {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False},
                {"quant_method": "fp8", "bits": 8, "group_size": 128}):
        with pytest.raises(QuantizationError):
            ExternalQuantization.from_config(bad)
