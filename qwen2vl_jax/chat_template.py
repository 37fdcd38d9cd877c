"""Chat templates: the jinja2 sandbox transformers renders them in, and the Qwen2-VL-Instruct default template.

Mirrors transformers 4.57 utils/chat_template_utils.py (`_compile_jinja_template`, `render_jinja_template`): an
immutable sandbox with trim_blocks / lstrip_blocks, loop controls, `{% generation %}`, a plain-JSON `tojson` and
the `raise_exception` / `strftime_now` globals. jinja2 only: no JAX, no model code.
"""

from __future__ import annotations

import json
from copy import deepcopy
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

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
