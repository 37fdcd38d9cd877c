"""qwen-vl-utils 0.0.8 ("QVU8") `process_vision_info`: chat messages -> (images, videos) ready for the processor.

Walks the messages' content items in order (`extract_vision_info`) and loads each: images with image_io.py
`fetch_image`, videos with video.py `fetch_video`, honouring the per-item options as qwen-vl-utils does.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .image_io import fetch_image
from .video import fetch_video

__all__ = ["extract_vision_info", "process_vision_info"]


VIDEO_OPTIONS = ("fps", "nframes", "min_pixels", "max_pixels", "total_pixels", "min_frames", "max_frames",
                  "resized_height", "resized_width", "video_start", "video_end")
IMAGE_OPTIONS = ("min_pixels", "max_pixels", "resized_height", "resized_width")


def extract_vision_info(conversations: list[dict] | list[list[dict]]) -> list[dict]:
    """Every image/video content item of one conversation or a batch of them, in order (QVU8)."""
    if not conversations:
        return []
    if isinstance(conversations[0], dict):
        conversations = [conversations]
    infos = []
    for conversation in conversations:
        for message in conversation:
            content = message.get("content")
            if isinstance(content, list):
                for item in content:
                    if ("image" in item or "image_url" in item or "video" in item
                            or item.get("type") in ("image", "image_url", "video")):
                        infos.append(item)
    return infos


def process_vision_info(conversations: list[dict] | list[list[dict]]
                        ) -> tuple[list[Image.Image] | None, list[np.ndarray] | None]:
    """QVU8 `process_vision_info`: (images, videos) of the messages in order, `None` where there are none.

    Images come back as RGB PIL images already resized by `fetch_image`; videos as uint8 arrays [T, H, W, 3] from
    `fetch_video` (QVU8 returns float tensors with the same integer values). Per-item options (`min_pixels`,
    `max_pixels`, `fps`, `nframes`, `total_pixels`, ...) are honoured as in qwen-vl-utils.
    """
    images, videos = [], []
    for item in extract_vision_info(conversations):
        if "image" in item or "image_url" in item:
            source = item["image"] if "image" in item else item["image_url"]
            if isinstance(source, dict) and "url" in source:
                source = source["url"]
            images.append(fetch_image(source, **{k: item[k] for k in IMAGE_OPTIONS if k in item}))
        elif "video" in item:
            frames, _ = fetch_video(item["video"], **{k: item[k] for k in VIDEO_OPTIONS if k in item})
            videos.append(frames)
        else:
            raise ValueError("a content item of type image/video needs the media under `image`, `image_url` or "
                             f"`video`; got keys {sorted(item)}")
    return images or None, videos or None
