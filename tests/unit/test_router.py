"""The rollout group's router: groups never split, least-loaded choice, in-flight cap, and a
simulated run where engines of different speeds finish groups out of order.

Run `python -m pytest tests/unit/test_router.py`.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from typing import Any

from toolrl.workers.router import Group, Router, prompt_groups, schedule


@dataclass
class Ep:
    prompt_id: int
    messages: list[dict[str, Any]] = field(default_factory=list)


def _groups(sizes: list[int], tokens: list[int]) -> list[Group]:
    eps = [Ep(pid) for pid, n in enumerate(sizes) for _ in range(n)]
    return prompt_groups(eps, 0, lambda e: tokens[e.prompt_id])


def test_episodes_group_by_prompt_in_order_of_first_appearance() -> None:
    eps = [Ep(3), Ep(1), Ep(3), Ep(1), Ep(7)]
    groups = prompt_groups(eps, budget=10, prompt_tokens=lambda e: e.prompt_id)
    assert [g.positions for g in groups] == [[0, 2], [1, 3], [4]]
    assert [g.tokens for g in groups] == [2 * 13, 2 * 11, 17]


def test_the_least_loaded_engine_takes_the_next_group() -> None:
    router = Router(3, max_inflight=100)
    big, small = _groups([4, 4], [500, 10])
    assert router.pick(big) == 0
    assert router.pick(small) == 1  # engine 0 holds 2000 tokens, 1 and 2 none: lowest index
    assert router.pick(small) == 2
    assert router.pick(small) == 1  # engines 1 and 2 tie at 40 tokens: the lower index
    router.done(0, big)
    assert router.pick(small) == 0  # engine 0 is empty again


def test_a_full_engine_makes_the_router_wait_but_an_idle_one_takes_any_group() -> None:
    router = Router(1, max_inflight=8)
    (g,) = _groups([6], [1])
    assert router.pick(g) == 0
    assert router.pick(g) is None  # 6 + 6 > 8: wait for something to finish
    router.done(0, g)
    (huge,) = _groups([20], [1])
    assert router.pick(huge) == 0  # larger than the cap, but the engine is idle


def _simulate(num_engines: int, speed: list[float], groups: list[Group], cap: int):
    """Engines work in parallel; a group takes tokens / speed seconds once submitted (engines
    batch everything in flight). Returns (assignments, completion order, peak in flight)."""
    clock, events, assigned, peak = [0.0], [], {}, [0] * num_engines
    inflight = [0] * num_engines

    calls = {}

    def submit(engine: int, batch: list[Group]) -> int:
        handle = len(calls)
        calls[handle] = (engine, batch)
        for group in batch:  # each group finishes on its own clock; the call with its last
            assigned[id(group)] = (engine, group)
        inflight[engine] += sum(len(g.episodes) for g in batch)
        peak[engine] = max(peak[engine], inflight[engine])
        tokens = sum(g.tokens for g in batch)
        heapq.heappush(events, (clock[0] + tokens / speed[engine], handle))
        return handle

    def wait_one(handles: list[int]) -> int:
        t, handle = heapq.heappop(events)
        assert handle in handles
        clock[0] = t
        engine, batch = calls[handle]
        inflight[engine] -= sum(len(g.episodes) for g in batch)
        return handle

    router = Router(num_engines, cap)
    done = [g for batch, _ in schedule(groups, router, submit, wait_one) for g in batch]
    assert router.tokens == [0] * num_engines and router.inflight == [0] * num_engines
    return assigned, done, peak, clock[0], calls


def test_schedule_never_splits_a_group_and_keeps_engines_under_the_cap() -> None:
    rng = random.Random(0)
    sizes = [8] * 40
    groups = _groups(sizes, [rng.randint(50, 400) for _ in sizes])
    assigned, done, peak, _, _ = _simulate(3, [1.0, 1.0, 4.0], groups, cap=24)
    assert sorted(id(g) for g in done) == sorted(id(g) for g in groups)  # each exactly once
    for _, group in assigned.values():
        assert len(group.episodes) == 8 and len({e.prompt_id for e in group.episodes}) == 1
    assert max(peak) <= 24


def test_one_engine_with_room_gets_the_whole_rollout_in_one_call() -> None:
    """Its requests then arrive together, as in every run: vLLM batches them the same way."""
    groups = _groups([8] * 16, [100] * 16)
    _, done, _, _, calls = _simulate(1, [1.0], groups, cap=256)
    assert len(calls) == 1 and calls[0][1] == groups and done == groups
    _, _, _, _, calls = _simulate(1, [1.0], groups, cap=64)  # 8 groups fit, then 1 at a time
    assert [len(batch) for _, batch in calls.values()][:1] == [8]


def test_a_faster_engine_takes_more_groups_than_a_static_split_would_give_it() -> None:
    rng = random.Random(1)
    sizes = [4] * 60
    groups = _groups(sizes, [rng.randint(50, 400) for _ in sizes])
    assigned, _, _, makespan, _ = _simulate(2, [1.0, 3.0], groups, cap=8)
    fast = sum(1 for engine, _ in assigned.values() if engine == 1)
    assert fast > 0.65 * len(groups)  # a static split gives it half
    total = sum(g.tokens for g in groups)
    # close to the ideal of both engines busy until the end: total / (1 + 3)
    assert makespan < 1.25 * total / 4.0
