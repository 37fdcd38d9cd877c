"""Box coordinates: each family's convention <-> the original image's pixels, through the processor's resize.

Pixels here are continuous: (0, 0) is the top-left corner of the top-left pixel and (W, H) the bottom-right corner
of the bottom-right pixel, so the whole image is the box (0, 0, W, H). `image_size` is (width, height), as PIL's
`Image.size`; the processor's `smart_resize` takes and returns (height, width).

    qwen2_vl    a 0-1000 grid over the image: x_model = x / W * 1000, y_model = y / H * 1000 (Qwen2-VL's README and
                cookbooks: "normalized to [0, 1000)"; the right / bottom edge itself is 1000)
    qwen2_5_vl  absolute pixels of the resized model input: (W', H') = smart_resize(H, W) (sides multiples of 28,
                the area within min_pixels..max_pixels), x_model = x * W' / W, y_model = y * H' / H (the Qwen team
                in QwenLM/Qwen2.5-VL #721: `new_bbox = bbox / [w, h, w, h] * [resized_w, resized_h, ...]`)

Original or resized image for Qwen2-VL's 0-1000 grid? The same number: the resize maps the frame [0, W] onto
[0, W'] linearly (Pillow resizes edge to edge), so x / W * 1000 == (x * W' / W) / W' * 1000 exactly. They differ
only if a position is first rounded to whole resized pixels (by < 500 / W' units). So the grid is taken over the
original image, as Qwen2-VL's README says, and neither the resize nor the pixel bounds enter it.

Writing a position on a grid rounds half up (floor(v + 0.5)), never truncates: `int(x / W * 1000)`, as some
fine-tuning scripts write, moves every box up and left by half a grid step on average, a bias the model learns. The
grid's step bounds how exactly a box survives a round trip: W / 1000 original pixels for qwen2_vl (so within half
that: 1 px up to W = 2000), W / W' for qwen2_5_vl (about 1 px, more where max_pixels shrank the image).

The pixel bounds default to the released checkpoints' (Qwen2-VL and Qwen2.5-VL `*-Instruct`
preprocessor_config.json: 56*56 .. 28*28*16384, `processing.processor.INSTRUCT_*_PIXELS`, what
`Qwen2VLProcessor.from_pretrained` uses without the file), not `Qwen2VLImageProcessor`'s class defaults (max
28*28*1280): a box is only right with the bounds the image was encoded with (`settings_for(processor)`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

from ..processing.image import smart_resize
from ..processing.processor import INSTRUCT_MAX_PIXELS, INSTRUCT_MIN_PIXELS

__all__ = ["FAMILIES", "GRID", "DEFAULT_MIN_PIXELS", "DEFAULT_MAX_PIXELS", "check_family", "check_image_size",
           "resized_size", "model_frame", "to_model", "from_model", "settings_for"]

FAMILIES = ("qwen2_vl", "qwen2_5_vl")
GRID = 1000  # Qwen2-VL's normalized grid
FACTOR = 28  # patch_size * merge_size of both families' image processors
DEFAULT_MIN_PIXELS = INSTRUCT_MIN_PIXELS
DEFAULT_MAX_PIXELS = INSTRUCT_MAX_PIXELS


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(map(repr, FAMILIES))}, got {family!r}")
    return family


def check_image_size(image_size: Any) -> tuple[int, int]:
    """(width, height) as two positive ints, or ValueError."""
    try:
        width, height = image_size
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be (width, height), got {image_size!r}") from None
    out = []
    for name, v in (("width", width), ("height", height)):
        try:
            out.append(-1 if isinstance(v, bool) else operator.index(v))
        except TypeError:
            out.append(-1)
        if out[-1] <= 0:
            raise ValueError(f"image_size must be two positive integers (width, height), got {name}={v!r}")
    return out[0], out[1]


def resized_size(image_size: Sequence[int], min_pixels: int | None = None, max_pixels: int | None = None,
                 factor: int = FACTOR) -> tuple[int, int]:
    """The processor's resized (width, height) of an original (width, height): `smart_resize` (transformers 4.57
    models/qwen2_vl/image_processing_qwen2_vl.py `smart_resize`), with the bounds defaulting as above."""
    width, height = check_image_size(image_size)
    h, w = smart_resize(height, width, factor=factor,
                        min_pixels=DEFAULT_MIN_PIXELS if min_pixels is None else min_pixels,
                        max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)
    return w, h


def model_frame(family: str, image_size: Sequence[int], min_pixels: int | None = None,
                max_pixels: int | None = None, factor: int = FACTOR) -> tuple[int, int]:
    """The (width, height) of the family's coordinate frame for this image: (1000, 1000) for qwen2_vl, the resized
    model input for qwen2_5_vl. A valid model coordinate lies in [0, width] x [0, height]."""
    check_family(family)
    if family == "qwen2_vl":
        check_image_size(image_size)
        return GRID, GRID
    return resized_size(image_size, min_pixels, max_pixels, factor)


def _pairs(coords: Sequence[float]) -> list[float]:
    values = [float(v) for v in coords]
    if not values or len(values) % 2:
        raise ValueError(f"coordinates come as x, y pairs (a box's x1, y1, x2, y2 or a point's x, y), got "
                         f"{len(values)} values")
    return values


def from_model(coords: Sequence[float], family: str, image_size: Sequence[int], min_pixels: int | None = None,
               max_pixels: int | None = None, factor: int = FACTOR) -> tuple[float, ...]:
    """Model-convention coordinates (x, y pairs: a box's x1, y1, x2, y2 or a point's x, y) -> original pixels
    (floats): x * W / frame_width, y * H / frame_height."""
    width, height = check_image_size(image_size)
    frame_w, frame_h = model_frame(family, image_size, min_pixels, max_pixels, factor)
    values = _pairs(coords)
    return tuple(v * (width if i % 2 == 0 else height) / (frame_w if i % 2 == 0 else frame_h)
                 for i, v in enumerate(values))


def to_model(coords: Sequence[float], family: str, image_size: Sequence[int], min_pixels: int | None = None,
             max_pixels: int | None = None, factor: int = FACTOR) -> tuple[int, ...]:
    """Original pixels (x, y pairs) -> the family's integer coordinates, rounded half up onto its grid (what the
    model writes and what a fine-tuning target should say)."""
    width, height = check_image_size(image_size)
    frame_w, frame_h = model_frame(family, image_size, min_pixels, max_pixels, factor)
    values = _pairs(coords)
    return tuple(math.floor(v * (frame_w if i % 2 == 0 else frame_h) / (width if i % 2 == 0 else height) + 0.5)
                 for i, v in enumerate(values))


def settings_for(processor: Any) -> dict[str, Any]:
    """{"family", "min_pixels", "max_pixels", "factor"} of a processor (ours or transformers'): pass them on as
    `parse_boxes(text, image_size=..., **settings_for(processor))`. The family is "qwen2_5_vl" for a
    `Qwen2_5_VLProcessor` (by class name, so transformers' counts too), else "qwen2_vl"; the bounds and the patch
    grid are its image processor's."""
    names = {cls.__name__ for cls in type(processor).__mro__}
    image_processor = getattr(processor, "image_processor", processor)
    factor = getattr(image_processor, "patch_size", 14) * getattr(image_processor, "merge_size", 2)
    return {"family": "qwen2_5_vl" if "Qwen2_5_VLProcessor" in names else "qwen2_vl",
            "min_pixels": int(image_processor.min_pixels), "max_pixels": int(image_processor.max_pixels),
            "factor": int(factor)}
