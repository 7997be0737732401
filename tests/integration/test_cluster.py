"""`python -m toolrl.cluster` on a simulated two-node Slurm allocation: a short run places
the rollout engine and the training rank on different Ray nodes, the warning signal stops it
with a checkpoint and requeues the job, and the requeued job resumes and finishes.

The nodes are Ray node processes on this machine (`ray start`, one CPU each), started by
the launcher through tests/fake_slurm's srun; Slurm's variables are set as sbatch sets them.
It took 118 to 183 s in three runs on 2 cores: two Ray clusters, two vLLM starts, so it
runs on request:

    python -m pytest -m slow tests/integration/test_cluster.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.integration import runs
from tests.net import free_port
from toolrl import checkpoint

FAKE_SLURM = Path(__file__).resolve().parents[1] / "fake_slurm"
RUN = (
    "+experiment=smoke",
    "trainer.total_steps=3",
    "trainer.eval_every=0",
    "trainer.save_every=10",  # no periodic save before the stop: the stop's save is the one
    "trainer.train_group.world_size=1",
    "trainer.train_group.num_cpus_per_worker=1",
    "rollout.num_cpus_per_worker=1",
    "logger.wandb_mode=disabled",
)


def _launch(workdir: Path, mark: str) -> subprocess.Popen:
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{FAKE_SLURM}:{os.environ['PATH']}",
        "FAKE_SLURM_NODES": "node0 node1",
        "FAKE_SLURM_LOG": str(workdir / "slurm.log"),
        "SLURM_JOB_NODELIST": "node[0-1]",
        "SLURM_JOB_ID": "4242",
        "SLURM_CPUS_PER_TASK": "1",
        runs.MARK: mark,
    }
    cmd = [sys.executable, "-m", "toolrl.cluster", f"--port={port}", "--join-timeout=180", *RUN]
    out = open(workdir / f"launcher-{mark}.log", "w")  # noqa: SIM115 (the process keeps it)
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)


def _placement(run_dir: Path) -> dict[str, set[str]]:
    where = json.loads((run_dir / "placement.json").read_text())
    return {k: {x["node_id"] for x in v} for k, v in where.items()}


@pytest.mark.slow
def test_a_run_spreads_over_the_nodes_is_requeued_on_warning_and_resumes(
    tmp_path: Path, embedded_model: str
) -> None:
    run_dir = tmp_path / "runs" / "slurm-4242"  # the job's folder, the same after a requeue
    first, second = uuid.uuid4().hex, uuid.uuid4().hex
    try:
        proc = _launch(tmp_path, first)
        runs.wait_until(runs.has_step(run_dir, 0), proc)
        proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@180 sends the batch step
        assert proc.wait(timeout=300) == 128 + signal.SIGUSR1
        assert not runs.none_left(first, grace_s=60)  # Ray nodes and engines all stopped
        log = (tmp_path / "slurm.log").read_text()
        assert "srun on node1: " in log and "requeue 4242" in log
        saved = checkpoint.latest(run_dir / "checkpoints")
        assert saved is not None and (step := checkpoint.read_state(saved)["step"]) >= 1
        placed = _placement(run_dir)
        assert len(placed["rollout"] | placed["train"]) == 2  # both nodes used
        assert not placed["rollout"] & placed["train"]  # one CPU per node: apart

        proc = _launch(tmp_path, second)  # the requeued job: same id, same folder
        out = (tmp_path / f"launcher-{second}.log").read_text
        assert proc.wait(timeout=600) == 0, out()
        assert f"resuming after step {step} from" in out()
        rows = runs.rows(run_dir)
        assert [r["step"] for r in rows if "train/reward" in r] == [0, 1, 2]
        assert not _placement(run_dir)["rollout"] & _placement(run_dir)["train"]
        assert (run_dir / "checkpoint" / "model.safetensors").exists()
    finally:
        for mark in (first, second):
            runs.kill_marked(mark)


def test_a_local_clusters_processes_ignore_the_warning_signals() -> None:
    """submitit's SIGUSR2 reaches every process of the job step: Ray's and vLLM's processes
    must live on while the driver saves (toolrl.main.start_ray)."""
    import ray

    from toolrl.config import Config
    from toolrl.main import start_ray

    warnings = (signal.SIGUSR1, signal.SIGUSR2)
    before = {s: signal.getsignal(s) for s in warnings}
    cfg = Config()
    cfg.ray.num_cpus = 1
    try:
        start_ray(cfg)

        @ray.remote(num_cpus=0)
        def ignored() -> list[bool]:
            return [signal.getsignal(s) == signal.SIG_IGN for s in warnings]

        assert ray.get(ignored.remote()) == [True, True]
    finally:
        ray.shutdown()
        for s, handler in before.items():
            signal.signal(s, handler)
