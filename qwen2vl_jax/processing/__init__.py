"""Preprocessing, NumPy only (no JAX): the processor (`processor.py`), images (`image.py`, `image_io.py`), videos
(`video.py`), the tokenizer and chat template (`tokenizer.py`), qwen-vl-utils' message helper (`vision_info.py`)."""
