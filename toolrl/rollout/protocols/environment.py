"""Environment turns: an environment answers each of the model's final turns as the next user
message (a user simulator, a game, a verifier), with a reward for the turn, until it is done.

Tools still work as in chat tool turns: a turn that calls tools gets the template's tool turn.
A turn without calls goes to the environment:

    sampled turn ──► calls? ──► run them, append the tool turn, sample again (as `chat`)
                 └─► no calls ──► env.step(text) ──► reward credited to this turn
                                     done ──► the end; the turn's text is the final text
                                     else ──► append the observation as a user turn, again

An environment is any class named by `_target_`, built once per trajectory:

    class Env:
        def reset(self, row: dict) -> str | None: ...   # an opening user message, or None
        def step(self, text: str) -> EnvStep: ...       # may be `async def`

    protocol:                                           # conf/protocol/environment.yaml
      _target_: toolrl.rollout.protocols.environment.EnvironmentTurns
      environment: {_target_: toolrl.envs.guess.GuessNumber}

An environment that raises is the environment's fault, not the model's: the trajectory
becomes an infrastructure fault (kept out of the loss). The observation is plain text: no
control token forms in it.

    python -m pytest tests/unit/test_protocols.py -k environment
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from toolrl.rollout.chat import ChatBuilder
from toolrl.rollout.parsers.base import ParsedTurn
from toolrl.rollout.parsers.reasoning import ReasoningStep
from toolrl.rollout.protocols.base import Advance, ToolCaller, offered_schemas
from toolrl.rollout.protocols.chat import ChatRun, ChatToolTurns
from toolrl.rollout.trajectory import Turn
from toolrl.tools.base import ToolInfraError

if TYPE_CHECKING:
    from toolrl.rollout.agent_loop import Episode


@dataclass
class EnvStep:
    observation: str  # the next user message (ignored when done)
    reward: float = 0.0  # credited to the turn just taken
    done: bool = False


class Environment(Protocol):
    def reset(self, row: dict[str, Any]) -> str | None: ...

    def step(self, text: str) -> Any: ...  # EnvStep, or an awaitable of one


class EnvironmentTurns(ChatToolTurns):
    """Chat tool turns, with an environment answering each turn that calls nothing."""

    def __init__(
        self,
        chat: ChatBuilder,
        parser: Callable[[str], ParsedTurn],
        environment: Mapping[str, Any],
        reasoning: ReasoningStep | None = None,
    ) -> None:
        super().__init__(chat, parser, reasoning)
        chat.check_user_turns()  # a template that cannot append user turns fails here, not later
        from toolrl.config import instantiate, resolve_target

        resolve_target("protocol.environment", dict(environment))
        self.make_env = lambda: instantiate(dict(environment))

    def start(self, ep: Episode, tools: ToolCaller) -> EnvironmentRun:
        env = self.make_env()
        try:
            opening = env.reset(dict(ep.row))
        except Exception as e:
            raise ToolInfraError(f"environment reset failed: {type(e).__name__}: {e}") from e
        messages = list(ep.messages)
        if opening is not None:
            messages.append({"role": "user", "content": str(opening)})
        prompt = self.chat.prompt_ids(messages, offered_schemas(self.schemas, ep.tools))
        run = EnvironmentRun(self, tools, prompt)
        run.env = env
        return run


class EnvironmentRun(ChatRun):
    env: Environment

    async def answered(self, turn: Turn, parsed: ParsedTurn, last: bool) -> Advance:
        step = await self._step(parsed.content)
        if step.done or last:
            return Advance(final_text=parsed.content, reward=step.reward)
        turn.observation = step.observation
        return Advance(
            append=self.protocol.chat.user_turn_ids(step.observation), reward=step.reward
        )

    async def _step(self, text: str) -> EnvStep:
        try:
            step = self.env.step(text)
            if inspect.isawaitable(step):
                step = await step
        except Exception as e:  # the environment's bug, not the model's
            raise ToolInfraError(f"environment step failed: {type(e).__name__}: {e}") from e
        if not isinstance(step, EnvStep):
            raise ToolInfraError(f"environment step returned {type(step).__name__}, not EnvStep")
        return step
