"""The RL loop: roll out, score, compute advantages, update the policy, push weights, repeat.

    for step in range(total_steps):
        trajectories = rollout_group.rollout(prompts x n)     # multi-turn, with tools
        kept  = algorithm.select_groups(trajectories)          # (DAPO: refill groups with signal)
        batch = TrainBatch.from_trajectories(kept)             # sampled ids masked in only
        batch.old_logprobs, ref_logprobs, values = ...         # what the algorithm needs
        algorithm.prepare(batch)                               # advantages (GRPO, GAE, ...)
        train.update(batch); critic.update_critic(batch)       # FSDP2 policy / value losses
        rollout_group.load_weights(train.weights())            # engines sample the new policy

With trainer.max_staleness=1 the engines roll out batch k+1 (with the weights before
update k) while update k runs: push w_k, start rollout k+1, update on batch k, collect
rollout k+1. Each batch is then one update old; the loss's mismatch correction weighs it.

Every trainer.save_every steps, at the end and on a stop signal it checkpoints what it needs
to continue (toolrl.checkpoint); `resume_from` continues from such a checkpoint, and a stop
signal (toolrl.preemption) abandons the rollout in flight.

The trainer does not know which algorithm, tools or task it runs: those come from config.
Run it through `python -m toolrl.main` (see README.md).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolrl.algo.algorithm import Algorithm
from toolrl.algo.batch import TrainBatch
from toolrl.checkpoint import (
    Checkpointer,
    fixed_config,
    read_state,
    restore_driver_rng,
    save_driver_rng,
)
from toolrl.config import Config, TrainerConfig
from toolrl.data.order import PromptOrder
from toolrl.metrics import (
    MetricsLogger,
    cpu_seconds,
    pass_metrics,
    rollout_metrics,
    trajectory_records,
)
from toolrl.preemption import Preempted, StopRequest
from toolrl.rollout.agent_loop import Episode
from toolrl.rollout.trajectory import Trajectory
from toolrl.workers.rollout import RolloutGroup
from toolrl.workers.train_group import TrainGroup


class Trainer:
    def __init__(
        self,
        cfg: Config,
        task: Any,
        algorithm: Algorithm,
        rollout: RolloutGroup,
        train: TrainGroup,
        logger: MetricsLogger,
        pad_id: int,
        model_path: str,
        critic: TrainGroup | None = None,
        resume_from: Path | None = None,
        stop: StopRequest | None = None,
        tokenizer: Any = None,
    ) -> None:
        """`critic` is the group holding the critic (`train` itself when colocated); needed
        only when the algorithm needs one. `resume_from`: a checkpoint to continue from
        (toolrl.checkpoint); `stop`: the flag stop signals set (toolrl.preemption);
        `tokenizer`: shows the sampled text of the trajectories logged each step."""
        self.cfg, self.task, self.algorithm = cfg, task, algorithm
        self.rollout, self.train, self.critic, self.logger = rollout, train, critic, logger
        self.pad_id, self.model_path = pad_id, model_path
        self.train_prompts = task.prompts("train")
        self.eval_prompts = task.prompts("eval")[: cfg.trainer.eval_prompts]
        self.order = PromptOrder(len(self.train_prompts), cfg.trainer.seed)  # resumable
        self.next_rollout: Future | None = None  # max_staleness=1: the batch being rolled out
        self.engine_version = 0  # updates reflected in the engines' weights
        self.resume_from, self.stop = resume_from, stop or StopRequest()
        self.checkpointer = Checkpointer(cfg.run_dir, cfg.trainer.keep_last)
        self.completed = 0  # training steps done (updates applied to the policy)
        self.order_before: dict[int, dict[str, int]] = {}  # batch -> order state before it
        self.decode = None if tokenizer is None else tokenizer.decode  # for display only

    def fit(self) -> dict[str, Any]:
        """Train up to trainer.total_steps (from a checkpoint when resuming); returns the last
        metrics, the final eval and the exported checkpoint. A stop signal ends it with
        Preempted after saving the last completed step."""
        t = self.cfg.trainer
        self.completed = saved = self._restore(self.resume_from) if self.resume_from else 0
        last: dict[str, Any] = {}
        try:
            for step in range(self.completed, t.total_steps):
                self.stop.check()
                evaluate = t.eval_every and step % t.eval_every == 0 or step == 0
                last = self.step(step, bool(evaluate))
                self.logger.log(step, last)
                self.logger.advance()
                self.completed = step + 1
                if t.save_every and self.completed % t.save_every == 0:
                    saved = self._save(self.completed)
            self._push_weights(t.total_steps)
            final = self.evaluate(t.total_steps)
        except Preempted as e:
            e.completed = self.completed
            if t.save_every and self.completed > saved and not e.immediate:
                self._save(self.completed)
            raise
        self.logger.log(t.total_steps, final)
        last = {**last, **final}
        if t.save_every and saved < t.total_steps:
            self._save(t.total_steps)
        if t.save_checkpoint:
            out = Path(self.cfg.run_dir) / "checkpoint"
            self.train.save_hf(str(out), tokenizer_src=self.model_path)
            last["checkpoint"] = str(out)
        return last

    def _save(self, step: int) -> int:
        """Checkpoint the state after `step` training steps (toolrl.checkpoint); returns step."""
        tmp = self.checkpointer.begin(step)
        for group in self._trained_groups():
            group.save_state(str(tmp / "train"))
        save_driver_rng(tmp)
        state = {
            "step": step,
            # batch `step` may be drawn already (overlap, or a stop mid-rollout): not yet used
            "prompt_order": self.order_before.get(step, self.order.state_dict()),
            "wandb_id": self.logger.run_id,
            "fixed": fixed_config(self.cfg),
        }
        self.checkpointer.commit(tmp, step, state)
        return step

    def _restore(self, path: Path) -> int:
        """Load a checkpoint into the groups and the engines; returns its step."""
        state = read_state(path)
        for group in self._trained_groups():
            group.load_state(str(path / "train"))
        self.order.load_state_dict(state["prompt_order"])
        restore_driver_rng(path)
        self._push_weights(state["step"])
        return state["step"]

    def _trained_groups(self) -> list[TrainGroup]:
        """The groups holding trained state: the policy's, and the critic's when apart."""
        apart = self.critic is not None and self.critic is not self.train
        return [self.train, self.critic] if apart else [self.train]

    def _roll(self, episodes: list[Episode], evaluate: bool = False) -> list[Trajectory]:
        """Roll out, giving up when a stop signal arrives (the rollout has no time bound)."""
        return self.stop.wait(self.rollout.start(episodes, evaluate))

    def _train_episodes(self, step: int, round_: int = 0) -> list[Episode]:
        t, n = self.cfg.trainer, self.cfg.rollout.n
        if round_ == 0:  # where the order stood before batch `step` drew (what a save keeps)
            self.order_before = {k: v for k, v in self.order_before.items() if k >= step - 1}
            self.order_before[step] = self.order.state_dict()
        eps = []
        for i, pid in enumerate(self.order.next_indices(t.prompts_per_step)):
            p = self.train_prompts[pid]
            i += round_ * t.prompts_per_step  # refill rounds (dynamic sampling) draw anew
            for k in range(n):
                seed = hash((t.seed, step, i, k)) % (2**31 - 1)
                eps.append(Episode.of(pid, p, seed))
        return eps

    def evaluate(self, step: int) -> dict[str, float]:
        """Each eval prompt rolled out trainer.eval_samples times: eval/* means over all
        samples, and eval/pass@k. Fixed seeds per (prompt, sample): every evaluation draws the
        same random numbers, so the change in eval reward reflects the policy, not the
        sampling noise. `step`: updates so far, for the logged samples."""
        t = self.cfg.trainer
        eps = eval_episodes(self.eval_prompts, t.seed, t.eval_samples)
        trajs = self._roll(eps, evaluate=True)
        self._log_samples(step, trajs, self.eval_prompts, "eval_trajectories")
        return eval_metrics(trajs, t)

    def _log_samples(
        self, step: int, trajs: list[Trajectory], prompts: list[Any], table: str
    ) -> None:
        """The first logger.trajectories_per_step trajectories (the first prompt's samples
        first; prompt ids index `prompts`) to <table>.jsonl and wandb."""
        count = self.cfg.logger.trajectories_per_step
        if count:
            records = trajectory_records(
                trajs[:count], step, lambda pid: prompts[pid].messages, self.decode
            )
            self.logger.log_trajectories(step, records, table)

    def step(self, step: int, evaluate: bool = False) -> dict[str, float]:
        """One step: (evaluate,) roll out, update. The engines evaluate and sample with the
        weights of `step` updates, except that with max_staleness=1 batch `step` was sampled
        before update step-1 finished."""
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        overlap = self.cfg.trainer.max_staleness > 0
        got = self._overlapped_batch(step, evaluate) if overlap else self._batch(step, evaluate)
        self._log_samples(step, got.trajs, self.train_prompts, "trajectories")
        t1 = time.perf_counter()
        metrics = got.metrics | staleness(got.kept, step)
        batch = TrainBatch.from_trajectories(got.kept, None, self.pad_id)
        # Nothing to learn from when every sample was a fault or no group had signal.
        if batch.num_tokens > 0:
            metrics.update(self._update(batch, got.kept))
        t2 = time.perf_counter()
        if not overlap:
            metrics.update(self._push_weights(step + 1))
        sampled = sum(sum(tr.loss_mask) for tr in got.trajs)
        metrics.update(
            {
                "time/rollout_s": got.wait_s,  # what the trainer waited for the batch
                "time/train_s": t2 - t1,
                "time/step_s": time.perf_counter() - t0 - got.eval_s,
                "time/cpu_s": cpu_seconds() - cpu0,  # this run's processes on this node
                "perf/rollout_tokens_per_s": sampled / max(got.rollout_s, 1e-9),
                "faults/rollout_worker_restarts": self.rollout.restarts,  # so far in this run
            }
        )
        return metrics

    def _batch(self, step: int, evaluate: bool) -> Collected:
        """Synchronous: evaluate (weights of `step` updates), then roll out the batch."""
        metrics, t0 = {}, time.perf_counter()
        if evaluate:
            metrics = self.evaluate(step)
        t1 = time.perf_counter()
        trajs, kept, rollout_m = self._rollout(step)
        took = time.perf_counter() - t1
        return Collected(trajs, kept, metrics | rollout_m, took, took, t1 - t0)

    def _overlapped_batch(self, step: int, evaluate: bool) -> Collected:
        """max_staleness=1: collect the batch rolled out during the last update, push that
        update's weights, evaluate them, and start rolling out the next batch with them."""
        t0 = time.perf_counter()
        pending = self.next_rollout or self.rollout.start(self._train_episodes(step))
        trajs, kept, metrics = self._collect(self.stop.wait(pending))
        wait_s = time.perf_counter() - t0  # only the part the update did not hide
        rollout_s = self.rollout.last_rollout_s  # its own duration
        metrics |= self._push_weights(step)
        t1 = time.perf_counter()
        if evaluate:
            metrics |= self.evaluate(step)
        eval_s = time.perf_counter() - t1
        self.next_rollout = None
        if step + 1 < self.cfg.trainer.total_steps:
            self.next_rollout = self.rollout.start(self._train_episodes(step + 1))
        return Collected(trajs, kept, metrics, wait_s, rollout_s, eval_s)

    def _push_weights(self, version: int) -> dict[str, float]:
        """Load the policy's current weights (after `version` updates) into the engines."""
        if version == self.engine_version:
            return {}
        t0 = time.perf_counter()
        self.rollout.load_weights_from(self.train, version)
        self.engine_version = version
        return {"time/weight_sync_s": time.perf_counter() - t0}

    def _update(self, batch: TrainBatch, kept: list[Trajectory]) -> dict[str, float]:
        """Score the batch with what the algorithm needs, set its advantages, and take one
        optimizer step per mini-batch (policy, then critic)."""
        a, metrics = self.algorithm, {}
        clock = Clock(metrics)  # time/<phase>_s of the update's parts
        rollout_logprobs, mask = batch.old_logprobs, batch.loss_mask  # [B, T] each
        # A batch shrunk by faults or dynamic sampling may have fewer rows than mini-batches.
        n_parts = min(a.cfg.mini_batches, batch.size)
        # rows whose pi_old the first update scores itself; the pass scores the rest
        head = batch.split_sizes(n_parts)[0] if a.old_logprobs_from_update else 0
        if a.recompute_old_logprobs:
            batch.old_logprobs = rollout_logprobs.clone()  # rows [:head]: until that update
            if head < batch.size:
                with clock("old_logprobs"):
                    batch.old_logprobs[head:] = self.train.logprobs(batch.rows(head, batch.size))
        if a.needs_reference:
            with clock("ref_logprobs"):
                batch.ref_logprobs = self.train.ref_logprobs(batch)
        if a.needs_critic:
            with clock("values"):
                batch.values = self.critic.values(batch)
        with clock("advantages"):
            metrics.update(a.prepare(batch, kept))
            if a.weighs_mismatch:  # rows [:head] are weighed by their own update
                batch.is_weights, _ = a.mismatch(batch.old_logprobs, rollout_logprobs, mask)
        for i, mb in enumerate(batch.split(n_parts)):
            if not mb.num_tokens:
                continue
            with clock("policy_update"):
                if i == 0 and head:
                    mb.is_weights = None  # its pi_old is not scored yet
                    m, batch.old_logprobs[:head] = self.train.update_scoring_old(mb, a.loss)
                else:
                    m = self.train.update(mb, a.loss)
            metrics.update({f"train/{k}": v for k, v in m.items()})  # the last mini-batch's
            if a.needs_critic:
                with clock("critic_update"):
                    critic_m = self.critic.update_critic(mb)
                metrics.update({f"critic/{k}": v for k, v in critic_m.items()})
        if a.recompute_old_logprobs:
            metrics.update(logprob_drift(batch.old_logprobs, rollout_logprobs, batch, kept))
        if a.weighs_mismatch:  # over every row, now that each has its pi_old
            metrics.update(a.mismatch(batch.old_logprobs, rollout_logprobs, mask)[1])
        return metrics

    def _rollout(self, step: int) -> tuple[list[Trajectory], list[Trajectory], dict[str, float]]:
        """(every trajectory rolled out, those to train on, metrics). Infra faults stay out of
        the loss; with dynamic sampling, more prompts are rolled out until the batch holds
        prompts_per_step groups with signal or max_sampling_rounds rollouts were made."""
        a, want = self.algorithm, self.cfg.trainer.prompts_per_step
        if not a.cfg.dynamic_sampling:
            return self._collect(self._roll(self._train_episodes(step)))
        rounds = a.cfg.max_sampling_rounds
        trajs: list[Trajectory] = []
        kept: list[Trajectory] = []
        groups = 0
        for r in range(rounds):
            new = self._roll(self._train_episodes(step, r))
            trajs += new
            ok = [tr for tr in new if tr.infra_error is None]
            useful, n = a.select_groups(ok, want - groups)
            kept, groups = kept + useful, groups + n
            if groups >= want:
                break
        metrics = rollout_metrics(trajs, "train")
        metrics |= {"train/sampling_rounds": r + 1, "train/groups_kept": groups}
        return trajs, kept, metrics

    def _collect(
        self, trajs: list[Trajectory]
    ) -> tuple[list[Trajectory], list[Trajectory], dict[str, float]]:
        """(every trajectory, those to train on, metrics) of one rollout without refills."""
        ok = [tr for tr in trajs if tr.infra_error is None]
        kept, _ = self.algorithm.select_groups(ok, self.cfg.trainer.prompts_per_step)
        return trajs, kept, rollout_metrics(trajs, "train")


@dataclass
class Collected:
    """A step's batch: every trajectory, those to train on, their metrics (and the eval's)."""

    trajs: list[Trajectory]
    kept: list[Trajectory]
    metrics: dict[str, float]
    wait_s: float  # how long the trainer waited for it
    rollout_s: float  # how long rolling it out took
    eval_s: float  # evaluation time inside the step (not counted in time/step_s)


class Clock:
    """`with clock("phase"):` adds the block's seconds to metrics["time/phase_s"]."""

    def __init__(self, metrics: dict[str, float]) -> None:
        self.metrics = metrics

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            key = f"time/{phase}_s"
            self.metrics[key] = self.metrics.get(key, 0.0) + time.perf_counter() - t0


def staleness(trajs: list[Trajectory], step: int) -> dict[str, float]:
    """How many updates behind the policy being trained (`step` updates) the sampled turns'
    weights are: mean and max over turns."""
    lags = [step - turn.weight_version for tr in trajs for turn in tr.turns]
    if not lags:
        return {}
    return {"train/staleness_mean": sum(lags) / len(lags), "train/staleness_max": max(lags)}


def logprob_drift(
    trainer_lp: torch.Tensor, rollout_lp: torch.Tensor, batch: TrainBatch, trajs: list[Trajectory]
) -> dict[str, float]:
    """How far the engine's logprobs are from the trainer's on the same sampled ids, overall
    and per assistant turn (a template or weight-sync bug shows up from turn 1 on).

    trainer_lp, rollout_lp: [B, T], column t scores token t+1 (see algo/batch.py); row i is
    trajs[i]; batch.loss_mask says which columns were sampled.
    """
    diff = (trainer_lp - rollout_lp).abs()  # [B, T]
    sampled = diff[batch.loss_mask.bool()]
    if sampled.numel() == 0:
        return {}
    out = {
        "rollout/logprob_diff_mean": sampled.mean().item(),
        "rollout/logprob_diff_max": sampled.max().item(),
    }
    per_turn: dict[int, list[torch.Tensor]] = {}
    for i, traj in enumerate(trajs):
        for k, turn in enumerate(traj.turns):
            per_turn.setdefault(k, []).append(diff[i, turn.start - 1 : turn.end - 1])
    for k, parts in sorted(per_turn.items()):
        d = torch.cat(parts)
        if d.numel():
            out[f"rollout/logprob_diff_max_turn{k}"] = d.max().item()
    return out


SEED_OFFSET = 10_000  # eval seeds are trainer.seed + 10000 + prompt, as they always were
SAMPLE_STRIDE = 1_000_000  # apart per sample: distinct seeds below a million eval prompts


def eval_seed(seed: int, prompt: int, sample: int) -> int:
    """The fixed seed of sample `sample` of eval prompt `prompt` (sample 0: seed + 10000 +
    prompt, the seed evaluations used before several samples per prompt existed)."""
    return (seed + SEED_OFFSET + prompt + sample * SAMPLE_STRIDE) % (2**31 - 1)


def eval_episodes(prompts: list[Any], seed: int, samples: int) -> list[Episode]:
    """Each prompt `samples` times, prompt-major, each (prompt, sample) with its fixed seed:
    every evaluation of the same weights draws the same random numbers."""
    return [
        Episode.of(i, p, seed=eval_seed(seed, i, j))
        for i, p in enumerate(prompts)
        for j in range(samples)
    ]


def eval_metrics(trajs: list[Trajectory], t: TrainerConfig) -> dict[str, float]:
    """eval/* of rollout_metrics (means over every sample), and eval/pass@k for each k of
    trainer.eval_pass_k."""
    out = rollout_metrics(trajs, "eval")
    return out | pass_metrics(trajs, t.eval_pass_k, t.eval_pass_reward, "eval")
