"""The one data structure that crosses from the rollout group to the trainer.

A `Trajectory` is one sample: the prompt ids followed by every id appended after them,
exactly as the engine saw them. The loss-mask rule, in full:

    prompt ids ............................ mask 0  (the policy did not sample them)
    ids the engine sampled in a turn ....... mask 1  (with the engine's logprob)
    template glue the model did not emit ... mask 0  (e.g. the "\\n" after <|im_end|>)
    tool answers and their wrapping ........ mask 0  (the tool wrote them, not the policy)

Sampled ids are never decoded and re-encoded; a tool turn only appends. `check()`
enforces the invariant where trajectories are built.

Run `python -m pytest tests/unit/test_trajectory.py` to exercise it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    """One call the parser found in a turn: the tool's name, its JSON arguments and, in formats
    that carry one (Mistral's 9-character ids), the call id the model sampled."""

    name: str
    arguments: dict[str, Any]
    id: str | None = None


@dataclass
class ToolResult:
    """What a tool returned, as text the model reads. `ok` is False for errors the model made.

    `call_id` is the id of the call it answers (`ToolCall.id`), for templates that write it
    into the tool turn; None where the call had none or nothing was called (a parse error).
    `error` says why a call failed when the caller answered for the tool (ToolCaller:
    unknown_tool, timeout, raised, call_limit); None for the tool's own answers."""

    name: str
    content: str
    ok: bool = True
    call_id: str | None = None
    error: str | None = None


@dataclass
class Turn:
    """One assistant turn: where its sampled ids sit in the trajectory and what it did."""

    start: int  # index of the first sampled id of this turn in token_ids
    end: int  # one past the last sampled id
    weight_version: int  # version of the weights that sampled this turn
    finish_reason: str  # "stop" (end of turn / tool call) or "length"
    calls: list[ToolCall] = field(default_factory=list)
    results: list[ToolResult] = field(default_factory=list)
    parse_errors: list[str] = field(default_factory=list)
    reasoning_calls: int = 0  # calls written inside the turn's reasoning: seen, never run
    content: str = ""  # the turn's text outside calls and reasoning, as the parser read it
    # What an environment answered this turn, as the next user message (None: no environment).
    observation: str | None = None
    # Reward credited to this turn (shaping, an environment's step reward), on top of the
    # trajectory's final reward; an algorithm with per-token credit puts it on `end - 1`.
    reward: float = 0.0
    # Of the turn's context (its `start` ids), how many the engine read from its prefix cache
    # instead of computing (vLLM's num_cached_tokens; whole KV blocks only).
    cached_tokens: int = field(default=0, compare=False)

    @property
    def num_errors(self) -> int:
        # results[: len(calls)] answer the calls; any after them answer the parse errors
        return len(self.parse_errors) + sum(not r.ok for r in self.results[: len(self.calls)])


@dataclass
class Trajectory:
    """One sample, prompt to final answer. Lists are parallel: len(token_ids) == len(loss_mask)."""

    prompt_id: int  # index of the prompt; GRPO groups trajectories by it
    token_ids: list[int]
    loss_mask: list[int]  # 1 only for ids the policy sampled
    logprobs: list[float]  # rollout logprob for sampled ids; 0.0 elsewhere
    prompt_len: int
    turns: list[Turn] = field(default_factory=list)
    reward: float = 0.0  # the final (outcome) reward; per-turn credit is in turns[i].reward
    # True when the infrastructure (not the model) failed; such a sample is kept out of the loss.
    infra_error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_prompt(cls, prompt_id: int, prompt_ids: list[int]) -> Trajectory:
        n = len(prompt_ids)
        return cls(prompt_id, list(prompt_ids), [0] * n, [0.0] * n, prompt_len=n)

    def append_sampled(self, ids: list[int], logprobs: list[float]) -> tuple[int, int]:
        """Append ids the engine sampled (mask 1). Returns their (start, end) span."""
        if len(ids) != len(logprobs):
            raise ValueError(f"{len(ids)} sampled ids but {len(logprobs)} logprobs")
        start = len(self.token_ids)
        self.token_ids.extend(ids)
        self.loss_mask.extend([1] * len(ids))
        self.logprobs.extend(logprobs)
        return start, len(self.token_ids)

    def append_context(self, ids: list[int]) -> None:
        """Append ids the policy did not sample (tool answers, template glue): mask 0."""
        self.token_ids.extend(ids)
        self.loss_mask.extend([0] * len(ids))
        self.logprobs.extend([0.0] * len(ids))

    @property
    def response_len(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def num_tool_calls(self) -> int:
        return sum(len(t.calls) for t in self.turns)

    @property
    def num_reasoning_calls(self) -> int:
        return sum(t.reasoning_calls for t in self.turns)

    @property
    def num_tool_errors(self) -> int:
        return sum(t.num_errors for t in self.turns)

    @property
    def total_reward(self) -> float:
        """The final reward plus every turn's credit: what an outcome-only algorithm uses."""
        return self.reward + sum(t.reward for t in self.turns)

    def check(self) -> None:
        """Raise if the invariant is broken: parallel lengths, 0/1 mask, logprobs only where sampled."""
        n = len(self.token_ids)
        if not (len(self.loss_mask) == len(self.logprobs) == n):
            raise AssertionError(
                f"lengths differ: ids={n} mask={len(self.loss_mask)} logprobs={len(self.logprobs)}"
            )
        if any(m not in (0, 1) for m in self.loss_mask):
            raise AssertionError("loss_mask holds values other than 0 and 1")
        if any(self.loss_mask[: self.prompt_len]):
            raise AssertionError("prompt ids are masked in")
        for i, (m, lp) in enumerate(zip(self.loss_mask, self.logprobs, strict=True)):
            if m == 0 and lp != 0.0:
                raise AssertionError(f"logprob at masked-out position {i}")
            if m == 1 and not (lp <= 0.0 and math.isfinite(lp)):
                raise AssertionError(f"bad logprob {lp} at sampled position {i}")
        sampled = {i for t in self.turns for i in range(t.start, t.end)}
        if sampled != {i for i, m in enumerate(self.loss_mask) if m}:
            raise AssertionError("turn spans do not cover exactly the masked-in ids")
