"""Parser for the Mistral tool-call formats, before and after tokenizer v11.

Before v11 the model writes one marker and a JSON array:

    [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}, ...]

(a single object without the brackets, `[TOOL_CALLS]{...}`, is read as a one-call array).
From v11 on it writes each call as `[TOOL_CALLS]name[ARGS]{...}` or, with a call id,
`[TOOL_CALLS]name[CALL_ID]a1b2c3d4e[ARGS]{...}`, repeated for several calls (a repeated
`[TOOL_CALLS]` may be left out between calls). The id the model sampled (the JSON "id"
string, or the text between `[CALL_ID]` and `[ARGS]`, stripped) becomes `ToolCall.id`:
Mistral's templates write it back into the tool turn. A call without one (or with an empty
or non-string JSON "id") gets `id=None`.

Text before the first `[TOOL_CALLS]` is content; a trailing `</s>` is dropped. From there the
text is read string-aware: each array element and each `[ARGS]` object is one decoded JSON
value, so `[TOOL_CALLS]`, `[ARGS]` or `</s>` inside a string argument are data. A malformed
element or `name[ARGS]{...}` yields one error such as `tool call 2: invalid JSON: ...` and
the calls around it are still returned: reading resumes at the element's end (the next `,`
or `]` outside strings and brackets), after the malformed object's closing bracket, or at
the next `[TOOL_CALLS]` outside strings. An array that never closes gets an error after its
calls. Text between and after the calls is content, and a later `[TOOL_CALLS]` opens more.
Calls beyond `max_parallel_calls` get an error each.

The parser never evaluates anything and never raises on any string.
Run `python -m pytest tests/unit/test_parsers.py -k mistral` to exercise it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from toolrl.rollout.parsers.base import CallLimit, ParsedTurn, collect_calls, room_to_read
from toolrl.rollout.parsers.json_calls import (
    call_from_object,
    decode_at,
    end_of_element,
    find_outside_strings,
    skip_space,
    skip_value,
)
from toolrl.rollout.parsers.llama3_json import strip_end_markers
from toolrl.rollout.trajectory import ToolCall

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
CALL_ID = "[CALL_ID]"
END_MARKERS = ("</s>",)
# `name[ARGS]` or `name[CALL_ID]id[ARGS]`, the head of one v11 call.
_NAMED = re.compile(r"\s*([A-Za-z_][\w.\-]*)\s*(?:\[CALL_ID\]([^\[\]]*?))?\s*\[ARGS\]\s*")

Results = list[ToolCall | str]


@dataclass
class MistralParser(CallLimit):
    """Callable parser: `MistralParser(max_parallel_calls=4)(text) -> ParsedTurn`."""

    def __call__(self, text: str) -> ParsedTurn:
        text = strip_end_markers(text, END_MARKERS)
        pieces: list[str] = []
        results: Results = []
        pos = 0
        while room_to_read(results) and (start := text.find(TOOL_CALLS, pos)) >= 0:
            pieces.append(text[pos:start])
            pos = skip_space(text, start + len(TOOL_CALLS))
            if text.startswith("[", pos):
                pos = parse_array(text, pos, results)
            elif text.startswith("{", pos):
                pos = parse_object(text, pos, results)
            else:
                pos = parse_named(text, pos, results)
        if room_to_read(results):
            pieces.append(text[pos:])
        calls, errors = collect_calls(results, self.max_parallel_calls)
        content = "\n".join(p.strip() for p in pieces if p.strip())
        return ParsedTurn(content=content, calls=calls, errors=errors)


def parse_array(text: str, pos: int, results: Results) -> int:
    """Parse a pre-v11 `[{...}, {...}]` at `pos` element by element; return its end."""
    start = len(results)
    pos = skip_space(text, pos + 1)
    while pos < len(text) and text[pos] != "]" and room_to_read(results):
        decoded = decode_at(text, pos)
        if isinstance(decoded, str):
            results.append(decoded)
            pos = end_of_element(text, pos)
        else:
            value, end = decoded
            results.append(_with_id(call_from_object(value, ("arguments", "parameters")), value))
            pos = skip_space(text, end)
            if pos < len(text) and text[pos] not in ",]":
                results.append(f"expected ',' or ']' after a tool call, got {text[pos:][:20]!r}")
                pos = end_of_element(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip_space(text, pos + 1)
    if pos < len(text):
        return pos + 1
    if all(isinstance(r, ToolCall) for r in results[start:]):
        results.append("the tool call list is not closed with ]")
    return pos


def parse_object(text: str, pos: int, results: Results) -> int:
    """One pre-v11 call object written without the array brackets."""
    decoded = decode_at(text, pos)
    if isinstance(decoded, str):
        results.append(decoded)
        return _next_marker(text, pos)
    value, end = decoded
    results.append(_with_id(call_from_object(value, ("arguments", "parameters")), value))
    return end


def parse_named(text: str, pos: int, results: Results) -> int:
    """Parse one or more v11 `name[ARGS]{...}` calls written back to back; return the end."""
    head = _NAMED.match(text, pos)
    if head is None:
        results.append(f"expected name{ARGS}{{...}} after {TOOL_CALLS}, got {text[pos:][:20]!r}")
        return _next_marker(text, pos)
    while head is not None and room_to_read(results):
        decoded = decode_at(text, head.end())
        if isinstance(decoded, str):
            results.append(decoded)
            if not text.startswith(("{", "["), head.end()):
                return _next_marker(text, head.end())
            pos = skip_value(text, head.end())  # the next call may follow without a marker
        else:
            call = call_from_object(
                {"name": head.group(1), "arguments": decoded[0]}, ("arguments",)
            )
            results.append(_with_id(call, {"id": (head.group(2) or "").strip() or None}))
            pos = decoded[1]
        head = _NAMED.match(text, pos)
    return pos


def _next_marker(text: str, pos: int) -> int:
    """Where to read on after a malformed call: the next `[TOOL_CALLS]` outside strings."""
    found = find_outside_strings(text, pos, (TOOL_CALLS,))
    return found if found >= 0 else len(text)


def _with_id(call: ToolCall | str, value: object) -> ToolCall | str:
    """The call with the id of its JSON object `value` (a string "id"), if it has one."""
    if isinstance(call, ToolCall) and isinstance(value, dict):
        call_id = value.get("id")
        call.id = call_id if isinstance(call_id, str) and call_id else None
    return call
