"""The RL loop: roll out, score, compute advantages, update the policy, push weights, repeat.

    for step in range(total_steps):
        trajectories = rollout_group.rollout(prompts x n)     # multi-turn, with tools
        kept  = algorithm.select_groups(trajectories)          # (DAPO: refill groups with signal)
        batch = TrainBatch.from_trajectories(kept)             # sampled ids masked in only
        batch.old_logprobs, ref_logprobs, values = ...         # what the algorithm needs
        algorithm.prepare(batch)                               # advantages (GRPO, GAE, ...)
        train.update(batch); critic.update_critic(batch)       # FSDP2 policy / value losses
        rollout_group.load_weights(train.weights())            # engines sample the new policy

The trainer does not know which algorithm, tools or task it runs: those come from config.
Run it through `python -m toolrl.main` (see README.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from toolrl.algo.algorithm import Algorithm
from toolrl.algo.batch import TrainBatch
from toolrl.config import Config
from toolrl.data.order import PromptOrder
from toolrl.metrics import MetricsLogger, rollout_metrics
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
    ) -> None:
        """`critic` is the group holding the critic (`train` itself when colocated); needed
        only when the algorithm needs one."""
        self.cfg, self.task, self.algorithm = cfg, task, algorithm
        self.rollout, self.train, self.critic, self.logger = rollout, train, critic, logger
        self.pad_id, self.model_path = pad_id, model_path
        self.train_prompts = task.prompts("train")
        self.eval_prompts = task.prompts("eval")[: cfg.trainer.eval_prompts]
        self.order = PromptOrder(len(self.train_prompts), cfg.trainer.seed)  # resumable

    def fit(self) -> dict[str, Any]:
        """Train for trainer.total_steps; returns the last metrics, the final eval and the checkpoint."""
        t = self.cfg.trainer
        last: dict[str, Any] = {}
        for step in range(t.total_steps):
            metrics: dict[str, float] = {}
            if t.eval_every and step % t.eval_every == 0 or step == 0:
                metrics.update(self.evaluate())
            metrics.update(self.step(step))
            self.logger.log(step, metrics)
            self.logger.advance()
            last = metrics
        final = self.evaluate()
        self.logger.log(t.total_steps, final)
        last = {**last, **final}
        if t.save_checkpoint:
            out = Path(self.cfg.run_dir) / "checkpoint"
            self.train.save_hf(str(out), tokenizer_src=self.model_path)
            last["checkpoint"] = str(out)
        return last

    def _train_episodes(self, step: int, round_: int = 0) -> list[Episode]:
        t, n = self.cfg.trainer, self.cfg.rollout.n
        eps = []
        for i, pid in enumerate(self.order.next_indices(t.prompts_per_step)):
            p = self.train_prompts[pid]
            i += round_ * t.prompts_per_step  # refill rounds (dynamic sampling) draw anew
            for k in range(n):
                seed = hash((t.seed, step, i, k)) % (2**31 - 1)
                eps.append(Episode.of(pid, p, seed))
        return eps

    def evaluate(self) -> dict[str, float]:
        # Fixed seeds per prompt: every evaluation draws the same random numbers, so the
        # change in eval reward reflects the policy, not the sampling noise.
        eps = [
            Episode.of(i, p, seed=self.cfg.trainer.seed + 10_000 + i)
            for i, p in enumerate(self.eval_prompts)
        ]
        return rollout_metrics(self.rollout.rollout(eps, evaluate=True), "eval")

    def step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        trajs, kept, metrics = self._rollout(step)
        t1 = time.perf_counter()
        batch = TrainBatch.from_trajectories(kept, None, self.pad_id)
        # Nothing to learn from when every sample was a fault or no group had signal.
        if batch.num_tokens > 0:
            metrics.update(self._update(batch, kept))
        t2 = time.perf_counter()
        self.rollout.load_weights(self.train.weights(), version=step + 1)
        t3 = time.perf_counter()
        sampled = sum(sum(tr.loss_mask) for tr in trajs)
        metrics.update(
            {
                "time/rollout_s": t1 - t0,
                "time/train_s": t2 - t1,
                "time/weight_sync_s": t3 - t2,
                "time/step_s": t3 - t0,
                "perf/rollout_tokens_per_s": sampled / max(t1 - t0, 1e-9),
            }
        )
        return metrics

    def _update(self, batch: TrainBatch, kept: list[Trajectory]) -> dict[str, float]:
        """Score the batch with what the algorithm needs, set its advantages, and take one
        optimizer step per mini-batch (policy, then critic)."""
        a, metrics = self.algorithm, {}
        rollout_logprobs = batch.old_logprobs  # [B, T]
        if a.recompute_old_logprobs:
            old = self.train.logprobs(batch)  # [B, T]
            metrics.update(logprob_drift(old, batch, kept))
            batch.old_logprobs = old
        if a.needs_reference:
            batch.ref_logprobs = self.train.ref_logprobs(batch)
        if a.needs_critic:
            batch.values = self.critic.values(batch)
        metrics.update(a.prepare(batch, kept, rollout_logprobs))
        # A batch shrunk by faults or dynamic sampling may have fewer rows than mini-batches.
        parts = [mb for mb in batch.split(min(a.cfg.mini_batches, batch.size)) if mb.num_tokens]
        for mb in parts:
            for k, v in self.train.update(mb, a.loss).items():
                metrics[f"train/{k}"] = v  # the last mini-batch's values
            if a.needs_critic:
                metrics.update({f"critic/{k}": v for k, v in self.critic.update_critic(mb).items()})
        return metrics

    def _rollout(self, step: int) -> tuple[list[Trajectory], list[Trajectory], dict[str, float]]:
        """(every trajectory rolled out, those to train on, metrics). Infra faults stay out of
        the loss; with dynamic sampling, more prompts are rolled out until the batch holds
        prompts_per_step groups with signal or max_sampling_rounds rollouts were made."""
        a, want = self.algorithm, self.cfg.trainer.prompts_per_step
        rounds = a.cfg.max_sampling_rounds if a.cfg.dynamic_sampling else 1
        trajs: list[Trajectory] = []
        kept: list[Trajectory] = []
        groups = 0
        for r in range(rounds):
            new = self.rollout.rollout(self._train_episodes(step, r))
            trajs += new
            ok = [tr for tr in new if tr.infra_error is None]
            useful, n = a.select_groups(ok, want - groups)
            kept, groups = kept + useful, groups + n
            if groups >= want:
                break
        metrics = rollout_metrics(trajs, "train")
        if a.cfg.dynamic_sampling:
            metrics |= {"train/sampling_rounds": r + 1, "train/groups_kept": groups}
        return trajs, kept, metrics


def logprob_drift(
    trainer_lp: torch.Tensor, batch: TrainBatch, trajs: list[Trajectory]
) -> dict[str, float]:
    """How far the engine's logprobs are from the trainer's on the same sampled ids, overall
    and per assistant turn (a template or weight-sync bug shows up from turn 1 on).

    trainer_lp, batch.old_logprobs: [B, T], column t scores token t+1 (see algo/batch.py);
    row i is trajs[i].
    """
    diff = (trainer_lp - batch.old_logprobs).abs()  # [B, T]
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
