"""The parser contract: turn one assistant turn's text into content, tool calls and errors.

The agent loop decodes the ids an engine sampled in a turn and hands the text to a parser.
A parser is any callable `(text: str) -> ParsedTurn`, so a user can name their own in YAML
with `_target_`. Each call is parsed on its own: one malformed call yields one error
message (which the model reads back), never the loss of the well-formed calls beside it.

See `toolrl/rollout/parsers/hermes.py` for the Qwen2.5/Hermes format and run
`python -m pytest tests/unit/test_parser_hermes.py` to exercise it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from toolrl.rollout.trajectory import ToolCall


@dataclass
class ParsedTurn:
    """What one assistant turn said and asked for."""

    content: str  # the text outside tool-call blocks, stripped
    calls: list[ToolCall] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # one per malformed call, for the model


class Parser(Protocol):
    """Anything that parses a turn's text. It must never raise on any string."""

    def __call__(self, text: str) -> ParsedTurn: ...


def check_max_parallel_calls(max_parallel_calls: int) -> None:
    """Reject a limit below one: a parser that can run no call is a configuration error."""
    if max_parallel_calls < 1:
        raise ValueError(f"max_parallel_calls must be >= 1, got {max_parallel_calls}")


@dataclass
class CallLimit:
    """Base of the shipped parsers: how many well-formed calls one turn may run."""

    max_parallel_calls: int = 4

    def __post_init__(self) -> None:
        check_max_parallel_calls(self.max_parallel_calls)


# A turn is read up to this many calls, well-formed or not; past it one error says the rest was
# not read. So a turn of thousands of broken calls costs neither thousands of error answers
# nor quadratic time (each JSON decode error counts lines from the start of the text).
MAX_CALLS_READ = 64


def room_to_read(results: list[ToolCall | str]) -> bool:
    """Whether a parser should read another call: one past the limit, to know there is more."""
    return len(results) <= MAX_CALLS_READ


def collect_calls(
    results: list[ToolCall | str], max_parallel_calls: int
) -> tuple[list[ToolCall], list[str]]:
    """Number per-call results from 1 and split them into (calls, errors).

    A str result is why that call is malformed. Well-formed calls beyond
    `max_parallel_calls` each get an error saying they were not run, never a silent drop.
    The wording matches `HermesParser`, e.g. `tool call 2: invalid JSON: ...`. Results past
    MAX_CALLS_READ become one error.
    """
    calls: list[ToolCall] = []
    errors: list[str] = []
    if len(results) > MAX_CALLS_READ:
        results = results[:MAX_CALLS_READ] + [
            f"not read, nor anything after it: a turn may hold at most {MAX_CALLS_READ} tool calls"
        ]
    for i, result in enumerate(results, start=1):
        if isinstance(result, str):
            errors.append(f"tool call {i}: {result}")
        elif len(calls) >= max_parallel_calls:
            errors.append(
                f"tool call {i}: not run: at most {max_parallel_calls} "
                "tool calls are allowed in one turn"
            )
        else:
            calls.append(result)
    return calls, errors
