"""Chat templates without jinja2: a small, safe renderer for known template families.

Instruct models ship a Jinja chat template (``tokenizer_config.json`` or the
GGUF key ``tokenizer.chat_template``).  Running arbitrary Jinja from a model
file is code we would rather not execute, and the templates in use fall into
a few families; :func:`parse_template` recognizes them by their markers:

- ``chatml``: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` (SmolLM2, Qwen,
  many others), with the template's default system message when it injects
  one (SmolLM2 does);
- ``llama3``: ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``.

Rendering yields *segments*: template text (may contain special tokens) and
message content (tokenized with special tokens disabled, so a user cannot
smuggle ``<|im_end|>`` into the prompt).
"""

from __future__ import annotations

import re

import attrs

__all__ = ["ChatTemplate", "Segment", "parse_template"]

_ROLES = frozenset({"system", "user", "assistant", "tool"})


@attrs.frozen
class Segment:
    """A piece of a rendered prompt; ``special`` means special tokens are parsed in it."""

    text: str
    special: bool


@attrs.frozen
class ChatTemplate:
    """A recognized chat template family with its parameters."""

    family: str  # "chatml" | "llama3"
    default_system: str | None = None  # injected when the first message is not a system message
    bos: str = ""  # text prepended to the whole prompt (llama3: <|begin_of_text|>)
    stop_markers: tuple[str, ...] = ()  # special tokens that end an assistant turn

    def render(self, messages: list[tuple[str, str]], *, add_generation_prompt: bool = True) -> list[Segment]:
        """Render ``(role, content)`` pairs into segments, ending with the assistant prompt."""
        out: list[Segment] = []
        if self.bos:
            out.append(Segment(self.bos, True))
        if self.default_system is not None and (not messages or messages[0][0] != "system"):
            messages = [("system", self.default_system), *messages]
        for role, content in messages:
            if role not in _ROLES:
                raise ValueError(f"unknown chat role {role!r}")
            if self.family == "chatml":
                out.append(Segment(f"<|im_start|>{role}\n", True))
                out.append(Segment(content, False))
                out.append(Segment("<|im_end|>\n", True))
            else:
                out.append(Segment(f"<|start_header_id|>{role}<|end_header_id|>\n\n", True))
                out.append(Segment(content.strip(), False))
                out.append(Segment("<|eot_id|>", True))
        if add_generation_prompt:
            if self.family == "chatml":
                out.append(Segment("<|im_start|>assistant\n", True))
            else:
                out.append(Segment("<|start_header_id|>assistant<|end_header_id|>\n\n", True))
        return [s for s in out if s.text]


_CHATML_SYSTEM = re.compile(r"""<\|im_start\|>system\\n(.*?)<\|im_end\|>""", re.S)
_CHATML_SYSTEM_RAW = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", re.S)


def _unescape(s: str) -> str:
    return s.replace("\\n", "\n").replace("\\'", "'").replace('\\"', '"')


def parse_template(source: str | None) -> ChatTemplate | None:
    """The family of a Jinja chat template, or None when it is not one we render."""
    if not source:
        return None
    if "<|im_start|>" in source and "<|im_end|>" in source:
        default = None
        if "messages[0]['role'] != 'system'" in source or 'messages[0]["role"] != "system"' in source:
            m = _CHATML_SYSTEM_RAW.search(source) or _CHATML_SYSTEM.search(source)
            if m is not None and "{{" not in m.group(1) and "{%" not in m.group(1):
                default = _unescape(m.group(1))
        return ChatTemplate("chatml", default_system=default, stop_markers=("<|im_end|>",))
    if "<|start_header_id|>" in source and "<|eot_id|>" in source:
        bos = "<|begin_of_text|>" if "bos_token" in source or "<|begin_of_text|>" in source else ""
        return ChatTemplate("llama3", bos=bos, stop_markers=("<|eot_id|>",))
    return None
