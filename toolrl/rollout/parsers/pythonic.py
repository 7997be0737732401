"""Parser for the pythonic tool-call format (Llama 3.2 / Llama 4 / ToolACE style).

A tool-calling turn ends with a Python list of calls with keyword arguments:

    [get_weather(city="Paris", days=3), search(q='x')]

optionally after `<|python_tag|>` and ending with `<|eot_id|>` / `<|eom_id|>`.

Where the list starts (the format has no opening marker, so this is a rule):
1. at the start of the turn when the turn starts with `[name(`;
2. else right after the first `<|python_tag|>` that comes before any call list (a tag
   inside a string argument is data); text before the tag is content;
3. else after leading prose, at the first `[name(key=` or `[name()` whose list closes the
   turn (nothing but whitespace after its `]`), among its first 16 such starts: "Sure,
   calling it now: [f(x=1)]". Prose such as "the interval [f(a), f(b)] is ..." is content:
   positional arguments never start a list after prose, and a list in mid-text is not a
   call.

Text after the closing `]` is content (rules 1 and 2). The list is split at top-level commas
and each element is parsed on its own with `ast` (never evaluated): it must be
`name(key=literal, ...)` with each key once, each value read with `ast.literal_eval` and
turned into JSON (tuples become arrays; sets, bytes, complex and non-finite numbers are
errors). A malformed element yields one error such as `tool call 2: positional arguments
are not allowed` and the others are still returned. Calls beyond `max_parallel_calls` get
an error each.

The parser never evaluates anything and never raises on any string.
Run `python -m pytest tests/unit/test_parsers.py -k pythonic` to exercise it.
"""

from __future__ import annotations

import ast
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any

from toolrl.rollout.parsers.base import MAX_CALLS_READ, CallLimit, ParsedTurn, collect_calls
from toolrl.rollout.parsers.llama3_json import END_MARKERS, PYTHON_TAG, strip_end_markers
from toolrl.rollout.trajectory import ToolCall

_STARTS_CALLS = re.compile(r"\[\s*[A-Za-z_]\w*\s*\(")
# Each start after prose is tried by reading its list to the end of the turn; prose with more
# such starts than this is content, so a turn of many `[f(x=` costs linear time, not quadratic.
_MAX_PROSE_STARTS = 16
_AFTER_PROSE = re.compile(r"\[\s*[A-Za-z_]\w*\s*\(\s*(?:\)|[A-Za-z_]\w*\s*=)")
_OPENERS = {"(": ")", "[": "]", "{": "}"}


@dataclass
class PythonicParser(CallLimit):
    """Callable parser: `PythonicParser(max_parallel_calls=4)(text) -> ParsedTurn`."""

    def __call__(self, text: str) -> ParsedTurn:
        text = strip_end_markers(text, END_MARKERS).strip()
        start, body = list_start(text)
        if start < 0:
            return ParsedTurn(content=text.replace(PYTHON_TAG, "").strip())
        content, body_text = text[:start].strip(), text[body:].lstrip()
        if not _STARTS_CALLS.match(body_text):
            return ParsedTurn(content=text.replace(PYTHON_TAG, "").strip())
        elements, end = split_elements(body_text)
        # one past the limit is enough for collect_calls to say the rest was not read
        results: list[ToolCall | str] = [parse_element(e) for e in elements[: MAX_CALLS_READ + 1]]
        if end < 0 and all(isinstance(r, ToolCall) for r in results):
            results.append("the tool call list is not closed with ]")
        trailing = body_text[end + 1 :].strip() if end >= 0 else ""
        calls, errors = collect_calls(results, self.max_parallel_calls)
        content = "\n".join(part for part in (content, trailing) if part)
        return ParsedTurn(content=content, calls=calls, errors=errors)


def list_start(text: str) -> tuple[int, int]:
    """(where the content ends, where the list starts), or (-1, -1): rules 1-3 above."""
    if _STARTS_CALLS.match(text):
        return 0, 0
    tag = text.find(PYTHON_TAG)
    after_prose = [m.start() for m in _AFTER_PROSE.finditer(text)]
    if tag >= 0 and (not after_prose or tag < after_prose[0]):
        return tag, tag + len(PYTHON_TAG)
    for start in after_prose[:_MAX_PROSE_STARTS] if text.endswith("]") else ():
        _, end = split_elements(text[start:])
        if end >= 0 and not text[start + end + 1 :].strip():
            return start, start
    return -1, -1


def split_elements(body: str) -> tuple[list[str], int]:
    """Split `[a, b, ...]...` at top-level commas: (elements, index of the closing `]`).

    Quotes (single, double, triple, with backslash escapes) and brackets are tracked so
    commas inside strings and nested literals do not split. The index is -1 when the list
    is never closed; the elements found so far are still returned.
    """
    elements: list[str] = []
    stack: list[str] = []
    start, pos = 1, 1
    while pos < len(body):
        ch = body[pos]
        if ch in "'\"":
            pos = _skip_string(body, pos)
            continue
        if ch in _OPENERS:
            stack.append(_OPENERS[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
        elif not stack and ch in ",]":
            elements.append(body[start:pos])
            start = pos + 1
            if ch == "]":
                return [e for e in elements if e.strip()], pos
        pos += 1
    elements.append(body[start:])
    return [e for e in elements if e.strip()], -1


def _skip_string(text: str, pos: int) -> int:
    """Index just past the string literal opening at pos (or len(text) if unterminated)."""
    quote = text[pos] * 3 if text.startswith(text[pos] * 3, pos) else text[pos]
    pos += len(quote)
    while pos < len(text):
        if text[pos] == "\\":
            pos += 2
        elif text.startswith(quote, pos):
            return pos + len(quote)
        elif len(quote) == 1 and text[pos] == "\n":
            return pos  # a one-quote string cannot span lines; let ast report it
        else:
            pos += 1
    return len(text)


def parse_element(source: str) -> ToolCall | str:
    """Parse one `name(key=literal, ...)` element, or say why it is malformed."""
    try:
        with warnings.catch_warnings():  # e.g. "invalid decimal literal": the error says it
            warnings.simplefilter("ignore", SyntaxWarning)
            node = ast.parse(source.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        return f"invalid Python call: {getattr(e, 'msg', None) or type(e).__name__}"
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        return "expected a call name(key=value, ...)"
    if node.args:
        return "positional arguments are not allowed; use key=value"
    arguments: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            return "**arguments are not allowed; use key=value"
        if keyword.arg in arguments:
            return f'argument "{keyword.arg}" is given twice'
        value = _literal(keyword.value)
        if isinstance(value, str):
            return f'argument "{keyword.arg}": {value}'
        arguments[keyword.arg] = value[0]
    return ToolCall(name=node.func.id, arguments=arguments)


def _literal(node: ast.expr) -> tuple[Any] | str:
    """(JSON value,) of a literal node, or why it is not one."""
    try:
        value = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
        kind = type(node).__name__.lower()
        return f"value must be a literal (string, number, True/False/None, list, dict), got {kind}"
    try:
        _check_unique_keys(node)
        return (_to_json(value),)
    except (ValueError, RecursionError) as e:
        return f"value is not JSON: {e}"


def _check_unique_keys(node: ast.expr) -> None:
    """Raise ValueError for a dict literal that gives one key twice (literal_eval keeps the
    last value; which did the model mean?)."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Dict):
            keys = [k.value for k in sub.keys if isinstance(k, ast.Constant)]
            twice = {k for k in keys if keys.count(k) > 1}
            if twice:
                raise ValueError(f"key {sorted(map(repr, twice))[0]} is given twice")


def _to_json(value: Any) -> Any:
    """The JSON form of a literal value; raise ValueError for what JSON cannot hold."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value} is not a finite number")
        return value
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ValueError("dict keys must be strings")
        return {k: _to_json(v) for k, v in value.items()}
    raise ValueError(f"{type(value).__name__} is not a JSON value")
