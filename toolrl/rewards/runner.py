"""Score trajectories with a `RewardStack` without blocking the caller's event loop.

    runner = RewardRunner(stack, max_workers=2)
    score = await runner.score(x)          # Score(total, components, failed)
    runner.close()

Where each reward runs: `async def` rewards are awaited in the caller's loop; plain ones run
in a process pool (spawn or forkserver, never fork: the caller has threads, a vLLM engine),
in the worker's main thread, so SIGALRM-based timeouts (math-verify) work there.

Whose fault decides the cost:

    reward raises, returns a non-number, or passes timeout_s .... model's output: that
                                                                 component scores 0 and is
                                                                 listed in Score.failed
    reward raises RewardInfraError, a worker dies, the pool ..... not the model: score()
    breaks or cannot start                                       raises RewardInfraError

A worker stuck past its limit cannot be told to stop, and killing it alone would break the
pool under every other scoring in it. So its pool is retired instead: new work goes to a
fresh pool at once, and the old one is killed (SIGKILL) as soon as its other scorings have
finished; those finish normally. At most `max_workers` sync rewards run at once, so a
reward's clock starts when it starts running, not while it waits for a free worker.

    python -m pytest tests/unit/test_reward_runner.py
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

from toolrl.rewards import worker
from toolrl.rewards.base import RewardInfraError, Scored, normalize_value
from toolrl.rewards.combine import Component, RewardStack, Score

log = logging.getLogger(__name__)

_FAILED = None  # a component's value when it failed on the model's output


@dataclass
class _Pool:
    """One process pool and the scorings running in it."""

    executor: ProcessPoolExecutor
    started: list[Future] = field(default_factory=list)  # one `ready` per worker
    inflight: int = 0
    retired: bool = False  # takes no new work; killed once inflight reaches 0


class RewardRunner:
    """Scores one `Scored` at a time per call; many calls may run concurrently."""

    def __init__(
        self,
        stack: RewardStack,
        max_workers: int = 2,
        start_method: str = "spawn",
        startup_timeout_s: float = 120.0,
    ) -> None:
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(f"start_method must be 'spawn' or 'forkserver', not {start_method!r}")
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        self.stack, self.max_workers = stack, max_workers
        self._ctx = multiprocessing.get_context(start_method)
        self._startup_timeout_s = startup_timeout_s
        self._modules = sorted({_module_of(c.fn) for c in stack.components if not c.is_async})
        self._pool: _Pool | None = None
        self._alive: list[_Pool] = []  # the current pool and retired ones not yet killed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None

    async def score(self, x: Scored) -> Score:
        """Score `x` with every component; RewardInfraError when one failed outside the model."""
        results = await asyncio.gather(
            *(self._run(c, x) for c in self.stack.components), return_exceptions=True
        )
        # gather waits for every component, so nothing is left running when this raises
        for r in results:
            if isinstance(r, BaseException):
                raise r
        values = {c.name: r for c, r in zip(self.stack.components, results, strict=True)}
        return self.stack.combine(values, x.num_turns)

    def close(self) -> None:
        """Kill every worker. The runner may be used again: a new pool starts on demand."""
        for pool in list(self._alive):
            self._kill(pool)
        self._pool = None

    async def __aenter__(self) -> RewardRunner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def _run(self, c: Component, x: Scored) -> Any:
        if c.is_async:
            return await self._run_async(c, x)
        kind, payload = await self._run_in_pool(c, x)
        if kind == "infra":
            raise RewardInfraError(f"reward {c.name!r}: {payload}")
        if kind == "raised":
            log.warning("reward %r failed on the model's output: %s", c.name, payload)
            return _FAILED
        if kind == "timeout":
            log.warning("reward %r passed its %.1f s limit; worker killed", c.name, c.timeout_s)
            return _FAILED
        return payload

    async def _run_async(self, c: Component, x: Scored) -> Any:
        try:
            value = await asyncio.wait_for(c.fn(x), c.timeout_s)
            return normalize_value(c.name, value, x.num_turns)
        except RewardInfraError:
            raise
        except Exception as e:  # TimeoutError included: the model's output took too long
            log.warning("reward %r failed on the model's output: %r", c.name, e)
            return _FAILED

    async def _run_in_pool(self, c: Component, x: Scored) -> worker.Outcome:
        async with self._semaphore():
            pool = await self._ready_pool()
            pool.inflight += 1
            try:
                fut = pool.executor.submit(worker.call_reward, c.fn, x, c.name)
                return await asyncio.wait_for(asyncio.wrap_future(fut), c.timeout_s)
            except TimeoutError:
                self._retire(pool)  # its worker is stuck; killed once the pool is idle
                return "timeout", None
            except BrokenProcessPool as e:
                self._retire(pool)
                raise RewardInfraError(f"reward {c.name!r}: pool worker died: {e}") from e
            except Exception as e:  # the pool itself failed (e.g. `x` does not pickle)
                raise RewardInfraError(f"reward {c.name!r}: {type(e).__name__}: {e}") from e
            finally:
                pool.inflight -= 1
                if pool.retired and pool.inflight == 0:
                    self._kill(pool)

    def _semaphore(self) -> asyncio.Semaphore:
        # asyncio primitives belong to one loop; a new loop (asyncio.run per call) gets new ones
        loop = asyncio.get_running_loop()
        if self._slots is None or self._loop is not loop:
            self._loop, self._slots = loop, asyncio.Semaphore(self.max_workers)
        return self._slots

    async def _ready_pool(self) -> _Pool:
        """The current pool, started if need be, once all its workers are up."""
        for _ in range(3):  # another scoring may retire the pool while this one waits
            if self._pool is None:
                # Starting processes blocks the loop for the few ms a spawn takes, once per
                # pool; creating it without awaiting keeps concurrent callers on one pool.
                self._pool = self._new_pool()
            pool = self._pool
            try:
                if not all(f.done() for f in pool.started):
                    waits = asyncio.gather(*(asyncio.wrap_future(f) for f in pool.started))
                    await asyncio.wait_for(waits, self._startup_timeout_s)
                for f in pool.started:
                    f.result()
            except Exception as e:
                self._retire(pool)
                raise RewardInfraError(f"reward pool did not start: {type(e).__name__}: {e}") from e
            if not pool.retired:
                return pool
        raise RewardInfraError("reward pool was replaced three times while starting")

    def _new_pool(self) -> _Pool:
        executor = ProcessPoolExecutor(
            self.max_workers, self._ctx, initializer=worker.init_worker, initargs=(self._modules,)
        )
        # One submission per worker starts them all now (the executor spawns on demand).
        pool = _Pool(executor, [executor.submit(worker.ready) for _ in range(self.max_workers)])
        self._alive.append(pool)
        return pool

    def _retire(self, pool: _Pool) -> None:
        pool.retired = True
        if self._pool is pool:
            self._pool = None
        if pool.inflight == 0:
            self._kill(pool)

    def _kill(self, pool: _Pool) -> None:
        # SIGKILL, since a worker stuck in C code (sympy on a huge power) ignores anything
        # softer. The executor keeps its processes private; `_processes` is the only handle.
        for proc in list((pool.executor._processes or {}).values()):
            proc.kill()
        pool.executor.shutdown(wait=False, cancel_futures=True)
        pool.retired = True
        if pool in self._alive:
            self._alive.remove(pool)
        if self._pool is pool:
            self._pool = None


def _module_of(fn: Any) -> str:
    """The module a reward's code lives in: of the function, the partial's function, or class."""
    target = getattr(fn, "func", fn)
    return getattr(target, "__module__", None) or type(fn).__module__
