"""Videos for `qwen2vl-jax serve` (server/video_input.py, the video parts of api.py, media.py's local-file rule):
no model, no HTTP server, no network.

* a video file inside the allowed directory loads (path, `file://` URL, relative name), and the processor's output
  from it is bit-identical to the processor run on the path through processing's own `fetch_video` (both
  processors: Qwen2.5-VL's `second_per_grid_ts` included);
* a path outside the directory, a symlink pointing outside, `..`, a missing file: 403 with one text; http(s): 400;
* frame limits (`nframes`, `max_frames`, frame lists, `fps`) are refused above the operator's, and a file's
  sampled frames are capped at them;
* a frame list of image data URLs loads as processing's `fetch_video(list)` does; a frame whose header claims too
  many pixels (alone, or with the frames before it) is refused before it is decoded;
* what FFmpeg would otherwise open (an HLS playlist naming a file outside, an image, a cut file), a directory, a
  FIFO, too many bytes or too many decoded pixels: refused with 400.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

import helpers
from qwen2vl_jax.processing.processor import Qwen2_5_VLProcessor
from qwen2vl_jax.processing.video import fetch_video
from qwen2vl_jax.server import video_input
from qwen2vl_jax.server.api import RequestError, VideoRequest, parse_request, to_template_messages
from qwen2vl_jax.server.media import MediaError, MediaPolicy
from qwen2vl_jax.server.video_input import load_video, processor_video_inputs

BUNNY, BIKES, CARPHONE = "bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4"  # 1280x720 / 640x272 / 176x144


# -------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """allowed/ (the three clips, a symlink to a clip outside, a playlist naming it, an image named .mp4, a cut
    clip, a folder, a FIFO) beside outside/ (a 'secret' clip)."""
    root = tmp_path_factory.mktemp("video_media")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    for name in (BUNNY, BIKES, CARPHONE):
        shutil.copy(helpers.video_path(name), allowed / name)
    shutil.copy(helpers.video_path(CARPHONE), outside / "secret.mp4")
    os.symlink(outside / "secret.mp4", allowed / "link.mp4")
    (allowed / "playlist.m3u8").write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{outside / 'secret.mp4'}"
                                           "\n#EXT-X-ENDLIST\n")
    Image.new("RGB", (64, 48), (200, 10, 10)).save(allowed / "picture.mp4", format="PNG")
    data = (allowed / CARPHONE).read_bytes()
    (allowed / "cut.mp4").write_bytes(data[:len(data) // 3])
    (allowed / "folder.mp4").mkdir()
    os.mkfifo(allowed / "fifo.mp4")
    return root


@pytest.fixture(scope="module")
def policy(media):
    return MediaPolicy(media / "allowed")


@pytest.fixture(scope="module")
def proc25(tokenizer_dir):
    return Qwen2_5_VLProcessor.from_pretrained(tokenizer_dir)


def _png_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _huge_png(width: int, height: int) -> bytes:
    """A PNG header claiming width x height pixels, with almost no image data (decoding it would fail)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _refusal(fn) -> MediaError:
    with pytest.raises(MediaError) as info:
        fn()
    return info.value


def _video_prompt(proc, n_videos: int = 1) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": [
        *[{"type": "video_url", "video_url": {"url": f"clip{k}.mp4"}} for k in range(n_videos)],
        {"type": "text", "text": "What happens?"}]}]}
    messages, images, videos = to_template_messages(parse_request(json.dumps(body).encode()))
    assert images == [] and len(videos) == n_videos
    return proc.apply_chat_template(messages, add_generation_prompt=True)


# ------------------------------------------------------------------------------------------------ files load
def test_a_video_inside_the_allowed_directory_loads(media, policy):
    path = media / "allowed" / BUNNY
    video = load_video(str(path), policy, "messages[0].content[0]")
    assert video.frames.dtype == np.uint8 and video.frames.shape == (10, 560, 1008, 3)  # qwen-vl-utils: 10 frames
    assert video.total_frames == 132 and video.video_fps == 25.0
    assert video.fps == pytest.approx(10 / 132 * 25.0)  # the rate actually sampled
    frames, info = fetch_video(path)
    assert np.array_equal(video.frames, frames) and video.frame_indices == info.frame_indices
    assert video.fps == info.sample_fps
    for name in (f"file://{path}", BUNNY, f"file://localhost{path}"):  # a file URL, a name relative to the folder
        assert np.array_equal(load_video(name, policy).frames, frames)


@pytest.mark.parametrize("name, fps", [(BUNNY, None), (BIKES, 1.0)])
def test_processor_output_equals_the_processing_path(media, policy, proc, proc25, name, fps):
    """Bit-identical to the processors decoding the path themselves (processing/video.py `fetch_video`)."""
    path = str(media / "allowed" / name)
    video = load_video(path, policy, "v", fps=fps)
    for p in (proc, proc25):
        prompt = _video_prompt(p)
        ours = p(text=[prompt], **processor_video_inputs(p, [video]))
        if p is proc25:  # the Qwen2.5-VL processor decodes a path itself, at `fps`, and spaces it by the rate sampled
            ref = p(text=[prompt], videos=[path], fps=2.0 if fps is None else fps)
            assert ours["second_per_grid_ts"].dtype == np.float64
            assert np.array_equal(ours["second_per_grid_ts"], ref["second_per_grid_ts"])
            assert ours["second_per_grid_ts"][0] == 2 / video.fps
        else:  # Qwen2-VL's takes no fps: the path at the default rate, or fetch_video's frames at this one
            assert "fps" not in processor_video_inputs(p, [video])
            ref = p(text=[prompt], videos=[path] if fps is None else [fetch_video(path, fps=fps)[0]])
            assert "second_per_grid_ts" not in ours
        assert sorted(ours) == sorted(ref)
        for key in ("input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw"):
            assert ours[key].dtype == ref[key].dtype and np.array_equal(ours[key], ref[key]), (name, key)
    assert processor_video_inputs(proc25, []) == {}


def test_a_video_data_url_loads_like_the_file(media, policy):
    data = (media / "allowed" / CARPHONE).read_bytes()
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    from_url, from_file = load_video(url, MediaPolicy(), "v"), load_video(CARPHONE, policy, "v")
    assert from_url.frames.shape == (8, 308, 364, 3) and np.array_equal(from_url.frames, from_file.frames)
    assert from_url.fps == from_file.fps
    e = _refusal(lambda: load_video(url, MediaPolicy(max_video_bytes=len(data) - 1), "v"))
    assert e.status == 400 and "bytes per video" in e.message
    e = _refusal(lambda: load_video(_png_url(Image.new("RGB", (56, 56))), policy, "v"))
    assert e.status == 400 and "must hold a video" in e.message and "frame list" in e.message
    e = _refusal(lambda: load_video("data:video/mp4,notbase64", policy, "v"))
    assert e.status == 400 and "base64" in e.message


# ------------------------------------------------------------------------------------------- refused sources
def test_paths_outside_the_directory_are_refused_with_one_text(media, policy):
    outside, allowed = media / "outside", media / "allowed"
    answers = {}
    for name, url in [("outside", str(outside / "secret.mp4")), ("missing", str(outside / "nope.mp4")),
                      ("file_url", f"file://{outside / 'secret.mp4'}"), ("symlink_out", str(allowed / "link.mp4")),
                      ("symlink_relative", "link.mp4"), ("dotdot", f"{allowed}/../outside/secret.mp4"),
                      ("dotdot_relative", "../outside/secret.mp4"), ("etc", "/etc/passwd"), ("nul", "a\x00b")]:
        e = _refusal(lambda url=url: load_video(url, policy, "messages[0].content[0]"))
        assert e.status == 403, (name, e.message)
        answers[name] = e.message
    assert len(set(answers.values())) == 1, answers  # the same words whether or not the file exists
    assert str(outside) not in answers["outside"] and "allowed media directory" in answers["outside"]
    # no allowed directory: every path refused, one text naming the flag
    closed = {_refusal(lambda url=url: load_video(url, MediaPolicy(), "v")).message
              for url in (str(allowed / BUNNY), str(outside / "nope.mp4"), "/dev/zero", f"file://{allowed / BUNNY}")}
    assert len(closed) == 1 and "--allowed-local-media-path" in closed.pop()


def test_remote_urls_are_refused(policy):
    for url in ("http://example.com/a.mp4", "https://example.com/a.mp4", "HTTPS://example.com/a.mp4",
                "ftp://example.com/a.mp4"):
        e = _refusal(lambda url=url: load_video(url, policy, "v"))
        assert e.status == 400 and "fetches nothing" in e.message, url
    e = _refusal(lambda: load_video(["https://example.com/frame.png"], policy, "v"))  # a frame: the image rule
    assert e.status == 400 and "fetches nothing" in e.message and "v.video[0]" in e.message


def test_what_is_not_a_readable_video_is_refused(media, policy):
    # An HLS playlist naming a clip outside the directory: FFmpeg on its own opens it (and would read that file);
    # the server's demuxer whitelist refuses it.
    import av

    with av.open(str(media / "allowed" / "playlist.m3u8")) as container:
        assert container.format.name == "hls" and container.streams.video
    for name, words in [("playlist.m3u8", "could not open the video"), ("picture.mp4", "could not open the video"),
                        ("cut.mp4", "could not open the video"), ("folder.mp4", "not a regular file"),
                        ("fifo.mp4", "not a regular file"), ("missing.mp4", "no readable video file")]:
        e = _refusal(lambda name=name: load_video(name, policy, "v"))
        assert e.status == 400 and words in e.message, (name, e.message)
    playlist = (media / "allowed" / "playlist.m3u8").read_bytes()
    e = _refusal(lambda: load_video("data:video/mp4;base64," + base64.b64encode(playlist).decode(), policy, "v"))
    assert e.status == 400 and "could not open the video" in e.message
    size = (media / "allowed" / CARPHONE).stat().st_size
    e = _refusal(lambda: load_video(CARPHONE, MediaPolicy(media / "allowed", max_video_bytes=size - 1), "v"))
    assert e.status == 400 and "bytes per video" in e.message


def test_decoding_is_bounded_before_it_starts(media, monkeypatch):
    allowed = media / "allowed"
    decoded = []
    real_decode = video_input._decode
    monkeypatch.setattr(video_input, "_decode", lambda *a, **k: decoded.append(1) or real_decode(*a, **k))
    # carphone: 120 frames of 176 x 144; a budget of 50 such frames is refused from the container's counts
    small = MediaPolicy(allowed, max_video_decoded_pixels=50 * 176 * 144)
    e = _refusal(lambda: load_video(CARPHONE, small, "v"))
    assert e.status == 400 and "frames x width x height" in e.message and "176 x 144" in e.message
    e = _refusal(lambda: load_video(CARPHONE, MediaPolicy(allowed, max_pixels=176 * 144 - 1), "v"))
    assert e.status == 400 and "176 x 144 = 25344 pixels" in e.message
    assert decoded == []  # neither decoded a frame
    assert load_video(CARPHONE, MediaPolicy(allowed, max_video_decoded_pixels=120 * 176 * 144), "v").frames.shape[0]


# ---------------------------------------------------------------------------------------------- frame limits
def test_frame_limits(media, policy, photos):
    path = str(media / "allowed" / BUNNY)
    four = MediaPolicy(media / "allowed", max_video_frames=4, max_video_fps=8.0)
    for kwargs, words in [({"nframes": 66}, "nframes is 66"), ({"max_frames": 65}, "max_frames is 65"),
                          ({"fps": 31.0}, "fps is 31.0"), ({"fps": 0.0}, "fps must be a positive"),
                          ({"fps": float("nan")}, "fps must be a positive"), ({"nframes": True}, "nframes must be"),
                          ({"fps": 1.0, "nframes": 4}, "either `fps` or `nframes`")]:
        e = _refusal(lambda kwargs=kwargs: load_video(path, policy, "v", **kwargs))
        assert e.status == 400 and words in e.message, (kwargs, e.message)
    e = _refusal(lambda: load_video(path, four, "v", nframes=5))  # an odd count rounds up to 6 frames
    assert e.status == 400 and "more frames than the server takes" in e.message
    # sampling is capped at the operator's limit (and at the part's max_frames): the frames fetch_video picks then
    capped = fetch_video(path, max_frames=4)[0]
    assert capped.shape[0] == 4
    assert np.array_equal(load_video(path, four, "v").frames, capped)
    assert np.array_equal(load_video(path, policy, "v", max_frames=4).frames, capped)
    assert load_video(path, four, "v", nframes=4).frames.shape[0] == 4
    # a frame list longer than the limit
    frame = _png_url(photos["rocket"].resize((84, 56)))
    e = _refusal(lambda: load_video([frame] * 5, four, "v"))
    assert e.status == 400 and "5 frames" in e.message
    e = _refusal(lambda: load_video([], policy, "v"))
    assert e.status == 400 and "no frames" in e.message


# ----------------------------------------------------------------------------------------------- frame lists
def test_a_frame_list_of_data_urls_loads_like_fetch_video(policy, photos, proc, proc25):
    images = [photos[name].resize((168, 112)) for name in ("rocket", "coffee", "chelsea")]
    video = load_video([_png_url(im) for im in images], policy, "v", fps=1.0)
    frames, info = fetch_video(images)  # processing's frame-list path (qwen-vl-utils: padded to an even count)
    assert video.frames.shape == (4, 112, 168, 3) and np.array_equal(video.frames, frames)
    assert video.frame_indices == info.frame_indices == [0, 1, 2, 2] and video.fps == 1.0
    assert load_video([_png_url(im) for im in images], policy, "v").fps == 2.0  # qwen-vl-utils' default rate
    out = proc25(text=[_video_prompt(proc25)], **processor_video_inputs(proc25, [video]))
    ref = proc25(text=[_video_prompt(proc25)], videos=[frames], fps=[1.0])
    assert np.array_equal(out["pixel_values_videos"], ref["pixel_values_videos"])
    assert out["video_grid_thw"].tolist() == [[2, 8, 12]] and out["second_per_grid_ts"].tolist() == [2.0]
    assert np.array_equal(proc(text=[_video_prompt(proc)], **processor_video_inputs(proc, [video]))["input_ids"],
                          proc(text=[_video_prompt(proc)], videos=[frames])["input_ids"])
    # frames of different sizes, or not image URLs
    e = _refusal(lambda: load_video([_png_url(images[0]), _png_url(photos["rocket"].resize((84, 56)))], policy, "v"))
    assert e.status == 400 and "same size" in e.message and "v.video[1]" in e.message
    e = _refusal(lambda: load_video([_png_url(images[0]), "data:video/mp4;base64,AAAA"], policy, "v"))
    assert e.status == 400 and "v.video[1]" in e.message


def test_a_frame_with_a_huge_header_is_refused_before_decoding(policy, photos, monkeypatch):
    loaded = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        loaded.append(self)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    small = _png_url(photos["rocket"].resize((168, 112)))
    huge = "data:image/png;base64," + base64.b64encode(_huge_png(9000, 9000)).decode()
    e = _refusal(lambda: load_video([small, huge], policy, "v"))
    assert e.status == 400 and "9000 x 9000" in e.message and "v.video[1]" in e.message
    sizes = {im.size for im in loaded}
    assert (9000, 9000) not in sizes and (168, 112) in sizes  # the first frame decoded, the huge one not
    # each frame within max_pixels, but together past max_video_pixels: refused at the frame that passes it
    loaded.clear()
    budget = MediaPolicy(max_video_pixels=2 * 168 * 112 + 100)
    e = _refusal(lambda: load_video([small] * 3, budget, "v"))
    assert e.status == 400 and "all frames together" in e.message and str(2 * 168 * 112 + 100) in e.message
    assert len({id(im) for im in loaded}) == 2  # two frames decoded, the third refused from its header


# ------------------------------------------------------------------------------------------------- API parts
def _req(content, **extra) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": content}], **extra}).encode()


def test_video_parts_become_placeholders_and_requests():
    frames = ["data:image/png;base64,AAAA", "data:image/png;base64,BBBB"]
    req = parse_request(_req([
        {"type": "text", "text": "Compare"},
        {"type": "video_url", "video_url": {"url": "clip.mp4", "fps": 1.0, "max_frames": 8}},
        {"type": "image_url", "image_url": "data:image/png;base64,CCCC"},
        {"type": "video_url", "video_url": "file:///media/b.mp4", "nframes": 6},
        {"type": "video", "video": frames, "fps": 4},
        {"type": "video", "video": "c.webm", "fps": 0.5, "video_url": {"url": "ignored", "fps": 3.0}}]))
    messages, images, videos = to_template_messages(req)
    assert messages == [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "video"},
                                                      {"type": "image"}, {"type": "video"}, {"type": "video"},
                                                      {"type": "video"}]}]
    assert images == [("data:image/png;base64,CCCC", "messages[0].content[2]")]
    assert videos == [VideoRequest("clip.mp4", "messages[0].content[1]", fps=1.0, max_frames=8),
                      VideoRequest("file:///media/b.mp4", "messages[0].content[3]", nframes=6),
                      VideoRequest(frames, "messages[0].content[4]", fps=4.0),
                      VideoRequest("c.webm", "messages[0].content[5]", fps=0.5)]
    image_only = parse_request(_req([{"type": "image_url", "image_url": {"url": "data:image/png;base64,CCCC"}}]))
    assert to_template_messages(image_only) == ([{"role": "user", "content": [{"type": "image"}]}],
                                                [("data:image/png;base64,CCCC", "messages[0].content[0]")], [])


@pytest.mark.parametrize("part, words", [
    ({"type": "video_url"}, "needs `video_url.url`"),
    ({"type": "video_url", "video_url": {"url": ""}}, "needs `video_url.url`"),
    ({"type": "video", "video": []}, "a video part needs `video`"),
    ({"type": "video"}, "a video part needs `video`"),
    ({"type": "video_url", "video_url": "a.mp4", "fps": 0}, "fps"),
    ({"type": "video_url", "video_url": "a.mp4", "fps": "NaN"}, "fps"),
    ({"type": "video_url", "video_url": "a.mp4", "nframes": 4.5}, "nframes"),
    ({"type": "video_url", "video_url": "a.mp4", "nframes": "4"}, "nframes"),
    ({"type": "video_url", "video_url": "a.mp4", "max_frames": 0}, "max_frames"),
    ({"type": "video", "video": [1, 2]}, "video"),
])
def test_bad_video_parts_are_400(part, words):
    with pytest.raises(RequestError) as info:
        to_template_messages(parse_request(_req([part])))
    assert info.value.status == 400 and words in info.value.message, info.value.message
