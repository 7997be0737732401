"""Unit tests for toolrl.algo.advantages (hand-computed cases). Run with pytest."""

from __future__ import annotations

import math

import pytest
import torch

from toolrl.algo.advantages import grpo_advantages


def test_group_mean_and_unbiased_std() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 5.0])
    groups = torch.tensor([7, 7, 7, 7, 2, 2])  # arbitrary ids, not contiguous from 0
    adv = grpo_advantages(rewards, groups, eps=0.0)
    # group 7: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3)
    s7 = math.sqrt(1 / 3)
    # group 2: mean 4, unbiased std sqrt(2)
    expected = torch.tensor([0.5 / s7, -0.5 / s7, -0.5 / s7, 0.5 / s7, -1 / 2**0.5, 1 / 2**0.5])
    assert torch.allclose(adv, expected, atol=1e-6)


def test_without_std_scaling_is_mean_centred() -> None:
    adv = grpo_advantages(
        torch.tensor([2.0, 4.0, 9.0]), torch.tensor([0, 0, 1]), scale_by_std=False
    )
    assert adv.tolist() == [-1.0, 1.0, 0.0]


def test_singleton_and_uniform_groups_get_zero() -> None:
    rewards = torch.tensor([5.0, 1.0, 1.0, 1.0])
    groups = torch.tensor([0, 1, 1, 1])
    adv = grpo_advantages(rewards, groups)
    assert adv.tolist() == [0.0, 0.0, 0.0, 0.0]  # eps keeps 0/0 from becoming NaN


def test_interleaved_groups_and_eps() -> None:
    rewards = torch.tensor([1.0, 10.0, 0.0, 20.0])
    groups = torch.tensor([0, 1, 0, 1])
    adv = grpo_advantages(rewards, groups, eps=1.0)
    s0, s1 = math.sqrt(0.5), math.sqrt(50.0)
    expected = [0.5 / (s0 + 1), -5 / (s1 + 1), -0.5 / (s0 + 1), 5 / (s1 + 1)]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        grpo_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))
