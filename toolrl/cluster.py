"""Run toolrl over a Slurm allocation: a Ray cluster on its nodes, the driver, requeue.

    sbatch launch/slurm.sbatch trainer.total_steps=200 model.path=/models/Qwen2.5-0.5B
    python -m toolrl.cluster [--port 6379] [--join-timeout 300] OVERRIDES...   # what it runs

In the batch step (on the allocation's first node) it starts the Ray head there and a Ray
worker on every other node (`srun -w NODE ray start ... --block`), waits until every node
has joined, then runs `python -m toolrl.main ray.address=auto OVERRIDES` in a run folder
named after the job (runs/slurm-<job id>, unless hydra.run.dir is given), so that a
requeued job finds its checkpoints there (trainer.resume=auto).

Signals: SIGUSR1, SIGUSR2, SIGTERM and SIGINT are passed on to the driver, which saves a
checkpoint and exits with 128 + the signal (toolrl.preemption); one that arrives before the
driver runs stops the start. `#SBATCH --signal=B:USR1@180` asks Slurm for that warning on the
batch step only, so the Ray workers on the other nodes keep running while the driver saves.
After a warning (SIGUSR1, SIGUSR2) the job is requeued (`scontrol requeue`; the script asks
for `#SBATCH --requeue`) when its run folder holds a checkpoint to resume from, unless
--no-requeue is given. SIGTERM (scancel, the time limit) reaches every process of every step
from Slurm itself and stops the Ray nodes too: it stops the job, with no requeue.

Ray's token authentication: unless RAY_AUTH_MODE=disabled or a token is given
(RAY_AUTH_TOKEN), a fresh token for the job is passed to every node and the driver through
the environment (srun passes it on), so no node waits on a token file the head writes.
TOOLRL_RAY_START_ARGS adds arguments to every `ray start` (custom resources, a temp dir).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
# the driver's exit codes after a warning before a time limit or a pre-emption
REQUEUE_CODES = {128 + signal.SIGUSR1, 128 + signal.SIGUSR2}


@dataclass
class Allocation:
    """What a Slurm job step sees of its allocation."""

    job_id: str | None
    nodes: list[str]  # host names; the first runs the batch step
    cpus_per_node: int
    gpus_per_node: int

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Allocation:
        env = dict(os.environ if env is None else env)
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise SystemExit(
                "toolrl.cluster: SLURM_JOB_NODELIST is not set; run it inside an allocation "
                "(sbatch launch/slurm.sbatch ...), or run python -m toolrl.main directly"
            )
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
        )
        cpus = env.get("SLURM_CPUS_PER_TASK") or env.get("SLURM_CPUS_ON_NODE") or "1"
        gpus = env.get("SLURM_GPUS_ON_NODE") or "0"
        return cls(env.get("SLURM_JOB_ID"), out.stdout.split(), int(cpus), int(gpus))


def job_environment(env: dict[str, str]) -> dict[str, str]:
    """The environment for every node and the driver: with a token for Ray's authentication
    when it is on (see the module docstring)."""
    if env.get("RAY_AUTH_MODE", "").lower() == "disabled" or env.get("RAY_AUTH_TOKEN"):
        return dict(env)
    return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


def ray_start(alloc: Allocation, head: str | None, port: int) -> list[str]:
    """`ray start` for the head (head=None) or a worker joining head:port, blocking."""
    ray = str(Path(sys.executable).with_name("ray"))
    cmd = [ray, "start", "--block", "--disable-usage-stats"]
    cmd += [f"--num-cpus={alloc.cpus_per_node}", f"--num-gpus={alloc.gpus_per_node}"]
    if head is None:
        cmd += ["--head", f"--port={port}", "--include-dashboard=false"]
    else:
        cmd += [f"--address={head}:{port}"]
    return cmd + shlex.split(os.environ.get("TOOLRL_RAY_START_ARGS", ""))


def start_nodes(
    alloc: Allocation, head_ip: str, port: int, env: dict[str, str]
) -> list[subprocess.Popen]:
    """The head here, a worker on each other node through srun; the processes, head first."""
    # their own sessions: a Ctrl-C at the terminal reaches the launcher, not them
    procs = [subprocess.Popen(ray_start(alloc, None, port), env=env, start_new_session=True)]
    for node in alloc.nodes[1:]:
        srun = ["srun", "--nodes=1", "--ntasks=1", "-w", node] + ray_start(alloc, head_ip, port)
        procs.append(subprocess.Popen(srun, env=env, start_new_session=True))
    return procs


def wait_for_nodes(address: str, count: int, procs: list[subprocess.Popen], timeout_s: float):
    """Return once `count` Ray nodes are alive; SystemExit if a start failed or on timeout."""
    import ray

    deadline = time.monotonic() + timeout_s
    while True:  # the head's GCS comes up first; until then ray.init fails
        try:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
            break
        except (ConnectionError, RuntimeError):
            _check_alive(procs, deadline, "the Ray head did not start")
            time.sleep(1)
    try:
        while (alive := sum(n["Alive"] for n in ray.nodes())) < count:
            _check_alive(procs, deadline, f"{alive} of {count} Ray nodes joined")
            time.sleep(1)
    finally:
        ray.shutdown()


def _check_alive(procs: list[subprocess.Popen], deadline: float, what: str) -> None:
    dead = [p for p in procs if p.poll() is not None]
    if dead or time.monotonic() > deadline:
        why = f"{' '.join(dead[0].args)} exited with {dead[0].returncode}" if dead else "timeout"
        raise SystemExit(f"toolrl.cluster: {what} ({why}); see the job's output")


def driver_command(alloc: Allocation, overrides: list[str]) -> list[str]:
    """toolrl.main on the cluster, in the job's own run folder unless one is given."""
    cmd = [sys.executable, "-m", "toolrl.main", "ray.address=auto"]
    if alloc.job_id and not any(o.startswith("hydra.run.dir=") for o in overrides):
        cmd.append(f"hydra.run.dir=runs/slurm-{alloc.job_id}")
    return cmd + overrides


class Interrupted(Exception):
    """A stop signal arrived before the driver started."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class SignalRelay:
    """The launcher's handler of FORWARDED: passes a signal on to the driver while it runs;
    before it runs, stops the start (Interrupted); after it ended, ignores it (the nodes are
    being stopped)."""

    def __init__(self) -> None:
        self.driver: subprocess.Popen | None = None
        self.ended = False

    def __call__(self, signum: int, frame: object) -> None:
        if self.driver is not None and self.driver.poll() is None:
            self.driver.send_signal(signum)
        elif not self.ended:
            raise Interrupted(signum)

    def run(self, cmd: list[str], env: dict[str, str]) -> int:
        """Run the driver to its end; its exit code."""
        self.driver = subprocess.Popen(cmd, env=env)
        try:
            return self.driver.wait()
        finally:
            self.ended = True


def stop_nodes(procs: list[subprocess.Popen], grace_s: float = 30) -> None:
    """Workers first, then the head; SIGTERM, then SIGKILL after grace_s."""
    for p in reversed(procs):
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in reversed(procs):
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()


def forget_address(address: str, temp_dir: str = "/tmp/ray") -> None:
    """Remove the head's address that `ray start` left for `ray.init()` to find (`ray stop`
    would remove it, but also stop every other Ray on the node): a later run on this machine
    would try to join the stopped cluster."""
    path = Path(temp_dir, "ray_current_cluster")
    try:
        if path.read_text().strip() == address:
            path.unlink()
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=6379, help="the Ray head's port")
    ap.add_argument("--join-timeout", type=float, default=300, help="seconds for nodes to join")
    ap.add_argument("--no-requeue", action="store_true", help="do not requeue after a stop")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for toolrl.main")
    args = ap.parse_args(argv)
    alloc = Allocation.from_env()
    env = job_environment(dict(os.environ))
    # this process joins the cluster too, to count its nodes: Ray reads the token at import
    os.environ.update(env)
    import ray

    relay = SignalRelay()
    previous = {s: signal.signal(s, relay) for s in FORWARDED}
    head_ip = ray.util.get_node_ip_address()
    address = f"{head_ip}:{args.port}"
    print(f"toolrl.cluster: Ray head {address}; nodes {', '.join(alloc.nodes)}", flush=True)
    cmd = driver_command(alloc, args.overrides)
    procs: list[subprocess.Popen] = []
    try:
        procs = start_nodes(alloc, head_ip, args.port, env)
        wait_for_nodes(address, len(alloc.nodes), procs, args.join_timeout)
        code = relay.run(cmd, {**env, "RAY_ADDRESS": address})
    except Interrupted as e:
        print(f"toolrl.cluster: {e} before the run started; stopping", flush=True)
        code = 128 + e.signum
    finally:
        relay.ended = True
        stop_nodes(procs)
        forget_address(address)
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code in REQUEUE_CODES and alloc.job_id and not args.no_requeue:
        requeue_if_resumable(alloc.job_id, run_dir_of(cmd))
    return code


def run_dir_of(cmd: list[str]) -> str | None:
    """The hydra.run.dir a toolrl.main command line sets, if any."""
    dirs = [c.split("=", 1)[1] for c in cmd if c.startswith("hydra.run.dir=")]
    return dirs[-1] if dirs else None


def requeue_if_resumable(job_id: str, run_dir: str | None) -> bool:
    """Requeue the job when its run folder holds a checkpoint to resume from (a run with
    trainer.save_every=0, or stopped before its first save, would start over, again and
    again); True if it did."""
    from toolrl import checkpoint

    if run_dir is None or checkpoint.latest(checkpoint.checkpoints_dir(run_dir)) is None:
        print(f"toolrl: no checkpoint in {run_dir}; job {job_id} not requeued", flush=True)
        return False
    requeue(job_id)
    return True


def requeue(job_id: str) -> None:
    print(f"toolrl: stopped after saving; requeueing Slurm job {job_id}", flush=True)
    subprocess.run(["scontrol", "requeue", job_id], check=False)


def requeue_submitit_job(run_dir: str, env: dict[str, str] | None = None) -> bool:
    """Under hydra-submitit-launcher (its job script sets SUBMITIT_EXECUTOR=slurm), a run that
    stopped on a warning requeues its own job, which resumes in the same sweep folder; True if
    it did. (Under toolrl.cluster the launcher requeues instead.)"""
    env = os.environ if env is None else env
    job = env.get("SLURM_JOB_ID")
    if env.get("SUBMITIT_EXECUTOR") != "slurm" or not job:
        return False
    return requeue_if_resumable(job, run_dir)


if __name__ == "__main__":
    sys.exit(main())
