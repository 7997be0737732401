"""Function-calling reward (ToolRL-style): did the model call the expected tools with the
expected arguments?

The row names the expected calls (`expected_call`: one `{"name", "arguments"}` object, a list
of them, or either as a JSON string). The model's calls are those of its first tool-calling
turn. Three components, each in [0, 1]:

    name       matched tool names / max(expected calls, calls made)
    keys       over name-matched pairs: expected argument keys given / expected keys
    values     over name-matched pairs: expected arguments given with the expected value

Calls are matched in order by name (each expected call at most once), so extra or missing
calls lower `name`, and a wrong value lowers `values` but not `keys`. A turn without calls
scores 0 on all three.

    python -m pytest tests/unit/test_rewards.py -k tool_call
"""

from __future__ import annotations

import json
from typing import Any

from toolrl.rewards.base import Scored


def call_match(x: Scored, expected_key: str = "expected_call") -> dict[str, float]:
    expected = _expected(x.row.get(expected_key))
    made = _first_calls(x.messages)
    if not expected or not made:
        return {"name": 0.0, "keys": 0.0, "values": 0.0}
    pairs, left = [], list(expected)
    for call in made:
        match = next((e for e in left if e["name"] == call["name"]), None)
        if match is not None:
            left.remove(match)
            pairs.append((match["arguments"], call["arguments"]))
    name = len(pairs) / max(len(expected), len(made))
    want = sum(len(e) for e, _ in pairs)
    keys = sum(k in got for e, got in pairs for k in e) / want if want else float(bool(pairs))
    values = sum(k in got and got[k] == v for e, got in pairs for k, v in e.items())
    return {"name": name, "keys": keys, "values": values / want if want else float(bool(pairs))}


def _expected(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        value = json.loads(value)
    calls = value if isinstance(value, list) else [value] if isinstance(value, dict) else []
    return [
        {"name": c["name"], "arguments": dict(c.get("arguments") or {})}
        for c in calls
        if isinstance(c, dict) and "name" in c
    ]


def _first_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The calls of the first assistant message that made any, arguments decoded."""
    for m in messages:
        if m.get("role") == "assistant" and m.get("tool_calls"):
            return [
                {"name": c["function"]["name"], "arguments": _arguments(c["function"])}
                for c in m["tool_calls"]
            ]
    return []


def _arguments(function: dict[str, Any]) -> dict[str, Any]:
    args = function.get("arguments")
    return json.loads(args) if isinstance(args, str) else dict(args or {})
