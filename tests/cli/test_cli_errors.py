"""The CLI's one error path (one `error:` line, exit 2) for the bad inputs a new user tries, the sampling-defaults
note, `--max-memory`, `chat` when the history outgrows the context, and Ctrl-C during a non-streaming generate."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from qwen2vl_jax import cli

INSTRUCT_GENERATION_CONFIG = {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                              "eos_token_id": [151645, 151643], "repetition_penalty": 1.05, "temperature": 0.01,
                              "top_k": 1, "top_p": 0.001}  # Qwen2-VL-*-Instruct's generation_config.json


def _variant(src, dst, *, config=None, files=None):
    """A checkpoint directory whose files link to `src`'s, with config.json edited or files replaced."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in (files or {}) and not (config and f.name == "config.json"):
            os.symlink(f, dst / f.name)
    if config:
        raw = json.loads((src / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(config(raw)))
    for name, content in (files or {}).items():
        (dst / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return dst


def _one_error_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], err


def _safetensors(tiny_checkpoint):
    return next(tiny_checkpoint.glob("*.safetensors"))


@pytest.mark.parametrize("command", ["generate", "info"])
@pytest.mark.parametrize("damage", ["truncated", "empty", "corrupt_header"])
def test_damaged_safetensors_is_one_line(command, damage, tiny_checkpoint, tmp_path, capsys):
    data = _safetensors(tiny_checkpoint).read_bytes()
    bad = {"truncated": data[: len(data) // 2], "empty": b"", "corrupt_header": data[:8] + b"\xff" * 32 + data[40:]}
    ckpt = _variant(tiny_checkpoint, tmp_path / "ckpt", files={"model.safetensors": bad[damage]})
    argv = [command, "--model", str(ckpt), "--quiet"]
    argv += ["--prompt", "hi", "--max-new-tokens", "2"] if command == "generate" else []
    assert cli.main(argv) == 2
    _one_error_line(capsys.readouterr().err, "model.safetensors")


@pytest.mark.parametrize("case", ["invalid_json", "not_an_object", "unsupported_model_type"])
def test_bad_config_json_is_one_line(case, tiny_checkpoint, tmp_path, capsys):
    text = {"invalid_json": '{"model_type": "qwen2_vl",', "not_an_object": "[1, 2]",
            "unsupported_model_type": json.dumps({"model_type": "llama", "hidden_size": 64})}[case]
    ckpt = _variant(tiny_checkpoint, tmp_path / "ckpt", files={"config.json": text})
    assert cli.main(["generate", "--model", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2", "--quiet"]) == 2
    err = capsys.readouterr().err
    _one_error_line(err, "config.json")
    if case == "unsupported_model_type":
        assert "'llama'" in err and "qwen2_vl" in err


@pytest.mark.parametrize("argv, needle", [
    (["selfcheck", "--layers", "0"], "--layers"),
    (["generate", "--model", "m", "--prompt", "x", "--max-pixels", "0"], "--max-pixels"),
    (["generate", "--model", "m", "--prompt", "x", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["generate", "--model", "m", "--prompt", "x", "--fps", "zero"], "--fps"),
    (["generate", "--model", "m", "--prompt", "x", "--max-memory", "lots"], "--max-memory"),
])
def test_bad_flags_are_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    _one_error_line(capsys.readouterr().err, needle)


def test_convert_into_unwritable_place_is_one_line(tiny_checkpoint, tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    # root writes through file modes; /sys refuses new entries to everyone (EPERM, or EROFS where mounted read-only)
    target = parent / "out" if os.geteuid() != 0 else "/sys/qwen2vl_jax_out"
    try:
        assert cli.main(["convert", "hf-to-flax", str(tiny_checkpoint), str(target), "--quiet"]) == 2
    finally:
        parent.chmod(0o700)
    _one_error_line(capsys.readouterr().err, str(target))


def test_convert_force_into_current_directory_is_refused(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["convert", "hf-to-flax", str(tiny_checkpoint), ".", "--force", "--quiet"]) == 2
    _one_error_line(capsys.readouterr().err)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_sampling_flags_say_which_checkpoint_defaults_are_in_force(tiny_checkpoint, tmp_path, capsys):
    """Instruct checkpoints keep top_k=1, top_p=0.001: `--temperature 100` alone stays greedy (as in transformers);
    the CLI says so and how to change it."""
    ckpt = _variant(tiny_checkpoint, tmp_path / "ckpt",
                    files={"generation_config.json": json.dumps(INSTRUCT_GENERATION_CONFIG)})
    base = ["generate", "--model", str(ckpt), "--prompt", "hi", "--max-new-tokens", "2", "--json", "--quiet"]
    assert cli.main(base + ["--temperature", "100"]) == 0
    err = capsys.readouterr().err
    assert "temperature=100" in err and "top_k=1" in err and "top_p=0.001" in err and "--top-k 0" in err
    assert cli.main(base + ["--temperature", "100", "--top-k", "0", "--top-p", "1.0"]) == 0
    assert "note:" not in capsys.readouterr().err  # nothing of the checkpoint's left in force
    assert cli.main(base) == 0
    assert "note:" not in capsys.readouterr().err  # no sampling flags: no note


def test_max_memory_refuses_before_loading(tiny_checkpoint, tmp_path, photos, capsys):
    photo = tmp_path / "p.png"
    photos["coffee"].save(photo)
    argv = ["generate", "--model", str(tiny_checkpoint), "--prompt", "hi", "--image", str(photo), "--quiet"]
    assert cli.main(argv + ["--max-memory", "1MB"]) == 2
    _one_error_line(capsys.readouterr().err, "GB", "--max-pixels")
    assert cli.main(argv + ["--max-memory", "64GB", "--max-new-tokens", "2", "--json"]) == 0


def test_chat_drops_the_oldest_turns_when_the_context_is_full(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    def small_context(raw):
        (raw.get("text_config") or raw)["max_position_embeddings"] = 160
        raw["max_position_embeddings"] = 160
        return raw

    ckpt = _variant(tiny_checkpoint, tmp_path / "ckpt", config=small_context)
    turn = "Tell me about the sea, the waves, the wind and the boats in the harbour."
    script = "\n".join([turn] * 4 + ["word " * 200, "And now?", "/exit"]) + "\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    code = cli.main(["chat", "--model", str(ckpt), "--max-new-tokens", "40", "--greedy", "--dtype", "float32"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "(context full: dropped the" in out
    assert "error: this message needs" in err  # the over-long turn: refused, the session goes on
    summaries = [line for line in err.splitlines() if line.startswith("[prompt")]
    assert len(summaries) == 5  # 4 turns + the one after the refused turn
    assert max(int(s.split()[1]) for s in summaries) <= 160 - 40


CHILD = """
import sys
from qwen2vl_jax import cli
from qwen2vl_jax.generation import decoding as gen
loop = gen._decode_loop_jit
def announce(*args, **kwargs):  # tells the parent that decoding has begun
    out = loop(*args, **kwargs)
    print("DECODING", file=sys.stderr, flush=True)
    return out
gen._decode_loop_jit = announce
sys.exit(cli.main(sys.argv[1:]))
"""


def _long_generate(child: str, checkpoint) -> subprocess.Popen:
    """`child` (a script running the CLI) asked for a 30000-token greedy `--json` generate, pipes open.

    The child starts with SIGINT at its default action, as from a terminal: a pytest launched in the background
    by a non-interactive shell (`pytest &`) has SIGINT ignored, children inherit that across exec, and Python then
    leaves it ignored, so Ctrl-C could not be tested there."""
    env = {**os.environ, "QWEN2VL_JAX_COMPILE_CACHE": "0"}
    return subprocess.Popen([sys.executable, "-c", child, "generate", "--model", str(checkpoint), "--prompt",
                             "Count to a million.", "--greedy", "--max-new-tokens", "30000", "--json",
                             "--dtype", "float32"], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_stops_a_non_streaming_generate_within_two_seconds(tiny_checkpoint):
    """SIGINT while a `--json` generate decodes: the process exits within two seconds. Before, `main` printed
    `interrupted` but the process only exited when the on-device loop had run to `--max-new-tokens` (116 s for
    30000 tokens); now the loop returns to the host every ~0.5 s and nothing more is queued. A SIGINT that lands
    while a garbage collection runs used to be lost (the next test); the CLI's flag catches that case too."""
    proc = _long_generate(CHILD, tiny_checkpoint)
    try:
        for line in proc.stderr:
            if "DECODING" in line:
                break
        time.sleep(1.0)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in err, err[-2000:]
    assert took < 2.0, f"exited {took:.1f} s after SIGINT"


GC_CHILD = """
import gc, signal, sys, threading, time
from qwen2vl_jax import cli
from qwen2vl_jax.generation import decoding as gen
loop = gen._decode_loop_jit
segments = []
def sigint_during_gc(phase, info):  # the signal lands while a collection runs: its handler runs in this callback
    if phase == "start" and len(segments) == 3 and threading.current_thread() is threading.main_thread():
        segments.append("sent")
        print("SIGINT at", time.monotonic(), file=sys.stderr, flush=True)  # CLOCK_MONOTONIC: the parent's clock
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)  # to this thread: handled before return
gc.callbacks.insert(0, sigint_during_gc)
def announce(*args, **kwargs):
    out = loop(*args, **kwargs)
    segments.append(1)
    gc.collect()
    print("DECODING", file=sys.stderr, flush=True)
    return out
gen._decode_loop_jit = announce
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ctrl_c_that_a_gc_callback_swallows_still_stops_generate(tiny_checkpoint):
    """The race behind a run that decoded on for 120 s after SIGINT: Python runs the SIGINT handler at the next
    point the main thread checks for pending work, which can be inside a `gc.callbacks` function (jax registers
    one) when the signal lands during a collection; CPython reports the KeyboardInterrupt raised there as
    "Exception ignored" and drops it, so nothing stopped the decode loop. Here the child sends itself the SIGINT
    from a GC callback during decoding, every time; the CLI's handler also sets a flag that generate polls
    between segments (`cli.common.sigint_flag`), so the process still exits with 130 at once."""
    proc = _long_generate(GC_CHILD, tiny_checkpoint)
    try:
        _, err = proc.communicate(timeout=120)
        ended = time.monotonic()
    finally:
        proc.kill()
    sent = [float(line.split()[-1]) for line in err.splitlines() if line.startswith("SIGINT at")]
    assert len(sent) == 1, err[-2000:]
    took = ended - sent[0]
    assert "Exception ignored" in err and "KeyboardInterrupt" in err, err[-2000:]  # the interrupt was swallowed
    assert proc.returncode == 130 and "interrupted" in err, err[-2000:]
    assert took < 2.0, f"exited {took:.1f} s after SIGINT"


@pytest.mark.parametrize("form, needle", [("http", "URLs are not supported"), ("directory", "is a directory"),
                                          ("file_url", None)])
def test_image_paths_the_cli_names(form, needle, tiny_checkpoint, tmp_path, photos, capsys):
    photo = tmp_path / "p.png"
    photos["coffee"].save(photo)
    image = {"http": "https://example.com/p.png", "directory": str(tmp_path), "file_url": f"file://{photo}"}[form]
    code = cli.main(["generate", "--model", str(tiny_checkpoint), "--prompt", "hi", "--image", image,
                     "--max-new-tokens", "2", "--json", "--quiet"])
    out, err = capsys.readouterr()
    if needle is None:  # file:// paths load, as in the library API
        assert code == 0 and json.loads(out)["vision_tokens"] > 0
    else:
        assert code == 2
        _one_error_line(err, needle)


def test_dtype_auto_runs_bfloat16_when_only_that_fits(tiny_checkpoint, tmp_path, photos, capsys):
    from qwen2vl_jax.generation import memory
    from qwen2vl_jax.modeling.config import Qwen2VLConfig

    photo = tmp_path / "p.png"
    photos["coffee"].save(photo)
    argv = ["generate", "--model", str(tiny_checkpoint), "--prompt", "hi", "--image", str(photo), "--json",
            "--max-new-tokens", "2"]
    assert cli.main(argv + ["--max-memory", "64GB"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["dtype"] == "float32"
    config = Qwen2VLConfig.from_hf(tiny_checkpoint)
    patches = 4 * first["vision_tokens"]  # one image: its patches are one attention segment
    need = {dt: memory.estimate_request(config, batch=1, prompt_tokens=first["prompt_tokens"], new_tokens=2,
                                        vision_patches=patches, largest_segment_patches=patches, dtype=dt).total
            for dt in ("float32", "bfloat16")}
    assert need["bfloat16"] < need["float32"]
    limit = (need["bfloat16"] + need["float32"]) // 2
    assert cli.main(argv + ["--max-memory", str(limit)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["dtype"] == "bfloat16" and "--dtype auto: bfloat16" in err
    assert cli.main(argv + ["--max-memory", str(limit), "--dtype", "float32"]) == 2  # an explicit dtype is kept
    _one_error_line(capsys.readouterr().err, "--dtype bfloat16")
