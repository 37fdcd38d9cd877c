"""Fine-tuning data: a JSONL file of conversations -> labelled examples -> padded, bucketed batches.

    conversations = read_jsonl("train.jsonl")                      # validates every line up front
    loader = Loader(conversations, processor, batch_size=8, max_length=4096)
    for batch, info in loader:                                     # forever, epoch after epoch
        metrics = train_step(model, optimizer, prepare_batch(model, **batch))

One conversation per line, in the message format the processor takes (media paths relative to the file's
directory, or absolute; per-item qwen-vl-utils options such as "max_pixels" / "nframes" / "fps" are honoured):

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "photos/a.jpg"},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": "A cat."}]}

What trains (`assistant_labels`) follows Qwen's official fine-tuning recipe (QwenLM/Qwen2.5-VL
qwen-vl-finetune/qwenvl/data: `preprocess_qwen_2_visual`, and its successor `preprocess_qwen_visual`; LLaMA-Factory's
qwen2_vl template trains the same tokens): in every assistant turn the header `<|im_start|>assistant\\n` is -100 and
the reply's tokens, the `<|im_end|>` closing the turn and the `\\n` after it are trained. Every system and user
token (the default system prompt the template adds included), and every vision token (`<|vision_start|>`,
`<|image_pad|>`, `<|video_pad|>`, `<|vision_end|>`) wherever it sits, is -100. It works on token ids, so it does
not depend on how the template rendered. Pure host NumPy: no JAX, torch or transformers here.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..modeling.buckets import bucket
from ..processing.image_io import fetch_image
from ..processing.video import FPS, fetch_video
from ..processing.vision_info import IMAGE_OPTIONS, VIDEO_OPTIONS

__all__ = ["IGNORE_INDEX", "DataError", "Conversation", "read_jsonl", "load_media", "Example", "assistant_labels",
           "encode_conversation", "collate", "Loader"]

IGNORE_INDEX = -100  # training.IGNORE_INDEX (not imported: training.py pulls in JAX)
ROLES = ("system", "user", "assistant")
VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|video_pad|>", "<|vision_end|>")
MAX_LISTED = 20  # problems spelled out in one DataError; all of them stay on `DataError.problems`


class DataError(ValueError):
    """Bad training data. The message names the file and line ("train.jsonl line 7: ..."); `problems` holds every
    (line, message) pair found, even beyond the ones the message lists."""

    def __init__(self, message: str, problems: list[tuple[int, str]] | None = None):
        super().__init__(message)
        self.problems = problems or []


def _where(source: str | os.PathLike | None, line: int) -> str:
    name = os.fspath(source) if source is not None else ""
    if line:
        return f"{name} line {line}".strip()
    return name or "conversation"


# ------------------------------------------------------------------------------------------------ reading
@dataclasses.dataclass
class Conversation:
    messages: list[dict]  # media paths already resolved to absolute paths
    line: int  # 1-based line number in the file
    source: Path
    record: dict = dataclasses.field(default_factory=dict)  # the line's other keys ("id", "answers", ...)


def _resolve_media(value: Any, base: Path, kind: str, check: bool) -> tuple[Any, list[str]]:
    """(resolved source, problems) of one image / video value: a path string (a video may also be a list of frame
    paths); `data:` URIs (images) pass through; URLs are refused since nothing is fetched over the network."""
    if kind == "video" and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        resolved, problems = [], []
        for frame in value:
            r, p = _resolve_media(frame, base, "video frame", check)
            resolved.append(r)
            problems += p
        return resolved, problems
    if not isinstance(value, str) or not value:
        what = "a path string or a list of frame paths" if kind == "video" else "a path string"
        return value, [f'"{kind}" must be {what}, got {json.dumps(value)[:60]}']
    if value.startswith(("http://", "https://")):
        return value, [f"{kind} URLs are not fetched ({value}); download the file and give its path"]
    if kind == "image" and value.startswith("data:image"):
        return value, []
    path = Path(value[len("file://"):] if value.startswith("file://") else value).expanduser()
    path = Path(os.path.normpath(path if path.is_absolute() else base / path))
    if check and not path.is_file():
        return str(path), [f"{kind} not found: {path}"]
    return str(path), []


def _check_conversation(obj: Any, base: Path, check_media: bool,
                        need_answer: bool = True) -> tuple[list[dict], list[str]]:
    """(messages with media resolved, problems) of one parsed line (`need_answer`: an assistant turn with text)."""
    if not isinstance(obj, dict) or "messages" not in obj:
        got = f"an object with keys {sorted(obj)[:6]}" if isinstance(obj, dict) else type(obj).__name__
        return [], [f'expected an object {{"messages": [...]}}, got {got}']
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        return [], ['"messages" must be a non-empty list of {"role": ..., "content": ...} objects']
    out, problems, trained = [], [], False
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            problems.append(f'message {i} must be an object with "role" and "content"')
            continue
        role, content = message["role"], message["content"]
        if role not in ROLES:
            problems.append(f"message {i} has role {json.dumps(role)}; expected one of {', '.join(ROLES)}")
        if isinstance(content, str):
            trained |= role == "assistant" and bool(content.strip())
            out.append(dict(message))
            continue
        if not isinstance(content, list):
            problems.append(f'message {i}: "content" must be a string or a list of parts, got '
                            f"{type(content).__name__}")
            continue
        parts = []
        for j, part in enumerate(content, 1):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "image", "video") or kind not in part:
                problems.append(f'message {i} part {j}: expected {{"type": "text"|"image"|"video", <type>: ...}}, '
                                f"got {json.dumps(part)[:80]}")
                continue
            part = dict(part)
            if kind == "text":
                if not isinstance(part["text"], str):
                    problems.append(f'message {i} part {j}: "text" must be a string')
                trained |= role == "assistant" and isinstance(part["text"], str) and bool(part["text"].strip())
            else:
                part[kind], found = _resolve_media(part[kind], base, kind, check_media)
                for key in VIDEO_OPTIONS if kind == "video" else IMAGE_OPTIONS:  # the qwen-vl-utils options
                    value = part.get(key, 0)
                    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                        found.append(f'"{key}" must be a number >= 0, got {json.dumps(value)[:40]}')
                problems += [f"message {i} part {j}: {p}" for p in found]
            parts.append(part)
        out.append({**message, "content": parts})
    if need_answer and not trained and not problems:
        problems.append("no assistant turn with text: nothing to train on")
    return out, problems


def read_jsonl(path: str | os.PathLike, *, check_media: bool = True, need_answer: bool = True) -> list[Conversation]:
    """Read and validate a JSONL file of conversations; every line is checked before anything is returned.

    Checks: JSON syntax, the `{"messages": [...]}` shape, roles (system / user / assistant), content parts
    (`{"type": "text", "text"}`, `{"type": "image", "image"}`, `{"type": "video", "video"}`), at least one assistant
    turn with text (`need_answer`; prompts to answer, as `qwen2vl-jax predict` reads, need none), and
    (`check_media`) that every media file exists. Blank lines are skipped; an empty file is an error. The line's
    other keys are kept on `Conversation.record`. Raises one `DataError` listing up to 20 problems, each as
    "<file> line N: ...".
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the data file ({e.strerror or e})") from None
    base = path.parent.absolute()
    conversations, problems = [], []
    # Split on b"\n" only: str.splitlines would also break on U+2028 and friends, which JSON strings may contain.
    for number, chunk in enumerate(raw.split(b"\n"), 1):
        try:
            text = chunk.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            problems.append((number, f"not valid UTF-8 ({e.reason} at byte {e.start})"))
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append((number, f"invalid JSON: {e.msg} (column {e.colno})"))
            continue
        messages, found = _check_conversation(obj, base, check_media, need_answer)
        problems += [(number, p) for p in found]
        if not found:
            conversations.append(Conversation(messages, number, path, {k: v for k, v in obj.items()
                                                                       if k != "messages"}))
    if problems:
        listed = "\n".join(f"  {_where(path, n)}: {p}" for n, p in problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        if len(problems) == 1:
            raise DataError(f"{_where(path, problems[0][0])}: {problems[0][1]}", problems)
        raise DataError(f"{path}: {len(problems)} problems in the data:\n{listed}{more}", problems)
    if not conversations:
        raise DataError(f"{path}: the file has no conversations (it is empty)")
    return conversations


# ----------------------------------------------------------------------------------------------- encoding
@dataclasses.dataclass
class Example:
    """One encoded conversation. T: its token count; N / M: image / video patch rows (1176 features each)."""

    input_ids: np.ndarray  # int32 [T]
    labels: np.ndarray  # int32 [T], IGNORE_INDEX (-100) where not trained
    pixel_values: np.ndarray | None  # float32 [N, 1176]
    image_grid_thw: np.ndarray | None  # int [images, 3]
    pixel_values_videos: np.ndarray | None  # float32 [M, 1176]
    video_grid_thw: np.ndarray | None  # int [videos, 3]
    line: int = 0
    second_per_grid_ts: np.ndarray | None = None  # float [videos]: Qwen2.5-VL's time spacing (its processor's)


def _token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {token} token; is this a Qwen2-VL tokenizer?")
    return int(token_id)


def assistant_labels(input_ids: np.ndarray, tokenizer) -> np.ndarray:
    """Labels of one rendered conversation `input_ids` [T]: int32 [T], the id where trained, -100 elsewhere.

    Trained: each assistant turn's tokens after its header `<|im_start|> assistant \\n`, up to and including the
    `<|im_end|>` that closes it and the `\\n` token after that (to the end if the turn has no `<|im_end|>`, e.g.
    truncated). As in Qwen's recipe the header is `<|im_start|>`, the `assistant` tokens and one token more (the
    `\\n`; when a reply itself starts with a newline BPE merges the two, and that token is masked too). Vision tokens
    are -100 wherever they are. `tokenizer`: ours or a transformers one (`convert_tokens_to_ids`, `encode`).
    """
    ids = np.asarray(input_ids).reshape(-1)
    labels = np.full(ids.shape, IGNORE_INDEX, np.int32)
    im_start, im_end = _token_id(tokenizer, "<|im_start|>"), _token_id(tokenizer, "<|im_end|>")
    role = tokenizer.encode("assistant", add_special_tokens=False)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    header = len(role) + 2  # <|im_start|> + "assistant" + "\n"
    ends = np.flatnonzero(ids == im_end)
    for start in np.flatnonzero(ids == im_start).tolist():
        if ids[start + 1:start + 1 + len(role)].tolist() != role:
            continue
        first = start + header
        after = ends[ends >= first]
        stop = len(ids) if after.size == 0 else int(after[0]) + 1
        if ids[stop:stop + len(newline)].tolist() == newline:
            stop += len(newline)
        labels[first:stop] = ids[first:stop]
    vision = [_token_id(tokenizer, t) for t in VISION_TOKENS]
    labels[np.isin(ids, vision)] = IGNORE_INDEX
    return labels


def load_media(messages: list[dict]) -> tuple[list, list, list]:
    """(images, videos, video rates) in message order. A plain path goes to the processor as it does at inference
    (its own pixel bounds); an item with qwen-vl-utils options ("max_pixels", "nframes", "fps", ...) is fetched
    with them first (vision_info.py's rules: no EXIF rotation, as qwen-vl-utils), then the processor sizes it as
    usual. A video's rate is what qwen-vl-utils' `process_vision_info(..., return_video_kwargs=True)` reports for
    it: the rate a file was sampled at, a frame list's "fps" option, else 2.0 (a plain path: the processor
    samples it at 2.0 and uses the rate it got)."""
    images, videos, rates = [], [], []
    for message in messages:
        content = message.get("content")
        for item in content if isinstance(content, list) else []:
            if item.get("type") == "image":
                options = {k: item[k] for k in IMAGE_OPTIONS if k in item}
                images.append(fetch_image(item["image"], **options) if options else item["image"])
            elif item.get("type") == "video":
                options = {k: item[k] for k in VIDEO_OPTIONS if k in item}
                if not options:
                    videos.append(item["video"])
                    rates.append(FPS)
                    continue
                frames, info = fetch_video(item["video"], **options)
                videos.append(frames)
                rates.append(info.sample_fps if info.sample_fps is not None else item.get("fps", FPS))
    return images, videos, rates


def encode_conversation(processor, messages: list[dict], *, max_length: int | None = None, line: int = 0,
                        source: str | os.PathLike | None = None) -> Example:
    """Render (`apply_chat_template(messages, add_generation_prompt=False)`: the default system prompt is added when
    there is none, as at inference), load the media, run the processor and label (`assistant_labels`).

    `max_length`: a longer example is cut to `max_length` tokens only when the cut falls after its last vision
    token (a cut vision block would not match its features) and a trained token remains; otherwise `DataError`.
    `line` / `source` only name the conversation in errors.
    """
    where = _where(source, line)
    text = processor.apply_chat_template(messages, add_generation_prompt=False)
    try:
        images, videos, rates = load_media(messages)
        # A Qwen2.5-VL processor (ours or transformers') is told each video's rate: its `second_per_grid_ts`.
        timed = videos and "second_per_grid_ts" in getattr(processor, "model_input_names", ())
        out = processor(text=[text], images=images or None, videos=videos or None, **({"fps": rates} if timed else {}))
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: cannot encode the conversation: {e}") from None
    ids = np.asarray(out["input_ids"])[0].astype(np.int32)
    labels = assistant_labels(ids, processor.tokenizer)
    full = len(ids)
    if max_length is not None and full > max_length:
        vision = np.flatnonzero(np.isin(ids, [_token_id(processor.tokenizer, t) for t in VISION_TOKENS]))
        if vision.size and vision[-1] >= max_length:
            raise DataError(f"{where}: {full} tokens, over max_length={max_length}, and its images/videos end at "
                            f"token {vision[-1] + 1}, so it cannot be cut; raise max_length to at least {full} "
                            "or give the media fewer pixels/frames (\"max_pixels\", \"nframes\")")
        ids, labels = ids[:max_length], labels[:max_length]
        if not (labels != IGNORE_INDEX).any():
            raise DataError(f"{where}: {full} tokens; cut to max_length={max_length} it keeps no assistant "
                            f"token to train on; raise max_length to at least {full}")
    if not (labels != IGNORE_INDEX).any():
        raise DataError(f"{where}: no assistant tokens to train on")
    get = lambda key: None if out.get(key) is None else np.asarray(out[key])
    return Example(ids, labels, get("pixel_values"), get("image_grid_thw"), get("pixel_values_videos"),
                   get("video_grid_thw"), line, get("second_per_grid_ts"))


def collate(examples: list[Example], *, pad_token_id: int, length_granule: int = 64) -> dict[str, np.ndarray]:
    """Right-pad examples into one batch, keyed like `training.prepare_batch`'s arguments.

    Returns input_ids / attention_mask / labels int32 [B, T] with T = `buckets.bucket(longest, length_granule)`
    (a handful of distinct T over a run, so a handful of compiles; pads: `pad_token_id`, mask 0, label -100), and
    pixel_values [ΣN, 1176] / image_grid_thw [Σimages, 3] / pixel_values_videos / video_grid_thw (and a Qwen2.5-VL
    processor's second_per_grid_ts [Σvideos]) concatenated in example order, present only when some example has
    them.
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    width = bucket(max(len(e.input_ids) for e in examples), granule=length_granule)
    batch = {"input_ids": np.full((len(examples), width), pad_token_id, np.int32),
             "attention_mask": np.zeros((len(examples), width), np.int32),
             "labels": np.full((len(examples), width), IGNORE_INDEX, np.int32)}
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        batch["input_ids"][row, :n], batch["attention_mask"][row, :n], batch["labels"][row, :n] = \
            e.input_ids, 1, e.labels
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        parts = [getattr(e, key) for e in examples if getattr(e, key) is not None]
        if parts:
            batch[key] = np.concatenate(parts)
    if "second_per_grid_ts" in batch and len(batch["second_per_grid_ts"]) != len(batch["video_grid_thw"]):
        raise ValueError("some examples have second_per_grid_ts and some videos do not: encode every example with "
                         "the same processor")
    return batch


# ------------------------------------------------------------------------------------------------- loader
class Loader:
    """Endless, deterministic, resumable batches of encoded conversations.

    Epoch e visits the conversations in the order `np.random.default_rng(seed + e).permutation(n)` (in file order
    when `shuffle=False`), `batch_size` at a time, encoding each batch only when it is due (pixel values of one
    batch at a time). The last partial batch of every epoch is dropped (`batches_per_epoch = n // batch_size`),
    so every step has the same batch size; fewer conversations than `batch_size` is an error.
    `state_dict()` after receiving a batch resumes, via `load_state_dict`, at exactly the next one.
    """

    def __init__(self, conversations: list[Conversation], processor, *, batch_size: int,
                 max_length: int | None = None, seed: int = 0, shuffle: bool = True, length_granule: int = 64):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(conversations) < batch_size:
            raise DataError(f"{len(conversations)} conversation(s), fewer than batch_size={batch_size}: lower "
                            "batch_size or add data")
        self.conversations, self.processor = list(conversations), processor
        self.batch_size, self.max_length, self.seed, self.shuffle = batch_size, max_length, int(seed), shuffle
        self.length_granule = length_granule
        pad = processor.tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else _token_id(processor.tokenizer, "<|im_end|>")
        self.epoch, self.position = 0, 0  # position: batches of this epoch already handed out

    @property
    def batches_per_epoch(self) -> int:
        return len(self.conversations) // self.batch_size

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.conversations)
        return np.random.default_rng(self.seed + epoch).permutation(n) if self.shuffle else np.arange(n)

    def __iter__(self):
        """Yields (batch, info) forever; info = {"epoch", "step_in_epoch", "lines"} (the batch's line numbers).
        Iterators share the loader's position; call `load_state_dict` before starting one."""
        while True:
            order = self._order(self.epoch)
            while self.position < self.batches_per_epoch:
                picked = [self.conversations[i] for i in order[self.position * self.batch_size:
                                                               (self.position + 1) * self.batch_size]]
                examples = [encode_conversation(self.processor, c.messages, max_length=self.max_length, line=c.line,
                                                source=c.source) for c in picked]
                batch = collate(examples, pad_token_id=self.pad_token_id, length_granule=self.length_granule)
                info = {"epoch": self.epoch, "step_in_epoch": self.position, "lines": [c.line for c in picked]}
                self.position += 1  # before the yield: a state saved now points at the next batch
                yield batch, info
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        """{"epoch", "position", "seed"}: plain ints, JSON-serialisable."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Resume from `state_dict()`: the next batch is the one that followed when it was saved (the same
        conversations and options are needed; the saved seed replaces this loader's)."""
        missing = {"epoch", "position", "seed"} - set(state)
        if missing:
            raise ValueError(f"loader state lacks {sorted(missing)}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch:
            raise ValueError(f"loader state epoch={epoch} position={position} does not fit this data "
                             f"({self.batches_per_epoch} batches per epoch)")
        self.epoch, self.position, self.seed = epoch, position, int(state["seed"])
