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

Modules (docs/ARCHITECTURE.md has the tour): config · layers · buckets · attention/ (the backend seam) · kernels/
(native CPU kernels) · vision · text · model (`Qwen2VL`, the math) · rope_index · params / checkpoint /
safetensors_io / hub (loading) · convert · sharding · runtime · memory (a request's bytes) · sampling ·
generation · pretrained
(`Qwen2VLForConditionalGeneration`, the HF-style facade) · hook_points (named places in the model) · hooks
(`run_with_cache`, `run_with_hooks`) · interventions (ablation, patching, steering, logit lens) · geometry (vision
tokens on the photo) · demo (a tiny random checkpoint) · training / lora / data / finetune · processing /
image_processing / tokenizer / chat_template / processing_utils / image_io / qvu_image / video / vision_info
(preprocessing) · cli / cli_common / cli_chat / cli_finetune / selfcheck.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Qwen2VLConfig": ".config",
    "Qwen2VLTextConfig": ".config",
    "Qwen2VLVisionConfig": ".config",
    "qwen2_vl_2b": ".presets",
    "qwen2_vl_7b": ".presets",
    "qwen2_vl_72b": ".presets",
    "qwen2_5_vl_3b": ".presets",
    "qwen2_5_vl_7b": ".presets",
    "qwen2_5_vl_32b": ".presets",
    "qwen2_5_vl_72b": ".presets",
    "get_rope_index": ".rope_index",
    "Qwen2VL": ".model",
    "Qwen2VLForConditionalGeneration": ".pretrained",
    "register_attention": ".attention",
    "Qwen2VLProcessor": ".processing",
    "Qwen2_5_VLProcessor": ".processing",
    "GenerationConfig": ".generation",
    "TextStreamer": ".generation",
    "stream_generate": ".generation",
    "use_exact_cpu_fp32_matmuls": ".runtime",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    # Lazy: `import qwen2vl_jax` stays cheap, and processing-only users never import JAX.
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qwen2vl_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
