"""The reward runner: pool scoring off the event loop, time limits, and whose fault a failure is.

One runner (one pool of two spawned workers) serves the whole module; the row's "do" column
steers the fixture reward (tests/unit/reward_fixtures.py). Keep it fast: --durations.

    python -m pytest tests/unit/test_reward_runner.py --durations=5
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from toolrl.rewards.base import RewardInfraError, Scored
from toolrl.rewards.combine import RewardStack
from toolrl.rewards.runner import RewardRunner


@pytest.fixture(scope="module")
def runner():
    stack = RewardStack(
        {
            "behave": {"_target_": "tests.unit.reward_fixtures.behave", "timeout_s": 3.0},
            "judge": {
                "_target_": "tests.unit.reward_fixtures.async_behave",
                "weight": 0.5,
                "timeout_s": 0.5,
            },
        }
    )
    r = RewardRunner(stack, max_workers=2)
    yield r
    r.close()


def x(final_text: str | None = "four", **row) -> Scored:
    return Scored(messages=[], final_text=final_text, row=row)


def score(runner: RewardRunner, item: Scored):
    return asyncio.run(runner.score(item))


def test_sync_and_async_components_combine(runner):
    s = score(runner, x("four"))
    # behave 1.0 * 1.0 + judge 0.5 * (chars 4 + one 1)
    assert s.total == pytest.approx(3.5)
    assert s.components == {"behave": 1.0, "judge/chars": 4.0, "judge/one": 1.0}
    assert s.failed == ()
    m = score(runner, x("", do="map"))
    # behave {a: .25, b: .5} -> 0.75; judge 0.5 * (0 + 1)
    assert m.total == pytest.approx(1.25)
    assert m.components == {"behave/a": 0.25, "behave/b": 0.5, "judge/chars": 0.0, "judge/one": 1.0}


def test_sync_rewards_run_in_a_worker_main_thread(runner):
    # SIGALRM timeouts (math-verify) need it; pid differs: not run in this process
    assert score(runner, x(do="main_thread")).components["behave"] == 1.0
    assert score(runner, x(do="pid")).components["behave"] != float(os.getpid())


def test_slow_reward_blocks_neither_loop_nor_other_scorings(runner):
    async def main():
        done, ticks = [], 0

        async def one(name, item):
            await runner.score(item)
            done.append((name, time.monotonic() - t0))

        async def ticker():
            nonlocal ticks
            while len(done) < 2:
                ticks += 1
                await asyncio.sleep(0.05)

        t0 = time.monotonic()
        await asyncio.gather(one("slow", x(do="sleep", seconds=2.0)), one("fast", x()), ticker())
        return done, ticks

    done, ticks = asyncio.run(main())
    assert [name for name, _ in done] == ["fast", "slow"]
    assert done[0][1] < 1.0 and done[1][1] >= 2.0
    assert ticks >= 25  # ~40 ticks of 50 ms in 2 s: the loop kept running


def test_reward_that_raises_scores_zero_and_is_counted(runner):
    for do in ("raise", "nan"):  # a non-finite value counts as a failed reward too
        s = score(runner, x("four", do=do))
        assert s.components["behave"] == 0.0
        assert s.failed == ("behave",) and s.model_failures == 1
        assert s.total == pytest.approx(0.5 * 5)  # the async judge still counts
    a = score(runner, x("four", **{"async": "raise"}))
    assert a.failed == ("judge",) and a.total == pytest.approx(1.0)


def test_async_reward_past_its_limit_scores_zero(runner):
    t0 = time.monotonic()
    s = score(runner, x("four", **{"async": "hang"}))
    assert time.monotonic() - t0 < 2.0  # the judge's limit is 0.5 s
    assert s.failed == ("judge",) and s.components["judge"] == 0.0 and s.total == 1.0


def test_hung_worker_is_killed_and_the_next_call_works(runner, tmp_path):
    pidfile = tmp_path / "pid"
    t0 = time.monotonic()
    s = score(runner, x(do="hang", pidfile=str(pidfile)))
    assert 3.0 <= time.monotonic() - t0 < 5.0
    assert s.failed == ("behave",) and s.components["behave"] == 0.0
    assert _gone(int(pidfile.read_text()))
    assert score(runner, x()).failed == ()


def test_infra_error_propagates(runner):
    with pytest.raises(RewardInfraError, match="judge is down"):
        score(runner, x(do="infra"))
    with pytest.raises(RewardInfraError, match="judge returned 503"):
        score(runner, x(**{"async": "infra"}))
    assert score(runner, x()).total == pytest.approx(3.5)


def test_dead_worker_is_an_infra_error_and_the_pool_is_replaced(runner):
    with pytest.raises(RewardInfraError, match="pool worker died"):
        score(runner, x(do="die"))
    assert score(runner, x()).total == pytest.approx(3.5)


def test_math_answer_in_the_pool():
    stack = RewardStack(
        [{"_target_": "toolrl.rewards.math.math_answer", "name": "math", "verify_timeout_s": 1}]
    )
    with RewardRunnerContext(stack) as r:
        right = asyncio.run(r.score(x("so \\boxed{\\frac{1}{2}}", answer="0.5")))
        wrong = asyncio.run(r.score(x("so \\boxed{3}", answer="0.5")))
        t0 = time.monotonic()
        huge = asyncio.run(r.score(x("\\boxed{10^{10^{10}}}", answer="5")))
        elapsed = time.monotonic() - t0
    assert (right.total, right.failed) == (1.0, ())  # SIGALRM worked in the worker
    assert (wrong.total, wrong.failed) == (0.0, ())
    assert huge.total == 0.0 and elapsed < 5.0  # math-verify's own limit (1 s) stopped it


def test_bad_runner_settings():
    stack = RewardStack([{"_target_": "tests.unit.reward_fixtures.constant"}])
    with pytest.raises(ValueError, match="fork"):
        RewardRunner(stack, start_method="fork")
    with pytest.raises(ValueError, match="max_workers"):
        RewardRunner(stack, max_workers=0)


class RewardRunnerContext:
    """A runner closed on exit, for tests that need a stack of their own."""

    def __init__(self, stack: RewardStack) -> None:
        self.runner = RewardRunner(stack, max_workers=1)

    def __enter__(self) -> RewardRunner:
        return self.runner

    def __exit__(self, *exc: object) -> None:
        self.runner.close()


def _gone(pid: int, wait_s: float = 3.0) -> bool:
    """True once `pid` no longer runs (exited or a zombie waiting to be reaped)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        status = Path(f"/proc/{pid}/status")
        try:
            if "State:\tZ" in status.read_text():
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False
