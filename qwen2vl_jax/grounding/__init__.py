"""Grounding: the boxes in an answer, in either family's convention, and the original image's pixels.

Qwen2-VL writes `<|object_ref_start|>cat<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>` on a 0-1000 grid
of the image; Qwen2.5-VL writes JSON (`[{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}]`, usually in a ```json fence)
in pixels of the *resized* model input (the processor's `smart_resize`). Boxes here are always in the original
image's pixels; the family and the processor's pixel bounds say how to get there.

    formats.py  parse_boxes (both syntaxes, problems reported, never guessed at) and format_boxes (fine-tuning
                targets in either convention)
    coords.py   the two conventions <-> original pixels through the resize (to_model / from_model), the family and
                bounds of a processor (settings_for)
    draw.py     draw_boxes: the boxes and their labels on a copy of the image, nothing else changed

    >>> boxes = parse_boxes(answer, family="qwen2_5_vl", image_size=photo.size)
    >>> boxes[0].label, boxes[0].xyxy, boxes.problems
    >>> draw_boxes(photo, boxes).save("boxes.png")

No JAX (nor NumPy of its own): Pillow, the standard library and `qwen2vl_jax.processing` (its `smart_resize`).
"""

from .coords import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    FAMILIES,
    from_model,
    model_frame,
    resized_size,
    settings_for,
    to_model,
)
from .draw import draw_boxes
from .formats import (
    PROBLEM_KINDS,
    Box,
    Boxes,
    GroundingError,
    Point,
    Problem,
    format_boxes,
    has_boxes,
    parse_boxes,
)

__all__ = ["Box", "Boxes", "DEFAULT_MAX_PIXELS", "DEFAULT_MIN_PIXELS", "FAMILIES", "GroundingError",
           "PROBLEM_KINDS", "Point", "Problem", "draw_boxes", "format_boxes", "from_model", "has_boxes",
           "model_frame", "parse_boxes", "resized_size", "settings_for", "to_model"]
