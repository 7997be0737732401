"""The rollout group's router: which engine takes the next prompt group, and when.

- A prompt's whole group (its rollout.n samples) goes to one engine, so the shared prompt is
  prefilled once there and served from its prefix cache for the others.
- A trajectory's later turns stay on the engine of its first (the agent loop runs the whole
  trajectory inside one worker), where its own prefix is cached.
- The next group goes to the engine with the fewest outstanding tokens (the budgets of the
  groups it holds and has not finished), and only while that engine holds fewer than
  `max_inflight` trajectories; otherwise the router waits for a group to finish. So engines
  that finish early take more work instead of idling behind a static split.
- The groups an engine takes in one pass go to it in one call, so its requests arrive
  together: with one engine and room for the batch, a rollout is one call, and the engine
  batches its requests the same way in every run (vLLM's numerics depend on the batch).

Pure bookkeeping (no Ray); `toolrl.workers.rollout.RolloutGroup` drives it. Run
`python -m pytest tests/unit/test_router.py`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Group:
    """The episodes of one prompt, with where they sit in the caller's list."""

    positions: list[int]
    episodes: list[Any]
    tokens: int  # budget estimate: prompt tokens plus the tokens each sample may add


def prompt_groups(
    episodes: Sequence[Any], budget: int, prompt_tokens: Callable[[Any], int]
) -> list[Group]:
    """Episodes grouped by prompt_id, groups in order of first appearance."""
    by_prompt: dict[Any, Group] = {}
    for i, ep in enumerate(episodes):
        g = by_prompt.setdefault(ep.prompt_id, Group([], [], 0))
        g.positions.append(i)
        g.episodes.append(ep)
        g.tokens += prompt_tokens(ep) + budget
    return list(by_prompt.values())


def approx_prompt_tokens(episode: Any) -> int:
    """A tokenizer-free estimate of a prompt's length (about 4 characters a token)."""
    return len(json.dumps(episode.messages, default=str)) // 4


class Router:
    """Outstanding tokens and trajectories per engine; picks the least loaded one."""

    def __init__(self, num_engines: int, max_inflight: int) -> None:
        self.tokens = [0] * num_engines
        self.inflight = [0] * num_engines
        self.max_inflight = max_inflight

    def pick(self, group: Group) -> int | None:
        """The least loaded engine with room for `group` (booked there), or None when every
        engine is full and should finish something first. An idle engine always has room,
        however large the group, so nothing waits forever."""
        size = len(group.episodes)
        room = [
            e
            for e in range(len(self.tokens))
            if not self.inflight[e] or self.inflight[e] + size <= self.max_inflight
        ]
        if not room:
            return None
        engine = min(room, key=lambda e: (self.tokens[e], e))
        self.tokens[engine] += group.tokens
        self.inflight[engine] += size
        return engine

    def done(self, engine: int, group: Group) -> None:
        self.tokens[engine] -= group.tokens
        self.inflight[engine] -= len(group.episodes)


def schedule(
    groups: list[Group],
    router: Router,
    submit: Callable[[int, list[Group]], Any],
    wait_one: Callable[[list[Any]], Any],
) -> Iterator[tuple[list[Group], Any]]:
    """Submit every group through the router and yield (groups, their finished handle) as
    each call finishes. submit(engine, groups) starts one call with those groups and returns
    a handle; wait_one(handles) blocks until one of them is finished and returns it."""
    pending = list(groups)
    running: dict[Any, tuple[int, list[Group]]] = {}
    while pending or running:
        taken: dict[int, list[Group]] = {}
        while pending:
            engine = router.pick(pending[0])
            if engine is None:
                break
            taken.setdefault(engine, []).append(pending.pop(0))
        for engine, batch in taken.items():
            running[submit(engine, batch)] = (engine, batch)
        handle = wait_one(list(running))
        engine, batch = running.pop(handle)
        for group in batch:
            router.done(engine, group)
        yield batch, handle
