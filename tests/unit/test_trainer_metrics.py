"""The rollout-versus-trainer logprob drift, overall and per assistant turn."""

import torch

from toolrl.algo.batch import TrainBatch
from toolrl.rollout.trajectory import Trajectory, Turn
from toolrl.trainer import logprob_drift


def _traj():
    t = Trajectory.from_prompt(0, [1, 2])
    s, e = t.append_sampled([3, 4], [-0.5, -0.5])  # turn 0: ids at positions 2, 3
    t.turns.append(Turn(s, e, 0, "stop"))
    t.append_context([5])
    s, e = t.append_sampled([6], [-1.0])  # turn 1: id at position 5
    t.turns.append(Turn(s, e, 0, "stop"))
    return t


def test_drift_is_reported_per_turn_on_sampled_columns_only():
    t = _traj()
    batch = TrainBatch.from_trajectories([t], torch.zeros(1), pad_id=0)
    trainer = batch.old_logprobs.clone()  # [1, T]; column c scores token c + 1
    trainer[0, 1] += 0.01  # token 2: turn 0
    trainer[0, 4] += 0.3  # token 5: turn 1
    trainer[0, 3] += 9.0  # token 4 is context (mask 0): must not count
    out = logprob_drift(trainer, batch.old_logprobs, batch, [t])
    assert abs(out["rollout/logprob_diff_max_turn0"] - 0.01) < 1e-6
    assert abs(out["rollout/logprob_diff_max_turn1"] - 0.3) < 1e-6
    assert abs(out["rollout/logprob_diff_max"] - 0.3) < 1e-6
    assert abs(out["rollout/logprob_diff_mean"] - 0.31 / 3) < 1e-6


def test_compare_puts_runs_side_by_side_at_every_eval_step(tmp_path):
    import json

    from toolrl.metrics import compare, curve

    for name, evals in (("grpo", {0: 0.25, 5: 0.5}), ("ppo", {0: 0.25, 5: 0.75, 10: 1.0})):
        (tmp_path / name).mkdir()
        lines = [{"step": s, "eval/reward": v} for s, v in evals.items()]
        lines.append({"step": 0, "train/reward": 0.125})  # merged into step 0's row
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(map(json.dumps, lines)))
    table = compare([str(tmp_path / "grpo"), str(tmp_path / "ppo")]).splitlines()
    assert table[0] == "| step | grpo | ppo |"
    assert table[2:] == ["| 0 | 0.250 | 0.250 |", "| 5 | 0.500 | 0.750 |", "| 10 |  | 1.000 |"]
    assert "| 0 | 0.250 |  | 0.125 |" in curve(str(tmp_path / "grpo"))
