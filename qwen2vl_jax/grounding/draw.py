"""Boxes drawn on the image: `draw_boxes(image, boxes)` -> a new PIL image, the original untouched.

Only two kinds of pixel change, so the drawing can be checked (and trusted over the photo):

    border  the `width` pixels just inside each box's edges. A box (x1, y1, x2, y2) in continuous pixels (coords.py)
            covers the pixel columns round(x1) .. round(x2) - 1 and rows round(y1) .. round(y2) - 1 (rounded half
            up, at least one of each, clipped to the image); the border is ImageDraw.rectangle's outline of that
            range, drawn inward
    label   a filled rectangle of the box's colour, the text's bbox (`ImageDraw.textbbox`) plus LABEL_PAD pixels on
            each side, holding the label in black or white (whichever reads better); its top-left is the box's first
            column and, where it fits, the row just above the box (else the box's first row, inside it), moved left
            as far as needed to stay in the image
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from PIL import Image, ImageColor, ImageDraw, ImageFont

__all__ = ["PALETTE", "LABEL_PAD", "draw_boxes", "box_pixels", "label_rect"]

# Distinct, saturated colours (Tableau 10): one per label, in order of first appearance, when no colour is given.
PALETTE = ("#e15759", "#4e79a7", "#59a14f", "#f28e2b", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7", "#9c755f",
           "#bab0ac")
LABEL_PAD = 2


def _round(v: float) -> int:
    return math.floor(v + 0.5)


def box_pixels(xyxy: Sequence[float], image_size: Sequence[int]) -> tuple[int, int, int, int]:
    """The inclusive pixel range (left, top, right, bottom) a box covers in an image of (width, height)."""
    width, height = image_size
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    left, top = min(max(_round(x1), 0), width - 1), min(max(_round(y1), 0), height - 1)
    right, bottom = min(max(_round(x2) - 1, left), width - 1), min(max(_round(y2) - 1, top), height - 1)
    return left, top, right, bottom


def label_rect(text: str, pixels: Sequence[int], image_size: Sequence[int], font: Any
               ) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """Where a label goes: (its inclusive background rectangle, where its text is drawn) for a box whose
    `box_pixels` are `pixels` (placement in the module docstring)."""
    width, _ = image_size
    left, top, _, _ = pixels
    tl, tt, tr, tb = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    w, h = tr - tl + 2 * LABEL_PAD, tb - tt + 2 * LABEL_PAD
    x = max(0, min(left, width - w))
    y = top - h if top - h >= 0 else top
    return (x, y, x + w - 1, y + h - 1), (x + LABEL_PAD - tl, y + LABEL_PAD - tt)


def _rgb(color: Any) -> tuple[int, int, int]:
    if isinstance(color, str):
        return ImageColor.getrgb(color)[:3]
    r, g, b = (int(c) for c in tuple(color)[:3])
    return r, g, b


def _fields(box: Any) -> tuple[str, Sequence[float]]:
    if hasattr(box, "xyxy"):
        return str(getattr(box, "label", "") or ""), box.xyxy
    label, xyxy = box
    return str(label or ""), xyxy


def draw_boxes(image: Image.Image, boxes: Iterable[Any], *, color: Any = None, width: int = 2, labels: bool = True,
               font: Any = None) -> Image.Image:
    """A copy of `image` with `boxes` (`Box`es or (label, (x1, y1, x2, y2)) pairs, original pixels) drawn on it.

    `color`: one colour for every box (a name, "#rrggbb" or an (r, g, b) tuple), or None: a PALETTE colour per
    label. `width`: the border's thickness in pixels. `labels`: draw each non-empty label (`font`: a PIL font,
    default `ImageFont.load_default()`). RGB and RGBA images keep their mode; others are converted to RGB first.
    Only the border and label pixels differ from the input (module docstring). Points (`Boxes.points`) are not
    drawn.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    out = image.copy() if image.mode in ("RGB", "RGBA") else image.convert("RGB")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default() if font is None and labels else font
    colors: dict[str, tuple[int, int, int]] = {}
    for box in boxes:
        label, xyxy = _fields(box)
        if color is None:
            rgb = colors.setdefault(label, _rgb(PALETTE[len(colors) % len(PALETTE)]))
        else:
            rgb = _rgb(color)
        fill = rgb + (255,) if out.mode == "RGBA" else rgb
        pixels = box_pixels(xyxy, out.size)
        left, top, right, bottom = pixels
        if 2 * width > min(right - left, bottom - top):  # the border fills the box (PIL would draw beyond it)
            draw.rectangle(pixels, fill=fill)
        else:
            draw.rectangle(pixels, outline=fill, width=width)
        if labels and label:
            rect, at = label_rect(label, pixels, out.size, font)
            ink = (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 150 else (255, 255, 255)
            draw.rectangle(rect, fill=fill)
            draw.text(at, label, fill=ink + (255,) if out.mode == "RGBA" else ink, font=font)
    return out
