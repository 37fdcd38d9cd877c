"""The offline test assets are real: the Qwen2 vocabulary, photos, the video, and transformers' checkpoints."""

import hashlib
import json

import numpy as np
import pytest
from safetensors import safe_open

import qwen_tokenizer_files

# transformers tests/models/qwen2/test_tokenization_qwen2.py.
CHINESE = ("🤗 Transformers 提供了可以轻松地下载并且训练先进的预训练模型的 API 和工具。"
           "使用预训练模型可以减少计算消耗和碳排放，并且节省从头训练所需要的时间和资源。")
PUBLISHED = {
    "Hello, world!": [9707, 11, 1879, 0],
    CHINESE: [
        144834, 80532, 93685, 83744, 34187, 73670, 104261, 29490, 62189, 103937, 104034, 102830, 98841, 104034,
        104949, 9370, 5333, 58143, 102011, 1773, 37029, 98841, 104034, 104949, 73670, 101940, 100768, 104997,
        33108, 100912, 105054, 90395, 100136, 106831, 45181, 64355, 104034, 113521, 101975, 33108, 85329, 1773],
}
CHAT_IDS_PREFIX = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 151652,
                   151655]
CHAT_IDS_TAIL = [151652, 151655, 151653, 3838, 3093, 315, 5562, 374, 419, 30, 151645, 198, 151644, 77091, 198]


def test_tokenizer_files_are_the_official_bytes(tokenizer_dir):
    sha = lambda f: hashlib.sha256((tokenizer_dir / f).read_bytes()).hexdigest()
    assert sha("vocab.json") == "ca10d7e9fb3ed18575dd1e277a2579c16d108e32f27439684afa0e10b1440910"
    assert sha("merges.txt") == "599bab54075088774b1733fde865d5bd747cbcc7a547c5bc12610e874e26f5e3"
    assert hashlib.sha256(qwen_tokenizer_files.tiktoken_path().read_bytes()).hexdigest() == (
        "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186")


def test_tokenizer_reproduces_published_ids(tokenizer_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    fast = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    for text, ids in PUBLISHED.items():
        assert fast.encode(text).ids == ids
        assert hf(text).input_ids == ids
    assert fast.get_vocab_size() == 151657
    for i, s in qwen_tokenizer_files.SPECIAL_TOKENS.items():
        assert fast.token_to_id(s) == i


def test_chat_template_ids_match_the_reference(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What kind of dog is this?"}]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>What kind of dog is this?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tok(text).input_ids
    assert ids[:16] == CHAT_IDS_PREFIX and ids[-len(CHAT_IDS_TAIL):] == CHAT_IDS_TAIL


def test_real_photos_are_asymmetric(photos):
    sizes = {name: im.size for name, im in photos.items()}
    assert sizes == {"astronaut": (512, 512), "coffee": (600, 400), "chelsea": (451, 300), "rocket": (640, 427),
                     "grace_hopper": (512, 600)}
    for im in photos.values():
        a = np.asarray(im, dtype=np.float32)
        assert a.ndim == 3 and a.shape[2] == 3 and a.std() > 20  # real content, not a flat fill
        if a.shape[0] == a.shape[1]:  # square photos must still not be transpose-symmetric (h/w swap bugs)
            assert np.abs(a - a.transpose(1, 0, 2)).mean() > 10


def test_real_video_decodes(video_file):
    import av

    with av.open(str(video_file)) as c:
        s = c.streams.video[0]
        frame = next(c.decode(video=0)).to_ndarray(format="rgb24")
        assert (s.codec_context.width, s.codec_context.height) == (1280, 720)
        assert s.frames == 132 and float(s.average_rate) == 25.0
    assert frame.shape == (720, 1280, 3) and frame.std() > 5


@pytest.mark.parametrize("layout, prefix_text, prefix_vis", [("hub", "model.", "visual."),
                                                               ("new", "model.language_model.", "model.visual.")])
@pytest.mark.parametrize("tied", [False, True])
def test_checkpoint_factory_layouts(checkpoint_factory, layout, prefix_text, prefix_vis, tied):
    path = checkpoint_factory(tied=tied, layout=layout)
    with safe_open(path / "model.safetensors", "np") as f:
        keys = set(f.keys())
        assert f"{prefix_text}embed_tokens.weight" in keys
        assert f"{prefix_vis}patch_embed.proj.weight" in keys
        assert ("lm_head.weight" in keys) is (not tied)
        norms = [f.get_tensor(k) for k in keys if k.endswith("norm.weight")]
        assert norms and all(np.std(n) > 0.01 for n in norms)  # re-drawn, not HF's ones
    assert (path / "tokenizer.json").is_file() and (path / "preprocessor_config.json").is_file()


def test_checkpoint_factory_sharded(checkpoint_factory):
    path = checkpoint_factory(sharded=True)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and all((path / s).is_file() for s in shards)
