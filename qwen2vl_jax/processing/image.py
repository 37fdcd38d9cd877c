"""The Qwen2-VL image processor: images and frame stacks -> `pixel_values` rows and `*_grid_thw`.

Mirrors transformers 4.57's *slow* (PIL) processor, models/qwen2_vl/image_processing_qwen2_vl.py
`Qwen2VLImageProcessor`, bit for bit: `convert_to_rgb` -> `smart_resize` -> Pillow BICUBIC resize through a uint8
image (image_transforms.py `resize`) -> `rescale` (x 1/255, float64 then float32) -> `normalize` (CLIP mean/std,
float32) -> pad frames to the temporal patch size -> `patchify` into rows of C*T*P*P = 1176 in merge-block order.

`smart_resize` here is HF's; qwen-vl-utils' variant is `qwen2vl_jax.processing.image_io.qvu_smart_resize`.
NumPy and Pillow only: no JAX, no torch, no transformers, no model code.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from .image_io import load_image
from .tokenizer import BatchFeature
from .video import fetch_video

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "smart_resize",
    "convert_to_rgb",
    "patchify",
    "Qwen2VLImageProcessor",
]

# transformers 4.57 utils/constants.py `OPENAI_CLIP_MEAN` / `OPENAI_CLIP_STD`.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """HF's `smart_resize` (transformers 4.57 models/qwen2_vl/image_processing_qwen2_vl.py `smart_resize`): both
    sides multiples of `factor`, the area in [min_pixels, max_pixels], the aspect ratio kept as closely as possible.
    Python `round` (half to even), as HF. qwen-vl-utils' variant, used for its video frames, is
    `qwen2vl_jax.processing.image_io.qvu_smart_resize`.

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
    """transformers 4.57 image_transforms.py `convert_to_rgb`: a PIL image not in RGB mode goes through
    `image.convert("RGB")`.

    That is Pillow's plain conversion, with no compositing: RGBA/LA/PA drop alpha (the colour under a transparent
    pixel is kept, not replaced by white), P maps through the palette (transparency ignored), CMYK/I;16/I/F/1/L use
    Pillow's converters. Arrays are returned unchanged, as in HF.
    """
    if isinstance(image, Image.Image) and image.mode != "RGB":
        return image.convert("RGB")
    return image


def _as_hwc(array: np.ndarray) -> np.ndarray:
    """An image array as [H, W, 3]: channels located like transformers 4.57 image_utils.py
    `infer_channel_dimension_format` (first axis if it has 1 or 3 entries, else last). HF fails on grey or RGBA
    arrays; here grey is replicated and alpha dropped, which is what HF's `convert_to_rgb` does to the same image
    given as PIL."""
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
    """transformers 4.57 image_transforms.py `_rescale_for_pil_conversion`: does a float array need x255 before
    becoming uint8?"""
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
    """transformers 4.57 image_transforms.py `resize`: through a uint8 PIL image, Pillow `resize`, back to an HWC
    array.

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
    """Frames [F, H, W, C] -> (rows [t*h*w, C*T*P*P], (t, h, w)) in transformers' layout
    (models/qwen2_vl/image_processing_qwen2_vl.py `Qwen2VLImageProcessor._preprocess`).

    Frames are padded to a multiple of T with copies of the last one (an image becomes T identical frames). Rows
    run over (t, block_row, block_col, row_in_block, col_in_block); each row is ordered (C, T, ph, pw). HF
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


IMAGE_PROCESSOR_KEYS = ("min_pixels", "max_pixels", "size", "patch_size", "temporal_patch_size", "merge_size",
                         "image_mean", "image_std", "rescale_factor", "resample", "do_resize", "do_rescale",
                         "do_normalize", "do_convert_rgb")


class Qwen2VLImageProcessor:
    """transformers 4.57's slow `Qwen2VLImageProcessor` (models/qwen2_vl/image_processing_qwen2_vl.py): images
    (and, through `videos=`, frame stacks) -> `pixel_values` rows.

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
        for name, value in (("patch_size", patch_size), ("temporal_patch_size", temporal_patch_size),
                            ("merge_size", merge_size)):
            _check_positive_int(name, value)
        check_pixel_bounds(min_pixels, max_pixels)
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
        both forms are honoured, including as overrides (transformers 4.57 drops a valid `size` in `__init__` and
        its fast processor ignores `max_pixels=` given to `from_pretrained`: transformers #41955).
        """
        unknown = sorted(set(overrides) - set(IMAGE_PROCESSOR_KEYS))
        if unknown:
            raise ValueError(f"unknown image processor option(s): {', '.join(unknown)}")
        merged = {k: v for k, v in (config or {}).items() if k in IMAGE_PROCESSOR_KEYS}
        if "size" in overrides:
            merged.pop("min_pixels", None)
            merged.pop("max_pixels", None)
        merged.update({k: v for k, v in overrides.items() if v is not None})
        size = merged.pop("size", None) or {}
        if not isinstance(size, dict):
            raise ValueError(f"`size` must be a dict with shortest_edge/longest_edge, got {size!r}")
        min_pixels = merged.pop("min_pixels", None)  # `is None`, not `or`: an explicit 0 must fail, not fall back
        min_pixels = size.get("shortest_edge", size.get("min_pixels")) if min_pixels is None else min_pixels
        max_pixels = merged.pop("max_pixels", None)
        max_pixels = size.get("longest_edge", size.get("max_pixels")) if max_pixels is None else max_pixels
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
        """transformers 4.57 image_transforms.py `rescale` then `normalize`, in HF's arithmetic order and dtypes
        (channels last)."""
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)  # image_transforms.rescale
        if self.do_normalize:
            if not np.issubdtype(x.dtype, np.floating):  # image_transforms.normalize casts integers to float32
                x = x.astype(np.float32)
            x = (x - np.array(self.image_mean, dtype=x.dtype)) / np.array(self.image_std, dtype=x.dtype)
        return x

    def _preprocess(self, frames: list, min_pixels: int, max_pixels: int
                    ) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image (a 1-frame list) or one video (its frames) -> (rows, grid): transformers 4.57
        models/qwen2_vl/image_processing_qwen2_vl.py `Qwen2VLImageProcessor._preprocess`."""
        if self.do_convert_rgb:
            frames = [convert_to_rgb(f) for f in frames]
        frames = [f if isinstance(f, Image.Image) and f.mode == "RGB" else
                  _as_hwc(np.asarray(f)) for f in frames]
        first = frames[0]
        height, width = (first.size[1], first.size[0]) if isinstance(first, Image.Image) else first.shape[:2]
        if self.do_resize:  # HF sizes every frame from the first one
            height, width = self.smart_resize(height, width, min_pixels, max_pixels)
            arrays = [_resize_like_hf(f, height, width, self.resample) for f in frames]
        else:
            arrays = [np.asarray(f) for f in frames]
            if any(a.shape[:2] != (height, width) for a in arrays):
                raise ValueError("with do_resize=False all frames of a video must have the same size")
        stack_fhwc = np.stack(arrays)
        if self.do_rescale and np.issubdtype(stack_fhwc.dtype, np.floating) and stack_fhwc.max() <= 1:
            warnings.warn("It looks like you are trying to rescale already rescaled images (transformers 4.57 warns "
                          "the same and rescales again). If the input images have pixel values between 0 and 1, set "
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
        `qwen2vl_jax.processing.video.fetch_video`). Rows of all inputs are concatenated in order, as in HF.
        """
        if return_tensors not in ("np", None):
            raise ValueError(f"return_tensors must be 'np' or None, got {return_tensors!r}")
        min_pixels = self.min_pixels if min_pixels is None else min_pixels
        max_pixels = self.max_pixels if max_pixels is None else max_pixels
        check_pixel_bounds(min_pixels, max_pixels)
        data = BatchFeature()
        if images is not None:
            image_list = flat_image_list(images)
            if image_list:
                rows, grids = zip(*(self._preprocess([img], min_pixels, max_pixels) for img in image_list))
                data["pixel_values"] = rows[0] if len(rows) == 1 else np.concatenate(rows)
                data["image_grid_thw"] = np.array(grids, dtype=np.int64)
        if videos is not None:
            video_list = as_video_list(videos)
            if video_list:
                rows, grids = zip(*(self._preprocess(v, min_pixels, max_pixels) for v in video_list))
                data["pixel_values_videos"] = rows[0] if len(rows) == 1 else np.concatenate(rows)
                data["video_grid_thw"] = np.array(grids, dtype=np.int64)
        return data

    preprocess = __call__


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")


def check_pixel_bounds(min_pixels: Any, max_pixels: Any) -> None:
    """Both bounds positive integers with min <= max (`smart_resize` divides by them: 0 would be a raw
    ZeroDivisionError)."""
    _check_positive_int("min_pixels", min_pixels)
    _check_positive_int("max_pixels", max_pixels)
    if min_pixels > max_pixels:
        raise ValueError(f"`min_pixels` ({min_pixels}) must not exceed `max_pixels` ({max_pixels})")


def _is_image(x: Any) -> bool:
    return isinstance(x, (Image.Image, str, os.PathLike, bytes, bytearray, memoryview)) or (
        isinstance(x, np.ndarray) and x.ndim in (2, 3))


def flat_image_list(images: Any) -> list:
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


def as_video_list(videos: Any) -> list[list]:
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
