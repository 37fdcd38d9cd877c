"""Weight-only quantization (`qwen2vl_jax.quantization`), checked against a reference written here from the
definition (symmetric absmax: int8 per output channel, int4 per group of input columns, round half to even), not
against the code under test.

Exactness of the machinery, independent of rounding: the quantized model's logits equal those of the fp32 model
whose targeted weights were replaced by the reference `dequantize(quantize(W))`, within 1e-5 relative, on a photo,
a video and a left-padded batch, with every attention backend that runs on this CPU; greedy tokens identical.
Bytes: integers + scales against the fp32 bytes of the targeted weights.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from qwen2vl_jax import Qwen2VLForConditionalGeneration, kernels
from qwen2vl_jax.modeling.parameters import model_params
from qwen2vl_jax.quantization import DEFAULT_TARGETS, quantize, quantized_linears

GROUP = 32  # the tiny model's widths (64, 96) are multiples of 32, not of 128
BACKENDS = ["xla", "jax"] + (["cpu"] if kernels.available() else [])


def reference_roundtrip(w: np.ndarray, mode: str) -> np.ndarray:
    """dequantize(quantize(w)) from the definition, in NumPy fp32 arithmetic as the format specifies (the quotient
    w / scale rounded to fp32 first: over the 10^7 weights of a 151936-row head, float64 quotients round a few
    near-ties the other way)."""
    w = np.asarray(w, np.float32)
    if mode == "int8":
        amax = np.abs(w).max(axis=-1, keepdims=True)
        scale = np.where(amax > 0, amax / np.float32(127), np.float32(1)).astype(np.float32)
        q = np.clip(np.round(w / scale), -127, 127)
        return (q * scale).astype(np.float32)
    O, I = w.shape
    g = w.reshape(O, I // GROUP, GROUP)
    amax = np.abs(g).max(axis=-1, keepdims=True)
    scale = np.where(amax > 0, amax / np.float32(7), np.float32(1)).astype(np.float32)
    q = np.clip(np.round(g / scale), -8, 7)
    return (q * scale).reshape(O, I).astype(np.float32)


@pytest.fixture(scope="module")
def inputs(hf_tokenizer, photos):
    return {case: helpers.parity_inputs(hf_tokenizer, photos, case) for case in ("one_photo", "video",
                                                                                   "left_padded_batch")}


def output_projections(config) -> int:
    """The quantized Linears beside the decoder's 7 per layer: lm_head and embed_tokens (untied), or the tied
    embedding alone."""
    return 1 if config.tie_word_embeddings else 2


@pytest.mark.parametrize("mode, tied", [("int8", False), ("int4", False), ("int8", True), ("int4", True)])
def test_quantized_logits_equal_the_dequantized_fp32_models(checkpoint_factory, inputs, mode, tied):
    """Untied: lm_head and the embedding table are quantized separately; tied (the 2B): the one embedding is both
    the lookup (rows dequantized as they are read) and the output projection (`quantized_dense`)."""
    import re

    checkpoint = checkpoint_factory(tied=tied)
    ours = quantize(Qwen2VLForConditionalGeneration.from_pretrained(checkpoint), mode, group=GROUP)
    reference = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint)
    pattern = re.compile(DEFAULT_TARGETS)
    replaced = 0
    for path, p in model_params(reference).items():
        if path.endswith(".weight") and pattern.search(path[: -len(".weight")]):
            p.set_value(jnp.asarray(reference_roundtrip(np.asarray(p[...]), mode)))
            replaced += 1
    layers = reference.config.text_config.num_hidden_layers
    assert reference.config.tie_word_embeddings == tied
    assert replaced == 7 * layers + output_projections(reference.config) == len(quantized_linears(ours))
    for backend in BACKENDS:
        ours.set_attn_implementation(backend)
        reference.set_attn_implementation(backend)
        for case, x in inputs.items():
            got = np.asarray(ours(**x).logits)
            want = np.asarray(reference(**x).logits)
            rel = np.abs(got - want).max() / np.abs(want).max()
            assert rel <= 1e-5, (mode, backend, case, rel)
            helpers.record(f"quantized/{mode}/{'tied' if tied else 'untied'}/{case}/attn={backend}",
                           rel_err=float(rel))
        x = inputs["left_padded_batch"]
        a = ours.generate(**x, max_new_tokens=8, do_sample=False)
        b = reference.generate(**x, max_new_tokens=8, do_sample=False)
        assert np.array_equal(np.asarray(a), np.asarray(b)), (mode, backend)
    # and the quantization is not a no-op: the fp32 model's own logits differ
    plain = np.asarray(Qwen2VLForConditionalGeneration.from_pretrained(checkpoint)(**inputs["one_photo"]).logits)
    assert np.abs(plain - np.asarray(ours(**inputs["one_photo"]).logits)).max() > 1e-4


@pytest.mark.parametrize("mode, bound", [("int8", 0.27), ("int4", 0.16)])
def test_bytes_of_the_targeted_weights(tiny_checkpoint, mode, bound):
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    fp32 = {p: lin.weight[...].size * 4 for p, lin in _targets(model).items()}
    quantize(model, mode, group=GROUP)
    stored = {p: lin.weight[...].nbytes + lin.scale[...].nbytes for p, lin in quantized_linears(model).items()}
    assert set(stored) == set(fp32)
    assert sum(stored.values()) / sum(fp32.values()) <= bound, sum(stored.values()) / sum(fp32.values())


def _targets(model):
    import re

    from flax import nnx

    from qwen2vl_jax.modeling.parameters import param_path
    from qwen2vl_jax.quantization.apply import QUANTIZABLE

    pattern = re.compile(DEFAULT_TARGETS)
    return {param_path(p): m for p, m in nnx.iter_modules(model) if isinstance(m, QUANTIZABLE)
            and pattern.search(param_path(p))}


def test_bad_requests_fail_by_name(tiny_checkpoint):
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    with pytest.raises(ValueError, match="unknown quantization 'int3'"):
        quantize(model, "int3")
    with pytest.raises(ValueError, match="embed_tokens: int4 groups of 128 need an input width that is a multiple "
                                         "of it, got 64"):
        quantize(model, "int4")
    with pytest.raises(ValueError, match="matches no Linear"):
        quantize(model, "int8", targets=r"^nothing$")
    quantize(model, "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(model, "int8")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qlora_gradients_equal_the_dequantized_models(tiny_checkpoint, inputs, mode):
    """LoRA adapters over the frozen integers: their gradients equal those over the fp32 model holding the
    reference dequantized weights (same adapters, B drawn non-zero so A's gradient is too), within 1e-5."""
    import re

    from flax import nnx

    from qwen2vl_jax.lora import apply_lora
    from qwen2vl_jax.modeling.parameters import LoRAParam
    from qwen2vl_jax.training import causal_lm_loss

    def build(quantized: bool):
        model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
        if quantized:
            quantize(model, mode, group=GROUP)
        else:
            pattern = re.compile(DEFAULT_TARGETS)
            for path, p in model_params(model).items():
                if path.endswith(".weight") and pattern.search(path[: -len(".weight")]):
                    p.set_value(jnp.asarray(reference_roundtrip(np.asarray(p[...]), mode)))
        for i, lin in enumerate(apply_lora(model, 4, seed=0).values()):
            lin.lora.lora_B.set_value(0.05 * jnp.asarray(np.random.default_rng(i).standard_normal(
                lin.lora.lora_B.shape), jnp.float32))
        return model

    x = inputs["one_photo"]
    labels = np.asarray(x["input_ids"]).copy()

    def grads(model):
        loss = lambda m: causal_lm_loss(m, labels=labels, **x)[0]
        g = nnx.grad(loss, argnums=nnx.DiffState(0, LoRAParam))(model)
        return {k: np.asarray(v) for k, v in nnx.to_flat_state(g)}

    got, want = grads(build(True)), grads(build(False))
    assert set(got) == set(want) and len(got) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    scale = max(np.abs(v).max() for v in want.values())
    worst = max(np.abs(got[k] - want[k]).max() for k in want) / scale
    assert scale > 0 and worst <= 1e-5, worst
    helpers.record(f"quantized/{mode}/qlora_grads", rel_err=float(worst))


def _arrays(model) -> dict[str, np.ndarray]:
    return {path: np.asarray(p[...]) for path, p in model_params(model).items()}


@pytest.mark.parametrize("mode, fixture", [("int8", "tiny_checkpoint"), ("int4", "slice_2b_checkpoint")])
def test_quantize_on_load_streams_to_the_same_arrays(mode, fixture, request):
    """`from_pretrained(path, quantization=...)` quantizes each weight as it streams in: the same integers and
    scales as quantizing the loaded full-precision model (the 2B-width slice for int4: groups of 128)."""
    ckpt = request.getfixturevalue(fixture)
    streamed = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, quantization=mode)
    after = quantize(Qwen2VLForConditionalGeneration.from_pretrained(ckpt), mode)
    got, want = _arrays(streamed), _arrays(after)
    assert set(got) == set(want) and any(path.endswith(".scale") for path in got)
    for path in want:
        assert got[path].dtype == want[path].dtype and np.array_equal(got[path], want[path]), path
    config = streamed.config
    assert len(quantized_linears(streamed)) == 7 * config.text_config.num_hidden_layers + output_projections(config)


def test_plan_counts_the_quantized_bytes(tiny_checkpoint, capsys):
    """The plan's parameter bytes are the quantized model's arrays' bytes; on the real presets, the 72B in int8 on
    `model=8` and the 7B in int4 on one device fit a 16 GiB chip (bf16 does not / barely)."""
    from qwen2vl_jax import cli
    from qwen2vl_jax.sharding.plan import plan

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, quantization="int8")
    one = {"data": 1, "fsdp": 1, "model": 1}
    planned = plan(model.config, one, batch=1, context=64, dtype="float32", quantization="int8").params
    assert planned.per_device == sum(a.nbytes for a in _arrays(model).values())

    def params_gib(*argv):
        assert cli.main(["plan", *argv, "--batch", "1", "--context", "8192", "--json"]) == 0
        return json_load(capsys.readouterr().out)["parameters"]["bytes_per_device"] / 2**30

    bf16_72b, int8_72b = (params_gib("--model", "72b", "--mesh", "model=8", *q) for q in ([], ["--quantize", "int8"]))
    assert bf16_72b > 16 > int8_72b and int8_72b < 0.6 * bf16_72b
    bf16_7b, int4_7b = (params_gib("--model", "7b", *q) for q in ([], ["--quantize", "int4"]))
    assert int4_7b < 0.5 * bf16_7b and int4_7b < 16


def json_load(text: str) -> dict:
    import json

    return json.loads(text.strip().splitlines()[-1])


def test_cli_quantize_errors_are_one_line(tiny_checkpoint, capsys):
    """`--quantize int4` on a model whose widths its groups of 128 do not divide: one line, exit 2, before any
    generation."""
    from qwen2vl_jax import cli

    assert cli.main(["generate", "--model", str(tiny_checkpoint), "--prompt", "Hi", "--max-new-tokens", "2",
                     "--quantize", "int4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "int4 groups of 128 need an input width that is a multiple of it" in err and len(err.splitlines()) == 1


def test_merging_into_quantized_weights_is_refused(tiny_checkpoint, tmp_path):
    """Folding an adapter into integers would silently corrupt the weights: refused by name; and a QLoRA model's
    base cannot be saved with its adapters unmerged (the error says to save the adapters), nothing is written.
    (Quantized checkpoints themselves: tests/quantization/test_quantized_checkpoints.py.)"""
    from qwen2vl_jax.lora import LoRAError, apply_lora, merge_lora

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, quantization="int8")
    apply_lora(model, 2)
    with pytest.raises(ValueError, match="unmerged LoRA adapters.*save them with qwen2vl_jax.lora.save_adapter"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(LoRAError, match="cannot merge adapters into quantized weights"):
        merge_lora(model)


def test_hooks_and_scan_layers_on_a_quantized_model(tiny_checkpoint, inputs):
    """The quantized model keeps its hook points (every text residual stream and the logits recorded equal those of
    the dequantized fp32 model, within 1e-5) and `scan_layers` (stacked integers and scales: logits equal the
    unrolled quantized model's within 1e-6)."""
    import re

    from qwen2vl_jax.hooks import run_with_cache

    x = inputs["one_photo"]
    ours = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, quantization="int8")
    reference = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    pattern = re.compile(DEFAULT_TARGETS)
    for path, p in model_params(reference).items():
        if path.endswith(".weight") and pattern.search(path[: -len(".weight")]):
            p.set_value(jnp.asarray(reference_roundtrip(np.asarray(p[...]), "int8")))
    names = "text.layers.*.resid_post"
    out, got = run_with_cache(ours, names, **x)
    _, want = run_with_cache(reference, names, **x)
    assert len(got) == reference.config.text_config.num_hidden_layers and set(got) == set(want)
    for name in want:
        w = np.asarray(want[name])
        assert np.abs(np.asarray(got[name]) - w).max() / np.abs(w).max() <= 1e-5, name

    stacked = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, quantization="int8", scan_layers=True)
    scale = stacked.language_model.layers.mlp.down_proj.scale[...]
    assert scale.shape[0] == stacked.config.text_config.num_hidden_layers  # one scale row per stacked layer
    a, b = np.asarray(stacked(**x).logits), np.asarray(out.logits)
    assert np.abs(a - b).max() / np.abs(b).max() <= 1e-6
