"""The persistent XLA compilation cache: on by default for the CLI, off on request, never fatal, never on import.

The CLI runs in subprocesses (JAX's cache is process-wide state) through a small driver that is `python -m
qwen2vl_jax` plus a `jax.monitoring` listener, which prints JAX's own cache counters at exit: cache_hits (an
executable loaded from disk instead of compiled) and cache_misses (one written after compiling).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen2vl_jax.runtime import COMPILE_CACHE_ENV, compilation_cache_dir

DRIVER = r"""
import atexit, json, runpy, sys
import jax.monitoring
counts = {}
def listen(event, **_):
    if event.startswith("/jax/compilation_cache/"):
        counts[event.rsplit("/", 1)[-1]] = counts.get(event.rsplit("/", 1)[-1], 0) + 1
jax.monitoring.register_event_listener(listen)
atexit.register(lambda: print("CACHE_EVENTS " + json.dumps(counts), file=sys.stderr, flush=True))
sys.argv = ["qwen2vl_jax", *sys.argv[1:]]
runpy.run_module("qwen2vl_jax", run_name="__main__", alter_sys=True)
"""


def _env(tmp: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in (COMPILE_CACHE_ENV, "XDG_CACHE_HOME")}
    env.update(HF_HUB_OFFLINE="1", XDG_CACHE_HOME=str(tmp), JAX_PLATFORMS="cpu", **extra)
    return env


def _generate(model: Path, env: dict, *flags: str) -> tuple[dict, dict, str, float]:
    """(the --json answer, JAX's cache counters, stderr, seconds) of one `generate` run."""
    cmd = [sys.executable, "-c", DRIVER, "generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2",
           "--greedy", "--json", "--quiet", "--dtype", "float32", *flags]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = [line for line in proc.stderr.splitlines() if line.startswith("CACHE_EVENTS ")]
    assert len(events) == 1, proc.stderr[-3000:]
    return json.loads(proc.stdout), json.loads(events[0].split(" ", 1)[1]), proc.stderr, seconds


def _entries(directory: Path) -> set[str]:
    return {p.name for p in directory.rglob("*-cache") if p.is_file()} if directory.exists() else set()


@pytest.fixture(scope="module")
def two_runs(tiny_checkpoint, tmp_path_factory):
    """The same command twice against one fresh default cache location ($XDG_CACHE_HOME/qwen2vl_jax/xla_cache)."""
    home = tmp_path_factory.mktemp("xdg")
    cache = home / "qwen2vl_jax" / "xla_cache"
    first = _generate(tiny_checkpoint, _env(home))
    after_first = _entries(cache)
    second = _generate(tiny_checkpoint, _env(home))
    return cache, first, after_first, second, _entries(cache)


def test_second_run_loads_every_program_from_the_cache(two_runs):
    cache, (out1, ev1, _, t1), after_first, (out2, ev2, _, t2), after_second = two_runs
    print(f"\nfirst run {t1:.1f}s, second run {t2:.1f}s; {len(after_first)} entries; events {ev1} then {ev2}")
    assert len(after_first) >= 3  # vision / prefill / decode and friends were written
    assert ev1.get("cache_misses", 0) == len(after_first) and ev1.get("cache_hits", 0) == 0
    assert after_second == after_first  # nothing new was compiled and written ...
    assert ev2.get("cache_misses", 0) == 0 and ev2.get("cache_hits", 0) == len(after_first)  # ... all read back
    assert out2["answer"] == out1["answer"] and out2["new_tokens"] == out1["new_tokens"] == 2


@pytest.mark.slow  # a CLI run per case; the default suite keeps the hit / miss test
@pytest.mark.parametrize("how", ["flag", "env"])
def test_opting_out_writes_nothing(tiny_checkpoint, tmp_path, how):
    flags, extra = (["--no-compile-cache"], {}) if how == "flag" else ([], {COMPILE_CACHE_ENV: "0"})
    out, events, _, _ = _generate(tiny_checkpoint, _env(tmp_path, **extra), *flags)
    assert out["new_tokens"] == 2
    assert not any(tmp_path.iterdir())  # no qwen2vl_jax/xla_cache, not even an empty directory
    assert events.get("cache_misses", 0) == 0 and events.get("cache_hits", 0) == 0


@pytest.mark.slow
def test_unusable_directory_warns_once_and_the_command_succeeds(tiny_checkpoint, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # mkdir below a file fails even for root (chmod would not stop root)
    out, events, err, _ = _generate(tiny_checkpoint, _env(tmp_path, **{COMPILE_CACHE_ENV: str(blocker / "cache")}))
    assert out["new_tokens"] == 2
    assert err.count("warning: compilation cache disabled") == 1 and str(blocker / "cache") in err
    assert events.get("cache_misses", 0) == 0 and blocker.read_text() == "not a directory"


def test_cache_directory_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(COMPILE_CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compilation_cache_dir() == tmp_path / "qwen2vl_jax" / "xla_cache"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert compilation_cache_dir() == Path.home() / ".cache" / "qwen2vl_jax" / "xla_cache"
    monkeypatch.setenv(COMPILE_CACHE_ENV, str(tmp_path / "mine"))
    assert compilation_cache_dir() == tmp_path / "mine"
    assert compilation_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"  # an argument beats the env
    for off in ("0", "off", "False", " no "):
        monkeypatch.setenv(COMPILE_CACHE_ENV, off)
        assert compilation_cache_dir() is None


def test_importing_the_library_leaves_jax_config_alone():
    code = ("import jax, qwen2vl_jax, qwen2vl_jax.cli.app, qwen2vl_jax.runtime; c = jax.config; "
            "print(c.jax_compilation_cache_dir, c.jax_persistent_cache_min_compile_time_secs)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["None", "1.0"]  # JAX's defaults: no cache directory, 1 s threshold
