"""qwen2vl_jax: a readable, parity-tested JAX / Flax NNX implementation of Qwen2-VL (2B / 7B / 72B) and, on the
same modules, Qwen2.5-VL (3B / 7B / 32B / 72B); `from_pretrained` picks the family from config.json.

    from qwen2vl_jax import Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    model = Qwen2VLForConditionalGeneration.from_pretrained("Qwen/Qwen2-VL-2B-Instruct", dtype="bfloat16")
    processor = Qwen2VLProcessor.from_pretrained("Qwen/Qwen2-VL-2B-Instruct")

Dimension key for shape-suffixed names (`hidden_BTD`, `position_ids_ZBT`, ...):

    B  batch                         T  tokens in this call (query length)
    S  key / cache slots             D  decoder width (hidden_size)
    N  query heads                   K  key/value heads            G  query heads per kv head (N / K)
    H  head dim                      F  MLP width                  V  vocabulary
    Z  the three M-RoPE axes (temporal, height, width)             J  rotary frequency slots (H / 2)
    P  vision patch rows (padded)    C  patch features (C*T*P*P = 1176)     E  vision width (embed_dim)
    M  merged vision tokens (P / 4)  Q  vision attention segments  L  rows per segment (padded)
    W  query rows in one chunk of a segment (W <= L)
    O / I  a Linear's out / in features (weights are stored [O, I], PyTorch's layout)
    A  activation rows of a Linear (every leading axis flattened)   R  generated-token slots (a bucket)

Packages (docs/ARCHITECTURE.md has the tour). Imports point one way: a package imports only from rows below its
own (tests/test_structure.py `LAYERS` holds the rule):

    cli/                          the command line (`python -m qwen2vl_jax`)
    training/  server/            the loss, steps and fine-tuning loop; the OpenAI-compatible server and the explorer
    pretrained · lora · hooks/ · testing/
                                  the HF-style facade; LoRA adapters; run_with_cache / run_with_hooks, interventions;
                                  the tiny demo checkpoint
    checkpoints/                  safetensors, the HF key map, loading (onto a mesh too), converting
    generation/  sharding/        decoding, sampling, request memory; the mesh, parameter placement, memory plans
    modeling/                     the math: config, layers, rope, vision, text, model, hook points, partitioning
    attention/  processing/       the attention backends (the seam); images, videos, tokenizer, chat template,
                                  processor (NumPy only, no JAX)
    kernels/ · hub · runtime      the native CPU kernels; where files come from (local or the Hub); XLA settings
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Qwen2VLConfig": ".modeling.config",
    "Qwen2VLTextConfig": ".modeling.config",
    "Qwen2VLVisionConfig": ".modeling.config",
    "qwen2_vl_2b": ".modeling.config",
    "qwen2_vl_7b": ".modeling.config",
    "qwen2_vl_72b": ".modeling.config",
    "qwen2_5_vl_3b": ".modeling.config",
    "qwen2_5_vl_7b": ".modeling.config",
    "qwen2_5_vl_32b": ".modeling.config",
    "qwen2_5_vl_72b": ".modeling.config",
    "get_rope_index": ".modeling.rope",
    "Qwen2VL": ".modeling.model",
    "Qwen2VLForConditionalGeneration": ".pretrained",
    "Qwen2_5_VLForConditionalGeneration": ".pretrained",
    "register_attention": ".attention",
    "Qwen2VLProcessor": ".processing.processor",
    "Qwen2_5_VLProcessor": ".processing.processor",
    "GenerationConfig": ".generation.sampling",
    "TextStreamer": ".generation.decoding",
    "stream_generate": ".generation.decoding",
    "use_exact_cpu_fp32_matmuls": ".runtime",
}

# Modules reachable as attributes of the package under their short names (`from qwen2vl_jax import demo`).
_MODULES = {"demo": ".testing.demo", "interventions": ".hooks.interventions", "geometry": ".hooks.geometry"}

__all__ = sorted([*_EXPORTS, *_MODULES])


def __getattr__(name: str):
    # Lazy: `import qwen2vl_jax` stays cheap, and processing-only users never import JAX.
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    if name in _MODULES:
        module = importlib.import_module(_MODULES[name], __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'qwen2vl_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
