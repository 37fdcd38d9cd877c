"""Training vs transformers 4.57 (fp32): the causal-LM loss and the gradient of every parameter (tied and untied, on
text, photos, video and a left-padded batch; with the native CPU kernels and without them), what trains and what
the optimizer holds, gradient accumulation, rematerialisation, and one train step on a 4-device mesh.

The torch reference (loss and autograd gradients) is computed once per (checkpoint, input) in a module fixture and
reused by every test that needs it. Runs without the native kernels and on several virtual devices happen in child
processes (both are chosen once per process); they reuse the parent's torch gradients through a file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import helpers
from qwen2vl_jax import lora, training
from qwen2vl_jax.checkpoints.keymap import hf_to_ours, to_ours_layout
from qwen2vl_jax.modeling.parameters import LoRAParam, model_params, param_path
from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

TESTS = Path(__file__).resolve().parents[1]  # tests/: helpers and workers
ROOT = TESTS.parent
LOSS_TOL = 1e-6
GRAD_TOL = 1e-5
CASES = ["text_only", "one_photo", "three_images", "video", "left_padded_batch"]
# in the default suite: the untied checkpoint on every input but three_images (its vision branches are covered by
# one_photo and left_padded_batch); the tied one, which differs only in the head / embeddings, on text. All in slow.
DEFAULT_CASES = {False: ("text_only", "one_photo", "video", "left_padded_batch"), True: ("text_only",)}
# the kernels-off child process: one input per checkpoint by default, every input in the slow suite
XLA_DEFAULT = ((False, "left_padded_batch"), (True, "text_only"))
REMAT_CASE = (False, "one_photo")  # the rematerialised gradients are compared on this input
PROMPT_TOKENS = 6  # label-masked at the start of each row (the first real token among them)


def training_labels(inputs: dict, prompt_tokens: int = PROMPT_TOKENS) -> np.ndarray:
    """input_ids with -100 on pad slots and on each row's first `prompt_tokens` real tokens.

    The first real token must be masked under left padding: otherwise the prediction made at the last pad slot
    (whose attention row is fully masked, and arbitrary in both frameworks) would be trained."""
    ids, mask = np.asarray(inputs["input_ids"]), np.asarray(inputs["attention_mask"]).astype(bool)
    labels = np.where(mask, ids, training.IGNORE_INDEX).astype(np.int64)
    for row, start in enumerate(mask.argmax(axis=1)):
        labels[row, start:start + prompt_tokens] = training.IGNORE_INDEX
    return labels


def our_loss_and_grads(model, inputs: dict, labels: np.ndarray):
    """`training.causal_lm_loss` and its gradient w.r.t. every parameter, jitted (host inputs are constants)."""
    fn = nnx.jit(nnx.value_and_grad(lambda m: training.causal_lm_loss(m, labels=labels, **inputs), has_aux=True))
    (loss, metrics), grads = fn(model)
    flat = {param_path(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
    return float(loss), {k: float(v) for k, v in metrics.items()}, flat


def compare_grads(ours: dict, ref: dict) -> dict:
    """Per-tensor max|ours - torch| / max|torch|; parameters torch leaves without a gradient must be ~0 in ours."""
    assert ours.keys() == ref.keys(), (sorted(ours.keys() ^ ref.keys()))[:10]
    errs = {p: helpers.rel_err(ours[p], g) for p, g in ref.items() if g is not None}
    no_grad = [p for p, g in ref.items() if g is None]
    zero_max = max((float(np.abs(ours[p]).max()) for p in no_grad), default=0.0)
    worst = max(errs, key=errs.get)
    return {"max_rel": errs[worst], "worst": worst, "compared": len(errs), "no_grad": len(no_grad),
            "no_grad_max_abs": zero_max}


# ------------------------------------------------------------------------------------------ the torch side
class TorchReference:
    """Loss and autograd gradients of transformers' model, once per (checkpoint, input)."""

    def __init__(self, checkpoint_factory, tokenizer, photos):
        self.factory, self.tokenizer, self.photos = checkpoint_factory, tokenizer, photos
        self._hf, self._ours, self._refs, self._grads = {}, {}, {}, {}

    def checkpoint(self, tied: bool, size: str = "tiny") -> Path:
        return self.factory(tied=tied, size=size)

    def ours(self, tied: bool, size: str = "tiny"):
        if (tied, size) not in self._ours:
            self._ours[tied, size] = Qwen2VLForConditionalGeneration.from_pretrained(self.checkpoint(tied, size))
        return self._ours[tied, size]

    def inputs(self, case: str) -> dict:
        return {k: np.asarray(v) for k, v in helpers.parity_inputs(self.tokenizer, self.photos, case).items()}

    def __call__(self, tied: bool, case: str, size: str = "tiny") -> dict:
        key = (tied, case, size)
        if key not in self._refs:
            import torch

            if (tied, size) not in self._hf:
                self._hf[tied, size] = helpers.load_hf_model(self.checkpoint(tied, size))
            hf = self._hf[tied, size]
            inputs = self.inputs(case)
            labels = training_labels(inputs)
            hf.zero_grad(set_to_none=True)
            out = hf(**{k: torch.from_numpy(v) for k, v in inputs.items()}, labels=torch.from_numpy(labels))
            out.loss.backward()
            grads = {}
            for name, p in hf.named_parameters():
                path = hf_to_ours(name)
                assert path is not None, name
                grads[path] = None if p.grad is None else to_ours_layout(path, p.grad.detach().numpy().copy())
            hf.zero_grad(set_to_none=True)
            self._refs[key] = {"inputs": inputs, "labels": labels, "loss": float(out.loss.detach()),
                               "grads": grads}
        return self._refs[key]

    def our_grads(self, tied: bool, case: str, size: str = "tiny", keep: bool = False):
        """(loss, metrics, grads) of our model on the reference's batch; `keep`: cache them for a later test."""
        key = (tied, case, size)
        if key in self._grads:
            return self._grads[key]
        ref = self(tied, case, size)
        out = our_loss_and_grads(self.ours(tied, size), ref["inputs"], ref["labels"])
        if keep:
            self._grads[key] = out
        return out

    def drop(self, size: str) -> None:
        """Free what a large checkpoint holds."""
        for d in (self._hf, self._ours, self._refs, self._grads):
            for k in [k for k in d if k[-1] == size]:
                del d[k]


@pytest.fixture(scope="module")
def reference(checkpoint_factory, hf_tokenizer, photos):
    return TorchReference(checkpoint_factory, hf_tokenizer, photos)


def _kind(tied: bool) -> str:
    return "tied" if tied else "untied"


def _grad_params():
    out = []
    for tied in (False, True):
        for case in CASES:
            slow = case not in DEFAULT_CASES[tied]
            out.append(pytest.param(tied, case, id=f"{_kind(tied)}-{case}", marks=[pytest.mark.slow] if slow else []))
    return out


# ------------------------------------------------------------------------------------- loss and gradients
@pytest.mark.parametrize("tied,case", _grad_params())
def test_loss_and_gradients_match_transformers(reference, tied, case):
    ref = reference(tied, case)
    loss, metrics, grads = reference.our_grads(tied, case, keep=(tied, case) == REMAT_CASE)
    loss_rel = abs(loss - ref["loss"]) / abs(ref["loss"])
    cmp = compare_grads(grads, ref["grads"])
    helpers.record(f"training/grad-{case}-{_kind(tied)}", max_rel=cmp["max_rel"], loss_rel=loss_rel,
                   worst=cmp["worst"], tensors=cmp["compared"], tokens=int(metrics["tokens"]))
    # the kept tokens are what transformers averages over: the shifted labels that are not -100
    assert metrics["tokens"] == int((ref["labels"][:, 1:] != training.IGNORE_INDEX).sum())
    assert loss_rel <= LOSS_TOL, (loss, ref["loss"])
    assert cmp["max_rel"] <= GRAD_TOL, cmp
    # every parameter is compared; only the vision tower of a text-only input gets no gradient from torch
    vision = [p for p in grads if p.startswith("visual.")]
    assert cmp["compared"] + cmp["no_grad"] == len(grads) == len(model_params(reference.ours(tied)))
    assert cmp["no_grad"] == (len(vision) if case == "text_only" else 0)
    assert cmp["no_grad_max_abs"] <= 1e-12, cmp
    assert ("lm_head.weight" in grads) == (not tied)


SLICE_GRAD_TOL = 2e-5


@pytest.mark.slow
def test_gradients_match_transformers_on_the_2b_slice(reference):
    """Real widths (1536 / 1280, 12 heads of 128, 8960-wide MLP), tied like the 2B, on one photo.

    Both sides are fp32, so their distance is the sum of two rounding errors: against a float64 run of
    transformers (logits upcast as its loss does) ours is within 6.4e-6 per tensor and transformers' own fp32
    gradients within 9.1e-6 (worst: the vision blocks' LayerNorm weights, sums over every patch), which puts
    ours vs transformers at 1.06e-5; hence 2e-5 here rather than the tiny models' 1e-5."""
    try:
        ref = reference(True, "one_photo", size="2b-slice")
        loss, _, grads = our_loss_and_grads(reference.ours(True, "2b-slice"), ref["inputs"], ref["labels"])
        loss_rel = abs(loss - ref["loss"]) / abs(ref["loss"])
        cmp = compare_grads(grads, ref["grads"])
    finally:
        reference.drop("2b-slice")
    helpers.record("training/grad-one_photo-2b-slice", max_rel=cmp["max_rel"], loss_rel=loss_rel, worst=cmp["worst"],
                   tensors=cmp["compared"])
    assert loss_rel <= LOSS_TOL, loss_rel
    assert cmp["max_rel"] <= SLICE_GRAD_TOL and cmp["no_grad"] == 0, cmp


# ---------------------------------------------------------------------- without the native CPU kernels
def _child_env(**extra) -> dict:
    env = {**os.environ, "QWEN2VL_JAX_CPU_KERNELS": "0", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), str(Path(__file__).resolve().parent),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _run_child(function: str, job: Path, env: dict, timeout: int = 1200) -> dict:
    code = f"import test_training; test_training.{function}({str(job)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _start_child_jax() -> None:
    """What conftest does for the parent: exact fp32 CPU matmuls, highest matmul precision."""
    from qwen2vl_jax.runtime import use_exact_cpu_fp32_matmuls

    assert use_exact_cpu_fp32_matmuls()
    jax.config.update("jax_default_matmul_precision", "highest")


def xla_path_child(job_file: str) -> None:
    """Child process body: our loss and gradients for each job, compared with the parent's torch numbers."""
    _start_child_jax()
    from qwen2vl_jax import attention, kernels

    jobs = json.loads(Path(job_file).read_text())
    models, results = {}, []
    for job in jobs:
        data = dict(np.load(job["inputs"]))
        labels = data.pop("labels")
        torch_grads = dict(np.load(job["grads"]))
        ref = {p: (None if p in job["no_grad"] else torch_grads[p]) for p in job["params"]}
        if job["checkpoint"] not in models:
            models[job["checkpoint"]] = Qwen2VLForConditionalGeneration.from_pretrained(job["checkpoint"])
        loss, _, grads = our_loss_and_grads(models[job["checkpoint"]], data, labels)
        cmp = compare_grads(grads, ref)
        results.append({"name": job["name"], "loss_rel": abs(loss - job["loss"]) / abs(job["loss"]), **cmp})
    print(json.dumps({"kernels": kernels.available(), "attention": attention.platform_backend(None),
                      "results": results}))


def _xla_params():
    everything = tuple((tied, case) for tied in (False, True) for case in CASES)
    return [pytest.param(XLA_DEFAULT, id="default"), pytest.param(everything, id="all", marks=pytest.mark.slow)]


@pytest.mark.parametrize("jobs", _xla_params())
def test_gradients_match_transformers_without_native_kernels(reference, tmp_path, jobs):
    """The path a GPU / TPU takes (`xla` attention, XLA's dots): one child process for both checkpoints."""
    specs = []
    for tied, case in jobs:
        ref = reference(tied, case)
        name = f"{case}-{_kind(tied)}"
        np.savez(tmp_path / f"{name}-inputs.npz", labels=ref["labels"], **ref["inputs"])
        np.savez(tmp_path / f"{name}-grads.npz", **{p: g for p, g in ref["grads"].items() if g is not None})
        specs.append({"name": name, "checkpoint": str(reference.checkpoint(tied)), "loss": ref["loss"],
                      "inputs": str(tmp_path / f"{name}-inputs.npz"), "grads": str(tmp_path / f"{name}-grads.npz"),
                      "params": list(ref["grads"]), "no_grad": [p for p, g in ref["grads"].items() if g is None]})
    (tmp_path / "jobs.json").write_text(json.dumps(specs))
    out = _run_child("xla_path_child", tmp_path / "jobs.json", _child_env())
    assert out["kernels"] is False and out["attention"] == "xla", out
    assert [r["name"] for r in out["results"]] == [s["name"] for s in specs]
    for r in out["results"]:
        helpers.record(f"training/grad-xla-{r['name']}", max_rel=r["max_rel"], loss_rel=r["loss_rel"], worst=r["worst"])
    for r in out["results"]:
        assert r["loss_rel"] <= LOSS_TOL, r
        assert r["max_rel"] <= GRAD_TOL, r
        assert r["no_grad_max_abs"] <= 1e-12 and r["compared"] + r["no_grad"] > 40, r


# --------------------------------------------------------------------------- small batches for the mechanics
def _small_inputs(tokenizer, photos, texts, images, max_pixels=64 * 28 * 28) -> dict:
    proc = helpers.hf_image_processor(max_pixels=max_pixels)
    return {k: np.asarray(v) for k, v in helpers.hf_inputs(tokenizer, texts, images=images,
                                                            image_processor=proc).items()}


@pytest.fixture(scope="module")
def pair_inputs(hf_tokenizer, photos) -> dict:
    """Two left-padded rows, each with one photo (same grid) and a prompt of a different length."""
    inputs = _small_inputs(hf_tokenizer, photos, [helpers.chat("What is this?", 1),
                                                  helpers.chat("Describe the animal in this photo in a few words.", 1)],
                           [photos["coffee"], photos["chelsea"]])
    grid = inputs["image_grid_thw"]
    assert (grid[0] == grid[1]).all() and inputs["attention_mask"][0, 0] == 0
    return inputs


def _row(inputs: dict, b: int) -> dict:
    patches = int(np.prod(inputs["image_grid_thw"][0]))
    return {"input_ids": inputs["input_ids"][b:b + 1], "attention_mask": inputs["attention_mask"][b:b + 1],
            "pixel_values": inputs["pixel_values"][b * patches:(b + 1) * patches],
            "image_grid_thw": inputs["image_grid_thw"][b:b + 1]}


def _batch(model, inputs: dict):
    return training.prepare_batch(model, labels=training_labels(inputs), **inputs)


def _params(model) -> dict[str, np.ndarray]:
    return {p: np.asarray(v[...]) for p, v in model_params(model, adapters=True).items()}


def _leaves(state) -> dict[tuple, np.ndarray]:
    return {tuple(str(k) for k in p): np.asarray(v[...] if hasattr(v, "get_value") else v)
            for p, v in nnx.to_flat_state(state)}


# ----------------------------------------------------------------------------------- what trains, memory
PRESET_SELECTS = {
    "all": lambda p: True,
    "language_model": lambda p: p.startswith(("language_model.", "lm_head.")),
    "merger": lambda p: p.startswith(("language_model.", "lm_head.", "visual.merger.")),
    "lora": lambda p: p.endswith((".lora_A", ".lora_B")),
}


@pytest.mark.parametrize("preset", list(PRESET_SELECTS))
def test_trainable_presets_select_train_and_hold_state_for_only_their_parameters(tiny_checkpoint, pair_inputs,
                                                                                 preset):
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    if preset == "lora":
        lora.apply_lora(model, 4, 8, list(lora.DEFAULT_TARGETS) + list(lora.VISION_TARGETS))
    before = _params(model)
    selected = {p for p in before if PRESET_SELECTS[preset](p)}
    assert set(training.trainable_params(model, preset)) == selected
    assert selected and (preset == "all") == (selected == set(before))
    optimizer = training.make_optimizer(model, optax.adamw(1e-3), preset)

    # the optimizer holds Adam's two moments for exactly the selected parameters, nothing for the frozen ones
    state = _leaves(nnx.state(optimizer))
    for moment in ("mu", "nu"):
        held = {".".join(k[k.index(moment) + 1:]) for k in state if moment in k}
        assert held == selected, (moment, sorted(held ^ selected)[:5])
    state_bytes = sum(v.nbytes for v in state.values())
    selected_bytes = sum(before[p].nbytes for p in selected)
    assert 2 * selected_bytes <= state_bytes <= 2 * selected_bytes + 64, (state_bytes, selected_bytes)
    helpers.record(f"training/trainable-{preset}", params=len(selected), optimizer_state_bytes=state_bytes,
                   trainable_bytes=selected_bytes)

    # the gradient pytree the step differentiates holds the selected parameters only
    batch = _batch(model, pair_inputs)
    grads, _ = nnx.eval_shape(lambda m, b: training.grad_step(m, b, optimizer.wrt), model, batch)
    assert {param_path(p) for p, _ in nnx.to_flat_state(grads)} == selected

    if preset in ("all", "lora"):  # "all" freezes nothing; test_lora takes (and checks) "lora" steps
        return
    metrics = training.train_step(model, optimizer, batch)
    assert np.isfinite(float(metrics["loss"])) and int(metrics["tokens"]) > 0
    after = _params(model)
    frozen_changed = [p for p in before if p not in selected and not np.array_equal(before[p], after[p])]
    trained_same = [p for p in selected if np.array_equal(before[p], after[p])]
    assert not frozen_changed, frozen_changed[:5]
    assert not trained_same, trained_same[:5]


# ------------------------------------------------------------------------------- accumulation and remat
def test_accumulate_step_equals_train_step_on_the_concatenation(tiny_checkpoint, pair_inputs):
    tx = optax.sgd(1.0)  # params move by exactly -grad: Adam would hide a wrongly scaled gradient
    whole = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    start = _params(whole)
    metrics_whole = training.train_step(whole, training.make_optimizer(whole, tx), _batch(whole, pair_inputs))

    micro = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    batches = [_batch(micro, _row(pair_inputs, b)) for b in range(2)]
    assert batches[0].shape == batches[1].shape  # same padded length (and one compile)
    metrics_micro = training.accumulate_step(micro, training.make_optimizer(micro, tx), batches)

    # the two rows keep different numbers of tokens, so a mean of per-batch means would differ
    kept = [int((b.labels_BT[:, 1:] != training.IGNORE_INDEX).sum()) for b in batches]
    assert kept[0] != kept[1]
    assert int(metrics_micro["tokens"]) == int(metrics_whole["tokens"]) == sum(kept)
    loss_rel = abs(float(metrics_micro["loss"]) - float(metrics_whole["loss"])) / float(metrics_whole["loss"])
    a, b = _params(micro), _params(whole)
    moved = max(float(np.abs(b[p] - start[p]).max()) for p in b)
    diff = max(float(np.abs(a[p] - b[p]).max()) for p in a)
    helpers.record("training/accumulate-vs-concatenation", loss_rel=loss_rel, max_abs_param_diff=diff,
                   max_abs_param_move=moved)
    assert loss_rel <= 1e-6, loss_rel
    assert moved > 1e-3  # the step did move the parameters
    assert diff <= 1e-6, diff


def _remat_scopes(model, batch) -> list[str]:
    """The policies of the rematerialised scopes in the traced gradient of `batch_loss` (tracing only)."""
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(jax.grad(lambda s: training.batch_loss(nnx.merge(graphdef, s), batch)[0]))(state)
    text = str(jaxpr)
    return [re.search(r"policy=([^\n]*)", text[m.end():]).group(1) for m in re.finditer(r"remat2\[", text)]


def test_remat_keeps_loss_and_gradients(reference):
    """Rematerialised decoder layers and vision blocks: the loss and every gradient of the plain backward pass."""
    tied, case = REMAT_CASE
    loss0, _, grads0 = reference.our_grads(tied, case, keep=True)
    ref = reference(tied, case)
    model = Qwen2VLForConditionalGeneration.from_pretrained(reference.checkpoint(tied))
    batch = training.prepare_batch(model, labels=ref["labels"], **ref["inputs"])
    layers = model.config.text_config.num_hidden_layers + model.config.vision_config.depth
    assert _remat_scopes(model, batch) == []
    for policy in ("nothing_saveable", "dots_saveable"):
        model.set_remat(policy)
        assert model.language_model.remat == policy and model.visual.remat == policy
        # every decoder layer and vision block is one rematerialised scope under the named policy
        scopes = _remat_scopes(model, batch)
        assert len(scopes) == layers and all(s == scopes[0] for s in scopes), scopes
        assert {"nothing_saveable": "nothing_saveable", "dots_saveable": "DotsSaveable"}[policy] in scopes[0]
        loss, _, grads = our_loss_and_grads(model, ref["inputs"], ref["labels"])
        assert grads.keys() == grads0.keys()
        loss_rel = abs(loss - loss0) / loss0
        grad_rel = max(helpers.rel_err(grads[p], grads0[p]) for p in grads0)
        helpers.record(f"training/remat-{policy}", loss_rel=loss_rel, max_rel=grad_rel,
                       vs_torch_max_rel=compare_grads(grads, ref["grads"])["max_rel"])
        assert loss_rel <= 1e-6 and grad_rel <= 1e-6, (policy, loss_rel, grad_rel)
    model.set_remat(None)
    assert model.language_model.remat is None and model.visual.remat is None


# ------------------------------------------------------------------------------------------------- mesh
def _keep_gradients() -> optax.GradientTransformation:
    """Stores the incoming gradient as its state (so a train step's gradient can be read back) and passes it on."""
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda updates, state, params=None: (updates, updates))


def mesh_child(job_file: str) -> None:
    """Child process body (4 virtual devices): one train step on one device, data 2 x model 2, fsdp 4."""
    _start_child_jax()
    from qwen2vl_jax import sharding

    job = json.loads(Path(job_file).read_text())
    data = dict(np.load(job["inputs"]))
    labels = data.pop("labels")
    assert len(jax.devices()) == 4
    configs = [("single", None, None), ("data2-model2", sharding.make_mesh(data=2, model=2), sharding.LOGICAL_RULES),
               ("fsdp4", sharding.make_mesh(fsdp=4), sharding.LOGICAL_RULES)]
    runs = {}
    for name, mesh, rules in configs:
        model = Qwen2VLForConditionalGeneration.from_pretrained(job["checkpoint"], attn_implementation="xla")
        if mesh is not None:
            sharding.shard_model(model, mesh, rules)
        tx = optax.chain(_keep_gradients(), optax.inject_hyperparams(optax.adamw)(learning_rate=job["lrs"][0]))
        optimizer = training.make_optimizer(model, tx, "all")
        batch = training.prepare_batch(model, labels=labels, **data)
        if mesh is not None:
            batch = training.shard_batch(batch, mesh)
        model0 = jax.tree.map(jnp.copy, nnx.state(model))
        optimizer0 = jax.tree.map(jnp.copy, nnx.state(optimizer))
        compiles = training.compiles()["train_step"]
        run = {"params": {}}
        for lr in job["lrs"]:  # restart from the same state; the learning rate lives in the state (one compile)
            nnx.update(model, jax.tree.map(jnp.copy, model0))
            nnx.update(optimizer, jax.tree.map(jnp.copy, optimizer0))
            optimizer.opt_state[1].hyperparams["learning_rate"].set_value(jnp.asarray(lr, jnp.float32))
            metrics = training.train_step(model, optimizer, batch)
            run["params"][lr] = _params(model)
            if lr == job["lrs"][0]:
                run["loss"] = float(metrics["loss"])
                kept = nnx.state(optimizer)["opt_state"][0]
                run["grads"] = {param_path(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(kept)}
                up = model.language_model.layers[0].mlp.up_proj.weight[...]
                grad_up = kept["language_model"]["layers"][0]["mlp"]["up_proj"]["weight"][...]
                run["specs"] = {"up_proj": [str(s) for s in up.sharding.spec] if mesh else [],
                                "up_proj_grad": [str(s) for s in grad_up.sharding.spec] if mesh else [],
                                "embed": [str(s) for s in model.language_model.embed_tokens.weight[...].sharding.spec]
                                if mesh else [], "devices": len(up.sharding.device_set),
                                "batch_rows": str(batch.input_ids_BT.sharding.spec[0]) if mesh else ""}
        run["compiles"] = training.compiles()["train_step"] - compiles
        runs[name] = run
    ref = runs["single"]
    out = {}
    for name, run in runs.items():
        if name == "single":
            continue
        grad_rel = {p: helpers.rel_err(run["grads"][p], ref["grads"][p]) for p in ref["grads"]}
        worst = max(grad_rel, key=grad_rel.get)
        out[name] = {"loss_rel": abs(run["loss"] - ref["loss"]) / abs(ref["loss"]), "grad_max_rel": grad_rel[worst],
                     "grad_worst": worst, "grads": len(grad_rel), "specs": run["specs"], "compiles": run["compiles"],
                     "param_max_abs": {str(lr): max(float(np.abs(run["params"][lr][p] - ref["params"][lr][p]).max())
                                                    for p in ref["params"][lr]) for lr in job["lrs"]}}
    print(json.dumps(out))


def test_train_step_on_a_mesh_matches_one_device(tiny_checkpoint, hf_tokenizer, photos, tmp_path):
    inputs = _small_inputs(hf_tokenizer, photos, [helpers.chat("What is this?", 1), helpers.chat("Hello there!"),
                                                  helpers.chat("Name the animal in this photo.", 1),
                                                  helpers.chat("Count from one to five, please.")],
                           [photos["rocket"], photos["chelsea"]], max_pixels=32 * 28 * 28)
    np.savez(tmp_path / "inputs.npz", labels=training_labels(inputs), **inputs)
    job = {"checkpoint": str(tiny_checkpoint), "inputs": str(tmp_path / "inputs.npz"), "lrs": [1e-5, 1e-4]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    out = _run_child("mesh_child", tmp_path / "job.json", _child_env(XLA_FLAGS=flags.strip()))
    for name, r in out.items():
        helpers.record(f"training/mesh-{name}", loss_rel=r["loss_rel"], grad_max_rel=r["grad_max_rel"],
                       param_max_abs_lr_1e_5=r["param_max_abs"]["1e-05"],
                       param_max_abs_lr_1e_4=r["param_max_abs"]["0.0001"])
    tp, fsdp = out["data2-model2"], out["fsdp4"]
    assert tp["specs"]["up_proj"] == ["model", "None"] and tp["specs"]["batch_rows"] == "data"
    assert tp["specs"]["up_proj_grad"] == ["model", "None"] and tp["specs"]["embed"] == ["model", "None"]
    # a mesh axis of size 1 ("model" here) is left out of the spec (sharding docstring)
    assert fsdp["specs"]["up_proj"] == ["None", "fsdp"] and fsdp["specs"]["batch_rows"] == "fsdp"
    assert fsdp["specs"]["up_proj_grad"] == ["None", "fsdp"] and fsdp["specs"]["embed"] == ["None", "fsdp"]
    for name, r in out.items():
        assert r["specs"]["devices"] == 4, (name, r["specs"])
        assert r["compiles"] == 1, (name, r["compiles"])  # the second learning rate reused the compiled step
        assert r["grads"] > 40
        assert r["loss_rel"] <= 1e-6, (name, r)
        assert r["grad_max_rel"] <= GRAD_TOL, (name, r)
        assert r["param_max_abs"]["1e-05"] <= 1e-6, (name, r)
        assert r["param_max_abs"]["0.0001"] <= 2e-4, (name, r)  # Adam's first step: at most 2 lr per element


def test_lora_parameters_are_not_base_parameters(tiny_checkpoint):
    """A LoRA parameter is a `LoRAParam`: selected by the "lora" preset, left out of `model_params`."""
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    lora.apply_lora(model, 2)
    adapters = training.trainable_params(model, "lora")
    assert adapters and all(isinstance(v, LoRAParam) for v in adapters.values())
    assert not set(adapters) & set(model_params(model))
    with pytest.raises(ValueError, match="selects no parameter"):
        training.trainable_params(Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint), "lora")
