"""The Qwen2 tokenizer: transformers' `Qwen2TokenizerFast` on the checkpoint's tokenizer.json.

Byte-level BPE through the `tokenizers` library; special tokens, padding side and chat template from
tokenizer_config.json; encode, left padding, decode and `apply_chat_template` as transformers 4.57
(tokenization_utils_base.py `PreTrainedTokenizerBase`, tokenization_utils_fast.py `PreTrainedTokenizerFast`).
No JAX, no torch, no transformers, no model code.


Chat templates: the jinja2 sandbox transformers renders them in, and the Qwen2-VL-Instruct default template.

Mirrors transformers 4.57 utils/chat_template_utils.py (`_compile_jinja_template`, `render_jinja_template`): an
immutable sandbox with trim_blocks / lstrip_blocks, loop controls, `{% generation %}`, a plain-JSON `tojson` and
the `raise_exception` / `strftime_now` globals. jinja2 only: no JAX, no model code.


Small pieces shared by the preprocessing modules: `BatchFeature` and a JSON config reader.

No JAX, no model code, no torch: only the standard library.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from copy import deepcopy
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer

__all__ = ["INSTRUCT_ADDITIONAL_SPECIAL_TOKENS", "Qwen2Tokenizer"]

# `additional_special_tokens` of the Qwen2-VL-*-Instruct Hub repos' tokenizer_config.json.
INSTRUCT_ADDITIONAL_SPECIAL_TOKENS = (
    "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>",
    "<|video_pad|>",
)


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json: a string, null, or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _clean_up_tokenization(text: str) -> str:
    """transformers 4.57 tokenization_utils_base.py `PreTrainedTokenizerBase.clean_up_tokenization` (only used if
    the config asks for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _as_id_list(ids: Any) -> list[int]:
    if isinstance(ids, (int, np.integer)):
        return [int(ids)]
    return [int(i) for i in np.asarray(ids).reshape(-1).tolist()]


class Qwen2Tokenizer:
    """`Qwen2TokenizerFast` on a `tokenizers.Tokenizer`: byte-level BPE from tokenizer.json, no BOS, left padding.

    Special tokens and padding side come from tokenizer_config.json (Qwen2-VL-Instruct values when absent):
    eos `<|im_end|>`, pad `<|endoftext|>`, no bos/unk, padding_side "left".
    """

    def __init__(self, backend: Tokenizer, *, eos_token: str | None = "<|im_end|>",
                 pad_token: str | None = "<|endoftext|>", bos_token: str | None = None, unk_token: str | None = None,
                 additional_special_tokens: Iterable[str] = INSTRUCT_ADDITIONAL_SPECIAL_TOKENS,
                 padding_side: str = "left", model_max_length: int = 32768,
                 clean_up_tokenization_spaces: bool = False, chat_template: str | None = None):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self._backend = backend
        self._backend.no_padding()  # transformers sets padding/truncation per call; plain calls use neither
        self._backend.no_truncation()
        self.eos_token, self.pad_token, self.bos_token, self.unk_token = eos_token, pad_token, bos_token, unk_token
        self.additional_special_tokens = list(additional_special_tokens)
        for token in [eos_token, pad_token, bos_token, unk_token, *self.additional_special_tokens]:
            if token is not None and backend.token_to_id(token) is None:  # transformers adds missing special tokens
                backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        self.padding_side = padding_side
        self.model_max_length = model_max_length
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.chat_template = chat_template

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> Qwen2Tokenizer:
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found: the checkpoint directory must contain the "
                                    "tokenizer's tokenizer.json")
        backend = Tokenizer.from_file(str(tokenizer_file))
        config = read_json(path / "tokenizer_config.json") or {}
        for token_id, spec in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
            content = spec.get("content")
            if content is None or backend.token_to_id(content) is not None:
                continue
            token = AddedToken(content, single_word=spec.get("single_word", False), lstrip=spec.get("lstrip", False),
                               rstrip=spec.get("rstrip", False), normalized=spec.get("normalized", False),
                               special=spec.get("special", False))
            (backend.add_special_tokens if spec.get("special", False) else backend.add_tokens)([token])
            if backend.token_to_id(content) != int(token_id):
                raise ValueError(f"added token {content!r} got id {backend.token_to_id(content)}, the config says "
                                 f"{token_id}")
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        kwargs: dict[str, Any] = {}
        for key in ("eos_token", "pad_token", "bos_token", "unk_token"):
            if key in config:
                kwargs[key] = _token_content(config[key])
        if "additional_special_tokens" in config:
            kwargs["additional_special_tokens"] = [_token_content(t) for t in config["additional_special_tokens"]
                                                   or []]
        for key in ("padding_side", "model_max_length", "clean_up_tokenization_spaces"):
            if key in config:
                kwargs[key] = config[key]
        template = config.get("chat_template")
        kwargs["chat_template"] = named_template(template) if template is not None else None
        kwargs.update(overrides)
        return cls(backend, **kwargs)

    # --------------------------------------------------------------------------------------------- vocabulary
    @property
    def backend(self) -> Tokenizer:
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Base vocabulary without added tokens (151643 for Qwen2), like HF's `vocab_size`; `len()` counts all."""
        return self._backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._backend.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        if isinstance(tokens, str):
            return self._backend.token_to_id(tokens)
        return [self._backend.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | None | list[str | None]:
        if isinstance(ids, (int, np.integer)):
            return self._backend.id_to_token(int(ids))
        return [self._backend.id_to_token(int(i)) for i in ids]

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        """transformers 4.57 `PreTrainedTokenizerBase.special_tokens_map`: the set special-token attributes (passed
        to chat templates)."""
        out: dict[str, Any] = {}
        for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.additional_special_tokens:
            out["additional_special_tokens"] = list(self.additional_special_tokens)
        return out

    @property
    def all_special_ids(self) -> list[int]:
        tokens = [t for t in (self.bos_token, self.eos_token, self.unk_token, self.pad_token) if t]
        tokens += [t for t in self.additional_special_tokens if t not in tokens]
        return [self._backend.token_to_id(t) for t in tokens]

    # --------------------------------------------------------------------------------------------- encoding
    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one string; special tokens written in the text (`<|im_start|>`...) map to their ids."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def pad(self, sequences: list[list[int]], *, padding: bool | str = True, max_length: int | None = None,
            padding_side: str | None = None) -> tuple[list[list[int]], list[list[int]]]:
        """Pad id lists with `pad_token_id` on `padding_side` -> (ids, attention_mask) as lists."""
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        if padding in (False, None, "do_not_pad"):
            return [list(s) for s in sequences], [[1] * len(s) for s in sequences]
        if padding in (True, "longest"):
            target = max((len(s) for s in sequences), default=0)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs `max_length`")
            longest = max((len(s) for s in sequences), default=0)
            if longest > max_length:
                raise ValueError(f"a sequence has {longest} tokens, more than max_length={max_length} (truncation is "
                                 "not supported: it would cut vision tokens)")
            target = max_length
        else:
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if self.pad_token_id is None and any(len(s) < target for s in sequences):
            raise ValueError("padding needs a pad token, but the tokenizer has none")
        ids, mask = [], []
        for s in sequences:
            n_pad = target - len(s)
            fill, zeros, ones = [self.pad_token_id] * n_pad, [0] * n_pad, [1] * len(s)
            ids.append(fill + list(s) if side == "left" else list(s) + fill)
            mask.append(zeros + ones if side == "left" else ones + zeros)
        return ids, mask

    def __call__(self, text: str | Sequence[str], *, padding: bool | str = False, max_length: int | None = None,
                 padding_side: str | None = None, add_special_tokens: bool = True, return_tensors: str | None = None,
                 return_attention_mask: bool = True) -> BatchFeature:
        """transformers 4.57 `tokenizer(text, ...)` -> {"input_ids", "attention_mask"}; "np" gives int64 arrays
        [B, L]."""
        if return_tensors not in ("np", None):
            raise ValueError(f"return_tensors must be 'np' or None, got {return_tensors!r}")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a list of strings")
        encoded = [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        ids, mask = self.pad(encoded, padding=padding, max_length=max_length, padding_side=padding_side)
        out = BatchFeature()
        if return_tensors == "np":
            if len({len(s) for s in ids}) > 1:
                raise ValueError("sequences have different lengths; pass padding=True to batch them into an array")
            out["input_ids"] = np.array(ids, dtype=np.int64).reshape(len(ids), -1)
            if return_attention_mask:
                out["attention_mask"] = np.array(mask, dtype=np.int64).reshape(len(ids), -1)
        else:
            out["input_ids"] = ids[0] if single else ids
            if return_attention_mask:
                out["attention_mask"] = mask[0] if single else mask
        return out

    # --------------------------------------------------------------------------------------------- decoding
    def decode(self, ids: Any, skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool | None = None) -> str:
        """transformers 4.57 tokenization_utils_fast.py `PreTrainedTokenizerFast._decode`: the byte-level decoder,
        optional clean-up (off for Qwen2)."""
        text = self._backend.decode(_as_id_list(ids), skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else \
            clean_up_tokenization_spaces
        return _clean_up_tokenization(text) if clean else text

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences]

    # --------------------------------------------------------------------------------------------- chat
    def apply_chat_template(self, conversation: list[dict] | list[list[dict]], *, add_generation_prompt: bool = False,
                            tokenize: bool = True, chat_template: str | None = None,
                            continue_final_message: bool = False, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, padding: bool | str = False,
                            return_tensors: str | None = None, return_dict: bool = False, **kwargs: Any):
        """transformers 4.57 tokenization_utils_base.py `PreTrainedTokenizerBase.apply_chat_template` (same
        defaults: tokenize=True, no generation prompt). Template variables: the messages, `add_generation_prompt`,
        `tools`, `documents`, the special tokens map, and any extra keyword (e.g. `add_vision_id=True`)."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("the tokenizer has no chat template; pass `chat_template=`")
        batched = is_batched_conversation(conversation)
        rendered = render_chat_template(template, conversation if batched else [conversation],
                                        add_generation_prompt=add_generation_prompt,
                                        continue_final_message=continue_final_message, tools=tools,
                                        documents=documents, **{**self.special_tokens_map, **kwargs})
        text = rendered if batched else rendered[0]
        if not tokenize:
            return text
        out = self(text, padding=padding, add_special_tokens=False, return_tensors=return_tensors)
        return out if return_dict else out["input_ids"]


__all__ = ["DEFAULT_CHAT_TEMPLATE", "compile_chat_template", "render_chat_template"]

# The chat template the Qwen2-VL-*-Instruct Hub repos ship, used when a checkpoint ships none.
DEFAULT_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body. transformers' `AssistantTracker`
    (utils/chat_template_utils.py) also records the character span for assistant masks; the rendered text is the
    same."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # transformers 4.57 utils/chat_template_utils.py `_compile_jinja_template` overrides jinja's `tojson` (which
    # HTML-escapes) with plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_chat_template(template: str) -> jinja2.Template:
    """transformers 4.57 utils/chat_template_utils.py `_compile_jinja_template`: an immutable sandbox with
    trim_blocks/lstrip_blocks, loop controls, `{% generation %}`, the `tojson` override and the `raise_exception` /
    `strftime_now` globals."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def is_batched_conversation(conversation: Any) -> bool:
    return isinstance(conversation, (list, tuple)) and bool(conversation) and isinstance(conversation[0],
                                                                                         (list, tuple))


def render_chat_template(template: str, conversations: list[list[dict]], *, add_generation_prompt: bool = False,
                         continue_final_message: bool = False, tools: list[dict] | None = None,
                         documents: list[dict] | None = None, **template_kwargs: Any) -> list[str]:
    """transformers 4.57 utils/chat_template_utils.py `render_jinja_template` for a list of conversations (one
    rendered string each)."""
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt are not compatible")
    if tools is not None and not all(isinstance(t, dict) for t in tools):
        raise ValueError("tools must be given as JSON-schema dicts")
    if documents is not None and not all(isinstance(d, dict) for d in documents):
        raise ValueError("documents must be a list of dicts with 'title' and 'text' keys")
    compiled = compile_chat_template(template)
    tag = "CONTINUE_FINAL_MESSAGE_TAG "
    rendered = []
    for chat in conversations:
        if not isinstance(chat, (list, tuple)) or not all(isinstance(m, dict) for m in chat):
            raise ValueError("a conversation must be a list of message dicts with 'role' and 'content'")
        final_text = None
        if continue_final_message:  # as transformers: mark the end of the last text so the closing tokens can be cut
            chat = deepcopy(list(chat))
            final = chat[-1]["content"]
            if isinstance(final, (list, tuple)):
                for block in reversed(final):
                    if "text" in block:
                        final_text = block["text"]
                        block["text"] = block["text"] + tag
                        break
                else:
                    raise ValueError("continue_final_message is set but the final message has no text to continue")
            else:
                final_text = final
                chat[-1]["content"] = final + tag
        text = compiled.render(messages=chat, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **template_kwargs)
        if continue_final_message:
            if final_text.strip() not in text or tag.strip() not in text:
                raise ValueError("continue_final_message is set but the final message does not appear in the "
                                 "rendered chat")
            cut = text.rindex(tag.strip())
            text = text[:cut] if text[cut:cut + len(tag)] == tag else text[:cut].rstrip()
        rendered.append(text)
    return rendered

def named_template(template: Any) -> str:
    """A chat template given as a string, or as HF's list of {"name", "template"} (the "default" one is used)."""
    if isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" in named:
            return named["default"]
    if isinstance(template, dict) and "default" in template:
        return template["default"]
    raise ValueError("a chat template must be a string or contain a template named 'default'")


__all__ = ["BatchFeature", "read_json"]


class BatchFeature(dict):
    """A dict (HF key order kept) whose entries are also attributes: `out["input_ids"]` or `out.input_ids`.

    The NumPy-only subset of transformers 4.57 feature_extraction_utils.py `BatchFeature`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def read_json(path: Path) -> dict | None:
    """The parsed JSON file at `path`, or None if there is no such file; invalid JSON raises ValueError."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
