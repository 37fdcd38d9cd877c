"""Checkpoints: the Hub, safetensors I/O, the HF <-> ours key map, loading (one host or many) and converting."""
