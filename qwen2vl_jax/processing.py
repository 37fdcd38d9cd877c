"""The Qwen2-VL processor: images/videos -> patches, text -> token ids, and the chat template.

This reproduces what transformers 4.57 ("TF457") does with a Qwen2-VL checkpoint, using NumPy, Pillow, the
`tokenizers` library and jinja2 only:

* `Qwen2VLImageProcessor` — TF457's *slow* `image_processing_qwen2_vl.py` (the PIL path, reference §4.2):
  `convert_to_rgb` -> `smart_resize` -> Pillow BICUBIC resize through a uint8 image (`image_transforms.resize`)
  -> `rescale` (x 1/255, float64 then float32) -> `normalize` (CLIP mean/std, float32) -> pad frames to the
  temporal patch size -> patchify into rows of C*T*P*P = 1176 in merge-block order (reference §4.3).
* `Qwen2Tokenizer` — `Qwen2TokenizerFast` on the checkpoint's `tokenizer.json`: encode, left padding, decode.
* chat templates — rendered with the same jinja2 environment as TF457 `utils/chat_template_utils.py`.
* `Qwen2VLProcessor` — TF457 `processing_qwen2_vl.py`: expands every `<|image_pad|>` / `<|video_pad|>` to
  `prod(grid_thw) // merge_size**2` copies (reference §4.4) and returns NumPy arrays under the HF keys.

Everything here is pure preprocessing: no model code, no torch, no transformers.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from copy import deepcopy
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image
from tokenizers import AddedToken, Tokenizer

from .hub import resolve_source
from .video import fetch_video, load_image

# A processor needs the tokenizer / preprocessor / chat-template files of a Hub snapshot, not the weights.
PROCESSOR_PATTERNS = ["*.json", "*.txt", "*.jinja"]

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "DEFAULT_CHAT_TEMPLATE",
    "BatchFeature",
    "smart_resize",
    "convert_to_rgb",
    "patchify",
    "Qwen2VLImageProcessor",
    "Qwen2Tokenizer",
    "compile_chat_template",
    "render_chat_template",
    "Qwen2VLProcessor",
]

# TF457 utils/constants.py:5-6.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Hub preprocessor_config.json of Qwen2-VL-*-Instruct (reference §4.1): 4 .. 16384 visual tokens per image.
INSTRUCT_MIN_PIXELS = 56 * 56
INSTRUCT_MAX_PIXELS = 16384 * 28 * 28

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"

# Qwen2-VL-*-Instruct tokenizer_config.json (reference §6).
INSTRUCT_ADDITIONAL_SPECIAL_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>",
)

# The Qwen2-VL-*-Instruct chat template (reference §6), used when a checkpoint ships none.
DEFAULT_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


class BatchFeature(dict):
    """A dict (HF key order kept) whose entries are also attributes: `out["input_ids"]` or `out.input_ids`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


# ================================================================================================ image processor
def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """HF's `smart_resize` (TF457 image_processing_qwen2_vl.py:54): both sides multiples of `factor`, the area in
    [min_pixels, max_pixels], the aspect ratio kept as closely as possible. Python `round` (half to even), as HF.

    >>> smart_resize(561, 278)
    (560, 280)
    """
    if min(height, width) <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def convert_to_rgb(image: Image.Image | np.ndarray) -> Image.Image | np.ndarray:
    """TF457 `image_transforms.convert_to_rgb`: a PIL image not in RGB mode goes through `image.convert("RGB")`.

    That is Pillow's plain conversion, with no compositing: RGBA/LA/PA drop alpha (the colour under a transparent
    pixel is kept, not replaced by white), P maps through the palette (transparency ignored), CMYK/I;16/I/F/1/L use
    Pillow's converters. Arrays are returned unchanged, as in HF.
    """
    if isinstance(image, Image.Image) and image.mode != "RGB":
        return image.convert("RGB")
    return image


def _as_hwc(array: np.ndarray) -> np.ndarray:
    """An image array as [H, W, 3]: channels located like TF457 `infer_channel_dimension_format` (first axis if it
    has 1 or 3 entries, else last). HF fails on grey or RGBA arrays; here grey is replicated and alpha dropped,
    which is what HF's `convert_to_rgb` does to the same image given as PIL."""
    if array.ndim == 2:  # grey HxW: no channel axis to infer
        array = array[..., None]
    elif array.ndim != 3:
        raise ValueError(f"an image array must have 2 or 3 dimensions (HxW, HxWxC or CxHxW), got shape {array.shape}")
    elif array.shape[0] in (1, 3):
        array = array.transpose(1, 2, 0)
    elif array.shape[-1] == 4:
        array = array[..., :3]
    elif array.shape[-1] not in (1, 3):
        raise ValueError(f"unable to find the channel axis of an image array of shape {array.shape} (expected 1, 3 "
                         "or 4 channels)")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    return array


def _rescale_for_pil_conversion(array: np.ndarray) -> bool:
    """TF457 `image_transforms._rescale_for_pil_conversion`: does a float array need x255 before becoming uint8?"""
    if array.dtype == np.uint8:
        return False
    if np.allclose(array, array.astype(int)):
        if np.all(array >= 0) and np.all(array <= 255):
            return False
        raise ValueError("The image to be converted to a PIL image contains values outside the range [0, 255], "
                         f"got [{array.min()}, {array.max()}] which cannot be converted to uint8.")
    if np.all(array >= 0) and np.all(array <= 1):
        return True
    raise ValueError("The image to be converted to a PIL image contains values outside the range [0, 1], "
                     f"got [{array.min()}, {array.max()}] which cannot be converted to uint8.")


def _resize_like_hf(image: Image.Image | np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """TF457 `image_transforms.resize`: through a uint8 PIL image, Pillow `resize`, back to an HWC array.

    A float image in [0, 1] is scaled x255 (float64 -> float32), truncated to uint8, resized, and scaled back by
    1/255, exactly as HF does; integer-valued images are cast to uint8 unscaled. A PIL image is resized directly
    (HF's array round trip of a uint8 RGB image is lossless).
    """
    rescaled = False
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            rescaled = _rescale_for_pil_conversion(image)
            if rescaled:
                image = (image.astype(np.float64) * 255).astype(np.float32)
            image = image.astype(np.uint8)
        image = Image.fromarray(np.ascontiguousarray(image))
    if image.size != (width, height):  # Pillow returns a copy for a same-size resize
        image = image.resize((width, height), resample=resample)
    out = np.asarray(image)
    if rescaled:
        out = (out.astype(np.float64) * (1 / 255)).astype(np.float32)
    return out


def patchify(frames_fhwc: np.ndarray, temporal_patch_size: int = 2, patch_size: int = 14,
             merge_size: int = 2) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Frames [F, H, W, C] -> (rows [t*h*w, C*T*P*P], (t, h, w)) in TF457's layout (reference §4.3).

    Frames are padded to a multiple of T with copies of the last one (an image becomes T identical frames). Rows
    run over (t, block_row, block_col, row_in_block, col_in_block); each row is ordered (C, T, ph, pw). TF457
    reshapes [t, T, C, h/M, M, P, w/M, M, P] and transposes (0, 3, 6, 4, 7, 2, 1, 5, 8); from channels-last
    frames the same order is (0, 2, 5, 3, 6, 8, 1, 4, 7).
    """
    f, h, w, c = frames_fhwc.shape
    unit = patch_size * merge_size
    if h % unit or w % unit:
        raise ValueError(f"frame size {h}x{w} is not a multiple of patch_size*merge_size = {unit}")
    pad = (-f) % temporal_patch_size
    if f == 1:  # an image: broadcast instead of copying, the transpose below makes the one copy
        frames = np.broadcast_to(frames_fhwc, (temporal_patch_size, h, w, c))
    elif pad:
        frames = np.concatenate([frames_fhwc, np.repeat(frames_fhwc[-1:], pad, axis=0)])
    else:
        frames = frames_fhwc
    grid_t, grid_h, grid_w = frames.shape[0] // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(grid_t, temporal_patch_size, grid_h // merge_size, merge_size, patch_size,
                       grid_w // merge_size, merge_size, patch_size, c)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    rows = x.reshape(grid_t * grid_h * grid_w, c * temporal_patch_size * patch_size * patch_size)
    return rows, (grid_t, grid_h, grid_w)


_IMAGE_PROCESSOR_KEYS = ("min_pixels", "max_pixels", "size", "patch_size", "temporal_patch_size", "merge_size",
                         "image_mean", "image_std", "rescale_factor", "resample", "do_resize", "do_rescale",
                         "do_normalize", "do_convert_rgb")


class Qwen2VLImageProcessor:
    """TF457 slow `Qwen2VLImageProcessor`: images (and, through `videos=`, frame stacks) -> `pixel_values` rows.

    Call it like HF's: `proc(images=[...])` -> {"pixel_values": [N, 1176] float32, "image_grid_thw": [n, 3]};
    `proc(videos=[...])` -> {"pixel_values_videos", "video_grid_thw"}. The class defaults are HF's class defaults
    (min 56*56, max 28*28*1280); `Qwen2VLProcessor.from_pretrained` passes the checkpoint's values.
    """

    model_input_names = ["pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"]

    def __init__(self, *, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280, patch_size: int = 14,
                 temporal_patch_size: int = 2, merge_size: int = 2, image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 image_std: Sequence[float] = OPENAI_CLIP_STD, rescale_factor: float = 1 / 255,
                 resample: int = Image.Resampling.BICUBIC, do_resize: bool = True, do_rescale: bool = True,
                 do_normalize: bool = True, do_convert_rgb: bool = True):
        for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels), ("patch_size", patch_size),
                            ("temporal_patch_size", temporal_patch_size), ("merge_size", merge_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if min_pixels > max_pixels:
            raise ValueError(f"`min_pixels` ({min_pixels}) must not exceed `max_pixels` ({max_pixels})")
        image_mean, image_std = tuple(float(v) for v in image_mean), tuple(float(v) for v in image_std)
        if len(image_mean) != 3 or len(image_std) != 3 or any(s == 0 for s in image_std):
            raise ValueError(f"`image_mean`/`image_std` need 3 values and a nonzero std, got {image_mean} / "
                             f"{image_std}")
        self.min_pixels, self.max_pixels = int(min_pixels), int(max_pixels)
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.image_mean, self.image_std = image_mean, image_std
        self.rescale_factor = rescale_factor
        self.resample = Image.Resampling(resample)
        self.do_resize, self.do_rescale = bool(do_resize), bool(do_rescale)
        self.do_normalize, self.do_convert_rgb = bool(do_normalize), bool(do_convert_rgb)
        # `_rescale_normalize` of every uint8 value per channel: [3, 256]. Looking values up gives the same bits
        # as computing them (the arithmetic is elementwise) at a fraction of the cost.
        values = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
        self._lut_c256 = np.ascontiguousarray(self._rescale_normalize(values).T)

    @classmethod
    def from_dict(cls, config: dict | None = None, **overrides: Any) -> Qwen2VLImageProcessor:
        """Build from a `preprocessor_config.json` dict; `overrides` win over the file.

        Pixel bounds come from `min_pixels`/`max_pixels` or the newer `size: {shortest_edge, longest_edge}` form;
        both forms are honoured, including as overrides (TF457 drops a valid `size` in `__init__` and its fast
        processor ignores `max_pixels=` given to `from_pretrained`: transformers #41955).
        """
        unknown = sorted(set(overrides) - set(_IMAGE_PROCESSOR_KEYS))
        if unknown:
            raise ValueError(f"unknown image processor option(s): {', '.join(unknown)}")
        merged = {k: v for k, v in (config or {}).items() if k in _IMAGE_PROCESSOR_KEYS}
        if "size" in overrides:
            merged.pop("min_pixels", None)
            merged.pop("max_pixels", None)
        merged.update({k: v for k, v in overrides.items() if v is not None})
        size = merged.pop("size", None) or {}
        if not isinstance(size, dict):
            raise ValueError(f"`size` must be a dict with shortest_edge/longest_edge, got {size!r}")
        min_pixels = merged.pop("min_pixels", None) or size.get("shortest_edge", size.get("min_pixels"))
        max_pixels = merged.pop("max_pixels", None) or size.get("longest_edge", size.get("max_pixels"))
        if min_pixels is not None:
            merged["min_pixels"] = min_pixels
        if max_pixels is not None:
            merged["max_pixels"] = max_pixels
        return cls(**merged)

    @property
    def size(self) -> dict[str, int]:
        return {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}

    def to_dict(self) -> dict[str, Any]:
        return {"min_pixels": self.min_pixels, "max_pixels": self.max_pixels, "patch_size": self.patch_size,
                "temporal_patch_size": self.temporal_patch_size, "merge_size": self.merge_size,
                "image_mean": list(self.image_mean), "image_std": list(self.image_std),
                "rescale_factor": self.rescale_factor, "resample": int(self.resample), "do_resize": self.do_resize,
                "do_rescale": self.do_rescale, "do_normalize": self.do_normalize,
                "do_convert_rgb": self.do_convert_rgb}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()})"

    # --------------------------------------------------------------------------------------------- pipeline
    def smart_resize(self, height: int, width: int, min_pixels: int | None = None,
                     max_pixels: int | None = None) -> tuple[int, int]:
        return smart_resize(height, width, factor=self.patch_size * self.merge_size,
                            min_pixels=self.min_pixels if min_pixels is None else min_pixels,
                            max_pixels=self.max_pixels if max_pixels is None else max_pixels)

    def get_number_of_image_patches(self, height: int, width: int) -> int:
        h, w = self.smart_resize(height, width)
        return (h // self.patch_size) * (w // self.patch_size)

    def _rescale_normalize(self, x: np.ndarray) -> np.ndarray:
        """TF457 `rescale` then `normalize`, in HF's arithmetic order and dtypes (channels last)."""
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)  # image_transforms.rescale
        if self.do_normalize:
            if not np.issubdtype(x.dtype, np.floating):  # image_transforms.normalize casts integers to float32
                x = x.astype(np.float32)
            x = (x - np.array(self.image_mean, dtype=x.dtype)) / np.array(self.image_std, dtype=x.dtype)
        return x

    def _preprocess(self, frames: list, min_pixels: int, max_pixels: int
                    ) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image (a 1-frame list) or one video (its frames) -> (rows, grid): TF457 `_preprocess`."""
        if self.do_convert_rgb:
            frames = [convert_to_rgb(f) for f in frames]
        frames = [f if isinstance(f, Image.Image) and f.mode == "RGB" else
                  _as_hwc(np.asarray(f)) for f in frames]
        first = frames[0]
        height, width = (first.size[1], first.size[0]) if isinstance(first, Image.Image) else first.shape[:2]
        if self.do_resize:  # TF457 sizes every frame from the first one
            height, width = self.smart_resize(height, width, min_pixels, max_pixels)
            arrays = [_resize_like_hf(f, height, width, self.resample) for f in frames]
        else:
            arrays = [np.asarray(f) for f in frames]
            if any(a.shape[:2] != (height, width) for a in arrays):
                raise ValueError("with do_resize=False all frames of a video must have the same size")
        stack_fhwc = np.stack(arrays)
        if self.do_rescale and np.issubdtype(stack_fhwc.dtype, np.floating) and stack_fhwc.max() <= 1:
            warnings.warn("It looks like you are trying to rescale already rescaled images (TF457 warns the same "
                          "and rescales again). If the input images have pixel values between 0 and 1, set "
                          "`do_rescale=False`.", stacklevel=3)
        if stack_fhwc.dtype == np.uint8:
            normalized = np.empty(stack_fhwc.shape, self._lut_c256.dtype)
            for c in range(3):
                normalized[..., c] = self._lut_c256[c][stack_fhwc[..., c]]
        else:
            normalized = self._rescale_normalize(stack_fhwc)
        return patchify(normalized, self.temporal_patch_size, self.patch_size, self.merge_size)

    def __call__(self, images: Any = None, videos: Any = None, *, min_pixels: int | None = None,
                 max_pixels: int | None = None, return_tensors: str | None = "np") -> BatchFeature:
        """Images -> `pixel_values` + `image_grid_thw`; videos -> `pixel_values_videos` + `video_grid_thw`.

        `images`: one image or a (nested) list of PIL images / arrays / paths / bytes. `videos`: one video or a
        list of videos, each an array [T, H, W, C], a list of frames, or a path (decoded and sampled with
        `qwen2vl_jax.video.fetch_video`). Rows of all inputs are concatenated in order, as in HF.
        """
        if return_tensors not in ("np", None):
            raise ValueError(f"return_tensors must be 'np' or None, got {return_tensors!r}")
        min_pixels = self.min_pixels if min_pixels is None else min_pixels
        max_pixels = self.max_pixels if max_pixels is None else max_pixels
        data = BatchFeature()
        if images is not None:
            image_list = _flat_image_list(images)
            if image_list:
                rows, grids = zip(*(self._preprocess([img], min_pixels, max_pixels) for img in image_list))
                data["pixel_values"] = rows[0] if len(rows) == 1 else np.concatenate(rows)
                data["image_grid_thw"] = np.array(grids, dtype=np.int64)
        if videos is not None:
            video_list = _video_list(videos)
            if video_list:
                rows, grids = zip(*(self._preprocess(v, min_pixels, max_pixels) for v in video_list))
                data["pixel_values_videos"] = rows[0] if len(rows) == 1 else np.concatenate(rows)
                data["video_grid_thw"] = np.array(grids, dtype=np.int64)
        return data

    preprocess = __call__


def _is_image(x: Any) -> bool:
    return isinstance(x, (Image.Image, str, os.PathLike, bytes, bytearray, memoryview)) or (
        isinstance(x, np.ndarray) and x.ndim in (2, 3))


def _flat_image_list(images: Any) -> list:
    """One image, a list, or a list of per-prompt lists -> a flat list of loaded images (PIL or arrays).

    Paths, bytes and base64 strings are decoded like transformers' `load_image` (EXIF orientation applied)."""
    if _is_image(images):
        images = [images]
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)):
        raise ValueError(f"unsupported images input of type {type(images).__name__}")
    flat = []
    for item in images:
        if isinstance(item, (list, tuple)):
            flat.extend(item)
        elif isinstance(item, np.ndarray) and item.ndim == 4:
            flat.extend(item)
        else:
            flat.append(item)
    for item in flat:
        if not _is_image(item):
            raise ValueError(f"unsupported image input of type {type(item).__name__}: expected a PIL image, an "
                             "array, a path, bytes or a data:image base64 string")
    return [load_image(item, exif_transpose=True) for item in flat]


def _video_list(videos: Any) -> list[list]:
    """One video or a list of videos -> a list of frame lists. A list whose first item is a frame is one video
    (as HF's `make_batched_videos`); a path is decoded and sampled with qwen-vl-utils' rules (`fetch_video`)."""
    if isinstance(videos, (str, os.PathLike)) or (isinstance(videos, np.ndarray) and videos.ndim == 4):
        videos = [videos]
    elif isinstance(videos, (list, tuple)) and videos and (
            isinstance(videos[0], Image.Image) or (isinstance(videos[0], np.ndarray) and videos[0].ndim == 3)):
        videos = [videos]
    if not isinstance(videos, (list, tuple)):
        raise ValueError(f"unsupported videos input of type {type(videos).__name__}")
    out = []
    for video in videos:
        if isinstance(video, (str, os.PathLike)):
            frames, _ = fetch_video(video)
            out.append(list(frames))
        elif isinstance(video, np.ndarray):
            if video.ndim != 4:
                raise ValueError(f"a video array must be [T, H, W, C], got shape {video.shape}")
            if len(video) == 0:
                raise ValueError("the video has zero frames")
            out.append(list(video))
        elif isinstance(video, (list, tuple)):
            if len(video) == 0:
                raise ValueError("the video has zero frames")
            out.append([load_image(f, exif_transpose=True) for f in video])
        else:
            raise ValueError(f"unsupported video input of type {type(video).__name__}: expected a path, an array "
                             "[T, H, W, C] or a list of frames")
    return out


# ================================================================================================ chat template
class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body. TF457's `AssistantTracker` also records the
    character span for assistant masks; the rendered text is the same."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # TF457 overrides jinja's `tojson` (which HTML-escapes) with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """TF457 `_compile_jinja_template`: an immutable sandbox with trim_blocks/lstrip_blocks, loop controls,
    `{% generation %}`, the `tojson` override and the `raise_exception` / `strftime_now` globals."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _is_batched_conversation(conversation: Any) -> bool:
    return isinstance(conversation, (list, tuple)) and bool(conversation) and isinstance(conversation[0],
                                                                                         (list, tuple))


def render_chat_template(template: str, conversations: list[list[dict]], *, add_generation_prompt: bool = False,
                         continue_final_message: bool = False, tools: list[dict] | None = None,
                         documents: list[dict] | None = None, **template_kwargs: Any) -> list[str]:
    """TF457 `render_jinja_template` for a list of conversations (one rendered string each)."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt are not compatible")
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise ValueError("tools must be given as JSON-schema dicts")
    if documents is not None and not all(isinstance(d, dict) for d in documents):
        raise ValueError("documents must be a list of dicts with 'title' and 'text' keys")
    compiled = compile_chat_template(template)
    tag = "CONTINUE_FINAL_MESSAGE_TAG "
    rendered = []
    for chat in conversations:
        if not isinstance(chat, (list, tuple)) or not all(isinstance(m, dict) for m in chat):
            raise ValueError("a conversation must be a list of message dicts with 'role' and 'content'")
        final_text = None
        if continue_final_message:  # TF457: mark the end of the last text so the closing tokens can be cut
            chat = deepcopy(list(chat))
            final = chat[-1]["content"]
            if isinstance(final, (list, tuple)):
                for block in reversed(final):
                    if "text" in block:
                        final_text = block["text"]
                        block["text"] = block["text"] + tag
                        break
                else:
                    raise ValueError("continue_final_message is set but the final message has no text to continue")
            else:
                final_text = final
                chat[-1]["content"] = final + tag
        text = compiled.render(messages=chat, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **template_kwargs)
        if continue_final_message:
            if final_text.strip() not in text or tag.strip() not in text:
                raise ValueError("continue_final_message is set but the final message does not appear in the "
                                 "rendered chat")
            cut = text.rindex(tag.strip())
            text = text[:cut] if text[cut:cut + len(tag)] == tag else text[:cut].rstrip()
        rendered.append(text)
    return rendered


# ================================================================================================ tokenizer
def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json: a string, null, or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _clean_up_tokenization(text: str) -> str:
    """TF457 `PreTrainedTokenizerBase.clean_up_tokenization` (only used if the config asks for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _as_id_list(ids: Any) -> list[int]:
    if isinstance(ids, (int, np.integer)):
        return [int(ids)]
    return [int(i) for i in np.asarray(ids).reshape(-1).tolist()]


class Qwen2Tokenizer:
    """`Qwen2TokenizerFast` on a `tokenizers.Tokenizer`: byte-level BPE from tokenizer.json, no BOS, left padding.

    Special tokens and padding side come from tokenizer_config.json (Qwen2-VL-Instruct values when absent):
    eos `<|im_end|>`, pad `<|endoftext|>`, no bos/unk, padding_side "left".
    """

    def __init__(self, backend: Tokenizer, *, eos_token: str | None = "<|im_end|>",
                 pad_token: str | None = "<|endoftext|>", bos_token: str | None = None, unk_token: str | None = None,
                 additional_special_tokens: Iterable[str] = INSTRUCT_ADDITIONAL_SPECIAL_TOKENS,
                 padding_side: str = "left", model_max_length: int = 32768,
                 clean_up_tokenization_spaces: bool = False, chat_template: str | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self._backend = backend
        self._backend.no_padding()  # TF457 sets padding/truncation per call; plain calls use neither
        self._backend.no_truncation()
        self.eos_token, self.pad_token, self.bos_token, self.unk_token = eos_token, pad_token, bos_token, unk_token
        self.additional_special_tokens = list(additional_special_tokens)
        for token in [eos_token, pad_token, bos_token, unk_token, *self.additional_special_tokens]:
            if token is not None and backend.token_to_id(token) is None:  # TF457 adds missing special tokens
                backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        self.padding_side = padding_side
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.chat_template = chat_template

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> Qwen2Tokenizer:
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found: the checkpoint directory must contain the "
                                    "tokenizer's tokenizer.json")
        backend = Tokenizer.from_file(str(tokenizer_file))
        config = _read_json(path / "tokenizer_config.json") or {}
        for token_id, spec in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
            content = spec.get("content")
            if content is None or backend.token_to_id(content) is not None:
                continue
            token = AddedToken(content, single_word=spec.get("single_word", False), lstrip=spec.get("lstrip", False),
                               rstrip=spec.get("rstrip", False), normalized=spec.get("normalized", False),
                               special=spec.get("special", False))
            (backend.add_special_tokens if spec.get("special", False) else backend.add_tokens)([token])
            if backend.token_to_id(content) != int(token_id):
                raise ValueError(f"added token {content!r} got id {backend.token_to_id(content)}, the config says "
                                 f"{token_id}")
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        kwargs: dict[str, Any] = {}
        for key in ("eos_token", "pad_token", "bos_token", "unk_token"):
            if key in config:
                kwargs[key] = _token_content(config[key])
        if "additional_special_tokens" in config:
            kwargs["additional_special_tokens"] = [_token_content(t) for t in config["additional_special_tokens"]
                                                   or []]
        for key in ("padding_side", "model_max_length", "clean_up_tokenization_spaces"):
            if key in config:
                kwargs[key] = config[key]
        template = config.get("chat_template")
        kwargs["chat_template"] = _named_template(template) if template is not None else None
        kwargs.update(overrides)
        return cls(backend, **kwargs)

    # --------------------------------------------------------------------------------------------- vocabulary
    @property
    def backend(self) -> Tokenizer:
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Base vocabulary without added tokens (151643 for Qwen2), like HF's `vocab_size`; `len()` counts all."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self._backend.token_to_id(tokens)
        return [self._backend.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | None | list[str | None]:
        if isinstance(ids, (int, np.integer)):
            return self._backend.id_to_token(int(ids))
        return [self._backend.id_to_token(int(i)) for i in ids]

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        """TF457 `special_tokens_map`: the set special-token attributes (passed to chat templates)."""
        out: dict[str, Any] = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.additional_special_tokens:
            out["additional_special_tokens"] = list(self.additional_special_tokens)
        return out

    @property
    def all_special_ids(self) -> list[int]:
        tokens = [t for t in (self.bos_token, self.eos_token, self.unk_token, self.pad_token) if t]
        tokens += [t for t in self.additional_special_tokens if t not in tokens]
        return [self._backend.token_to_id(t) for t in tokens]

    # --------------------------------------------------------------------------------------------- encoding
    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one string; special tokens written in the text (`<|im_start|>`...) map to their ids."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def pad(self, sequences: list[list[int]], *, padding: bool | str = True, max_length: int | None = None,
            padding_side: str | None = None) -> tuple[list[list[int]], list[list[int]]]:
        """Pad id lists with `pad_token_id` on `padding_side` -> (ids, attention_mask) as lists."""
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if padding in (False, None, "do_not_pad"):
            return [list(s) for s in sequences], [[1] * len(s) for s in sequences]
        if padding in (True, "longest"):
            target = max((len(s) for s in sequences), default=0)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs `max_length`")
            longest = max((len(s) for s in sequences), default=0)
            if longest > max_length:
                raise ValueError(f"a sequence has {longest} tokens, more than max_length={max_length} (truncation is "
                                 "not supported: it would cut vision tokens)")
            target = max_length
        else:
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if self.pad_token_id is None and any(len(s) < target for s in sequences):
            raise ValueError("padding needs a pad token, but the tokenizer has none")
        ids, mask = [], []
        for s in sequences:
            n_pad = target - len(s)
            fill, zeros, ones = [self.pad_token_id] * n_pad, [0] * n_pad, [1] * len(s)
            ids.append(fill + list(s) if side == "left" else list(s) + fill)
            mask.append(zeros + ones if side == "left" else ones + zeros)
        return ids, mask

    def __call__(self, text: str | Sequence[str], *, padding: bool | str = False, max_length: int | None = None,
                 padding_side: str | None = None, add_special_tokens: bool = True, return_tensors: str | None = None,
                 return_attention_mask: bool = True) -> BatchFeature:
        """TF457 `tokenizer(text, ...)` -> {"input_ids", "attention_mask"}; "np" gives int64 arrays [B, L]."""
        if return_tensors not in ("np", None):
            raise ValueError(f"return_tensors must be 'np' or None, got {return_tensors!r}")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a list of strings")
        encoded = [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        ids, mask = self.pad(encoded, padding=padding, max_length=max_length, padding_side=padding_side)
        out = BatchFeature()
        if return_tensors == "np":
            if len({len(s) for s in ids}) > 1:
                raise ValueError("sequences have different lengths; pass padding=True to batch them into an array")
            out["input_ids"] = np.array(ids, dtype=np.int64).reshape(len(ids), -1)
            if return_attention_mask:
                out["attention_mask"] = np.array(mask, dtype=np.int64).reshape(len(ids), -1)
        else:
            out["input_ids"] = ids[0] if single else ids
            if return_attention_mask:
                out["attention_mask"] = mask[0] if single else mask
        return out

    # --------------------------------------------------------------------------------------------- decoding
    def decode(self, ids: Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """TF457 `PreTrainedTokenizerFast._decode`: the byte-level decoder, optional clean-up (off for Qwen2)."""
        text = self._backend.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else \
            clean_up_tokenization_spaces
        return _clean_up_tokenization(text) if clean else text

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences]

    # --------------------------------------------------------------------------------------------- chat
    def apply_chat_template(self, conversation: list[dict] | list[list[dict]], *, add_generation_prompt: bool = False,
                            tokenize: bool = True, chat_template: str | None = None,
                            continue_final_message: bool = False, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, padding: bool | str = False,
                            return_tensors: str | None = None, return_dict: bool = False, **kwargs: Any):
        """TF457 `PreTrainedTokenizerBase.apply_chat_template` (same defaults: tokenize=True, no generation
        prompt). Template variables: the messages, `add_generation_prompt`, `tools`, `documents`, the special
        tokens map, and any extra keyword (e.g. `add_vision_id=True`)."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("the tokenizer has no chat template; pass `chat_template=`")
        batched = _is_batched_conversation(conversation)
        rendered = render_chat_template(template, conversation if batched else [conversation],
                                        add_generation_prompt=add_generation_prompt,
                                        continue_final_message=continue_final_message, tools=tools,
                                        documents=documents, **{**self.special_tokens_map, **kwargs})
        text = rendered if batched else rendered[0]
        if not tokenize:
            return text
        out = self(text, padding=padding, add_special_tokens=False, return_tensors=return_tensors)
        return out if return_dict else out["input_ids"]


def _named_template(template: Any) -> str:
    """A chat template given as a string, or as HF's list of {"name", "template"} (the "default" one is used)."""
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
    if isinstance(template, dict) and "default" in template:
        return template["default"]
    raise ValueError("a chat template must be a string or contain a template named 'default'")


# ================================================================================================ processor
_PROCESSOR_ONLY_KEYS = ("padding_side", "chat_template", "video_min_pixels", "video_max_pixels", "video_size")


class Qwen2VLProcessor:
    """TF457 `Qwen2VLProcessor`: tokenizer + image processor + video processor + chat template.

    >>> proc = Qwen2VLProcessor.from_pretrained(checkpoint_dir)
    >>> prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
    ...                                     {"type": "text", "text": "Describe."}]}])
    >>> batch = proc(text=prompt, images=[photo])   # input_ids, attention_mask, pixel_values, image_grid_thw
    """

    def __init__(self, image_processor: Qwen2VLImageProcessor, tokenizer: Qwen2Tokenizer,
                 video_processor: Qwen2VLImageProcessor | None = None, chat_template: str | None = None):
        self.image_processor = image_processor
        self.video_processor = video_processor if video_processor is not None else image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template if chat_template is not None else (
            tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE)
        self.image_token, self.video_token = IMAGE_TOKEN, VIDEO_TOKEN
        for token in (IMAGE_TOKEN, VIDEO_TOKEN, VISION_START_TOKEN, VISION_END_TOKEN):
            if tokenizer.convert_tokens_to_ids(token) is None:
                raise ValueError(f"the tokenizer has no {token} token; is this a Qwen2-VL tokenizer?")
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(VISION_START_TOKEN)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(VISION_END_TOKEN)

    model_input_names = ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                         "video_grid_thw"]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, local_files_only: bool | None = None,
                        revision: str | None = None, **overrides: Any) -> Qwen2VLProcessor:
        """Load from a checkpoint directory or a Hugging Face Hub model id (only the small files are fetched;
        `local_files_only` / HF_HUB_OFFLINE keep it offline).

        Files: `tokenizer.json` (required), `tokenizer_config.json`, `preprocessor_config.json`,
        `video_preprocessor_config.json` (videos; TF457 falls back to preprocessor_config.json), and the chat
        template from `chat_template.jinja`, else `chat_template.json`, else tokenizer_config's `chat_template`,
        else the Qwen2-VL-Instruct template. Absent files mean Qwen2-VL-Instruct values (pixels 3136..12845056).

        Overrides: image-processor options (`min_pixels`, `max_pixels`, `size`, `patch_size`, ...) apply to
        images and videos, as TF457 hands `from_pretrained` kwargs to both sub-processors (and, unlike TF457, are
        always honoured); `video_min_pixels` / `video_max_pixels` / `video_size` apply to videos only;
        `padding_side` and `chat_template` configure the text side.
        """
        path = resolve_source(path, local_files_only=local_files_only, revision=revision, patterns=PROCESSOR_PATTERNS)
        unknown = sorted(set(overrides) - set(_IMAGE_PROCESSOR_KEYS) - set(_PROCESSOR_ONLY_KEYS))
        if unknown:
            raise ValueError(f"unknown Qwen2VLProcessor.from_pretrained option(s): {', '.join(unknown)}")
        image_overrides = {k: v for k, v in overrides.items() if k in _IMAGE_PROCESSOR_KEYS and v is not None}
        video_overrides = dict(image_overrides)
        for key in ("min_pixels", "max_pixels", "size"):
            if overrides.get(f"video_{key}") is not None:
                video_overrides[key] = overrides[f"video_{key}"]

        instruct = {"min_pixels": INSTRUCT_MIN_PIXELS, "max_pixels": INSTRUCT_MAX_PIXELS}
        image_config = _read_json(path / "preprocessor_config.json")
        video_config = _read_json(path / "video_preprocessor_config.json")
        image_config = instruct if image_config is None else image_config
        video_config = image_config if video_config is None else video_config
        image_config = image_config.get("image_processor", image_config)  # nested processor_config layouts
        video_config = video_config.get("video_processor", video_config)
        image_processor = Qwen2VLImageProcessor.from_dict(image_config, **image_overrides)
        video_processor = Qwen2VLImageProcessor.from_dict(video_config, **video_overrides)

        tokenizer_kwargs = {"padding_side": overrides["padding_side"]} if overrides.get("padding_side") else {}
        tokenizer = Qwen2Tokenizer.from_pretrained(path, **tokenizer_kwargs)
        template = overrides.get("chat_template")
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if template is None and (path / "chat_template.json").is_file():
            template = _named_template(_read_json(path / "chat_template.json").get("chat_template"))
        if template is None:
            template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        return cls(image_processor, tokenizer, video_processor, chat_template=template)

    # --------------------------------------------------------------------------------------------- chat
    def apply_chat_template(self, conversation: list[dict] | list[list[dict]], add_generation_prompt: bool = True,
                            tokenize: bool = False, add_vision_id: bool = False, *,
                            chat_template: str | None = None, continue_final_message: bool = False,
                            return_dict: bool = False, return_tensors: str | None = "np", padding: bool | str = True,
                            **kwargs: Any):
        """Render messages with the chat template, exactly like HF's `apply_chat_template`.

        Messages: `{"role": ..., "content": str | [{"type": "image"|"video"|"text", ...}]}`. With `tokenize=True`
        the prompt is encoded; if content items carry media (`"image"`/`"url"`/`"path"`/`"base64"` on image
        items, `"video"`/`"url"`/`"path"` on video items, as TF457 collects them), the processor is run on them
        and placeholders are expanded. Returns the ids (or the whole dict with `return_dict=True`).
        """
        batched = _is_batched_conversation(conversation)
        conversations = conversation if batched else [conversation]
        rendered = render_chat_template(chat_template or self.chat_template, conversations,
                                        add_generation_prompt=add_generation_prompt,
                                        continue_final_message=continue_final_message,
                                        **{**self.tokenizer.special_tokens_map, **kwargs,
                                           "add_vision_id": add_vision_id})
        text = rendered if batched else rendered[0]
        if not tokenize:
            return text
        images, videos = [], []
        for chat in conversations:
            for message in chat:
                content = message.get("content")
                if not isinstance(content, list):
                    continue
                for item in content:
                    if item.get("type") == "image":
                        images += [item[k] for k in ("image", "url", "path", "base64") if k in item]
                    elif item.get("type") == "video":
                        videos += [item[k] for k in ("video", "url", "path") if k in item]
        if images or videos:
            out = self(text=rendered, images=images or None, videos=videos or None, padding=padding,
                       return_tensors=return_tensors)
        else:
            out = self.tokenizer(rendered, padding=padding, add_special_tokens=False, return_tensors=return_tensors)
        return out if return_dict else out["input_ids"]

    # --------------------------------------------------------------------------------------------- call
    def __call__(self, text: str | Sequence[str] | None = None, images: Any = None, videos: Any = None, *,
                 padding: bool | str = True, max_length: int | None = None, padding_side: str | None = None,
                 return_tensors: str | None = "np", add_special_tokens: bool = True,
                 return_mm_token_type_ids: bool = False, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> BatchFeature:
        """TF457 `Qwen2VLProcessor.__call__`.

        `text`: a prompt or a list of prompts containing one `<|image_pad|>` per image and one `<|video_pad|>` per
        video (the chat template writes them). `images` / `videos`: flat lists over the whole batch in prompt
        order (a single image or video may be passed bare). Returns, in HF's key order: `input_ids`,
        `attention_mask` (int64 [B, L], left padded per the tokenizer config), `pixel_values`, `image_grid_thw`,
        `pixel_values_videos`, `video_grid_thw`. `min_pixels`/`max_pixels` override the pixel bounds of this call.
        """
        if return_tensors not in ("np", None):
            raise ValueError(f"return_tensors must be 'np' or None, got {return_tensors!r}")
        # Load every input once and check the placeholder counts before the (expensive) pixel work.
        image_list = _flat_image_list(images) if images is not None else []
        video_list = _video_list(videos) if videos is not None else []
        texts = None
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a list of strings")
            for token, n_given, kind in ((IMAGE_TOKEN, len(image_list), "image"),
                                         (VIDEO_TOKEN, len(video_list), "video")):
                n_found = sum(t.count(token) for t in texts)
                if n_found != n_given:
                    raise ValueError(f"{n_given} {kind}(s) given but the text has {n_found} {token} placeholder(s); "
                                     f"each {kind} needs exactly one placeholder (the chat template writes them)")

        vision = BatchFeature()
        if image_list:
            vision.update(self.image_processor(images=image_list, min_pixels=min_pixels, max_pixels=max_pixels))
        if video_list:
            vision.update(self.video_processor(videos=video_list, min_pixels=min_pixels, max_pixels=max_pixels))
        if texts is None:
            return vision

        if image_list:
            texts = _expand(texts, IMAGE_TOKEN, vision["image_grid_thw"], self.image_processor.merge_size)
        if video_list:
            texts = _expand(texts, VIDEO_TOKEN, vision["video_grid_thw"], self.video_processor.merge_size)
        out = self.tokenizer(texts, padding=padding, max_length=max_length, padding_side=padding_side,
                             add_special_tokens=add_special_tokens, return_tensors=return_tensors)
        if return_mm_token_type_ids:  # TF457 marks image tokens only (TF5 also marks video tokens with 2)
            ids = out["input_ids"]
            marks = [[int(i == self.image_token_id) for i in row] for row in (ids.tolist() if return_tensors else ids)]
            out["mm_token_type_ids"] = np.array(marks, dtype=np.int64) if return_tensors else marks
        out.update(vision)
        return out

    # --------------------------------------------------------------------------------------------- decode
    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        """Decode a batch of id sequences (special tokens skipped by default, as in HF's generation post-
        processing `post_process_image_text_to_text`; the tokenizer's own default is to keep them)."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens, clean_up_tokenization_spaces)

    def decode(self, ids: Any, skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens, clean_up_tokenization_spaces)


def _expand(texts: list[str], token: str, grid_thw: np.ndarray, merge_size: int) -> list[str]:
    """TF457 `__call__`: each `token` becomes prod(grid_thw[k]) // merge_size**2 copies, grids taken in order
    across the whole batch (TF457 goes through a temporary `<|placeholder|>`; splitting gives the same text)."""
    counts = iter((np.prod(grid_thw, axis=1) // merge_size**2).tolist())
    out = []
    for text in texts:
        pieces = text.split(token)
        out.append(pieces[0] + "".join(token * next(counts) + piece for piece in pieces[1:]))
    return out
