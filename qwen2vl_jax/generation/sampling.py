"""Decoding settings and transformers' logits processors: `GenerationConfig` (named like transformers' and read
from a checkpoint's generation_config.json), the traced `Knobs` of one call, `process_logits` and `pick_token`.

Logits processing follows transformers 4.57 `generation/utils.py` `_get_logits_processor` order: repetition penalty
(over every id in the row so far, prompt and its pads included, as `RepetitionPenaltyLogitsProcessor`),
min_new_tokens (EOS masked), then only when sampling: temperature, top-k, top-p; greedy is the argmax.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["GenerationConfig", "Knobs", "process_logits", "pick_token", "SEED_MAX"]

# Seeds: 0 .. 2**63 - 1, what `jax.random.key` takes (it converts a Python int to int64; larger ones overflow).
SEED_MAX = 2**63 - 1
SEED_RANGE = "[0, 2**63 - 1]"


def seed_problem(seed) -> str | None:
    """Why `seed` is not a valid seed (None when it is): an integer (not a bool) in `SEED_RANGE`."""
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        return f"must be an integer in {SEED_RANGE}, got {seed!r}"
    return None


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings, named like transformers' GenerationConfig (and read from generation_config.json)."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50  # transformers' default; 0 disables
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    eos_token_id: tuple[int, ...] = (151645,)
    pad_token_id: int | None = None
    seed: int = 0

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike | None, **overrides) -> GenerationConfig:
        """Defaults from the checkpoint's generation_config.json (Instruct: greedy-like sampling with top_k=1 and
        repetition_penalty 1.05), then `overrides`."""
        values = {}
        path = Path(directory) / "generation_config.json" if directory else None
        if path is not None and path.is_file():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
            if not isinstance(raw, dict):
                raise ValueError(f"{path} does not hold a JSON object")
            for f in dataclasses.fields(cls):
                if f.name in raw and raw[f.name] is not None:
                    values[f.name] = raw[f.name]
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values.get("eos_token_id"), int):
            values["eos_token_id"] = (values["eos_token_id"],)
        if "eos_token_id" in values:
            values["eos_token_id"] = tuple(values["eos_token_id"])
        return cls(**values)

    def __post_init__(self):
        # NumPy scalars (np.int64(4), np.float32(0.7), np.bool_) become Python numbers, so they validate, hash
        # and bucket like the Python values; anything else is left for `validate` to name.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, np.bool_):
                value = bool(value)
            elif isinstance(value, np.integer):
                value = int(value)
            elif isinstance(value, np.floating):
                value = float(value)
            if f.name == "eos_token_id" and isinstance(value, int) and not isinstance(value, bool):
                value = (value,)
            elif f.name == "eos_token_id" and isinstance(value, (list, tuple, np.ndarray)):
                value = tuple(np.asarray(value).ravel().tolist())
            object.__setattr__(self, f.name, value)

    def validate(self, vocab_size: int) -> None:
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN

        eos = self.eos_token_id if isinstance(self.eos_token_id, tuple) else ()
        pad = self.pad_token_id
        checks = [
            (is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens",
             f"must be an integer >= 1, got {self.max_new_tokens!r}"),
            (is_int(self.min_new_tokens) and self.min_new_tokens >= 0, "min_new_tokens",
             f"must be an integer >= 0, got {self.min_new_tokens!r}"),
            (isinstance(self.do_sample, bool), "do_sample", f"must be True or False, got {self.do_sample!r}"),
            (is_num(self.temperature) and self.temperature >= 0, "temperature",
             f"must be a number >= 0, got {self.temperature!r}"),
            (not (self.do_sample and self.temperature == 0), "temperature",
             "must be > 0 when sampling (use do_sample=False for greedy decoding)"),
            (is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}"),
            (is_int(self.top_k) and self.top_k >= 0, "top_k", f"must be an integer >= 0, got {self.top_k!r}"),
            (is_num(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
             f"must be > 0, got {self.repetition_penalty!r}"),
            (len(eos) > 0 and all(is_int(e) and 0 <= e < vocab_size for e in eos), "eos_token_id",
             f"needs at least one id, each in [0, {vocab_size}), got {self.eos_token_id!r}"),
            (pad is None or (is_int(pad) and 0 <= pad < vocab_size), "pad_token_id",
             f"must be None or an id in [0, {vocab_size}), got {pad!r}"),
            (seed_problem(self.seed) is None, "seed", seed_problem(self.seed)),
        ]
        for ok, name, message in checks:
            if not ok:
                raise ValueError(f"invalid generation parameter `{name}`: {message}")

    @property
    def pad_id(self) -> int:
        return self.pad_token_id if self.pad_token_id is not None else self.eos_token_id[0]  # HF's fallback


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Knobs:
    """Per-call sampling values, traced (changing them never recompiles)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    repetition_penalty: jax.Array
    min_new_tokens: jax.Array
    max_new_tokens: jax.Array
    eos_ids: jax.Array  # [E]
    pad_id: jax.Array


def process_logits(logits_BV, seen_BV, n_generated, knobs: Knobs, *, do_sample: bool, truncate: bool = True):
    """transformers 4.57's processor chain on fp32 logits (see module docstring for the order). `truncate=False`
    leaves out top-k / top-p, for a caller that knows every row has top_k 0 and top_p 1 (they change nothing then,
    and their sort of the vocabulary is the costly part on a CPU)."""
    neg_inf = jnp.float32(-jnp.inf)
    p = knobs.repetition_penalty
    penalised = jnp.where(logits_BV < 0, logits_BV * p, logits_BV / p)
    scores = jnp.where(seen_BV, penalised, logits_BV)
    is_eos_V = jnp.zeros(scores.shape[-1], bool).at[knobs.eos_ids].set(True)
    scores = jnp.where((n_generated < knobs.min_new_tokens) & is_eos_V[None], neg_inf, scores)
    if not do_sample:
        return scores
    # TemperatureLogitsWarper (scores / temperature). A temperature that underflows float32 (1e-300 is 0.0: 0 / 0 is
    # NaN, and torch.multinomial then refuses the row) or so small that a finite score / temperature overflows to
    # +inf (several infs: NaN probabilities) is taken as its limit t -> 0: only the row's largest scores stay
    # (ties together), so sampling picks the argmax, as greedy does.
    scaled = scores / knobs.temperature
    overflow = (knobs.temperature <= 0) | jnp.any(jnp.isposinf(scaled) & jnp.isfinite(scores), -1, keepdims=True)
    top = jnp.max(scores, axis=-1, keepdims=True)
    scores = jnp.where(overflow, jnp.where(scores == top, jnp.float32(0), neg_inf), scaled)
    if not truncate:
        return scores
    # One sort serves top-k and top-p (TopKLogitsWarper, TopPLogitsWarper, min_tokens_to_keep=1).
    sorted_desc = -jnp.sort(-scores, axis=-1)
    V = scores.shape[-1]
    k = jnp.where(knobs.top_k > 0, jnp.minimum(knobs.top_k, V), V)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[None, None].repeat(scores.shape[0], 0), axis=-1)
    scores = jnp.where(scores < kth, neg_inf, scores)
    # top-p on the (top-k filtered) scores: drop the low tail whose total probability is <= 1 - top_p. The filtered
    # scores sorted ascending are the descending sort reversed with the same filter (the values below kth come
    # first): the same array a second sort would give, without its cost.
    sorted_asc = sorted_desc[:, ::-1]
    sorted_asc = jnp.where(sorted_asc < kth, neg_inf, sorted_asc)
    cum = jnp.cumsum(jax.nn.softmax(sorted_asc, axis=-1), axis=-1)
    remove_sorted = (cum <= 1 - knobs.top_p).at[:, -1].set(False)
    # the threshold: the largest removed value; everything <= it goes (ties removed together, like a scatter)
    cutoff = jnp.max(jnp.where(remove_sorted, sorted_asc, neg_inf), axis=-1, keepdims=True)
    apply = knobs.top_p < 1.0
    return jnp.where(apply & (scores <= cutoff) & jnp.any(remove_sorted, -1, keepdims=True), neg_inf, scores)


def pick_token(scores_BV, rng, *, do_sample: bool):
    if do_sample:
        return jax.random.categorical(rng, scores_BV, axis=-1).astype(jnp.int32)
    return jnp.argmax(scores_BV, axis=-1).astype(jnp.int32)
