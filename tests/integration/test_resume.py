"""A run SIGKILLed (its whole process group) after a checkpoint and resumed with
`trainer.resume=auto` continues bitwise as the run that never stopped. The SIGTERM stop and
its resume are in test_main.py.

    python -m pytest tests/integration/test_resume.py -m slow
"""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path

import pytest
import safetensors.torch
import torch

from tests.integration import runs
from tests.integration.conftest import run_main
from toolrl import checkpoint

COMMON = (
    "+experiment=smoke",
    "trainer.total_steps=5",
    "trainer.save_every=2",
    "trainer.eval_every=2",
)


def _learning(rows: list[dict]) -> list[dict]:
    """Rows without the timings, which differ run to run."""
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/"))} for r in rows]


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_is_bitwise_the_uninterrupted_run(
    tmp_path: Path, embedded_model: str
) -> None:
    """The control: two uninterrupted runs agree bitwise. Then a third is SIGKILLed (its
    whole process group, as a lost node or `scancel -s KILL`) after its step-2 checkpoint and
    resumed: every step's metrics (timings aside) and the final weights equal the
    uninterrupted run's bitwise, and no step is logged twice."""
    a = _learning(run_main(tmp_path / "a", *COMMON))
    b = _learning(run_main(tmp_path / "b", *COMMON))
    assert a == b, "two uninterrupted runs differ: resume cannot be compared bitwise"

    run_dir, mark = tmp_path / "c", uuid.uuid4().hex
    proc = runs.start(run_dir, mark, *COMMON)
    try:
        runs.wait_until(lambda: checkpoint.latest(run_dir / "checkpoints") is not None, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        runs.kill_marked(mark)
    assert checkpoint.latest(run_dir / "checkpoints").name == "step_00000002"
    assert _learning(run_main(run_dir, *COMMON)) == a
    weights = [
        safetensors.torch.load_file(d / "checkpoint" / "model.safetensors")
        for d in (tmp_path / "a", run_dir)
    ]
    for k, v in weights[0].items():
        assert torch.equal(v, weights[1][k]), k
