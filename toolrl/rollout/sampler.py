"""Sampling settings and the engine contract the agent loop depends on.

The sampler is a `_target_` in `conf/rollout/`: swap it to change how turns are sampled
(temperature, top-p, stop ids, per-turn budget) without touching the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Sampling:
    """Settings for one engine call (one assistant turn)."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop_token_ids: tuple[int, ...] = ()  # end-of-turn ids; the stop id is kept in the output
    seed: int | None = None


@dataclass
class Generation:
    """What the engine sampled for one turn: ids exactly as sampled, with their logprobs."""

    token_ids: list[int]
    logprobs: list[float]  # log p(token_ids[i] | context), same length as token_ids
    finish_reason: str  # "stop" or "length"
    # context tokens the engine read from its prefix cache: a statistic, not what was sampled
    cached_tokens: int = field(default=0, compare=False)


Pause = Callable[[list[int]], int | None]
"""Ends a generation early, at a point the caller finds in the ids as they stream back.

Called with ALL ids generated so far in this request (not the context), once after each
chunk the engine streams back. Returns None to keep going, or n (1 <= n <= len(ids)) to
end the generation keeping only the first n ids (and their logprobs), with finish_reason
"stop"; the kept ids are exactly the first n sampled ids, never re-tokenized. The list is
the engine's own: read it, do not modify or keep it. A pause may keep state between calls
(the list only grows), so make a fresh one per request.
`toolrl.rollout.pause.stop_at_texts` makes one that stops at a closing tag.
"""


class Engine(Protocol):
    """Token ids in, token ids out. Implemented by `toolrl.rollout.engine.VLLMEngine`.

    With `pause`, generation also ends where `pause` says (see `Pause`); stop ids still
    end it too, whichever comes first.
    """

    async def generate(
        self, token_ids: list[int], sampling: Sampling, pause: Pause | None = None
    ) -> Generation: ...


@dataclass
class Sampler:
    """Turns the YAML sampler section into per-turn `Sampling`, with one seed per (sample, turn).

    Seeding each turn from (base seed, sample, turn) makes evaluation repeatable while
    keeping every sample different.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    stop_token_ids: list[int] = field(default_factory=list)

    def for_turn(self, seed: int | None, turn: int, stop_token_ids: list[int]) -> Sampling:
        stops = tuple(dict.fromkeys([*self.stop_token_ids, *stop_token_ids]))
        turn_seed = None if seed is None else (seed * 1_000_003 + turn) % (2**31 - 1)
        return Sampling(self.temperature, self.top_p, self.max_new_tokens, stops, turn_seed)
