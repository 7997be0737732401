"""Unit tests for toolrl.algo.algorithm: the overlong penalty, where token rewards land, dynamic
sampling and `prepare` (advantages, returns, IS weights, metrics) on real Trajectory objects.

Hand-worked cases throughout; run `python -m pytest tests/unit/test_algorithm.py`.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from toolrl.algo.algorithm import Algorithm, overlong_penalty, token_rewards
from toolrl.algo.batch import TrainBatch
from toolrl.config import AlgorithmConfig, LossConfig, MismatchConfig
from toolrl.rollout.trajectory import Trajectory, Turn

GAE = "toolrl.algo.advantages.GAE"


def _tool_traj(prompt_id: int = 0, credit: float = 0.5, reward: float = 1.0) -> Trajectory:
    """prompt ids 0..2, turn 1 samples ids 3, 4, a tool answer fills ids 5, 6, turn 2 samples
    ids 7, 8. In the batch (column t describes token t+1) the sampled columns are 2, 3 and
    6, 7; turn 1's credit belongs on column 3, the outcome on column 7."""
    t = Trajectory.from_prompt(prompt_id, [1, 2, 3])
    first = t.append_sampled([10, 11], [-0.1, -0.2])
    t.append_context([50, 51])
    second = t.append_sampled([12, 13], [-0.3, -0.4])
    t.turns = [Turn(*first, 0, "stop", reward=credit), Turn(*second, 0, "stop")]
    t.reward = reward
    t.check()
    return t


def _short_traj(prompt_id: int = 0, credit: float = 0.25, reward: float = -1.0) -> Trajectory:
    """prompt ids 0, 1, one sampled id 2: column 1 holds both its turn credit and the outcome."""
    t = Trajectory.from_prompt(prompt_id, [1, 2])
    t.turns = [Turn(*t.append_sampled([20], [-0.5]), 0, "stop", reward=credit)]
    t.reward = reward
    t.check()
    return t


def _row(values: dict[int, float], width: int = 9) -> list[float]:
    return [values.get(c, 0.0) for c in range(width)]


def _batch(trajs: list[Trajectory]) -> TrainBatch:
    return TrainBatch.from_trajectories(trajs, None, pad_id=0)


def _algo(max_total_tokens: int = 100, **kw) -> Algorithm:  # noqa: ANN003
    kw.setdefault("loss", LossConfig(kl_coef=0.0))
    return Algorithm(AlgorithmConfig(**kw), max_total_tokens)


# --- overlong_penalty ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "expected"),
    [
        (50, 0.0),
        (80, 0.0),  # max - buffer = 80: the buffer starts after this
        (85, -0.25),  # 5 of 20 into the buffer
        (90, -0.5),
        (99, -0.95),
        (100, -1.0),  # at max: the full penalty
        (130, -1.0),  # beyond max: no more than the full penalty
    ],
)
def test_overlong_penalty_is_linear_inside_the_buffer(length: int, expected: float) -> None:
    assert overlong_penalty(length, max_len=100, buffer=20, penalty=1.0) == pytest.approx(expected)


def test_overlong_penalty_scale_and_disabled() -> None:
    assert overlong_penalty(90, max_len=100, buffer=20, penalty=0.5) == pytest.approx(-0.25)
    assert overlong_penalty(130, max_len=100, buffer=0, penalty=1.0) == 0.0


# --- token_rewards and _inputs ---------------------------------------------------------------


def test_token_rewards_turn_credit_and_outcome_on_last_sampled_columns() -> None:
    a, b = _tool_traj(credit=0.5), _short_traj(credit=0.25)
    empty = Trajectory.from_prompt(0, [1, 2, 3])  # no turn: nothing to credit
    got = token_rewards([a, b, empty], [1.0, -1.0, 7.0], width=9)
    # a: turn 1 ends at id 4 -> column 3 gets 0.5; the last sampled id 8 -> column 7 gets 1.0
    # b: its only id 2 -> column 1 gets 0.25 + (-1.0) = -0.75
    assert got.tolist() == [_row({3: 0.5, 7: 1.0}), _row({1: -0.75}), _row({})]


def test_token_rewards_credit_an_empty_turn_with_the_outcome() -> None:
    a = _tool_traj(credit=0.0)
    a.turns.append(Turn(9, 9, 0, "length", reward=3.0))  # a turn that sampled nothing
    got = token_rewards([a], [1.0], width=9)
    # no column of its own: its 3.0 joins the outcome 1.0 on the last sampled column, 7, so
    # the token rewards still add up to the trajectory's total
    assert got.tolist() == [_row({7: 4.0})]


def test_inputs_place_rewards_penalty_kl_and_components() -> None:
    a, b = _tool_traj(prompt_id=3), _short_traj(prompt_id=8)
    a.info = {"reward_components": {"b": 2.0, "a": 1.0}, "reward_weights": {"a": 0.5, "b": 2.0}}
    b.info = {"reward_components": {"a": 0.5, "c": 3.0}}  # no weight for c: 1.0
    algo = _algo(max_total_tokens=10, overlong_buffer=4, overlong_penalty=1.0, kl_in_reward=0.1)
    batch = _batch([a, b])
    batch.ref_logprobs = batch.old_logprobs - 0.5  # k1 = 0.5 on every column
    x = algo._inputs(batch, [a, b])
    # a: response 6 ids, budget 10 - 3 = 7, buffer from 3: 3 of 4 in -> penalty -0.75
    #    total 1 + 0.5 - 0.75 = 0.75; outcome on column 7: 1 - 0.75 = 0.25
    # b: response 1 id, budget 8: no penalty; total -1 + 0.25 = -0.75
    assert x.rewards.tolist() == [0.75, -0.75]
    assert x.groups.tolist() == [3, 8]
    # KL in reward: -0.1 * 0.5 = -0.05 on every sampled column (none on masked ones)
    expected = [_row({2: -0.05, 3: 0.45, 6: -0.05, 7: 0.2}), _row({1: -0.8})]
    assert x.token_rewards.tolist() == [pytest.approx(r) for r in expected]
    # components sorted by name a, b, c; a missing one is 0, a missing weight 1
    assert x.components.tolist() == [[1.0, 2.0, 0.0], [0.5, 0.0, 3.0]]
    assert x.weights.tolist() == [0.5, 2.0, 1.0]
    assert torch.equal(x.mask, batch.loss_mask) and x.values is None


def test_inputs_without_components() -> None:
    x = _algo()._inputs(_batch([_short_traj()]), [_short_traj()])
    assert x.components.shape == (1, 0) and x.weights.shape == (0,)


# --- select_groups ---------------------------------------------------------------------------


def _scored(prompt_id: int, reward: float, credit: float = 0.0, extra: int = 0) -> Trajectory:
    t = Trajectory.from_prompt(prompt_id, [1, 2])
    t.turns = [Turn(*t.append_sampled([5] * (1 + extra), [-0.1] * (1 + extra)), 0, "stop")]
    t.turns[0].reward, t.reward = credit, reward
    return t


def _groups() -> list[Trajectory]:
    return [
        _scored(0, 1.0),
        _scored(0, 1.0),  # all alike: no signal
        _scored(1, 0.0),
        _scored(1, 1.0),
        _scored(2, 1.0),
        _scored(2, 0.0),
        _scored(3, 0.5),
        _scored(3, 0.0, credit=0.5),  # the same total 0.5 (outcome + credit): alike
        _scored(4, 1.0),
        _scored(4, 1.0, credit=0.5),  # the same outcome, different credit: differs
    ]


def test_select_groups_without_dynamic_sampling_keeps_everything() -> None:
    trajs = _groups()
    kept, n = _algo().select_groups(trajs, want=1)
    assert kept == trajs and n == 5


def test_dynamic_sampling_drops_uniform_groups_and_keeps_at_most_want() -> None:
    trajs = _groups()
    algo = _algo(dynamic_sampling=True)
    kept, n = algo.select_groups(trajs, want=10)
    assert n == 3 and [t.prompt_id for t in kept] == [1, 1, 2, 2, 4, 4]
    kept, n = algo.select_groups(trajs, want=2)  # the first two useful groups
    assert n == 2 and [t.prompt_id for t in kept] == [1, 1, 2, 2]
    kept, n = algo.select_groups(trajs, want=0)
    assert (kept, n) == ([], 0)


def test_dynamic_sampling_sees_the_overlong_penalty() -> None:
    # same reward 1.0, but the second is 10 ids long in a budget of 2 + 10: within the
    # 4-id buffer -> penalised, so the group's rewards differ
    trajs = [_scored(0, 1.0), _scored(0, 1.0, extra=9)]
    algo = _algo(max_total_tokens=12, dynamic_sampling=True, overlong_buffer=4)
    kept, n = algo.select_groups(trajs, want=5)
    assert n == 1 and kept == trajs
    assert _algo(max_total_tokens=12, dynamic_sampling=True).select_groups(trajs, 5)[1] == 0


# --- prepare ---------------------------------------------------------------------------------


def test_needs_reference_and_critic() -> None:
    assert not _algo().needs_reference and not _algo().needs_critic
    assert _algo(loss=LossConfig(kl_coef=0.01)).needs_reference
    assert _algo(kl_in_reward=0.01).needs_reference
    assert _algo(advantages={"_target_": GAE}).needs_critic


def test_old_logprobs_from_the_first_update_only_when_prepare_does_not_read_them() -> None:
    assert _algo().old_logprobs_from_update  # GRPO's default: recompute, no IS weights
    assert not _algo(old_logprobs="rollout").old_logprobs_from_update  # no pi_old pass at all
    tis = LossConfig(mismatch=MismatchConfig(mode="tis"))
    assert _algo(loss=tis).old_logprobs_from_update  # that update weighs its own rows
    assert not _algo(kl_in_reward=0.01).old_logprobs_from_update  # KL in the reward needs pi_old


def test_prepare_grpo_sets_per_token_advantages_and_metrics() -> None:
    a, b = _tool_traj(), _short_traj()  # one group; totals 1.5 and -0.75
    batch = _batch([a, b])
    metrics = _algo().prepare(batch, [a, b])
    # mean 0.375, centred +-1.125, unbiased std sqrt(2 * 1.125^2) = 1.591 -> +-0.7071
    h = 0.5**0.5
    assert batch.advantages.tolist() == [
        pytest.approx(_row({2: h, 3: h, 6: h, 7: h}), abs=1e-5),
        pytest.approx(_row({1: -h}), abs=1e-5),
    ]
    assert batch.returns is None and batch.is_weights is None
    # 4 tokens at +h and 1 at -h: mean 3h / 5, mean |A| = h
    assert metrics["train/advantage_mean"] == pytest.approx(3 * h / 5, abs=1e-5)
    assert metrics["train/advantage_abs"] == pytest.approx(h, abs=1e-5)
    assert "critic/explained_variance" not in metrics and "train/overlong_penalty" not in metrics


def test_prepare_reports_the_mean_overlong_penalty() -> None:
    a, b = _tool_traj(), _short_traj()
    batch = _batch([a, b])
    algo = _algo(max_total_tokens=10, overlong_buffer=4)
    metrics = algo.prepare(batch, [a, b])
    assert metrics["train/overlong_penalty"] == pytest.approx((-0.75 + 0.0) / 2)  # see above


def test_prepare_reinforce_pp_uses_the_placed_token_rewards() -> None:
    a = _tool_traj(credit=1.0, reward=1.0)
    batch = _batch([a])
    algo = _algo(advantages={"_target_": "toolrl.algo.advantages.ReinforcePP", "gamma": 1.0})
    algo.prepare(batch, [a])
    # token rewards: 1 on column 3, 1 on column 7 -> reward-to-go 2, 2, 1, 1 on 2, 3, 6, 7
    # whitened: mean 1.5, unbiased std sqrt(1/3) -> +-0.866
    h = 0.5 / (1 / 3) ** 0.5
    assert batch.advantages.tolist() == [pytest.approx(_row({2: h, 3: h, 6: -h, 7: -h}), abs=1e-4)]


# critic values before each sampled token of _tool_traj; 100 on the masked columns
VALUES = {2: 0.1, 3: 0.2, 6: 0.3, 7: 0.4}


def test_prepare_gae_by_hand_across_the_tool_answer() -> None:
    a = _tool_traj(credit=0.5, reward=1.0)
    batch = _batch([a])
    batch.values = torch.tensor([[VALUES.get(c, 100.0) for c in range(9)]])
    spec = {"_target_": GAE, "gamma": 0.9, "lam": 0.5, "whiten": False}
    metrics = _algo(advantages=spec).prepare(batch, [a])
    # gamma * lam = 0.45; V_next of column 3 is V6 (the next sampled column, past the answer)
    #   t7: 1 + 0 - 0.4 = 0.6                                     A7 = 0.6
    #   t6: 0 + 0.9 * 0.4 - 0.3 = 0.06;     A6 = 0.06 + 0.45 * 0.6  = 0.33
    #   t3: 0.5 + 0.9 * 0.3 - 0.2 = 0.57;   A3 = 0.57 + 0.45 * 0.33 = 0.7185
    #   t2: 0 + 0.9 * 0.2 - 0.1 = 0.08;     A2 = 0.08 + 0.45 * 0.7185 = 0.403325
    adv = [0.403325, 0.7185, 0.33, 0.6]
    ret = [0.503325, 0.9185, 0.63, 1.0]  # A + V
    cols = [2, 3, 6, 7]
    assert batch.advantages.tolist() == [
        pytest.approx(_row(dict(zip(cols, adv, strict=True))), abs=1e-6)
    ]
    assert batch.returns.tolist() == [
        pytest.approx(_row(dict(zip(cols, ret, strict=True))), abs=1e-6)
    ]
    # explained variance = 1 - Var(R - V) / Var(R), and R - V = A
    ev = 1 - statistics.variance(adv) / statistics.variance(ret)
    assert metrics["critic/explained_variance"] == pytest.approx(ev, abs=1e-5)
    assert metrics["critic/value_mean"] == pytest.approx(0.25)
    assert metrics["critic/return_mean"] == pytest.approx(sum(ret) / 4)


def test_prepare_gae_with_a_perfect_critic() -> None:
    a = _tool_traj(credit=0.5, reward=1.0)
    batch = _batch([a])
    # gamma = lam = 1: values equal to the reward-to-go (1.5, 1.5, 1, 1) leave nothing to learn
    batch.values = torch.tensor([_row({2: 1.5, 3: 1.5, 6: 1.0, 7: 1.0})])
    spec = {"_target_": GAE, "gamma": 1.0, "lam": 1.0}
    metrics = _algo(advantages=spec).prepare(batch, [a])
    assert batch.advantages.abs().max().item() < 1e-6
    assert torch.allclose(batch.returns, batch.values)
    assert metrics["critic/explained_variance"] == pytest.approx(1.0)


def test_prepare_gae_needs_the_batch_values() -> None:
    a = _tool_traj()
    batch = _batch([a])
    with pytest.raises(ValueError, match="critic"):
        _algo(advantages={"_target_": GAE}).prepare(batch, [a])


def _mismatch_algo(old_logprobs: str) -> Algorithm:
    loss = LossConfig(kl_coef=0.0, mismatch=MismatchConfig(mode="tis", low=0.5, high=2.0))
    return _algo(loss=loss, old_logprobs=old_logprobs)


def test_mismatch_weighs_recomputed_old_logprobs_against_the_engines() -> None:
    a = _tool_traj()
    batch = _batch([a])
    rollout = batch.old_logprobs.clone()
    rho = torch.ones(1, 9)  # trainer / engine on each column
    rho[0, [2, 3, 6, 7]] = torch.tensor([1.5, 3.0, 1.0, 0.5])
    old = rollout + rho.log()  # the trainer's recomputation
    algo = _mismatch_algo("recompute")
    assert algo.weighs_mismatch
    weights, metrics = algo.mismatch(old, rollout, batch.loss_mask)
    # tis: min(rho, 2) on sampled columns -> 1.5, 2.0, 1.0, 0.5; one of four cut (3.0 > 2)
    assert weights.tolist() == [pytest.approx(_row({2: 1.5, 3: 2.0, 6: 1.0, 7: 0.5}))]
    assert metrics["train/mismatch/tokens_cut"] == pytest.approx(0.25)
    assert metrics["train/mismatch/seqs_masked"] == 0.0
    algo.prepare(batch, [a])
    assert batch.is_weights is None  # prepare sets advantages only; the trainer sets these


def test_the_loss_weighs_the_mismatch_itself_in_rollout_mode() -> None:
    assert not _mismatch_algo("rollout").weighs_mismatch
    assert not _algo(old_logprobs="recompute").weighs_mismatch  # mode none


def _gdpo_trajs() -> list[Trajectory]:
    """Four samples of one prompt, two components a, b with weight 0.3 each; the reward is their
    weighted sum computed as RewardStack.combine does (Python floats: 0.0 + 0.3 a + 0.3 b)."""
    trajs = []
    for a, b in [(1.0, 1.0), (0.0, 1.0), (1.0, 0.9), (0.0, 0.9)]:
        t = _short_traj(credit=0.0, reward=0.0 + 0.3 * a + 0.3 * b)
        t.info = {"reward_components": {"a": a, "b": b}, "reward_weights": {"a": 0.3, "b": 0.3}}
        trajs.append(t)
    return trajs


def _gdpo_algo() -> Algorithm:
    spec = {"_target_": "toolrl.algo.advantages.GroupNorm", "components_separately": True}
    return _algo(advantages=spec)


# Hand values: a = [1, 0, 1, 0] -> [s, -s, s, -s], b = [1, 1, 0.9, 0.9] -> [s, s, -s, -s]
# (s = 0.866 each); 0.3 a + 0.3 b = 0.3 * [2s, 0, 0, -2s]; whitened over the batch:
# [sqrt(1.5), 0, 0, -sqrt(1.5)] = [1.2247, 0, 0, -1.2247]. Samples 1 and 2 each got one
# component right and must tie.
GDPO_EXPECTED = [1.5**0.5, 0.0, 0.0, -(1.5**0.5)]


def test_gdpo_keeps_an_environments_step_reward_that_no_component_gave() -> None:
    # Two samples whose only reward is an environment's step credit on their turn (not a
    # reward component, whose value is 0 for both): GDPO normalises it as one more component,
    # so it gives what GRPO gives, +-1/sqrt(2), rather than dropping it.
    trajs = [_short_traj(credit=c, reward=0.0) for c in (1.0, 0.0)]
    for t in trajs:
        t.info = {"reward_components": {"a": 0.0}, "reward_weights": {"a": 1.0}}
    batch = _batch(trajs)
    _gdpo_algo().prepare(batch, trajs)
    assert batch.advantages[:, 1].tolist() == pytest.approx([0.5**0.5, -(0.5**0.5)], abs=1e-5)


def test_gdpo_through_prepare_ignores_float_rounding_of_the_weighted_sum() -> None:
    trajs = _gdpo_trajs()
    batch = _batch(trajs)
    _gdpo_algo().prepare(batch, trajs)
    assert batch.advantages[:, 1].tolist() == pytest.approx(GDPO_EXPECTED, abs=1e-3)
