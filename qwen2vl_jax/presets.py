"""The released models as `Qwen2VLConfig` presets: Qwen2-VL 2B / 7B / 72B and Qwen2.5-VL 3B / 7B / 32B / 72B.
`PRESETS` maps the short names the CLI and `plan` take ("2b", "2.5-7b", ...) to them."""

from __future__ import annotations

from .config import Qwen2VLConfig, Qwen2VLTextConfig, Qwen2VLVisionConfig

__all__ = ["qwen2_vl_2b", "qwen2_vl_7b", "qwen2_vl_72b", "qwen2_5_vl_3b", "qwen2_5_vl_7b", "qwen2_5_vl_32b",
           "qwen2_5_vl_72b", "PRESETS"]


# Values: the Qwen2-VL-*-Instruct checkpoints' config.json files.
def _preset(hidden, layers, heads, kv_heads, inter, vocab, tie) -> Qwen2VLConfig:
    return Qwen2VLConfig(
        text_config=Qwen2VLTextConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-6, rope_theta=1000000.0,
            mrope_section=(16, 24, 24), max_position_embeddings=32768, sliding_window=32768,
            max_window_layers=layers,
        ),
        vision_config=Qwen2VLVisionConfig(hidden_size=hidden),
        tie_word_embeddings=tie,
    )


def qwen2_vl_2b() -> Qwen2VLConfig:
    """Qwen2-VL-2B-Instruct (tied embeddings)."""
    return _preset(1536, 28, 12, 2, 8960, 151936, True)


def qwen2_vl_7b() -> Qwen2VLConfig:
    """Qwen2-VL-7B-Instruct."""
    return _preset(3584, 28, 28, 4, 18944, 152064, False)


def qwen2_vl_72b() -> Qwen2VLConfig:
    """Qwen2-VL-72B-Instruct."""
    return _preset(8192, 80, 64, 8, 29568, 152064, False)


# Values: the Qwen2.5-VL-*-Instruct checkpoints' config.json files. Every field is set here: the transformers config
# classes' defaults are not the released models' (its vision hidden_size defaults to 3584, tokens_per_second to 4).
def _preset_2_5(hidden, layers, heads, kv_heads, inter, vocab, tie, window_layers, vision_inter) -> Qwen2VLConfig:
    return Qwen2VLConfig(
        text_config=Qwen2VLTextConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_act="silu", rms_norm_eps=1e-6,
            rope_theta=1000000.0, mrope_section=(16, 24, 24), max_position_embeddings=128000,
            use_sliding_window=False, sliding_window=32768, max_window_layers=window_layers, initializer_range=0.02,
        ),
        vision_config=Qwen2VLVisionConfig(
            model_type="qwen2_5_vl", depth=32, embed_dim=1280, num_heads=16, hidden_size=hidden, in_channels=3,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, hidden_act="silu",
            intermediate_size=vision_inter, window_size=112, fullatt_block_indexes=(7, 15, 23, 31),
            tokens_per_second=2, layer_norm_eps=1e-6, rope_theta=10000.0, initializer_range=0.02,
        ),
        tie_word_embeddings=tie, model_type="qwen2_5_vl", image_token_id=151655, video_token_id=151656,
        vision_start_token_id=151652, vision_end_token_id=151653, vision_token_id=151654, bos_token_id=151643,
        eos_token_id=151645,
    )


def qwen2_5_vl_3b() -> Qwen2VLConfig:
    """Qwen2.5-VL-3B-Instruct (tied embeddings)."""
    return _preset_2_5(2048, 36, 16, 2, 11008, 151936, True, 70, 3420)


def qwen2_5_vl_7b() -> Qwen2VLConfig:
    """Qwen2.5-VL-7B-Instruct."""
    return _preset_2_5(3584, 28, 28, 4, 18944, 152064, False, 28, 3420)


def qwen2_5_vl_32b() -> Qwen2VLConfig:
    """Qwen2.5-VL-32B-Instruct."""
    return _preset_2_5(5120, 64, 40, 8, 27648, 152064, False, 64, 3456)


def qwen2_5_vl_72b() -> Qwen2VLConfig:
    """Qwen2.5-VL-72B-Instruct."""
    return _preset_2_5(8192, 80, 64, 8, 29568, 152064, False, 80, 3456)


PRESETS = {"2b": qwen2_vl_2b, "7b": qwen2_vl_7b, "72b": qwen2_vl_72b, "2.5-3b": qwen2_5_vl_3b,
           "2.5-7b": qwen2_5_vl_7b, "2.5-32b": qwen2_5_vl_32b, "2.5-72b": qwen2_5_vl_72b}
