"""`qwen2vl-jax info`: a checkpoint's config summary, exact parameter counts (an abstract model: nothing is
allocated), dtype and bytes on disk, the attention backend a generate would run, and which released checkpoint its
config.json is (`releases.py`: weights/manifest.json). A quantized checkpoint shows its stored quantization, and
`--quantize int8|int4` the parameter bytes a quantized load would hold (integers + scales, the rest in float32 /
bfloat16)."""

from __future__ import annotations

import json

from .common import UserError, add_model_args, checkpoint_summary, resolve_model

COMPILES = False


def add_parser(subparsers):
    p = subparsers.add_parser("info", help="config summary, parameter counts, dtype, bytes")
    add_model_args(p)
    p.add_argument("--quantize", choices=["int8", "int4"],
                   help="also show the parameter bytes with the text decoder's projections and the output projection "
                        "quantized (int8 per output channel, int4 in groups of 128): what --quantize loads")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import jax
    import numpy as np
    from flax import nnx

    from ..modeling.config import Qwen2VLConfig
    from ..pretrained import Qwen2VLForConditionalGeneration
    from .releases import check_release

    directory = resolve_model(args)
    try:
        config = Qwen2VLConfig.from_hf(directory)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"cannot read the config of {directory}: {e}") from None
    from ..attention import AttentionBackendError, available_backends, platform_backend, resolve

    try:
        attention = resolve(args.attn_implementation)  # the backend a generate would run
    except AttentionBackendError as e:
        raise UserError(str(e)) from None
    numel, nbytes, dtype = checkpoint_summary(directory)
    abstract = nnx.eval_shape(lambda: Qwen2VLForConditionalGeneration(config, rngs=nnx.Rngs(0)))
    counts = abstract.num_params()
    assert counts["total"] == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    release = check_release(config)
    t, v = config.text_config, config.vision_config
    info = {
        "model": str(args.model), "directory": str(directory), "model_type": config.model_type,
        "checkpoint_dtype": dtype,
        "checkpoint_bytes": nbytes, "checkpoint_tensor_elements": numel,
        "parameters": counts, "attention": attention, "attention_here": platform_backend(attention),
        "bytes_float32": counts["total"] * 4, "bytes_bfloat16": counts["total"] * 2,
        "text": {"layers": t.num_hidden_layers, "hidden": t.hidden_size, "heads": t.num_attention_heads,
                 "kv_heads": t.num_key_value_heads, "head_dim": t.head_dim, "mlp": t.intermediate_size,
                 "vocab": t.vocab_size, "mrope_section": list(t.mrope_section), "rope_theta": t.rope_theta,
                 "rms_norm_eps": t.rms_norm_eps, "tie_word_embeddings": config.tie_word_embeddings},
        "vision": {"depth": v.depth, "embed_dim": v.embed_dim, "heads": v.num_heads, "mlp": v.mlp_dim,
                   "patch": v.patch_size, "temporal_patch": v.temporal_patch_size, "merge": v.spatial_merge_size,
                   "out": v.hidden_size},
    }
    if v.window_size is not None:  # Qwen2.5-VL
        info["vision"].update(window=v.window_size, fullatt_blocks=list(v.fullatt_block_indexes),
                              tokens_per_second=v.tokens_per_second)
    info["release"] = release.as_dict()
    quantized = quantization_summary(directory, config, abstract, args.quantize)
    if quantized is not None:
        info["quantization"] = quantized
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"model        {info['model']}  ({directory}, {config.model_type})")
    print(f"release      {release.line()}")
    print(f"checkpoint   {dtype}, {nbytes / 1e9:.2f} GB on disk")
    print(f"parameters   {counts['total']:,} total = vision {counts['visual']:,} + language "
          f"{counts['language_model']:,} + lm_head {counts['lm_head']:,}"
          + (" (tied to the embedding)" if config.tie_word_embeddings else ""))
    print(f"memory       {counts['total'] * 4 / 1e9:.2f} GB float32, {counts['total'] * 2 / 1e9:.2f} GB bfloat16")
    if quantized is not None:
        q = quantized
        gb = lambda n: f"{n / 1e9:.3g} GB"
        print(f"quantized    {q['mode']}" + (f" in groups of {q['group_size']}" if q["group_size"] else "")
              + f" ({'stored' if q['stored'] else '--quantize'}): {q['modules']} modules, {q['quantized_weights']:,} "
              f"weights in {gb(q['quantized_bytes'])} (integers + scales; {gb(q['quantized_weights'] * 4)} float32)")
        print(f"             parameters {gb(q['bytes_float32'])} with the rest in float32, "
              f"{gb(q['bytes_bfloat16'])} in bfloat16")
    print("text         " + ", ".join(f"{k} {val}" for k, val in info["text"].items()))
    print("vision       " + ", ".join(f"{k} {val}" for k, val in info["vision"].items()))
    here = "" if info["attention_here"] == attention else f", {info['attention_here']} on this host"
    print(f"attention    {attention}{here} (--attn-implementation: {', '.join(available_backends())})")
    return 0


def quantization_summary(directory, config, abstract, mode: str | None) -> dict | None:
    """The quantized parameter bytes: of the checkpoint's stored quantization, or of `--quantize MODE` (None:
    neither). `abstract` (the full-precision abstract model) is quantized in place, as loading would."""
    import numpy as np

    from ..checkpoints.keymap import OURS_LAYOUT, CheckpointError, hf_layout
    from ..checkpoints.load import is_ours, read_quantization
    from ..modeling.parameters import model_params
    from ..quantization import INT4_GROUP, QuantizationError, plan_quantization, quantize_abstract

    layout = OURS_LAYOUT if is_ours(directory) else hf_layout(config.vision_config)
    try:
        stored = read_quantization(directory, layout)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    if stored is None and mode is None:
        return None
    if stored is not None and mode is not None and mode != stored.mode:
        raise UserError(f"{directory} is stored quantized to {stored.mode}; it cannot be loaded as {mode}")
    elements = {path: int(np.prod(p.shape)) for path, p in model_params(abstract).items()}
    try:
        plan = stored if stored is not None else plan_quantization(abstract, mode, group=INT4_GROUP)
        quantize_abstract(abstract, plan)
    except QuantizationError as e:
        raise UserError(str(e)) from None
    quantized_bytes = rest = weights = 0
    for path, p in model_params(abstract).items():
        if np.dtype(p.dtype) in (np.dtype(np.int8), np.dtype(np.uint8)) or path.endswith(".scale"):
            quantized_bytes += int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize
            weights += elements.get(path, 0) if not path.endswith(".scale") else 0
        else:
            rest += elements[path]
    return {"mode": plan.mode, "group_size": plan.group_size, "stored": stored is not None,
            "modules": len(plan.modules), "quantized_weights": weights, "quantized_bytes": quantized_bytes,
            "bytes_float32": quantized_bytes + 4 * rest, "bytes_bfloat16": quantized_bytes + 2 * rest}
