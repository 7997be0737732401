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

import json
from dataclasses import dataclass
from typing import Any

from toolrl.rollout.parsers.base import CallLimit, ParsedTurn
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
        calls: list[ToolCall] = []
        errors: list[str] = []
        for i, body in enumerate(bodies, start=1):
            if body is None:
                errors.append(f"tool call {i}: {OPEN} is not closed with {CLOSE}")
                continue
            parsed = parse_call(body)
            if isinstance(parsed, str):
                errors.append(f"tool call {i}: {parsed}")
            elif len(calls) >= self.max_parallel_calls:
                errors.append(
                    f"tool call {i}: not run: at most {self.max_parallel_calls} "
                    "tool calls are allowed in one turn"
                )
            else:
                calls.append(parsed)
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
    obj = _loads(body)
    if isinstance(obj, str):
        return obj
    value = obj[0]
    if not isinstance(value, dict):
        return f"expected a JSON object {_SHAPE}, got {_json_type(value)}"
    name = value.get("name")
    if "name" not in value:
        return 'missing "name"'
    if not isinstance(name, str) or not name:
        return f'"name" must be a non-empty string, got {_json_type(name)}'
    if "arguments" not in value:
        return 'missing "arguments" (use {} for a call without arguments)'
    arguments = value["arguments"]
    if isinstance(arguments, str):
        # Some models JSON-encode the arguments a second time; accept it if it is an object.
        decoded = _loads(arguments)
        if isinstance(decoded, str) or not isinstance(decoded[0], dict):
            return '"arguments" must be a JSON object, got a string that is not one'
        arguments = decoded[0]
    if not isinstance(arguments, dict):
        return f'"arguments" must be a JSON object, got {_json_type(arguments)}'
    return ToolCall(name=name, arguments=arguments)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def _loads(text: str) -> tuple[Any] | str:
    """json.loads that returns (value,) or an error message, and never raises."""
    try:
        return (json.loads(text, parse_constant=_reject_constant),)
    except (ValueError, RecursionError) as e:
        return json_error(e)


def json_error(e: ValueError | RecursionError, start: int = 0) -> str:
    """The model-readable message for a JSON value that failed to decode from `start` on."""
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON: {e.msg} at char {e.pos - start}"
    if isinstance(e, RecursionError):
        return "invalid JSON: nested too deeply"
    return f"invalid JSON: {e}"  # NaN/Infinity, integers longer than Python's digit limit


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
