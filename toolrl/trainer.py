"""The RL loop: roll out, score, compute advantages, update the policy, push weights, repeat.

    for step in range(total_steps):
        trajectories = rollout_group.rollout(prompts x n)        # multi-turn, with tools
        advantages   = algorithm.advantages(rewards, prompt ids)  # e.g. GRPO group norm
        batch        = TrainBatch.from_trajectories(...)          # sampled ids masked in only
        train_group.update(batch)                                 # FSDP2 clipped policy loss
        rollout_group.load_weights(train_group.weights())         # engines sample the new policy

The trainer does not know which algorithm, tools or task it runs: those come from config.
Run it through `python -m toolrl.main` (see README.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

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
        advantages: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        rollout: RolloutGroup,
        train: TrainGroup,
        logger: MetricsLogger,
        pad_id: int,
        model_path: str,
    ) -> None:
        self.cfg, self.task, self.advantages = cfg, task, advantages
        self.rollout, self.train, self.logger = rollout, train, logger
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

    def _train_episodes(self, step: int) -> list[Episode]:
        t, n = self.cfg.trainer, self.cfg.rollout.n
        eps = []
        for i, pid in enumerate(self.order.next_indices(t.prompts_per_step)):
            p = self.train_prompts[pid]
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
        a = self.cfg.algorithm
        t0 = time.perf_counter()
        trajs = self.rollout.rollout(self._train_episodes(step))
        t1 = time.perf_counter()
        metrics = rollout_metrics(trajs, "train")
        kept = [tr for tr in trajs if tr.infra_error is None]  # infra faults stay out of the loss
        batch = self._batch(kept)
        if a.recompute_old_logprobs:
            old = self.train.logprobs(batch)  # [B, T]
            metrics.update(logprob_drift(old, batch, kept))
            batch.old_logprobs = old
        if a.loss.kl_coef > 0:
            batch.ref_logprobs = self.train.ref_logprobs(batch)
        for mb in batch.split(a.mini_batches):
            for k, v in self.train.update(mb).items():
                metrics[f"train/{k}"] = v  # the last mini-batch's values
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

    def _batch(self, trajs: list[Trajectory]) -> TrainBatch:
        rewards = torch.tensor([tr.total_reward for tr in trajs], dtype=torch.float32)  # [N]
        groups = torch.tensor([tr.prompt_id for tr in trajs], dtype=torch.long)  # [N]
        adv = self.advantages(rewards, groups)  # [N]
        return TrainBatch.from_trajectories(trajs, adv, self.pad_id)


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
