"""LoRA vs PEFT 0.21 on transformers 4.57 (fp32): an adapter saved here loads in PEFT with the same logits, the same
adapter gradients and the same three AdamW steps; an adapter saved by PEFT loads here; a merged model loads in
transformers and equals PEFT's `merge_and_unload`; broken adapters fail with a clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import helpers
from qwen2vl_jax import lora, training
from qwen2vl_jax.checkpoints.safetensors_io import SafetensorsFile, save_file
from qwen2vl_jax.modeling.parameters import LoRAParam, model_params, param_path
from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

TOL = 1e-5
RANK, ALPHA = 4, 8
TARGETS = list(lora.DEFAULT_TARGETS) + list(lora.VISION_TARGETS)  # the decoder's projections and the vision tower's
# adapted by PEFT in the other direction: some decoder and vision Linears, the merger's first Linear, the LM head
PEFT_TARGETS = ["q_proj", "v_proj", "down_proj", "qkv", "fc2", "mlp.0", "lm_head"]
ADAMW = dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01)


def training_labels(inputs: dict, prompt_tokens: int = 6) -> np.ndarray:
    """input_ids, -100 on pad slots and on each row's first `prompt_tokens` real tokens (see test_training)."""
    mask = inputs["attention_mask"].astype(bool)
    labels = np.where(mask, inputs["input_ids"], training.IGNORE_INDEX).astype(np.int64)
    for row, start in enumerate(mask.argmax(axis=1)):
        labels[row, start:start + prompt_tokens] = training.IGNORE_INDEX
    return labels


def _torch(inputs: dict) -> dict:
    return {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}


def _peft_name(path: str) -> str:
    """Our adapter parameter path -> PEFT's parameter name."""
    linear, ab = path.rsplit(".lora.", 1)
    return f"{lora.PEFT_PREFIX}{lora.hf_module_name(linear)}.{ab}.default.weight"


def _adapter_weights(model) -> dict[str, np.ndarray]:
    return {_peft_name(param_path(p)): np.asarray(v[...])
            for p, v in nnx.to_flat_state(nnx.state(model, LoRAParam))}


def _masked(logits, inputs) -> np.ndarray:
    return np.asarray(logits)[np.asarray(inputs["attention_mask"]).astype(bool)]  # pad slots hold garbage in both


def load_peft(checkpoint, adapter_dir, trainable=True):
    from peft import PeftModel

    return PeftModel.from_pretrained(helpers.load_hf_model(checkpoint), str(adapter_dir), is_trainable=trainable)


def peft_logits(model, inputs) -> np.ndarray:
    with torch.no_grad():
        return model(**_torch(inputs)).logits.numpy()


@pytest.fixture(scope="module")
def ours_adapter(tiny_checkpoint, tmp_path_factory, two_rows) -> dict:
    """Our model with rsLoRA on the decoder and vision Linears, B random, saved with `save_adapter`; its logits."""
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    adapted = lora.apply_lora(model, RANK, ALPHA, TARGETS, use_rslora=True, seed=1)
    key = jax.random.key(3)
    for lin in adapted.values():
        key, sub = jax.random.split(key)
        lin.lora.lora_B.set_value(0.05 * jax.random.normal(sub, lin.lora.lora_B.shape, jnp.float32))
    out = lora.save_adapter(model, tmp_path_factory.mktemp("lora") / "ours", base_model_name_or_path="tiny")
    return {"model": model, "dir": out, "modules": adapted, "logits": np.asarray(model(**two_rows).logits)}


@pytest.fixture(scope="module")
def peft_from_ours(tiny_checkpoint, ours_adapter):
    return load_peft(tiny_checkpoint, ours_adapter["dir"])


# ------------------------------------------------------------------------------------ ours -> PEFT
def test_saved_adapter_is_peft_format(ours_adapter, peft_from_ours):
    d = ours_adapter["dir"]
    cfg = json.loads((d / lora.ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == RANK and cfg["lora_alpha"] == ALPHA and cfg["use_rslora"]
    assert cfg["target_modules"] == TARGETS
    keys = set(SafetensorsFile(d / lora.ADAPTER_WEIGHTS).keys())
    n = len(ours_adapter["modules"])
    assert n == 2 * 7 + 2 * 4 and len(keys) == 2 * n  # 2 layers x 7 decoder + 2 blocks x 4 vision Linears
    # PEFT adapted exactly our modules and loaded every tensor we wrote (names differ by ".default" only)
    trainable = {name for name, p in peft_from_ours.named_parameters() if p.requires_grad}
    assert trainable == set(_adapter_weights(ours_adapter["model"]))
    assert {k.replace(".weight", ".default.weight") for k in keys} == trainable
    state = dict(peft_from_ours.named_parameters())
    for name, value in _adapter_weights(ours_adapter["model"]).items():
        np.testing.assert_array_equal(state[name].detach().numpy(), value)


def test_adapted_logits_match_peft(tiny_checkpoint, ours_adapter, peft_from_ours, two_rows):
    base_hf = helpers.load_hf_model(tiny_checkpoint)
    ref = peft_logits(peft_from_ours, two_rows)
    err = helpers.rel_err(_masked(ours_adapter["logits"], two_rows), _masked(ref, two_rows))
    helpers.record("lora/logits-ours-adapter-in-peft", rel_err=err, modules=len(ours_adapter["modules"]))
    assert err <= TOL, err
    # and the adapter does change the output (B != 0)
    assert helpers.rel_err(_masked(peft_logits(base_hf, two_rows), two_rows), _masked(ref, two_rows)) > 1e-3


def test_lora_gradients_match_peft(ours_adapter, peft_from_ours, two_rows):
    labels = training_labels(two_rows)
    peft_from_ours.zero_grad(set_to_none=True)
    out = peft_from_ours(**_torch(two_rows), labels=torch.from_numpy(labels))
    out.loss.backward()
    ref = {n: p.grad.numpy().copy() for n, p in peft_from_ours.named_parameters() if p.requires_grad}
    assert all(p.grad is None for p in peft_from_ours.parameters() if not p.requires_grad)
    peft_from_ours.zero_grad(set_to_none=True)

    grad_fn = nnx.value_and_grad(lambda m: training.causal_lm_loss(m, labels=labels, **two_rows),
                                 argnums=nnx.DiffState(0, LoRAParam), has_aux=True)
    (loss, _), grads = nnx.jit(grad_fn)(ours_adapter["model"])
    ours = {_peft_name(param_path(p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
    assert ours.keys() == ref.keys()
    errs = {n: helpers.rel_err(ours[n], ref[n]) for n in ref}
    worst = max(errs, key=errs.get)
    loss_rel = abs(float(loss) - float(out.loss.detach())) / float(out.loss.detach())
    helpers.record("lora/grads-vs-peft", max_rel=errs[worst], worst=worst, loss_rel=loss_rel, tensors=len(errs))
    assert loss_rel <= 1e-6, loss_rel
    assert errs[worst] <= TOL, (worst, errs[worst])
    assert min(float(np.abs(g).max()) for g in ref.values()) > 0  # every A and B gets a gradient


def test_three_adamw_steps_match_peft(tiny_checkpoint, ours_adapter, two_rows):
    """Ours: `make_optimizer(..., "lora")` + `train_step`; theirs: torch AdamW on PEFT's trainable parameters."""
    labels = training_labels(two_rows)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    assert len(lora.load_adapter(model, ours_adapter["dir"])) == len(ours_adapter["modules"])
    tx = optax.adamw(ADAMW["lr"], b1=ADAMW["b1"], b2=ADAMW["b2"], eps=ADAMW["eps"], weight_decay=ADAMW["weight_decay"])
    optimizer = training.make_optimizer(model, tx, "lora")
    batch = training.prepare_batch(model, labels=labels, **two_rows)
    ours_losses = [float(training.train_step(model, optimizer, batch)["loss"]) for _ in range(3)]

    peft = load_peft(tiny_checkpoint, ours_adapter["dir"])
    params = [p for p in peft.parameters() if p.requires_grad]
    torch_opt = torch.optim.AdamW(params, lr=ADAMW["lr"], betas=(ADAMW["b1"], ADAMW["b2"]), eps=ADAMW["eps"],
                                  weight_decay=ADAMW["weight_decay"])
    torch_losses = []
    for _ in range(3):
        torch_opt.zero_grad()
        out = peft(**_torch(two_rows), labels=torch.from_numpy(labels))
        out.loss.backward()
        torch_opt.step()
        torch_losses.append(float(out.loss.detach()))

    start = _adapter_weights(ours_adapter["model"])
    ours = _adapter_weights(model)
    theirs = {n: p.detach().numpy() for n, p in peft.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys() == start.keys()
    errs = {n: helpers.rel_err(ours[n], theirs[n]) for n in theirs}
    worst = max(errs, key=errs.get)
    loss_rel = max(abs(a - b) / b for a, b in zip(ours_losses, torch_losses, strict=True))
    moved = min(float(np.abs(theirs[n] - start[n]).max()) for n in theirs)
    helpers.record("lora/adamw-3-steps-vs-peft", max_rel=errs[worst], worst=worst, loss_rel=loss_rel, **ADAMW)
    assert moved > 1e-4  # every tensor did train
    assert ours_losses[2] < ours_losses[0]
    assert loss_rel <= 1e-6, (ours_losses, torch_losses)
    assert errs[worst] <= TOL, (worst, errs[worst])
    # only the adapters trained: every base weight is still the checkpoint's, bitwise
    fresh = model_params(Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint))
    base = model_params(model)
    assert base.keys() == fresh.keys()
    assert [p for p in base if not np.array_equal(np.asarray(base[p][...]), np.asarray(fresh[p][...]))] == []


# ------------------------------------------------------------------------------------ PEFT -> ours
def test_peft_saved_adapter_loads_with_peft_logits(tiny_checkpoint, two_rows, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=PEFT_TARGETS, lora_dropout=0.0, init_lora_weights=False)
    peft = get_peft_model(helpers.load_hf_model(tiny_checkpoint), config)
    # adapters only here; PEFT's default (which adds the base lm_head weight) is the test below
    peft.save_pretrained(tmp_path / "peft", save_embedding_layers=False)
    b = dict(peft.named_parameters())[_peft_name("lm_head.lora.lora_B")]
    assert float(b.detach().abs().max()) > 0.01  # init_lora_weights=False: B is random too

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    loaded = lora.load_adapter(model, tmp_path / "peft")
    assert {"lm_head", "visual.merger.fc1", "visual.blocks.1.mlp.fc2", "language_model.layers.1.mlp.down_proj"} <= \
        set(loaded)
    assert len(loaded) == 2 * 3 + 2 * 2 + 2  # decoder q/v/down, vision qkv/fc2 per layer; merger mlp.0; lm_head
    assert model.lora_config.r == 8 and model.lora_config.scaling == 2.0
    theirs = {n: p.detach().numpy() for n, p in peft.named_parameters() if "lora_" in n}
    ours = _adapter_weights(model)
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[n], theirs[n]) for n in ours)
    err = helpers.rel_err(_masked(model(**two_rows).logits, two_rows),
                          _masked(peft_logits(peft, two_rows), two_rows))
    helpers.record("lora/logits-peft-adapter-in-ours", rel_err=err, modules=len(loaded))
    assert err <= TOL, err


def test_peft_default_save_with_an_adapted_lm_head_loads(tiny_checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(helpers.load_hf_model(tiny_checkpoint),
                          LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"]))
    peft.save_pretrained(tmp_path / "peft")
    assert f"{lora.PEFT_PREFIX}lm_head.base_layer.weight" in SafetensorsFile(tmp_path / "peft" /
                                                                            lora.ADAPTER_WEIGHTS).keys()
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    assert set(lora.load_adapter(model, tmp_path / "peft")) >= {"lm_head", "language_model.layers.0.self_attn.q_proj"}
    # the stored base weight went into the base layer, as PEFT's loader does
    stored = SafetensorsFile(tmp_path / "peft" / lora.ADAPTER_WEIGHTS).read(
        f"{lora.PEFT_PREFIX}lm_head.base_layer.weight")
    np.testing.assert_array_equal(np.asarray(model.lm_head.weight[...]), stored)


# ------------------------------------------------------------------------------------------- merging
def test_merged_model_loads_in_transformers_and_equals_peft_merge(tiny_checkpoint, ours_adapter, two_rows,
                                                                  tmp_path):
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    lora.load_adapter(model, ours_adapter["dir"])
    with pytest.raises(ValueError, match="merge_lora"):
        model.save_pretrained(tmp_path / "unmerged")
    assert not (tmp_path / "unmerged").exists()
    assert lora.merge_lora(model) == len(ours_adapter["modules"])
    assert not lora.lora_modules(model) and not hasattr(model, "lora_config")
    model.save_pretrained(tmp_path / "merged")

    merged = helpers.load_hf_model(tmp_path / "merged")
    err = helpers.rel_err(_masked(peft_logits(merged, two_rows), two_rows),
                          _masked(ours_adapter["logits"], two_rows))
    peft_merged = load_peft(tiny_checkpoint, ours_adapter["dir"], trainable=False).merge_and_unload()
    ref = peft_merged.state_dict()
    got = merged.state_dict()
    assert got.keys() == ref.keys()
    weight_errs = {k: helpers.rel_err(got[k].numpy(), ref[k].numpy()) for k in ref}
    worst = max(weight_errs, key=weight_errs.get)
    base = helpers.load_hf_model(tiny_checkpoint).state_dict()
    changed = {k for k in ref if not torch.equal(ref[k], base[k])}
    helpers.record("lora/merged-in-transformers", rel_err=err, merge_vs_peft_max_rel=weight_errs[worst],
                   worst=worst)
    assert err <= TOL, err
    assert len(changed) == len(ours_adapter["modules"])  # exactly the adapted weights moved
    assert weight_errs[worst] <= 1e-6, (worst, weight_errs[worst])


# -------------------------------------------------------------------------------------------- errors
def test_fresh_adapter_leaves_the_logits_unchanged(tiny_checkpoint, two_rows):
    """B = 0: decoder adapters leave the logits bitwise unchanged. On the vision tower's fc2 the recompiled graph
    rounds the (unchanged) GELU input of fc2 differently, so there the logits agree to fp32 rounding only."""
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    before = np.asarray(model(**two_rows).logits)
    adapted = lora.apply_lora(model, RANK, ALPHA, list(lora.DEFAULT_TARGETS), use_rslora=True)
    assert all(not np.asarray(lin.lora.lora_B[...]).any() and np.asarray(lin.lora.lora_A[...]).any()
               for lin in adapted.values())
    np.testing.assert_array_equal(np.asarray(model(**two_rows).logits), before)
    lora.remove_lora(model)
    lora.apply_lora(model, RANK, ALPHA, TARGETS, use_rslora=True)
    err = helpers.rel_err(np.asarray(model(**two_rows).logits), before)
    helpers.record("lora/fresh-adapter-with-vision-targets", rel_err=err)
    assert err <= 1e-6, err


def _broken(src: Path, dst: Path, *, config=None, tensors=None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / lora.ADAPTER_CONFIG).read_text())
        (dst / lora.ADAPTER_CONFIG).write_text(json.dumps({**cfg, **config}))
    if tensors is not None:
        f = SafetensorsFile(dst / lora.ADAPTER_WEIGHTS)
        data = {k: f.read(k) for k in f.keys()}
        save_file(tensors(data), dst / lora.ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return dst


def test_broken_adapters_fail_clearly_and_change_nothing(tiny_checkpoint, ours_adapter, tmp_path):
    src = ours_adapter["dir"]
    key = f"{lora.PEFT_PREFIX}model.language_model.layers.1.mlp.up_proj.lora_A.weight"

    def wrong_shape(data):
        assert key in data
        return {**data, key: np.zeros((RANK + 1, data[key].shape[1]), np.float32)}

    missing = _broken(src, tmp_path / "no-config")
    (missing / lora.ADAPTER_CONFIG).unlink()
    cases = [
        (_broken(src, tmp_path / "shape", tensors=wrong_shape),
         rf"wrong shape: {key} expected \[4, 64\], found \[5, 64\]"),
        (_broken(src, tmp_path / "dora", config={"use_dora": True}), r"use_dora=True is not supported"),
        (missing, r"not a PEFT adapter directory: adapter_config.json is missing"),
        (_broken(src, tmp_path / "unknown", tensors=lambda d: {**d, lora.PEFT_PREFIX + "model.nope.lora_A.weight":
                                                                np.zeros((RANK, 3), np.float32)}),
         r"unexpected: base_model\.model\.model\.nope\.lora_A\.weight"),
    ]
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    for path, message in cases:
        with pytest.raises(lora.LoRAError, match=message):
            lora.load_adapter(model, path)
        assert not lora.lora_modules(model) and not hasattr(model, "lora_config")  # nothing was applied
    with pytest.raises(lora.LoRAError, match="matches no Linear"):
        lora.apply_lora(model, RANK, target_modules=["no_such_module"])
    lora.load_adapter(model, src)
    with pytest.raises(lora.LoRAError, match="already has a LoRA adapter"):
        lora.load_adapter(model, src)
