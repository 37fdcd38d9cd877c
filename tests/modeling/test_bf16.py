"""bf16 mode (bf16 weights and activations; softmax, norms and rotary in fp32) vs the fp32 reference.

Our bf16 error against transformers' fp32 logits must be no worse than transformers' own bf16 error against the
same fp32 logits, on the same inputs (eager attention, as the parity tests use). transformers' SDPA bf16 error
is measured and recorded beside it (docs/PARITY.md).
"""

import numpy as np
import pytest
import torch

import helpers
from qwen2vl_jax.pretrained import Qwen2VLForConditionalGeneration


def _cases(tok, photos):
    f = helpers.hf_inputs
    return {
        "one_photo": f(tok, [helpers.chat("What is in this picture?", 1)], images=[photos["astronaut"]]),
        "long_prompt": f(tok, [helpers.chat("Qwen2-VL reads images at native resolution. " * 40, 1)],
                         images=[photos["chelsea"]]),
        "two_images": f(tok, [helpers.chat("Compare them.", 2)], images=[photos["coffee"], photos["rocket"]]),
        "video": f(tok, [helpers.chat("What happens in the clip?", 0, 1)], videos=[helpers.video_frames(6)]),
    }


def _metrics(x, ref):
    return np.array([helpers.rel_err(x, ref),  # max |Δ| / max |ref|
                     float(np.abs(x - ref).mean() / np.abs(ref).mean()),
                     float((x.argmax(-1) == ref.argmax(-1)).mean())])  # top-1 agreement per position


@pytest.mark.parametrize("size", ["tiny", pytest.param("2b-slice", marks=pytest.mark.slow)])
def test_bf16_error_no_worse_than_transformers_bf16(checkpoint_factory, hf_tokenizer, photos, size):
    path = checkpoint_factory(tied=size == "2b-slice", size=size)
    ours = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype="bfloat16")
    assert ours.dtype == np.dtype("bfloat16")
    ref_model = helpers.load_hf_model(path)
    hf_eager = helpers.load_hf_model(path, dtype="bfloat16", attn="eager")
    hf_sdpa = helpers.load_hf_model(path, dtype="bfloat16", attn="sdpa")
    results = {"ours": [], "hf_eager": [], "hf_sdpa": []}
    for name, inputs in _cases(hf_tokenizer, photos).items():
        t = {k: torch.from_numpy(v) for k, v in inputs.items()}
        with torch.no_grad():
            ref = ref_model(**t).logits.numpy()
            runs = {"hf_eager": hf_eager(**t).logits.float().numpy(), "hf_sdpa": hf_sdpa(**t).logits.float().numpy()}
        runs["ours"] = np.asarray(ours(**inputs).logits.astype(np.float32))
        for k, v in runs.items():
            results[k].append(_metrics(v, ref))
        helpers.record(f"bf16/{size}/{name}", tokens=int(inputs["input_ids"].size),
                       **{f"{k}_{m}": float(results[k][-1][i]) for k in results
                          for i, m in enumerate(("max_rel_err", "mean_rel_err", "top1"))})
    mean = {k: np.mean(v, axis=0) for k, v in results.items()}  # averaged over the four inputs
    helpers.record(f"bf16/{size}/mean", **{f"{k}_{m}": float(mean[k][i]) for k in mean
                                            for i, m in enumerate(("max_rel_err", "mean_rel_err", "top1"))})
    assert mean["ours"][0] <= mean["hf_eager"][0], mean
    assert mean["ours"][1] <= mean["hf_eager"][1], mean
    assert mean["ours"][2] >= mean["hf_eager"][2], mean
