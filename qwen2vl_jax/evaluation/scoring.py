"""Log-likelihood scoring: how likely the model finds a continuation after a prompt (multiple choice, lmms-eval's
`loglikelihood`, perplexity of reference answers).

    scores = score(model, processor, prompts, continuations)
    scores[i].logprob      # sum over the continuation's tokens of log p(token | everything before it)
    scores[i].is_greedy    # every continuation token is the argmax at its position
    best = max(range(len(options)), key=lambda j: score(model, processor, [prompt] * n, options)[j].logprob)

A prompt is the user's text (a `str`) or a list of chat messages (the format `predict` and fine-tuning read: content
parts `{"type": "image", "image": path | PIL image | array}`, `{"type": "video", "video": path | frames}`,
`{"type": "text", "text": ...}`). It is rendered as `generate` renders it, `apply_chat_template(...,
add_generation_prompt=True)`, so the continuation is scored as the assistant's answer. The continuation is tokenized
on its own and appended (as lmms-eval's models do: context and continuation encoded apart). The rendered prompt ends
in `<|im_start|>assistant\\n`, and Qwen2's pre-tokenizer never joins that newline to the letters or the space that
follow it, so this equals tokenizing the whole text, unless the continuation itself starts with a newline.

Batches: the pairs are sorted by length and run `batch_size` at a time, left-padded (the attention mask keeps padding
out, as in batched generation) to a length bucket, so every row's continuation ends at the last position and only
the last `k` positions' logits are computed (`logits_to_keep`, k a power of two >= the longest continuation + 1):
a 151k-token vocabulary never needs `[T, V]` logits. The log-softmax runs in float32 on the device, the sum over
tokens in float64 on the host. `hooks` (`{name or pattern: fn}` as `run_with_hooks` takes them, e.g.
`qwen2vl_jax.hooks.interventions.ablate_heads(...)`, or a `HookSet`) run inside the forward: the same number with a
head ablated or a direction steered.

transformers has no such function; the oracle (tests/evaluation/test_scoring.py) is `log_softmax` of
`Qwen2VLForConditionalGeneration(...).logits`, gathered at the continuation's tokens and summed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..modeling.buckets import bucket, pow2_bucket
from ..modeling.hook_points import make_hookset
from ..training.data import load_media

__all__ = ["Score", "score", "encode_prompt"]

LENGTH_GRANULE = 64  # prompt lengths are left-padded to `bucket(T, 64)`: one compile per bucket, < 25% padding


@dataclasses.dataclass(frozen=True)
class Score:
    logprob: float  # sum over the continuation's tokens of log p(token | everything before it)
    is_greedy: bool  # every continuation token is the argmax of the logits at its position
    tokens: int  # the continuation's token count
    token_logprobs: tuple[float, ...] = ()  # each token's log-probability, in order


def _messages(prompt: str | Sequence[dict]) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if not isinstance(prompt, Sequence) or not all(isinstance(m, dict) for m in prompt):
        raise TypeError(f"a prompt is the user's text (str) or a list of chat messages (dicts), got {prompt!r:.80}")
    return list(prompt)


def encode_prompt(processor, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> dict[str, Any]:
    """The processor's outputs (one row, NumPy) for a conversation rendered with the chat template, its media loaded
    as fine-tuning and `predict` load them (`training.data.load_media`: per-item qwen-vl-utils options honoured; a
    Qwen2.5-VL processor is told each video's sampled rate)."""
    text = processor.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt)
    images, videos, rates = load_media(list(messages))
    timed = videos and "second_per_grid_ts" in getattr(processor, "model_input_names", ())
    out = processor(text=[text], images=images or None, videos=videos or None, **({"fps": rates} if timed else {}))
    return {k: np.asarray(v) for k, v in out.items() if v is not None}


@dataclasses.dataclass
class _Pair:
    index: int
    inputs: dict[str, np.ndarray]  # the prompt's processor outputs
    continuation_ids: np.ndarray  # [C]

    @property
    def length(self) -> int:
        return self.inputs["input_ids"].shape[1] + len(self.continuation_ids)


@jax.jit
def _token_logprobs(logits_BKV, targets_BK):
    """log p of each target under the logits before it (float32 log-softmax) and whether it is the argmax."""
    logp_BKV = jax.nn.log_softmax(logits_BKV.astype(jnp.float32), axis=-1)
    logp_BK = jnp.take_along_axis(logp_BKV, targets_BK[..., None], axis=-1)[..., 0]
    return logp_BK, jnp.argmax(logits_BKV, axis=-1) == targets_BK


def _concat(parts: list[np.ndarray | None]) -> np.ndarray | None:
    parts = [p for p in parts if p is not None]
    return np.concatenate(parts) if parts else None


def _run_batch(model, pairs: list[_Pair], pad_id: int, rows: int, hooks) -> list[Score]:
    """One left-padded forward over `pairs` (plus all-padding rows up to `rows`), scored."""
    T = bucket(max(p.length for p in pairs), LENGTH_GRANULE)
    longest = max(len(p.continuation_ids) for p in pairs)
    keep = min(T, pow2_bucket(longest + 1))
    ids_BT = np.full((rows, T), pad_id, np.int64)
    mask_BT = np.zeros((rows, T), np.int64)
    targets_BK = np.zeros((rows, keep), np.int32)
    for b, p in enumerate(pairs):
        row = np.concatenate([p.inputs["input_ids"][0], p.continuation_ids])
        ids_BT[b, T - len(row):], mask_BT[b, T - len(row):] = row, 1
        # logits at position t predict token t + 1: the last `keep` logits predict ids[T-keep+1:], then nothing
        targets_BK[b, :keep - 1] = ids_BT[b, T - keep + 1:]
    mask_BT[len(pairs):, -1] = 1  # a filler row attends to one padding token (no row may be fully masked)
    get = lambda key: _concat([p.inputs.get(key) for p in pairs])
    seconds = get("second_per_grid_ts")
    out = model(ids_BT, mask_BT, pixel_values=get("pixel_values"), image_grid_thw=get("image_grid_thw"),
                pixel_values_videos=get("pixel_values_videos"), video_grid_thw=get("video_grid_thw"),
                logits_to_keep=keep, hooks=hooks,
                **({"second_per_grid_ts": seconds} if seconds is not None else {}))
    logp_BK, greedy_BK = (np.asarray(a) for a in _token_logprobs(out.logits, jnp.asarray(targets_BK)))
    scores = []
    for b, p in enumerate(pairs):
        C = len(p.continuation_ids)
        span = slice(keep - 1 - C, keep - 1)  # the logits that predict the continuation's C tokens
        token_lp = logp_BK[b, span].astype(np.float64)
        scores.append(Score(float(token_lp.sum()), bool(greedy_BK[b, span].all()), C,
                            tuple(float(x) for x in token_lp)))
    return scores


def score(model, processor, prompts: Sequence[str | Sequence[dict]], continuations: Sequence[str], *,
          batch_size: int = 8, hooks=None) -> list[Score]:
    """The log-likelihood of each continuation after its prompt (module docstring), in the given order.

    `prompts[i]`: the user's text or a list of chat messages; `continuations[i]`: the answer text to score (it
    must tokenize to at least one token). `batch_size`: rows per forward (a smaller last batch is padded to a power
    of two, so at most log2(batch_size) + 1 row counts compile). `hooks`: `{name or pattern: fn}` (or a `HookSet`)
    run inside every forward."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokenizer = processor.tokenizer
    hooks = make_hookset(model.config, hooks) if hooks else None
    pairs = []
    for i, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        if not isinstance(continuation, str):
            raise TypeError(f"continuation {i} must be a str, got {type(continuation).__name__}")
        inputs = encode_prompt(processor, _messages(prompt))
        ids = np.asarray(tokenizer(continuation, add_special_tokens=False)["input_ids"], np.int64)
        if ids.size == 0:
            raise ValueError(f"continuation {i} ({continuation!r}) has no tokens")
        pairs.append(_Pair(i, inputs, ids))
    pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
    order = sorted(pairs, key=lambda p: -p.length)
    out: list[Score | None] = [None] * len(pairs)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        for p, s in zip(batch, _run_batch(model, batch, pad_id, pow2_bucket(len(batch)), hooks)):
            out[p.index] = s
    return out
