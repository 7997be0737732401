"""Evaluation's pure parts: pass@k, the eval episodes' seeds, tool-use statistics, the config
`toolrl.eval` composes from a run's overrides, and the pass@k settings' validation.

    python -m pytest tests/unit/test_eval.py
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import toolrl.eval
from toolrl.config import ConfigError, TrainerConfig, register, to_config
from toolrl.eval import differing_keys, error_kinds, merged_overrides, tool_use
from toolrl.metrics import pass_at_k, pass_metrics
from toolrl.rollout.trajectory import ToolCall, ToolResult, Trajectory, Turn
from toolrl.trainer import eval_episodes, eval_metrics
from toolrl.validate import validate

CONF = str(Path(__file__).resolve().parents[2] / "conf")
register()


def load(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return to_config(compose("config", overrides=list(overrides)))


def test_pass_at_k_is_the_chance_that_k_of_n_samples_drawn_hold_a_pass():
    for n in range(1, 7):
        for c in range(n + 1):
            samples = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                draws = list(itertools.combinations(samples, k))
                want = sum(any(d) for d in draws) / len(draws)
                assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (n, c, k)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the pass rate
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2)


@pytest.mark.parametrize("n,c,k", [(2, 1, 3), (2, 3, 1), (2, 1, 0), (0, 0, 1)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass@k needs"):
        pass_at_k(n, c, k)


def traj(prompt_id: int, reward: float, turns: list[Turn] | None = None) -> Trajectory:
    t = Trajectory.from_prompt(prompt_id, [1, 2, 3])
    for u in turns or []:
        u.start, u.end = t.append_sampled([7, 8], [-0.1, -0.2])
        t.turns.append(u)
    t.reward = reward
    t.info = {"final_text": "x", "reward_components": {"product": reward}, "reward_failures": 0}
    return t


def test_pass_metrics_average_pass_at_k_over_prompts():
    # prompt 0: 1 of 4 passes; prompt 1: 4 of 4; prompt 2: none (one sample an infra fault)
    rewards = {0: [1.0, 0.0, 0.0, 0.5], 1: [1.0] * 4, 2: [0.0] * 4}
    trajs = [traj(p, r) for p, rs in rewards.items() for r in rs]
    trajs[-1].infra_error, trajs[-1].reward = "ToolInfraError: down", 0.0
    out = pass_metrics(trajs, [1, 2, 4], 1.0, "eval")
    assert out["eval/pass@1"] == pytest.approx((0.25 + 1.0 + 0.0) / 3)
    assert out["eval/pass@2"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert out["eval/pass@4"] == pytest.approx(2 / 3)
    assert pass_metrics(trajs, [1], 0.5, "eval")["eval/pass@1"] == pytest.approx((0.5 + 1) / 3)
    assert pass_metrics([], [1], 1.0, "eval") == {}


def test_eval_metrics_keep_eval_reward_the_mean_over_every_sample():
    trajs = [traj(0, 1.0), traj(0, 0.0), traj(1, 0.0), traj(1, 0.0)]
    out = eval_metrics(trajs, TrainerConfig(eval_samples=2, eval_pass_k=[1, 2]))
    assert out["eval/reward"] == 0.25
    assert out["eval/pass@1"] == 0.25 and out["eval/pass@2"] == 0.5


class Prompt:
    def __init__(self, text: str) -> None:
        self.messages, self.row, self.tools = [{"role": "user", "content": text}], {}, None


def test_eval_episodes_fix_one_seed_per_prompt_and_sample():
    prompts = [Prompt("a"), Prompt("b"), Prompt("c")]
    one = eval_episodes(prompts, seed=0, samples=1)
    # one sample per prompt: the seeds evaluations always used, so earlier curves compare
    assert [(e.prompt_id, e.seed) for e in one] == [(0, 10_000), (1, 10_001), (2, 10_002)]
    four = eval_episodes(prompts, seed=0, samples=4)
    assert [e.prompt_id for e in four] == [0] * 4 + [1] * 4 + [2] * 4  # prompt-major
    assert [e.seed for e in four[::4]] == [e.seed for e in one]
    assert len({e.seed for e in four}) == 12
    assert [e.seed for e in eval_episodes(prompts, 0, 4)] == [e.seed for e in four]
    assert eval_episodes(prompts, 1, 4)[0].seed != four[0].seed  # trainer.seed moves them


def test_tool_use_counts_calls_and_errors_by_kind():
    call = ToolCall("calculator", {"a": 1})
    bad_args = ToolResult("calculator", "Error: bad arguments", ok=False)
    timeout = ToolResult("calculator", "Error: timed out", ok=False, error="timeout")
    unreadable = ToolResult("error", "Error: invalid JSON", ok=False)  # answers a parse error
    turns = [
        Turn(0, 0, 0, "stop", calls=[call, call], results=[ToolResult("calculator", "2"), timeout]),
        Turn(0, 0, 0, "stop", calls=[call], results=[bad_args, unreadable], parse_errors=["json"]),
        Turn(0, 0, 0, "length"),
    ]
    t = traj(0, 0.0, turns)
    assert error_kinds(t) == {"timeout": 1, "tool": 1, "parse": 1}
    assert t.num_tool_errors == 3  # the same errors rollout_metrics counts
    use = tool_use([t, traj(1, 1.0)])
    assert use["calls_per_sample"] == 1.5 and use["samples_calling"] == 0.5
    assert use["calls_by_tool"] == {"calculator": 3}
    assert use["errors_per_sample"] == {"parse": 0.5, "timeout": 0.5, "tool": 0.5}


def test_pass_k_beyond_the_samples_per_prompt_fails_validation():
    validate(load("trainer.eval_samples=4", "trainer.eval_pass_k=[1,2,4]"))
    with pytest.raises(ConfigError, match=r"trainer\.eval_pass_k: has k=4; .*which is 1: raise"):
        validate(load("trainer.eval_pass_k=[1,4]"))
    with pytest.raises(ConfigError, match=r"trainer\.eval_pass_k: has k=0"):
        validate(load("trainer.eval_pass_k=[0]"))
    with pytest.raises(ConfigError, match=r"trainer\.eval_samples"):
        validate(load("trainer.eval_samples=0", "trainer.eval_pass_k=[]"))
    with pytest.raises(ConfigError, match=r"logger\.trajectories_per_step"):
        validate(load("logger.trajectories_per_step=-1"))


def test_eval_takes_the_runs_overrides_with_the_users_on_top(tmp_path):
    ckpt = tmp_path / "run" / "checkpoint"
    ckpt.mkdir(parents=True)
    assert merged_overrides(ckpt, ["trainer.eval_samples=2"]) == ["trainer.eval_samples=2"]
    (tmp_path / "run" / ".hydra").mkdir()
    run = ["+experiment=smoke", "trainer.eval_prompts=8", "task.num_eval=20", "rollout.n=2"]
    run.append("ray.address=auto")  # a Slurm run's (toolrl.cluster): where it ran, dropped
    (tmp_path / "run" / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in run))
    mine = ["trainer.eval_prompts=4", "task=dataset"]
    # a key the user sets replaces the run's; a group the user picks drops the run's keys in it
    assert merged_overrides(ckpt, mine) == ["+experiment=smoke", "rollout.n=2", *mine]
    cfg = load(*merged_overrides(ckpt, ["trainer.eval_prompts=4"]))
    assert (cfg.trainer.eval_prompts, cfg.rollout.n, cfg.trainer.total_steps) == (4, 2, 2)


def test_differing_keys_name_the_changed_leaves():
    a = {"trainer": {"eval_prompts": 8, "seed": 0}, "tools": {"calculator": {"x": 1}}}
    b = {"trainer": {"eval_prompts": 64, "seed": 0}, "tools": {}}
    assert differing_keys(a, b) == ["tools.calculator", "trainer.eval_prompts"]
    assert differing_keys(a, a) == []


def test_eval_config_is_the_runs_own_evaluating_the_checkpoint(tmp_path, capsys):
    from omegaconf import OmegaConf

    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "config.json").write_text("{}")
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("- +experiment=smoke\n- rollout.n=2\n")
    with initialize_config_dir(config_dir=CONF, version_base=None):
        saved = compose("config", overrides=["+experiment=smoke", "rollout.n=2"])
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    cfg = toolrl.eval.compose(run / "checkpoint", ["trainer.eval_samples=2"])
    assert cfg.model.path == str(run / "checkpoint")
    assert (cfg.rollout.n, cfg.trainer.eval_prompts, cfg.trainer.eval_samples) == (2, 8, 2)
    assert "conf/ changed" not in capsys.readouterr().err
    saved.trainer.eval_prompts = 5  # as if conf/ had said 5 when the run started
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    toolrl.eval.compose(run / "checkpoint", [])
    assert "trainer.eval_prompts differ" in capsys.readouterr().err
