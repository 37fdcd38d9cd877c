"""What the `qwen2vl-jax` commands share: the one error path (`USER_ERROR_TYPES`, `user_error_message`), flag
types with one-line errors, the flag groups several commands take (`add_model_args`, `add_mesh_args`,
`add_generation_args`), resolving and loading a checkpoint and its processor, encoding a conversation, the memory
check before loading, and running one generation with its summary line.

Building the parser imports nothing here but the standard library: everything heavier is imported inside the
functions that run a command."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem the user can fix; printed without a traceback, exit status 2."""


# The library's exception types that describe a problem in the user's input, by module. An exception of one of them
# can only exist once its module is imported, so `user_error_message` looks them up in sys.modules (no imports).
USER_ERROR_TYPES = {
    "qwen2vl_jax.modeling.config": ("ConfigError",),
    "qwen2vl_jax.checkpoints.safetensors_io": ("SafetensorsError",),
    "qwen2vl_jax.checkpoints.keymap": ("CheckpointError",),
    "qwen2vl_jax.attention": ("AttentionBackendError",),
    "qwen2vl_jax.lora": ("LoRAError",),
    "qwen2vl_jax.quantization": ("QuantizationError",),
    "qwen2vl_jax.training.data": ("DataError",),
    "qwen2vl_jax.training.finetune": ("FinetuneError",),
    "qwen2vl_jax.evaluation.runs": ("RunError",),
    "qwen2vl_jax.generation.memory": ("InsufficientMemory",),
}
USER_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)
USER_ERRNOS = {28, 30, 122}  # ENOSPC, EROFS, EDQUOT: a full or read-only disk is the user's to fix


def user_error_message(e: BaseException) -> str | None:
    """The one-line message for a user error, or None when `e` is a bug (it keeps its traceback)."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OSError) and (isinstance(e, USER_OS_ERRORS) or e.errno in USER_ERRNOS):
        if e.strerror and e.filename:  # "[Errno 13] Permission denied: 'x'" -> "permission denied: x"
            return f"{e.strerror[0].lower()}{e.strerror[1:]}: {e.filename}"
        return str(e)
    for module, names in USER_ERROR_TYPES.items():
        mod = sys.modules.get(module)
        if mod is not None and isinstance(e, tuple(getattr(mod, n) for n in names)):
            return str(e)
    return None


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line error format (argparse's own prints the whole usage block first)."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"error: {message} (see {self.prog} --help)\n")


def positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


SEED_MAX = 2**63 - 1  # sampling.SEED_MAX (not imported: building the parser imports no JAX)


def int_in(low: int, high: int, what: str):
    """An argparse type: an integer in low..high (`what` says which, e.g. "a port number"); never wrapped."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {what} in {low}..{high}, got {text!r}")
        return value

    return parse


# A `--seed`: what `jax.random.key` takes (larger ones overflow its int64). A TCP port: 0 lets the OS choose.
seed = int_in(0, SEED_MAX, "an integer (2**63 - 1 at most)")
port = int_in(0, 65535, "a port number")


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (e.g. `--max-grad-norm`, where 0 means off)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):  # NaN fails `>= 0` too
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def byte_size(text: str) -> int:
    from ..generation.memory import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ----------------------------------------------------------------------------------------- shared flag groups
def add_model_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """The checkpoint and how to run it (generate, chat, info, serve, predict, eval)."""
    p.add_argument("--model", required=required, help="Hub model id, HF checkpoint directory or converted directory")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="weights and activations (auto: float32 when it fits in memory, else bfloat16)")
    p.add_argument("--offline", action="store_true", help="never download (same as HF_HUB_OFFLINE=1)")
    p.add_argument("--exact-fp32", action="store_true",
                   help="CPU float32: accumulate matmuls like PyTorch (4x smaller rounding error, ~2x slower prefill)")
    p.add_argument("--attn-implementation", metavar="NAME",
                   help="attention backend: auto (each platform's own kernels: the default), xla, cpu (native CPU "
                        "kernels), jax (jax.nn.dot_product_attention, cuDNN on CUDA), pallas (TPU flash attention)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary lines")


def add_quantize_arg(p: argparse.ArgumentParser) -> None:
    """Weight-only quantization of the text decoder's projections while loading (generate, chat, serve)."""
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="quantize the text decoder's projections as the weights load: int8 per channel, int4 in "
                        "groups of 128 (activations stay in --dtype)")


def add_mesh_args(p: argparse.ArgumentParser) -> None:
    """A device mesh and stacked layers (generate, chat)."""
    p.add_argument("--mesh", metavar="AXES", help="run on a device mesh, e.g. data=2,model=4 (axes data / fsdp / "
                                                  "model; their product <= the devices; per-device memory: "
                                                  "`qwen2vl-jax plan`)")
    p.add_argument("--scan-layers", action="store_true",
                   help="stack the layers and run them with lax.scan (one compiled block: faster compiles on pods)")


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """Decoding, sampling, media preprocessing and the memory bound (generate, chat)."""
    p.add_argument("--system", help="system prompt (default: the chat template's)")
    p.add_argument("--max-new-tokens", type=positive(int), default=256)
    p.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, help="nucleus sampling mass (default: the checkpoint's generation_config)")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest tokens, 0 = all (default: the checkpoint's)")
    p.add_argument("--repetition-penalty", type=float, help="default: the checkpoint's generation_config (1.05)")
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--seed", type=seed, default=0, help="sampling seed, 0..2**63-1 (default 0)")
    p.add_argument("--min-pixels", type=positive(int), help="lower bound on pixels per image / frame (processor)")
    p.add_argument("--max-pixels", type=positive(int),
                   help="upper bound on pixels per image / frame (processor; default 12845056 = 16384 vision tokens)")
    p.add_argument("--max-frames", type=positive(int), help="at most this many frames per video (default 768)")
    p.add_argument("--fps", type=positive(float),
                   help="frames sampled per second of video (default 2.0); for Qwen2.5-VL this also sets the time "
                        "spacing of its video positions (the rate actually sampled)")
    p.add_argument("--max-memory", type=byte_size, metavar="SIZE",
                   help="refuse requests estimated to need more than SIZE (e.g. 12GB; default: the available memory)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter in PEFT's format (e.g. finetune's out/adapter)")


# ------------------------------------------------------------------------------------------------ helpers
def say(args, *parts) -> None:
    if not getattr(args, "quiet", False):
        print(*parts, file=sys.stderr, flush=True)


def resolve_model(args) -> Path:
    from ..hub import resolve_source

    if getattr(args, "quiet", False):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return resolve_source(args.model, local_files_only=getattr(args, "offline", None) or None)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise UserError(str(e)) from None


def checkpoint_summary(directory: Path) -> tuple[int, int, str]:
    """(parameters, bytes on disk, dtype) from the safetensors headers alone."""
    from ..checkpoints.keymap import CheckpointError, safetensors_files
    from ..checkpoints.safetensors_io import SafetensorsFile

    try:
        files = safetensors_files(directory)
    except (FileNotFoundError, CheckpointError) as e:
        raise UserError(str(e)) from None
    numel = nbytes = 0
    dtypes = set()
    for f in files:
        sf = SafetensorsFile(f)
        for k in sf.keys():
            n = 1
            for s in sf.shape(k):
                n *= s
            numel += n
            nbytes += sf.nbytes(k)
            dtypes.add(str(sf.dtype(k)))
    return numel, nbytes, "/".join(sorted(dtypes))


def weight_elements(directory: Path) -> tuple[int, int]:
    """(elements of the tensors loaded in --dtype, bytes of those loaded as stored: a quantized checkpoint's
    integers and scales), from the safetensors headers."""
    from ..checkpoints.keymap import HF_SCALE_SUFFIX, SCALE_SUFFIX, CheckpointError, safetensors_files
    from ..checkpoints.safetensors_io import SafetensorsFile

    try:
        files = safetensors_files(directory)
    except (FileNotFoundError, CheckpointError) as e:
        raise UserError(str(e)) from None
    numel = stored = 0
    for f in files:
        sf = SafetensorsFile(f)
        for k in sf.keys():
            if sf.dtype(k).kind in "iub" or k.endswith((HF_SCALE_SUFFIX, SCALE_SUFFIX)):
                stored += sf.nbytes(k)
            else:
                numel += sf.nbytes(k) // sf.dtype(k).itemsize
    return numel, stored


def choose_dtype(args, directory: Path) -> str:
    """`--dtype auto`: float32 when it fits comfortably in memory (most faithful; fastest decode on CPU),
    else bfloat16. Fails early, with the numbers, when even bfloat16 does not fit."""
    import psutil

    numel, stored = weight_elements(directory)
    available = psutil.virtual_memory().available
    dtype = args.dtype
    if dtype == "auto":
        dtype = "float32" if numel * 4 + stored <= 0.6 * available else "bfloat16"
    need = numel * (4 if dtype == "float32" else 2) + stored
    if need > 0.95 * available:
        hint = " Try --dtype bfloat16." if dtype == "float32" else " Use a machine with more memory or a smaller model."
        raise UserError(f"not enough memory: the weights need {need / 1e9:.1f} GB in {dtype} but only "
                        f"{available / 1e9:.1f} GB is available.{hint}")
    if dtype == "float32" and getattr(args, "exact_fp32", False):
        from ..runtime import use_exact_cpu_fp32_matmuls

        use_exact_cpu_fp32_matmuls()  # before JAX starts; PyTorch-level fp32 rounding, slower CPU prefill
    return dtype


def load_model(args, directory: Path, dtype: str):
    """The model (and `--adapter`); checkpoint, backend and adapter errors reach `cli.main` as user errors."""
    from ..pretrained import Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(directory, dtype=dtype,
                                                            attn_implementation=args.attn_implementation,
                                                            progress=not getattr(args, "quiet", False),
                                                            mesh=mesh_from(args),
                                                            scan_layers=getattr(args, "scan_layers", False),
                                                            quantization=getattr(args, "quantize", None))
    if getattr(args, "adapter", None):
        from ..lora import load_adapter

        load_adapter(model, args.adapter)  # kept unmerged: the adapted model computes exactly what PEFT's does
    return model


def mesh_from(args):
    """The device mesh of `--mesh data=..,fsdp=..,model=..` (None without the flag)."""
    if getattr(args, "mesh", None) is None:  # `--mesh ""` is parse_mesh's to refuse
        return None
    from ..sharding.mesh import make_mesh, parse_mesh

    try:
        return make_mesh(**parse_mesh(args.mesh))
    except ValueError as e:
        raise UserError(f"--mesh: {e}") from None


def load_processor(args, directory: Path):
    from ..processing.processor import Qwen2VLProcessor

    overrides = {k: v for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels))
                 if v is not None}
    try:
        return Qwen2VLProcessor.from_pretrained(directory, **overrides)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"cannot load the processor from {directory}: {e}") from None


def media(paths: list[str], kind: str) -> list[str]:
    """Local media paths (a `file://` prefix stripped); a URL, a directory or a missing file is a user error. An
    image may also be a `data:image/...;base64,` URL (decoded here once, so a bad one fails before loading)."""
    from ..processing.image_io import check_media_path, load_image

    def check(p: str) -> str:
        if kind == "image" and p[:5].lower() == "data:":
            load_image(p)  # not an image data URL, or undecodable: one ValueError naming it
            return p
        return check_media_path(p, kind)

    try:
        return [check(p) for p in paths]
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None


def messages_for(text: str, images: list, videos: list, system: str | None = None, history=None) -> list[dict]:
    messages = list(history or [])
    if system and not messages:
        messages.append({"role": "system", "content": system})
    content = [{"type": "image", "image": p} for p in images] + [{"type": "video", "video": p} for p in videos]
    messages.append({"role": "user", "content": content + [{"type": "text", "text": text}]})
    return messages


def encode(processor, messages: list[dict], args=None):
    """Chat template + processor for one conversation. Videos are sampled here with `--fps` / `--max-frames`
    (qwen-vl-utils' `fetch_video` options), then resized by the processor like images. A Qwen2.5-VL processor is
    also told the rate each video was actually sampled at (qwen-vl-utils' `video_kwargs["fps"]`: `sample_fps`;
    `--fps` or 2.0 for frames without a rate), which sets its `second_per_grid_ts`."""
    from ..processing.processor import Qwen2_5_VLProcessor
    from ..processing.video import FPS, fetch_video

    images = [c["image"] for m in messages if isinstance(m["content"], list) for c in m["content"]
              if c.get("type") == "image"]
    videos = [c["video"] for m in messages if isinstance(m["content"], list) for c in m["content"]
              if c.get("type") == "video"]
    options = {k: getattr(args, k, None) for k in ("fps", "max_frames")}
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    try:
        fetched = [fetch_video(v, **{k: o for k, o in options.items() if o is not None}) for v in videos]
        frames = [list(f) for f, _ in fetched]
        timing = {}
        if frames and isinstance(processor, Qwen2_5_VLProcessor):
            fallback = options["fps"] if options["fps"] is not None else FPS
            timing["fps"] = [info.sample_fps if info.sample_fps else fallback for _, info in fetched]
        return processor(text=[prompt], images=images or None, videos=frames or None, **timing)
    except (ValueError, OSError) as e:
        raise UserError(f"cannot read the media: {e}") from None


def check_memory(args, directory: Path, dtype: str, inputs, *, may_switch: bool = False) -> str:
    """Refuse, before any weight is loaded, a request whose estimated peak exceeds `--max-memory` or what the
    machine has (memory.py), naming the knobs that shrink it. With `--dtype auto` and `may_switch` (nothing
    loaded yet), a float32 request that does not fit runs in bfloat16 when that fits. Returns the dtype to use."""

    from ..attention import platform_backend
    from ..generation.memory import InsufficientMemory, check_fits, estimate_request, vision_sizes
    from ..modeling.config import Qwen2VLConfig

    if getattr(args, "mesh", None):  # the estimate is one host's; a mesh's per-device bytes: `qwen2vl-jax plan`
        return dtype

    config = Qwen2VLConfig.from_hf(directory)
    backend = platform_backend(args.attn_implementation)  # the backend that runs here: its vision memory differs
    patches, largest = vision_sizes(inputs.get("image_grid_thw"), inputs.get("video_grid_thw"))

    def estimate(dt):
        return estimate_request(config, batch=1, prompt_tokens=int(inputs["input_ids"].shape[1]),
                                new_tokens=args.max_new_tokens, vision_patches=patches,
                                largest_segment_patches=largest, dtype=dt,
                                attn_implementation=backend)

    hints = []
    if inputs.get("image_grid_thw") is not None:
        hints.append("a smaller --max-pixels")
    if inputs.get("video_grid_thw") is not None:
        hints.append("fewer frames (--max-frames, --fps)")
    hints += ["a shorter prompt", "fewer --max-new-tokens"]
    if dtype == "float32" and may_switch and args.dtype == "auto":
        try:
            check_fits(estimate("float32"), args.max_memory, hints=hints)
            return dtype
        except InsufficientMemory as e:
            fp32_need = e.estimate.total
        check_fits(estimate("bfloat16"), args.max_memory, hints=hints)
        say(args, f"(--dtype auto: bfloat16, as this request needs ~{fp32_need / 1e9:.1f} GB in float32)")
        return "bfloat16"
    check_fits(estimate(dtype), args.max_memory, hints=hints + (["--dtype bfloat16"] if dtype == "float32" else []))
    return dtype


def sampling_note(args, directory: Path) -> str | None:
    """When sampling flags are given, which of the checkpoint's generation_config.json values stay in force (the
    Instruct checkpoints set top_k=1, top_p=0.001: `--temperature` alone then still picks the argmax, in
    transformers too)."""
    from ..generation.sampling import GenerationConfig

    kw = generation_kwargs(args)
    if not kw.get("do_sample"):
        return None
    saved = GenerationConfig.from_pretrained(directory)
    kept = {k: getattr(saved, k) for k in ("temperature", "top_k", "top_p") if k not in kw}
    if not kept:
        return None
    note = ("sampling with " + ", ".join(f"{k}={v}" for k, v in kw.items() if k in ("temperature", "top_k", "top_p"))
            + " from the flags and " + ", ".join(f"{k}={v}" for k, v in kept.items())
            + " from the checkpoint's generation_config.json")
    if kept.get("top_k") == 1 or kept.get("top_p", 1.0) < 0.01:
        note += ("; these keep only the likeliest token, so the output stays greedy: add --top-k 0 --top-p 1.0 "
                 "(or other values) to sample")
    else:
        note += "; override them with --top-k / --top-p / --temperature"
    return note


def generation_kwargs(args) -> dict:
    kw = {"max_new_tokens": args.max_new_tokens, "seed": args.seed}
    if args.repetition_penalty is not None:
        kw["repetition_penalty"] = args.repetition_penalty
    if args.greedy or args.temperature == 0:
        kw["do_sample"] = False
    elif any(v is not None for v in (args.temperature, args.top_p, args.top_k)):
        kw["do_sample"] = True
        kw.update({k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p), ("top_k", args.top_k))
                   if v is not None})
    return kw


@contextlib.contextmanager
def sigint_flag():
    """Ctrl-C (SIGINT) while the block runs sets the yielded `threading.Event` as well as raising
    KeyboardInterrupt, so a caller that polls the event (generate's `should_stop`) stops even when the
    KeyboardInterrupt never reaches it.

    Python runs a signal handler in the main thread at the next point where the interpreter checks for pending
    work, which can be inside a Python callback that C code calls and whose exceptions it reports and drops:
    jax registers one in `gc.callbacks` (`_xla_gc_callback`), and CPython prints an exception raised there as
    "Exception ignored in" and carries on. A SIGINT that lands while a collection runs, e.g. one triggered inside
    the jit dispatch of a decode segment, was lost that way and generation ran on to max_new_tokens. The event
    survives. Only in the main thread (the only one where handlers run or can be installed), and only where
    SIGINT has Python's default handler (an ignored or custom one is left alone); the previous handler is back
    afterwards.
    """
    flag = threading.Event()
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield flag
        return

    def on_sigint(signum, frame):
        flag.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def run_generation(args, model, processor, inputs, stream: bool, on_text=None, *, with_raw: bool = False):
    """Generate for one prompt; returns (answer text, stats dict), and with `with_raw` also the answer decoded with
    its special tokens kept (Qwen2-VL's box tags: `generate --json`'s boxes)."""
    from ..generation.decoding import TextStreamer

    streamer = TextStreamer(processor.tokenizer, on_text=on_text) if stream else None
    with sigint_flag() as interrupted:
        try:
            out = model.generate(**inputs, streamer=streamer, return_dict=True, should_stop=interrupted.is_set,
                                 **generation_kwargs(args))
        except ValueError as e:  # invalid generation settings
            raise UserError(str(e)) from None
        if interrupted.is_set():  # a Ctrl-C whose KeyboardInterrupt was swallowed: generate stopped on the flag
            raise KeyboardInterrupt
    prompt_len = inputs["input_ids"].shape[1]
    new_ids = out.sequences[0, prompt_len:].tolist()
    answer = processor.decode(new_ids, skip_special_tokens=True)
    ids = inputs["input_ids"][0]
    stats = {
        "prompt_tokens": int(prompt_len),
        "vision_tokens": int(((ids == processor.image_token_id) | (ids == processor.video_token_id)).sum()),
        "new_tokens": int(out.new_tokens),
        "prefill_s": round(out.prefill_seconds, 3),
        "decode_tok_s": round((out.new_tokens - 1) / out.decode_seconds, 2) if out.new_tokens > 1 and
        out.decode_seconds > 0 else None,
    }
    if with_raw:
        return answer, stats, processor.decode(new_ids, skip_special_tokens=False)
    return answer, stats


def summary_line(stats: dict) -> str:
    rate = "n/a" if stats["decode_tok_s"] is None else f"{stats['decode_tok_s']:.2f} tok/s"
    return (f"[prompt {stats['prompt_tokens']} tokens ({stats['vision_tokens']} vision) | new {stats['new_tokens']} "
            f"tokens | prefill {stats['prefill_s']:.2f} s | decode {rate}]")
