"""Parser for the Qwen3-Coder XML tool-call format.

The model writes each call as a block

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

any number of blocks per turn, and the turn may end with `<|im_end|>`. A parameter value is
text without its one leading and one trailing newline; it becomes an int, float, bool,
null, object or array when it parses as that JSON, and stays a string otherwise (so a JSON
string literal keeps its quotes). Every block is parsed on its own; a malformed block yields
one error such as `tool call 2: parameter "city" is given twice` and the well-formed blocks
around it are still returned. Calls beyond `max_parallel_calls` get an error each.

The parser never evaluates anything and never raises on any string.
Run `python -m pytest tests/unit/test_parsers.py -k qwen3` to exercise it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from toolrl.rollout.parsers.base import (
    CallLimit,
    ParsedTurn,
    collect_calls,
)
from toolrl.rollout.parsers.hermes import CLOSE, OPEN, split_blocks, strip_end_of_turn
from toolrl.rollout.parsers.json_calls import loads
from toolrl.rollout.trajectory import ToolCall

FUNCTION = "<function="
FUNCTION_CLOSE = "</function>"
PARAMETER = "<parameter="
PARAMETER_CLOSE = "</parameter>"
_NAME = re.compile(r"[^\s<>=]+")


@dataclass
class Qwen3CoderParser(CallLimit):
    """Callable parser: `Qwen3CoderParser(max_parallel_calls=4)(text) -> ParsedTurn`."""

    def __call__(self, text: str) -> ParsedTurn:
        content, bodies = split_blocks(strip_end_of_turn(text))
        results: list[ToolCall | str] = [
            f"{OPEN} is not closed with {CLOSE}" if body is None else parse_call(body)
            for body in bodies
        ]
        calls, errors = collect_calls(results, self.max_parallel_calls)
        return ParsedTurn(content=content, calls=calls, errors=errors)


def parse_call(body: str) -> ToolCall | str:
    """Parse one `<function=NAME>...</function>` block body, or say why it is malformed."""
    body = body.strip()
    if not body.startswith(FUNCTION):
        return f"expected {FUNCTION}NAME> at the start of the tool call"
    name, sep, rest = body[len(FUNCTION) :].partition(">")
    name = name.strip()
    if not sep or not _NAME.fullmatch(name):
        return f"expected {FUNCTION}NAME> with a tool name, got {body[:40]!r}"
    inner, sep, after = rest.partition(FUNCTION_CLOSE)
    if not sep:
        return f"{FUNCTION}{name}> is not closed with {FUNCTION_CLOSE}"
    if after.strip():
        return f"unexpected text after {FUNCTION_CLOSE}: {after.strip()[:40]!r}"
    arguments = parse_parameters(inner)
    if isinstance(arguments, str):
        return arguments
    return ToolCall(name=name, arguments=arguments)


def parse_parameters(inner: str) -> dict[str, Any] | str:
    """Parse the `<parameter=P>VALUE</parameter>` sequence inside a function."""
    arguments: dict[str, Any] = {}
    pos = 0
    while True:
        start = inner.find(PARAMETER, pos)
        stray = inner[pos : len(inner) if start < 0 else start].strip()
        if stray:
            return f"unexpected text outside {PARAMETER}...>: {stray[:40]!r}"
        if start < 0:
            return arguments
        name, sep, rest_start = inner[start + len(PARAMETER) :].partition(">")
        name = name.strip()
        if not sep or not _NAME.fullmatch(name):
            return f"expected {PARAMETER}NAME> with a parameter name, got {inner[start:][:40]!r}"
        value_start = len(inner) - len(rest_start)
        end = inner.find(PARAMETER_CLOSE, value_start)
        if end < 0:
            return f'parameter "{name}" is not closed with {PARAMETER_CLOSE}'
        if name in arguments:
            return f'parameter "{name}" is given twice'
        arguments[name] = convert_value(inner[value_start:end])
        pos = end + len(PARAMETER_CLOSE)


def convert_value(raw: str) -> Any:
    """Drop the newline framing a value; JSON numbers/bools/null/objects/arrays convert."""
    value = raw.removeprefix("\n").removesuffix("\n")
    decoded = loads(value)
    if isinstance(decoded, str) or isinstance(decoded[0], str):
        return value
    return decoded[0]
