"""JSON reading shared by the JSON-based parsers (hermes, llama3_json, mistral, qwen3_coder).

Every function here returns an error message instead of raising, worded for the model to
read back (`invalid JSON: Expecting ',' delimiter at char 18`). NaN and Infinity are
refused, since they are not JSON and a tool could not take them.

    python -m pytest tests/unit/test_parser_hermes.py tests/unit/test_parsers.py
"""

from __future__ import annotations

import json
from typing import Any

from toolrl.rollout.trajectory import ToolCall


def reject_constant(token: str) -> Any:
    raise ValueError(f"{token} is not valid JSON")


_DECODER = json.JSONDecoder(parse_constant=reject_constant)


def json_error(e: ValueError | RecursionError, start: int = 0) -> str:
    """The model-readable message for a JSON value that failed to decode from `start` on."""
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON: {e.msg} at char {e.pos - start}"
    if isinstance(e, RecursionError):
        return "invalid JSON: nested too deeply"
    return f"invalid JSON: {e}"  # NaN/Infinity, integers longer than Python's digit limit


def loads(text: str) -> tuple[Any] | str:
    """json.loads that returns (value,) or an error message, and never raises."""
    try:
        return (json.loads(text, parse_constant=reject_constant),)
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
    were JSON-encoded a second time (a string holding an object) are accepted.
    """
    shape = '{"name": "<tool name>", "' + keys[0] + '": {...}}'
    if not isinstance(value, dict):
        return f"expected a JSON object {shape}, got {json_type(value)}"
    if "name" not in value:
        return 'missing "name"'
    name = value["name"]
    if not isinstance(name, str) or not name:
        return f'"name" must be a non-empty string, got {json_type(name)}'
    key = next((k for k in keys if k in value), None)
    if key is None:
        return f'missing "{keys[0]}" (use {{}} for a call without arguments)'
    arguments = value[key]
    if isinstance(arguments, str):
        decoded = loads(arguments)
        if isinstance(decoded, str) or not isinstance(decoded[0], dict):
            return f'"{key}" must be a JSON object, got a string that is not one'
        arguments = decoded[0]
    if not isinstance(arguments, dict):
        return f'"{key}" must be a JSON object, got {json_type(arguments)}'
    return ToolCall(name=name, arguments=arguments)
