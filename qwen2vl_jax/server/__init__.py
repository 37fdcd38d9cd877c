"""The OpenAI-compatible HTTP server (`app.py`), its API parsing (`api.py`), its guards (`guard.py`: host, key,
content type, body size; `media.py`: what a request may read and decode) and the attention explorer
(`explorer.py`, page in `static/`)."""
