"""Fixtures of the activation store and SAE tests: the tiny model (fp32), its processor, and a few prompts with
photos in the fine-tuning JSONL format (media paths relative to the file)."""

from __future__ import annotations

from pathlib import Path

import pytest
from activation_data import MAX_PIXELS, POINTS, write_prompts


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint):
    """(model, processor) of the tiny random checkpoint, fp32."""
    from qwen2vl_jax import Qwen2VLForConditionalGeneration
    from qwen2vl_jax.processing.processor import Qwen2VLProcessor

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    processor = Qwen2VLProcessor.from_pretrained(tiny_checkpoint, max_pixels=MAX_PIXELS)
    return model, processor


@pytest.fixture(scope="session")
def prompts(photos, tmp_path_factory) -> Path:
    """Four prompts: text only, one photo, two photos, one photo and a longer question."""
    return write_prompts(tmp_path_factory.mktemp("act_prompts"), photos, [
        (0, "Say hello."), (1, "What is in this picture?"), (2, "Compare the two pictures."),
        (1, "Describe the picture in detail, then count to three. " * 2)])


@pytest.fixture(scope="session")
def small_store(tiny, prompts, tmp_path_factory):
    """The four prompts' activations at POINTS, one item per forward, shards of 64 token rows."""
    from qwen2vl_jax.activations import build_store

    model, processor = tiny
    return build_store(model, processor, prompts, tmp_path_factory.mktemp("store") / "acts", POINTS,
                       shard_tokens=64, shard_bytes=None)
