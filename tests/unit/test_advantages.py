"""Unit tests for toolrl.algo.advantages (hand-computed cases). Run with pytest."""

from __future__ import annotations

import math

import pytest
import torch

from toolrl.algo.advantages import (
    GAE,
    RLOO,
    AdvantageInputs,
    GroupNorm,
    ReinforcePP,
    discounted_returns,
    gae_advantages,
    grpo_advantages,
    last_column,
    rloo_advantages,
    whiten,
)


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


# --- the estimators, by hand -----------------------------------------------------------------
#
# The tool-turn layout used below (as TrainBatch builds it, column t describes token t+1):
#   prompt ids 0..2, turn 1 samples ids 3, 4, the tool answers ids 5, 6, turn 2 samples 7, 8
#   -> sampled columns 2, 3 (turn 1) and 6, 7 (turn 2); columns 4, 5 are the tool answer
#   -> turn 1's credit sits on column 3, the outcome on column 7.
WIDTH = 9
SAMPLED = [2, 3, 6, 7]


def _tool_mask(rows: int = 1) -> torch.Tensor:
    mask = torch.zeros(rows, WIDTH)
    mask[:, SAMPLED] = 1.0
    return mask


def _row(values: dict[int, float], fill: float = 0.0) -> list[float]:
    """A row of WIDTH columns: `values` on their columns, `fill` elsewhere."""
    return [values.get(c, fill) for c in range(WIDTH)]


def _inputs(rewards: list[float], groups: list[int], mask: torch.Tensor | None = None, **kw):  # noqa: ANN003, ANN202
    n = len(rewards)
    mask = torch.ones(n, 2) if mask is None else mask
    return AdvantageInputs(
        rewards=torch.tensor(rewards),
        groups=torch.tensor(groups),
        token_rewards=kw.get("token_rewards", torch.zeros_like(mask)),
        mask=mask,
        components=kw.get("components", torch.zeros(n, 0)),
        weights=kw.get("weights", torch.zeros(0)),
        values=kw.get("values"),
    )


def test_rloo_is_leave_one_out_mean() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 6.0, 0.0, 9.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2])
    adv = rloo_advantages(rewards, groups)
    # group 0: mean 0.5, n/(n-1) = 4/3 -> +-0.5 * 4/3 = +-2/3
    #   (leave-one-out: 1 - mean(0, 0, 1) = 2/3, 0 - mean(0, 1, 1) = -2/3)
    # group 1: mean 3, 3/2 -> [0, 4.5, -4.5]  (6 - mean(3, 0) = 4.5)
    # group 2: a single sample has no baseline -> 0
    expected = [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0, 4.5, -4.5, 0.0]
    assert adv.tolist() == pytest.approx(expected, abs=1e-6)


def test_rloo_estimator_spreads_over_sampled_columns() -> None:
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    adv, returns = RLOO()(_inputs([2.0, 0.0], [5, 5], mask))
    # n = 2: 2/1 * (2 - 1) = 2 (= 2 - 0, the other sample), and -2
    assert adv.tolist() == [[2.0, 2.0, 0.0], [0.0, -2.0, -2.0]] and returns is None
    assert RLOO.needs_groups and not RLOO.needs_critic and not RLOO.token_level


def test_dr_grpo_does_not_scale_by_std() -> None:
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    adv, _ = GroupNorm(scale_by_std=False)(_inputs([10.0, 0.0, 4.0, 5.0], [0, 0, 1, 1], mask))
    # group 0: mean 5 -> +-5 (GRPO would give +-0.707); group 1: mean 4.5 -> -0.5, 0.5
    assert adv.tolist() == [[5.0, 5.0], [-5.0, 0.0], [-0.5, -0.5], [0.5, 0.5]]


def test_grpo_estimator_scales_by_group_std() -> None:
    adv, returns = GroupNorm(eps=0.0)(_inputs([10.0, 0.0], [0, 0]))
    # mean 5, unbiased std sqrt((25 + 25) / 1) = sqrt(50) -> +-5 / 7.071 = +-0.7071
    assert adv[:, 0].tolist() == pytest.approx([0.5**0.5, -(0.5**0.5)], abs=1e-6)
    assert returns is None


def test_gdpo_gives_components_of_different_scale_equal_influence() -> None:
    # component a in {0, 1} (say, format), component b in {0, 100} (say, answer), weights 1, 1
    comps = torch.tensor([[1.0, 0.0], [0.0, 100.0], [1.0, 100.0], [0.0, 0.0]])
    rewards = [1.0, 100.0, 101.0, 0.0]  # the weighted sums: no credit outside components
    x = _inputs(rewards, [0, 0, 0, 0], components=comps, weights=torch.tensor([1.0, 1.0]))
    adv, _ = GroupNorm(eps=0.0, components_separately=True)(x)
    # each component in its group: mean 0.5 (resp. 50), std sqrt(1/3) (resp. 100 sqrt(1/3))
    #   a -> [+s, -s, +s, -s], b -> [-s, +s, +s, -s] with s = 0.5 / sqrt(1/3) = 0.866
    # sum [0, 0, 2s, -2s]; whitened: mean 0, std sqrt((3 + 3) / 3) = sqrt(2)
    #   -> [0, 0, 1.732 / 1.414, -1.732 / 1.414] = [0, 0, 1.2247, -1.2247]
    assert adv[:, 0].tolist() == pytest.approx([0.0, 0.0, 1.5**0.5, -(1.5**0.5)], abs=1e-5)
    # plain GRPO on the totals lets b drown a: sample 0 (a only) scores like sample 3 (nothing)
    plain, _ = GroupNorm(eps=0.0)(x)
    assert plain[0, 0] < 0 and abs(plain[0, 0] - plain[3, 0]) < 0.02


def test_gdpo_weights_scale_each_normalised_component() -> None:
    comps = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    x = _inputs([3.0, 1.0, 4.0, 0.0], [0] * 4, components=comps, weights=torch.tensor([3.0, 1.0]))
    adv, _ = GroupNorm(eps=0.0, components_separately=True)(x)
    # a -> [s, -s, s, -s], b -> [-s, s, s, -s]; 3a + b = [2s, -2s, 4s, -4s] (s = 0.866)
    # whitened: mean 0, var (4 + 4 + 16 + 16) s^2 / 3 = 40 s^2 / 3 -> x / (s sqrt(40/3))
    d = (40 / 3) ** 0.5
    assert adv[:, 0].tolist() == pytest.approx([2 / d, -2 / d, 4 / d, -4 / d], abs=1e-5)


def test_gdpo_without_components_is_grpo() -> None:
    x = _inputs([1.0, 0.0, 3.0], [0, 0, 0])
    assert torch.equal(GroupNorm(components_separately=True)(x)[0], GroupNorm()(x)[0])


def test_whiten_over_mask_only() -> None:
    x = torch.tensor([[1.0, 2.0, 50.0], [3.0, -9.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    # over 1, 2, 3, 4: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3
    s = (5 / 3) ** 0.5
    expected = [[-1.5 / s, -0.5 / s, 0.0], [0.5 / s, 0.0, 1.5 / s]]
    assert whiten(x, mask, eps=0.0).tolist() == [pytest.approx(r, abs=1e-6) for r in expected]


def test_last_column() -> None:
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    assert last_column(mask).tolist() == [[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]]


def test_discounted_returns_skip_the_tool_answer() -> None:
    rewards = torch.tensor([_row({3: 1.0, 7: 2.0})])  # turn credit 1, outcome 2
    got = discounted_returns(rewards, _tool_mask(), gamma=0.5)
    # G7 = 2; G6 = 0 + 0.5 * 2 = 1; G3 = 1 + 0.5 * G6 = 1.5 (one step across the answer,
    # not three); G2 = 0 + 0.5 * 1.5 = 0.75; masked columns 0
    assert got.tolist() == [_row({2: 0.75, 3: 1.5, 6: 1.0, 7: 2.0})]


def test_discounted_returns_ignore_rewards_on_masked_columns_as_steps() -> None:
    rewards = torch.tensor([[0.0, 1.0, 0.0, 0.0], [2.0, 0.0, 0.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0]])
    got = discounted_returns(rewards, mask, gamma=0.9)
    # row 0: G1 = 1, G0 = 0.9; row 1: G3 = 1, G0 = 2 + 0.9 * 1 = 2.9
    assert got.tolist() == [pytest.approx(r) for r in [[0.9, 1.0, 0, 0], [2.9, 0, 0, 1.0]]]


# Critic values on the sampled columns; 100 on the masked ones must never be read.
V = {2: 0.1, 3: 0.2, 6: 0.3, 7: 0.4}


def test_gae_bootstraps_across_the_tool_answer() -> None:
    rewards = torch.tensor([_row({3: 0.5, 7: 1.0})])
    values = torch.tensor([_row(V, fill=100.0)])
    adv, returns = gae_advantages(rewards, values, _tool_mask(), gamma=1.0, lam=0.0)
    # lam = 0: A_t = delta_t = r_t + V_next - V_t, V_next the next *sampled* column's value
    #   A7 = 1 + 0 - 0.4 = 0.6 (the episode ends: V_next = 0)
    #   A6 = 0 + 0.4 - 0.3 = 0.1
    #   A3 = 0.5 + V6 - V3 = 0.5 + 0.3 - 0.2 = 0.6 (across the answer, not V4 = 100)
    #   A2 = 0 + 0.2 - 0.1 = 0.1
    assert adv.tolist() == [pytest.approx(_row({2: 0.1, 3: 0.6, 6: 0.1, 7: 0.6}))]
    # returns = A + V on sampled columns, 0 on the masked ones
    assert returns.tolist() == [pytest.approx(_row({2: 0.2, 3: 0.8, 6: 0.4, 7: 1.0}))]


def test_gae_with_discount_and_lambda() -> None:
    rewards = torch.tensor([_row({3: 0.5, 7: 1.0})])
    values = torch.tensor([_row(V, fill=100.0)])
    adv, returns = gae_advantages(rewards, values, _tool_mask(), gamma=0.9, lam=0.5)
    # gamma * lam = 0.45
    #   t7: delta = 1 + 0.9 * 0 - 0.4 = 0.6;               A7 = 0.6
    #   t6: delta = 0 + 0.9 * 0.4 - 0.3 = 0.06;            A6 = 0.06 + 0.45 * 0.6 = 0.33
    #   t3: delta = 0.5 + 0.9 * 0.3 - 0.2 = 0.57;          A3 = 0.57 + 0.45 * 0.33 = 0.7185
    #   t2: delta = 0 + 0.9 * 0.2 - 0.1 = 0.08;            A2 = 0.08 + 0.45 * 0.7185 = 0.403325
    expected = {2: 0.403325, 3: 0.7185, 6: 0.33, 7: 0.6}
    assert adv.tolist() == [pytest.approx(_row(expected), abs=1e-6)]
    ret = {2: 0.503325, 3: 0.9185, 6: 0.63, 7: 1.0}  # A + V
    assert returns.tolist() == [pytest.approx(_row(ret), abs=1e-6)]


def test_gae_rows_are_independent() -> None:
    rewards = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.5, 9.0], [1.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv, _ = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    # row 0: A1 = 1 - 0.5 = 0.5, A0 = 0 + 0.5 - 0.5 + 0.5 = 0.5; row 1: A0 = 2 - 1 = 1
    assert adv.tolist() == [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]


def test_gae_estimator_whitens_advantages_not_returns() -> None:
    rewards = torch.tensor([_row({3: 0.5, 7: 1.0})])
    values = torch.tensor([_row(V, fill=100.0)])
    x = _inputs([1.5], [0], _tool_mask(), token_rewards=rewards, values=values)
    adv, returns = GAE(gamma=1.0, lam=0.0)(x)
    # raw A on 2, 3, 6, 7 = 0.1, 0.6, 0.1, 0.6: mean 0.35, unbiased var 4 * 0.0625 / 3 = 1/12
    s = (1 / 12) ** 0.5
    assert adv.tolist() == [
        pytest.approx(_row({2: -0.25 / s, 3: 0.25 / s, 6: -0.25 / s, 7: 0.25 / s}), abs=1e-4)
    ]
    assert returns.tolist() == [pytest.approx(_row({2: 0.2, 3: 0.8, 6: 0.4, 7: 1.0}))]
    raw, _ = GAE(gamma=1.0, lam=0.0, whiten=False)(x)
    assert raw.tolist() == [pytest.approx(_row({2: 0.1, 3: 0.6, 6: 0.1, 7: 0.6}))]
    assert GAE.needs_critic and GAE.token_level and not GAE.needs_groups


def test_gae_needs_values() -> None:
    with pytest.raises(ValueError, match="critic"):
        GAE()(_inputs([1.0], [0]))


def test_reinforce_pp_reward_to_go_whitened() -> None:
    rewards = torch.tensor([_row({3: 1.0, 7: 1.0})])  # turn credit 1, outcome 1
    x = _inputs([2.0], [0], _tool_mask(), token_rewards=rewards)
    adv, returns = ReinforcePP(gamma=1.0)(x)
    # reward-to-go on 2, 3, 6, 7 = 2, 2, 1, 1: mean 1.5, unbiased var 4 * 0.25 / 3 = 1/3
    #   -> +-0.5 / sqrt(1/3) = +-0.866
    h = 0.5 / (1 / 3) ** 0.5
    assert adv.tolist() == [pytest.approx(_row({2: h, 3: h, 6: -h, 7: -h}), abs=1e-4)]
    assert returns is None
    assert not ReinforcePP().needs_groups and ReinforcePP().token_level


def test_reinforce_pp_group_baseline_centres_the_final_reward() -> None:
    # row A: turn credit 1 (column 3) + outcome 1 (column 7), total 2; row B: all 0, total 0
    rewards = torch.tensor([_row({3: 1.0, 7: 1.0}), _row({})])
    x = _inputs([2.0, 0.0], [4, 4], _tool_mask(2), token_rewards=rewards)
    adv, _ = ReinforcePP(gamma=1.0, group_baseline=True)(x)
    # group mean 1: A's last column becomes 1 + (1 - 2) = 0, B's 0 + (-1 - 0) = -1
    # reward-to-go: A = [1, 1, 0, 0], B = [-1, -1, -1, -1]
    # whitened over the 8 tokens: mean -2/8 = -0.25, unbiased var
    #   (2 * 1.25^2 + 2 * 0.25^2 + 4 * 0.75^2) / 7 = 5.5 / 7
    s = (5.5 / 7) ** 0.5
    a, b = (1.25 / s, 1.25 / s, 0.25 / s, 0.25 / s), (-0.75 / s,) * 4
    assert adv[0].tolist() == pytest.approx(_row(dict(zip(SAMPLED, a, strict=True))), abs=1e-4)
    assert adv[1].tolist() == pytest.approx(_row(dict(zip(SAMPLED, b, strict=True))), abs=1e-4)
    assert ReinforcePP(group_baseline=True).needs_groups
