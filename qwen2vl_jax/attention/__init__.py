"""The attention seam: every attention in the model is called through a backend chosen by name.

Two kinds of attention, one signature each (shape letters: the package docstring's key):

* decoder: `decoder_fn(q_BTNH, k_BSKH, v_BSKH, mask: DecoderMask) -> o_BTNH` (in q's dtype). q and k come after
  M-RoPE; k / v are the key slots (this call's tokens, or the whole KV cache with this call's rows written); GQA
  query head n reads kv head n // G. Prefill, decode steps and training forwards all go through it.
* vision: `vision_fn(q_PNH, k_PNH, v_PNH, rotary: VisionRotary | None, segments: VisionSegments) -> o_PNH` (in
  v's dtype). q and k arrive *before* the vision tower's 2-D rotary, which `rotary` carries (cos / sin and the
  rotation), so a backend may fuse it (the native kernel does) or apply it first (`rotary(q_PNH)`); `rotary` is None
  when they arrive rotated (hooks read them). Rows attend only within their segment (one temporal slice of one
  image or video: the reference's `cu_seqlens`), non-causally.

* paged (the serving engine, `qwen2vl_jax.engine`): `paged_fn(q_TNH, kv_PRCH, batch: PagedBatch) -> o_TNH`: the
  queries of several sequences on one flat token axis, each attending causally over its own pages of a shared pool
  (`attention.paged`; keys / values interleaved on the head axis of `kv_PRCH`). The `xla` formulation by default;
  `pallas` (and `auto` in programs lowered for TPU) runs JAX's Pallas `ragged_paged_attention` on TPU
  (`attention.pallas_paged`); `cpu` (and `auto` on the CPU) runs the decode slots through the fused decode kernel
  over the gathered pages.

And one capability each, for the interpretability captures: probabilities. `decoder_probs_fn(q, k, v, mask, edit)`
and `vision_probs_fn(q, k, v, rotary, segments, edit)` return `(o, p)` where `p = edit(probabilities)` is what
the value product used (fp32; `[B, N, T, S]` / `[Q, N, L, L]`), so a hook on `attn.probs` changes the output. A
backend that registers none gets the `xla` formulation's, the only built-in one that materialises them.

The numbers must be the reference's (transformers 4.57 `modeling_qwen2_vl.py` `eager_attention_forward` and
`VisionAttention.forward`): scores and softmax in fp32, probabilities cast to the activation dtype before the value
product. Built-in backends:

* `xla`: the reference formulation in XLA ops, every platform. Vision: per-segment gather, query chunks of 256.
* `cpu`: the native kernels (`qwen2vl_jax.kernels`): the fused decode-step kernel for one-token steps (else `xla`);
  vision: one fused rotary + flash-attention kernel.
* `jax`: `jax.nn.dot_product_attention` (cuDNN's fused kernel in programs lowered for CUDA in bf16 / fp16, XLA's
  ops elsewhere); vision: segments as batch rows with their lengths.
* `pallas`: Pallas TPU flash attention (`jax.experimental.pallas.ops.tpu`) for calls whose queries start at slot 0
  (prefill, training forwards), `xla` for decode steps; vision: flash attention, one batch row per segment.
  Mosaic-compiled in programs lowered for TPU, Pallas' interpret mode in programs lowered for the CPU (slow; for
  checking numbers), the `jax` backend's attention on GPUs.
* `auto` (the default, `attn_implementation=None`): each platform's own kernels, chosen when the program is
  lowered: `pallas` on TPU, `jax` (cuDNN) on CUDA, `cpu` on the CPU, `xla` elsewhere (`auto.platform_backend`).

Kernel choice is made by the platform a program is lowered for (`jax.lax.platform_dependent`), never by the host
that traces it, so a program exported on a CPU host for TPU (`qwen2vl_jax.export`) carries the Mosaic kernels.
Eager probabilities (`output_attentions=True`, the interpretability captures) go through the backend's
probabilities capability: the `xla` formulation's for the built-in backends.

Your own backend:

    def my_decoder(q_BTNH, k_BSKH, v_BSKH, mask): ...
    register_attention("mine", decoder_fn=my_decoder)            # a kind left out uses `xla`
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, attn_implementation="mine")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from .. import kernels
from .masks import DecoderMask, PagedBatch, VisionRotary, VisionSegments

__all__ = ["DecoderMask", "PagedBatch", "VisionRotary", "VisionSegments", "AttentionBackend", "AttentionBackendError",
           "register_attention",
           "get_attention", "available_backends", "default_backend", "resolve", "platform_backend"]


class AttentionBackendError(ValueError):
    """An `attn_implementation` that is not registered, or cannot run on this host."""


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    """A named set of attention functions (see the module docstring for their signatures)."""

    name: str
    decoder: Callable
    vision: Callable
    decoder_probs: Callable
    vision_probs: Callable
    requires: Callable[[], str] | None = None  # returns "" when usable here, else why not
    paged: Callable | None = None  # `paged_fn(q_TNH, kv_PRCH, batch: PagedBatch) -> o_TNH` (the serving engine)


_REGISTRY: dict[str, AttentionBackend] = {}


def register_attention(name: str, *, decoder_fn: Callable | None = None, vision_fn: Callable | None = None,
                       decoder_probs_fn: Callable | None = None, vision_probs_fn: Callable | None = None,
                       requires: Callable[[], str] | None = None, paged_fn: Callable | None = None,
                       overwrite: bool = False) -> AttentionBackend:
    """Register a backend under `name` (then `attn_implementation=name` selects it). A kind given as None uses the
    `xla` formulation (the probabilities capabilities too). `requires()` may return a reason the backend cannot run
    here ("" when it can).

    Compiled programs are cached by the backend's name: after replacing a backend (`overwrite=True`), models that
    already ran with that name keep the old functions until they are rebuilt or switched to another name and back
    (`set_attn_implementation`) in a new process; register under a new name to be sure.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"an attention backend needs a non-empty string name, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"attention backend {name!r} is already registered (pass overwrite=True to replace it)")
    if decoder_fn is None and vision_fn is None:
        raise ValueError(f"attention backend {name!r}: give decoder_fn, vision_fn or both")
    for kind, fn in (("decoder_fn", decoder_fn), ("vision_fn", vision_fn), ("decoder_probs_fn", decoder_probs_fn),
                     ("vision_probs_fn", vision_probs_fn)):
        if fn is not None and not callable(fn):
            raise TypeError(f"attention backend {name!r}: {kind} must be callable, got {type(fn).__name__}")
    from . import paged, xla

    backend = AttentionBackend(name, decoder_fn or xla.decoder_attention, vision_fn or xla.vision_attention,
                               decoder_probs_fn or xla.decoder_attention_probs,
                               vision_probs_fn or xla.vision_attention_probs, requires,
                               paged_fn or paged.paged_attention)
    _REGISTRY[name] = backend
    return backend


def available_backends() -> list[str]:
    """Every registered name (whether or not it can run on this host)."""
    return sorted(_REGISTRY)


def default_backend() -> str:
    """`auto`: each platform's own kernels, chosen when a program is lowered (`auto.platform_backend(platform)`
    names the built-in backend it runs there)."""
    return "auto"


def resolve(name: str | None) -> str:
    """The backend name `name` stands for (None: the platform default); raises a clear error for an unknown name
    or one that cannot run here."""
    if name is None:
        return default_backend()
    if name not in _REGISTRY:
        raise AttentionBackendError(f"unknown attn_implementation {name!r}; registered: {available_backends()} "
                                    "(or None for the platform default)")
    requires = _REGISTRY[name].requires
    why = requires() if requires is not None else ""
    if why:
        raise AttentionBackendError(f"attn_implementation {name!r} cannot run here: {why}")
    return name


def platform_backend(name: str | None, platform: str | None = None) -> str:
    """The backend whose program `name` (None: the default) lowers to on `platform` ("cpu", "cuda", "tpu",
    "rocm"; None: this host's default device): `auto` names its choice there; any other name stands for itself."""
    from .auto import platform_backend as auto_choice

    name = resolve(name)
    if name != "auto":
        return name
    if platform is None:
        import jax

        platform = jax.default_backend()
    return auto_choice("cuda" if platform == "gpu" else platform)


def get_attention(name: str | None) -> AttentionBackend:
    """The backend `resolve(name)` names."""
    return _REGISTRY[resolve(name)]


def _register_builtins() -> None:
    from . import auto, cpu, jax_nn, pallas, pallas_paged, xla

    register_attention("xla", decoder_fn=xla.decoder_attention, vision_fn=xla.vision_attention)
    register_attention("auto", decoder_fn=auto.decoder_attention, vision_fn=auto.vision_attention,
                       paged_fn=auto.paged_attention)
    register_attention("cpu", decoder_fn=cpu.decoder_attention, vision_fn=cpu.vision_attention,
                       paged_fn=cpu.paged_attention, requires=kernels.unavailable_reason)
    register_attention("jax", decoder_fn=jax_nn.decoder_attention, vision_fn=jax_nn.vision_attention)
    register_attention("pallas", decoder_fn=pallas.decoder_attention, vision_fn=pallas.vision_attention,
                       paged_fn=pallas_paged.pallas_paged_attention, requires=pallas.unavailable_reason)


_register_builtins()
