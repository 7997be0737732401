"""Parser for the Hermes / Qwen2.5 tool-call format.

The model writes each call as a block

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "2+2"}}
    </tool_call>

with any whitespace around the JSON, any number of blocks per turn, and the turn may end
with the end-of-turn marker `<|im_end|>`. A block is read string-aware: one JSON value is
decoded right after `<tool_call>`, and `</tool_call>` must follow it, so markers inside a
string argument (`"code": "print('</tool_call>')"`) are data, never structure. Each block
gives one call or one error line such as `tool call 2: invalid JSON: Expecting ',' delimiter
at char 31`, numbered from 1 in order, and the well-formed blocks around a malformed one are
still returned. After a malformed block, reading resumes at the next `</tool_call>` or
`<tool_call>` outside a JSON string (`json_calls.find_outside_strings`); when a string never
closes, nothing after it is a call. Well-formed calls beyond `max_parallel_calls` are not
returned as calls; each gets an error saying it was not run. Text outside blocks is content.

The parser never evaluates anything and never raises on any string.
Run `python -m pytest tests/unit/test_parser_hermes.py` to exercise it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from toolrl.rollout.parsers.base import CallLimit, ParsedTurn, collect_calls, room_to_read
from toolrl.rollout.parsers.json_calls import (
    call_from_object,
    decode_at,
    find_outside_strings,
    skip_space,
)
from toolrl.rollout.trajectory import ToolCall

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
END_OF_TURN = "<|im_end|>"
_SHAPE = '{"name": "<tool name>", "arguments": {...}}'
_NOT_CLOSED = f"{OPEN} is not closed with {CLOSE}"


@dataclass
class HermesParser(CallLimit):
    """Callable parser: `HermesParser(max_parallel_calls=4)(text) -> ParsedTurn`."""

    def __call__(self, text: str) -> ParsedTurn:
        content, results = read_blocks(strip_end_of_turn(text), read_block)
        calls, errors = collect_calls(results, self.max_parallel_calls)
        return ParsedTurn(content=content, calls=calls, errors=errors)


BlockReader = Callable[[str, int], tuple[ToolCall | str, int]]


def read_blocks(text: str, read: BlockReader) -> tuple[str, list[ToolCall | str]]:
    """The content outside `<tool_call>` blocks and one result per block. `read(text, body)`
    reads a block from its body's start and says where reading resumes: blocks are found by
    reading them, never by searching for the next closing tag."""
    pieces: list[str] = []
    results: list[ToolCall | str] = []
    pos = 0
    while room_to_read(results) and (start := text.find(OPEN, pos)) >= 0:
        pieces.append(text[pos:start])
        result, pos = read(text, start + len(OPEN))
        results.append(result)
    if room_to_read(results):
        pieces.append(text[pos:])
    return "".join(pieces).strip(), results


def strip_end_of_turn(text: str) -> str:
    """Drop a trailing `<|im_end|>` (and whitespace around it) if the engine kept it."""
    return text.rstrip().removesuffix(END_OF_TURN)


def read_block(text: str, body: int) -> tuple[ToolCall | str, int]:
    """Read the block whose body starts at `body`: (call or why not, where reading resumes)."""
    pos = skip_space(text, body)
    if text.startswith(CLOSE, pos):
        return f"empty tool call; expected {_SHAPE}", pos + len(CLOSE)
    if pos >= len(text):
        return _NOT_CLOSED, len(text)
    decoded = decode_at(text, pos)
    if isinstance(decoded, str):
        return decoded, resume_after(text, pos)
    value, end = decoded
    after = skip_space(text, end)
    if text.startswith(CLOSE, after):
        return call_from_object(value, ("arguments",)), after + len(CLOSE)
    if after >= len(text) or text.startswith(OPEN, after):
        return _NOT_CLOSED, after
    # what json.loads says of the block's body: the object is followed by more than space
    return f"invalid JSON: Extra data at char {after - pos}", resume_after(text, after)


def resume_after(text: str, pos: int) -> int:
    """Where to read on after a malformed block: past its `</tool_call>`, or at the next
    `<tool_call>`, whichever comes first outside JSON strings; else the end of the text."""
    found = find_outside_strings(text, pos, (CLOSE, OPEN))
    if found < 0:
        return len(text)
    return found + len(CLOSE) if text.startswith(CLOSE, found) else found
