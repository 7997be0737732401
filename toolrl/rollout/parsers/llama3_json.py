"""Parser for the Llama 3.x JSON tool-call format.

A tool-calling turn is, optionally after `<|python_tag|>`, one JSON object

    {"name": "get_weather", "parameters": {"city": "Paris"}}

(`"arguments"` is accepted in place of `"parameters"`), or several separated by `;`. The turn
may end with `<|eot_id|>` or `<|eom_id|>`. Text before `<|python_tag|>` is content. Without
the tag, the turn holds calls only when its text starts with `{`; any other text (e.g. a
plain answer that mentions `{1, 2}`) is content, and so is text after the last call. Each object is parsed on its own: a
malformed one yields one error such as `tool call 2: invalid JSON: ...` and the parser
resumes at the next `;` followed by `{`. Calls beyond `max_parallel_calls` get an error each.

The parser never evaluates anything and never raises on any string.
Run `python -m pytest tests/unit/test_parsers.py -k llama3` to exercise it.
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
from toolrl.rollout.trajectory import ToolCall

PYTHON_TAG = "<|python_tag|>"
END_MARKERS = ("<|eot_id|>", "<|eom_id|>")
_NEXT_CALL = re.compile(r";\s*\{")


@dataclass
class Llama3JsonParser(CallLimit):
    """Callable parser: `Llama3JsonParser(max_parallel_calls=4)(text) -> ParsedTurn`."""

    def __call__(self, text: str) -> ParsedTurn:
        text = strip_end_markers(text, END_MARKERS)
        tag = text.find(PYTHON_TAG)
        if tag >= 0:
            content, body = text[:tag].strip(), text[tag + len(PYTHON_TAG) :]
        elif text.lstrip().startswith("{"):
            content, body = "", text
        else:
            return ParsedTurn(content=text.strip())
        results, trailing = split_calls(body)
        calls, errors = collect_calls(results, self.max_parallel_calls)
        content = "\n".join(part for part in (content, trailing) if part)
        return ParsedTurn(content=content, calls=calls, errors=errors)


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
    while pos < len(body):
        decoded = decode_at(body, pos)
        if isinstance(decoded, str):
            results.append(decoded)
            found = _NEXT_CALL.search(body, pos + 1)
            if found is None:
                return results, ""
            pos = skip_space(body, found.start() + 1)
            continue
        value, end = decoded
        results.append(call_from_object(value, ("parameters", "arguments")))
        pos = skip_space(body, end)
        if pos < len(body) and body[pos] == ";":
            pos = skip_space(body, pos + 1)
        elif pos < len(body) and body[pos] != "{":
            return results, body[pos:].strip()
    return results, ""
