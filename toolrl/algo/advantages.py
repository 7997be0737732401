"""Advantage estimators: how much better each sampled token did than expected.

An estimator is chosen in `conf/algorithm/*.yaml` (`advantages._target_`) and called with an
`AdvantageInputs`; it returns per-token advantages [N, T] (0 off the loss mask) and, when it
learns a value function, the returns the critic regresses on. The group estimators (GRPO,
Dr. GRPO, RLOO, GDPO) score whole trajectories; REINFORCE++ and GAE work on token rewards.

GAE over tool turns, the rule in full (columns as in algo/batch.py: column t is the step that
samples token t+1, its value V_t is the critic's estimate before that token):

    only sampled columns (mask 1) are steps; prompt, tool answers and template glue are not
    a step's next step is the next *sampled* column, however many masked columns lie between
    so the bootstrap gamma * V_next reaches across a tool answer to the model's next token
    a turn's credit (Turn.reward) is the reward of its last sampled column
    the outcome reward is the reward of the trajectory's last sampled column
    after the last sampled column V_next = 0 (the episode ends)
    delta_t = r_t + gamma * V_next - V_t;  A_t = delta_t + gamma * lam * A_next
    returns_t = A_t + V_t is the critic's target; masked columns get A = returns = 0

Pure tensor functions; run `python -m pytest tests/unit/test_advantages.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass
class AdvantageInputs:
    """What an estimator may read; built from trajectories by `toolrl.algo.algorithm`."""

    rewards: Tensor  # [N] each trajectory's total reward (outcome + every turn's credit)
    groups: Tensor  # [N] long, the prompt id: samples of one prompt form a group
    token_rewards: Tensor  # [N, T] the same rewards placed on columns (see the rule above)
    mask: Tensor  # [N, T] float 0/1, 1 on sampled columns
    components: Tensor  # [N, K] each reward component's value (unweighted); K may be 0
    weights: Tensor  # [K] each component's weight in the total
    values: Tensor | None = None  # [N, T] critic values; only for estimators needing a critic
    # [N] the part of `rewards` no reward component gave: an environment's step rewards, the
    # overlong penalty (GDPO normalises it as one more component)
    shaping: Tensor | None = None


class Estimator(Protocol):
    needs_critic: bool  # the trainer keeps a critic group only when this is True
    needs_groups: bool  # compares the samples of a prompt: rollout.n must be >= 2
    token_level: bool  # reads token_rewards (so per-token KL in the reward reaches it)

    def __call__(self, x: AdvantageInputs) -> tuple[Tensor, Tensor | None]:
        """(advantages [N, T], returns [N, T] or None when no value function is learned)."""
        ...


def grpo_advantages(
    rewards: Tensor, group_ids: Tensor, eps: float = 1e-6, scale_by_std: bool = True
) -> Tensor:
    """Reward minus its group mean, optionally divided by the group std (+eps).

    rewards: [N] float; group_ids: [N] long (any values, e.g. prompt ids; need not be
    contiguous). Returns [N] float32. The std is the unbiased (N-1) one, as in the GRPO
    paper's reference code. A group of one sample has no baseline and gets 0.
    """
    if rewards.dim() != 1 or rewards.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)}")
    rewards = rewards.float()
    # inverse: [N] index of each sample's group in 0..G-1
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    num_groups = counts.numel()
    sums = torch.zeros(num_groups).index_add_(0, inverse, rewards)  # [G]
    means = sums / counts  # [G]
    centred = rewards - means[inverse]  # [N]
    if scale_by_std:
        sq = torch.zeros(num_groups).index_add_(0, inverse, centred.square())  # [G]
        std = (sq / (counts - 1).clamp(min=1)).sqrt()  # [G]
        centred = centred / (std[inverse] + eps)
    return torch.where(counts[inverse] > 1, centred, torch.zeros_like(centred))


def rloo_advantages(rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Reward minus the mean of the *other* samples of its group (leave-one-out). [N] -> [N].

    Equals n/(n-1) * (r - group mean); a group of one gets 0.
    """
    centred = grpo_advantages(rewards, group_ids, scale_by_std=False)  # [N]
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n = counts[inverse].float()  # [N]
    return centred * n / (n - 1).clamp(min=1)


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over mask == 1 (unbiased std); 0 off the mask. x, mask: [N, T]."""
    n = mask.sum()
    mean = (x * mask).sum() / n.clamp(min=1)
    var = ((x - mean).square() * mask).sum() / (n - 1).clamp(min=1)
    return torch.where(mask > 0, (x - mean) * torch.rsqrt(var + eps), torch.zeros_like(x))


def discounted_returns(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Reward-to-go over sampled columns only: G_t = r_t + gamma * G_next. [N, T] -> [N, T].

    Masked columns are not steps: they neither discount nor receive a return (0).
    """
    out = torch.zeros_like(token_rewards)
    running = torch.zeros(token_rewards.shape[0])  # [N] G of the next sampled column
    for t in reversed(range(token_rewards.shape[1])):
        m = mask[:, t] > 0
        g = token_rewards[:, t] + gamma * running
        out[:, t] = torch.where(m, g, torch.zeros_like(g))
        running = torch.where(m, g, running)
    return out


def gae_advantages(
    token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """GAE over sampled columns, bootstrapping across masked spans (the rule above).

    token_rewards, values, mask: [N, T]. Returns (advantages, returns), both [N, T], 0 off mask.
    """
    adv = torch.zeros_like(token_rewards)
    next_value = torch.zeros(token_rewards.shape[0])  # [N] V of the next sampled column
    next_adv = torch.zeros(token_rewards.shape[0])  # [N] A of the next sampled column
    for t in reversed(range(token_rewards.shape[1])):
        m = mask[:, t] > 0
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = torch.where(m, a, torch.zeros_like(a))
        next_value = torch.where(m, values[:, t], next_value)
        next_adv = torch.where(m, a, next_adv)
    return adv, torch.where(mask > 0, adv + values, torch.zeros_like(adv))


def _per_token(adv: Tensor, mask: Tensor) -> Tensor:
    """One scalar per trajectory on all its sampled columns. adv [N], mask [N, T] -> [N, T]."""
    return adv.float().reshape(-1, 1) * mask


@dataclass
class GroupNorm:
    """GRPO: each trajectory's reward against its group (mean, and std when scale_by_std).

    scale_by_std=False is Dr. GRPO's estimator. components_separately=True is GDPO: each reward
    component is normalised within the group on its own, the weighted sum is then whitened
    over the batch, so a component with a large spread cannot drown the others.
    """

    scale_by_std: bool = True
    eps: float = 1e-6
    components_separately: bool = False
    needs_critic, needs_groups, token_level = False, True, False

    def __call__(self, x: AdvantageInputs) -> tuple[Tensor, Tensor | None]:
        if not self.components_separately or x.components.shape[1] == 0:
            adv = grpo_advantages(x.rewards, x.groups, self.eps, self.scale_by_std)  # [N]
            return _per_token(adv, x.mask), None
        parts = [
            w * grpo_advantages(x.components[:, k], x.groups, self.eps, self.scale_by_std)
            for k, w in enumerate(x.weights.tolist())
        ]
        total = torch.stack(parts).sum(dim=0)  # [N]
        if x.shaping is not None and x.shaping.abs().max() > 0:
            total = total + grpo_advantages(x.shaping, x.groups, self.eps, self.scale_by_std)
        adv = (total - total.mean()) / (total.std() + self.eps) if total.numel() > 1 else total
        return _per_token(adv, x.mask), None


@dataclass
class RLOO:
    """REINFORCE with a leave-one-out baseline: the other samples' mean reward."""

    needs_critic, needs_groups, token_level = False, True, False

    def __call__(self, x: AdvantageInputs) -> tuple[Tensor, Tensor | None]:
        return _per_token(rloo_advantages(x.rewards, x.groups), x.mask), None


@dataclass
class ReinforcePP:
    """REINFORCE++: reward-to-go over token rewards (which carry the KL penalty when the
    algorithm puts KL in the reward), whitened over every sampled token of the batch.

    group_baseline=True is REINFORCE++-baseline: each trajectory's final reward is first
    taken relative to its group's mean.
    """

    gamma: float = 1.0
    group_baseline: bool = False
    needs_critic, token_level = False, True

    def __post_init__(self) -> None:
        if not 0 <= self.gamma <= 1:
            raise ValueError(f"gamma is {self.gamma}; it must be in [0, 1]")

    @property
    def needs_groups(self) -> bool:
        return self.group_baseline

    def __call__(self, x: AdvantageInputs) -> tuple[Tensor, Tensor | None]:
        token_rewards = x.token_rewards
        if self.group_baseline:
            centred = grpo_advantages(x.rewards, x.groups, scale_by_std=False)  # [N]
            token_rewards = token_rewards + last_column(x.mask) * (centred - x.rewards)[:, None]
        returns = discounted_returns(token_rewards, x.mask, self.gamma)
        return whiten(returns, x.mask), None


@dataclass
class GAE:
    """PPO's estimator: generalised advantage estimation with a learned critic, whitened over
    the batch's sampled tokens when `whiten` is set; the critic learns the unwhitened returns."""

    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True
    needs_critic, needs_groups, token_level = True, False, True

    def __post_init__(self) -> None:
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"gamma {self.gamma} and lam {self.lam} must be in [0, 1]")

    def __call__(self, x: AdvantageInputs) -> tuple[Tensor, Tensor | None]:
        if x.values is None:
            raise ValueError("GAE needs the critic's values")
        adv, returns = gae_advantages(x.token_rewards, x.values, x.mask, self.gamma, self.lam)
        return (whiten(adv, x.mask) if self.whiten else adv), returns


def last_column(mask: Tensor) -> Tensor:
    """[N, T] one-hot of each row's last sampled column (all 0 for a row with none)."""
    cols = torch.arange(mask.shape[1]).expand_as(mask)
    last = torch.where(mask > 0, cols, torch.full_like(cols, -1)).max(dim=1).values  # [N]
    return (cols == last[:, None]).float() * (last[:, None] >= 0)
