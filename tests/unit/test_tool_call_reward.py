"""The function-calling reward, on hand-computed cases (toolrl/rewards/tool_calls.py).

python -m pytest tests/unit/test_tool_call_reward.py
"""

from __future__ import annotations

import json

import pytest

from toolrl.rewards.base import Scored
from toolrl.rewards.tool_calls import call_match


def made(*calls: tuple[str, dict]) -> list[dict]:
    tool_calls = [
        {"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
        for i, (n, a) in enumerate(calls)
    ]
    messages = [{"role": "user", "content": "q"}]
    if tool_calls:
        messages.append({"role": "assistant", "content": "", "tool_calls": tool_calls})
    return messages


CALC = {"name": "calculator", "arguments": {"expression": "47 * 83"}}


@pytest.mark.parametrize(
    ("calls", "expected", "scores"),
    [
        ([("calculator", {"expression": "47 * 83"})], CALC, (1, 1, 1)),
        ([("calculator", {"expression": "47 + 83"})], CALC, (1, 1, 0)),  # wrong value
        ([("calculator", {"expr": "47 * 83"})], CALC, (1, 0, 0)),  # wrong key
        ([("search", {"query": "x"})], CALC, (0, 0, 0)),  # wrong tool
        ([], CALC, (0, 0, 0)),  # no call at all
        # two calls made, one expected: name 1/2; the matched pair is right
        ([("calculator", {"expression": "47 * 83"}), ("search", {"q": "x"})], CALC, (0.5, 1, 1)),
        # two expected, given as a JSON string; one made with 1 of its 2 values right:
        # name 1/2, keys 2/2, values 1/2
        (
            [("f", {"a": 1, "b": 2})],
            json.dumps([{"name": "f", "arguments": {"a": 1, "b": 3}}, {"name": "g"}]),
            (0.5, 1, 0.5),
        ),
    ],
)
def test_tool_call_match(calls, expected, scores) -> None:
    x = Scored(messages=made(*calls), final_text=None, row={"expected_call": expected})
    got = call_match(x)
    assert (got["name"], got["keys"], got["values"]) == pytest.approx(scores)


def test_only_the_first_calling_turn_counts() -> None:
    messages = made(("search", {"query": "x"}))
    messages += made(("calculator", {"expression": "47 * 83"}))[1:]
    x = Scored(messages=messages, final_text="4001", row={"expected_call": CALC})
    assert call_match(x) == {"name": 0.0, "keys": 0.0, "values": 0.0}
