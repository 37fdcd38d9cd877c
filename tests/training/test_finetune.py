"""Fine-tuning (qwen2vl_jax/finetune.py): a tiny model overfits one caption (LoRA through the CLI, full through the
Python API) so that greedy generation reproduces it; a run killed mid-way and resumed ends bit for bit where an
uninterrupted one does; one compile per batch shape; user errors exit 2 before the first step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from qwen2vl_jax import cli
from qwen2vl_jax.training.finetune import FinetuneConfig, finetune, read_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CAPTION = "A red rocket stands on the launch pad under a clear blue sky."
QUESTION = "Describe the image."
MAX_PIXELS = 16 * 28 * 28  # at most 16 vision tokens per image: a fast run


def conversation(image: str, question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image", "image": image},
                                                      {"type": "text", "text": question}]},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory, photos) -> Path:
    """A directory with the rocket photo saved as a file (JSONL paths are relative to the JSONL)."""
    d = tmp_path_factory.mktemp("finetune_media")
    photos["rocket"].save(d / "rocket.png")
    return d


@pytest.fixture(scope="module")
def caption_data(media) -> Path:
    return write_jsonl(media / "caption.jsonl", [conversation("rocket.png", QUESTION, CAPTION)])


def greedy_answer(model, checkpoint, image: Path) -> str:
    """The model's greedy answer to the training question about `image` (prompt built by the checkpoint's processor:
    the user turn with the image, then the assistant header)."""
    from qwen2vl_jax.processing.processor import Qwen2VLProcessor

    proc = Qwen2VLProcessor.from_pretrained(checkpoint, max_pixels=MAX_PIXELS)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    inputs = proc(text=[prompt], images=[str(image)])
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False, repetition_penalty=1.0)
    return proc.decode(np.asarray(out)[0, inputs["input_ids"].shape[1]:].tolist())


def first_perfect_step(out: Path) -> int:
    """The first step whose (teacher-forced) accuracy on the caption reached 1."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["step"] for r in rows if r.get("accuracy") == 1.0)


def test_caption_is_long_enough(proc):
    assert len(proc.tokenizer.encode(CAPTION, add_special_tokens=False)) >= 12


def test_lora_through_the_cli_overfits_a_caption(tiny_checkpoint, caption_data, media, tmp_path, capsys):
    from qwen2vl_jax import lora
    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

    out = tmp_path / "lora"
    rc = cli.main(["finetune", "--model", str(tiny_checkpoint), "--data", str(caption_data), "--out", str(out),
                   "--lora-rank", "16", "--lr", "3e-3", "--warmup-ratio", "0", "--steps", "30",
                   "--max-pixels", str(MAX_PIXELS), "--quiet", "--json"])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == 1.0 and result["paths"]["adapter"] == str(out / "adapter")
    print(f"LoRA: caption learnt (teacher-forced accuracy 1) at step {first_perfect_step(out)} of 30")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (out / "adapter").iterdir()}
    assert json.loads((out / "finetune_config.json").read_text())["lora_rank"] == 16
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))
    assert set(log[0]) == {"step", "loss", "tokens", "accuracy", "lr", "seconds"}
    assert log[0]["lr"] == pytest.approx(3e-3, rel=1e-6)

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    assert greedy_answer(model, tiny_checkpoint, media / "rocket.png") != CAPTION
    lora.load_adapter(model, out / "adapter")
    assert greedy_answer(model, tiny_checkpoint, media / "rocket.png") == CAPTION
    # the same through `generate --adapter`
    rc = cli.main(["generate", "--model", str(tiny_checkpoint), "--adapter", str(out / "adapter"), "--image",
                   str(media / "rocket.png"), "--prompt", QUESTION, "--greedy", "--repetition-penalty", "1.0",
                   "--max-new-tokens", "24", "--max-pixels", str(MAX_PIXELS), "--dtype", "float32", "--json",
                   "--quiet"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["answer"] == CAPTION
    assert cli.main(["generate", "--model", str(tiny_checkpoint), "--adapter", str(media), "--prompt", "hi",
                     "--quiet"]) == 2
    assert "adapter_config.json is missing" in capsys.readouterr().err


def test_full_finetuning_through_the_api_overfits_a_caption(tiny_checkpoint, caption_data, media, tmp_path):
    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

    out = tmp_path / "full"
    cfg = FinetuneConfig(model=tiny_checkpoint, data=caption_data, out=out, eval_data=caption_data, lr=1e-3,
                         warmup_ratio=0.0, steps=25, max_pixels=MAX_PIXELS)
    result = finetune(cfg, progress=False)
    print(f"full: caption learnt (teacher-forced accuracy 1) at step {first_perfect_step(out)} of 25")
    assert result["eval"]["accuracy"] == 1.0 and result["eval"]["tokens"] == result["tokens"]
    assert result["compiles"]["train_step"] <= 1 and result["compiles"]["eval_step"] <= 1
    # an HF checkpoint with the tokenizer / processor files: loads and prompts on its own
    model = Qwen2VLForConditionalGeneration.from_pretrained(out / "model")
    assert (out / "model" / "tokenizer.json").is_file()
    assert greedy_answer(model, out / "model", media / "rocket.png") == CAPTION


def _resume_args(model, data, out, steps):
    return ["finetune", "--model", str(model), "--data", str(data), "--out", str(out), "--lora-rank", "4",
            "--lora-dropout", "0.1", "--lr", "1e-3", "--steps", str(steps), "--save-every", "3",
            "--max-pixels", str(MAX_PIXELS), "--seed", "7", "--quiet"]


def test_a_killed_run_resumes_bit_for_bit(tiny_checkpoint, media, tmp_path, capsys):
    rows = [conversation("rocket.png", q, a) for q, a in [(QUESTION, CAPTION), ("What color is the rocket?", "Red."),
                                                          ("Where is it?", "On the launch pad.")]]
    data = write_jsonl(media / "three.jsonl", rows)
    steps = 10  # 3 conversations a epoch, shuffled per epoch: the loader position and epoch must be restored too
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    cfg = FinetuneConfig(model=tiny_checkpoint, data=data, out=out_a, lora_rank=4, lora_dropout=0.1, lr=1e-3,
                         steps=steps, save_every=3, max_pixels=MAX_PIXELS, seed=7)
    finetune(cfg, progress=False)  # uninterrupted
    assert sorted(int(p.name) for p in (out_a / "checkpoints").iterdir()) == [9, 10]  # the last two are kept

    # The same run in a child process (same XLA flags and matmul precision as this one), SIGKILLed once a checkpoint
    # is complete (orbax renames it into place when whole), then resumed here.
    env = dict(os.environ)
    if jax.config.jax_default_matmul_precision:
        env["JAX_DEFAULT_MATMUL_PRECISION"] = str(jax.config.jax_default_matmul_precision)
    log = tmp_path / "child.log"
    with open(log, "wb") as sink:
        child = subprocess.Popen([sys.executable, "-m", "qwen2vl_jax", *_resume_args(tiny_checkpoint, data, out_b,
                                                                                     steps)],
                                 cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        ckpts = out_b / "checkpoints"
        while not (ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())):
            assert child.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    killed_at = max(int(p.name) for p in (out_b / "checkpoints").iterdir() if p.name.isdigit())
    assert killed_at < steps

    # a second run into the same directory must resume, not overwrite
    assert cli.main(_resume_args(tiny_checkpoint, data, out_b, steps)) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main([*_resume_args(tiny_checkpoint, data, out_b, steps), "--resume", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["resumed_from"] == killed_at

    a, b = read_checkpoint(out_a), read_checkpoint(out_b)
    assert a["meta"]["step"] == b["meta"]["step"] == steps and a["meta"]["loader"] == b["meta"]["loader"]
    for part in ("params", "optimizer", "rng"):
        leaves_a, leaves_b = jax.tree.leaves(a[part]), jax.tree.leaves(b[part])
        assert jax.tree.structure(a[part]) == jax.tree.structure(b[part]) and leaves_a
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b)), part
    assert (out_a / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (out_b / "adapter" / "adapter_model.safetensors").read_bytes()
    steps_logged = [json.loads(line)["step"] for line in (out_b / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == list(range(1, steps + 1))  # the steps redone after the checkpoint are logged once
    with capsys.disabled():
        print(f"resume: killed after the step-{killed_at} checkpoint of {steps}, resumed: identical")


def test_one_compile_per_batch_shape(tiny_checkpoint, media, tmp_path):
    # answers of different lengths: token counts in three different 64-token buckets
    rows = [conversation("rocket.png", QUESTION, "A rocket."),
            conversation("rocket.png", QUESTION, " ".join(["A red rocket on the pad."] * 8)),
            conversation("rocket.png", QUESTION, " ".join(["A red rocket on the pad."] * 16))]
    data = write_jsonl(media / "lengths.jsonl", rows)
    jax.clear_caches()
    cfg = FinetuneConfig(model=tiny_checkpoint, data=data, out=tmp_path / "c", lora_rank=3, steps=6,
                         max_pixels=MAX_PIXELS)
    result = finetune(cfg, progress=False)
    shapes = {tuple(s) for s in result["batch_shapes"]}
    assert len({s[1] for s in shapes}) == 3, shapes  # three token buckets, each met twice over two epochs
    # the jit cache was emptied above: a counter that never moved would fail here
    assert result["compiles"]["train_step"] == len(shapes) == 3  # training.compiles(): train_step's programs


def test_user_errors_exit_2_before_the_first_step(tiny_checkpoint, media, tmp_path, capsys):
    good = conversation("rocket.png", QUESTION, CAPTION)
    base = ["finetune", "--model", str(tiny_checkpoint), "--lora-rank", "4", "--steps", "2"]

    bad_line = write_jsonl(media / "bad.jsonl", [good, '{"messages": [oops'])
    assert cli.main([*base, "--data", str(bad_line), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "line 2" in err and "invalid JSON" in err

    missing = write_jsonl(media / "missing.jsonl", [good, conversation("nowhere.png", QUESTION, CAPTION)])
    assert cli.main([*base, "--data", str(missing), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "nowhere.png" in err and "not found" in err
    assert not (tmp_path / "y").exists()  # nothing was loaded or written

    ok = write_jsonl(media / "ok.jsonl", [good])
    for extra, words in ((["--lora-alpha", "8", "--full"], None),  # argparse: --lora-rank and --full exclude
                         (["--eval-every", "5"], "eval_every needs eval_data"),
                         (["--batch-size", "0"], "batch_size must be a positive integer")):
        args = [*base, "--data", str(ok), "--out", str(tmp_path / "z"), *extra]
        if words is None:
            with pytest.raises(SystemExit) as exit_info:
                cli.main(args)
            assert exit_info.value.code == 2
        else:
            assert cli.main(args) == 2
            assert words in capsys.readouterr().err
    assert cli.main(["finetune", "--model", str(tmp_path / "no-model"), "--data", str(ok), "--out",
                     str(tmp_path / "w"), "--full"]) == 2
    assert "cannot load the model" in capsys.readouterr().err
