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
        self.is_weights: list[torch.Tensor | None] = []  # each update's

    def _log(self, name: str, mb: TrainBatch) -> None:
        self.calls.append((name, (mb.input_ids[:, 0] - 1).tolist()))
        if name != "pass":
            self.is_weights.append(mb.is_weights)

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
    return group, batch, rollout, metrics


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
    group, batch, rollout, metrics = _run(n, mini_batches)
    assert group.calls == expected
    # every row's pi_old came back to its own row, from whichever call scored it
    expected_old = _trainer_lp(dataclasses.replace(batch, old_logprobs=rollout))
    assert torch.allclose(batch.old_logprobs, expected_old)
    assert metrics["rollout/logprob_diff_max"] == pytest.approx(0.01 * n)
    assert rollout.abs().sum() > 0 and not torch.equal(batch.old_logprobs, rollout)


def test_a_first_mini_batch_without_sampled_tokens_is_skipped():
    group, _, _, metrics = _run(4, 2, sampled=lambda r: r >= 2)
    assert group.calls == [("pass", [2, 3]), ("update", [2, 3])]
    assert metrics["rollout/logprob_diff_max"] == pytest.approx(0.04)


def test_the_pass_scores_every_row_when_prepare_needs_pi_old():
    algo = {"kl_in_reward": 0.01, "loss": LossConfig(kl_coef=0.0)}  # KL in the reward
    group, batch, rollout, _ = _run(4, 2, **algo)
    assert group.calls == [("pass", [0, 1, 2, 3]), ("update", [0, 1]), ("update", [2, 3])]


def test_is_weights_of_the_first_mini_batch_come_from_its_own_update():
    """Its rows' pi_old is scored by that update, so it gets no weights from the trainer (the
    group computes them: tests/integration/test_fsdp_actor.py); the others get min(rho, 2),
    and the mismatch metrics cover every row once all are scored."""
    loss = LossConfig(mismatch=MismatchConfig(mode="tis", high=2.0))
    group, batch, rollout, metrics = _run(4, 2, loss=loss)
    assert group.calls == [("pass", [2, 3]), ("update_scoring_old", [0, 1]), ("update", [2, 3])]
    head, later = group.is_weights
    assert head is None
    rho = torch.tensor([[0.03], [0.04]]).exp()  # _trainer_lp: rows 2, 3 shifted by 0.03, 0.04
    assert torch.allclose(later, rho * batch.rows(2, 4).loss_mask)
    all_rho = torch.tensor([0.01, 0.02, 0.03, 0.04]).exp().mean().item()  # 2 tokens a row
    assert metrics["train/mismatch/rho_mean"] == pytest.approx(all_rho)


def test_no_pass_and_no_drift_with_the_rollouts_logprobs():
    group, batch, rollout, metrics = _run(4, 2, old_logprobs="rollout")
    assert group.calls == [("update", [0, 1]), ("update", [2, 3])]
    assert torch.equal(batch.old_logprobs, rollout) and "rollout/logprob_diff_max" not in metrics
