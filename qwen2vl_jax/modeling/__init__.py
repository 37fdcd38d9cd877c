"""The model math: Qwen2-VL and Qwen2.5-VL as JAX / Flax NNX modules, and nothing built on them.

Start at `model.py` (`Qwen2VL`: vision tower + decoder + LM head), then `text.py` (the decoder layer), `vision.py`
(the vision block), `rope.py` (M-RoPE and the vision rotary). docs/ARCHITECTURE.md walks the files.
"""
