"""Running `python -m toolrl.main` as a process the tests can stop: in its own process group
(as a Slurm job step), marked with an environment variable that Ray's and vLLM's processes
inherit, so a process left behind is found by that mark."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

MARK = "TOOLRL_TEST_RUN_MARK"


def start(run_dir: Path, mark: str, *overrides: str) -> subprocess.Popen:
    """Start a run into `run_dir`; its output goes to <run_dir>.out and <run_dir>.err."""
    cmd = [sys.executable, "-m", "toolrl.main", *overrides, f"hydra.run.dir={run_dir}"]
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(f"{run_dir}.out", "w") as out, open(f"{run_dir}.err", "w") as err:
        return subprocess.Popen(
            cmd, env={**os.environ, MARK: mark}, stdout=out, stderr=err, start_new_session=True
        )


def wait_until(ok: Callable[[], bool], proc: subprocess.Popen, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while not ok():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early with {proc.returncode}")
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.05)


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def has_step(run_dir: Path, step: int) -> Callable[[], bool]:
    """Whether the run has logged training step `step`."""
    return lambda: any(r["step"] == step and "train/reward" in r for r in rows(run_dir))


def left_behind(mark: str) -> list[str]:
    """'pid: command line' of live processes carrying the run's mark."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if f"{MARK}={mark}".encode() not in Path(f"/proc/{pid}/environ").read_bytes():
                continue
            if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
                continue
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            found.append(f"{pid}: {cmd.decode(errors='replace')[:120]}")
        except OSError:
            pass
    return found


def none_left(mark: str, grace_s: float = 20) -> list[str]:
    """The marked processes still alive after up to `grace_s` seconds (none: [])."""
    end = time.monotonic() + grace_s
    while (left := left_behind(mark)) and time.monotonic() < end:
        time.sleep(0.5)
    return left


def kill_marked(mark: str) -> None:
    for line in left_behind(mark):
        try:
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        except OSError:
            pass
