"""The rollout protocol swap point: how a trajectory advances between two sampled segments.

The agent loop (toolrl/rollout/agent_loop.py) samples; a protocol decides everything else:

    start(episode, tools) -> Run       per trajectory: the prompt ids, what ends a segment
    Run.pause()                        a fresh stop rule on the streamed ids (inline tags), or None
    Run.read(turn, ids) -> read        every segment, cut off or not: fill in the turn (calls,
                                       errors, content), so metrics and rewards see all of them
    await Run.advance(turn, read, last) -> Advance
                                       a segment that ended: run tools or step an environment,
                                       say which ids to append (mask 0) or that the trajectory
                                       ends, with its final text
    await Run.close()                  per trajectory, whatever happened

Three ship beside this file: `chat.ChatToolTurns` (tool calls in chat-template tool turns),
`inline.InlineTags` (`<search>q</search>` answered by `<information>..</information>` in the
same message, with or without a chat template) and `environment.EnvironmentTurns` (chat
tool turns, and an environment that answers each final turn as the next user message).
One is chosen in YAML (`conf/protocol/`); the rollout worker builds it with the values of
the run its constructor names (`tokenizer`, `tool_schemas`, `parser`, `reasoning`,
`chat_template`, `template_kwargs`).

`ToolCaller` is what every protocol runs tools through, so the limits and the error answers
the model reads are the same in all of them: unknown tool, a tool that raised, a timeout,
past `max_tool_calls`.

    python -m pytest tests/unit/test_agent_loop.py tests/unit/test_protocols.py
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from toolrl.rollout.sampler import Pause
from toolrl.rollout.trajectory import ToolCall, ToolResult, Turn
from toolrl.tools.base import Tool, ToolInfraError

if TYPE_CHECKING:
    from toolrl.rollout.agent_loop import Episode

T = TypeVar("T")


@dataclass
class Advance:
    """What a protocol decided after a sampled segment."""

    append: list[int] | None = None  # ids to append (mask 0), then sample again; None: the end
    final_text: str | None = None  # the answer, when the trajectory ends with one
    reward: float = 0.0  # credited to this turn (an environment's step reward)


class Run(Protocol):
    """One trajectory's side of a protocol."""

    prompt_ids: list[int]
    stop_token_ids: list[int]  # ids that end a segment (kept as its last id)

    def pause(self) -> Pause | None: ...

    def read(self, turn: Turn, ids: list[int]) -> Any:
        """Parse the segment's sampled ids (`turn` spans them) into `turn`; what it returns
        goes to `advance`."""
        ...

    async def advance(self, turn: Turn, read: Any, last: bool) -> Advance:
        """After a segment that ended (not cut by the budget); `last` is True when no
        segment may follow (out of turns), so nothing should be run."""
        ...

    async def close(self) -> None: ...


class RolloutProtocol(Protocol):
    def start(self, ep: Episode, tools: ToolCaller) -> Run: ...


@dataclass
class ToolLimits:
    timeout_s: float = 10.0  # per call, enforced here, not trusted to the tool
    max_output_tokens: int = 256  # longer answers are cut, with a marker the model reads
    max_calls: int | None = None  # per trajectory; calls past it get an error answer


class ToolCaller:
    """A trajectory's tools: sessions opened on first use and closed at the end, calls run
    concurrently under the limits, and every failure the model caused answered as text."""

    def __init__(
        self,
        tools: dict[str, Tool],
        key: str,
        limits: ToolLimits,
        truncate: Callable[[str, int], str],
        slots: dict[str, asyncio.Semaphore] | None = None,
    ) -> None:
        """slots: per tool name, the worker-wide semaphore of a tool with max_concurrency."""
        self.tools, self.key, self.limits, self.truncate = tools, key, limits, truncate
        self.slots = slots or {}
        self.calls_made = 0
        self._opening: dict[str, asyncio.Future[None]] = {}

    async def run(self, calls: list[ToolCall]) -> list[ToolResult]:
        """Run calls concurrently. Every call finishes (or times out) before an infra fault
        propagates, so none is left running against a session the end is about to close."""
        budget = self.limits.max_calls
        allowed = len(calls) if budget is None else max(0, budget - self.calls_made)
        self.calls_made += len(calls)
        over = [self._over_limit(c) for c in calls[allowed:]]
        return await gather_all(self._call(c) for c in calls[:allowed]) + over

    def _over_limit(self, call: ToolCall) -> ToolResult:
        text = f"Error: tool call limit reached ({self.limits.max_calls} per trajectory)"
        return ToolResult(call.name, text, False, call.id, error="call_limit")

    async def _call(self, call: ToolCall) -> ToolResult:
        def answer(text: str, ok: bool, error: str | None = None) -> ToolResult:
            return ToolResult(call.name, text, ok, call.id, error)

        tool = self.tools.get(call.name)  # only the tools this episode offers
        if tool is None:
            offered = ", ".join(sorted(self.tools))
            return answer(
                f"Error: unknown tool {call.name!r}; tools: {offered}", False, "unknown_tool"
            )
        timeout = self.limits.timeout_s
        try:
            await self._open(call.name)
            async with self.slots.get(call.name) or contextlib.nullcontext():
                text, ok = await asyncio.wait_for(tool.call(self.key, call.arguments), timeout)
        except TimeoutError:
            return answer(f"Error: timed out after {timeout:g}s", False, "timeout")
        except ToolInfraError:
            raise
        except Exception as e:  # a tool bug must not crash training; the model reads what failed
            return answer(f"Error: {call.name} failed: {type(e).__name__}: {e}", False, "raised")
        return answer(self.truncate(str(text), self.limits.max_output_tokens), bool(ok))

    async def _open(self, name: str) -> None:
        # Once per tool, before its first call, even when several calls to it start at once.
        if name not in self._opening:
            self._opening[name] = asyncio.ensure_future(self.tools[name].open(self.key))
        try:
            await asyncio.shield(self._opening[name])
        except ToolInfraError:
            raise
        except Exception as e:  # a session that cannot start is the infrastructure's fault
            raise ToolInfraError(f"{name}: could not open a session: {e}") from e

    async def close(self) -> None:
        opened = [
            n
            for n, f in self._opening.items()
            if f.done() and not f.cancelled() and not f.exception()
        ]
        await asyncio.gather(
            *(self.tools[n].close(self.key) for n in opened), return_exceptions=True
        )


async def gather_all(coros: Iterable[Awaitable[T]]) -> list[T]:
    """Like gather, but lets every task finish before the first exception propagates."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


def offered_schemas(schemas: dict[str, dict[str, Any]], names: list[str] | None) -> list | None:
    """The schemas of a row's own tools (None: every configured tool's)."""
    return None if names is None else [schemas[n] for n in names]
