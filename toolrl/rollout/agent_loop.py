"""The multi-turn agent loop: sample a segment, let the rollout protocol say what comes next.

One coroutine per trajectory over an async engine, so trajectories advance on their own:
a slow tool call in one never holds up the others, and the engine batches whatever
segments are waiting. Per trajectory:

    prompt ids (protocol) ──► sample until a stop id, the protocol's pause or the budget
        ──► protocol.advance: parse, run tools / step the environment
              ──► ids to append (mask 0) ──► sample again
              ──► or the end, with the final text ──► score (rewards)

The limits are the loop's, the same for every protocol: `max_turns` segments,
`max_total_tokens` in the trajectory, and through `ToolCaller` the per-call timeout, the
answer's length and `max_tool_calls`. What the protocols are: toolrl/rollout/protocols/.

The loop is a plain class driven by tests with a fake engine (tests/unit/test_agent_loop.py)
and by the rollout worker with vLLM (toolrl/workers/rollout.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from toolrl.rewards.base import RewardInfraError, Scored
from toolrl.rewards.combine import Score
from toolrl.rollout.protocols.base import (
    RolloutProtocol,
    Run,
    ToolCaller,
    ToolLimits,
    gather_all,
)
from toolrl.rollout.sampler import Engine, Sampler
from toolrl.rollout.trajectory import Trajectory, Turn
from toolrl.tools.base import Tool, ToolInfraError


@dataclass
class LoopConfig:
    max_turns: int = 3
    max_total_tokens: int = 512
    tool_timeout_s: float = 10.0
    max_tool_output_tokens: int = 256  # longer answers are cut, with a marker the model reads
    max_tool_calls: int | None = None  # per trajectory; later calls get an error answer


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
    """Drives trajectories through a rollout protocol: sample a segment, let the protocol read
    it and say what comes next, append, repeat; then score."""

    def __init__(
        self,
        engine: Engine,
        protocol: RolloutProtocol,
        tools: dict[str, Tool],
        rewards: Scorer,
        cfg: LoopConfig,
        truncate: Callable[[str, int], str],
    ) -> None:
        self.engine, self.protocol, self.tools = engine, protocol, tools
        self.rewards, self.cfg, self.truncate = rewards, cfg, truncate
        self.limits = ToolLimits(cfg.tool_timeout_s, cfg.max_tool_output_tokens, cfg.max_tool_calls)
        self.weight_version = 0
        self.slots = {  # a tool's max_concurrency holds for all trajectories of this worker
            name: asyncio.Semaphore(n)
            for name, tool in tools.items()
            if (n := getattr(tool, "max_concurrency", None))
        }

    async def run_many(self, episodes: list[Episode], sampler: Sampler) -> list[Trajectory]:
        return await gather_all(self.run(ep, sampler) for ep in episodes)

    async def run(self, ep: Episode, sampler: Sampler) -> Trajectory:
        offered = self.tools if ep.tools is None else {n: self.tools[n] for n in ep.tools}
        tools = ToolCaller(offered, uuid.uuid4().hex, self.limits, self.truncate, self.slots)
        run = self.protocol.start(ep, tools)
        traj = Trajectory.from_prompt(ep.prompt_id, run.prompt_ids)
        final_text = None
        try:
            for turn_no in range(self.cfg.max_turns):
                room = self.cfg.max_total_tokens - len(traj.token_ids)
                if room <= 0:
                    break
                turn = await self._sample(traj, run, sampler, ep.seed, turn_no, room)
                read = run.read(turn, traj.token_ids[turn.start : turn.end])
                if turn.finish_reason != "stop":
                    break  # cut off by the token budget: no answer
                last = turn_no == self.cfg.max_turns - 1
                step = await run.advance(turn, read, last)
                turn.reward += step.reward
                if step.append is None:
                    final_text = step.final_text
                    break
                if last or len(traj.token_ids) + len(step.append) >= self.cfg.max_total_tokens:
                    break  # no room left for what comes next and a reply: no answer
                traj.append_context(step.append)
        except ToolInfraError as e:
            traj.infra_error = f"{type(e).__name__}: {e}"
        finally:
            await asyncio.gather(run.close(), tools.close())
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
        traj.reward = score.outcome
        credits = score.per_turn or (0.0,) * len(traj.turns)  # () when no turn is credited
        for turn, credit in zip(traj.turns, credits, strict=True):
            turn.reward += credit
        traj.info["reward_components"] = score.components
        traj.info["reward_weights"] = score.weights
        traj.info["reward_failures"] = score.model_failures

    async def _sample(
        self,
        traj: Trajectory,
        run: Run,
        sampler: Sampler,
        seed: int | None,
        turn_no: int,
        room: int,
    ) -> Turn:
        """Sample one segment; it ends at a stop id, where the protocol's pause says, or at
        the budget ("length")."""
        sampling = sampler.for_turn(seed, turn_no, run.stop_token_ids)
        if sampling.max_new_tokens > room:
            sampling = dataclasses.replace(sampling, max_new_tokens=room)
        version = self.weight_version
        pause = run.pause()
        if pause is None:  # the engine's plain path: nothing streamed
            gen = await self.engine.generate(list(traj.token_ids), sampling)
        else:
            gen = await self.engine.generate(list(traj.token_ids), sampling, pause)
        start, end = traj.append_sampled(gen.token_ids, gen.logprobs)
        finish = "stop" if gen.finish_reason == "stop" and gen.token_ids else "length"
        turn = Turn(start, end, version, finish, cached_tokens=gen.cached_tokens)
        traj.turns.append(turn)
        return turn
