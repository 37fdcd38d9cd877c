"""Boxes in an answer: read them (`parse_boxes`) and write them (`format_boxes`), in both families' syntaxes.

Two syntaxes, read for either family:

    tokens  <|object_ref_start|>cat<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>, several boxes after
            one label (`...<|box_end|><|box_start|>(..),(..)<|box_end|>`), several labels. A box belongs to the
            object_ref just before it (only whitespace between), its further boxes follow on the same line; a box
            after anything else has the label "". Qwen2-VL's; Qwen2.5-VL
            was trained on it too, in its own coordinates (the Qwen team, QwenLM/Qwen2.5-VL #721: "[0, 0, 320, 320]
            or (0,0),(320,320)")
    json    [{"bbox_2d": [x1, y1, x2, y2], "label": "cat"}, ...] or one such object, in a ```json fence or bare,
            prose around it. Qwen2.5-VL's. A {"point_2d": [x, y]} item is a point: read into `.points`, never
            into the boxes

The family, not the syntax, decides what the numbers mean (coords.py): a 0-1000 grid for "qwen2_vl", pixels of the
resized model input for "qwen2_5_vl". Every box comes back in the ORIGINAL image's pixels.

Decoded with `skip_special_tokens=True` (transformers' and most examples' default) the token syntax loses its tags:
`cat(12,34),(56,78)`. The coordinates stay unambiguous, the label does not (where does it start in a sentence?).
So the bare form is read only where the label is the whole rest of its line: an answer without any box tag or JSON
box, whose lines are `label(x1,y1),(x2,y2)` (more boxes may follow on the line; the label may be empty). Bare
coordinates inside prose ("a cat(1,2),(3,4) sits on a mat") are reported ("bare"), not guessed at.

Nothing malformed is guessed at: it is reported in `.problems`, and `strict=True` raises `GroundingError` instead.
The kinds of problem:

    coords        not two (x, y) corners (or, in JSON, not 4 numbers / 2 for a point)
    number        a coordinate that is not a number
    order         x2 < x1 or y2 < y1
    range         outside the family's frame (0..1000, or 0..W' x 0..H' of the resized input)
    unterminated  a tag without its end (or an end without its start), a ``` fence never closed
    json          bad JSON (the complete objects of a broken list are still read), or "bbox_2d" outside any JSON
    no_box        a label with no box after it, a JSON item with neither bbox_2d nor point_2d
    bare          coordinates without box tags whose label cannot be told from the prose

`<|im_end|>` / `<|endoftext|>` (an answer decoded with its special tokens ends with one) are ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

from .coords import FACTOR, check_family, check_image_size, from_model, model_frame, to_model

__all__ = ["Box", "Point", "Problem", "Boxes", "GroundingError", "PROBLEM_KINDS", "parse_boxes", "format_boxes",
           "has_boxes"]

PROBLEM_KINDS = ("coords", "number", "order", "range", "unterminated", "json", "no_box", "bare")
REF_START, REF_END = "<|object_ref_start|>", "<|object_ref_end|>"
BOX_START, BOX_END = "<|box_start|>", "<|box_end|>"
SYNTAXES = ("tokens", "json")
NATIVE_SYNTAX = {"qwen2_vl": "tokens", "qwen2_5_vl": "json"}

_TAG = re.compile(r"<\|(object_ref_start|object_ref_end|box_start|box_end)\|>")
_END_OF_TURN = re.compile(r"<\|(?:im_end|im_start|endoftext)\|>")
_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)"
_PAIR = rf"\(\s*{_NUM}\s*,\s*{_NUM}\s*\)"
_BARE_BOX = re.compile(rf"{_PAIR}\s*,\s*{_PAIR}")
_BARE_LINE = re.compile(rf"(?P<label>[^()]*?)\s*(?P<boxes>{_BARE_BOX.pattern}(?:\s*[,;]?\s*{_BARE_BOX.pattern})*)"
                        r"\s*[.;,]?\s*")
_JSON_KEY = re.compile(r"bbox_2d|point_2d")
_JSON_OPEN = re.compile(r"[\[{]")
_SNIPPET = 80


@dataclasses.dataclass(frozen=True)
class Box:
    """One box: its label ("" when the answer gave none) and (x1, y1, x2, y2) in the original image's pixels;
    `model`: the numbers as the answer wrote them (the family's frame), None for a box built by hand."""

    label: str
    xyxy: tuple[float, float, float, float]
    model: tuple[float, ...] | None = None

    def as_json(self, image: int | None = None) -> dict:
        out = {"label": self.label, "xyxy": [round(float(v), 2) for v in self.xyxy]}
        return out if image is None else {**out, "image": image}


@dataclasses.dataclass(frozen=True)
class Point:
    """A `point_2d` item: its label and (x, y) in the original image's pixels; `model` as for `Box`."""

    label: str
    xy: tuple[float, float]
    model: tuple[float, ...] | None = None

    def as_json(self, image: int | None = None) -> dict:
        out = {"label": self.label, "xy": [round(float(v), 2) for v in self.xy]}
        return out if image is None else {**out, "image": image}


@dataclasses.dataclass(frozen=True)
class Problem:
    """Something in the answer that could not be read as a box: `kind` (one of PROBLEM_KINDS), what is wrong, the
    offending text (at most 80 characters) and where it starts in the answer."""

    kind: str
    message: str
    text: str = ""
    position: int = 0

    def as_json(self) -> dict:
        return {"kind": self.kind, "message": self.message, "text": self.text}


class Boxes(list):
    """`parse_boxes`' answer: a list of `Box`, in the answer's order, with `.points` (the `point_2d` items) and
    `.problems` (what could not be read, in the answer's order)."""

    def __init__(self, boxes: Iterable[Box] = (), *, points: Iterable[Point] = (), problems: Iterable[Problem] = ()):
        super().__init__(boxes)
        self.points: list[Point] = list(points)
        self.problems: list[Problem] = list(problems)

    def as_json(self, image: int | None = None) -> dict:
        """{"boxes": [{"label", "xyxy", "image"}], "points": [{"label", "xy", "image"}], "box_problems": [{"kind",
        "message", "text"}]}: coordinates rounded to 0.01 px, `image` only when given (the CLI's and the
        explorer's JSON)."""
        return {"boxes": [b.as_json(image) for b in self], "points": [p.as_json(image) for p in self.points],
                "box_problems": [p.as_json() for p in self.problems]}

    def __repr__(self) -> str:
        return f"Boxes({list.__repr__(self)}, points={self.points!r}, problems={self.problems!r})"


class GroundingError(ValueError):
    """`parse_boxes(..., strict=True)` on an answer with problems: the message names each; `.problems` holds them."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        lines = [f"  {p.kind}: {p.message}" + (f" in {p.text!r}" if p.text else "") for p in self.problems]
        super().__init__(f"{len(self.problems)} problem(s) reading the boxes:\n" + "\n".join(lines))


def has_boxes(text: str) -> bool:
    """Does the answer hold anything box-like (a box tag, a "bbox_2d" / "point_2d" key, bare `(x1,y1),(x2,y2)`)?
    A cheap test before anything needs the image's size."""
    return bool(_TAG.search(text) or _JSON_KEY.search(text) or _BARE_BOX.search(text))


# ------------------------------------------------------------------------------------------------------ reading
class _Reader:
    """The answer, the conversion of its family, and what reading it found: items and problems by position."""

    def __init__(self, text: str, family: str, image_size, min_pixels, max_pixels, factor):
        # end-of-turn tokens blanked out, positions kept
        self.text = _END_OF_TURN.sub(lambda m: " " * len(m.group()), text)
        self.family, self.image_size = family, image_size
        self.bounds = (min_pixels, max_pixels, factor)
        self.frame = model_frame(family, image_size, min_pixels, max_pixels, factor)
        self.items: list[tuple[int, Box | Point]] = []
        self.problems: list[Problem] = []

    def problem(self, kind: str, message: str, start: int, end: int | None = None, snippet: str | None = None
                ) -> None:
        if snippet is None:
            snippet = self.text[start:end if end is not None else start + _SNIPPET].strip()
        if len(snippet) > _SNIPPET:
            snippet = snippet[:_SNIPPET - 1] + "…"
        self.problems.append(Problem(kind, message, snippet, start))

    def _out_of_frame(self, values: Sequence[float]) -> str | None:
        fw, fh = self.frame
        if all(v >= 0 for v in values) and max(values[0::2]) <= fw and max(values[1::2]) <= fh:
            return None
        if self.family == "qwen2_vl":
            return (f"{_show(values)} is outside qwen2_vl's 0-1000 grid (pixel coordinates, as Qwen2.5-VL writes? "
                    "then family='qwen2_5_vl')")
        w, h = self.image_size
        return (f"{_show(values)} is outside the resized input {fw}x{fh} the {w}x{h} image becomes (min_pixels, "
                f"max_pixels = {self.bounds[0]}, {self.bounds[1]}; were those the processor's?)")

    def box(self, label: str, values: Sequence[float], start: int, end: int, snippet: str | None = None) -> None:
        x1, y1, x2, y2 = values
        outside = self._out_of_frame(values)
        if outside:
            self.problem("range", outside, start, end, snippet)
        elif x2 < x1 or y2 < y1:
            self.problem("order", f"{_show(values)}: the second corner must be right of and below the first",
                         start, end, snippet)
        else:
            xyxy = from_model(values, self.family, self.image_size, *self.bounds)
            self.items.append((start, Box(label, xyxy, tuple(values))))

    def point(self, label: str, values: Sequence[float], start: int, end: int, snippet: str | None = None) -> None:
        outside = self._out_of_frame(values)
        if outside:
            self.problem("range", outside, start, end, snippet)
        else:
            xy = from_model(values, self.family, self.image_size, *self.bounds)
            self.items.append((start, Point(label, xy, tuple(values))))

    def result(self) -> Boxes:
        items = [item for _, item in sorted(self.items, key=lambda pair: pair[0])]  # stable: a block keeps its order
        problems = sorted(self.problems, key=lambda p: p.position)
        return Boxes([i for i in items if isinstance(i, Box)], points=[i for i in items if isinstance(i, Point)],
                     problems=problems)


def _show(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _number(text: str) -> float:
    """An int when it is one that a float holds exactly, else a float (too large: inf, reported as not a number)."""
    return int(text) if re.fullmatch(r"[+-]?\d{1,15}", text) else float(text)


def _read_corners(content: str) -> tuple[str, str] | list[float]:
    """The inside of <|box_start|>...<|box_end|> -> [x1, y1, x2, y2], or (problem kind, message)."""
    groups = re.findall(r"\(([^()]*)\)", content)
    rest = re.sub(r"\([^()]*\)", "", content)
    values = [v.strip() for g in groups for v in g.split(",")]
    bad = [v for v in values if not re.fullmatch(_NUM, v)]
    if groups and not rest.strip(" \t\r\n,") and bad:
        return "number", f"{bad[0]!r} is not a number"
    if not groups or rest.strip(" \t\r\n,") or [len(g.split(",")) for g in groups] != [2, 2]:
        return "coords", f"expected two corners (x1,y1),(x2,y2), got {content.strip()!r}"
    return [_number(v) for v in values]


def _read_tokens(r: _Reader) -> bool:
    """The token syntax. Returns whether the answer has any box tag (then the bare form is not read)."""
    text = r.text
    ref = box = None  # (tag start, content start) of an open object_ref / box
    # [text, end of its last tag, boxes so far, start]. Boxes chain onto it: the first after any whitespace, the
    # next ones on the same line (so a line of unlabelled boxes after it is not taken for more of its boxes)
    label = None

    def close_label():
        nonlocal label
        if label is not None and label[2] == 0:
            r.problem("no_box", f"the label {label[0]!r} has no box after it", label[3], label[1])
        label = None

    tags = list(_TAG.finditer(text))
    for m in tags:
        tag = m.group(1)
        if tag in ("object_ref_start", "box_start") and box is not None:
            r.problem("unterminated", "<|box_start|> without <|box_end|>", box[0], m.start())
            box = None
        if tag in ("object_ref_start", "box_start") and ref is not None:
            r.problem("unterminated", "<|object_ref_start|> without <|object_ref_end|>", ref[0], m.start())
            ref = None
        if tag == "object_ref_start":
            close_label()
            ref = (m.start(), m.end())
        elif tag == "box_start":
            box = (m.start(), m.end())
        elif tag == "object_ref_end":
            if ref is None:
                r.problem("unterminated", "<|object_ref_end|> without <|object_ref_start|>", m.start(), m.end())
                continue
            close_label()
            label = [text[ref[1]:m.start()].strip(), m.end(), 0, ref[0]]
            ref = None
        else:  # box_end
            if box is None:
                r.problem("unterminated", "<|box_end|> without <|box_start|>", m.start(), m.end())
                continue
            start, content_start = box
            box = None
            gap = text[label[1]:start] if label is not None else "x"
            if not gap.strip() and (label[2] == 0 or "\n" not in gap):
                name = label[0]
                label[1], label[2] = m.end(), label[2] + 1
            else:
                close_label()
                name = ""
            corners = _read_corners(text[content_start:m.start()])
            if isinstance(corners, tuple):
                r.problem(corners[0], corners[1], start, m.end())
            else:
                r.box(name, corners, start, m.end())
    if box is not None:
        r.problem("unterminated", "<|box_start|> without <|box_end|> (the answer was cut off?)", box[0])
    if ref is not None:
        r.problem("unterminated", "<|object_ref_start|> without <|object_ref_end|> (the answer was cut off?)",
                  ref[0])
    close_label()
    return bool(tags)


def _read_bare(r: _Reader) -> None:
    """`label(x1,y1),(x2,y2)...` lines of an answer decoded without its special tokens (see the module docstring)."""
    offset = 0
    for line in r.text.splitlines(keepends=True):
        if _BARE_BOX.search(line):
            m = _BARE_LINE.fullmatch(line.rstrip("\r\n"))
            if m is None:
                r.problem("bare", "coordinates without <|box_start|> tags inside prose: the label cannot be told "
                                  "(decode the answer with skip_special_tokens=False)", offset, offset + len(line))
            else:
                name = m.group("label").strip().removesuffix(":").strip()
                for b in _BARE_BOX.finditer(m.group("boxes")):
                    values = [_number(v) for v in re.findall(_NUM, b.group())]
                    where = offset + m.start("boxes") + b.start()
                    r.box(name, values, where, where + len(b.group()))
        offset += len(line)


def _json_items(value: Any) -> bool:
    """Is this JSON value a box item, or a list holding at least one?"""
    def item(v):
        return isinstance(v, dict) and ("bbox_2d" in v or "point_2d" in v)
    return item(value) or isinstance(value, list) and any(item(v) for v in value)


def _nested_items(value: Any) -> list:
    """The outermost values holding box items inside a decoded JSON value (e.g. {"objects": [...]})."""
    if _json_items(value):
        return [value]
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return [found for child in children for found in _nested_items(child)]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_item(r: _Reader, item: Any, start: int, end: int) -> None:
    """One JSON item; a problem's text is the item itself (a list's items have no position of their own)."""
    shown = json.dumps(item, ensure_ascii=False)
    if not isinstance(item, dict) or not ("bbox_2d" in item or "point_2d" in item):
        r.problem("no_box", "a JSON item with neither bbox_2d nor point_2d", start, end, shown)
        return
    label = item.get("label", item.get("text_content", ""))
    label = label if isinstance(label, str) else json.dumps(label, ensure_ascii=False)
    for key, n in (("bbox_2d", 4), ("point_2d", 2)):
        if key not in item:
            continue
        values = item[key]
        if not isinstance(values, list) or len(values) != n:
            r.problem("coords", f"{key} of {label!r} must be {n} numbers, got {json.dumps(values)}", start, end,
                      shown)
        elif not all(_is_number(v) for v in values):
            bad = next(v for v in values if not _is_number(v))
            r.problem("number", f"{key} of {label!r}: {json.dumps(bad)} is not a number", start, end, shown)
        elif key == "bbox_2d":
            r.box(label, values, start, end, shown)
        else:
            r.point(label, values, start, end, shown)


def _read_value(r: _Reader, value: Any, start: int, end: int) -> None:
    for items in _nested_items(value):
        for item in items if isinstance(items, list) else [items]:
            _read_item(r, item, start, end)


def _scan(r: _Reader, start: int, end: int, covered: list) -> None:
    """JSON values holding box items anywhere in text[start:end] (prose around them), each read once."""
    decoder, text, k = json.JSONDecoder(), r.text[:end], start
    while (m := _JSON_OPEN.search(text, k)) is not None:
        try:
            value, stop = decoder.raw_decode(text, m.start())
        except (ValueError, RecursionError):  # not JSON here; or nested too deep, or an integer of > 4300 digits
            k = m.start() + 1
            continue
        if _json_items(value):
            _read_value(r, value, m.start(), stop)
            covered.append((m.start(), stop))
            k = stop
        else:  # not (yet) the items: look inside it
            k = m.start() + 1


def _read_json(r: _Reader) -> None:
    text, covered, pos = r.text, [], 0
    while True:
        i = text.find("```", pos)
        _scan(r, pos, len(text) if i < 0 else i, covered)
        if i < 0:
            break
        tag = re.match(r"[ \t]*([\w+.-]*)", text[i + 3:])
        content_start = i + 3 + tag.end()
        j = text.find("```", content_start)
        end = len(text) if j < 0 else j
        content = text[content_start:end]
        lang = tag.group(1).lower()
        if lang in ("json", "") or _JSON_KEY.search(content):
            covered.append((i, end + 3))
            if j < 0 and content.strip():
                r.problem("unterminated", "a ``` fence with no closing ``` (the answer was cut off?)", i)
            _read_block(r, content, content_start)
        pos = end + 3
        if j < 0:
            break
    for m in _JSON_KEY.finditer(text):
        if not any(a <= m.start() < b for a, b in covered):
            r.problem("json", f"{m.group()!r} is not inside valid JSON", max(0, m.start() - 2))


def _read_block(r: _Reader, content: str, offset: int) -> None:
    """One fenced block: all of it JSON, else a `json` problem and the complete objects it holds."""
    if not content.strip():
        return
    try:
        value = json.loads(content)
    except (RecursionError, ValueError) as e:
        if not isinstance(e, json.JSONDecodeError):  # nested too deep, or an integer of more than 4300 digits
            r.problem("json", f"unreadable JSON ({type(e).__name__})", offset, offset + _SNIPPET)
            return
        if not (_JSON_KEY.search(content) or content.lstrip()[:1] in "[{"):
            return  # a fence around something else
        r.problem("json", f"bad JSON: {e.msg} (line {e.lineno} column {e.colno} of the block)",
                  max(offset, offset + e.pos - _SNIPPET // 2), offset + e.pos + _SNIPPET // 2)
        _scan(r, offset, offset + len(content), [])
        return
    _read_value(r, value, offset, offset + len(content))


def parse_boxes(text: str, *, family: str = "qwen2_vl", image_size: Sequence[int], min_pixels: int | None = None,
                max_pixels: int | None = None, factor: int = FACTOR, strict: bool = False) -> Boxes:
    """The boxes of an answer, in the original image's pixels.

    `family`: "qwen2_vl" (numbers on a 0-1000 grid) or "qwen2_5_vl" (pixels of the resized input); `image_size`:
    the original (width, height) of the image the boxes are about; `min_pixels` / `max_pixels` / `factor`: the
    processor's (None: the released checkpoints' 56*56 / 28*28*16384; `settings_for(processor)` gives all of them
    and the family). Both syntaxes are read (module docstring). Returns a `Boxes` list (each `Box` has `.label`
    and `.xyxy`) with `.points` and `.problems`; `strict=True` raises `GroundingError` if there is any problem.
    """
    check_family(family)
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    r = _Reader(text, family, image_size, min_pixels, max_pixels, factor)
    tagged = _read_tokens(r)
    _read_json(r)
    if not tagged and not _JSON_KEY.search(r.text):
        _read_bare(r)
    result = r.result()
    if strict and result.problems:
        raise GroundingError(result.problems)
    return result


# ------------------------------------------------------------------------------------------------------ writing
def _box_fields(box: Any, i: int) -> tuple[str, tuple[float, ...]]:
    if isinstance(box, (Box, Point)) or hasattr(box, "xyxy"):
        label, xyxy = box.label, box.xyxy
    else:
        try:
            label, xyxy = box
        except (TypeError, ValueError):
            raise ValueError(f"box {i}: expected a Box or a (label, (x1, y1, x2, y2)) pair, got {box!r}") from None
    if not isinstance(label, str):
        raise ValueError(f"box {i}: the label must be a str, got {label!r}")
    try:
        values = tuple(float(v) for v in xyxy)
    except (TypeError, ValueError):
        raise ValueError(f"box {i} ({label!r}): xyxy must be 4 numbers, got {xyxy!r}") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ValueError(f"box {i} ({label!r}): xyxy must be 4 finite numbers, got {xyxy!r}")
    return label, values


def format_boxes(boxes: Iterable[Any], *, family: str = "qwen2_vl", image_size: Sequence[int],
                 min_pixels: int | None = None, max_pixels: int | None = None, factor: int = FACTOR,
                 syntax: str | None = None) -> str:
    """An answer stating `boxes` (each a `Box` or a (label, (x1, y1, x2, y2)) pair, original pixels) in the family's
    convention: a fine-tuning target. `syntax` None: the family's own, "tokens" for qwen2_vl (one line per run of
    boxes with the same label: `<|object_ref_start|>cat<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`,
    no object_ref for an empty label), "json" for qwen2_5_vl (a ```json fence around a list of {"bbox_2d": [ints],
    "label"}, one item a line, as its cookbooks show). Coordinates are rounded half up onto the family's grid, so
    `parse_boxes` gives them back within half a grid step (coords.py). A box outside the image or with its corners
    swapped is refused (ValueError): a wrong target teaches the model a wrong box.
    """
    check_family(family)
    syntax = NATIVE_SYNTAX[family] if syntax is None else syntax
    if syntax not in SYNTAXES:
        raise ValueError(f"syntax must be one of {', '.join(map(repr, SYNTAXES))} or None, got {syntax!r}")
    width, height = check_image_size(image_size)
    entries = []
    for i, box in enumerate(boxes):
        label, (x1, y1, x2, y2) = _box_fields(box, i)
        if not (0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height):
            raise ValueError(f"box {i} ({label!r}): {_show((x1, y1, x2, y2))} is not a box inside the {width}x{height}"
                             " image (0 <= x1 <= x2 <= width, 0 <= y1 <= y2 <= height)")
        if syntax == "tokens" and "<|" in label:
            raise ValueError(f"box {i}: the label {label!r} holds '<|', which would read as a special token")
        entries.append((label, to_model((x1, y1, x2, y2), family, image_size, min_pixels, max_pixels, factor)))
    if syntax == "json":
        lines = [f'\t{{"bbox_2d": [{", ".join(map(str, v))}], "label": {json.dumps(label, ensure_ascii=False)}}}'
                 for label, v in entries]
        return "```json\n[\n" + ",\n".join(lines) + ("\n" if lines else "") + "]\n```"
    out = []
    for label, v in entries:
        corners = f"{BOX_START}({v[0]},{v[1]}),({v[2]},{v[3]}){BOX_END}"
        if out and out[-1][0] == label and label:
            out[-1][1].append(corners)
        else:
            out.append((label, [corners]))
    return "\n".join((f"{REF_START}{label}{REF_END}" if label else "") + "".join(c) for label, c in out)
