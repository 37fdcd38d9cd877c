"""Video: qwen-vl-utils 0.0.8 frame sampling and sizing on the real clips, and pixel parity with HF's slow path.

qwen-vl-utils itself is not installed (it needs torchvision), so its rules are checked through their published
consequences on the test clips (frame counts, sizes, grids) and `torch.linspace(...).round()` is the index oracle.
Pixel values are compared with transformers' slow `Qwen2VLImageProcessor(videos=...)` on the same frames.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import helpers
from qwen2vl_jax.processing.image_io import fetch_image, qvu_smart_resize
from qwen2vl_jax.processing.video import (
    FRAME_FACTOR,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    VIDEO_TOTAL_PIXELS,
    fetch_video,
    sample_frame_indices,
    smart_nframes,
    torch_linspace_float32,
)
from qwen2vl_jax.processing.vision_info import process_vision_info

# qwen-vl-utils 0.0.8 on the test clips: (file, frames, fps, sampled frames, per-frame size, video_grid_thw).
REAL_VIDEOS = [
    ("bigbuckbunny.mp4", 132, 25.0, 10, (560, 1008), [5, 40, 72]),
    ("bikes.mp4", 250, 25.0, 20, (280, 644), [10, 20, 46]),
    ("carphone_pristine.mp4", 120, 30000 / 1001, 8, (308, 364), [4, 22, 26]),
]


@pytest.fixture(scope="module")
def bunny(video_file):
    return fetch_video(video_file)


def hf_slow(min_pixels=3136, max_pixels=12845056):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as HFSlow

    return HFSlow(min_pixels=min_pixels, max_pixels=max_pixels)


def video_prompt(proc, question="What happens?"):
    return proc.apply_chat_template([{"role": "user", "content": [{"type": "video"},
                                                                  {"type": "text", "text": question}]}])


# ------------------------------------------------------------------------------------------------ sampling rules
def test_linspace_round_matches_torch_exactly():
    """float32 linspace + half-to-even rounding, bit for bit, over totals/counts a video reader meets."""
    checked = 0
    for total in list(range(1, 300)) + list(range(300, 40000, 397)):
        for n in (2, 4, 6, 8, 10, 16, 20, 32, 64, 100, 128, 256, 512, 768):
            if n > total:
                continue
            ref = torch.linspace(0, total - 1, n)
            assert np.array_equal(torch_linspace_float32(0, total - 1, n), ref.numpy()), (total, n)
            assert np.array_equal(sample_frame_indices(0, total - 1, n), ref.round().long().numpy()), (total, n)
            checked += 1
    # Offsets (QVU's decord reader samples [start_frame, end_frame]) and exact .5 ties (9/4*2 = 4.5 -> 4).
    for start, end, n in ((3, 50, 7), (17, 4000, 768), (0, 9, 5), (25, 75, 4)):
        assert np.array_equal(sample_frame_indices(start, end, n), torch.linspace(start, end, n).round().long())
    assert sample_frame_indices(0, 9, 5).tolist() == [0, 2, 4, 7, 9]
    assert checked > 1000


def test_smart_nframes_rules():
    assert smart_nframes(132, 25.0) == 10  # 132 / 25 * 2 = 10.56 -> rounded to even
    assert smart_nframes(250, 25.0) == 20
    assert smart_nframes(120, 30000 / 1001) == 8
    assert smart_nframes(300, 30.0) == 20  # 300 / 30 * 2 = 20
    assert smart_nframes(30, 30.0) == 4  # 2 frames at 2 fps -> min_frames 4
    assert smart_nframes(100000, 25.0) == 768  # max_frames
    assert smart_nframes(3, 25.0) == 2  # max_frames = floor2(min(768, 3)) = 2
    assert smart_nframes(132, 25.0, fps=1.0) == 6  # 5.28 -> 6
    assert smart_nframes(132, 25.0, nframes=7) == 8  # round(3.5) * 2 = 8 (banker's)
    assert smart_nframes(132, 25.0, nframes=5) == 4  # round(2.5) * 2 = 4
    assert smart_nframes(132, 25.0, min_frames=13) == 14
    with pytest.raises(ValueError, match="either"):
        smart_nframes(132, 25.0, fps=2.0, nframes=8)
    with pytest.raises(ValueError, match="interval"):
        smart_nframes(132, 25.0, nframes=200)
    with pytest.raises(ValueError, match="interval"):
        smart_nframes(1, 25.0)
    # The worked example's indices (300 frames @ 30 fps -> 20 frames).
    assert sample_frame_indices(0, 299, 20).tolist() == [0, 16, 31, 47, 63, 79, 94, 110, 126, 142, 157, 173, 189,
                                                         205, 220, 236, 252, 268, 283, 299]


def test_qvu_frame_size_rule():
    """max_pixels = max(min(VIDEO_MAX_PIXELS, total_pixels / n * 2), int(min_pixels * 1.05)) (QVU8 fetch_video)."""
    rule = lambda n, total=VIDEO_TOTAL_PIXELS, lo=VIDEO_MIN_PIXELS: max(min(VIDEO_MAX_PIXELS, total / n * FRAME_FACTOR),
                                                                       int(lo * 1.05))
    assert qvu_smart_resize(720, 1280, 28, VIDEO_MIN_PIXELS, rule(10)) == (560, 1008)
    assert qvu_smart_resize(272, 640, 28, VIDEO_MIN_PIXELS, rule(20)) == (280, 644)
    assert qvu_smart_resize(144, 176, 28, VIDEO_MIN_PIXELS, rule(8)) == (308, 364)
    # A long video: the total-pixel budget shrinks each frame (768 frames -> 50176 -> floored by min*1.05).
    assert rule(768) == int(VIDEO_MIN_PIXELS * 1.05)


# ------------------------------------------------------------------------------------------------ real videos
@pytest.mark.parametrize("name, total, fps, n, size, grid", REAL_VIDEOS, ids=[v[0] for v in REAL_VIDEOS])
def test_real_video_sampling_and_grid(proc, name, total, fps, n, size, grid):
    frames, info = fetch_video(helpers.video_path(name))
    assert info.total_frames == total and info.video_fps == pytest.approx(fps, abs=1e-9)
    assert info.frame_indices == torch.linspace(0, total - 1, n).round().long().tolist()
    assert frames.shape == (n, *size, 3) and frames.dtype == np.uint8
    assert (info.resized_height, info.resized_width) == size
    out = proc.video_processor(videos=[frames])
    assert out["video_grid_thw"].tolist() == [grid]
    assert out["pixel_values_videos"].shape == (np.prod(grid), 1176)


def test_bigbuckbunny_end_to_end_tokens(proc, hf_tokenizer, video_file):
    text = video_prompt(proc)
    out = proc(text=text, videos=[video_file])  # a path: decoded and sampled like qwen-vl-utils
    assert list(out) == ["input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw"]
    assert out["video_grid_thw"].tolist() == [[5, 40, 72]]
    assert int((out["input_ids"] == proc.video_token_id).sum()) == 3600  # 5 * 40 * 72 / 4
    expanded = text.replace("<|video_pad|>", "<|video_pad|>" * 3600)
    np.testing.assert_array_equal(out["input_ids"], hf_tokenizer([expanded], return_tensors="np")["input_ids"])


def test_sampled_frames_are_the_decoded_frames(bunny, video_file):
    """Independent decode: the k-th sampled frame is source frame indices[k], resized with Pillow BICUBIC."""
    import av

    frames, info = bunny
    wanted = {idx: k for k, idx in enumerate(info.frame_indices)}
    with av.open(str(video_file)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                rgb = Image.fromarray(frame.to_ndarray(format="rgb24"))
                expected = np.asarray(rgb.resize((1008, 560), Image.Resampling.BICUBIC))
                np.testing.assert_array_equal(frames[wanted[i]], expected)
    assert frames.std() > 10


def test_pil_resize_vs_torchvision_bicubic_antialias(bunny, video_file):
    """The one documented deviation from QVU8: frames are resized with Pillow BICUBIC, not torchvision's
    bicubic-antialias. Emulate torchvision's tensor path (float interpolate, clamp, round to uint8) with torch and
    bound the difference on the real frames (measured: max 2 levels, ~16% of values off by 1)."""
    import av

    frames, info = bunny
    raw = []
    with av.open(str(video_file)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in info.frame_indices:
                raw.append(frame.to_ndarray(format="rgb24"))
    x = torch.from_numpy(np.stack(raw)).permute(0, 3, 1, 2).float()
    tv = torch.nn.functional.interpolate(x, size=(560, 1008), mode="bicubic", align_corners=False, antialias=True)
    tv = tv.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    diff = np.abs(tv.astype(np.int16) - frames.astype(np.int16))
    print(f"\nPillow vs torch bicubic-aa: max {diff.max()} levels, mean {diff.mean():.3f}, "
          f"share off by >0: {(diff > 0).mean():.3f}")
    assert diff.max() <= 2 and diff.mean() < 0.25


def test_video_pixel_values_match_hf_slow(proc, bunny):
    frames, _ = bunny
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

    hf = hf_slow()
    # HF must not re-size the already sized frames: its smart_resize keeps 560x1008 with these bounds.
    assert hf_smart_resize(560, 1008, 28, hf.min_pixels, hf.max_pixels) == (560, 1008)
    ours = proc.video_processor(videos=[frames])
    ref = hf(images=None, videos=[frames], return_tensors="np")
    np.testing.assert_array_equal(ours["video_grid_thw"], ref["video_grid_thw"])
    diff = np.abs(ours["pixel_values_videos"] - ref["pixel_values_videos"]).max()
    print(f"\nbigbuckbunny pixel_values_videos max |ours - HF| = {diff}")
    import helpers

    helpers.record("processor/video_bigbuckbunny", max_abs_diff=float(diff),
                   video_grid_thw=ours["video_grid_thw"].tolist())
    assert diff <= 1e-6
    # Frames are T-interleaved per row: row feature order (C, T, ph, pw) with different T slices for a video.
    rows = ours["pixel_values_videos"].reshape(-1, 3, 2, 14, 14)
    assert np.abs(rows[:, :, 0] - rows[:, :, 1]).max() > 0.1


def test_odd_frame_count_pads_with_last_frame(proc, photos):
    frames = np.stack([np.asarray(photos["coffee"].resize((112, 84)).rotate(a)) for a in (0, 10, 20)])
    ours = proc.video_processor(videos=[frames])  # HF: 3 frames -> padded to 4 -> grid_t 2
    ref = hf_slow()(images=None, videos=[frames], return_tensors="np")
    assert ours["video_grid_thw"].tolist() == ref["video_grid_thw"].tolist() == [[2, 6, 8]]
    np.testing.assert_array_equal(ours["pixel_values_videos"], ref["pixel_values_videos"])
    rows = ours["pixel_values_videos"].reshape(2, 48, 3, 2, 196)
    np.testing.assert_array_equal(rows[1, :, :, 0], rows[1, :, :, 1])  # last temporal pair: frame 3 twice
    # fetch_video on a frame list: QVU8 fetch_image per frame, then the same padding.
    padded, info = fetch_video(list(frames))
    assert padded.shape[0] == 4 and info.frame_indices == [0, 1, 2, 2]
    np.testing.assert_array_equal(padded[3], padded[2])
    np.testing.assert_array_equal(padded[0], np.asarray(fetch_image(Image.fromarray(frames[0]))))


def test_frame_list_and_array_inputs_agree(proc, bunny):
    frames, _ = bunny
    as_array = proc.video_processor(videos=frames[:4])
    as_pil = proc.video_processor(videos=[[Image.fromarray(f) for f in frames[:4]]])
    np.testing.assert_array_equal(as_array["pixel_values_videos"], as_pil["pixel_values_videos"])
    assert as_array["video_grid_thw"].tolist() == [[2, 40, 72]]


def test_image_and_video_together(proc, hf_tokenizer, bunny, photos):
    frames, _ = bunny
    image = photos["chelsea"]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "?"}]}]
    text = proc.apply_chat_template(messages)
    assert text == hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = proc(text=text, images=[image], videos=[frames[:4]])
    assert list(out) == ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                         "video_grid_thw"]
    n_img = int(np.prod(out["image_grid_thw"][0])) // 4
    n_vid = int(np.prod(out["video_grid_thw"][0])) // 4
    expanded = text.replace("<|image_pad|>", "<|image_pad|>" * n_img).replace("<|video_pad|>",
                                                                              "<|video_pad|>" * n_vid)
    np.testing.assert_array_equal(out["input_ids"], hf_tokenizer([expanded], return_tensors="np")["input_ids"])


def test_video_time_range(video_file):
    frames, info = fetch_video(video_file, video_start=1.0, video_end=3.0)
    # Frames with timestamps in [1.0 s, 3.0 s] at 25 fps: 25..75 -> 51 frames -> 51 / 25 * 2 = 4.08 -> 4.
    assert info.total_frames == 51 and info.frame_indices == [0, 17, 33, 50]
    assert frames.shape[0] == 4


def test_fetch_video_options(video_file):
    frames, info = fetch_video(video_file, nframes=6, max_pixels=200 * 28 * 28)
    assert info.frame_indices == torch.linspace(0, 131, 6).round().long().tolist()
    assert frames.shape[1:3] == qvu_smart_resize(720, 1280, 28, VIDEO_MIN_PIXELS, 200 * 28 * 28)
    frames, _ = fetch_video(video_file, nframes=4, resized_height=280, resized_width=504)
    assert frames.shape == (4, 280, 504, 3)


# ------------------------------------------------------------------------------------------------ messages
def test_process_vision_info_collects_in_order(video_file, photos, tmp_path):
    path = tmp_path / "rocket.png"
    photos["rocket"].save(path)
    messages = [
        {"role": "user", "content": [
            {"type": "image", "image": photos["chelsea"]},
            {"type": "video", "video": str(video_file), "nframes": 4},
            {"type": "text", "text": "compare"},
            {"type": "image", "image": str(path), "max_pixels": 100 * 28 * 28},
            {"type": "video", "video": [photos["coffee"], photos["coffee"], photos["coffee"]]},
        ]},
    ]
    images, videos = process_vision_info(messages)
    assert [im.size for im in images] == [(448, 308), (336, 224)]  # QVU8 fetch_image sizes
    assert images[0].size == qvu_smart_resize(300, 451)[::-1]
    assert images[1].size == qvu_smart_resize(427, 640, max_pixels=100 * 28 * 28)[::-1]
    assert videos[0].shape == (4, 560, 1008, 3)
    assert videos[1].shape == (4, *qvu_smart_resize(400, 600), 3)  # 3 frames padded to 4
    assert process_vision_info([{"role": "user", "content": "text only"}]) == (None, None)
    with pytest.raises(ValueError, match="image"):
        process_vision_info([{"role": "user", "content": [{"type": "image"}]}])


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_videos_raise(proc, tmp_path):
    rng = np.random.default_rng(0)
    random_mp4 = tmp_path / "random.mp4"
    random_mp4.write_bytes(rng.integers(0, 256, 20000, dtype=np.uint8).tobytes())
    empty_mp4 = tmp_path / "empty.mp4"
    empty_mp4.write_bytes(b"")
    text = video_prompt(proc)
    with pytest.raises(ValueError, match="random.mp4"):
        proc(text=text, videos=[random_mp4])
    with pytest.raises(ValueError, match="empty.mp4"):
        fetch_video(empty_mp4)
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        fetch_video(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="zero frames"):
        proc(text=text, videos=[[]])
    with pytest.raises(ValueError, match="zero frames"):
        proc(text=text, videos=[np.zeros((0, 56, 56, 3), np.uint8)])
    with pytest.raises(ValueError, match="download"):
        fetch_video("https://example.com/clip.mp4")


def test_truncated_video_file(tmp_path, video_file):
    """The clip's index (moov) sits at the end: a file cut to its first third cannot be opened."""
    cut = tmp_path / "cut.mp4"
    data = video_file.read_bytes()
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match="cut.mp4"):
        fetch_video(cut)


@pytest.mark.parametrize("n_videos, n_placeholders", [(2, 1), (1, 2), (0, 1)])
def test_video_placeholder_count_mismatch_raises(proc, n_videos, n_placeholders):
    frames = np.zeros((2, 56, 56, 3), np.uint8)
    text = video_prompt(proc).replace("<|video_pad|>", "<|video_pad|>" * n_placeholders)
    with pytest.raises(ValueError, match="placeholder"):
        proc(text=text, videos=[frames] * n_videos or None)
