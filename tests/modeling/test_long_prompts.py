"""Long prompts in bounded memory: the decoder's prefill attention in query blocks with an online softmax over key
blocks (`attention.xla.chunked_attention`), the same numbers as one softmax over whole rows."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from qwen2vl_jax import hooks
from qwen2vl_jax.attention import xla
from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration


@pytest.mark.parametrize("B, T, S, N, K, H, blocks", [
    (2, 700, 700, 4, 2, 16, (256, 384)),  # a prefill: causal, blocks that do not divide T or S
    (1, 1300, 2100, 12, 2, 32, (512, 1024)),  # queries after a filled cache, GQA 6
])
def test_chunked_attention_equals_whole_row_softmax(B, T, S, N, K, H, blocks):
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in ((B, T, N, H), (B, S, K, H),
                                                                                   (B, S, K, H)))
    causal = jnp.arange(S)[None, :] <= (S - T + jnp.arange(T))[:, None]
    valid = jnp.asarray(rng.random((B, S)) > 0.2).at[:, -1].set(True)
    if B > 1:
        valid = valid.at[0].set(False)  # a row with no allowed slot: the reference averages every slot
    allowed = causal[None] & valid[:, None, :]
    want = xla.attention_with_probs(q, k, v, allowed)[0]
    got = jax.jit(lambda *a: xla.chunked_attention(*a, query_block=blocks[0], key_block=blocks[1]))(q, k, v, allowed)
    assert helpers.rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("tower", ["text", "vision"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mlp_in_row_blocks_equals_the_whole_call(tower, dtype, monkeypatch):
    """A long prefill's (or a large image's) MLP runs in row blocks (layers.MLP_ROW_BLOCK): every row's numbers are
    the whole call's, the hook point `mlp.act` still sees every row, and short calls are untouched."""
    from flax import nnx

    from qwen2vl_jax.modeling import hook_points, layers, text, vision
    from qwen2vl_jax.modeling.config import Qwen2VLConfig
    from qwen2vl_jax.testing import demo

    config = Qwen2VLConfig.from_hf(demo.TINY_HF_CONFIG)
    if tower == "text":
        mlp = text.MLP(config.text_config, param_dtype=dtype, rngs=nnx.Rngs(0), name="text.layers.0.mlp", layer=0)
        width = config.text_config.hidden_size
        shape, name, act_width = (2, 1500, width), "text.layers.0.mlp", config.text_config.intermediate_size
    else:
        cfg = config.vision_config
        mlp = vision.VisionMLP(cfg, param_dtype=dtype, rngs=nnx.Rngs(0), name="vision.blocks.0.mlp", layer=0)
        width = cfg.embed_dim
        shape, name, act_width = (3000, width), "vision.blocks.0.mlp", cfg.mlp_dim
    x = jax.random.normal(jax.random.key(1), shape, dtype)  # 3000 rows: 3 blocks of 1000
    monkeypatch.setattr(layers, "MLP_ROW_BLOCK", 1024)
    blocks = jax.jit(lambda x: layers.rowwise(mlp, x))  # the caller decides the row blocks (the MLP is pure)
    assert "while" in blocks.lower(x).as_text()  # really in blocks (lax.map)
    assert "while" not in jax.jit(mlp).lower(x).as_text()  # the MLP itself never blocks
    monkeypatch.setattr(layers, "MLP_ROW_BLOCK", 10**6)
    whole = jax.jit(lambda x: layers.rowwise(mlp, x))
    assert "while" not in whole.lower(x).as_text()
    # fp32: the same numbers. bf16: XLA:CPU computes bf16 elementwise ops in fp32 and rounds at fusion boundaries,
    # which differ inside the loop, so a value may round once less or more: within one bf16 ulp (2^-8 = 3.9e-3).
    tol = 1e-6 if dtype == jnp.float32 else 2**-8
    assert helpers.rel_err(blocks(x), whole(x)) <= tol
    monkeypatch.setattr(layers, "MLP_ROW_BLOCK", 1024)
    hookset = hook_points.make_hookset(config, None, [f"{name}.act"])

    def recorded(x):
        with hook_points.install(hookset) as run:
            return layers.rowwise(mlp, x), run.records[f"{name}.act"]

    y, act = jax.jit(recorded)(x)
    assert act.shape == (*shape[:-1], act_width) and helpers.rel_err(y, whole(x)) <= tol


def _prefill(model, ids, mask):
    """The prefill as `generate` runs it (logits of the last position only; the [B, T, V] logits of a 4k prompt
    would be 2.5 GB a row), with the final hidden state of every position recorded."""
    out, rec = hooks.run_with_cache(model, ["text.final_norm"], generate=True, input_ids=ids, attention_mask=mask,
                                    max_new_tokens=1, do_sample=False, repetition_penalty=1.0, output_logits=True)
    return np.asarray(rec["text.final_norm"]), np.asarray(out.logits)


@pytest.mark.slow
def test_4k_prompt_logits_equal_the_unchunked_formulation(tiny_checkpoint, monkeypatch):
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="xla")
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 150_000, (2, 4096))
    mask = np.ones_like(ids)
    mask[1, :1000] = 0  # a left-padded row
    cfg = model.config.text_config
    assert 2 * cfg.num_attention_heads * 4096 * 4096 * 4 > xla.CHUNK_ABOVE_BYTES  # this prompt takes the chunks
    hidden, logits = _prefill(model, ids, mask)
    jax.clear_caches()
    monkeypatch.setattr(xla, "CHUNK_ABOVE_BYTES", 1 << 62)
    whole_hidden, whole_logits = _prefill(model, ids, mask)
    jax.clear_caches()
    m = mask.astype(bool)
    assert helpers.rel_err(hidden[m], whole_hidden[m]) <= 1e-5
    assert helpers.rel_err(logits, whole_logits) <= 1e-5


CHILD = r"""
import resource, sys, numpy as np
from qwen2vl_jax import Qwen2VLForConditionalGeneration
model = Qwen2VLForConditionalGeneration.from_pretrained(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ids = np.random.default_rng(0).integers(0, 150_000, (1, int(sys.argv[2])))
model.generate(ids, max_new_tokens=2, do_sample=False)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1e6)
"""


@pytest.mark.slow
@pytest.mark.parametrize("tokens, limit_gb", [(8192, 1.0), (16384, 1.5)])
def test_long_text_prefill_memory_is_bounded(tiny_checkpoint, tokens, limit_gb):
    """Peak RSS growth of a text-only prefill on the tiny model (before the chunks: 3.6 GB at 8k, 17.1 GB at 16k;
    whole-row scores alone are 4 heads x T x T x 4 B = 1.07 GB at 8k)."""
    done = subprocess.run([sys.executable, "-c", CHILD, str(tiny_checkpoint), str(tokens)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    growth_gb = float(done.stdout.strip().splitlines()[-1])
    helpers.record(f"long_prompt/prefill_rss/{tokens}", growth_gb=growth_gb)
    assert growth_gb < limit_gb, growth_gb
