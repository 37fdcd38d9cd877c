"""Still images in: `load_image` (paths, bytes, base64, PIL, arrays) and `to_pil_rgb`; `check_media_path`.

Shared by the HF-style image processor (image.py, with EXIF orientation applied like transformers 4.57
image_utils.py `load_image`) and the qwen-vl-utils port (`fetch_image` below, video.py frame lists, without
EXIF orientation, like qwen-vl-utils). Nothing is fetched over the network. Pillow and NumPy only.

`check_media_path` is the one place that turns a user's media path (image or video) into a local file path or a
one-line error; the loaders here and in video.py use it, and so can a command line checking its arguments early.


qwen-vl-utils 0.0.8 ("QVU8"), image side: its pixel bounds, its `smart_resize` rule and `fetch_image`.

Qwen2-VL's README prepares inputs for the HF processor with qwen-vl-utils (`qwen_vl_utils/vision_process.py`),
whose sizing differs from the HF image processor's. This module ports the sizing rule, as `qvu_smart_resize` (HF's
rule is `qwen2vl_jax.processing.image.smart_resize`), and `fetch_image` with NumPy + Pillow only. The video side
is video.py; the chat-message walker (`process_vision_info`) is vision_info.py.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

__all__ = ["check_media_path", "data_url_bytes", "load_image", "to_pil_rgb"]


URL_PREFIXES = ("http://", "https://")
FILE_URL_PREFIX = "file://"


def check_media_path(path: str | os.PathLike, kind: str = "image") -> str:
    """The local file behind a media path, or a one-line error naming it (`kind` is "image" or "video").

    * `file://PATH` -> PATH: the prefix is stripped, as qwen-vl-utils 0.0.8 vision_process.py `fetch_image` does
      (`image[7:]`); `~` is expanded.
    * `http://` / `https://` -> ValueError: nothing is downloaded here; download the file and pass its path.
    * a missing path -> FileNotFoundError "<kind> not found: PATH".
    * a directory -> ValueError "<kind> path is a directory, not a file: PATH".
    * a file that cannot be opened for reading -> ValueError "<kind> file is not readable (...): PATH".

    Whether the file holds a decodable image / video is checked later, by the decoder.
    """
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = text.decode()
    if text.startswith(URL_PREFIXES):
        raise ValueError(f"{kind} URLs are not supported here ({text}); download the file first and pass its local "
                         "path")
    if text.startswith(FILE_URL_PREFIX):
        text = text[len(FILE_URL_PREFIX):]
    local = Path(text).expanduser()
    if local.is_dir():
        raise ValueError(f"{kind} path is a directory, not a file: {text}")
    if not local.exists():
        raise FileNotFoundError(f"{kind} not found: {text}")
    if not local.is_file():
        raise ValueError(f"{kind} path is not a regular file: {text}")
    try:
        with open(local, "rb"):
            pass
    except OSError as err:
        raise ValueError(f"{kind} file is not readable ({err.strerror or err}): {text}") from err
    return str(local)


def data_url_bytes(text: str, max_bytes: int | None = None) -> bytes:
    """The bytes of a `data:image/...;base64,...` URL (RFC 2397); anything else, or (with `max_bytes`) more data
    than that, is a ValueError saying so. The length is checked before anything is decoded."""
    head, sep, payload = text.partition(",")
    if not head[:11].lower() == "data:image/":
        kind = head[5:].split(";", 1)[0] or "text/plain"  # RFC 2397: no type is text/plain
        raise ValueError(f"a data URL must be an image (data:image/...;base64,...), got data:{kind[:40]}")
    if not sep or not head.lower().endswith(";base64"):
        raise ValueError("a `data:image` string must be base64 encoded (`data:image/...;base64,...`)")
    if max_bytes is not None and len(payload) > (max_bytes * 4) // 3 + 4:
        raise ValueError(f"the image data has more than the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as err:
        raise ValueError(f"could not decode the base64 image data: {err}") from err


def _open_pil(fp: Any, what: str, exif_transpose: bool) -> Image.Image:
    try:
        image = Image.open(fp)
        image.load()  # PIL opens lazily; force the decode so truncated or corrupt data fails here, not later
        if exif_transpose:
            image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ValueError(f"could not read image {what}: {err}") from err
    return image


def load_image(source: Any, *, exif_transpose: bool = False) -> Image.Image | np.ndarray:
    """Open one image input: a PIL image, an array, a local path (`str`, `Path`, `file://...`), raw bytes, or a
    `data:image/...;base64,` string. Nothing is fetched over the network.

    `exif_transpose=True` applies the EXIF orientation to decoded files, as transformers' `load_image` does for
    paths (qwen-vl-utils' `fetch_image` does not). Arrays and PIL images are returned unchanged.
    """
    if isinstance(source, (Image.Image, np.ndarray)):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ValueError("could not read image from bytes: the buffer is empty")
        return _open_pil(io.BytesIO(bytes(source)), "from bytes", exif_transpose)
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, bytes):
            text = text.decode()
        if text[:5].lower() == "data:":
            return _open_pil(io.BytesIO(data_url_bytes(text)), "from base64 data", exif_transpose)
        path = check_media_path(text, "image")  # file:// stripped; URL / not found / directory / unreadable
        with open(path, "rb") as fp:
            return _open_pil(fp, repr(path), exif_transpose)
    raise ValueError(f"unsupported image input of type {type(source).__name__}: expected a PIL image, a numpy "
                     "array, a path, bytes or a data:image base64 string")


def to_pil_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """`image.convert("RGB")` as qwen-vl-utils 0.0.8 `fetch_image` does; arrays are HWC / HW uint8 (or 0..255
    integer floats)."""
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(f"a frame/image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {array.shape}")
        if array.dtype != np.uint8:
            # Only lossless conversions: integer values in 0..255 (a float array scaled to [0, 1] is rejected
            # rather than silently truncated to 0/1).
            if not (np.all(np.isfinite(array)) and np.all(array == np.round(array))
                    and (array.size == 0 or (array.min() >= 0 and array.max() <= 255))):
                raise ValueError("a frame/image array must be uint8 or hold integer values in [0, 255]")
            array = array.astype(np.uint8)
        image = Image.fromarray(np.ascontiguousarray(array))
    return image if image.mode == "RGB" else image.convert("RGB")


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

    It is not HF's rule (`qwen2vl_jax.processing.image.smart_resize`, transformers
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
