"""The reasoning step: split a turn's reasoning off before its tool calls are parsed.

Thinking models open their turn with a reasoning block (Qwen3 `<think>...</think>`, Mistral's
Magistral `[THINK]...[/THINK]`). A call written inside it is the model thinking about a
call, not making one, and a tool call is an action (code runs, files change). So the agent
loop runs this step first and hands the call parser only the text after the block:

    sampled text ──► reasoning step ──► (reasoning, rest) ──► parser(rest) ──► calls
                                              └──► calls seen inside are counted, never run

The rules, as vLLM keeps reasoning parsers apart from tool parsers:
- A block is reasoning only where it leads the turn (after whitespace): `<think>` later in
  the text, e.g. inside a JSON string argument, is data for the call parser.
- When the prompt itself opened the block (a template whose generation prompt ends with
  `<think>\\n`), the turn starts inside it: everything up to the first end tag is reasoning.
- A block that is never closed holds the rest of the turn: it is all reasoning, so the turn
  has no calls and no content (and no errors: the model was still thinking).

A reasoning step is chosen in YAML under the parser (`parser/reasoning=qwen3|mistral|none`);
any object with `opened_by(prompt) -> bool` and `__call__(text, opened) -> Reasoned` works.

    python -m pytest tests/unit/test_reasoning.py
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class Reasoned:
    """A turn's text split in two: the reasoning (without its tags) and the rest."""

    reasoning: str
    text: str


class ReasoningStep(Protocol):
    def opened_by(self, prompt: str) -> bool:
        """Whether a turn that continues `prompt` (the text before it) starts in reasoning."""
        ...

    def __call__(self, text: str, opened: bool = False) -> Reasoned: ...


@dataclass
class TagReasoning:
    """Reasoning between a start and an end tag, leading the turn."""

    start: str = "<think>"
    end: str = "</think>"

    def __post_init__(self) -> None:
        if not self.start or not self.end:
            raise ValueError("a reasoning step needs a non-empty start and end tag")

    def opened_by(self, prompt: str) -> bool:
        last = prompt.rfind(self.start)
        return last >= 0 and prompt.find(self.end, last) < 0

    def __call__(self, text: str, opened: bool = False) -> Reasoned:
        body = text
        if not opened:
            lead = text.lstrip()
            if not lead.startswith(self.start):
                return Reasoned("", text)
            body = lead[len(self.start) :]
        reasoning, closed, rest = body.partition(self.end)
        return Reasoned(reasoning, rest) if closed else Reasoned(body, "")


@dataclass
class NoReasoning:
    """For models that do not reason in tags: the whole turn goes to the call parser."""

    def opened_by(self, prompt: str) -> bool:
        return False

    def __call__(self, text: str, opened: bool = False) -> Reasoned:
        return Reasoned("", text)
