"""`evaluation.score` against transformers 4.57: the log-softmax of `Qwen2VLForConditionalGeneration`'s logits
(fp32, eager attention), gathered at each continuation token and summed, for text, a photo and a video, batched with
different lengths (two batches, the second padded), and whether each continuation is the greedy one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import helpers
from qwen2vl_jax.evaluation import score
from qwen2vl_jax.hooks.interventions import ablate_heads

REL = 1e-5
MIN_PIXELS, MAX_PIXELS = 56 * 56, 256 * 28 * 28  # helpers.hf_image_processor's bounds


@pytest.fixture(scope="module")
def pair(tiny_checkpoint):
    from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration
    from qwen2vl_jax.processing.processor import Qwen2VLProcessor

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="xla")
    processor = Qwen2VLProcessor.from_pretrained(tiny_checkpoint, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return model, processor, helpers.load_hf_model(tiny_checkpoint)


def _hf_logprobs(hf, hf_tokenizer, text, continuation, images=None, videos=None):
    """The oracle: transformers' logits of the whole sequence -> log_softmax -> the continuation's tokens."""
    inputs = helpers.hf_inputs(hf_tokenizer, [text], images=images, videos=videos)
    cont = hf_tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = np.concatenate([inputs["input_ids"][0], cont])[None]
    kw = {k: torch.from_numpy(v) for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                    **kw).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    C, T = len(cont), ids.shape[1]
    rows = torch.arange(T - C - 1, T - 1)
    targets = torch.as_tensor(cont)
    token_lp = logp[rows, targets]
    greedy = bool((logits[rows].argmax(-1) == targets).all())
    return float(token_lp.sum()), greedy, ids[0, :T - C]


def _greedy_case(hf, hf_tokenizer):
    """(user text, continuation) where the continuation is the model's own greedy answer: decoded, and
    re-tokenizing to the same ids (a random model's tokens often do not; try prompts and lengths until one does)."""
    for prompt in ("Count to three.", "Hello.", "Name a colour.", "Say yes.", "Why?", "Go on."):
        ids = helpers.hf_inputs(hf_tokenizer, [helpers.chat(prompt)])["input_ids"]
        with torch.no_grad():
            out = hf.generate(torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                              max_new_tokens=3, do_sample=False, repetition_penalty=1.0)
        new = out[0, ids.shape[1]:].tolist()
        for n in (3, 2, 1):
            decoded = hf_tokenizer.decode(new[:n])
            if hf_tokenizer(decoded, add_special_tokens=False)["input_ids"] == new[:n]:
                return prompt, decoded
    raise AssertionError("no greedy continuation round-trips through the tokenizer")


def test_score_matches_transformers_for_text_photo_and_video_in_mixed_batches(pair, hf_tokenizer, photos):
    model, processor, hf = pair
    frames = helpers.video_frames(4, size=(112, 140))
    prompt, greedy = _greedy_case(hf, hf_tokenizer)
    cases = [  # (messages, continuation, images, videos, rendered text for the oracle)
        (prompt, greedy, None, None, helpers.chat(prompt)),
        ("Hi!", " A much longer answer that spans quite a few tokens, to vary the lengths.", None, None,
         helpers.chat("Hi!")),
        ([{"role": "user", "content": [{"type": "image", "image": photos["coffee"]},
                                       {"type": "text", "text": "What is in this picture?"}]}],
         "A cup of coffee.", [photos["coffee"]], None, helpers.chat("What is in this picture?", 1)),
        ([{"role": "user", "content": [{"type": "image", "image": photos["chelsea"]},
                                       {"type": "text", "text": "Name the animal."}]}],
         "cat", [photos["chelsea"]], None, helpers.chat("Name the animal.", 1)),
        ([{"role": "user", "content": [{"type": "video", "video": frames},
                                       {"type": "text", "text": "What happens?"}]}],
         "A rabbit wakes up.", None, [frames], helpers.chat("What happens?", 0, 1)),
    ]
    ours = score(model, processor, [c[0] for c in cases], [c[1] for c in cases], batch_size=4)
    assert len(ours) == len(cases)
    worst = 0.0
    for (_, continuation, images, videos, text), got in zip(cases, ours):
        ref_lp, ref_greedy, _ = _hf_logprobs(hf, hf_tokenizer, text, continuation, images, videos)
        worst = max(worst, abs(got.logprob - ref_lp) / abs(ref_lp))
        assert got.tokens == len(hf_tokenizer(continuation, add_special_tokens=False)["input_ids"])
        assert len(got.token_logprobs) == got.tokens
        assert abs(got.logprob - ref_lp) <= REL * abs(ref_lp), (continuation, got.logprob, ref_lp)
        assert got.is_greedy == ref_greedy, continuation
    assert ours[0].is_greedy and not ours[1].is_greedy  # both outcomes occur
    helpers.record("evaluation/score_vs_transformers", pairs=len(cases), rel_err=worst)
    print(f"score vs transformers: max relative error {worst:.2e} over {len(cases)} pairs")
    # order does not matter: the same pairs one at a time give the same numbers (padding is masked out)
    alone = score(model, processor, [cases[2][0]], [cases[2][1]], batch_size=1)[0]
    assert abs(alone.logprob - ours[2].logprob) <= REL * abs(ours[2].logprob)


def test_score_with_hooks_changes_the_number_and_rejects_bad_input(pair):
    model, processor, _ = pair
    plain = score(model, processor, ["Tell me a story."], [" Once upon a time"])[0]
    ablated = score(model, processor, ["Tell me a story."], [" Once upon a time"],
                    hooks=ablate_heads(model, {0: [0, 1], 1: [0, 1]}))[0]
    assert ablated.tokens == plain.tokens and abs(ablated.logprob - plain.logprob) > 1e-4
    with pytest.raises(ValueError, match="2 prompts but 1 continuations"):
        score(model, processor, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="has no tokens"):
        score(model, processor, ["a"], [""])
