"""Rewards the reward tests run in a spawned pool: they must be importable, so they live here.

`behave` does what the row's "do" column says, so one stack (and one pool) serves every
runner test. Used by tests/unit/test_reward_runner.py and tests/unit/test_rewards.py.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

from toolrl.rewards.base import RewardInfraError, Scored


def behave(x: Scored) -> float | dict[str, float]:
    """Sync reward steered by x.row["do"]: ok, sleep, map, raise, nan, hang, infra, die, pid."""
    do = x.row.get("do", "ok")
    if do == "sleep":
        time.sleep(x.row["seconds"])
    elif do == "map":
        return {"a": 0.25, "b": 0.5}
    elif do == "raise":
        raise ZeroDivisionError("the model's answer broke the checker")
    elif do == "nan":
        return float("nan")
    elif do == "hang":
        Path(x.row["pidfile"]).write_text(str(os.getpid()))
        while True:  # busy, like sympy on a huge power: no sleep a signal could cut short
            pass
    elif do == "infra":
        raise RewardInfraError("judge is down")
    elif do == "die":
        os._exit(3)
    elif do == "pid":
        return float(os.getpid())
    elif do == "main_thread":
        return float(threading.current_thread() is threading.main_thread())
    return 1.0


async def async_behave(x: Scored) -> dict[str, float]:
    """Async reward steered by x.row["async"]: ok (a mapping), hang, raise, infra."""
    do = x.row.get("async", "ok")
    if do == "hang":
        await asyncio.sleep(3600)
    elif do == "raise":
        raise KeyError("missing")
    elif do == "infra":
        raise RewardInfraError("judge returned 503")
    await asyncio.sleep(0)
    return {"chars": float(len(x.final_text or "")), "one": 1.0}


class AsyncJudge:
    """An object reward with an async __call__."""

    def __init__(self, score: float) -> None:
        self.score = score

    async def __call__(self, x: Scored) -> float:
        return self.score


def constant(x: Scored, value: float = 1.0) -> float:
    return value
