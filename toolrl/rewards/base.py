"""What a reward receives and returns, and the error that says "not the model's fault".

A reward is any callable (function or object, plain or `async def`) that takes one `Scored`,
the read-only view of a finished trajectory, and returns a float, a mapping of named floats,
or `PerTurn` values credited to each assistant turn (shaping; the rest is the final reward):

    def my_reward(x: Scored) -> float: ...
    async def judge(x: Scored) -> Mapping[str, float]: ...   # e.g. {"helpful": .7, "safe": 1}
    def shaping(x: Scored) -> PerTurn: ...                   # PerTurn([-.1, 0.0]) for 2 turns

Rewards are built from config by `toolrl.rewards.combine.RewardStack` and scored by
`toolrl.rewards.runner.RewardRunner`. Failures split by whose fault they are: a reward that
raises (or runs out of time) on the model's output scores 0; a reward that cannot score for
reasons outside the model raises `RewardInfraError`, and the trajectory becomes an
infrastructure fault (kept out of the loss, counted), never a silent zero.

    python -m pytest tests/unit/test_rewards.py tests/unit/test_reward_runner.py
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from typing import Any, Protocol, runtime_checkable

from toolrl.rollout.trajectory import ToolCall, Trajectory, Turn


@dataclass(frozen=True)
class PerTurn:
    """Reward credited turn by turn: `values[i]` belongs to assistant turn i (its last sampled
    token), so an algorithm with per-token credit can place it there. Logged as its sum."""

    values: tuple[float, ...]

    def __init__(self, values: Sequence[float]) -> None:
        object.__setattr__(self, "values", tuple(values))


# What a reward may return: one number, named components (logged as `name/key`), or PerTurn.
RewardValue = float | Mapping[str, float] | PerTurn


class RewardInfraError(RuntimeError):
    """A reward could not score for reasons outside the model: judge down, pool died, worker killed.

    The caller marks the trajectory as an infrastructure fault instead of scoring it 0."""


@dataclass(frozen=True)
class Scored:
    """A finished trajectory as a reward sees it. Frozen; picklable (it travels to pool workers).

    `messages` is the whole conversation in OpenAI chat form: the prompt messages, then per
    assistant turn `{"role": "assistant", "content", "tool_calls"?}` and one
    `{"role": "tool", "name", "content", "tool_call_id"?}` per tool answer.
    `final_text` is None when the model gave no final answer (cut off, out of turns).
    """

    messages: list[dict[str, Any]]
    final_text: str | None
    row: dict[str, Any] = field(default_factory=dict)  # the dataset row, all columns
    finish_reasons: list[str] = field(default_factory=list)  # per assistant turn
    tool_errors: int = 0
    tool_calls: int = 0
    turn_tool_errors: list[int] = field(default_factory=list)  # per assistant turn

    @property
    def num_turns(self) -> int:
        return len(self.finish_reasons)

    @classmethod
    def from_trajectory(
        cls,
        traj: Trajectory,
        prompt_messages: Sequence[Mapping[str, Any]],
        row: Mapping[str, Any],
        contents: Sequence[str],
    ) -> Scored:
        """Build the view of `traj`. `contents[i]` is the text of turn i as the parser saw it
        (reasoning stripped), since the trajectory keeps token ids, not text."""
        if len(contents) != len(traj.turns):
            raise ValueError(f"{len(contents)} turn contents for {len(traj.turns)} turns")
        messages = [dict(m) for m in prompt_messages]
        for turn, content in zip(traj.turns, contents, strict=True):
            messages.extend(_turn_messages(turn, content))
        return cls(
            messages=messages,
            final_text=traj.info.get("final_text"),
            row=dict(row),
            finish_reasons=[t.finish_reason for t in traj.turns],
            tool_errors=traj.num_tool_errors,
            tool_calls=traj.num_tool_calls,
            turn_tool_errors=[t.num_errors for t in traj.turns],
        )


def _turn_messages(turn: Turn, content: str) -> list[dict[str, Any]]:
    """One assistant message with its calls, then one tool message per result."""
    assistant: dict[str, Any] = {"role": "assistant", "content": content}
    if turn.calls:
        assistant["tool_calls"] = [_openai_call(c, i) for i, c in enumerate(turn.calls)]
    out = [assistant]
    for r in turn.results:
        tool: dict[str, Any] = {"role": "tool", "name": r.name, "content": r.content}
        if r.call_id is not None:
            tool["tool_call_id"] = r.call_id
        out.append(tool)
    if turn.observation is not None:  # an environment's answer: the next user message
        out.append({"role": "user", "content": turn.observation})
    return out


def _openai_call(call: ToolCall, index: int) -> dict[str, Any]:
    # OpenAI form carries arguments as a JSON string; ids the model did not sample get a
    # positional one so every call in the message is addressable.
    return {
        "id": call.id if call.id is not None else f"call_{index}",
        "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
    }


def normalize_value(
    name: str, value: object, num_turns: int | None = None
) -> float | dict[str, float] | PerTurn:
    """`value` as a float, a dict of floats or a PerTurn of `num_turns` floats (when given);
    ValueError for anything else.

    Non-finite values are refused: one NaN would poison every advantage of its group."""
    if isinstance(value, PerTurn):
        if num_turns is not None and len(value.values) != num_turns:
            raise ValueError(
                f"reward {name!r} returned {len(value.values)} per-turn values "
                f"for {num_turns} turns"
            )
        return PerTurn([_finite(f"{name}[{i}]", v) for i, v in enumerate(value.values)])
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"reward {name!r} returned an empty mapping")
        out = {str(k): _finite(f"{name}/{k}", v) for k, v in value.items()}
        return out
    return _finite(name, value)


def _finite(key: str, v: object) -> float:
    if isinstance(v, Real) and math.isfinite(float(v)):
        return float(v)
    raise ValueError(f"reward {key!r} returned {v!r}, not a finite number")


@runtime_checkable
class Reward(Protocol):
    """A function or object scoring one trajectory; `async def` is allowed."""

    def __call__(self, x: Scored, /) -> RewardValue | Awaitable[RewardValue]: ...
