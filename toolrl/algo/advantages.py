"""Group-relative advantages (GRPO): each sample's reward compared with its siblings.

GRPO draws several samples per prompt and uses the group as its own baseline, so no
critic is needed. Pure tensor functions; run `python -m pytest tests/unit/test_advantages.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
