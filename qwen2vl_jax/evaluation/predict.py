"""Answers for a dataset: prompts read from JSONL, generated on the serving engine, yielded in input order.

    items = read_items("docvqa_val.jsonl")                 # the fine-tuning format, without the answer turn
    with Predictor(model, processor, max_slots=8, generation={"max_new_tokens": 32}) as predictor:
        for row in predictor.run(items):                   # in input order, while the engine batches them
            print(row["id"], row["answer"])

One item per JSONL line, in the message format fine-tuning reads (`training.data.read_jsonl`: media paths relative
to the file, per-item qwen-vl-utils options such as "max_pixels" / "nframes" / "fps" honoured). A trailing assistant
turn is not shown to the model: it is the reference answer (`Item.reference`), so a fine-tuning file can be evaluated
as it is. Every other key of the line stays on `Item.record` ("id", "answers", "choices", "bbox", ...); an
`"generation"` object there overrides the decoding settings for that item (`max_new_tokens`, `temperature`,
`top_p`, `top_k`, `do_sample`, `repetition_penalty`, `stop`, as lmms-eval's `gen_kwargs` (its `until` too)).

The engine (`qwen2vl_jax.engine.Engine`, threaded) batches the requests continuously; the host encodes the next
items (media decoding, resizing, patching) while the device decodes, keeping `2 * max_slots` requests in flight.
Rows come back in input order whatever order they finish in. Every item's sampling seed is `seed + index` (mod
2**63), so a sampled answer depends on its item alone, not on what it was batched with or whether the run was
resumed; greedy answers are the engine's, which equal `generate`'s (tests/engine/test_engine.py).

A row is `{"index", "id" (when the item has one), "answer", "finish_reason", "prompt_tokens", "new_tokens"}`, or
`{"index", "id", "error"}` for an item that could not be encoded or run (an unreadable image, a prompt longer than
the engine's context): one bad item does not end a long run, and the error names the problem.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from ..engine import Engine, EngineError, Request
from ..generation.sampling import GenerationConfig
from ..generation.stops import cut_at_stop
from ..training.data import DataError, read_jsonl
from .scoring import encode_prompt

__all__ = ["Item", "read_items", "Predictor", "generation_config"]

SEED_RANGE = 2**63  # seeds are in [0, 2**63): an item's seed + index wraps around instead of failing
OVERRIDES = ("max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "repetition_penalty", "min_new_tokens")


@dataclasses.dataclass
class Item:
    index: int  # 0-based position among the file's items: the row's key in outputs, and its seed offset
    messages: list[dict]  # what the model sees (media paths absolute)
    reference: str | None = None  # the text of a trailing assistant turn, when the line has one
    record: dict = dataclasses.field(default_factory=dict)  # the line's other keys

    @property
    def id(self) -> Any:
        return self.record.get("id")


def _text_of(message: dict) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part.get("type") == "text")


def read_items(path: str | os.PathLike, *, check_media: bool = True) -> list[Item]:
    """The items of a JSONL file (module docstring); every line is validated first (`training.data.DataError`
    naming each bad line). Items must end with a user turn once a trailing assistant turn (the reference) is cut."""
    conversations = read_jsonl(path, check_media=check_media, need_answer=False)
    items, problems = [], []
    for i, conv in enumerate(conversations):
        messages, reference = list(conv.messages), None
        if messages[-1]["role"] == "assistant":
            reference = _text_of(messages.pop())
        if not messages or messages[-1]["role"] != "user":
            problems.append((conv.line, "the prompt must end with a user turn (after any trailing assistant turn, "
                                        "which is taken as the reference answer)"))
            continue
        generation = conv.record.get("generation", {})
        if not isinstance(generation, dict) or set(generation) - set(OVERRIDES) - {"stop", "until"}:
            problems.append((conv.line, f'"generation" may set {", ".join(OVERRIDES)}, stop; got '
                                        f"{generation!r:.80}"))
            continue
        items.append(Item(i, messages, reference, conv.record))
    if problems:
        listed = "\n".join(f"  {path} line {n}: {p}" for n, p in problems[:20])
        raise DataError(f"{path}: {len(problems)} problem(s) in the prompts:\n{listed}", problems)
    return items


def generation_config(base: GenerationConfig, overrides: Mapping[str, Any] | None, seed: int
                      ) -> tuple[GenerationConfig, list[str]]:
    """`base` with an item's overrides (lmms-eval `gen_kwargs` names too: `until`, `temperature` 0 = greedy) and
    its seed; returns (config, stop strings). Raises ValueError naming a bad stop; the engine validates the rest."""
    overrides = dict(overrides or {})
    stops = overrides.pop("stop", None) or overrides.pop("until", None) or []
    overrides.pop("until", None)
    if isinstance(stops, str):
        stops = [stops]
    if not isinstance(stops, list | tuple) or not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop must be a string or a list of non-empty strings, got {stops!r:.80}")
    values = {k: overrides[k] for k in OVERRIDES if overrides.get(k) is not None}
    if values.get("temperature") == 0:
        values.pop("temperature")
        values["do_sample"] = False
    elif "temperature" in values and "do_sample" not in values:
        values["do_sample"] = True
    try:
        config = dataclasses.replace(base, **values, seed=seed)
    except TypeError as e:
        raise ValueError(f"bad generation settings {values}: {e}") from None
    return config, list(stops)


class Predictor:
    """Generate answers for items on one serving engine (module docstring). `generation`: overrides of the
    checkpoint's generation_config.json for every item (an item's own "generation" wins); `seed`: the base of every
    item's seed. `engine_options` go to `Engine` (page_size, max_context, num_pages, max_chunk, ...). Close it (or
    use `with`) to stop the engine's threads."""

    def __init__(self, model, processor, *, max_slots: int = 8, generation: Mapping[str, Any] | None = None,
                 seed: int = 0, engine: Engine | None = None, **engine_options):
        self.processor = processor
        self.engine = engine if engine is not None else Engine(model, processor, max_slots=max_slots,
                                                               **engine_options)
        self.base, self.stops = generation_config(
            GenerationConfig.from_pretrained(getattr(model, "source_dir", None)), generation, 0)
        self.base.validate(model.config.text_config.vocab_size)
        self.seed = seed
        self.in_flight = 2 * self.engine.max_slots

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.engine.close()

    def _submit(self, item: Item):
        """(handle, stops) for an item, or raises what makes it impossible (encoding, settings, length)."""
        overrides = item.record.get("generation") or {}
        config, stops = generation_config(self.base, overrides, (self.seed + item.index) % SEED_RANGE)
        stops = stops or self.stops
        inputs = encode_prompt(self.processor, item.messages)
        request = Request(input_ids=inputs["input_ids"], pixel_values=inputs.get("pixel_values"),
                          image_grid_thw=inputs.get("image_grid_thw"),
                          pixel_values_videos=inputs.get("pixel_values_videos"),
                          video_grid_thw=inputs.get("video_grid_thw"),
                          second_per_grid_ts=inputs.get("second_per_grid_ts"), generation_config=config, stop=stops)
        return self.engine.submit(request), stops

    def _row(self, item: Item, handle, stops, error: str | None) -> dict:
        row = {"index": item.index}
        if item.id is not None:
            row["id"] = item.id
        if error is None:
            try:
                result = handle.wait()
            except (EngineError, ValueError, OSError) as e:
                error = str(e)
        if error is not None:
            return {**row, "error": error}
        text, stopped = cut_at_stop(self.processor.decode(np.asarray(result.tokens), skip_special_tokens=True),
                                    stops)
        return {**row, "answer": text, "finish_reason": "stop" if stopped else result.finish_reason,
                "prompt_tokens": result.prompt_tokens, "new_tokens": len(result.tokens)}

    def run(self, items: Iterable[Item | Mapping]) -> Iterator[dict]:
        """Rows (module docstring) for `items`, in their order. An item may also be a mapping with "messages" (and
        optionally "index", "id", "generation"), as lmms-eval's plugin passes them."""
        if self.engine.thread is None:
            self.engine.start()
        window: collections.deque = collections.deque()
        for position, item in enumerate(items):
            if not isinstance(item, Item):
                record = {k: v for k, v in item.items() if k not in ("messages", "index")}
                item = Item(item.get("index", position), list(item["messages"]), None, record)
            try:
                handle, stops = self._submit(item)
                window.append((item, handle, stops, None))
            except (EngineError, DataError, ValueError, OSError) as e:
                window.append((item, None, [], f"{type(e).__name__}: {e}" if not str(e) else str(e)))
            while window and (len(window) > self.in_flight or window[0][1] is None or window[0][1].done.is_set()):
                yield self._row(*window.popleft())
        while window:
            yield self._row(*window.popleft())
