"""Weight-only quantization of the Linear layers: int8 per output channel, int4 in groups of 128 input columns;
activations stay in the model's dtype (`formats` says the formats, `modeling/layers.py` `quantized_dense` the math).

    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype="bfloat16")
    quantize(model, "int8")            # in place; returns the model

Each targeted `Linear` keeps its parameter paths: `weight` holds the integers and a `scale` parameter (fp32, with
the weight's output axis: sharded with it) appears beside it. Hooks, LoRA adapters (QLoRA: the adapters train over
the frozen integers), the attention backends and `scan_layers` are untouched: only the Linear's dot changes.

Quantized checkpoints: `model.save_pretrained(dst)` of a quantized model (or `qwen2vl-jax convert ... --quantize`)
stores the integers under each weight's name, the scales beside them and a `quantization_config` naming the modules
(`StoredQuantization`); `from_pretrained(dst)` builds the quantized model directly (`quantize_abstract`) and streams
them in, nothing re-quantized.

GPTQ / AWQ checkpoints (Qwen's `-GPTQ-Int4`, `-GPTQ-Int8`, `-AWQ` repos): `gptq` reads their formats (exact
dequantization; GPTQ-Int4 onto our int4 without loss), and `from_pretrained` loads them (`checkpoints/load.py`
`external_model`).
"""

from .apply import DEFAULT_TARGETS, quantize, quantized_linears, quantizing_placer
from .formats import INT4_GROUP, MODES, QuantizationError, dequantize, quantize_int4, quantize_int8, quantize_weight
from .gptq import ExternalQuantization, dequantize_awq, dequantize_gptq, gptq_to_int4
from .stored import StoredQuantization, plan_quantization, quantize_abstract, stored_quantization

__all__ = ["DEFAULT_TARGETS", "INT4_GROUP", "MODES", "ExternalQuantization", "QuantizationError",
           "StoredQuantization", "dequantize", "dequantize_awq", "dequantize_gptq", "gptq_to_int4",
           "plan_quantization", "quantize", "quantize_abstract", "quantize_int4", "quantize_int8", "quantize_weight",
           "quantized_linears", "quantizing_placer", "stored_quantization"]
