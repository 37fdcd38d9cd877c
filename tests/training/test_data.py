"""Fine-tuning data (qwen2vl_jax/data.py): JSONL validation, label masking, bucketed collation, the resumable
loader, max_length, videos."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from qwen2vl_jax.modeling.buckets import bucket
from qwen2vl_jax.training import data
from qwen2vl_jax.training.data import IGNORE_INDEX, DataError

VISION = ("<|vision_start|>", "<|image_pad|>", "<|video_pad|>", "<|vision_end|>")


def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n", encoding="utf-8")


def user(*parts):
    return {"role": "user", "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts]}


def image(path, **options):
    return {"type": "image", "image": str(path), **options}


def reply(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


@pytest.fixture
def media(tmp_path, photos):
    """Small photos on disk (JPEG and PNG) under tmp_path/photos: few vision tokens, fast tests."""
    (tmp_path / "photos").mkdir()
    photos["astronaut"].resize((112, 84)).save(tmp_path / "photos" / "a.jpg")
    photos["coffee"].resize((84, 112)).save(tmp_path / "photos" / "b.png")
    return tmp_path


def trained_runs(labels):
    """(start, stop) of every maximal run of trained positions."""
    kept = np.concatenate([[False], labels != IGNORE_INDEX, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(kept))
    return list(zip(edges[::2], edges[1::2]))


def official_recipe_labels(ids, assistant_id, im_end_id):
    """QwenLM Qwen2.5-VL qwen-vl-finetune `preprocess_qwen_visual`'s loop, restated: from two tokens after each
    "assistant" token through the next <|im_end|> and one token more."""
    labels, pos = np.full(len(ids), IGNORE_INDEX), 0
    while pos < len(ids):
        if ids[pos] == assistant_id:
            start = end = pos + 2
            while end < len(ids) and ids[end] != im_end_id:
                end += 1
            if end < len(ids):
                labels[start:end + 2] = ids[start:end + 2]
                pos = end
        pos += 1
    return labels


# ------------------------------------------------------------------------------------------------ labels
def test_assistant_turns_only_are_trained(proc, media, hf_tokenizer):
    replies = ["An astronaut in a white suit.", "A cup of coffee, seen from above.\nNothing else."]
    messages = [{"role": "system", "content": "You describe pictures."},
                user(image("photos/a.jpg"), "What is this?"), reply(replies[0]),
                user("And this one?", image("photos/b.png")), reply(replies[1])]
    path = media / "train.jsonl"
    write_jsonl(path, [{"messages": messages}])
    (conv,) = data.read_jsonl(path)
    assert conv.line == 1 and conv.messages[1]["content"][0]["image"] == str(media / "photos" / "a.jpg")
    ex = data.encode_conversation(proc, conv.messages, line=conv.line)
    tok = proc.tokenizer
    ids, labels = ex.input_ids, ex.labels
    assert ids.dtype == np.int32 and labels.dtype == np.int32 and ids.shape == labels.shape
    assert ex.image_grid_thw.shape == (2, 3) and ex.pixel_values.shape[0] == ex.image_grid_thw.prod(1).sum()

    # The trained tokens are exactly each reply + <|im_end|>\n, in order.
    runs = trained_runs(labels)
    assert [tok.decode(labels[a:b]) for a, b in runs] == [r + "<|im_end|>\n" for r in replies]
    assert np.array_equal(labels[labels != IGNORE_INDEX], ids[labels != IGNORE_INDEX])
    expected = sum(len(tok.encode(r, add_special_tokens=False)) + 2 for r in replies)  # + <|im_end|> + "\n"
    assert (labels != IGNORE_INDEX).sum() == expected

    # Vision, system and user tokens are all -100.
    vision_ids = [tok.convert_tokens_to_ids(t) for t in VISION]
    assert np.isin(ids, vision_ids).sum() > 20 and (labels[np.isin(ids, vision_ids)] == IGNORE_INDEX).all()
    im_start, im_end = tok.convert_tokens_to_ids("<|im_start|>"), tok.convert_tokens_to_ids("<|im_end|>")
    starts, ends = np.flatnonzero(ids == im_start), np.flatnonzero(ids == im_end)
    roles = [tok.decode(ids[s + 1:s + 2]) for s in starts]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    for role, s, e in zip(roles, starts, ends):
        block = labels[s:e + 2]
        if role != "assistant":
            assert (block == IGNORE_INDEX).all(), role
        else:
            assert (block[:3] == IGNORE_INDEX).all() and (block[3:] != IGNORE_INDEX).all()

    # Same labels as Qwen's recipe, and through a transformers tokenizer.
    assistant_id = tok.encode("assistant", add_special_tokens=False)[0]
    assert np.array_equal(labels, official_recipe_labels(ids.tolist(), assistant_id, im_end))
    assert np.array_equal(data.assistant_labels(ids, hf_tokenizer), labels)


def test_default_system_prompt_is_masked(proc):
    ex = data.encode_conversation(proc, [user("Hi"), {"role": "assistant", "content": "Hello!"}])
    text = proc.tokenizer.decode(ex.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert proc.tokenizer.decode(ex.labels[ex.labels != IGNORE_INDEX]) == "Hello!<|im_end|>\n"
    assert ex.pixel_values is None and ex.video_grid_thw is None
    with pytest.raises(DataError, match="no assistant tokens"):
        data.encode_conversation(proc, [user("Hi")], line=4)


# ------------------------------------------------------------------------------------------- validation
def test_bad_lines_are_named(proc, media):
    good = {"messages": [user(image("photos/a.jpg"), "Hi"), reply("Hello")]}
    rows = [good,                                                                   # 1
            '{"messages": [',                                                       # 2 invalid JSON
            "",                                                                     # 3 blank: skipped
            {"conversation": []},                                                   # 4 no "messages"
            {"messages": [{"role": "bot", "content": "x"}, reply("y")]},            # 5 bad role
            {"messages": [user("only a question")]},                                # 6 no assistant turn
            {"messages": [user(image("photos/missing.jpg"), "?"), reply("z")]},     # 7 missing image
            {"messages": [user({"type": "video", "video": "clips/gone.mp4"}, image("/nowhere/c.png")),
                          reply("z")]},                                             # 8 two missing files
            {"messages": [user({"type": "picture", "src": "a.jpg"}), reply("z")]},  # 9 bad content part
            {"messages": [user(image("photos/a.jpg", max_pixels="big")), reply("z")]}]  # 10 bad option
    path = media / "train.jsonl"
    write_jsonl(path, rows)
    with pytest.raises(DataError) as err:
        data.read_jsonl(path)
    problems = err.value.problems
    assert sorted({n for n, _ in problems}) == [2, 4, 5, 6, 7, 8, 9, 10]
    by_line = {n: " | ".join(p for m, p in problems if m == n) for n, _ in problems}
    assert "invalid JSON" in by_line[2]
    assert '"messages"' in by_line[4]
    assert '"bot"' in by_line[5] and "system, user, assistant" in by_line[5]
    assert "no assistant turn" in by_line[6]
    assert f"image not found: {media / 'photos' / 'missing.jpg'}" in by_line[7]
    assert f"video not found: {media / 'clips' / 'gone.mp4'}" in by_line[8] and "/nowhere/c.png" in by_line[8]
    assert '"type"' in by_line[9] and '"max_pixels" must be a number' in by_line[10]
    message = str(err.value)
    for n in (2, 4, 5, 6, 7, 8, 9, 10):
        assert f"{path} line {n}: " in message
    assert "missing.jpg" in message and "gone.mp4" in message and "c.png" in message  # all missing media at once

    # One problem: a one-line message naming the file and line.
    write_jsonl(path, [good, good, {"messages": [user("q"), {"role": "assistant", "content": ""}]}])
    with pytest.raises(DataError, match=rf"^{path} line 3: no assistant turn"):
        data.read_jsonl(path)
    # Missing media are only checked when asked; paths are still resolved.
    write_jsonl(path, [rows[6]])
    (conv,) = data.read_jsonl(path, check_media=False)
    assert conv.messages[0]["content"][0]["image"] == str(media / "photos" / "missing.jpg")
    # A file that exists but does not decode fails when encoded, naming its line.
    (media / "photos" / "bad.jpg").write_bytes(b"not a jpeg")
    write_jsonl(path, [good, {"messages": [user(image("photos/bad.jpg"), "?"), reply("z")]}])
    bad = data.read_jsonl(path)[1]
    with pytest.raises(DataError, match=rf"^{path} line 2: cannot encode the conversation: could not read image"):
        data.encode_conversation(proc, bad.messages, line=bad.line, source=bad.source)
    # Empty and blank-only files are errors; a long list is capped in the message but kept whole.
    for text in ("", "\n  \n"):
        path.write_text(text)
        with pytest.raises(DataError, match="no conversations"):
            data.read_jsonl(path)
    write_jsonl(path, ["[1]"] * 30)
    with pytest.raises(DataError, match="and 10 more") as err:
        data.read_jsonl(path)
    assert len(err.value.problems) == 30


# ---------------------------------------------------------------------------------------------- collate
def test_collate_buckets_and_feeds_prepare_batch(proc, media, tiny_checkpoint):
    from qwen2vl_jax import Qwen2VLForConditionalGeneration
    from qwen2vl_jax.training.steps import IGNORE_INDEX as TRAINING_IGNORE
    from qwen2vl_jax.training.steps import prepare_batch

    assert TRAINING_IGNORE == IGNORE_INDEX
    short = data.encode_conversation(proc, [user("Hi"), reply("Hello " * 50)])
    long = data.encode_conversation(proc, [user("Hi"), reply("Hello " * 80)])
    assert len(short.input_ids) != len(long.input_ids) and bucket(len(short.input_ids), 64) == bucket(
        len(long.input_ids), 64)
    pad = proc.tokenizer.pad_token_id
    a, b = data.collate([short], pad_token_id=pad), data.collate([long], pad_token_id=pad)
    assert a["input_ids"].shape == b["input_ids"].shape == (1, bucket(len(long.input_ids), 64))
    assert set(a) == {"input_ids", "attention_mask", "labels"}

    pic = data.encode_conversation(proc, [user(image(media / "photos" / "a.jpg"), "?"), reply("A man.")])
    pic2 = data.encode_conversation(proc, [user(image(media / "photos" / "b.png"), image(media / "photos" / "a.jpg"),
                                                "?"), reply("Two.")])
    examples = [pic, short, pic2]
    batch = data.collate(examples, pad_token_id=pad, length_granule=32)
    n = [len(e.input_ids) for e in examples]
    assert batch["input_ids"].shape == (3, bucket(max(n), 32)) and batch["input_ids"].dtype == np.int32
    for row, e in enumerate(examples):
        assert np.array_equal(batch["input_ids"][row, :n[row]], e.input_ids)
        assert np.array_equal(batch["labels"][row, :n[row]], e.labels)
        assert (batch["input_ids"][row, n[row]:] == pad).all() and (batch["labels"][row, n[row]:] == -100).all()
        assert batch["attention_mask"][row].sum() == n[row] and batch["attention_mask"][row, :n[row]].all()
    assert np.array_equal(batch["image_grid_thw"], np.concatenate([pic.image_grid_thw, pic2.image_grid_thw]))
    assert np.array_equal(batch["pixel_values"], np.concatenate([pic.pixel_values, pic2.pixel_values]))
    assert "pixel_values_videos" not in batch and "video_grid_thw" not in batch

    model = Qwen2VLForConditionalGeneration.from_pretrained(tiny_checkpoint)
    prepared = prepare_batch(model, **batch)
    assert prepared.input_ids_BT.shape == batch["input_ids"].shape and prepared.pixels_PC is not None
    assert np.array_equal(prepared.labels_BT, batch["labels"])
    prepare_batch(model, **a)  # text only


# ----------------------------------------------------------------------------------------------- loader
def test_loader_is_deterministic_and_resumes(proc, media):
    rows = [{"messages": [user(f"Question {i}?" + " Why?" * (i * 7)), reply(f"Answer {i}.")]} for i in range(6)]
    rows.insert(3, {"messages": [user(image("photos/a.jpg"), "What?"), reply("An astronaut.")]})
    path = media / "train.jsonl"
    write_jsonl(path, rows)
    conversations = data.read_jsonl(path)
    make = lambda **kw: data.Loader(conversations, proc, batch_size=2, seed=3, **kw)

    loader = make()
    assert loader.batches_per_epoch == 3  # 7 conversations: the last partial batch is dropped
    stream = iter(loader)
    first = [next(stream) for _ in range(2)]
    state = json.loads(json.dumps(loader.state_dict()))
    assert state == {"epoch": 0, "position": 2, "seed": 3}
    rest = [next(stream) for _ in range(3)]  # batches 3-5 cross into epoch 1
    infos = [info for _, info in first + rest]
    assert [(i["epoch"], i["step_in_epoch"]) for i in infos] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    epoch0 = sum((i["lines"] for i in infos[:3]), [])
    assert len(set(epoch0)) == 6 and set(epoch0) <= set(range(1, 8))
    order = np.random.default_rng(3).permutation(7)
    assert epoch0 == [conversations[i].line for i in order[:6]]

    resumed = data.Loader(conversations, proc, batch_size=2, seed=99)
    resumed.load_state_dict(state)  # the saved seed wins
    again = iter(resumed)
    for batch, info in rest:
        batch2, info2 = next(again)
        assert info2 == info and batch2.keys() == batch.keys()
        for key in batch:
            assert np.array_equal(batch2[key], batch[key]), key
    assert any("pixel_values" in b for b, _ in first + rest)

    plain = iter(make(shuffle=False))
    assert [next(plain)[1]["lines"] for _ in range(4)] == [[1, 2], [3, 4], [5, 6], [1, 2]]
    with pytest.raises(DataError, match="fewer than batch_size=8"):
        data.Loader(conversations, proc, batch_size=8)
    with pytest.raises(ValueError, match="does not fit"):
        loader.load_state_dict({"epoch": 0, "position": 9, "seed": 0})


# ------------------------------------------------------------------------------------------- max_length
def test_max_length_truncates_or_explains(proc, media):
    messages = [user(image(media / "photos" / "a.jpg"), "Describe."), reply("A long answer. " * 20)]
    full = data.encode_conversation(proc, messages)
    vision = np.isin(full.input_ids, [proc.tokenizer.convert_tokens_to_ids(t) for t in VISION])
    last_vision = int(np.flatnonzero(vision)[-1])
    first_trained = int(np.flatnonzero(full.labels != IGNORE_INDEX)[0])

    cut = data.encode_conversation(proc, messages, max_length=first_trained + 5)
    assert len(cut.input_ids) == len(cut.labels) == first_trained + 5
    assert np.array_equal(cut.input_ids, full.input_ids[:first_trained + 5])
    assert np.array_equal(cut.labels, full.labels[:first_trained + 5]) and (cut.labels != IGNORE_INDEX).sum() == 5
    assert np.array_equal(cut.pixel_values, full.pixel_values)
    assert len(data.encode_conversation(proc, messages, max_length=10_000).input_ids) == len(full.input_ids)

    with pytest.raises(DataError, match=rf"line 5: {len(full.input_ids)} tokens, over max_length={last_vision}"):
        data.encode_conversation(proc, messages, max_length=last_vision, line=5)
    with pytest.raises(DataError, match="keeps no assistant token"):
        data.encode_conversation(proc, messages, max_length=first_trained)

    # Through the loader the error comes lazily, when the batch is encoded, naming file and line.
    path = media / "train.jsonl"
    write_jsonl(path, [{"messages": [user("Hi"), reply("Hello")]}, {"messages": messages}])
    loader = data.Loader(data.read_jsonl(path), proc, batch_size=2, max_length=last_vision)
    with pytest.raises(DataError, match=rf"{path} line 2: .*raise max_length to at least {len(full.input_ids)}"):
        next(iter(loader))


# ---------------------------------------------------------------------------------------------- video
def test_video_conversation(proc, media, video_file):
    shutil.copy(video_file, media / "clip.mp4")
    path = media / "train.jsonl"
    write_jsonl(path, [{"messages": [
        user({"type": "video", "video": "clip.mp4", "nframes": 4, "max_pixels": 48 * 28 * 28}, "What happens?"),
        reply("A rabbit wakes up."), user(image("photos/a.jpg"), "And here?"), reply("An astronaut.")]}])
    (conv,) = data.read_jsonl(path)
    assert conv.messages[0]["content"][0]["video"] == str(media / "clip.mp4")
    ex = data.encode_conversation(proc, conv.messages, line=conv.line)
    t, h, w = ex.video_grid_thw[0]
    assert ex.video_grid_thw.shape == (1, 3) and t == 2 and h * w <= 48 * 4  # 4 frames, <= 48*28*28 pixels each
    assert ex.pixel_values_videos.shape == (t * h * w, 1176) and ex.image_grid_thw.shape == (1, 3)
    tok = proc.tokenizer
    video_id = tok.convert_tokens_to_ids("<|video_pad|>")
    assert (ex.input_ids == video_id).sum() == t * h * w // 4 and (ex.labels[ex.input_ids == video_id] == -100).all()
    runs = trained_runs(ex.labels)
    assert [tok.decode(ex.labels[a:b]) for a, b in runs] == ["A rabbit wakes up.<|im_end|>\n",
                                                              "An astronaut.<|im_end|>\n"]
    batch = data.collate([ex], pad_token_id=tok.pad_token_id)
    assert np.array_equal(batch["video_grid_thw"], ex.video_grid_thw) and "pixel_values" in batch
