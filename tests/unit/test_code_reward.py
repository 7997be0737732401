"""The code correctness reward: hand-computed pass rates from real sandboxes (no mocks), the
fence reading, what counts as the model's fault and what as the infrastructure's, the shipped
YAML built through RewardStack and scored through RewardRunner, and the sample file.

    python -m pytest tests/unit/test_code_reward.py --durations=5

Tests that start sandboxes skip without `bwrap`, except under CI (TOOLRL_REQUIRE_BWRAP=1),
where the module fails to import instead, as tests/unit/test_python_sandbox.py does.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig, OmegaConf

from tests.unit.sandbox_procs import UID_BASE, sandbox_pids
from toolrl.rewards.base import RewardInfraError, Scored
from toolrl.rewards.code import CodeTests, extract_program, row_tests
from toolrl.rewards.combine import RewardStack
from toolrl.rewards.runner import RewardRunner

ROOT = Path(__file__).resolve().parents[2]
YAML = ROOT / "conf" / "reward" / "code.yaml"
SAMPLE = ROOT / "toolrl" / "data" / "samples" / "code_sample.jsonl"

HAVE_BWRAP = shutil.which("bwrap") is not None
if not HAVE_BWRAP and os.environ.get("TOOLRL_REQUIRE_BWRAP"):
    raise RuntimeError("bwrap is required here: apt-get install bubblewrap")
needs_bwrap = pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap is not installed")

LIMIT = 1.0  # test_timeout_s where a test hangs on purpose

ADD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-4, 4) == 0", "assert add(2, 2) == 4"]


def fenced(code: str, before: str = "Here is my solution:\n", lang: str = "python") -> str:
    return f"{before}```{lang}\n{code}```\nIt returns the sum."


def scored(final_text: str | None, tests: Any = ADD_TESTS, **row: Any) -> Scored:
    return Scored(messages=[], final_text=final_text, row={"tests": tests, **row})


def reward(**kwargs: Any) -> CodeTests:
    sandbox = {"uid_base": UID_BASE, **kwargs.pop("sandbox", {})}
    return CodeTests(**{"test_timeout_s": LIMIT, "sandbox": sandbox, **kwargs})


def score(x: Scored, **kwargs: Any) -> float:
    return asyncio.run(reward(**kwargs)(x))


@pytest.fixture(autouse=True)
def no_sandbox_outlives_its_scoring() -> Iterator[None]:
    before = sandbox_pids()
    yield
    deadline = time.time() + 3
    while sandbox_pids() - before and time.time() < deadline:
        time.sleep(0.05)
    assert not sandbox_pids() - before, "sandbox processes outlived their scoring"


# --- reading the program and the tests (no sandbox) -----------------------------------------


def test_the_last_python_or_bare_block_is_the_program() -> None:
    text = "```python\nx = 1\n```\nthen\n```\ny = 2\n```\nand ```py inline``` words"
    assert extract_program(text) == "y = 2\n"
    assert extract_program("```Python3\nz = 3\n```") == "z = 3\n"
    assert extract_program("```py title\n\n  a = 1\n\n```") == "\n  a = 1\n\n"


def test_other_languages_unclosed_and_unfenced_are_not_programs() -> None:
    # the closing fence of the bash block must not open a bare block around "ls done"
    bash = "```python\nok = 1\n```\n```bash\nls\n```\nls done\n"
    assert extract_program(bash) == "ok = 1\n"
    assert extract_program("```bash\nls\n```") is None
    assert extract_program("```python\ndef f():\n    return 1\n") is None  # never closed
    assert extract_program("def add(a, b):\n    return a + b") is None
    four = "````python\nprint('```')\n```\nstill = 1\n````"  # a shorter fence does not close
    assert extract_program(four) == "print('```')\n```\nstill = 1\n"


def test_tests_column_forms_and_errors() -> None:
    assert row_tests({"tests": ["assert 1", "assert 2"]}, "tests") == ["assert 1", "assert 2"]
    assert row_tests({"t": "assert 1\nassert 2"}, "t") == ["assert 1\nassert 2"]
    with pytest.raises(KeyError, match="no tests column 'tests'.*columns: \\['answer'\\]"):
        row_tests({"answer": "1"}, "tests")
    for bad in ([], "", ["ok", 3], [" "], None, {"a": "assert 1"}):
        with pytest.raises(ValueError, match="column 'tests' must hold"):
            row_tests({"tests": bad}, "tests")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"test_timeout_s": -1},
        {"test_timeout_s": 0},
        {"total_timeout_s": float("inf")},
        {"queue_timeout_s": "10"},
        {"test_timeout_s": True},
        {"test_timeout_s": 5, "total_timeout_s": 2},
        {"mode": "mean"},
        {"tests_column": ""},
        {"max_concurrent": 0},
        {"max_concurrent": 2.5},
        {"sandbox": {"memroy_mb": 512}},
        {"sandbox": {"memory_mb": 0}},
        {"sandbox": {"isolation": "docker"}},
    ],
)
def test_bad_config_is_a_value_error_at_construction(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="code reward"):
        CodeTests(**kwargs)


def test_no_final_text_no_code_block_missing_column() -> None:
    r = CodeTests()  # none of these starts a sandbox, so they run without bwrap too
    assert asyncio.run(r(scored(None))) == 0.0
    assert asyncio.run(r(scored("def add(a, b):\n    return a + b"))) == 0.0  # never run
    assert asyncio.run(r(scored(fenced(ADD, lang="javascript")))) == 0.0
    with pytest.raises(KeyError, match="no tests column 'unit_tests'"):
        asyncio.run(CodeTests(tests_column="unit_tests")(scored(fenced(ADD))))


# --- scoring in the sandbox -------------------------------------------------------------------


@needs_bwrap
def test_correct_program_passes_every_test() -> None:
    assert score(scored(fenced(ADD))) == 1.0
    assert score(scored(fenced(ADD)), mode="all") == 1.0


@needs_bwrap
def test_pass_rates_are_the_fraction_of_tests_passed() -> None:
    off_for_negatives = "def add(a, b):\n    return a + b if a >= 0 else -1\n"  # fails test 2
    assert score(scored(fenced(off_for_negatives))) == pytest.approx(2 / 3)
    assert score(scored(fenced(off_for_negatives)), mode="all") == 0.0
    always_three = "def add(a, b):\n    return 3\n"  # passes test 1 only
    assert score(scored(fenced(always_three))) == pytest.approx(1 / 3)
    failing_script = "assert add(1, 2) == 3\nassert add(1, 1) == 3"  # one test, a script
    assert score(scored(fenced(ADD), tests="assert add(1, 2) == 3\nassert add(0, 0) == 0")) == 1.0
    assert score(scored(fenced(ADD), tests=failing_script)) == 0.0


@needs_bwrap
def test_program_that_fails_to_run_scores_zero() -> None:
    assert score(scored(fenced("def add(a, b)\n    return a + b\n"))) == 0.0  # SyntaxError
    assert score(scored(fenced(ADD + "raise RuntimeError('boom')\n"))) == 0.0
    assert score(scored(fenced("import does_not_exist\n" + ADD))) == 0.0


@needs_bwrap
def test_main_block_does_not_run_and_future_imports_work() -> None:
    program = "from __future__ import annotations\n" + ADD + "if __name__ == '__main__':\n"
    program += "    print(add(int(input()), 1))\n"  # input() would raise EOFError
    assert score(scored(fenced(program))) == 1.0


@needs_bwrap
def test_rebinding_print_or_stdout_is_no_failure() -> None:
    program = "import io, sys\nsys.stdout = io.StringIO()\nprint = None\n" + ADD
    assert score(scored(fenced(program))) == 1.0


@needs_bwrap
def test_a_hanging_test_fails_alone_within_its_limit() -> None:
    program = "def add(a, b):\n    while a < 0:\n        pass\n    return a + b\n"
    start = time.monotonic()
    assert score(scored(fenced(program))) == pytest.approx(2 / 3)  # test 2 loops forever
    assert time.monotonic() - start < LIMIT + 1.5


@needs_bwrap
def test_a_hanging_program_scores_zero_within_its_limit() -> None:
    start = time.monotonic()
    assert score(scored(fenced(ADD + "while True:\n    pass\n"))) == 0.0
    assert time.monotonic() - start < LIMIT + 1.5


@needs_bwrap
def test_flooding_or_killing_the_process_fails_that_test_only() -> None:
    flood = "def add(a, b):\n    if a < 0:\n        print('x' * 10_000_000)\n    return a + b\n"
    assert score(scored(fenced(flood))) == pytest.approx(2 / 3)
    # the next test gets a fresh sandbox with the program run again
    dies = "import os\ndef add(a, b):\n    if a < 0:\n        os._exit(0)\n    return a + b\n"
    assert score(scored(fenced(dies))) == pytest.approx(2 / 3)


@needs_bwrap
def test_a_program_that_hides_failures_from_the_runner_still_fails() -> None:
    # Inside, the cell runner is the __main__ module: make every failing cell look clean.
    cheat = "import sys\nsys.modules['__main__']._format_error = lambda e: None\n"
    assert score(scored(fenced(cheat + "def add(a, b):\n    return -1\n"))) == 0.0
    cheat = "import sys\nsys.modules['__main__']._run_cell = lambda code, env: None\n"
    assert score(scored(fenced(cheat))) == 0.0


@needs_bwrap
def test_total_budget_fails_the_tests_left_when_it_runs_out() -> None:
    hang = "def add(a, b):\n    while True:\n        pass\n"
    tests = ["assert add(1, 2) == 3"] * 3
    start = time.monotonic()
    assert score(scored(fenced(hang), tests=tests), total_timeout_s=1.5) == 0.0
    assert time.monotonic() - start < 1.5 + 1.0


# --- the infrastructure's faults --------------------------------------------------------------


@needs_bwrap
def test_a_sandbox_that_cannot_start_is_an_infra_error() -> None:
    # /usr/bin/true is executable, so the config is fine; it exits without saying "ready"
    with pytest.raises(RewardInfraError, match="could not start"):
        score(scored(fenced(ADD)), sandbox={"python": "/usr/bin/true"})
    missing = {"python": "/nonexistent/python3"}
    r = reward(sandbox=missing)  # a machine fact, not a config value: builds, refuses to run
    with pytest.raises(RewardInfraError, match="cannot start.*not an executable"):
        asyncio.run(r(scored(fenced(ADD))))
    with pytest.raises(ValueError, match="not an executable"):
        CodeTests.preflight(sandbox=missing)
    CodeTests.preflight(sandbox={"uid_base": UID_BASE})


@needs_bwrap
def test_no_free_slot_in_time_is_an_infra_error() -> None:
    hang = "def add(a, b):\n    while True:\n        pass\n"
    r = reward(max_concurrent=1, queue_timeout_s=0.2)

    async def both() -> list[Any]:
        return await asyncio.gather(
            r(scored(fenced(hang), tests=ADD_TESTS[:1])),  # holds the one slot for LIMIT s
            r(scored(fenced(ADD))),
            return_exceptions=True,
        )

    first, second = asyncio.run(both())
    assert first == 0.0 and isinstance(second, RewardInfraError), (first, second)
    assert "no sandbox slot" in str(second)


# --- the shipped config and the sample file ---------------------------------------------------


def _samples() -> list[dict[str, Any]]:
    return [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]


def _shipped(**overrides: Any) -> DictConfig:
    cfg = OmegaConf.load(YAML)
    for key, value in overrides.items():
        OmegaConf.update(cfg, f"code.{key}", value, merge=True)
    return cfg


def test_shipped_yaml_lists_every_knob_and_its_limits_fit() -> None:
    spec = OmegaConf.to_container(OmegaConf.load(YAML))["code"]
    knobs = set(inspect.signature(CodeTests).parameters)
    assert knobs <= set(spec)
    defaults = CodeTests()  # one value per default: the class and the YAML agree
    for knob in knobs - {"sandbox"}:
        assert getattr(defaults, knob) == spec[knob], knob
    assert spec["timeout_s"] > spec["queue_timeout_s"] + spec["total_timeout_s"]
    with pytest.raises(ValueError, match=r"deadline_s \(140\.0\) must be below timeout_s"):
        RewardStack({"code": {**spec, "timeout_s": 100}})  # the stack refuses the reverse


@needs_bwrap
def test_shipped_yaml_through_stack_and_runner_on_a_sample_row() -> None:
    stack = RewardStack(_shipped(**{"sandbox.uid_base": UID_BASE}))
    (component,) = stack.components
    assert component.name == "code" and component.is_async and component.timeout_s == 150
    row = _samples()[2]  # fib
    wrong = "def fib(n):\n    return n\n"  # right for 0 and 1 only: 2 of 4

    async def main() -> list[Any]:
        async with RewardRunner(stack) as runner:
            xs = [fenced(row["solution"]), fenced(wrong), "no code", None]
            scores = [await runner.score(Scored([], t, row)) for t in xs]
            scores.append(await runner.score(Scored([], fenced(wrong), {"question": "q"})))
            return scores

    right, half, no_code, no_text, no_tests = asyncio.run(main())
    assert (right.total, half.total, no_code.total, no_text.total) == (1.0, 0.5, 0.0, 0.0)
    assert right.components == {"code": 1.0} and not right.failed
    assert no_tests.total == 0.0 and no_tests.failed == ("code",)  # a data error: logged, 0


@needs_bwrap
def test_every_sample_solution_passes_its_own_tests() -> None:
    from toolrl.data.dataset import DatasetTask

    task = DatasetTask(train_files=str(SAMPLE), eval_files=str(SAMPLE), prompt_column="question")
    rows = [p.row for p in task.prompts("train")]
    assert 5 <= len(rows) <= 8 and all(isinstance(r["tests"], list) for r in rows)
    r = reward(mode="all", test_timeout_s=5.0)

    async def main() -> list[float]:
        return await asyncio.gather(*(r(Scored([], fenced(row["solution"]), row)) for row in rows))

    assert asyncio.run(main()) == [1.0] * len(rows)
    # and no sample is passed by a program that does nothing
    assert asyncio.run(r(Scored([], fenced("pass\n"), rows[0]))) == 0.0
