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

any number of blocks per turn, and the turn may end with `<|im_end|>`. The format has no
escaping, so a value is read structurally: it runs from `<parameter=P>` to the first
`</parameter>` that is followed (after whitespace) by the next `<parameter=` or by
`</function>`, and the function ends at a `</function>` followed by `</tool_call>`. So a
value may hold `<tool_call>`, `</tool_call>`, `</function>` or even `</parameter>` followed by
other text; only a value that holds `</parameter>` directly followed by `<parameter=` or
`</function>` is read differently than meant (the format cannot tell those apart).

A value is its text without one leading and one trailing newline, typed by the tool's
schema (the `tool_schemas` the rollout worker passes in): a parameter whose schema allows a
string stays the text as written (`{"k": 1}`, `5` and `true` included), except `null` where
null is allowed too; a parameter typed integer, number, boolean, object, array or null is
read as JSON and must be of that type, else the call gets an error. A parameter or tool
with no schema keeps the text, as vLLM does. Each block is parsed on its own; a malformed
block yields one error such as `tool call 2: parameter "city" is given twice`, and reading
resumes after its `</function></tool_call>` (else at the next `<tool_call>`). Calls beyond
`max_parallel_calls` get an error each.

The parser never evaluates anything and never raises on any string.
Run `python -m pytest tests/unit/test_parsers.py -k qwen3` to exercise it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from toolrl.rollout.parsers.base import CallLimit, ParsedTurn, collect_calls
from toolrl.rollout.parsers.hermes import CLOSE, OPEN, read_blocks, strip_end_of_turn
from toolrl.rollout.parsers.json_calls import json_type, loads, skip_space
from toolrl.rollout.trajectory import ToolCall

FUNCTION = "<function="
FUNCTION_CLOSE = "</function>"
PARAMETER = "<parameter="
PARAMETER_CLOSE = "</parameter>"
_NAME = re.compile(r"[^\s<>=]+")
_OPEN_FUNCTION = re.compile(r"\s*<function=([^>\n]*)>")
_OPEN_PARAMETER = re.compile(r"\s*<parameter=([^>\n]*)>")
_VALUE_END = re.compile(r"</parameter>\s*(?=<parameter=|</function>)")
_FUNCTION_END = re.compile(r"\s*</function>\s*</tool_call>")
_BLOCK_END = re.compile(r"</function>\s*</tool_call>")
_JSON_TYPES = {
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "object": "an object",
    "array": "an array",
    "null": "null",
}


@dataclass
class Qwen3CoderParser(CallLimit):
    """Callable parser: `Qwen3CoderParser(max_parallel_calls=4, tool_schemas=[...])(text)`.

    `tool_schemas` are the OpenAI-style schemas of the run's tools (the rollout worker
    passes them); they only decide the types of parameter values."""

    tool_schemas: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._types = {name: params for name, params in _parameter_types(self.tool_schemas)}

    def __call__(self, text: str) -> ParsedTurn:
        content, results = read_blocks(strip_end_of_turn(text), self._read_block)
        calls, errors = collect_calls(results, self.max_parallel_calls)
        return ParsedTurn(content=content, calls=calls, errors=errors)

    def _read_block(self, text: str, pos: int) -> tuple[ToolCall | str, int]:
        """Read the block whose body starts at `pos`: (call or why not, where to resume)."""
        m = _OPEN_FUNCTION.match(text, pos)
        if m is None:
            if skip_space(text, pos) >= len(text):
                return f"{OPEN} is not closed with {CLOSE}", len(text)
            return f"expected {FUNCTION}NAME> at the start of the tool call", _resume(text, pos)
        name = m.group(1).strip()
        if not _NAME.fullmatch(name):
            return f"expected {FUNCTION}NAME> with a tool name, got {m.group()[:40]!r}", _resume(
                text, pos
            )
        arguments, end = self._read_parameters(text, m.end(), name)
        if isinstance(arguments, str):
            return arguments, _resume(text, end)
        return ToolCall(name=name, arguments=arguments), end

    def _read_parameters(self, text: str, pos: int, tool: str) -> tuple[dict[str, Any] | str, int]:
        """The `<parameter=P>VALUE</parameter>` sequence, then `</function></tool_call>`."""
        arguments: dict[str, Any] = {}
        while (m := _OPEN_PARAMETER.match(text, pos)) is not None:
            name = m.group(1).strip()
            if not _NAME.fullmatch(name):
                return (
                    f"expected {PARAMETER}NAME> with a parameter name, got {m.group()[:40]!r}",
                    pos,
                )
            end = _VALUE_END.search(text, m.end())
            if end is None:
                return _unclosed_parameter(text, m.end(), name), m.end()
            if name in arguments:
                return f'parameter "{name}" is given twice', end.end()
            value = convert_value(text[m.end() : end.start()], self._types.get(tool, {}).get(name))
            if isinstance(value, str):
                return f'parameter "{name}": {value}', end.end()
            arguments[name] = value[0]
            pos = end.end()
        if (m := _FUNCTION_END.match(text, pos)) is not None:
            return arguments, m.end()
        pos = skip_space(text, pos)
        rest = text[pos : pos + 40]  # for messages only: never copy the rest of a long turn
        if pos >= len(text) or text.startswith((OPEN, FUNCTION_CLOSE), pos):
            after = skip_space(text, pos + len(FUNCTION_CLOSE))
            if text.startswith(FUNCTION_CLOSE, pos) and after < len(text):
                return f"expected {CLOSE} after {FUNCTION_CLOSE}, got {text[after:][:40]!r}", pos
            return f"{OPEN} is not closed with {CLOSE}", pos
        return f"unexpected text outside {PARAMETER}...>: {rest!r}", pos


def _unclosed_parameter(text: str, pos: int, name: str) -> str:
    """Why a value found no end: it is not closed at all, or what follows its close is
    neither another parameter nor `</function>`."""
    close = text.find(PARAMETER_CLOSE, pos)
    if close < 0:
        return f'parameter "{name}" is not closed with {PARAMETER_CLOSE}'
    after = skip_space(text, close + len(PARAMETER_CLOSE))
    if after >= len(text) or text.startswith(CLOSE, after):
        return f"{FUNCTION}...> is not closed with {FUNCTION_CLOSE}"
    got = text[after : after + 40]
    return f'expected {PARAMETER}NAME> or {FUNCTION_CLOSE} after parameter "{name}", got {got!r}'


def _resume(text: str, pos: int) -> int:
    """After a malformed block: past its `</function></tool_call>`, else at the next block."""
    end = _BLOCK_END.search(text, pos)
    nxt = text.find(OPEN, pos)
    if end is not None and (nxt < 0 or end.start() < nxt):
        return end.end()
    return nxt if nxt >= 0 else len(text)


def _parameter_types(schemas: list[dict[str, Any]]) -> list[tuple[str, dict[str, set[str]]]]:
    """(tool name, {parameter: JSON types it allows}) for each OpenAI-style tool schema."""
    out = []
    for schema in schemas:
        fn = schema.get("function", schema) if isinstance(schema, dict) else None
        params = fn.get("parameters") if isinstance(fn, dict) else None
        props = params.get("properties") if isinstance(params, dict) else None
        if isinstance(props, dict):  # a tool with an odd schema types nothing: strings
            out.append((fn.get("name", ""), {p: _types_of(s) for p, s in props.items()}))
    return out


def _types_of(schema: Any) -> set[str]:
    """The JSON types a property schema allows (`type`, a list of them, or anyOf/oneOf)."""
    if not isinstance(schema, dict):
        return set()
    kind = schema.get("type")
    types = {kind} if isinstance(kind, str) else {t for t in kind or [] if isinstance(t, str)}
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or []:
            types |= _types_of(sub)
    return types


def convert_value(raw: str, types: set[str] | None) -> tuple[Any] | str:
    """(value,) of a parameter's raw text under its allowed JSON types, or why it is not one.

    No types known, or string allowed: the text itself (or None for `null` where null is
    allowed). Otherwise the text is read as JSON and must be one of the types."""
    text = raw.removeprefix("\n").removesuffix("\n")
    if not types or "string" in types:
        return (None,) if "null" in (types or ()) and text.strip() == "null" else (text,)
    decoded = loads(text.strip())
    if not isinstance(decoded, str):
        value = decoded[0]
        if "integer" in types and isinstance(value, float) and value.is_integer():
            value = int(value)
        if any(_is_type(value, t) for t in types):
            return (value,)
    wanted = " or ".join(_JSON_TYPES.get(t, t) for t in sorted(types))
    got = decoded if isinstance(decoded, str) else json_type(decoded[0])
    return f"expected {wanted}, got {got} ({text[:40]!r})"


def _is_type(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    return kind == "null" and value is None
