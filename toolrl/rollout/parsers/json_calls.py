"""JSON reading shared by the JSON-based parsers (hermes, llama3_json, mistral).

Every function here returns an error message instead of raising, worded for the model to
read back (`invalid JSON: Expecting ',' delimiter at char 18`). NaN and Infinity are
refused, since they are not JSON and a tool could not take them, and so is an object that
gives one key twice (`{"a": 1, "a": 2}`): which value would the model have meant?

Calls are read string-aware: a parser decodes one JSON value where a call opens
(`decode_at`, i.e. `json.JSONDecoder.raw_decode`) and then requires the format's closing
marker, so a marker inside a string argument (`"</tool_call>"`) is data. Only after a
malformed value does a parser look for the next marker, and then with `find_outside_strings`,
which skips JSON strings as written, so the data in a broken call cannot open a new one.

    python -m pytest tests/unit/test_parser_hermes.py tests/unit/test_parsers.py
"""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any

from toolrl.rollout.trajectory import ToolCall


class DuplicateKeyError(ValueError):
    """A JSON object that gives one key twice."""


def reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


def finite_float(token: str) -> float:
    value = float(token)
    if not math.isfinite(value):  # 1e400 reads as inf: no tool could take it
        raise ValueError(f"{token} is too large for a number")
    return value


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise DuplicateKeyError(f"key {json.dumps(key)} is given twice")
        obj[key] = value
    return obj


_DECODER = json.JSONDecoder(
    parse_constant=reject_constant, parse_float=finite_float, object_pairs_hook=unique_keys
)


def json_error(e: ValueError | RecursionError, start: int = 0) -> str:
    """The model-readable message for a JSON value that failed to decode from `start` on."""
    if isinstance(e, json.JSONDecodeError):
        # e.g. "Unterminated string starting at" already ends with "at"
        return f"invalid JSON: {e.msg.removesuffix(' at')} at char {e.pos - start}"
    if isinstance(e, RecursionError):
        return "invalid JSON: nested too deeply"
    if isinstance(e, DuplicateKeyError):
        return f"{e} in one JSON object"
    return f"invalid JSON: {e}"  # NaN/Infinity, integers longer than Python's digit limit


def loads(text: str) -> tuple[Any] | str:
    """json.loads that returns (value,) or an error message, and never raises."""
    try:
        return (_DECODER.decode(text),)
    except (ValueError, RecursionError) as e:
        return json_error(e)


def decode_at(text: str, pos: int) -> tuple[Any, int] | str:
    """Decode one JSON value starting at `pos`: (value, end) or an error message."""
    try:
        return _DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError) as e:
        return json_error(e, start=pos)


def skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


# A JSON string as written, or what is left of one that never closes: to the end of its line,
# since a JSON string cannot hold a raw newline (so one missing quote cannot hide the calls
# on the lines after it).
_STRING = r'"[^"\\\n]*(?:\\.[^"\\\n]*)*"?'


@functools.cache
def _scanner(markers: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join([_STRING, *map(re.escape, markers)]), re.S)


def find_outside_strings(text: str, pos: int, markers: tuple[str, ...]) -> int:
    """Index of the first of `markers` at or after `pos` that is not inside a JSON string
    (strings read from `pos` on; an unclosed one runs to the end), or -1. Linear in text."""
    for m in _scanner(markers).finditer(text, pos):
        if not m.group().startswith('"'):
            return m.start()
    return -1


_TOKENS = re.compile(_STRING + r"|[\[\]{},]", re.S)


def end_of_element(text: str, pos: int) -> int:
    """From the start of a malformed array element, the index of the `,` or `]` that ends
    it (brackets and strings tracked, so neither a nested comma nor one in a string counts),
    or len(text) when the array never closes."""
    return _scan_brackets(text, pos, element=True)


def skip_value(text: str, pos: int) -> int:
    """From a malformed value opening with a bracket at `pos`, the index just past the
    bracket that closes it (brackets and strings tracked), or len(text)."""
    return _scan_brackets(text, pos, element=False)


def _scan_brackets(text: str, pos: int, element: bool) -> int:
    depth = 0
    for m in _TOKENS.finditer(text, pos):
        token = m.group()
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth -= 1
            if not element and depth <= 0:
                return m.end()
            if element and depth < 0 and token == "]":
                return m.start()
            depth = max(depth, 0)
        elif element and token == "," and depth == 0:
            return m.start()
    return len(text)


def json_type(value: Any) -> str:
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


def call_from_object(value: Any, keys: tuple[str, ...]) -> ToolCall | str:
    """Check a decoded `{"name": ..., <key>: {...}}` and build its ToolCall, or say why not.

    `keys` lists the accepted names of the arguments field, first preferred. Arguments that
    were JSON-encoded a second time (a string holding an object) are accepted. An object
    that gives both spellings of the arguments field is refused: which one was meant?
    """
    shape = '{"name": "<tool name>", "' + keys[0] + '": {...}}'
    if not isinstance(value, dict):
        return f"expected a JSON object {shape}, got {json_type(value)}"
    if "name" not in value:
        return 'missing "name"'
    name = value["name"]
    if not isinstance(name, str) or not name:
        return f'"name" must be a non-empty string, got {json_type(name)}'
    given = [k for k in keys if k in value]
    if not given:
        return f'missing "{keys[0]}" (use {{}} for a call without arguments)'
    if len(given) > 1:
        return f"give the arguments once, not as both {' and '.join(map(json.dumps, given))}"
    key = given[0]
    arguments = value[key]
    if isinstance(arguments, str):
        decoded = loads(arguments)
        if isinstance(decoded, str) or not isinstance(decoded[0], dict):
            return f'"{key}" must be a JSON object, got a string that is not one'
        arguments = decoded[0]
    if not isinstance(arguments, dict):
        return f'"{key}" must be a JSON object, got {json_type(arguments)}'
    return ToolCall(name=name, arguments=arguments)
