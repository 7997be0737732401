"""The algorithm seam: one object, built from `conf/algorithm/*.yaml`, that says which models a
run needs (reference, critic), which samples it trains on, and what their advantages are.

    algorithm = Algorithm(cfg.algorithm, max_total_tokens)
    algorithm.needs_reference / needs_critic    # the trainer builds only what these say
    kept, metrics = algorithm.select_groups(trajs, want)   # DAPO's dynamic sampling
    metrics = algorithm.prepare(batch, trajs)   # advantages (and returns)
    algorithm.weighs_mismatch            # IS weights: pi_old against the engine's logprobs
    batch.is_weights, metrics = algorithm.mismatch(pi_old, rollout_logprobs, mask)
    algorithm.old_logprobs_from_update   # the first mini-batch scores pi_old in its update
    policy update: toolrl.algo.losses.policy_loss with algorithm.loss

Switch with one override: `algorithm=ppo`, `algorithm=dapo`, `algorithm=rloo`, ... The trainer
asks this object; nothing else branches on algorithm settings.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor

from toolrl.algo.advantages import AdvantageInputs, Estimator
from toolrl.algo.batch import TrainBatch
from toolrl.algo.losses import explained_variance, masked_mean, mismatch_weights
from toolrl.config import AlgorithmConfig, LossConfig, instantiate
from toolrl.rollout.trajectory import Trajectory


def overlong_penalty(response_len: int, max_len: int, buffer: int, penalty: float) -> float:
    """DAPO's soft overlong punishment: 0 up to max_len - buffer tokens, then falling linearly
    to -penalty at max_len (and beyond)."""
    if buffer <= 0:
        return 0.0
    over = response_len - (max_len - buffer)
    return -penalty * min(max(over, 0), buffer) / buffer


def token_rewards(trajs: list[Trajectory], outcome: list[float], width: int) -> Tensor:
    """[N, T] each turn's credit on its last sampled column and the outcome on the trajectory's
    last one (columns as in algo/batch.py: token p is column p - 1)."""
    out = torch.zeros(len(trajs), width)
    for i, traj in enumerate(trajs):
        spans = [t for t in traj.turns if t.end > t.start]
        if not spans:
            continue  # nothing sampled: no column to credit (and no token to train)
        final = outcome[i]
        for turn in traj.turns:
            if turn.end > turn.start:
                out[i, turn.end - 2] += turn.reward
            else:
                final += turn.reward  # a turn that sampled nothing: credited with the outcome
        out[i, max(t.end for t in spans) - 2] += final
    return out


class Algorithm:
    def __init__(self, cfg: AlgorithmConfig, max_total_tokens: int) -> None:
        self.cfg, self.max_total_tokens = cfg, max_total_tokens
        self.estimator: Estimator = instantiate(cfg.advantages)

    @property
    def loss(self) -> LossConfig:
        return self.cfg.loss

    @property
    def needs_critic(self) -> bool:
        return bool(getattr(self.estimator, "needs_critic", False))

    @property
    def needs_reference(self) -> bool:
        return self.cfg.loss.kl_coef > 0 or self.cfg.kl_in_reward > 0

    @property
    def recompute_old_logprobs(self) -> bool:
        return self.cfg.old_logprobs == "recompute"

    @property
    def weighs_mismatch(self) -> bool:
        """Whether the trainer weighs each token by pi_old / pi_engine (`mismatch`). Only with a
        recomputed pi_old: with the rollout's, the loss corrects the ratio itself."""
        return self.recompute_old_logprobs and self.cfg.loss.mismatch.mode != "none"

    @property
    def old_logprobs_from_update(self) -> bool:
        """Recomputed pi_old of the first mini-batch comes from its own update's forward (the
        policy has not stepped on this batch yet), so the scoring pass covers only the later
        mini-batches; that update also computes its rows' IS weights. Not when `prepare` needs
        pi_old first (KL in the reward: anything new in `prepare` that reads
        batch.old_logprobs belongs in this condition)."""
        return self.recompute_old_logprobs and self.cfg.kl_in_reward == 0

    def mismatch(
        self, old_logprobs: Tensor, rollout_logprobs: Tensor, mask: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """(IS weights [B, T], train/mismatch/* metrics) of pi_old against the engine's
        logprobs, both [B, T], per `loss.mismatch` (toolrl.algo.losses.mismatch_weights)."""
        log_rho = old_logprobs - rollout_logprobs  # trainer vs engine, [B, T]
        weights, m = mismatch_weights(log_rho, mask, self.cfg.loss.mismatch)
        return weights, {f"train/{k}": v.item() for k, v in m.items()}

    def select_groups(self, trajs: list[Trajectory], want: int) -> tuple[list[Trajectory], int]:
        """With dynamic sampling, the first `want` groups whose rewards differ (a group whose
        samples all scored alike has zero advantage everywhere); else all. Returns (kept,
        number of groups kept)."""
        groups: dict[int, list[Trajectory]] = defaultdict(list)
        for tr in trajs:
            groups[tr.prompt_id].append(tr)
        if not self.cfg.dynamic_sampling:
            return trajs, len(groups)
        useful = [g for g in groups.values() if len({self._reward(t) for t in g}) > 1][:want]
        return [t for g in useful for t in g], len(useful)

    def _reward(self, traj: Trajectory) -> float:
        """The total reward after the overlong penalty."""
        return traj.total_reward + self._penalty(traj)

    def _penalty(self, traj: Trajectory) -> float:
        max_len, c = self.max_total_tokens - traj.prompt_len, self.cfg
        return overlong_penalty(traj.response_len, max_len, c.overlong_buffer, c.overlong_penalty)

    def prepare(self, batch: TrainBatch, trajs: list[Trajectory]) -> dict[str, float]:
        """Set the batch's advantages (and returns); returns metrics.

        batch.old_logprobs (recomputed or the rollout's; with `old_logprobs_from_update`, the
        first mini-batch's rows still hold the rollout's, so nothing here may read them then),
        batch.ref_logprobs (when needs_reference) and batch.values (when needs_critic) are set.
        """
        x = self._inputs(batch, trajs)
        batch.advantages, batch.returns = self.estimator(x)
        mask = batch.loss_mask
        metrics = {
            "train/advantage_mean": masked_mean(batch.advantages, mask).item(),
            "train/advantage_abs": masked_mean(batch.advantages.abs(), mask).item(),
        }
        if self.cfg.overlong_buffer > 0:
            metrics["train/overlong_penalty"] = float((x.rewards - _totals(trajs)).mean())
        if batch.values is not None and batch.returns is not None:
            metrics["critic/explained_variance"] = explained_variance(
                batch.values, batch.returns, mask
            )
            metrics["critic/value_mean"] = masked_mean(batch.values, mask).item()
            metrics["critic/return_mean"] = masked_mean(batch.returns, mask).item()
        return metrics

    def _inputs(self, batch: TrainBatch, trajs: list[Trajectory]) -> AdvantageInputs:
        penalty = [self._penalty(t) for t in trajs]
        rewards = [t.total_reward + p for t, p in zip(trajs, penalty, strict=True)]
        outcome = [t.reward + p for t, p in zip(trajs, penalty, strict=True)]  # on the last token
        mask = batch.loss_mask
        per_token = token_rewards(trajs, outcome, mask.shape[1])  # [N, T]
        if self.cfg.kl_in_reward > 0:
            kl = batch.old_logprobs - batch.ref_logprobs  # k1, [N, T]
            per_token = per_token - self.cfg.kl_in_reward * kl * mask
        names = sorted({k for t in trajs for k in t.info.get("reward_components", {})})
        comps = [[t.info.get("reward_components", {}).get(k, 0.0) for k in names] for t in trajs]
        weights = {k: w for t in trajs for k, w in t.info.get("reward_weights", {}).items()}
        w = [weights.get(k, 1.0) for k in names]
        shaping = [_residual(r, c, w) for r, c in zip(rewards, comps, strict=True)]
        return AdvantageInputs(
            rewards=torch.tensor(rewards, dtype=torch.float32),
            groups=torch.tensor([t.prompt_id for t in trajs], dtype=torch.long),
            token_rewards=per_token,
            mask=mask,
            components=torch.tensor(comps, dtype=torch.float32).reshape(len(trajs), len(names)),
            weights=torch.tensor(w, dtype=torch.float32),
            values=batch.values,
            shaping=torch.tensor(shaping, dtype=torch.float32),
        )


def _residual(reward: float, components: list[float], weights: list[float]) -> float:
    """The part of a reward no component gave (an environment's step rewards, the overlong
    penalty), in float64; what is left of rounding alone counts as 0."""
    rest = reward - sum(w * c for w, c in zip(weights, components, strict=True))
    return rest if abs(rest) > 1e-9 * max(1.0, abs(reward)) else 0.0


def _totals(trajs: list[Trajectory]) -> Tensor:
    return torch.tensor([t.total_reward for t in trajs], dtype=torch.float32)
