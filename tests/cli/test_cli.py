"""The `qwen2vl-jax` command line: generate, chat, info, convert, selfcheck, and user errors (exit code 2)."""

import io
import json
import subprocess
import sys

import pytest

from qwen2vl_jax import attention, cli


@pytest.fixture(scope="module")
def converted(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint converted to our Flax format with the converter command."""
    dst = tmp_path_factory.mktemp("cli") / "tiny-flax"
    assert cli.main(["convert", "hf-to-flax", str(tiny_checkpoint), str(dst), "--quiet"]) == 0
    assert (dst / "qwen2vl_jax.json").is_file() and (dst / "tokenizer.json").is_file()
    return dst


@pytest.fixture(scope="module")
def photo_file(photos, tmp_path_factory):
    path = tmp_path_factory.mktemp("media") / "coffee.png"
    photos["coffee"].save(path)
    return path


def test_generate_prints_text_and_summary(converted, photo_file, capsys):
    code = cli.main(["generate", "--model", str(converted), "--image", str(photo_file), "--prompt", "What is this?",
                     "--max-new-tokens", "8", "--greedy", "--no-stream", "--dtype", "float32"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out.strip()  # the (random-weight, so noisy) answer
    assert "prompt" in err and "vision)" in err and "new 8 tokens" in err and "tok/s" in err


def test_generate_json_is_valid(converted, photo_file, capsys):
    code = cli.main(["generate", "--model", str(converted), "--image", str(photo_file), "--prompt", "Describe.",
                     "--max-new-tokens", "5", "--greedy", "--json", "--quiet", "--dtype", "float32"])
    out, _ = capsys.readouterr()
    assert code == 0
    data = json.loads(out)
    assert data["new_tokens"] == 5 and data["vision_tokens"] > 0 and isinstance(data["answer"], str)
    assert data["prompt_tokens"] > data["vision_tokens"] and data["prefill_s"] > 0


def test_generate_streams_the_same_answer(converted, photo_file, capsys):
    base = ["generate", "--model", str(converted), "--image", str(photo_file), "--prompt", "Hi", "--greedy",
            "--max-new-tokens", "6", "--quiet", "--dtype", "float32"]
    assert cli.main(base + ["--json"]) == 0
    answer = json.loads(capsys.readouterr().out)["answer"]
    assert cli.main(base + ["--stream"]) == 0
    assert capsys.readouterr().out.strip() == answer.strip()
    assert cli.main(base + ["--json", "--attn-implementation", "xla"]) == 0  # the accelerators' attention
    assert json.loads(capsys.readouterr().out)["answer"] == answer


def test_chat_two_turns_with_an_image(converted, photo_file, capsys, monkeypatch):
    script = f"/image {photo_file}\nWhat is in the picture?\nAnd the colours?\n/reset\nHello\n/exit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code = cli.main(["chat", "--model", str(converted), "--max-new-tokens", "4", "--greedy", "--dtype", "float32"])
    out, err = capsys.readouterr()
    assert code == 0
    assert f"(image attached: {photo_file})" in out and "(history cleared)" in out
    summaries = [line for line in err.splitlines() if line.startswith("[prompt")]
    assert len(summaries) == 3
    first, second, third = (int(s.split()[1]) for s in summaries)
    assert "vision)" in summaries[0] and "(0 vision)" not in summaries[1]  # the image stays in the history
    assert second > first > third  # turn 2 re-renders turn 1 + answer; /reset starts over


def test_info(converted, capsys):
    assert cli.main(["info", "--model", str(converted), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parameters"]["total"] == data["checkpoint_tensor_elements"]
    assert data["text"]["mrope_section"] == [2, 3, 3] and data["vision"]["merge"] == 2
    assert data["attention"] == attention.default_backend() == "auto"  # the backend a generate would run here
    assert data["attention_here"] == attention.platform_backend(None)  # what `auto` runs on this host
    assert cli.main(["info", "--model", str(converted), "--attn-implementation", "jax"]) == 0
    assert "attention    jax (--attn-implementation: auto, cpu, jax, pallas" in capsys.readouterr().out
    assert cli.main(["info", "--model", str(converted)]) == 0
    assert f"attention    auto, {attention.platform_backend(None)} on this host (" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing_image", "unreadable_image", "unknown_model_offline", "missing_dir",
                                  "not_enough_memory", "bad_temperature", "unreadable_video", "unknown_attention"])
def test_user_errors_exit_2_with_a_message(case, converted, tmp_path, capsys, monkeypatch):
    argv = ["generate", "--model", str(converted), "--prompt", "x", "--max-new-tokens", "2", "--dtype", "float32"]
    expect = ""
    if case == "missing_image":
        argv += ["--image", str(tmp_path / "nope.jpg")]
        expect = "image not found"
    elif case == "unreadable_image":
        bad = tmp_path / "bad.jpg"
        bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
        argv += ["--image", str(bad)]
        expect = "bad.jpg"
    elif case == "unreadable_video":
        bad = tmp_path / "bad.mp4"
        bad.write_bytes(b"\x00\x01garbage" * 100)
        argv += ["--video", str(bad)]
        expect = "bad.mp4"
    elif case == "unknown_model_offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        argv[2] = "some-org/not-a-real-model-xyz"
        expect = "HF_HUB_OFFLINE"
    elif case == "missing_dir":
        argv[2] = str(tmp_path / "no_such_checkpoint")
        expect = "not found"
    elif case == "not_enough_memory":
        import psutil

        monkeypatch.setattr(psutil, "virtual_memory", lambda: type("M", (), {"available": 1_000_000})())
        expect = "not enough memory"
    elif case == "bad_temperature":
        argv += ["--temperature", "-1"]
        expect = "temperature"
    elif case == "unknown_attention":
        argv += ["--attn-implementation", "flash2"]
        expect = "unknown attn_implementation 'flash2'; registered: ['auto', 'cpu', 'jax', 'pallas'"
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert expect in err and "Traceback" not in err


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "qwen2vl_jax", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for command in ("generate", "chat", "convert", "info", "selfcheck"):
        assert command in out.stdout


def test_selfcheck_passes_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = cli.main(["selfcheck", "--layers", "1", "--vision-depth", "1", "--new-tokens", "8", "--workdir",
                     str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "RESULT: PASS" in out and "8/8 identical" in out and "random" in out.lower()
    # the parity run's exact-fp32 times would understate our speed: no ours-vs-PyTorch timing without --timing
    assert "ms/token" not in out and "vs  PyTorch" not in out and "selfcheck --timing" in out


@pytest.mark.slow
def test_selfcheck_timing_uses_the_benchmark_modes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = cli.main(["selfcheck", "--layers", "1", "--vision-depth", "1", "--new-tokens", "8", "--workdir",
                     str(tmp_path), "--quiet", "--timing"])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = {line.split("  ")[1].strip(): line for line in out.splitlines() if "(median of 3)" in line}
    assert set(rows) == {"forward (median of 3)", "decode (median of 3)"}
    assert "ms/token  vs  PyTorch" in rows["decode (median of 3)"] and "SDPA" in out
