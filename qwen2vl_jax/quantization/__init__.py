"""Weight-only quantization of the Linear layers: int8 per output channel, int4 in groups of 128 input columns;
activations stay in the model's dtype (`formats` says the formats, `modeling/layers.py` `quantized_dense` the math).

    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype="bfloat16")
    quantize(model, "int8")            # in place; returns the model

Each targeted `Linear` keeps its parameter paths: `weight` holds the integers and a `scale` parameter (fp32, with
the weight's output axis: sharded with it) appears beside it. Hooks, LoRA adapters (QLoRA: the adapters train over
the frozen integers), the attention backends and `scan_layers` are untouched: only the Linear's dot changes.

This is a first part of round three's quantization issue: quantize-on-load, quantized checkpoints, the CLI flags,
the native int8 / int4 CPU kernels and qwix interop are not here yet.
"""

from .apply import DEFAULT_TARGETS, quantize, quantized_linears, quantizing_placer
from .formats import INT4_GROUP, MODES, QuantizationError, dequantize, quantize_int4, quantize_int8, quantize_weight

__all__ = ["DEFAULT_TARGETS", "INT4_GROUP", "MODES", "QuantizationError", "dequantize", "quantize", "quantize_int4",
           "quantize_int8", "quantize_weight", "quantized_linears", "quantizing_placer"]
