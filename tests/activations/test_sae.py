"""Sparse autoencoders: an exact-identity SAE spliced into the model leaves its logits as they were and has no
error term, a new SAE reuses the compiled program, training lowers the reconstruction loss, TopK keeps at most k
features, and the safetensors file round-trips."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qwen2vl_jax import hooks
from qwen2vl_jax.activations import SAE, init_sae, load_sae, sae_features, save_sae, splice_sae, train_sae
from qwen2vl_jax.checkpoints.safetensors_io import SafetensorsFile
from qwen2vl_jax.evaluation import encode_prompt, read_items
from qwen2vl_jax.modeling import programs


def _identity_sae(d: int) -> SAE:
    """Encoder [I, -I] (W_enc [D, 2D]), decoder [I; -I] (W_dec [2D, D]), ReLU, biases 0: features relu(x), relu(-x)
    and the reconstruction relu(x) - relu(-x) = x."""
    eye = np.eye(d, dtype=np.float32)
    return SAE(W_enc=jnp.asarray(np.concatenate([eye, -eye], axis=1)), b_enc=jnp.zeros(2 * d),
               W_dec=jnp.asarray(np.concatenate([eye, -eye], axis=0)), b_dec=jnp.zeros(d))


def test_identity_sae_spliced_keeps_the_logits_and_has_no_error(tiny, prompts):
    model, processor = tiny
    inputs = encode_prompt(processor, read_items(prompts)[1].messages)  # a photo and a question
    base = np.asarray(model(**inputs).logits)
    sae = _identity_sae(64)
    for point in ["text.layers.1.resid_post", "text.layers.0.attn.head_out", "vision.merger.out"]:
        _, cache = hooks.run_with_cache(model, [point], **inputs)
        x = np.asarray(cache[point]).reshape(-1, 64)
        # Exactly zero, not merely small: each encoder output sums x_d * 1 with exact zeros (x_d * 0), each decoder
        # output relu(x_d) * 1 + relu(-x_d) * -1 with exact zeros, and one of those two terms is 0, so every
        # float operation is exact (with fp32 matmuls: tests/conftest.py sets "highest").
        assert np.max(np.abs(x - np.asarray(sae(x)))) == 0
        for error_term in (False, True):
            out = hooks.run_with_hooks(model, splice_sae(sae, point, error_term=error_term), **inputs)
            assert np.max(np.abs(np.asarray(out.logits) - base)) <= 1e-6, (point, error_term)
    out, features = sae_features(model, sae, "text.layers.1.resid_post", **inputs)
    _, cache = hooks.run_with_cache(model, ["text.layers.1.resid_post"], **inputs)
    x = np.asarray(cache["text.layers.1.resid_post"])
    assert features.shape == (*x.shape[:2], 128)
    np.testing.assert_array_equal(np.asarray(features), np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], -1))

    # another SAE of the same shapes is a traced argument of the same program: no new compile, other logits
    before = programs.compiles()["forward"]
    other = hooks.run_with_hooks(model, splice_sae(init_sae(64, 128, seed=1), "text.layers.1.resid_post"), **inputs)
    assert programs.compiles()["forward"] == before
    assert np.max(np.abs(np.asarray(other.logits) - base)) > 1e-3


def test_training_lowers_the_loss_topk_keeps_k_and_files_round_trip(small_store, tmp_path):
    point = "text.layers.1.resid_post"
    x = np.concatenate(list(small_store.iter_shards(point)))
    sae, history = train_sae(small_store, point, d_sae=256, l1=1e-3, lr=3e-3, steps=300, batch_size=64)
    assert len(history["mse"]) == 300
    first, last = history["mse"][:5].mean(), history["mse"][-20:].mean()
    print(f"ReLU SAE: mse {first:.3f} -> {last:.3f}, l0 {history['l0'][-1]:.1f}")
    assert last < 0.5 * first
    np.testing.assert_allclose(np.linalg.norm(np.asarray(sae.W_dec), axis=1), 1, atol=1e-5)  # unit decoder rows

    topk, history = train_sae(small_store, point, d_sae=128, k=4, lr=3e-3, steps=300, batch_size=64, seed=1)
    first, last = history["mse"][:5].mean(), history["mse"][-20:].mean()
    print(f"TopK(4) SAE: mse {first:.3f} -> {last:.3f}")
    assert last < 0.7 * first and history["l0"].max() <= 4
    assert (np.asarray(topk.encode(x)) > 0).sum(-1).max() <= 4

    path = tmp_path / "topk.safetensors"
    save_sae(topk, path, point=point)
    loaded = load_sae(path)
    assert loaded.k == 4 and SafetensorsFile(path).metadata["point"] == point
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        np.testing.assert_array_equal(np.asarray(getattr(loaded, name)), np.asarray(getattr(topk, name)))

    # from a one-shot iterator of arrays: it stops when the data does
    _, history = train_sae(iter([x[:64]] * 10), d_sae=32, steps=100, batch_size=64)
    assert len(history["loss"]) == 10
