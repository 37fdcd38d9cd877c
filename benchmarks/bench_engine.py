"""The serving engine (continuous batching) against the round-2 server, under Poisson arrivals of mixed requests.

    python benchmarks/bench_engine.py --models tiny          # ~5.5 min here (2 vCPUs)
    python benchmarks/bench_engine.py --models 2b            # ~20-25 min here (a first run also compiles: longer)
    python benchmarks/bench_engine.py --models tiny,2b --rounds 3 --duration 60
    python benchmarks/bench_engine.py --models 2b --engine-args "--kv-cache-tokens 4096"   # engine-only flags

Two servers, each `python -m qwen2vl_jax serve --model DIR --dtype D --max-batch 8 --max-queue 4096` in its own
process, with PYTHONPATH on its own tree:

* engine:  this tree: the continuous-batching engine (qwen2vl_jax/engine: decode slots = --max-batch, paged KV
  cache, chunked prefill, vision and prefix caches);
* round-2: commit c11034a, checked out with `git worktree add` under the benchmark cache folder (reused when it is
  there; removed at the end unless --keep-worktree): a batch is the requests waiting at the same moment with
  identical settings (greedy, not streamed), a streamed or sampled request runs alone, and a batch ends when its
  longest row does.

--max-queue is raised from 64 so that neither server refuses work under overload (every request is queued and
answered; the latencies include the queueing). Two models: the tests' tiny random checkpoint (float32; built once
with tests/helpers.py `build_checkpoint` into the benchmark cache folder) and the random-weight Qwen2-VL-2B of
benchmarks/common.py (bfloat16).

The request stream (seeded: both servers get the same requests at the same offsets from the start): Poisson
arrivals at three offered loads (requests/s) for `--duration` seconds (at least 4 requests); each request is a
short text question (40%), a longer text prompt (~200 tokens, 30%) or a question about one photo (30%: a random crop
of a scikit-image photo, resized to 224x224, as a PNG data URL; a different crop every time, so the engine's vision
cache never hits); a short (4-8 tokens) or long answer (`max_tokens`: 2B 32-64, tiny 64-128), half each; greedy
(temperature 0) or sampled (temperature 0.8 with a seed), half each; streamed or not, half each. The client is
asyncio + httpx in this process, one fresh connection per request.

Loads: round-2's sequential capacity `c` (1 / the mean latency of `--calib-requests` requests of the same mix sent
one at a time to the warmed round-2 server, first round) times `--load-factors` (default 0.5, 1.5, 4: the last
saturates round-2 by far, as it batches only the greedy non-streamed quarter of the mix), or `--loads` (req/s).

Each server process: start, wait for /health, warm up (one request of each kind and answer length, all at once,
then bursts of 8 requests of the mix at once until a burst compiles nothing new, at most `--warmup-bursts`: tiny
1, 2B 2), then the three loads in turn (each drained before the next). The servers run with JAX_LOG_COMPILES=1 and
the compiles are counted in their logs, so what the warm-up left to compile during the measured runs is reported.
The servers alternate (round-2, engine, round-2, engine, ...: round 1's round-2 process is also the calibration's)
for `--rounds` rounds; the table shows medians over rounds.

Per load and server: requests completed and failed (an HTTP error, a broken stream, or not answered within the
drain limit), completion tokens/s (the answers' usage.completion_tokens over the wall time from the first send to
the last answer), p50 / p95 time to first token (streamed requests: the first non-empty content delta), p50 / p95
per-token latency (streamed requests: (last delta - first delta) / (completion tokens - 1)), p50 / p95 end-to-end
latency (all requests), and the programs compiled during the run (and the seconds spent tracing, lowering and
compiling them). Prints a table, writes benchmarks/results/engine.json (each model's entry replaced, the others
kept); the server logs go to benchmarks/results/engine_logs/.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import CACHE_ROOT, build_random_2b_checkpoint, default_2b_path  # noqa: E402

ROUND2_COMMIT = "c11034a"
SERVERS = ("round2", "engine")
MAX_BATCH = 8
MAX_QUEUE = 4096
NAME = "bench"  # --served-model-name
MODELS = {  # dtype, answer lengths (short, long), default duration (s) and rounds, health limit (s), calibration
    # requests, warm-up bursts at most
    "tiny": dict(dtype="float32", short=(4, 8), long=(64, 128), duration=10.0, rounds=2, start_s=300, calib=12,
                 bursts=1),
    "2b": dict(dtype="bfloat16", short=(4, 8), long=(32, 64), duration=45.0, rounds=2, start_s=900, calib=6,
               bursts=2),
}
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
SHORT_QUESTIONS = (
    "What is the capital of {place}?", "How many legs does a {animal} have?", "Name one use of {thing}.",
    "Is {number} a prime number?", "Translate '{thing}' into French.", "What color is a {animal} usually?",
    "Give a synonym for {adjective}.", "Why is the sky blue over {place}?")
PHOTO_QUESTIONS = ("What is in this picture?", "Describe this image in one sentence.",
                   "What colors dominate this photo?", "Is there a person in this image?",
                   "Where could this photo have been taken?")
FILL = dict(place=["France", "Peru", "Kenya", "Japan", "Norway", "Chile", "Egypt", "Canada"],
            animal=["spider", "horse", "duck", "octopus", "cat", "beetle", "snake", "crab"],
            thing=["copper", "salt", "glass", "rubber", "paper", "sand", "wax", "steel"],
            adjective=["quick", "bright", "quiet", "heavy", "gentle", "strange", "narrow", "warm"],
            number=[str(n) for n in (91, 97, 221, 257, 1001, 7919, 65537, 104729)])
WORDS = ("the river valley morning market farmer bridge winter harvest village mountain story old new light "
         "stone road water field house window garden people city north south long small great quiet bright "
         "train station letter music evening forest coast island weather season engine paper history").split()


# ------------------------------------------------------------------------------------------------ checkpoints
def tiny_checkpoint() -> Path:
    """The tests' default tiny checkpoint (tests/helpers.py, untied, Hub layout) with the real tokenizer, built once."""
    path = CACHE_ROOT / "qwen2vl-tiny-random"
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import helpers
        import qwen_tokenizer_files
    finally:
        sys.path.remove(str(ROOT / "tests"))
    tmp = CACHE_ROOT / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tok = qwen_tokenizer_files.write_tokenizer_files(tmp / "tokenizer")
    helpers.build_checkpoint(tmp / "model", tokenizer_dir=tok)
    os.replace(tmp / "model", path)
    shutil.rmtree(tmp, ignore_errors=True)
    return path


def checkpoint(model: str) -> Path:
    return tiny_checkpoint() if model == "tiny" else build_random_2b_checkpoint(default_2b_path())


def round2_tree(keep: bool) -> tuple[Path, bool]:
    """A worktree of the round-2 commit (reused when it is there); returns (path, created here)."""
    path = CACHE_ROOT / f"round2-{ROUND2_COMMIT}"
    commit = subprocess.run(["git", "rev-parse", ROUND2_COMMIT], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    if (path / "qwen2vl_jax" / "server" / "app.py").is_file():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True).stdout.strip()
        if head == commit:
            return path, False
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, capture_output=True)
        shutil.rmtree(path, ignore_errors=True)
    subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=True, capture_output=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "worktree", "add", "--detach", str(path), commit], cwd=ROOT, check=True,
                   capture_output=True)
    return path, not keep


# -------------------------------------------------------------------------------------------------- requests
def _photo_urls(rng: np.random.Generator, n: int) -> list[str]:
    """`n` PNG data URLs: random crops (half to all of the shorter side) of the scikit-image photos, 224x224."""
    import skimage.data
    from PIL import Image

    photos = [np.asarray(getattr(skimage.data, name)())[..., :3] for name in PHOTOS]
    urls = []
    for _ in range(n):
        img = photos[rng.integers(len(photos))]
        h, w = img.shape[:2]
        side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(img[y:y + side, x:x + side]).resize((224, 224), Image.BICUBIC)
        buf = io.BytesIO()
        crop.save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def make_requests(model: str, n: int, seed: int) -> list[dict]:
    """`n` requests of the mix (module docstring), each {"kind", "answer", "stream", "body"}; seeded."""
    rng = np.random.default_rng(seed)
    spec = MODELS[model]
    kinds = rng.choice(["short", "long", "photo"], size=n, p=[0.4, 0.3, 0.3])
    urls = iter(_photo_urls(rng, int((kinds == "photo").sum())))
    out = []
    for kind in kinds:
        if kind == "short":
            template = SHORT_QUESTIONS[rng.integers(len(SHORT_QUESTIONS))]
            content = template.format(**{k: v[rng.integers(len(v))] for k, v in FILL.items()})
        elif kind == "long":
            words = " ".join(rng.choice(WORDS, size=int(rng.integers(140, 200))))
            content = f"Read this text and summarize it in one paragraph.\n\n{words}."
        else:
            content = [{"type": "image_url", "image_url": {"url": next(urls)}},
                       {"type": "text", "text": PHOTO_QUESTIONS[rng.integers(len(PHOTO_QUESTIONS))]}]
        answer = "long" if rng.random() < 0.5 else "short"
        lo, hi = spec[answer]
        body = {"model": NAME, "messages": [{"role": "user", "content": content}],
                "max_tokens": int(rng.integers(lo, hi + 1))}
        if rng.random() < 0.5:
            body["temperature"] = 0
        else:
            body.update(temperature=0.8, seed=int(rng.integers(2**31)))
        stream = bool(rng.random() < 0.5)
        if stream:
            body.update(stream=True, stream_options={"include_usage": True})
        out.append({"kind": str(kind), "answer": answer, "stream": stream, "body": body})
    return out


def coverage_requests(model: str) -> list[dict]:
    """One request of each kind x answer length (warm-up), alternating streamed / not and greedy / sampled."""
    reqs = make_requests(model, 60, seed=999)
    out, seen = [], set()
    for r in reqs:
        key = (r["kind"], r["answer"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


# ---------------------------------------------------------------------------------------------------- client
async def _send(client, url: str, req: dict, at: float, t0: float, rec: dict) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, t0 + at - loop.time()))
    rec["sent"] = loop.time() - t0
    try:
        if req["stream"]:
            async with client.stream("POST", url, json=req["body"]) as r:
                if r.status_code != 200:
                    rec["error"] = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        rec["done_marker"] = True
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        rec["error"] = f"stream error: {obj['error']}"
                        return
                    if obj.get("usage"):
                        rec["tokens"] = obj["usage"]["completion_tokens"]
                    for choice in obj.get("choices") or []:
                        if choice.get("delta", {}).get("content"):
                            now = loop.time() - t0
                            rec.setdefault("first", now)
                            rec["last"] = now
            if not rec.get("done_marker") or "tokens" not in rec:
                rec["error"] = "stream ended early"
                return
        else:
            r = await client.post(url, json=req["body"])
            if r.status_code != 200:
                rec["error"] = f"HTTP {r.status_code}: {r.text[:200]}"
                return
            rec["tokens"] = r.json()["usage"]["completion_tokens"]
        rec["end"] = loop.time() - t0
    except asyncio.CancelledError:
        rec["error"] = "not answered within the drain limit"
        raise
    except Exception as e:  # a dropped connection, a bad body
        rec["error"] = f"{type(e).__name__}: {e}"


async def _run_stream(port: int, reqs: list[dict], arrivals: list[float], limit: float) -> list[dict]:
    import httpx

    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    recs = [{"kind": r["kind"], "answer": r["answer"], "stream": r["stream"], "at": a} for r, a in zip(reqs, arrivals)]
    # a fresh connection per request: a kept-alive one that the server closes as it idles (uvicorn: 5 s) while the
    # next request goes out on it fails with a ReadError that has nothing to do with the server under test
    limits = httpx.Limits(max_connections=len(reqs) + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        t0 = asyncio.get_running_loop().time() + 0.05
        tasks = [asyncio.create_task(_send(client, url, r, a, t0, rec)) for r, a, rec in zip(reqs, arrivals, recs)]
        _, pending = await asyncio.wait(tasks, timeout=limit)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for rec in recs:
        if "end" not in rec and "error" not in rec:
            rec["error"] = "not answered within the drain limit"
    return recs


def run_stream(port: int, reqs: list[dict], arrivals, limit: float) -> list[dict]:
    return asyncio.run(_run_stream(port, reqs, [float(a) for a in arrivals], limit))


def summarize(recs: list[dict]) -> dict:
    ok = [r for r in recs if "error" not in r]
    streamed = [r for r in ok if r["stream"] and "first" in r]
    pct = lambda xs, q: float(np.percentile(xs, q)) if xs else float("nan")  # noqa: E731
    ttft = [r["first"] - r["sent"] for r in streamed]
    tpot = [(r["last"] - r["first"]) / (r["tokens"] - 1) for r in streamed if r["tokens"] > 1]
    e2e = [r["end"] - r["sent"] for r in ok]
    tokens = sum(r["tokens"] for r in ok)
    start = min((r["sent"] for r in recs if "sent" in r), default=0.0)
    wall = max((r["end"] for r in ok), default=start) - start
    errors = [f"{r['kind']}/{r['answer']}/{'stream' if r['stream'] else 'json'} at {r['at']:.1f} s: {r['error']}"
              for r in recs if "error" in r]
    return {"requests": len(recs), "completed": len(ok), "errors": len(errors), "error_samples": errors[:3],
            "completion_tokens": tokens, "wall_s": wall, "tok_s": tokens / wall if wall > 0 else 0.0,
            "req_s": len(ok) / wall if wall > 0 else 0.0,
            "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95), "tpot_p50": pct(tpot, 50), "tpot_p95": pct(tpot, 95),
            "e2e_p50": pct(e2e, 50), "e2e_p95": pct(e2e, 95), "streamed": len(streamed)}


def arrivals_for(rate: float, n: int, seed: int) -> np.ndarray:
    return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, size=n))


# ---------------------------------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One `qwen2vl-jax serve` subprocess of `tree`, its log in `log`."""

    def __init__(self, which: str, tree: Path, ckpt: Path, dtype: str, log: Path, start_s: float,
                 extra: list[str] = ()):
        self.which, self.log, self.port = which, log, free_port()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tree), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep), PYTHONUNBUFFERED="1", JAX_LOG_COMPILES="1", HF_HUB_OFFLINE="1")
        cmd = [sys.executable, "-m", "qwen2vl_jax", "serve", "--model", str(ckpt), "--port", str(self.port),
               "--dtype", dtype, "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE),
               "--served-model-name", NAME, "--offline", "--quiet", *extra]
        self.cmd = cmd
        log.parent.mkdir(parents=True, exist_ok=True)
        self.log_file = open(log, "wb")
        t = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT, env=env, cwd=tree,
                                     start_new_session=True)
        self.wait_health(start_s)
        self.start_s = time.perf_counter() - t

    def wait_health(self, limit: float) -> None:
        import httpx

        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.which} server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.which} server not healthy after {limit:.0f} s:\n{self.tail()}")

    def compiles(self) -> tuple[int, float]:
        """(programs JAX compiled or read back from the persistent cache so far, seconds spent tracing, lowering
        and compiling them): the JAX_LOG_COMPILES lines in the log."""
        self.log_file.flush()
        count, seconds = 0, 0.0
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("Compiling "):
                count += 1
            elif line.startswith("Finished ") and line.endswith(" sec"):  # tracing, lowering, XLA compilation
                try:
                    seconds += float(line.rsplit(" ", 2)[-2])
                except ValueError:
                    pass
        return count, seconds

    def metrics(self) -> dict:
        """The engine's /metrics gauges and counters (empty for the round-2 server, which has none)."""
        import httpx

        try:
            r = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5)
        except httpx.HTTPError:
            return {}
        if r.status_code != 200:
            return {}
        out = {}
        for line in r.text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        try:
            self.log_file.flush()
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log_file.close()


def warm_up(server: Server, model: str, bursts: int, burst_size: int = 8) -> dict:
    """One request of each kind and answer length, all at once; then bursts of `burst_size` requests of the mix
    sent at once, until a burst compiles nothing new (at most `bursts`)."""
    t = time.perf_counter()
    cover = coverage_requests(model)
    errors = sum("error" in r for r in run_stream(server.port, cover, [0.0] * len(cover), 1800))
    done = 0
    for b in range(bursts):
        before = server.compiles()[0]
        recs = run_stream(server.port, make_requests(model, burst_size, seed=1000 + b), [0.0] * burst_size, 1800)
        errors += sum("error" in r for r in recs)
        done += 1
        if server.compiles()[0] == before:
            break
    count, seconds = server.compiles()
    return {"warmup_s": time.perf_counter() - t, "warmup_bursts": done, "warmup_errors": errors,
            "warmup_compiles": count, "warmup_compile_s": seconds}


def calibrate(server: Server, model: str, n: int) -> dict:
    """Round-2's sequential capacity: `n` requests of the mix, one at a time; c = 1 / their mean latency."""
    lat = []
    for req in make_requests(model, n, seed=2000):
        rec = run_stream(server.port, [req], [0.0], 1800)[0]
        if "error" in rec:
            raise RuntimeError(f"calibration request failed: {rec['error']}\n{server.tail()}")
        lat.append(rec["end"] - rec["sent"])
    mean = float(np.mean(lat))
    return {"requests": n, "mean_latency_s": mean, "capacity_req_s": 1.0 / mean, "latencies_s": lat}


# ------------------------------------------------------------------------------------------------------ main
def measure(server: Server, model: str, loads: list[float], duration: float, drain: float) -> dict:
    out = {}
    for i, rate in enumerate(loads):
        n = max(4, int(round(rate * duration)))
        reqs = make_requests(model, n, seed=100 + i)
        arrivals = arrivals_for(rate, n, seed=200 + i)
        (c0, cs0), m0 = server.compiles(), server.metrics()
        limit = float(arrivals[-1]) + drain
        recs = run_stream(server.port, reqs, arrivals, limit)
        s = summarize(recs)
        c1, cs1 = server.compiles()
        s.update(offered_req_s=rate, compiles_during=c1 - c0, compile_s_during=cs1 - cs0, alive=server.alive())
        m1 = server.metrics()
        if m1:  # the engine's counters over this load (steps, prefill chunk tokens, cache hits, ...)
            s["metrics"] = {k.removeprefix("qwen2vl_jax_"): m1[k] - m0.get(k, 0.0) for k in m1 if k.endswith("_total")}
        s["mix"] = {k: int(v) for k, v in zip(*np.unique(
            [f"{q['kind']}/{q['answer']}/{'stream' if q['stream'] else 'json'}/"
             f"{'greedy' if q['body']['temperature'] == 0 else 'sampled'}" for q in reqs], return_counts=True))}
        out[f"{rate:.4g}"] = s
        print(f"   load {rate:.3g} req/s: {s['completed']}/{s['requests']} done, {s['errors']} errors, "
              f"{s['tok_s']:.2f} tok/s, TTFT p95 {s['ttft_p95']:.2f} s, e2e p95 {s['e2e_p95']:.2f} s, "
              f"wall {s['wall_s']:.0f} s, compiles {s['compiles_during']}", flush=True)
        if s["errors"]:
            print(f"     errors: {s['error_samples']}", flush=True)
        if not server.alive():
            print(f"   {server.which} server died:\n{server.tail()}", flush=True)
            break
    return out


def fmt_table(model: str, dtype: str, rounds: int, loads: list[float], summary: dict) -> list[str]:
    lines = [f"{model} (random weights, {dtype}), --max-batch {MAX_BATCH}; medians over {rounds} round(s) (done / err: "
             f"all rounds together)",
             f"{'load req/s':>10} {'server':>8} {'done':>7} {'err':>4} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} "
             f"{'TPOT p50':>9} {'TPOT p95':>9} {'e2e p50':>8} {'e2e p95':>8} {'compiles':>8}"]
    for rate in loads:
        key = f"{rate:.4g}"
        for which in ("engine", "round2"):
            s = summary[which].get(key)
            if s is None:
                continue
            done = f"{s['completed_all']}/{s['requests_all']}"
            lines.append(f"{rate:>10.3g} {which:>8} {done:>7} {s['errors_all']:>4} "
                         f"{s['tok_s']:>8.2f} {s['ttft_p50']:>8.2f}s {s['ttft_p95']:>8.2f}s "
                         f"{s['tpot_p50'] * 1e3:>7.0f}ms {s['tpot_p95'] * 1e3:>7.0f}ms {s['e2e_p50']:>7.2f}s "
                         f"{s['e2e_p95']:>7.2f}s {s['compiles_during']:>8.0f}")
    hi = f"{loads[-1]:.4g}"
    if hi in summary["engine"] and hi in summary["round2"]:
        e, r = summary["engine"][hi], summary["round2"][hi]
        lines.append(f"highest load {loads[-1]:.3g} req/s: throughput engine / round-2 = "
                     f"{_ratio(e['tok_s'], r['tok_s']):.2f}x; p95 TTFT engine / round-2 = "
                     f"{_ratio(e['ttft_p95'], r['ttft_p95']):.2f} "
                     f"({e['ttft_p95']:.2f} s vs {r['ttft_p95']:.2f} s)")
    return lines


def _ratio(a: float, b: float) -> float:
    return a / b if b and np.isfinite(b) else float("nan")


def median_summary(runs: list[dict]) -> dict:
    out = {}
    for key in runs[0]:
        rows = [r[key] for r in runs if key in r]
        out[key] = {f: float(np.nanmedian([x[f] for x in rows])) for f in rows[0]
                    if isinstance(rows[0][f], (int, float)) and not isinstance(rows[0][f], bool)}
        for f in ("requests", "completed", "errors"):  # all rounds together
            out[key][f"{f}_all"] = int(sum(x[f] for x in rows))
        out[key]["tok_s_per_round"] = [x["tok_s"] for x in rows]
        out[key]["ttft_p95_per_round"] = [x["ttft_p95"] for x in rows]
    return out


def bench_model(model: str, args, round2: Path, logs: Path) -> dict:
    spec = MODELS[model]
    ckpt = checkpoint(model)
    rounds = args.rounds or spec["rounds"]
    duration = args.duration or spec["duration"]
    trees = {"engine": ROOT, "round2": round2}
    runs: dict[str, list[dict]] = {s: [] for s in SERVERS}
    info: dict[str, list[dict]] = {s: [] for s in SERVERS}
    calib, loads = None, None
    t0 = time.time()
    for r in range(rounds):
        for which in SERVERS:
            print(f"== {model} round {r + 1}: {which}", flush=True)
            server = None
            try:
                extra = shlex.split(args.engine_args) if which == "engine" and args.engine_args else []
                tree_state = describe_tree(trees[which])
                server = Server(which, trees[which], ckpt, spec["dtype"], logs / f"{model}-{which}-r{r + 1}.log",
                                spec["start_s"], extra)
                meta = {"start_s": server.start_s, "tree": tree_state, "command": " ".join(server.cmd[1:]),
                        **warm_up(server, model, args.warmup_bursts or spec["bursts"])}
                print(f"   started in {meta['start_s']:.0f} s, warmed up in {meta['warmup_s']:.0f} s "
                      f"({meta['warmup_bursts']} burst(s), {meta['warmup_compiles']} compiles, "
                      f"{meta['warmup_errors']} errors)", flush=True)
                if loads is None:
                    if args.loads:
                        loads = [float(x) for x in args.loads.split(",")]
                    else:
                        calib = calibrate(server, model, args.calib_requests or spec["calib"])
                        c = calib["capacity_req_s"]
                        loads = [float(f"{c * float(f):.3g}") for f in args.load_factors.split(",")]
                        print(f"   calibration: {calib['mean_latency_s']:.2f} s per request alone -> "
                              f"c = {c:.3g} req/s; loads {loads}", flush=True)
                drain = args.drain if args.drain else max(120.0, 6 * duration)
                meta["loadavg_before"] = os.getloadavg()[0]  # the machine's 1-min load: others' work shows here
                runs[which].append(measure(server, model, loads, duration, drain))
                meta["loadavg_after"] = os.getloadavg()[0]
                meta["alive_at_end"] = server.alive()
                info[which].append(meta)
            except RuntimeError as e:  # a server that did not start, or died: recorded, the others go on
                print(f"   {which} failed: {e}", flush=True)
                info[which].append({"failed": str(e)[-4000:]})
            finally:
                if server is not None:
                    if not server.alive() and info[which]:  # a crash: its log's tail goes into the results
                        info[which][-1]["stderr_tail"] = server.tail()
                    server.stop()
    if loads is None:
        raise RuntimeError(f"{model}: no server ran")
    summary = {which: median_summary(runs[which]) if runs[which] else {} for which in SERVERS}
    table = fmt_table(model, spec["dtype"], rounds, loads, summary)
    print("\n".join(table), flush=True)
    hi = f"{loads[-1]:.4g}"
    ratios = {}
    if hi in summary["engine"] and hi in summary["round2"]:
        e, r2 = summary["engine"][hi], summary["round2"][hi]
        ratios = {"throughput_highest_load": _ratio(e["tok_s"], r2["tok_s"]),
                  "ttft_p95_highest_load": _ratio(e["ttft_p95"], r2["ttft_p95"])}
    return {"checkpoint": str(ckpt), "dtype": spec["dtype"], "rounds": rounds, "duration_s": duration,
            "loads_req_s": loads, "calibration": calib, "summary": summary, "ratios": ratios, "runs": runs,
            "servers": info, "table": table, "wall_s": round(time.time() - t0)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,2b", help="comma-separated: tiny, 2b (default both)")
    ap.add_argument("--rounds", type=int, help="server processes per server and model, alternating (default: "
                                               + ", ".join(f"{m} {s['rounds']}" for m, s in MODELS.items()) + ")")
    ap.add_argument("--duration", type=float, help="seconds of arrivals per load (default: "
                                                   + ", ".join(f"{m} {s['duration']:g}" for m, s in MODELS.items())
                                                   + ")")
    ap.add_argument("--load-factors", default="0.5,1.5,4",
                    help="the three loads as multiples of round-2's sequential capacity (default 0.5,1.5,4)")
    ap.add_argument("--loads", help="the loads in requests/s instead (comma-separated; every model)")
    ap.add_argument("--calib-requests", type=int, help="requests of the capacity calibration (default: tiny 12, 2b 6)")
    ap.add_argument("--warmup-bursts", type=int, help="warm-up bursts at most (default: tiny 1, 2b 2)")
    ap.add_argument("--drain", type=float, help="seconds after the last arrival before the unanswered requests "
                                                "count as errors (default max(120, 6 x duration))")
    ap.add_argument("--engine-args", help="more `serve` flags for the engine server only, e.g. "
                                          "'--kv-cache-tokens 4096' (quoted; default none)")
    ap.add_argument("--keep-worktree", action="store_true", help="leave the round-2 worktree for the next run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine.json"))
    args = ap.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r} (tiny, 2b)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.is_file() else {}
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: the machine's 1-minute load average is {load:.1f} before anything starts: other work "
              f"shares the CPUs with the servers", flush=True)
    round2, created = round2_tree(args.keep_worktree)
    t0 = time.time()
    try:
        for model in models:
            results.setdefault("models", {})[model] = bench_model(model, args, round2, out.parent / "engine_logs")
            results["machine"] = {**machine(t0), "loadavg_at_start": load}
            results["models"][model]["machine"] = results["machine"]  # runs of one model at a time keep theirs
            out.write_text(json.dumps(results, indent=1))  # after each model: a later failure keeps this one
    finally:
        if created:
            subprocess.run(["git", "worktree", "remove", "--force", str(round2)], cwd=ROOT, capture_output=True)
    if len(models) > 1:
        for model in models:
            print("\n".join(results["models"][model]["table"]))
    print(f"wrote {out}")
    return 0


def describe_tree(tree: Path) -> str:
    """The commit a server runs and, for this tree, how many files under qwen2vl_jax/ differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True,
                          text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "qwen2vl_jax"], cwd=tree, capture_output=True,
                           text=True).stdout.splitlines()
    return f"{head}{f' + {len(dirty)} changed file(s) under qwen2vl_jax/' if dirty else ''}"


def machine(t0: float) -> dict:
    from benchmarks.bench_cpu import _cpu_name

    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "wall_s": round(time.time() - t0), "round2_commit": ROUND2_COMMIT,
            "engine_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True).stdout.strip() + " + working tree"}


if __name__ == "__main__":
    sys.exit(main())
