"""Append-only token builder: the ids that go after a tool-calling turn, from the model's own template.

The trajectory already holds the ids the engine sampled, ending with the end-of-turn id
(e.g. `<|im_end|>`). The template would render more after it: glue the model never
emitted (the "\\n" after `<|im_end|>`), the tool answers in their wrapping, and the next
assistant header. We find that text by rendering a probe conversation (the prompt, an
assistant turn calling the tools, their answers, the next header), check that it starts
with the prompt as rendered for generation, and encode what follows the assistant turn's
end-of-turn token. Nothing already in the trajectory is decoded or re-encoded.

Tool output is encoded as plain text: a tool that prints `<|im_end|>` gets the ids of
those characters, never the control token. The template parts around it keep theirs.
The text is first put in the form the template writes it in (`CONTENT_FORMS`: as is for
Qwen, a JSON string for Llama 3.1, stripped for templates that `|trim` it).

A template is refused with `TemplateError` when the builder cannot reproduce its tool
turn: it writes tool-call ids into it (Mistral's 9-character ids: tool results carry no
id), it re-renders the prompt, it ends tool-calling turns with something other than the
eos token, or it drops or reorders tool answers. `python -m toolrl.check_template DIR`
says which, for a model folder.

Reasoning is kept as sampled. Some templates drop or normalise `<think>...</think>` of
earlier assistant turns when they render a whole conversation (Qwen3 drops it from turns
before the last user message and drops empty think blocks). The trajectory keeps the
reasoning ids exactly as sampled instead: the trainer must score the ids the policy
sampled, with their rollout logprobs, in the context it sampled them in; re-rendering
history without the reasoning would train on a context the model never saw.
Run `python -m pytest tests/unit/test_real_templates.py` for this on real templates.

    python -m pytest tests/unit/test_chat.py tests/unit/test_real_templates.py
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from toolrl.rollout.trajectory import ToolResult

_PROMPT = [{"role": "user", "content": "?"}]
# Stand-in for tool output while we render glue: a unique core with the characters that the
# templates' content transforms change (edge whitespace for `trim`, quote, backslash and
# newline for `tojson`), so the rendered probe tells which transform the template applies.
_PROBE_CONTENT = ' \ntoolrl-probe-{}"\\\n '
# Two sets of 9-character call ids (Mistral's length): a template whose render changes with
# them writes ids into the tool turn, which toolrl's results do not carry.
_IDS = ("probe{:04d}", "other{:04d}")


def _tojson(text: str) -> str:
    """What HF's `tojson` filter makes of a string (json.dumps, ensure_ascii=False)."""
    return json.dumps(text, ensure_ascii=False)


# How templates render a tool message's string content, most literal first: Qwen2.5/Qwen3
# as is, Llama 3.1 through `tojson` (a string is `iterable` in Jinja), Qwen3.5 `|trim`.
CONTENT_FORMS: dict[str, Callable[[str], str]] = {
    "as is": lambda t: t,
    "JSON string": _tojson,
    "stripped": str.strip,
    "stripped JSON string": lambda t: _tojson(t.strip()),
}


# Ids before each tool answer, ids after the last one, the name of the answers' content form.
_Glue = tuple[list[list[int]], list[int], str]


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
        self._glue_cache: dict[tuple[str, ...], _Glue] = {}
        # Fail when the worker is built, not at the first tool call of the first step.
        self.tool_turn_ids([ToolResult("probe", "a"), ToolResult("probe", "b")])
        # How the template writes a tool's text, a key of CONTENT_FORMS (e.g. "JSON string").
        self.content_form: str = self._glue(("probe", "probe"))[2]

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

    def truncate(self, text: str, max_tokens: int) -> str:
        """`text` cut to its first `max_tokens` tokens (as plain text), with a marker saying how
        many were cut, so a tool's flood costs a bounded share of the context."""
        ids = self._encode_plain(text)
        if len(ids) <= max_tokens:
            return text
        kept = self.tok.decode(ids[:max_tokens], skip_special_tokens=False)
        return kept + f"\n[output truncated: {len(ids) - max_tokens} more tokens]"

    def decode(self, ids: list[int]) -> str:
        """Text of sampled ids, for the parser only: it is never encoded back."""
        return self.tok.decode(ids, skip_special_tokens=False)

    def tool_turn_ids(self, results: list[ToolResult]) -> list[int]:
        """Ids to append after a turn that ended with the end-of-turn id: glue + tool answers + header."""
        pieces, tail, form_name = self._glue(tuple(r.name for r in results))
        form = CONTENT_FORMS[form_name]
        ids: list[int] = []
        for piece, r in zip(pieces, results, strict=True):
            ids += piece + self._encode_plain(form(r.content))
        return ids + tail

    def _glue(self, names: tuple[str, ...]) -> _Glue:
        """The template's ids before each tool answer and after the last one, and the transform
        it applies to a tool answer's text.

        They depend only on the tools' names, not on what the tools said, so they are
        rendered once per shape of tool turn instead of once per tool turn."""
        if names in self._glue_cache:
            return self._glue_cache[names]
        full = self._render_probe(names, _IDS[0])
        if full != self._render_probe(names, _IDS[1]):
            raise TemplateError(
                "the template writes tool-call ids into the tool turn (e.g. Mistral's "
                "9-character call ids); toolrl's tool results carry no call id"
            )
        prompt = self._render(_PROMPT, generation_prompt=True)
        if not full.startswith(prompt):
            raise TemplateError(
                "adding a tool-calling turn and tool messages changed the prompt: not append-only"
            )
        form_name, first = _content_form(full, len(prompt))
        form = CONTENT_FORMS[form_name]
        end = full.find(self.turn_end, len(prompt))
        if not 0 <= end < first:
            raise TemplateError(
                f"assistant turns with tool calls do not end with {self.turn_end!r}"
            )
        glue = full[end + len(self.turn_end) :]
        pieces = []
        for i in range(len(names)):
            before, sep, glue = glue.partition(form(_PROBE_CONTENT.format(i)))
            if not sep:
                raise TemplateError("the template dropped or reordered a tool message's content")
            pieces.append(self._encode(before))
        self._glue_cache[names] = (pieces, self._encode(glue), form_name)
        return self._glue_cache[names]

    def _render_probe(self, names: tuple[str, ...], ids: str) -> str:
        """Render prompt + an assistant turn calling the tools + their answers + next header.

        One call per answer first; templates that allow one call per turn (Llama 3.1 raises
        on more) get a single call, since the glue after the turn does not depend on it."""
        tool_msgs = [
            {
                "role": "tool",
                "name": n,
                "tool_call_id": ids.format(i),
                "content": _PROBE_CONTENT.format(i),
            }
            for i, n in enumerate(names)
        ]
        error = ""
        for called in (names, names[:1]):
            calls = [
                {"id": ids.format(i), "type": "function", "function": {"name": n, "arguments": {}}}
                for i, n in enumerate(called)
            ]
            turn = {"role": "assistant", "content": "", "tool_calls": calls}
            try:
                return self._render(_PROMPT + [turn] + tool_msgs, generation_prompt=True)
            except Exception as e:  # the template's raise_exception(), or a field it lacks
                error = f"{type(e).__name__}: {e}"
        raise TemplateError(f"the template cannot render a tool turn: {error}")


def _content_form(full: str, start: int) -> tuple[str, int]:
    """Which of `CONTENT_FORMS` the template applied to the first probe answer, and where
    that answer starts in `full` (searched from `start`, the end of the prompt)."""
    probe = _PROBE_CONTENT.format(0)
    for name, form in CONTENT_FORMS.items():
        at = full.find(form(probe), start)
        if at >= 0:
            return name, at
    raise TemplateError("the template dropped or altered a tool message's content")
