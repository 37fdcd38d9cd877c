"""Verify the conversion and the model on a real checkpoint: HF -> qwen2vl_jax -> HF must give back every tensor
bit for bit, transformers must load the export, and our logits must match transformers' on one photo and prompt.

    python conversion/verify.py SRC                                  # float32, the default photo and prompt
    python conversion/verify.py SRC --dtype bfloat16                 # both models in bfloat16
    python conversion/verify.py SRC --image photo.jpg --prompt "What is in this picture?"
    python conversion/verify.py SRC --json verify.json               # also every number (and tensor) as JSON
    python conversion/verify.py SRC --workdir /big/disk --tol 2e-4   # where the two copies go; the logits bound

SRC: a Hugging Face Qwen2-VL or Qwen2.5-VL checkpoint directory (Hub or transformers >= 4.52 key layout, one file or
sharded; a Hub model id in the local cache works too). Needs the test extras (torch, transformers; scikit-image
for the default photo): pip install -e '.[test]'.

What it does, in order:
  1. `qwen2vl_jax.checkpoints.convert.hf_to_flax` SRC into a temporary directory (our format, SRC's dtypes), then
     `flax_to_hf` back to an HF checkpoint beside it (the copies need twice SRC's disk space; removed at the end).
  2. Every tensor of SRC against the copy in our format (our parameter path; the patch-embedding Conv3d kernel
     flattened) and against the HF export (Hub key layout): same dtype, same shape, the same bytes.
  3. transformers (`Qwen2VLForConditionalGeneration` or `Qwen2_5_VLForConditionalGeneration`, by model_type; eager
     attention; float32 matmuls at the highest precision) loads the export, reporting missing / unexpected /
     mismatched keys, and computes the logits of one processed photo + prompt; then it is freed and qwen2vl_jax
     loads our copy and computes the same logits (only one model is in memory at a time).
  4. Prints a table: the tensor counts, the config round trip, transformers' loading report, the logits' max |Δ|
     and max |Δ| / max |ref| against the tolerance (--tol; default 1e-4 in float32, 0.1 in bfloat16, where each
     side rounds on its own), top-1 agreement, and the times; then `RESULT: PASS` or `RESULT: FAIL`.

Exit status: 0 PASS, 1 FAIL (a tensor differs, transformers reports a key problem, or the logits are past the
tolerance), 2 a bad SRC or a missing dependency.
"""

from __future__ import annotations

import os
import sys

# a source checkout's qwen2vl_jax, as benchmarks/ do (an installed one works too)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

EXIT_FAIL = 1
EXIT_USAGE = 2
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.1}  # max |Δ| / max |ref| of the logits
DEFAULT_PROMPT = "Describe this image."
DEFAULT_MAX_PIXELS = 448 * 448  # 256 vision tokens: a quick forward even for a 72B on CPU
HF_CLASSES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
MAX_LISTED = 20  # differing tensors named in the table (all of them in --json)


class UsageError(Exception):
    """A bad SRC, image or option, or a missing dependency: one `error:` line, exit 2."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python conversion/verify.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", metavar="SRC", help="Hugging Face checkpoint directory (Qwen2-VL or Qwen2.5-VL)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="both models' weights and activations for the logits (default float32)")
    parser.add_argument("--image", metavar="PATH", help="the photo (default: scikit-image's astronaut, 512x512)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the user's text (default {DEFAULT_PROMPT!r})")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help=f"resize the photo to at most this many pixels (default {DEFAULT_MAX_PIXELS})")
    parser.add_argument("--tol", type=float, help="bound on the logits' max |Δ| / max |ref| (default: 1e-4 float32, "
                                                  "0.1 bfloat16)")
    parser.add_argument("--json", metavar="OUT", help="also write every result (and every tensor) to OUT")
    parser.add_argument("--workdir", metavar="DIR", help="where the temporary copies go (default: the system's "
                                                         "temporary directory)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------- tensors
def same_bytes(a, b) -> bool:
    import numpy as np

    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.reshape(-1).view(np.uint8),
                                                                        b.reshape(-1).view(np.uint8))


def compare_tensors(ckpt, ours_dir: Path, hf_dir: Path) -> dict:
    """Every tensor of the opened source checkpoint (`load.open_checkpoint`: its layout, and a stored head a tied
    config ignores) against our copy and the HF export, one tensor in memory at a time (three reads)."""
    from qwen2vl_jax.checkpoints.keymap import canonical_hf_name, open_files, safetensors_files

    ours = {n: sf for sf in open_files(safetensors_files(ours_dir)) for n in sf.keys()}
    hf = {n: sf for sf in open_files(safetensors_files(hf_dir)) for n in sf.keys()}
    rows, skipped, seen_ours, seen_hf = [], [], set(), set()
    for sf in ckpt.files:
        for name in sorted(sf.keys(), key=sf.offset):
            path, hub = ckpt.layout.to_path(name), canonical_hf_name(name)
            if path in ckpt.ignore:
                skipped.append(f"{name}: tie_word_embeddings=true, so the head is embed_tokens (transformers too)")
                continue
            a = sf.read(name)
            row = {"name": name, "ours_name": path, "dtype": str(a.dtype), "shape": list(a.shape),
                   "ours_identical": False, "hf_identical": False}
            if path in ours:
                b = ours[path].read(path)
                row["ours_identical"] = same_bytes(ckpt.layout.to_ours(path, a), b)
                seen_ours.add(path)
            if hub in hf:
                row["hf_identical"] = same_bytes(a, hf[hub].read(hub))
                seen_hf.add(hub)
            rows.append(row)
    return {"tensors": rows, "skipped": skipped, "ours_extra": sorted(set(ours) - seen_ours),
            "hf_extra": sorted(set(hf) - seen_hf)}


# ----------------------------------------------------------------------------------------------------- logits
def load_image(path: str | None):
    from PIL import Image

    if path is not None:
        from qwen2vl_jax.processing.image_io import load_image as load

        try:
            return load(path), path
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read --image {path}: {e}") from None
    try:
        import skimage.data
    except ImportError:
        raise UsageError("the default photo is scikit-image's astronaut: install scikit-image or pass --image "
                         "PATH") from None
    return Image.fromarray(skimage.data.astronaut()), "scikit-image astronaut (512x512)"


def model_inputs(src: Path, image, prompt: str, max_pixels: int) -> dict:
    from qwen2vl_jax.processing.processor import Qwen2VLProcessor

    try:
        processor = Qwen2VLProcessor.from_pretrained(src, max_pixels=max_pixels)  # the family's processor class
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f"cannot load the processor from {src}: {e}") from None
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    inputs = processor(text=[processor.apply_chat_template(messages, add_generation_prompt=True)], images=[image])
    return {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}


def transformers_logits(hf_dir: Path, model_type: str, dtype: str, inputs: dict) -> tuple:
    """(logits as float32 NumPy, transformers' loading report) of the HF export."""
    import gc

    import numpy as np
    import torch
    import transformers

    torch.set_float32_matmul_precision("highest")
    cls = getattr(transformers, HF_CLASSES[model_type])
    model, info = cls.from_pretrained(hf_dir, dtype=getattr(torch, dtype), attn_implementation="eager",
                                      output_loading_info=True)
    report = {k: sorted(map(str, info.get(k) or [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    with torch.no_grad():
        logits = model.eval()(**{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}).logits
    out = logits.float().numpy()
    del model, logits
    gc.collect()
    return out, report


def our_logits(ours_dir: Path, dtype: str, inputs: dict, progress: bool):
    import jax
    import numpy as np

    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(ours_dir, dtype=dtype, progress=progress)
    with jax.default_matmul_precision("highest"):
        return np.asarray(model(**inputs).logits, dtype=np.float32)


# ------------------------------------------------------------------------------------------------------- main
def verify(args) -> dict:
    from qwen2vl_jax.checkpoints import convert
    from qwen2vl_jax.checkpoints.keymap import CheckpointError
    from qwen2vl_jax.checkpoints.load import open_checkpoint
    from qwen2vl_jax.checkpoints.safetensors_io import SafetensorsError
    from qwen2vl_jax.modeling.config import Qwen2VLConfig

    try:
        ckpt = open_checkpoint(args.src)  # headers only; the effective config (tying follows the tensors)
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:  # CheckpointError, ConfigError: ValueErrors
        raise UsageError(str(e)) from None
    src, config = ckpt.directory, ckpt.config
    if ckpt.format != "hf":
        raise UsageError(f"{src} is already in the qwen2vl_jax format (qwen2vl_jax.json): pass the Hugging Face "
                         "checkpoint it was converted from")
    image, image_name = load_image(args.image)
    inputs = model_inputs(src, image, args.prompt, args.max_pixels)
    tol = args.tol if args.tol is not None else TOLERANCE[args.dtype]
    result = {"source": str(src), "model_type": config.model_type, "dtype": args.dtype}
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qwen2vl_verify_", dir=args.workdir) as work:
        ours_dir, hf_dir = Path(work) / "qwen2vl_jax", Path(work) / "hf"
        try:
            t0 = time.perf_counter()
            to_ours = convert.hf_to_flax(src, ours_dir, progress=not args.quiet)
            t1 = time.perf_counter()
            back = convert.flax_to_hf(ours_dir, hf_dir, progress=not args.quiet)
            t2 = time.perf_counter()
        except (CheckpointError, SafetensorsError) as e:
            raise UsageError(f"cannot convert {src}: {e}") from None
        result["seconds"] = {"hf_to_ours": round(t1 - t0, 2), "ours_to_hf": round(t2 - t1, 2)}
        result["files"] = {"ours": to_ours.files, "hf": back.files}
        result.update(compare_tensors(ckpt, ours_dir, hf_dir))
        result["config_identical"] = Qwen2VLConfig.from_hf(ours_dir) == Qwen2VLConfig.from_hf(hf_dir) == config
        t3 = time.perf_counter()
        ref, result["transformers_loading"] = transformers_logits(hf_dir, config.model_type, args.dtype, inputs)
        t4 = time.perf_counter()
        logits = our_logits(ours_dir, args.dtype, inputs, progress=not args.quiet)
        t5 = time.perf_counter()
    result["seconds"].update(transformers=round(t4 - t3, 2), qwen2vl_jax=round(t5 - t4, 2))

    import numpy as np

    diff = np.abs(logits.astype(np.float64) - ref.astype(np.float64))
    ids = np.asarray(inputs["input_ids"])
    result["logits"] = {
        "image": image_name, "prompt": args.prompt, "tokens": int(ids.shape[1]),
        "vision_tokens": int((ids == config.image_token_id).sum()),
        "shape": list(logits.shape), "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(diff.max() / max(float(np.abs(ref).max()), 1e-30)),
        "top1_agreement": float((logits.argmax(-1) == ref.argmax(-1)).mean()), "tolerance": tol,
    }
    rows = result["tensors"]
    result["checks"] = {
        "hf_to_ours": all(r["ours_identical"] for r in rows) and not result["ours_extra"],
        "ours_to_hf": all(r["hf_identical"] for r in rows) and not result["hf_extra"],
        "config": result["config_identical"],
        "transformers_loading": not any(result["transformers_loading"].values()),
        "logits": result["logits"]["max_rel_diff"] <= tol,
    }
    result["passed"] = all(result["checks"].values())
    return result


def table(result: dict) -> str:
    rows, lg, secs = result["tensors"], result["logits"], result["seconds"]
    mark = {True: "ok  ", False: "FAIL"}
    n_ours = sum(r["ours_identical"] for r in rows)
    n_hf = sum(r["hf_identical"] for r in rows)
    loading = result["transformers_loading"]
    lines = [
        ("HF -> ours, every tensor", result["checks"]["hf_to_ours"],
         f"{n_ours}/{len(rows)} bit-identical (our parameter paths; the patch-embedding kernel flattened)"
         + (f"; {len(result['ours_extra'])} extra in ours" if result["ours_extra"] else "")),
        ("ours -> HF, every tensor", result["checks"]["ours_to_hf"],
         f"{n_hf}/{len(rows)} bit-identical (Hub key layout)"
         + (f"; {len(result['hf_extra'])} extra in the export" if result["hf_extra"] else "")),
        ("config.json round trip", result["checks"]["config"],
         "the same Qwen2VLConfig" if result["config_identical"] else "the configs differ"),
        ("transformers loads the export", result["checks"]["transformers_loading"],
         ", ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in loading.items())),
        (f"logits ({result['dtype']})", result["checks"]["logits"],
         f"max|Δ| {lg['max_abs_diff']:.3e}, max|Δ|/max|ref| {lg['max_rel_diff']:.3e} (tolerance {lg['tolerance']:g}),"
         f" top-1 agree {lg['top1_agreement']:.1%}"),
    ]
    width = max(len(name) for name, _, _ in lines)
    out = [f"conversion/verify.py: {result['source']} ({result['model_type']}, {len(rows)} tensors)",
           f"  {'check':<{width}}  {'':4}  result"]
    out += [f"  {name:<{width}}  {mark[ok]}  {text}" for name, ok, text in lines]
    out.append(f"  {'input':<{width}}  {'':4}  {lg['image']}, {lg['prompt']!r}: {lg['tokens']} tokens "
               f"({lg['vision_tokens']} vision)")
    out.append(f"  {'seconds':<{width}}  {'':4}  HF -> ours {secs['hf_to_ours']}, ours -> HF {secs['ours_to_hf']}, "
               f"transformers load + forward {secs['transformers']}, qwen2vl_jax load + forward "
               f"{secs['qwen2vl_jax']}")
    for s in result["skipped"]:
        out.append(f"  skipped: {s}")
    bad = [r for r in rows if not (r["ours_identical"] and r["hf_identical"])]
    for r in bad[:MAX_LISTED]:
        out.append(f"  differs: {r['name']} {r['dtype']} {r['shape']} (ours {'ok' if r['ours_identical'] else 'FAIL'}"
                   f", HF {'ok' if r['hf_identical'] else 'FAIL'})")
    if len(bad) > MAX_LISTED:
        out.append(f"  ... and {len(bad) - MAX_LISTED} more tensors differ (all in --json)")
    for kind in ("ours_extra", "hf_extra"):
        for name in result[kind][:MAX_LISTED]:
            out.append(f"  extra in {'ours' if kind == 'ours_extra' else 'the export'}: {name}")
    for kind, names in loading.items():
        for name in names[:MAX_LISTED]:
            out.append(f"  transformers {kind.replace('_', ' ')[:-1]}: {name}")
    out.append(f"RESULT: {'PASS' if result['passed'] else 'FAIL'}")
    return "\n".join(out)


def write_json_atomic(path: str, data: dict) -> None:
    """Write beside `path`, then rename over it: never a half-written file."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.json and not Path(args.json).resolve().parent.is_dir():
        print(f"error: --json {args.json}: its folder does not exist", file=sys.stderr)
        return EXIT_USAGE
    if args.dtype == "float32":
        from qwen2vl_jax.runtime import use_exact_cpu_fp32_matmuls

        use_exact_cpu_fp32_matmuls()  # before JAX starts: XLA:CPU accumulates fp32 matmuls like PyTorch
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        print(f"error: verify compares against transformers ({e}); install the test extras: pip install -e "
              "'.[test]'", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = verify(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(table(result))
    if args.json:
        write_json_atomic(args.json, result)
    return 0 if result["passed"] else EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
