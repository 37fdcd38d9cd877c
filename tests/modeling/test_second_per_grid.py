"""Time-aligned video inputs for Qwen2.5-VL: `Qwen2_5_VLProcessor`'s `fps` -> `second_per_grid_ts`, and the key's
way through `from_pretrained`, the CLI, generation, hooks and training.

Oracle: transformers 4.57 `Qwen2_5_VLProcessor` itself. Its video processor needs torchvision (absent here, see
test_processing.py), so the HF processor runs with the slow HF `Qwen2VLImageProcessor` doing the video pixels (the
same numbers: test_video.py) behind a two-line adapter, and its processor-class check switched off; everything
else (the fps rule, the key order, the tensor conversion, the placeholder expansion) is transformers' code.
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings

import numpy as np
import pytest

import helpers
from qwen2vl_jax.processing.processor import Qwen2_5_VLProcessor, Qwen2VLProcessor, processor_class_for

SMALL = dict(min_pixels=3136, max_pixels=12845056)  # Qwen2-VL / Qwen2.5-VL Hub preprocessor_config.json bounds


# ------------------------------------------------------------------------------------------------ oracle
class _HFVideoAdapter:
    """transformers' slow Qwen2VLImageProcessor answering the video processor's call (`videos=`, its kwargs)."""

    def __init__(self, image_processor):
        self.image_processor = image_processor
        self.temporal_patch_size = image_processor.temporal_patch_size
        self.merge_size = image_processor.merge_size

    def __call__(self, videos, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Qwen2VLImageProcessor works only with image inputs ..." (deprecation)
            return self.image_processor(images=None, videos=videos, return_tensors=kwargs.get("return_tensors"))


@pytest.fixture(scope="module")
def hf_proc(hf_tokenizer):
    from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor as HF
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor as HFSlow

    class Oracle(HF):
        def check_argument_for_proper_class(self, argument_name, argument):  # accept the adapter
            return None

    image_processor = HFSlow(**SMALL)
    return Oracle(image_processor=image_processor, tokenizer=hf_tokenizer,
                  video_processor=_HFVideoAdapter(image_processor))


@pytest.fixture(scope="module")
def ckpt25_dir(tmp_path_factory, tokenizer_dir):
    """A tiny random Qwen2.5-VL checkpoint (config.json model_type qwen2_5_vl) with the test tokenizer files (whose
    preprocessor_config.json still says processor_class Qwen2VLProcessor, as a converted checkpoint may)."""
    return helpers.build_checkpoint_25(tmp_path_factory.mktemp("q25") / "tiny25", tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="module")
def proc25(tokenizer_dir):
    return Qwen2_5_VLProcessor.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def clips():
    return [helpers.video_frames(4, size=(56, 84)), helpers.video_frames(6, size=(84, 112), step=7)]


def _prompt(proc, n_videos, n_images=0):
    content = ([{"type": "image"}] * n_images + [{"type": "video"}] * n_videos
               + [{"type": "text", "text": "What happens?"}])
    return proc.apply_chat_template([{"role": "user", "content": content}])


# ------------------------------------------------------------------------------------------------ processor parity
FPS_CASES = {"fps1": 1.0, "default": None, "fps4": 4, "per_video": [1.0, 3.0], "per_video_array": np.array([4.0, 0.5])}


@pytest.mark.parametrize("case", FPS_CASES)
def test_second_per_grid_ts_matches_transformers(case, proc25, hf_proc, clips, photos):
    fps = FPS_CASES[case]
    text = [_prompt(proc25, 2, n_images=1)]
    image = photos["coffee"].resize((84, 56))
    kwargs = {} if fps is None else {"fps": fps}
    ours = proc25(text=text, images=[image], videos=clips, **kwargs)
    ref = hf_proc(text=text, images=[image], videos=clips, return_tensors="np", **kwargs)
    assert list(ours) == list(ref) == ["input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                       "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"]
    for key in ("input_ids", "attention_mask", "image_grid_thw", "video_grid_thw", "second_per_grid_ts"):
        np.testing.assert_array_equal(ours[key], ref[key], err_msg=key)
        assert ours[key].dtype == ref[key].dtype, key
    for key in ("pixel_values", "pixel_values_videos"):
        assert np.abs(ours[key] - ref[key]).max() <= 1e-6, key
    expected = {"fps1": [2.0, 2.0], "default": [1.0, 1.0], "fps4": [0.5, 0.5], "per_video": [2.0, 2 / 3],
                "per_video_array": [0.5, 4.0]}[case]
    assert ours["second_per_grid_ts"].tolist() == expected


def test_return_tensors_none_gives_a_list_like_transformers(proc25, hf_proc, clips):
    text = [_prompt(proc25, 2)]
    ours = proc25(text=text, videos=clips, fps=[1.0, 3.0], return_tensors=None)
    ref = hf_proc(text=text, videos=clips, fps=[1.0, 3.0])
    assert ours["second_per_grid_ts"] == ref["second_per_grid_ts"] == [2.0, 2 / 3]
    assert all(type(v) is float for v in ours["second_per_grid_ts"])


def test_batched_prompts_keep_video_order(proc25, hf_proc, clips):
    texts = [_prompt(proc25, 1), _prompt(proc25, 1)]
    ours = proc25(text=texts, videos=clips, fps=[4.0, 1.0])
    ref = hf_proc(text=texts, videos=clips, fps=[4.0, 1.0], padding=True, return_tensors="np")
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(ours["second_per_grid_ts"], ref["second_per_grid_ts"])
    assert ours["second_per_grid_ts"].tolist() == [0.5, 2.0]


def test_images_only_and_text_only_have_no_second_per_grid_ts(proc25, hf_proc, photos):
    image = photos["coffee"].resize((84, 56))
    for kwargs in ({"images": [image]}, {}):
        text = [_prompt(proc25, 0, n_images=len(kwargs.get("images", [])))]
        ours = proc25(text=text, fps=3.0, **kwargs)
        ref = hf_proc(text=text, fps=3.0, return_tensors="np", **kwargs)
        assert list(ours) == list(ref) and "second_per_grid_ts" not in ours


@pytest.mark.parametrize("fps, message", [
    (0, "positive"), (-2.0, "positive"), (float("nan"), "positive"), (float("inf"), "positive"),
    ([2.0, 0.0], "positive"), ("2", "a number or a list"), (True, "a number or a list"),
    ({"fps": 2}, "a number or a list"), ([2.0], r"The length of fps \(1\) must be equal"),
    ([1.0, 2.0, 3.0], r"The length of fps \(3\) must be equal"),
])
def test_bad_fps_raises_one_clear_error(proc25, clips, fps, message):
    with pytest.raises(ValueError, match=message):
        proc25(text=[_prompt(proc25, 2)], videos=clips, fps=fps)


def test_length_mismatch_message_is_transformers(proc25, hf_proc, clips):
    text = [_prompt(proc25, 2)]
    with pytest.raises(ValueError) as ours:
        proc25(text=text, videos=clips, fps=[1.0])
    with pytest.raises(ValueError) as ref:
        hf_proc(text=text, videos=clips, fps=[1.0])
    assert str(ours.value) == str(ref.value)


def test_qwen2_vl_processor_is_unchanged(proc, proc25, clips):
    """The Qwen2-VL processor has no fps and no second_per_grid_ts; the Qwen2.5-VL one adds only that key."""
    assert type(proc) is Qwen2VLProcessor
    text = [_prompt(proc, 2)]
    base = proc(text=text, videos=clips)
    assert list(base) == ["input_ids", "attention_mask", "pixel_values_videos", "video_grid_thw"]
    with pytest.raises(TypeError):
        proc(text=text, videos=clips, fps=2.0)
    timed = proc25(text=text, videos=clips, fps=1.0)
    assert list(timed) == list(base) + ["second_per_grid_ts"]
    for key in base:
        np.testing.assert_array_equal(timed[key], base[key])
    assert "second_per_grid_ts" not in proc.model_input_names and "second_per_grid_ts" in proc25.model_input_names


def test_video_path_uses_the_rate_actually_sampled(proc25, video_file):
    """A path is decoded with qwen-vl-utils' sampling at `fps`; the spacing is temporal_patch_size / sample_fps,
    the rate qwen-vl-utils' `process_vision_info(return_video_kwargs=True)` reports (bigbuckbunny: 132 frames at
    25 fps; 2 fps -> 10 frames -> 1.894 fps)."""
    from qwen2vl_jax.processing.video import fetch_video

    small = Qwen2_5_VLProcessor(proc25.image_processor, proc25.tokenizer,
                                type(proc25.video_processor).from_dict({"min_pixels": 3136, "max_pixels": 64 * 784}))
    out = small(text=[_prompt(proc25, 1)], videos=[video_file])
    _, info = fetch_video(video_file)
    assert info.sample_fps == pytest.approx(10 / 132 * 25)
    assert out["second_per_grid_ts"].tolist() == [2 / info.sample_fps]
    assert out["video_grid_thw"][0, 0] == 5


# ------------------------------------------------------------------------------------------------ loading
def test_from_pretrained_picks_the_family(tokenizer_dir, tmp_path, ckpt25_dir):
    import qwen2vl_jax

    assert qwen2vl_jax.Qwen2_5_VLProcessor is Qwen2_5_VLProcessor
    assert processor_class_for(tokenizer_dir) == "Qwen2VLProcessor"
    assert type(Qwen2VLProcessor.from_pretrained(tokenizer_dir)) is Qwen2VLProcessor
    assert type(Qwen2_5_VLProcessor.from_pretrained(tokenizer_dir)) is Qwen2_5_VLProcessor  # asked for by name
    # config.json model_type qwen2_5_vl (here with a stale processor_class Qwen2VLProcessor)
    assert processor_class_for(ckpt25_dir) == "Qwen2_5_VLProcessor"
    assert type(Qwen2VLProcessor.from_pretrained(ckpt25_dir)) is Qwen2_5_VLProcessor
    # processor_class Qwen2_5_VLProcessor (the Hub's Qwen2.5-VL preprocessor_config.json), no config.json
    hub = tmp_path / "hub25"
    shutil.copytree(tokenizer_dir, hub)
    config = json.loads((hub / "preprocessor_config.json").read_text())
    (hub / "preprocessor_config.json").write_text(json.dumps({**config, "processor_class": "Qwen2_5_VLProcessor"}))
    assert type(Qwen2VLProcessor.from_pretrained(hub)) is Qwen2_5_VLProcessor
    # a Qwen2-VL config.json stays Qwen2-VL; an unreadable config.json decides nothing
    (hub / "preprocessor_config.json").write_text(json.dumps(config))
    (hub / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    assert type(Qwen2VLProcessor.from_pretrained(hub)) is Qwen2VLProcessor
    (hub / "config.json").write_text("{not json")
    assert processor_class_for(hub) == "Qwen2VLProcessor"


# ------------------------------------------------------------------------------------------------ CLI
def _cli_args(model, **kw):
    base = dict(model=str(model), fps=None, max_frames=None, min_pixels=None, max_pixels=64 * 784)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("fps", [None, 4.0])
def test_cli_encode_passes_the_sampled_fps(ckpt25_dir, video_file, fps):
    """`qwen2vl-jax generate --model <Qwen2.5-VL> --video clip.mp4 --fps F`: the processor is told the rate the
    frames were sampled at (F rounded to an even frame count: 4 fps -> 22 of 132 frames at 25 fps -> 4.17 fps)."""
    from qwen2vl_jax.cli.common import encode, load_processor, messages_for
    from qwen2vl_jax.processing.video import fetch_video

    args = _cli_args(ckpt25_dir, fps=fps)
    processor = load_processor(args, ckpt25_dir)
    assert isinstance(processor, Qwen2_5_VLProcessor)
    inputs = encode(processor, messages_for("What happens?", [], [str(video_file)]), args)
    _, info = fetch_video(video_file, **({} if fps is None else {"fps": fps}))
    assert info.sample_fps == pytest.approx({None: 10, 4.0: 22}[fps] / 132 * 25)
    assert inputs["second_per_grid_ts"].tolist() == [2 / info.sample_fps]
    assert inputs["video_grid_thw"][0, 0] == len(info.frame_indices) // 2


def test_cli_encode_frames_without_a_rate_use_fps_flag(ckpt25_dir, tokenizer_dir, clips):
    from qwen2vl_jax.cli.common import encode, load_processor, messages_for

    for fps, expected in ((None, 1.0), (4.0, 0.5)):
        args = _cli_args(ckpt25_dir, fps=fps)
        inputs = encode(load_processor(args, ckpt25_dir), messages_for("Hi", [], [list(clips[0])]), args)
        assert inputs["second_per_grid_ts"].tolist() == [expected]
    # Qwen2-VL: no key, whatever --fps says
    args = _cli_args(tokenizer_dir, fps=4.0)
    inputs = encode(load_processor(args, tokenizer_dir), messages_for("Hi", [], [list(clips[0])]), args)
    assert "second_per_grid_ts" not in inputs


def test_cli_generate_hands_second_per_grid_ts_to_the_model(ckpt25_dir, video_file, monkeypatch, capsys):
    from qwen2vl_jax import cli
    from qwen2vl_jax.cli import generate as generate_command

    seen = {}

    def fake_run_generation(args, model, processor, inputs, stream, on_text=None, *, with_raw=False):
        seen.update(inputs)
        stats = {"prompt_tokens": 1, "vision_tokens": 0, "new_tokens": 1, "prefill_s": 0.0, "decode_tok_s": None}
        return ("ok", stats, "ok<|im_end|>") if with_raw else ("ok", stats)

    monkeypatch.setattr(generate_command, "run_generation", fake_run_generation)
    code = cli.main(["generate", "--model", str(ckpt25_dir), "--video", str(video_file), "--fps", "1",
                     "--max-pixels", str(64 * 784), "--prompt", "What happens?", "--dtype", "float32", "--quiet",
                     "--no-stream"])
    assert code == 0 and capsys.readouterr().out.strip() == "ok"
    # 1 fps: 132 / 25 * 1 = 5.28 -> clamped to >= 4, rounded to 6 frames -> 6 / 132 * 25 = 1.136 fps
    np.testing.assert_allclose(seen["second_per_grid_ts"], [2 / (6 / 132 * 25)], rtol=1e-12)


# ------------------------------------------------------------------------------------------------ the model side
@pytest.fixture(scope="module")
def model25(ckpt25_dir):
    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(ckpt25_dir)


def test_processor_outputs_splat_into_model_generate_hooks_and_training(model25, ckpt25_dir, clips):
    """`model(**inputs)`, `generate(model, **inputs)`, `run_with_cache(model, ..., **inputs)` and
    `prepare_batch(model, labels=..., **inputs)` take the processor's outputs, `second_per_grid_ts` included, and
    the time spacing reaches the positions."""
    from qwen2vl_jax import hooks, training
    from qwen2vl_jax.generation.decoding import generate

    processor = Qwen2VLProcessor.from_pretrained(ckpt25_dir)
    text = [_prompt(processor, 1)]
    slow, fast = (processor(text=text, videos=[clips[1]], fps=f) for f in (0.5, 2.0))  # 4 s / 1 s per grid step
    assert slow["second_per_grid_ts"].tolist() == [4.0] and fast["second_per_grid_ts"].tolist() == [1.0]

    def positions(inputs):
        return np.asarray(model25.prepare_inputs(inputs["input_ids"], inputs["attention_mask"],
                                                 pixel_values_videos=inputs["pixel_values_videos"],
                                                 video_grid_thw=inputs["video_grid_thw"],
                                                 second_per_grid_ts=inputs["second_per_grid_ts"]).position_ids_ZBT)

    video = slow["input_ids"][0] == processor.video_token_id
    t_slow, t_fast = positions(slow)[0, 0][video], positions(fast)[0, 0][video]
    # 3 temporal steps; tokens_per_second 2: 8 vs 2 positions apart
    assert sorted(set((t_slow - t_slow.min()).tolist())) == [0, 8, 16]
    assert sorted(set((t_fast - t_fast.min()).tolist())) == [0, 2, 4]

    out = model25(**slow)
    assert out.logits.shape[:2] == slow["input_ids"].shape
    ids = generate(model25, **slow, max_new_tokens=2)
    assert ids.shape == (1, slow["input_ids"].shape[1] + 2)
    assert model25.generate(**slow, max_new_tokens=2).tolist() == ids.tolist()
    hooked, cache = hooks.run_with_cache(model25, ["logits"], **slow)
    np.testing.assert_allclose(np.asarray(hooked.logits), np.asarray(out.logits), rtol=1e-5, atol=1e-5)
    batch = training.prepare_batch(model25, labels=slow["input_ids"], **slow)
    np.testing.assert_array_equal(np.asarray(batch.position_ids_ZBT), positions(slow))


def test_training_data_carries_second_per_grid_ts(ckpt25_dir, tokenizer_dir, clips, tmp_path):
    """data.py: a Qwen2.5-VL processor's `second_per_grid_ts` per example (the rate of each video as qwen-vl-utils
    reports it), concatenated over the batch in video order; a Qwen2-VL processor's batches have no such key."""
    from PIL import Image

    from qwen2vl_jax.training.data import collate, encode_conversation

    frames = []
    for k, frame in enumerate(clips[0]):
        path = tmp_path / f"f{k}.png"
        Image.fromarray(frame).save(path)
        frames.append(str(path))

    def conversation(fps=None):
        item = {"type": "video", "video": frames, **({} if fps is None else {"fps": fps})}
        return [{"role": "user", "content": [item, {"type": "text", "text": "What?"}]},
                {"role": "assistant", "content": "A rabbit."}]

    processor = Qwen2VLProcessor.from_pretrained(ckpt25_dir)
    a = encode_conversation(processor, conversation(fps=0.5))  # a frame list's "fps" option: 2 / 0.5
    b = encode_conversation(processor, conversation())  # no option: 2.0 fps
    assert a.second_per_grid_ts.tolist() == [4.0] and b.second_per_grid_ts.tolist() == [1.0]
    batch = collate([b, a, b], pad_token_id=0)
    assert batch["second_per_grid_ts"].tolist() == [1.0, 4.0, 1.0]
    assert len(batch["video_grid_thw"]) == 3
    plain = encode_conversation(Qwen2VLProcessor.from_pretrained(tokenizer_dir), conversation(fps=0.5))
    assert plain.second_per_grid_ts is None
    assert "second_per_grid_ts" not in collate([plain], pad_token_id=0)
