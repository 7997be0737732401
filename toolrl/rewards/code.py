"""The code correctness reward: run the row's unit tests against the program the model wrote.

The program is the last fenced code block of the final text whose info string is `python`,
`py`, `python3` or empty (a block fenced as another language, e.g. ```bash, is skipped). A
final text without such a block is never run: it scores 0, as does a missing final text.

The row's tests come from one column (`tests_column`, default `tests`): a list of strings,
each one test (an assert, or a few lines), or one string, a test script that is one test.
A test passes when it runs to its end without raising; checks must therefore execute (an
`assert`, or a check function the test calls): test functions nobody calls pass vacuously,
and `unittest.main()` raises SystemExit, which fails.

One scoring, in one fresh OS sandbox (toolrl/tools/sandbox.py: bubblewrap, rlimits, no
network, nothing of the host's files):

    1. `__name__` is set to "solution", so the program runs like an imported module: its
       `if __name__ == "__main__":` block (reading stdin, printing a demo) does not run
    2. the program runs as one cell; if it raises, hangs or kills its process, every test
       fails (score 0)
    3. each test runs as its own cell, in order, on the program's state; one that raises,
       passes `test_timeout_s`, floods its output or kills the process fails, and the next
       test gets a fresh sandbox with the program run again, so no test hides the others
    4. tests not finished within `total_timeout_s` of getting a sandbox slot fail

The value is one float: the fraction of tests passed (`mode: fraction`, the default, a dense
signal) or 1.0 only when every test passed (`mode: all`). A mapping of both would be summed
into the total by RewardStack, so the mode picks one.

Whose fault (toolrl/rewards/base.py): anything the model's code does is its own, scored as
failed tests. A sandbox that cannot start (bwrap missing or broken, a spawn error, a start
slower than `_START_LIMIT_S`) or a slot not free within `queue_timeout_s` raises
RewardInfraError: the trajectory is kept out of the loss, never scored a silent 0. (Bad
values raise ValueError at construction; whether this machine has bwrap is checked by the
static `CodeTests.preflight(**kwargs)` and at each scoring, not at construction.) A row
without a usable tests column raises KeyError or ValueError: like every shipped reward, the
runner logs it and scores that component 0 for each sample of the row, so in GRPO the row's
group has equal rewards and gives no gradient.

Why async, not the process pool: the work happens in a sandbox subprocess already, so an
`async def __call__` awaits it in the rollout loop at the cost of a few pipe reads, where a
sync reward would hold a pool worker (one per rollout worker by default) idle for the whole
run and queue every other sync reward behind it. The runner's `timeout_s` clock runs from
the call, so this reward keeps its own limits inside it: at most `max_concurrent` sandboxes
at once per event loop (bounding CPU contention, which would otherwise turn wall-clock
limits into noise), a wait for a slot capped by `queue_timeout_s`, and a run capped by
`total_timeout_s` (sandbox starts included). Set `timeout_s` a few seconds above
`queue_timeout_s + total_timeout_s` (conf/reward/code.yaml does), so that the runner's own
limit, which would score 0 whoever was slow, never decides. And keep `queue_timeout_s` at
least ceil(trajectories scored at once / max_concurrent) x total_timeout_s: a wait past it is
an infrastructure fault, which keeps the trajectory out of the loss, and if those were the
slow (hanging) programs, training would stop seeing them.

A verdict the program could forge would be worth forging: each test cell ends by writing a
random marker to its output (fd 1 itself, past any rebound print or sys.stdout), and a test
passes only when that marker came back with no error. Patching the
cell runner so failing tests look clean therefore fails them; what remains open is code that
reads the test source as it arrives, and values that compare equal to anything (an object
whose `__eq__` returns True passes `assert f(x) == y`).

    reward: {code: {_target_: toolrl.rewards.code.CodeTests, tests_column: tests}}

    python -m pytest tests/unit/test_code_reward.py --durations=5
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import secrets
import sys
import time
from collections.abc import Mapping
from numbers import Real
from typing import Any

from toolrl.rewards.base import RewardInfraError, Scored
from toolrl.tools.sandbox import (
    CellResult,
    HostReport,
    Sandbox,
    SandboxConfig,
    SandboxDied,
    check_host,
    log_report,
)

MODES = ("fraction", "all")
PYTHON_INFO = ("python", "py", "python3", "")  # fence info strings that mean Python
# Starting a sandbox takes ~30 ms; one slower than this is the host's trouble, not the model's.
_START_LIMIT_S = 10.0
_PRELUDE = "__name__ = 'solution'"


def extract_program(text: str) -> str | None:
    """The body of the last closed fenced Python (or bare) block in `text`; None if none.

    Fences are read line by line, as Markdown does, so the closing fence of a ```bash block is
    never taken for the opening of a bare one. A fence is 3+ backticks at the start of a line
    (up to 3 spaces in); it closes at a line of only backticks, at least as many."""
    last, fence, info, body = None, "", "", []
    for line in text.splitlines():
        stripped = line.strip()
        if not fence:
            head = line.lstrip(" ")
            ticks = len(head) - len(head.lstrip("`"))
            if ticks >= 3 and len(line) - len(head) <= 3 and "`" not in head[ticks:]:
                fence, info, body = "`" * ticks, head[ticks:].strip().lower(), []
        elif stripped.startswith(fence) and stripped == "`" * len(stripped):
            if info.split(" ", 1)[0] in PYTHON_INFO:
                last = "\n".join(body) + "\n"
            fence = ""
        else:
            body.append(line)
    return last


def row_tests(row: Mapping[str, Any], column: str) -> list[str]:
    """The row's tests as a list of sources: a list of strings, or one string (one test).

    KeyError for a missing column, ValueError for anything else that is not tests: a row
    that cannot be scored is a data problem and says so, naming the column."""
    if column not in row:
        raise KeyError(f"row has no tests column {column!r} (columns: {sorted(row)})")
    tests = row[column]
    if isinstance(tests, str):
        tests = [tests]
    if (
        not isinstance(tests, list | tuple)
        or not tests
        or not all(isinstance(t, str) and t.strip() for t in tests)
    ):
        raise ValueError(
            f"column {column!r} must hold a non-empty string or a non-empty list of non-empty "
            f"strings (the tests), got {str(tests)[:200]!r}"
        )
    return list(tests)


def _positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"code reward: {name} must be a finite number, got {value!r}")
    if value <= 0:
        raise ValueError(f"code reward: {name} must be > 0, got {value!r}")
    return float(value)


def _sandbox_config(sandbox: SandboxConfig | Mapping[str, Any] | None) -> SandboxConfig:
    """The sandbox config from YAML; ValueError for an unknown key or a bad value.

    Whether this machine can honour it (bwrap installed, the interpreter there) is checked
    by `CodeTests.preflight` and at the first scoring, not here: the shipped configs are
    built in tests on machines without bwrap, where the sandbox tests skip."""
    if isinstance(sandbox, SandboxConfig):
        cfg = sandbox
    else:
        try:
            cfg = SandboxConfig(**dict(sandbox or {}))
        except TypeError as e:
            raise ValueError(f"code reward: bad sandbox settings: {e}") from e
    # problems() also looks at this machine; judge the values alone with those two filled in
    portable = dataclasses.replace(
        cfg,
        python=sys.executable,
        isolation="none" if cfg.isolation == "bwrap" else cfg.isolation,
    )
    problems = portable.problems()
    if problems:
        raise ValueError("code reward: sandbox: " + "; ".join(problems))
    return cfg


class CodeTests:
    """Scores the model's program by the row's unit tests in a sandbox; see the module doc.

    Every argument is a YAML knob (conf/reward/code.yaml lists them); a bad value raises
    ValueError here, at construction, before any rollout."""

    def __init__(
        self,
        tests_column: str = "tests",
        mode: str = "fraction",
        test_timeout_s: float = 2.0,
        total_timeout_s: float = 20.0,
        max_concurrent: int = 32,
        queue_timeout_s: float = 120.0,
        sandbox: SandboxConfig | Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(tests_column, str) or not tests_column:
            raise ValueError(
                f"code reward: tests_column must be a column name, got {tests_column!r}"
            )
        if mode not in MODES:
            raise ValueError(f"code reward: mode must be one of {MODES}, got {mode!r}")
        if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int):
            raise ValueError(
                f"code reward: max_concurrent must be an integer, got {max_concurrent!r}"
            )
        if max_concurrent < 1:
            raise ValueError(f"code reward: max_concurrent must be >= 1, got {max_concurrent}")
        self.tests_column, self.mode, self.max_concurrent = tests_column, mode, max_concurrent
        self.test_timeout_s = _positive("test_timeout_s", test_timeout_s)
        self.total_timeout_s = _positive("total_timeout_s", total_timeout_s)
        self.queue_timeout_s = _positive("queue_timeout_s", queue_timeout_s)
        if self.total_timeout_s < self.test_timeout_s:
            raise ValueError(
                f"code reward: total_timeout_s ({total_timeout_s}) must be >= test_timeout_s "
                f"({test_timeout_s}), or not even the program would get its full time"
            )
        self.cfg = _sandbox_config(sandbox)
        self._host: HostReport | None = None  # checked at the first scoring, in its process
        self._loop: asyncio.AbstractEventLoop | None = None
        self._slots: asyncio.Semaphore | None = None

    @property
    def deadline_s(self) -> float:
        """The longest one scoring may take by its own limits; `RewardStack` checks that the
        spec's `timeout_s` (the runner's limit, which scores 0) is longer."""
        return self.queue_timeout_s + self.total_timeout_s

    @staticmethod
    def preflight(**kwargs: Any) -> None:
        """Everything `__init__` checks, and whether this machine can start the sandbox."""
        cfg = CodeTests(**kwargs).cfg
        if cfg.problems():
            raise ValueError("code reward: " + "; ".join(cfg.problems()))

    async def __call__(self, x: Scored) -> float:
        tests = row_tests(x.row, self.tests_column)  # first: a bad row fails for every sample
        program = None if x.final_text is None else extract_program(x.final_text)
        if program is None:
            return 0.0
        passed = await self.run_tests(program, tests)
        if self.mode == "all":
            return 1.0 if all(passed) else 0.0
        return sum(passed) / len(passed)

    async def run_tests(self, program: str, tests: list[str]) -> list[bool]:
        """Whether each test passed against `program`, run in a fresh sandbox of its own."""
        host = self._check_host()
        slots = self._semaphore()
        try:
            await asyncio.wait_for(slots.acquire(), self.queue_timeout_s)
        except TimeoutError:
            raise RewardInfraError(
                f"code reward: no sandbox slot free within {self.queue_timeout_s:g} s "
                f"({self.max_concurrent} busy); raise max_concurrent or queue_timeout_s"
            ) from None
        try:
            trial = _Trial(self, host, time.monotonic() + self.total_timeout_s)
            return await trial.run(program, tests)
        finally:
            slots.release()

    def _check_host(self) -> HostReport:
        problems = self.cfg.problems()
        if problems:
            raise RewardInfraError("code reward: the sandbox cannot start: " + "; ".join(problems))
        if self._host is None:
            self._host = check_host(self.cfg, pool_size=self.max_concurrent)
            log_report(self._host)
        return self._host

    def _semaphore(self) -> asyncio.Semaphore:
        # asyncio primitives belong to one loop; a new loop (asyncio.run per call) gets new ones
        loop = asyncio.get_running_loop()
        if self._slots is None or self._loop is not loop:
            self._loop, self._slots = loop, asyncio.Semaphore(self.max_concurrent)
        return self._slots


class _OutOfTime(Exception):
    """The scoring's budget ran out (spent by the model's own slow or hanging code)."""


class _Trial:
    """One scoring: a sandbox with the program loaded, replaced whenever a test kills it."""

    def __init__(self, owner: CodeTests, host: HostReport, deadline: float) -> None:
        self.owner, self.host, self.deadline = owner, host, deadline
        self.sandbox: Sandbox | None = None

    async def run(self, program: str, tests: list[str]) -> list[bool]:
        passed: list[bool] = []
        try:
            for test in tests:
                if self.sandbox is None and not await self._load(program):
                    break  # the program itself fails (or no time is left): so do the rest
                passed.append(await self._test(test))
        except _OutOfTime:
            pass
        finally:
            if self.sandbox is not None:
                await self.sandbox.close()
        return passed + [False] * (len(tests) - len(passed))

    async def _load(self, program: str) -> bool:
        """Start a sandbox and run the program in it; False when the program fails."""
        await self._start()
        result = await self._cell(_PRELUDE)
        if result is None and time.monotonic() >= self.deadline:
            raise _OutOfTime  # its limit was what the model's earlier hangs had left
        if result is None or result.error is not None:
            # no model code has run yet: a sandbox that cannot take one line is the host's
            raise RewardInfraError(f"code reward: a fresh sandbox failed its first cell: {result}")
        result = await self._cell(program)
        if result is None or result.error is not None:
            await self._drop()
            return False
        return True

    async def _test(self, test: str) -> bool:
        marker = f"toolrl-test-passed-{secrets.token_hex(8)}"
        # A line of its own, after the test's last line, so it runs only if the test finished;
        # written to fd 1 itself, so a program that rebinds print or sys.stdout still gets it.
        result = await self._cell(f"{test}\n__import__('os').write(1, {marker.encode()!r})")
        return result is not None and result.error is None and marker in result.output

    async def _start(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _OutOfTime
        cfg, uid = self.owner.cfg, None
        if self.host.per_sandbox_uid:  # root: an unused uid of its own caps its processes
            uid = cfg.uid_base + random.randrange(1_000_000)
        sandbox = Sandbox(cfg, [], self.host, uid)
        try:
            await asyncio.wait_for(sandbox.start(), min(left, _START_LIMIT_S))
        except TimeoutError:
            await sandbox.close()
            if left < _START_LIMIT_S:
                raise _OutOfTime from None  # the model's earlier hangs spent the budget
            raise RewardInfraError(
                f"code reward: the sandbox did not start within {_START_LIMIT_S:g} s"
            ) from None
        except (SandboxDied, OSError) as e:  # bwrap missing or refused, spawn failed
            await sandbox.close()
            raise RewardInfraError(f"code reward: the sandbox could not start: {e}") from e
        self.sandbox = sandbox

    async def _cell(self, code: str) -> CellResult | None:
        """Run one cell within the test limit; None (and the sandbox gone) when it overran
        or its process died, both the model's doing once its code has run."""
        assert self.sandbox is not None
        limit = min(self.owner.test_timeout_s, self.deadline - time.monotonic())
        if limit <= 0:
            raise _OutOfTime
        try:
            return await asyncio.wait_for(self.sandbox.run(code, _no_tools), limit)
        except (TimeoutError, SandboxDied):
            await self._drop()
            return None

    async def _drop(self) -> None:
        if self.sandbox is not None:
            sandbox, self.sandbox = self.sandbox, None
            await sandbox.close()


async def _no_tools(name: str, arguments: dict[str, Any]) -> str:
    # No host tool is exposed inside (the exposed list is empty), so this is never asked.
    return f"Error: no tool {name!r} in the code reward's sandbox"
