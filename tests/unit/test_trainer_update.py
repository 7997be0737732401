"""The trainer's update phase against a recording stand-in for the training group: which rows
the pi_old pass scores, which mini-batch's update scores its own, and that every row's
pi_old ends up where the drift metric reads it. The real group and gradients:
tests/integration/test_fsdp_actor.py."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from toolrl.algo.algorithm import Algorithm
from toolrl.algo.batch import TrainBatch
from toolrl.config import AlgorithmConfig, LossConfig, MismatchConfig
from toolrl.rollout.trajectory import Trajectory, Turn
from toolrl.trainer import Trainer


def _traj(row: int, sampled: bool = True) -> Trajectory:
    """Prompt [row + 1, 2]: its first id names the row. Two sampled ids, unless not sampled."""
    t = Trajectory.from_prompt(row // 2, [row + 1, 2])
    if sampled:
        t.turns = [Turn(*t.append_sampled([7, 8], [-0.5, -0.25]), 0, "stop")]
    else:
        t.append_context([7, 8])
    t.reward = float(row % 2)
    return t


def _trainer_lp(mb: TrainBatch) -> torch.Tensor:
    """What the trainer 'scores': the rollout's logprobs shifted by 0.01 x (row + 1)."""
    rows = mb.input_ids[:, 0].float()  # [b]: row + 1
    return (mb.old_logprobs + 0.01 * rows[:, None]) * mb.loss_mask


class RecordingGroup:
    has_reference = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []

    def _log(self, name: str, mb: TrainBatch) -> None:
        self.calls.append((name, (mb.input_ids[:, 0] - 1).tolist()))

    def logprobs(self, mb: TrainBatch) -> torch.Tensor:
        self._log("pass", mb)
        return _trainer_lp(mb)

    def ref_logprobs(self, mb: TrainBatch) -> torch.Tensor:
        return torch.zeros_like(mb.old_logprobs)

    def update(self, mb: TrainBatch, loss: LossConfig) -> dict[str, float]:
        self._log("update", mb)
        return {"loss": 0.0}

    def update_scoring_old(self, mb: TrainBatch, loss: LossConfig):
        self._log("update_scoring_old", mb)
        return {"loss": 0.0}, _trainer_lp(mb)


def _run(n: int, mini_batches: int, sampled=lambda r: True, **algo):  # noqa: ANN001, ANN003
    trajs = [_traj(r, sampled(r)) for r in range(n)]
    batch = TrainBatch.from_trajectories(trajs, None, pad_id=0)
    rollout = batch.old_logprobs.clone()
    cfg = AlgorithmConfig(mini_batches=mini_batches, **algo)
    group = RecordingGroup()
    host = SimpleNamespace(algorithm=Algorithm(cfg, 100), train=group, critic=None)
    metrics = Trainer._update(host, batch, trajs)
    return group.calls, batch, rollout, metrics


@pytest.mark.parametrize(
    ("n", "mini_batches", "expected"),
    [
        (5, 2, [("pass", [3, 4]), ("update_scoring_old", [0, 1, 2]), ("update", [3, 4])]),
        (4, 1, [("update_scoring_old", [0, 1, 2, 3])]),  # one mini-batch: no pass at all
        (1, 2, [("update_scoring_old", [0])]),  # fewer rows than mini-batches
        (
            6,
            3,
            [("pass", [2, 3, 4, 5]), ("update_scoring_old", [0, 1])]
            + [("update", [2, 3]), ("update", [4, 5])],
        ),
    ],
)
def test_the_first_update_scores_its_own_pi_old_and_the_pass_the_rest(n, mini_batches, expected):
    calls, batch, rollout, metrics = _run(n, mini_batches)
    assert calls == expected
    # every row's pi_old came back to its own row, from whichever call scored it
    expected_old = _trainer_lp(dataclasses.replace(batch, old_logprobs=rollout))
    assert torch.allclose(batch.old_logprobs, expected_old)
    assert metrics["rollout/logprob_diff_max"] == pytest.approx(0.01 * n)
    assert rollout.abs().sum() > 0 and not torch.equal(batch.old_logprobs, rollout)


def test_a_first_mini_batch_without_sampled_tokens_is_skipped():
    calls, _, _, metrics = _run(4, 2, sampled=lambda r: r >= 2)
    assert calls == [("pass", [2, 3]), ("update", [2, 3])]
    assert metrics["rollout/logprob_diff_max"] == pytest.approx(0.04)


@pytest.mark.parametrize(
    "algo",
    [
        {"loss": LossConfig(mismatch=MismatchConfig(mode="tis"))},  # IS weights need pi_old
        {"kl_in_reward": 0.01, "loss": LossConfig(kl_coef=0.0)},  # so does KL in the reward
    ],
)
def test_the_pass_scores_every_row_when_prepare_needs_pi_old(algo):
    calls, batch, rollout, _ = _run(4, 2, **algo)
    assert calls == [("pass", [0, 1, 2, 3]), ("update", [0, 1]), ("update", [2, 3])]


def test_no_pass_and_no_drift_with_the_rollouts_logprobs():
    calls, batch, rollout, metrics = _run(4, 2, old_logprobs="rollout")
    assert calls == [("update", [0, 1]), ("update", [2, 3])]
    assert torch.equal(batch.old_logprobs, rollout) and "rollout/logprob_diff_max" not in metrics
