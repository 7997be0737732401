"""toolrl.cluster's pieces under a stand-in for Slurm (tests/fake_slurm: scontrol, srun).

Run `python -m pytest tests/unit/test_cluster.py`; the whole launcher on a simulated
cluster (Ray nodes as processes on this machine) is tests/integration/test_cluster.py.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from toolrl import cluster

FAKE_SLURM = Path(__file__).resolve().parents[1] / "fake_slurm"


@pytest.fixture
def slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Slurm's variables for job 4242 on three nodes; the stand-ins log to the returned file."""
    log = tmp_path / "slurm.log"
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}:{os.environ['PATH']}")
    env = {
        "FAKE_SLURM_NODES": "gpu-a1 gpu-a2 gpu-b7",
        "FAKE_SLURM_LOG": str(log),
        "SLURM_JOB_NODELIST": "gpu-a[1-2],gpu-b7",
        "SLURM_JOB_ID": "4242",
        "SLURM_CPUS_PER_TASK": "16",
        "SLURM_GPUS_ON_NODE": "8",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return log


def test_the_allocation_is_read_from_slurm(slurm: Path) -> None:
    alloc = cluster.Allocation.from_env()
    assert alloc == cluster.Allocation("4242", ["gpu-a1", "gpu-a2", "gpu-b7"], 16, 8)
    head = cluster.ray_start(alloc, None, 6400)
    assert "--head" in head and "--port=6400" in head and "--num-gpus=8" in head
    worker = cluster.ray_start(alloc, "10.0.0.1", 6400)
    assert "--address=10.0.0.1:6400" in worker and "--head" not in worker
    assert all("--block" in c and "--num-cpus=16" in c for c in (head, worker))


def test_outside_an_allocation_it_says_what_to_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_NODELIST", raising=False)
    monkeypatch.delenv("SLURM_NODELIST", raising=False)
    with pytest.raises(SystemExit, match="sbatch launch/slurm.sbatch"):
        cluster.Allocation.from_env()


def test_the_driver_runs_in_the_jobs_own_folder_unless_one_is_given() -> None:
    alloc = cluster.Allocation("77", ["n1"], 4, 0)
    cmd = cluster.driver_command(alloc, ["trainer.total_steps=3"])
    assert cmd[1:] == [
        "-m",
        "toolrl.main",
        "ray.address=auto",
        "hydra.run.dir=runs/slurm-77",
        "trainer.total_steps=3",
    ]
    mine = cluster.driver_command(alloc, ["hydra.run.dir=/scratch/me"])
    assert [c for c in mine if c.startswith("hydra.run.dir")] == ["hydra.run.dir=/scratch/me"]


def test_every_node_gets_one_fresh_token_unless_auth_is_off_or_given() -> None:
    env = cluster.job_environment({"PATH": "/bin"})
    assert env["RAY_AUTH_MODE"] == "token" and len(env["RAY_AUTH_TOKEN"]) == 64
    assert env["RAY_AUTH_TOKEN"] != cluster.job_environment({})["RAY_AUTH_TOKEN"]
    assert "RAY_AUTH_TOKEN" not in cluster.job_environment({"RAY_AUTH_MODE": "disabled"})
    assert cluster.job_environment({"RAY_AUTH_TOKEN": "t"})["RAY_AUTH_TOKEN"] == "t"


CHILD = """
import os, signal, sys, time
def stop(signum, frame):
    open(sys.argv[1], "a").write(f"{signum}\\n")
    sys.exit(128 + signum)
signal.signal(signal.SIGUSR1, stop)
open(sys.argv[1] + ".ready", "w").close()
time.sleep(60)
"""


def test_the_warning_signal_reaches_the_driver(tmp_path: Path) -> None:
    got = tmp_path / "signals"

    def warn_when_ready() -> None:  # Slurm's --signal=B:USR1 to the batch step
        deadline = time.monotonic() + 30
        while not Path(f"{got}.ready").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGUSR1)

    relay = cluster.SignalRelay()
    before = signal.signal(signal.SIGUSR1, relay)
    try:
        threading.Thread(target=warn_when_ready, daemon=True).start()
        code = relay.run([sys.executable, "-c", CHILD, str(got)], dict(os.environ))
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert code == 128 + signal.SIGUSR1
    assert got.read_text() == f"{int(signal.SIGUSR1)}\n"
    relay(signal.SIGUSR1, None)  # after the driver ended: ignored while the nodes stop


def test_a_signal_before_the_driver_runs_stops_the_start() -> None:
    with pytest.raises(cluster.Interrupted) as e:
        cluster.SignalRelay()(signal.SIGUSR1, None)
    assert e.value.signum == signal.SIGUSR1


def _checkpointed(run_dir: Path) -> None:
    """A run folder whose `latest` names a complete checkpoint (toolrl.checkpoint)."""
    step = run_dir / "checkpoints" / "step_00000003"
    step.mkdir(parents=True)
    (step / "trainer.json").write_text("{}")
    (run_dir / "checkpoints" / "latest").write_text(step.name)


@pytest.mark.parametrize(
    ("code", "saved", "requeued"),
    [(138, True, True), (140, True, True), (138, False, False), (143, True, False)],
)
def test_a_warned_driver_requeues_the_job_when_there_is_a_checkpoint(
    slurm: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    code: int,
    saved: bool,
    requeued: bool,
) -> None:
    monkeypatch.chdir(tmp_path)  # the job's folder is runs/slurm-4242 under it
    if saved:
        _checkpointed(tmp_path / "runs" / "slurm-4242")
    calls = []
    monkeypatch.setattr(cluster, "start_nodes", lambda *a: calls.append("start") or [])
    monkeypatch.setattr(cluster, "wait_for_nodes", lambda *a: calls.append("wait"))
    monkeypatch.setattr(cluster, "stop_nodes", lambda procs: calls.append("stop"))
    monkeypatch.setattr(
        cluster.SignalRelay, "run", lambda self, cmd, env: calls.append(cmd) or code
    )
    monkeypatch.setattr(os, "environ", dict(os.environ))  # main() adds the token to it
    assert cluster.main(["trainer.total_steps=5"]) == code
    assert calls[:2] == ["start", "wait"] and calls[-1] == "stop"
    assert calls[2][-2:] == ["hydra.run.dir=runs/slurm-4242", "trainer.total_steps=5"]
    log = slurm.read_text() if slurm.exists() else ""
    assert ("requeue 4242" in log) == requeued


def test_a_submitit_job_requeues_itself_and_other_runs_do_not(slurm: Path, tmp_path: Path) -> None:
    _checkpointed(tmp_path)
    assert not cluster.requeue_submitit_job(str(tmp_path), {"SLURM_JOB_ID": "9"})  # sbatch
    assert not slurm.exists()
    submitit = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "9"}
    assert not cluster.requeue_submitit_job(str(tmp_path / "empty"), submitit)
    assert cluster.requeue_submitit_job(str(tmp_path), submitit)
    assert slurm.read_text() == "requeue 9\n"


def test_the_slurm_sweep_launcher_composes_with_a_save_before_the_time_limit() -> None:
    from hydra import compose, initialize_config_dir

    from toolrl.config import register

    register()
    with initialize_config_dir(
        config_dir=str(FAKE_SLURM.parent.parent / "conf"), version_base=None
    ):
        cfg = compose("config", ["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.signal_delay_s > 0 and launcher.max_num_timeout == 0
    assert launcher.nodes == 1


def test_the_stopped_heads_address_file_is_removed_and_anothers_kept(tmp_path: Path) -> None:
    file = tmp_path / "ray_current_cluster"
    file.write_text("10.0.0.1:6379")
    cluster.forget_address("10.0.0.1:6400", str(tmp_path))  # another cluster's: kept
    assert file.exists()
    cluster.forget_address("10.0.0.1:6379", str(tmp_path))
    assert not file.exists()
    cluster.forget_address("10.0.0.1:6379", str(tmp_path))  # gone already: no error
