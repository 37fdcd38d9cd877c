"""What `qwen2vl-jax serve` lets a client's video be, and how it becomes the frames the processor takes.

Three forms, as vLLM and Qwen's own API take them (api.py turns the content parts into `VideoRequest`s):

* `{"type": "video_url", "video_url": {"url": URL}}` (or the bare URL string), and `{"type": "video", "video": URL}`:
  URL is a local path or `file://` URL inside the operator's allowed media directory (media.py `open_local`: the
  image rules, the same refusal words whether or not the file exists, `O_NOFOLLOW`, regular files only,
  `max_video_bytes`), or a `data:video/...;base64,` URL. `http(s)://` is refused: the server fetches nothing.
* `{"type": "video", "video": [frame, ...]}`: the frames as image URLs (data URLs, or allowed local files), each
  checked by the image rules (media.py `open_image`: the header's width x height against `max_pixels`, and here
  also the sum over the frames against `max_video_pixels`, before the frame is decoded).

Options a part may carry (`fps`, `nframes`, `max_frames`) never go past the operator's `MediaPolicy`: `fps` at
most `max_video_fps`; `nframes` / `max_frames` above `max_video_frames` are refused; a file's fps-sampled frame
count is capped at `max_video_frames` (and at `max_frames`).

Files and video data URLs are decoded the way the processing stack decodes a video path (processing/video.py
`fetch_video`, qwen-vl-utils 0.0.8's rules: the frames whose timestamps are >= 0 are the total, `smart_nframes`
picks the count, `torch.linspace(0, total - 1, n).round()` the indices, every sampled frame is resized with
Pillow BICUBIC to `qvu_smart_resize(H, W)` under the video pixel budget), so the processor's output is
bit-identical to handing it the path (tests/server/test_server_video.py). The differences are the server's:

* the decoder reads the file descriptor media.py opened (or the data URL's bytes), never a path, so what was
  checked is what is decoded;
* only the MP4 / MOV, Matroska / WebM and AVI demuxers (FFmpeg `format_whitelist`) and the H.264, HEVC, VP8,
  VP9, AV1 and MPEG-4 Part 2 decoders are used, no protocol is allowed and any nested open (an HLS or concat
  playlist, an MP4 data reference) is refused: a "video" cannot make FFmpeg read another file or a URL;
* the work is bounded before anything is decoded: the frame size from the container against `max_pixels`, and
  the frames x width x height of the whole file (every frame is decoded to reach the sampled ones) against
  `max_video_decoded_pixels`; while decoding, the same bounds are checked on the frames themselves (a stream
  that changes size mid-way);
* each sampled frame is resized as soon as it is decoded, so a request never holds more than one full-size frame.

Data URLs of videos are accepted: their bytes go through exactly the same demuxer / decoder whitelist and bounds
as a file the operator allows (the bytes are also bounded by the request body limit). Frame lists are sized as
`fetch_video` sizes a list (qwen-vl-utils 0.0.8: each frame by the image rule, `fetch_image`; an odd count padded
with the last frame), and their rate is the part's `fps` (default 2.0), as qwen-vl-utils reports it.

`processor_video_inputs(processor, videos)` is what the processor call needs: the frame arrays, and for a
Qwen2.5-VL processor the rate of each (`fps`, from which it computes `second_per_grid_ts = temporal_patch_size /
fps`).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..processing.image_io import IMAGE_FACTOR, fetch_image, qvu_smart_resize
from ..processing.video import (
    FPS,
    FPS_MAX_FRAMES,
    FRAME_FACTOR,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    VIDEO_TOTAL_PIXELS,
    FrameReader,
    packet_times,
    sample_frame_indices,
    smart_nframes,
    stream_fps,
)
from .media import REMOTE_PREFIXES, MediaError, MediaPolicy, open_image

__all__ = ["LoadedVideo", "load_video", "processor_video_inputs", "DEMUXERS", "DECODERS"]

# FFmpeg demuxer names (the mov demuxer's name lists its formats) and decoder names the server uses.
DEMUXERS = ("mov,mp4,m4a,3gp,3g2,mj2", "matroska,webm", "avi")
DECODERS = frozenset({"h264", "hevc", "vp8", "vp9", "libvpx", "libvpx-vp9", "av1", "libdav1d", "libaom-av1",
                      "mpeg4"})
_KINDS = "MP4 / MOV, Matroska / WebM or AVI holding H.264, HEVC, VP8, VP9, AV1 or MPEG-4 video"


@dataclass
class LoadedVideo:
    """One video ready for the processor: `frames` uint8 [T, H, W, 3] (sized as processing's `fetch_video`
    sizes them), `fps` the rate of those frames in frames per second (a file: the rate actually sampled,
    `VideoInfo.sample_fps`; a frame list: the part's `fps`, default 2.0): Qwen2.5-VL's processor turns it into
    `second_per_grid_ts`. `frame_indices`: the source frames taken (a list: with the padding frame);
    `total_frames`: frames in the source; `video_fps`: the file's own rate (None for a frame list)."""

    frames: np.ndarray
    fps: float
    where: str
    frame_indices: list[int]
    total_frames: int
    video_fps: float | None = None


def load_video(source: str | Sequence[str], policy: MediaPolicy, where: str = "video", *,
               fps: float | None = None, nframes: int | None = None,
               max_frames: int | None = None) -> LoadedVideo:
    """A client's video -> `LoadedVideo`, or MediaError (`.status` 400, or 403 for a local path the policy
    forbids; `.message` names `where`).

    `source`: a local path / `file://` URL inside the allowed directory or a `data:video/...;base64,` URL (decoded
    and sampled: `fps`, default 2.0, or exactly `nframes`; at most `max_frames` and `policy.max_video_frames`
    frames), or a list of image URLs, one per frame (`fps` is their rate, default 2.0; `nframes` / `max_frames`
    are checked against the policy but, as in qwen-vl-utils, do not drop frames)."""
    fps = _rate(fps, policy, where)
    nframes = _count(nframes, "nframes", policy, where)
    max_frames = _count(max_frames, "max_frames", policy, where)
    if fps is not None and nframes is not None:
        raise MediaError(f"{where}: give either `fps` or `nframes`, not both")
    if isinstance(source, (list, tuple)):
        return _frame_list(source, policy, where, fps)
    if not isinstance(source, str) or not source:
        raise MediaError(f"{where}: a video must be a URL string or a list of image URLs (one per frame)")
    limit = policy.max_video_frames if max_frames is None else min(max_frames, policy.max_video_frames)
    if source[:5].lower() == "data:":
        data = _data_url_bytes(source, policy.max_video_bytes, where)
        return _decode_file(io.BytesIO(data), policy, where, fps, nframes, limit)
    if source.lower().startswith(REMOTE_PREFIXES):
        raise MediaError(f"{where}: this server fetches nothing over the network; send the video as a data URL "
                         "(data:video/mp4;base64,...) or as a list of image data URLs, one per frame")
    fd, _ = policy.open_local(source, where, kind="video", max_bytes=policy.max_video_bytes)
    with os.fdopen(fd, "rb") as f:
        return _decode_file(f, policy, where, fps, nframes, limit)


def processor_video_inputs(processor: Any, videos: Sequence[LoadedVideo]) -> dict:
    """The processor call's video arguments: `{"videos": [frames, ...]}`, plus `fps` (one rate per video) for a
    processor that computes `second_per_grid_ts` (Qwen2.5-VL's); `{}` without videos."""
    if not videos:
        return {}
    out: dict[str, Any] = {"videos": [v.frames for v in videos]}
    if "second_per_grid_ts" in getattr(processor, "model_input_names", ()):
        out["fps"] = [v.fps for v in videos]
    return out


# ------------------------------------------------------------------------------------------------- options
def _rate(fps: Any, policy: MediaPolicy, where: str) -> float | None:
    if fps is None:
        return None
    if not isinstance(fps, numbers.Real) or isinstance(fps, bool) or not math.isfinite(fps) or fps <= 0:
        raise MediaError(f"{where}: fps must be a positive number of frames per second, got {fps!r}"[:300])
    if fps > policy.max_video_fps:
        raise MediaError(f"{where}: fps is {fps}, more than the server samples ({policy.max_video_fps} frames per "
                         "second)")
    return float(fps)


def _count(value: Any, name: str, policy: MediaPolicy, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise MediaError(f"{where}: {name} must be a positive whole number of frames, got {value!r}"[:300])
    if value > policy.max_video_frames:
        raise MediaError(f"{where}: {name} is {value}, more frames than the server takes per video "
                         f"({policy.max_video_frames})")
    return int(value)


def _data_url_bytes(text: str, max_bytes: int, where: str) -> bytes:
    """The bytes of a `data:video/...;base64,...` URL, its length checked before decoding."""
    head, sep, payload = text.partition(",")
    kind = head[5:].split(";", 1)[0].strip().lower() or "text/plain"  # RFC 2397: no type is text/plain
    if not kind.startswith("video/"):
        raise MediaError(f"{where}: a video data URL must hold a video (data:video/mp4;base64,...), got "
                         f"data:{kind[:40]}; send images as a frame list: "
                         '{"type": "video", "video": ["data:image/png;base64,...", ...]}')
    if not sep or not head.lower().endswith(";base64"):
        raise MediaError(f"{where}: a video data URL must be base64 encoded (data:video/mp4;base64,...)")
    too_big = MediaError(f"{where}: the video data has more than the server's limit of {max_bytes} bytes per video")
    if len(payload) > (max_bytes * 4) // 3 + 4:  # before decoding
        raise too_big
    try:
        data = base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"{where}: could not decode the base64 video data: {e}") from None
    if len(data) > max_bytes:
        raise too_big
    if not data:
        raise MediaError(f"{where}: the video data is empty")
    return data


# ---------------------------------------------------------------------------------------------- frame lists
def _frame_list(frames: Sequence[Any], policy: MediaPolicy, where: str, fps: float | None) -> LoadedVideo:
    """processing/video.py `fetch_video(list)`: each frame opened (here: by the image rules) and sized with
    `fetch_image`, all to one size; an odd count padded with the last frame."""
    if len(frames) == 0:
        raise MediaError(f"{where}: the video has no frames")
    if len(frames) > policy.max_video_frames:
        raise MediaError(f"{where}: the video has {len(frames)} frames, more than the server takes per video "
                         f"({policy.max_video_frames})")
    used = 0

    def budget(width: int, height: int) -> None:  # before the frame is decoded
        if used + width * height > policy.max_video_pixels:
            raise MediaError(f"{where}: the video's frames have more than the server's limit of "
                             f"{policy.max_video_pixels} pixels per video (all frames together); send fewer or "
                             "smaller frames")

    images: list[Image.Image] = []
    for k, url in enumerate(frames):
        at = f"{where}.video[{k}]"
        if not isinstance(url, str):
            raise MediaError(f"{at}: a frame must be an image URL string")
        image = open_image(policy.image_bytes(url, at), policy, at, budget)
        used += image.width * image.height
        try:
            sized = fetch_image(image)  # to_pil_rgb + qvu_smart_resize + Pillow BICUBIC, as fetch_video's list
        except ValueError as e:  # qvu_smart_resize: too extreme an aspect ratio
            raise MediaError(f"{at}: cannot use this frame: {e}") from None
        del image
        if images and sized.size != images[0].size:
            raise MediaError(f"{at}: all frames of a video must resize to the same size; this one is "
                             f"{sized.size[0]} x {sized.size[1]}, the first {images[0].size[0]} x {images[0].size[1]}")
        images.append(sized)
    indices = list(range(len(images)))
    padded = math.ceil(len(indices) / FRAME_FACTOR) * FRAME_FACTOR
    indices += [indices[-1]] * (padded - len(indices))  # qwen-vl-utils: pad with copies of the last frame
    stack = np.stack([np.asarray(images[i]) for i in indices])
    return LoadedVideo(frames=stack, fps=FPS if fps is None else fps, where=where, frame_indices=indices,
                       total_frames=len(frames))


# ---------------------------------------------------------------------------------------------- video files
def _no_nested_open(url: str, flags: int, options: dict):
    raise PermissionError("this server's videos cannot refer to other files or URLs")


def _reason(err: BaseException) -> str:
    return str(getattr(err, "strerror", None) or err)[:200]


def _open(f, where: str):
    """An FFmpeg container over the file object `f` (from its start), only with the whitelisted demuxers."""
    try:
        import av
    except ImportError:
        raise MediaError(f"{where}: this server cannot decode video files (PyAV is not installed); send the "
                         "video as a list of image data URLs, one per frame") from None
    f.seek(0)
    try:
        container = av.open(f, "r", container_options={"format_whitelist": ",".join(DEMUXERS),
                                                       "codec_whitelist": ",".join(sorted(DECODERS)),
                                                       "protocol_whitelist": "none"},
                            metadata_errors="replace", io_open=_no_nested_open)
    except (av.error.FFmpegError, OSError, ValueError, EOFError, RuntimeError) as e:
        raise MediaError(f"{where}: could not open the video ({_reason(e)}); the server reads {_KINDS}") from None
    if container.format.name not in DEMUXERS or not container.streams.video:
        container.close()
        raise MediaError(f"{where}: the file has no video stream the server reads ({_KINDS})")
    return container


@dataclass
class _Probe:
    video_fps: float | None
    in_range: int  # non-empty packets with a timestamp >= 0 (or none): the frames qwen-vl-utils counts
    packets: int  # non-empty packets in the file
    declared: int  # the frame count the container declares (0: unknown)
    width: int
    height: int


def _probe(f, policy: MediaPolicy, where: str) -> _Probe:
    """processing/video.py `_probe` (rate and frame counts from the demuxer, nothing decoded), plus the checks
    that bound the decoding: codec, frame size, frames x size."""
    import av

    try:
        with _open(f, where) as container:
            stream = container.streams.video[0]
            codec = stream.codec_context.name
            if codec not in DECODERS:
                raise MediaError(f"{where}: the video is coded as {codec}, which the server does not decode; send "
                                 f"{_KINDS}")
            width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
            if width < 1 or height < 1:
                raise MediaError(f"{where}: the video does not declare its frame size")
            _check_frame(width, height, policy, where)
            count = packets = 0
            for seconds in packet_times(container, stream):
                packets += 1
                if packets * width * height > policy.max_video_decoded_pixels:
                    raise _too_long(packets, width, height, policy, where, "at least ")
                count += seconds is None or seconds >= 0
            return _Probe(stream_fps(stream), count, packets, int(stream.frames or 0), width, height)
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError, RuntimeError) as e:
        raise MediaError(f"{where}: could not read the video: {_reason(e)}") from None


def _check_frame(width: int, height: int, policy: MediaPolicy, where: str) -> None:
    if width * height > policy.max_pixels:
        raise MediaError(f"{where}: the video's frames are {width} x {height} = {width * height} pixels, more than "
                         f"the server decodes ({policy.max_pixels} pixels per frame, --max-image-pixels); send it "
                         "smaller")


def _too_long(frames: int, width: int, height: int, policy: MediaPolicy, where: str, some: str = "") -> MediaError:
    return MediaError(f"{where}: the video has {some}{frames} frames of {width} x {height} pixels; decoding it would "
                      f"take more than the server's limit of {policy.max_video_decoded_pixels} pixels per video "
                      "(frames x width x height); send a shorter or smaller video")


def _frame_size(n: int, height: int, width: int) -> tuple[int, int]:
    """processing/video.py `fetch_video`'s size for n sampled frames of height x width (its defaults)."""
    max_pixels = max(min(VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS / n * FRAME_FACTOR), int(VIDEO_MIN_PIXELS * 1.05))
    return qvu_smart_resize(height, width, factor=IMAGE_FACTOR, min_pixels=VIDEO_MIN_PIXELS, max_pixels=max_pixels)


def _decode(f, wanted: set[int], n: int, truncated_from: int, policy: MediaPolicy,
            where: str) -> tuple[dict[int, np.ndarray], int]:
    """processing/video.py `_decode` over the whole file: every frame in presentation order, those at `wanted`
    indices kept, each resized (`_frame_size`) as soon as it is decoded. A cut file's last, partial packet may
    fail to decode (skipped, as there); any other decoding error is an error."""
    import av

    kept: dict[int, np.ndarray] = {}
    count = decoded_pixels = 0
    source = target = None
    try:
        with _open(f, where) as container:
            frames = FrameReader(container, truncated_from)
            for frame in frames:
                _check_frame(frame.width, frame.height, policy, where)
                decoded_pixels += frame.width * frame.height
                if decoded_pixels > policy.max_video_decoded_pixels:
                    raise _too_long(count + 1, frame.width, frame.height, policy, where, "at least ")
                if frame.time is not None and frame.time < 0:
                    continue
                if count in wanted:
                    array = frame.to_ndarray(format="rgb24")  # what processing's reader keeps
                    if source is None:
                        source = array.shape[:2]
                        try:
                            target = _frame_size(n, *source)
                        except ValueError as e:  # too extreme an aspect ratio
                            raise MediaError(f"{where}: cannot use this video: {e}") from None
                    elif array.shape[:2] != source:
                        raise MediaError(f"{where}: the video's frames change size ({source[1]} x {source[0]}, "
                                         f"then {array.shape[1]} x {array.shape[0]})")
                    if array.shape[:2] != target:
                        array = np.asarray(Image.fromarray(array).resize((target[1], target[0]),
                                                                          resample=Image.Resampling.BICUBIC))
                    kept[count] = array
                count += 1
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError, RuntimeError) as e:
        raise MediaError(f"{where}: could not decode the video: {_reason(e)}") from None
    if count == 0 and frames.error is not None:
        raise MediaError(f"{where}: no frames could be decoded from the video (its container declares "
                         f"{truncated_from}): the file is truncated or corrupt")
    return kept, count


def _decode_file(f, policy: MediaPolicy, where: str, fps: float | None, nframes: int | None,
                 limit: int) -> LoadedVideo:
    """processing/video.py `read_video` + `fetch_video` (whole video, default pixel bounds) over a file object,
    with the frame count capped at `limit`."""
    probe = _probe(f, policy, where)
    total = probe.in_range
    for _attempt in range(2):
        if total == 0:
            if probe.declared > 0:
                raise MediaError(f"{where}: no frames could be decoded from the video (its container declares "
                                 f"{probe.declared}): the file is truncated or corrupt")
            raise MediaError(f"{where}: the video has no frames")
        if total < FRAME_FACTOR and nframes is None:  # one frame: twice (processing/video.py `read_video`)
            n, indices = FRAME_FACTOR, np.zeros(FRAME_FACTOR, np.int64)
        else:
            try:
                n = smart_nframes(total, probe.video_fps, fps=fps, nframes=nframes,
                                  max_frames=None if nframes is not None else min(FPS_MAX_FRAMES, total, limit))
            except ValueError as e:
                raise MediaError(f"{where}: {e}") from None
            if n > policy.max_video_frames:  # an odd nframes rounds up to even
                raise MediaError(f"{where}: nframes {nframes} gives {n} frames (an even count), more than the "
                                 f"server takes per video ({policy.max_video_frames})")
            indices = sample_frame_indices(0, total - 1, n)
        truncated_from = probe.declared if probe.packets < probe.declared else 0
        kept, decoded = _decode(f, set(indices.tolist()), n, truncated_from, policy, where)
        if decoded == total:
            break
        total = decoded  # the demuxer's packet count was not the frame count: again with the decoded count
    else:
        raise MediaError(f"{where}: the video decodes to a different number of frames on every pass")
    frames = np.stack([kept[i] for i in indices.tolist()])
    sample_fps = None if probe.video_fps is None else n / max(total, 1e-6) * probe.video_fps
    rate = sample_fps if sample_fps else (FPS if fps is None else fps)  # as Qwen2_5_VLProcessor does for a path
    return LoadedVideo(frames=frames, fps=rate, where=where, frame_indices=indices.tolist(), total_frames=total,
                       video_fps=probe.video_fps)
