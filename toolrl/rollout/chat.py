"""Append-only token builder: the ids that go after a tool-calling turn, from the model's own template.

The trajectory already holds the ids the engine sampled, ending with the end-of-turn id
(e.g. `<|im_end|>`). The template would render more after it: glue the model never
emitted (the "\\n" after `<|im_end|>`), the tool answers in their wrapping, and the next
assistant header. We find that text by rendering a probe conversation with and without
the tool messages, check the template only appended, and encode the difference. Nothing
already in the trajectory is decoded or re-encoded.

Tool output is encoded as plain text: a tool that prints `<|im_end|>` gets the ids of
those characters, never the control token. The template parts around it keep theirs.

    python -m pytest tests/unit/test_chat.py
"""

from __future__ import annotations

import re
from typing import Any

from toolrl.rollout.trajectory import ToolResult

_PROBE = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "!"}]
_SENTINEL = "\x00toolrl-tool-output-{}\x00"  # stands in for tool text while we render glue


class TemplateError(ValueError):
    """The model's chat template cannot be used append-only for tool turns."""


class ChatBuilder:
    """Renders prompts and tool turns with a Hugging Face tokenizer's chat template."""

    def __init__(self, tokenizer: Any, tools: list[dict[str, Any]]) -> None:
        self.tok = tokenizer
        self.tools = tools
        if tokenizer.eos_token is None:
            raise TemplateError("the tokenizer has no eos token to end an assistant turn")
        self.turn_end = tokenizer.eos_token  # e.g. "<|im_end|>"
        self.turn_end_id: int = tokenizer.convert_tokens_to_ids(self.turn_end)
        added = sorted(getattr(tokenizer, "get_added_vocab", dict)(), key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, added))) if added else None
        self._glue_cache: dict[tuple[str, ...], tuple[list[list[int]], list[int]]] = {}
        # Fail when the worker is built, not at the first tool call of the first step.
        self.tool_turn_ids([ToolResult("probe", "a"), ToolResult("probe", "b")])

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.turn_end_id]

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(
            messages, tools=self.tools, add_generation_prompt=generation_prompt, tokenize=False
        )

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def _encode_plain(self, text: str) -> list[int]:
        """Encode text so that no added or special token (`<|im_end|>`, `<tool_call>`) can form:
        each occurrence of one is cut after its first character and encoded in pieces."""
        ids, pos = [], 0
        for m in self._added.finditer(text) if self._added else ():
            ids += self._encode(text[pos : m.start()]) + self._encode(m.group()[0])
            ids += self._encode_plain(m.group()[1:])
            pos = m.end()
        return ids + self._encode(text[pos:])

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """Ids of the prompt up to and including the assistant header the model continues."""
        return self._encode(self._render(messages, generation_prompt=True))

    def decode(self, ids: list[int]) -> str:
        """Text of sampled ids, for the parser only: it is never encoded back."""
        return self.tok.decode(ids, skip_special_tokens=False)

    def tool_turn_ids(self, results: list[ToolResult]) -> list[int]:
        """Ids to append after a turn that ended with the end-of-turn id: glue + tool answers + header."""
        pieces, tail = self._glue(tuple(r.name for r in results))
        ids: list[int] = []
        for piece, r in zip(pieces, results, strict=True):
            ids += piece + self._encode_plain(r.content)
        return ids + tail

    def _glue(self, names: tuple[str, ...]) -> tuple[list[list[int]], list[int]]:
        """The template's ids before each tool answer, and after the last one.

        They depend only on the tools' names, not on what the tools said, so they are
        rendered once per shape of tool turn instead of once per tool turn."""
        if names in self._glue_cache:
            return self._glue_cache[names]
        tool_msgs = [
            {"role": "tool", "name": n, "content": _SENTINEL.format(i)} for i, n in enumerate(names)
        ]
        short = self._render(_PROBE, generation_prompt=False)
        full = self._render(_PROBE + tool_msgs, generation_prompt=True)
        if not full.startswith(short):
            raise TemplateError("adding tool messages changed earlier text: not append-only")
        cut = short.rfind(self.turn_end)
        if cut < 0:
            raise TemplateError(f"assistant turns do not end with {self.turn_end!r}")
        glue = short[cut + len(self.turn_end) :] + full[len(short) :]
        pieces = []
        for i in range(len(names)):
            before, sep, glue = glue.partition(_SENTINEL.format(i))
            if not sep:
                raise TemplateError("the template dropped or altered a tool message's content")
            pieces.append(self._encode(before))
        self._glue_cache[names] = (pieces, self._encode(glue))
        return self._glue_cache[names]
