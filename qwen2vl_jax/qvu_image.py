"""qwen-vl-utils 0.0.8 ("QVU8"), image side: its pixel bounds, its `smart_resize` rule and `fetch_image`.

Qwen2-VL's README prepares inputs for the HF processor with qwen-vl-utils (`qwen_vl_utils/vision_process.py`),
whose sizing differs from the HF image processor's. This module ports the sizing rule, as `qvu_smart_resize` (HF's
rule is `qwen2vl_jax.image_processing.smart_resize`), and `fetch_image` with NumPy + Pillow only. The video side
is video.py; the chat-message walker (`process_vision_info`) is vision_info.py.
"""

from __future__ import annotations

import math
from typing import Any

from PIL import Image

from .image_io import load_image, to_pil_rgb

__all__ = [
    "IMAGE_FACTOR",
    "MIN_PIXELS",
    "MAX_PIXELS",
    "MAX_RATIO",
    "round_by_factor",
    "ceil_by_factor",
    "floor_by_factor",
    "qvu_smart_resize",
    "fetch_image",
]

# QVU8 vision_process.py constants (the image ones; the video ones are in video.py).
IMAGE_FACTOR = 28
MIN_PIXELS = 4 * 28 * 28
MAX_PIXELS = 16384 * 28 * 28
MAX_RATIO = 200


# ------------------------------------------------------------------------------------------------ sizing rules
def round_by_factor(number: float, factor: int) -> int:
    """The multiple of `factor` closest to `number` (Python `round`: halves go to the even multiple)."""
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def qvu_smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = MIN_PIXELS,
                     max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """qwen-vl-utils' `smart_resize`: mirrors qwen_vl_utils 0.0.8 `vision_process.smart_resize`.

    It is not HF's rule (`qwen2vl_jax.image_processing.smart_resize`, transformers
    models/qwen2_vl/image_processing_qwen2_vl.py `smart_resize`), which the image processor applies. Two
    differences: here the first rounding is clamped to at least `factor`, and the down-scale branch has no
    `max(factor, .)`. For thin inputs they disagree: (10, 500) -> HF (28, 420), here (28, 504); and with a small
    `max_pixels` a very thin side can floor to 0 here where HF keeps `factor`.
    """
    if min(height, width) <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(
            f"absolute aspect ratio must be smaller than {MAX_RATIO}, got {max(height, width) / min(height, width)}"
        )
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = floor_by_factor(height / beta, factor)
        w_bar = floor_by_factor(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    return h_bar, w_bar


def fetch_image(source: Any, *, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
                resized_height: int | None = None, resized_width: int | None = None,
                size_factor: int = IMAGE_FACTOR) -> Image.Image:
    """QVU8 `fetch_image`: open, convert to RGB, resize (Pillow BICUBIC) to the `qvu_smart_resize` size.

    With `resized_height`/`resized_width` those are snapped by `qvu_smart_resize` with the default pixel bounds, as in
    QVU8. Pillow's default filter for an RGB `resize` is BICUBIC; it is passed explicitly here.
    """
    image = to_pil_rgb(load_image(source))
    if resized_height is not None and resized_width is not None:
        height, width = qvu_smart_resize(resized_height, resized_width, factor=size_factor)
    else:
        width, height = image.size
        height, width = qvu_smart_resize(height, width, factor=size_factor, min_pixels=min_pixels,
                                     max_pixels=max_pixels)
    return image.resize((width, height), resample=Image.Resampling.BICUBIC)
