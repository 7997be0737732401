"""Parser for the Mistral tool-call formats, before and after tokenizer v11.

Before v11 the model writes one marker and a JSON array:

    [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}, ...]

From v11 on it writes each call as `[TOOL_CALLS]name[ARGS]{...}` or, with a call id,
`[TOOL_CALLS]name[CALL_ID]a1b2c3d4e[ARGS]{...}`, repeated for several calls. The id the
model sampled (the JSON "id" string, or the text between `[CALL_ID]` and `[ARGS]`, stripped)
becomes `ToolCall.id`: Mistral's templates write it back into the tool turn. A call without
one (or with an empty or non-string JSON "id") gets `id=None`. Text before the first
`[TOOL_CALLS]` is content; a trailing `</s>` is dropped. Each call is parsed on its own:
a malformed array element or `name[ARGS]{...}` yields one error such as
`tool call 2: invalid JSON: ...` and the calls around it are still returned. Calls beyond
`max_parallel_calls` get an error each.

The parser never evaluates anything and never raises on any string.
Run `python -m pytest tests/unit/test_parsers.py -k mistral` to exercise it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from toolrl.rollout.parsers.base import (
    CallLimit,
    ParsedTurn,
    collect_calls,
)
from toolrl.rollout.parsers.json_calls import call_from_object, decode_at, skip_space
from toolrl.rollout.parsers.llama3_json import strip_end_markers
from toolrl.rollout.trajectory import ToolCall

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
END_MARKERS = ("</s>",)
_NEXT_ELEMENT = re.compile(r",\s*\{")
_NAME = re.compile(r"[A-Za-z_][\w.\-]*")


@dataclass
class MistralParser(CallLimit):
    """Callable parser: `MistralParser(max_parallel_calls=4)(text) -> ParsedTurn`."""

    def __call__(self, text: str) -> ParsedTurn:
        text = strip_end_markers(text, END_MARKERS)
        content, *segments = text.split(TOOL_CALLS)
        results: list[ToolCall | str] = []
        for segment in segments:
            segment = segment.strip()
            if segment.startswith("["):
                results.extend(parse_array(segment))
            elif segment.startswith("{"):
                results.extend(parse_array(f"[{segment}]"))
            else:
                results.extend(parse_named(segment))
        calls, errors = collect_calls(results, self.max_parallel_calls)
        return ParsedTurn(content=content.strip(), calls=calls, errors=errors)


def parse_array(text: str) -> list[ToolCall | str]:
    """Parse a pre-v11 `[{...}, {...}]` element by element (text starts with `[`)."""
    results: list[ToolCall | str] = []
    pos = skip_space(text, 1)
    while pos < len(text) and text[pos] != "]":
        decoded = decode_at(text, pos)
        if isinstance(decoded, str):
            results.append(decoded)
            found = _NEXT_ELEMENT.search(text, pos + 1)
            if found is None:
                return results
            pos = skip_space(text, found.start() + 1)
            continue
        value, end = decoded
        results.append(_with_id(call_from_object(value, ("arguments", "parameters")), value))
        pos = skip_space(text, end)
        if pos < len(text) and text[pos] == ",":
            pos = skip_space(text, pos + 1)
        elif pos < len(text) and text[pos] != "]":
            results.append(f"expected ',' or ']' after a tool call, got {text[pos:][:20]!r}")
            return results
    if pos >= len(text) and not results:
        results.append("the tool call list is empty and not closed with ]")
    return results


def parse_named(segment: str) -> list[ToolCall | str]:
    """Parse one or more v11 `name[ARGS]{...}` calls written back to back."""
    results: list[ToolCall | str] = []
    rest = segment
    while rest:
        head, sep, tail = rest.partition(ARGS)
        if not sep:
            results.append(f"expected name{ARGS}{{...}} after {TOOL_CALLS}, got {rest[:20]!r}")
            return results
        name, _, call_id = (part.strip() for part in head.partition(CALL_ID))
        tail = tail.lstrip()
        decoded = decode_at(tail, 0)
        if not _NAME.fullmatch(name):
            results.append(f"expected a tool name before {ARGS}, got {name[:40]!r}")
        elif isinstance(decoded, str):
            results.append(decoded)
        else:
            call = call_from_object({"name": name, "arguments": decoded[0]}, ("arguments",))
            results.append(_with_id(call, {"id": call_id or None}))
        if isinstance(decoded, str):
            # Resume at the next call written back to back, if any; else the turn is done.
            nxt = tail.find(ARGS)
            if nxt < 0:
                return results
            rest = _after_name(tail, nxt)
        else:
            rest = tail[decoded[1] :].strip()
    return results


def _with_id(call: ToolCall | str, value: object) -> ToolCall | str:
    """The call with the id of its JSON object `value` (a string "id"), if it has one."""
    if isinstance(call, ToolCall) and isinstance(value, dict):
        call_id = value.get("id")
        call.id = call_id if isinstance(call_id, str) and call_id else None
    return call


def _after_name(text: str, args_pos: int) -> str:
    """The `name[ARGS]...` suffix of text whose `[ARGS]` starts at args_pos."""
    start = args_pos
    while start > 0 and (text[start - 1].isalnum() or text[start - 1] in "_.-"):
        start -= 1
    return text[start:]
