"""Video inputs the way qwen-vl-utils 0.0.8 ("QVU8") prepares them: frame sampling, PyAV decoding, per-frame sizing.

Qwen2-VL's README prepares inputs for the HF processor with `qwen_vl_utils.process_vision_info`, whose frame
sampling and sizing differ from the HF video processor's. This module ports the video side of qwen-vl-utils 0.0.8
`vision_process.py` with NumPy + Pillow + PyAV only (the image side is image_io.py, the message walker
vision_info.py):

* `smart_nframes`   — how many frames: fps 2.0, FRAME_FACTOR 2, min 4 / max 768 frames, or an explicit `nframes`;
* `sample_frame_indices` — `torch.linspace(0, total-1, n).round()`, reproduced bit for bit (float32 linspace,
  round-half-to-even), see `torch_linspace_float32`;
* `read_video`      — decode with PyAV and sample, like QVU8's torchvision reader;
* `fetch_video`     — sample, then size every frame with `qvu_smart_resize` (qwen-vl-utils' rule, not HF's).

One deliberate difference: QVU8 resizes frames with `torchvision.transforms.functional.resize(BICUBIC,
antialias=True)`. There is no torchvision here, so frames are resized with Pillow's BICUBIC filter (which is
antialiased: its support widens with the downscale factor, the filter torchvision's antialias path imitates). The
target *size* is exactly QVU8's; pixel values differ slightly: on Big Buck Bunny's 10 sampled frames (1280x720 ->
1008x560) Pillow vs torch's bicubic-antialias interpolate (what torchvision's tensor resize runs) differ by at most
2 uint8 levels, 16% of values by 1 level, mean 0.16 (tests/processing/test_video.py). QVU8 also returns float tensors;
the values are integers (torchvision rounds uint8 output), so frames are returned here as uint8.

Bad files: a one-frame video is that frame twice (QVU8's `smart_nframes` raises "nframes should be in the interval
[2, 1]"; transformers 4.57 video_processing_qwen2_vl.py `Qwen2VLVideoProcessor._preprocess` repeats the last frame
up to temporal_patch_size, which is followed here). A file that decodes to fewer frames than its container declares
(cut after its index) gives a RuntimeWarning naming the file and both counts; one that decodes no frame raises.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from PIL import Image

from .image_io import (
    IMAGE_FACTOR,
    MAX_PIXELS,
    MIN_PIXELS,
    ceil_by_factor,
    check_media_path,
    fetch_image,
    floor_by_factor,
    load_image,
    qvu_smart_resize,
    round_by_factor,
    to_pil_rgb,
)

__all__ = [
    "VIDEO_MIN_PIXELS",
    "VIDEO_MAX_PIXELS",
    "VIDEO_TOTAL_PIXELS",
    "FRAME_FACTOR",
    "FPS",
    "FPS_MIN_FRAMES",
    "FPS_MAX_FRAMES",
    "VideoInfo",
    "smart_nframes",
    "torch_linspace_float32",
    "sample_frame_indices",
    "read_video",
    "fetch_video",
    "FrameReader",
    "packet_times",
    "stream_fps",
]

# QVU8 vision_process.py constants (the video ones; the image ones are in image_io.py).
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = 24576 * 28 * 28
FRAME_FACTOR = 2
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768


# ------------------------------------------------------------------------------------------------ frame sampling
def smart_nframes(total_frames: int, video_fps: float, *, fps: float | None = None, nframes: int | None = None,
                  min_frames: int | None = None, max_frames: int | None = None) -> int:
    """How many frames to sample (QVU8 `smart_nframes`).

    `nframes` given: rounded to the nearest even count. Otherwise `total / video_fps * fps` (fps 2.0), clamped to
    [ceil2(min_frames=4), floor2(max_frames=min(768, total))] and then *rounded* to even (QVU 0.0.14 floors and
    caps by `total` instead). The result must lie in [2, total].
    """
    if fps is not None and nframes is not None:
        raise ValueError("pass either `fps` or `nframes`, not both (qwen-vl-utils: 'Only accept either `fps` or "
                         "`nframes`')")
    if nframes is not None:
        n = round_by_factor(nframes, FRAME_FACTOR)
    else:
        fps = FPS if fps is None else fps
        if not video_fps or video_fps <= 0:
            raise ValueError(f"the video reports no usable frame rate ({video_fps!r}); pass `nframes` instead")
        min_n = ceil_by_factor(FPS_MIN_FRAMES if min_frames is None else min_frames, FRAME_FACTOR)
        max_n = floor_by_factor(min(FPS_MAX_FRAMES, total_frames) if max_frames is None else max_frames,
                                FRAME_FACTOR)
        n = total_frames / video_fps * fps
        n = min(max(n, min_n), max_n)
        n = round_by_factor(n, FRAME_FACTOR)
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"nframes should be in the interval [{FRAME_FACTOR}, {total_frames}] (the video has "
                         f"{total_frames} frames), but got {n}")
    return n


def torch_linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """`torch.linspace(start, end, steps)` (default float32) reproduced exactly.

    ATen's CPU kernel (RangeFactoriesKernel.cpp `linspace_kernel`) computes `step = (end - start) / (steps - 1)` in
    float32, then `start + step * i` for the first half and `end - step * (steps - 1 - i)` for the second half,
    each with a single rounding (the compiler fuses multiply-add). Products of a float32 step with i < 2**24 are
    exact in float64, so evaluating in float64 and rounding once to float32 gives the same bits; this was checked
    against torch for ~76k (total, n) pairs in the tests' development.
    """
    s, e = np.float32(start), np.float32(end)
    if steps <= 0:
        return np.zeros(0, np.float32)
    if steps == 1:
        return np.array([s], np.float32)
    step = (e - s) / np.float32(steps - 1)
    idx = np.arange(steps, dtype=np.float64)
    low = (np.float64(step) * idx + np.float64(s)).astype(np.float32)
    high = (np.float64(e) - np.float64(step) * (steps - 1 - idx)).astype(np.float32)
    return np.where(np.arange(steps) < steps // 2, low, high)


def sample_frame_indices(start: int, end: int, nframes: int) -> np.ndarray:
    """QVU8: `torch.linspace(start, end, nframes).round().long()`; `np.round` is half-to-even like `torch.round`."""
    return np.round(torch_linspace_float32(start, end, nframes)).astype(np.int64)


# ------------------------------------------------------------------------------------------------ video decoding
@dataclass
class VideoInfo:
    """What `fetch_video` did: the sampled source indices, the source's frame rate and frame count, sizes."""

    frame_indices: list[int]
    total_frames: int
    video_fps: float | None
    sample_fps: float | None
    height: int
    width: int
    resized_height: int
    resized_width: int
    source: str | None = None

    def __getitem__(self, key: str) -> Any:  # dict-style access, like qwen-vl-utils' video kwargs
        return getattr(self, key)


def _video_path(source: str | os.PathLike) -> str:
    """A local video file: `file://` stripped, URLs refused, missing files and directories named (image_io.py
    `check_media_path`)."""
    return check_media_path(source, "video")


def _open_video(path: str):
    import av  # PyAV: imported lazily so image-only users never load FFmpeg

    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise ValueError(f"could not open video {path!r}: {err}") from err
    if not container.streams.video:
        container.close()
        raise ValueError(f"video {path!r} has no video stream")
    return container


def _in_range(seconds: float | None, start: float, end: float | None) -> bool:
    # torchvision.io.read_video keeps frames whose pts lie in [start_pts, end_pts] (both inclusive).
    return seconds is None or (seconds >= start and (end is None or seconds <= end))


@dataclass
class _Probe:
    video_fps: float | None
    in_range: int  # non-empty packets whose timestamps lie in the requested range
    packets: int  # non-empty packets in the whole file (what could actually be read)
    declared: int  # the frame count the container's index declares (MP4 `stsz`/`stts`); 0 when unknown


def _probe(path: str, start: float, end: float | None) -> _Probe:
    """Frame rate and frame counts from the demuxer without decoding: one coded picture per non-empty packet. The
    count is verified by the decode pass, which falls back to the decoded count when the two disagree. The rate
    is the stream's average rate, what torchvision's reader reports as `video_fps`. `declared` is the container's
    own frame count, which exceeds what can be read when the file is truncated after its index."""
    with _open_video(path) as container:
        stream = container.streams.video[0]
        count = packets = 0
        for seconds in packet_times(container, stream):
            packets += 1
            count += _in_range(seconds, start, end)
        return _Probe(stream_fps(stream), count, packets, int(stream.frames or 0))


def stream_fps(stream) -> float | None:
    """A video stream's frame rate: its average rate (what torchvision's reader reports as `video_fps`), else the
    demuxer's guess; None when neither is known."""
    rate = stream.average_rate or stream.guessed_rate
    return float(Fraction(rate)) if rate else None


def packet_times(container, stream):
    """The presentation time in seconds (None when unknown) of each coded picture of `stream`, without decoding:
    one per non-empty packet."""
    for packet in container.demux(stream):
        if packet.size:
            yield None if packet.pts is None else float(packet.pts * stream.time_base)


def _no_frames_error(path: str, declared: int, detail: str = "") -> ValueError:
    return ValueError(f"no frames could be decoded from video {path!r} (its container declares {declared}): the "
                      f"file is truncated or corrupt{detail}")


def _decode(path: str, wanted: set[int] | None, start: float, end: float | None,
            truncated_from: int = 0) -> tuple[dict[int, np.ndarray], int]:
    """Decode every frame in the time range in presentation order; keep RGB arrays of the `wanted` indices.

    `truncated_from`: the frame count the container declares when fewer packets could be read (a cut file). The
    last, partial packet of such a file may fail to decode: it is skipped and the decoder flushed, so the frames
    before it are kept (the caller warns). In any other file a decoding error is an error."""
    import av

    kept: dict[int, np.ndarray] = {}
    count = 0
    with _open_video(path) as container:
        frames = FrameReader(container, truncated_from)
        try:
            for frame in frames:
                if not _in_range(frame.time, start, end):
                    continue
                if wanted is None or count in wanted:
                    kept[count] = frame.to_ndarray(format="rgb24")  # what torchvision's PyAV reader returns
                count += 1
        except av.error.FFmpegError as err:
            raise ValueError(f"could not decode video {path!r}: {err}") from err
    if count == 0 and frames.error is not None:
        raise _no_frames_error(path, truncated_from, f" ({frames.error})") from frames.error
    return kept, count


class FrameReader:
    """Every frame of a container's first video stream in presentation order, decoded one packet at a time (what
    `container.decode(stream)` does). `truncated_from`: the frame count the container declares when fewer packets
    could be read (a cut file): then a packet that fails to decode (its last, partial one) is skipped and the error
    kept in `.error`; in any other file the decoder's error propagates."""

    def __init__(self, container, truncated_from: int = 0):
        self.container, self.truncated_from = container, truncated_from
        self.error = None

    def __iter__(self):
        import av

        stream = self.container.streams.video[0]
        stream.thread_type = "AUTO"
        for packet in self.container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError as err:
                if not self.truncated_from:
                    raise
                self.error = err
                continue
            yield from frames


def read_video(source: str | os.PathLike, *, fps: float | None = None, nframes: int | None = None,
               min_frames: int | None = None, max_frames: int | None = None, video_start: float | None = None,
               video_end: float | None = None) -> tuple[np.ndarray, VideoInfo]:
    """Decode a video file and sample frames like QVU8's torchvision reader: all frames whose timestamps lie in
    [video_start (0.0), video_end] are the "total", `smart_nframes` picks the count and
    `torch.linspace(0, total - 1, n).round()` the indices. Returns uint8 [n, H, W, 3] at the source size."""
    path = _video_path(source)
    start = 0.0 if video_start is None else float(video_start)
    end = None if video_end is None else float(video_end)
    whole = start <= 0.0 and end is None
    probe = _probe(path, start, end)
    video_fps, total = probe.video_fps, probe.in_range
    for _attempt in range(2):
        if total == 0:
            if probe.declared > 0 and (whole or probe.packets < probe.declared):
                raise _no_frames_error(path, probe.declared)
            raise ValueError(f"video {path!r} has no frames in the requested range")
        if total < FRAME_FACTOR and nframes is None:
            # One frame: repeat it to fill the temporal patch (temporal_patch_size = FRAME_FACTOR = 2), as
            # transformers 4.57 video_processing_qwen2_vl.py `Qwen2VLVideoProcessor._preprocess` pads a frame
            # count that is not a multiple of temporal_patch_size (and qwen-vl-utils 0.0.8 `fetch_video` pads
            # frame lists). qwen-vl-utils' `smart_nframes` would raise "nframes should be in the interval [2, 1]".
            n, indices = FRAME_FACTOR, np.zeros(FRAME_FACTOR, np.int64)
        else:
            try:
                n = smart_nframes(total, video_fps, fps=fps, nframes=nframes, min_frames=min_frames,
                                  max_frames=max_frames)
            except ValueError as err:
                raise ValueError(f"video {path!r}: {err}") from None
            indices = sample_frame_indices(0, total - 1, n)
        truncated_from = probe.declared if probe.packets < probe.declared else 0
        kept, decoded = _decode(path, set(indices.tolist()), start, end, truncated_from)
        if decoded == total:
            break
        total = decoded  # the container's packet count was not the frame count: redo with the decoded count
    else:
        raise ValueError(f"video {path!r} decodes to a different number of frames on every pass")
    _warn_if_truncated(path, probe, total, whole)
    frames = np.stack([kept[i] for i in indices.tolist()])
    info = VideoInfo(frame_indices=indices.tolist(), total_frames=total, video_fps=video_fps,
                     sample_fps=None if video_fps is None else n / max(total, 1e-6) * video_fps,
                     height=frames.shape[1], width=frames.shape[2], resized_height=frames.shape[1],
                     resized_width=frames.shape[2], source=path)
    return frames, info


def _warn_if_truncated(path: str, probe: _Probe, decoded: int, whole: bool) -> None:
    """Warn when fewer frames could be read than the container's index declares (a file cut after its `moov`
    atom decodes its first frames silently). Over the whole file the decoded count is compared; for a time range
    (whose declared count is unknown) the packets read over the whole file are."""
    read = decoded if whole else probe.packets
    if probe.declared > 0 and read < probe.declared:
        what = "decoded" if whole else "could be read"
        warnings.warn(f"video {path!r}: its container declares {probe.declared} frames but only {read} {what}; "
                      "the file is probably truncated or corrupt, so only its readable part is used",
                      RuntimeWarning, stacklevel=3)


def _resize_frames(frames_thwc: np.ndarray, height: int, width: int) -> np.ndarray:
    if frames_thwc.shape[1:3] == (height, width):
        return frames_thwc
    return np.stack([np.asarray(Image.fromarray(f).resize((width, height), resample=Image.Resampling.BICUBIC))
                     for f in frames_thwc])


def fetch_video(source: Any, *, fps: float | None = None, nframes: int | None = None, min_pixels: int | None = None,
                max_pixels: int | None = None, total_pixels: int | None = None, min_frames: int | None = None,
                max_frames: int | None = None, resized_height: int | None = None, resized_width: int | None = None,
                video_start: float | None = None, video_end: float | None = None,
                image_factor: int = IMAGE_FACTOR) -> tuple[np.ndarray, VideoInfo]:
    """QVU8 `fetch_video` -> (uint8 frames [T, H', W', 3], VideoInfo).

    * A path: decode with PyAV, sample frames (`read_video`), then size every frame with qwen-vl-utils'
      `qvu_smart_resize(H, W, 28, min_pixels, max_pixels)` where min_pixels defaults to VIDEO_MIN_PIXELS and
      `max_pixels = max(min(VIDEO_MAX_PIXELS, total_pixels / T * FRAME_FACTOR), int(min_pixels * 1.05))` unless
      given (total_pixels defaults to VIDEO_TOTAL_PIXELS). Resampling is Pillow BICUBIC (see the module doc).
    * A list of frames (PIL images, arrays, paths) or an array [T, H, W, C]: no sampling; each frame goes through
      `fetch_image` (QVU8: image pixel bounds MIN_PIXELS / MAX_PIXELS unless given) and an odd count is padded by
      repeating the last frame.
    """
    if isinstance(source, (str, os.PathLike)):
        frames, info = read_video(source, fps=fps, nframes=nframes, min_frames=min_frames, max_frames=max_frames,
                                  video_start=video_start, video_end=video_end)
        n, height, width = frames.shape[:3]
        min_pixels = VIDEO_MIN_PIXELS if min_pixels is None else min_pixels
        total_pixels = VIDEO_TOTAL_PIXELS if total_pixels is None else total_pixels
        if max_pixels is None:
            max_pixels = max(min(VIDEO_MAX_PIXELS, total_pixels / n * FRAME_FACTOR), int(min_pixels * 1.05))
        if resized_height is not None and resized_width is not None:
            new_h, new_w = qvu_smart_resize(resized_height, resized_width, factor=image_factor)
        else:
            new_h, new_w = qvu_smart_resize(height, width, factor=image_factor, min_pixels=min_pixels,
                                        max_pixels=max_pixels)
        frames = _resize_frames(frames, new_h, new_w)
        info.resized_height, info.resized_width = new_h, new_w
        return frames, info

    if isinstance(source, np.ndarray):
        if source.ndim != 4:
            raise ValueError(f"a video array must be [T, H, W, C], got shape {source.shape}")
        source = list(source)
    if not isinstance(source, (list, tuple)):
        raise ValueError(f"unsupported video input of type {type(source).__name__}: expected a path, a list of "
                         "frames or an array [T, H, W, C]")
    if len(source) == 0:
        raise ValueError("the video has zero frames")
    # `fps`, `nframes`, `total_pixels`, ... are ignored for frame lists, as in QVU8 (it only reads the image keys).
    kwargs = {"min_pixels": MIN_PIXELS if min_pixels is None else min_pixels,
              "max_pixels": MAX_PIXELS if max_pixels is None else max_pixels,
              "resized_height": resized_height, "resized_width": resized_width, "size_factor": image_factor}
    first = to_pil_rgb(load_image(source[0]))
    images = [fetch_image(first, **kwargs)] + [fetch_image(f, **kwargs) for f in source[1:]]
    sizes = {im.size for im in images}
    if len(sizes) != 1:
        raise ValueError(f"all frames of a video must resize to the same size, got {sorted(sizes)}")
    indices = list(range(len(images)))
    padded = ceil_by_factor(len(images), FRAME_FACTOR)
    indices += [indices[-1]] * (padded - len(indices))  # QVU8: pad with copies of the last frame
    frames = np.stack([np.asarray(images[i]) for i in indices])
    info = VideoInfo(frame_indices=indices, total_frames=len(source), video_fps=None, sample_fps=None,
                     height=first.size[1], width=first.size[0], resized_height=frames.shape[1],
                     resized_width=frames.shape[2])
    return frames, info
