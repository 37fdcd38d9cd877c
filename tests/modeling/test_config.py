"""Config: presets equal the reference table, both config.json layouts parse alike, bad fields are named."""

import dataclasses
import json

import pytest

from qwen2vl_jax.modeling.config import Qwen2VLConfig, Qwen2VLVisionConfig, qwen2_vl_2b, qwen2_vl_7b, qwen2_vl_72b

# The Instruct checkpoints' config.json values.
TABLE = {
    "2b": (qwen2_vl_2b, dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                             intermediate_size=8960, vocab_size=151936), True),
    "7b": (qwen2_vl_7b, dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                             intermediate_size=18944, vocab_size=152064), False),
    "72b": (qwen2_vl_72b, dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                               num_key_value_heads=8, intermediate_size=29568, vocab_size=152064), False),
}


@pytest.mark.parametrize("name", list(TABLE))
def test_presets_match_reference_table(name):
    fn, text_fields, tied = TABLE[name]
    cfg = fn()
    for k, v in text_fields.items():
        assert getattr(cfg.text_config, k) == v, k
    t, v = cfg.text_config, cfg.vision_config
    assert t.head_dim == 128 and t.mrope_section == (16, 24, 24)
    assert t.rms_norm_eps == 1e-6 and t.rope_theta == 1e6 and t.max_position_embeddings == 32768
    assert cfg.tie_word_embeddings is tied
    assert (v.depth, v.embed_dim, v.num_heads, v.mlp_dim, v.head_dim) == (32, 1280, 16, 5120, 80)
    assert (v.patch_size, v.temporal_patch_size, v.spatial_merge_size, v.patch_dim) == (14, 2, 2, 1176)
    assert v.hidden_size == t.hidden_size
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == (
        151655, 151656, 151652, 151653)


def _hub_4x_dict(cfg: Qwen2VLConfig) -> dict:
    """What an official Hub config.json looks like (flat text fields, rope_scaling type mrope, in_chans)."""
    d = cfg.to_hf_dict()
    d["vision_config"]["in_chans"] = d["vision_config"].pop("in_channels")
    d["vision_config"]["spatial_patch_size"] = 14
    d["torch_dtype"] = "bfloat16"
    return d


def _v5_dict(cfg: Qwen2VLConfig) -> dict:
    """transformers 5.x layout: nested text_config with rope_parameters."""
    t = cfg.text_config
    return {
        "model_type": "qwen2_vl",
        "architectures": ["Qwen2VLForConditionalGeneration"],
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "image_token_id": 151655, "video_token_id": 151656,
        "vision_start_token_id": 151652, "vision_end_token_id": 151653,
        "text_config": {
            "model_type": "qwen2_vl_text", "vocab_size": t.vocab_size, "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads, "num_key_value_heads": t.num_key_value_heads,
            "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                "mrope_section": list(t.mrope_section)},
            "use_sliding_window": False, "sliding_window": t.sliding_window, "max_window_layers": t.max_window_layers,
            "bos_token_id": 151643, "eos_token_id": 151645,
        },
        "vision_config": {
            "model_type": "qwen2_vl_vision", "depth": 32, "embed_dim": 1280, "hidden_size": t.hidden_size,
            "num_heads": 16, "mlp_ratio": 4, "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "hidden_act": "quick_gelu",
            "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
        },
    }


@pytest.mark.parametrize("preset", [qwen2_vl_2b, qwen2_vl_7b, qwen2_vl_72b])
def test_both_layouts_parse_to_the_same_config(preset, tmp_path):
    cfg = preset()
    p4, p5 = tmp_path / "v4", tmp_path / "v5"
    p4.mkdir(), p5.mkdir()
    (p4 / "config.json").write_text(json.dumps(_hub_4x_dict(cfg)))
    (p5 / "config.json").write_text(json.dumps(_v5_dict(cfg)))
    a = Qwen2VLConfig.from_hf(p4)  # a checkpoint directory
    b = Qwen2VLConfig.from_hf(p5 / "config.json")  # a file
    assert a == b == cfg


def test_rms_norm_eps_comes_from_the_file_else_transformers_class_default():
    from transformers import Qwen2VLTextConfig as HFTextConfig

    d = qwen2_vl_7b().to_hf_dict()
    assert Qwen2VLConfig.from_hf(d).text_config.rms_norm_eps == 1e-6
    d["rms_norm_eps"] = 3e-6
    assert Qwen2VLConfig.from_hf(d).text_config.rms_norm_eps == 3e-6
    del d["rms_norm_eps"]  # a file without the field: transformers' class default (1e-5), not ours (the 72B's)
    assert Qwen2VLConfig.from_hf(d).text_config.rms_norm_eps == HFTextConfig().rms_norm_eps == 1e-5


def test_default_config_is_one_consistent_model():
    """`Qwen2VLConfig()` used to raise (a 72B-wide decoder under a merger 7B wide); every default is now the
    72B-Instruct's, and the model it describes builds (abstractly)."""
    from flax import nnx

    from qwen2vl_jax.modeling.model import Qwen2VL

    config = Qwen2VLConfig()
    assert config == qwen2_vl_72b() and config.attn_implementation is None
    assert config.vision_config.hidden_size == config.text_config.hidden_size == Qwen2VLVisionConfig().hidden_size
    model = nnx.eval_shape(lambda: Qwen2VL(config, rngs=nnx.Rngs(0)))
    assert model.lm_head.weight.shape == (152064, 8192)
    with pytest.raises(ValueError, match="attn_implementation"):
        Qwen2VLConfig(attn_implementation=3)


def test_transformers_written_config_parses(tiny_checkpoint):
    """transformers 4.57 writes flat fields plus a nested text_config copy; tie lives in text_config."""
    raw = json.loads((tiny_checkpoint / "config.json").read_text())
    cfg = Qwen2VLConfig.from_hf(tiny_checkpoint)
    assert cfg.text_config.mrope_section == tuple(raw["rope_scaling"]["mrope_section"])
    assert cfg.text_config.hidden_size == raw["hidden_size"] == cfg.vision_config.hidden_size
    assert cfg.tie_word_embeddings is False


def test_tie_flag_and_token_ids_are_read(tmp_path):
    d = qwen2_vl_2b().to_hf_dict()
    d["eos_token_id"] = [151645, 151643]
    d["pad_token_id"] = 151643
    cfg = Qwen2VLConfig.from_hf(d)
    assert cfg.tie_word_embeddings is True
    assert cfg.eos_token_id == (151645, 151643) and cfg.pad_token_id == 151643
    d["tie_word_embeddings"] = False
    assert Qwen2VLConfig.from_hf(d).tie_word_embeddings is False


def test_to_hf_dict_round_trips_through_transformers():
    from transformers import Qwen2VLConfig as HFConfig

    ours = qwen2_vl_2b()
    hf = HFConfig(**ours.to_hf_dict())
    assert Qwen2VLConfig.from_hf(hf.to_dict()) == ours


@pytest.mark.parametrize("bad, field", [
    (dict(mrope_section=(16, 24, 16)), "mrope_section"),
    (dict(num_attention_heads=7), "num_attention_heads"),
    (dict(num_key_value_heads=5), "num_key_value_heads"),
    (dict(hidden_size=-1), "hidden_size"),
    (dict(use_sliding_window=True), "use_sliding_window"),
])
def test_bad_text_fields_are_named(bad, field):
    base = qwen2_vl_2b().text_config
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(base, **bad)


@pytest.mark.parametrize("bad, field", [
    (dict(num_heads=7), "num_heads"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(patch_size=0), "patch_size"),
])
def test_bad_vision_fields_are_named(bad, field):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(Qwen2VLVisionConfig(), **bad)


def test_bad_whole_model_fields_are_named():
    cfg = qwen2_vl_2b()
    with pytest.raises(ValueError, match="vision_config.hidden_size"):
        dataclasses.replace(cfg, vision_config=dataclasses.replace(cfg.vision_config, hidden_size=3584))
    with pytest.raises(ValueError, match="image_token_id"):
        dataclasses.replace(cfg, image_token_id=10**7)
    d = cfg.to_hf_dict()
    d["rope_scaling"] = {"type": "mrope"}
    with pytest.raises(ValueError, match="mrope_section"):
        Qwen2VLConfig.from_hf(d)
    d["model_type"] = "llava"
    with pytest.raises(ValueError, match="model_type"):
        Qwen2VLConfig.from_hf(d)
