"""Checkpoint folders (toolrl.checkpoint), metrics rows on resume, and the stop flag.

python -m pytest tests/unit/test_checkpoint.py
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import pytest

from toolrl import checkpoint, preemption
from toolrl.config import Config, ConfigError
from toolrl.metrics import keep_rows_before
from toolrl.preemption import Preempted, StopRequest


def _save(ck: checkpoint.Checkpointer, step: int, payload: bytes = b"") -> Path:
    tmp = ck.begin(step)
    (tmp / "train").mkdir()
    (tmp / "train" / "shard").write_bytes(payload or str(step).encode())
    return ck.commit(tmp, step, {"step": step, "fixed": {}})


def test_commit_points_latest_at_the_newest_and_keeps_the_last_k(tmp_path: Path) -> None:
    ck = checkpoint.Checkpointer(tmp_path, keep_last=2)
    assert checkpoint.latest(ck.folder) is None
    for step in (2, 4, 6):
        _save(ck, step)
    assert checkpoint.latest(ck.folder) == ck.folder / "step_00000006"
    assert sorted(p.name for p in ck.folder.iterdir()) == [
        "latest",
        "step_00000004",
        "step_00000006",
    ]
    assert checkpoint.read_state(ck.folder / "step_00000004")["step"] == 4
    # a resume from step 4 saves step 6 again: the new one replaces the old
    _save(ck, 6, b"again")
    assert (ck.folder / "step_00000006" / "train" / "shard").read_bytes() == b"again"


def test_an_unfinished_write_leaves_latest_on_the_previous_checkpoint(tmp_path: Path) -> None:
    ck = checkpoint.Checkpointer(tmp_path, keep_last=3)
    _save(ck, 2)
    tmp = ck.begin(4)
    (tmp / "half").write_bytes(b"x")  # the process died here
    assert checkpoint.latest(ck.folder) == ck.folder / "step_00000002"
    _save(ck, 4)  # the next save clears the stray temp folder
    assert not list(ck.folder.glob(".tmp-*"))


KILLED_WRITER = textwrap.dedent("""
    import hashlib, sys
    from toolrl.checkpoint import Checkpointer
    ck = Checkpointer(sys.argv[1], keep_last=2)
    step = 0
    while True:
        step += 1
        tmp = ck.begin(step)
        for i in range(4):  # several files, each tied to the step
            (tmp / f"part{i}").write_bytes(hashlib.sha256(f"{step}:{i}".encode()).digest() * 4096)
        ck.commit(tmp, step, {"step": step, "fixed": {}})
        print(step, flush=True)
""")


def test_sigkill_at_any_moment_leaves_a_complete_latest(tmp_path: Path) -> None:
    """Kill a process that saves checkpoints in a loop at random moments: `latest` always
    names a checkpoint whose every file belongs to its step."""
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    rng = random.Random(0)
    seen = set()
    for _ in range(8):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "run")],
            stdout=subprocess.PIPE,
            text=True,
        )
        proc.stdout.readline()  # at least one checkpoint is committed
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        found = checkpoint.latest(tmp_path / "run" / "checkpoints")
        assert found is not None
        step = checkpoint.read_state(found)["step"]
        seen.add(step)
        for i in range(4):
            want = hashlib.sha256(f"{step}:{i}".encode()).digest() * 4096
            assert (found / f"part{i}").read_bytes() == want
    assert len(seen) > 1  # the kills landed at different points


def test_resolve_finds_checkpoints_by_any_folder_and_says_what_is_wrong(tmp_path: Path) -> None:
    ck = checkpoint.Checkpointer(tmp_path / "run", keep_last=2)
    assert checkpoint.resolve("auto", tmp_path / "run") is None
    step = _save(ck, 3)
    assert checkpoint.resolve("auto", tmp_path / "run") == step
    assert checkpoint.resolve("never", tmp_path / "run") is None
    for given in (tmp_path / "run", ck.folder, step):
        assert checkpoint.resolve(str(given), tmp_path / "elsewhere") == step
    with pytest.raises(ConfigError, match="trainer.resume='/nope': no checkpoint there"):
        checkpoint.resolve("/nope", tmp_path)


def test_resuming_with_a_changed_model_task_or_algorithm_names_the_keys(tmp_path: Path) -> None:
    cfg = Config()
    ck = checkpoint.Checkpointer(tmp_path, keep_last=1)
    tmp = ck.begin(1)
    path = ck.commit(tmp, 1, {"step": 1, "fixed": checkpoint.fixed_config(cfg)})
    cfg.trainer.total_steps += 10  # may change
    cfg.logger.wandb_mode = "disabled"
    assert checkpoint.check_resumable(path, cfg)["step"] == 1
    cfg.algorithm.loss.kl_coef = 0.5
    cfg.model.path = "/models/other"
    cfg.trainer.seed = 3
    with pytest.raises(ConfigError) as e:
        checkpoint.check_resumable(path, cfg)
    msg = str(e.value)
    for key in ("algorithm.loss.kl_coef", "model.path: 'embedded' -> '/models/other'", "seed"):
        assert key in msg
    assert "total_steps" not in msg and "wandb_mode" not in msg


def test_metrics_rows_from_the_resumed_step_on_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "x": s} for s in (0, 1, 2, 3, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    keep_rows_before(path, 2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1]
    with path.open("a") as f:
        f.write('{"step": 1}\n{"step": 2, "x": 0.')  # killed mid-write
    keep_rows_before(path, 2)  # the half row goes too
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 1]
    keep_rows_before(path, 0)
    assert path.read_text() == ""


def test_a_fresh_start_sets_an_earlier_runs_checkpoints_aside(tmp_path: Path) -> None:
    assert checkpoint.set_aside(tmp_path) is None
    _save(checkpoint.Checkpointer(tmp_path, keep_last=2), 7)
    aside = checkpoint.set_aside(tmp_path)
    assert aside == tmp_path / "checkpoints.before-1"
    assert checkpoint.latest(aside) == aside / "step_00000007"
    assert checkpoint.latest(checkpoint.checkpoints_dir(tmp_path)) is None


def test_a_stop_signal_ends_the_wait_for_a_rollout() -> None:
    stop = StopRequest()
    before = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    try:
        stop.install()
        pending: Future[int] = Future()
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        t0 = time.perf_counter()
        with pytest.raises(Preempted) as e:
            stop.wait(pending, poll_s=0.05)
        assert time.perf_counter() - t0 < 5
        assert e.value.exit_code == 128 + signal.SIGUSR1
        done: Future[int] = Future()
        done.set_result(7)
        with pytest.raises(Preempted):  # once signalled, every later wait stops too
            stop.wait(done)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_a_signal_delivered_twice_is_one_stop_and_a_later_one_stops_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr(preemption.time, "monotonic", lambda: clock[0])
    stop = StopRequest()
    stop._handle(signal.SIGTERM, None)
    clock[0] += 0.01  # the same SIGTERM, from Slurm and from toolrl.cluster
    stop._handle(signal.SIGTERM, None)
    assert stop.signum == signal.SIGTERM
    clock[0] += preemption.REPEAT_S
    with pytest.raises(Preempted) as e:
        stop._handle(signal.SIGINT, None)
    assert e.value.immediate
    stop.shutting_down = True
    stop._handle(signal.SIGINT, None)  # during the shutdown: noted only


def test_weight_files_of_processes_that_are_gone_are_removed() -> None:
    """A run SIGKILLed while its engines held its last pushed weights leaves that file in
    shared memory; the next run's first push removes it (and never a live process's)."""
    from toolrl.workers.weights import _remove_orphans, new_weights_file, shm_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = Path(shm_dir()) / f"toolrl-weights-{dead}-abc.safetensors"
    stale.write_bytes(b"x")
    _remove_orphans.cache_clear()  # the sweep runs at a process's first push: as if fresh
    mine = new_weights_file()
    try:
        assert not stale.exists()
        assert Path(mine).name.startswith(f"toolrl-weights-{os.getpid()}-")
        again = new_weights_file()  # this process is alive: its file stays
        assert Path(mine).exists()
        os.unlink(again)
    finally:
        os.unlink(mine)
