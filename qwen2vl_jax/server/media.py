"""What `qwen2vl-jax serve` lets a client's image be: a data URL, or a local file inside the one directory the
operator named (`--allowed-local-media-path`), checked before a single pixel is decoded.

A server trusts no client. So:

* A path or `file://` URL is read only when its real path (every symlink resolved) lies inside the allowed
  directory; anything else, or any local path when no directory was named, is refused with the same words whether
  or not the file exists (the error must not tell a client which files the server has). Only regular files are
  opened (no FIFOs, devices or directories), without following a symlink swapped in after the check.
* `http(s)://` URLs are refused: the server fetches nothing.
* Encoded bytes are bounded (`max_bytes`), and an image is opened lazily (Pillow reads the header only): its
  width x height is checked against `max_pixels` before it is decoded, so a few hundred bytes of PNG claiming
  20000 x 20000 pixels cost nothing. Pillow's own decompression-bomb refusal and anything else undecodable become
  one `MediaError`. Only common raster formats are opened (no EPS / PDF, whose plugins run external programs).

`shrink_for_processor` then brings a decoded image to the size the image processor would resize it to, with the
processor's own steps (`convert_to_rgb`, `smart_resize`, Pillow resize with its `resample`): the processor's later
resize is then the identity (Pillow returns a copy for a same-size resize), so the pixels are bit-identical to
sending the full image, while a request never holds more than one full-size decode at a time.

Videos (video_input.py) follow the same rules: a local video is opened by `open_local` (the same directory rule,
refusal words, `O_NOFOLLOW` and regular-file checks; `max_video_bytes`), frames sent as images by
`image_bytes` + `open_image`, and the policy's video limits (`max_video_frames`, `max_video_fps`,
`max_video_pixels`, `max_video_decoded_pixels`, `max_videos`) bound what one request can make the server decode.
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from ..processing.image_io import data_url_bytes

__all__ = ["MediaError", "MediaPolicy", "DEFAULT_MAX_IMAGE_PIXELS", "DEFAULT_MAX_VIDEO_FRAMES",
           "DEFAULT_MAX_VIDEO_FPS", "DEFAULT_MAX_VIDEO_BYTES", "DEFAULT_MAX_VIDEO_PIXELS",
           "DEFAULT_MAX_VIDEO_DECODED_PIXELS", "open_image", "shrink_for_processor"]

DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192  # a 64-megapixel photo decodes (~256 MB RGBA); a 9000 x 9000 one does not
DEFAULT_MAX_VIDEO_FRAMES = 64  # frames given to the model per video (sampled from a file, or sent as a list)
DEFAULT_MAX_VIDEO_FPS = 30.0  # the highest sampling rate (or frame-list rate) a request may ask for
DEFAULT_MAX_VIDEO_BYTES = 256 * 2**20  # encoded bytes of one video file (a data URL is bounded by the body first)
DEFAULT_MAX_VIDEO_PIXELS = 64 * 1920 * 1080  # a frame list's pixels, all frames (64 Full HD frames, ~400 MB RGB)
DEFAULT_MAX_VIDEO_DECODED_PIXELS = 2**34  # a file's frames x width x height (~4.6 min of 1080p30, ~10 min of 720p30)
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # raster decoders only
REMOTE_PREFIXES = ("http://", "https://", "ftp://")


class MediaError(ValueError):
    """An image the server refuses; `status` is the HTTP status to answer (400, or 403 for a forbidden path)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status, self.message = status, message


class MediaPolicy:
    """The operator's rules: `allowed_dir` (None: no local files at all), `max_pixels` per image (header width x
    height, checked before decoding), `max_bytes` of encoded data per image (a data URL or a file).

    Videos (video_input.py): `max_videos` per request, `max_video_frames` frames per video (a file's sampled
    frames are capped at it; asking for more, or sending a longer frame list, is refused), `max_video_fps` the
    highest `fps` a request may name, `max_video_bytes` per video file or data URL, `max_video_pixels` over all
    frames of a frame list (each frame's header, before it is decoded), `max_video_decoded_pixels` of a video
    file: every frame is decoded to reach the sampled ones, so its frame count x width x height (from the
    container, before decoding) is bounded. Each video frame also obeys `max_pixels`."""

    def __init__(self, allowed_dir: str | os.PathLike | None = None, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 max_bytes: int = 20 * 2**20, max_videos: int = 4, max_video_frames: int = DEFAULT_MAX_VIDEO_FRAMES,
                 max_video_fps: float = DEFAULT_MAX_VIDEO_FPS, max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES,
                 max_video_pixels: int = DEFAULT_MAX_VIDEO_PIXELS,
                 max_video_decoded_pixels: int = DEFAULT_MAX_VIDEO_DECODED_PIXELS):
        if allowed_dir is not None:
            root = Path(allowed_dir).expanduser()
            if not root.is_dir():
                raise ValueError(f"--allowed-local-media-path must be an existing directory: {allowed_dir}")
            allowed_dir = os.path.realpath(root)
        if int(max_pixels) < 1 or int(max_bytes) < 1:
            raise ValueError("max_pixels and max_bytes must be positive")
        if int(max_videos) < 0:
            raise ValueError("max_videos must be >= 0")
        if int(max_video_frames) < 2:
            raise ValueError("max_video_frames must be at least 2 (a video is sampled in pairs of frames)")
        if not (math.isfinite(max_video_fps) and max_video_fps > 0):
            raise ValueError("max_video_fps must be a positive number")
        if min(int(max_video_bytes), int(max_video_pixels), int(max_video_decoded_pixels)) < 1:
            raise ValueError("max_video_bytes, max_video_pixels and max_video_decoded_pixels must be positive")
        self.allowed_dir, self.max_pixels, self.max_bytes = allowed_dir, int(max_pixels), int(max_bytes)
        self.max_videos, self.max_video_frames = int(max_videos), int(max_video_frames)
        self.max_video_fps, self.max_video_bytes = float(max_video_fps), int(max_video_bytes)
        self.max_video_pixels, self.max_video_decoded_pixels = int(max_video_pixels), int(max_video_decoded_pixels)

    # ----------------------------------------------------------------------------------------- local files
    def _refused(self, where: str, kind: str = "image") -> MediaError:
        example = "data:video/mp4;base64,..." if kind == "video" else "data:image/png;base64,..."
        if self.allowed_dir is None:
            return MediaError(f"{where}: local files are not served (the server was started without "
                              f"--allowed-local-media-path); send the {kind} as a data URL ({example})", 403)
        return MediaError(f"{where}: only files inside the server's allowed media directory can be used; send the "
                          f"{kind} as a data URL ({example}) or a path inside that directory", 403)

    def open_local(self, text: str, where: str = "image", *, kind: str = "image",
                   max_bytes: int | None = None) -> tuple[int, int]:
        """An open file descriptor (read-only; the caller closes it) and the size of the local file named by a
        path or `file://` URL, if the policy allows it: its real path inside the allowed directory (403 with the
        same words whether or not it exists), opened without following a symlink, a regular file of at most
        `max_bytes` (default `self.max_bytes`; messages say "per {kind}")."""
        limit = self.max_bytes if max_bytes is None else int(max_bytes)
        if self.allowed_dir is None:
            raise self._refused(where, kind)
        name = text[len("file://"):] if text.startswith("file://") else text
        if name.startswith("localhost/"):  # file://localhost/abs/path
            name = name[len("localhost"):]
        if not name or "\x00" in name:
            raise self._refused(where, kind)
        candidate = name if os.path.isabs(name) else os.path.join(self.allowed_dir, name)
        real = os.path.realpath(candidate)  # symlinks and `..` resolved (a missing file resolves too)
        if os.path.commonpath([real, self.allowed_dir]) != self.allowed_dir:
            raise self._refused(where, kind)  # the same words whether or not it exists
        try:  # O_NOFOLLOW: a symlink swapped in after realpath is not followed; O_NONBLOCK: a FIFO cannot hang us
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            raise MediaError(f"{where}: no readable {kind} file at {name!r} in the allowed media directory") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise MediaError(f"{where}: {name!r} in the allowed media directory is not a regular file")
            if info.st_size > limit:
                raise MediaError(f"{where}: the file has more than the server's limit of {limit} bytes per {kind}")
        except BaseException:
            os.close(fd)
            raise
        return fd, info.st_size

    def read_local(self, text: str, where: str = "image") -> bytes:
        """The bytes of a local image named by a path or `file://` URL, if the policy allows it."""
        fd, _ = self.open_local(text, where)
        with os.fdopen(fd, "rb") as f:
            data = f.read(self.max_bytes + 1)
            if len(data) > self.max_bytes:
                raise MediaError(f"{where}: the file has more than the server's limit of {self.max_bytes} bytes "
                                 "per image")
            return data

    # --------------------------------------------------------------------------------------------- any URL
    def image_bytes(self, url: str, where: str = "image") -> bytes:
        """The encoded bytes behind an image URL: a base64 data URL or an allowed local file."""
        if not isinstance(url, str):
            raise MediaError(f"{where}: an image URL must be a string")
        if url[:5].lower() == "data:":
            try:
                return data_url_bytes(url, self.max_bytes)
            except ValueError as e:
                raise MediaError(f"{where}: {e}") from None
        if url.lower().startswith(REMOTE_PREFIXES):
            raise MediaError(f"{where}: this server fetches nothing over the network; send the image as a data URL "
                             "(data:image/png;base64,...)")
        return self.read_local(url, where)


def open_image(data: bytes, policy: MediaPolicy, where: str = "image",
               check: Callable[[int, int], None] | None = None) -> Image.Image:
    """Decode `data` into a PIL image after checking its header against `policy.max_pixels` and, if given,
    `check(width, height)` (which raises MediaError to refuse; a video's frame list uses it for its pixel budget
    over all frames), both before anything is decoded."""
    if not data:
        raise MediaError(f"could not decode image {where}: the data is empty")
    Image.init()  # every plugin registered, so `formats` names only known decoders
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)  # the header only; nothing decoded yet
            width, height = image.size
            if width * height > policy.max_pixels:
                raise MediaError(f"{where}: the image is {width} x {height} = {width * height} pixels, more than the "
                                 f"server decodes ({policy.max_pixels} pixels per image, --max-image-pixels); "
                                 "send it smaller")
            if check is not None:
                check(width, height)
            image.load()
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MediaError(f"{where}: refused as a decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, MemoryError, EOFError) as e:  # Pillow's ways of saying "not an image"
        raise MediaError(f"could not decode image {where}: {e}") from None
    return image


def shrink_for_processor(image: Image.Image, image_processor) -> Image.Image:
    """`image` resized as the image processor will (transformers 4.57 `Qwen2VLImageProcessor._preprocess`:
    `convert_to_rgb`, `smart_resize`, Pillow resize with `resample`), so the processor's own resize is a copy."""
    from ..processing.image import convert_to_rgb

    image = convert_to_rgb(image)
    if not getattr(image_processor, "do_resize", True):
        return image
    height, width = image_processor.smart_resize(image.height, image.width)
    if image.size != (width, height):
        image = image.resize((width, height), resample=image_processor.resample)
    return image
