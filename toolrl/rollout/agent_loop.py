"""The multi-turn agent loop: sample a turn, parse it, run the tools, append their answers, repeat.

One coroutine per trajectory over an async engine, so trajectories advance on their own:
a slow tool call in one never holds up the others, and the engine batches whatever
turns are waiting. Per turn:

    generate until end of turn ──► strip reasoning ──► parse calls ──► no calls: final answer
                                                            │
                                   run calls concurrently ◄─┘  (each with a timeout)
                                   ──► append glue + answers (mask 0) ──► next turn

Calls the model wrote inside its reasoning are never run; each turn counts them
(`Turn.reasoning_calls`), since a policy that learns to "call" tools while thinking is worth
seeing on a curve.

The loop is a plain class driven by tests with a fake engine (tests/unit/test_agent_loop.py)
and by the rollout worker with vLLM (toolrl/workers/rollout.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from toolrl.rewards.base import RewardInfraError, Scored
from toolrl.rewards.combine import Score
from toolrl.rollout.chat import ChatBuilder
from toolrl.rollout.parsers.base import ParsedTurn
from toolrl.rollout.parsers.reasoning import NoReasoning, ReasoningStep
from toolrl.rollout.sampler import Engine, Sampler
from toolrl.rollout.trajectory import ToolCall, ToolResult, Trajectory, Turn
from toolrl.tools.base import Tool, ToolInfraError

T = TypeVar("T")


@dataclass
class LoopConfig:
    max_turns: int = 3
    max_total_tokens: int = 512
    tool_timeout_s: float = 10.0
    max_tool_output_tokens: int = 256  # longer answers are cut, with a marker the model reads


@dataclass
class Episode:
    """One sample to roll out: which prompt, its messages, its seed, the row its rewards read
    and the tools it offers (None: every configured tool)."""

    prompt_id: int
    messages: list[dict[str, Any]]
    seed: int | None = None
    row: dict[str, Any] = field(default_factory=dict)
    tools: list[str] | None = None

    @classmethod
    def of(cls, prompt_id: int, prompt: Any, seed: int | None) -> Episode:
        """The episode of a task's prompt (anything with `messages`, `row` and `tools`)."""
        return cls(prompt_id, prompt.messages, seed, dict(prompt.row), prompt.tools)


class Scorer(Protocol):
    """What scores a finished trajectory: toolrl.rewards.runner.RewardRunner."""

    async def score(self, x: Scored) -> Score: ...


class AgentLoop:
    def __init__(
        self,
        engine: Engine,
        chat: ChatBuilder,
        parser: Callable[[str], ParsedTurn],
        tools: dict[str, Tool],
        rewards: Scorer,
        cfg: LoopConfig,
        reasoning: ReasoningStep | None = None,
    ) -> None:
        self.engine, self.chat, self.parser, self.tools = engine, chat, parser, tools
        self.schemas = {name: tool.schema() for name, tool in tools.items()}
        self.rewards, self.cfg = rewards, cfg
        self.reasoning = reasoning or NoReasoning()
        # Every turn continues the same assistant header (the prompt's and each tool turn's),
        # so whether the template opens a reasoning block there is decided once.
        self.opens_reasoning = self.reasoning.opened_by(chat.generation_prompt)
        self.weight_version = 0

    async def run_many(self, episodes: list[Episode], sampler: Sampler) -> list[Trajectory]:
        return await _gather_all(self.run(ep, sampler) for ep in episodes)

    async def run(self, ep: Episode, sampler: Sampler) -> Trajectory:
        schemas = None if ep.tools is None else [self.schemas[n] for n in ep.tools]
        traj = Trajectory.from_prompt(ep.prompt_id, self.chat.prompt_ids(ep.messages, schemas))
        offered = self.tools if ep.tools is None else {n: self.tools[n] for n in ep.tools}
        sessions = _Sessions(offered, uuid.uuid4().hex)
        final_text = None
        try:
            for turn_no in range(self.cfg.max_turns):
                room = self.cfg.max_total_tokens - len(traj.token_ids)
                if room <= 0:
                    break
                turn, parsed = await self._sample_turn(traj, sampler, ep.seed, turn_no, room)
                if turn.finish_reason != "stop":
                    break  # cut off by the token budget: no answer
                if not parsed.calls and not parsed.errors:
                    final_text = parsed.content
                    break
                if turn_no == self.cfg.max_turns - 1:
                    break  # out of turns while still calling tools: no answer
                turn.results = await self._run_calls(sessions, parsed)
                answer_ids = self.chat.tool_turn_ids(turn.results)
                if len(traj.token_ids) + len(answer_ids) >= self.cfg.max_total_tokens:
                    break  # no room left for the tool answers and a reply: no answer
                traj.append_context(answer_ids)
        except ToolInfraError as e:
            traj.infra_error = f"{type(e).__name__}: {e}"
        finally:
            await sessions.close_all()
        traj.info["final_text"] = final_text
        if traj.infra_error is None:
            await self._score(traj, ep)
        traj.check()
        return traj

    async def _score(self, traj: Trajectory, ep: Episode) -> None:
        """Reward the finished trajectory; a reward that failed outside the model (a judge
        down, a dead pool worker) makes it an infrastructure fault, never a silent zero."""
        contents = [t.content for t in traj.turns]
        try:
            score = await self.rewards.score(
                Scored.from_trajectory(traj, ep.messages, ep.row, contents)
            )
        except RewardInfraError as e:
            traj.infra_error = f"reward: {e}"
            return
        traj.reward = score.total
        traj.info["reward_components"] = score.components
        traj.info["reward_failures"] = score.model_failures

    async def _sample_turn(
        self, traj: Trajectory, sampler: Sampler, seed: int | None, turn_no: int, room: int
    ) -> tuple[Turn, ParsedTurn]:
        sampling = sampler.for_turn(seed, turn_no, self.chat.stop_token_ids)
        if sampling.max_new_tokens > room:
            sampling = dataclasses.replace(sampling, max_new_tokens=room)
        version = self.weight_version
        gen = await self.engine.generate(list(traj.token_ids), sampling)
        start, end = traj.append_sampled(gen.token_ids, gen.logprobs)
        ended = bool(gen.token_ids) and gen.token_ids[-1] in self.chat.stop_token_ids
        finish = "stop" if gen.finish_reason == "stop" and ended else "length"
        split = self.reasoning(self.chat.decode(gen.token_ids), self.opens_reasoning)
        parsed = self.parser(split.text)
        turn = Turn(start, end, version, finish, parsed.calls, [], parsed.errors)
        turn.content = parsed.content
        if split.reasoning:  # well-formed calls only: a thought may just mention the format
            turn.reasoning_calls = len(self.parser(split.reasoning).calls)
        traj.turns.append(turn)
        return turn, parsed

    async def _run_calls(self, sessions: _Sessions, parsed: ParsedTurn) -> list[ToolResult]:
        """Run a turn's calls concurrently; parse errors become answers the model reads.

        Every call finishes (or times out) before an infra fault propagates, so no call is
        left running against a session that the trajectory's end is about to close. Each
        answer carries its call's id; a parse error's answer has none (`call_id` None)."""
        results = await _gather_all(self._call(sessions, c) for c in parsed.calls)
        return results + [ToolResult("error", f"Error: {e}", ok=False) for e in parsed.errors]

    async def _call(self, sessions: _Sessions, call: ToolCall) -> ToolResult:
        def answer(text: str, ok: bool) -> ToolResult:
            return ToolResult(call.name, text, ok, call.id)

        tool = sessions.tools.get(call.name)  # only the tools this episode offers
        if tool is None:
            offered = ", ".join(sorted(sessions.tools))
            return answer(f"Error: unknown tool {call.name!r}; tools: {offered}", False)
        try:
            await sessions.open(call.name)
            text, ok = await asyncio.wait_for(
                tool.call(sessions.key, call.arguments), timeout=self.cfg.tool_timeout_s
            )
        except TimeoutError:
            return answer(f"Error: timed out after {self.cfg.tool_timeout_s:g}s", False)
        except ToolInfraError:
            raise
        except Exception as e:  # a tool bug must not crash training; the model reads what failed
            return answer(f"Error: {call.name} failed: {type(e).__name__}: {e}", False)
        return answer(self.chat.truncate(str(text), self.cfg.max_tool_output_tokens), bool(ok))


class _Sessions:
    """A trajectory's tool sessions: each tool opened once, before its first call (even when
    several calls to it start at once), and every opened tool closed at the end."""

    def __init__(self, tools: dict[str, Tool], key: str) -> None:
        self.tools, self.key = tools, key
        self._opening: dict[str, asyncio.Future[None]] = {}

    async def open(self, name: str) -> None:
        if name not in self._opening:
            self._opening[name] = asyncio.ensure_future(self.tools[name].open(self.key))
        try:
            await asyncio.shield(self._opening[name])
        except ToolInfraError:
            raise
        except Exception as e:  # a session that cannot start is the infrastructure's fault
            raise ToolInfraError(f"{name}: could not open a session: {e}") from e

    async def close_all(self) -> None:
        opened = [
            n
            for n, f in self._opening.items()
            if f.done() and not f.cancelled() and not f.exception()
        ]
        await asyncio.gather(
            *(self.tools[n].close(self.key) for n in opened), return_exceptions=True
        )


async def _gather_all(coros: Iterable[Awaitable[T]]) -> list[T]:
    """Like gather, but lets every task finish before the first exception propagates."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]
