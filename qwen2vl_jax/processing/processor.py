"""The Qwen2-VL / Qwen2.5-VL processors: text + images + videos -> `input_ids`, `attention_mask`, `pixel_values`,
grids (and, for Qwen2.5-VL videos, `second_per_grid_ts`).

`Qwen2VLProcessor` mirrors transformers 4.57 models/qwen2_vl/processing_qwen2_vl.py `Qwen2VLProcessor`: it runs
the image processor (image.py) on images and videos, expands every `<|image_pad|>` / `<|video_pad|>` to
`prod(grid_thw) // merge_size**2` copies, tokenizes (tokenizer.py) and returns NumPy arrays under the HF keys;
`apply_chat_template` renders with tokenizer.py's chat template. Video paths are decoded by video.py.

`Qwen2_5_VLProcessor` mirrors transformers 4.57 models/qwen2_5_vl/processing_qwen2_5_vl.py: the same pieces, plus
`fps` (the rate each video's frames were sampled at) and `second_per_grid_ts = temporal_patch_size / fps` per
video, which Qwen2.5-VL's `get_rope_index` uses to space video positions in time. `Qwen2VLProcessor.from_pretrained`
returns one for a Qwen2.5-VL checkpoint (`processor_class_for`).

Each name lives in one module (the image processor in `image.py`, the tokenizer in `tokenizer.py`); this one
defines the processors. Pure preprocessing: no JAX, no torch, no transformers, no model code.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..hub import resolve_source
from .image import (
    IMAGE_PROCESSOR_KEYS,
    Qwen2VLImageProcessor,
    as_video_list,
    check_pixel_bounds,
    flat_image_list,
)
from .tokenizer import (
    DEFAULT_CHAT_TEMPLATE,
    BatchFeature,
    Qwen2Tokenizer,
    is_batched_conversation,
    named_template,
    read_json,
    render_chat_template,
)
from .video import FPS, fetch_video

# A processor needs the tokenizer / preprocessor / chat-template files of a Hub snapshot, not the weights.
PROCESSOR_PATTERNS = ["*.json", "*.txt", "*.jinja"]

__all__ = ["Qwen2VLProcessor", "Qwen2_5_VLProcessor", "processor_class_for"]

# Hub preprocessor_config.json of Qwen2-VL-*-Instruct: 4 .. 16384 visual tokens per image.
INSTRUCT_MIN_PIXELS = 56 * 56
INSTRUCT_MAX_PIXELS = 16384 * 28 * 28

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"


_PROCESSOR_ONLY_KEYS = ("padding_side", "chat_template", "video_min_pixels", "video_max_pixels", "video_size")


class Qwen2VLProcessor:
    """transformers 4.57 `Qwen2VLProcessor`: tokenizer + image processor + video processor + chat template.

    >>> proc = Qwen2VLProcessor.from_pretrained(checkpoint_dir)
    >>> prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
    ...                                     {"type": "text", "text": "Describe."}]}])
    >>> batch = proc(text=prompt, images=[photo])   # input_ids, attention_mask, pixel_values, image_grid_thw
    """

    def __init__(self, image_processor: Qwen2VLImageProcessor, tokenizer: Qwen2Tokenizer,
                 video_processor: Qwen2VLImageProcessor | None = None, chat_template: str | None = None):
        self.image_processor = image_processor
        self.video_processor = video_processor if video_processor is not None else image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template if chat_template is not None else (
            tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE)
        self.image_token, self.video_token = IMAGE_TOKEN, VIDEO_TOKEN
        for token in (IMAGE_TOKEN, VIDEO_TOKEN, VISION_START_TOKEN, VISION_END_TOKEN):
            if tokenizer.convert_tokens_to_ids(token) is None:
                raise ValueError(f"the tokenizer has no {token} token; is this a Qwen2-VL tokenizer?")
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(VISION_START_TOKEN)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(VISION_END_TOKEN)

    model_input_names = ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos",
                         "video_grid_thw"]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, local_files_only: bool | None = None,
                        revision: str | None = None, **overrides: Any) -> Qwen2VLProcessor:
        """Load from a checkpoint directory or a Hugging Face Hub model id (only the small files are fetched;
        `local_files_only` / HF_HUB_OFFLINE keep it offline).

        Files: `tokenizer.json` (required), `tokenizer_config.json`, `preprocessor_config.json`,
        `video_preprocessor_config.json` (videos; transformers 4.57 falls back to preprocessor_config.json), and
        the chat template from `chat_template.jinja`, else `chat_template.json`, else tokenizer_config's
        `chat_template`, else the Qwen2-VL-Instruct template. Absent files mean Qwen2-VL-Instruct values (pixels
        3136..12845056).

        The class: called on `Qwen2VLProcessor`, a Qwen2.5-VL checkpoint gives a `Qwen2_5_VLProcessor` (a
        subclass; see `processor_class_for`); a subclass called directly is what it builds.

        Overrides: image-processor options (`min_pixels`, `max_pixels`, `size`, `patch_size`, ...) apply to
        images and videos, as transformers 4.57 hands `from_pretrained` kwargs to both sub-processors (and, unlike
        it, are always honoured); `video_min_pixels` / `video_max_pixels` / `video_size` apply to videos only;
        `padding_side` and `chat_template` configure the text side.
        """
        path = resolve_source(path, local_files_only=local_files_only, revision=revision, patterns=PROCESSOR_PATTERNS)
        unknown = sorted(set(overrides) - set(IMAGE_PROCESSOR_KEYS) - set(_PROCESSOR_ONLY_KEYS))
        if unknown:
            raise ValueError(f"unknown {cls.__name__}.from_pretrained option(s): {', '.join(unknown)}")
        image_overrides = {k: v for k, v in overrides.items() if k in IMAGE_PROCESSOR_KEYS and v is not None}
        video_overrides = dict(image_overrides)
        for key in ("min_pixels", "max_pixels", "size"):
            if overrides.get(f"video_{key}") is not None:
                video_overrides[key] = overrides[f"video_{key}"]

        instruct = {"min_pixels": INSTRUCT_MIN_PIXELS, "max_pixels": INSTRUCT_MAX_PIXELS}
        image_config = read_json(path / "preprocessor_config.json")
        video_config = read_json(path / "video_preprocessor_config.json")
        image_config = instruct if image_config is None else image_config
        video_config = image_config if video_config is None else video_config
        image_config = image_config.get("image_processor", image_config)  # nested processor_config layouts
        video_config = video_config.get("video_processor", video_config)
        image_processor = Qwen2VLImageProcessor.from_dict(image_config, **image_overrides)
        video_processor = Qwen2VLImageProcessor.from_dict(video_config, **video_overrides)

        tokenizer_kwargs = {"padding_side": overrides["padding_side"]} if overrides.get("padding_side") else {}
        tokenizer = Qwen2Tokenizer.from_pretrained(path, **tokenizer_kwargs)
        template = overrides.get("chat_template")
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        if template is None and (path / "chat_template.json").is_file():
            template = named_template(read_json(path / "chat_template.json").get("chat_template"))
        if template is None:
            template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
        if cls is Qwen2VLProcessor and processor_class_for(path) == "Qwen2_5_VLProcessor":
            cls = Qwen2_5_VLProcessor  # a Qwen2.5-VL checkpoint: its videos need `second_per_grid_ts`
        return cls(image_processor, tokenizer, video_processor, chat_template=template)

    # --------------------------------------------------------------------------------------------- chat
    def apply_chat_template(self, conversation: list[dict] | list[list[dict]], add_generation_prompt: bool = True,
                            tokenize: bool = False, add_vision_id: bool = False, *,
                            chat_template: str | None = None, continue_final_message: bool = False,
                            return_dict: bool = False, return_tensors: str | None = "np", padding: bool | str = True,
                            **kwargs: Any):
        """Render messages with the chat template, exactly like HF's `apply_chat_template`.

        Messages: `{"role": ..., "content": str | [{"type": "image"|"video"|"text", ...}]}`. With `tokenize=True`
        the prompt is encoded; if content items carry media (`"image"`/`"url"`/`"path"`/`"base64"` on image
        items, `"video"`/`"url"`/`"path"` on video items, as transformers 4.57 collects them), the processor is run
        on them and placeholders are expanded. Returns the ids (or the whole dict with `return_dict=True`).
        """
        batched = is_batched_conversation(conversation)
        conversations = conversation if batched else [conversation]
        rendered = render_chat_template(chat_template or self.chat_template, conversations,
                                        add_generation_prompt=add_generation_prompt,
                                        continue_final_message=continue_final_message,
                                        **{**self.tokenizer.special_tokens_map, **kwargs,
                                           "add_vision_id": add_vision_id})
        text = rendered if batched else rendered[0]
        if not tokenize:
            return text
        images, videos = [], []
        for chat in conversations:
            for message in chat:
                content = message.get("content")
                if not isinstance(content, list):
                    continue
                for item in content:
                    if item.get("type") == "image":
                        images += [item[k] for k in ("image", "url", "path", "base64") if k in item]
                    elif item.get("type") == "video":
                        videos += [item[k] for k in ("video", "url", "path") if k in item]
        if images or videos:
            out = self(text=rendered, images=images or None, videos=videos or None, padding=padding,
                       return_tensors=return_tensors)
        else:
            out = self.tokenizer(rendered, padding=padding, add_special_tokens=False, return_tensors=return_tensors)
        return out if return_dict else out["input_ids"]

    # --------------------------------------------------------------------------------------------- call
    def __call__(self, text: str | Sequence[str] | None = None, images: Any = None, videos: Any = None, *,
                 padding: bool | str = True, max_length: int | None = None, padding_side: str | None = None,
                 return_tensors: str | None = "np", add_special_tokens: bool = True,
                 return_mm_token_type_ids: bool = False, min_pixels: int | None = None,
                 max_pixels: int | None = None) -> BatchFeature:
        """transformers 4.57 models/qwen2_vl/processing_qwen2_vl.py `Qwen2VLProcessor.__call__`.

        `text`: a prompt or a list of prompts containing one `<|image_pad|>` per image and one `<|video_pad|>` per
        video (the chat template writes them). `images` / `videos`: flat lists over the whole batch in prompt
        order (a single image or video may be passed bare). Returns, in HF's key order: `input_ids`,
        `attention_mask` (int64 [B, L], left padded per the tokenizer config), `pixel_values`, `image_grid_thw`,
        `pixel_values_videos`, `video_grid_thw`. `min_pixels`/`max_pixels` override the pixel bounds of this call.
        """
        if return_tensors not in ("np", None):
            raise ValueError(f"return_tensors must be 'np' or None, got {return_tensors!r}")
        # Load every input once and check the placeholder counts before the (expensive) pixel work.
        image_list = flat_image_list(images) if images is not None else []
        video_list = as_video_list(videos) if videos is not None else []
        texts = None
        if text is not None:
            texts = [text] if isinstance(text, str) else None
            texts = list(text) if isinstance(text, (list, tuple, np.ndarray)) else texts
            if not texts or not all(isinstance(t, str) for t in texts):
                got = "an empty list" if texts == [] else f"{type(text).__name__} {text!r}"[:200]
                raise ValueError(f"`text` must be a non-empty string or list of strings, got {got}")
            for token, n_given, kind in ((IMAGE_TOKEN, len(image_list), "image"),
                                         (VIDEO_TOKEN, len(video_list), "video")):
                n_found = sum(t.count(token) for t in texts)
                if n_found != n_given:
                    raise ValueError(f"{n_given} {kind}(s) given but the text has {n_found} {token} placeholder(s); "
                                     f"each {kind} needs exactly one placeholder (the chat template writes them)")

        if min_pixels is not None or max_pixels is not None:  # this call's bounds, checked even without media
            ip = self.image_processor
            check_pixel_bounds(ip.min_pixels if min_pixels is None else min_pixels,
                               ip.max_pixels if max_pixels is None else max_pixels)
        vision = BatchFeature()
        if image_list:
            vision.update(self.image_processor(images=image_list, min_pixels=min_pixels, max_pixels=max_pixels))
        if video_list:
            vision.update(self.video_processor(videos=video_list, min_pixels=min_pixels, max_pixels=max_pixels))
        if texts is None:
            return vision

        if image_list:
            texts = _expand(texts, IMAGE_TOKEN, vision["image_grid_thw"], self.image_processor.merge_size)
        if video_list:
            texts = _expand(texts, VIDEO_TOKEN, vision["video_grid_thw"], self.video_processor.merge_size)
        out = self.tokenizer(texts, padding=padding, max_length=max_length, padding_side=padding_side,
                             add_special_tokens=add_special_tokens, return_tensors=return_tensors)
        if return_mm_token_type_ids:  # transformers 4.57 marks image tokens only (5.x also marks video tokens with 2)
            ids = out["input_ids"]
            marks = [[int(i == self.image_token_id) for i in row] for row in (ids.tolist() if return_tensors else ids)]
            out["mm_token_type_ids"] = np.array(marks, dtype=np.int64) if return_tensors else marks
        out.update(vision)
        return out

    # --------------------------------------------------------------------------------------------- decode
    def batch_decode(self, sequences: Any, skip_special_tokens: bool = True,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        """Decode a batch of id sequences (special tokens skipped by default, as in HF's generation post-
        processing `post_process_image_text_to_text`; the tokenizer's own default is to keep them)."""
        return self.tokenizer.batch_decode(sequences, skip_special_tokens, clean_up_tokenization_spaces)

    def decode(self, ids: Any, skip_special_tokens: bool = True,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens, clean_up_tokenization_spaces)


class Qwen2_5_VLProcessor(Qwen2VLProcessor):
    """transformers 4.57 models/qwen2_5_vl/processing_qwen2_5_vl.py `Qwen2_5_VLProcessor`: `Qwen2VLProcessor`
    (the same tokenizer, image / video processing and chat template) plus each video's time spacing.

    >>> batch = proc(text=prompt, videos=[frames], fps=[1.0])  # ..., video_grid_thw, second_per_grid_ts
    """

    model_input_names = Qwen2VLProcessor.model_input_names + ["second_per_grid_ts"]

    def __call__(self, text: str | Sequence[str] | None = None, images: Any = None, videos: Any = None, *,
                 fps: float | Sequence[float] | None = None, return_tensors: str | None = "np",
                 **kwargs: Any) -> BatchFeature:
        """`Qwen2VLProcessor.__call__`, and with videos also `second_per_grid_ts` (after `video_grid_thw`, HF's
        key order): `temporal_patch_size / fps` seconds per temporal grid step of each video, a float64 array
        [videos] (what HF's `return_tensors="np"` gives; a list of floats with `return_tensors=None`).

        `fps`: the rate the frames of each video were sampled at, in frames per second: one number for every
        video or a list with one per video (HF's `videos_kwargs["fps"]`); default 2.0, qwen-vl-utils' rate. A
        video given as a path is decoded here (qwen-vl-utils' sampling, video.py `fetch_video`) at `fps` (default
        2.0), and its time spacing uses the rate actually sampled (`VideoInfo.sample_fps`, what qwen-vl-utils'
        `process_vision_info(..., return_video_kwargs=True)` returns), as the frame count is rounded to even.
        """
        if return_tensors not in ("np", None):
            raise ValueError(f"return_tensors must be 'np' or None, got {return_tensors!r}")
        video_list = _top_level_videos(videos) if videos is not None else []
        rates = _fps_per_video(fps, len(video_list)) if videos is not None else []  # HF ignores fps without videos
        for i, video in enumerate(video_list):
            if isinstance(video, (str, os.PathLike)):  # decode here, to know the rate sampled
                frames, info = fetch_video(video, fps=rates[i])
                video_list[i] = frames
                rates[i] = info.sample_fps if info.sample_fps else rates[i]
        rates = [FPS if r is None else r for r in rates]
        out = super().__call__(text, images, video_list if videos is not None else None,
                               return_tensors=return_tensors, **kwargs)
        if video_list:
            seconds = [self.video_processor.temporal_patch_size / r for r in rates]
            out["second_per_grid_ts"] = np.array(seconds, dtype=np.float64) if return_tensors else seconds
        return out


def _top_level_videos(videos: Any) -> list:
    """The videos of a `videos` argument as a list, one item per video (nothing decoded), by image.py
    `as_video_list`'s rule: a path or an array [T, H, W, C] is one video, so is a list whose first item is a frame
    (a PIL image or an array [H, W, C]); any other list holds videos."""
    if isinstance(videos, (str, os.PathLike)) or (isinstance(videos, np.ndarray) and videos.ndim == 4):
        return [videos]
    if isinstance(videos, (list, tuple)) and videos and (
            isinstance(videos[0], Image.Image) or (isinstance(videos[0], np.ndarray) and videos[0].ndim == 3)):
        return [videos]
    return list(videos) if isinstance(videos, (list, tuple)) else [videos]  # anything else: as_video_list says why


def _is_rate(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fps_per_video(fps: Any, n_videos: int) -> list[float | None]:
    """`fps` (None, a number, or one number per video) -> one rate per video (None: the default). Non-positive or
    non-finite rates, and a list whose length is not the number of videos, raise ValueError."""
    if fps is None:
        return [None] * n_videos
    if isinstance(fps, np.ndarray) and fps.ndim == 0:
        fps = fps.item()
    if _is_rate(fps):
        values = [fps] * n_videos
    elif isinstance(fps, (list, tuple, np.ndarray)):
        if len(fps) != n_videos:  # transformers 4.57's message
            raise ValueError(f"The length of fps ({len(fps)}) must be equal to the length of video_grid_thw "
                             f"({n_videos}) or fps should be a single number.")
        values = list(fps.tolist() if isinstance(fps, np.ndarray) else fps)
    else:
        raise ValueError(f"fps must be a number or a list of numbers (one per video), got {type(fps).__name__} "
                         f"{fps!r}"[:200])
    for value in values:
        if not _is_rate(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"fps must be a positive, finite number of frames per second, got {value!r}")
    return [float(v) for v in values]


def processor_class_for(path: str | os.PathLike) -> str:
    """"Qwen2_5_VLProcessor" or "Qwen2VLProcessor": the processor a checkpoint directory needs. A Qwen2.5-VL
    checkpoint is one whose `processor_class` (processor_config.json, preprocessor_config.json,
    video_preprocessor_config.json or tokenizer_config.json) is "Qwen2_5_VLProcessor", or whose config.json has
    `model_type` "qwen2_5_vl" (either is enough: the Qwen2.5-VL processor only adds `second_per_grid_ts`)."""
    def field(name: str, key: str):
        try:
            config = read_json(Path(path) / name)
        except ValueError:  # an unreadable file says nothing here; the loader that needs it reports it
            return None
        return config.get(key) if isinstance(config, dict) else None

    if any(field(name, "processor_class") == "Qwen2_5_VLProcessor" for name in (
            "processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
            "tokenizer_config.json")) or field("config.json", "model_type") == "qwen2_5_vl":
        return "Qwen2_5_VLProcessor"
    return "Qwen2VLProcessor"


def _expand(texts: list[str], token: str, grid_thw: np.ndarray, merge_size: int) -> list[str]:
    """transformers 4.57 `Qwen2VLProcessor.__call__`: each `token` becomes prod(grid_thw[k]) // merge_size**2
    copies, grids taken in order across the whole batch (HF goes through a temporary `<|placeholder|>`; splitting
    gives the same text)."""
    counts = iter((np.prod(grid_thw, axis=1) // merge_size**2).tolist())
    out = []
    for text in texts:
        pieces = text.split(token)
        out.append(pieces[0] + "".join(token * next(counts) + piece for piece in pieces[1:]))
    return out
