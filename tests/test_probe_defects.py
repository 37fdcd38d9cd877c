"""Defects a hostile-user probe found, one test (or a few) each: out-of-range seeds, temperatures that underflow
float32, a one-step fine-tune, resuming from a damaged checkpoint, `plan` overflow and context, bad adapter
configs and weights, `convert --force` over foreign files, flag ranges (`--port`, `--out ""`, `--mesh`,
`--max-grad-norm`), non-image data URLs and the hook-name suggestions."""

from __future__ import annotations

import ast
import json
import re
import shutil

import numpy as np
import pytest
from test_cli_errors import _one_error_line

from qwen2vl_jax import cli
from qwen2vl_jax.generation.decoding import generate
from qwen2vl_jax.generation.sampling import GenerationConfig
from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

SEED_MAX = 2**63 - 1


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def prompt_ids(proc):
    import helpers

    return np.asarray(proc(text=helpers.chat("Name three colors."))["input_ids"])


# -------------------------------------------------------------------------------------------- 6: seeds
@pytest.mark.parametrize("seed", ["99999999999999999999999", str(SEED_MAX + 1), "-1", "seven"])
@pytest.mark.parametrize("command", ["generate", "finetune"])
def test_out_of_range_seed_flag_is_one_line(command, seed, tiny_checkpoint, tmp_path, capsys):
    argv = {"generate": ["generate", "--model", str(tiny_checkpoint), "--prompt", "hi", "--max-new-tokens", "2",
                         "--quiet"],
            "finetune": ["finetune", "--model", str(tiny_checkpoint), "--data", str(tmp_path / "d.jsonl"), "--out",
                         str(tmp_path / "out"), "--lora-rank", "2", "--quiet"]}[command]
    with pytest.raises(SystemExit) as exc:
        cli.main(argv + ["--seed", seed])
    assert exc.value.code == 2
    _one_error_line(capsys.readouterr().err, "--seed", str(SEED_MAX))


def test_largest_seed_generates(model, prompt_ids):
    out = generate(model, prompt_ids, max_new_tokens=2, do_sample=True, top_k=0, seed=SEED_MAX)
    assert out.shape == (1, prompt_ids.shape[1] + 2)


@pytest.mark.parametrize("seed", [SEED_MAX + 1, 10**23, -1, True, 1.5, "3", None])
def test_generation_config_refuses_bad_seeds(seed):
    with pytest.raises(ValueError, match=r"`seed`: must be an integer in \[0, 2\*\*63 - 1\]"):
        GenerationConfig(seed=seed).validate(vocab_size=151936)
    GenerationConfig(seed=SEED_MAX).validate(vocab_size=151936)
    GenerationConfig(seed=np.uint64(SEED_MAX)).validate(vocab_size=151936)  # NumPy integers become Python ints


# ---------------------------------------------------------------------------- 7: temperatures that underflow
@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 1e-38, 1e-37])
def test_tiny_temperature_is_the_greedy_limit(model, prompt_ids, temperature):
    """1e-300 is 0 in float32 (logits / 0: inf, nan); 1e-38 makes logits / t overflow. Either is the limit
    t -> 0 of sampling: the argmax token, never garbage."""
    greedy = generate(model, prompt_ids, max_new_tokens=6, do_sample=False)
    for seed in (0, 1):
        sampled = generate(model, prompt_ids, max_new_tokens=6, do_sample=True, temperature=temperature, top_k=0,
                           top_p=1.0, seed=seed)
        np.testing.assert_array_equal(sampled, greedy)


def test_tiny_temperature_through_the_cli_is_greedy(tiny_checkpoint, capsys):
    base = ["generate", "--model", str(tiny_checkpoint), "--prompt", "Name three colors.", "--max-new-tokens", "6",
            "--dtype", "float32", "--json", "--quiet"]
    assert cli.main(base + ["--greedy"]) == 0
    greedy = json.loads(capsys.readouterr().out)["answer"]
    assert cli.main(base + ["--temperature", "1e-300", "--top-k", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["answer"] == greedy


# ------------------------------------------------------------------------------- 9: one step, warmup >= steps
MAX_PIXELS = 16 * 28 * 28  # at most 16 vision tokens per image: a fast run


def _conversation(image: str, question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                      {"type": "text", "text": question}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


@pytest.fixture(scope="module")
def one_conversation(tmp_path_factory, photos):
    d = tmp_path_factory.mktemp("probe_finetune")
    photos["rocket"].save(d / "rocket.png")
    path = d / "one.jsonl"
    path.write_text(json.dumps(_conversation("rocket.png", "Describe the image.", "A red rocket.")) + "\n")
    return path


@pytest.mark.parametrize("steps, warmup_ratio", [(1, 0.03), (1, 0.0), (2, 1.0), (3, 0.5), (10, 0.03), (4, 1.0)])
def test_schedule_follows_transformers_when_warmup_covers_the_run(steps, warmup_ratio):
    """transformers' `get_cosine_schedule_with_warmup` (warmup = ceil(ratio * steps)) at every update, including
    a one-step run and warmup >= steps, where optax's cosine decay has no steps left."""
    import math

    from transformers.optimization import _get_cosine_schedule_with_warmup_lr_lambda

    from qwen2vl_jax import training

    lr = 3e-3
    schedule = training.recipe_schedule(lr, steps, warmup_ratio=warmup_ratio)
    warmup = math.ceil(warmup_ratio * steps)
    for step in range(steps):
        want = lr * _get_cosine_schedule_with_warmup_lr_lambda(step, num_warmup_steps=warmup,
                                                                num_training_steps=steps, num_cycles=0.5)
        assert float(schedule(step)) == pytest.approx(want, rel=1e-6, abs=1e-12), step


def test_one_step_finetune_through_the_cli(tiny_checkpoint, one_conversation, tmp_path, capsys):
    out = tmp_path / "one"
    argv = ["finetune", "--model", str(tiny_checkpoint), "--data", str(one_conversation), "--out", str(out),
            "--lora-rank", "2", "--max-pixels", str(MAX_PIXELS), "--quiet", "--json"]
    assert cli.main(argv + ["--steps", "1"]) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 1 and (out / "adapter" / "adapter_model.safetensors").is_file()
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1] and np.isfinite(log[0]["loss"])
    # one conversation and the default epochs (1): one step too
    out2 = tmp_path / "epoch"
    assert cli.main(argv[:6] + [str(out2)] + argv[7:]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["steps"] == 1


# ------------------------------------------------------------------------------------ 10: a damaged checkpoint
def _finetune_argv(checkpoint, data, out, *extra):
    return ["finetune", "--model", str(checkpoint), "--data", str(data), "--out", str(out), "--lora-rank", "2",
            "--save-every", "1", "--max-pixels", str(MAX_PIXELS), "--quiet", "--json", *extra]


@pytest.fixture(scope="module")
def two_checkpoints(tiny_checkpoint, one_conversation, tmp_path_factory):
    """A finished 2-step run with checkpoints 1 and 2 (kept side by side)."""
    out = tmp_path_factory.mktemp("probe_resume") / "run"
    assert cli.main(_finetune_argv(tiny_checkpoint, one_conversation, out, "--steps", "2")) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1", "2"]
    return out


def _damage(step_dir, kind):
    rng = np.random.default_rng(0)
    data_files = [f for f in (step_dir / "params").rglob("*") if f.is_file() and f.parent.name == "d"]
    if kind == "no_optimizer":
        shutil.rmtree(step_dir / "optimizer")
    elif kind == "garbage_metadata":
        (step_dir / "meta" / "metadata").write_text("{not json")
    elif kind == "wrong_metadata":
        (step_dir / "meta" / "metadata").write_text(json.dumps({"step": "two", "loader": []}))
    elif kind == "empty_step":
        for entry in step_dir.iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    elif kind == "random_bytes":
        assert data_files
        for f in data_files:
            f.write_bytes(rng.integers(0, 256, f.stat().st_size, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        assert data_files
        for f in data_files:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


@pytest.mark.parametrize("kind", ["no_optimizer", "garbage_metadata", "wrong_metadata", "empty_step", "random_bytes",
                                  "truncated"])
def test_resume_falls_back_past_a_damaged_checkpoint(kind, two_checkpoints, tiny_checkpoint, one_conversation,
                                                     tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    _damage(out / "checkpoints" / "2", kind)
    capsys.readouterr()
    assert cli.main(_finetune_argv(tiny_checkpoint, one_conversation, out, "--steps", "3", "--resume")) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "checkpoint 2" in warnings[0] and "step 1" in warnings[0], captured.err
    result = json.loads(captured.out)
    assert result["resumed_from"] == 1 and result["steps"] == 3
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["2", "3"]


def test_resume_without_an_intact_checkpoint_is_one_line(two_checkpoints, tiny_checkpoint, one_conversation,
                                                         tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    _damage(out / "checkpoints" / "2", "no_optimizer")
    _damage(out / "checkpoints" / "1", "garbage_metadata")
    capsys.readouterr()
    assert cli.main(_finetune_argv(tiny_checkpoint, one_conversation, out, "--steps", "3", "--resume")) == 2
    _one_error_line(capsys.readouterr().err, "no intact checkpoint", "checkpoint 2: ", "checkpoint 1: ")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1", "2"]  # nothing moved or deleted


# ------------------------------------------------------------------------ 11: plan limits, adapter config / weights
@pytest.mark.parametrize("flags, needles", [
    (["--batch", "999999999999", "--context", "999999999"], ["context 999999999", "max_position_embeddings",
                                                            "32768"]),
    (["--context", "32769"], ["context 32769", "max_position_embeddings"]),
    (["--batch", "99999999999999999999", "--context", "32768"], ["batch 99999999999999999999", "too large"]),
])
def test_plan_out_of_range_is_one_line(flags, needles, capsys):
    assert cli.main(["plan", "--model", "2b", *flags]) == 2
    _one_error_line(capsys.readouterr().err, *needles)


def test_plan_at_the_limits_answers(capsys):
    batch = 3 * 10**10  # x 32768 tokens x 8960 (the MLP width): just under 2**63 elements
    assert cli.main(["plan", "--model", "2b", "--batch", str(batch), "--context", "32768", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["context"] == 32768 and got["kv_cache"]["shape"] == [batch, 32768, 2, 128]
    assert got["kv_cache"]["bytes_per_device"] == 2 * 28 * batch * 32768 * 2 * 128 * 2  # Python ints, bf16
    assert cli.main(["plan", "--model", "2b", "--batch", str(batch * 4), "--context", "32768"]) == 2
    _one_error_line(capsys.readouterr().err, "too large", f"batch {(2**63 - 1) // (32768 * 8960):,} at most")


def _adapter_variant(src, dst, *, config=None, raw_config=None, tensors=None):
    shutil.copytree(src, dst)
    if config is not None:
        raw = json.loads((src / "adapter_config.json").read_text())
        raw.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(raw))
    if raw_config is not None:
        (dst / "adapter_config.json").write_text(raw_config((src / "adapter_config.json").read_text()))
    if tensors is not None:
        from qwen2vl_jax.checkpoints.safetensors_io import load_file, save_file

        weights = load_file(src / "adapter_model.safetensors")
        save_file(tensors(weights), dst / "adapter_model.safetensors")
    return dst


@pytest.mark.parametrize("case, needle", [
    (dict(config={"lora_alpha": "big"}), "lora_alpha"),
    (dict(config={"lora_alpha": True}), "lora_alpha"),
    (dict(raw_config=lambda text: re.sub(r'"lora_alpha": [0-9.]+', '"lora_alpha": NaN', text)), "lora_alpha"),
    (dict(config={"lora_dropout": "some"}), "lora_dropout"),
    (dict(config={"lora_dropout": 1.5}), "lora_dropout"),
    (dict(config={"use_rslora": "yes"}), "use_rslora"),
])
def test_bad_adapter_config_values_are_one_line(case, needle, two_checkpoints, tiny_checkpoint, tmp_path, capsys):
    adapter = _adapter_variant(two_checkpoints / "adapter", tmp_path / "adapter", **case)
    if "raw_config" in case:
        assert "NaN" in (adapter / "adapter_config.json").read_text()
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(tiny_checkpoint), "--adapter", str(adapter), "--prompt", "hi",
                     "--max-new-tokens", "2", "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, needle, "adapter_config.json")


@pytest.mark.parametrize("damage", ["nan", "inf", "int32"])
def test_non_finite_or_integer_adapter_weights_are_refused(damage, two_checkpoints, tiny_checkpoint, tmp_path):
    from qwen2vl_jax import lora

    victim = {}

    def spoil(weights):
        key = sorted(k for k in weights if k.endswith("lora_A.weight"))[0]
        victim["key"] = key
        w = weights[key].copy()
        if damage == "int32":
            weights[key] = np.ones(w.shape, np.int32)
        else:
            w.flat[3] = np.nan if damage == "nan" else np.inf
            weights[key] = w
        return weights

    adapter = _adapter_variant(two_checkpoints / "adapter", tmp_path / "adapter", tensors=spoil)
    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    with pytest.raises(lora.LoRAError, match="int32" if damage == "int32" else "NaN or Inf") as exc:
        lora.load_adapter(model, adapter)
    assert victim["key"] in str(exc.value)
    assert not lora.lora_modules(model)  # nothing attached


# ----------------------------------------------------------------------------- 12: convert --force, foreign files
def test_convert_force_keeps_files_that_are_not_the_checkpoints(tiny_checkpoint, tmp_path, capsys):
    dst = tmp_path / "converted"
    assert cli.main(["convert", "hf-to-flax", str(tiny_checkpoint), str(dst), "--quiet"]) == 0
    assert cli.main(["convert", "hf-to-flax", str(tiny_checkpoint), str(dst), "--force", "--quiet"]) == 0  # still
    (dst / "notes.txt").write_text("mine")
    (dst / "sub").mkdir()
    (dst / "sub" / "y").write_text("also mine")
    before = sorted(p.name for p in dst.iterdir())
    capsys.readouterr()
    assert cli.main(["convert", "hf-to-flax", str(tiny_checkpoint), str(dst), "--force", "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "notes.txt", "sub/", "--force only replaces")
    assert (dst / "notes.txt").read_text() == "mine" and (dst / "sub" / "y").read_text() == "also mine"
    assert sorted(p.name for p in dst.iterdir()) == before  # nothing deleted


# ------------------------------------------------------------------------------------------ 13: flag ranges
@pytest.mark.parametrize("port", ["70000", "65536", "-1", "http"])
def test_serve_port_out_of_range_is_one_line(port, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--model", str(tmp_path / "no-model"), "--port", port])
    assert exc.value.code == 2
    _one_error_line(capsys.readouterr().err, "--port", "65535")


def test_serve_port_in_range_parses():
    args = cli.build_parser().parse_args(["serve", "--model", "m", "--port", "65535"])
    assert args.port == 65535


@pytest.mark.parametrize("flag, value", [("--out", ""), ("--out", "  "), ("--data", "")])
def test_finetune_empty_paths_are_refused(flag, value, tiny_checkpoint, one_conversation, tmp_path, capsys,
                                          monkeypatch):
    monkeypatch.chdir(tmp_path)  # were the empty --out taken as ".", the run would write here
    argv = {"--model": str(tiny_checkpoint), "--data": str(one_conversation), "--out": str(tmp_path / "out")}
    argv[flag] = value
    assert cli.main(["finetune", *[x for kv in argv.items() for x in kv], "--lora-rank", "2", "--steps", "1",
                     "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, flag.lstrip("-"), "empty")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mesh, needle", [("model=2,model=4", "model twice"), ("", "empty"), (" , ", "empty"),
                                          ("data=1,data=1", "data twice")])
def test_plan_mesh_duplicates_and_empty_are_one_line(mesh, needle, capsys):
    assert cli.main(["plan", "--model", "2b", "--mesh", mesh]) == 2
    _one_error_line(capsys.readouterr().err, "mesh", needle)


def test_generate_empty_mesh_is_one_line(tiny_checkpoint, capsys):
    assert cli.main(["generate", "--model", str(tiny_checkpoint), "--prompt", "hi", "--max-new-tokens", "1",
                     "--mesh", "", "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "--mesh", "empty")


@pytest.mark.parametrize("value", ["-1", "nan", "-0.5"])
def test_negative_max_grad_norm_is_refused(value, tiny_checkpoint, one_conversation, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["finetune", "--model", str(tiny_checkpoint), "--data", str(one_conversation), "--out",
                  str(tmp_path / "out"), "--lora-rank", "2", "--steps", "1", "--max-grad-norm", value, "--quiet"])
    assert exc.value.code == 2
    _one_error_line(capsys.readouterr().err, "--max-grad-norm", ">= 0")
    assert not (tmp_path / "out").exists()


def test_finetune_config_refuses_a_negative_max_grad_norm(tmp_path):
    from qwen2vl_jax.training.finetune import FinetuneConfig, FinetuneError

    for bad in (-1.0, 0.0, float("nan"), "1"):
        with pytest.raises(FinetuneError, match="max_grad_norm"):
            FinetuneConfig(model="m", data="d.jsonl", out=str(tmp_path), max_grad_norm=bad)
    assert FinetuneConfig(model="m", data="d.jsonl", out=str(tmp_path), max_grad_norm=None).max_grad_norm is None


@pytest.mark.parametrize("url", ["data:text/plain;base64,aGVsbG8=", "data:,hello", "data:application/pdf;base64,AA=="])
def test_a_non_image_data_url_says_so(url):
    from qwen2vl_jax.processing.image_io import load_image

    with pytest.raises(ValueError) as exc:
        load_image(url)
    message = str(exc.value)
    assert "not found" not in message and "data:image/" in message and url.split(";")[0].split(",")[0] in message


def test_a_non_image_data_url_in_generate_is_one_line(tiny_checkpoint, capsys):
    assert cli.main(["generate", "--model", str(tiny_checkpoint), "--prompt", "hi", "--image",
                     "data:text/plain;base64,aGVsbG8=", "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err, "data:text/plain", "data:image/")


# ------------------------------------------------------------------------------------ 14: hook-name suggestions
@pytest.mark.parametrize("typo, nearest", [("text.layers.0.resid_pots", "text.layers.0.resid_post"),
                                           ("text.layers.1.atn.probs", "text.layers.1.attn.probs"),
                                           ("vision.blocks.0.resid_post ", "vision.blocks.0.resid_post")])
def test_hook_error_suggests_the_nearest_names(model, typo, nearest):
    from qwen2vl_jax.hooks.run import list_hook_points
    from qwen2vl_jax.modeling.hook_points import HookError, resolve_names

    names = list_hook_points(model)
    assert nearest in names and typo not in names
    with pytest.raises(HookError) as exc:
        resolve_names([typo], names)
    close = re.search(r"close: (\[.*\])", str(exc.value))
    assert close, str(exc.value)
    suggested = ast.literal_eval(close.group(1))  # the message shows a Python list of names
    assert suggested[0] == nearest and 1 <= len(suggested) <= 6 and set(suggested) <= set(names)
