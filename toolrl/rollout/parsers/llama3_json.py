"""Parser for the Llama 3.x JSON tool-call format.

A tool-calling turn ends with one JSON object

    {"name": "get_weather", "parameters": {"city": "Paris"}}

(`"arguments"` is accepted in place of `"parameters"`, not both), or several separated by
`;`, optionally after `<|python_tag|>`; it may end with `<|eot_id|>` or `<|eom_id|>`.

Where the calls start (the format has no opening marker, so this is a rule):
1. at the first `<|python_tag|>`, when it comes before any call object (a tag inside a
   call's string argument is data);
2. else at the start of the turn when the turn starts with `{` (a malformed object there is
   a failed call, not an answer);
3. else at the first `{` followed by a `"name"`, `"parameters"` or `"arguments"` key that no
   earlier `{` encloses: prose before it ("Sure, calling it now: {...}") is content. A `{`
   that opens no such key (`{1, 2}`) is prose, an object nested in a record the prose
   quotes (`{"user": {"name": ...}}`) is not a call, and a turn without any is content.

From there each object is decoded string-aware on its own: a malformed one yields one error
such as `tool call 2: invalid JSON: ...`, and reading resumes at the next `;` outside JSON
strings that is followed by `{`. Text after the last object is content. An object that gives
a key twice is an error. Calls beyond `max_parallel_calls` get an error each.

The parser never evaluates anything and never raises on any string.
Run `python -m pytest tests/unit/test_parsers.py -k llama3` to exercise it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from toolrl.rollout.parsers.base import CallLimit, ParsedTurn, collect_calls, room_to_read
from toolrl.rollout.parsers.json_calls import (
    call_from_object,
    decode_at,
    find_outside_strings,
    skip_space,
)
from toolrl.rollout.trajectory import ToolCall

PYTHON_TAG = "<|python_tag|>"
END_MARKERS = ("<|eot_id|>", "<|eom_id|>")
_CALL_OBJECT = re.compile(r'\{\s*"(?:name|parameters|arguments)"\s*:')


@dataclass
class Llama3JsonParser(CallLimit):
    """Callable parser: `Llama3JsonParser(max_parallel_calls=4)(text) -> ParsedTurn`."""

    def __call__(self, text: str) -> ParsedTurn:
        text = strip_end_markers(text, END_MARKERS)
        start, body = calls_start(text)
        if start < 0:
            return ParsedTurn(content=text.strip())
        results, trailing = split_calls(text[body:])
        calls, errors = collect_calls(results, self.max_parallel_calls)
        content = "\n".join(part for part in (text[:start].strip(), trailing) if part)
        return ParsedTurn(content=content, calls=calls, errors=errors)


def calls_start(text: str) -> tuple[int, int]:
    """(where the content ends, where the call objects start), or (-1, -1): rules 1-3 above."""
    tag = text.find(PYTHON_TAG)
    obj = first_top_level_object(text)
    if tag >= 0 and (obj < 0 or tag < obj):
        return tag, tag + len(PYTHON_TAG)
    if text.lstrip().startswith("{"):
        return 0, 0
    return obj, obj


def first_top_level_object(text: str) -> int:
    """Where the first `{"name":`-like object opens that no `{` before it encloses (prose
    quoting a record `{"user": {"name": ...}}` holds no call), or -1."""
    depth, pos = 0, 0
    for m in _CALL_OBJECT.finditer(text):
        depth += text.count("{", pos, m.start()) - text.count("}", pos, m.start())
        if depth <= 0:
            return m.start()
        pos = m.start()
    return -1


def strip_end_markers(text: str, markers: tuple[str, ...]) -> str:
    """Drop trailing end-of-turn markers (and whitespace around them) the engine kept."""
    text = text.rstrip()
    while True:
        for marker in markers:
            if text.endswith(marker):
                text = text.removesuffix(marker).rstrip()
                break
        else:
            return text


def split_calls(body: str) -> tuple[list[ToolCall | str], str]:
    """Parse `obj ; obj ; ...` into one ToolCall or error per object, plus trailing text.

    A missing `;` between two objects is tolerated. Text after the last object that does
    not start another one is returned as content rather than dropped.
    """
    results: list[ToolCall | str] = []
    pos = skip_space(body, 0)
    while pos < len(body) and room_to_read(results):
        decoded = decode_at(body, pos)
        if isinstance(decoded, str):
            results.append(decoded)
            pos = next_object(body, pos)
            continue
        value, end = decoded
        results.append(call_from_object(value, ("parameters", "arguments")))
        pos = skip_space(body, end)
        if pos < len(body) and body[pos] == ";":
            pos = skip_space(body, pos + 1)
        elif pos < len(body) and body[pos] != "{":
            return results, body[pos:].strip()
    return results, ""


def next_object(body: str, pos: int) -> int:
    """After a malformed object at `pos`: the next `{` after a `;` outside JSON strings."""
    while (semi := find_outside_strings(body, pos, (";",))) >= 0:
        pos = skip_space(body, semi + 1)
        if body.startswith("{", pos):
            return pos
    return len(body)
