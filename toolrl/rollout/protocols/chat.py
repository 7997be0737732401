"""Chat tool turns: the model calls tools in its assistant turn; the answers come back as the
chat template's tool turn, and the next assistant turn starts after them.

    sampled turn (ends with end-of-turn id) ──► strip reasoning ──► parse calls
        no calls, no errors ──► the final answer: the trajectory ends
        calls ──► run them (ToolCaller) ──► append the template's tool turn (mask 0) ──► again

Calls written inside reasoning are never run; the turn counts them (`Turn.reasoning_calls`).
The ids appended are what the model's own template renders (toolrl/rollout/chat.py).

    protocol: {_target_: toolrl.rollout.protocols.chat.ChatToolTurns}     # conf/protocol/chat.yaml
    python -m pytest tests/unit/test_agent_loop.py
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from toolrl.rollout.chat import ChatBuilder
from toolrl.rollout.parsers.base import ParsedTurn
from toolrl.rollout.parsers.reasoning import NoReasoning, ReasoningStep
from toolrl.rollout.protocols.base import Advance, ToolCaller, offered_schemas
from toolrl.rollout.sampler import Pause
from toolrl.rollout.trajectory import ToolResult, Turn

if TYPE_CHECKING:
    from toolrl.rollout.agent_loop import Episode


class ChatToolTurns:
    """Tool calls parsed from chat turns, answered in the template's tool turns."""

    def __init__(
        self,
        chat: ChatBuilder,
        parser: Callable[[str], ParsedTurn],
        reasoning: ReasoningStep | None = None,
    ) -> None:
        self.chat, self.parser = chat, parser
        self.reasoning = reasoning or NoReasoning()
        self.schemas = {s["function"]["name"]: s for s in chat.tools}
        # Every turn continues the same assistant header (the prompt's and each tool turn's),
        # so whether the template opens a reasoning block there is decided once.
        self.opens_reasoning = self.reasoning.opened_by(chat.generation_prompt)

    def start(self, ep: Episode, tools: ToolCaller) -> ChatRun:
        prompt = self.chat.prompt_ids(ep.messages, offered_schemas(self.schemas, ep.tools))
        return ChatRun(self, tools, prompt)

    def read(self, turn: Turn, ids: list[int]) -> ParsedTurn:
        """Parse a sampled turn into `turn` (calls, errors, content, calls in reasoning)."""
        split = self.reasoning(self.chat.decode(ids), self.opens_reasoning)
        parsed = self.parser(split.text)
        turn.calls, turn.parse_errors, turn.content = parsed.calls, parsed.errors, parsed.content
        if split.reasoning:  # well-formed calls only: a thought may just mention the format
            turn.reasoning_calls = len(self.parser(split.reasoning).calls)
        return parsed


class ChatRun:
    def __init__(self, protocol: ChatToolTurns, tools: ToolCaller, prompt_ids: list[int]) -> None:
        self.protocol, self.tools, self.prompt_ids = protocol, tools, prompt_ids
        self.stop_token_ids = protocol.chat.stop_token_ids

    def pause(self) -> Pause | None:
        return None  # a turn ends at the end-of-turn id

    def read(self, turn: Turn, ids: list[int]) -> ParsedTurn:
        return self.protocol.read(turn, ids)

    async def advance(self, turn: Turn, parsed: ParsedTurn, last: bool) -> Advance:
        if not parsed.calls and not parsed.errors:
            return await self.answered(turn, parsed, last)
        if last:
            return Advance()  # out of turns while still calling tools: no answer
        turn.results = await self.run_calls(parsed)
        return Advance(append=self.protocol.chat.tool_turn_ids(turn.results))

    async def answered(self, turn: Turn, parsed: ParsedTurn, last: bool) -> Advance:
        """A turn that calls nothing: here the final answer (environments answer it)."""
        return Advance(final_text=parsed.content)

    async def run_calls(self, parsed: ParsedTurn) -> list[ToolResult]:
        """The calls' answers, then one error answer per parse error (no call id)."""
        results = await self.tools.run(parsed.calls)
        return results + [ToolResult("error", f"Error: {e}", ok=False) for e in parsed.errors]

    async def close(self) -> None:
        return None  # the loop closes the tool sessions
