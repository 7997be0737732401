"""What runs inside a reward pool worker: kept tiny so a spawned worker starts fast.

A `ProcessPoolExecutor` worker calls these in its main thread, which is what lets rewards
that time themselves out with SIGALRM (math-verify) work there; they fail in any other
thread. Every outcome of the reward comes back as a value, never as an exception, so that
an exception the pool itself raises in the parent (a dead worker, an unpicklable input)
is always an infrastructure fault and never confused with a reward that raised.

    python -m pytest tests/unit/test_reward_runner.py
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any

from toolrl.rewards.base import RewardInfraError, Scored, normalize_value

# (kind, payload): ("ok", value), ("raised", "TypeError: ..."), ("infra", message)
Outcome = tuple[str, Any]


def init_worker(modules: Sequence[str]) -> None:
    """Import the rewards' modules once per worker, before it takes work, so that an import
    (sympy takes seconds) is not charged to the first reward's time limit."""
    for name in modules:
        importlib.import_module(name)


def ready() -> int:
    """A no-op the runner waits on until every worker has started."""
    return os.getpid()


def call_reward(fn: Callable[[Scored], Any], x: Scored, name: str) -> Outcome:
    """Score `x` with `fn`; report what happened as a value (see the module docstring)."""
    try:
        return "ok", normalize_value(name, fn(x), x.num_turns)
    except RewardInfraError as e:
        return "infra", f"{type(e).__name__}: {e}"
    except (Exception, SystemExit) as e:  # SystemExit too: sys.exit() must not kill the pool
        return "raised", f"{type(e).__name__}: {e}"
