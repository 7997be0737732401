"""Format and tool-use shaping rewards.

`FormatMatch` scores 1.0 when the final text matches a regex from config (the whole text by
default), 0.0 otherwise or when there is no final answer. `tool_error_penalty` subtracts
`per_error` for each tool error (bad call syntax, unknown tool, tool raised), down to `-cap`;
with `per_turn: true` each turn is charged for its own errors (`PerTurn`), until the cap is
spent, so an algorithm with per-token credit can blame the turn that erred.

    reward:
      format: {_target_: toolrl.rewards.format.FormatMatch, pattern: '(?s).*<answer>.+</answer>'}
      tools: {_target_: toolrl.rewards.format.tool_error_penalty, per_error: 0.1, cap: 0.5}

    python -m pytest tests/unit/test_rewards.py -k format
"""

from __future__ import annotations

import re

from toolrl.rewards.base import PerTurn, Scored


class FormatMatch:
    """1.0 when the final text matches `pattern`. A class so a bad regex fails at construction."""

    def __init__(self, pattern: str, mode: str = "fullmatch") -> None:
        if mode not in ("fullmatch", "search"):
            raise ValueError(f"mode must be 'fullmatch' or 'search', not {mode!r}")
        try:
            self.regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"bad format pattern {pattern!r}: {e}") from e
        self.mode = mode

    def __call__(self, x: Scored) -> float:
        if x.final_text is None:
            return 0.0
        match = getattr(self.regex, self.mode)(x.final_text)
        return 1.0 if match else 0.0


def tool_error_penalty(
    x: Scored, per_error: float = 0.1, cap: float = 0.5, per_turn: bool = False
) -> float | PerTurn:
    """-min(cap, per_error * tool_errors): errors cost, but a bounded amount. With `per_turn`,
    the same total split over the turns that erred, earliest first."""
    if per_error < 0 or cap < 0:
        raise ValueError(f"per_error and cap must be >= 0, got {per_error}, {cap}")
    if not per_turn:
        return -min(cap, per_error * x.tool_errors)
    left, credit = cap, []
    for errors in x.turn_tool_errors:
        cost = min(left, per_error * errors)
        credit.append(-cost)
        left -= cost
    return PerTurn(credit)
