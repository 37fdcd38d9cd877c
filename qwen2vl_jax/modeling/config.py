"""Model configuration: frozen dataclasses and `from_hf` / `to_hf_dict` for config.json, and the presets of the
released sizes.

One set of classes describes both families (`model_type` "qwen2_vl" or "qwen2_5_vl"): they share the decoder,
the patch embed, the 2-D vision rotary, the 2x2 merger and M-RoPE. Qwen2.5-VL changes the vision blocks (RMSNorm,
a SwiGLU MLP with biases, window attention outside `fullatt_block_indexes`) and spaces video positions in time
(`tokens_per_second`). Field names follow transformers' `Qwen2VLVisionConfig` / `Qwen2VLTextConfig` /
`Qwen2VLConfig`, so a reader can hold the two side by side; where Qwen2.5-VL's `Qwen2_5_VLVisionConfig` renames a
field (its `hidden_size` is our `embed_dim`, its `out_hidden_size` our `hidden_size`), `from_hf` / `to_hf_dict`
translate. `from_hf` reads both on-disk layouts:

* 4.x (every official Hub checkpoint): text fields flat at the root, `rope_scaling: {type: mrope, mrope_section}`;
  transformers 4.57 also writes a nested `text_config` copy of the same fields.
* 5.x: nested `text_config` with `rope_parameters: {rope_type, rope_theta, mrope_section}`.


The released models as `Qwen2VLConfig` presets: Qwen2-VL 2B / 7B / 72B and Qwen2.5-VL 3B / 7B / 32B / 72B.
`PRESETS` maps the short names the CLI and `plan` take ("2b", "2.5-7b", ...) to them."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Qwen2VLVisionConfig",
    "Qwen2VLTextConfig",
    "Qwen2VLConfig",
    "MODEL_TYPES",
    "ConfigError",
]


class ConfigError(ValueError):
    """A config.json (or config object) this package cannot run: invalid JSON, a bad field, another model type."""


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"invalid config field `{field_name}`: {message}")


def _positive_ints(obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, name,
                 f"must be a positive integer, got {value!r}")


MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def _check_model_type(model_type) -> None:
    _require(model_type in MODEL_TYPES, "model_type",
             f"{model_type!r} is not a model type this package runs ({', '.join(map(repr, MODEL_TYPES))})")


# Rematerialisation policies by name (`jax.checkpoint_policies`), for `Qwen2VL.set_remat`: what a rematerialised
# decoder layer / vision block keeps from its forward pass for the backward one (a runtime choice, never saved).
REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable", "everything_saveable")

@dataclass(frozen=True)
class Qwen2VLVisionConfig:
    """The ViT: Conv3d patch embed, `depth` pre-norm blocks with 2-D rotary attention, and the 2x2 patch merger.

    `model_type` picks the block: "qwen2_vl" has LayerNorms and a QuickGELU fc1/fc2 MLP of width
    `embed_dim * mlp_ratio`; "qwen2_5_vl" has RMSNorms (also the merger's `ln_q`), a SwiGLU MLP with biases of width
    `intermediate_size`, and attends within windows of `window_size` pixels in every block not listed in
    `fullatt_block_indexes` (transformers 4.57 models/qwen2_5_vl/modeling_qwen2_5_vl.py `Qwen2_5_VLVisionBlock`,
    `Qwen2_5_VisionTransformerPretrainedModel.get_window_index`)."""

    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: float = 4.0
    hidden_size: int = 8192  # merger output width = the language model's hidden size (HF 2.5: out_hidden_size)
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-6  # hard-coded in the reference (LayerNorm / Qwen2RMSNorm(..., eps=1e-6))
    rope_theta: float = 10000.0
    initializer_range: float = 0.02
    model_type: str = "qwen2_vl"
    # Qwen2.5-VL only (None / () for Qwen2-VL):
    intermediate_size: int | None = None  # SwiGLU width (3420 / 3456)
    window_size: int | None = None  # pixels per window side (112: 4x4 merged tokens = 8x8 patches)
    fullatt_block_indexes: tuple[int, ...] = ()  # blocks that attend over whole frames instead of windows
    tokens_per_second: int | None = None  # M-RoPE temporal ids per second of video

    def __post_init__(self):
        object.__setattr__(self, "fullatt_block_indexes", tuple(int(i) for i in self.fullatt_block_indexes))
        _check_model_type(self.model_type)
        _positive_ints(self, ("depth", "embed_dim", "num_heads", "hidden_size", "in_channels", "patch_size",
                              "spatial_merge_size", "temporal_patch_size"))
        _require(self.embed_dim % self.num_heads == 0, "num_heads",
                 f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        _require(self.head_dim % 4 == 0, "embed_dim",
                 f"vision head_dim {self.head_dim} must be divisible by 4 (h and w rotary halves)")
        if self.model_type == "qwen2_vl":
            _require(self.mlp_ratio > 0 and int(self.embed_dim * self.mlp_ratio) > 0, "mlp_ratio",
                     f"must be positive, got {self.mlp_ratio!r}")
            _require(self.hidden_act == "quick_gelu", "hidden_act",
                     f"Qwen2-VL's vision MLP uses 'quick_gelu', got {self.hidden_act!r}")
            for name in ("intermediate_size", "window_size", "tokens_per_second"):
                _require(getattr(self, name) is None, name, "is a Qwen2.5-VL field (model_type 'qwen2_5_vl')")
            _require(not self.fullatt_block_indexes, "fullatt_block_indexes",
                     "is a Qwen2.5-VL field (model_type 'qwen2_5_vl')")
        else:
            _positive_ints(self, ("intermediate_size", "window_size", "tokens_per_second"))
            _require(self.hidden_act == "silu", "hidden_act",
                     f"Qwen2.5-VL's vision MLP is SwiGLU ('silu'), got {self.hidden_act!r}")
            _require(self.window_size // self.spatial_merge_size // self.patch_size > 0, "window_size",
                     f"{self.window_size} px is smaller than one merged token "
                     f"({self.patch_size * self.spatial_merge_size} px)")
            _require(all(i >= 0 for i in self.fullatt_block_indexes), "fullatt_block_indexes",
                     f"block indexes must be non-negative, got {list(self.fullatt_block_indexes)}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def gated_mlp(self) -> bool:
        """SwiGLU gate/up/down (Qwen2.5-VL) rather than fc1/fc2 (Qwen2-VL)."""
        return self.model_type == "qwen2_5_vl"

    @property
    def rms_norm(self) -> bool:
        """RMSNorm (Qwen2.5-VL) rather than LayerNorm (Qwen2-VL) in the blocks and the merger."""
        return self.model_type == "qwen2_5_vl"

    @property
    def window_tokens(self) -> int | None:
        """Merged tokens per window side (transformers `vit_merger_window_size`: 112 // 2 // 14 = 4)."""
        if self.window_size is None:
            return None
        return self.window_size // self.spatial_merge_size // self.patch_size

    def attends_in_windows(self, block: int) -> bool:
        return self.window_size is not None and block not in self.fullatt_block_indexes

    @property
    def mlp_dim(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return int(self.embed_dim * self.mlp_ratio)  # the reference truncates the same way

    @property
    def patch_dim(self) -> int:
        """Width of one `pixel_values` row: C * T * P * P (1176 for the real models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_dim(self) -> int:
        """Width of one merged token before the merger MLP: embed_dim * merge**2 (5120)."""
        return self.embed_dim * self.spatial_merge_size**2


@dataclass(frozen=True)
class Qwen2VLTextConfig:
    """The Qwen2 decoder with multimodal rotary embeddings (M-RoPE)."""

    vocab_size: int = 152064
    hidden_size: int = 8192
    intermediate_size: int = 29568
    num_hidden_layers: int = 80
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)
    use_sliding_window: bool = False
    sliding_window: int | None = 32768
    max_window_layers: int = 80
    initializer_range: float = 0.02

    def __post_init__(self):
        object.__setattr__(self, "mrope_section", tuple(int(s) for s in self.mrope_section))
        _positive_ints(self, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                              "num_attention_heads", "num_key_value_heads", "max_position_embeddings"))
        _require(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
                 f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                 f"{self.num_attention_heads}")
        _require(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
                 f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                 f"{self.num_key_value_heads}")
        _require(self.head_dim % 2 == 0, "hidden_size", f"head_dim {self.head_dim} must be even")
        _require(len(self.mrope_section) == 3 and all(s >= 0 for s in self.mrope_section), "mrope_section",
                 f"needs three non-negative sizes (temporal, height, width), got {list(self.mrope_section)}")
        _require(sum(self.mrope_section) == self.head_dim // 2, "mrope_section",
                 f"{list(self.mrope_section)} sums to {sum(self.mrope_section)} but head_dim/2 is "
                 f"{self.head_dim // 2}")
        _require(self.hidden_act == "silu", "hidden_act", f"Qwen2 uses 'silu', got {self.hidden_act!r}")
        _require(self.rms_norm_eps > 0, "rms_norm_eps", f"must be positive, got {self.rms_norm_eps!r}")
        _require(self.rope_theta > 0, "rope_theta", f"must be positive, got {self.rope_theta!r}")
        # Every released Qwen2-VL has use_sliding_window=false; the reference only implements it under FA2.
        _require(not self.use_sliding_window, "use_sliding_window",
                 "sliding-window attention is not implemented (no Qwen2-VL checkpoint uses it)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


ARCHITECTURES = {"qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


def _vision_from_hf(vraw: dict, model_type: str, text_hidden: int) -> Qwen2VLVisionConfig:
    """The vision config from config.json's `vision_config`; missing fields take transformers 4.57's class defaults
    (`Qwen2VLVisionConfig` / `Qwen2_5_VLVisionConfig`)."""
    vrope = vraw.get("rope_parameters") or {}
    common = dict(
        depth=vraw.get("depth", vraw.get("num_hidden_layers", 32)),
        num_heads=vraw.get("num_heads", 16),
        # Hub files say `in_chans`; the reference ignores it and uses in_channels (default 3).
        in_channels=vraw.get("in_channels", 3),
        patch_size=vraw.get("patch_size", vraw.get("spatial_patch_size", 14)),
        spatial_merge_size=vraw.get("spatial_merge_size", 2),
        temporal_patch_size=vraw.get("temporal_patch_size", 2),
        rope_theta=float(vrope.get("rope_theta", 10000.0)),
        initializer_range=vraw.get("initializer_range", 0.02),
        model_type=model_type,
    )
    if model_type == "qwen2_vl":
        return Qwen2VLVisionConfig(embed_dim=vraw.get("embed_dim", 1280), mlp_ratio=vraw.get("mlp_ratio", 4.0),
                                   hidden_size=vraw.get("hidden_size", text_hidden),
                                   hidden_act=vraw.get("hidden_act", "quick_gelu"), **common)
    # Qwen2_5_VLVisionConfig: `hidden_size` is the ViT width, `out_hidden_size` the merger's output.
    return Qwen2VLVisionConfig(
        embed_dim=vraw.get("hidden_size", 3584), hidden_size=vraw.get("out_hidden_size", 3584),
        intermediate_size=vraw.get("intermediate_size", 3420), hidden_act=vraw.get("hidden_act", "silu"),
        window_size=vraw.get("window_size", 112),
        fullatt_block_indexes=tuple(vraw.get("fullatt_block_indexes", (7, 15, 23, 31))),
        tokens_per_second=vraw.get("tokens_per_second", 4), **common)


def _vision_to_hf(v: Qwen2VLVisionConfig) -> dict[str, Any]:
    """`vision_config` as the family's Hub config.json writes it."""
    common = {"depth": v.depth, "num_heads": v.num_heads, "in_channels": v.in_channels, "patch_size": v.patch_size,
              "spatial_merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
              "hidden_act": v.hidden_act, "initializer_range": v.initializer_range}
    if v.model_type == "qwen2_vl":
        return {**common, "embed_dim": v.embed_dim, "mlp_ratio": v.mlp_ratio, "hidden_size": v.hidden_size}
    return {**common, "hidden_size": v.embed_dim, "out_hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes), "tokens_per_second": v.tokens_per_second}



@dataclass(frozen=True)
class Qwen2VLConfig:
    """The whole model: vision tower + decoder + the special token ids that tie them together.

    Every default is Qwen2-VL-72B-Instruct's (`Qwen2VLConfig() == qwen2_vl_72b()`), so the three classes' defaults
    describe one consistent model; the other sizes and the Qwen2.5-VL family are the presets below.
    `model_type` ("qwen2_vl" / "qwen2_5_vl") names the family; the vision config carries the same value.
    """

    text_config: Qwen2VLTextConfig = field(default_factory=Qwen2VLTextConfig)
    vision_config: Qwen2VLVisionConfig = field(default_factory=Qwen2VLVisionConfig)
    tie_word_embeddings: bool = False
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision_token_id: int = 151654
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    pad_token_id: int | None = None
    # Which attention backend runs (`qwen2vl_jax.attention`: "xla", "cpu", "jax", "pallas" or a registered name;
    # None: the platform's default). A runtime choice like transformers' `_attn_implementation`: never saved.
    attn_implementation: str | None = None
    # Stack each tower's layers and run them with `jax.lax.scan` (one compiled block instead of one per layer:
    # compile time on pods; `sharding` "layers" axis). A runtime choice, never saved; the unrolled loop stays the
    # default because it is faster on XLA:CPU (docs/BENCHMARKS.md).
    scan_layers: bool = False
    model_type: str = "qwen2_vl"

    def __post_init__(self):
        _check_model_type(self.model_type)
        _require(self.vision_config.model_type == self.model_type, "vision_config.model_type",
                 f"{self.vision_config.model_type!r} does not match the model's {self.model_type!r}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        _require(self.attn_implementation is None or isinstance(self.attn_implementation, str),
                 "attn_implementation", f"must be a backend name or None, got {self.attn_implementation!r}")
        _require(isinstance(self.scan_layers, bool), "scan_layers", f"must be True or False, got {self.scan_layers!r}")
        _require(self.vision_config.hidden_size == self.text_config.hidden_size, "vision_config.hidden_size",
                 f"the merger outputs {self.vision_config.hidden_size} features but the decoder is "
                 f"{self.text_config.hidden_size} wide")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            value = getattr(self, name)
            _require(isinstance(value, int) and 0 <= value < self.text_config.vocab_size, name,
                     f"{value!r} is not a token id below vocab_size {self.text_config.vocab_size}")

    # ----------------------------------------------------------------------------------------------------- I/O
    @classmethod
    def from_hf(cls, source: dict | str | os.PathLike) -> Qwen2VLConfig:
        """Read a Hugging Face `config.json` (a dict, the file, or its checkpoint directory), 4.x or 5.x layout."""
        if isinstance(source, dict):
            raw = source
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"no config.json at {path}")
            try:
                with open(path, encoding="utf-8") as f:
                    raw = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"{path} does not hold a JSON object")
        model_type = raw.get("model_type", "qwen2_vl")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"unsupported model_type {model_type!r} in config.json: this package runs Qwen2-VL "
                              "and Qwen2.5-VL checkpoints (model_type 'qwen2_vl' or 'qwen2_5_vl')")
        text_raw = raw.get("text_config") or {}

        def text_get(name, default=None):
            # 5.x and 4.57 keep text fields in text_config; 4.x Hub files keep them flat at the root.
            if name in text_raw and text_raw[name] is not None:
                return text_raw[name]
            return raw.get(name, default)

        rope = text_raw.get("rope_parameters") or raw.get("rope_parameters") or text_get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("mrope", "default"):
            raise ConfigError(f"invalid config field `rope_scaling`: rope type {rope_type!r} is not supported "
                             "(Qwen2-VL uses 'mrope' / 'default' with an mrope_section)")
        if "mrope_section" not in rope:
            raise ConfigError("invalid config field `rope_scaling`: `mrope_section` is missing")
        rope_theta = rope.get("rope_theta", text_get("rope_theta", 1000000.0))

        tdefault = Qwen2VLTextConfig()
        text = Qwen2VLTextConfig(
            vocab_size=text_get("vocab_size", tdefault.vocab_size),
            hidden_size=text_get("hidden_size", tdefault.hidden_size),
            intermediate_size=text_get("intermediate_size", tdefault.intermediate_size),
            num_hidden_layers=text_get("num_hidden_layers", tdefault.num_hidden_layers),
            num_attention_heads=text_get("num_attention_heads", tdefault.num_attention_heads),
            num_key_value_heads=text_get("num_key_value_heads", None) or text_get("num_attention_heads",
                                                                                 tdefault.num_attention_heads),
            hidden_act=text_get("hidden_act", "silu"),
            max_position_embeddings=text_get("max_position_embeddings", tdefault.max_position_embeddings),
            rms_norm_eps=float(text_get("rms_norm_eps", 1e-5)),  # transformers' class default, for files without it
            rope_theta=float(rope_theta),
            mrope_section=tuple(rope["mrope_section"]),
            use_sliding_window=bool(text_get("use_sliding_window", False)),
            sliding_window=text_get("sliding_window", None),
            max_window_layers=text_get("max_window_layers", tdefault.max_window_layers),
            initializer_range=text_get("initializer_range", 0.02),
        )
        vraw = dict(raw.get("vision_config") or {})
        vision = _vision_from_hf(vraw, model_type, text.hidden_size)

        # 4.57 reads the flag from text_config (its __getattribute__ forwards to it); 5.x keeps it at the root.
        tie = text_raw.get("tie_word_embeddings", raw.get("tie_word_embeddings", False))
        eos = text_get("eos_token_id", 151645)
        return cls(
            text_config=text,
            vision_config=vision,
            tie_word_embeddings=bool(tie),
            image_token_id=raw.get("image_token_id", 151655),
            video_token_id=raw.get("video_token_id", 151656),
            vision_start_token_id=raw.get("vision_start_token_id", 151652),
            vision_end_token_id=raw.get("vision_end_token_id", 151653),
            vision_token_id=raw.get("vision_token_id", 151654),
            bos_token_id=text_get("bos_token_id", 151643),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=text_get("pad_token_id", None),
            model_type=model_type,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json in the 4.x Hub layout (flat text fields), which transformers 4.x and 5.x both read."""
        t, v = self.text_config, self.vision_config
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        out = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "use_sliding_window": t.use_sliding_window,
            "sliding_window": t.sliding_window,
            "max_window_layers": t.max_window_layers,
            "initializer_range": t.initializer_range,
            "attention_dropout": 0.0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "vision_token_id": self.vision_token_id,
            "vision_config": _vision_to_hf(v),
        }
        if self.pad_token_id is not None:
            out["pad_token_id"] = self.pad_token_id
        return out

    def to_dict(self) -> dict[str, Any]:
        """Our own lossless serialisation (written into converted checkpoints beside the HF dict)."""
        return dataclasses.asdict(self)

    def replace(self, **changes) -> Qwen2VLConfig:
        return dataclasses.replace(self, **changes)

    def with_layers(self, text_layers: int | None = None, vision_depth: int | None = None) -> Qwen2VLConfig:
        """A copy with fewer (or more) layers: the shape of a preset, cheap to run (benchmarks, selfcheck)."""
        text = self.text_config if text_layers is None else dataclasses.replace(
            self.text_config, num_hidden_layers=text_layers, max_window_layers=text_layers)
        vision = self.vision_config if vision_depth is None else dataclasses.replace(
            self.vision_config, depth=vision_depth)
        return dataclasses.replace(self, text_config=text, vision_config=vision)


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
