"""Parser for the Hermes / Qwen2.5 tool-call format.

The model writes each call as a block

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "2+2"}}
    </tool_call>

with any whitespace around the JSON, any number of blocks per turn, and the turn may end
with the end-of-turn marker `<|im_end|>`. Every block is parsed on its own; each malformed
block yields one error line such as `tool call 2: invalid JSON: Expecting ',' delimiter
at char 31` and the well-formed blocks around it are still returned. Blocks are numbered
from 1 in the order they appear, malformed ones included, so every `<tool_call>` in the
text gives exactly one call or one error. Well-formed calls beyond `max_parallel_calls`
are not returned as calls; each gets an error saying it was not run.

The parser never evaluates anything and never raises on any string.
Run `python -m pytest tests/unit/test_parser_hermes.py` to exercise it.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolrl.rollout.parsers.base import CallLimit, ParsedTurn, collect_calls
from toolrl.rollout.parsers.json_calls import call_from_object, loads
from toolrl.rollout.trajectory import ToolCall

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
END_OF_TURN = "<|im_end|>"
_SHAPE = '{"name": "<tool name>", "arguments": {...}}'


@dataclass
class HermesParser(CallLimit):
    """Callable parser: `HermesParser(max_parallel_calls=4)(text) -> ParsedTurn`."""

    def __call__(self, text: str) -> ParsedTurn:
        content, bodies = split_blocks(strip_end_of_turn(text))
        results = [
            f"{OPEN} is not closed with {CLOSE}" if body is None else parse_call(body)
            for body in bodies
        ]
        calls, errors = collect_calls(results, self.max_parallel_calls)
        return ParsedTurn(content=content, calls=calls, errors=errors)


def strip_end_of_turn(text: str) -> str:
    """Drop a trailing `<|im_end|>` (and whitespace around it) if the engine kept it."""
    return text.rstrip().removesuffix(END_OF_TURN)


def split_blocks(text: str) -> tuple[str, list[str | None]]:
    """Split text into (content outside blocks, block bodies); None marks an unclosed block.

    A block is unclosed when the text ends, or another `<tool_call>` opens, before its
    `</tool_call>`; its body is dropped (it is neither content nor a call). The search for
    the closing tag stops at the next opening tag, so this is linear in len(text).
    """
    pieces: list[str] = []
    bodies: list[str | None] = []
    pos = 0
    while True:
        start = text.find(OPEN, pos)
        if start < 0:
            pieces.append(text[pos:])
            break
        pieces.append(text[pos:start])
        body_start = start + len(OPEN)
        next_open = text.find(OPEN, body_start)
        limit = next_open if next_open >= 0 else len(text)
        end = text.find(CLOSE, body_start, limit)
        if end < 0:
            bodies.append(None)
            if next_open < 0:
                break
            pos = next_open
            continue
        bodies.append(text[body_start:end])
        pos = end + len(CLOSE)
    return "".join(pieces).strip(), bodies


def parse_call(body: str) -> ToolCall | str:
    """Parse one block body into a ToolCall, or return why it is malformed."""
    body = body.strip()
    if not body:
        return f"empty tool call; expected {_SHAPE}"
    obj = loads(body)
    return obj if isinstance(obj, str) else call_from_object(obj[0], ("arguments",))
