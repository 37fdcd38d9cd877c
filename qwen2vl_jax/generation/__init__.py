"""Generation: decoding over the static KV cache (`decoding.py`), sampling (`sampling.py`) and what a request
needs in memory (`memory.py`)."""
