"""Are the compiled programs of two trees the same? The check behind a refactor that must not change the math.

    python benchmarks/compare_programs.py [--base-ref 7482fdb] [--dtypes float32 bfloat16]
                                          [--families qwen2_vl qwen2_5_vl]

The tree at `--base-ref` is checked out into a temporary git worktree. For each family (the tiny Qwen2-VL demo
checkpoint, and a tiny Qwen2.5-VL checkpoint written by transformers with tests/helpers.py) and dtype, a fresh
process per tree runs the same public-API workload: one processed photo + question through
`model(**inputs)` (the vision tower and the forward) and `model.generate(max_new_tokens=6, do_sample=False)` (the
prefill, the first token, the decode loop; again with a streamer: the one-token decode step), with XLA dumping
every compiled module (`--xla_dump_to`). Then each
module's optimised HLO is compared in compile order, as text with instruction and parameter names, metadata and
source locations stripped (names are not the math). Also compared: the logits' bytes (sha256) and the tokens.
Only public names are used, so any two trees whose `Qwen2VLForConditionalGeneration` / `Qwen2VLProcessor` import
from the package root can be compared.

Prints one row per (family, dtype, program) and writes benchmarks/results/programs.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "programs.json"

CHILD = r"""
import hashlib, json, sys
import numpy as np, skimage.data
from PIL import Image
from qwen2vl_jax import Qwen2VLForConditionalGeneration, Qwen2VLProcessor
ckpt, processor_dir, dtype, out = sys.argv[1:5]
model = Qwen2VLForConditionalGeneration.from_pretrained(ckpt, dtype=dtype)
processor = Qwen2VLProcessor.from_pretrained(processor_dir)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
inputs = dict(processor(text=[processor.apply_chat_template(messages, add_generation_prompt=True)],
                        images=[Image.fromarray(skimage.data.astronaut())], max_pixels=112 * 112))
logits = np.asarray(model(**inputs).logits, np.float32)
seq = model.generate(**inputs, max_new_tokens=6, do_sample=False)
tokens = np.asarray(getattr(seq, "sequences", seq)).tolist()

class Collect:  # a streamer: generation then decodes one step per program call (the decode step)
    def __init__(self): self.steps = []
    def put(self, tokens): self.steps.append(np.asarray(tokens).tolist())
    def end(self): pass

streamed = Collect()
model.generate(**inputs, max_new_tokens=6, do_sample=False, streamer=streamed)
tokens = [tokens, streamed.steps]
json.dump({"logits_sha256": hashlib.sha256(logits.tobytes()).hexdigest(), "tokens": tokens}, open(out, "w"))
"""


def normalized_hlo(text: str) -> str:
    """Optimised HLO without what names things: instruction / computation / parameter names, metadata, stack
    frames and the module name."""
    out = []
    for line in text.splitlines():
        if re.match(r"^\d+ ", line) or line.strip() in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            continue
        line = re.sub(r", metadata=\{[^}]*\}", "", re.sub(r", stack_frame_id=\d+", "", line))
        line = re.sub(r"^HloModule \S+", "HloModule", line)
        if line.startswith("ENTRY"):
            line = re.sub(r"[\w.]+(?=: )", "p", line)
        out.append(re.sub(r"%[\w.\-]+", "%x", line))
    return "\n".join(out)


def run_tree(tree: Path, ckpt: Path, processor_dir: Path, dtype: str, work: Path) -> tuple[dict, list[Path]]:
    """Run the workload in a fresh process importing `tree`; (outputs, optimised HLO files in compile order)."""
    dump = work / "hlo"
    env = {**os.environ, "PYTHONPATH": str(tree), "XLA_FLAGS": f"--xla_dump_to={dump} --xla_dump_hlo_as_text "
                                                                "--xla_dump_hlo_pass_re=^$",
           "QWEN2VL_JAX_COMPILE_CACHE": "0"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(processor_dir), dtype, str(work / "out.json")],
                          capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=1800)
    if done.returncode:
        raise RuntimeError(f"the workload failed in {tree}:\n{done.stderr[-3000:]}")
    return json.loads((work / "out.json").read_text()), sorted(dump.glob("*.cpu_after_optimizations.txt"))


def program_name(path: Path) -> str:
    return path.name.split(".")[1].removeprefix("jit_")


def checkpoints(families: list[str], work: Path) -> dict[str, tuple[Path, Path]]:
    """{family: (checkpoint, processor directory)}: the demo checkpoint, and a tiny Qwen2.5-VL one."""
    from qwen2vl_jax import demo

    tiny = demo.tiny_checkpoint()
    out = {}
    if "qwen2_vl" in families:
        out["qwen2_vl"] = (tiny, tiny)
    if "qwen2_5_vl" in families:
        sys.path.insert(0, str(REPO / "tests"))
        import helpers

        path = work / "tiny25"
        helpers.build_checkpoint_25(path)
        out["qwen2_5_vl"] = (path, tiny)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-ref", default="7482fdb", help="the tree to compare against (a commit)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--families", nargs="+", default=["qwen2_vl", "qwen2_5_vl"], choices=["qwen2_vl", "qwen2_5_vl"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    results = {"base_ref": args.base_ref, "head": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                                                 capture_output=True, text=True).stdout.strip(),
               "dirty": bool(subprocess.run(["git", "status", "--porcelain", "--", "qwen2vl_jax"], cwd=REPO,
                                            capture_output=True, text=True).stdout.strip()),
               "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.base_ref], cwd=REPO, check=True,
                       capture_output=True)
        try:
            for family, (ckpt, proc) in checkpoints(args.families, tmp).items():
                for dtype in args.dtypes:
                    (tmp / f"{family}-{dtype}-base").mkdir()
                    (tmp / f"{family}-{dtype}-head").mkdir()
                    out_b, hlo_b = run_tree(base, ckpt, proc, dtype, tmp / f"{family}-{dtype}-base")
                    out_h, hlo_h = run_tree(REPO, ckpt, proc, dtype, tmp / f"{family}-{dtype}-head")
                    programs = [{"base": program_name(b), "head": program_name(h),
                                 "identical": normalized_hlo(b.read_text()) == normalized_hlo(h.read_text()),
                                 "sha256": hashlib.sha256(normalized_hlo(h.read_text()).encode()).hexdigest()[:16]}
                                for b, h in zip(hlo_b, hlo_h)]
                    results["cases"][f"{family}/{dtype}"] = {
                        "same_program_count": len(hlo_b) == len(hlo_h), "programs": programs,
                        "same_logits_bytes": out_b["logits_sha256"] == out_h["logits_sha256"],
                        "same_tokens": out_b["tokens"] == out_h["tokens"]}
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, capture_output=True)
    dirty = " (+ uncommitted changes)" if results["dirty"] else ""
    print(f"compiled programs: {args.base_ref} vs HEAD {results['head']}{dirty}")
    print(f"{'case':24} {'program (base / head)':44} {'same HLO':>9}")
    all_same = True
    for case, r in results["cases"].items():
        for p in r["programs"]:
            if p["base"].startswith(("convert_element_type", "broadcast_in_dim", "_threefry_seed", "stage")):
                continue  # one-op helper programs (dtype casts, seeds); compared, not printed
            print(f"{case:24} {p['base'] + ' / ' + p['head']:44} {str(p['identical']):>9}")
        same = r["same_program_count"] and all(p["identical"] for p in r["programs"])
        all_same &= same and r["same_logits_bytes"] and r["same_tokens"]
        print(f"{case:24} {len(r['programs'])} programs, all identical: {same}; logits bytes identical: "
              f"{r['same_logits_bytes']}; tokens identical: {r['same_tokens']}")
    results["all_identical"] = all_same
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"all identical: {all_same}\nwrote {args.out}")


if __name__ == "__main__":
    main()
