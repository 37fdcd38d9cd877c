"""How much memory one request needs, before any work starts, so a request that cannot fit is refused with one
line instead of the OS killing the process halfway through a prefill.

    est = estimate_request(config, batch=1, prompt_tokens=T, new_tokens=n, vision_patches=P,
                           largest_segment_patches=L, dtype="bfloat16", attn_implementation="cpu")
    check_fits(est, hints=["--max-pixels", "--dtype bfloat16"])   # raises InsufficientMemory, one line

Host-side arithmetic only (no JAX): it follows how this package lays a request out, shape by shape:

* weights: every parameter in the compute dtype (counted from the config like `Qwen2VL.num_params`).
* KV cache: the decode cache, per layer `[B, S, K, H]` keys and values in the model dtype plus the slot mask, with
  `S = buckets.bucket(T_pad + n, 64)` slots where `T_pad = buckets.bucket(T, 64)` (generation's `PROMPT_GRANULE`).
  `generate` prefills into a prompt-sized cache (`T_pad` slots) and `_start` copies it into the decode cache: both
  are alive for that moment, so the prompt-sized copy counts as a transient of the prefill.
* vision: the patch rows padded like `modeling.vision_layout` (a `buckets.bucket` of the patches; the largest
  segment to a bucket rounded up to the `xla` backend's 256-row query chunk), the transient buffers of one block
  (qkv, the attention's working set, the MLP's `[P, 4E]`), the pixels on the host and device. The attention
  working set depends on the backend: `xla` attends in 256-query chunks over the whole segment (`[N, 256, L]`
  fp32 scores, the exponentials and the probabilities: grows with the segment), the native `cpu` kernel is a
  flash attention whose head-major key/value scratch (`2 x P x E` fp32) stays allocated for the process's life,
  `jax` / `pallas` (XLA's formulation off GPU/TPU) hold a whole `[N, L, L]` segment's scores.
* prefill: one decoder layer's transients on `[B, T_pad]` rows (q/k/v, the `[B, T_pad, F]` gate and up products
  in fp32 and their product, the attention: whole `[B, N, T, S]` fp32 scores and softmax below
  `attention.xla.CHUNK_ABOVE_BYTES`, else query-block x key-block chunks with padded copies of q, k, v and of the
  `[B, T, S]` boolean mask), the layer-invariant values (residual, M-RoPE cos/sin, the mask), and fp32 logits of
  the last position only (generation's prefill keeps one row, `logits_to_keep=1`; a plain forward's `[B, T, V]`
  logits are not counted).

Constants measured on XLA:CPU (jax 0.10, benchmarks/bench_memory.py, results in benchmarks/results/memory.json):
the estimate is an upper bound of the peak RSS of `generate` for the tiny test model and 2B-width slices.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..modeling.buckets import bucket
from ..modeling.config import Qwen2VLConfig

# Layout constants of the modules that run the request. They live in JAX modules (decoding.py imports this one,
# so importing it back would be a cycle, and the estimate must not start JAX); tests/generation/test_memory.py
# checks each copy against its source.
PROMPT_GRANULE = 64  # decoding.PROMPT_GRANULE
VISION_QUERY_CHUNK = 256  # attention.xla.QUERY_CHUNK
CHUNK_ABOVE_BYTES = 256 * 2**20  # attention.xla.CHUNK_ABOVE_BYTES
QUERY_BLOCK = 512  # attention.xla.QUERY_BLOCK
KEY_BLOCK = 1024  # attention.xla.KEY_BLOCK
MLP_ROW_BLOCK = 2048  # layers.MLP_ROW_BLOCK

# What a process needs besides the request's buffers: Python, JAX/XLA and this package imported with the CPU backend
# started (237 MB measured), the tokenizer and processor, allocator slack after building or loading the weights
# (~240 MB above the parameters' bytes for the 2B-width slice) and the compiler's working memory.
RUNTIME_OVERHEAD = 768 * 2**20
# Measured peak RSS above XLA's own buffer plan (`compiled.memory_analysis().temp_size_in_bytes`, which the
# transient formulas below follow to ~10%): library scratch, allocator fragmentation, the compile of a long prompt's
# program. Up to 1.6x on the 8k-token bf16 prefill of the 2B-width slice; the transients are scaled by this.
ACTIVATION_MARGIN = 1.5

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GB = 1e9


def dtype_bytes(dtype) -> int:
    """Bytes per element of a dtype given by name ("float32", "bfloat16", "float16") or a dtype object."""
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or str(dtype)
    name = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16", "f16": "float16"}.get(
        name, name)
    if name not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one request needs (an upper bound of its peak RSS; see the module docstring)."""

    weights: int  # parameters in the compute dtype
    kv_cache: int  # the decoder KV cache: B x (bucketed prompt + bucketed new tokens) slots, every layer, k and v
    vision_peak: int  # peak transient bytes of the vision tower for these patches
    prefill_peak: int  # peak transient bytes of the decoder prefill (activations, attention, logits)

    @property
    def activations(self) -> int:
        """The vision tower and the prefill run one after the other: the larger of the two."""
        return max(self.vision_peak, self.prefill_peak)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + RUNTIME_OVERHEAD

    def describe(self) -> str:
        return (f"needs ~{self.total / GB:.1f} GB (weights {self.weights / GB:.1f} GB + KV cache "
                f"{self.kv_cache / GB:.1f} GB + peak activations {self.activations / GB:.1f} GB + runtime "
                f"{RUNTIME_OVERHEAD / GB:.1f} GB)")


# --------------------------------------------------------------------------------------------------- counts
def parameter_count(config: Qwen2VLConfig) -> int:
    """Parameters of `Qwen2VL(config)` (the same number as `model.num_params()["total"]`)."""
    v, t = config.vision_config, config.text_config
    E, F, M = v.embed_dim, v.mlp_dim, v.merge_dim
    norm = E if v.rms_norm else 2 * E  # RMSNorm: weight; LayerNorm: weight + bias
    mlp = (2 if v.gated_mlp else 1) * (F * E + F) + (E * F + E)  # gate + up (or fc1), down (or fc2)
    block = 2 * norm + (3 * E * E + 3 * E) + (E * E + E) + mlp
    vision = v.patch_dim * E + v.depth * block + norm + (M * M + M) + (v.hidden_size * M + v.hidden_size)
    D, I, KH = t.hidden_size, t.intermediate_size, t.num_key_value_heads * t.head_dim
    NH = t.num_attention_heads * t.head_dim
    layer = 2 * D + (NH * D + NH) + 2 * (KH * D + KH) + D * NH + 3 * D * I
    text = t.vocab_size * D + t.num_hidden_layers * layer + D
    head = 0 if config.tie_word_embeddings else t.vocab_size * D
    return vision + text + head


def padded_lengths(prompt_tokens: int, new_tokens: int) -> tuple[int, int]:
    """(prompt slots, decode-cache slots) as `generation.generate` pads them: the prompt to a `PROMPT_GRANULE`
    bucket, the cache to the bucket of prompt slots + new tokens."""
    prompt = bucket(prompt_tokens, PROMPT_GRANULE)
    return prompt, bucket(prompt + new_tokens, PROMPT_GRANULE)


def kv_cache_bytes(config: Qwen2VLConfig, batch: int, slots: int, dtype="float32") -> int:
    """Bytes of `model.init_cache(batch, slots)` in `dtype`: keys and values of every layer, the slot mask
    (bool), the write index and the per-row rope deltas (int32)."""
    t = config.text_config
    kv = 2 * t.num_hidden_layers * batch * slots * t.num_key_value_heads * t.head_dim * dtype_bytes(dtype)
    return kv + batch * slots + 4 + 4 * batch


def _dot(rows: int, cols: int, a: int) -> int:
    """A Linear's output: the fp32 product, plus its cast to the activation dtype when that is narrower."""
    return rows * cols * (4 + (a if a < 4 else 0))


def _mlp_rows(rows: int, width: int, per_row: int, a: int) -> int:
    """Transients of an MLP over `rows` rows costing `per_row` bytes each, as `layers.in_row_blocks` runs it: one
    block of rows at a time above 2 x MLP_ROW_BLOCK rows, plus the padded input and the stacked output."""
    if rows <= 2 * MLP_ROW_BLOCK:
        return rows * per_row
    n = -(-rows // MLP_ROW_BLOCK)
    size = (-(-rows // n) + 7) // 8 * 8
    return size * per_row + 2 * n * size * width * a


def _backend(attn_implementation: str | None) -> tuple[str, ...]:
    if attn_implementation in (None, "auto"):  # `auto` on a CPU: `cpu` where the kernels build, else `xla`
        return ("cpu", "xla")
    if attn_implementation in ("cpu", "xla", "jax", "pallas"):
        return (attn_implementation,)
    return ("xla",)  # a registered backend: assume the reference formulation


def vision_bytes(config: Qwen2VLConfig, patches: int, largest_segment: int, dtype="float32",
                 attn_implementation: str | None = None) -> tuple[int, int]:
    """(peak transient bytes of the vision tower, bytes it leaves allocated for the rest of the request)."""
    if patches <= 0:
        return 0, 0
    v, a = config.vision_config, dtype_bytes(dtype)
    E, F, N, C, Hd, D = v.embed_dim, v.mlp_dim, v.num_heads, v.patch_dim, v.head_dim, v.hidden_size
    largest = max(1, min(largest_segment or patches, patches))
    P = bucket(patches)
    L = bucket(largest)
    if L > VISION_QUERY_CHUNK:
        L = -(-L // VISION_QUERY_CHUNK) * VISION_QUERY_CHUNK
    W = L if L <= VISION_QUERY_CHUNK else VISION_QUERY_CHUNK
    M = P // (v.spatial_merge_size**2)
    segment_major = 2 * P * E * a
    # pixels: the processor's rows and the padded copy on the host, the jit argument and its cast on the device
    pixels = patches * C * 4 + P * C * 4 + P * C * (4 + a)
    persistent = pixels + 2 * P * E * a + 2 * P * Hd * 4  # residual in and out, rotary cos / sin
    qkv = _dot(P, 3 * E, a) + 3 * P * E * a  # the product, then q / k / v (rotated) split out
    after = P * E * a + _dot(P, E, a)  # attention output, the projection
    attention, residue = 0, 0
    for backend in _backend(attn_implementation):
        if backend == "cpu":
            # fp32 copies of q, k, v for the kernel, its fp32 output, and its head-major k / v scratch (kept)
            kernel = 4 * P * E * 4 + 2 * P * E * 4
            attention = max(attention, qkv + kernel + after)
            residue = max(residue, 2 * P * E * 4)
        elif backend == "xla":
            # per segment: the gathered q / k / v, one query chunk's fp32 scores + exponentials + probabilities;
            # the [Q_pad, L_pad] segment-major output (Q_pad x L_pad <= 2 P_pad for one image or equal frames)
            chunk = N * W * L * (8 + a)
            attention = max(attention, qkv + 3 * L * E * a + chunk + segment_major + after)
        else:  # XLA's formulation of jax.nn.dot_product_attention: one segment's whole [N, L, L] scores
            attention = max(attention, qkv + 3 * segment_major + N * L * L * (8 + a) + segment_major + after)
    gates = 2 if v.gated_mlp else 1  # SwiGLU: the gate and up products alive together
    mlp = P * E * a + _mlp_rows(P, E, gates * _dot(1, F, a) + F * a + _dot(1, E, a), a)
    merger = P * E * a + 2 * _dot(M, v.merge_dim, a) + _dot(M, D, a)
    peak = persistent + max(attention, mlp, merger)
    return peak, residue + M * D * a


def prefill_bytes(config: Qwen2VLConfig, batch: int, prompt_slots: int, slots: int, dtype="float32",
                  vision_tokens: int = 0) -> int:
    """Peak transient bytes of the decoder prefill over `prompt_slots` padded tokens with a `slots`-long cache."""
    t, a, B, T, S = config.text_config, dtype_bytes(dtype), batch, prompt_slots, slots
    D, F, N, K, H, V = (t.hidden_size, t.intermediate_size, t.num_attention_heads, t.num_key_value_heads,
                        t.head_dim, t.vocab_size)
    # alive across the layers: embeddings / residual in and out, cos / sin, the [B, T, S] mask, ids and positions,
    # the vision features scattered into the prompt; the repetition-penalty table (host and device)
    persistent = 3 * B * T * D * a + 2 * B * T * H * 4 + B * T * S + 4 * B * T * 4 + 2 * B * V
    # XLA's plan for the unrolled layers keeps about one [B, T, D] buffer per layer alive to the end (the program's
    # temporaries grow 12 MB per layer at 4k tokens, 48 MB at 8k on the 2B: `memory_analysis`); the 16k-token bf16
    # prefill of the full 2B peaked 3.7 GB above its weights and KV cache where the 2-layer slice stayed at 1.4 GB.
    persistent += t.num_hidden_layers * B * T * D * 4
    if vision_tokens:
        persistent += vision_tokens * D * a + B * T * D * a
    qkv = _dot(B * T, N * H, a) + 2 * _dot(B * T, K * H, a) + B * T * N * H * a  # + rotated q
    out = 2 * B * T * N * H * a + _dot(B * T, D, a)  # heads out (and its reshape), o_proj
    # Below the threshold one softmax over whole rows (fp32 scores, exponentials, probabilities); above it query
    # blocks x key blocks with padded copies of q, k, v and of the mask, then the stacked outputs. Above the
    # threshold the whole-row cost at the threshold stays as a floor: the real peak drops there, but an estimate
    # that refuses a request must not accept a larger one.
    whole_row = min(B * N * T * S * 4, CHUNK_ABOVE_BYTES) * (8 + a) // 4
    attention = whole_row
    if B * N * T * S * 4 > CHUNK_ABOVE_BYTES:
        Wq, Wk = min(QUERY_BLOCK, T), min(KEY_BLOCK, S)
        Tp, Sp = -(-T // Wq) * Wq, -(-S // Wk) * Wk
        blocks = B * N * Wq * Wk * (8 + a) + 3 * B * N * Wq * (H + 2) * 4
        chunked = blocks + B * Tp * N * H * a + 2 * B * Sp * K * H * a + B * Tp * Sp + 2 * B * Tp * N * H * a
        attention = max(whole_row, chunked)
    attn_phase = B * T * D * a + qkv + attention + out
    mlp_phase = B * T * D * a + _mlp_rows(B * T, D, 2 * _dot(1, F, a) + F * a + _dot(1, D, a), a)
    # fp32 logits of the last position only (generation's prefill: `logits_to_keep=1`). With a narrower dtype,
    # XLA:CPU widens the [V, D] LM head (the embedding when tied) to an fp32 copy for that product (measured:
    # +0.9 GB on the 2B in bf16, whatever the prompt length); it is alive once the layers' transients are gone.
    logits = B * (D * (4 + a) + V * (4 + a)) + (V * D * 4 if a < 4 else 0)
    return persistent + max(attn_phase, mlp_phase, logits)


# ------------------------------------------------------------------------------------------------- the API
def vision_sizes(*grids) -> tuple[int, int]:
    """`estimate_request`'s `vision_patches` and `largest_segment_patches` from image / video grids ([n, 3] t, h, w
    rows; None skipped): the patches over all of them, and h * w of the largest temporal slice."""
    rows = [np.asarray(g).reshape(-1, 3) for g in grids if g is not None]
    thw = np.concatenate(rows).astype(np.int64) if rows else np.zeros((0, 3), np.int64)
    return int(thw.prod(-1).sum()), int(thw[:, 1:].prod(-1).max(initial=0))


def estimate_request(config: Qwen2VLConfig, *, batch: int, prompt_tokens: int, new_tokens: int,
                     vision_patches: int = 0, largest_segment_patches: int = 0, dtype: str = "float32",
                     attn_implementation: str | None = None) -> MemoryEstimate:
    """Upper bound of what `generate` needs for this request.

    `prompt_tokens`: the prompt length with its vision tokens (the longest row); `vision_patches`: patches over
    all images and videos before the 2x2 merge (sum of t*h*w of the grids); `largest_segment_patches`: the
    largest attention segment, h*w of one temporal slice (0: all patches in one segment, the worst case).
    `attn_implementation`: the backend that will run (None: the worse of `cpu` and `xla`; pass the resolved name,
    `attention.platform_backend(name)`, for the tighter number).
    """
    for name, value in (("batch", batch), ("prompt_tokens", prompt_tokens), ("new_tokens", new_tokens)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if vision_patches < 0 or largest_segment_patches < 0:
        raise ValueError("vision_patches and largest_segment_patches must be >= 0")
    a = dtype_bytes(dtype)
    T_pad, slots = padded_lengths(prompt_tokens, new_tokens)
    weights = parameter_count(config) * a
    kv = kv_cache_bytes(config, batch, slots, dtype)
    vision_peak, residue = vision_bytes(config, vision_patches, largest_segment_patches, dtype, attn_implementation)
    merged = vision_patches // config.vision_config.spatial_merge_size**2
    # the prefill attends over the prompt-sized cache; then `_start` copies that cache into the decode cache
    # (both alive), with the decode state ([B, slots] tokens, the repetition-penalty table)
    start = kv_cache_bytes(config, batch, T_pad, dtype) + batch * slots * 4 + 2 * batch * config.text_config.vocab_size
    prefill = max(prefill_bytes(config, batch, T_pad, T_pad, dtype, merged), start) + residue
    return MemoryEstimate(weights=weights, kv_cache=kv, vision_peak=int(vision_peak * ACTIVATION_MARGIN),
                          prefill_peak=int(prefill * ACTIVATION_MARGIN))


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 `memory.max` minus usage, or v1), None when unlimited."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if raw == "max" or not raw.isdigit() or int(raw) >= 2**60:
            return None
        try:
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            usage = 0
        return max(int(raw) - usage, 0)
    return None


def available_bytes() -> int:
    """Memory this machine can give now: psutil's `available` (or /proc/meminfo's MemAvailable), lowered to the
    cgroup's remaining limit when there is one."""
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except ImportError:  # psutil is a dependency; /proc/meminfo keeps this usable without it
        available = 0
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    cgroup = _cgroup_limit()
    return min(available, cgroup) if cgroup is not None else available


class InsufficientMemory(MemoryError):
    """A request whose estimate exceeds the memory limit; the message is one line (estimate, limit, what to do)."""

    def __init__(self, message: str, estimate: MemoryEstimate | None = None, limit: int | None = None):
        super().__init__(message)
        self.estimate, self.limit = estimate, limit


def check_fits(estimate: MemoryEstimate, limit: int | None = None, *, hints: Sequence[str] = ()) -> None:
    """Raise `InsufficientMemory` when `estimate.total > limit` (default: `available_bytes()`). `hints` (e.g.
    "--max-pixels", "fewer frames", "a shorter prompt", "--dtype bfloat16") name what the user can change."""
    limit = available_bytes() if limit is None else int(limit)
    if estimate.total <= limit:
        return
    what = f"; try {', '.join(hints[:-1]) + ' or ' + hints[-1] if len(hints) > 1 else hints[0]}" if hints else ""
    raise InsufficientMemory(f"not enough memory: this request {estimate.describe()} but only {limit / GB:.1f} GB "
                             f"is available{what}", estimate, limit)


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str) -> int:
    """A size as bytes: "12GB", "12G", "800MB", "1.5GiB", "4096" (decimal units for K/M/G/T and KB/MB/GB/TB,
    binary for KiB/MiB/GiB/TiB; case-insensitive). Raises ValueError naming the accepted forms otherwise."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional unit, e.g. 12GB, 800MB, "
                         f"1.5GiB or 4096 (bytes)")
    value = float(match.group(1)) * _UNITS[unit]
    if value < 1:
        raise ValueError(f"invalid size {text!r}: must be at least one byte")
    return int(value)

